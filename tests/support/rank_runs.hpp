// Running rank programs (ckpt-launch and the workers under it) from a test:
// to their end or a bound, capturing what they print, and reading the
// `[rank R] RESULT <label> <outcome>` lines the workers report with.
#pragma once

#include "support/test_support.hpp"

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace ckpt::test {

inline bool starts_with(const std::string& text, const std::string& prefix) {
  return text.compare(0, prefix.size(), prefix) == 0;
}
inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

struct RankRun {
  int status = -1;     ///< the exit status, or 128 + signal
  std::string output;  ///< stdout and stderr together
  bool hung = false;   ///< killed past its bound
  std::vector<pid_t> left_behind;
  /// rank → label → outcome, from `[rank R] RESULT <label> <outcome>` (a
  /// program run without the launcher prints `RESULT ...`: rank 0).
  std::map<int, std::map<std::string, std::string>> results;
  std::vector<std::string> unexpected;  ///< `UNEXPECTED <label>` lines

  /// The outcome rank `rank` reported for `label` ("(none)" when it did not).
  std::string at(int rank, const std::string& label) const {
    const auto r = results.find(rank);
    if (r == results.end()) return "(none)";
    const auto l = r->second.find(label);
    return l == r->second.end() ? "(none)" : l->second;
  }
};

inline void parse_results(RankRun& run) {
  std::istringstream in(run.output);
  for (std::string line; std::getline(in, line);) {
    int rank = 0, used = 0;
    if (std::sscanf(line.c_str(), "[rank %d] %n", &rank, &used) != 1 || used == 0) {
      rank = 0;
      used = 0;
    }
    std::string rest = line.substr(static_cast<std::size_t>(used));
    if (starts_with(rest, "UNEXPECTED ")) {
      run.unexpected.push_back(line);
      continue;
    }
    if (!starts_with(rest, "RESULT ")) continue;
    rest = rest.substr(7);
    const auto space = rest.find(' ');
    run.results[rank][rest.substr(0, space)] = space == std::string::npos ? "" : rest.substr(space + 1);
  }
}

/// Runs `args` to its end (at most `bound`, then SIGKILL), capturing stdout and
/// stderr; then kills and reaps whatever it left behind (the test must be a
/// child subreaper for those to be found). `without_rank_env`: without the
/// launcher's variables (RANK, WORLD_SIZE, ...) in its environment.
inline RankRun run_bounded(std::vector<std::string> args, std::chrono::seconds bound,
                           bool without_rank_env = false) {
  RankRun run;
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) throw std::runtime_error(std::string("pipe2: ") + std::strerror(errno));
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (char** e = environ; *e; ++e) {
    const std::string var(*e);
    const auto name = var.substr(0, var.find('='));
    if (without_rank_env &&
        (name == "RANK" || name == "WORLD_SIZE" || name == "LOCAL_RANK" || name == "LOCAL_WORLD_SIZE" ||
         name == "GROUP_RANK" || name == "MASTER_ADDR" || name == "MASTER_PORT"))
      continue;
    envp.push_back(*e);
  }
  envp.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  ::posix_spawn_file_actions_init(&actions);
  ::posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  ::posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  ::posix_spawn_file_actions_adddup2(&actions, out[1], STDERR_FILENO);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
  ::posix_spawn_file_actions_destroy(&actions);
  ::close(out[1]);
  if (rc != 0) {
    ::close(out[0]);
    throw std::runtime_error("cannot start " + args[0] + ": " + std::strerror(rc));
  }
  // Through syscall(): glibc 2.36's <sys/pidfd.h> lacks C linkage for C++.
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) throw std::runtime_error(std::string("pidfd_open: ") + std::strerror(errno));

  const auto deadline = std::chrono::steady_clock::now() + bound;
  int out_fd = out[0];
  bool exited = false;
  const auto reap = [&] {
    int st = 0;
    while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    run.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    exited = true;
  };
  while (!exited || out_fd >= 0) {
    std::vector<pollfd> fds;
    if (out_fd >= 0) fds.push_back({out_fd, POLLIN, 0});
    if (!exited) fds.push_back({pidfd, POLLIN, 0});
    const auto left =
        std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    if (left <= 0) {
      run.hung = true;
      if (!exited) {
        ::kill(pid, SIGKILL);
        reap();
      }
      break;
    }
    if (::poll(fds.data(), fds.size(), static_cast<int>(left)) < 0 && errno != EINTR) break;
    for (const auto& p : fds) {
      if (!p.revents) continue;
      if (p.fd == pidfd) {
        reap();
        continue;
      }
      char buf[65536];
      const ssize_t n = ::read(p.fd, buf, sizeof buf);
      if (n > 0) {
        run.output.append(buf, static_cast<std::size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        ::close(out_fd);
        out_fd = -1;
      }
    }
  }
  if (out_fd >= 0) ::close(out_fd);
  ::close(pidfd);
  run.left_behind = kill_leftover_children();
  parse_results(run);
  return run;
}

}  // namespace ckpt::test
