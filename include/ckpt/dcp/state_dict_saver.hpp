// save_state_dict / load_state_dict: the DCP core's collective save and load
// (upstream's torch.distributed.checkpoint.state_dict_saver and _loader).
//
// Every rank of the process group calls them together with its own state dict.
//   save: each rank plans (set_up_planner, set_up_storage_writer,
//         create_local_plan, prepare_local_plan); the coordinator gathers the
//         plans, makes the global plan (create_global_plan,
//         prepare_global_plan) and scatters each rank its part ("plan"); each
//         rank writes (finish_plan, write_data); the coordinator gathers the
//         results and runs finish, the commit point ("write"). With plan
//         caching (DefaultSavePlanner's enable_plan_caching), unchanged plans
//         travel as markers and the coordinator reuses its global plan.
//   load: where the storage reader shares its metadata (FileSystemReader,
//         HuggingFaceStorageReader) and there are other ranks, each rank
//         sends what it loads, the coordinator alone reads the metadata and
//         sends each rank its part ("metadata"; a missing or damaged
//         checkpoint then fails there, naming the coordinator); else every
//         rank reads the metadata itself. Each rank plans from it; the
//         coordinator runs create_global_plan and prepare_global_plan and
//         scatters ("plan"); each rank reads its items ("read").
// Plans, results and errors travel as serialized bytes through Gloo
// collectives. A failure anywhere (any phase, any rank, the coordinator's own
// steps included) makes every rank raise the same CheckpointException, which
// maps each failed rank to its error's type and message. A rank that dies or
// hangs makes the others raise it within the timeout, naming that rank
// (type "Timeout"): every rank marks each step it finished in the group's
// store, so the ones that did not can be named. After such a failure the
// process group itself is out of step; after any other failure it stays usable.
#pragma once

#include <ckpt/dcp/metadata.hpp>
#include <ckpt/dcp/planner.hpp>
#include <ckpt/dcp/storage.hpp>
#include <ckpt/dist.hpp>
#include <ckpt/state_dict.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>

