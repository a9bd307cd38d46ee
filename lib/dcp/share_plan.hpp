// The share steps of a load whose replicated reads are shared, as the
// coordinator sends them (dcp/shared_reads.hpp has the protocol).
#pragma once

#include <ckpt/dcp/planner.hpp>

#include <cstdint>
#include <vector>

namespace ckpt::dcp::detail {

/// Tags: the coordinator draws a base per load (1 to 511 times
/// kMaxSharedItems) and numbers the items from it, so every tag is below
/// 2^31 (c10d takes an int).
inline constexpr std::uint32_t kMaxSharedItems = 1u << 22;
inline constexpr std::uint32_t kMaxTagBase = 511 * kMaxSharedItems;

/// One rank's part in sharing one item.
struct ShareStep {
  std::uint32_t tag = 0;         ///< the item's place in the coordinator's order
  ReadItem item;                 ///< what this rank loads (the reader: the item of its plan)
  std::int64_t from = -1;        ///< the rank it receives the item from; -1: it reads it
  std::vector<std::int64_t> to;  ///< the ranks it sends it to, in this order
};

/// What the coordinator sends each rank when reads are shared.
struct SharedLoadPlan {
  LoadPlan plan;
  std::vector<ShareStep> steps;  ///< in tag order
  bool any = false;              ///< some rank of the group shares an item
  std::uint32_t tag_base = 0;    ///< added to every tag (drawn per load)
};

}  // namespace ckpt::dcp::detail
