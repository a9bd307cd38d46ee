// A process of a test's own, started with fork and exec: its stdout (and
// stderr) come back through a pipe line by line, every wait bounded.
#pragma once

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

namespace ckpt::test {

/// One process as /proc/PID/stat describes it (the fields tests use).
struct ProcessEntry {
  int pid = 0;
  std::string comm;  ///< the command name, as the kernel keeps it
  char state = 0;
  int ppid = 0;
  int pgrp = 0;
};

/// Every process /proc lists now; one that ends while it is read is left out.
inline std::vector<ProcessEntry> processes() {
  std::vector<ProcessEntry> out;
  std::error_code ec;
  for (std::filesystem::directory_iterator it("/proc", ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(it->path() / "stat");
    const std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    const auto open = stat.find('(');
    const auto close = stat.rfind(')');
    if (open == std::string::npos || close == std::string::npos || close < open) continue;
    ProcessEntry p;
    p.pid = std::stoi(name);
    p.comm = stat.substr(open + 1, close - open - 1);
    std::istringstream rest(stat.substr(close + 1));
    rest >> p.state >> p.ppid >> p.pgrp;
    out.push_back(std::move(p));
  }
  return out;
}

class Process {
 public:
  /// Starts `argv` with `env` ("NAME=value") added to this process's
  /// environment; in a process group of its own when `own_group` (then
  /// kill_group() kills it with everything it started).
  Process(const std::vector<std::string>& argv, const std::vector<std::string>& env = {},
          bool own_group = false) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    pid_ = ::fork();
    if (pid_ < 0) throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      if (own_group) ::setpgid(0, 0);
      ::dup2(fds[1], 1);
      ::dup2(fds[1], 2);
      for (const auto& e : env) ::putenv(const_cast<char*>(e.c_str()));
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    out_ = fds[0];
  }
  ~Process() {
    if (pid_ > 0 && status_ < 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (out_ >= 0) ::close(out_);
  }
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  int pid() const { return pid_; }

  /// The next line it prints; nullopt when its output ends first. Throws
  /// when none comes within `bound`.
  std::optional<std::string> line(std::chrono::milliseconds bound) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    for (;;) {
      if (const auto nl = buffer_.find('\n'); nl != std::string::npos) {
        std::string l = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        all_ += l + "\n";
        return l;
      }
      if (ended_) {
        if (buffer_.empty()) return std::nullopt;
        std::string l = std::move(buffer_);
        buffer_.clear();
        all_ += l + "\n";
        return l;
      }
      read_some(deadline);
    }
  }

  /// The first line that starts with `prefix` (others are skipped); nullopt
  /// when the output ends first.
  std::optional<std::string> line_starting(const std::string& prefix, std::chrono::milliseconds bound) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      auto l = line(left.count() > 0 ? left : std::chrono::milliseconds(1));
      if (!l || l->rfind(prefix, 0) == 0) return l;
    }
  }

  /// Reads the rest of its output and reaps it; its exit status (128 + signal
  /// when a signal ended it). Throws when it does not end within `bound`.
  int wait(std::chrono::milliseconds bound) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    while (!ended_) read_some(deadline);
    while (const auto l = line(bound)) {
    }
    return reap(deadline);
  }

  /// SIGKILLs it and reaps it.
  void kill() {
    if (status_ >= 0) return;
    ::kill(pid_, SIGKILL);
    int st = 0;
    ::waitpid(pid_, &st, 0);
    status_ = decode(st);
  }

  /// SIGKILLs its whole process group (it was started with `own_group`),
  /// waits until every process of the group has ended (each one's pidfd;
  /// bounded) and reaps it. The others of the group are reaped by their
  /// parents, or are zombies of a subreaper's now (every re-parenting is done
  /// once they have all ended).
  void kill_group(std::chrono::milliseconds bound = std::chrono::seconds(60)) {
    if (status_ >= 0) return;
    ::kill(-pid_, SIGKILL);
    const auto members = group_members(pid_);  // killed ones stay in /proc until reaped
    const auto deadline = std::chrono::steady_clock::now() + bound;
    for (const int pid : members) {
      const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
      if (pidfd < 0) continue;  // already gone and reaped
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      pollfd p{pidfd, POLLIN, 0};
      while (::poll(&p, 1, static_cast<int>(std::max<long>(left.count(), 1))) < 0 && errno == EINTR) {
      }
      ::close(pidfd);
    }
    int st = 0;
    ::waitpid(pid_, &st, 0);
    status_ = decode(st);
  }

  /// The processes of process group `pgid` (from /proc).
  static std::vector<int> group_members(int pgid) {
    std::vector<int> out;
    for (const auto& p : processes())
      if (p.pgrp == pgid) out.push_back(p.pid);
    return out;
  }

  /// Everything it printed that was read so far.
  const std::string& output() const { return all_; }

 private:
  static int decode(int st) { return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st); }

  void read_some(std::chrono::steady_clock::time_point deadline) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0)
      throw std::runtime_error("a test process printed nothing in time:\n" + all_ + buffer_);
    pollfd p{out_, POLLIN, 0};
    const int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) return;
    if (r == 0) throw std::runtime_error("a test process printed nothing in time:\n" + all_ + buffer_);
    char buf[4096];
    const ssize_t n = ::read(out_, buf, sizeof buf);
    if (n <= 0)
      ended_ = true;
    else
      buffer_.append(buf, static_cast<std::size_t>(n));
  }

  int reap(std::chrono::steady_clock::time_point deadline) {
    if (status_ >= 0) return status_;
    const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
    if (pidfd >= 0) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      pollfd p{pidfd, POLLIN, 0};
      const int r = ::poll(&p, 1, static_cast<int>(std::max<long>(left.count(), 1)));
      ::close(pidfd);
      if (r == 0) throw std::runtime_error("a test process did not exit in time:\n" + all_);
    }
    int st = 0;
    ::waitpid(pid_, &st, 0);
    status_ = decode(st);
    return status_;
  }

  int pid_ = -1;
  int out_ = -1;
  int status_ = -1;
  bool ended_ = false;
  std::string buffer_;
  std::string all_;
};

/// Whether process `pid` (any, not only a child) ends within `bound`: waits on
/// a pidfd of it. A zombie counts as ended.
inline bool ends_within(int pid, std::chrono::milliseconds bound) {
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) return errno == ESRCH;
  pollfd p{pidfd, POLLIN, 0};
  int r = 0;
  do {
    r = ::poll(&p, 1, static_cast<int>(bound.count()));
  } while (r < 0 && errno == EINTR);
  ::close(pidfd);
  return r == 1;
}

}  // namespace ckpt::test
