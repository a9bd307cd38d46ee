// ckpt-launch, run as a user runs it: its ranks are tests/support/launch_child,
// which prints what it sees or fails, hangs, writes many lines, as told. Every
// run is bounded (a launcher that hangs is killed and the case fails), and this
// process is a child subreaper, so a rank the launcher left behind becomes this
// process's child and is found.
#define BOOST_TEST_MODULE launch_test
#include <boost/test/unit_test.hpp>

#include "support/test_support.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace fs = std::filesystem;
using ckpt::test::TempDir;

using ckpt::test::process_gone;
namespace {

/// A hang guard for one launcher run, not a measurement: nothing here takes
/// more than a few seconds.
constexpr auto kBound = std::chrono::seconds(60);

fs::path bin_dir() {
  return fs::canonical("/proc/self/exe").parent_path();
}
std::string launcher() {
  return (bin_dir() / "ckpt-launch").string();
}
std::string child() {
  return (bin_dir() / "launch_child").string();
}

/// Orphans are re-parented to this process, so that a rank a launcher left
/// behind is found by leftover_children().
struct ChildSubreaper {
  ChildSubreaper() { ckpt::test::become_child_subreaper(); }
};

std::vector<pid_t> leftover_children() {
  return ckpt::test::kill_leftover_children();
}

struct Result {
  int status = -1;  ///< exit status, or 128 + signal
  std::string out;  ///< the launcher's stdout
  std::string err;  ///< the launcher's stderr
  bool hung = false;
};

/// ckpt-launch started with `args` (its stdin /dev/null, `env` added to this
/// process's environment), its stdout and stderr read apart.
class Launch {
 public:
  explicit Launch(const std::vector<std::string>& args, const std::vector<std::string>& env = {})
      : deadline_(std::chrono::steady_clock::now() + kBound) {
    int out[2], err[2];
    BOOST_REQUIRE(::pipe2(out, O_CLOEXEC) == 0 && ::pipe2(err, O_CLOEXEC) == 0);
    std::vector<std::string> argv_s{launcher()};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<std::string> env_s;
    for (char** e = environ; *e; ++e) {
      const std::string v = *e;
      const auto key = v.substr(0, v.find('=') + 1);
      if (std::none_of(env.begin(), env.end(), [&](const std::string& x) { return x.starts_with(key); }))
        env_s.push_back(v);
    }
    env_s.insert(env_s.end(), env.begin(), env.end());
    std::vector<char*> argv, envp;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& e : env_s) envp.push_back(e.data());
    envp.push_back(nullptr);

    posix_spawn_file_actions_t actions;
    ::posix_spawn_file_actions_init(&actions);
    ::posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    ::posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
    ::posix_spawn_file_actions_adddup2(&actions, err[1], STDERR_FILENO);
    const int rc = ::posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), envp.data());
    ::posix_spawn_file_actions_destroy(&actions);
    ::close(out[1]);
    ::close(err[1]);
    out_fd_ = out[0];
    err_fd_ = err[0];
    BOOST_REQUIRE_MESSAGE(rc == 0, "cannot start " << argv_s[0] << ": " << std::strerror(rc));
    // Through syscall(): glibc 2.36's <sys/pidfd.h> lacks C linkage for C++.
    pidfd_ = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
    BOOST_REQUIRE_MESSAGE(pidfd_ >= 0, "pidfd_open: " << std::strerror(errno));
  }

  /// A launcher not finished (a case that failed half-way) is killed, and so
  /// are the ranks it leaves.
  ~Launch() {
    if (!exited_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      leftover_children();
    }
    for (int fd : {out_fd_, err_fd_, pidfd_})
      if (fd >= 0) ::close(fd);
  }
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;

  pid_t pid() const { return pid_; }
  const std::string& out() const { return r_.out; }

  /// Reads the launcher's output until `done()` holds; false when the launcher
  /// exited or hung first.
  bool wait_until(const std::function<bool()>& done) { return pump(done) && done(); }

  /// Reads everything, reaps the launcher and returns what it did.
  Result finish() {
    pump([&] { return exited_ && out_fd_ < 0 && err_fd_ < 0; });
    return r_;
  }

 private:
  /// Polls the two pipes and the pidfd until `done()`, nothing is left to wait
  /// for, or the bound (then the launcher is killed and `hung` set).
  bool pump(const std::function<bool()>& done) {
    while (!done()) {
      std::vector<pollfd> fds;
      for (int fd : {out_fd_, err_fd_, exited_ ? -1 : pidfd_})
        if (fd >= 0) fds.push_back({fd, POLLIN, 0});
      if (fds.empty()) return true;
      const auto left =
          std::chrono::ceil<std::chrono::milliseconds>(deadline_ - std::chrono::steady_clock::now()).count();
      if (left <= 0) {
        r_.hung = true;
        ::kill(pid_, SIGKILL);
        reap();
        leftover_children();  // its ranks, re-parented here
        for (int* fd : {&out_fd_, &err_fd_}) ::close(std::exchange(*fd, -1));
        return false;
      }
      if (::poll(fds.data(), fds.size(), static_cast<int>(left)) < 0 && errno != EINTR) return false;
      for (const auto& p : fds) {
        if (!p.revents) continue;
        if (p.fd == pidfd_) {
          reap();
          continue;
        }
        char buf[65536];
        const ssize_t n = ::read(p.fd, buf, sizeof buf);
        if (n > 0) {
          (p.fd == out_fd_ ? r_.out : r_.err).append(buf, static_cast<std::size_t>(n));
        } else if (n == 0 || errno != EINTR) {
          ::close(p.fd);
          (p.fd == out_fd_ ? out_fd_ : err_fd_) = -1;
        }
      }
    }
    return true;
  }

  void reap() {
    int st = 0;
    while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
    }
    r_.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    exited_ = true;
  }

  std::chrono::steady_clock::time_point deadline_;
  pid_t pid_ = -1;
  int out_fd_ = -1, err_fd_ = -1, pidfd_ = -1;
  bool exited_ = false;
  Result r_;
};

