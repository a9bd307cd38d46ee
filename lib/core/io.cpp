#include "core/io.hpp"

#include <fmt/format.h>

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>
#include <cerrno>
#include <cstring>

namespace ckpt::detail {

void throw_errno(std::string_view what, const std::filesystem::path& path, int err) {
  throw IoError(fmt::format("{} {}: {}", what, path.string(), std::strerror(err)));
}

void Fd::reset() {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

namespace {

[[noreturn]] void throw_truncated(const std::filesystem::path& path, std::uint64_t offset,
                                  std::uint64_t missing) {
  throw CorruptCheckpoint(
      fmt::format("{}: file ends at offset {} while {} more bytes were expected "
                  "(truncated file?)",
                  path.string(), offset, missing));
}

}  // namespace

void pread_full(int fd, void* buf, std::size_t n, std::uint64_t offset, const std::filesystem::path& path) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    // Linux transfers at most 0x7ffff000 bytes per call.
    std::size_t chunk = n < (std::size_t{1} << 30) ? n : (std::size_t{1} << 30);
    ssize_t got = ::pread(fd, p, chunk, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw_errno("read", path, errno);
    }
    if (got == 0) throw_truncated(path, offset, n);
    p += got;
    n -= static_cast<std::size_t>(got);
    offset += static_cast<std::uint64_t>(got);
  }
}

void preadv_full(int fd, iovec* iov, int count, std::uint64_t offset, const std::filesystem::path& path) {
  constexpr int kIovMax = 1024;  // Linux's UIO_MAXIOV
  std::uint64_t left = 0;
  for (int i = 0; i < count; ++i) left += iov[i].iov_len;
  while (count > 0) {
    if (iov->iov_len == 0) {
      ++iov;
      --count;
      continue;
    }
    const ssize_t got = ::preadv(fd, iov, count < kIovMax ? count : kIovMax, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw_errno("read", path, errno);
    }
    if (got == 0) throw_truncated(path, offset, left);
    auto n = static_cast<std::uint64_t>(got);
    offset += n;
    left -= n;
    while (n > 0) {
      if (n >= iov->iov_len) {
        n -= iov->iov_len;
        ++iov;
        --count;
      } else {
        iov->iov_base = static_cast<char*>(iov->iov_base) + n;
        iov->iov_len -= n;
        n = 0;
      }
    }
  }
}

void pwrite_full(int fd, const void* buf, std::size_t n, std::uint64_t offset,
                 const std::filesystem::path& path) {
  auto* p = static_cast<const char*>(buf);
  while (n > 0) {
    std::size_t chunk = n < (std::size_t{1} << 30) ? n : (std::size_t{1} << 30);
    ssize_t put = ::pwrite(fd, p, chunk, static_cast<off_t>(offset));
    if (put < 0) {
      if (errno == EINTR) continue;
      throw_errno("write", path, errno);
    }
    if (put == 0) throw_errno("write", path, ENOSPC);
    p += put;
    n -= static_cast<std::size_t>(put);
    offset += static_cast<std::uint64_t>(put);
  }
}

void fsync_fd(int fd, const std::filesystem::path& path) {
  while (::fsync(fd) != 0) {
    if (errno != EINTR) throw_errno("fsync", path, errno);
  }
}

void fsync_dir(const std::filesystem::path& dir) {
  auto d = dir.empty() ? std::filesystem::path(".") : dir;
  Fd fd(::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) throw_errno("open directory", d, errno);
  fsync_fd(fd.get(), d);
}

void write_maybe_direct(int fd, const void* data, std::size_t n, std::uint64_t off,
                        const std::filesystem::path& path) {
  auto* buf = static_cast<const char*>(data);
  while (n > 0) {
    const std::size_t chunk = n < (std::size_t{1} << 30) ? n : (std::size_t{1} << 30);
    ssize_t put = ::pwrite(fd, buf, chunk, static_cast<off_t>(off));
    if (put < 0) {
      if (errno == EINTR) continue;
      // A filesystem may accept O_DIRECT at open and refuse it at write time;
      // then write through the page cache instead.
      if (errno == EINVAL) {
        const int flags = ::fcntl(fd, F_GETFL);
        if (flags >= 0 && (flags & O_DIRECT) && ::fcntl(fd, F_SETFL, flags & ~O_DIRECT) == 0) continue;
      }
      throw_errno("write", path, errno);
    }
    if (put == 0) throw_errno("write", path, ENOSPC);
    buf += put;
    n -= static_cast<std::size_t>(put);
    off += static_cast<std::uint64_t>(put);
  }
}

}  // namespace ckpt::detail
