// TCPStoreBarrier: the commit barrier over a store (TCPStoreBarrier::arrive), for the save with
// key prefix K = <barrier_prefix>/<round name> (set_round: CheckpointWriter names rounds by
// checkpoint) or, without a name, K = <barrier_prefix><seq> (the count of calls):
//   1. set `rank<r>` = seq (upstream's key), `K/report/<r>` = the report and,
//      for a rank that failed, `K/failed/<r>` and add 1 to `K/failed`;
//   2. add 1 to `K/num_members`; the rank that brings it to the world size sets
//      `K/last_member` (upstream's elastic store barrier);
//   3. wait for `K/last_member` up to the timeout; past it, the ranks without a
//      `K/report/<r>` are the ones that did not arrive (Timeout names them),
//      and the round is abandoned: `K/verdict` is set to "abandoned" unless
//      the coordinator set it to "commit" first (then all had arrived);
//   4. read `K/failed` (one key: O(1) per rank); when nonzero, every rank reads
//      who failed and why; the coordinator reads every report (O(N) there);
//   5. delete this rank's keys of the round two before this one (every rank
//      has passed the one before, so nobody reads them any more); rank 0
//      deletes the counters;
//   6. the commit phase: the coordinator claims `K/verdict` = "commit" (false
//      when a rank abandoned the round: no marker), writes the marker, and sets
//      `K/done` ("ok" or the error); the others wait for `K/done`. A rank that
//      arrives after the others gave up passes the barrier alone but reads
//      "abandoned" there, and fails.
#include <ckpt/dist.hpp>
#include <ckpt/tcp_store_barrier.hpp>

#include <ckpt/error.hpp>

#include "core/text.hpp"
#include "dist/store_rounds.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <optional>
#include <utility>

namespace ckpt {

using namespace detail;

TCPStoreBarrierOptions TCPStoreBarrierOptions::from_args(const Kwargs& args) {
  TCPStoreBarrierOptions o;
  try {
    const RankInfo env = (args.contains("global_rank") && args.contains("global_world_size"))
                             ? RankInfo{}
                             : rank_info_from_env();
    o.global_rank = int_arg(args, "global_rank", env.global_rank);
    o.global_world_size = int_arg(args, "global_world_size", env.global_world_size);
    if (const Arg* a = args.find("barrier_prefix")) o.barrier_prefix = a->as_string();
    o.timeout_barrier_init =
        seconds_arg(args, "timeout_barrier_init", "timeout_barrier_init_secs", o.timeout_barrier_init);
    const Arg* port = args.find("tcpstore_port");
    if (!port) throw Error("missing argument 'tcpstore_port'");
    const std::int64_t p = port->as_int();
    if (p < 1 || p > 65535) throw Error(fmt::format("tcpstore_port {} is not a port number", p));
    o.tcpstore_port = static_cast<std::uint16_t>(p);
    if (const Arg* a = args.find("master_address")) o.master_address = a->as_string();
    o.timeout = seconds_arg(args, "timeout", "timeout_secs", o.timeout);
    if (const Arg* a = args.find("host_store")) o.host_store = a->as_bool();
  } catch (const Error& e) {
    throw Error(fmt::format("tcp_store barrier: {}", e.what()));
  }
  if (o.global_world_size < 1 || o.global_rank < 0 || o.global_rank >= o.global_world_size)
    throw Error(fmt::format("tcp_store barrier: rank {} is not in a world of {}", o.global_rank,
                            o.global_world_size));
  return o;
}

struct TCPStoreBarrier::Impl {
  TCPStoreBarrierOptions options;
  c10::intrusive_ptr<c10d::TCPStore> master;  // rank 0: hosts the store
  c10::intrusive_ptr<c10d::TCPStore> store;   // every rank: the client barrier calls use
  std::int64_t sequence = 0;
  std::optional<std::string> named;                // the next call's round name (set_round)
  std::optional<std::chrono::milliseconds> limit;  // limit_wait
  std::string round;               // key prefix of the round last passed (for the commit phase)
  std::deque<std::string> passed;  // key prefixes of the rounds passed, oldest first
  mutable std::mutex mutex;        // one barrier call at a time

  std::chrono::milliseconds wait_timeout() const {
    return limit ? std::min(*limit, options.timeout) : options.timeout;
  }

