// Watching a directory for created files (inotify), for tests that must
// act at a moment another process reaches: without sleeping or polling.
#pragma once

#include <boost/test/unit_test.hpp>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>

#include <poll.h>
#include <sys/inotify.h>
#include <unistd.h>

namespace ckpt::test {

/// Watches a directory for created files (inotify): how the test knows the
/// child has begun writing, without sleeping or polling.
class DirWatch {
 public:
  explicit DirWatch(const std::filesystem::path& dir) : fd_(::inotify_init1(IN_CLOEXEC | IN_NONBLOCK)) {
    BOOST_REQUIRE_MESSAGE(fd_ >= 0, "inotify_init1: " << std::strerror(errno));
    BOOST_REQUIRE_MESSAGE(::inotify_add_watch(fd_, dir.c_str(), IN_CREATE) >= 0,
                          "inotify_add_watch " << dir << ": " << std::strerror(errno));
  }
  ~DirWatch() { ::close(fd_); }
  DirWatch(const DirWatch&) = delete;
  DirWatch& operator=(const DirWatch&) = delete;

  /// Waits until a file whose name starts with `prefix` is created there;
  /// returns its name, or nothing past `bound`.
  std::string wait_created(std::string_view prefix, std::chrono::milliseconds bound) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    alignas(inotify_event) char buf[16384];
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return {};
      pollfd p{fd_, POLLIN, 0};
      const int ready = ::poll(&p, 1, static_cast<int>(left.count()));
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) return {};
      const ssize_t n = ::read(fd_, buf, sizeof buf);
      if (n <= 0) continue;
      for (ssize_t at = 0; at < n;) {
        const auto* ev = reinterpret_cast<const inotify_event*>(buf + at);
        if (ev->len > 0) {
          const std::string name(ev->name);
          if (name.rfind(prefix, 0) == 0) return name;
        }
        at += static_cast<ssize_t>(sizeof(inotify_event) + ev->len);
      }
    }
  }

 private:
  int fd_;
};

}  // namespace ckpt::test
