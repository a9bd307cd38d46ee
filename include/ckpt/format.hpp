// The checkpoint file format: one rank's `checkpoint_<rank>.pt` is a PyTorch zip
// archive (`<prefix>/data.pkl`, `<prefix>/data/<key>`, `<prefix>/version`) that
// Python's torch.load reads and that ckpt reads back from any torch >= 1.6.
//
// What ckpt writes: records stored uncompressed, each record's data aligned to
// 4096 bytes (padding lives in the local header's extra field), each with its
// CRC-32, zip64 once the file or a record passes 4 GiB. Tensor bytes stream from
// tensor memory to the file; the file is never built in memory.
//
// What ckpt reads: the zip directory and the pickle are parsed by ckpt itself.
// The unpickler knows only what torch.save emits for state dicts (the allowlist of
// torch.load(weights_only=True)); anything else is a CorruptCheckpoint naming it.
// Nothing a file says is ever executed, and every number in it is checked first.
#pragma once

#include <ckpt/error.hpp>

#include <ATen/core/ivalue.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace ckpt {

/// How write_file() writes.
struct WriteOptions {
  /// Write with O_DIRECT where the filesystem accepts it (buffered otherwise).
  bool direct_io = true;
  /// fsync the file and its directory, making the checkpoint durable on return.
  bool fsync = true;
};

/// Writes `value` (a state dict: nested dicts with string or integer keys, lists,
/// tuples, tensors, int, double, bool, string, None) to `file` durably and
/// atomically: a temporary file in the same directory is written, fsynced and
/// renamed over `file`, then the directory is fsynced. On any failure the
/// temporary file is removed and `file` is left as it was.
/// Throws Unsupported for a value the format cannot hold, IoError on a failed
/// system call (naming the path and the call).
void write_file(const std::filesystem::path& file, const c10::IValue& value,
                const WriteOptions& options = {});

/// Maps a record's stored location ("cpu", "cuda:1") to the device to load it
/// on. An empty function keeps the stored device.
using LocationMap = std::function<c10::Device(const std::string& location)>;

/// How read_file() and FileReader read.
struct ReadOptions {
  /// Map the file privately (copy-on-write) and return tensors pointing into
  /// the mapping: loading costs almost nothing until pages are touched. CPU only.
  bool mmap = false;
  /// Check the CRC-32 of every record read against the zip directory.
  bool verify_crc = false;
  /// Where tensors go; see LocationMap.
  LocationMap map_location{};
  /// Applied to every tensor read fresh (not to read_into targets), with the
  /// location it was stored at: torch.load's map_location as a function.
  std::function<at::Tensor(const at::Tensor& tensor, const std::string& location)> map_tensor{};
};

/// One record of the archive, as its zip directory describes it.
struct RecordInfo {
  std::string name;  ///< full name inside the archive
  std::uint64_t header_offset = 0;
  std::uint64_t data_offset = 0;  ///< 0 until the local header was read
  std::uint64_t size = 0;
  std::uint32_t crc32 = 0;
};

/// A tensor as the pickle describes it, before any byte of it is read.
struct TensorInfo {
  std::string storage_key;  ///< record `<prefix>/data/<storage_key>`
  std::string location;     ///< "cpu", "cuda:0", ...
  c10::ScalarType dtype = c10::ScalarType::Float;
  std::int64_t storage_numel = 0;
  std::int64_t storage_offset = 0;
  std::vector<std::int64_t> sizes;
  std::vector<std::int64_t> strides;
  bool requires_grad = false;
  bool is_parameter = false;
};

/// The parsed pickle: a tree whose tensor leaves are TensorInfo, not yet read.
/// Dicts keep their order; `ordered` marks Python OrderedDicts.
struct Node {
  enum class Kind { none, boolean, integer, real, string, list, tuple, dict, tensor };
  Kind kind = Kind::none;
  bool ordered = false;
  bool b = false;
  std::int64_t i = 0;
  double d = 0;
  std::string s;
  std::vector<const Node*> items;                            // list, tuple
  std::vector<std::pair<const Node*, const Node*>> entries;  // dict
  std::shared_ptr<const TensorInfo> tensor;

  /// The dict entry whose key is the string `key`, or nullptr.
  const Node* find(std::string_view key) const;
};

/// Human-readable name of a node kind ("dict", "tensor", ...).
const char* kind_name(Node::Kind kind);

/// An open checkpoint file. The zip directory and the pickle are parsed on open;
/// tensor bytes are read only when asked for, with pread straight into their
/// destination, so a partial load reads only the records it needs. Storages
/// shared by several tensors in the file are shared again by the tensors read.
/// Not thread-safe; one reader per thread.
class FileReader {
 public:
  /// Opens and parses `file`. Throws NotFound when it does not exist and
  /// CorruptCheckpoint (naming the file and the fault) when it is not sound.
  explicit FileReader(const std::filesystem::path& file, ReadOptions options = {});
  /// Opens the archive that occupies bytes [offset, offset + length) of `file`
  /// (an item of a PyTorch DCP data file: each is a whole torch.save archive).
  /// Record offsets are relative to the archive's start.
  FileReader(const std::filesystem::path& file, std::uint64_t offset, std::uint64_t length,
             ReadOptions options = {});
  ~FileReader();
  FileReader(FileReader&&) noexcept;
  FileReader& operator=(FileReader&&) noexcept;

  const std::filesystem::path& path() const;
  /// The archive's prefix: the file's stem (torch 1.x) or "archive" (torch 2.x).
  const std::string& prefix() const;
  /// The root of the pickled object.
  const Node& root() const;
  /// All records, in directory order.
  const std::vector<RecordInfo>& records() const;
  /// Where the archive starts in the file (0 unless opened on a slice).
  std::uint64_t archive_offset() const;

  /// The tensor `info`, read (or mapped) now, passed through map_tensor. Throws CorruptCheckpoint on a bad
  /// record, Mismatch when the location cannot be mapped to a device here.
  at::Tensor tensor(const TensorInfo& info);
  /// The record holding `info`'s storage, its offsets absolute in the file
  /// (its local header read): where a caller may pread the bytes itself.
  RecordInfo storage_record(const TensorInfo& info);
  /// Reads `info` in place into `target` (same sizes and dtype, else Mismatch
  /// naming `key`), straight into its memory when it is contiguous on the CPU.
  void read_into(const TensorInfo& info, at::Tensor& target, std::string_view key);
  /// The whole subtree as an IValue, tensors read.
  c10::IValue to_ivalue(const Node& node);
  /// Everything in the file.
  c10::IValue load();

  /// Reads every record and checks its CRC-32; throws CorruptCheckpoint naming
  /// the first bad record.
  void verify();
  /// Bytes read from the file so far (headers, pickle and records).
  std::uint64_t bytes_read() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Reads the whole file into fresh tensors (or a mapping, with options.mmap).
c10::IValue read_file(const std::filesystem::path& file, const ReadOptions& options = {});

}  // namespace ckpt
