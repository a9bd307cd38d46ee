// CheckpointWriter: writes one rank's state dict into a checkpoint directory and
// commits it (upstream's checkpoint_writer.py).
//
// The commit order of write(path, state_dict, kwargs):
//   1. create the directory `path` (and its parents);
//   2. write `path/checkpoint_<global_rank>.pt` durably: temp file, fsync,
//      rename, directory fsync (a failure leaves the previous file in place);
//   3. commit_hook->pre_commit(path, kwargs);
//   4. the barrier, bounded by write_barrier_timeout: every rank arrives with a
//      report (its file's size and digest, or its error: a rank that failed in
//      steps 1–3 arrives too, then throws its own error); when any rank
//      failed, the others throw CheckpointException naming each failed rank;
//   5. the coordinator (rank 0) writes the commit marker (commit.hpp) — alone,
//      or with a barrier that exchanges reports (tcp_store, dist_barrier) —
//      and, with a barrier that has a commit phase (both built-in ones), the others
//      wait until it has: a save returns on any rank only once committed;
//   6. commit_hook->post_commit(path, kwargs).
// A failure at any step stops there and is thrown: no later step runs.
#pragma once

#include <ckpt/barrier.hpp>
#include <ckpt/commit.hpp>
#include <ckpt/config.hpp>
#include <ckpt/format.hpp>
#include <ckpt/state_dict.hpp>
#include <ckpt/types.hpp>

#include <chrono>
#include <cstddef>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

namespace ckpt {

/// Hooks around the commit of a checkpoint (upstream's WriterHook).
class WriterHook {
 public:
  virtual ~WriterHook() = default;
  /// Runs after this rank's file is durable, before the barrier. `path` is the
  /// checkpoint directory. Throwing fails the write.
  virtual void pre_commit(const std::filesystem::path& path, const Kwargs& kwargs) {}
  /// Runs after the barrier: every rank's file is durable.
  virtual void post_commit(const std::filesystem::path& path, const Kwargs& kwargs) {}
};

class CheckpointWriter {
 public:
  /// `barrier` and `commit_hook` may be null (no barrier, no hooks).
  CheckpointWriter(CheckpointWriterConfig config, RankInfo rank_info,
                   std::shared_ptr<Barrier> barrier = nullptr,
                   std::shared_ptr<WriterHook> commit_hook = nullptr);
  virtual ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  /// Writes and commits `state_dict` into the directory `path` (see the commit
  /// order above). Throws IoError, Unsupported, Timeout (barrier), or whatever a
  /// hook or the barrier throws, unchanged.
  virtual void write(const std::filesystem::path& path, const StateDict& state_dict,
                     const Kwargs& kwargs = {});
  /// The same commit order for a rank file that `write_rank_file` writes:
  /// it gets the file's path (`path/checkpoint_<rank>.pt`) and must leave it
  /// durable, or throw (then the failure is reported at the barrier and
  /// rethrown, as write()'s). write() is this with write_file(); the writer
  /// child passes a function that writes its staged image.
  virtual void write_with(const std::filesystem::path& path,
                          const std::function<void(const std::filesystem::path& file)>& write_rank_file,
                          const Kwargs& kwargs = {});
  /// Releases what the writer holds. Idempotent.
  virtual void close();
  /// The barrier round the next write joins (Barrier::set_sequence).
  void set_barrier_sequence(std::int64_t sequence);
  /// The name of the barrier round the next write joins (Barrier::set_round).
  /// Without it, a write to `path` joins `<path>#<n>`, n = how many writes to
  /// that path this writer made before; the writer child is told the name by
  /// its parent, which counts across children.
  void set_barrier_round(std::string name);
  /// The round name of the next write to `path` when none is set: the
  /// lexically normal path, '#', the count. Every rank must name a checkpoint
  /// the same way.
  static std::string round_name(const std::filesystem::path& path, std::int64_t count);

  const CheckpointWriterConfig& config() const { return config_; }
  const RankInfo& rank_info() const { return rank_info_; }
  const std::shared_ptr<Barrier>& barrier() const { return barrier_; }
  const std::shared_ptr<WriterHook>& commit_hook() const { return commit_hook_; }

 protected:
  /// Steps 3–6: pre_commit, the barrier (bounded by its timeout), the
  /// marker, post_commit.
  void commit(const std::filesystem::path& path, const Kwargs& kwargs);
  /// Step 4: runs the barrier with the configured deadline.
  void run_barrier();
  BarrierOutcome run_barrier(const std::string& report, bool failed, bool want_reports);
  /// A rank that failed before the barrier arrives with its error.
  void report_failure(std::exception_ptr error) noexcept;

 private:
  CheckpointWriterConfig config_;
  RankInfo rank_info_;
  std::shared_ptr<Barrier> barrier_;
  std::shared_ptr<WriterHook> commit_hook_;
  std::optional<std::string> next_round_;
  std::map<std::string, std::int64_t> rounds_joined_;  // writes per path
};

}  // namespace ckpt
