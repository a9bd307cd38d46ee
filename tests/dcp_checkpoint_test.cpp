// The DCP core's collective save and load on real rank processes: upstream's
// test/distributed/checkpoint/test_checkpoint.py (TestDistributedFailure,
// test names kept) ported, and beyond it dead and hung ranks, resharding and
// partial loads. Each case runs `ckpt-launch -n N --timeout S dcp_worker
// SCENARIO DIR` (tests/support/dcp_worker.cpp: a real c10d group over TCPStore
// and Gloo, the real filesystem storage layers, upstream's faulty ones over
// them), or the worker alone without a launcher or group, then checks
//   - the launcher's exit status (0: every rank saw what it expected),
//   - every rank's `[rank R] RESULT <label> <outcome>` lines, against this
//     file's own copy of upstream's fault tables,
//   - the files in DIR, read here independently of the worker: which
//     checkpoints were committed (`.metadata`), the data files, the bytes of
//     every chunk against the values that were saved.
// Nothing waits on a clock: a rank that waits where it should not shows as a
// launcher failure (--timeout) or as this test's own bound on the launcher.
// This process is a child subreaper, so a rank left behind is found, named and
// killed.
#include <ckpt/dcp/metadata.hpp>

#define BOOST_TEST_MODULE dcp_checkpoint_test
#include <boost/test/unit_test.hpp>

#include <ckpt/dcp/planner.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/dcp/storage.hpp>
#include <ckpt/error.hpp>

#include "support/dcp_cases.hpp"
#include "support/rank_runs.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace fs = std::filesystem;
using ckpt::dcp::ChunkShardingSpec;
using ckpt::dcp::DcpStateDict;
using ckpt::dcp::ShardedTensor;
using ckpt::dcp::TensorStorageMetadata;
using ckpt::test::TempDir;
using Sizes = std::vector<std::int64_t>;

