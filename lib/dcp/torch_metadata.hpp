// PyTorch's own `.metadata`: the pickled Metadata dataclass that
// torch.distributed.checkpoint (torch 2.x) and
// torch.distributed._shard.checkpoint (torch 1.13) write. Read with the
// restricted pickle reader and the allowlist of the classes upstream pickles
// there; nothing in the file is executed. Written with the class paths of
// the torch generation asked for.
#pragma once

#include <ckpt/dcp/planner.hpp>
#include <ckpt/dcp/storage.hpp>

#include <string>
#include <string_view>

namespace ckpt::dcp::detail {

/// Whether a `.metadata` file's bytes are a pickle (PyTorch's dialect) rather
/// than ckpt's JSON.
bool is_torch_metadata(std::string_view bytes);

/// Parses PyTorch's `.metadata` and checks it as every metadata is checked
/// (check_checkpoint_metadata). Every item it describes is a torch.save
/// archive (StorageInfo::archive). Throws CorruptCheckpoint naming `source`
/// and the fault: a class off the allowlist, a field of the wrong type, a
/// size or chunk out of bounds, a file name that leaves the directory.
CheckpointMetadata decode_torch_metadata(std::string_view bytes, const std::string& source);

/// PyTorch's `.metadata` for `metadata` as the torch generation `dialect`
/// reads it: the Metadata dataclass pickled (protocol 4) with that
/// generation's class paths. Every item must be a torch.save archive
/// (StorageInfo::archive). Keys without planner data get the path (key,)
/// (torch >= 2.0 dialects), so Python's unflattening finds every key.
std::string encode_torch_metadata(const CheckpointMetadata& metadata, MetadataDialect dialect);

}  // namespace ckpt::dcp::detail
