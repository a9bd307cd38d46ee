// Barriers: every rank waits until all ranks have written their files before
// any rank commits (upstream's barriers.py). The interface and the registry;
// the built-in types are TCPStoreBarrier (tcp_store_barrier.hpp) and
// DistBarrier (dist.hpp).
#pragma once

#include <ckpt/config.hpp>
#include <ckpt/error.hpp>
#include <ckpt/types.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ckpt {

/// What the ranks told each other at a barrier (Barrier::arrive).
struct BarrierOutcome {
  /// Whether the barrier exchanged reports at all (false: a barrier that only
  /// synchronises; then the fields below are empty).
  bool exchanged = false;
  /// Every rank that arrived with `failed`, and its report.
  std::map<std::int64_t, std::string> failures;
  /// Every rank's report, by rank: filled for a caller that asked for them.
  std::vector<std::string> reports;
};

/// A synchronization point across ranks.
class Barrier {
 public:
  virtual ~Barrier() = default;
  /// Returns once every rank reached the barrier. Throws Timeout when that does
  /// not happen within the barrier's own timeout.
  virtual void execute_barrier() = 0;
  /// The commit barrier: arrives with a short `report` (a rank that `failed`
  /// arrives too, so that the others learn of it instead of waiting), returns
  /// once every rank arrived, with every failed rank's report, and every
  /// rank's report when `want_reports` (the coordinator). The default runs
  /// execute_barrier() (not when `failed`) and exchanges nothing.
  virtual BarrierOutcome arrive(const std::string& report, bool failed, bool want_reports);
  /// Makes the next call join round `sequence`. A writer child that was
  /// restarted (its predecessor died) is told the round by its parent, which
  /// counts saves across children, so that it meets the other ranks in the
  /// same round instead of starting again at 0. The default does nothing.
  virtual void set_sequence(std::int64_t sequence) {}
  /// Makes the next call join the round named `name` instead of the next in
  /// the count: CheckpointWriter names each save's round by its checkpoint
  /// (`<path>#<n>`, n = how many times this rank's writer joined a round for
  /// that path before), so that a rank that skipped a save does not put the
  /// later rounds out of step. The default ignores it (a barrier whose rounds
  /// are ordered otherwise, as DistBarrier's collectives are).
  virtual void set_round(const std::string& name) {}
  /// Whether every wait of this barrier ends by itself within `timeout` once
  /// limit_wait(timeout) was called (the built-in barriers): CheckpointWriter
  /// then calls it on its own thread. Otherwise (the default) it runs each
  /// call on a thread of its own that it gives up on at the deadline.
  virtual bool bounds_its_waits() const { return false; }
  /// The longest the next calls may wait (for bounds_its_waits()).
  virtual void limit_wait(std::chrono::milliseconds timeout) {}

  // The commit phase, after an arrive() in which no rank failed. The
  // coordinator calls begin_commit() (false: some rank gave up waiting on the
  // round, so it must not commit), writes the marker, then end_commit() with
  // nullopt or what went wrong; every other rank calls await_commit(), which
  // returns once the coordinator has ended the commit: nullopt when the
  // checkpoint is committed, else why not. So that no rank reports a save as
  // done before the marker exists. Defaults (barriers without it): true,
  // nothing, nullopt.
  virtual bool begin_commit() { return true; }
  virtual void end_commit(const std::optional<RankFailure>& failure) {}
  virtual std::optional<RankFailure> await_commit() { return std::nullopt; }
};

/// Makes a barrier of a registered type from its arguments.
using BarrierFactory = std::function<std::shared_ptr<Barrier>(const Kwargs& barrier_args)>;

/// Registers (or replaces) a barrier type under `name`. Thread-safe.
void register_barrier(const std::string& name, BarrierFactory factory);
/// The registered barrier type names, sorted.
std::vector<std::string> registered_barriers();
/// The barrier `config` describes: nullptr when it names none. Throws Error
/// "Unknown barrier type '<name>'", listing the known ones, for an unknown name.
std::shared_ptr<Barrier> create_barrier_from_config(const BarrierConfig& config);
/// The same, with `rank_info` given to the barrier as `global_rank` and
/// `global_world_size` unless its arguments set them (as upstream injects it).
std::shared_ptr<Barrier> create_barrier_from_config(const BarrierConfig& config, const RankInfo& rank_info);

}  // namespace ckpt
