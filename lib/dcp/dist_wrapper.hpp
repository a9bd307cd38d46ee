// The DCP core's collectives (upstream's _DistWrapper): run a step on every
// rank, bring the results to the coordinator, let it decide, and hand the
// outcome back, with any rank's failure turned into the same
// CheckpointException on every rank.
//
// Payloads are byte strings moved by Gloo (lengths first, so every rank knows
// the buffer size; buffers are padded to the longest payload): per rank
// O(longest payload), at the coordinator O(world × longest).
// Each rank marks in the group's store that it finished a step; the
// coordinator starts the exchange ("go") once every rank has, and marks its
// own part of the step (merging, finish) done before it sends the outcome.
// Ranks enter each Gloo collective only once the store says the others are
// ready, so the group's Gloo timeout never cuts a long step short. When a collective fails
// (a rank died, or did not come within the timeout), the ranks still without
// a mark when the step's time is up are named (the coordinator when only its
// part is missing), and the first rank to name them leaves that verdict in the
// store for the others.
#pragma once

#include <ckpt/dist.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace ckpt::dcp::detail {

class DistWrapper {
 public:
  /// `use_dist` false: this process alone, rank 0 and coordinator.
  DistWrapper(std::shared_ptr<dist::ProcessGroupHandle> group, bool use_dist, std::int64_t coordinator_rank,
              std::chrono::milliseconds timeout);

  bool is_coordinator() const { return rank_ == coordinator_; }
  std::int64_t world() const { return world_; }

  /// `map` on every rank; on the coordinator, `reduce` of every rank's result
  /// (index = rank) gives one result per rank, and rank r returns the r-th.
  std::string reduce_scatter(const std::string& step, const std::function<std::string()>& map,
                             const std::function<std::vector<std::string>(std::vector<std::string>)>& reduce);
  /// `map` on every rank; `reduce` on the coordinator; every rank returns its result.
  std::string all_reduce(const std::string& step, const std::function<std::string()>& map,
                         const std::function<std::string(std::vector<std::string>)>& reduce);
  /// `map` on every rank; returns when it succeeded everywhere.
  void all_gather(const std::string& step, const std::function<void()>& map);

 private:
  enum class Out { scatter, broadcast };
  std::string run_step(const std::string& step, const std::function<std::string()>& map,
                       const std::function<std::vector<std::string>(std::vector<std::string>)>& reduce,
                       Out out);
  std::vector<std::string> gather(const std::string& mine);
  std::string scatter(const std::vector<std::string>& all);
  std::string broadcast(const std::string& value);
  /// Starts a collective and waits for it; throws CollectiveFailure.
  void wait(const std::function<c10::intrusive_ptr<c10d::Work>()>& start);
  /// Polls the store until all `keys` exist; false once the step's time is up.
  bool await_keys(const std::vector<std::string>& keys);
  [[noreturn]] void collective_failed(const std::string& step, const std::string& cause);
  /// This rank's own request to the group's store failed (its host is out of
  /// reach: the client is out of step, so no verdict can be read from it).
  [[noreturn]] void store_unreachable(const std::string& step, const std::string& cause);
  std::string step_key(const std::string& what) const;

  std::shared_ptr<dist::ProcessGroupHandle> group_;
  bool use_dist_;
  std::int64_t coordinator_;
  std::chrono::milliseconds timeout_;
  std::int64_t rank_ = 0;
  std::int64_t world_ = 1;
  std::int64_t call_ = 0;
  std::int64_t step_ = -1;
  std::chrono::steady_clock::time_point step_start_{};  // when this rank finished its part of the step
};

}  // namespace ckpt::dcp::detail
