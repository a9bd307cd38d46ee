// SyncCheckpointer and AsyncCheckpointer, ported from upstream's
// test_checkpointer.py and test_builder.py. The cases upstream runs on both
// checkpointers are written once and run on each kind (Sync, Async: how the
// checkpointer is made, how a save is waited for), as
// TestCheckpointer/<case><Sync> and TestCheckpointer/<case><Async>. Then the
// sync factory (make_sync_checkpointer); beyond upstream: a partial load reads
// only what it asks for and fills tensors in place, a failing hook or a hung
// barrier fails the save, and checkpoints cross to and from Python torch; and
// (at the end) upstream's async-only cases and make_async_checkpointer. The
// async checkpointer's writer child is tests/support/test_writer.
#include <ckpt/checkpointer.hpp>

#define BOOST_TEST_MODULE checkpointer_test
#include <boost/test/unit_test.hpp>

#include <ckpt/async_checkpointer.hpp>
#include <ckpt/format.hpp>

#include "support/io_threads.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using c10::IValue;
using ckpt::test::identical;
using ckpt::test::list_of;
using ckpt::test::mentions;
using ckpt::test::TempDir;
using ckpt::test::wait_get;

using ckpt::test::IoThread;
namespace {

bool is_ready(std::future<void>& f) {
  return f.valid() && f.wait_for(0s) == std::future_status::ready;
}

/// Bytes this process has read through read(2)/pread(2) and friends so far.
std::uint64_t rchar() {
  std::ifstream io("/proc/self/io");
  std::string name;
  std::uint64_t value = 0;
  while (io >> name >> value)
    if (name == "rchar:") return value;
  BOOST_FAIL("no rchar in /proc/self/io");
  return 0;
}

/// torch.nn.Linear(10, 5).state_dict(): weight 5x10, bias 5.
ckpt::StateDict linear_state() {
  ckpt::StateDict sd;
  sd.insert("weight", at::randn({5, 10}));
  sd.insert("bias", at::randn({5}));
  return sd;
}

/// upstream's state dict: {"model": Linear(10, 5).state_dict(), "optimizer":
/// {"param_groups": [{"lr": 0.01}]}, "epoch": 5, "step": 1000}
ckpt::StateDict make_state_dict() {
  ckpt::StateDict group;
  group.insert("lr", 0.01);
  ckpt::StateDict optimizer;
  optimizer.insert("param_groups", list_of({group.to_ivalue()}));
  ckpt::StateDict sd;
  sd.insert("model", linear_state());
  sd.insert("optimizer", optimizer);
  sd.insert("epoch", 5);
  sd.insert("step", 1000);
  return sd;
}

/// upstream's setUp and _create_sync_checkpointer: rank 0 of 1, a writer with
/// the default config and no barrier or hook, a reader.
struct CheckpointerFixture {
  TempDir temp_dir;
  ckpt::RankInfo rank_info{.global_rank = 0, .global_world_size = 1};
  ckpt::CheckpointWriterConfig writer_config;
  std::shared_ptr<ckpt::CheckpointReader> reader = std::make_shared<ckpt::CheckpointReader>(rank_info);
  ckpt::StateDict state_dict = make_state_dict();

  std::unique_ptr<ckpt::SyncCheckpointer> create_sync_checkpointer(
      std::shared_ptr<ckpt::Barrier> barrier = nullptr, std::shared_ptr<ckpt::WriterHook> hook = nullptr,
      std::optional<ckpt::CheckpointWriterConfig> config = std::nullopt) {
    auto writer = std::make_shared<ckpt::CheckpointWriter>(config.value_or(writer_config), rank_info,
                                                           std::move(barrier), std::move(hook));
    return std::make_unique<ckpt::SyncCheckpointer>(writer, reader);
  }

