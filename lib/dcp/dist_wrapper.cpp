#include "dcp/dist_wrapper.hpp"

#include <ckpt/error.hpp>

#include "core/text.hpp"
#include "dcp/serialize.hpp"

#include <torch/csrc/distributed/c10d/Types.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <thread>

namespace ckpt::dcp::detail {

using ckpt::detail::first_line;

namespace {

constexpr char kOk = 0;
constexpr char kFailed = 1;

/// Thrown by wait(): a collective that did not complete.
struct CollectiveFailure {
  std::string cause;
};

std::vector<std::uint8_t> bytes_of(const std::string& s) {
  return {s.begin(), s.end()};
}

std::string string_of(const std::vector<std::uint8_t>& v) {
  return {v.begin(), v.end()};
}

at::Tensor byte_tensor(const std::string& s, std::int64_t size) {
  at::Tensor t = at::zeros({std::max<std::int64_t>(size, 1)}, at::kByte);
  if (!s.empty()) std::memcpy(t.data_ptr(), s.data(), s.size());
  return t;
}

std::string string_of(const at::Tensor& t, std::int64_t n) {
  return std::string(static_cast<const char*>(t.data_ptr()), static_cast<std::size_t>(n));
}

/// `map`'s result, or this rank's failure: a status byte, then the body.
std::string wrapped(std::int64_t rank, const std::function<std::string()>& map) {
  try {
    return kOk + map();
  } catch (...) {
    return kFailed +
           encode(std::map<std::int64_t, RankFailure>{{rank, describe_failure(std::current_exception())}});
  }
}

}  // namespace

DistWrapper::DistWrapper(std::shared_ptr<dist::ProcessGroupHandle> group, bool use_dist,
                         std::int64_t coordinator_rank, std::chrono::milliseconds timeout)
    : group_(std::move(group)), use_dist_(use_dist), coordinator_(coordinator_rank), timeout_(timeout) {
  if (!use_dist_) {
    coordinator_ = 0;
    return;
  }
  if (!group_ || !group_->group || !group_->store)
    throw Error("a distributed save or load needs an initialized process group (or no_dist)");
  rank_ = group_->group->getRank();
  world_ = group_->group->getSize();
  if (coordinator_ < 0 || coordinator_ >= world_)
    throw Error(
        fmt::format("coordinator rank {} is not a rank of the group (world size {})", coordinator_, world_));
  call_ = group_->next_sequence("dcp");
  // Marks of two calls ago: every rank has finished the call after it, so
  // nobody reads them any more. (A call runs at most kMostSteps steps: a
  // load's metadata, plan, read and share; a save's plan, a second plan when
  // the coordinator's plan cache cannot serve, and write.)
  constexpr int kMostSteps = 4;
  if (call_ >= 2) {
    try {
      for (int step = 0; step < kMostSteps; ++step) {
        group_->store->deleteKey(fmt::format("ckpt/dcp/{}/{}/done/{}", call_ - 2, step, rank_));
        if (rank_ == 0)
          for (const char* what : {"go", "decided"})
            group_->store->deleteKey(fmt::format("ckpt/dcp/{}/{}/{}", call_ - 2, step, what));
      }
    } catch (const std::exception&) {
      // a store that fails now fails the first step, where it is reported
    }
  }
}

std::string DistWrapper::step_key(const std::string& what) const {
  return fmt::format("ckpt/dcp/{}/{}/{}", call_, step_, what);
}

void DistWrapper::wait(const std::function<c10::intrusive_ptr<c10d::Work>()>& start) {
  bool done = false;
  std::string cause = "the collective did not complete";
  try {
    done = start()->wait(timeout_);
  } catch (const std::exception& e) {
    cause = e.what();
  }
  if (!done) throw CollectiveFailure{cause};
}

bool DistWrapper::await_keys(const std::vector<std::string>& keys) {
  auto& store = *group_->store;
  const auto deadline = step_start_ + timeout_;
  // Polled (a c10d wait that times out leaves the client out of step); the
  // first look is at once, then the pauses double up to 20 ms.
  auto pause = std::chrono::microseconds(100);
  for (;;) {
    if (store.check(keys)) return true;
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return false;
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(pause, deadline - now));
    pause = std::min(pause * 2, std::chrono::microseconds(20000));
  }
}

