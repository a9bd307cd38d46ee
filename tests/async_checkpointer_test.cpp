// AsyncCheckpointer with real parts: a real ckpt-writer child, real files, real
// Asio completion tokens. What a user relies on:
//   - every completion token works (use_awaitable from an io_context run by one
//     thread or by two, use_future, deferred, a plain callback), and a save
//     cancelled before staging starts fails with operation_aborted and writes
//     nothing; saves started together are sequenced, each writing its own state;
//   - a save is a snapshot: once staged, the trainer may change its tensors;
//   - a child killed in the middle of a multi-GiB write fails that write with a
//     message naming the signal and the path, leaves nothing at the path and
//     no temporary file, keeps earlier checkpoints, and is replaced; close()
//     leaves no process and no shared memory behind;
//   - a write error in the child keeps its type and is reported once more, to
//     the next save;
//   - a hundred saves leave memory, descriptors and /dev/shm where they were,
//     and the arena is the file's size rounded to pages.
#include <ckpt/async_checkpointer.hpp>

#define BOOST_TEST_MODULE async_checkpointer_test
#include <boost/test/unit_test.hpp>

#include <ckpt/error.hpp>
#include <ckpt/format.hpp>
#include <ckpt/staging.hpp>

#include "support/dir_watch.hpp"
#include "support/io_threads.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <boost/core/demangle.hpp>
#include <boost/system/system_error.hpp>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <typeinfo>
#include <vector>

#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

namespace asio = boost::asio;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using c10::IValue;
using ckpt::test::identical;
using ckpt::test::TempDir;

using ckpt::test::child_processes;
using ckpt::test::DirWatch;
using ckpt::test::IoThreads;
using ckpt::test::kWaitBound;
using ckpt::test::mentions;
using ckpt::test::process_gone;
using ckpt::test::wait_get;

namespace {

const ckpt::RankInfo kRank{0, 1};

/// Waits for `f` and returns the type of the exception it holds ("" when it
/// holds none), its message in `what`.
std::string error_of(std::future<void>& f, std::string& what) {
  try {
    wait_get(f);
  } catch (const std::exception& e) {
    what = e.what();
    return boost::core::demangle(typeid(e).name());
  }
  what.clear();
  return {};
}

fs::path file_in(const fs::path& dir) {
  return dir / "checkpoint_0.pt";
}

/// No pinned memory on a CPU build: the arena is the same memfd either way, and
/// the tests need not depend on `ulimit -l`.
ckpt::CheckpointerConfig config() {
  ckpt::CheckpointerConfig c;
  c.staging_config.use_pinned_memory = at::hasCUDA();
  c.staging_config.use_non_blocking_copy = at::hasCUDA();
  return c;
}

/// Every kind of value a trainer's state dict holds.
ckpt::StateDict make_state_dict(double seed) {
  ckpt::StateDict model;
  model.insert("weight", at::randn({5, 10}));
  model.insert("bias", at::randn({5}));
  ckpt::StateDict sd;
  sd.insert("model", model);
  sd.insert("steps", at::arange(1000, at::kLong));
  sd.insert("half", at::randn({7, 3}).to(at::kBFloat16));
  sd.insert("mask", at::rand({64}) > 0.5);
  sd.insert("epoch", 5);
  sd.insert("lr", seed);
  sd.insert("name", "resnet");
  sd.insert("ema", true);
  sd.insert("nothing", IValue());
  return sd;
}

/// Deep equality of two saved/loaded values: tensors bit-identical, scalars
/// equal, containers element by element.
bool same_value(const IValue& a, const IValue& b) {
  if (a.isTensor()) return b.isTensor() && identical(a.toTensor(), b.toTensor());
  if (a.isGenericDict()) {
    if (!b.isGenericDict()) return false;
    const auto da = a.toGenericDict();
    const auto db = b.toGenericDict();
    if (da.size() != db.size()) return false;
    for (const auto& e : da) {
      const auto it = db.find(e.key());
      if (it == db.end() || !same_value(e.value(), it->value())) return false;
    }
    return true;
  }
  if (a.isList()) {
    if (!b.isList()) return false;
    const auto la = a.toListRef();
    const auto lb = b.toListRef();
    if (la.size() != lb.size()) return false;
    for (std::size_t i = 0; i < la.size(); ++i)
      if (!same_value(la[i], lb[i])) return false;
    return true;
  }
  if (a.isTuple()) {
    if (!b.isTuple()) return false;
    const auto& ta = a.toTupleRef().elements();
    const auto& tb = b.toTupleRef().elements();
    if (ta.size() != tb.size()) return false;
    for (std::size_t i = 0; i < ta.size(); ++i)
      if (!same_value(ta[i], tb[i])) return false;
    return true;
  }
  if (a.isNone()) return b.isNone();
  if (a.isBool()) return b.isBool() && a.toBool() == b.toBool();
  if (a.isInt()) return b.isInt() && a.toInt() == b.toInt();
  if (a.isDouble()) return b.isDouble() && a.toDouble() == b.toDouble();
  if (a.isString()) return b.isString() && a.toStringRef() == b.toStringRef();
  return false;
}

bool same_state(const ckpt::StateDict& a, const ckpt::StateDict& b) {
  return same_value(a.to_ivalue(), b.to_ivalue());
}

/// A deep copy: every tensor cloned, so later in-place changes do not reach it.
IValue deep_clone(const IValue& v) {
  if (v.isTensor()) return v.toTensor().clone();
  if (v.isGenericDict()) {
    const auto src = v.toGenericDict();
    c10::impl::GenericDict out(src.keyType(), src.valueType());
    for (const auto& e : src) out.insert(e.key(), deep_clone(e.value()));
    return out;
  }
  return v;
}

/// What is in the checkpoint file at `dir` (read with the format's own reader).
ckpt::StateDict read_back(const fs::path& dir) {
  return ckpt::StateDict::from_ivalue(ckpt::read_file(file_in(dir)));
}

/// A checkpointer on an io_context of the test's own, run by `threads` threads.
/// (Not the builder without an executor: destroying what it builds frees its
/// io_context before the strands and the socket that belong to it.)
struct Running {
  asio::io_context io;
  std::unique_ptr<ckpt::AsyncCheckpointer> ck;
  std::optional<IoThreads> threads;