  fs::path file_in(const fs::path& dir) const {
    return dir / ("checkpoint_" + std::to_string(rank_info.global_rank) + ".pt");
  }
};

/// Sets an environment variable for a scope, then puts back what was there.
class EnvVar {
 public:
  EnvVar(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value, 1);
  }
  ~EnvVar() { old_ ? ::setenv(name_, old_->c_str(), 1) : ::unsetenv(name_); }
  EnvVar(const EnvVar&) = delete;
  EnvVar& operator=(const EnvVar&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

/// Closes a checkpointer at the end of a scope, as upstream's `finally:` does.
struct Closer {
  ckpt::Checkpointer& checkpointer;
  ~Closer() { checkpointer.close(); }
};

/// Records what the hooks were given.
class RecordingHook : public ckpt::WriterHook {
 public:
  void pre_commit(const fs::path& path, const ckpt::Kwargs& kwargs) override { pre_commit_kwargs = kwargs; }
  void post_commit(const fs::path& path, const ckpt::Kwargs& kwargs) override { post_commit_kwargs = kwargs; }
  std::optional<ckpt::Kwargs> pre_commit_kwargs;
  std::optional<ckpt::Kwargs> post_commit_kwargs;
};

/// A hook whose pre_commit fails, as a user's upload or validation step might.
class FailingPreCommitHook : public ckpt::WriterHook {
 public:
  static constexpr const char* kMessage = "pre_commit refused: quota exceeded on the checkpoint volume";
  void pre_commit(const fs::path& path, const ckpt::Kwargs& kwargs) override {
    throw std::runtime_error(kMessage);
  }
  void post_commit(const fs::path& path, const ckpt::Kwargs& kwargs) override { post_commit_ran = true; }
  bool post_commit_ran = false;
};

/// Counts barrier calls.
class CountingBarrier : public ckpt::Barrier {
 public:
  void execute_barrier() override { ++calls; }
  int calls = 0;
};

/// A barrier that never returns on its own, like one whose peer rank died: it
/// blocks until the test releases it. The long bound only keeps a broken writer
/// (one that never times out) from hanging the suite; it is not synchronisation.
class HangingBarrier : public ckpt::Barrier {
 public:
  void execute_barrier() override {
    std::unique_lock lock(mutex_);
    entered_ = true;
    changed_.notify_all();
    changed_.wait_for(lock, 120s, [this] { return released_; });
    exited_ = true;
    changed_.notify_all();
  }
  void release() {
    std::lock_guard lock(mutex_);
    released_ = true;
    changed_.notify_all();
  }
  bool entered() {
    std::lock_guard lock(mutex_);
    return entered_;
  }
  /// Waits until execute_barrier() has let go (bounded: a guard, not a check).
  bool wait_exited() {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, 120s, [this] { return exited_; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  bool entered_ = false;
  bool released_ = false;
  bool exited_ = false;
};

// The values tests/interop/checkpointer_files.py builds too (keep in step).
at::Tensor linear_weight() {
  return (at::arange(50, at::kFloat) * 0.125 - 3.0).reshape({5, 10});
}
at::Tensor linear_bias() {
  return at::arange(5, at::kFloat) * -0.75 + 0.5;
}

ckpt::StateDict saved_by_ckpt() {
  ckpt::StateDict model;
  model.insert("weight", linear_weight());
  model.insert("bias", linear_bias());

  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  ckpt::StateDict s0;
  s0.insert("step", 3);
  s0.insert("exp_avg", at::arange(50, at::kDouble).reshape({5, 10}) / 8);
  ckpt::StateDict s1;
  s1.insert("step", 3);
  s1.insert("exp_avg", at::full({5}, -0.5, at::kDouble));
  state.insert(0, s0.to_ivalue());
  state.insert(1, s1.to_ivalue());
  ckpt::StateDict group;
  group.insert("lr", 0.01);
  group.insert("betas", IValue(c10::ivalue::Tuple::create({IValue(0.9), IValue(0.999)})));
  group.insert("nesterov", false);
  group.insert("params", c10::List<std::int64_t>({0, 1}));
  ckpt::StateDict optimizer;
  optimizer.insert("state", IValue(state));
  optimizer.insert("param_groups", list_of({group.to_ivalue()}));

  ckpt::StateDict sd;
  sd.insert("model", model);
  sd.insert("optimizer", optimizer);
  sd.insert("epoch", 5);
  sd.insert("step", 1000);
  sd.insert("name", "run-1");
  sd.insert("best", IValue());
  sd.insert("mask", at::arange(6, at::kLong).remainder(2) == 0);
  sd.insert("counts", at::arange(-3, 3, at::kInt));
  return sd;
}

ckpt::test::RunResult run_python(const std::string& command, const fs::path& dir) {
  return ckpt::test::run(ckpt::test::python() + " -B " +
                         ckpt::test::sh_quote(CKPT_SOURCE_DIR "/tests/interop/checkpointer_files.py") + " " +
                         command + " " + ckpt::test::sh_quote(dir.string()));
}

/// The tests' writer executable (tests/support/test_writer.cpp), beside this program.
fs::path test_writer() {
  return fs::canonical("/proc/self/exe").parent_path() / "test_writer";
}

/// The whole of `file`.
std::string read_text(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// upstream's setUp and _create_async_checkpointer, built as upstream builds
/// it: a stager with async staging in shared memory (not pinned, not
/// non-blocking), and a writer child whose init hook gets
/// ("test-async-checkpointer", this pid) and checks it runs in a child of this
/// process (tests/support/test_writer, "check-parent"); its writer factory gets
/// the writer config and rank_info. The child is ready before the first save.
struct AsyncCheckpointerFixture : CheckpointerFixture {
  IoThread io;

  std::unique_ptr<ckpt::AsyncCheckpointer> create_async_checkpointer() {
    ckpt::CheckpointStagerConfig stager_config;
    stager_config.use_async_staging = true;
    stager_config.use_pinned_memory = false;
    stager_config.use_shared_memory = true;
    stager_config.use_non_blocking_copy = false;

    const ckpt::CheckpointProcessConfig process_config{.subprocess_init_timeout = 30s,
                                                       .subprocess_shutdown_timeout = 60s};

    auto checkpoint_stager = std::make_shared<ckpt::DefaultStager>(stager_config);

    ckpt::WriterOptions options;
    options.executable = test_writer();
    options.subprocess_init_args = {"check-parent", "test-async-checkpointer", ::getpid()};
    // The factory gets the config and rank_info (WriterFactoryArgs) from the
    // process's writer_config and rank_info.
    auto checkpoint_process = std::make_shared<ckpt::CheckpointProcess>(
        io.executor(), rank_info, process_config, writer_config, ckpt::BarrierConfig{}, std::move(options));

    // Wait for process initialization.
    auto ready = checkpoint_process->async_wait_ready(boost::asio::use_future);
    wait_get(ready);

    return std::make_unique<ckpt::AsyncCheckpointer>(io.executor(), checkpoint_stager, checkpoint_process,
                                                     reader);
  }

  /// A copy of `sd` (upstream's dict.copy(): a new dict, the same values).
  static ckpt::StateDict shallow_copy(const ckpt::StateDict& sd) {
    ckpt::StateDict out;
    for (const auto& e : sd) out.insert(e.key().toStringRef(), e.value());
    return out;
  }
};

/// Requires `f` to complete without an error, naming the error if it does not.
void require_succeeds(std::future<void>& f, const char* what) {
  std::optional<std::string> error;
  try {
    wait_get(f);
  } catch (const std::exception& e) {
    error = e.what();
  }
  BOOST_REQUIRE_MESSAGE(!error, what << " failed: " << error.value_or(""));
}

}  // namespace

// --- the two checkpointers the shared cases run on --------------------------------
// Outside the anonymous namespace: Boost.Test names a case after its type, as
// save_and_load_basic<Sync> and save_and_load_basic<Async>.

/// upstream's _create_sync_checkpointer.
struct Sync : CheckpointerFixture {
  static constexpr bool is_async = false;

  std::unique_ptr<ckpt::SyncCheckpointer> create_checkpointer() { return create_sync_checkpointer(); }

  /// A sync save is done when it returns: both futures are already satisfied,
  /// without an error.
  static void wait_for_save(ckpt::SaveFutures& futures) {
    BOOST_REQUIRE(is_ready(futures.staged));
    BOOST_REQUIRE(is_ready(futures.written));
    require_succeeds(futures.written, "the write");
    require_succeeds(futures.staged, "the stage");
  }
};

/// upstream's _create_async_checkpointer.
struct Async : AsyncCheckpointerFixture {
  static constexpr bool is_async = true;

  std::unique_ptr<ckpt::AsyncCheckpointer> create_checkpointer() { return create_async_checkpointer(); }

  /// upstream's _wait_for_save: the write first, then the stage.
  static void wait_for_save(ckpt::SaveFutures& futures) {
    BOOST_REQUIRE(futures.staged.valid());
    BOOST_REQUIRE(futures.written.valid());
    require_succeeds(futures.written, "the write");
    require_succeeds(futures.staged, "the stage");
  }
};

using Kinds = std::tuple<Sync, Async>;

// --- upstream: test_checkpointer.py, on the sync and the async checkpointer -------
// Each case builds its kind, the fixture, itself as `fx`.

BOOST_AUTO_TEST_SUITE(TestCheckpointer)

BOOST_AUTO_TEST_CASE_TEMPLATE(save_and_load_basic, Kind, Kinds) {
  Kind fx;
  auto checkpointer = fx.create_checkpointer();
  Closer closer{*checkpointer};
  const fs::path checkpoint_path = fx.temp_dir / "checkpoint";

  auto futures = checkpointer->save(checkpoint_path, fx.state_dict);
  Kind::wait_for_save(futures);

  BOOST_CHECK(fs::exists(fx.file_in(checkpoint_path)));

  const auto loaded_state_dict = checkpointer->load(checkpoint_path);
  BOOST_CHECK(loaded_state_dict.contains("model"));
  BOOST_CHECK(loaded_state_dict.contains("optimizer"));
  BOOST_CHECK_EQUAL(loaded_state_dict.at("epoch").toInt(), 5);
  BOOST_CHECK_EQUAL(loaded_state_dict.at("step").toInt(), 1000);
  BOOST_CHECK(identical(loaded_state_dict.sub("model").at("weight").toTensor(),
                        fx.state_dict.sub("model").at("weight").toTensor()));
}

BOOST_AUTO_TEST_CASE_TEMPLATE(load_with_map_location, Kind, Kinds) {
  Kind fx;
  auto checkpointer = fx.create_checkpointer();
  Closer closer{*checkpointer};
  const fs::path checkpoint_path = fx.temp_dir / "checkpoint_map";
  auto futures = checkpointer->save(checkpoint_path, fx.state_dict);
  Kind::wait_for_save(futures);

  const auto loaded_state_dict = checkpointer->load(checkpoint_path, {.map_location = "cpu"});
  BOOST_CHECK(loaded_state_dict.contains("model"));
  BOOST_CHECK_EQUAL(loaded_state_dict.at("epoch").toInt(), 5);
  BOOST_CHECK(loaded_state_dict.sub("model").at("weight").toTensor().device().is_cpu());
}

BOOST_AUTO_TEST_CASE_TEMPLATE(partial_load, Kind, Kinds) {
  Kind fx;
  auto checkpointer = fx.create_checkpointer();
  Closer closer{*checkpointer};
  const fs::path checkpoint_path = fx.temp_dir / "checkpoint_partial";
  auto futures = checkpointer->save(checkpoint_path, fx.state_dict);
  Kind::wait_for_save(futures);

  ckpt::StateDict partial_state_dict;
  partial_state_dict.insert("model", linear_state());
  partial_state_dict.insert("epoch", IValue());

  const auto loaded_state_dict = checkpointer->load(checkpoint_path, {.state_dict = partial_state_dict});
  BOOST_CHECK(loaded_state_dict.is(partial_state_dict));
  BOOST_CHECK(loaded_state_dict.contains("model"));
  BOOST_CHECK(loaded_state_dict.contains("epoch"));
  BOOST_CHECK_EQUAL(loaded_state_dict.at("epoch").toInt(), 5);
  BOOST_CHECK(!loaded_state_dict.contains("step"));
  BOOST_CHECK(!loaded_state_dict.contains("optimizer"));
  BOOST_CHECK(identical(loaded_state_dict.sub("model").at("bias").toTensor(),
                        fx.state_dict.sub("model").at("bias").toTensor()));
}

BOOST_AUTO_TEST_CASE_TEMPLATE(load_strict_mode, Kind, Kinds) {
  Kind fx;
  auto checkpointer = fx.create_checkpointer();
  Closer closer{*checkpointer};
  const fs::path checkpoint_path = fx.temp_dir / "checkpoint_strict";
  ckpt::StateDict limited_state_dict;
  limited_state_dict.insert("model", linear_state());
  auto futures = checkpointer->save(checkpoint_path, limited_state_dict);
  Kind::wait_for_save(futures);

  ckpt::StateDict partial_state_dict;
  partial_state_dict.insert("model", linear_state());
  partial_state_dict.insert("missing_key", IValue());

  BOOST_CHECK_EXCEPTION(
      checkpointer->load(checkpoint_path, {.state_dict = partial_state_dict, .strict = true}),
      ckpt::MissingKeys, [&](const ckpt::MissingKeys& e) {
        BOOST_TEST_MESSAGE("strict load: " << e.what());
        return mentions(e, "missing keys") && mentions(e, "missing_key") &&
               mentions(e, checkpoint_path.string());
      });

  const auto loaded_state_dict =
      checkpointer->load(checkpoint_path, {.state_dict = partial_state_dict, .strict = false});
  BOOST_CHECK(loaded_state_dict.contains("model"));
  BOOST_CHECK(identical(loaded_state_dict.sub("model").at("weight").toTensor(),
                        limited_state_dict.sub("model").at("weight").toTensor()));
}

BOOST_AUTO_TEST_CASE_TEMPLATE(save_with_kwargs, Kind, Kinds) {
  // Upstream's sync writer has no hook here: one is added to see the kwargs
  // arrive. Upstream's async variant saves without kwargs; ckpt's carries them
  // to the child's writer, whose hook (test_writer) records them in
  // factory_args.txt with what its factory got.
  Kind fx;
  std::shared_ptr<RecordingHook> hook;
  std::unique_ptr<ckpt::Checkpointer> checkpointer;
  if constexpr (Kind::is_async) {
    checkpointer = fx.create_checkpointer();
  } else {
    hook = std::make_shared<RecordingHook>();
    checkpointer = fx.create_sync_checkpointer(nullptr, hook);
  }
  Closer closer{*checkpointer};
  const fs::path checkpoint_path = fx.temp_dir / "checkpoint_kwargs";

  const ckpt::Kwargs kwargs{{"custom_arg", "test_value"}, {"another_arg", 42}};
  auto futures = checkpointer->save(checkpoint_path, fx.state_dict, kwargs);
  Kind::wait_for_save(futures);

  BOOST_CHECK(fs::exists(fx.file_in(checkpoint_path)));
  if constexpr (Kind::is_async) {
    const std::string args = read_text(checkpoint_path / "factory_args.txt");
    BOOST_TEST_MESSAGE("factory_args.txt:\n" << args);
    BOOST_CHECK(args.find("kwarg custom_arg='test_value'\n") != std::string::npos);
    BOOST_CHECK(args.find("kwarg another_arg=42\n") != std::string::npos);
    // The factory's {config, rank_info}.
    BOOST_CHECK(args.find("rank 0 of 1\n") != std::string::npos);
    BOOST_CHECK(args.find("write_barrier_timeout_ms 600000\n") != std::string::npos);
  } else {
    BOOST_REQUIRE(hook->pre_commit_kwargs.has_value());
    BOOST_REQUIRE(hook->post_commit_kwargs.has_value());
    BOOST_CHECK(*hook->pre_commit_kwargs == kwargs);
    BOOST_CHECK(*hook->post_commit_kwargs == kwargs);
    BOOST_CHECK_EQUAL(hook->pre_commit_kwargs->at("custom_arg").as_string(), "test_value");
    BOOST_CHECK_EQUAL(hook->pre_commit_kwargs->at("another_arg").as_int(), 42);
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(nested_dict_partial_load, Kind, Kinds) {
  Kind fx;
  auto checkpointer = fx.create_checkpointer();
  Closer closer{*checkpointer};

  ckpt::StateDict layer1;
  layer1.insert("weight", at::randn({5, 10}));
  layer1.insert("bias", at::randn({5}));
  ckpt::StateDict layer2;
  layer2.insert("weight", at::randn({2, 5}));
  layer2.insert("bias", at::randn({2}));
  ckpt::StateDict model;
  model.insert("layer1", layer1);
  model.insert("layer2", layer2);
  ckpt::StateDict metadata;
  metadata.insert("epoch", 10);
  metadata.insert("step", 2000);
  ckpt::StateDict nested_state_dict;
  nested_state_dict.insert("model", model);
  nested_state_dict.insert("metadata", metadata);

  const fs::path checkpoint_path = fx.temp_dir / "checkpoint_nested";
  auto futures = checkpointer->save(checkpoint_path, nested_state_dict);
  Kind::wait_for_save(futures);

  ckpt::StateDict want_layer1;
  want_layer1.insert("weight", IValue());
  ckpt::StateDict want_model;
  want_model.insert("layer1", want_layer1);
  ckpt::StateDict want_metadata;
  want_metadata.insert("epoch", IValue());
  ckpt::StateDict partial_state_dict;
  partial_state_dict.insert("model", want_model);
  partial_state_dict.insert("metadata", want_metadata);

  const auto loaded_state_dict = checkpointer->load(checkpoint_path, {.state_dict = partial_state_dict});

  BOOST_REQUIRE(loaded_state_dict.contains("model"));
  BOOST_REQUIRE(loaded_state_dict.sub("model").contains("layer1"));
  BOOST_REQUIRE(loaded_state_dict.sub("model").sub("layer1").contains("weight"));
  BOOST_REQUIRE(loaded_state_dict.contains("metadata"));
  BOOST_REQUIRE(loaded_state_dict.sub("metadata").contains("epoch"));

  BOOST_CHECK(identical(loaded_state_dict.sub("model").sub("layer1").at("weight").toTensor(),
                        layer1.at("weight").toTensor()));
  BOOST_CHECK_EQUAL(loaded_state_dict.sub("metadata").at("epoch").toInt(), 10);

  BOOST_CHECK(!loaded_state_dict.sub("model").contains("layer2"));
  BOOST_CHECK(!loaded_state_dict.sub("model").sub("layer1").contains("bias"));
  BOOST_CHECK(!loaded_state_dict.sub("metadata").contains("step"));
}

BOOST_AUTO_TEST_CASE_TEMPLATE(close_is_idempotent, Kind, Kinds) {
  Kind fx;
  auto checkpointer = fx.create_checkpointer();
  [[maybe_unused]] int pid = -1;
  if constexpr (Kind::is_async) pid = checkpointer->process().pid();
  BOOST_CHECK_NO_THROW(checkpointer->close());
  BOOST_CHECK_NO_THROW(checkpointer->close());
  if constexpr (Kind::is_async) {
    BOOST_CHECK_EQUAL(checkpointer->process().pid(), -1);
    BOOST_CHECK(ckpt::test::process_gone(pid));  // the writer child is gone and reaped
  }
}

BOOST_AUTO_TEST_SUITE_END()

// --- upstream: test_builder.py, the sync factory ---------------------------------

BOOST_FIXTURE_TEST_SUITE(TestMakeCheckpointer, CheckpointerFixture)

BOOST_AUTO_TEST_CASE(make_sync_checkpointer) {
  ckpt::CheckpointerConfig config;
  config.barrier_config = ckpt::BarrierConfig{.barrier_type = std::nullopt, .barrier_args = {}};
  auto checkpointer = ckpt::make_sync_checkpointer(config, rank_info);
  BOOST_REQUIRE(checkpointer != nullptr);
  Closer closer{*checkpointer};

  const fs::path checkpoint_path = temp_dir / "checkpoint_factory_sync";
  auto [staged, written] = checkpointer->save(checkpoint_path, state_dict);
  BOOST_CHECK(is_ready(staged));
  BOOST_CHECK(is_ready(written));
  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));

  const auto loaded_state_dict = checkpointer->load(checkpoint_path);
  BOOST_CHECK_EQUAL(loaded_state_dict.at("epoch").toInt(), 5);
}

BOOST_AUTO_TEST_CASE(make_sync_checkpointer_with_config_first) {
  ckpt::CheckpointerConfig config;
  config.barrier_config = ckpt::BarrierConfig{.barrier_type = std::nullopt, .barrier_args = {}};
  auto checkpointer = ckpt::make_sync_checkpointer(config, rank_info);
  Closer closer{*checkpointer};

  const fs::path checkpoint_path = temp_dir / "checkpoint_factory_sync_config_first";
  auto [staged, written] = checkpointer->save(checkpoint_path, state_dict);
  BOOST_CHECK(is_ready(written));
  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));
}

BOOST_AUTO_TEST_CASE(make_sync_checkpointer_with_custom_config) {
  ckpt::CheckpointerConfig config;
  config.barrier_config = ckpt::BarrierConfig{.barrier_type = std::nullopt, .barrier_args = {}};
  config.writer_config.write_barrier_timeout = 300s;
  auto checkpointer = ckpt::make_sync_checkpointer(config, rank_info);
  Closer closer{*checkpointer};

  const fs::path checkpoint_path = temp_dir / "checkpoint_factory_sync_custom_config";
  auto [staged, written] = checkpointer->save(checkpoint_path, state_dict);
  BOOST_CHECK(is_ready(written));
  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));

