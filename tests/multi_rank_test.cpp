// The checkpointers, the commit marker and the CheckpointManager on four real
// rank processes: each case runs `ckpt-launch -n 4 --timeout 120
// multi_rank_worker SCENARIO DIR` (tests/support/multi_rank_worker.cpp: a real
// c10d group, a real tcp_store barrier, real writer children), then checks
//   - the launcher's exit status (0: every rank saw what it expected),
//   - every rank's `[rank R] RESULT <label> <outcome>` lines,
//   - the files in DIR, read here independently of the worker: the commit
//     marker, the files it names, their contents.
// Nothing waits on a clock: a rank that waited for a barrier it should not
// wait for shows as a launcher failure (--timeout) or as this test's own bound
// on the launcher (kBound). This process is a child subreaper, so a rank or a
// writer child left behind is found, named, and killed.
// Barrier rounds are named by checkpoint (a rank that skips a save puts no
// later round out of step).
#include <ckpt/commit.hpp>

#define BOOST_TEST_MODULE multi_rank_test
#include <boost/test/unit_test.hpp>

#include <ckpt/checkpoint_writer.hpp>
#include <ckpt/format.hpp>
#include <ckpt/state_dict.hpp>

#include "support/process.hpp"
#include "support/rank_runs.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace fs = std::filesystem;
using ckpt::test::TempDir;

namespace {

constexpr int kRanks = 4;
/// The launcher's own limit on a scenario, and this test's bound on the
/// launcher (its limit plus its 5 s grace to stop ranks, plus slack). Hang
/// guards, not measurements: a scenario takes seconds.
constexpr int kLauncherTimeout = 120;
constexpr auto kBound = std::chrono::seconds(kLauncherTimeout + 30);

fs::path bin_dir() {
  return fs::canonical("/proc/self/exe").parent_path();
}

/// Ranks and writer children left behind are re-parented here, not to init.
struct ChildSubreaper {
  ChildSubreaper() { ckpt::test::become_child_subreaper(); }
};

using Run = ckpt::test::RankRun;
using ckpt::test::contains;
using ckpt::test::starts_with;

/// Runs the worker's `scenario` on kRanks ranks through ckpt-launch, to its end.
Run launch(const std::string& scenario, const fs::path& dir) {
  const Run run = ckpt::test::run_bounded(
      {(bin_dir() / "ckpt-launch").string(), "-n", std::to_string(kRanks), "--timeout",
       std::to_string(kLauncherTimeout), (bin_dir() / "multi_rank_worker").string(), scenario, dir.string()},
      kBound);
  BOOST_TEST_MESSAGE("ckpt-launch " << scenario << " exited " << run.status << "; output:\n" << run.output);
  BOOST_REQUIRE_MESSAGE(!run.hung, "ckpt-launch did not finish within " << kBound.count() << " s:\n"
                                                                        << run.output);
  BOOST_CHECK_MESSAGE(run.left_behind.empty(), run.left_behind.size() << " processes were left behind");
  return run;
}

/// The launcher succeeded: every rank exited 0, i.e. saw what it expected.
void check_every_rank_as_expected(const Run& run) {
  BOOST_CHECK_MESSAGE(run.status == 0, "ckpt-launch exited " << run.status << ":\n" << run.output);
  BOOST_CHECK_EQUAL(run.results.size(), static_cast<std::size_t>(kRanks));
}

/// What the worker saves: the rank's tensor filled with 100 * step + rank.
double value_at(std::int64_t step, std::int64_t rank) {
  return static_cast<double>(100 * step + rank);
}

/// Reads rank `rank`'s file in `dir` here (not through the worker) and checks
/// it holds that rank's state of `step`.
void check_file_holds(const fs::path& dir, std::int64_t rank, std::int64_t step) {
  BOOST_TEST_CONTEXT(dir / ckpt::checkpoint_file_name(rank)) {
    const auto sd = ckpt::StateDict::from_ivalue(ckpt::read_file(dir / ckpt::checkpoint_file_name(rank)));
    BOOST_CHECK_EQUAL(sd.at("rank").toInt(), rank);
    BOOST_CHECK_EQUAL(sd.at("value").toDouble(), value_at(step, rank));
    BOOST_CHECK(ckpt::test::identical(sd.at("weight").toTensor(),
                                      at::full({8, 16}, value_at(step, rank), at::kFloat)));
  }
}

/// `dir` is committed by a marker naming every rank's file with its real size,
/// and every file holds its rank's state of `step`.
void check_committed(const fs::path& dir, std::int64_t step) {
  BOOST_TEST_CONTEXT(dir) {
    const auto marker = ckpt::read_commit_marker(dir);
    BOOST_REQUIRE_MESSAGE(marker.has_value(), "no " << ckpt::kCommitMarkerName);
    BOOST_CHECK_EQUAL(marker->version, ckpt::kCommitMarkerVersion);
    BOOST_CHECK_EQUAL(marker->world_size, kRanks);
    BOOST_REQUIRE_EQUAL(marker->files.size(), static_cast<std::size_t>(kRanks));
    for (std::int64_t r = 0; r < kRanks; ++r) {
      const auto& f = marker->files[static_cast<std::size_t>(r)];
      BOOST_CHECK_EQUAL(f.rank, r);
      BOOST_CHECK_EQUAL(f.name, ckpt::checkpoint_file_name(r));
      BOOST_CHECK_EQUAL(f.size, fs::file_size(dir / f.name));
      check_file_holds(dir, r, step);
    }
    BOOST_CHECK_NO_THROW(ckpt::verify_commit(dir, *marker));
    BOOST_CHECK(ckpt::is_committed(dir));
  }
}

/// The `step_<n>` entries of a manager's root, sorted.
std::set<std::string> step_dirs(const fs::path& root) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(root))
    if (starts_with(e.path().filename().string(), "step_")) out.insert(e.path().filename().string());
  return out;
}

