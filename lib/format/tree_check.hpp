// The structure check both pickle readers make of the tree they built: no
// reference cycles, nesting at most kMaxNesting, and a bounded size once
// shared references are expanded (a few bytes of memo references can describe
// 2^64 values), so that every later walk of the tree may recurse safely.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace ckpt::detail {

/// Deepest nesting of containers a pickle may have.
inline constexpr int kMaxNesting = 1000;

/// `children(n)` lists a node's children; `fail(what)` throws. `node_count`:
/// how many nodes the pickle made.
template <class NodeT, class Children, class Fail>
void check_tree(const NodeT* root, std::size_t node_count, Children children, Fail fail) {
  // Iterative post-order DFS; `expanded` holds each finished node's size as a
  // tree (saturating), `on_path` the nodes of the current path.
  constexpr std::uint64_t kLimit = std::uint64_t{1} << 62;
  std::unordered_map<const NodeT*, std::uint64_t> expanded;
  std::unordered_map<const NodeT*, bool> on_path;
  struct Frame {
    const NodeT* n;
    std::vector<const NodeT*> children;
    std::size_t next;
    std::uint64_t size;
  };
  std::vector<Frame> path;
  path.push_back({root, children(root), 0, 1});
  on_path[root] = true;
  while (!path.empty()) {
    Frame& f = path.back();
    if (f.next == f.children.size()) {
      const std::uint64_t size = f.size;
      on_path[f.n] = false;
      expanded[f.n] = size;
      path.pop_back();
      if (!path.empty()) path.back().size = std::min(kLimit, path.back().size + size);
      continue;
    }
    const NodeT* child = f.children[f.next++];
    if (on_path[child]) fail("the object contains itself (a reference cycle)");
    if (auto it = expanded.find(child); it != expanded.end()) {
      f.size = std::min(kLimit, f.size + it->second);
      continue;
    }
    if (path.size() >= static_cast<std::size_t>(kMaxNesting))
      fail(fmt::format("containers nest deeper than {} levels", kMaxNesting));
    on_path[child] = true;
    path.push_back({child, children(child), 0, 1});
  }
  const std::uint64_t limit = std::max<std::uint64_t>(std::uint64_t{1} << 24, 64 * node_count);
  if (expanded[root] > limit)
    fail(fmt::format("{} values, shared by memo references, expand to over {} values", node_count, limit));
}

}  // namespace ckpt::detail
