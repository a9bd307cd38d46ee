// Barriers, ported from upstream's test_barriers.py (case names kept) against
// real c10d parts: where upstream mocks torch.distributed.TCPStore and
// store_util.barrier, every rank here is a thread of this process holding a real
// TCPStoreBarrier on a loopback port, and the test reads the store's keys
// through a TCPStore client of its own. Beyond upstream: arrive() exchanging
// reports and failures, the enforced timeout naming the rank that never
// arrived, old sequences' keys deleted, the registry, and DistBarrier over a
// real Gloo group.
//
// Boost.Test's assertions are not thread-safe, so rank threads only return what
// they saw (or throw) and the main thread asserts. Every rank thread is joined
// within a bound; nothing sleeps to synchronise.
#include <ckpt/barrier.hpp>
#include <ckpt/tcp_store_barrier.hpp>

#define BOOST_TEST_MODULE barriers_test
#include <boost/test/unit_test.hpp>

#include <ckpt/checkpoint_writer.hpp>
#include <ckpt/commit.hpp>
#include <ckpt/dist.hpp>
#include <ckpt/error.hpp>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <ATen/ATen.h>

#include "support/test_support.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <iostream>
#include <latch>
#include <map>
#include <memory>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

using namespace std::chrono_literals;
using ckpt::BarrierOutcome;
using ckpt::RankInfo;
using ckpt::TCPStoreBarrier;
using ckpt::TCPStoreBarrierOptions;

using ckpt::test::mentions;
namespace {

constexpr std::int64_t kWorld = 4;
const std::vector<std::int64_t> kAllRanks{0, 1, 2, 3};

/// A hang guard for the rank threads, not a measurement: every barrier below
/// completes, or times out, within seconds.
constexpr auto kBound = std::chrono::seconds(60);

/// A port nothing listens on now: binds port 0 on loopback and reads back the
/// one the kernel picked.
std::uint16_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "socket");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok) throw std::system_error(err, std::generic_category(), "bind 127.0.0.1:0");
  return ntohs(a.sin_port);
}

/// Rank `r`'s element of a per-rank vector.
template <class T>
T& of_rank(std::vector<T>& per_rank, std::int64_t r) {
  return per_rank[static_cast<std::size_t>(r)];
}
template <class T>
const T& of_rank(const std::vector<T>& per_rank, std::int64_t r) {
  return per_rank[static_cast<std::size_t>(r)];
}

/// Runs `body(rank)` for each of `ranks`, each on a thread of its own, all at
/// once; returns their futures, all ready (get() gives a rank's result or
/// rethrows its exception). A rank still running after kBound is a hang: the
/// case fails and the process ends, since that thread is blocked inside c10d on
/// objects this test owns and can be neither joined nor safely left behind.
template <class Body>
auto on_ranks(const std::vector<std::int64_t>& ranks, Body body) {
  using Result = std::invoke_result_t<Body&, std::int64_t>;
  std::vector<std::future<Result>> futures;
  for (const std::int64_t r : ranks) futures.push_back(std::async(std::launch::async, body, r));
  const auto deadline = std::chrono::steady_clock::now() + kBound;
  for (std::size_t i = 0; i < futures.size(); ++i) {
    if (futures[i].wait_until(deadline) != std::future_status::ready) {
      BOOST_ERROR(fmt::format("rank {} still runs after {} s: a barrier hung; ending the process", ranks[i],
                              kBound.count()));
      std::cout.flush();
      std::abort();
    }
  }
  return futures;
}

/// Every future's result, in order; rethrows the first exception.
template <class T>
std::vector<T> results(std::vector<std::future<T>> futures) {
  std::vector<T> out;
  for (auto& f : futures) out.push_back(f.get());
  return out;
}
void results(std::vector<std::future<void>> futures) {
  for (auto& f : futures) f.get();
}

TCPStoreBarrierOptions tcpstore_options(std::int64_t rank, std::uint16_t port, const std::string& prefix,
                                        std::chrono::milliseconds timeout = 30s) {
  return {.global_rank = rank,
          .global_world_size = kWorld,
          .barrier_prefix = prefix,
          .timeout_barrier_init = 30s,
          .tcpstore_port = port,
          .master_address = "127.0.0.1",
          .timeout = timeout};
}

