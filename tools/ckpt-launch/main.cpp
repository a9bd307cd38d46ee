// ckpt-launch — starts N local ranks of a program, the way torchrun does on a
// node, so that a multi-rank checkpointing job runs without Python.
//
//   ckpt-launch -n N [--nnodes M --node-rank K] [--master-addr ADDR]
//               [--master-port PORT] [--timeout SECONDS] [--] PROGRAM [ARGS...]
//
// A job of several nodes runs one ckpt-launch per node, each with the same N,
// M, ADDR (an address of node 0) and PORT, and its own K (0..M-1).
//
// What it does, in order:
//   1. Parses its options (`--opt VALUE` or `--opt=VALUE`, `-n N` or `-nN`);
//      options end at `--` or at the first word that is not one. Bad usage
//      prints the usage line on stderr and exits 2.
//   2. Picks MASTER_ADDR (default 127.0.0.1) and MASTER_PORT (default, on one
//      node only: a free TCP port of MASTER_ADDR, found by binding port 0 there,
//      reading the port back and closing the socket again; with M > 1 nodes
//      --master-port is required, since every node must name the same one).
//   3. Blocks SIGCHLD, SIGINT, SIGTERM and SIGHUP and reads them from a signalfd,
//      so that the whole launcher is one poll(2) loop.
//   4. Starts this node's ranks K*N .. K*N+N-1 with posix_spawnp (PROGRAM is
//      looked up in PATH when it holds no '/'). Each rank gets the launcher's
//      environment plus RANK, LOCAL_RANK (0..N-1), WORLD_SIZE (= N*M),
//      LOCAL_WORLD_SIZE (= N), GROUP_RANK (= K, the node's rank),
//      MASTER_ADDR and MASTER_PORT; its stdout and stderr are pipes to the
//      launcher. A PROGRAM that cannot be started is named on stderr; the ranks
//      already running are stopped (step 7) and the launcher exits 127 (126
//      when it exists but cannot be executed).
//   5. Forwards every line a rank writes to the launcher's stdout or stderr (the
//      same stream the rank used), prefixed with `[rank R] `. A line is written
//      whole by this one thread, so lines of different ranks never mix. A last
//      line without a newline is printed with its prefix and a newline when the
//      rank closes the stream or exits; a line longer than 64 KiB is cut into
//      pieces, each printed as a line of its own. When a rank exits, whatever it
//      left in its pipes is forwarded, then its pipes are closed: output that
//      the rank's own children write later is not forwarded.
//   6. Reaps every rank as it exits. The first rank that exits non-zero or is
//      killed by a signal is reported (`ckpt-launch: rank R exited with status
//      S` or `... killed by signal K (SIGNAME)`) and stops the others (step 7);
//      the launcher then exits with that rank's status (128 + K for a signal).
//      When --timeout passes first (0, the default, is no timeout), the ranks
//      still running are named and stopped; the launcher exits 124. When the
//      launcher gets SIGINT, SIGTERM or SIGHUP, it sends that signal to every
//      running rank, stops them as in step 7 and exits 128 + that signal; one
//      of these signals while the ranks are being stopped sends SIGKILL at once.
//   7. Stopping: SIGTERM to every rank still running (the forwarded signal when
//      the launcher was signalled), then SIGKILL to those still running 5 s
//      later. Only the ranks themselves are signalled, not their own children.
//   8. Exits once every rank has been reaped: 0 when all of them exited 0. No
//      rank is ever left behind, running or as a zombie.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <spawn.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::string_view usage_text =
    "usage: ckpt-launch -n N [--nnodes M --node-rank K] [--master-addr ADDR] [--master-port PORT] "
    "[--timeout SECONDS] [--] PROGRAM [ARGS...]\n";
constexpr auto kill_grace = std::chrono::seconds(5);
constexpr std::size_t max_line = 64 * 1024;

/// Bad usage: what was wrong; main prints it with the usage line and exits 2.
struct UsageError {
  std::string what;
};

/// Any other failure of the launcher itself (not of a rank); main exits 1.
struct LaunchError {
  std::string what;
};

/// Writes all of `s` to `fd`, waiting while it is full even when it was handed
/// to the launcher non-blocking. A reader that went away (EPIPE) loses the
/// output but does not stop the launcher: the ranks must still be looked after.
void write_all(int fd, std::string_view s) {
  while (!s.empty()) {
    const ssize_t n = ::write(fd, s.data(), s.size());
    if (n >= 0) {
      s.remove_prefix(static_cast<std::size_t>(n));
    } else if (errno == EAGAIN) {
      pollfd p{fd, POLLOUT, 0};
      ::poll(&p, 1, -1);
    } else if (errno != EINTR) {
      return;
    }
  }
}

