// upstream's TCPStoreBarrier, registered as "tcp_store": the commit barrier
// over a TCPStore of its own (its protocol: lib/dist/tcp_store_barrier.cpp).
#pragma once

#include <ckpt/barrier.hpp>
#include <ckpt/types.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace ckpt {

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
  /// Whether rank 0's barrier starts the store (upstream's way). False: the
  /// store is hosted elsewhere (a TCPStoreBarrierHost: the asynchronous
  /// checkpointer hosts it in rank 0's trainer, so that it outlives rank 0's
  /// writer child) and every rank only connects.
  bool host_store = true;

  /// From barrier_args: global_rank, global_world_size, barrier_prefix,
  /// timeout_barrier_init (seconds; also `timeout_barrier_init_secs`),
  /// tcpstore_port, master_address, timeout (seconds; also `timeout_secs`),
  /// host_store (bool).
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
  /// The sequence number the next barrier call without a round name joins.
  std::int64_t sequence() const;
  /// The key prefix of the round last passed (`<barrier_prefix>/<name>` or
  /// `<barrier_prefix><seq>`); empty before the first.
  std::string last_round() const;
  void set_sequence(std::int64_t sequence) override;
  /// Rounds named by checkpoint: the next call's keys are under
  /// `<barrier_prefix>/<name>/` instead of `<barrier_prefix><seq>/`.
  void set_round(const std::string& name) override;
  bool bounds_its_waits() const override { return true; }
  void limit_wait(std::chrono::milliseconds timeout) override;
  bool begin_commit() override;
  void end_commit(const std::optional<RankFailure>& failure) override;
  std::optional<RankFailure> await_commit() override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// The store of a tcp_store barrier, hosted in this process for barriers made
/// with host_store = false elsewhere (the asynchronous checkpointer makes one
/// in rank 0's trainer when its barrier is tcp_store). It lives as long as
/// this object.
class TCPStoreBarrierHost {
 public:
  /// Starts the store on options.master_address:options.tcpstore_port.
  /// Throws Error when it cannot (the port taken, say).
  explicit TCPStoreBarrierHost(const TCPStoreBarrierOptions& options);
  ~TCPStoreBarrierHost();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ckpt