/// One TCPStoreBarrier per rank, in rank order, constructed on all ranks at
/// once (rank 0's constructor waits for every rank's store client).
std::vector<std::unique_ptr<TCPStoreBarrier>> tcpstore_barriers(std::uint16_t port, const std::string& prefix,
                                                                std::chrono::milliseconds timeout = 30s) {
  return results(on_ranks(kAllRanks, [&](std::int64_t r) {
    return std::make_unique<TCPStoreBarrier>(tcpstore_options(r, port, prefix, timeout));
  }));
}

/// A store client of the test's own on `port`; not a rank (the store does not
/// count it among its workers).
c10::intrusive_ptr<c10d::TCPStore> store_client(std::uint16_t port, std::chrono::milliseconds timeout = 30s) {
  c10d::TCPStoreOptions o;
  o.port = port;
  o.isServer = false;
  o.waitWorkers = false;
  o.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>("127.0.0.1", o);
}

std::vector<std::uint8_t> bytes(const std::string& s) {
  return {s.begin(), s.end()};
}

/// The value of `key`, which must exist (TCPStore's get waits for a missing key).
std::string value_of(c10d::Store& store, const std::string& key) {
  BOOST_REQUIRE_MESSAGE(store.check({key}), "key '" << key << "' is not in the store");
  const auto v = store.get(key);
  return {v.begin(), v.end()};
}

/// The value of counter `key` (add 0 leaves it as it is).
std::int64_t counter_of(c10d::Store& store, const std::string& key) {
  BOOST_REQUIRE_MESSAGE(store.check({key}), "key '" << key << "' is not in the store");
  return store.add(key, 0);
}

/// Rank `rank` of `world` in a group whose store is at 127.0.0.1:`port`.
ckpt::dist::InitOptions group_options(std::int64_t rank, std::int64_t world, std::uint16_t port,
                                      std::chrono::milliseconds timeout) {
  ckpt::dist::InitOptions o;
  o.rank_info = RankInfo{rank, world};
  o.master_addr = "127.0.0.1";
  o.master_port = port;
  o.timeout = timeout;
  return o;
}

/// One rank of a Gloo group; every rank's handle is its own (the process-wide
/// default is whichever rank initialised last, so it is reset afterwards).
std::shared_ptr<ckpt::dist::ProcessGroupHandle> join_group(std::int64_t rank, std::uint16_t port,
                                                           std::chrono::milliseconds timeout) {
  return ckpt::dist::init_process_group(group_options(rank, kWorld, port, timeout));
}

std::vector<std::shared_ptr<ckpt::dist::ProcessGroupHandle>> gloo_group(std::uint16_t port,
                                                                        std::chrono::milliseconds timeout) {
  auto joined = on_ranks(kAllRanks, [&](std::int64_t r) { return join_group(r, port, timeout); });
  ckpt::dist::destroy_process_group();
  return results(std::move(joined));
}

/// Releases every rank's handle on its own thread, bounded: a Gloo group's
/// destructor waits for its collectives in flight.
void leave_group(std::vector<std::shared_ptr<ckpt::dist::ProcessGroupHandle>>& handles) {
  results(on_ranks(kAllRanks, [&](std::int64_t r) { of_rank(handles, r).reset(); }));
}

std::vector<std::string> all_reports(const std::string& round) {
  std::vector<std::string> out;
  for (std::int64_t r = 0; r < kWorld; ++r) out.push_back(fmt::format("{} r{}", round, r));
  return out;
}

/// The two report rounds of the commit barrier, on any Barrier: every rank
/// arrives with "ok r<rank>" (rank 0 wants the reports), then ranks 1 and 3
/// arrive failed with "failed r<rank>".
std::pair<BarrierOutcome, BarrierOutcome> report_rounds(ckpt::Barrier& barrier, std::int64_t rank) {
  BarrierOutcome ok = barrier.arrive(fmt::format("ok r{}", rank), false, rank == 0);
  const bool failed = rank == 1 || rank == 3;
  BarrierOutcome bad =
      barrier.arrive(fmt::format("{} r{}", failed ? "failed" : "ok", rank), failed, rank == 0);
  return {std::move(ok), std::move(bad)};
}