  explicit Running(const ckpt::CheckpointerConfig& cfg = config(), int n = 1)
      : ck(ckpt::make_async_checkpointer(io.get_executor(), cfg, kRank)) {
    threads.emplace(io, n);
  }
  ~Running() {
    if (ck) ck->close();
    threads.reset();
    ck.reset();
  }
  Running(const Running&) = delete;
  Running& operator=(const Running&) = delete;
};

/// Names in a directory.
std::set<std::string> entries(const fs::path& dir) {
  std::set<std::string> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    out.insert(it->path().filename().string());
  return out;
}

/// Where this process's open descriptors point.
std::vector<std::string> fd_targets(const fs::path& fd_dir = "/proc/self/fd") {
  std::vector<std::string> out;
  std::error_code ec;
  for (fs::directory_iterator it(fd_dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code link_ec;
    const auto target = fs::read_symlink(it->path(), link_ec);
    out.push_back(link_ec ? std::string("?") : target.string());
  }
  return out;
}

/// Whether this process holds the staging arena's memfd.
bool holds_arena_memfd() {
  for (const auto& t : fd_targets())
    if (t.find("/memfd:ckpt-arena") != std::string::npos) return true;
  return false;
}

/// VmRSS of /proc/<pid>/status, in bytes.
std::uint64_t rss_bytes(const std::string& pid = "self") {
  std::ifstream status("/proc/" + pid + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      std::istringstream in(line.substr(6));
      std::uint64_t kib = 0;
      in >> kib;
      return kib * 1024;
    }
  }
  BOOST_FAIL("no VmRSS in /proc/" << pid << "/status");
  return 0;
}

std::uint64_t round_to_page(std::uint64_t n) {
  return (n + 4095) / 4096 * 4096;
}

}  // namespace

// Freed heap memory is filled with a pattern (glibc's M_PERTURB), so that a
// use-after-free in the library shows as a failure every time instead of now
// and then.
struct PerturbFreedMemory {
  PerturbFreedMemory() { ::mallopt(M_PERTURB, 0xbe); }
};
BOOST_TEST_GLOBAL_FIXTURE(PerturbFreedMemory);

// --- 3. Coroutines and completion tokens ----------------------------------------

