#include "dcp/shared_reads.hpp"

#include "dcp/serialize.hpp"

#include <ckpt/error.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <random>
#include <tuple>

#include <unistd.h>

namespace ckpt::dcp::detail {

namespace {

/// What makes two ranks' items the same read: the saved chunk, and the
/// region of it.
using ReadKey =
    std::tuple<std::string, std::vector<std::int64_t>, std::vector<std::int64_t>, std::vector<std::int64_t>>;

ReadKey key_of(const ReadItem& item) {
  return {item.storage_index.fqn, item.storage_index.offset.value_or(std::vector<std::int64_t>{}),
          item.storage_offsets, item.lengths};
}

std::uint64_t elements_of(const ReadItem& item) {
  std::uint64_t n = 1;
  for (auto l : item.lengths) n *= static_cast<std::uint64_t>(std::max<std::int64_t>(l, 0));
  return n;
}

/// Edges of a binomial tree over `order` (order[0] its root): child → parent
/// position, and each position's children in the order it serves them (the
/// biggest subtree first).
void binomial(const std::vector<std::int64_t>& order, std::map<std::int64_t, std::int64_t>& from,
              std::map<std::int64_t, std::vector<std::int64_t>>& to) {
  const std::size_t n = order.size();
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t step = 1; i + step < n; step <<= 1) {
      if (step <= i) continue;  // i holds the item only from round log2(i) on
      from[order[i + step]] = order[i];
      to[order[i]].push_back(order[i + step]);
    }
}

}  // namespace

std::uint32_t share_tag_base() {
  static thread_local std::mt19937 draw{std::random_device{}()};
  return std::uniform_int_distribution<std::uint32_t>(1, 511)(draw) * kMaxSharedItems;
}

std::string host_id() {
  if (const char* node = std::getenv("GROUP_RANK"); node && *node) return fmt::format("node {}", node);
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "host ?";
  return fmt::format("host {}", name);
}