namespace ckpt::dcp {

/// Saves `state_dict` through `storage`. `planner` null: a DefaultSavePlanner.
/// `group` null: the default process group, and no_dist when there is none and
/// WORLD_SIZE is unset or 1. `no_dist`: this process saves alone, as rank 0
/// and coordinator. `timeout`: how long a rank waits for the others at each
/// step (default: the group's). Returns the checkpoint's metadata on the
/// coordinator; on the other ranks, create_default_local_metadata(state_dict)
/// (the global layout of the keys this rank saved: the same as the
/// coordinator's when every rank saves the same keys, and free, where sending
/// the whole would cost every rank O(world) bytes). Throws CheckpointException.
Metadata save_state_dict(const DcpStateDict& state_dict, StorageWriter& storage,
                         SavePlanner* planner = nullptr,
                         std::shared_ptr<dist::ProcessGroupHandle> group = nullptr,
                         std::int64_t coordinator_rank = 0, bool no_dist = false,
                         std::optional<std::chrono::milliseconds> timeout = std::nullopt);

/// Who reads a tensor item that several ranks load alike (the same region of
/// the same saved chunk: a replicated tensor, or shards that overlap a saved
/// chunk alike) from storage.
enum class ReplicatedReads {
  /// Every rank reads what it loads (upstream's way; best where storage is
  /// local and its page cache serves the repeats).
  every_rank,
  /// One rank per host reads it and sends it to the others on its host over
  /// the group (Gloo point-to-point). A rank's host is GROUP_RANK where the
  /// launcher sets it (torchrun, ckpt-launch --node-rank), else its hostname.
  once_per_host,
  /// One rank in all reads it; it travels over the group to one rank per
  /// host, then within each host: storage sees each byte once.
  once,
};

/// Loads into `state_dict` in place: tensors and local shards are filled from
/// the checkpoint (whatever sharding saved them), other values are replaced.
/// `planner` null: a DefaultLoadPlanner (strict: every key must be saved).
/// `replicated_reads`: see ReplicatedReads. Items read once are spread over
/// the ranks that load them (the rank with the least to read gets the next,
/// biggest first) and passed on along a binomial tree, so no rank sends more
/// than about log2 of the copies; they reach the other ranks' planners as
/// resolve_tensor / commit_tensor, after every rank has read ("share" step).
/// A planner used with sharing must leave the tensor it resolved for an item
/// as committed until the load returns: the reader sends it to others after
/// commit_tensor (DefaultLoadPlanner's are views of the destination or
/// tensors of their own, never reused). With destinations off the CPU those
/// are host copies, held until they are sent.
/// The other arguments as for save_state_dict. Throws CheckpointException.
void load_state_dict(DcpStateDict& state_dict, StorageReader& storage, LoadPlanner* planner = nullptr,
                     std::shared_ptr<dist::ProcessGroupHandle> group = nullptr,
                     std::int64_t coordinator_rank = 0, bool no_dist = false,
                     std::optional<std::chrono::milliseconds> timeout = std::nullopt,
                     ReplicatedReads replicated_reads = ReplicatedReads::every_rank);

// --- the modern API over nested state dicts (upstream's dcp.save / dcp.load) ---
//
// A nested StateDict is flattened with upstream's rules (torch >= 2.4): every
// dict is entered (its keys as text: an int key 3 becomes "3"), a list only
// when it holds a tensor, a sharded tensor or a dict/list that is entered
// itself; everything else is a leaf. A leaf's key is its path joined with
// "." ("model.layer1.weight", "optim.state.0.exp_avg", "flags.1"), and the
// path itself is the checkpoint's planner data, so Python's dcp.load and
// dcp_to_torch_save unflatten the keys again. A leaf is a tensor, a sharded
// tensor (sharded_value()) or a plain value.

struct SaveOptions {
  /// Where to save: a directory (FileSystemWriter), or what `storage_writer`
  /// is reset to when both are given.
  std::optional<std::filesystem::path> checkpoint_id;
  StorageWriter* storage_writer = nullptr;
  SavePlanner* planner = nullptr;  ///< null: a DefaultSavePlanner
  std::shared_ptr<dist::ProcessGroupHandle> process_group;
  std::int64_t coordinator_rank = 0;
  bool no_dist = false;
  std::optional<std::chrono::milliseconds> timeout;
};

struct LoadOptions {
  std::optional<std::filesystem::path> checkpoint_id;
  StorageReader* storage_reader = nullptr;
  LoadPlanner* planner = nullptr;  ///< null: a DefaultLoadPlanner (strict)
  std::shared_ptr<dist::ProcessGroupHandle> process_group;
  std::int64_t coordinator_rank = 0;
  bool no_dist = false;
  std::optional<std::chrono::milliseconds> timeout;
  ReplicatedReads replicated_reads = ReplicatedReads::every_rank;
};

/// A sharded tensor as a value of a StateDict (an IValue capsule), and back:
/// as_sharded() is null for any other value.
c10::IValue sharded_value(ShardedTensor tensor);
const ShardedTensor* as_sharded(const c10::IValue& value);

/// A nested state dict flattened (see above): the flat state dict, and each
/// key's path. Leaves are shared, not copied. Throws Unsupported for a dict
/// key that is neither text nor an int, and Error for two leaves that flatten
/// to the same key.
std::pair<DcpStateDict, std::map<std::string, ObjectPath>> flatten_state_dict(const StateDict& state_dict);
/// The nested state dict `flat` came from (upstream's unflatten_state_dict):
/// keys with no path in `paths` stay top-level keys.
StateDict unflatten_state_dict(const DcpStateDict& flat, const std::map<std::string, ObjectPath>& paths);

/// Saves the nested `state_dict` (upstream's dcp.save). Throws Error when
/// neither a checkpoint_id nor a storage_writer is given, else as
/// save_state_dict.
Metadata save(const StateDict& state_dict, const SaveOptions& options);
/// Loads into the nested `state_dict` in place (upstream's dcp.load):
/// tensors and local shards are filled, other leaves replaced.
void load(const StateDict& state_dict, const LoadOptions& options);
/// Everything a checkpoint holds, as whole tensors (on the CPU) and values in
/// a fresh nested state dict unflattened with the checkpoint's planner data.
StateDict load_all(const std::filesystem::path& checkpoint_id, const LoadOptions& options = {});

}  // namespace ckpt::dcp
