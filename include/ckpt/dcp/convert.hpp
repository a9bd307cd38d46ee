// Converting a checkpoint between the formats C++ and Python exchange
// (upstream's torch.distributed.checkpoint.format_utils, and more): a
// torch.save file (or a directory of ckpt's checkpoint_<rank>.pt files), a DCP
// directory (PyTorch's format, or ckpt's earlier JSON dialect) and Hugging
// Face safetensors (a file, an index with its shards, or a directory of them,
// DCP's HuggingFaceStorageWriter directories included), each into any other.
//
// A conversion streams: the source's structure is read first (the pickle, the
// metadata, the headers), the destination is laid out from it, and each
// tensor's bytes are read only when the destination writes them, then
// released. Peak memory is the largest tensor (for a DCP source: the larger of
// that and `read_batch_bytes`) plus the writers' fixed buffers, whatever the
// size of the checkpoint; upstream's dcp_to_torch_save holds the whole state.
//
// What is carried: every tensor's values, dtype and shape, bit for bit; the
// nesting of the state dict (a DCP checkpoint's planner data, a torch.save
// file's dicts and lists); every non-tensor value. Not carried: devices
// (everything is written as CPU tensors, as torch.load(map_location="cpu")
// would give them), requires_grad and Parameter-ness, a DCP checkpoint's
// sharding (tensors are written whole), views (tensors sharing a storage are
// shared again only from torch.save to torch.save). safetensors has no nesting
// and no values: names are the state dict's keys joined with '.' (as a flat
// model.state_dict() has them, and as DCP flattens), and values are refused
// unless asked to be skipped or kept as text in `__metadata__`.
#pragma once

#include <ckpt/dcp/storage.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>

namespace ckpt::dcp {

enum class CheckpointFormat { torch, dcp, safetensors };

/// "torch", "dcp", "safetensors".
const char* format_name(CheckpointFormat format);

/// What `source` is: a DCP directory (`.metadata`), a directory of
/// safetensors files (or a `.safetensors` file or index JSON), else a
/// torch.save file or a directory of checkpoint_<rank>.pt files. Throws
/// NotFound when there is nothing there or a directory holds none of these.
CheckpointFormat detect_format(const std::filesystem::path& source);

/// The format a destination's name asks for: `.safetensors` and
/// `.safetensors.index.json` are safetensors; `.pt`, `.pth`, `.bin` and
/// `.ckpt` are torch.save files; anything else (a directory) is DCP.
CheckpointFormat format_for_destination(const std::filesystem::path& destination);

/// How far a conversion got: tensors (and their bytes) written so far.
struct ConvertProgress {
  std::size_t tensors_done = 0;
  std::size_t tensors = 0;
  std::uint64_t bytes_done = 0;
  std::uint64_t bytes = 0;
};

struct ConvertOptions {
  /// The destination's format; unset: format_for_destination().
  std::optional<CheckpointFormat> to{};
  /// A DCP destination's `.metadata`: which torch generation reads it.
  MetadataDialect dialect = MetadataDialect::torch_2_4;
  /// A directory of checkpoint_<rank>.pt files: convert this rank's file only.
  /// Unset, one file converts as itself and several as one state dict
  /// {"0": rank 0's, "1": rank 1's, ...}.
  std::optional<std::int64_t> rank{};
  /// A safetensors destination: split into shards of at most this many tensor
  /// bytes, with the index (safetensors::SaveOptions::max_shard_bytes). A
  /// destination named `*.safetensors.index.json` is sharded in any case.
  std::uint64_t max_shard_bytes = 0;
  /// A safetensors destination: int, float, bool and str values are kept as
  /// text in `__metadata__` under their key.
  bool values_as_metadata = false;
  /// A safetensors destination: non-tensor values are left out (counted in
  /// ConvertResult::skipped) instead of refused.
  bool skip_values = false;
  /// fsync what is written (off only for scratch data).
  bool sync_files = true;
  /// A DCP source: keys are read in batches of up to this many bytes (one
  /// tensor at least), which bounds the reads of its metadata.
  std::uint64_t read_batch_bytes = std::uint64_t{64} << 20;
  /// Called after each tensor written.
  std::function<void(const ConvertProgress&)> progress{};
};

struct ConvertResult {
  CheckpointFormat from = CheckpointFormat::torch;
  CheckpointFormat to = CheckpointFormat::torch;
  std::size_t tensors = 0;  ///< tensors written (the state dict's tensor leaves)
  std::size_t values = 0;   ///< non-tensor values written
  std::size_t skipped = 0;  ///< values left out (skip_values)
  /// Bytes read for them (for a torch.save destination, of their storages).
  std::uint64_t tensor_bytes = 0;
  std::uint64_t largest_tensor_bytes = 0;
};

/// Converts `source` into `destination` (see above), durably: a torch.save
/// file and each safetensors file are written to a temporary file, fsynced and
/// renamed; a DCP destination commits with its `.metadata` (an earlier
/// checkpoint there stays whole until then). Every byte read is checked as the
/// source's reader checks it (CRC-32 of torch.save records and ckpt's DCP
/// items, every bound). Throws Error when source and destination are the same
/// path, Unsupported for what the destination cannot hold (naming the key),
/// NotFound, CorruptCheckpoint (naming the file and the fault), IoError; on any
/// failure the destination is as it was (a DCP directory may gain an empty
/// directory or a removed temporary, never a changed checkpoint).
ConvertResult convert(const std::filesystem::path& source, const std::filesystem::path& destination,
                      const ConvertOptions& options = {});

/// upstream's format_utils.dcp_to_torch_save: the DCP checkpoint in
/// `dcp_checkpoint_dir` as one torch.save file.
void dcp_to_torch_save(const std::filesystem::path& dcp_checkpoint_dir,
                       const std::filesystem::path& torch_save_path);
/// upstream's format_utils.torch_save_to_dcp: the torch.save file as a DCP
/// checkpoint (PyTorch's format, for torch >= 2.4 readers).
void torch_save_to_dcp(const std::filesystem::path& torch_save_path,
                       const std::filesystem::path& dcp_checkpoint_dir);

}  // namespace ckpt::dcp