std::vector<std::vector<ShareStep>> share_replicated_reads(std::vector<LoadPlan>& plans,
                                                           const std::vector<std::string>& hosts,
                                                           bool once_in_all) {
  const std::size_t world = plans.size();
  std::vector<std::vector<ShareStep>> steps(world);
  if (world < 2) return steps;
  if (hosts.size() != world) throw Error("share_replicated_reads: a host for every rank's plan is needed");

  // Every tensor item by what it reads: the ranks that plan it (each once)
  // and where it sits in their plans.
  struct Holder {
    std::int64_t rank;
    std::size_t position;
  };
  std::map<ReadKey, std::vector<Holder>> holders;
  for (std::size_t r = 0; r < world; ++r)
    for (std::size_t i = 0; i < plans[r].items.size(); ++i) {
      const ReadItem& item = plans[r].items[i];
      if (item.type != LoadItemType::tensor) continue;
      auto& list = holders[key_of(item)];
      if (list.empty() || list.back().rank != static_cast<std::int64_t>(r))
        list.push_back({static_cast<std::int64_t>(r), i});
    }

  // The groups that share one read: per host, or all the holders.
  struct Group {
    std::vector<Holder> members;
    std::uint64_t elements;
  };
  std::vector<Group> groups;
  std::vector<std::uint64_t> load(world, 0);  // elements each rank reads itself
  for (const auto& entry : holders) {
    const std::vector<Holder>& list = entry.second;
    const std::uint64_t n = elements_of(plans[list.front().rank].items[list.front().position]);
    if (once_in_all) {
      if (list.size() > 1) {
        groups.push_back({list, n});
        continue;
      }
    } else {
      std::map<std::string, std::vector<Holder>> by_host;
      for (const auto& h : list) by_host[hosts[h.rank]].push_back(h);
      for (auto& [host, members] : by_host) {
        if (members.size() > 1)
          groups.push_back({std::move(members), n});
        else
          load[members.front().rank] += n;
      }
      continue;
    }
    load[list.front().rank] += n;
  }
  if (groups.size() > kMaxSharedItems) groups.resize(kMaxSharedItems);  // the rest is read by every rank

  // Readers: biggest items first, each to the member with the least to read.
  std::vector<std::size_t> by_size(groups.size());
  std::iota(by_size.begin(), by_size.end(), std::size_t{0});
  std::stable_sort(by_size.begin(), by_size.end(),
                   [&](std::size_t a, std::size_t b) { return groups[a].elements > groups[b].elements; });
  std::vector<std::int64_t> reader(groups.size());
  for (const std::size_t g : by_size) {
    std::int64_t best = groups[g].members.front().rank;
    for (const auto& h : groups[g].members)
      if (load[h.rank] < load[best]) best = h.rank;
    reader[g] = best;
    load[best] += groups[g].elements;
  }

  std::vector<std::vector<bool>> taken(world);
  for (std::size_t r = 0; r < world; ++r) taken[r].assign(plans[r].items.size(), false);
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const Group& group = groups[g];
    // The tree: the reader, then the first member of every other host (the
    // host's leader), across hosts; then within each host from its leader.
    std::map<std::string, std::vector<std::int64_t>> by_host;
    const std::string& reader_host = hosts[reader[g]];
    by_host[reader_host].push_back(reader[g]);
    for (const auto& h : group.members)
      if (h.rank != reader[g]) by_host[hosts[h.rank]].push_back(h.rank);
    std::vector<std::int64_t> leaders{reader[g]};
    for (const auto& [host, ranks] : by_host)
      if (host != reader_host) leaders.push_back(ranks.front());
    std::map<std::int64_t, std::int64_t> from;
    std::map<std::int64_t, std::vector<std::int64_t>> to;
    binomial(leaders, from, to);
    for (const auto& [host, ranks] : by_host) binomial(ranks, from, to);

    for (const auto& h : group.members) {
      ShareStep step;
      step.tag = static_cast<std::uint32_t>(g);
      step.item = plans[h.rank].items[h.position];
      if (const auto it = from.find(h.rank); it != from.end()) {
        step.from = it->second;
        taken[h.rank][h.position] = true;
      }
      if (const auto it = to.find(h.rank); it != to.end()) step.to = it->second;
      steps[h.rank].push_back(std::move(step));
    }
  }
  for (std::size_t r = 0; r < world; ++r) {
    std::vector<ReadItem> kept;
    kept.reserve(plans[r].items.size());
    for (std::size_t i = 0; i < plans[r].items.size(); ++i)
      if (!taken[r][i]) kept.push_back(std::move(plans[r].items[i]));
    plans[r].items = std::move(kept);
  }
  return steps;
}

KeepingPlanner::KeepingPlanner(LoadPlanner& inner, const std::vector<ShareStep>& steps) : inner_(inner) {
  for (const auto& s : steps)
    if (s.from < 0) tags_.emplace(encode(s.item), s.tag);
}

void KeepingPlanner::commit_tensor(const ReadItem& item, const at::Tensor& tensor) {
  inner_.commit_tensor(item, tensor);
  if (tags_.empty()) return;
  if (const auto it = tags_.find(encode(item)); it != tags_.end()) kept_[it->second] = tensor;
}

at::Tensor KeepingPlanner::take(std::uint32_t tag) {
  const auto it = kept_.find(tag);
  if (it == kept_.end()) return {};
  at::Tensor t = std::move(it->second);
  kept_.erase(it);
  return t;
}

