#include "dcp/object_paths.hpp"

#include <ckpt/error.hpp>

#include <fmt/format.h>
#include <boost/json.hpp>

namespace ckpt::dcp::detail {

namespace json = boost::json;

std::string encode_object_paths(const std::map<std::string, ObjectPath>& paths) {
  json::object o;
  for (const auto& [fqn, path] : paths) {
    json::array parts;
    for (const auto& part : path) {
      if (const auto* s = std::get_if<std::string>(&part))
        parts.emplace_back(json::string(*s));
      else
        parts.emplace_back(std::get<std::int64_t>(part));
    }
    o[fqn] = std::move(parts);
  }
  return json::serialize(o);
}

std::map<std::string, ObjectPath> decode_object_paths(std::string_view text) {
  try {
    std::map<std::string, ObjectPath> out;
    const json::value doc = json::parse(text);
    for (const auto& [key, parts] : doc.as_object()) {
      ObjectPath path;
      for (const auto& part : parts.as_array()) {
        if (part.is_string())
          path.emplace_back(std::string(part.as_string()));
        else
          path.emplace_back(part.to_number<std::int64_t>());
      }
      out.emplace(std::string(key), std::move(path));
    }
    return out;
  } catch (const std::exception& e) {
    throw Error(fmt::format("malformed planner data: {}", e.what()));
  }
}

}  // namespace ckpt::dcp::detail
