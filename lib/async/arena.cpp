#include "async/arena.hpp"

#include "async/device_copy.hpp"
#include "core/io.hpp"
#include "core/log_once.hpp"

#include <ckpt/error.hpp>

#include <fmt/format.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include <sys/mman.h>
#include <unistd.h>

namespace ckpt::detail {

std::uint64_t page_size() {
  static const std::uint64_t size = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

Arena::Arena(bool lock) : want_lock_(lock) {}

Arena::~Arena() {
  release();
}

void Arena::unmap() {
  if (device_registered_) host_unregister(base_);
  device_registered_ = false;
  if (base_) ::munmap(base_, size_);
  base_ = nullptr;
}

bool Arena::register_with_device() {
  if (device_registered_) return true;
  if (!base_) return false;
  std::string why;
  device_registered_ = host_register(base_, size_, why);
  if (!device_registered_) {
    static std::atomic<bool> logged{false};
    detail::log_once(
        logged, LogLevel::warning,
        fmt::format("staging arena is not registered with the device driver ({}); device-to-host "
                    "copies into it are synchronous",
                    why));
  }
  return device_registered_;
}

void Arena::release() {
  unmap();
  if (fd_ >= 0) ::close(fd_);
  base_ = nullptr;
  size_ = 0;
  fd_ = -1;
  locked_ = false;
}

void Arena::reserve(std::uint64_t bytes) {
  const std::uint64_t want = (bytes + page_size() - 1) / page_size() * page_size();
  if (want <= size_) return;
  if (fd_ < 0) {
    fd_ = ::memfd_create("ckpt-arena", MFD_CLOEXEC);
    if (fd_ < 0) throw IoError(fmt::format("memfd_create for the staging arena: {}", std::strerror(errno)));
  }
  if (::ftruncate(fd_, static_cast<off_t>(want)) != 0)
    throw IoError(fmt::format("cannot grow the staging arena to {} bytes: {}", want, std::strerror(errno)));
  unmap();
  // MAP_POPULATE: the pages are allocated and faulted now, once, not on the
  // first copy of a save (a first-touch copy is many times slower).
  void* p = ::mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, 0);
  if (p == MAP_FAILED) {
    size_ = 0;
    throw IoError(fmt::format("cannot map the staging arena of {} bytes: {}", want, std::strerror(errno)));
  }
  base_ = static_cast<std::byte*>(p);
  size_ = want;
  locked_ = false;
  if (want_lock_) {
    if (::mlock(base_, size_) == 0) {
      locked_ = true;
    } else {
      static std::atomic<bool> logged{false};
      detail::log_once(
          logged, LogLevel::warning,
          fmt::format("staging arena of {} bytes is not page-locked (mlock: {}; raise `ulimit -l` "
                      "to pin it); continuing unpinned",
                      size_, std::strerror(errno)));
    }
  }
}

ArenaMapping::~ArenaMapping() {
  if (base) ::munmap(base, size);
}

void ArenaMapping::map(int fd, std::uint64_t want) {
  if (base && size == want) return;
  if (base) ::munmap(base, size);
  base = nullptr;
  void* p = ::mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED)
    throw IoError(fmt::format("cannot map the staging arena ({} bytes): {}", want, std::strerror(errno)));
  base = static_cast<std::byte*>(p);
  size = want;
}

}  // namespace ckpt::detail