namespace {

constexpr int kRanks = 4;
/// The group timeout the dead and hung rank scenarios run with: what every
/// other rank waits for the missing one at a step.
constexpr int kShortTimeout = 10;
/// Slack of this test's bound on the launcher beyond the launcher's own
/// --timeout (its 5 s grace to stop ranks, and more). Hang guards, not
/// measurements: a scenario takes seconds.
constexpr int kSlack = 30;

fs::path bin_dir() {
  return fs::canonical("/proc/self/exe").parent_path();
}

/// Ranks left behind are re-parented here, not to init.
struct ChildSubreaper {
  ChildSubreaper() { ckpt::test::become_child_subreaper(); }
};

using Run = ckpt::test::RankRun;
using ckpt::test::contains;
using ckpt::test::starts_with;

/// ckpt::test::run_bounded, with the output in the test log.
Run run_bounded(std::vector<std::string> args, std::chrono::seconds bound, bool alone = false) {
  const std::string what = args.at(0);
  Run run = ckpt::test::run_bounded(std::move(args), bound, alone);
  BOOST_TEST_MESSAGE(what << " exited " << run.status << "; output:\n" << run.output);
  return run;
}

/// Runs the worker's `scenario` on `ranks` ranks through ckpt-launch (its
/// --timeout `launcher_timeout`), to its end. `group_timeout`: the worker's
/// process group timeout, when not its default.
Run launch(int ranks, const std::string& scenario, const fs::path& dir, int launcher_timeout,
           std::optional<int> group_timeout = std::nullopt) {
  std::vector<std::string> args{(bin_dir() / "ckpt-launch").string(),
                                "-n",
                                std::to_string(ranks),
                                "--timeout",
                                std::to_string(launcher_timeout),
                                (bin_dir() / "dcp_worker").string(),
                                scenario,
                                dir.string()};
  if (group_timeout) args.push_back(std::to_string(*group_timeout));
  return run_bounded(std::move(args), std::chrono::seconds(launcher_timeout + kSlack));
}

/// Runs the worker's `scenario` alone: no launcher, no process group.
Run run_alone(const std::string& scenario, const fs::path& dir) {
  return run_bounded({(bin_dir() / "dcp_worker").string(), scenario, dir.string()}, std::chrono::seconds(120),
                     true);
}

/// It ran to its end, left nothing behind, and exited 0: every rank saw what
/// it expected, and reported something.
void check_every_rank_as_expected(const Run& run, int ranks) {
  BOOST_REQUIRE_MESSAGE(!run.hung, "the run did not finish within its bound:\n" << run.output);
  BOOST_CHECK_MESSAGE(run.left_behind.empty(), run.left_behind.size() << " processes were left behind");
  BOOST_CHECK_MESSAGE(run.status == 0, "exited " << run.status << ":\n" << run.output);
  BOOST_CHECK_MESSAGE(run.unexpected.empty(),
                      "unexpected: " << fmt::format("{}", fmt::join(run.unexpected, "; ")));
  BOOST_CHECK_EQUAL(run.results.size(), static_cast<std::size_t>(ranks));
}

/// A run shared by the cases that check parts of it, run by the first of them.
struct SharedRun {
  TempDir dir;
  Run run;
};

// --- upstream's fault tables (TestDistributedFailure): support/dcp_cases.hpp -----

using ckpt::test::dcp_cases::Case;
using ckpt::test::dcp_cases::expected_bytes_read;
using ckpt::test::dcp_cases::kLoadCases;
using ckpt::test::dcp_cases::kLoadNoDistCases;
using ckpt::test::dcp_cases::kSaveCases;
using ckpt::test::dcp_cases::kSaveNoDistCases;
using ckpt::test::dcp_cases::label_of;
using ckpt::test::dcp_cases::overlap_bytes;
using ckpt::test::dcp_cases::replicated_value;
using ckpt::test::dcp_cases::reshard_globals;
using ckpt::test::dcp_cases::reshard_replicated_value;
using ckpt::test::dcp_cases::rows_value;
using ckpt::test::dcp_cases::sharded_value;
using ckpt::test::dcp_cases::slice_of;
using ckpt::test::dcp_cases::uneven_value;

/// Upstream's _test_dist_failure, on one rank's outcome line: no fault, no
/// exception; else a CheckpointException whose failures are exactly the bad
/// ranks, each a ValueError (std::invalid_argument) with the faulty layer's
/// text, unless the type is ignored.
void check_outcome(const Case& c, const std::string& outcome) {
  if (c.ranks.empty()) {
    BOOST_CHECK_EQUAL(outcome, "ok");
    return;
  }
  const std::string ranks = fmt::format("CheckpointException ranks=[{}] ", fmt::join(c.ranks, ","));
  if (c.ignore_exception_type) {
    BOOST_CHECK_MESSAGE(starts_with(outcome, ranks), outcome);
    return;
  }
  const bool async = c.key.size() > 6 && c.key.substr(c.key.size() - 6) == "_async";
  std::vector<std::string> failures;
  for (auto r : c.ranks)
    failures.push_back(
        fmt::format("{}:std::invalid_argument={}rank fail {} for {}", r, async ? "async " : "", r, c.key));
  BOOST_CHECK_EQUAL(outcome, ranks + fmt::format("failures={{{}}}", fmt::join(failures, ";")));
}

/// Every case of `table` on every rank of `ranks`; for a save, the case's
/// directory under `dir` holds a checkpoint exactly when no rank failed.
void check_table(const Run& run, const fs::path& dir, const std::string& table,
                 const std::vector<Case>& cases, const std::vector<int>& ranks, bool save) {
  for (const auto& c : cases) {
    const auto label = label_of(table, c);
    BOOST_TEST_CONTEXT(label) {
      for (int r : ranks) {
        BOOST_TEST_CONTEXT("rank " << r) {
          check_outcome(c, run.at(r, label));
          if (save) BOOST_CHECK_EQUAL(run.at(r, label + "/committed"), c.ranks.empty() ? "yes" : "no");
          if (!save && c.ranks.empty()) BOOST_CHECK_EQUAL(run.at(r, label + "/values"), "as-saved");
        }
      }
      if (save) BOOST_CHECK(fs::exists(dir / label / ckpt::dcp::kMetadataFileName) == c.ranks.empty());
    }
  }
}

/// The 4-rank run of every fault case (one process group).
const SharedRun& faults_run() {
  static std::unique_ptr<SharedRun> shared;
  if (!shared) {
    shared = std::make_unique<SharedRun>();
    shared->run = launch(kRanks, "faults", shared->dir.path(), 240);
  }
  check_every_rank_as_expected(shared->run, kRanks);
  return *shared;
}

/// The worker alone, without a process group: the no-dist tables.
const SharedRun& faults_alone_run() {
  static std::unique_ptr<SharedRun> shared;
  if (!shared) {
    shared = std::make_unique<SharedRun>();
    shared->run = run_alone("faults_alone", shared->dir.path());
  }
  check_every_rank_as_expected(shared->run, 1);
  return *shared;
}

std::vector<int> all_ranks() {
  return {0, 1, 2, 3};
}

/// The data files (`__<rank>_<token>.distcp`) of a checkpoint directory.
std::set<std::string> data_files(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto name = e.path().filename().string();
    if (name.size() > 7 && name.substr(name.size() - 7) == ".distcp") out.insert(name);
  }
  return out;
}

// --- resharding ---------------------------------------------------------------------

using ckpt::test::crc32_of;