BOOST_AUTO_TEST_CASE(co_await_save_and_write_on_an_io_context_run_by_one_thread) {
  TempDir tmp;
  asio::io_context io;
  auto ck = ckpt::make_async_checkpointer(io.get_executor(), config(), kRank);
  const auto first = make_state_dict(0.1);
  const auto second = make_state_dict(0.2);

  // The test's own thread is the only one that runs the io_context: staging,
  // the child's answer and both resumptions all run there.
  auto done = asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto written = co_await ck->async_save(tmp / "one", first, {}, asio::use_awaitable);
        BOOST_CHECK(written.path() == tmp / "one");
        co_await written.async_wait(asio::use_awaitable);
        BOOST_CHECK(written.done());
        // The next save right away: it waits for nothing but its own write.
        auto again = co_await ck->async_save(tmp / "two", second, {}, asio::use_awaitable);
        co_await again.async_wait(asio::use_awaitable);
        ck->close();  // blocking, and fine here: no write is in flight
      },
      asio::use_future);
  io.run_for(kWaitBound);
  BOOST_REQUIRE_MESSAGE(io.stopped(), "the io_context did not run dry: the checkpointer left work behind");
  BOOST_REQUIRE(done.wait_for(0s) == std::future_status::ready);
  done.get();

  BOOST_CHECK(same_state(read_back(tmp / "one"), first));
  BOOST_CHECK(same_state(read_back(tmp / "two"), second));
}

BOOST_AUTO_TEST_CASE(co_await_save_and_write_on_an_io_context_run_by_two_threads) {
  TempDir tmp;
  asio::io_context io;
  auto ck = ckpt::make_async_checkpointer(io.get_executor(), config(), kRank);
  std::vector<ckpt::StateDict> states;
  for (int i = 0; i < 4; ++i) states.push_back(make_state_dict(i));
  {
    // Two threads run the io_context: the coroutine may resume on either.
    IoThreads threads(io, 2);
    auto done = asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          for (int i = 0; i < 4; ++i) {
            const auto dir = tmp / ("step_" + std::to_string(i));
            auto written = co_await ck->async_save(dir, states[i], {}, asio::use_awaitable);
            co_await written.async_wait(asio::use_awaitable);
          }
        },
        asio::use_future);
    wait_get(done);
    ck->close();
  }
  for (int i = 0; i < 4; ++i) {
    const auto dir = tmp / ("step_" + std::to_string(i));
    BOOST_CHECK_MESSAGE(same_state(read_back(dir), states[i]), dir);
    BOOST_CHECK_MESSAGE(same_state(ck->load(dir), states[i]), dir);  // load works after close
  }
}

BOOST_AUTO_TEST_CASE(saves_started_together_are_sequenced_and_each_writes_its_own_state) {
  TempDir tmp;
  asio::io_context io;
  auto ck = ckpt::make_async_checkpointer(io.get_executor(), config(), kRank);
  // Three saves initiated before the io_context runs (as two coroutines of a
  // trainer may do): the checkpointer sequences them on its strand. Each is
  // ~8 MiB, so that one staged over another's image would show in the files.
  std::vector<ckpt::StateDict> states(3);
  std::vector<std::future<ckpt::PendingWrite>> staged;
  for (int i = 0; i < 3; ++i) {
    states[i].insert("weights", at::full({2 << 20}, float(i)));
    states[i].insert("step", i);
    staged.push_back(ck->async_save(tmp / ("step_" + std::to_string(i)), states[i], {}, asio::use_future));
  }
  {
    IoThreads threads(io, 2);
    for (int i = 0; i < 3; ++i) {
      try {
        auto written = wait_get(staged[i]);
        auto durable = written.async_wait(asio::use_future);
        wait_get(durable);
      } catch (const std::exception& e) {
        BOOST_ERROR("save " << i << " failed: " << e.what());
      }
    }
    ck->close();
  }
  for (int i = 0; i < 3; ++i) {
    const auto dir = tmp / ("step_" + std::to_string(i));
    if (fs::exists(file_in(dir)))
      BOOST_CHECK_MESSAGE(same_state(read_back(dir), states[i]),
                          dir << " does not hold save " << i << "'s state");
    else
      BOOST_ERROR("nothing written at " << dir);
  }
}

BOOST_AUTO_TEST_CASE(use_future_gives_a_future_of_the_pending_write) {
  TempDir tmp;
  asio::io_context io;
  auto ck = ckpt::make_async_checkpointer(io.get_executor(), config(), kRank);
  const auto sd = make_state_dict(0.3);
  {
    IoThreads threads(io, 1);
    std::future<ckpt::PendingWrite> staged = ck->async_save(tmp / "future", sd, {}, asio::use_future);
    ckpt::PendingWrite written = wait_get(staged);
    BOOST_CHECK(written.path() == tmp / "future");
    std::future<void> durable = written.async_wait(asio::use_future);
    BOOST_CHECK_NO_THROW(wait_get(durable));
    BOOST_CHECK(written.done());
    // Waiting again on a completed write completes at once, with its outcome.
    std::future<void> again = written.async_wait(asio::use_future);
    BOOST_CHECK_NO_THROW(wait_get(again));
    ck->close();
  }
  BOOST_CHECK(same_state(read_back(tmp / "future"), sd));
}