std::vector<std::string> DistWrapper::gather(const std::string& mine) {
  auto& g = *group_->group;
  const bool root = is_coordinator();
  // The lengths, to the coordinator.
  std::vector<at::Tensor> in{
      at::tensor(std::vector<std::int64_t>{static_cast<std::int64_t>(mine.size())}, at::kLong)};
  std::vector<std::vector<at::Tensor>> out;
  if (root) {
    out.resize(1);
    for (std::int64_t r = 0; r < world_; ++r) out[0].push_back(at::zeros({1}, at::kLong));
  }
  c10d::GatherOptions go;
  go.rootRank = coordinator_;
  wait([&] { return g.gather(out, in, go); });
  // The longest, to everyone (the buffers of a gather are all one size).
  std::vector<std::int64_t> lengths;
  std::int64_t longest = 1;
  if (root)
    for (const auto& t : out[0]) {
      lengths.push_back(t.item<std::int64_t>());
      longest = std::max(longest, lengths.back());
    }
  std::vector<at::Tensor> head{at::tensor(std::vector<std::int64_t>{longest}, at::kLong)};
  c10d::BroadcastOptions bo;
  bo.rootRank = coordinator_;
  wait([&] { return g.broadcast(head, bo); });
  longest = head[0].item<std::int64_t>();
  // The payloads.
  std::vector<at::Tensor> data{byte_tensor(mine, longest)};
  std::vector<std::vector<at::Tensor>> all;
  if (root) {
    all.resize(1);
    for (std::int64_t r = 0; r < world_; ++r) all[0].push_back(at::zeros({longest}, at::kByte));
  }
  wait([&] { return g.gather(all, data, go); });
  std::vector<std::string> result;
  if (root)
    for (std::int64_t r = 0; r < world_; ++r)
      result.push_back(string_of(all[0][static_cast<std::size_t>(r)], lengths[static_cast<std::size_t>(r)]));
  return result;
}

std::string DistWrapper::scatter(const std::vector<std::string>& all) {
  auto& g = *group_->group;
  const bool root = is_coordinator();
  std::int64_t longest = 1;
  for (const auto& s : all) longest = std::max(longest, static_cast<std::int64_t>(s.size()));
  // Each rank's length and the buffer size.
  std::vector<at::Tensor> head{at::zeros({2}, at::kLong)};
  std::vector<std::vector<at::Tensor>> heads;
  if (root) {
    heads.resize(1);
    for (const auto& s : all)
      heads[0].push_back(
          at::tensor(std::vector<std::int64_t>{static_cast<std::int64_t>(s.size()), longest}, at::kLong));
  }
  c10d::ScatterOptions so;
  so.rootRank = coordinator_;
  wait([&] { return g.scatter(head, heads, so); });
  const auto length = head[0][0].item<std::int64_t>();
  longest = head[0][1].item<std::int64_t>();
  std::vector<at::Tensor> mine{at::zeros({longest}, at::kByte)};
  std::vector<std::vector<at::Tensor>> data;
  if (root) {
    data.resize(1);
    for (const auto& s : all) data[0].push_back(byte_tensor(s, longest));
  }
  wait([&] { return g.scatter(mine, data, so); });
  return string_of(mine[0], length);
}

std::string DistWrapper::broadcast(const std::string& value) {
  auto& g = *group_->group;
  c10d::BroadcastOptions bo;
  bo.rootRank = coordinator_;
  std::vector<at::Tensor> head{
      at::tensor(std::vector<std::int64_t>{static_cast<std::int64_t>(value.size())}, at::kLong)};
  wait([&] { return g.broadcast(head, bo); });
  const auto length = head[0].item<std::int64_t>();
  std::vector<at::Tensor> data{byte_tensor(is_coordinator() ? value : std::string(), length)};
  wait([&] { return g.broadcast(data, bo); });
  return string_of(data[0], length);
}