std::string read_range(const fs::path& file, std::uint64_t offset, std::uint64_t length) {
  std::ifstream in(file, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::string bytes(length, '\0');
  in.read(bytes.data(), static_cast<std::streamsize>(length));
  BOOST_CHECK_MESSAGE(in.good(), "cannot read " << length << " bytes at " << offset << " of " << file);
  return bytes;
}

/// The saved bytes of `fqn` in `dir`, read straight from the data files
/// through the metadata's storage data: every chunk where the metadata says,
/// with its CRC-32, holding its slice of `global`.
void check_chunks_on_disk(const fs::path& dir, const ckpt::dcp::CheckpointMetadata& cm,
                          const std::string& fqn, const at::Tensor& global) {
  const auto& md = std::get<TensorStorageMetadata>(cm.metadata.state_dict_metadata.at(fqn));
  for (const auto& chunk : md.chunks) {
    BOOST_TEST_CONTEXT(fqn << " chunk at " << fmt::format("{}", fmt::join(chunk.offsets, ","))) {
      const ckpt::dcp::StorageInfo* info = nullptr;
      for (const auto& [index, si] : cm.storage_data)
        if (index.fqn == fqn && index.offset == chunk.offsets) info = &si;
      BOOST_REQUIRE_MESSAGE(info, "no storage data");
      const auto expected = slice_of(global, chunk.offsets, chunk.sizes).contiguous();
      // The item is a torch.save archive; its storage record holds the chunk.
      BOOST_REQUIRE(info->archive);
      ckpt::FileReader archive(dir / info->relative_path, info->offset, info->length);
      const auto rec = archive.storage_record(*archive.root().tensor);
      BOOST_REQUIRE_EQUAL(rec.size, expected.nbytes());
      BOOST_CHECK_EQUAL(rec.data_offset % 4096, 0u);
      const auto bytes = read_range(dir / info->relative_path, rec.data_offset, rec.size);
      BOOST_CHECK_EQUAL(rec.crc32, crc32_of(bytes));
      BOOST_CHECK_MESSAGE(std::memcmp(bytes.data(), expected.data_ptr(), bytes.size()) == 0,
                          "the bytes on disk are not the saved values");
    }
  }
}

/// The 4-rank save that the resharding loads read.
const SharedRun& reshard_checkpoint() {
  static std::unique_ptr<SharedRun> shared;
  if (!shared) {
    shared = std::make_unique<SharedRun>();
    shared->run = launch(kRanks, "reshard_save", shared->dir.path(), 120);
  }
  check_every_rank_as_expected(shared->run, kRanks);
  for (int r = 0; r < kRanks; ++r) BOOST_CHECK_EQUAL(shared->run.at(r, "reshard_save"), "ok");
  BOOST_REQUIRE(fs::exists(shared->dir / "reshard" / ckpt::dcp::kMetadataFileName));
  return *shared;
}

/// A load of the resharded checkpoint on `ranks` ranks, each with its own
/// sharding (by rows, then by columns).
void check_reshard_load(int ranks) {
  const auto& saved = reshard_checkpoint();
  const auto run = launch(ranks, "reshard_load", saved.dir.path(), 120);
  check_every_rank_as_expected(run, ranks);
  for (int r = 0; r < ranks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      for (const std::string label : {"by_rows", "by_columns"}) {
        BOOST_CHECK_EQUAL(run.at(r, label), "ok");
        BOOST_CHECK_EQUAL(run.at(r, label + "/values"), "as-saved");
        // "got=N expected=M", M computed by the worker from the metadata's
        // chunks and its shards, independently of the library's planner.
        const auto bytes = run.at(r, label + "/bytes_read");
        unsigned long long got = 0, expected = 0;
        BOOST_CHECK_MESSAGE(std::sscanf(bytes.c_str(), "got=%llu expected=%llu", &got, &expected) == 2,
                            bytes);
        BOOST_CHECK_EQUAL(got, expected);
      }
    }
  }
}

// --- dead and hung ranks -----------------------------------------------------------

/// The worker's scenario: `victim` dies (or hangs) in a storage call of a save
/// (or a load); every other rank names it, alone, as a Timeout; nothing is
/// committed. `slow`: a healthy rank still in that call when the victim died.
void check_missing_rank(const std::string& scenario, int victim, const std::string& call, bool dies,
                        bool load, int slow = -1) {
  TempDir dir;
  const auto run = launch(kRanks, scenario, dir.path(), 120, kShortTimeout);
  check_every_rank_as_expected(run, kRanks);
  const auto ckpt_dir = dir / "ckpt";
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      if (load) BOOST_CHECK_EQUAL(run.at(r, "save"), "ok");
      if (r == victim) {
        BOOST_CHECK_EQUAL(run.at(r, "victim"), (dies ? "dies in " : "hangs in ") + call);
        // Let go once the others gave up, it came late: its call fails too.
        if (!dies)
          BOOST_CHECK_MESSAGE(starts_with(run.at(r, "late"), "CheckpointException "), run.at(r, "late"));
        continue;
      }
      if (r == slow) BOOST_CHECK_EQUAL(run.at(r, "slow"), "went on after the victim died");
      const auto outcome = run.at(r, "outcome");
      BOOST_CHECK_MESSAGE(
          starts_with(outcome,
                      fmt::format("CheckpointException ranks=[{}] failures={{{}:Timeout=", victim, victim)),
          outcome);
      if (!load) BOOST_CHECK_EQUAL(run.at(r, "committed"), "no");
    }
  }
  if (load) {
    BOOST_CHECK(fs::exists(ckpt_dir / ckpt::dcp::kMetadataFileName));  // the checkpoint it loaded stays
  } else {
    BOOST_CHECK(!fs::exists(ckpt_dir / ckpt::dcp::kMetadataFileName));
  }
  if (dies && call == "write_data") {
    // It left before writing: no data file of its own.
    for (const auto& name : fs::exists(ckpt_dir) ? data_files(ckpt_dir) : std::set<std::string>{})
      BOOST_CHECK_MESSAGE(!starts_with(name, fmt::format("__{}_", victim)), name);
  }
}

