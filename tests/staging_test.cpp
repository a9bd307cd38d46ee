// DefaultStager, ported from upstream's test_staging.py (test names kept); and
// beyond upstream: the staged state is checked value by value through
// StagedCheckpoint::state_dict (which aliases the arena), the arena is reused,
// grown and reserved as documented, storage sharing survives staging, and a
// staged state is a snapshot the trainer may overwrite.
#include <ckpt/staging.hpp>

#define BOOST_TEST_MODULE staging_test
#include <boost/test/unit_test.hpp>

#include "async/arena.hpp"
#include "support/io_threads.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <future>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using c10::IValue;
using ckpt::test::identical;

using ckpt::test::IoThread;
using ckpt::test::kWaitBound;
using ckpt::test::list_of;
using ckpt::test::mentions;
namespace {

std::uint64_t round_to_pages(std::uint64_t bytes) {
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  return (bytes + page - 1) / page * page;
}

/// torch.nn.Linear(in, out).state_dict(): weight out x in, bias out.
ckpt::StateDict linear_state(std::int64_t in, std::int64_t out) {
  ckpt::StateDict sd;
  sd.insert("weight", at::randn({out, in}));
  sd.insert("bias", at::randn({out}));
  return sd;
}

/// torch.nn.Conv2d(3, 16, 3).state_dict(): weight 16x3x3x3, bias 16.
ckpt::StateDict conv2d_state() {
  ckpt::StateDict sd;
  sd.insert("weight", at::randn({16, 3, 3, 3}));
  sd.insert("bias", at::randn({16}));
  return sd;
}

/// upstream's setUp: {"model": Linear(10, 5).state_dict(), "optimizer":
/// {"param_groups": [{"lr": 0.01}]}, "epoch": 5, "step": 1000, "tensor":
/// randn(3, 4), "nested": {"inner_tensor": ones(2, 2), "inner_value": 42}}
ckpt::StateDict make_state_dict() {
  ckpt::StateDict group;
  group.insert("lr", 0.01);
  ckpt::StateDict optimizer;
  optimizer.insert("param_groups", list_of({group.to_ivalue()}));
  ckpt::StateDict nested;
  nested.insert("inner_tensor", at::ones({2, 2}));
  nested.insert("inner_value", 42);
  ckpt::StateDict sd;
  sd.insert("model", linear_state(10, 5));
  sd.insert("optimizer", optimizer);
  sd.insert("epoch", 5);
  sd.insert("step", 1000);
  sd.insert("tensor", at::randn({3, 4}));
  sd.insert("nested", nested);
  return sd;
}

/// Whether two values are equal all the way down: tensors bit-identical, dicts
/// with the same keys in the same order, lists and tuples element by element.
/// `where` names the first difference.
bool same_value(const IValue& a, const IValue& b, const std::string& path, std::string& where) {
  const auto differ = [&](const std::string& what) {
    where = (path.empty() ? std::string("<root>") : path) + ": " + what;
    return false;
  };
  if (a.tagKind() != b.tagKind()) return differ(a.tagKind() + " vs " + b.tagKind());
  if (a.isTensor()) return identical(a.toTensor(), b.toTensor()) || differ("tensors differ");
  if (a.isGenericDict()) {
    const auto da = a.toGenericDict();
    const auto db = b.toGenericDict();
    if (da.size() != db.size()) return differ("dict sizes differ");
    auto ib = db.begin();
    for (auto ia = da.begin(); ia != da.end(); ++ia, ++ib) {
      if (ia->key() != ib->key()) return differ("keys differ");
      const std::string key =
          ia->key().isString() ? ia->key().toStringRef() : std::to_string(ia->key().toInt());
      if (!same_value(ia->value(), ib->value(), path.empty() ? key : path + "." + key, where)) return false;
    }
    return true;
  }
  if (a.isList() || a.isTuple()) {
    const auto ea = a.isList() ? a.toListRef().vec() : a.toTupleRef().elements().vec();
    const auto eb = b.isList() ? b.toListRef().vec() : b.toTupleRef().elements().vec();
    if (ea.size() != eb.size()) return differ("lengths differ");
    for (std::size_t i = 0; i < ea.size(); ++i)
      if (!same_value(ea[i], eb[i], path + "[" + std::to_string(i) + "]", where)) return false;
    return true;
  }
  if (a.isNone()) return true;
  if (a.isString()) return a.toStringRef() == b.toStringRef() || differ("strings differ");
  if (a.isInt()) return a.toInt() == b.toInt() || differ("ints differ");
  if (a.isDouble()) return a.toDouble() == b.toDouble() || differ("doubles differ");
  if (a.isBool()) return a.toBool() == b.toBool() || differ("bools differ");
  return differ("unexpected kind " + a.tagKind());
}

/// The staged state dict holds exactly the values of `source`.
void check_staged_values(const ckpt::StagedCheckpoint& staged, const ckpt::StateDict& source) {
  std::string where;
  BOOST_CHECK_MESSAGE(same_value(staged.state_dict.to_ivalue(), source.to_ivalue(), "", where),
                      "staged state differs from the source at " << where);
}

/// Calls `f` on every tensor in `value`.
template <typename F>
void for_each_tensor(const IValue& value, F&& f) {
  if (value.isTensor()) {
    f(value.toTensor());
  } else if (value.isGenericDict()) {
    for (const auto& e : value.toGenericDict()) for_each_tensor(e.value(), f);
  } else if (value.isList()) {
    for (const auto& e : value.toListRef()) for_each_tensor(e, f);
  } else if (value.isTuple()) {
    for (const auto& e : value.toTupleRef().elements()) for_each_tensor(e, f);
  }
}

/// Every tensor of the staged state lies in the staged arena.
void check_aliases_arena(const ckpt::StagedCheckpoint& staged) {
  BOOST_REQUIRE(staged.arena != nullptr);
  const auto* begin = reinterpret_cast<const char*>(staged.arena->data());
  const auto* end = begin + staged.arena->size();
  int tensors = 0;
  for_each_tensor(staged.state_dict.to_ivalue(), [&](const at::Tensor& t) {
    ++tensors;
    if (t.numel() == 0) return;
    const auto* p = static_cast<const char*>(t.storage().data());
    BOOST_CHECK_MESSAGE(p >= begin && p + t.storage().nbytes() <= end,
                        "a staged tensor's storage lies outside the arena");
  });
  BOOST_CHECK_GT(tensors, 0);
}

/// Closes a stager at the end of a scope, as upstream's "Clean up" does.
struct Closer {
  ckpt::CheckpointStager& stager;
  ~Closer() { stager.close(); }
};

std::string describe(const ckpt::CheckpointStagerConfig& c) {
  std::ostringstream out;
  out << std::boolalpha << "{pinned " << c.use_pinned_memory << ", shared " << c.use_shared_memory
      << ", async " << c.use_async_staging << ", non_blocking " << c.use_non_blocking_copy << "}";
  return out.str();
}

struct StagerFixture {
  ckpt::StateDict state_dict = make_state_dict();
};

boost::test_tools::assertion_result cuda_available(boost::unit_test::test_unit_id) {
  boost::test_tools::assertion_result r(at::hasCUDA());
  r.message() << "no CUDA device in this build or machine";
  return r;
}

}  // namespace