/// Temporary files a writer left in `dir` (`.checkpoint_<r>.pt.tmp-...`).
std::vector<std::string> temporaries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (contains(e.path().filename().string(), ".tmp-")) out.push_back(e.path().filename().string());
  return out;
}

// A: one save per directory, two directories, every rank's file committed.
void save_commits_on_every_rank(const std::string& scenario) {
  TempDir dir;
  const auto run = launch(scenario, dir.path());
  check_every_rank_as_expected(run);
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      for (const char* label : {"save_1", "save_2"}) BOOST_CHECK_EQUAL(run.at(r, label), "ok");
      for (const char* label : {"load_1", "load_2"}) BOOST_CHECK_EQUAL(run.at(r, label), "own-values");
      if (scenario == "commit-sync")
        BOOST_CHECK_EQUAL(run.at(r, "round"),
                          "commit-sync/" + ckpt::CheckpointWriter::round_name(dir / "save_2", 0));
    }
  }
  for (int save = 1; save <= 2; ++save) {
    const auto path = dir / ("save_" + std::to_string(save));
    check_committed(path, save);
    std::set<std::string> names;
    for (const auto& e : fs::directory_iterator(path)) names.insert(e.path().filename().string());
    BOOST_CHECK((names == std::set<std::string>{"checkpoint_0.pt", "checkpoint_1.pt", "checkpoint_2.pt",
                                                "checkpoint_3.pt", ckpt::kCommitMarkerName}));
  }
}

// B: rank 2 fails; every other rank names it, with its error's type; nothing commits.
void failed_rank_is_named_by_every_other(const std::string& scenario, const std::string& rank_2_says) {
  TempDir dir;
  const auto run = launch(scenario, dir.path());
  check_every_rank_as_expected(run);
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      const auto outcome = run.at(r, "save");
      if (r == 2) {
        BOOST_CHECK_MESSAGE(starts_with(outcome, "IoError msg=" + rank_2_says), outcome);
      } else {
        BOOST_CHECK_MESSAGE(starts_with(outcome, "CheckpointException failures={2:IoError} "), outcome);
        BOOST_CHECK_MESSAGE(contains(outcome, rank_2_says), outcome);  // rank 2's own text travels
      }
    }
  }
  BOOST_CHECK(!fs::exists(dir / ckpt::kCommitMarkerName));
  BOOST_CHECK(!ckpt::is_committed(dir.path()));
  for (int r : {0, 1, 3}) check_file_holds(dir.path(), r, 1);  // written, never committed
  BOOST_CHECK_MESSAGE(temporaries(dir.path()).empty(), "temporary files left");
}

