// Keys' paths in a nested state dict, as a save plan carries them to the
// coordinator (its planner data).
#pragma once

#include <ckpt/dcp/metadata.hpp>

#include <map>
#include <string>
#include <string_view>

namespace ckpt::dcp::detail {

std::string encode_object_paths(const std::map<std::string, ObjectPath>& paths);
/// Throws Error "malformed planner data: ..." on bad input.
std::map<std::string, ObjectPath> decode_object_paths(std::string_view text);

}  // namespace ckpt::dcp::detail