  const auto loaded_state_dict = checkpointer->load(checkpoint_path);
  BOOST_CHECK_EQUAL(loaded_state_dict.at("epoch").toInt(), 5);
}

BOOST_AUTO_TEST_CASE(make_sync_checkpointer_takes_the_rank_from_the_environment) {
  std::unique_ptr<ckpt::SyncCheckpointer> checkpointer;
  {
    const EnvVar rank("RANK", "2");
    const EnvVar world_size("WORLD_SIZE", "4");
    checkpointer = ckpt::make_sync_checkpointer();
  }
  Closer closer{*checkpointer};

  const fs::path checkpoint_path = temp_dir / "checkpoint_factory_env";
  checkpointer->save(checkpoint_path, state_dict);
  BOOST_CHECK(fs::exists(checkpoint_path / "checkpoint_2.pt"));
  BOOST_CHECK(!fs::exists(checkpoint_path / "checkpoint_0.pt"));
  BOOST_CHECK_EQUAL(checkpointer->load(checkpoint_path).at("step").toInt(), 1000);
}

BOOST_AUTO_TEST_SUITE_END()

// --- beyond upstream ------------------------------------------------------------

BOOST_FIXTURE_TEST_SUITE(beyond_upstream, CheckpointerFixture)

BOOST_AUTO_TEST_CASE(partial_load_of_a_small_tensor_reads_only_what_it_asks_for) {
  // A partial load of 4 KiB out of a >= 512 MiB checkpoint reads < 8 MiB.
  auto checkpointer = create_sync_checkpointer();
  Closer closer{*checkpointer};
  const fs::path checkpoint_path = temp_dir / "checkpoint_large";
  const auto small = at::arange(1024, at::kFloat) * 0.5 - 7;  // 4 KiB
  {
    ckpt::StateDict large;
    ckpt::StateDict model;
    for (int i = 0; i < 4; ++i)
      model.insert("block" + std::to_string(i), at::full({32 << 20}, float(i) + 0.5f));  // 128 MiB each
    large.insert("model", model);
    large.insert("small", small);
    large.insert("epoch", 3);
    checkpointer->save(checkpoint_path, large);
  }  // the 512 MiB of sources are gone before the load
  BOOST_REQUIRE_GE(fs::file_size(file_in(checkpoint_path)), std::uint64_t{512} << 20);

  ckpt::StateDict target;
  auto into = at::zeros({1024}, at::kFloat);
  target.insert("small", into);
  target.insert("epoch", IValue());

  const std::uint64_t before = rchar();
  const auto loaded = checkpointer->load(checkpoint_path, {.state_dict = target});
  const std::uint64_t read = rchar() - before;

  BOOST_TEST_MESSAGE("partial load of 4 KiB from a " << fs::file_size(file_in(checkpoint_path))
                                                     << " byte checkpoint read " << read << " bytes");
  BOOST_CHECK(identical(into, small));
  BOOST_CHECK_EQUAL(loaded.at("epoch").toInt(), 3);
  BOOST_CHECK(!loaded.contains("model"));
  // rchar also counts this process's other reads, so it is only an upper bound.
  BOOST_CHECK_LT(read, std::uint64_t{8} << 20);
}