void exchange_shared_reads(c10d::ProcessGroup& group, const std::vector<ShareStep>& steps,
                           KeepingPlanner& keeper, LoadPlanner& planner,
                           const std::map<std::string, c10::ScalarType>& dtype_of, std::uint32_t tag_base,
                           std::chrono::milliseconds timeout) {
  struct Send {
    c10::intrusive_ptr<c10d::Work> work;
    std::vector<at::Tensor> tensors;  // alive until the send completes
    std::string what;
  };
  std::vector<Send> sends;
  std::uint64_t sending = 0;  // bytes of the sends not yet waited for
  // Half the load's timeout: a rank left waiting for a dead one gives up
  // (and reports) well before the others name the dead one.
  const auto deadline = std::chrono::steady_clock::now() + timeout / 2;
  const auto await = [&](c10d::Work& work, const std::string& what) {
    const auto left = std::max(
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()),
        std::chrono::milliseconds(1));
    bool done = false;
    try {
      done = work.wait(left);
    } catch (const std::exception& e) {
      throw Error(fmt::format("{} failed: {}", what, e.what()));
    }
    if (!done)
      throw Timeout(fmt::format("{} did not complete within half the load's timeout ({} ms)", what,
                                timeout.count() / 2));
  };
  const auto drain = [&] {
    for (auto& s : sends) await(*s.work, s.what);
    sends.clear();
    sending = 0;
  };

  // A fault of this rank's own (a planner's tensor that does not fit, an item
  // its reader did not commit) must not leave the others waiting: the walk
  // goes on with scratch memory, passing on what it receives (or zeros), and
  // the first fault is raised at the end. Only a peer that is gone or stuck
  // stops it.
  std::exception_ptr fault;
  const auto note = [&](std::exception_ptr e) {
    if (!fault) fault = std::move(e);
  };
  for (const ShareStep& step : steps) {
    const std::string name = item_name(step.item.storage_index);
    const auto dtype = dtype_of.find(step.item.storage_index.fqn);
    const auto scratch = [&] {
      return at::zeros(step.item.lengths,
                       at::TensorOptions().dtype(dtype == dtype_of.end() ? at::kByte : dtype->second));
    };
    if (dtype == dtype_of.end())
      note(std::make_exception_ptr(
          Error(fmt::format("shared read of '{}': the checkpoint's metadata does not name it", name))));
    at::Tensor source;
    if (step.from < 0) {
      source = keeper.take(step.tag);
      if (!source.defined()) {
        note(std::make_exception_ptr(
            Error(fmt::format("shared read of '{}': this rank was to read it, but its storage reader "
                              "committed no such item",
                              name))));
        source = scratch();
      }
    } else {
      at::Tensor dest;
      try {
        dest = planner.resolve_tensor(step.item);
        if (dtype != dtype_of.end() && (!dest.device().is_cpu() || dest.sizes().vec() != step.item.lengths ||
                                        dest.scalar_type() != dtype->second))
          throw Mismatch(fmt::format(
              "resolve_tensor for '{}' gave a {} {} tensor on {}, not {} {} on the CPU",
              step.item.dest_index.fqn, c10::toString(dest.scalar_type()), fmt::join(dest.sizes(), "x"),
              dest.device().str(), c10::toString(dtype->second), fmt::join(step.item.lengths, "x")));
      } catch (...) {
        note(std::current_exception());
        dest = at::Tensor();
      }
      at::Tensor buffer = dest.defined() && dest.is_contiguous() ? dest : scratch();
      if (buffer.numel() > 0) {
        std::vector<at::Tensor> in{buffer};
        const auto work = group.recv(in, static_cast<int>(step.from), static_cast<int>(tag_base + step.tag));
        await(*work, fmt::format("receiving '{}' from rank {}", name, step.from));
      }
      if (dest.defined() && !fault) {
        try {
          if (!buffer.is_same(dest)) dest.copy_(buffer);
          planner.commit_tensor(step.item, dest);
        } catch (...) {
          note(std::current_exception());
        }
      }
      source = buffer;
    }
    if (dtype != dtype_of.end() &&
        (source.scalar_type() != dtype->second || source.sizes().vec() != step.item.lengths)) {
      note(std::make_exception_ptr(
          Mismatch(fmt::format("shared read of '{}': the tensor to send is {} {}, not {} {}", name,
                               c10::toString(source.scalar_type()), fmt::join(source.sizes(), "x"),
                               c10::toString(dtype->second), fmt::join(step.item.lengths, "x")))));
      source = scratch();
    }
    if (source.numel() == 0 || step.to.empty()) continue;
    source = source.contiguous();
    for (const auto to : step.to) {
      Send s{{}, {source}, fmt::format("sending '{}' to rank {}", name, to)};
      s.work = group.send(s.tensors, static_cast<int>(to), static_cast<int>(tag_base + step.tag));
      sends.push_back(std::move(s));
    }
    // Bounded memory in flight: the sends of this item and those before it
    // complete without this rank's later steps (every rank walks in tag
    // order), so waiting for them here cannot deadlock.
    sending += source.nbytes() * step.to.size();
    if (sending >= kMostBytesInFlight) drain();
  }
  drain();
  if (fault) std::rethrow_exception(fault);
}

}  // namespace ckpt::dcp::detail