/// The launcher's own messages, on stderr.
template <typename... Args>
void say(fmt::format_string<Args...> format, Args&&... args) {
  write_all(STDERR_FILENO, "ckpt-launch: " + fmt::format(format, std::forward<Args>(args)...) + "\n");
}

std::string signal_name(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev ? fmt::format("SIG{}", abbrev) : fmt::format("signal {}", sig);
}

std::string rank_list(const std::vector<int>& ranks) {
  return fmt::format("[{}]", fmt::join(ranks, ", "));
}

// ---------------------------------------------------------------- options --

struct Options {
  int nproc = 0;      // ranks on this node
  int nnodes = 1;     // nodes in the job
  int node_rank = 0;  // this node's rank
  std::string master_addr = "127.0.0.1";
  std::optional<int> master_port;
  double timeout_s = 0;
  std::string timeout_text;  // as given, for the timeout message
  std::vector<std::string> command;
};

template <typename T>
T parse_number(std::string_view option, std::string_view text, T min, T max) {
  T value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  // Written so that NaN fails too.
  if (text.empty() || ec != std::errc() || end != text.data() + text.size() ||
      !(value >= min && value <= max))
    throw UsageError{fmt::format("{} needs a number from {} to {}, not '{}'", option, min, max, text)};
  return value;
}

Options parse_options(int argc, char** argv) {
  Options o;
  bool have_n = false;
  int i = 1;
  for (; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--") {
      ++i;
      break;
    }
    if (!arg.starts_with("-") || arg == "-") break;  // PROGRAM
    // Splits `--opt=VALUE` and `-nVALUE`; otherwise the value is the next word.
    std::string_view name = arg;
    std::optional<std::string_view> inline_value;
    if (arg.starts_with("--")) {
      if (const auto eq = arg.find('='); eq != std::string_view::npos) {
        name = arg.substr(0, eq);
        inline_value = arg.substr(eq + 1);
      }
    } else if (arg.starts_with("-n") && arg.size() > 2) {
      name = "-n";
      inline_value = arg.substr(arg[2] == '=' ? 3 : 2);
    }
    if (name != "-n" && name != "--nnodes" && name != "--node-rank" && name != "--master-addr" &&
        name != "--master-port" && name != "--timeout")
      throw UsageError{fmt::format("unknown option '{}'", arg)};
    std::string_view value;
    if (inline_value) {
      value = *inline_value;
    } else {
      if (i + 1 >= argc) throw UsageError{fmt::format("{} needs a value", name)};
      value = argv[++i];
    }
    if (name == "-n") {
      o.nproc = parse_number<int>(name, value, 1, 1 << 16);
      have_n = true;
    } else if (name == "--nnodes") {
      o.nnodes = parse_number<int>(name, value, 1, 1 << 16);
    } else if (name == "--node-rank") {
      o.node_rank = parse_number<int>(name, value, 0, (1 << 16) - 1);
    } else if (name == "--master-addr") {
      if (value.empty()) throw UsageError{"--master-addr needs an address"};
      o.master_addr = value;
    } else if (name == "--master-port") {
      o.master_port = parse_number<int>(name, value, 1, 65535);
    } else {
      o.timeout_s = parse_number<double>(name, value, 0.0, 1e9);
      o.timeout_text = value;
    }
  }
  if (!have_n) throw UsageError{"-n N is required"};
  if (o.node_rank >= o.nnodes)
    throw UsageError{fmt::format("--node-rank {} is not a node of --nnodes {}", o.node_rank, o.nnodes)};
  if (o.nnodes > 1 && !o.master_port)
    throw UsageError{"--nnodes above 1 needs --master-port: every node must name the same port"};
  if (static_cast<long long>(o.nproc) * o.nnodes > (1 << 30))
    throw UsageError{"-n times --nnodes is too many ranks"};
  for (; i < argc; ++i) o.command.emplace_back(argv[i]);
  if (o.command.empty()) throw UsageError{"no PROGRAM given"};
  return o;
}

/// A TCP port of `addr` that nothing listens on now: bind port 0, read back
/// what the kernel chose, close. Another process may still take it before rank
/// 0 binds it; --master-port is the way out when that matters.
int find_free_port(const std::string& addr) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (const int rc = ::getaddrinfo(addr.c_str(), "0", &hints, &found); rc != 0)
    throw LaunchError{fmt::format("cannot resolve master address '{}': {}", addr, ::gai_strerror(rc))};
  int port = 0;
  int last_errno = 0;
  for (addrinfo* a = found; a && port == 0; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last_errno = errno;
      continue;
    }
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) == 0) {
      port = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                         : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    } else {
      last_errno = errno;
    }
    ::close(fd);
  }
  ::freeaddrinfo(found);
  if (port == 0)
    throw LaunchError{fmt::format("cannot find a free port on master address '{}': {}; give --master-port",
                                  addr, std::strerror(last_errno))};
  return port;
}

