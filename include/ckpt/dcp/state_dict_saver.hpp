// save_state_dict / load_state_dict: the DCP core's collective save and load
// (upstream's torch.distributed.checkpoint.state_dict_saver and _loader).
//
// Every rank of the process group calls them together with its own state dict.
//   save: each rank plans (set_up_planner, set_up_storage_writer,
//         create_local_plan, prepare_local_plan); the coordinator gathers the
//         plans, makes the global plan (create_global_plan,
//         prepare_global_plan) and scatters each rank its part ("plan"); each
//         rank writes (finish_plan, write_data); the coordinator gathers the
//         results and runs finish, the commit point ("write").
//   load: each rank reads the metadata and plans; the coordinator runs
//         create_global_plan and prepare_global_plan and scatters ("plan");
//         each rank reads its items ("read").
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

#include <chrono>
#include <cstdint>
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

/// Loads into `state_dict` in place: tensors and local shards are filled from
/// the checkpoint (whatever sharding saved them), other values are replaced.
/// `planner` null: a DefaultLoadPlanner (strict: every key must be saved).
/// The other arguments as for save_state_dict. Throws CheckpointException.
void load_state_dict(DcpStateDict& state_dict, StorageReader& storage, LoadPlanner* planner = nullptr,
                     std::shared_ptr<dist::ProcessGroupHandle> group = nullptr,
                     std::int64_t coordinator_rank = 0, bool no_dist = false,
                     std::optional<std::chrono::milliseconds> timeout = std::nullopt);

}  // namespace ckpt::dcp
