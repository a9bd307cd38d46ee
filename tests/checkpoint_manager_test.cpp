// CheckpointManager in one process, over a SyncCheckpointer of a job of one
// rank (RankInfo{0, 1}: the writer commits each save with a marker on its own,
// no barrier needed): step directories, the step floor, what counts as
// committed, pruning, and restoring the newest committed state, falling back
// past one damaged since its commit. The multi-rank suite covers the manager
// across real rank processes.
#include <ckpt/checkpoint_manager.hpp>

#define BOOST_TEST_MODULE checkpoint_manager_test
#include <boost/test/unit_test.hpp>

#include <ckpt/checkpointer.hpp>
#include <ckpt/commit.hpp>
#include <ckpt/error.hpp>
#include <ckpt/format.hpp>
#include <ckpt/log.hpp>
#include <ckpt/state_dict.hpp>

#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fs = std::filesystem;
using ckpt::test::mentions;
using ckpt::test::TempDir;

using ckpt::test::LogCapture;
namespace {

const ckpt::RankInfo kAlone{0, 1};

/// The training state at `step`: every value differs from one step to the next.
ckpt::StateDict state_at(std::int64_t step) {
  const double s = static_cast<double>(step);
  ckpt::StateDict model;
  model.insert("weight", at::arange(8 * 16, at::kFloat).reshape({8, 16}) * s + 0.25);
  model.insert("bias", at::full({16}, s - 0.5, at::kDouble));
  ckpt::StateDict sd;
  sd.insert("model", model);
  sd.insert("step", step);
  return sd;
}

/// A target of the same shape, all zeros.
ckpt::StateDict blank_target() {
  ckpt::StateDict model;
  model.insert("weight", at::zeros({8, 16}, at::kFloat));
  model.insert("bias", at::zeros({16}, at::kDouble));
  ckpt::StateDict sd;
  sd.insert("model", model);
  sd.insert("step", std::int64_t{-1});
  return sd;
}

/// Whether `target` holds exactly state_at(step).
bool holds_state_of(const ckpt::StateDict& target, std::int64_t step) {
  const auto expected = state_at(step);
  const auto model = target.sub("model");
  return ckpt::test::identical(model.at("weight").toTensor(),
                               expected.sub("model").at("weight").toTensor()) &&
         ckpt::test::identical(model.at("bias").toTensor(), expected.sub("model").at("bias").toTensor()) &&
         target.at("step").toInt() == step;
}

std::shared_ptr<ckpt::Checkpointer> alone_checkpointer() {
  return ckpt::make_sync_checkpointer({}, kAlone);
}

/// The step directories (and anything else) under `root`, by name.
std::vector<std::string> entries_of(const fs::path& root) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(root)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<std::int64_t> steps_of(const std::vector<ckpt::CommittedCheckpoint>& all) {
  std::vector<std::int64_t> steps;
  for (const auto& c : all) steps.push_back(c.step);
  return steps;
}

/// A save killed after its file was durable and before the marker: the
/// directory holds rank 0's file and no marker.
void leave_uncommitted(const fs::path& dir, std::int64_t step) {
  fs::create_directories(dir);
  ckpt::write_file(dir / ckpt::checkpoint_file_name(0), state_at(step).to_ivalue());
  BOOST_REQUIRE(!fs::exists(dir / ckpt::kCommitMarkerName));
}

/// A byte in the middle of the first tensor record's data in `file`.
std::uint64_t tensor_byte(const fs::path& file) {
  ckpt::FileReader reader(file);
  reader.verify();  // reads every local header: data offsets known
  for (const auto& rec : reader.records())
    if (rec.name.find("/data/") != std::string::npos && rec.size > 0) return rec.data_offset + rec.size / 2;
  BOOST_FAIL("no tensor record in " << file);
  return 0;
}

/// A root in a TempDir and a checkpointer of a job of one rank.
struct Root {
  TempDir temp;
  fs::path root = temp / "run";
  std::shared_ptr<ckpt::Checkpointer> checkpointer = alone_checkpointer();