// C: rank 3 never arrives; the others time out naming it; nothing commits.
void missing_rank_is_named_in_the_timeout(const std::string& scenario) {
  TempDir dir;
  const auto run = launch(scenario, dir.path());
  check_every_rank_as_expected(run);
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      const auto outcome = run.at(r, "save");
      if (r == 3) {
        BOOST_CHECK_EQUAL(outcome, "not-attempted");
      } else {
        BOOST_CHECK_MESSAGE(starts_with(outcome, "Timeout msg=Timed out"), outcome);
        BOOST_CHECK_MESSAGE(contains(outcome, "ranks that did not arrive: [3]"), outcome);
      }
    }
  }
  BOOST_CHECK(!fs::exists(dir / ckpt::kCommitMarkerName));
  BOOST_CHECK(!fs::exists(dir / ckpt::checkpoint_file_name(3)));
  for (int r : {0, 1, 2}) check_file_holds(dir.path(), r, 1);
}

}  // namespace

BOOST_TEST_GLOBAL_FIXTURE(ChildSubreaper);

BOOST_AUTO_TEST_SUITE(commit)

BOOST_AUTO_TEST_CASE(sync_saves_on_four_ranks_commit_every_rank_s_file) {
  save_commits_on_every_rank("commit-sync");
}

BOOST_AUTO_TEST_CASE(async_saves_on_four_ranks_commit_every_rank_s_file) {
  save_commits_on_every_rank("commit-async");
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(failed_rank)

// The rank's file name is taken by a directory: the rename of its file fails.
BOOST_AUTO_TEST_CASE(sync_write_that_fails_on_rank_2_is_named_by_every_rank) {
  failed_rank_is_named_by_every_other("rank-fails-sync", "cannot write checkpoint");
}

BOOST_AUTO_TEST_CASE(async_write_that_fails_on_rank_2_is_named_by_every_rank) {
  failed_rank_is_named_by_every_other("rank-fails-async", "cannot write checkpoint");
}

// Rank 2's pre_commit hook throws, after its file is durable.
BOOST_AUTO_TEST_CASE(sync_pre_commit_hook_that_fails_on_rank_2_is_named_by_every_rank) {
  failed_rank_is_named_by_every_other("hook-fails-sync", "injected on rank 2");
}

BOOST_AUTO_TEST_CASE(async_pre_commit_hook_that_fails_on_rank_2_is_named_by_every_rank) {
  failed_rank_is_named_by_every_other("hook-fails-async", "injected on rank 2");
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(missing_rank)

BOOST_AUTO_TEST_CASE(sync_rank_that_left_is_named_in_the_others_timeout) {
  missing_rank_is_named_in_the_timeout("rank-leaves-sync");
}

BOOST_AUTO_TEST_CASE(async_rank_that_left_is_named_in_the_others_timeout) {
  missing_rank_is_named_in_the_timeout("rank-leaves-async");
}

BOOST_AUTO_TEST_CASE(sync_rank_that_hangs_is_named_in_the_others_timeout) {
  missing_rank_is_named_in_the_timeout("rank-hangs-sync");
}

BOOST_AUTO_TEST_CASE(async_rank_that_hangs_is_named_in_the_others_timeout) {
  missing_rank_is_named_in_the_timeout("rank-hangs-async");
}

// Rank 3 saves only once the others timed out: they name it; then every rank
// saves again (rank 0 first at the barrier) and that checkpoint commits.
BOOST_AUTO_TEST_CASE(sync_checkpointers_commit_again_after_a_rank_came_late) {
  TempDir dir;
  const auto run = launch("rank-late-sync", dir.path());
  check_every_rank_as_expected(run);
  for (int r = 0; r < 3; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_CHECK_MESSAGE(starts_with(run.at(r, "save"), "Timeout msg=Timed out"), run.at(r, "save"));
      BOOST_CHECK_MESSAGE(contains(run.at(r, "save"), "ranks that did not arrive: [3]"), run.at(r, "save"));
    }
  }
  for (int r = 0; r < kRanks; ++r)
    BOOST_TEST_CONTEXT("rank " << r) BOOST_CHECK_EQUAL(run.at(r, "save_again"), "ok");
  BOOST_CHECK(!fs::exists(dir / "first" / ckpt::kCommitMarkerName));
  check_committed(dir / "again", 2);
}

// A rank that arrives after the others gave up completes the abandoned round
// alone; the commit phase tells it no rank committed, and its save fails.
BOOST_AUTO_TEST_CASE(rank_that_came_late_is_not_told_its_save_committed) {
  TempDir dir;
  const auto run = launch("rank-late-sync", dir.path());
  BOOST_CHECK(!fs::exists(dir / "first" / ckpt::kCommitMarkerName));
  BOOST_CHECK_MESSAGE(run.at(3, "save") != "ok" && run.at(3, "save") != "(none)",
                      "rank 3 was told: " << run.at(3, "save"));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(manager)

BOOST_AUTO_TEST_CASE(ten_saves_keeping_two_leave_steps_9_and_10) {
  TempDir dir;
  const auto run = launch("manager-keeps-two", dir.path());
  check_every_rank_as_expected(run);
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_CHECK_EQUAL(run.at(r, "saves"), "ok");
      BOOST_CHECK_EQUAL(run.at(r, "latest"), "10");
      BOOST_CHECK_EQUAL(run.at(r, "committed"), "[9, 10]");
      BOOST_CHECK_EQUAL(run.at(r, "restore"), "step=10 own-values");
    }
  }
  BOOST_CHECK((step_dirs(dir.path()) == std::set<std::string>{"step_9", "step_10"}));
  check_committed(dir / "step_9", 9);
  check_committed(dir / "step_10", 10);
}