BOOST_AUTO_TEST_CASE(deferred_operations_run_when_invoked_with_a_token) {
  TempDir tmp;
  asio::io_context io;
  auto ck = ckpt::make_async_checkpointer(io.get_executor(), config(), kRank);
  const auto by_awaitable = make_state_dict(0.4);
  const auto by_callback = make_state_dict(0.5);
  {
    IoThreads threads(io, 1);
    // Deferred: nothing starts until the operation is invoked.
    auto op = ck->async_save(tmp / "deferred_awaitable", by_awaitable, {}, asio::deferred);
    auto done = asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          auto written = co_await std::move(op)(asio::use_awaitable);
          co_await written.async_wait(asio::deferred)(asio::use_awaitable);
        },
        asio::use_future);
    wait_get(done);

    // The same with callbacks as the final tokens.
    std::promise<std::exception_ptr> staged, durable;
    auto cb_op = ck->async_save(tmp / "deferred_callback", by_callback, {}, asio::deferred);
    BOOST_CHECK(!fs::exists(tmp / "deferred_callback"));
    std::move(cb_op)([&](std::exception_ptr e, ckpt::PendingWrite written) {
      staged.set_value(e);
      if (e) {
        durable.set_value(e);
        return;
      }
      written.async_wait(asio::deferred)([&](std::exception_ptr we) { durable.set_value(we); });
    });
    auto staged_f = staged.get_future();
    auto durable_f = durable.get_future();
    BOOST_CHECK(wait_get(staged_f) == nullptr);
    BOOST_CHECK(wait_get(durable_f) == nullptr);
    ck->close();
  }
  BOOST_CHECK(same_state(read_back(tmp / "deferred_awaitable"), by_awaitable));
  BOOST_CHECK(same_state(read_back(tmp / "deferred_callback"), by_callback));
}

BOOST_AUTO_TEST_CASE(a_plain_callback_token_gets_the_pending_write_and_the_outcome) {
  TempDir tmp;
  asio::io_context io;
  auto ck = ckpt::make_async_checkpointer(io.get_executor(), config(), kRank);
  const auto sd = make_state_dict(0.6);
  {
    IoThreads threads(io, 1);
    std::promise<std::exception_ptr> staged, durable;
    ck->async_save(tmp / "callback", sd, {}, [&](std::exception_ptr e, ckpt::PendingWrite written) {
      staged.set_value(e);
      if (e) {
        durable.set_value(e);
        return;
      }
      written.async_wait([&](std::exception_ptr we) { durable.set_value(we); });
    });
    auto staged_f = staged.get_future();
    auto durable_f = durable.get_future();
    BOOST_CHECK(wait_get(staged_f) == nullptr);
    BOOST_CHECK(wait_get(durable_f) == nullptr);
    ck->close();
  }
  BOOST_CHECK(same_state(read_back(tmp / "callback"), sd));
}

BOOST_AUTO_TEST_CASE(a_save_cancelled_before_staging_starts_fails_with_operation_aborted_and_writes_nothing) {
  TempDir tmp;
  asio::io_context io;
  auto ck = ckpt::make_async_checkpointer(io.get_executor(), config(), kRank);
  const auto sd = make_state_dict(0.7);
  const fs::path cancelled = tmp / "cancelled";

  // The save is initiated and cancelled before the io_context runs anything:
  // staging has not started when the cancellation arrives.
  asio::cancellation_signal signal;
  std::promise<std::pair<std::exception_ptr, ckpt::PendingWrite>> outcome;
  ck->async_save(cancelled, sd, {},
                 asio::bind_cancellation_slot(signal.slot(), [&](std::exception_ptr e, ckpt::PendingWrite w) {
                   outcome.set_value({e, std::move(w)});
                 }));
  signal.emit(asio::cancellation_type::all);

  {
    IoThreads threads(io, 1);
    auto outcome_f = outcome.get_future();
    auto [error, written] = wait_get(outcome_f);
    BOOST_CHECK_MESSAGE(error != nullptr, "the cancelled save completed without an error");
    if (error) {
      try {
        std::rethrow_exception(error);
      } catch (const boost::system::system_error& e) {
        BOOST_CHECK_EQUAL(e.code(), boost::system::error_code(asio::error::operation_aborted));
      } catch (const std::exception& e) {
        BOOST_ERROR("expected operation_aborted as boost::system::system_error, got: " << e.what());
      }
    } else {
      // It went ahead after all: let its write finish, so that what follows
      // sees its final outcome.
      auto durable = written.async_wait(asio::use_future);
      try {
        wait_get(durable);
      } catch (const std::exception&) {
      }
    }

    // The checkpointer goes on: the next save works (and is not told about
    // the cancelled one).
    auto next = ck->async_save(tmp / "next", sd, {}, asio::use_future);
    auto next_written = wait_get(next);
    auto next_durable = next_written.async_wait(asio::use_future);
    BOOST_CHECK_NO_THROW(wait_get(next_durable));
    ck->close();
  }
  BOOST_CHECK_MESSAGE(!fs::exists(cancelled), "the cancelled save wrote " << cancelled);
  BOOST_CHECK(same_state(read_back(tmp / "next"), sd));
}

