// c10d plumbing: the default process group (TCPStore + Gloo), and the two
// built-in barriers, TCPStoreBarrier and DistBarrier.
//
// The commit barrier over a store (TCPStoreBarrier::arrive), for the save with
// sequence number `seq` and key prefix K = <barrier_prefix><seq>:
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
//   5. delete this rank's keys of seq − 2 (every rank has passed seq − 1, so
//      nobody reads them any more); rank 0 deletes the counters;
//   6. the commit phase: the coordinator claims `K/verdict` = "commit" (false
//      when a rank abandoned the round: no marker), writes the marker, and sets
//      `K/done` ("ok" or the error); the others wait for `K/done`. A rank that
//      arrives after the others gave up passes the barrier alone but reads
//      "abandoned" there, and fails.
#include <ckpt/dist.hpp>

#include <ckpt/error.hpp>

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
// A libtorch without Gloo's headers (PyTorch's pip wheel ships none) builds
// all of this but the Gloo group of init_process_group.
#if __has_include(<gloo/algorithm.h>)
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#define CKPT_HAVE_GLOO 1
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

namespace ckpt {

namespace {

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

std::string first_line(const std::string& text) {
  return text.substr(0, text.find('\n'));
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
                               const std::function<std::string(std::int64_t)>& key_of,
                               std::size_t* missing = nullptr) {
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
  if (value.rfind("failed:", 0) == 0) {
    const auto colon = value.find(':', 7);
    if (colon != std::string::npos) return RankFailure{value.substr(7, colon - 7), value.substr(colon + 1)};
  }
  return RankFailure{"Error", value};
}

}  // namespace

// --- Barrier ---------------------------------------------------------------------

BarrierOutcome Barrier::arrive(const std::string&, bool failed, bool) {
  if (!failed) execute_barrier();
  return {};
}

// --- TCPStoreBarrier ---------------------------------------------------------------

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
  std::string round;  // key prefix of the round last passed (for the commit phase)
  std::mutex mutex;   // one barrier call at a time

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
    if (o.global_rank == 0) {
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

void TCPStoreBarrier::execute_barrier() {
  arrive("", false, false);
}

BarrierOutcome TCPStoreBarrier::arrive(const std::string& report, bool failed, bool want_reports) {
  std::lock_guard lock(impl_->mutex);
  const auto store = [&]() -> c10d::TCPStore& { return *impl_->store; };  // replaced on reconnect
  const auto& o = impl_->options;
  const std::int64_t seq = impl_->sequence;
  const std::string rank = std::to_string(o.global_rank);
  const std::string k = impl_->key(seq);
  const auto report_key = [&](std::int64_t r) { return fmt::format("{}/report/{}", k, r); };
  const std::string what = fmt::format("barrier '{}' #{} (rank {} of {})", o.barrier_prefix, seq,
                                       o.global_rank, o.global_world_size);
  impl_->round.clear();
  try {
    // Steps 1 and 2.
    store().set("rank" + rank, to_bytes(std::to_string(seq)));
    store().set(report_key(o.global_rank), to_bytes(report));
    if (failed) {
      store().set(fmt::format("{}/failed/{}", k, rank), to_bytes("1"));
      store().add(k + "/failed", 1);
    }
    if (store().add(k + "/num_members", 1) == o.global_world_size)
      store().set(k + "/last_member", to_bytes("<val_ignored>"));
  } catch (const std::exception& e) {
    throw Error(fmt::format("{}: the barrier's store failed: {}", what, first_line(e.what())));
  }
  // Step 3. A round that timed out is abandoned (its verdict says so, unless
  // the coordinator already decided to commit it: then everyone had arrived
  // after all), and the next call joins the next round.
  impl_->sequence = seq + 1;
  try {
    store().wait({k + "/last_member"}, o.timeout);
  } catch (const std::exception& e) {
    impl_->reconnect();
    const std::string who = who_did_not_arrive(store(), o.global_world_size, report_key);
    const std::string text = fmt::format("Timed out after {} ms at {}: {} ({})", o.timeout.count(), what, who,
                                         first_line(e.what()));
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
    // Step 5.
    if (seq >= 2) {
      const std::string old = impl_->key(seq - 2);
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
    return to_string(impl_->store->compareSet(impl_->round + "/verdict", {}, to_bytes("commit"))) == "commit";
  } catch (const std::exception& e) {
    impl_->reconnect();
    throw Error(fmt::format("barrier '{}': the store failed before the commit: {}",
                            impl_->options.barrier_prefix, first_line(e.what())));
  }
}

void TCPStoreBarrier::end_commit(const std::optional<RankFailure>& failure) {
  std::lock_guard lock(impl_->mutex);
  if (impl_->round.empty()) return;
  const std::string value = failure ? fmt::format("failed:{}:{}", failure->type, failure->message) : "ok";
  try {
    impl_->store->set(impl_->round + "/done", to_bytes(value));
  } catch (const std::exception&) {
    impl_->reconnect();  // the others time out waiting for the verdict
  }
}

std::optional<RankFailure> TCPStoreBarrier::await_commit() {
  std::lock_guard lock(impl_->mutex);
  if (impl_->round.empty()) return RankFailure{"Error", "no barrier round to await"};
  auto verdict = await_verdict(*impl_->store, impl_->round + "/done", impl_->options.timeout);
  if (verdict && verdict->type == "Timeout" && verdict->message.rfind("Timed out", 0) == 0)
    impl_->reconnect();
  return verdict;
}

namespace dist {

// --- the default process group -----------------------------------------------------

namespace {

std::mutex default_mutex;
std::shared_ptr<ProcessGroupHandle> default_group;

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  return std::string(v);
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

}  // namespace

std::shared_ptr<ProcessGroupHandle> init_process_group(InitOptions options) {
  const RankInfo info = options.rank_info ? *options.rank_info : rank_info_from_env();
  const std::string addr =
      options.master_addr ? *options.master_addr : env("MASTER_ADDR").value_or("127.0.0.1");
  std::uint16_t port = 0;
  if (options.master_port) {
    port = *options.master_port;
  } else if (const auto p = env("MASTER_PORT")) {
    char* end = nullptr;
    const long v = std::strtol(p->c_str(), &end, 10);
    if (*end != '\0' || v < 1 || v > 65535)
      throw Error(fmt::format("MASTER_PORT '{}' is not a port number", *p));
    port = static_cast<std::uint16_t>(v);
  } else if (info.global_world_size > 1) {
    throw Error(fmt::format("a process group of {} ranks needs MASTER_PORT (or InitOptions::master_port)",
                            info.global_world_size));
  }
  const std::string where =
      fmt::format("rank {} of {}, master {}:{}", info.global_rank, info.global_world_size, addr, port);
  auto handle = std::make_shared<ProcessGroupHandle>();
  handle->rank_info = info;
  handle->timeout = options.timeout;
  try {
    c10d::TCPStoreOptions store_options;
    store_options.port = port;
    store_options.isServer = info.global_rank == 0;
    store_options.numWorkers = static_cast<std::size_t>(info.global_world_size);
    store_options.waitWorkers = true;
    store_options.timeout = options.timeout;
    handle->store = c10::make_intrusive<c10d::TCPStore>(addr, store_options);

#ifdef CKPT_HAVE_GLOO
    auto gloo = c10d::ProcessGroupGloo::Options::create(options.timeout);
    if (const auto ifname = env("GLOO_SOCKET_IFNAME"))
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(*ifname));
    else if (options.gloo_hostname)
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(*options.gloo_hostname));
    else if (is_loopback(addr))
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    else
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    handle->group = c10::make_intrusive<c10d::ProcessGroupGloo>(
        handle->store, static_cast<int>(info.global_rank), static_cast<int>(info.global_world_size), gloo);
#else
    throw Error(
        "this libtorch was built without Gloo's headers, so no Gloo group can be made here: create a "
        "c10d::ProcessGroup yourself and fill a ckpt::dist::ProcessGroupHandle with it");
#endif
  } catch (const std::exception& e) {
    const std::string text =
        fmt::format("cannot create the process group ({}): {}", where, first_line(e.what()));
    if (mentions_timeout(e.what())) throw Timeout(text);
    throw Error(text);
  }
  set_default_process_group(handle);
  return handle;
}

std::shared_ptr<ProcessGroupHandle> default_process_group() {
  std::lock_guard lock(default_mutex);
  return default_group;
}

void set_default_process_group(std::shared_ptr<ProcessGroupHandle> group) {
  std::lock_guard lock(default_mutex);
  default_group = std::move(group);
}

void destroy_process_group() {
  set_default_process_group(nullptr);
}

std::uint16_t agree_on_free_port(const ProcessGroupHandle& group, const std::string& name) {
  const std::string key = "ckpt/free_port/" + name;
  if (group.rank_info.global_rank == 0) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw IoError(fmt::format("socket: {}", std::strerror(errno)));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    socklen_t len = sizeof addr;
    const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                    ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
    const int err = errno;
    ::close(fd);
    if (!ok) throw IoError(fmt::format("cannot find a free port: {}", std::strerror(err)));
    group.store->set(key, to_bytes(std::to_string(ntohs(addr.sin_port))));
  }
  try {
    return static_cast<std::uint16_t>(std::stoi(to_string(group.store->get(key))));
  } catch (const std::exception& e) {
    throw Timeout(fmt::format("rank {} did not learn the port '{}' from rank 0: {}",
                              group.rank_info.global_rank, name, first_line(e.what())));
  }
}

RankInfo rank_info_from(const c10d::ProcessGroup& group) {
  return RankInfo{.global_rank = group.getRank(), .global_world_size = group.getSize()};
}

// --- DistBarrier ---------------------------------------------------------------------

DistBarrier::DistBarrier(std::shared_ptr<ProcessGroupHandle> group,
                         std::optional<std::chrono::milliseconds> timeout)
    : group_(std::move(group)) {
  if (!group_ || !group_->group)
    throw Error("DistBarrier requires an initialized process group (ckpt::dist::init_process_group)");
  timeout_ = timeout.value_or(group_->timeout);
  prefix_ = fmt::format("ckpt/dist_barrier/{}/", group_->barriers_made++);
}

// The arrival marks of its last two rounds stay in the store: another rank
// may still be naming who did not arrive from them.
DistBarrier::~DistBarrier() = default;

void DistBarrier::execute_barrier() {
  arrive("", false, false);
}

BarrierOutcome DistBarrier::arrive(const std::string& report, bool failed, bool want_reports) {
  auto& store = *group_->store;
  auto& group = *group_->group;
  const std::int64_t world = group.getSize();
  const std::int64_t rank = group.getRank();
  const std::int64_t seq = sequence_++;
  const std::string k = fmt::format("{}{}", prefix_, seq);
  const auto arrived_key = [&](std::int64_t r) { return fmt::format("{}/arrived/{}", k, r); };
  const std::string what = fmt::format("dist_barrier #{} (rank {} of {})", seq, rank, world);
  round_.clear();
  store.set(arrived_key(rank), to_bytes("1"));
  if (seq >= 2) store.deleteKey(fmt::format("{}{}/arrived/{}", prefix_, seq - 2, rank));

  const auto run = [&](const c10::intrusive_ptr<c10d::Work>& work) {
    bool done = false;
    std::string cause = "the collective did not complete";
    try {
      done = work->wait(timeout_);
    } catch (const std::exception& e) {
      cause = e.what();
    }
    if (done) return;
    try {  // the round is abandoned: a rank that comes late must not commit
      if (to_string(store.compareSet(k + "/verdict", {}, to_bytes("abandoned"))) == "abandoned")
        store.compareSet(k + "/done", {}, to_bytes("abandoned: " + what + " timed out"));
    } catch (const std::exception&) {
    }
    barrier_timed_out(store, what, timeout_, world, arrived_key, cause);
  };
  const auto all_gather = [&](const at::Tensor& mine) {
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (std::int64_t r = 0; r < world; ++r) outputs[0].push_back(at::empty_like(mine));
    std::vector<at::Tensor> inputs{mine};
    run(group.allgather(outputs, inputs));
    return outputs[0];
  };

  // Who failed, how long the reports are, whether anyone wants them.
  const auto head = all_gather(
      at::tensor(std::vector<std::int64_t>{failed ? 1 : 0, static_cast<std::int64_t>(report.size()),
                                           want_reports ? 1 : 0},
                 at::kLong));
  bool any_failed = false;
  bool any_want = false;
  std::int64_t longest = 1;
  for (const auto& h : head) {
    any_failed |= h[0].item<std::int64_t>() != 0;
    longest = std::max(longest, h[1].item<std::int64_t>());
    any_want |= h[2].item<std::int64_t>() != 0;
  }
  BarrierOutcome out;
  out.exchanged = true;
  if (any_failed || any_want) {
    auto mine = at::zeros({longest}, at::kByte);
    std::memcpy(mine.data_ptr(), report.data(), report.size());
    const auto all = all_gather(mine);
    for (std::int64_t r = 0; r < world; ++r) {
      const auto n = static_cast<std::size_t>(head[static_cast<std::size_t>(r)][1].item<std::int64_t>());
      std::string text(reinterpret_cast<const char*>(all[static_cast<std::size_t>(r)].data_ptr()), n);
      if (head[static_cast<std::size_t>(r)][0].item<std::int64_t>() != 0) out.failures[r] = text;
      if (want_reports) out.reports.push_back(std::move(text));
    }
  }
  round_ = k;
  return out;
}

bool DistBarrier::begin_commit() {
  if (round_.empty()) return false;
  return to_string(group_->store->compareSet(round_ + "/verdict", {}, to_bytes("commit"))) == "commit";
}

void DistBarrier::end_commit(const std::optional<RankFailure>& failure) {
  if (round_.empty()) return;
  try {
    group_->store->set(
        round_ + "/done",
        to_bytes(failure ? fmt::format("failed:{}:{}", failure->type, failure->message) : "ok"));
  } catch (const std::exception&) {
    // the others time out waiting for the verdict
  }
}

std::optional<RankFailure> DistBarrier::await_commit() {
  if (round_.empty()) return RankFailure{"Error", "no barrier round to await"};
  return await_verdict(*group_->store, round_ + "/done", timeout_);
}

}  // namespace dist

}  // namespace ckpt
