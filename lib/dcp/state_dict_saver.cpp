#include <ckpt/dcp/state_dict_saver.hpp>

#include <ckpt/error.hpp>
#include <ckpt/types.hpp>

#include "dcp/dist_wrapper.hpp"
#include "dcp/serialize.hpp"

#include <fmt/format.h>

#include <cstdlib>

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

  Metadata global_metadata;
  const std::string central = dist.reduce_scatter(
      "plan",
      [&] {
        planner->set_up_planner(state_dict, dist.is_coordinator());
        storage.set_up_storage_writer(dist.is_coordinator());
        SavePlan local = planner->create_local_plan();
        local = storage.prepare_local_plan(std::move(local));
        return detail::encode(local);
      },
      [&](std::vector<std::string> all) {
        std::vector<SavePlan> plans;
        plans.reserve(all.size());
        for (const auto& s : all) plans.push_back(detail::decode_save_plan(s));
        auto [global_plans, metadata] = planner->create_global_plan(std::move(plans));
        global_plans = storage.prepare_global_plan(std::move(global_plans));
        global_metadata = std::move(metadata);
        std::vector<std::string> out;
        out.reserve(global_plans.size());
        for (const auto& p : global_plans) out.push_back(detail::encode(p));
        return out;
      });

  dist.all_reduce(
      "write",
      [&] {
        SavePlan plan = planner->finish_plan(detail::decode_save_plan(central));
        return detail::encode(storage.write_data(plan, *planner).get());
      },
      [&](std::vector<std::string> all) {
        std::vector<std::vector<WriteResult>> results;
        results.reserve(all.size());
        for (const auto& s : all) results.push_back(detail::decode_write_results(s));
        storage.finish(global_metadata, results);
        return std::string();
      });
  // The whole metadata stays on the coordinator: sending it to every rank
  // would cost each O(world) bytes. The others compute the global layout of
  // their own keys, which needs no communication.
  if (dist.is_coordinator()) return global_metadata;
  return create_default_local_metadata(state_dict);
}

void load_state_dict(DcpStateDict& state_dict, StorageReader& storage, LoadPlanner* planner,
                     std::shared_ptr<dist::ProcessGroupHandle> group, std::int64_t coordinator_rank,
                     bool no_dist, std::optional<std::chrono::milliseconds> timeout) {
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
  const std::string central = dist.reduce_scatter(
      "plan",
      [&] {
        metadata = share ? detail::decode_metadata_part(part) : storage.read_metadata();
        planner->set_up_planner(state_dict, metadata.metadata, dist.is_coordinator());
        storage.set_up_storage_reader(metadata, dist.is_coordinator());
        LoadPlan local = planner->create_local_plan();
        local = storage.prepare_local_plan(std::move(local));
        return detail::encode(local);
      },
      [&](std::vector<std::string> all) {
        std::vector<LoadPlan> plans;
        plans.reserve(all.size());
        for (const auto& s : all) plans.push_back(detail::decode_load_plan(s));
        plans = planner->create_global_plan(std::move(plans));
        plans = storage.prepare_global_plan(std::move(plans));
        std::vector<std::string> out;
        out.reserve(plans.size());
        for (const auto& p : plans) out.push_back(detail::encode(p));
        return out;
      });

  dist.all_gather("read", [&] {
    LoadPlan plan = planner->finish_plan(detail::decode_load_plan(central));
    storage.read_data(plan, *planner).get();
  });
}

}  // namespace ckpt::dcp
