// Multi-rank jobs on torch's own distributed engine: c10d's TCPStore and
// ProcessGroupGloo (never a home-made transport).
//
//   auto pg = ckpt::dist::init_process_group();  // torchrun's variables
//   // pg->group is a c10d::ProcessGroup: all-reduce gradients over it;
//   // "dist_barrier" barriers and DistBarrier use it by default.
#pragma once

#include <ckpt/barrier.hpp>
#include <ckpt/types.hpp>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

namespace ckpt::dist {

struct InitOptions {
  /// Default: rank_info_from_env() (RANK, WORLD_SIZE).
  std::optional<RankInfo> rank_info;
  /// The TCPStore master's address. Default: MASTER_ADDR, else 127.0.0.1.
  std::optional<std::string> master_addr;
  /// Its port. Default: MASTER_PORT (required with more than one rank).
  std::optional<std::uint16_t> master_port;
  /// Bounds the store's connection and rendezvous, and every collective.
  std::chrono::milliseconds timeout = std::chrono::minutes(5);
  /// The address Gloo binds on this host. Default: GLOO_SOCKET_IFNAME's
  /// interface if set, else 127.0.0.1 when the master is on loopback, else this
  /// host's name.
  std::optional<std::string> gloo_hostname;
};

/// A process group and the store it was made over.
struct ProcessGroupHandle {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  RankInfo rank_info;
  std::chrono::milliseconds timeout{};
  /// Where the job's store is hosted, and how Gloo picked its device: what
  /// new_group connects with.
  std::string master_addr;
  std::uint16_t master_port = 0;
  std::optional<std::string> gloo_hostname;
  /// The group whose rank 0 hosts the store this one connects to (new_group):
  /// held so that the store outlives every group made over it.
  std::shared_ptr<const ProcessGroupHandle> base;

  /// The next number in the sequence `name` (0, 1, ...: one counter per name).
  /// Whatever keys its entries in the group's store per use (a DistBarrier,
  /// one DCP save or load) takes a number here: ranks use the group in the same
  /// order, so every rank draws the same number for the same use. Thread-safe.
  std::int64_t next_sequence(const std::string& name);

 private:
  std::mutex sequences_mutex_;
  std::map<std::string, std::int64_t> sequences_;
};

/// Creates the default group: a TCPStore (master on rank 0) and a Gloo group
/// over it. Throws Timeout when the ranks do not all join within the timeout,
/// Error for malformed variables.
std::shared_ptr<ProcessGroupHandle> init_process_group(InitOptions options = {});
/// The default group; null when none was created.
std::shared_ptr<ProcessGroupHandle> default_process_group();
/// Makes `group` the default (null: none).
void set_default_process_group(std::shared_ptr<ProcessGroupHandle> group);
/// Forgets the default group (it closes when its last user lets go).
void destroy_process_group();

/// A new group of the same ranks over fresh connections to `base`'s store,
/// its keys under `name/` (upstream's dist.new_group): for checkpoint
/// collectives kept apart from training's, or to go on after a Timeout left
/// `base` out of step (a cut link, a hung rank). Every rank calls it with the
/// same `name`, one never used before in this job. Throws Timeout when the
/// ranks do not all join within `base`'s timeout (a link still down).
std::shared_ptr<ProcessGroupHandle> new_group(const std::shared_ptr<const ProcessGroupHandle>& base,
                                              const std::string& name);

/// A TCP port that was free on rank 0 when it looked (it binds port 0 and
/// reads the port back), the same on every rank: for a tcp_store barrier's
/// store next to the group's. Every rank of `group` calls it with the same
/// `name`.
std::uint16_t agree_on_free_port(const ProcessGroupHandle& group, const std::string& name);

/// RankInfo of this process in `group`.
RankInfo rank_info_from(const c10d::ProcessGroup& group);

/// upstream's DistBarrier ("dist_barrier"): a barrier over a process group.
/// Reports travel by all-gather over the group; the commit phase and the
/// arrival marks go through the group's store. Unlike upstream, its timeout is
/// enforced and names the ranks that did not arrive (each rank marks its
/// arrival in the group's store).
class DistBarrier : public Barrier {
 public:
  /// Throws Error "DistBarrier requires an initialized process group" when
  /// `group` is null. Default timeout: the group's.
  explicit DistBarrier(std::shared_ptr<ProcessGroupHandle> group = default_process_group(),
                       std::optional<std::chrono::milliseconds> timeout = std::nullopt);
  void execute_barrier() override;
  BarrierOutcome arrive(const std::string& report, bool failed, bool want_reports) override;
  void set_sequence(std::int64_t sequence) override { sequence_ = sequence; }
  bool bounds_its_waits() const override { return true; }
  void limit_wait(std::chrono::milliseconds timeout) override { limit_ = timeout; }
  bool begin_commit() override;
  void end_commit(const std::optional<RankFailure>& failure) override;
  std::optional<RankFailure> await_commit() override;
  ~DistBarrier() override;

 private:
  std::shared_ptr<ProcessGroupHandle> group_;
  std::chrono::milliseconds timeout_;
  std::optional<std::chrono::milliseconds> limit_;  // limit_wait
  std::string prefix_;                              // of its store keys: ckpt/dist_barrier/<number>/
  std::int64_t sequence_ = 0;
  std::string round_;  // key prefix of the round last passed (for the commit phase)
};

}  // namespace ckpt::dist
