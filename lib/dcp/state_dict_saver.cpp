#include <ckpt/dcp/state_dict_saver.hpp>

#include <ckpt/error.hpp>
#include <ckpt/types.hpp>

#include "dcp/dist_wrapper.hpp"
#include "dcp/plan_cache.hpp"
#include "dcp/serialize.hpp"
#include "dcp/shared_reads.hpp"

#include <fmt/format.h>

#include <cstdlib>
#include <random>
#include <tuple>

namespace ckpt::dcp {

namespace {

/// The group to use, or null for no_dist (resolving upstream's defaults).
std::shared_ptr<dist::ProcessGroupHandle> resolve_group(std::shared_ptr<dist::ProcessGroupHandle> group,
                                                        bool& no_dist, const char* what) {
  if (no_dist) return nullptr;
  if (!group) group = dist::default_process_group();
  if (group) return group;
  const char* world = std::getenv("WORLD_SIZE");
  if (world && std::atoll(world) > 1)
    throw Error(
        fmt::format("{}: WORLD_SIZE is {} but no process group was initialized "
                    "(ckpt::dist::init_process_group, or pass no_dist to {} alone)",
                    what, world, what));
  no_dist = true;
  return nullptr;
}

std::chrono::milliseconds timeout_of(const std::shared_ptr<dist::ProcessGroupHandle>& group,
                                     std::optional<std::chrono::milliseconds> timeout) {
  if (timeout) return *timeout;
  return group ? group->timeout : std::chrono::milliseconds(std::chrono::minutes(30));
}

}  // namespace

Metadata save_state_dict(const DcpStateDict& state_dict, StorageWriter& storage, SavePlanner* planner,
                         std::shared_ptr<dist::ProcessGroupHandle> group, std::int64_t coordinator_rank,
                         bool no_dist, std::optional<std::chrono::milliseconds> timeout) {
  group = resolve_group(std::move(group), no_dist, "save_state_dict");
  DefaultSavePlanner default_planner;
  if (!planner) planner = &default_planner;
  detail::DistWrapper dist(group, !no_dist, coordinator_rank, timeout_of(group, timeout));

  // With plan caching, what the last successful save planned (for this
  // coordinator and group size) stands in for plans that did not change; what
  // this save plans goes into `next`, which replaces the cache once the save
  // has succeeded everywhere.
  std::shared_ptr<detail::PlanCache>* slot = planner->plan_cache();
  if (slot && !*slot) *slot = std::make_shared<detail::PlanCache>();
  detail::PlanCache* cache = slot ? slot->get() : nullptr;
  const bool cached =
      cache && cache->valid && cache->coordinator == coordinator_rank && cache->world == dist.world();
  detail::PlanCache next;
  const auto same_items = [](const SavePlan& a, const SavePlan& b) {
    if (a.items.size() != b.items.size()) return false;
    for (std::size_t i = 0; i < a.items.size(); ++i) {
      const WriteItem &x = a.items[i], &y = b.items[i];
      if (x.index != y.index || x.index.index != y.index.index || x.type != y.type ||
          x.tensor_data != y.tensor_data)
        return false;
    }
    return true;
  };
  const auto bare = [](SavePlan plan) {  // a plan without what changes every save
    plan.storage_data.clear();
    plan.planner_data.clear();
    return plan;
  };

  try {
    Metadata global_metadata;
    std::string local_text;  // this rank's local plan, encoded (made in the first plan step)
    const auto plan_step = [&](bool use_cache) {
      return dist.reduce_scatter(
          use_cache ? "plan" : "plan (sent again in full)",
          [&] {
            if (local_text.empty()) {
              planner->set_up_planner(state_dict, dist.is_coordinator());
              storage.set_up_storage_writer(dist.is_coordinator());
              SavePlan local = planner->create_local_plan();
              local = storage.prepare_local_plan(std::move(local));
              local_text = detail::encode(local);
            }
            next.local = local_text;
            if (use_cache && cached && local_text == cache->local)
              return detail::kSamePlan + std::to_string(cache->id);
            return local_text;
          },
          [&](std::vector<std::string> all) {
            bool unchanged = cache != nullptr;
            std::vector<bool> same(all.size(), false);  // ranks that hold the plans of cache->id
            for (std::size_t r = 0; r < all.size(); ++r) {
              if (all[r].empty() || all[r][0] != detail::kSamePlan) {
                unchanged = false;
                continue;
              }
              if (!cached || r >= cache->all.size() || all[r].substr(1) != std::to_string(cache->id))
                return std::vector<std::string>(all.size(), std::string(1, detail::kResend));
              same[r] = true;
              all[r] = cache->all[r];
            }
            std::vector<SavePlan> global_plans;
            if (unchanged) {
              // No rank's plan changed: the global plan and metadata are what
              // merging and validating them gave last time.
              global_plans = cache->global;
              global_metadata = cache->metadata;
              next.id = cache->id;
            } else {
              std::vector<SavePlan> plans;
              plans.reserve(all.size());
              for (const auto& text : all) plans.push_back(detail::decode_save_plan(text));
              std::tie(global_plans, global_metadata) = planner->create_global_plan(std::move(plans));
              if (cache) {
                static thread_local std::mt19937_64 draw{std::random_device{}()};
                next.id = draw();
              }
            }
            if (cache) {
              next.all = std::move(all);
              next.global = global_plans;
              next.metadata = global_metadata;
            }
            global_plans = storage.prepare_global_plan(std::move(global_plans));
            std::vector<std::string> out;
            out.reserve(global_plans.size());
            const std::string id = std::to_string(next.id) + "\n";
            for (std::size_t r = 0; r < global_plans.size(); ++r) {
              const SavePlan& p = global_plans[r];
              if (!cache) {
                out.push_back(detail::encode(p));
                continue;
              }
              next.sent.push_back(bare(p));
              if (same[r] && r < cache->sent.size() && same_items(p, cache->sent[r]))
                out.push_back(detail::kSamePlan + id +
                              detail::encode(SavePlan{{}, p.storage_data, p.planner_data}));
              else
                out.push_back(detail::kFreshPlan + id + detail::encode(p));
            }
            return out;
          });
    };
    std::string central = plan_step(true);
    if (central == std::string(1, detail::kResend)) central = plan_step(false);

    dist.all_reduce(
        "write",
        [&] {
          SavePlan received;
          std::string_view text = central;
          const char kind = text.empty() ? '{' : text[0];
          if (kind == detail::kSamePlan || kind == detail::kFreshPlan) {
            const auto end = text.find('\n');
            if (end == std::string_view::npos) throw Error("malformed plan from the coordinator");
            next.id = std::stoull(std::string(text.substr(1, end - 1)));
            text = text.substr(end + 1);
          }
          if (kind == detail::kSamePlan) {
            // The part of the global plan this rank had last time (the
            // coordinator sends this only to a rank that said it holds it),
            // with this save's storage and planner data.
            if (!cached) throw Error("the coordinator sent this rank's plan as unchanged, but it holds none");
            const SavePlan fresh = detail::decode_save_plan(text);
            received = cache->central;
            received.storage_data = fresh.storage_data;
            received.planner_data = fresh.planner_data;
          } else {
            received = detail::decode_save_plan(text);
          }
          if (cache) next.central = bare(received);
          SavePlan plan = planner->finish_plan(std::move(received));
          return detail::encode(storage.write_data(plan, *planner).get());
        },
        [&](std::vector<std::string> all) {
          std::vector<std::vector<WriteResult>> results;
          results.reserve(all.size());
          for (const auto& s : all) results.push_back(detail::decode_write_results(s));
          storage.finish(global_metadata, results);
          return std::string();
        });
    if (cache) {
      next.valid = true;
      next.coordinator = coordinator_rank;
      next.world = dist.world();
      *cache = std::move(next);
    }
    // The whole metadata stays on the coordinator: sending it to every rank
    // would cost each O(world) bytes. The others compute the global layout of
    // their own keys, which needs no communication.
    if (dist.is_coordinator()) return global_metadata;
  } catch (...) {
    // A failed save leaves no plan behind: every rank raised the same error,
    // so every rank starts the next save from scratch.
    if (cache) cache->valid = false;
    throw;
  }
  return create_default_local_metadata(state_dict);
}

void load_state_dict(DcpStateDict& state_dict, StorageReader& storage, LoadPlanner* planner,
                     std::shared_ptr<dist::ProcessGroupHandle> group, std::int64_t coordinator_rank,
                     bool no_dist, std::optional<std::chrono::milliseconds> timeout,
                     ReplicatedReads replicated_reads) {
  group = resolve_group(std::move(group), no_dist, "load_state_dict");
  DefaultLoadPlanner default_planner;
  if (!planner) planner = &default_planner;
  detail::DistWrapper dist(group, !no_dist, coordinator_rank, timeout_of(group, timeout));

  CheckpointMetadata metadata;  // the planner refers to it until the load ends
  // Where the reader allows it and there are other ranks, the coordinator
  // alone reads the metadata and sends each rank the part its planner asks
  // for (O(its items) per rank); else every rank reads it, as upstream's
  // readers expect.
  const bool share = !no_dist && dist.world() > 1 && storage.shares_metadata();
  std::string part;
  if (share)
    part = dist.reduce_scatter(
        "metadata",
        [&] {
          const auto request = planner->metadata_request(state_dict);
          return request ? detail::encode(*request) : std::string();  // empty: all of it
        },
        [&](std::vector<std::string> requests) {
          const CheckpointMetadata whole = storage.read_metadata();
          std::vector<MetadataRequest> asked;
          for (const auto& r : requests)
            if (!r.empty()) asked.push_back(detail::decode_metadata_request(r));
          std::vector<CheckpointMetadata> cut = metadata_parts(whole, asked);
          std::string all;  // encoded once, for every rank that asks for all
          std::vector<std::string> parts;
          parts.reserve(requests.size());
          std::size_t next = 0;
          for (const auto& r : requests) {
            if (!r.empty()) {
              parts.push_back(detail::encode_metadata_part(cut[next++]));
              continue;
            }
            if (all.empty()) all = detail::encode_metadata_part(whole);
            parts.push_back(all);
          }
          return parts;
        });
  // Replicated reads shared (dcp/shared_reads.hpp): each rank's host
  // travels with its plan, and each rank gets its share steps with its part.
  const bool sharing = !no_dist && dist.world() > 1 && replicated_reads != ReplicatedReads::every_rank;
  const std::string central = dist.reduce_scatter(
      "plan",
      [&] {
        metadata = share ? detail::decode_metadata_part(part) : storage.read_metadata();
        planner->set_up_planner(state_dict, metadata.metadata, dist.is_coordinator());
        storage.set_up_storage_reader(metadata, dist.is_coordinator());
        LoadPlan local = planner->create_local_plan();
        local = storage.prepare_local_plan(std::move(local));
        std::string text = detail::encode(local);
        return sharing ? detail::host_id() + '\n' + text : text;
      },
      [&](std::vector<std::string> all) {
        std::vector<LoadPlan> plans;
        std::vector<std::string> hosts;
        plans.reserve(all.size());
        for (const auto& s : all) {
          std::string_view text = s;
          if (sharing) {
            const auto end = text.find('\n');
            if (end == std::string_view::npos) throw Error("malformed plan: no host");
            hosts.emplace_back(text.substr(0, end));
            text = text.substr(end + 1);
          }
          plans.push_back(detail::decode_load_plan(text));
        }
        plans = planner->create_global_plan(std::move(plans));
        plans = storage.prepare_global_plan(std::move(plans));
        std::vector<std::string> out;
        out.reserve(plans.size());
        if (!sharing) {
          for (const auto& p : plans) out.push_back(detail::encode(p));
          return out;
        }
        auto steps = detail::share_replicated_reads(plans, hosts, replicated_reads == ReplicatedReads::once);
        bool any = false;
        for (const auto& s : steps) any = any || !s.empty();
        const std::uint32_t tag_base = detail::share_tag_base();
        for (std::size_t r = 0; r < plans.size(); ++r)
          out.push_back(detail::encode(
              detail::SharedLoadPlan{std::move(plans[r]), std::move(steps[r]), any, tag_base}));
        return out;
      });

  detail::SharedLoadPlan received;
  std::unique_ptr<detail::KeepingPlanner> keeper;
  dist.all_gather("read", [&] {
    if (sharing)
      received = detail::decode_shared_load_plan(central);
    else
      received.plan = detail::decode_load_plan(central);
    LoadPlan plan = planner->finish_plan(std::move(received.plan));
    keeper = std::make_unique<detail::KeepingPlanner>(*planner, received.steps);
    storage.read_data(plan, *keeper).get();
  });
  if (!received.any) return;

  // Every rank has read its items: the shared ones go from their readers to
  // the ranks that load them too.
  dist.all_gather("share", [&] {
    std::map<std::string, c10::ScalarType> dtypes;
    for (const auto& step : received.steps) {
      const auto& fqn = step.item.storage_index.fqn;
      const auto it = metadata.metadata.state_dict_metadata.find(fqn);
      if (it == metadata.metadata.state_dict_metadata.end()) continue;
      if (const auto* t = std::get_if<TensorStorageMetadata>(&it->second))
        dtypes.emplace(fqn, t->properties.dtype);
    }
    detail::exchange_shared_reads(*group->group, received.steps, *keeper, *planner, dtypes, received.tag_base,
                                  timeout_of(group, timeout));
  });
}

}  // namespace ckpt::dcp