// The tcp_store barrier's store is hosted by rank 0's trainer: when rank 0's
// writer child dies, the other ranks' children keep their store, rank 0's next
// child connects to it, and saves commit again.
BOOST_AUTO_TEST_CASE(barrier_store_outlives_rank_0_s_writer_child) {
  TempDir dir;
  const auto run = launch("rank0-child-dies", dir.path());
  check_every_rank_as_expected(run);
  BOOST_CHECK_EQUAL(run.at(0, "killed_writer_child"), "ok");
  const std::string first = run.at(0, "first_commit_after_kill");
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_CHECK_EQUAL(run.at(r, "save_1"), "ok");
      // Every rank commits the same save, the first after the kill that can.
      BOOST_CHECK_EQUAL(run.at(r, "first_commit_after_kill"), first);
      const auto save2 = run.at(r, "save_2");
      if (save2 != "ok") {
        if (r == 0)
          BOOST_CHECK_MESSAGE(starts_with(save2, "WriterProcessError msg=Child process terminated"), save2);
        else
          BOOST_CHECK_MESSAGE(contains(save2, "ranks that did not arrive: [0]"), save2);
      }
    }
  }
  BOOST_TEST_MESSAGE("first save committed after rank 0's child was killed: " << first);
  BOOST_CHECK(first == "save_2" || first == "save_3" || first == "save_4");
  const int n = first.back() - '0';
  check_committed(dir / first, n);
}