// --- upstream: test_staging.py ------------------------------------------------

BOOST_FIXTURE_TEST_SUITE(TestDefaultStager, StagerFixture)

BOOST_AUTO_TEST_CASE(sync_staging) {
  // Upstream: the staged dict comes back directly, not a Future. Here the
  // blocking stage() returns it; and with use_async_staging = false the copy is
  // made on the caller's thread, before async_stage returns, even though the
  // completion itself runs later on the stager's executor (Asio's rule).
  ckpt::CheckpointStagerConfig options;
  options.use_async_staging = false;
  ckpt::DefaultStager stager(options);
  Closer closer{stager};

  const auto staged = stager.stage(state_dict);
  const auto& staged_dict = staged.state_dict;
  BOOST_CHECK(staged_dict.contains("model"));
  BOOST_CHECK(staged_dict.contains("optimizer"));
  BOOST_CHECK_EQUAL(staged_dict.at("epoch").toInt(), 5);
  BOOST_CHECK_EQUAL(staged_dict.at("step").toInt(), 1000);
  BOOST_CHECK(staged_dict.contains("tensor"));
  BOOST_CHECK(staged_dict.contains("nested"));
  check_staged_values(staged, state_dict);
  check_aliases_arena(staged);

  // The callback form: change the source as soon as async_stage returns; the
  // staged state still holds the values from the moment of the call.
  const auto tensor = state_dict.at("tensor").toTensor();
  const auto tensor_before = tensor.clone();
  auto done = std::make_shared<std::promise<ckpt::StagedCheckpoint>>();
  auto result = done->get_future();
  stager.async_stage(state_dict, [done](std::exception_ptr e, ckpt::StagedCheckpoint s) {
    if (e)
      done->set_exception(e);
    else
      done->set_value(std::move(s));
  });
  tensor.fill_(123.0f);
  BOOST_REQUIRE(result.wait_for(kWaitBound) == std::future_status::ready);
  const auto by_callback = result.get();
  BOOST_CHECK(identical(by_callback.state_dict.at("tensor").toTensor(), tensor_before));
}