/// The checkpoint of the missing_key scenario: a strict and a partial load.
const SharedRun& missing_key_run() {
  static std::unique_ptr<SharedRun> shared;
  if (!shared) {
    shared = std::make_unique<SharedRun>();
    shared->run = launch(kRanks, "missing_key", shared->dir.path(), 120);
  }
  check_every_rank_as_expected(shared->run, kRanks);
  for (int r = 0; r < kRanks; ++r) BOOST_CHECK_EQUAL(shared->run.at(r, "save"), "ok");
  return *shared;
}

}  // namespace

BOOST_TEST_GLOBAL_FIXTURE(ChildSubreaper);

// =====================================================================================
BOOST_AUTO_TEST_SUITE(TestDistributedCheckpointing)

// upstream's two metadata cases on 2 real ranks, each computing its own view
// (dcp_metadata_test checks the chunks' offsets and sizes in detail).
BOOST_AUTO_TEST_CASE(metadata_on_2_ranks) {
  TempDir dir;
  const auto run = launch(2, "metadata", dir.path(), 120);
  BOOST_REQUIRE_MESSAGE(run.status == 0, run.output);
  for (int r = 0; r < 2; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_CHECK_EQUAL(run.at(r, "test_tensor_metadata_with_missing_rank_spec"), "ok");
      BOOST_CHECK_EQUAL(run.at(r, "test_default_metadata"), "ok");
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

// =====================================================================================
BOOST_AUTO_TEST_SUITE(TestDistributedFailure)

// Upstream saves through a writer that does nothing; here the faulty writer
// without faults delegates to the real FileSystemWriter: the checkpoint is
// committed, with every rank's data file and every key.
BOOST_AUTO_TEST_CASE(test_dummy_writer_works) {
  const auto& shared = faults_run();
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_CHECK_EQUAL(shared.run.at(r, "test_dummy_writer_works"), "ok");
      BOOST_CHECK_EQUAL(shared.run.at(r, "test_dummy_writer_works/committed"), "yes");
    }
  }
  const auto dir = shared.dir / "dummy";
  BOOST_REQUIRE(fs::exists(dir / ckpt::dcp::kMetadataFileName));
  const auto cm = ckpt::dcp::read_checkpoint_metadata(dir);
  const auto& keys = cm.metadata.state_dict_metadata;
  BOOST_CHECK_EQUAL(keys.size(), 3u);
  BOOST_REQUIRE(keys.count("sharded") && keys.count("replicated") && keys.count("bytes"));
  BOOST_CHECK(std::holds_alternative<ckpt::dcp::BytesStorageMetadata>(keys.at("bytes")));
  BOOST_CHECK_EQUAL(std::get<TensorStorageMetadata>(keys.at("sharded")).chunks.size(), 4u);
  BOOST_CHECK_EQUAL(std::get<TensorStorageMetadata>(keys.at("replicated")).chunks.size(), 1u);
  check_chunks_on_disk(dir, cm, "sharded", sharded_value());
  check_chunks_on_disk(dir, cm, "replicated", replicated_value());
  BOOST_CHECK_EQUAL(data_files(dir).size(), static_cast<std::size_t>(kRanks));  // every rank has a shard
}

// Upstream loads through a reader that reads nothing; here the values saved
// come back on every rank (sharded, replicated and the bytes [1, 2, 3, 4]).
BOOST_AUTO_TEST_CASE(test_dummy_reader_works) {
  const auto& shared = faults_run();
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_CHECK_EQUAL(shared.run.at(r, "test_dummy_reader_works"), "ok");
      BOOST_CHECK_EQUAL(shared.run.at(r, "test_dummy_reader_works/values"), "as-saved");
    }
  }
}

BOOST_AUTO_TEST_CASE(test_save_error_handling) {
  const auto& shared = faults_run();
  check_table(shared.run, shared.dir.path(), "test_save_error_handling", kSaveCases, all_ranks(), true);
}

