#include "core/failures.hpp"

#include <fmt/format.h>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

namespace json = boost::json;

namespace ckpt::detail {

namespace {

/// Error texts may quote bytes that are not UTF-8 (a damaged file's names):
/// they are written as they are, and must read back.
json::parse_options lenient() {
  json::parse_options o;
  o.allow_invalid_utf8 = true;
  return o;
}

}  // namespace

json::object failure_to_json(const RankFailure& failure) {
  return {{"type", failure.type}, {"message", failure.message}};
}

RankFailure failure_from_json(const json::value& v) {
  const auto& o = v.as_object();
  return {std::string(o.at("type").as_string()), std::string(o.at("message").as_string())};
}

std::string encode_failure(const RankFailure& failure) {
  return json::serialize(failure_to_json(failure));
}

std::optional<RankFailure> decode_failure(std::string_view text) {
  json::error_code ec;
  const json::value v = json::parse(text, ec, {}, lenient());
  if (ec) return std::nullopt;
  try {
    return failure_from_json(v);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

json::array failures_to_json(const std::map<std::int64_t, RankFailure>& failures) {
  json::array a;
  for (const auto& [rank, f] : failures) {
    json::object o = failure_to_json(f);
    o["rank"] = rank;
    a.push_back(std::move(o));
  }
  return a;
}

std::map<std::int64_t, RankFailure> failures_from_json(const json::value& v) {
  std::map<std::int64_t, RankFailure> out;
  for (const auto& f : v.as_array()) out[f.at("rank").to_number<std::int64_t>()] = failure_from_json(f);
  return out;
}

std::string encode_failures(const std::map<std::int64_t, RankFailure>& failures) {
  return json::serialize(failures_to_json(failures));
}

std::map<std::int64_t, RankFailure> decode_failures(std::string_view text) {
  try {
    return failures_from_json(json::parse(text, {}, lenient()));
  } catch (const std::exception& e) {
    throw Error(fmt::format("malformed failures: {}", e.what()));
  }
}

}  // namespace ckpt::detail