void check_report_rounds(const std::vector<std::pair<BarrierOutcome, BarrierOutcome>>& seen) {
  BOOST_REQUIRE_EQUAL(seen.size(), static_cast<std::size_t>(kWorld));
  const std::map<std::int64_t, std::string> failures{{1, "failed r1"}, {3, "failed r3"}};
  const std::vector<std::string> second{"ok r0", "failed r1", "ok r2", "failed r3"};
  for (std::int64_t r = 0; r < kWorld; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      const auto& [ok, bad] = of_rank(seen, r);
      BOOST_TEST(ok.exchanged);
      BOOST_TEST(ok.failures.empty());
      BOOST_TEST(bad.exchanged);
      BOOST_TEST((bad.failures == failures));
      if (r == 0) {
        BOOST_TEST(ok.reports == all_reports("ok"), boost::test_tools::per_element());
        BOOST_TEST(bad.reports == second, boost::test_tools::per_element());
      } else {
        BOOST_TEST(ok.reports.empty());
        BOOST_TEST(bad.reports.empty());
      }
    }
  }
}

/// A barrier type of the test's own: counts its calls, keeps its arguments.
class CountingBarrier : public ckpt::Barrier {
 public:
  explicit CountingBarrier(ckpt::Kwargs args) : args_(std::move(args)) {}
  void execute_barrier() override { ++calls_; }
  const ckpt::Kwargs& args() const { return args_; }
  int calls() const { return calls_; }

 private:
  ckpt::Kwargs args_;
  int calls_ = 0;
};

}  // namespace

BOOST_AUTO_TEST_SUITE(tcpstore_barrier)

// upstream: TCPStore(master_address, tcpstore_port, world_size=4, timeout=ANY,
// is_master=(rank == 0)); here every rank constructs, and the store is observed.
BOOST_AUTO_TEST_CASE(test_tcpstore_barrier_initialization) {
  const std::uint16_t port = free_port();
  auto barriers = tcpstore_barriers(port, "test_barrier");
  BOOST_REQUIRE_EQUAL(barriers.size(), static_cast<std::size_t>(kWorld));
  for (std::int64_t r = 0; r < kWorld; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      const auto& o = of_rank(barriers, r)->options();
      BOOST_TEST(o.global_rank == r);
      BOOST_TEST(o.global_world_size == kWorld);
      BOOST_TEST(o.barrier_prefix == "test_barrier");
      BOOST_TEST(o.timeout_barrier_init.count() == std::chrono::milliseconds(30s).count());
      BOOST_TEST(o.tcpstore_port == port);
      BOOST_TEST(o.master_address == "127.0.0.1");
      BOOST_TEST(o.timeout.count() == std::chrono::milliseconds(30s).count());
      BOOST_TEST(of_rank(barriers, r)->sequence() == 0);
    }
  }
  // The store is real and served at the port.
  auto client = store_client(port);
  client->set("test_key", bytes("test_value"));
  BOOST_TEST(value_of(*client, "test_key") == "test_value");
  // is_master = (rank == 0): the store goes away with rank 0's barrier, not
  // with the others'.
  barriers[3].reset();
  BOOST_TEST(value_of(*store_client(port), "test_key") == "test_value");
  barriers[0].reset();
  BOOST_CHECK_THROW(store_client(port, 1s), std::exception);
}

// world_size = 4: set-up is a rendezvous of all four ranks; when one never
// comes, every rank that did fails with Timeout after timeout_barrier_init,
// naming the one missing (as TCPStoreBarrier's constructor documents).
BOOST_AUTO_TEST_CASE(tcpstore_barrier_init_waits_for_every_rank) {
  const std::uint16_t port = free_port();
  auto outcomes = on_ranks({0, 1, 2}, [&](std::int64_t r) {
    auto o = tcpstore_options(r, port, "init");
    o.timeout_barrier_init = 2s;
    return std::make_unique<TCPStoreBarrier>(o);
  });
  for (std::size_t i = 0; i < outcomes.size(); ++i) {
    BOOST_TEST_CONTEXT("rank " << i) {
      BOOST_CHECK_EXCEPTION(outcomes[i].get(), ckpt::Timeout, [&](const ckpt::Timeout& e) {
        BOOST_TEST_MESSAGE(e.what());
        return mentions(e, fmt::format("127.0.0.1:{}", port)) &&
               mentions(e, fmt::format("rank {} of 4", i)) && mentions(e, "did not arrive: [3]");
      });
    }
  }
}