BOOST_AUTO_TEST_CASE(async_staging) {
  // Upstream: stage() returns a Future whose result is the staged dict. Here the
  // completion token picks the form: use_future, a callback, an awaitable.
  ckpt::CheckpointStagerConfig options;
  options.use_async_staging = true;
  ckpt::DefaultStager stager(options);
  Closer closer{stager};

  // use_future: a std::future<StagedCheckpoint>.
  std::future<ckpt::StagedCheckpoint> result = stager.async_stage(state_dict, asio::use_future);
  BOOST_REQUIRE(result.wait_for(kWaitBound) == std::future_status::ready);
  const ckpt::StagedCheckpoint staged = result.get();
  const auto& staged_dict = staged.state_dict;
  BOOST_CHECK(staged_dict.contains("model"));
  BOOST_CHECK(staged_dict.contains("optimizer"));
  BOOST_CHECK_EQUAL(staged_dict.at("epoch").toInt(), 5);
  BOOST_CHECK_EQUAL(staged_dict.at("step").toInt(), 1000);
  check_staged_values(staged, state_dict);
  check_aliases_arena(staged);

  // A callback: it runs on the stager's own thread, not the caller's.
  std::promise<std::thread::id> ran_on;
  auto ran_on_future = ran_on.get_future();
  ckpt::StagedCheckpoint by_callback;
  std::exception_ptr callback_error;
  // (Checked on this thread afterwards: Boost.Test's assertions are not
  // thread-safe.)
  stager.async_stage(state_dict, [&](std::exception_ptr e, ckpt::StagedCheckpoint s) {
    callback_error = e;
    by_callback = std::move(s);
    ran_on.set_value(std::this_thread::get_id());
  });
  BOOST_REQUIRE(ran_on_future.wait_for(kWaitBound) == std::future_status::ready);
  BOOST_CHECK(!callback_error);
  BOOST_CHECK(ran_on_future.get() != std::this_thread::get_id());
  check_staged_values(by_callback, state_dict);

  // An awaitable, from a coroutine on an io_context.
  IoThread io;
  auto awaited = asio::co_spawn(
      io.io,
      [&]() -> asio::awaitable<ckpt::StagedCheckpoint> {
        co_return co_await stager.async_stage(state_dict, asio::use_awaitable);
      },
      asio::use_future);
  BOOST_REQUIRE(awaited.wait_for(kWaitBound) == std::future_status::ready);
  check_staged_values(awaited.get(), state_dict);
}

BOOST_AUTO_TEST_CASE(cuda_non_blocking_without_cuda) {
  // Deliberate difference (PARITY.md): upstream raises AssertionError for a
  // non-blocking copy without an accelerator; ckpt degrades to plain copies,
  // logged once, so the default config works on a CPU-only build.
  if (at::hasCUDA()) {
    BOOST_TEST_MESSAGE("CUDA is available, cannot test the CUDA-unavailable scenario");
    return;
  }
  ckpt::CheckpointStagerConfig options;
  options.use_non_blocking_copy = true;
  std::unique_ptr<ckpt::DefaultStager> stager;
  BOOST_REQUIRE_NO_THROW(stager = std::make_unique<ckpt::DefaultStager>(options));
  Closer closer{*stager};
  const auto staged = stager->stage(state_dict);
  check_staged_values(staged, state_dict);
}