BOOST_AUTO_TEST_CASE(partial_load_fills_the_target_tensor_in_place) {
  auto checkpointer = create_sync_checkpointer();
  Closer closer{*checkpointer};
  const fs::path checkpoint_path = temp_dir / "checkpoint_in_place";
  checkpointer->save(checkpoint_path, state_dict);

  auto model = linear_state();  // a model's live parameters
  const auto weight = model.at("weight").toTensor();
  const auto bias = model.at("bias").toTensor();
  const void* weight_data = weight.data_ptr();
  const void* bias_data = bias.data_ptr();
  ckpt::StateDict target;
  target.insert("model", model);

  const auto loaded = checkpointer->load(checkpoint_path, {.state_dict = target});
  BOOST_CHECK(loaded.is(target));
  BOOST_CHECK(loaded.sub("model").is(model));
  // The same tensors, the same memory, now holding the checkpoint's values.
  BOOST_CHECK(loaded.sub("model").at("weight").toTensor().is_same(weight));
  BOOST_CHECK(weight.data_ptr() == weight_data);
  BOOST_CHECK(bias.data_ptr() == bias_data);
  BOOST_CHECK(identical(weight, state_dict.sub("model").at("weight").toTensor()));
  BOOST_CHECK(identical(bias, state_dict.sub("model").at("bias").toTensor()));
}