// upstream: the first execute_barrier sets rank0 = "0" and runs the store
// barrier with key_prefix "test_barrier0"; the second sets "1" and uses
// "test_barrier1".
BOOST_AUTO_TEST_CASE(test_execute_barrier) {
  const std::uint16_t port = free_port();
  auto barriers = tcpstore_barriers(port, "test_barrier");
  auto client = store_client(port);

  for (std::int64_t round = 0; round < 2; ++round) {
    BOOST_TEST_CONTEXT("call " << round + 1) {
      results(on_ranks(kAllRanks, [&](std::int64_t r) { of_rank(barriers, r)->execute_barrier(); }));
      const std::string k = fmt::format("test_barrier{}", round);
      for (std::int64_t r = 0; r < kWorld; ++r) {
        BOOST_TEST(value_of(*client, fmt::format("rank{}", r)) == std::to_string(round));
        BOOST_TEST(of_rank(barriers, r)->sequence() == round + 1);
      }
      BOOST_TEST(counter_of(*client, k + "/num_members") == kWorld);
      BOOST_TEST(client->check({k + "/last_member"}));
    }
  }
  // The first call's barrier keys are still there: only keys two calls old go.
  BOOST_TEST(counter_of(*client, "test_barrier0/num_members") == kWorld);
}

BOOST_AUTO_TEST_CASE(arrive_exchanges_reports_and_failures) {
  const std::uint16_t port = free_port();
  auto barriers = tcpstore_barriers(port, "commit");
  check_report_rounds(
      results(on_ranks(kAllRanks, [&](std::int64_t r) { return report_rounds(*of_rank(barriers, r), r); })));
  for (const auto& b : barriers) BOOST_TEST(b->sequence() == 2);
}

BOOST_AUTO_TEST_CASE(timeout_names_the_rank_that_did_not_arrive) {
  const std::uint16_t port = free_port();
  auto barriers = tcpstore_barriers(port, "hang", 2s);
  // Rank 2 is up (its store client is connected) but never calls the barrier.
  std::latch start(3);
  auto outcomes = on_ranks({0, 1, 3}, [&](std::int64_t r) {
    start.arrive_and_wait();
    of_rank(barriers, r)->execute_barrier();
  });
  const std::vector<std::int64_t> waited{0, 1, 3};
  for (std::size_t i = 0; i < outcomes.size(); ++i) {
    BOOST_TEST_CONTEXT("rank " << waited[i]) {
      BOOST_CHECK_EXCEPTION(outcomes[i].get(), ckpt::Timeout, [&](const ckpt::Timeout& e) {
        BOOST_TEST_MESSAGE(e.what());
        return mentions(e, "Timed out") && mentions(e, "did not arrive: [2]") &&
               mentions(e, fmt::format("rank {} of 4", waited[i]));
      });
      // The round that timed out is abandoned: the next call joins the next.
      BOOST_TEST(of_rank(barriers, waited[i])->sequence() == 1);
    }
  }
}