  ckpt::CheckpointManager manager(std::size_t keep_last_n = 0) const {
    return ckpt::CheckpointManager(root, checkpointer, {.keep_last_n = keep_last_n, .rank_info = kAlone});
  }
};

/// Saves `step` and waits for its commit and pruning.
void save(ckpt::CheckpointManager& manager, std::int64_t step) {
  auto futures = manager.save(step, state_at(step));
  futures.staged.get();
  futures.written.get();
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(layout, Root)

BOOST_AUTO_TEST_CASE(path_of_is_root_step_n) {
  auto m = manager();
  BOOST_TEST(m.root() == root);
  BOOST_TEST(m.path_of(0) == root / "step_0");
  BOOST_TEST(m.path_of(7) == root / "step_7");
  BOOST_TEST(m.path_of(1234567890123) == root / "step_1234567890123");
}

BOOST_AUTO_TEST_CASE(a_save_commits_into_path_of_its_step) {
  auto m = manager();
  save(m, 3);
  BOOST_TEST(fs::exists(m.path_of(3) / "checkpoint_0.pt"));
  BOOST_TEST(ckpt::is_committed(m.path_of(3)));
  const auto latest = m.latest_committed();
  BOOST_REQUIRE(latest.has_value());
  BOOST_TEST(latest->step == 3);
  BOOST_TEST(latest->path == m.path_of(3));
}

BOOST_AUTO_TEST_CASE(needs_a_checkpointer) {
  BOOST_CHECK_THROW(ckpt::CheckpointManager(root, nullptr, {.rank_info = kAlone}), ckpt::Error);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(step_floor, Root)

BOOST_AUTO_TEST_CASE(a_negative_step_is_refused) {
  auto m = manager();
  BOOST_CHECK_EXCEPTION(m.save(-1, state_at(1)), ckpt::Error,
                        [](const ckpt::Error& e) { return mentions(e, "-1") && mentions(e, "negative"); });
  BOOST_TEST(!fs::exists(root));  // nothing was written
}

BOOST_AUTO_TEST_CASE(a_step_not_above_the_newest_committed_is_refused) {
  auto m = manager();
  save(m, 5);
  for (const std::int64_t step : {5, 4, 0}) {
    BOOST_TEST_CONTEXT("step " << step) {
      BOOST_CHECK_EXCEPTION(m.save(step, state_at(step)), ckpt::Error, [&](const ckpt::Error& e) {
        BOOST_TEST_INFO("what(): " << e.what());
        return mentions(e, "step " + std::to_string(step)) && mentions(e, m.path_of(5).string());
      });
    }
  }
  // The refused saves wrote nothing and the committed one is unchanged.
  BOOST_TEST((entries_of(root) == std::vector<std::string>{"step_5"}));
  BOOST_TEST(ckpt::is_committed(m.path_of(5)));
  save(m, 6);
  BOOST_TEST((steps_of(m.committed()) == std::vector<std::int64_t>{5, 6}));
}

BOOST_AUTO_TEST_CASE(the_floor_of_a_new_manager_is_found_by_scanning_the_root) {
  {
    auto first = manager();
    save(first, 10);
    save(first, 20);
  }
  // A later uncommitted directory (a save killed before its commit) does not
  // raise the floor.
  leave_uncommitted(root / "step_30", 30);

  auto second = manager();
  for (const std::int64_t step : {20, 15}) {
    BOOST_TEST_CONTEXT("step " << step) {
      BOOST_CHECK_EXCEPTION(second.save(step, state_at(step)), ckpt::Error, [&](const ckpt::Error& e) {
        return mentions(e, "step 20") && mentions(e, second.path_of(20).string());
      });
    }
  }
  save(second, 21);
  BOOST_TEST((steps_of(second.committed()) == std::vector<std::int64_t>{10, 20, 21}));
  // A save over the uncommitted directory of a higher step commits it.
  save(second, 30);
  BOOST_TEST((steps_of(second.committed()) == std::vector<std::int64_t>{10, 20, 21, 30}));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(listing, Root)

BOOST_AUTO_TEST_CASE(nothing_is_committed_in_an_empty_or_absent_root) {
  auto m = manager();
  BOOST_TEST(m.committed().empty());
  BOOST_TEST(!m.latest_committed().has_value());
  fs::create_directories(root);
  BOOST_TEST(m.committed().empty());
  BOOST_TEST(!m.latest_committed().has_value());
}

BOOST_AUTO_TEST_CASE(committed_is_oldest_first_by_step_number) {
  auto m = manager();
  // Numerically, not by name: step_100 < step_2 as strings.
  for (const std::int64_t step : {2, 10, 100}) save(m, step);
  const auto all = m.committed();
  BOOST_TEST((steps_of(all) == std::vector<std::int64_t>{2, 10, 100}));
  for (const auto& c : all) BOOST_TEST(c.path == m.path_of(c.step));
  const auto latest = m.latest_committed();
  BOOST_REQUIRE(latest.has_value());
  BOOST_TEST(latest->step == 100);
  BOOST_TEST(latest->path == m.path_of(100));
}

BOOST_AUTO_TEST_CASE(uncommitted_and_foreign_directories_are_never_listed) {
  auto m = manager();
  for (const std::int64_t step : {1, 2, 4, 5}) save(m, step);
  leave_uncommitted(m.path_of(3), 3);  // no marker
  // Step 4's file damaged after its commit: no longer matches its marker.
  fs::resize_file(m.path_of(4) / "checkpoint_0.pt", fs::file_size(m.path_of(4) / "checkpoint_0.pt") - 1);
  // Step 5's marker gone.
  fs::remove(m.path_of(5) / ckpt::kCommitMarkerName);
  // Names that are not step directories, holding committed checkpoints.
  fs::copy(m.path_of(1), root / "step_01", fs::copy_options::recursive);
  fs::copy(m.path_of(1), root / "best", fs::copy_options::recursive);
  BOOST_REQUIRE(ckpt::is_committed(root / "step_01"));

  BOOST_TEST((steps_of(m.committed()) == std::vector<std::int64_t>{1, 2}));
  const auto latest = m.latest_committed();
  BOOST_REQUIRE(latest.has_value());
  BOOST_TEST(latest->step == 2);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(pruning, Root)

BOOST_AUTO_TEST_CASE(keep_last_2_over_5_saves_leaves_the_two_newest) {
  auto m = manager(2);
  for (std::int64_t step = 1; step <= 5; ++step) {
    save(m, step);
    // After each save: at most the two newest are left.
    std::vector<std::string> expected;
    for (std::int64_t s = std::max<std::int64_t>(1, step - 1); s <= step; ++s)
      expected.push_back("step_" + std::to_string(s));
    BOOST_TEST_INFO("after step " << step);
    BOOST_TEST((entries_of(root) == expected));
  }
  BOOST_TEST((steps_of(m.committed()) == std::vector<std::int64_t>{4, 5}));
  // What is left still restores.
  auto target = blank_target();
  BOOST_TEST(m.restore_latest(target).value_or(-1) == 5);
  BOOST_TEST(holds_state_of(target, 5));
}

BOOST_AUTO_TEST_CASE(keep_0_keeps_every_committed_checkpoint) {
  auto m = manager(0);
  for (std::int64_t step = 1; step <= 4; ++step) save(m, step);
  BOOST_TEST((steps_of(m.committed()) == std::vector<std::int64_t>{1, 2, 3, 4}));
  BOOST_TEST(m.prune().empty());
}

BOOST_AUTO_TEST_CASE(newer_uncommitted_directories_never_make_the_newest_committed_go) {
  auto m = manager(2);
  for (std::int64_t step = 1; step <= 5; ++step) save(m, step);
  // Saves of higher steps that never committed (killed, or still in flight on
  // another rank).
  leave_uncommitted(m.path_of(6), 6);
  leave_uncommitted(m.path_of(7), 7);
  BOOST_TEST(m.prune().empty());
  BOOST_TEST((entries_of(root) == std::vector<std::string>{"step_4", "step_5", "step_6", "step_7"}));
  BOOST_TEST((steps_of(m.committed()) == std::vector<std::int64_t>{4, 5}));

  // keep_last_n = 1 with only uncommitted ones above: the newest committed stays.
  auto keep1 = manager(1);
  const auto removed = keep1.prune();
  BOOST_TEST((removed == std::vector<fs::path>{m.path_of(4)}));
  BOOST_TEST((entries_of(root) == std::vector<std::string>{"step_5", "step_6", "step_7"}));
  auto target = blank_target();
  BOOST_TEST(keep1.restore_latest(target).value_or(-1) == 5);
  BOOST_TEST(holds_state_of(target, 5));
}

BOOST_AUTO_TEST_CASE(failed_saves_older_than_the_newest_committed_are_removed) {
  auto m = manager(0);  // keeps every committed checkpoint; removes only debris
  save(m, 1);
  save(m, 2);
  leave_uncommitted(m.path_of(3), 3);  // a save killed before its marker
  // Step 2's file damaged after its commit.
  fs::resize_file(m.path_of(2) / "checkpoint_0.pt", fs::file_size(m.path_of(2) / "checkpoint_0.pt") / 2);
  BOOST_TEST((steps_of(m.committed()) == std::vector<std::int64_t>{1}));
  fs::create_directories(root / "notes");  // not a step directory: left alone

  save(m, 4);  // prunes after committing
  BOOST_TEST((entries_of(root) == std::vector<std::string>{"notes", "step_1", "step_4"}));
  BOOST_TEST((steps_of(m.committed()) == std::vector<std::int64_t>{1, 4}));
}

BOOST_AUTO_TEST_CASE(prune_returns_what_it_removed) {
  auto m = manager(0);
  save(m, 1);
  save(m, 2);
  leave_uncommitted(m.path_of(0), 0);
  auto keep1 = manager(1);
  auto removed = keep1.prune();
  std::sort(removed.begin(), removed.end());
  BOOST_TEST((removed == std::vector<fs::path>{m.path_of(0), m.path_of(1)}));
  BOOST_TEST((entries_of(root) == std::vector<std::string>{"step_2"}));
}

BOOST_AUTO_TEST_CASE(nothing_is_removed_while_nothing_is_committed) {
  auto m = manager(1);
  leave_uncommitted(m.path_of(1), 1);
  leave_uncommitted(m.path_of(2), 2);
  BOOST_TEST(m.prune().empty());
  BOOST_TEST((entries_of(root) == std::vector<std::string>{"step_1", "step_2"}));
}

BOOST_AUTO_TEST_CASE(a_rank_other_than_0_never_prunes) {
  {
    auto coordinator = manager(0);
    save(coordinator, 1);
    save(coordinator, 2);
    save(coordinator, 3);
  }
  leave_uncommitted(root / "step_0", 0);
  // Rank 1 of 2, with no barrier: its save writes its own file and no marker
  // (only rank 0 commits), so nothing waits on another rank here.
  const ckpt::RankInfo rank1{1, 2};
  ckpt::CheckpointManager other(root, ckpt::make_sync_checkpointer({}, rank1),
                                {.keep_last_n = 1, .rank_info = rank1});
  BOOST_TEST(other.prune().empty());
  auto futures = other.save(4, state_at(4));
  futures.written.get();
  BOOST_TEST(fs::exists(other.path_of(4) / "checkpoint_1.pt"));
  BOOST_TEST(!fs::exists(other.path_of(4) / ckpt::kCommitMarkerName));
  BOOST_TEST(
      (entries_of(root) == std::vector<std::string>{"step_0", "step_1", "step_2", "step_3", "step_4"}));
  BOOST_TEST((steps_of(other.committed()) == std::vector<std::int64_t>{1, 2, 3}));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(restore, Root)

BOOST_AUTO_TEST_CASE(restores_exactly_the_newest_committed_state) {
  auto m = manager();
  for (const std::int64_t step : {1, 2, 3}) save(m, step);
  leave_uncommitted(m.path_of(4), 4);  // newer, never committed: not restored
  auto target = blank_target();
  const auto step = m.restore_latest(target);
  BOOST_TEST(step.value_or(-1) == 3);
  BOOST_TEST(holds_state_of(target, 3));
}

BOOST_AUTO_TEST_CASE(restores_in_place_into_the_targets_tensors) {
  auto m = manager();
  save(m, 2);
  auto target = blank_target();
  const at::Tensor weight = target.sub("model").at("weight").toTensor();
  const void* const memory = weight.data_ptr();
  BOOST_TEST(m.restore_latest(target).value_or(-1) == 2);
  BOOST_TEST(target.sub("model").at("weight").toTensor().data_ptr() == memory);
  BOOST_TEST(ckpt::test::identical(weight, state_at(2).sub("model").at("weight").toTensor()));
}

BOOST_AUTO_TEST_CASE(an_empty_root_restores_nothing_and_leaves_the_target) {
  auto m = manager();
  auto target = state_at(9);
  BOOST_TEST(!m.restore_latest(target).has_value());  // root absent
  BOOST_TEST(holds_state_of(target, 9));
  fs::create_directories(root);
  leave_uncommitted(m.path_of(1), 1);  // nothing committed
  BOOST_TEST(!m.restore_latest(target).has_value());
  BOOST_TEST(holds_state_of(target, 9));
}

BOOST_AUTO_TEST_CASE(a_damaged_zip_directory_uncommits_so_the_one_before_is_restored) {
  auto m = manager();
  save(m, 1);
  save(m, 2);
  // One flipped byte in the last 22 bytes (the zip end record) of step 2's
  // file: its directory no longer matches the marker.
  const fs::path file = m.path_of(2) / "checkpoint_0.pt";
  ckpt::test::flip_byte(file, fs::file_size(file) - 10);
  BOOST_TEST((steps_of(m.committed()) == std::vector<std::int64_t>{1}));
  auto target = blank_target();
  BOOST_TEST(m.restore_latest(target).value_or(-1) == 1);
  BOOST_TEST(holds_state_of(target, 1));
}

BOOST_AUTO_TEST_CASE(a_committed_checkpoint_damaged_since_falls_back_to_the_one_before) {
  auto m = manager();
  save(m, 1);
  save(m, 2);
  save(m, 3);
  // One flipped byte in a tensor record of step 3: the marker digests the zip
  // directory only, so step 3 still counts as committed; a load that checks
  // CRCs (verify_crc) finds the damage.
  const fs::path damaged = m.path_of(3);
  ckpt::test::flip_byte(damaged / "checkpoint_0.pt", tensor_byte(damaged / "checkpoint_0.pt"));
  BOOST_REQUIRE(m.latest_committed().has_value());
  BOOST_TEST(m.latest_committed()->step == 3);

  std::optional<std::int64_t> step;
  auto target = blank_target();
  std::vector<std::pair<ckpt::LogLevel, std::string>> logged;
  {
    LogCapture logs;
    step = m.restore_latest(target, {.strict = true, .verify_crc = true});
    logged = logs.messages();
  }
  BOOST_TEST(step.value_or(-1) == 2);
  BOOST_TEST(holds_state_of(target, 2));
  BOOST_REQUIRE(logged.size() == 1u);
  BOOST_TEST((logged[0].first == ckpt::LogLevel::warning));
  BOOST_TEST_INFO("logged: " << logged[0].second);
  BOOST_TEST(logged[0].second.find(damaged.string()) != std::string::npos);
}

BOOST_AUTO_TEST_CASE(every_committed_checkpoint_damaged_restores_nothing) {
  auto m = manager();
  save(m, 1);
  save(m, 2);
  for (const std::int64_t s : {1, 2})
    ckpt::test::flip_byte(m.path_of(s) / "checkpoint_0.pt", tensor_byte(m.path_of(s) / "checkpoint_0.pt"));
  LogCapture logs;
  auto target = blank_target();
  BOOST_TEST(!m.restore_latest(target, {.strict = true, .verify_crc = true}).has_value());
  const auto logged = logs.messages();
  BOOST_REQUIRE(logged.size() == 2u);
  BOOST_TEST(logged[0].second.find(m.path_of(2).string()) != std::string::npos);
  BOOST_TEST(logged[1].second.find(m.path_of(1).string()) != std::string::npos);
}

BOOST_AUTO_TEST_CASE(a_strict_restore_into_a_target_with_keys_the_checkpoint_lacks_throws) {
  auto m = manager();
  save(m, 1);
  auto target = blank_target();
  target.insert("scheduler", at::zeros({1}));
  BOOST_CHECK_EXCEPTION(m.restore_latest(target), ckpt::MissingKeys,
                        [](const ckpt::MissingKeys& e) { return mentions(e, "'scheduler'"); });
  // Not strict: the keys it has are restored.
  auto loose = blank_target();
  loose.insert("scheduler", at::zeros({1}));
  BOOST_TEST(m.restore_latest(loose, {.strict = false}).value_or(-1) == 1);
  BOOST_TEST(holds_state_of(loose, 1));
}

BOOST_AUTO_TEST_SUITE_END()
