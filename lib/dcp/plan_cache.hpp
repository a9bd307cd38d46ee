// What save_state_dict keeps between saves for a planner with plan caching
// (DefaultSavePlanner's enable_plan_caching, as upstream's): the plans of the
// last save that succeeded, so that an unchanged plan is neither sent nor
// merged again.
#pragma once

#include <ckpt/dcp/metadata.hpp>
#include <ckpt/dcp/planner.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace ckpt::dcp::detail {

/// What a rank sends in place of a plan it sent before, and what starts the
/// coordinator's answer to a rank whose part of the global plan it sent before
/// (followed by a plan without items that carries the new storage and planner
/// data). A plan itself is a JSON object, so it never starts with it.
inline constexpr char kSamePlan = '=';

struct PlanCache {
  /// Set once a save has succeeded with what follows, for this coordinator
  /// and group size; cleared when a save fails.
  bool valid = false;
  std::int64_t coordinator = -1;
  std::int64_t world = 0;
  // On every rank.
  std::string local;  ///< the local plan it sent, encoded
  SavePlan central;   ///< its part of the global plan, without storage and planner data
  // On the coordinator.
  std::vector<std::string> all;  ///< every rank's local plan, encoded (index = rank)
  std::vector<SavePlan> global;  ///< create_global_plan's plans
  Metadata metadata;             ///< and its metadata
  std::vector<SavePlan> sent;    ///< each rank's part sent, without storage and planner data
};

}  // namespace ckpt::dcp::detail
