// Small POSIX helpers: an owning file descriptor, full pread/pwrite loops that
// retry on EINTR and short transfers, and errors that name the call and path.
#pragma once

#include <ckpt/error.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

struct iovec;

namespace ckpt::detail {

/// Throws IoError "<what> <path>: <strerror(err)>".
[[noreturn]] void throw_errno(std::string_view what, const std::filesystem::path& path, int err);

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = o.release();
    }
    return *this;
  }
  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset();

 private:
  int fd_ = -1;
};

/// Reads exactly `n` bytes at `offset`; a short file is a CorruptCheckpoint.
void pread_full(int fd, void* buf, std::size_t n, std::uint64_t offset, const std::filesystem::path& path);
/// Reads exactly the bytes of the `count` buffers of `iov`, in order, from
/// `offset` on: vectored, one call where the kernel allows. `iov` is used up
/// (its entries are advanced past what was read).
void preadv_full(int fd, struct iovec* iov, int count, std::uint64_t offset,
                 const std::filesystem::path& path);
/// Writes exactly `n` bytes at `offset`.
void pwrite_full(int fd, const void* buf, std::size_t n, std::uint64_t offset,
                 const std::filesystem::path& path);
/// Writes `n` bytes at `off` on a file that may be open with O_DIRECT; when the
/// filesystem refuses O_DIRECT at write time, clears it and writes buffered.
void write_maybe_direct(int fd, const void* buf, std::size_t n, std::uint64_t off,
                        const std::filesystem::path& path);

void fsync_fd(int fd, const std::filesystem::path& path);
/// fsyncs the directory holding an entry, so a rename in it is durable.
void fsync_dir(const std::filesystem::path& dir);

}  // namespace ckpt::detail