BOOST_AUTO_TEST_CASE(load_refuses_a_wrong_shape_or_dtype_naming_key_and_both_sides) {
  auto checkpointer = create_sync_checkpointer();
  Closer closer{*checkpointer};
  const fs::path checkpoint_path = temp_dir / "checkpoint_mismatch";
  checkpointer->save(checkpoint_path, state_dict);

  ckpt::StateDict wrong_shape;
  wrong_shape.insert("weight", at::zeros({10, 5}));  // the file holds 5x10
  ckpt::StateDict target;
  target.insert("model", wrong_shape);
  BOOST_CHECK_EXCEPTION(checkpointer->load(checkpoint_path, {.state_dict = target}), ckpt::Mismatch,
                        [](const ckpt::Mismatch& e) {
                          BOOST_TEST_MESSAGE("shape mismatch: " << e.what());
                          return mentions(e, "model.weight") &&
                                 (mentions(e, "[5, 10]") || mentions(e, "(5, 10)")) &&
                                 (mentions(e, "[10, 5]") || mentions(e, "(10, 5)"));
                        });

  ckpt::StateDict wrong_dtype;
  wrong_dtype.insert("bias", at::zeros({5}, at::kHalf));  // the file holds float32
  target.insert("model", wrong_dtype);
  BOOST_CHECK_EXCEPTION(checkpointer->load(checkpoint_path, {.state_dict = target}), ckpt::Mismatch,
                        [](const ckpt::Mismatch& e) {
                          BOOST_TEST_MESSAGE("dtype mismatch: " << e.what());
                          return mentions(e, "model.bias") &&
                                 (mentions(e, "Float") || mentions(e, "float32")) &&
                                 (mentions(e, "Half") || mentions(e, "float16"));
                        });
}