// --- 4. Snapshot semantics ---------------------------------------------------

BOOST_AUTO_TEST_CASE(tensors_changed_after_staging_do_not_change_what_is_written) {
  TempDir tmp;
  Running running;
  auto& ck = running.ck;
  // Big enough (~32 MiB) that the write is still going on while the tensors change.
  ckpt::StateDict sd;
  sd.insert("weight", at::randn({2048, 2048}));
  sd.insert("bias", at::randn({2048}));
  sd.insert("counts", at::arange(1 << 20, at::kLong));
  const auto view = at::randn({64, 64});
  sd.insert("view", view.narrow(0, 8, 16));  // a view with an offset into its storage
  sd.insert("step", 100);
  const auto before = ckpt::StateDict::from_ivalue(deep_clone(sd.to_ivalue()));

  auto first = ck->async_save(tmp / "step_100", sd, {}, asio::use_future);
  ckpt::PendingWrite first_written = wait_get(first);
  // Staged: the trainer changes everything at once, in place, as an optimizer
  // step does.
  sd.at("weight").toTensor().fill_(42.0f);
  sd.at("bias").toTensor().add_(1.0f);
  sd.at("counts").toTensor().mul_(-1);
  view.fill_(-7.0f);
  sd.insert("step", 101);
  const auto after = ckpt::StateDict::from_ivalue(deep_clone(sd.to_ivalue()));
  BOOST_REQUIRE(!same_state(after, before));  // the changes did take place

  // Saved again without waiting for the first write: staging into the same
  // arena must not touch what the first write still reads.
  auto second = ck->async_save(tmp / "step_101", sd, {}, asio::use_future);
  ckpt::PendingWrite second_written = wait_get(second);
  sd.at("weight").toTensor().zero_();
  view.add_(3.0f);

  auto first_durable = first_written.async_wait(asio::use_future);
  auto second_durable = second_written.async_wait(asio::use_future);
  BOOST_CHECK_NO_THROW(wait_get(first_durable));
  BOOST_CHECK_NO_THROW(wait_get(second_durable));
  ck->close();

  BOOST_CHECK(same_state(read_back(tmp / "step_100"), before));
  BOOST_CHECK(same_state(read_back(tmp / "step_101"), after));
}

// --- 6. Memory stays flat -----------------------------------------------------

BOOST_AUTO_TEST_CASE(a_hundred_saves_leave_memory_descriptors_and_shared_memory_flat) {
  TempDir tmp;
  Running running;
  auto& ck = running.ck;
  auto* stager = dynamic_cast<ckpt::DefaultStager*>(&ck->stager());
  BOOST_REQUIRE(stager != nullptr);

  // ~64 MiB: 8 tensors of 8 MiB, and the small things a state dict has.
  ckpt::StateDict sd;
  for (int i = 0; i < 8; ++i) sd.insert("layer" + std::to_string(i), at::randn({2 << 20}));
  sd.insert("epoch", 3);
  const fs::path dirs[2] = {tmp / "even", tmp / "odd"};

  std::uint64_t rss = 0;
  std::size_t fds = 0, child_fds = 0;
  std::set<std::string> shm;
  int child = -1;
  for (int i = 0; i < 100; ++i) {
    auto f = ck->save(dirs[i % 2], sd);
    wait_get(f.staged);
    wait_get(f.written);
    if (i == 1) {
      rss = rss_bytes();
      fds = fd_targets().size();
      shm = entries("/dev/shm");
      child = ck->process().pid();
      child_fds = fd_targets("/proc/" + std::to_string(child) + "/fd").size();
      BOOST_TEST_MESSAGE("after the second save: VmRSS " << rss / (1 << 20) << " MiB, " << fds << " fds");
    }
  }
  const std::uint64_t rss_end = rss_bytes();
  BOOST_TEST_MESSAGE("after the hundredth save: VmRSS " << rss_end / (1 << 20) << " MiB");
  BOOST_CHECK_LE(rss_end, rss + (std::uint64_t{32} << 20));
  BOOST_CHECK_EQUAL(fd_targets().size(), fds);
  BOOST_CHECK(entries("/dev/shm") == shm);
  // One child did all of it, and holds no more descriptors than after the
  // second save. (It closes the arena's memfd that came with a request just
  // after answering, so either count may include that one.)
  BOOST_CHECK_EQUAL(ck->process().pid(), child);
  BOOST_CHECK_LE(fd_targets("/proc/" + std::to_string(child) + "/fd").size(), child_fds + 1);

  // The arena is the file's size rounded to pages.
  const std::uint64_t file_size = fs::file_size(file_in(dirs[1]));
  BOOST_CHECK_EQUAL(stager->arena_size(), round_to_page(file_size));
  BOOST_CHECK_EQUAL(ckpt::checkpoint_file_size(sd), file_size);
  BOOST_CHECK(same_state(read_back(dirs[1]), sd));
  ck->close();
}