// Upstream runs it without a process group: here both the worker alone (no
// group) and rank 0 of the 4-rank job with no_dist = true (the group left
// aside; the other ranks wait).
BOOST_AUTO_TEST_CASE(test_save_error_handling_no_dist) {
  const auto& alone = faults_alone_run();
  BOOST_TEST_CONTEXT("alone") {
    check_table(alone.run, alone.dir.path(), "test_save_error_handling_no_dist", kSaveNoDistCases, {0}, true);
  }
  const auto& shared = faults_run();
  BOOST_TEST_CONTEXT("rank 0 of 4") {
    check_table(shared.run, shared.dir.path(), "test_save_error_handling_no_dist", kSaveNoDistCases, {0},
                true);
  }
}

BOOST_AUTO_TEST_CASE(test_load_error_handling) {
  const auto& shared = faults_run();
  check_table(shared.run, shared.dir.path(), "test_load_error_handling", kLoadCases, all_ranks(), false);
}

BOOST_AUTO_TEST_CASE(test_load_error_handling_no_dist) {
  const auto& alone = faults_alone_run();
  BOOST_TEST_CONTEXT("alone") {
    check_table(alone.run, alone.dir.path(), "test_load_error_handling_no_dist", kLoadNoDistCases, {0},
                false);
  }
  const auto& shared = faults_run();
  BOOST_TEST_CONTEXT("rank 0 of 4") {
    check_table(shared.run, shared.dir.path(), "test_load_error_handling_no_dist", kLoadNoDistCases, {0},
                false);
  }
}

// Beyond upstream: no group and no_dist left false (WORLD_SIZE unset): the
// save and the load run alone all the same.
BOOST_AUTO_TEST_CASE(save_and_load_without_a_group_need_no_no_dist) {
  const auto& alone = faults_alone_run();
  BOOST_CHECK_EQUAL(alone.run.at(0, "implicit_no_dist/save"), "ok");
  BOOST_CHECK_EQUAL(alone.run.at(0, "implicit_no_dist/load"), "ok");
  BOOST_CHECK_EQUAL(alone.run.at(0, "implicit_no_dist/values"), "as-saved");
  BOOST_CHECK(fs::exists(alone.dir / "implicit_no_dist" / ckpt::dcp::kMetadataFileName));
}

BOOST_AUTO_TEST_SUITE_END()

// =====================================================================================
// A rank that dies or hangs: every other rank raises, within the (short)
// timeout, a CheckpointException naming it as a Timeout. One scenario per
// launch (the group is out of step afterwards). Rank 0 hosts the TCPStore, so
// the victim is never rank 0; a victim that is the coordinator is named too.
BOOST_AUTO_TEST_SUITE(missing_rank)

// Rank 1 is still writing when rank 3 dies (it goes on once rank 3's process
// is gone): it is not named, though the others may learn of the death at once.
BOOST_AUTO_TEST_CASE(rank_that_dies_in_write_data_is_named_by_every_other_rank) {
  check_missing_rank("rank_dies_in_write_data", 3, "write_data", true, false, 1);
}

BOOST_AUTO_TEST_CASE(coordinator_that_dies_in_write_data_is_named_by_every_other_rank) {
  check_missing_rank("coordinator_dies_in_write_data", 2, "write_data", true, false, 1);
}

BOOST_AUTO_TEST_CASE(coordinator_that_dies_in_finish_is_named_by_every_other_rank) {
  check_missing_rank("coordinator_dies_in_finish", 1, "finish", true, false);
}

BOOST_AUTO_TEST_CASE(rank_that_hangs_in_read_data_is_named_by_every_other_rank) {
  check_missing_rank("rank_hangs_in_read_data", 3, "read_data", false, true);
}

// A load whose replicated tensor is read once (by rank 0) and passed on
// 0 → 1 → 3: rank 1 dies as it takes it in. Rank 3, left waiting for it,
// gives up within half the timeout, so every rank names rank 1 alone.
BOOST_AUTO_TEST_CASE(rank_that_dies_passing_on_a_shared_read_is_named_by_every_other_rank) {
  check_missing_rank("rank_dies_in_share", 1, "share", true, true);
}

BOOST_AUTO_TEST_CASE(rank_that_hangs_in_set_up_storage_writer_is_named_by_every_other_rank) {
  check_missing_rank("rank_hangs_in_set_up_storage_writer", 2, "set_up_storage_writer", false, false);
}

BOOST_AUTO_TEST_CASE(coordinator_that_hangs_in_prepare_local_plan_is_named_by_every_other_rank) {
  check_missing_rank("coordinator_hangs_in_prepare_local_plan", 1, "prepare_local_plan", false, false);
}

// The coordinator's own step of a collective (here prepare_global_plan, which
// only it runs): every rank finished the step's local part, yet the
// coordinator never answers.
BOOST_AUTO_TEST_CASE(coordinator_that_hangs_in_prepare_global_plan_is_named_by_every_other_rank) {
  check_missing_rank("coordinator_hangs_in_prepare_global_plan", 2, "prepare_global_plan", false, true);
}

BOOST_AUTO_TEST_SUITE_END()