/// Runs ckpt-launch to its end.
Result launch(const std::vector<std::string>& args, const std::vector<std::string>& env = {}) {
  Result r = Launch(args, env).finish();
  BOOST_TEST_MESSAGE("ckpt-launch exited " << r.status << "; stderr:\n" << r.err);
  BOOST_REQUIRE_MESSAGE(!r.hung, "ckpt-launch did not finish within " << kBound.count() << " s");
  return r;
}

/// The complete lines of `text` (what follows the last newline is left out).
std::vector<std::string> complete_lines(const std::string& text) {
  std::vector<std::string> lines;
  for (std::size_t begin = 0, nl; (nl = text.find('\n', begin)) != std::string::npos; begin = nl + 1)
    lines.push_back(text.substr(begin, nl - begin));
  return lines;
}

/// The lines of what a launcher printed, which must end with a newline
/// (nothing half-printed).
std::vector<std::string> lines_of(const std::string& text) {
  BOOST_CHECK_MESSAGE(text.empty() || text.back() == '\n', "output does not end with a newline");
  return complete_lines(text);
}

/// Splits `[rank R] payload`; rank -1 when the line has no such prefix.
std::pair<int, std::string> split_prefix(const std::string& line) {
  int rank = -1;
  int used = 0;
  if (std::sscanf(line.c_str(), "[rank %d] %n", &rank, &used) != 1 || used == 0) return {-1, line};
  return {rank, line.substr(static_cast<std::size_t>(used))};
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

/// The pids the ranks printed (`pid P` lines), by rank; `out` may be read
/// only in part.
std::map<int, pid_t> printed_pids(const std::string& out) {
  std::map<int, pid_t> pids;
  for (const auto& line : complete_lines(out)) {
    const auto [rank, payload] = split_prefix(line);
    int pid = 0;
    if (rank >= 0 && std::sscanf(payload.c_str(), "pid %d", &pid) == 1) pids[rank] = pid;
  }
  return pids;
}

void check_nothing_left(const std::map<int, pid_t>& pids) {
  for (const auto& [rank, pid] : pids)
    BOOST_CHECK_MESSAGE(process_gone(pid), "rank " << rank << " still exists");
  const auto left = leftover_children();
  BOOST_CHECK_MESSAGE(left.empty(), "processes left behind: " << left.size());
}

/// Whether a TCP socket can be bound to `port` on 127.0.0.1 now.
bool port_free(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

/// The `KEY=VALUE` words of one `env` line.
std::map<std::string, std::string> env_words(const std::string& payload) {
  std::map<std::string, std::string> words;
  std::istringstream in(payload);
  for (std::string w; in >> w;) {
    const auto eq = w.find('=');
    if (eq != std::string::npos) words[w.substr(0, eq)] = w.substr(eq + 1);
  }
  return words;
}

}  // namespace

BOOST_TEST_GLOBAL_FIXTURE(ChildSubreaper);

BOOST_AUTO_TEST_CASE(four_ranks_get_their_ranks_the_world_size_and_one_free_master_port) {
  // A stale RANK in the launcher's environment must not reach the ranks;
  // everything else must.
  const auto r = launch({"-n", "4", child(), "env"}, {"CKPT_LAUNCH_TEST_MARK=from-the-launcher", "RANK=77"});
  BOOST_CHECK_EQUAL(r.status, 0);
  BOOST_CHECK_EQUAL(r.err, "");
  const auto lines = lines_of(r.out);
  BOOST_REQUIRE_EQUAL(lines.size(), 4u);
  std::set<int> ranks;
  std::set<std::string> ports;
  for (const auto& line : lines) {
    const auto [rank, payload] = split_prefix(line);
    auto env = env_words(payload);
    BOOST_TEST_CONTEXT(line) {
      BOOST_CHECK_EQUAL(env["RANK"], std::to_string(rank));
      BOOST_CHECK_EQUAL(env["LOCAL_RANK"], std::to_string(rank));
      BOOST_CHECK_EQUAL(env["WORLD_SIZE"], "4");
      BOOST_CHECK_EQUAL(env["LOCAL_WORLD_SIZE"], "4");
      BOOST_CHECK_EQUAL(env["GROUP_RANK"], "0");
      BOOST_CHECK_EQUAL(env["MASTER_ADDR"], "127.0.0.1");
      BOOST_CHECK_EQUAL(env["MARK"], "from-the-launcher");
    }
    ranks.insert(rank);
    ports.insert(env["MASTER_PORT"]);
  }
  BOOST_CHECK((ranks == std::set<int>{0, 1, 2, 3}));
  BOOST_REQUIRE_EQUAL(ports.size(), 1u);
  const int port = std::stoi(*ports.begin());
  BOOST_CHECK(port >= 1 && port <= 65535);
  BOOST_CHECK_MESSAGE(port_free(port), "MASTER_PORT " << port << " cannot be bound after the launcher exits");
  check_nothing_left({});
}

BOOST_AUTO_TEST_CASE(given_master_address_and_port_are_passed_through_unchanged) {
  const auto r =
      launch({"-n", "2", "--master-addr=127.0.0.2", "--master-port", "29517", "--", child(), "env"});
  BOOST_CHECK_EQUAL(r.status, 0);
  const auto lines = lines_of(r.out);
  BOOST_REQUIRE_EQUAL(lines.size(), 2u);
  for (const auto& line : lines) {
    auto env = env_words(split_prefix(line).second);
    BOOST_TEST_CONTEXT(line) {
      BOOST_CHECK_EQUAL(env["MASTER_ADDR"], "127.0.0.2");
      BOOST_CHECK_EQUAL(env["MASTER_PORT"], "29517");
    }
  }
}

BOOST_AUTO_TEST_CASE(each_node_of_a_job_starts_its_own_ranks_of_the_whole_world) {
  // Two nodes of three ranks each: node 1 starts global ranks 3..5.
  for (int node : {0, 1}) {
    BOOST_TEST_CONTEXT("node " << node) {
      const auto r = launch({"-n", "3", "--nnodes", "2", "--node-rank", std::to_string(node), "--master-addr",
                             "10.1.2.3", "--master-port=29518", child(), "env"});
      BOOST_CHECK_EQUAL(r.status, 0);
      BOOST_CHECK_EQUAL(r.err, "");
      const auto lines = lines_of(r.out);
      BOOST_REQUIRE_EQUAL(lines.size(), 3u);
      std::set<int> ranks;
      for (const auto& line : lines) {
        const auto [rank, payload] = split_prefix(line);
        auto env = env_words(payload);
        BOOST_TEST_CONTEXT(line) {
          BOOST_CHECK_EQUAL(env["RANK"], std::to_string(rank));
          BOOST_CHECK_EQUAL(env["LOCAL_RANK"], std::to_string(rank - 3 * node));
          BOOST_CHECK_EQUAL(env["WORLD_SIZE"], "6");
          BOOST_CHECK_EQUAL(env["LOCAL_WORLD_SIZE"], "3");
          BOOST_CHECK_EQUAL(env["GROUP_RANK"], std::to_string(node));
          BOOST_CHECK_EQUAL(env["MASTER_ADDR"], "10.1.2.3");
          BOOST_CHECK_EQUAL(env["MASTER_PORT"], "29518");
        }
        ranks.insert(rank);
      }
      BOOST_CHECK((ranks == (node == 0 ? std::set<int>{0, 1, 2} : std::set<int>{3, 4, 5})));
    }
  }
}

BOOST_AUTO_TEST_CASE(a_program_without_a_slash_is_found_through_path) {
  const char* path = std::getenv("PATH");
  const auto r = launch({"-n", "1", "launch_child", "env"},
                        {"PATH=" + bin_dir().string() + ":" + (path ? path : "/usr/bin:/bin")});
  BOOST_CHECK_EQUAL(r.status, 0);
  const auto lines = lines_of(r.out);
  BOOST_REQUIRE_EQUAL(lines.size(), 1u);
  BOOST_CHECK_EQUAL(env_words(split_prefix(lines[0]).second)["WORLD_SIZE"], "1");
}

BOOST_AUTO_TEST_CASE(many_lines_from_four_ranks_arrive_whole_each_with_its_ranks_prefix) {
  constexpr int per_rank = 2000;
  const auto r = launch({"-n", "4", child(), "many-lines", std::to_string(per_rank)});
  BOOST_CHECK_EQUAL(r.status, 0);
  BOOST_CHECK_EQUAL(r.err, "");
  const auto lines = lines_of(r.out);
  BOOST_CHECK_EQUAL(lines.size(), 4u * per_rank);
  const std::string xs(100, 'x');
  std::map<int, int> next;  // per rank, the line number expected next: in order, none lost
  int bad = 0;
  for (const auto& line : lines) {
    const auto [rank, payload] = split_prefix(line);
    if (rank < 0 || rank > 3 || payload != fmt::format("rank {} line {} {}", rank, next[rank], xs)) {
      if (++bad <= 5) BOOST_ERROR("line mangled or out of order: " << line);
      continue;
    }
    ++next[rank];
  }
  BOOST_CHECK_EQUAL(bad, 0);
  for (int rank = 0; rank < 4; ++rank) BOOST_CHECK_EQUAL(next[rank], per_rank);
}

BOOST_AUTO_TEST_CASE(stderr_lines_are_prefixed_and_stay_on_stderr) {
  const auto r = launch({"-n", "2", child(), "stderr"});
  BOOST_CHECK_EQUAL(r.status, 0);
  auto out = lines_of(r.out);
  auto err = lines_of(r.err);
  std::sort(out.begin(), out.end());
  std::sort(err.begin(), err.end());
  BOOST_CHECK((out == std::vector<std::string>{"[rank 0] to stdout", "[rank 1] to stdout"}));
  BOOST_CHECK((err == std::vector<std::string>{"[rank 0] to stderr", "[rank 1] to stderr"}));
}

BOOST_AUTO_TEST_CASE(a_last_line_without_newline_is_printed_with_its_prefix) {
  const auto r = launch({"-n", "2", child(), "partial"});
  BOOST_CHECK_EQUAL(r.status, 0);
  auto out = lines_of(r.out);
  // Each rank's lines in its own order; ranks may interleave.
  for (int rank : {0, 1}) {
    std::vector<std::string> mine;
    for (const auto& line : out)
      if (split_prefix(line).first == rank) mine.push_back(split_prefix(line).second);
    BOOST_CHECK((mine == std::vector<std::string>{"first", "tail"}));
  }
  BOOST_CHECK_EQUAL(out.size(), 4u);
}

BOOST_AUTO_TEST_CASE(a_failing_rank_stops_the_others_and_gives_the_launcher_its_status) {
  TempDir dir;
  const auto fifo = (dir / "ready").string();
  BOOST_REQUIRE_EQUAL(::mkfifo(fifo.c_str(), 0600), 0);
  const auto r = launch({"-n", "4", child(), "fail-rank", "2", "3", fifo});
  BOOST_CHECK_EQUAL(r.status, 3);
  BOOST_CHECK_MESSAGE(contains(r.err, "ckpt-launch: rank 2 exited with status 3"), r.err);
  const auto pids = printed_pids(r.out);
  BOOST_CHECK_EQUAL(pids.size(), 4u);  // the fifo made every rank print before rank 2 failed
  check_nothing_left(pids);
}

BOOST_AUTO_TEST_CASE(a_rank_killed_by_a_signal_is_named_and_gives_128_plus_the_signal) {
  TempDir dir;
  const auto fifo = (dir / "ready").string();
  BOOST_REQUIRE_EQUAL(::mkfifo(fifo.c_str(), 0600), 0);
  const auto r = launch({"-n", "3", child(), "fail-rank", "1", std::to_string(-SIGKILL), fifo});
  BOOST_CHECK_EQUAL(r.status, 128 + SIGKILL);
  BOOST_CHECK_MESSAGE(contains(r.err, "ckpt-launch: rank 1 killed by signal 9 (SIGKILL)"), r.err);
  const auto pids = printed_pids(r.out);
  BOOST_CHECK_EQUAL(pids.size(), 3u);
  check_nothing_left(pids);
}

BOOST_AUTO_TEST_CASE(timeout_stops_every_rank_and_exits_124) {
  const auto r = launch({"-n", "2", "--timeout", "2", child(), "hang"});
  BOOST_CHECK_EQUAL(r.status, 124);
  BOOST_CHECK_MESSAGE(contains(r.err, "ckpt-launch: timed out after 2 s; ranks still running: [0, 1]"),
                      r.err);
  check_nothing_left(printed_pids(r.out));
}

BOOST_AUTO_TEST_CASE(sigint_and_sigterm_to_the_launcher_reach_every_rank) {
  for (int sig : {SIGINT, SIGTERM}) {
    BOOST_TEST_CONTEXT("signal " << sig) {
      Launch l({"-n", "2", child(), "hang"});
      // Both ranks are running (and the launcher watching) once both printed.
      const bool started = l.wait_until([&] { return printed_pids(l.out()).size() == 2; });
      BOOST_REQUIRE_MESSAGE(started, "the ranks did not start:\n" << l.out());
      const auto pids = printed_pids(l.out());
      BOOST_REQUIRE_EQUAL(::kill(l.pid(), sig), 0);
      const auto r = l.finish();
      BOOST_REQUIRE(!r.hung);
      BOOST_CHECK_EQUAL(r.status, 128 + sig);
      BOOST_CHECK_MESSAGE(contains(r.err, fmt::format("got {}", sig == SIGINT ? "SIGINT" : "SIGTERM")),
                          r.err);
      check_nothing_left(pids);
    }
  }
}

BOOST_AUTO_TEST_CASE(bad_usage_exits_2_with_the_usage_line) {
  const std::vector<std::vector<std::string>> cases{
      {},
      {"-n", "0", child()},
      {"-n", "x", child()},
      {"-n", "2"},
      {"-n", "2", "--"},
      {"-n", "2", "--frobnicate", child()},
      {child()},
      {"-n", "2", "--timeout", "soon", child()},
      {"-n", "2", "--master-port", "70000", child()},
      {"-n", "2", "--nnodes", "2", "--node-rank", "1", child()},  // no --master-port
      {"-n", "2", "--nnodes", "2", "--node-rank", "2", "--master-port", "29519", child()},
      {"-n", "2", "--nnodes", "0", child()},
      {"-n"},
  };
  for (const auto& args : cases) {
    std::string shown;
    for (const auto& a : args) shown += " " + a;
    BOOST_TEST_CONTEXT("ckpt-launch" << shown) {
      const auto r = launch(args);
      BOOST_CHECK_EQUAL(r.status, 2);
      BOOST_CHECK_MESSAGE(contains(r.err, "usage: ckpt-launch -n N"), r.err);
      BOOST_CHECK_EQUAL(r.out, "");
    }
  }
}

BOOST_AUTO_TEST_CASE(a_program_that_cannot_be_executed_is_named) {
  TempDir dir;
  const auto not_executable = (dir / "not-executable").string();
  std::ofstream(not_executable) << "#!/bin/sh\n";
  for (const std::string& program : {std::string("/nonexistent/ckpt-launch-test-program"),
                                     std::string("ckpt-launch-test-no-such-program"), not_executable}) {
    BOOST_TEST_CONTEXT(program) {
      const auto r = launch({"-n", "2", program});
      BOOST_CHECK_NE(r.status, 0);
      BOOST_CHECK_MESSAGE(contains(r.err, program), r.err);
      check_nothing_left({});
    }
  }
}