// --- 5. Faults ----------------------------------------------------------------

BOOST_AUTO_TEST_CASE(a_child_killed_in_the_middle_of_a_large_write_fails_that_write_only) {
  TempDir tmp;
  const auto shm_before = entries("/dev/shm");
  // The child's death must be noticed as such, not as a write that timed out:
  // the write timeout (an hour by default) is shortened only so that a
  // checkpointer that misses the death fails this test in seconds.
  auto cfg = config();
  cfg.process_config.write_timeout = 30s;
  // The writer children started here run as on a filesystem without unnamed
  // files (the tests' injector refuses O_TMPFILE), so that the temporary file
  // has a name from its first byte: the test sees it appear, and sees the
  // parent remove it once the child is dead.
  struct NamedTemporaries {
    NamedTemporaries() {
      ::setenv("LD_PRELOAD", CKPT_FAULT_SHIM, 1);
      ::setenv("CKPT_FAULT_NO_TMPFILE", "1", 1);
    }
    ~NamedTemporaries() {
      ::unsetenv("LD_PRELOAD");
      ::unsetenv("CKPT_FAULT_NO_TMPFILE");
    }
  } named;
  Running running(cfg);
  auto& ck = running.ck;

  // An earlier checkpoint, in another directory.
  const auto small = make_state_dict(0.8);
  auto previous = ck->save(tmp / "previous", small);
  wait_get(previous.written);
  const int first_child = ck->process().pid();
  BOOST_REQUIRE_GT(first_child, 0);

  // 2 GiB: 16 tensors of 128 MiB. Its write takes a good part of a second or
  // more; the child is killed as soon as it has created its temporary file,
  // which the test learns from inotify, not from a clock.
  ckpt::StateDict big;
  for (int i = 0; i < 16; ++i) big.insert("t" + std::to_string(i), at::full({32 << 20}, float(i)));
  const fs::path killed = tmp / "killed";
  fs::create_directories(killed);
  DirWatch watch(killed);
  auto big_save = ck->save(killed, big);
  BOOST_REQUIRE_NO_THROW(wait_get(big_save.staged));
  const std::string temp = watch.wait_created(".checkpoint_0.pt.tmp", kWaitBound);
  BOOST_REQUIRE_MESSAGE(!temp.empty(), "the child never created its temporary file");
  BOOST_REQUIRE_EQUAL(::kill(first_child, SIGKILL), 0);

  std::string error;
  BOOST_CHECK_MESSAGE(error_of(big_save.written, error) == "ckpt::WriterProcessError",
                      "the killed write: " << error);
  BOOST_TEST_MESSAGE("the killed write: " << error);
  BOOST_CHECK(error.find("Child process terminated unexpectedly") != std::string::npos);
  BOOST_CHECK(error.find("signal 9") != std::string::npos);
  BOOST_CHECK(error.find(killed.string()) != std::string::npos);
  BOOST_CHECK(!fs::exists(file_in(killed)));
  const auto left = entries(killed);
  BOOST_CHECK_MESSAGE(left.empty(), "left in " << killed << ": " << (left.empty() ? "" : *left.begin()));
  BOOST_CHECK(process_gone(first_child));  // reaped, not a zombie

  // The earlier checkpoint is untouched.
  BOOST_CHECK(same_state(read_back(tmp / "previous"), small));
  BOOST_CHECK(same_state(ck->load(tmp / "previous"), small));

  // The next save is told, once, that the previous write failed; it writes nothing.
  auto told = ck->save(tmp / "told", small);
  std::string told_error;
  BOOST_CHECK_EQUAL(error_of(told.staged, told_error), "ckpt::WriterProcessError");
  BOOST_CHECK_EQUAL(told_error, error);
  BOOST_CHECK_EQUAL(error_of(told.written, told_error), "ckpt::WriterProcessError");
  BOOST_CHECK(!fs::exists(tmp / "told"));

  // The one after succeeds, with a new child.
  auto after = ck->save(tmp / "after", small);
  BOOST_CHECK_NO_THROW(wait_get(after.staged));
  BOOST_CHECK_NO_THROW(wait_get(after.written));
  BOOST_CHECK(same_state(read_back(tmp / "after"), small));
  const int second_child = ck->process().pid();
  BOOST_CHECK_GT(second_child, 0);
  BOOST_CHECK_NE(second_child, first_child);

  // close(): no child, no shared memory.
  BOOST_CHECK(holds_arena_memfd());  // (what the checks below look for is there before)
  ck->close();
  BOOST_CHECK(process_gone(first_child));
  BOOST_CHECK(process_gone(second_child));
  BOOST_CHECK_MESSAGE(child_processes().empty(), "a child process remains after close()");
  BOOST_CHECK_MESSAGE(!holds_arena_memfd(), "the arena's memfd is still open after close()");
  ck.reset();
  BOOST_CHECK_MESSAGE(!holds_arena_memfd(), "the arena's memfd is still open after destruction");
  BOOST_CHECK(child_processes().empty());
  BOOST_CHECK(entries("/dev/shm") == shm_before);
}