  std::string key(std::int64_t seq) const { return options.barrier_prefix + std::to_string(seq); }

  c10::intrusive_ptr<c10d::TCPStore> connect(std::chrono::milliseconds timeout) const {
    c10d::TCPStoreOptions client;
    client.port = options.tcpstore_port;
    client.isServer = false;
    client.waitWorkers = false;
    client.timeout = timeout;
    auto s = c10::make_intrusive<c10d::TCPStore>(options.master_address, client);
    s->setTimeout(options.timeout);
    return s;
  }

  /// The client; a new connection when the last one was dropped.
  c10d::TCPStore& client() {
    if (!store) store = connect(options.timeout_barrier_init);
    return *store;
  }

  /// A wait that timed out leaves its request pending at the server, whose
  /// late answer would be read as the answer to the next request: such a
  /// client is replaced by a fresh connection.
  void reconnect() {
    try {
      store = connect(options.timeout_barrier_init);
    } catch (const std::exception&) {
      // the next call reports the store as unreachable
    }
  }
};

TCPStoreBarrier::TCPStoreBarrier(TCPStoreBarrierOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->options = std::move(options);
  const auto& o = impl_->options;
  const std::string where = fmt::format(
      "the tcp_store barrier's store at {}:{} (rank {} of {}, init timeout {} ms)", o.master_address,
      o.tcpstore_port, o.global_rank, o.global_world_size, o.timeout_barrier_init.count());
  try {
    if (o.global_rank == 0 && o.host_store) {
      c10d::TCPStoreOptions master;
      master.port = o.tcpstore_port;
      master.isServer = true;
      master.numWorkers = static_cast<std::size_t>(o.global_world_size);
      master.waitWorkers = false;  // the rendezvous below waits, and fails when it must
      master.timeout = o.timeout_barrier_init;
      impl_->master = c10::make_intrusive<c10d::TCPStore>(o.master_address, master);
    }
    impl_->store = impl_->connect(o.timeout_barrier_init);
  } catch (const std::exception& e) {
    const std::string text = fmt::format("cannot set up {}: {}", where, first_line(e.what()));
    if (mentions_timeout(e.what())) throw Timeout(text);
    throw Error(text);
  }
  // The rendezvous: every rank checks in; the last one to do so opens it
  // ("1"). When the time runs out, rank 0 — whose process hosts the store —
  // decides: it writes who did not arrive into the same key, which ends the
  // others' wait with that answer, and keeps the store up until they have read
  // it (bounded). The others wait a little longer than rank 0 so that it is
  // rank 0 that decides. A barrier made again later (a writer child that
  // replaced a dead one) finds the rendezvous open and does not wait.
  constexpr auto kGrace = std::chrono::seconds(5);
  const std::string prefix = o.barrier_prefix + "/init";
  const std::string open_key = prefix + "/open";
  const auto rank_key = [&](std::int64_t r) { return fmt::format("{}/rank/{}", prefix, r); };
  const auto timed_out = [&](const std::string& who) {
    return Timeout(fmt::format("Timed out after {} ms at the set-up of {}: {}",
                               o.timeout_barrier_init.count(), where, who));
  };
  try {
    impl_->store->set(rank_key(o.global_rank), to_bytes("1"));
    if (impl_->store->add(prefix + "/joined", 1) == o.global_world_size)
      impl_->store->set(open_key, to_bytes("1"));
  } catch (const std::exception& e) {
    throw Error(fmt::format("cannot set up {}: {}", where, first_line(e.what())));
  }
  std::string verdict;
  try {
    impl_->store->wait({open_key},
                       o.global_rank == 0 ? o.timeout_barrier_init : o.timeout_barrier_init + kGrace);
    verdict = to_string(impl_->store->get(open_key));
  } catch (const std::exception& e) {
    impl_->reconnect();
    if (o.global_rank != 0) throw timed_out(who_did_not_arrive(*impl_->store, o.global_world_size, rank_key));
    std::size_t missing = 0;
    verdict = who_did_not_arrive(*impl_->store, o.global_world_size, rank_key, &missing);
    try {
      impl_->store->set(open_key, to_bytes(verdict));
      const auto waiting =
          static_cast<std::int64_t>(o.global_world_size) - static_cast<std::int64_t>(missing) - 1;
      if (waiting > 0)
        impl_->store->wait({prefix + "/told"},
                           std::min<std::chrono::milliseconds>(o.timeout_barrier_init, kGrace));
    } catch (const std::exception&) {
      // the others find out by themselves
    }
    throw timed_out(verdict);
  }
  if (verdict != "1") {
    // Rank 0 gave up: say so, and tell it this rank has read the verdict.
    try {
      const auto told = impl_->store->add(prefix + "/told_count", 1);
      const auto arrived = impl_->store->add(prefix + "/joined", 0);
      if (told >= arrived - 1) impl_->store->set(prefix + "/told", to_bytes("1"));
    } catch (const std::exception&) {
    }
    throw timed_out(verdict);
  }
  impl_->store->setTimeout(o.timeout);
}

TCPStoreBarrier::~TCPStoreBarrier() = default;

const TCPStoreBarrierOptions& TCPStoreBarrier::options() const {
  return impl_->options;
}

std::int64_t TCPStoreBarrier::sequence() const {
  return impl_->sequence;
}

void TCPStoreBarrier::set_sequence(std::int64_t sequence) {
  std::lock_guard lock(impl_->mutex);
  impl_->sequence = sequence;
}

std::string TCPStoreBarrier::last_round() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->passed.empty() ? std::string() : impl_->passed.back();
}