BOOST_AUTO_TEST_CASE(different_option_combinations) {
  // Upstream tries three combinations on a CPU machine (and two more with
  // CUDA); on a CPU-only build ckpt supports all sixteen.
  for (int bits = 0; bits < 16; ++bits) {
    ckpt::CheckpointStagerConfig options;
    options.use_pinned_memory = (bits & 1) != 0;
    options.use_shared_memory = (bits & 2) != 0;
    options.use_async_staging = (bits & 4) != 0;
    options.use_non_blocking_copy = (bits & 8) != 0;
    BOOST_TEST_CONTEXT("options " << describe(options)) {
      ckpt::DefaultStager stager(options);
      Closer closer{stager};

      ckpt::StagedCheckpoint staged;
      if (options.use_async_staging) {
        auto result = stager.async_stage(state_dict, asio::use_future);
        BOOST_REQUIRE(result.wait_for(kWaitBound) == std::future_status::ready);
        staged = result.get();
      } else {
        staged = stager.stage(state_dict);
      }

      BOOST_CHECK(staged.state_dict.contains("model"));
      check_staged_values(staged, state_dict);
      check_aliases_arena(staged);
      if (!options.use_pinned_memory) BOOST_CHECK(!stager.pinned());
    }
  }
}

BOOST_AUTO_TEST_CASE(cuda_tensors_staging, *boost::unit_test::precondition(cuda_available)) {
  ckpt::StateDict mixed_model;
  mixed_model.insert("weight", at::randn({5, 5}).to(at::kCUDA));
  mixed_model.insert("bias", at::randn({5}).to(at::kCUDA));
  ckpt::StateDict cuda_state_dict;
  cuda_state_dict.insert("cuda_tensor", at::randn({3, 4}).to(at::kCUDA));
  cuda_state_dict.insert("cpu_tensor", at::randn({2, 3}));
  cuda_state_dict.insert("mixed_model", mixed_model);

  ckpt::CheckpointStagerConfig options;
  options.use_async_staging = false;
  ckpt::DefaultStager stager(options);
  Closer closer{stager};

  const auto staged = stager.stage(cuda_state_dict);
  const auto& staged_dict = staged.state_dict;
  BOOST_CHECK(staged_dict.contains("cuda_tensor"));
  BOOST_CHECK(staged_dict.contains("cpu_tensor"));
  BOOST_CHECK(staged_dict.contains("mixed_model"));
  // Staged on the host, with the device's values.
  const auto staged_cuda = staged_dict.at("cuda_tensor").toTensor();
  BOOST_CHECK(staged_cuda.device().is_cpu());
  BOOST_CHECK(identical(staged_cuda, cuda_state_dict.at("cuda_tensor").toTensor().cpu()));
}

BOOST_AUTO_TEST_CASE(resource_cleanup) {
  ckpt::CheckpointStagerConfig options;
  options.use_async_staging = false;
  ckpt::DefaultStager stager(options);

  // Upstream checks the inner stager exists; here: it stages, and holds an arena.
  const auto staged = stager.stage(state_dict);
  check_staged_values(staged, state_dict);
  BOOST_CHECK_GT(stager.arena_size(), 0u);

  BOOST_CHECK_NO_THROW(stager.close());
  BOOST_CHECK_EQUAL(stager.arena_size(), 0u);
  BOOST_CHECK_NO_THROW(stager.close());  // idempotent

  ckpt::DefaultStager async_stager;  // use_async_staging
  check_staged_values(async_stager.stage(state_dict), state_dict);
  BOOST_CHECK_NO_THROW(async_stager.close());

  // A closed stager refuses to stage, through the completion (in both modes).
  // The bound is short for a wait: staging a small dict takes microseconds,
  // and a stager that never answers is the failure being looked for.
  for (ckpt::DefaultStager* closed : {&stager, &async_stager}) {
    BOOST_TEST_CONTEXT((closed == &stager ? "sync" : "async") << " staging") {
      auto done = std::make_shared<std::promise<std::exception_ptr>>();
      auto result = done->get_future();
      closed->async_stage(state_dict,
                          [done](std::exception_ptr e, ckpt::StagedCheckpoint) { done->set_value(e); });
      if (result.wait_for(10s) != std::future_status::ready) {
        BOOST_ERROR("a stage on a closed stager never completes");
        continue;
      }
      const auto error = result.get();
      BOOST_REQUIRE(error != nullptr);
      BOOST_CHECK_EXCEPTION(std::rethrow_exception(error), ckpt::Error,
                            [](const ckpt::Error& e) { return mentions(e, "closed"); });
    }
  }
}