BOOST_AUTO_TEST_CASE(a_write_error_in_the_child_keeps_its_type_and_is_reported_to_the_next_save_once) {
  TempDir tmp;
  Running running;
  auto& ck = running.ck;
  const auto sd = make_state_dict(0.9);

  // A checkpoint directory whose parent is a regular file: the child cannot
  // create it.
  { std::ofstream(tmp / "blocker") << "not a directory"; }
  const fs::path bad = tmp / "blocker" / "step_1";
  std::string message;
  {
    auto written = ck->async_save(bad, sd, {}, asio::use_future);
    ckpt::PendingWrite pending = wait_get(written);  // staging succeeds
    const int child = ck->process().pid();
    auto durable = pending.async_wait(asio::use_future);
    BOOST_CHECK_EXCEPTION(wait_get(durable), ckpt::IoError, [&](const ckpt::IoError& e) {
      message = e.what();
      BOOST_TEST_MESSAGE("the failed write: " << message);
      return mentions(e, bad.string());
    });
    BOOST_CHECK_EQUAL(ck->process().pid(), child);  // an error of its own does not end the child
  }

  // The next save fails with that same error, at once, and writes nothing.
  auto next = ck->save(tmp / "next", sd);
  BOOST_CHECK_EXCEPTION(wait_get(next.staged), ckpt::IoError,
                        [&](const ckpt::IoError& e) { return e.what() == message; });
  BOOST_CHECK_EXCEPTION(wait_get(next.written), ckpt::IoError,
                        [&](const ckpt::IoError& e) { return e.what() == message; });
  BOOST_CHECK(!fs::exists(tmp / "next"));

  // The one after succeeds.
  auto after = ck->save(tmp / "after", sd);
  BOOST_CHECK_NO_THROW(wait_get(after.staged));
  BOOST_CHECK_NO_THROW(wait_get(after.written));
  BOOST_CHECK(same_state(read_back(tmp / "after"), sd));
  ck->close();
}

// --- Waiting on a write with a deadline, and the child's error types ---------------

/// A checkpointer whose child is the tests' own writer (tests/support/test_writer):
/// its pre_commit obeys the save's `hold_fifo` and `throw` arguments.
std::unique_ptr<ckpt::AsyncCheckpointer> with_test_writer(asio::io_context& io) {
  ckpt::WriterOptions options;
  options.executable = fs::canonical("/proc/self/exe").parent_path() / "test_writer";
  return ckpt::make_async_checkpointer(io.get_executor(), config(), kRank, options);
}