void TCPStoreBarrier::set_round(const std::string& name) {
  std::lock_guard lock(impl_->mutex);
  impl_->named = name;
}

void TCPStoreBarrier::limit_wait(std::chrono::milliseconds timeout) {
  std::lock_guard lock(impl_->mutex);
  impl_->limit = timeout;
}

void TCPStoreBarrier::execute_barrier() {
  arrive("", false, false);
}

BarrierOutcome TCPStoreBarrier::arrive(const std::string& report, bool failed, bool want_reports) {
  std::lock_guard lock(impl_->mutex);
  const auto store = [&]() -> c10d::TCPStore& { return impl_->client(); };  // replaced on reconnect
  const auto& o = impl_->options;
  const std::int64_t seq = impl_->sequence;
  const std::string rank = std::to_string(o.global_rank);
  const std::optional<std::string> named = std::exchange(impl_->named, std::nullopt);
  const std::string k = named ? o.barrier_prefix + "/" + *named : impl_->key(seq);
  const std::chrono::milliseconds timeout = impl_->wait_timeout();
  const auto report_key = [&](std::int64_t r) { return fmt::format("{}/report/{}", k, r); };
  const std::string what = named ? fmt::format("barrier '{}' round '{}' (rank {} of {})", o.barrier_prefix,
                                               *named, o.global_rank, o.global_world_size)
                                 : fmt::format("barrier '{}' #{} (rank {} of {})", o.barrier_prefix, seq,
                                               o.global_rank, o.global_world_size);
  impl_->round.clear();
  try {
    // Steps 1 and 2.
    store().set("rank" + rank, to_bytes(named ? *named : std::to_string(seq)));
    store().set(report_key(o.global_rank), to_bytes(report));
    if (failed) {
      store().set(fmt::format("{}/failed/{}", k, rank), to_bytes("1"));
      store().add(k + "/failed", 1);
    }
    if (store().add(k + "/num_members", 1) == o.global_world_size)
      store().set(k + "/last_member", to_bytes("<val_ignored>"));
  } catch (const std::exception& e) {
    // The store is out of reach (a cut link, its host gone): a request may be
    // left pending, so the client is dropped (the next call connects anew,
    // rather than this one waiting for a link that is down), and this rank
    // names the host.
    impl_->store.reset();
    const std::string text =
        fmt::format("{}: cannot reach the barrier's store at {}:{}, hosted by rank 0: {}", what,
                    o.master_address, o.tcpstore_port, first_line(e.what()));
    if (mentions_timeout(e.what())) throw Timeout(text);
    throw Error(text);
  }
  // Step 3. A round that timed out is abandoned (its verdict says so, unless
  // the coordinator already decided to commit it: then everyone had arrived
  // after all), and the next call joins the next round.
  if (!named) impl_->sequence = seq + 1;
  try {
    store().wait({k + "/last_member"}, timeout);
  } catch (const std::exception& e) {
    impl_->reconnect();
    const std::string who = who_did_not_arrive(store(), o.global_world_size, report_key);
    const std::string text =
        fmt::format("Timed out after {} ms at {}: {} ({})", timeout.count(), what, who, first_line(e.what()));
    std::string verdict;
    try {
      verdict = to_string(store().compareSet(k + "/verdict", {}, to_bytes("abandoned")));
      if (verdict == "abandoned") store().compareSet(k + "/done", {}, to_bytes("abandoned: " + text));
    } catch (const std::exception&) {
      verdict = "abandoned";
    }
    if (verdict != "commit") throw Timeout(text);
  }

  // Step 4.
  BarrierOutcome out;
  out.exchanged = true;
  try {
    const std::int64_t failures = store().add(k + "/failed", 0);
    if (failures > 0)
      for (std::int64_t r = 0; r < o.global_world_size; ++r)
        if (store().check({fmt::format("{}/failed/{}", k, r)}))
          out.failures[r] = to_string(store().get(report_key(r)));
    if (want_reports)
      for (std::int64_t r = 0; r < o.global_world_size; ++r)
        out.reports.push_back(to_string(store().get(report_key(r))));
    // Step 5: the round two before this one is read by nobody any more.
    impl_->passed.push_back(k);
    if (impl_->passed.size() > 2) {
      const std::string old = impl_->passed.front();
      impl_->passed.pop_front();
      store().deleteKey(fmt::format("{}/report/{}", old, rank));
      store().deleteKey(fmt::format("{}/failed/{}", old, rank));
      if (o.global_rank == 0)
        for (const char* counter : {"/num_members", "/last_member", "/failed", "/verdict", "/done"})
          store().deleteKey(old + counter);
    }
  } catch (const std::exception& e) {
    impl_->reconnect();
    throw Error(
        fmt::format("{}: the barrier's store failed after the barrier: {}", what, first_line(e.what())));
  }
  impl_->round = k;
  return out;
}