void DistWrapper::collective_failed(const std::string& step, const std::string& cause) {
  // A collective fails fast when a peer's connection closes, while healthy
  // ranks may still be in their step: a rank is named only once the step's
  // time is up and it still has not finished it. The coordinator, whose own
  // part of the step (merging, finish) runs after everyone's mark, is named
  // when it did not mark that part done either.
  auto& store = *group_->store;
  const std::string verdict = step_key("verdict");
  const std::string decided = step_key("decided");
  const auto done_key = [&](std::int64_t r) { return step_key(fmt::format("done/{}", r)); };
  std::vector<std::string> all_done;
  for (std::int64_t r = 0; r < world_; ++r) all_done.push_back(done_key(r));
  const auto deadline = step_start_ + timeout_;
  std::map<std::int64_t, RankFailure> failures;
  try {
    for (;;) {
      if (store.check({verdict})) {
        failures = decode_failures(string_of(store.get(verdict)));
        break;
      }
      if (store.check(all_done) && store.check({decided})) break;  // the transport failed, not a rank
      if (std::chrono::steady_clock::now() >= deadline) {
        for (std::int64_t r = 0; r < world_; ++r)
          if (!store.check({done_key(r)}))
            failures[r] = {"Timeout",
                           fmt::format("rank {} did not finish step '{}' within {} ms: it died or hangs", r,
                                       step, timeout_.count())};
        if (failures.empty() && !store.check({decided}))
          failures[coordinator_] = {
              "Timeout",
              fmt::format("the coordinator (rank {}) did not finish its part of step '{}' within {} ms: "
                          "it died or hangs",
                          coordinator_, step, timeout_.count())};
        if (!failures.empty())  // the first verdict stands: every rank raises the same
          failures = decode_failures(string_of(store.compareSet(verdict, {}, bytes_of(encode(failures)))));
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  } catch (const std::exception& e) {
    store_unreachable(step, e.what());
  }
  if (failures.empty())
    throw CheckpointException(fmt::format("{} (the collective failed after every rank finished the step: {})",
                                          step, first_line(cause)),
                              {});
  throw CheckpointException(step, std::move(failures));
}

void DistWrapper::store_unreachable(const std::string& step, const std::string& cause) {
  throw CheckpointException(
      step, {{0,
              {"Timeout", fmt::format("the group's store (hosted by rank 0) is unreachable at step '{}': {}",
                                      step, first_line(cause))}}});
}

std::string DistWrapper::run_step(
    const std::string& step, const std::function<std::string()>& map,
    const std::function<std::vector<std::string>(std::vector<std::string>)>& reduce, Out out) {
  ++step_;
  const std::string local = wrapped(rank_, map);
  std::string mine;
  if (!use_dist_) {
    mine = local;
    if (mine[0] == kOk) {
      try {
        mine = kOk + reduce({mine.substr(1)}).at(0);
      } catch (...) {
        mine = kFailed +
               encode(std::map<std::int64_t, RankFailure>{{0, describe_failure(std::current_exception())}});
      }
    }
  } else {
    step_start_ = std::chrono::steady_clock::now();
    try {
      group_->store->set(step_key(fmt::format("done/{}", rank_)), bytes_of("1"));
    } catch (const std::exception& e) {
      store_unreachable(step, e.what());
    }
    // Gloo carries only ranks that are ready: the coordinator enters the
    // gather once every rank finished its part ("go"), the others once it
    // said so; they enter the scatter once it decided. So the group's Gloo
    // timeout bounds transfers, and `timeout_` how long ranks wait for each
    // other, however long a step's work (a large write) takes.
    try {
      if (is_coordinator()) {
        std::vector<std::string> all_done;
        for (std::int64_t r = 0; r < world_; ++r) all_done.push_back(step_key(fmt::format("done/{}", r)));
        if (!await_keys(all_done)) collective_failed(step, "not every rank finished the step in time");
        group_->store->set(step_key("go"), bytes_of("1"));
      } else if (!await_keys({step_key("go")})) {
        collective_failed(step, "the coordinator did not start the step's exchange in time");
      }
    } catch (const CheckpointException&) {
      throw;
    } catch (const std::exception& e) {
      store_unreachable(step, e.what());
    }
    try {
      const auto all = gather(local);
      std::vector<std::string> results;
      if (is_coordinator()) {
        std::map<std::int64_t, RankFailure> failures;
        std::vector<std::string> bodies;
        for (std::int64_t r = 0; r < world_; ++r) {
          const auto& s = all[static_cast<std::size_t>(r)];
          if (s.empty() || s[0] != kOk) {
            try {
              for (auto& [rank, f] : decode_failures(s.empty() ? "[]" : s.substr(1))) failures[rank] = f;
            } catch (const std::exception& e) {
              failures[r] = {"Error", fmt::format("its failure report did not decode: {}", e.what())};
            }
            if (s.empty()) failures[r] = {"Error", "an empty payload"};
          }
          bodies.push_back(s.empty() ? std::string() : s.substr(1));
        }
        if (failures.empty()) {
          try {
            results = reduce(std::move(bodies));
            if (results.size() != static_cast<std::size_t>(out == Out::scatter ? world_ : 1))
              throw Error(
                  fmt::format("step '{}' gave {} results for {} ranks", step, results.size(), world_));
            for (auto& r : results) r = kOk + r;
          } catch (...) {
            failures[rank_] = describe_failure(std::current_exception());
          }
        }
        if (!failures.empty())
          results.assign(out == Out::scatter ? static_cast<std::size_t>(world_) : 1,
                         kFailed + encode(failures));
        try {
          group_->store->set(step_key("decided"), bytes_of("1"));
        } catch (const std::exception&) {
          // the scatter below fails too, and is reported
        }
      }
      if (!is_coordinator() && !await_keys({step_key("decided")}))
        collective_failed(step, "the coordinator did not finish its part of the step in time");
      mine = out == Out::scatter ? scatter(results) : broadcast(results.empty() ? std::string() : results[0]);
    } catch (const CollectiveFailure& f) {
      collective_failed(step, f.cause);
    }
  }
  if (mine.empty())
    throw CheckpointException(step, {{rank_, {"Error", "an empty reply from the coordinator"}}});
  if (mine[0] != kOk) throw CheckpointException(step, decode_failures(mine.substr(1)));
  return mine.substr(1);
}

std::string DistWrapper::reduce_scatter(
    const std::string& step, const std::function<std::string()>& map,
    const std::function<std::vector<std::string>(std::vector<std::string>)>& reduce) {
  return run_step(step, map, reduce, Out::scatter);
}

std::string DistWrapper::all_reduce(const std::string& step, const std::function<std::string()>& map,
                                    const std::function<std::string(std::vector<std::string>)>& reduce) {
  return run_step(
      step, map,
      [&](std::vector<std::string> all) { return std::vector<std::string>{reduce(std::move(all))}; },
      Out::broadcast);
}

void DistWrapper::all_gather(const std::string& step, const std::function<void()>& map) {
  run_step(
      step,
      [&] {
        map();
        return std::string();
      },
      [](std::vector<std::string>) { return std::vector<std::string>{std::string()}; }, Out::broadcast);
}

}  // namespace ckpt::dcp::detail