BOOST_AUTO_TEST_CASE(keys_of_old_sequences_are_deleted) {
  const std::uint16_t port = free_port();
  auto barriers = tcpstore_barriers(port, "gc");
  auto client = store_client(port);
  // Round 0 has a failed rank, so that its failure markers exist too.
  for (std::int64_t round = 0; round < 4; ++round)
    results(on_ranks(kAllRanks, [&](std::int64_t r) {
      of_rank(barriers, r)->arrive("report", round == 0 && r == 1, false);
    }));

  for (const std::int64_t gone : {0, 1}) {
    BOOST_TEST_CONTEXT("sequence " << gone) {
      const std::string k = fmt::format("gc{}", gone);
      for (std::int64_t r = 0; r < kWorld; ++r) {
        BOOST_TEST(!client->check({fmt::format("{}/report/{}", k, r)}), k << "/report/" << r);
        BOOST_TEST(!client->check({fmt::format("{}/failed/{}", k, r)}), k << "/failed/" << r);
      }
      for (const char* counter : {"/num_members", "/last_member", "/failed"})
        BOOST_TEST(!client->check({k + counter}), k << counter);
    }
  }
  for (const std::int64_t kept : {2, 3}) {
    BOOST_TEST_CONTEXT("sequence " << kept) {
      const std::string k = fmt::format("gc{}", kept);
      for (std::int64_t r = 0; r < kWorld; ++r)
        BOOST_TEST(value_of(*client, fmt::format("{}/report/{}", k, r)) == "report");
      BOOST_TEST(counter_of(*client, k + "/num_members") == kWorld);
      BOOST_TEST(client->check({k + "/last_member"}));
    }
  }
  for (std::int64_t r = 0; r < kWorld; ++r) BOOST_TEST(value_of(*client, fmt::format("rank{}", r)) == "3");
}

namespace {

/// This process's threads (the entries of /proc/self/task).
std::size_t thread_count() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

ckpt::StateDict small_state(std::int64_t rank) {
  ckpt::StateDict sd;
  sd.insert("w", at::full({4}, static_cast<double>(rank), at::kFloat));
  return sd;
}

}  // namespace

// Rounds are named by checkpoint, not counted: rank 2 skips the save of "b"
// (the others time out naming it), and the save of "c" after it commits on
// every rank. With counted rounds rank 2 would join "b"'s round for "c" and
// stay a round behind for the rest of the job.
BOOST_AUTO_TEST_CASE(a_rank_that_skips_a_save_puts_no_later_round_out_of_step) {
  const std::uint16_t port = free_port();
  ckpt::test::TempDir tmp;
  std::vector<std::shared_ptr<ckpt::Barrier>> barriers;
  for (auto& b : tcpstore_barriers(port, "skip", 30s)) barriers.push_back(std::move(b));
  ckpt::CheckpointWriterConfig config;
  config.write_barrier_timeout = 2s;
  std::vector<std::shared_ptr<ckpt::CheckpointWriter>> writers;
  for (std::int64_t r = 0; r < kWorld; ++r)
    writers.push_back(
        std::make_shared<ckpt::CheckpointWriter>(config, RankInfo{r, kWorld}, of_rank(barriers, r)));
  const auto save_on = [&](const std::vector<std::int64_t>& ranks, const std::string& name) {
    return on_ranks(ranks, [&](std::int64_t r) { of_rank(writers, r)->write(tmp / name, small_state(r)); });
  };
  results(save_on(kAllRanks, "a"));
  BOOST_CHECK(ckpt::is_committed(tmp / "a"));
  auto skipped = save_on({0, 1, 3}, "b");
  for (auto& f : skipped)
    BOOST_CHECK_EXCEPTION(f.get(), ckpt::Timeout,
                          [](const ckpt::Timeout& e) { return mentions(e, "did not arrive: [2]"); });
  BOOST_CHECK(!ckpt::is_committed(tmp / "b"));
  BOOST_REQUIRE_NO_THROW(results(save_on(kAllRanks, "c")));
  BOOST_CHECK(ckpt::is_committed(tmp / "c"));
  // And a second save into "c" is a round of its own.
  BOOST_REQUIRE_NO_THROW(results(save_on(kAllRanks, "c")));
  BOOST_CHECK(ckpt::is_committed(tmp / "c"));
}