// ------------------------------------------------------------------ ranks --

/// One of a rank's two output streams: the launcher's end of the pipe and the
/// line not yet complete.
struct Stream {
  int fd = -1;      // -1 once closed
  int out_fd = -1;  // where its lines go: the launcher's stdout or stderr
  std::string prefix;
  std::string partial;
};

struct Rank {
  int rank = 0;
  pid_t pid = -1;  // -1 before it started and once reaped
  Stream out;
  Stream err;
};

/// Forwards the complete lines of `data` (after what `s` held back), each with
/// the rank's prefix, in one write; keeps the incomplete rest. `at_end` flushes
/// the rest as a line of its own.
void forward(Stream& s, std::string_view data, bool at_end) {
  s.partial.append(data);
  std::string lines;
  std::size_t begin = 0;
  for (;;) {
    const auto nl = s.partial.find('\n', begin);
    const bool whole = nl != std::string::npos;
    const std::size_t end = whole ? nl : s.partial.size();
    if (!whole && end - begin < max_line && !(at_end && end > begin)) break;
    const std::size_t take = std::min(end - begin, max_line);
    lines += s.prefix;
    lines.append(s.partial, begin, take);
    lines += '\n';
    begin += take + (whole && take == end - begin ? 1 : 0);
    if (begin >= s.partial.size()) break;
  }
  s.partial.erase(0, begin);
  if (!lines.empty()) write_all(s.out_fd, lines);
}

/// Reads from `s`'s pipe once and forwards it; closes the stream at its end.
/// `final` (the rank has exited) reads what the pipe holds now, which is all
/// the rank wrote, and closes the stream: a child of the rank that still has
/// the pipe can neither keep the launcher reading nor waiting.
void pump(Stream& s, bool final) {
  if (s.fd < 0) return;
  char buf[65536];
  int left = 0;
  if (final && ::ioctl(s.fd, FIONREAD, &left) != 0) left = 0;
  for (;;) {
    const ssize_t n = ::read(s.fd, buf, final ? std::min<std::size_t>(sizeof buf, left) : sizeof buf);
    if (n > 0) {
      forward(s, {buf, static_cast<std::size_t>(n)}, false);
      if (!final) return;  // poll again rather than starve the other ranks
      left -= static_cast<int>(n);
      if (left > 0) continue;
      break;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN && !final) return;
    break;  // end of stream, error, or nothing left after the rank's exit
  }
  forward(s, {}, true);
  ::close(s.fd);
  s.fd = -1;
}

/// Environment of every rank: the launcher's, less the variables the launcher
/// sets, which are appended per rank.
std::vector<std::string> base_environment() {
  static constexpr std::string_view ours[] = {
      "RANK=",       "LOCAL_RANK=",  "WORLD_SIZE=", "LOCAL_WORLD_SIZE=",
      "GROUP_RANK=", "MASTER_ADDR=", "MASTER_PORT="};
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    const std::string_view v = *e;
    if (std::none_of(std::begin(ours), std::end(ours), [&](auto p) { return v.starts_with(p); }))
      env.emplace_back(v);
  }
  return env;
}

class Launcher {
 public:
  /// `child_mask` is the signal mask the ranks start with; `child_defaults`
  /// the signals whose action they get reset to the default.
  Launcher(Options options, int signal_fd, const sigset_t& child_mask, const sigset_t& child_defaults)
      : o_(std::move(options)),
        signal_fd_(signal_fd),
        child_mask_(child_mask),
        child_defaults_(child_defaults) {}

