// What both store-backed barriers (TCPStoreBarrier, DistBarrier) share: reading
// who arrived at a round from its store marks, the timeout that names them,
// the coordinator's commit verdict, and their arguments.
#pragma once

#include <ckpt/error.hpp>
#include <ckpt/types.hpp>

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace ckpt::detail {

std::string to_string(const std::vector<std::uint8_t>& v);
std::vector<std::uint8_t> to_bytes(const std::string& s);

/// Whether an error text from c10d says it timed out.
bool mentions_timeout(const std::string& text);

/// The ranks in [0, world) for which `key_of(r)` is not in `store`.
std::vector<std::int64_t> absent_ranks(c10d::Store& store, std::int64_t world,
                                       const std::function<std::string(std::int64_t)>& key_of);

/// Who did not arrive, as the store tells (`missing` gets their number).
std::string who_did_not_arrive(c10d::Store& store, std::int64_t world,
                               const std::function<std::string(std::int64_t)>& key_of,
                               std::size_t* missing = nullptr);

/// Throws Timeout for a barrier that did not complete: names the ranks that did
/// not arrive when the store can still tell.
[[noreturn]] void barrier_timed_out(c10d::Store& store, const std::string& what,
                                    std::chrono::milliseconds timeout, std::int64_t world,
                                    const std::function<std::string(std::int64_t)>& key_of,
                                    const std::string& cause);

/// A barrier argument: an int, or `fallback` when absent.
std::int64_t int_arg(const Kwargs& args, const std::string& name, std::int64_t fallback);
/// A barrier argument in seconds (`name` or `alias`), or `fallback`.
std::chrono::milliseconds seconds_arg(const Kwargs& args, const std::string& name, const std::string& alias,
                                      std::chrono::milliseconds fallback);

/// The commit verdict the coordinator leaves in the store: "ok", or
/// "failed:" and the failure (core/failures.hpp).
std::string commit_verdict(const std::optional<RankFailure>& failure);

/// The commit verdict the coordinator leaves at `key`: nullopt when committed.
std::optional<RankFailure> await_verdict(c10d::Store& store, const std::string& key,
                                         std::chrono::milliseconds timeout);

}  // namespace ckpt::detail
