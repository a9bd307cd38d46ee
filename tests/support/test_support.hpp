// Shared by the test suites: temporary directories, running a command (Python
// torch, the ckpt CLI) and capturing what it prints, and tensor comparison.
#pragma once

#include <ckpt/error.hpp>
#include <ckpt/log.hpp>
#include <ckpt/state_dict.hpp>

#include "support/process.hpp"

#include <ATen/ATen.h>

#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <array>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <iterator>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ckpt::test {

/// A fresh directory under $TMPDIR (or /tmp), removed with everything in it.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/ckpt-test-XXXXXX";
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

struct RunResult {
  int status = -1;     ///< exit status, or 128 + signal
  std::string output;  ///< stdout and stderr together
};

/// Runs `command` through /bin/sh, capturing stdout and stderr.
inline RunResult run(const std::string& command) {
  RunResult r;
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (!p) throw std::runtime_error("popen failed: " + command);
  std::array<char, 4096> buf{};
  while (std::size_t n = std::fread(buf.data(), 1, buf.size(), p)) r.output.append(buf.data(), n);
  int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

/// Quotes one shell word.
inline std::string sh_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

/// The Python interpreter that has torch (Debian's python3-torch).
inline std::string python() {
  return "/usr/bin/python3";
}

RunResult torch2_script(const std::string& script, const std::vector<std::string>& args);

/// Runs `tests/interop/<script>` with Debian's Python torch and `args`: torch
/// 1.13, or torch 2.6 (torch2_script) when the environment has
/// CKPT_INTEROP_TORCH=2 (ctest runs the single-file interop suite both ways).
inline RunResult python_script(const std::string& script, const std::vector<std::string>& args) {
  const char* generation = std::getenv("CKPT_INTEROP_TORCH");
  if (generation && std::string(generation) == "2") return torch2_script(script, args);
  std::string cmd = python() + " -B " + sh_quote(std::string(CKPT_SOURCE_DIR "/tests/interop/") + script);
  for (const auto& a : args) cmd += " " + sh_quote(a);
  return run(cmd);
}

/// Runs `tests/interop/<script>` with torch 2.x: Python 3 of the Debian
/// trixie chroot that cmake/install-deps.sh makes (torch 2.6), through
/// cmake/chroot-python, which mounts the source tree and the temporary
/// directories at their own paths in there.
inline RunResult torch2_script(const std::string& script, const std::vector<std::string>& args) {
  std::string cmd = "CKPT_CHROOT_BIND=" + sh_quote(CKPT_SOURCE_DIR) + " " +
                    sh_quote(CKPT_SOURCE_DIR "/cmake/chroot-python") + " -B " +
                    sh_quote(std::string(CKPT_SOURCE_DIR "/tests/interop/") + script);
  for (const auto& a : args) cmd += " " + sh_quote(a);
  return run(cmd);
}

/// What a failed Python run said, for a test's failure message.
inline std::string describe(const RunResult& r) {
  return "python exited with status " + std::to_string(r.status) + ":\n" + r.output;
}

/// A guard against hanging, never a synchronisation: every wait in a test is on
/// a completion, bounded by this.
inline constexpr std::chrono::seconds kWaitBound{120};

/// The value of `f`, which must complete within `bound` (else the test fails
/// with "not completed within ..."): the future's own exception propagates.
template <typename T>
T wait_get(std::future<T>& f, std::chrono::seconds bound = kWaitBound) {
  if (f.wait_for(bound) != std::future_status::ready)
    throw std::runtime_error("not completed within " + std::to_string(bound.count()) + " s");
  return f.get();
}

/// Whether no process `pid` exists (gone and reaped; a zombie still exists).
/// Only for a real pid: kill(-1, 0) would ask about every process.
inline bool process_gone(int pid) {
  errno = 0;
  return pid > 0 && ::kill(pid, 0) == -1 && errno == ESRCH;
}

/// The processes whose parent is this process; only those whose command name
/// is `comm` when it is given.
inline std::vector<int> child_processes(const std::string& comm = {}) {
  std::vector<int> out;
  for (const auto& p : processes())
    if (p.ppid == ::getpid() && (comm.empty() || p.comm == comm)) out.push_back(p.pid);
  return out;
}

/// A list IValue of `items` (a state dict's Python list).
inline c10::IValue list_of(std::vector<c10::IValue> items) {
  c10::impl::GenericList l(c10::AnyType::get());
  for (auto& x : items) l.push_back(std::move(x));
  return c10::IValue(std::move(l));
}

/// upstream's test state dict: {"model": Linear(10, 5).state_dict(),
/// "optimizer": {"param_groups": [{"lr": 0.01}]}, "epoch": 5, "step": 1000}.
inline StateDict upstream_state_dict() {
  StateDict model;
  model.insert("weight", at::randn({5, 10}));
  model.insert("bias", at::randn({5}));
  StateDict group;
  group.insert("lr", 0.01);
  StateDict optimizer;
  optimizer.insert("param_groups", list_of({group.to_ivalue()}));
  StateDict sd;
  sd.insert("model", model);
  sd.insert("optimizer", optimizer);
  sd.insert("epoch", 5);
  sd.insert("step", 1000);
  return sd;
}

/// Records every message logged (ckpt::log) while it lives; puts the previous
/// handler back.
class LogCapture {
 public:
  LogCapture()
      : previous_(set_log_handler([this](LogLevel level, std::string_view text) {
          std::lock_guard lock(mutex_);
          messages_.emplace_back(level, std::string(text));
        })) {}
  ~LogCapture() { set_log_handler(std::move(previous_)); }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;

  std::vector<std::pair<LogLevel, std::string>> messages() const {
    std::lock_guard lock(mutex_);
    return messages_;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<std::pair<LogLevel, std::string>> messages_;
  LogHandler previous_;
};

/// Whether `e.what()` contains `text`: what a test checks of an error's message.
inline bool mentions(const std::exception& e, std::string_view text) {
  return std::string_view(e.what()).find(text) != std::string_view::npos;
}

/// XORs the byte at `at` of `file` with `mask`: one flipped byte, in place.
inline void flip_byte(const std::filesystem::path& file, std::uint64_t at, unsigned char mask = 0x01) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(at));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ mask);
  f.seekp(static_cast<std::streamoff>(at));
  f.write(&c, 1);
  if (!f) throw std::runtime_error("cannot flip a byte of " + file.string());
}

