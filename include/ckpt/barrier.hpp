// Barriers: every rank waits until all ranks have written their files before
// any rank commits (upstream's barriers.py).
#pragma once

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

/// upstream's TCPStoreBarrier ("tcp_store"): a TCPStore of its own, its master
/// on rank 0, shared by every barrier call; a sequence number per prefix so the
/// same object serves every save. Keys, as upstream: `rank<r>` = the sequence
/// being joined, `<prefix><seq>/num_members`, `<prefix><seq>/last_member`; and
/// ckpt's `<prefix><seq>/report/<r>` and `<prefix><seq>/failed`. Unlike
/// upstream, `timeout` is enforced: a rank that does not arrive makes the others
/// throw Timeout naming the ranks that did not arrive.
struct TCPStoreBarrierOptions {
  std::int64_t global_rank = 0;
  std::int64_t global_world_size = 1;
  std::string barrier_prefix = "ckpt_barrier";
  std::chrono::milliseconds timeout_barrier_init = std::chrono::seconds(30);
  std::uint16_t tcpstore_port = 0;  ///< required
  std::string master_address = "127.0.0.1";
  std::chrono::milliseconds timeout = std::chrono::seconds(600);

  /// From barrier_args: global_rank, global_world_size, barrier_prefix,
  /// timeout_barrier_init (seconds; also `timeout_barrier_init_secs`),
  /// tcpstore_port, master_address, timeout (seconds; also `timeout_secs`).
  /// Rank and world size default to the environment's (torchrun's RANK and
  /// WORLD_SIZE). Throws Error naming a missing or ill-typed argument.
  static TCPStoreBarrierOptions from_args(const Kwargs& args);
};

class TCPStoreBarrier : public Barrier {
 public:
  /// Connects to (rank 0: starts) the store; waits for every rank's store
  /// client up to timeout_barrier_init (Timeout otherwise).
  explicit TCPStoreBarrier(TCPStoreBarrierOptions options);
  ~TCPStoreBarrier() override;
  void execute_barrier() override;
  BarrierOutcome arrive(const std::string& report, bool failed, bool want_reports) override;
  const TCPStoreBarrierOptions& options() const;
  /// The sequence number the next barrier call joins.
  std::int64_t sequence() const;
  void set_sequence(std::int64_t sequence) override;
  bool begin_commit() override;
  void end_commit(const std::optional<RankFailure>& failure) override;
  std::optional<RankFailure> await_commit() override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Which barrier a checkpointer uses: none by default, else a registered type
/// ("tcp_store", "dist_barrier", or one a user registered) with its arguments.
struct BarrierConfig {
  std::optional<std::string> barrier_type;
  Kwargs barrier_args;
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
