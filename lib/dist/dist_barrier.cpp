// DistBarrier: the commit barrier over a process group. Reports travel by
// all-gather over the group; arrival marks and the commit phase go through the
// group's store (the same steps as TCPStoreBarrier's, tcp_store_barrier.cpp).
#include <ckpt/dist.hpp>

#include <ckpt/error.hpp>

#include "core/text.hpp"
#include "dist/store_rounds.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

namespace ckpt::dist {

using namespace ckpt::detail;

DistBarrier::DistBarrier(std::shared_ptr<ProcessGroupHandle> group,
                         std::optional<std::chrono::milliseconds> timeout)
    : group_(std::move(group)) {
  if (!group_ || !group_->group)
    throw Error("DistBarrier requires an initialized process group (ckpt::dist::init_process_group)");
  timeout_ = timeout.value_or(group_->timeout);
  prefix_ = fmt::format("ckpt/dist_barrier/{}/", group_->next_sequence("dist_barrier"));
}

// The arrival marks of its last two rounds stay in the store: another rank
// may still be naming who did not arrive from them.
DistBarrier::~DistBarrier() = default;

void DistBarrier::execute_barrier() {
  arrive("", false, false);
}

BarrierOutcome DistBarrier::arrive(const std::string& report, bool failed, bool want_reports) {
  auto& store = *group_->store;
  auto& group = *group_->group;
  const std::int64_t world = group.getSize();
  const std::int64_t rank = group.getRank();
  const std::int64_t seq = sequence_++;
  const std::string k = fmt::format("{}{}", prefix_, seq);
  const auto arrived_key = [&](std::int64_t r) { return fmt::format("{}/arrived/{}", k, r); };
  const std::string what = fmt::format("dist_barrier #{} (rank {} of {})", seq, rank, world);
  const std::chrono::milliseconds timeout = limit_ ? std::min(*limit_, timeout_) : timeout_;
  round_.clear();
  store.set(arrived_key(rank), to_bytes("1"));
  if (seq >= 2) store.deleteKey(fmt::format("{}{}/arrived/{}", prefix_, seq - 2, rank));

  const auto run = [&](const c10::intrusive_ptr<c10d::Work>& work) {
    bool done = false;
    std::string cause = "the collective did not complete";
    try {
      done = work->wait(timeout);
    } catch (const std::exception& e) {
      cause = e.what();
    }
    if (done) return;
    try {  // the round is abandoned: a rank that comes late must not commit
      if (to_string(store.compareSet(k + "/verdict", {}, to_bytes("abandoned"))) == "abandoned")
        store.compareSet(k + "/done", {}, to_bytes("abandoned: " + what + " timed out"));
    } catch (const std::exception&) {
    }
    barrier_timed_out(store, what, timeout, world, arrived_key, cause);
  };
  const auto all_gather = [&](const at::Tensor& mine) {
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (std::int64_t r = 0; r < world; ++r) outputs[0].push_back(at::empty_like(mine));
    std::vector<at::Tensor> inputs{mine};
    run(group.allgather(outputs, inputs));
    return outputs[0];
  };

  // Who failed, how long the reports are, whether anyone wants them.
  const auto head = all_gather(
      at::tensor(std::vector<std::int64_t>{failed ? 1 : 0, static_cast<std::int64_t>(report.size()),
                                           want_reports ? 1 : 0},
                 at::kLong));
  bool any_failed = false;
  bool any_want = false;
  std::int64_t longest = 1;
  for (const auto& h : head) {
    any_failed |= h[0].item<std::int64_t>() != 0;
    longest = std::max(longest, h[1].item<std::int64_t>());
    any_want |= h[2].item<std::int64_t>() != 0;
  }
  BarrierOutcome out;
  out.exchanged = true;
  if (any_failed || any_want) {
    auto mine = at::zeros({longest}, at::kByte);
    std::memcpy(mine.data_ptr(), report.data(), report.size());
    const auto all = all_gather(mine);
    for (std::int64_t r = 0; r < world; ++r) {
      const auto n = static_cast<std::size_t>(head[static_cast<std::size_t>(r)][1].item<std::int64_t>());
      std::string text(reinterpret_cast<const char*>(all[static_cast<std::size_t>(r)].data_ptr()), n);
      if (head[static_cast<std::size_t>(r)][0].item<std::int64_t>() != 0) out.failures[r] = text;
      if (want_reports) out.reports.push_back(std::move(text));
    }
  }
  round_ = k;
  return out;
}

bool DistBarrier::begin_commit() {
  if (round_.empty()) return false;
  return to_string(group_->store->compareSet(round_ + "/verdict", {}, to_bytes("commit"))) == "commit";
}

void DistBarrier::end_commit(const std::optional<RankFailure>& failure) {
  if (round_.empty()) return;
  try {
    group_->store->set(round_ + "/done", to_bytes(commit_verdict(failure)));
  } catch (const std::exception&) {
    // the others time out waiting for the verdict
  }
}

std::optional<RankFailure> DistBarrier::await_commit() {
  if (round_.empty()) return RankFailure{"Error", "no barrier round to await"};
  return await_verdict(*group_->store, round_ + "/done", limit_ ? std::min(*limit_, timeout_) : timeout_);
}

}  // namespace ckpt::dist