BOOST_AUTO_TEST_CASE(a_failing_pre_commit_hook_fails_the_save_and_post_commit_never_runs) {
  auto hook = std::make_shared<FailingPreCommitHook>();
  auto barrier = std::make_shared<CountingBarrier>();
  auto checkpointer = create_sync_checkpointer(barrier, hook);
  Closer closer{*checkpointer};

  BOOST_CHECK_EXCEPTION(checkpointer->save(temp_dir / "checkpoint_hook_fails", state_dict), std::exception,
                        [](const std::exception& e) { return mentions(e, FailingPreCommitHook::kMessage); });
  BOOST_CHECK(!hook->post_commit_ran);
  BOOST_CHECK_EQUAL(barrier->calls, 0);  // nothing after the failed step runs
}

BOOST_AUTO_TEST_CASE(a_barrier_that_never_returns_fails_the_save_with_timeout) {
  auto barrier = std::make_shared<HangingBarrier>();
  auto hook = std::make_shared<RecordingHook>();
  auto checkpointer = create_sync_checkpointer(barrier, hook, ckpt::CheckpointWriterConfig{200ms});
  const fs::path checkpoint_path = temp_dir / "checkpoint_barrier_hangs";

  BOOST_CHECK_EXCEPTION(checkpointer->save(checkpoint_path, state_dict), ckpt::Timeout,
                        [&](const ckpt::Timeout& e) {
                          BOOST_TEST_MESSAGE("barrier timeout: " << e.what());
                          return mentions(e, checkpoint_path.string());
                        });
  BOOST_CHECK(barrier->entered());
  BOOST_CHECK(hook->pre_commit_kwargs.has_value());    // it ran before the barrier
  BOOST_CHECK(!hook->post_commit_kwargs.has_value());  // and post_commit never did

  // Let the abandoned barrier call finish before its objects go away.
  barrier->release();
  BOOST_CHECK(barrier->wait_exited());
  checkpointer->close();
  BOOST_CHECK(!hook->post_commit_kwargs.has_value());
}

// --- interop with Python torch through the checkpointer API --------------------

BOOST_AUTO_TEST_CASE(a_checkpoint_saved_by_sync_checkpointer_loads_in_python) {
  auto checkpointer = create_sync_checkpointer();
  Closer closer{*checkpointer};
  const fs::path checkpoint_path = temp_dir / "checkpoint_to_python";
  checkpointer->save(checkpoint_path, saved_by_ckpt());

  const auto r = run_python("check", checkpoint_path);
  BOOST_CHECK_MESSAGE(r.status == 0, "python exited with status " << r.status << ":\n" << r.output);
}

BOOST_AUTO_TEST_CASE(a_checkpoint_saved_by_python_loads_full_and_partial) {
  const fs::path checkpoint_path = temp_dir / "checkpoint_from_python";
  const auto r = run_python("make", checkpoint_path);
  BOOST_REQUIRE_MESSAGE(r.status == 0, "python exited with status " << r.status << ":\n" << r.output);
  BOOST_REQUIRE(fs::exists(file_in(checkpoint_path)));

  auto checkpointer = create_sync_checkpointer();
  Closer closer{*checkpointer};

  const auto full = checkpointer->load(checkpoint_path);
  BOOST_REQUIRE_EQUAL(full.size(), 3u);
  BOOST_CHECK_EQUAL(full.at("epoch").toInt(), 7);
  const auto model = full.sub("model");  // a Python OrderedDict
  BOOST_CHECK_EQUAL(model.size(), 2u);
  BOOST_CHECK(identical(model.at("weight").toTensor(), linear_weight()));
  BOOST_CHECK(identical(model.at("bias").toTensor(), linear_bias()));
  const auto groups = full.sub("optimizer").at("param_groups").toList();
  BOOST_REQUIRE_EQUAL(groups.size(), 1u);
  BOOST_CHECK_EQUAL(ckpt::StateDict::from_ivalue(groups.get(0)).at("lr").toDouble(), 0.01);

  ckpt::StateDict want_model;
  auto weight = at::zeros({5, 10});
  const void* weight_data = weight.data_ptr();
  want_model.insert("weight", weight);
  ckpt::StateDict target;
  target.insert("model", want_model);
  target.insert("epoch", IValue());
  const auto partial = checkpointer->load(checkpoint_path, {.state_dict = target, .strict = true});
  BOOST_CHECK(partial.is(target));
  BOOST_CHECK(identical(weight, linear_weight()));
  BOOST_CHECK(weight.data_ptr() == weight_data);
  BOOST_CHECK_EQUAL(partial.at("epoch").toInt(), 7);
  BOOST_CHECK(!partial.sub("model").contains("bias"));
  BOOST_CHECK(!partial.contains("optimizer"));
}