// A barrier that hangs (rank 2 never arrives; the barrier's own timeout is
// long) ends at the writer's deadline and leaves no thread behind: the
// built-in barriers wait on the caller's thread, bounded by that deadline.
BOOST_AUTO_TEST_CASE(a_hung_barrier_leaves_no_thread_behind) {
  const std::uint16_t port = free_port();
  ckpt::test::TempDir tmp;
  auto made = tcpstore_barriers(port, "hung", 600s);
  std::shared_ptr<ckpt::Barrier> barrier = std::move(made[0]);
  ckpt::CheckpointWriterConfig config;
  config.write_barrier_timeout = 2s;
  ckpt::CheckpointWriter writer(config, RankInfo{0, kWorld}, barrier);
  const std::size_t before = thread_count();
  BOOST_CHECK_EXCEPTION(writer.write(tmp / "a", small_state(0)), ckpt::Timeout, [](const ckpt::Timeout& e) {
    BOOST_TEST_MESSAGE(e.what());
    return mentions(e, "Timed out after 2000 ms") && mentions(e, "did not arrive: [1, 2, 3]");
  });
  BOOST_CHECK_EQUAL(thread_count(), before);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(registry)

BOOST_AUTO_TEST_CASE(builtin_types_are_registered) {
  const auto names = ckpt::registered_barriers();
  BOOST_TEST(std::is_sorted(names.begin(), names.end()));
  BOOST_TEST((std::find(names.begin(), names.end(), "tcp_store") != names.end()));
  BOOST_TEST((std::find(names.begin(), names.end(), "dist_barrier") != names.end()));
}

BOOST_AUTO_TEST_CASE(no_type_means_no_barrier) {
  BOOST_TEST(ckpt::create_barrier_from_config({}) == nullptr);
  BOOST_TEST(ckpt::create_barrier_from_config({std::nullopt, ckpt::Kwargs{{"tcpstore_port", 1}}}) == nullptr);
}

BOOST_AUTO_TEST_CASE(unknown_type_lists_the_known_ones) {
  BOOST_CHECK_EXCEPTION(ckpt::create_barrier_from_config({"no_such_barrier", {}}), ckpt::Error,
                        [](const ckpt::Error& e) {
                          BOOST_TEST_MESSAGE(e.what());
                          return mentions(e, "Unknown barrier type 'no_such_barrier'") &&
                                 mentions(e, "tcp_store") && mentions(e, "dist_barrier");
                        });
}

BOOST_AUTO_TEST_CASE(user_registered_type_gets_its_args) {
  ckpt::register_barrier("counting",
                         [](const ckpt::Kwargs& args) { return std::make_shared<CountingBarrier>(args); });
  const auto names = ckpt::registered_barriers();
  BOOST_TEST((std::find(names.begin(), names.end(), "counting") != names.end()));

  const ckpt::Kwargs args{{"custom_arg", "test_value"}, {"another_arg", 42}};
  auto barrier = ckpt::create_barrier_from_config({"counting", args});
  auto counting = std::dynamic_pointer_cast<CountingBarrier>(barrier);
  BOOST_REQUIRE(counting);
  BOOST_TEST((counting->args() == args));
  barrier->execute_barrier();
  BOOST_TEST(counting->calls() == 1);
  // The default arrive() synchronises through execute_barrier and exchanges nothing...
  const BarrierOutcome outcome = barrier->arrive("report", false, true);
  BOOST_TEST(counting->calls() == 2);
  BOOST_TEST(!outcome.exchanged);
  BOOST_TEST(outcome.reports.empty());
  BOOST_TEST(outcome.failures.empty());
  // ...and a failed rank does not wait at it.
  barrier->arrive("report", true, false);
  BOOST_TEST(counting->calls() == 2);
}

BOOST_AUTO_TEST_CASE(tcp_store_from_config) {
  const std::uint16_t port = free_port();
  const ckpt::Kwargs args{{"global_rank", 0},
                          {"global_world_size", 1},
                          {"barrier_prefix", "from_config"},
                          {"tcpstore_port", static_cast<std::int64_t>(port)},
                          {"master_address", "127.0.0.1"},
                          {"timeout_secs", 30}};
  auto barrier = ckpt::create_barrier_from_config({"tcp_store", args});
  auto tcp = std::dynamic_pointer_cast<TCPStoreBarrier>(barrier);
  BOOST_REQUIRE(tcp);
  const auto& o = tcp->options();
  BOOST_TEST(o.global_rank == 0);
  BOOST_TEST(o.global_world_size == 1);
  BOOST_TEST(o.barrier_prefix == "from_config");
  BOOST_TEST(o.tcpstore_port == port);
  BOOST_TEST(o.master_address == "127.0.0.1");
  BOOST_TEST(o.timeout.count() == std::chrono::milliseconds(30s).count());
  auto done = on_ranks({0}, [&](std::int64_t) { barrier->execute_barrier(); });
  BOOST_CHECK_NO_THROW(done[0].get());
  BOOST_TEST(tcp->sequence() == 1);
}

BOOST_AUTO_TEST_CASE(tcp_store_without_a_port_is_an_error) {
  BOOST_CHECK_EXCEPTION(ckpt::create_barrier_from_config(
                            {"tcp_store", ckpt::Kwargs{{"global_rank", 0}, {"global_world_size", 1}}}),
                        ckpt::Error, [](const ckpt::Error& e) {
                          BOOST_TEST_MESSAGE(e.what());
                          return mentions(e, "tcpstore_port");
                        });
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(dist_barrier)

BOOST_AUTO_TEST_CASE(requires_a_process_group) {
  ckpt::dist::destroy_process_group();
  const auto requires_group = [](const ckpt::Error& e) {
    BOOST_TEST_MESSAGE(e.what());
    return mentions(e, "DistBarrier requires an initialized process group");
  };
  BOOST_CHECK_EXCEPTION(ckpt::dist::DistBarrier(nullptr), ckpt::Error, requires_group);
  BOOST_CHECK_EXCEPTION(ckpt::dist::DistBarrier(), ckpt::Error, requires_group);
  BOOST_CHECK_EXCEPTION(ckpt::create_barrier_from_config({"dist_barrier", {}}), ckpt::Error, requires_group);
}

// "dist_barrier" from a config uses the default group.
BOOST_AUTO_TEST_CASE(from_config_uses_the_default_group) {
  const std::uint16_t port = free_port();
  auto done = on_ranks({0}, [&](std::int64_t) {
    auto handle = ckpt::dist::init_process_group(group_options(0, 1, port, 30s));
    auto barrier = ckpt::create_barrier_from_config({"dist_barrier", ckpt::Kwargs{{"timeout_secs", 30}}});
    const bool made = std::dynamic_pointer_cast<ckpt::dist::DistBarrier>(barrier) != nullptr;
    barrier->execute_barrier();
    const BarrierOutcome outcome = barrier->arrive("alone", false, true);
    ckpt::dist::destroy_process_group();
    return std::make_pair(made, outcome);
  });
  const auto [made, outcome] = done[0].get();
  BOOST_TEST(made);
  BOOST_TEST(outcome.exchanged);
  BOOST_TEST(outcome.reports == std::vector<std::string>{"alone"}, boost::test_tools::per_element());
  BOOST_TEST(ckpt::dist::default_process_group() == nullptr);
}

BOOST_AUTO_TEST_CASE(over_a_gloo_group) {
  auto handles = gloo_group(free_port(), 30s);
  struct Seen {
    RankInfo rank_info;
    std::pair<BarrierOutcome, BarrierOutcome> rounds;
  };
  auto seen = results(on_ranks(kAllRanks, [&](std::int64_t r) {
    const auto& handle = of_rank(handles, r);
    ckpt::dist::DistBarrier barrier(handle);
    barrier.execute_barrier();
    barrier.execute_barrier();
    return Seen{ckpt::dist::rank_info_from(*handle->group), report_rounds(barrier, r)};
  }));
  std::vector<std::pair<BarrierOutcome, BarrierOutcome>> rounds;
  for (std::int64_t r = 0; r < kWorld; ++r) {
    BOOST_TEST((of_rank(seen, r).rank_info == RankInfo{r, kWorld}), "rank " << r);
    rounds.push_back(of_rank(seen, r).rounds);
  }
  check_report_rounds(rounds);
  leave_group(handles);
}

// new_group: the same ranks over fresh connections to the base group's store,
// its keys under its name, usable after every handle of the base is gone
// (rank 0's store server lives on in the new group's handle).
BOOST_AUTO_TEST_CASE(new_group_connects_the_same_ranks_anew_under_its_name) {
  auto base = gloo_group(free_port(), 30s);
  auto fresh = results(on_ranks(kAllRanks, [&](std::int64_t r) {
    auto group = ckpt::dist::new_group(of_rank(base, r), "fresh");
    of_rank(base, r)->store->set(fmt::format("base/{}", r), {'b'});
    group->store->set(fmt::format("mark/{}", r), {'f'});
    return group;
  }));
  // Each group's keys: the new one's lie under "fresh/" in the shared store.
  BOOST_TEST(of_rank(base, 0)->store->check({"fresh/mark/0", "fresh/mark/3", "base/1"}));
  BOOST_TEST(!of_rank(fresh, 0)->store->check({"base/1"}));
  leave_group(base);
  auto sums = results(on_ranks(kAllRanks, [&](std::int64_t r) {
    const auto& group = of_rank(fresh, r);
    std::vector<at::Tensor> t{at::full({2}, static_cast<double>(r + 1), at::kDouble)};
    group->group->allreduce(t)->wait();
    return std::make_pair(group->rank_info, t[0][1].item<double>());
  }));
  for (std::int64_t r = 0; r < kWorld; ++r) {
    BOOST_TEST((of_rank(sums, r).first == RankInfo{r, kWorld}), "rank " << r);
    BOOST_TEST(of_rank(sums, r).second == 10.0, "rank " << r);
  }
  leave_group(fresh);
}

BOOST_AUTO_TEST_CASE(new_group_without_a_base_or_a_name_is_an_error) {
  BOOST_CHECK_THROW(ckpt::dist::new_group(nullptr, "x"), ckpt::Error);
  auto alone = std::make_shared<ckpt::dist::ProcessGroupHandle>();
  BOOST_CHECK_THROW(ckpt::dist::new_group(alone, ""), ckpt::Error);
}

// The commit phase over a real group: four sync writers save into one
// directory; when any rank's write returns, rank 0's marker is already there
// and names all four files (no rank reports a save before it is committed).
BOOST_AUTO_TEST_CASE(no_rank_returns_before_the_commit_marker) {
  auto handles = gloo_group(free_port(), 30s);
  ckpt::test::TempDir dir;
  for (int save = 0; save < 2; ++save) {
    BOOST_TEST_CONTEXT("save " << save) {
      const auto path = dir.path() / fmt::format("save_{}", save);
      const auto seen = results(on_ranks(kAllRanks, [&](std::int64_t r) {
        auto barrier = std::make_shared<ckpt::dist::DistBarrier>(of_rank(handles, r), 30s);
        ckpt::CheckpointWriter writer({}, RankInfo{r, kWorld}, barrier);
        ckpt::StateDict sd;
        sd.insert("rank", r);
        writer.write(path, sd);
        // Read right when this rank's save returned.
        const auto marker = ckpt::read_commit_marker(path);
        return marker ? static_cast<std::int64_t>(marker->files.size()) : -1;
      }));
      for (std::int64_t r = 0; r < kWorld; ++r)
        BOOST_TEST(of_rank(seen, r) == kWorld,
                   "rank " << r << " saw a marker of " << of_rank(seen, r) << " files");
      BOOST_TEST(ckpt::is_committed(path));
    }
  }
  leave_group(handles);
}

BOOST_AUTO_TEST_CASE(timeout_names_the_rank_that_did_not_arrive) {
  // A group of its own: a Gloo group whose collective timed out is not reused.
  // Its own timeout bounds how long the collectives left behind keep it busy.
  auto handles = gloo_group(free_port(), 10s);
  // Rank 2 is in the group but never calls the barrier.
  std::latch start(3);
  auto outcomes = on_ranks({0, 1, 3}, [&](std::int64_t r) {
    ckpt::dist::DistBarrier barrier(of_rank(handles, r), 2s);
    start.arrive_and_wait();
    barrier.execute_barrier();
  });
  const std::vector<std::int64_t> waited{0, 1, 3};
  for (std::size_t i = 0; i < outcomes.size(); ++i) {
    BOOST_TEST_CONTEXT("rank " << waited[i]) {
      BOOST_CHECK_EXCEPTION(outcomes[i].get(), ckpt::Timeout, [&](const ckpt::Timeout& e) {
        BOOST_TEST_MESSAGE(e.what());
        return mentions(e, "Timed out") && mentions(e, "did not arrive: [2]") &&
               mentions(e, fmt::format("rank {} of 4", waited[i]));
      });
    }
  }
  leave_group(handles);
}

BOOST_AUTO_TEST_SUITE_END()