// Whole-job kills: the job (ckpt-launch, its 4 ranks and their writer
// children, one process group) is SIGKILLed at a random moment of its saves
// and started again. Each time every rank resumes from the newest step that
// is committed in the directory as this test reads it (never one that did not
// commit) and restores exactly the values saved at that step. 20 trials
// (CKPT_JOB_KILL_TRIALS sets another number); then a last run that saves one
// step and ends.
BOOST_AUTO_TEST_CASE(whole_job_kills_resume_from_the_newest_committed_step) {
  const char* trials_env = std::getenv("CKPT_JOB_KILL_TRIALS");
  const int trials = trials_env ? std::stoi(trials_env) : 20;
  TempDir dir;
  std::mt19937 rng(1202);
  std::uniform_int_distribution<int> saves_before_kill(0, 4), delay_ms(0, 300);
  const auto newest_committed = [&]() -> std::optional<std::int64_t> {
    std::optional<std::int64_t> newest;
    for (const auto& name : step_dirs(dir.path())) {
      const std::int64_t step = std::stoll(name.substr(5));
      if (ckpt::is_committed(dir / name) && (!newest || step > *newest)) newest = step;
    }
    return newest;
  };
  const std::vector<std::string> argv = {
      (bin_dir() / "ckpt-launch").string(),       "-n",  std::to_string(kRanks), "--timeout", "600",
      (bin_dir() / "multi_rank_worker").string(), "job", dir.path().string()};
  // Reads the job's lines until every rank said where it resumed; checks it.
  const auto check_resumed = [&](ckpt::test::Process& job, const std::optional<std::int64_t>& newest) {
    const std::string want = newest ? std::to_string(*newest) : "none";
    int resumed = 0, restored = 0;
    while (resumed < kRanks || restored < kRanks) {
      const auto line = job.line(std::chrono::seconds(120));
      BOOST_REQUIRE_MESSAGE(line, "the job ended before every rank resumed:\n" << job.output());
      int rank = -1;
      char label[64] = {}, outcome[256] = {};
      if (std::sscanf(line->c_str(), "[rank %d] RESULT %63s %255s", &rank, label, outcome) != 3) continue;
      if (std::string(label) == "resumed") {
        ++resumed;
        BOOST_CHECK_MESSAGE(outcome == want,
                            "rank " << rank << " resumed from " << outcome << ", not " << want);
      } else if (std::string(label) == "restored") {
        ++restored;
        BOOST_CHECK_MESSAGE(std::string(outcome) == "own-values", "rank " << rank << " restored " << outcome);
      }
    }
  };
  std::map<std::string, int> seen;
  for (int trial = 0; trial < trials; ++trial) {
    BOOST_TEST_CONTEXT("trial " << trial) {
      const auto newest = newest_committed();
      ++seen[newest ? "resumed" : "fresh"];
      ckpt::test::Process job(argv, {}, /*own_group=*/true);
      check_resumed(job, newest);
      // A random moment of the saves that follow: after some of rank 0's.
      for (int saved = 0, want = saves_before_kill(rng); saved < want;) {
        const auto line = job.line(std::chrono::seconds(120));
        BOOST_REQUIRE_MESSAGE(line, "the job ended:\n" << job.output());
        if (line->rfind("[rank 0] RESULT saved_", 0) == 0) ++saved;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms(rng)));
      job.kill_group();
      ckpt::test::kill_leftover_children();  // reaps what the kill left to this subreaper
    }
  }
  // The last run resumes as well, saves one step and ends cleanly.
  const auto newest = newest_committed();
  BOOST_REQUIRE(newest);
  ckpt::test::Process job(argv, {"JOB_STEPS=1"}, true);
  check_resumed(job, newest);
  BOOST_CHECK_EQUAL(job.wait(std::chrono::seconds(120)), 0);
  BOOST_CHECK(ckpt::is_committed(dir / fmt::format("step_{}", *newest + 1)));
  const auto left = ckpt::test::kill_leftover_children();
  BOOST_CHECK_MESSAGE(left.empty(), left.size() << " processes of the job were left behind");
  BOOST_TEST_MESSAGE(fmt::format("{} whole-job kills; the last run resumed from step {}", trials, *newest));
}

// Rank 1's writer child is held in its pre_commit hook during the step-3 save
// (its file durable, not yet at the barrier) and killed there.
BOOST_AUTO_TEST_CASE(save_whose_writer_child_is_killed_is_never_restored_and_the_next_commits) {
  TempDir dir;
  const auto run = launch("manager-survives-kill", dir.path());
  check_every_rank_as_expected(run);
  BOOST_CHECK_EQUAL(run.at(1, "killed_writer_child"), "ok");
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_CHECK_EQUAL(run.at(r, "step_1"), "ok");
      BOOST_CHECK_EQUAL(run.at(r, "step_2"), "ok");
      const auto step3 = run.at(r, "step_3");
      if (r == 1) {
        BOOST_CHECK_MESSAGE(
            starts_with(step3, "WriterProcessError msg=Child process terminated unexpectedly"), step3);
        BOOST_CHECK_MESSAGE(contains(step3, "signal 9"), step3);
      } else {
        BOOST_CHECK_MESSAGE(starts_with(step3, "Timeout msg=Timed out"), step3);
        BOOST_CHECK_MESSAGE(contains(step3, "ranks that did not arrive: [1]"), step3);
      }
      BOOST_CHECK_EQUAL(run.at(r, "latest_after_kill"), "2");
      BOOST_CHECK_EQUAL(run.at(r, "restore"), "step=2 own-values");
      // The async checkpointer hands a failed write's error to the next save, once.
      BOOST_CHECK_MESSAGE(starts_with(run.at(r, "step_4_first_attempt"), step3.substr(0, step3.find(' '))),
                          run.at(r, "step_4_first_attempt"));
      BOOST_CHECK_EQUAL(run.at(r, "step_4"), "ok");
      BOOST_CHECK_EQUAL(run.at(r, "latest"), "4");
      BOOST_CHECK_EQUAL(run.at(r, "committed"), "[2, 4]");
    }
  }
  // step_1 pruned (two kept), step_3 removed as the debris of a failed save.
  BOOST_CHECK((step_dirs(dir.path()) == std::set<std::string>{"step_2", "step_4"}));
  check_committed(dir / "step_2", 2);
  check_committed(dir / "step_4", 4);
}

BOOST_AUTO_TEST_SUITE_END()