BOOST_AUTO_TEST_SUITE_END()

namespace {

/// A stager that is ready at once (upstream's Mock stager with a done future).
class ReadyStager : public ckpt::CheckpointStager {
 public:
  void close() override {}

 protected:
  void do_stage(ckpt::StateDict, ckpt::StagingFences,
                boost::asio::any_completion_handler<Signature> handler) override {
    ckpt::StagedCheckpoint staged;
    staged.state_dict.insert("staged", "data");
    std::move(handler)(nullptr, std::move(staged));
  }
};

/// A process whose every write fails with "Write failed" (upstream's Mock
/// process with a failed future); no child at all.
class FailingProcess : public ckpt::CheckpointProcess {
 public:
  explicit FailingProcess(executor_type executor) : CheckpointProcess(std::move(executor)) {}
  int writes = 0;

 protected:
  void do_write(ckpt::StagedCheckpoint, fs::path, ckpt::Kwargs,
                boost::asio::any_completion_handler<Signature> handler) override {
    ++writes;
    std::move(handler)(std::make_exception_ptr(std::runtime_error("Write failed")));
  }
};

/// Checks that a save's future completes without an error, naming the error.
void check_succeeds(std::future<void>& f, const char* what) {
  try {
    wait_get(f);
  } catch (const std::exception& e) {
    BOOST_ERROR(what << " failed: " << e.what());
  }
}

/// The error a future holds, as text; empty when it holds none.
std::string error_of(std::future<void>& f) {
  try {
    wait_get(f);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return {};
}

}  // namespace

// --- upstream: TestAsyncCheckpointerSpecific ---------------------------------------

BOOST_FIXTURE_TEST_SUITE(TestAsyncCheckpointerSpecific, AsyncCheckpointerFixture)

BOOST_AUTO_TEST_CASE(async_returns_futures) {
  auto checkpointer = create_async_checkpointer();
  Closer closer{*checkpointer};
  const fs::path checkpoint_path = temp_dir / "checkpoint_futures";

  // Two futures, as upstream's (stage_future, write_future).
  auto [stage_future, write_future] = checkpointer->save(checkpoint_path, state_dict);
  static_assert(std::is_same_v<decltype(stage_future), std::future<void>>);
  static_assert(std::is_same_v<decltype(write_future), std::future<void>>);
  BOOST_CHECK(stage_future.valid());
  BOOST_CHECK(write_future.valid());

  wait_get(stage_future);
  wait_get(write_future);
  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));
}

BOOST_AUTO_TEST_CASE(async_sequential_saves_wait) {
  auto checkpointer = create_async_checkpointer();
  Closer closer{*checkpointer};

  const fs::path checkpoint_path1 = temp_dir / "checkpoint_seq_1";
  auto [stage_future1, write_future1] = checkpointer->save(checkpoint_path1, state_dict);

  // The second save (waits for the first write before staging).
  const fs::path checkpoint_path2 = temp_dir / "checkpoint_seq_2";
  auto modified_state_dict = shallow_copy(state_dict);
  modified_state_dict.insert("epoch", 10);
  auto [stage_future2, write_future2] = checkpointer->save(checkpoint_path2, modified_state_dict);

  wait_get(stage_future2);
  BOOST_CHECK_MESSAGE(is_ready(write_future1), "the second save was staged before the first write completed");

  check_succeeds(write_future1, "the first write");
  check_succeeds(write_future2, "the second write");
  check_succeeds(stage_future1, "the first stage");

  const fs::path checkpoint_file1 = file_in(checkpoint_path1);
  const fs::path checkpoint_file2 = file_in(checkpoint_path2);
  BOOST_CHECK(fs::exists(checkpoint_file1));
  BOOST_CHECK(fs::exists(checkpoint_file2));

  // Read back independently of the checkpointer (upstream: torch.load).
  BOOST_REQUIRE(fs::exists(checkpoint_file1) && fs::exists(checkpoint_file2));
  const auto loaded1 = ckpt::StateDict::from_ivalue(ckpt::read_file(checkpoint_file1, {.verify_crc = true}));
  const auto loaded2 = ckpt::StateDict::from_ivalue(ckpt::read_file(checkpoint_file2, {.verify_crc = true}));
  BOOST_CHECK_EQUAL(loaded1.at("epoch").toInt(), 5);
  BOOST_CHECK_EQUAL(loaded2.at("epoch").toInt(), 10);
}

