// The one encoding of rank failures (RankFailure, error.hpp), used by every
// path that carries one between processes: the commit barrier's reports, the
// writer child's replies, the store barriers' commit verdicts and DCP's step
// failures. A failure is the JSON object {"type": ..., "message": ...}; a set
// of them is [{"rank": r, "type": ..., "message": ...}, ...].
#pragma once

#include <ckpt/error.hpp>

#include <boost/json/array.hpp>
#include <boost/json/object.hpp>
#include <boost/json/value.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>

namespace ckpt::detail {

boost::json::object failure_to_json(const RankFailure& failure);
/// Throws std::exception (Boost.JSON's) when `v` is not an encoded failure.
RankFailure failure_from_json(const boost::json::value& v);

std::string encode_failure(const RankFailure& failure);
/// The failure `text` encodes; nullopt when it encodes none.
std::optional<RankFailure> decode_failure(std::string_view text);

boost::json::array failures_to_json(const std::map<std::int64_t, RankFailure>& failures);
/// Throws std::exception (Boost.JSON's) when `v` is not an encoded set.
std::map<std::int64_t, RankFailure> failures_from_json(const boost::json::value& v);

std::string encode_failures(const std::map<std::int64_t, RankFailure>& failures);
/// Throws Error "malformed failures: ..." on bad input.
std::map<std::int64_t, RankFailure> decode_failures(std::string_view text);

}  // namespace ckpt::detail