BOOST_AUTO_TEST_CASE(multiple_staging_operations) {
  ckpt::CheckpointStagerConfig options;
  options.use_async_staging = false;
  options.use_pinned_memory = at::hasCUDA();
  options.use_shared_memory = false;
  options.use_non_blocking_copy = at::hasCUDA();
  ckpt::DefaultStager stager(options);
  Closer closer{stager};

  ckpt::StateDict sd1;
  sd1.insert("model1", linear_state(5, 3));
  ckpt::StateDict sd2;
  sd2.insert("model2", conv2d_state());
  ckpt::StateDict optimizer;
  optimizer.insert("lr", 0.001);
  optimizer.insert("momentum", 0.9);
  ckpt::StateDict sd3;
  sd3.insert("optimizer", optimizer);
  const std::vector<ckpt::StateDict> state_dicts{sd1, sd2, sd3};

  std::vector<ckpt::StagedCheckpoint> staged_results;
  for (const auto& sd : state_dicts) {
    auto staged = stager.stage(sd);
    // A staged state is valid until the stager stages again: check its values now.
    check_staged_values(staged, sd);
    staged_results.push_back(std::move(staged));
  }

  BOOST_REQUIRE_EQUAL(staged_results.size(), 3u);
  for (std::size_t i = 0; i < staged_results.size(); ++i)
    for (const auto& e : state_dicts[i])
      BOOST_CHECK(staged_results[i].state_dict.contains(e.key().toStringRef()));
}

BOOST_AUTO_TEST_SUITE_END()

// --- beyond upstream: the arena, sharing and snapshots ----------------------------

BOOST_FIXTURE_TEST_SUITE(staging_arena, StagerFixture)

BOOST_AUTO_TEST_CASE(arena_is_the_file_size_rounded_to_pages) {
  ckpt::DefaultStager stager;
  Closer closer{stager};
  BOOST_CHECK_EQUAL(stager.arena_size(), 0u);  // nothing is allocated before it is needed

  const auto staged = stager.stage(state_dict);
  BOOST_CHECK_EQUAL(stager.arena_size(), round_to_pages(ckpt::checkpoint_file_size(state_dict)));
  BOOST_CHECK_EQUAL(staged.arena->size(), stager.arena_size());
  // The image ends where the central directory will go, inside the arena.
  BOOST_CHECK_LE(staged.cd_offset, stager.arena_size());
  BOOST_CHECK_LT(staged.cd_offset, ckpt::checkpoint_file_size(state_dict));
}

BOOST_AUTO_TEST_CASE(arena_is_reused_for_a_same_size_state_dict) {
  ckpt::DefaultStager stager;
  Closer closer{stager};
  const auto first = stager.stage(state_dict);
  const auto size = stager.arena_size();
  const auto* arena = first.arena.get();
  const auto* base = first.arena->data();

  auto same_shapes = make_state_dict();  // other values, the same layout
  const auto second = stager.stage(same_shapes);
  BOOST_CHECK_EQUAL(stager.arena_size(), size);
  BOOST_CHECK(second.arena.get() == arena);
  BOOST_CHECK(second.arena->data() == base);  // not reallocated
  check_staged_values(second, same_shapes);

  // A smaller state dict does not shrink it either.
  ckpt::StateDict small;
  small.insert("epoch", 1);
  const auto third = stager.stage(small);
  BOOST_CHECK_EQUAL(stager.arena_size(), size);
  check_staged_values(third, small);
}

BOOST_AUTO_TEST_CASE(arena_grows_for_a_larger_state_dict) {
  ckpt::DefaultStager stager;
  Closer closer{stager};
  stager.stage(state_dict);
  const auto size = stager.arena_size();

  auto larger = make_state_dict();
  larger.insert("big", at::randn({256, 1024}));  // 1 MiB more
  const auto staged = stager.stage(larger);
  BOOST_CHECK_GT(stager.arena_size(), size);
  BOOST_CHECK_EQUAL(stager.arena_size(), round_to_pages(ckpt::checkpoint_file_size(larger)));
  check_staged_values(staged, larger);
  check_aliases_arena(staged);
}

BOOST_AUTO_TEST_CASE(reserve_for_allocates_before_the_first_stage) {
  ckpt::DefaultStager stager;
  Closer closer{stager};
  BOOST_CHECK_EQUAL(stager.arena_size(), 0u);

  stager.reserve_for(state_dict);
  const auto reserved = stager.arena_size();
  BOOST_CHECK_EQUAL(reserved, round_to_pages(ckpt::checkpoint_file_size(state_dict)));

  const auto staged = stager.stage(state_dict);
  BOOST_CHECK_EQUAL(stager.arena_size(), reserved);  // staging did not grow it
  check_staged_values(staged, state_dict);

  // reserve(bytes) rounds to pages and only ever grows.
  stager.reserve(reserved + 1);
  BOOST_CHECK_EQUAL(stager.arena_size(), round_to_pages(reserved + 1));
  stager.reserve(1);
  BOOST_CHECK_EQUAL(stager.arena_size(), round_to_pages(reserved + 1));
}