BOOST_AUTO_TEST_CASE(async_multiple_saves_ordering) {
  auto checkpointer = create_async_checkpointer();
  Closer closer{*checkpointer};

  std::vector<ckpt::StateDict> state_dicts;
  for (int epoch = 1; epoch <= 3; ++epoch) {
    ckpt::StateDict model;  // torch.nn.Linear(5, 3).state_dict()
    model.insert("weight", at::randn({3, 5}));
    model.insert("bias", at::randn({3}));
    ckpt::StateDict sd;
    sd.insert("epoch", epoch);
    sd.insert("model", model);
    state_dicts.push_back(sd);
  }

  std::vector<ckpt::SaveFutures> futures;
  std::vector<fs::path> checkpoint_paths;
  for (std::size_t i = 0; i < state_dicts.size(); ++i) {
    const fs::path checkpoint_path = temp_dir / ("multi_" + std::to_string(i + 1));
    checkpoint_paths.push_back(checkpoint_path);
    futures.push_back(checkpointer->save(checkpoint_path, state_dicts[i]));
  }

  for (std::size_t i = 0; i < futures.size(); ++i) {
    BOOST_TEST_CONTEXT("multi_" << i + 1) {
      check_succeeds(futures[i].staged, "the stage");
      check_succeeds(futures[i].written, "the write");
    }
  }

  for (std::size_t i = 0; i < checkpoint_paths.size(); ++i) {
    const fs::path checkpoint_file = file_in(checkpoint_paths[i]);
    BOOST_TEST_CONTEXT("multi_" << i + 1) {
      BOOST_REQUIRE(fs::exists(checkpoint_file));
      const auto loaded =
          ckpt::StateDict::from_ivalue(ckpt::read_file(checkpoint_file, {.verify_crc = true}));
      BOOST_CHECK_EQUAL(loaded.at("epoch").toInt(), static_cast<std::int64_t>(i + 1));
      BOOST_CHECK(identical(loaded.sub("model").at("weight").toTensor(),
                            state_dicts[i].sub("model").at("weight").toTensor()));
    }
  }
}

BOOST_AUTO_TEST_CASE(async_error_handling) {
  auto mock_stager = std::make_shared<ReadyStager>();
  auto mock_process = std::make_shared<FailingProcess>(io.executor());
  ckpt::AsyncCheckpointer checkpointer(io.executor(), mock_stager, mock_process, reader);
  const fs::path path = temp_dir / "test";

  // This does not throw...
  ckpt::SaveFutures futures;
  BOOST_REQUIRE_NO_THROW(futures = checkpointer.save(path, state_dict));
  BOOST_CHECK_NO_THROW(wait_get(futures.staged));
  // ...but waiting for the write does, with the write's own error.
  BOOST_CHECK_EXCEPTION(wait_get(futures.written), std::runtime_error,
                        [](const std::runtime_error& e) { return std::string(e.what()) == "Write failed"; });

  // Beyond upstream: the failed write is reported once more, to the next save
  // (both of its futures), and the save after that proceeds.
  auto next = checkpointer.save(temp_dir / "test_next", state_dict);
  BOOST_CHECK_EQUAL(error_of(next.staged), "Write failed");
  BOOST_CHECK_EQUAL(error_of(next.written), "Write failed");
  auto after = checkpointer.save(temp_dir / "test_after", state_dict);
  BOOST_CHECK_NO_THROW(wait_get(after.staged));
  BOOST_CHECK_EQUAL(error_of(after.written), "Write failed");  // this fake fails every write
  BOOST_CHECK_EQUAL(mock_process->writes, 2);                  // the save that failed wrote nothing

  BOOST_CHECK_NO_THROW(checkpointer.close());
}

BOOST_AUTO_TEST_CASE(async_future_results) {
  auto checkpointer = create_async_checkpointer();
  Closer closer{*checkpointer};
  const fs::path checkpoint_path = temp_dir / "checkpoint_results";

  auto [stage_future, write_future] = checkpointer->save(checkpoint_path, state_dict);
  // Both complete with no value (upstream: both results are None).
  static_assert(std::is_void_v<decltype(stage_future.get())>);
  static_assert(std::is_void_v<decltype(write_future.get())>);
  BOOST_CHECK_NO_THROW(wait_get(stage_future));
  BOOST_CHECK_NO_THROW(wait_get(write_future));
}

BOOST_AUTO_TEST_SUITE_END()

// --- upstream: test_builder.py, the async factory ---------------------------------

BOOST_FIXTURE_TEST_SUITE(TestMakeAsyncCheckpointer, AsyncCheckpointerFixture)

BOOST_AUTO_TEST_CASE(make_async_checkpointer) {
  ckpt::CheckpointerConfig config;
  config.staging_config.use_non_blocking_copy = at::hasCUDA();
  config.staging_config.use_pinned_memory = at::hasCUDA();
  auto checkpointer = ckpt::make_async_checkpointer(io.executor(), config, rank_info);
  BOOST_REQUIRE(checkpointer != nullptr);
  Closer closer{*checkpointer};

  const fs::path checkpoint_path = temp_dir / "checkpoint_factory_async";
  auto [stage_future, write_future] = checkpointer->save(checkpoint_path, state_dict);
  BOOST_CHECK(stage_future.valid());
  BOOST_CHECK(write_future.valid());
  wait_get(stage_future);
  wait_get(write_future);

  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));
  const auto loaded_state_dict = checkpointer->load(checkpoint_path);
  BOOST_CHECK_EQUAL(loaded_state_dict.at("epoch").toInt(), 5);
}

BOOST_AUTO_TEST_CASE(make_async_checkpointer_with_its_own_io_context) {
  // Upstream's builder takes no executor; this overload runs one of its own.
  ckpt::CheckpointerConfig config;
  config.staging_config.use_non_blocking_copy = at::hasCUDA();
  config.staging_config.use_pinned_memory = at::hasCUDA();
  auto checkpointer = ckpt::make_async_checkpointer(config, rank_info);
  BOOST_REQUIRE(checkpointer != nullptr);
  Closer closer{*checkpointer};

  const fs::path checkpoint_path = temp_dir / "checkpoint_factory_async_own_context";
  auto [stage_future, write_future] = checkpointer->save(checkpoint_path, state_dict);
  wait_get(stage_future);
  wait_get(write_future);

  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));
  BOOST_CHECK_EQUAL(checkpointer->load(checkpoint_path).at("epoch").toInt(), 5);
}

BOOST_AUTO_TEST_SUITE_END()