bool TCPStoreBarrier::begin_commit() {
  std::lock_guard lock(impl_->mutex);
  if (impl_->round.empty()) return false;
  try {
    return to_string(impl_->client().compareSet(impl_->round + "/verdict", {}, to_bytes("commit"))) ==
           "commit";
  } catch (const std::exception& e) {
    impl_->reconnect();
    throw Error(fmt::format("barrier '{}': the store failed before the commit: {}",
                            impl_->options.barrier_prefix, first_line(e.what())));
  }
}

void TCPStoreBarrier::end_commit(const std::optional<RankFailure>& failure) {
  std::lock_guard lock(impl_->mutex);
  if (impl_->round.empty()) return;
  const std::string value = commit_verdict(failure);
  try {
    impl_->client().set(impl_->round + "/done", to_bytes(value));
  } catch (const std::exception&) {
    impl_->reconnect();  // the others time out waiting for the verdict
  }
}

std::optional<RankFailure> TCPStoreBarrier::await_commit() {
  std::lock_guard lock(impl_->mutex);
  if (impl_->round.empty()) return RankFailure{"Error", "no barrier round to await"};
  auto verdict = await_verdict(impl_->client(), impl_->round + "/done", impl_->wait_timeout());
  if (verdict && verdict->type == "Timeout" && verdict->message.rfind("Timed out", 0) == 0)
    impl_->reconnect();
  return verdict;
}

}  // namespace ckpt

namespace ckpt {

struct TCPStoreBarrierHost::Impl {
  c10::intrusive_ptr<c10d::TCPStore> master;
};

TCPStoreBarrierHost::TCPStoreBarrierHost(const TCPStoreBarrierOptions& o) : impl_(std::make_unique<Impl>()) {
  try {
    c10d::TCPStoreOptions master;
    master.port = o.tcpstore_port;
    master.isServer = true;
    master.numWorkers = static_cast<std::size_t>(o.global_world_size);
    master.waitWorkers = false;
    master.timeout = o.timeout_barrier_init;
    impl_->master = c10::make_intrusive<c10d::TCPStore>(o.master_address, master);
  } catch (const std::exception& e) {
    throw Error(fmt::format("cannot host the tcp_store barrier's store at {}:{}: {}", o.master_address,
                            o.tcpstore_port, first_line(e.what())));
  }
}

TCPStoreBarrierHost::~TCPStoreBarrierHost() = default;

}  // namespace ckpt
