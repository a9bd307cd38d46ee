#include "dist/store_rounds.hpp"

#include "core/failures.hpp"
#include "core/text.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>

namespace ckpt::detail {

std::string to_string(const std::vector<std::uint8_t>& v) {
  return std::string(v.begin(), v.end());
}
std::vector<std::uint8_t> to_bytes(const std::string& s) {
  return std::vector<std::uint8_t>(s.begin(), s.end());
}

bool mentions_timeout(const std::string& text) {
  std::string lower(text);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  return lower.find("timed out") != std::string::npos || lower.find("timeout") != std::string::npos;
}

/// The ranks in [0, world) for which `key_of(r)` is not in `store`.
std::vector<std::int64_t> absent_ranks(c10d::Store& store, std::int64_t world,
                                       const std::function<std::string(std::int64_t)>& key_of) {
  std::vector<std::int64_t> out;
  for (std::int64_t r = 0; r < world; ++r)
    if (!store.check({key_of(r)})) out.push_back(r);
  return out;
}

/// Who did not arrive, as the store tells (`missing` gets their number).
std::string who_did_not_arrive(c10d::Store& store, std::int64_t world,
                               const std::function<std::string(std::int64_t)>& key_of, std::size_t* missing) {
  try {
    const auto absent = absent_ranks(store, world, key_of);
    if (missing) *missing = absent.size();
    return fmt::format("ranks that did not arrive: [{}] ({} of {} arrived)", fmt::join(absent, ", "),
                       world - static_cast<std::int64_t>(absent.size()), world);
  } catch (const std::exception& e) {
    return fmt::format("the barrier's store cannot tell who arrived ({})", first_line(e.what()));
  }
}

/// Throws Timeout for a barrier that did not complete: names the ranks that did
/// not arrive when the store can still tell.
[[noreturn]] void barrier_timed_out(c10d::Store& store, const std::string& what,
                                    std::chrono::milliseconds timeout, std::int64_t world,
                                    const std::function<std::string(std::int64_t)>& key_of,
                                    const std::string& cause) {
  const std::string who = who_did_not_arrive(store, world, key_of);
  throw Timeout(
      fmt::format("Timed out after {} ms at {}: {} ({})", timeout.count(), what, who, first_line(cause)));
}

std::int64_t int_arg(const Kwargs& args, const std::string& name, std::int64_t fallback) {
  const Arg* a = args.find(name);
  return a ? a->as_int() : fallback;
}

std::chrono::milliseconds seconds_arg(const Kwargs& args, const std::string& name, const std::string& alias,
                                      std::chrono::milliseconds fallback) {
  const Arg* a = args.find(name);
  if (!a) a = args.find(alias);
  if (!a) return fallback;
  return std::chrono::milliseconds(static_cast<std::int64_t>(a->as_double() * 1000.0));
}

/// The commit verdict the coordinator leaves at `key`: nullopt when committed.
std::optional<RankFailure> await_verdict(c10d::Store& store, const std::string& key,
                                         std::chrono::milliseconds timeout) {
  std::string value;
  try {
    store.wait({key}, timeout);
    value = to_string(store.get(key));
  } catch (const std::exception& e) {
    return RankFailure{"Timeout", fmt::format("Timed out after {} ms waiting for rank 0 to commit ({})",
                                              timeout.count(), first_line(e.what()))};
  }
  if (value == "ok") return std::nullopt;
  if (value.rfind("abandoned: ", 0) == 0)
    return RankFailure{"Timeout", "arrived after the other ranks had given up: " + value.substr(11)};
  if (value.rfind("failed:", 0) == 0)
    if (auto failure = decode_failure(std::string_view(value).substr(7))) return failure;
  return RankFailure{"Error", value};
}

std::string commit_verdict(const std::optional<RankFailure>& failure) {
  return failure ? "failed:" + encode_failure(*failure) : "ok";
}

}  // namespace ckpt::detail