// =====================================================================================
// A checkpoint saved by 4 ranks (rows: 20×6 float, uneven: 10×3 double in
// shards of 3, 3, 3, 1 rows, replicated: 7×5 float) loads on 2, 3 and 1
// ranks with other shardings; each rank reads exactly the metadata and the
// bytes of the saved chunks that overlap its own.
BOOST_AUTO_TEST_SUITE(resharding)

BOOST_AUTO_TEST_CASE(save_on_4_ranks_writes_a_data_file_per_rank_and_the_metadata) {
  const auto& shared = reshard_checkpoint();
  const auto dir = shared.dir / "reshard";
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  BOOST_CHECK((names == std::set<std::string>{"__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp",
                                              ckpt::dcp::kMetadataFileName}));
  const auto cm = ckpt::dcp::read_checkpoint_metadata(dir);
  const auto& keys = cm.metadata.state_dict_metadata;
  BOOST_CHECK_EQUAL(keys.size(), 3u);
  BOOST_REQUIRE(keys.count("rows") && keys.count("uneven") && keys.count("replicated"));
  const auto& rows = std::get<TensorStorageMetadata>(keys.at("rows"));
  BOOST_CHECK(rows.properties.dtype == at::kFloat);
  BOOST_CHECK(rows.size == (Sizes{20, 6}));
  BOOST_REQUIRE_EQUAL(rows.chunks.size(), 4u);
  const auto& uneven = std::get<TensorStorageMetadata>(keys.at("uneven"));
  BOOST_CHECK(uneven.properties.dtype == at::kDouble);
  BOOST_CHECK(uneven.size == (Sizes{10, 3}));
  BOOST_REQUIRE_EQUAL(uneven.chunks.size(), 4u);
  std::set<std::pair<Sizes, Sizes>> rows_chunks, uneven_chunks;
  for (const auto& c : rows.chunks) rows_chunks.insert({c.offsets, c.sizes});
  for (const auto& c : uneven.chunks) uneven_chunks.insert({c.offsets, c.sizes});
  BOOST_CHECK((rows_chunks == std::set<std::pair<Sizes, Sizes>>{
                                  {{0, 0}, {5, 6}}, {{5, 0}, {5, 6}}, {{10, 0}, {5, 6}}, {{15, 0}, {5, 6}}}));
  BOOST_CHECK((uneven_chunks == std::set<std::pair<Sizes, Sizes>>{
                                    {{0, 0}, {3, 3}}, {{3, 0}, {3, 3}}, {{6, 0}, {3, 3}}, {{9, 0}, {1, 3}}}));
  // Replicated on every rank, written once.
  const auto& replicated = std::get<TensorStorageMetadata>(keys.at("replicated"));
  BOOST_REQUIRE_EQUAL(replicated.chunks.size(), 1u);
  BOOST_CHECK((replicated.chunks[0] == ckpt::dcp::ChunkStorageMetadata{{0, 0}, {7, 5}}));
  for (const auto& [fqn, global] : reshard_globals()) check_chunks_on_disk(dir, cm, fqn, global);
  // Each file names a real data file of this directory.
  for (const auto& [index, info] : cm.storage_data)
    BOOST_CHECK_MESSAGE(names.count(info.relative_path), index.fqn);
}

BOOST_AUTO_TEST_CASE(load_on_2_ranks) {
  check_reshard_load(2);
}

BOOST_AUTO_TEST_CASE(load_on_3_ranks) {
  check_reshard_load(3);
}

// Every rank loads the whole of two saved tensors (4 + 1 saved chunks), as two
// hosts of two ranks, with each ReplicatedReads mode: the values are the saved
// ones (into a transposed view too), storage serves
// each chunk once per rank, once per host or once in all, and no rank reads
// every shared chunk itself. A reader that fails, or a receiver whose planner
// fails in the share step, is named alone by every rank, and the next load on
// the same group works.
BOOST_AUTO_TEST_CASE(replicated_reads_shared_over_the_group) {
  const auto& saved = reshard_checkpoint();
  const auto run = launch(kRanks, "shared_reads", saved.dir.path(), 120);
  check_every_rank_as_expected(run, kRanks);
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      for (const std::string label : {"every_rank", "once_per_host", "once", "after_a_failure"}) {
        BOOST_CHECK_EQUAL(run.at(r, label), "ok");
        BOOST_CHECK_EQUAL(run.at(r, label + "/values"), "as-saved");
        // "got=A,B expected=C,D": bytes read from storage per host.
        const auto bytes = run.at(r, label + "/host_bytes");
        unsigned long long a = 0, b = 0, c = 0, d = 0;
        BOOST_REQUIRE_MESSAGE(
            std::sscanf(bytes.c_str(), "got=%llu,%llu expected=%llu,%llu", &a, &b, &c, &d) == 4, bytes);
        if (label == "once" || label == "after_a_failure")
          BOOST_CHECK_EQUAL(a + b, c);
        else
          BOOST_CHECK(a == c && b == d);
      }
      BOOST_CHECK(starts_with(run.at(r, "reader_fails"), "CheckpointException ranks=[2] failures={2:"));
      BOOST_CHECK(
          starts_with(run.at(r, "receiver_mismatch"), "CheckpointException ranks=[3] failures={3:Mismatch="));
    }
  }
}

