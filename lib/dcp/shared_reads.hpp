// Replicated reads shared over the group (load_state_dict's ReplicatedReads).
//
// A tensor item that several ranks load from the same saved bytes (a
// replicated tensor, or a saved chunk several ranks' shards overlap alike) is
// read from storage by one of them and sent to the others:
//   1. each rank sends its host with its local plan ("plan" step);
//   2. the coordinator finds the items several ranks plan (same saved chunk,
//      same offsets and lengths in it), picks a reader for each (once per host,
//      or once in all) among the ranks that load it, the one with the fewest
//      elements to read so far, biggest items first, removes the item from the
//      other ranks' plans and gives each rank its share steps: the item it
//      loads, the rank it receives it from (none for the reader) and the ranks
//      it passes it on to, along a binomial tree (over the hosts first, then
//      within each host), so no rank sends more than log2 of the copies;
//   3. every rank reads its plan ("read" step); the reader's planner is
//      wrapped so that it keeps each shared item's tensor as it is committed;
//   4. "share" step, once every rank has read: each rank walks its steps in
//      the coordinator's order (the tags), receives an item (Gloo recv into
//      what its planner resolves, then commit) and then posts its sends. No
//      rank waits for an item that depends on one later in the order, so the
//      walk cannot deadlock. The whole walk is bounded by half the load's
//      timeout: a rank left waiting for a dead or stuck one gives up in
//      time to report, and the others name the missing rank. (A timed-out
//      Gloo transfer closes the rank's connections: as after any dead or
//      hung rank, the group is then out of step.)
// A rank's own fault (a planner's tensor that does not fit) does not stop its
// walk: it receives into scratch memory and passes that on, and raises the
// fault at the end, so the others neither wait in vain nor break the group.
// Each load's tags start at a base the coordinator draws: a message of one
// load is never taken for another's.
#pragma once

#include "dcp/share_plan.hpp"

#include <ckpt/dcp/planner.hpp>
#include <ckpt/dist.hpp>

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace ckpt::dcp::detail {

/// This process's host, as the coordinator groups ranks for
/// ReplicatedReads::once_per_host: "node <GROUP_RANK>" where the launcher set
/// GROUP_RANK (torchrun, ckpt-launch), else "host <hostname>".
std::string host_id();

/// The coordinator's step 2: takes the items that ranks in `hosts` (index =
/// rank) plan alike out of all but one rank's plan (`once_in_all`), or all
/// but one rank's per host, and returns every rank's share steps (index =
/// rank).
std::vector<std::vector<ShareStep>> share_replicated_reads(std::vector<LoadPlan>& plans,
                                                           const std::vector<std::string>& hosts,
                                                           bool once_in_all);

/// A planner that forwards every call to `inner` and keeps the tensors
/// committed for the steps this rank reads (step 3).
class KeepingPlanner : public LoadPlanner {
 public:
  KeepingPlanner(LoadPlanner& inner, const std::vector<ShareStep>& steps);
  std::optional<MetadataRequest> metadata_request(const DcpStateDict& state_dict) const override {
    return inner_.metadata_request(state_dict);
  }
  void set_up_planner(DcpStateDict& state_dict, const Metadata& metadata, bool is_coordinator) override {
    inner_.set_up_planner(state_dict, metadata, is_coordinator);
  }
  LoadPlan create_local_plan() override { return inner_.create_local_plan(); }
  std::vector<LoadPlan> create_global_plan(std::vector<LoadPlan> plans) override {
    return inner_.create_global_plan(std::move(plans));
  }
  LoadPlan finish_plan(LoadPlan central_plan) override { return inner_.finish_plan(std::move(central_plan)); }
  void load_value(const ReadItem& item, c10::IValue value) override {
    inner_.load_value(item, std::move(value));
  }
  at::Tensor resolve_tensor(const ReadItem& item) override { return inner_.resolve_tensor(item); }
  void commit_tensor(const ReadItem& item, const at::Tensor& tensor) override;
  /// The tensor kept for `tag`, no longer kept (undefined when none was
  /// committed).
  at::Tensor take(std::uint32_t tag);

 private:
  LoadPlanner& inner_;
  std::map<std::string, std::uint32_t> tags_;  // encoded item → tag, for the items this rank reads
  std::map<std::uint32_t, at::Tensor> kept_;
};

/// Step 4 on this rank: receives, commits and sends the items of `steps`
/// over `group`, tags offset by `tag_base`. `dtype_of` gives an item's saved
/// dtype. A fault of this rank's own (a resolved tensor that does not fit the
/// item: Mismatch; an item its reader did not commit: Error) is raised only
/// once the walk is done, every receive and send made (with scratch memory),
/// so no other rank waits for it in vain. Throws Timeout when a peer does not
/// take part within half of `timeout` (so that a rank left waiting for a dead
/// one reports before the step's time is up), Error when a transfer fails.
/// At most kMostBytesInFlight of sends are in flight (then it waits for them).
void exchange_shared_reads(c10d::ProcessGroup& group, const std::vector<ShareStep>& steps,
                           KeepingPlanner& keeper, LoadPlanner& planner,
                           const std::map<std::string, c10::ScalarType>& dtype_of, std::uint32_t tag_base,
                           std::chrono::milliseconds timeout);
inline constexpr std::uint64_t kMostBytesInFlight = std::uint64_t{256} << 20;

/// A tag base for one load, drawn by the coordinator (see SharedLoadPlan).
std::uint32_t share_tag_base();

}  // namespace ckpt::dcp::detail
