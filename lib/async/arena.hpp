// The staging arena: one shared-memory region (a memfd) that holds a checkpoint
// file's image, shared with the writer child without a copy.
//
// It is allocated once and touched once (pre-faulted when it grows), kept
// across saves and grown only when a larger file arrives; its size is the
// file's size rounded up to pages. It is page-locked when the limits allow.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>

namespace ckpt::detail {

class Arena {
 public:
  /// An empty arena; `lock` asks for mlock (falls back, logged once, if refused).
  explicit Arena(bool lock);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  /// Makes the arena hold at least `bytes` (rounded up to pages). Keeps the
  /// contents' addresses only when it does not need to grow.
  void reserve(std::uint64_t bytes);
  /// Releases the memory and the memfd.
  void release();

  std::byte* data() const { return base_; }
  std::uint64_t size() const { return size_; }
  int fd() const { return fd_; }
  bool locked() const { return locked_; }

  /// Page-locks the mapping with the accelerator's driver too (CUDA's
  /// cudaHostRegister), so device→host copies into it are asynchronous DMA.
  /// Once per mapping; false (logged once) when there is no driver or it refuses.
  bool register_with_device();
  bool device_registered() const { return device_registered_; }

 private:
  bool want_lock_;
  int fd_ = -1;
  std::byte* base_ = nullptr;
  std::uint64_t size_ = 0;
  bool locked_ = false;
  bool device_registered_ = false;
  void unmap();
};

/// The page size.
std::uint64_t page_size();

/// Maps `size` bytes of the memfd `fd` shared and read-write (in the child).
struct ArenaMapping {
  std::byte* base = nullptr;
  std::uint64_t size = 0;
  ~ArenaMapping();
  void map(int fd, std::uint64_t size);
};

}  // namespace ckpt::detail
