// CheckpointManager: numbered checkpoints under one root, what a training job
// resumes from (as Orbax's CheckpointManager does for JAX).
//
//   ckpt::CheckpointManager manager(root, checkpointer, {.keep_last_n = 3});
//   if (auto step = manager.restore_latest(state)) start = *step + 1;
//   ...
//   manager.save(step, state);  // root/step_<step>
//
// A checkpoint counts only once committed (its ckpt_commit.json marker is there
// and every file matches it, see commit.hpp): a save that was killed midway is
// never restored, and never makes an older good one go away. Pruning keeps the
// `keep_last_n` newest committed checkpoints, runs on the coordinator (rank 0)
// only, after a newer checkpoint was committed, and never removes the newest
// committed one; it also removes the directories of failed saves older than
// the newest committed one.
#pragma once

#include <ckpt/checkpointer.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

namespace ckpt {

struct CheckpointManagerOptions {
  /// How many committed checkpoints to keep (the newest); 0 keeps all.
  std::size_t keep_last_n = 0;
  /// This process's rank; default rank_info_from_env(). Rank 0 prunes.
  std::optional<RankInfo> rank_info;
};

/// A committed checkpoint under the manager's root.
struct CommittedCheckpoint {
  std::int64_t step = 0;
  std::filesystem::path path;
};

class CheckpointManager {
 public:
  CheckpointManager(std::filesystem::path root, std::shared_ptr<Checkpointer> checkpointer,
                    CheckpointManagerOptions options = {});
  ~CheckpointManager();
  CheckpointManager(const CheckpointManager&) = delete;
  CheckpointManager& operator=(const CheckpointManager&) = delete;

  /// The directory of step `step`: root/step_<step>.
  std::filesystem::path path_of(std::int64_t step) const;

  /// Saves `state_dict` as step `step` through the checkpointer. `written`
  /// completes once the checkpoint is durable and committed and, on the
  /// coordinator, older ones were pruned (a pruning failure is logged, not
  /// thrown: the new checkpoint is good). Waits first for the previous save's
  /// pruning. Throws Error for a step that is negative or not above the newest
  /// committed one (found by a scan at the first save, then kept as saves commit).
  SaveFutures save(std::int64_t step, const StateDict& state_dict, const Kwargs& kwargs = {});

  /// Every committed checkpoint, oldest first.
  std::vector<CommittedCheckpoint> committed() const;
  /// The newest committed checkpoint; nullopt when there is none.
  std::optional<CommittedCheckpoint> latest_committed() const;

  /// Loads the newest committed checkpoint into `target` (in place, strict and
  /// checking every record's CRC-32 unless `options` says otherwise) and
  /// returns its step; nullopt (target untouched) when there is none. A
  /// committed checkpoint that no longer reads back (its files damaged since:
  /// CorruptCheckpoint, or NotFound for a file gone) is logged as a warning
  /// (ckpt::log) and the next older one is restored instead. Records are read
  /// into `target` before their CRC is checked: when every committed checkpoint
  /// is damaged it returns nullopt with `target` partly overwritten.
  std::optional<std::int64_t> restore_latest(const StateDict& target,
                                             LoadOptions options = {.strict = true, .verify_crc = true});

  /// Removes what pruning removes (see the top of this file); returns the
  /// directories removed. Rank 0 only; elsewhere it does nothing.
  std::vector<std::filesystem::path> prune();

  /// Waits for the last save's pruning. Does not close the checkpointer.
  void close();

  const std::filesystem::path& root() const { return root_; }

 private:
  std::filesystem::path root_;
  std::shared_ptr<Checkpointer> checkpointer_;
  CheckpointManagerOptions options_;
  RankInfo rank_info_;
  std::thread after_write_;
  std::optional<std::int64_t> floor_step_;   // a new save's step must be above it
  std::atomic<std::int64_t> in_flight_{-1};  // step being written (never pruned); -1: none
};

}  // namespace ckpt
