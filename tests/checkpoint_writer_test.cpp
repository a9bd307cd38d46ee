// CheckpointWriter, ported from upstream's test_checkpoint_writer.py: the config's
// defaults, the file written and read back, the barrier run exactly once, the
// hooks given the directory and the save's kwargs; and beyond upstream, the
// commit order its header promises.
#include <ckpt/checkpoint_writer.hpp>

#define BOOST_TEST_MODULE checkpoint_writer_test
#include <boost/test/unit_test.hpp>

#include <ckpt/format.hpp>

#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using c10::IValue;
using ckpt::test::TempDir;

using ckpt::test::upstream_state_dict;
namespace {

/// Upstream's MockWriterHook: records each call, its path and its kwargs. Also
/// logs the calls into `events` (shared with CountingBarrier) to check the order.
class MockWriterHook : public ckpt::WriterHook {
 public:
  explicit MockWriterHook(std::shared_ptr<std::vector<std::string>> events = nullptr)
      : events_(std::move(events)) {}

  void pre_commit(const fs::path& path, const ckpt::Kwargs& kwargs) override {
    pre_commit_called = true;
    pre_commit_path = path;
    pre_commit_kwargs = kwargs;
    // The rank's file is durable before any hook runs.
    pre_commit_saw_file = fs::exists(path / ckpt::checkpoint_file_name(0));
    if (events_) events_->push_back("pre_commit");
  }
  void post_commit(const fs::path& path, const ckpt::Kwargs& kwargs) override {
    commit_called = true;
    commit_path = path;
    commit_kwargs = kwargs;
    if (events_) events_->push_back("post_commit");
  }

  bool pre_commit_called = false;
  bool commit_called = false;
  bool pre_commit_saw_file = false;
  std::optional<fs::path> pre_commit_path;
  std::optional<fs::path> commit_path;
  std::optional<ckpt::Kwargs> pre_commit_kwargs;
  std::optional<ckpt::Kwargs> commit_kwargs;

 private:
  std::shared_ptr<std::vector<std::string>> events_;
};

/// Upstream's MagicMock barrier: counts execute_barrier() calls.
class CountingBarrier : public ckpt::Barrier {
 public:
  explicit CountingBarrier(std::shared_ptr<std::vector<std::string>> events = nullptr)
      : events_(std::move(events)) {}
  void execute_barrier() override {
    ++calls;
    if (events_) events_->push_back("barrier");
  }
  int calls = 0;

 private:
  std::shared_ptr<std::vector<std::string>> events_;
};

/// upstream's setUp: a writer with a barrier and a hook, rank 0 of 1.
struct WriterFixture {
  TempDir temp_dir;
  ckpt::RankInfo rank_info{.global_rank = 0, .global_world_size = 1};
  ckpt::CheckpointWriterConfig options;
  std::shared_ptr<CountingBarrier> mock_barrier = std::make_shared<CountingBarrier>();
  std::shared_ptr<MockWriterHook> mock_hook = std::make_shared<MockWriterHook>();
  ckpt::CheckpointWriter writer{options, rank_info, mock_barrier, mock_hook};
  ckpt::StateDict state_dict = upstream_state_dict();