BOOST_AUTO_TEST_CASE(storage_sharing_and_views_survive_staging) {
  const auto base = at::arange(20, at::kFloat);
  const auto narrow = base.narrow(0, 2, 6);       // offset 2
  const auto matrix = base.view({4, 5}).t();      // a transposed view
  const auto other = at::arange(3, at::kDouble);  // a storage of its own
  ckpt::StateDict sd;
  sd.insert("base", base);
  sd.insert("narrow", narrow);
  sd.insert("matrix", matrix);
  sd.insert("other", other);

  ckpt::DefaultStager stager;
  Closer closer{stager};
  const auto staged = stager.stage(sd);
  check_staged_values(staged, sd);
  check_aliases_arena(staged);

  const auto s_base = staged.state_dict.at("base").toTensor();
  const auto s_narrow = staged.state_dict.at("narrow").toTensor();
  const auto s_matrix = staged.state_dict.at("matrix").toTensor();
  const auto s_other = staged.state_dict.at("other").toTensor();
  // One storage for the three views, as in the source; not the source's.
  BOOST_CHECK(s_narrow.is_alias_of(s_base));
  BOOST_CHECK(s_matrix.is_alias_of(s_base));
  BOOST_CHECK(!s_other.is_alias_of(s_base));
  BOOST_CHECK(!s_base.is_alias_of(base));
  BOOST_CHECK_EQUAL(s_narrow.storage_offset(), 2);
  BOOST_CHECK(s_matrix.strides() == matrix.strides());
  BOOST_CHECK(!s_matrix.is_contiguous());

  // One record per storage: the shared one is staged once.
  int data_records = 0;
  for (const auto& r : staged.records)
    if (r.name.find("/data/") != std::string::npos) ++data_records;
  BOOST_CHECK_EQUAL(data_records, 2);

  // Writing through one staged view shows through the others.
  s_base.fill_(-1);
  BOOST_CHECK(identical(s_narrow, at::full({6}, -1.0f)));
  BOOST_CHECK(identical(s_matrix, at::full({5, 4}, -1.0f)));
}

BOOST_AUTO_TEST_CASE(staged_state_is_a_snapshot) {
  ckpt::DefaultStager stager;
  Closer closer{stager};
  const auto weight = state_dict.sub("model").at("weight").toTensor();
  const auto tensor = state_dict.at("tensor").toTensor();
  const auto weight_before = weight.clone();
  const auto tensor_before = tensor.clone();

  const auto staged = stager.stage(state_dict);
  BOOST_CHECK(!staged.state_dict.is(state_dict));

  // The trainer goes on: tensors change in place, the dict changes too.
  weight.add_(1.0);
  tensor.zero_();
  state_dict.insert("epoch", 6);
  state_dict.insert("new_key", 1);

  BOOST_CHECK(identical(staged.state_dict.sub("model").at("weight").toTensor(), weight_before));
  BOOST_CHECK(identical(staged.state_dict.at("tensor").toTensor(), tensor_before));
  BOOST_CHECK_EQUAL(staged.state_dict.at("epoch").toInt(), 5);
  BOOST_CHECK(!staged.state_dict.contains("new_key"));
}

BOOST_AUTO_TEST_CASE(a_staging_error_arrives_through_the_completion) {
  ckpt::StateDict bad;
  bad.insert("meta", at::empty({4}, at::TensorOptions().device(at::kMeta)));
  for (bool async : {false, true}) {
    BOOST_TEST_CONTEXT("use_async_staging " << async) {
      ckpt::CheckpointStagerConfig options;
      options.use_async_staging = async;
      ckpt::DefaultStager stager(options);
      Closer closer{stager};

      std::future<ckpt::StagedCheckpoint> result;
      BOOST_REQUIRE_NO_THROW(result = stager.async_stage(bad, asio::use_future));
      BOOST_REQUIRE(result.wait_for(kWaitBound) == std::future_status::ready);
      BOOST_CHECK_EXCEPTION(result.get(), ckpt::Unsupported,
                            [](const ckpt::Unsupported& e) { return mentions(e, "meta"); });

      // The stager is still usable.
      check_staged_values(stager.stage(state_dict), state_dict);
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()