  /// Steps 4–8; returns the launcher's exit status.
  int run() {
    if (o_.timeout_s > 0)
      deadline_ = Clock::now() +
                  std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o_.timeout_s));
    ranks_.resize(static_cast<std::size_t>(o_.nproc));
    for (int r = 0; r < o_.nproc && !stopping_; ++r) start(r);
    try {
      while (any_alive()) step();
    } catch (...) {
      // The loop itself broke: never leave a rank behind.
      signal_all(SIGKILL);
      for (auto& r : ranks_)
        if (r.pid > 0)
          while (::waitpid(r.pid, nullptr, 0) < 0 && errno == EINTR) {
          }
      throw;
    }
    return status_;
  }

 private:
  /// Starts this node's rank `local` (global rank: node_rank * N + local).
  void start(int local) {
    const int r = o_.node_rank * o_.nproc + local;
    Rank& rank = ranks_[static_cast<std::size_t>(local)];
    rank.rank = r;
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return spawn_failed(r, errno);
    if (::pipe2(err, O_CLOEXEC) != 0) {
      const int e = errno;
      ::close(out[0]);
      ::close(out[1]);
      return spawn_failed(r, e);
    }
    std::vector<std::string> env = base_environment();
    env.push_back(fmt::format("RANK={}", r));
    env.push_back(fmt::format("LOCAL_RANK={}", local));
    env.push_back(fmt::format("WORLD_SIZE={}", o_.nproc * o_.nnodes));
    env.push_back(fmt::format("LOCAL_WORLD_SIZE={}", o_.nproc));
    env.push_back(fmt::format("GROUP_RANK={}", o_.node_rank));
    env.push_back("MASTER_ADDR=" + o_.master_addr);
    env.push_back(fmt::format("MASTER_PORT={}", *o_.master_port));
    std::vector<char*> envp, argv;
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    for (auto& a : o_.command) argv.push_back(a.data());
    argv.push_back(nullptr);

    // The child gets the signal mask the launcher started with, and the
    // default action for SIGPIPE unless the launcher was started with it
    // ignored (it is ignored here, and that would survive exec).
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    ::posix_spawn_file_actions_init(&actions);
    ::posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
    ::posix_spawn_file_actions_adddup2(&actions, err[1], STDERR_FILENO);
    ::posix_spawnattr_init(&attr);
    ::posix_spawnattr_setsigdefault(&attr, &child_defaults_);
    ::posix_spawnattr_setsigmask(&attr, &child_mask_);
    ::posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
    pid_t pid = -1;
    const int rc = ::posix_spawnp(&pid, argv[0], &actions, &attr, argv.data(), envp.data());
    ::posix_spawn_file_actions_destroy(&actions);
    ::posix_spawnattr_destroy(&attr);
    ::close(out[1]);
    ::close(err[1]);
    if (rc != 0) {
      ::close(out[0]);
      ::close(err[0]);
      return spawn_failed(r, rc);
    }
    ::fcntl(out[0], F_SETFL, O_NONBLOCK);
    ::fcntl(err[0], F_SETFL, O_NONBLOCK);
    rank.pid = pid;
    const std::string prefix = fmt::format("[rank {}] ", r);
    rank.out = {out[0], STDOUT_FILENO, prefix, {}};
    rank.err = {err[0], STDERR_FILENO, prefix, {}};
  }

  void spawn_failed(int r, int error) {
    say("cannot start rank {}: cannot execute '{}': {}", r, o_.command[0], std::strerror(error));
    begin_stop(error == ENOENT ? 127 : 126, SIGTERM);
  }

  bool any_alive() const {
    return std::any_of(ranks_.begin(), ranks_.end(), [](const Rank& r) { return r.pid > 0; });
  }

  std::vector<int> alive_ranks() const {
    std::vector<int> alive;
    for (const auto& r : ranks_)
      if (r.pid > 0) alive.push_back(r.rank);
    return alive;
  }

  void signal_all(int sig) {
    for (const auto& r : ranks_)
      if (r.pid > 0) ::kill(r.pid, sig);
  }

  /// Step 7: the first reason to stop sets the exit status; later ones don't.
  void begin_stop(int status, int sig) {
    if (stopping_) return;
    stopping_ = true;
    status_ = status;
    signal_all(sig);
    kill_at_ = Clock::now() + kill_grace;
  }

  /// One turn of the loop: wait for output, a signal or the next deadline.
  void step() {
    std::vector<pollfd> fds{{signal_fd_, POLLIN, 0}};
    std::vector<Stream*> streams{nullptr};
    for (auto& r : ranks_)
      for (Stream* s : {&r.out, &r.err})
        if (s->fd >= 0) {
          fds.push_back({s->fd, POLLIN, 0});
          streams.push_back(s);
        }
    const auto next = stopping_ ? kill_at_ : deadline_;
    int wait_ms = -1;
    if (next) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(*next - Clock::now()).count();
      wait_ms = static_cast<int>(std::clamp<decltype(left)>(left, 0, 60'000));
    }
    if (::poll(fds.data(), fds.size(), wait_ms) < 0 && errno != EINTR)
      throw LaunchError{fmt::format("poll failed: {}", std::strerror(errno))};

    for (std::size_t i = 1; i < fds.size(); ++i)
      if (fds[i].revents) pump(*streams[i], false);
    if (fds[0].revents & POLLIN) on_signals();

    const auto now = Clock::now();
    if (!stopping_ && deadline_ && now >= *deadline_ && any_alive()) {
      say("timed out after {} s; ranks still running: {}", o_.timeout_text, rank_list(alive_ranks()));
      begin_stop(124, SIGTERM);
    } else if (stopping_ && kill_at_ && now >= *kill_at_ && any_alive()) {
      say("ranks {} still running {} s after being told to stop; sending SIGKILL", rank_list(alive_ranks()),
          kill_grace.count());
      signal_all(SIGKILL);
      kill_at_.reset();  // SIGKILL cannot be ignored: just wait for the reaping
    }
  }

  void on_signals() {
    signalfd_siginfo info;
    while (::read(signal_fd_, &info, sizeof info) == sizeof info) {
      const int sig = static_cast<int>(info.ssi_signo);
      if (sig == SIGCHLD) continue;  // reaped below, whatever the count
      if (stopping_) {
        say("got {} while stopping: sending SIGKILL to ranks {}", signal_name(sig), rank_list(alive_ranks()));
        signal_all(SIGKILL);
        kill_at_.reset();
      } else {
        say("got {}; stopping ranks {}", signal_name(sig), rank_list(alive_ranks()));
        begin_stop(128 + sig, sig);
      }
    }
    reap();
  }

  /// Step 6: waits for every rank that has exited, forwards what it left in its
  /// pipes, and reports the first failure.
  void reap() {
    for (;;) {
      int wstatus = 0;
      const pid_t pid = ::waitpid(-1, &wstatus, WNOHANG);
      if (pid <= 0) {
        if (pid < 0 && errno == EINTR) continue;
        return;
      }
      const auto it = std::find_if(ranks_.begin(), ranks_.end(), [&](const Rank& r) { return r.pid == pid; });
      if (it == ranks_.end()) continue;
      it->pid = -1;
      pump(it->out, true);
      pump(it->err, true);
      const bool failed = !WIFEXITED(wstatus) || WEXITSTATUS(wstatus) != 0;
      if (!failed || stopping_) continue;
      if (WIFSIGNALED(wstatus)) {
        const int sig = WTERMSIG(wstatus);
        say("rank {} killed by signal {} ({})", it->rank, sig, signal_name(sig));
        begin_stop(128 + sig, SIGTERM);
      } else {
        say("rank {} exited with status {}", it->rank, WEXITSTATUS(wstatus));
        begin_stop(WEXITSTATUS(wstatus), SIGTERM);
      }
    }
  }

  Options o_;
  int signal_fd_;
  sigset_t child_mask_;
  sigset_t child_defaults_;
  std::vector<Rank> ranks_;
  std::optional<Clock::time_point> deadline_;  // --timeout
  std::optional<Clock::time_point> kill_at_;   // SIGKILL for those still running
  bool stopping_ = false;
  int status_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  try {
    Options options = parse_options(argc, argv);
    if (!options.master_port) options.master_port = find_free_port(options.master_addr);

    // Signals arrive through the signalfd only. SIGCHLD must not be ignored
    // (inherited SIG_IGN would reap the ranks behind the launcher's back); an
    // inherited SIG_IGN of SIGINT, SIGTERM or SIGHUP is respected (nohup).
    // SIGPIPE is ignored so that a closed stdout costs output, not the ranks'
    // supervision.
    sigset_t handled, original, child_defaults;
    sigemptyset(&handled);
    for (int sig : {SIGCHLD, SIGINT, SIGTERM, SIGHUP}) sigaddset(&handled, sig);
    if (::sigprocmask(SIG_BLOCK, &handled, &original) != 0)
      throw LaunchError{fmt::format("sigprocmask failed: {}", std::strerror(errno))};
    const int signal_fd = ::signalfd(-1, &handled, SFD_CLOEXEC | SFD_NONBLOCK);
    if (signal_fd < 0) throw LaunchError{fmt::format("signalfd failed: {}", std::strerror(errno))};
    std::signal(SIGCHLD, SIG_DFL);
    sigemptyset(&child_defaults);
    if (std::signal(SIGPIPE, SIG_IGN) != SIG_IGN) sigaddset(&child_defaults, SIGPIPE);

    return Launcher(std::move(options), signal_fd, original, child_defaults).run();
  } catch (const UsageError& e) {
    write_all(STDERR_FILENO, fmt::format("ckpt-launch: {}\n{}", e.what, usage_text));
    return 2;
  } catch (const LaunchError& e) {
    say("{}", e.what);
    return 1;
  }
}
