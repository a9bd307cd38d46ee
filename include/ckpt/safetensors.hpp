// Hugging Face safetensors files, read and written by ckpt: one
// `<name>.safetensors` file, or a sharded checkpoint (an index
// `<name>.safetensors.index.json` and its shards `<name>-00001-of-0000N.safetensors`).
//
// A file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON
// (`{"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...],
// "data_offsets": [begin, end]}, ...}`, offsets relative to the data section),
// then the data section: every tensor's bytes, C order, little-endian, back to
// back with no gap. docs/safetensors.md describes what ckpt writes and refuses.
//
// Reading parses the header (or the index) first and checks every number in it
// before a byte of tensor data is read or allocated; tensor bytes are then read
// with pread straight into their destination, only those asked for. A file that
// is not sound is refused with a CorruptCheckpoint naming the file and the fault.
#pragma once

#include <ckpt/error.hpp>
#include <ckpt/state_dict.hpp>

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ckpt::safetensors {

/// The largest header (and index file) ckpt parses: safetensors' own bound.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

/// One tensor as its file's header describes it; none of its data read.
struct TensorEntry {
  std::string name;
  /// The dtype as the file names it: "F32", "BF16", "F8_E4M3", ...
  std::string dtype;
  /// The torch dtype; Undefined where this libtorch has none for `dtype`
  /// (loading such a tensor throws Unsupported).
  c10::ScalarType scalar_type = c10::ScalarType::Undefined;
  std::vector<std::int64_t> shape;
  /// `data_offsets`: where its bytes lie in the data section.
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
  /// Where its bytes start in `file` (8 + header length + begin).
  std::uint64_t file_offset = 0;
  /// The file holding it: the shard, for a sharded checkpoint.
  std::filesystem::path file;
};

/// How load() reads. Without `state_dict` and `names`, every tensor is read.
struct LoadOptions {
  /// A target, filled in place: its leaves (nested dicts flattened with '.', so
  /// {"model": {"weight": t}} asks for "model.weight") are the names read. A
  /// tensor leaf is filled in place (its shape and dtype must match the file's,
  /// else Mismatch naming the key and both sides); a None leaf (or an
  /// undefined tensor) is replaced by the tensor read; another value that the
  /// file holds a tensor for is a Mismatch. Every check is made before any
  /// target is written. The returned dict is the target itself.
  std::optional<StateDict> state_dict{};
  /// Only these names (not with `state_dict`).
  std::vector<std::string> names{};
  /// Tensors read fresh point into a private, copy-on-write mapping of their
  /// file instead of being read (CPU only): loading costs almost nothing until
  /// pages are touched, writes to them never reach the file, and the mapping
  /// lives as long as any tensor using it. A tensor whose bytes are not aligned
  /// to its element size in the file (never in files ckpt or the safetensors
  /// library writes; possible in files from elsewhere) is copied instead.
  bool mmap = false;
  /// A name asked for that the file lacks is an error (MissingKeys naming it);
  /// when false it is skipped (a None leaf of a target stays None).
  bool strict = true;
};

/// An open safetensors file or sharded checkpoint, like Python's `safe_open`.
/// The file's header (or the index) is parsed and checked on open; a shard's
/// header is read when a tensor of it is first asked for. Not thread-safe; one
/// reader per thread.
class Reader {
 public:
  /// Opens `path`: a `.safetensors` file, an index JSON (a name ending in
  /// `.json`), or a directory holding `model.safetensors` or
  /// `model.safetensors.index.json`. A `<name>.safetensors` that does not
  /// exist while `<name>.safetensors.index.json` does opens the index (what
  /// save() with max_shard_bytes writes for that path).
  /// Throws NotFound when there is nothing there, CorruptCheckpoint naming the
  /// file and the fault when it is not sound, IoError when reading fails.
  explicit Reader(const std::filesystem::path& path);
  ~Reader();
  Reader(Reader&&) noexcept;
  Reader& operator=(Reader&&) noexcept;

  /// The file opened: the `.safetensors` file or the index.
  const std::filesystem::path& path() const;
  /// Whether it is a sharded checkpoint (an index).
  bool is_index() const;
  /// Every tensor's name: for a file in the order of their data, for an index
  /// in the order of its weight_map.
  const std::vector<std::string>& names() const;
  bool contains(const std::string& name) const;
  /// The file's `__metadata__` (empty when it has none). For an index, the
  /// index's "metadata" ({"total_size": "1234", ...}: values that are not
  /// strings as their JSON text, nested objects and arrays left out); each
  /// shard's own `__metadata__` is there when the shard is opened alone.
  const std::map<std::string, std::string>& metadata() const;
  /// The id of the save that wrote the file (or the index), when ckpt wrote
  /// one: the `ckpt_save_id` of `__metadata__`, which metadata() leaves out.
  const std::optional<std::string>& save_id() const;
  /// The header entry of `name` (reading its shard's header for an index).
  /// Throws MissingKeys naming it when absent.
  const TensorEntry& entry(const std::string& name);

  /// `name` read into fresh CPU memory. Throws MissingKeys, Unsupported for a
  /// dtype this libtorch lacks, CorruptCheckpoint, IoError.
  at::Tensor tensor(const std::string& name);
  /// `name` pointing into a private mapping of its file (see LoadOptions::mmap).
  at::Tensor mapped(const std::string& name);
  /// Reads `name` into `target` in place: same shape and dtype (else Mismatch
  /// naming the key and both sides), on any device, any strides; straight into
  /// its memory when it is a contiguous CPU tensor.
  void read_into(const std::string& name, at::Tensor& target);
  /// What load() does, on this reader.
  StateDict load(const LoadOptions& options = {});

  /// Bytes read from files so far: the index, headers, tensor data read with
  /// pread. Mapped tensors add nothing (their pages are read when touched).
  std::uint64_t bytes_read() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Loads the tensors of `path` (see Reader) as a flat dict, name → tensor, in
/// the order Reader::names() gives (for `names`, in the order asked), or into
/// `options.state_dict`. Throws as Reader does, MissingKeys (listing every
/// name asked for that is not there) when strict, Mismatch for a target that
/// does not fit, Error when both `state_dict` and `names` are given.
StateDict load(const std::filesystem::path& path, const LoadOptions& options = {});

/// The `__metadata__` of the file at `path` (the index's "metadata" for an
/// index), reading nothing but the header.
std::map<std::string, std::string> metadata(const std::filesystem::path& path);

/// How save() writes.
struct SaveOptions {
  /// Written as the header's `__metadata__` (omitted when empty); every shard
  /// of a sharded checkpoint carries it, and so does the index's "metadata".
  /// Hugging Face transformers wants {"format": "pt"} here.
  std::map<std::string, std::string> metadata{};
  /// When non-zero: split into shards of at most this many tensor bytes (a
  /// tensor larger than that gets a shard of its own), written as
  /// `<name>-00001-of-0000N.safetensors` beside `<name>.safetensors.index.json`
  /// ({"metadata": {"total_size": N, ...}, "weight_map": {name: shard}}), even
  /// when one shard holds everything.
  std::uint64_t max_shard_bytes = 0;
  /// Non-tensor leaves (int, double, bool, string) go into `__metadata__` as
  /// text under their flattened name (bool as "true"/"false", double as the
  /// shortest text that reads back exactly); loading returns them as metadata
  /// strings, not values. When false (the default), a non-tensor leaf is refused.
  bool non_tensors_as_metadata = false;
  /// fsync each file and the directory, making the checkpoint durable on return.
  bool fsync = true;
};

/// Saves the tensors of `state_dict` to `path` (`<dir>/<name>.safetensors`),
/// durably and atomically per file: a temporary file in the same directory is
/// written, fsynced and renamed over its name, then the directory is fsynced.
///
/// Nested dicts are flattened with '.' ({"model": {"0": {"weight": t}}} is
/// "model.0.weight"; integer keys as decimals). Tensors are written as their
/// values (non-contiguous, conjugated or non-CPU tensors through a contiguous
/// CPU copy, one at a time), largest element size first, in the state dict's
/// order within one element size: every tensor's data then starts at an offset
/// aligned to its element size, the data section starts 8-aligned (the header
/// is padded with spaces) and the header lists the tensors in data order, after
/// `__metadata__`. The output for a given state dict and options is always the
/// same bytes.
///
/// A sharded save writes every shard first and the index last. A save replaces
/// what an earlier save left at `path` in the other form (the single file, or
/// the index and its shards) once the new checkpoint is durable. Shards written
/// over an earlier sharded checkpoint in place carry a save id that the index
/// names, so a crash between shards and index leaves a checkpoint that load
/// refuses (CorruptCheckpoint: "torn"), never a silent mix of two saves.
///
/// Throws Unsupported (naming the key) for a value the format cannot hold: an
/// undefined, sparse or meta tensor, a dtype safetensors has no name for
/// (complex128, quantized), a non-tensor leaf (unless non_tensors_as_metadata),
/// a list or tuple, two keys that flatten to one name, the name "__metadata__",
/// text that is not UTF-8, a metadata key save() reserves ("ckpt_save_id"; for
/// a sharded save also "total_size"). All of these are found before a byte is
/// written. IoError on a failed system call: a single file at `path` is then
/// as it was; of a sharded save, the shards written before the failure have
/// replaced theirs (an earlier index over them is then refused as torn).
void save(const std::filesystem::path& path, const StateDict& state_dict, const SaveOptions& options = {});

}  // namespace ckpt::safetensors