/// CRC-32 (zip's polynomial) computed here, independently of the library's zlib.
inline std::uint32_t crc32_of(std::string_view bytes) {
  static const auto table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  std::uint32_t c = 0xffffffffu;
  for (unsigned char b : bytes) c = table[(c ^ b) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

/// Exactly equal: same dtype, sizes and every element bit-identical.
inline bool identical(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  if (a.numel() == 0) return true;
  if (a.is_complex()) return at::equal(at::view_as_real(a.contiguous()), at::view_as_real(b.contiguous()));
  return at::equal(a, b);
}

/// Bit for bit the same: dtype, sizes and the bytes of every element (NaNs
/// compare by their bits; -0.0 differs from 0.0).
inline bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  if (a.numel() == 0) return true;  // an empty tensor may have no data pointer
  const at::Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

/// Runs `fn` in a child process whose address space may grow by at most
/// `margin` bytes more and which gets 60 s of CPU, so that an allocation or a
/// loop the input drives ends as a bad_alloc or a signal instead of taking the
/// machine down. Returns what the child reported: "returned",
/// "CorruptCheckpoint: <what>", "ckpt::Error: <what>", "bad_alloc ...",
/// "exception: <what>", or "killed by signal N".
inline std::string run_in_bounded_child(const std::function<void()>& fn,
                                        std::uint64_t margin = std::uint64_t{1} << 30) {
  std::uint64_t vm_kb = 0;
  {
    std::ifstream status("/proc/self/status");
    std::string key;
    while (status >> key) {
      if (key == "VmSize:") {
        status >> vm_kb;
        break;
      }
      status.ignore(4096, '\n');
    }
  }
  if (vm_kb == 0) throw std::runtime_error("no VmSize in /proc/self/status");
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error("pipe failed");
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    ::close(fds[0]);
    // A crash must end the child, not reach Boost.Test's handlers (which would
    // run the rest of the suite in it).
    for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) std::signal(sig, SIG_DFL);
    rlimit as{};
    as.rlim_cur = as.rlim_max = (vm_kb << 10) + margin;
    ::setrlimit(RLIMIT_AS, &as);
    rlimit cpu{};
    cpu.rlim_cur = cpu.rlim_max = 60;
    ::setrlimit(RLIMIT_CPU, &cpu);
    std::string out;
    try {
      fn();
      out = "returned";
    } catch (const ckpt::CorruptCheckpoint& e) {
      out = std::string("CorruptCheckpoint: ") + e.what();
    } catch (const ckpt::Error& e) {
      out = std::string("ckpt::Error: ") + e.what();
    } catch (const std::bad_alloc&) {
      out = "bad_alloc (an allocation the input drove)";
    } catch (const std::exception& e) {
      out = std::string("exception: ") + e.what();
    }
    for (std::size_t done = 0; done < out.size();) {
      const ssize_t n = ::write(fds[1], out.data() + done, out.size() - done);
      if (n <= 0) break;
      done += static_cast<std::size_t>(n);
    }
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) out.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
  return out;
}

/// Makes orphans re-parent to this process rather than to init, so that a
/// process a test's child left behind can be found (kill_leftover_children).
inline void become_child_subreaper() {
  if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0)
    throw std::runtime_error("prctl(PR_SET_CHILD_SUBREAPER) failed");
}

/// This process's children not reaped yet (with become_child_subreaper: also
/// grandchildren left behind), each killed and reaped, so that one failing
/// case leaves nothing to the next. Returns the pids of those still running:
/// one that already exited on its own (a zombie: say, a writer child that
/// saw its trainer die and left) is reaped and not counted.
inline std::vector<pid_t> kill_leftover_children() {
  std::vector<pid_t> left;
  for (const auto& p : processes()) {
    if (p.ppid != ::getpid()) continue;
    if (p.state == 'Z')
      ::waitpid(p.pid, nullptr, 0);
    else
      left.push_back(p.pid);
  }
  for (pid_t pid : left) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
  return left;
}

}  // namespace ckpt::test