// One process, no group (no_dist): plain tensors of the global sizes, then a
// sharded tensor of which this process (rank 0) holds the first columns.
BOOST_AUTO_TEST_CASE(load_without_a_process_group) {
  const auto& shared = reshard_checkpoint();
  const auto dir = shared.dir / "reshard";
  {
    DcpStateDict sd{{"rows", at::zeros({20, 6}, at::kFloat)},
                    {"uneven", at::zeros({10, 3}, at::kDouble)},
                    {"replicated", at::zeros({7, 5}, at::kFloat)}};
    ckpt::dcp::FileSystemReader reader(dir);
    BOOST_REQUIRE_NO_THROW(ckpt::dcp::load_state_dict(sd, reader, nullptr, nullptr, 0, true));
    for (const auto& [fqn, value] : sd)
      BOOST_CHECK_MESSAGE(ckpt::test::identical(std::get<at::Tensor>(value), reshard_globals().at(fqn)), fqn);
    BOOST_CHECK_EQUAL(reader.bytes_read(), expected_bytes_read(dir, sd));
  }
  {
    const ChunkShardingSpec by_columns{1, {"rank:0/cpu", "rank:1/cpu"}};
    DcpStateDict sd{{"rows", ShardedTensor::zeros(by_columns, {20, 6}, 0, at::kFloat)}};
    ckpt::dcp::FileSystemReader reader(
        dir, {.coalesce_gap = 0, .verify_blocks = false});  // exactly the bytes asked for
    BOOST_REQUIRE_NO_THROW(ckpt::dcp::load_state_dict(sd, reader, nullptr, nullptr, 0, true));
    const auto& st = std::get<ShardedTensor>(sd[0].second);
    BOOST_REQUIRE_EQUAL(st.local_shards().size(), 1u);
    const auto& shard = st.local_shards()[0];
    BOOST_CHECK((shard.metadata.offsets == Sizes{0, 0}) && (shard.metadata.sizes == Sizes{20, 3}));
    BOOST_CHECK(ckpt::test::identical(shard.tensor, rows_value().narrow(1, 0, 3)));
    BOOST_CHECK_EQUAL(reader.bytes_read(), expected_bytes_read(dir, sd));
  }
}

BOOST_AUTO_TEST_SUITE_END()

// =====================================================================================
BOOST_AUTO_TEST_SUITE(long_steps)

// The group's Gloo timeout (5 s here) bounds transfers only: ranks enter a
// collective once the store says the others are ready, so a rank that writes
// for 7 s does not fail the save; the save's own timeout bounds the wait.
BOOST_AUTO_TEST_CASE(a_write_longer_than_the_groups_gloo_timeout_commits) {
  TempDir dir;
  const auto run = launch(4, "slow_write", dir.path(), 120, 5);
  BOOST_REQUIRE_MESSAGE(run.status == 0, run.output);
  for (int r = 0; r < 4; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_CHECK_EQUAL(run.at(r, "save"), "ok");
      BOOST_CHECK_EQUAL(run.at(r, "committed"), "yes");
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

// =====================================================================================
// A checkpoint of "a" loaded into a state dict that also has "b" (a tensor)
// and "c" (a sharded tensor), on 4 ranks.
BOOST_AUTO_TEST_SUITE(partial_load)

BOOST_AUTO_TEST_CASE(strict_load_of_keys_the_checkpoint_lacks_fails_on_every_rank) {
  const auto& shared = missing_key_run();
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      const auto outcome = shared.run.at(r, "strict");
      BOOST_CHECK_MESSAGE(
          starts_with(outcome, "CheckpointException ranks=[0,1,2,3] failures={0:MissingKeys="), outcome);
      for (int f = 1; f < kRanks; ++f)
        BOOST_CHECK_MESSAGE(contains(outcome, fmt::format(";{}:MissingKeys=", f)), outcome);
    }
  }
}

// Beyond upstream's tests, its enable_plan_caching: saves with unchanged plans
// reuse the coordinator's global plan (only the first save and the one whose
// layout changed on one rank make one), a coordinator that lost its cache
// gets every plan again, and every save loads back as saved.
BOOST_AUTO_TEST_CASE(plan_caching_on_4_ranks) {
  TempDir dir;
  const auto run = launch(kRanks, "plan_cache", dir.path(), 120);
  check_every_rank_as_expected(run, kRanks);
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      for (const std::string save : {"save1", "save2", "save3", "save4", "save5"}) {
        BOOST_CHECK_EQUAL(run.at(r, save), "ok");
        BOOST_CHECK_EQUAL(run.at(r, save + "/values"), "as-saved");
      }
    }
  }
  BOOST_CHECK_EQUAL(run.at(0, "global_plans_made"), "2");
  BOOST_CHECK_EQUAL(run.at(0, "global_plans_made_after_restart"), "1");
}

