// A rank for launch_test to start under ckpt-launch; its first argument says
// what it does:
//
//   env                     prints one line: RANK=.. LOCAL_RANK=.. WORLD_SIZE=..
//                           LOCAL_WORLD_SIZE=.. GROUP_RANK=.. MASTER_ADDR=..
//                           MASTER_PORT=.. MARK=<$CKPT_LAUNCH_TEST_MARK>
//                           (`<unset>` for a variable that is not set)
//   fail-rank R CODE FIFO   prints `pid P`; rank R then waits until every other
//                           rank has written a byte to FIFO (so all of them have
//                           printed their pid) and exits CODE, or is killed by
//                           signal -CODE when CODE is negative; the others write
//                           that byte and wait for a signal
//   hang                    prints `pid P` and waits for a signal
//   partial                 prints `first` and then `tail` without a newline
//   many-lines K            prints K lines `rank R line I xxx…` (100 x), fast
//   stderr                  prints `to stdout` on stdout, `to stderr` on stderr
//
// Nothing here sleeps: a rank that waits blocks in pause() or read().
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include <fcntl.h>
#include <unistd.h>

namespace {

std::string env_or_unset(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "<unset>";
}

int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : -1;
}

void print_pid() {
  std::printf("pid %d\n", static_cast<int>(::getpid()));
  std::fflush(stdout);
}

[[noreturn]] void wait_for_signal() {
  for (;;) ::pause();
}

[[noreturn]] void die(const char* what) {
  std::perror(what);
  std::exit(100);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string_view mode = argc > 1 ? argv[1] : "";
  const int rank = env_int("RANK");

  if (mode == "env") {
    std::printf(
        "RANK=%s LOCAL_RANK=%s WORLD_SIZE=%s LOCAL_WORLD_SIZE=%s GROUP_RANK=%s MASTER_ADDR=%s "
        "MASTER_PORT=%s MARK=%s\n",
        env_or_unset("RANK").c_str(), env_or_unset("LOCAL_RANK").c_str(), env_or_unset("WORLD_SIZE").c_str(),
        env_or_unset("LOCAL_WORLD_SIZE").c_str(), env_or_unset("GROUP_RANK").c_str(),
        env_or_unset("MASTER_ADDR").c_str(), env_or_unset("MASTER_PORT").c_str(),
        env_or_unset("CKPT_LAUNCH_TEST_MARK").c_str());
    return 0;
  }
  if (mode == "fail-rank" && argc == 5) {
    const int failing = std::atoi(argv[2]);
    const int code = std::atoi(argv[3]);
    print_pid();
    if (rank != failing) {
      // Opening for writing blocks until the failing rank has it open.
      const int fd = ::open(argv[4], O_WRONLY);
      if (fd < 0 || ::write(fd, "x", 1) != 1) die("fail-rank: writing the fifo");
      ::close(fd);
      wait_for_signal();
    }
    // Read-write, so that the fifo never reads as ended between two writers.
    const int fd = ::open(argv[4], O_RDWR);
    if (fd < 0) die("fail-rank: opening the fifo");
    for (int others = env_int("WORLD_SIZE") - 1; others > 0;) {
      char c;
      const ssize_t n = ::read(fd, &c, 1);
      if (n == 1) --others;
      if (n < 0 && errno != EINTR) die("fail-rank: reading the fifo");
    }
    if (code < 0) ::kill(::getpid(), -code);
    return code;
  }
  if (mode == "hang") {
    print_pid();
    wait_for_signal();
  }
  if (mode == "partial") {
    std::fputs("first\ntail", stdout);
    return 0;
  }
  if (mode == "many-lines" && argc == 3) {
    const std::string xs(100, 'x');
    for (int i = 0, k = std::atoi(argv[2]); i < k; ++i)
      std::printf("rank %d line %d %s\n", rank, i, xs.c_str());
    return 0;
  }
  if (mode == "stderr") {
    std::fputs("to stdout\n", stdout);
    std::fflush(stdout);
    std::fputs("to stderr\n", stderr);
    return 0;
  }
  std::fprintf(stderr, "launch_child: unknown mode '%.*s'\n", static_cast<int>(mode.size()), mode.data());
  return 99;
}
