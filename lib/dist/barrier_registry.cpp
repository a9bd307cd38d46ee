// The barrier registry (upstream's @register_barrier) with the built-in types.
#include <ckpt/barrier.hpp>

#include <ckpt/dist.hpp>
#include <ckpt/tcp_store_barrier.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <map>
#include <mutex>

namespace ckpt {
namespace {

struct Registry {
  std::mutex mutex;
  std::map<std::string, BarrierFactory> factories;

  Registry() {
    // The built-in types, as upstream's @register_barrier classes.
    factories["tcp_store"] = [](const Kwargs& args) {
      return std::make_shared<TCPStoreBarrier>(TCPStoreBarrierOptions::from_args(args));
    };
    factories["dist_barrier"] = [](const Kwargs& args) {
      std::optional<std::chrono::milliseconds> timeout;
      const Arg* t = args.find("timeout");
      if (!t) t = args.find("timeout_secs");
      if (t) timeout = std::chrono::milliseconds(static_cast<std::int64_t>(t->as_double() * 1000.0));
      return std::make_shared<dist::DistBarrier>(dist::default_process_group(), timeout);
    };
  }
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

void register_barrier(const std::string& name, BarrierFactory factory) {
  auto& r = registry();
  std::lock_guard lock(r.mutex);
  r.factories[name] = std::move(factory);
}

std::vector<std::string> registered_barriers() {
  auto& r = registry();
  std::lock_guard lock(r.mutex);
  std::vector<std::string> names;
  for (const auto& [name, f] : r.factories) names.push_back(name);
  return names;
}

std::shared_ptr<Barrier> create_barrier_from_config(const BarrierConfig& config) {
  if (!config.barrier_type) return nullptr;
  BarrierFactory factory;
  {
    auto& r = registry();
    std::lock_guard lock(r.mutex);
    auto it = r.factories.find(*config.barrier_type);
    if (it != r.factories.end()) factory = it->second;
  }
  if (!factory)
    throw Error(fmt::format("Unknown barrier type '{}'; registered types: [{}]", *config.barrier_type,
                            fmt::join(registered_barriers(), ", ")));
  return factory(config.barrier_args);
}

std::shared_ptr<Barrier> create_barrier_from_config(const BarrierConfig& config, const RankInfo& rank_info) {
  BarrierConfig with_rank = config;
  if (!with_rank.barrier_args.contains("global_rank"))
    with_rank.barrier_args.set("global_rank", rank_info.global_rank);
  if (!with_rank.barrier_args.contains("global_world_size"))
    with_rank.barrier_args.set("global_world_size", rank_info.global_world_size);
  return create_barrier_from_config(with_rank);
}

}  // namespace ckpt
