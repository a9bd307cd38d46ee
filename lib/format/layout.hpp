// The layout of a checkpoint file: the pickle, the records and the offset of
// every header and every record's data (plan_layout makes one). The layout
// refers to tensor memory; it does not copy it. Streaming the layout to a file
// (file_writer.cpp) and copying it into a staging arena both start from here.
#pragma once

#include <ckpt/format.hpp>

#include <ATen/core/ivalue.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

namespace ckpt::detail {

/// A record as the format describes it (RecordInfo: name, offsets, size,
/// crc32 once the data was read) and where its bytes come from.
struct LayoutRecord : RecordInfo {
  const void* data = nullptr;  ///< source bytes: tensor memory or Layout::owned
  /// Set instead of `data` when the bytes live on an accelerator and the copy
  /// to host memory was deferred (plan_layout's `defer_device_copies`).
  at::Storage device_source;
  c10::Device device = c10::Device(c10::kCPU);
};

struct Layout {
  std::vector<LayoutRecord> records;
  std::deque<std::string> owned;      ///< pickle and small records
  std::vector<at::Storage> storages;  ///< keeps the tensor memory alive
  std::uint64_t cd_offset = 0;        ///< where the central directory starts
  /// Which record holds each tensor storage of the value laid out.
  std::unordered_map<const c10::StorageImpl*, std::size_t> record_of_storage;
  /// Where a record whose `data` is null (and `size` is not) gets its bytes:
  /// called when the record's turn comes to be written, its result (exactly
  /// `size` bytes of CPU memory) released once it is written. This is how
  /// `ckpt convert` lays out storages that are not in memory yet (storages
  /// with a null data pointer) and streams them one at a time.
  std::function<at::Storage(std::size_t record)> fetch;
};

/// The archive prefix ckpt writes (as torch 2.x does).
inline constexpr const char* kArchivePrefix = "archive";
/// The `version` record ckpt writes (what torch 1.13 and 2.x write for tensors).
inline constexpr const char* kFormatVersion = "3\n";

}  // namespace ckpt::detail