  fs::path file_in(const fs::path& dir) const {
    return dir / ("checkpoint_" + std::to_string(rank_info.global_rank) + ".pt");
  }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(TestCheckpointWriterConfig)

BOOST_AUTO_TEST_CASE(default_values) {
  const ckpt::CheckpointWriterConfig options;
  BOOST_CHECK(options.write_barrier_timeout == std::chrono::seconds(600));
}

BOOST_AUTO_TEST_CASE(custom_values) {
  const ckpt::CheckpointWriterConfig options{.write_barrier_timeout = std::chrono::seconds(300)};
  BOOST_CHECK(options.write_barrier_timeout == std::chrono::seconds(300));
  // The writer keeps the config it was given.
  const ckpt::CheckpointWriter writer(options, ckpt::RankInfo{});
  BOOST_CHECK(writer.config().write_barrier_timeout == std::chrono::seconds(300));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(TestCheckpointWriter, WriterFixture)

BOOST_AUTO_TEST_CASE(write_creates_checkpoint_file) {
  const fs::path checkpoint_path = temp_dir / "checkpoint";
  writer.write(checkpoint_path, state_dict);

  const fs::path expected_file_path = file_in(checkpoint_path);
  BOOST_REQUIRE(fs::exists(expected_file_path));
  BOOST_CHECK_EQUAL(ckpt::checkpoint_file_name(0), "checkpoint_0.pt");

  // Read the file back (upstream: torch.load) and check its contents.
  const auto loaded_state_dict = ckpt::StateDict::from_ivalue(ckpt::read_file(expected_file_path));
  BOOST_CHECK(loaded_state_dict.contains("model"));
  BOOST_CHECK(loaded_state_dict.contains("optimizer"));
  BOOST_CHECK_EQUAL(loaded_state_dict.at("epoch").toInt(), 5);
  BOOST_CHECK_EQUAL(loaded_state_dict.at("step").toInt(), 1000);
  // Beyond upstream: the tensors and the nested optimizer come back exactly.
  const auto model = loaded_state_dict.sub("model");
  BOOST_CHECK(
      ckpt::test::identical(model.at("weight").toTensor(), state_dict.sub("model").at("weight").toTensor()));
  BOOST_CHECK(
      ckpt::test::identical(model.at("bias").toTensor(), state_dict.sub("model").at("bias").toTensor()));
  const auto groups = loaded_state_dict.sub("optimizer").at("param_groups").toList();
  BOOST_REQUIRE_EQUAL(groups.size(), 1u);
  BOOST_CHECK_EQUAL(ckpt::StateDict::from_ivalue(groups.get(0)).at("lr").toDouble(), 0.01);
}

BOOST_AUTO_TEST_CASE(write_calls_barrier) {
  writer.write(temp_dir / "checkpoint", state_dict);
  BOOST_CHECK_EQUAL(mock_barrier->calls, 1);
}

BOOST_AUTO_TEST_CASE(write_calls_commit_hooks) {
  const fs::path checkpoint_path = temp_dir / "checkpoint";
  const ckpt::Kwargs kwargs{{"extra", "value"}};
  writer.write(checkpoint_path, state_dict, kwargs);

  BOOST_CHECK(mock_hook->pre_commit_called);
  BOOST_CHECK(mock_hook->pre_commit_path == checkpoint_path);
  BOOST_REQUIRE(mock_hook->pre_commit_kwargs.has_value());
  BOOST_REQUIRE(mock_hook->pre_commit_kwargs->contains("extra"));
  BOOST_CHECK_EQUAL(mock_hook->pre_commit_kwargs->at("extra").as_string(), "value");

  BOOST_CHECK(mock_hook->commit_called);
  BOOST_CHECK(mock_hook->commit_path == checkpoint_path);
  BOOST_REQUIRE(mock_hook->commit_kwargs.has_value());
  BOOST_REQUIRE(mock_hook->commit_kwargs->contains("extra"));
  BOOST_CHECK_EQUAL(mock_hook->commit_kwargs->at("extra").as_string(), "value");
  // Exactly what the caller passed, nothing added.
  BOOST_CHECK(*mock_hook->pre_commit_kwargs == kwargs);
  BOOST_CHECK(*mock_hook->commit_kwargs == kwargs);
}

BOOST_AUTO_TEST_CASE(write_without_barrier) {
  ckpt::CheckpointWriter no_barrier(options, rank_info, nullptr, mock_hook);
  const fs::path checkpoint_path = temp_dir / "checkpoint_no_barrier";
  no_barrier.write(checkpoint_path, state_dict);
  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));
  BOOST_CHECK(mock_hook->pre_commit_called);  // the hooks still run
  BOOST_CHECK(mock_hook->commit_called);
  BOOST_CHECK(no_barrier.barrier() == nullptr);
}

BOOST_AUTO_TEST_CASE(write_without_commit_hook) {
  ckpt::CheckpointWriter no_hook(options, rank_info, mock_barrier, nullptr);
  const fs::path checkpoint_path = temp_dir / "checkpoint_no_hook";
  no_hook.write(checkpoint_path, state_dict);
  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));
  BOOST_CHECK_EQUAL(mock_barrier->calls, 1);  // the barrier is still called, once
  BOOST_CHECK(no_hook.commit_hook() == nullptr);
}

BOOST_AUTO_TEST_CASE(close) {
  BOOST_CHECK_NO_THROW(writer.close());
  BOOST_CHECK_NO_THROW(writer.close());  // idempotent
}

// --- beyond upstream ------------------------------------------------------------

BOOST_AUTO_TEST_CASE(commit_order_is_file_pre_commit_barrier_post_commit) {
  auto events = std::make_shared<std::vector<std::string>>();
  auto hook = std::make_shared<MockWriterHook>(events);
  ckpt::CheckpointWriter ordered(options, rank_info, std::make_shared<CountingBarrier>(events), hook);
  const fs::path checkpoint_path = temp_dir / "nested" / "dirs" / "checkpoint_order";  // parents are created
  ordered.write(checkpoint_path, state_dict);
  BOOST_CHECK((*events == std::vector<std::string>{"pre_commit", "barrier", "post_commit"}));
  BOOST_CHECK(hook->pre_commit_saw_file);
  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));
}

BOOST_AUTO_TEST_CASE(writes_the_file_of_its_own_rank) {
  ckpt::CheckpointWriter rank3(options, ckpt::RankInfo{.global_rank = 3, .global_world_size = 4});
  const fs::path checkpoint_path = temp_dir / "checkpoint_rank3";
  rank3.write(checkpoint_path, state_dict);
  BOOST_CHECK(fs::exists(checkpoint_path / "checkpoint_3.pt"));
  BOOST_CHECK(!fs::exists(checkpoint_path / "checkpoint_0.pt"));
  BOOST_CHECK_EQUAL(ckpt::checkpoint_file_name(3), "checkpoint_3.pt");
}

BOOST_AUTO_TEST_CASE(a_second_write_replaces_the_first) {
  const fs::path checkpoint_path = temp_dir / "checkpoint";
  writer.write(checkpoint_path, state_dict);
  state_dict.insert("epoch", 6);
  writer.write(checkpoint_path, state_dict);
  const auto loaded = ckpt::StateDict::from_ivalue(ckpt::read_file(file_in(checkpoint_path)));
  BOOST_CHECK_EQUAL(loaded.at("epoch").toInt(), 6);
  BOOST_CHECK_EQUAL(mock_barrier->calls, 2);
  // No temporary file of the rank is left beside it.
  for (const auto& entry : fs::directory_iterator(checkpoint_path)) {
    const std::string name = entry.path().filename().string();
    BOOST_CHECK_MESSAGE(name == "checkpoint_0.pt" || name.find("checkpoint_0") == std::string::npos,
                        "left behind: " << name);
  }
}

BOOST_AUTO_TEST_SUITE_END()