BOOST_AUTO_TEST_CASE(allow_partial_load_leaves_the_keys_the_checkpoint_lacks_untouched) {
  const auto& shared = missing_key_run();
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_CHECK_EQUAL(shared.run.at(r, "partial"), "ok");
      BOOST_CHECK_EQUAL(shared.run.at(r, "partial/values"), "as-saved");
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

// =====================================================================================
// The same through dcp::AsyncSaver (every save staged, then written on the
// saver's thread and its own group; its outcome that of the written future):
// upstream's save fault tables, dead and hung ranks, and a writer child killed
// in the middle of a data file.
BOOST_AUTO_TEST_SUITE(async_saver)

const SharedRun& async_faults_run() {
  static std::unique_ptr<SharedRun> shared;
  if (!shared) {
    shared = std::make_unique<SharedRun>();
    shared->run = launch(kRanks, "async_faults", shared->dir.path(), 240);
  }
  check_every_rank_as_expected(shared->run, kRanks);
  return *shared;
}

BOOST_AUTO_TEST_CASE(test_save_error_handling_through_async_save) {
  const auto& shared = async_faults_run();
  check_table(shared.run, shared.dir.path(), "test_save_error_handling", kSaveCases, all_ranks(), true);
  BOOST_TEST_CONTEXT("rank 0 of 4, no_dist") {
    check_table(shared.run, shared.dir.path(), "test_save_error_handling_no_dist", kSaveNoDistCases, {0},
                true);
  }
  for (int r = 0; r < kRanks; ++r) BOOST_CHECK_EQUAL(shared.run.at(r, "test_dummy_writer_works"), "ok");
}

BOOST_AUTO_TEST_CASE(test_save_error_handling_no_dist_through_async_save) {
  TempDir dir;
  const auto run = run_alone("async_faults_alone", dir.path());
  check_every_rank_as_expected(run, 1);
  check_table(run, dir.path(), "test_save_error_handling_no_dist", kSaveNoDistCases, {0}, true);
}

BOOST_AUTO_TEST_CASE(a_rank_that_dies_in_write_data_is_named_through_async_save) {
  check_missing_rank("async_rank_dies_in_write_data", 3, "write_data", true, false, 1);
}

BOOST_AUTO_TEST_CASE(a_coordinator_that_dies_in_finish_is_named_through_async_save) {
  check_missing_rank("async_coordinator_dies_in_finish", 1, "finish", true, false);
}

BOOST_AUTO_TEST_CASE(a_rank_that_hangs_in_set_up_storage_writer_is_named_through_async_save) {
  check_missing_rank("async_rank_hangs_in_set_up_storage_writer", 2, "set_up_storage_writer", false, false);
}

BOOST_AUTO_TEST_CASE(a_coordinator_that_hangs_in_prepare_local_plan_is_named_through_async_save) {
  check_missing_rank("async_coordinator_hangs_in_prepare_local_plan", 1, "prepare_local_plan", false, false);
}

// Rank 2's writer child is held in its first write of the data file and
// killed there: every rank raises the same CheckpointException naming rank 2
// alone, nothing is committed, and the next save commits.
BOOST_AUTO_TEST_CASE(a_writer_child_killed_mid_write_fails_the_save_on_every_rank) {
  TempDir dir;
  const auto run = launch(kRanks, "async_child_killed", dir.path(), 120);
  check_every_rank_as_expected(run, kRanks);
  std::string first;
  for (int r = 0; r < kRanks; ++r) {
    BOOST_TEST_CONTEXT("rank " << r) {
      BOOST_CHECK_EQUAL(run.at(r, "first_save"), "ok");
      const auto outcome = run.at(r, "killed_save");
      BOOST_CHECK_MESSAGE(starts_with(outcome,
                                      "CheckpointException ranks=[2] failures={2:WriterProcessError="
                                      "Child process terminated unexpectedly (killed by signal 9"),
                          outcome);
      if (r == 0) first = outcome;
      BOOST_CHECK_EQUAL(outcome, first);  // the same exception everywhere
      BOOST_CHECK_EQUAL(run.at(r, "killed_save/committed"), "no");
      BOOST_CHECK_EQUAL(run.at(r, "next_save"), "ok");
      BOOST_CHECK_EQUAL(run.at(r, "next_save/values"), "as-saved");
    }
  }
  BOOST_CHECK_EQUAL(run.at(2, "held"), "yes");
  BOOST_CHECK_EQUAL(run.at(2, "killed"), "yes");
  BOOST_CHECK(fs::exists(dir / "second" / ckpt::dcp::kMetadataFileName));
}

BOOST_AUTO_TEST_SUITE_END()
