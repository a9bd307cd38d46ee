// The element count of a tensor or chunk of the given sizes.
#pragma once

#include <cstdint>
#include <vector>

namespace ckpt::dcp::detail {

inline std::int64_t volume(const std::vector<std::int64_t>& sizes) {
  std::int64_t n = 1;
  for (auto s : sizes) n *= s;
  return n;
}

}  // namespace ckpt::dcp::detail
