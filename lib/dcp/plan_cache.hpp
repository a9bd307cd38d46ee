// What save_state_dict keeps between saves for a planner with plan caching
// (DefaultSavePlanner's enable_plan_caching, as upstream's): the plans of the
// last save that succeeded, so that an unchanged plan is neither sent nor
// merged again.
//
// The messages of the plan step, when the coordinator caches:
//   rank → coordinator: a plan (JSON: starts with '{'), or "=<id>": the plan
//     it sent in the save whose global plan had the id <id>;
//   coordinator → rank: "P<id>\n<plan>" (this rank's part of global plan
//     <id>), "=<id>\n<plan without items>" (the part it had last time, with
//     this save's storage and planner data), or "!": the coordinator cannot
//     serve an "=<id>" (it holds no plans of that id: another group, a
//     restarted coordinator, a save that failed for it alone), and every rank
//     sends its plan again, in full.
// A coordinator without a cache answers with plain plans.
#pragma once

#include <ckpt/dcp/metadata.hpp>
#include <ckpt/dcp/planner.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace ckpt::dcp::detail {

inline constexpr char kSamePlan = '=';
inline constexpr char kFreshPlan = 'P';
inline constexpr char kResend = '!';

struct PlanCache {
  /// Set once a save has succeeded with what follows, for this coordinator
  /// and group size; cleared when a save fails.
  bool valid = false;
  std::int64_t coordinator = -1;
  std::int64_t world = 0;
  /// The global plan's id, drawn at random by the coordinator each time it
  /// plans afresh: an "=<id>" names what it stands for.
  std::uint64_t id = 0;
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