BOOST_AUTO_TEST_CASE(a_wait_raced_against_a_timer_returns_at_the_timer_and_the_write_goes_on) {
  using namespace asio::experimental::awaitable_operators;
  TempDir tmp;
  const fs::path fifo = tmp / "release";
  BOOST_REQUIRE_EQUAL(::mkfifo(fifo.c_str(), 0600), 0);
  asio::io_context io;
  auto ck = with_test_writer(io);
  const auto sd = make_state_dict(1.3);
  int release = -1;  // the test's end of the FIFO: writing a byte lets the child's pre_commit return
  std::size_t winner = 0;
  bool done_at_timer = true, done_at_end = false;
  // Made outside the coroutine: GCC 12 cannot put an initializer list's array
  // in a coroutine frame.
  const ckpt::Kwargs hold{{"hold_fifo", fifo.string()}};

  auto done = asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto written = co_await ck->async_save(tmp / "held", sd, hold, asio::use_awaitable);
        // The child holds the write in pre_commit until the FIFO yields a byte.
        asio::steady_timer timer(co_await asio::this_coro::executor, 50ms);
        auto first =
            co_await (written.async_wait(asio::use_awaitable) || timer.async_wait(asio::use_awaitable));
        winner = first.index();
        done_at_timer = written.done();
        // Release it (O_RDWR never blocks on a FIFO; kept open until the write
        // is done, so the byte waits for the child however late it opens).
        release = ::open(fifo.c_str(), O_RDWR | O_CLOEXEC);
        if (release < 0 || ::write(release, "x", 1) != 1)
          throw std::runtime_error("cannot release the write");
        co_await written.async_wait(asio::use_awaitable);  // the same write, now durable
        done_at_end = written.done();
      },
      asio::use_future);
  io.run_for(kWaitBound);
  if (release >= 0) ::close(release);
  BOOST_REQUIRE(done.wait_for(0s) == std::future_status::ready);
  done.get();
  BOOST_CHECK_EQUAL(winner, 1u);  // the timer's branch won; the wait was cancelled
  BOOST_CHECK(!done_at_timer);    // and the write went on
  BOOST_CHECK(done_at_end);       // until it completed
  BOOST_CHECK(same_state(read_back(tmp / "held"), sd));
  ck->close();
}

BOOST_AUTO_TEST_CASE(a_ckpt_error_thrown_by_a_custom_writer_in_the_child_arrives_as_that_type) {
  TempDir tmp;
  asio::io_context io;
  IoThreads threads(io, 1);
  auto ck = with_test_writer(io);
  const auto sd = make_state_dict(1.4);
  // Each kind the child throws arrives in the parent as exactly that type.
  const std::vector<std::pair<std::string, std::string>> kinds = {
      {"Error", boost::core::demangle(typeid(ckpt::Error).name())},
      {"Mismatch", boost::core::demangle(typeid(ckpt::Mismatch).name())},
      {"Unsupported", boost::core::demangle(typeid(ckpt::Unsupported).name())},
      {"Timeout", boost::core::demangle(typeid(ckpt::Timeout).name())},
      {"IoError", boost::core::demangle(typeid(ckpt::IoError).name())},
      // What is not ckpt's own is the writer process's error, with its text.
      {"foreign", boost::core::demangle(typeid(ckpt::WriterProcessError).name())},
  };
  int n = 0;
  for (const auto& [kind, type] : kinds) {
    const fs::path dir = tmp / fmt::format("save_{}", n++);
    auto futures = ck->save(dir, sd, ckpt::Kwargs{{"throw", kind}});
    BOOST_CHECK_NO_THROW(wait_get(futures.staged));
    std::string what;
    BOOST_CHECK_EQUAL(error_of(futures.written, what), type);
    BOOST_CHECK_MESSAGE(
        what.find("pre_commit of " + dir.string() + " failed on purpose") != std::string::npos,
        kind << ": " << what);
    // The error is reported once more, to the next save (as any write error):
    // take it here so the next kind's save starts clean.
    auto next = ck->save(tmp / "after", sd);
    std::string again;
    BOOST_CHECK_EQUAL(error_of(next.written, again), type);
  }
  ck->close();
}

// --- The builder without an executor -------------------------------------------

// Destroying what this builder makes must release the strands and the socket
// before its own io_context (a use-after-free once; under valgrind the child
// does not start, pidfd_open is not emulated, but destruction is still checked:
//   valgrind bin/async_checkpointer_test --run_test=<this name>).
BOOST_AUTO_TEST_CASE(the_builder_without_an_executor_saves_closes_and_is_destroyed_cleanly) {
  TempDir tmp;
  const auto sd = make_state_dict(1.1);
  auto ck = ckpt::make_async_checkpointer(config(), kRank);
  auto f = ck->save(tmp / "own", sd);
  BOOST_CHECK_NO_THROW(wait_get(f.staged));
  BOOST_CHECK_NO_THROW(wait_get(f.written));
  const int child = ck->process().pid();
  BOOST_CHECK_GT(child, 0);
  ck->close();
  ck.reset();
  if (child > 0) BOOST_CHECK(process_gone(child));
  BOOST_CHECK(!holds_arena_memfd());
  BOOST_CHECK(same_state(read_back(tmp / "own"), sd));
}
