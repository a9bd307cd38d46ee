// The commit marker (commit.hpp) in one process: the rank file names, what
// the marker records of a rank's file (its size and the CRC-32 of its zip
// directory, computed here independently), the marker written and read back,
// what verify_commit and is_committed say of damaged, missing and foreign
// files and of hostile markers, a failed rewrite that leaves the old marker,
// and when CheckpointWriter writes a marker at all. The multi-rank suite covers
// the marker across real rank processes.
#include <ckpt/commit.hpp>

#define BOOST_TEST_MODULE commit_test
#include <boost/test/unit_test.hpp>

#include <ckpt/barrier.hpp>
#include <ckpt/checkpoint_writer.hpp>
#include <ckpt/checkpointer.hpp>
#include <ckpt/error.hpp>
#include <ckpt/format.hpp>
#include <ckpt/log.hpp>
#include <ckpt/state_dict.hpp>

#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

namespace fs = std::filesystem;
using ckpt::test::mentions;
using ckpt::test::TempDir;

using ckpt::test::LogCapture;
namespace {

/// A small state dict whose tensors differ by rank.
ckpt::StateDict make_state_dict(std::int64_t rank = 0) {
  ckpt::StateDict sd;
  sd.insert("weight", at::arange(64 * 32, at::kFloat).reshape({64, 32}) + static_cast<double>(rank));
  sd.insert("bias", at::full({32}, static_cast<double>(rank) + 0.5, at::kDouble));
  sd.insert("step", 7);
  return sd;
}

std::string read_bytes(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  BOOST_REQUIRE_MESSAGE(in, "cannot open " << file);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_text(const fs::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out << text;
  BOOST_REQUIRE_MESSAGE(out, "cannot write " << file);
}

/// Little-endian integer of `n` bytes at `at`.
std::uint64_t le(const std::string& bytes, std::size_t at, int n) {
  BOOST_REQUIRE_LE(at + static_cast<std::size_t>(n), bytes.size());
  std::uint64_t v = 0;
  for (int i = 0; i < n; ++i)
    v |= static_cast<std::uint64_t>(static_cast<unsigned char>(bytes[at + static_cast<std::size_t>(i)]))
         << (8 * i);
  return v;
}

/// Where the zip directory of an archive starts, read here from its end record
/// (and the zip64 end record when the offset does not fit 32 bits), without the
/// library's zip code.
std::uint64_t zip_directory_offset(const std::string& bytes) {
  const auto eocd = bytes.rfind(std::string("PK\x05\x06", 4));
  BOOST_REQUIRE(eocd != std::string::npos);
  std::uint64_t cd = le(bytes, eocd + 16, 4);
  if (cd == 0xffffffffu) {
    BOOST_REQUIRE_GE(eocd, 20u);
    const std::size_t locator = eocd - 20;
    BOOST_REQUIRE(bytes.compare(locator, 4, std::string("PK\x06\x07", 4)) == 0);
    const auto zip64_end = static_cast<std::size_t>(le(bytes, locator + 8, 8));
    BOOST_REQUIRE(bytes.compare(zip64_end, 4, std::string("PK\x06\x06", 4)) == 0);
    cd = le(bytes, zip64_end + 48, 8);
  }
  BOOST_REQUIRE_LT(cd, bytes.size());
  BOOST_REQUIRE(bytes.compare(static_cast<std::size_t>(cd), 4, std::string("PK\x01\x02", 4)) == 0);
  return cd;
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

/// Writes rank 0's file into `dir` as a job of one does (which also commits it).
void save_alone(const fs::path& dir, std::int64_t rank_seed = 0) {
  ckpt::CheckpointWriter writer(ckpt::CheckpointWriterConfig{}, ckpt::RankInfo{0, 1});
  writer.write(dir, make_state_dict(rank_seed));
}

/// The marker a coordinator would write for the files now in `dir`.
ckpt::CommitMarker marker_of(const fs::path& dir, std::int64_t world_size) {
  ckpt::CommitMarker marker;
  marker.world_size = world_size;
  for (std::int64_t r = 0; r < world_size; ++r) marker.files.push_back(ckpt::describe_committed_file(dir, r));
  return marker;
}

/// An in-process barrier for writers on threads, one handle per rank, that
/// exchanges reports and has a commit phase, as the built-in barriers do
/// across processes: the coordinator gets every rank's report, and the others
/// return only once it has ended the commit.
class ExchangeBarrier : public ckpt::Barrier {
 public:
  struct Shared {
    explicit Shared(std::size_t world) : reports(world) {}
    std::mutex mutex;
    std::condition_variable cv;
    std::vector<std::string> reports;
    std::map<std::int64_t, std::string> failures;
    std::size_t arrived = 0;
    bool commit_ended = false;
    std::optional<ckpt::RankFailure> commit_failure;
  };

  ExchangeBarrier(std::shared_ptr<Shared> shared, std::int64_t rank)
      : shared_(std::move(shared)), rank_(rank) {}

  void execute_barrier() override { arrive({}, false, false); }

  ckpt::BarrierOutcome arrive(const std::string& report, bool failed, bool want_reports) override {
    std::unique_lock lock(shared_->mutex);
    shared_->reports[static_cast<std::size_t>(rank_)] = report;
    if (failed) shared_->failures[rank_] = report;
    ++shared_->arrived;
    shared_->cv.notify_all();
    shared_->cv.wait(lock, [&] { return shared_->arrived == shared_->reports.size(); });
    ckpt::BarrierOutcome outcome;
    outcome.exchanged = true;
    outcome.failures = shared_->failures;
    if (want_reports) outcome.reports = shared_->reports;
    return outcome;
  }

  void end_commit(const std::optional<ckpt::RankFailure>& failure) override {
    std::lock_guard lock(shared_->mutex);
    shared_->commit_ended = true;
    shared_->commit_failure = failure;
    shared_->cv.notify_all();
  }

  std::optional<ckpt::RankFailure> await_commit() override {
    std::unique_lock lock(shared_->mutex);
    shared_->cv.wait(lock, [&] { return shared_->commit_ended; });
    return shared_->commit_failure;
  }

 private:
  std::shared_ptr<Shared> shared_;
  std::int64_t rank_;
};

/// Saves `world` ranks into `dir`, each on a thread of its own through a
/// SyncCheckpointer whose writer meets the others at an ExchangeBarrier.
/// Returns each rank's error (null when it succeeded).
std::vector<std::exception_ptr> save_ranks(const fs::path& dir, std::int64_t world) {
  auto shared = std::make_shared<ExchangeBarrier::Shared>(static_cast<std::size_t>(world));
  // A guard against a hang, never a synchronisation.
  const ckpt::CheckpointWriterConfig config{.write_barrier_timeout = std::chrono::seconds(120)};
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(world));
  std::vector<std::thread> ranks;
  for (std::int64_t r = 0; r < world; ++r)
    ranks.emplace_back([&, r] {
      try {
        const ckpt::RankInfo rank{r, world};
        auto writer = std::make_shared<ckpt::CheckpointWriter>(config, rank,
                                                               std::make_shared<ExchangeBarrier>(shared, r));
        ckpt::SyncCheckpointer checkpointer(writer, std::make_shared<ckpt::CheckpointReader>(rank));
        checkpointer.save(dir, make_state_dict(r));
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : ranks) t.join();
  return errors;
}

void require_all_saved(const std::vector<std::exception_ptr>& errors) {
  for (std::size_t r = 0; r < errors.size(); ++r) {
    if (!errors[r]) continue;
    try {
      std::rethrow_exception(errors[r]);
    } catch (const std::exception& e) {
      BOOST_FAIL("rank " << r << " failed to save: " << e.what());
    }
  }
}

/// A barrier that only synchronises (Barrier's default arrive: no reports).
class PlainBarrier : public ckpt::Barrier {
 public:
  void execute_barrier() override { ++calls; }
  int calls = 0;
};

/// Every entry of `dir`, by name.
std::vector<std::string> entries_of(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(file_names)

BOOST_AUTO_TEST_CASE(checkpoint_file_name_is_checkpoint_rank_pt) {
  BOOST_TEST(ckpt::checkpoint_file_name(0) == "checkpoint_0.pt");
  BOOST_TEST(ckpt::checkpoint_file_name(3) == "checkpoint_3.pt");
  BOOST_TEST(ckpt::checkpoint_file_name(1024) == "checkpoint_1024.pt");
  BOOST_TEST(std::string(ckpt::kCommitMarkerName) == "ckpt_commit.json");
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(describe)

BOOST_AUTO_TEST_CASE(records_the_file_size_and_the_crc_of_its_zip_directory) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  save_alone(dir);
  const fs::path file = dir / "checkpoint_0.pt";

  const ckpt::CommittedFile described = ckpt::describe_committed_file(dir, 0);
  BOOST_TEST(described.rank == 0);
  BOOST_TEST(described.name == "checkpoint_0.pt");
  BOOST_TEST(described.size == fs::file_size(file));

  // The CRC-32 of everything from the start of the zip directory to the end of
  // the file, computed here without the library's zip code or zlib.
  const std::string bytes = read_bytes(file);
  const auto cd = zip_directory_offset(bytes);
  BOOST_TEST(described.crc32 == ckpt::test::crc32_of(std::string_view(bytes).substr(cd)));
  // Not the CRC of the whole file: the data is not read.
  BOOST_TEST(described.crc32 != ckpt::test::crc32_of(bytes));
}

BOOST_AUTO_TEST_CASE(describes_the_file_of_the_rank_asked_for) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  require_all_saved(save_ranks(dir, 2));
  const auto rank1 = ckpt::describe_committed_file(dir, 1);
  BOOST_TEST(rank1.rank == 1);
  BOOST_TEST(rank1.name == "checkpoint_1.pt");
  BOOST_TEST(rank1.size == fs::file_size(dir / "checkpoint_1.pt"));
  const std::string bytes = read_bytes(dir / "checkpoint_1.pt");
  BOOST_TEST(rank1.crc32 ==
             ckpt::test::crc32_of(std::string_view(bytes).substr(zip_directory_offset(bytes))));
}

BOOST_AUTO_TEST_CASE(a_missing_file_is_not_found_and_a_damaged_one_corrupt) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  save_alone(dir);
  const fs::path missing = dir / "checkpoint_5.pt";
  BOOST_CHECK_EXCEPTION(ckpt::describe_committed_file(dir, 5), ckpt::NotFound,
                        [&](const ckpt::NotFound& e) { return mentions(e, missing.string()); });

  const fs::path file = dir / "checkpoint_0.pt";
  fs::resize_file(file, fs::file_size(file) - 1);
  BOOST_CHECK_EXCEPTION(ckpt::describe_committed_file(dir, 0), ckpt::CorruptCheckpoint,
                        [&](const ckpt::CorruptCheckpoint& e) { return mentions(e, file.string()); });
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(marker)

BOOST_AUTO_TEST_CASE(written_and_read_back) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  require_all_saved(save_ranks(dir, 2));
  fs::remove(dir / ckpt::kCommitMarkerName);  // written again below

  ckpt::CommitMarker written = marker_of(dir, 2);
  written.time = "not a time";  // the writer sets it
  ckpt::write_commit_marker(dir, written);

  const auto read = ckpt::read_commit_marker(dir);
  BOOST_REQUIRE(read.has_value());
  BOOST_TEST(read->version == ckpt::kCommitMarkerVersion);
  BOOST_TEST(read->world_size == 2);
  BOOST_TEST((read->files == written.files));
  // UTC, ISO 8601: 2024-01-02T03:04:05Z
  BOOST_TEST_INFO("time: " << read->time);
  BOOST_TEST(read->time.size() == 20u);
  BOOST_TEST(read->time[4] == '-');
  BOOST_TEST(read->time[10] == 'T');
  BOOST_TEST(read->time.back() == 'Z');

  BOOST_CHECK_NO_THROW(ckpt::verify_commit(dir, *read));
  BOOST_TEST(ckpt::is_committed(dir));
  // Written atomically: nothing but the marker and the rank files is left.
  BOOST_TEST((entries_of(dir) ==
              std::vector<std::string>{"checkpoint_0.pt", "checkpoint_1.pt", "ckpt_commit.json"}));
}

BOOST_AUTO_TEST_CASE(no_marker_reads_as_nullopt) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  save_alone(dir);
  fs::remove(dir / ckpt::kCommitMarkerName);
  BOOST_TEST(!ckpt::read_commit_marker(dir).has_value());
  BOOST_TEST(!ckpt::is_committed(dir));
  // Nor a directory that does not exist.
  BOOST_TEST(!ckpt::read_commit_marker(temp / "nowhere").has_value());
  BOOST_TEST(!ckpt::is_committed(temp / "nowhere"));
}

BOOST_AUTO_TEST_CASE(a_marker_that_cannot_be_written_throws_and_leaves_nothing) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  save_alone(dir);
  const auto marker = ckpt::read_commit_marker(dir);
  BOOST_REQUIRE(marker.has_value());

  const fs::path absent = temp / "absent";
  BOOST_CHECK_EXCEPTION(ckpt::write_commit_marker(absent, *marker), ckpt::IoError,
                        [&](const ckpt::IoError& e) {
                          BOOST_TEST_INFO("what(): " << e.what());
                          // It names the directory and the marker (today through the
                          // temporary file's name, ".ckpt_commit.json.tmp-...").
                          return mentions(e, absent.string()) && mentions(e, "ckpt_commit.json");
                        });
  BOOST_TEST(!fs::exists(absent));  // not created on the way
  BOOST_TEST((entries_of(temp.path()) == std::vector<std::string>{"ckpt"}));
}

BOOST_AUTO_TEST_CASE(a_failed_rewrite_leaves_the_old_marker) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  save_alone(dir);
  const fs::path marker_file = dir / ckpt::kCommitMarkerName;
  const std::string before = read_bytes(marker_file);
  BOOST_REQUIRE(before.size() < 4096);

  // A rewrite whose text is larger than the file size limit (RLIMIT_FSIZE,
  // which binds root too) fails midway through writing. In a child process, so
  // that the limit binds nothing else; the child's exit status says what
  // write_commit_marker did: 0 threw IoError naming the marker, 1 returned,
  // 2 threw something else.
  ckpt::CommitMarker big;
  big.world_size = 300;
  for (std::int64_t r = 0; r < big.world_size; ++r)
    big.files.push_back({r, ckpt::checkpoint_file_name(r), 1234567, 0x89abcdefu});
  const pid_t pid = ::fork();
  BOOST_REQUIRE(pid >= 0);
  if (pid == 0) {
    ::signal(SIGXFSZ, SIG_IGN);
    const rlimit limit{4096, 4096};
    if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) ::_exit(3);
    int code = 2;
    try {
      ckpt::write_commit_marker(dir, big);
      code = 1;
    } catch (const ckpt::IoError& e) {
      code = mentions(e, marker_file.string()) ? 0 : 2;
    } catch (...) {
      code = 2;
    }
    ::_exit(code);
  }
  int status = 0;
  BOOST_REQUIRE(::waitpid(pid, &status, 0) == pid);
  BOOST_REQUIRE(WIFEXITED(status));
  BOOST_TEST(WEXITSTATUS(status) == 0);

  // The old marker, byte for byte, still commits the directory; no temporary
  // file is left beside it.
  BOOST_TEST(read_bytes(marker_file) == before);
  BOOST_TEST(ckpt::is_committed(dir));
  BOOST_TEST((entries_of(dir) == std::vector<std::string>{"checkpoint_0.pt", "ckpt_commit.json"}));
}

BOOST_AUTO_TEST_CASE(hostile_or_foreign_markers_are_refused_naming_the_marker) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  save_alone(dir);
  const fs::path marker_file = dir / ckpt::kCommitMarkerName;
  const auto good = ckpt::read_commit_marker(dir);
  BOOST_REQUIRE(good.has_value());
  const auto& f = good->files.at(0);
  const std::string file_json =
      "{\"rank\":0,\"name\":\"checkpoint_0.pt\",\"size\":" + std::to_string(f.size) +
      ",\"crc32\":" + std::to_string(f.crc32) + "}";
  auto marker_json = [&](const std::string& version, const std::string& world, const std::string& files) {
    return "{\"format\":\"ckpt-commit\",\"version\":" + version + ",\"world_size\":" + world +
           ",\"time\":\"2024-01-02T03:04:05Z\",\"files\":[" + files + "]}";
  };
  // The sound marker, as text written here, is accepted (so that each case
  // below is refused for its one fault).
  write_text(marker_file, marker_json("1", "1", file_json));
  BOOST_REQUIRE(ckpt::is_committed(dir));

  struct Case {
    std::string label;
    std::string text;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"not JSON", "this is not json {", "not JSON"},
      {"empty", "", "not JSON"},
      {"another format", "{\"format\":\"other\",\"version\":1}", "not a ckpt commit marker"},
      {"not an object", "[1,2,3]", "malformed"},
      {"a newer version", marker_json("2", "1", file_json), "version 2 is newer"},
      {"a path outside the directory",
       marker_json("1", "1", "{\"rank\":0,\"name\":\"../x\",\"size\":1,\"crc32\":1}"), "'../x'"},
      {"an absolute path",
       marker_json("1", "1", "{\"rank\":0,\"name\":\"/etc/passwd\",\"size\":1,\"crc32\":1}"),
       "'/etc/passwd'"},
      {"a path into a subdirectory",
       marker_json("1", "1", "{\"rank\":0,\"name\":\"sub/checkpoint_0.pt\",\"size\":1,\"crc32\":1}"),
       "'sub/checkpoint_0.pt'"},
      {"more ranks than files", marker_json("1", "2", file_json), "world size 2 but 1 files"},
      {"files out of rank order",
       marker_json("1", "1", "{\"rank\":1,\"name\":\"checkpoint_1.pt\",\"size\":1,\"crc32\":1}"),
       "expected rank 0"},
      {"a field missing", "{\"format\":\"ckpt-commit\",\"version\":1,\"world_size\":1,\"files\":[]}",
       "malformed"},
  };
  for (const auto& c : cases) {
    BOOST_TEST_CONTEXT(c.label) {
      write_text(marker_file, c.text);
      BOOST_CHECK_EXCEPTION(ckpt::read_commit_marker(dir), ckpt::CorruptCheckpoint,
                            [&](const ckpt::CorruptCheckpoint& e) {
                              BOOST_TEST_INFO("what(): " << e.what());
                              return mentions(e, marker_file.string()) && mentions(e, c.says);
                            });
      BOOST_TEST(!ckpt::is_committed(dir));
    }
  }
}

BOOST_AUTO_TEST_CASE(a_newer_version_written_through_the_library_is_refused) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  save_alone(dir);
  auto marker = marker_of(dir, 1);
  marker.version = ckpt::kCommitMarkerVersion + 1;
  ckpt::write_commit_marker(dir, marker);
  BOOST_CHECK_EXCEPTION(
      ckpt::read_commit_marker(dir), ckpt::CorruptCheckpoint, [&](const ckpt::CorruptCheckpoint& e) {
        return mentions(e, (dir / ckpt::kCommitMarkerName).string()) && mentions(e, "newer");
      });
  BOOST_TEST(!ckpt::is_committed(dir));
  // An older version than this library writes is still read.
  marker.version = ckpt::kCommitMarkerVersion - 1;
  ckpt::write_commit_marker(dir, marker);
  BOOST_TEST(ckpt::is_committed(dir));
}

BOOST_AUTO_TEST_CASE(a_marker_naming_a_path_outside_is_refused_even_when_written_by_the_library) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  save_alone(dir);
  auto marker = marker_of(dir, 1);
  marker.files.at(0).name = "../x";
  // The writer writes what it is given; the reader refuses it.
  ckpt::write_commit_marker(dir, marker);
  BOOST_CHECK_EXCEPTION(ckpt::read_commit_marker(dir), ckpt::CorruptCheckpoint,
                        [&](const ckpt::CorruptCheckpoint& e) {
                          return mentions(e, (dir / ckpt::kCommitMarkerName).string()) && mentions(e, "../x");
                        });
  BOOST_TEST(!ckpt::is_committed(dir));
  // verify_commit, given such a marker directly, refuses it too.
  BOOST_CHECK_EXCEPTION(ckpt::verify_commit(dir, marker), ckpt::CorruptCheckpoint,
                        [&](const ckpt::CorruptCheckpoint& e) { return mentions(e, "../x"); });
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(verify)

/// A committed directory of two ranks in a TempDir.
struct Committed {
  TempDir temp;
  fs::path dir = temp / "ckpt";
  ckpt::CommitMarker marker;
  Committed() {
    require_all_saved(save_ranks(dir, 2));
    const auto read = ckpt::read_commit_marker(dir);
    BOOST_REQUIRE(read.has_value());
    marker = *read;
  }
  fs::path file(std::int64_t rank) const { return dir / ckpt::checkpoint_file_name(rank); }

  /// verify_commit throws CorruptCheckpoint naming the directory and `name`;
  /// is_committed says no.
  void check_refused(const std::string& name) const {
    BOOST_CHECK_EXCEPTION(ckpt::verify_commit(dir, marker), ckpt::CorruptCheckpoint,
                          [&](const ckpt::CorruptCheckpoint& e) {
                            BOOST_TEST_INFO("what(): " << e.what());
                            return mentions(e, dir.string()) && mentions(e, name);
                          });
    BOOST_TEST(!ckpt::is_committed(dir));
  }
};

BOOST_FIXTURE_TEST_CASE(matching_files_verify, Committed) {
  BOOST_TEST(marker.world_size == 2);
  BOOST_REQUIRE(marker.files.size() == 2u);
  BOOST_CHECK_NO_THROW(ckpt::verify_commit(dir, marker));
  BOOST_TEST(ckpt::is_committed(dir));
}

BOOST_FIXTURE_TEST_CASE(a_truncated_file_is_refused, Committed) {
  fs::resize_file(file(1), fs::file_size(file(1)) - 1);
  check_refused("checkpoint_1.pt");
}

BOOST_FIXTURE_TEST_CASE(a_sound_file_of_another_size_is_refused, Committed) {
  // Rank 1's file replaced by a sound archive of another size: only the size
  // and the digest tell.
  {
    ckpt::StateDict smaller;
    smaller.insert("step", 7);
    ckpt::write_file(file(1), smaller.to_ivalue());
  }
  check_refused("checkpoint_1.pt");
}

BOOST_FIXTURE_TEST_CASE(a_flipped_byte_in_the_zip_directory_is_refused, Committed) {
  // The CRC field of the first directory entry: the archive still parses, with
  // a different directory digest, and the same size.
  const auto cd = zip_directory_offset(read_bytes(file(0)));
  const auto size = fs::file_size(file(0));
  ckpt::test::flip_byte(file(0), cd + 16);
  BOOST_REQUIRE(fs::file_size(file(0)) == size);
  check_refused("checkpoint_0.pt");
}

BOOST_FIXTURE_TEST_CASE(a_flipped_byte_in_tensor_data_is_left_to_the_reader, Committed) {
  // The marker digests the directory (which holds every record's CRC-32), not
  // the data, so that a commit check does not read every byte: damaged data is
  // found by a read that checks CRCs (verify_crc).
  ckpt::test::flip_byte(file(0), tensor_byte(file(0)));
  BOOST_CHECK_NO_THROW(ckpt::verify_commit(dir, marker));
  BOOST_TEST(ckpt::is_committed(dir));
  ckpt::ReadOptions checked;
  checked.verify_crc = true;
  BOOST_CHECK_THROW(ckpt::read_file(file(0), checked), ckpt::CorruptCheckpoint);
}

BOOST_FIXTURE_TEST_CASE(a_missing_file_is_refused, Committed) {
  fs::remove(file(1));
  check_refused("checkpoint_1.pt");
}

BOOST_FIXTURE_TEST_CASE(a_file_of_another_save_is_refused, Committed) {
  // Rank 0's file from another save: sound, but not the file committed.
  {
    TempDir other;
    save_alone(other / "ckpt", 42);
    fs::copy_file(other / "ckpt" / "checkpoint_0.pt", file(0), fs::copy_options::overwrite_existing);
  }
  check_refused("checkpoint_0.pt");
}

BOOST_FIXTURE_TEST_CASE(a_damaged_marker_is_not_committed, Committed) {
  const fs::path marker_file = dir / ckpt::kCommitMarkerName;
  fs::resize_file(marker_file, fs::file_size(marker_file) / 2);
  BOOST_CHECK_THROW(ckpt::read_commit_marker(dir), ckpt::CorruptCheckpoint);
  BOOST_TEST(!ckpt::is_committed(dir));
}

BOOST_AUTO_TEST_SUITE_END()

// When CheckpointWriter writes the marker (checkpoint_writer.cpp, commit()):
// the coordinator (rank 0) writes it when it is alone (world size 1, with or
// without a barrier) or when the barrier exchanged every rank's report; with
// several ranks and no barrier, or a barrier that only synchronises, no marker
// is written (a warning is logged once per process).
BOOST_AUTO_TEST_SUITE(writer_commits)

BOOST_AUTO_TEST_CASE(a_job_of_one_rank_commits_without_a_barrier) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  auto checkpointer = ckpt::make_sync_checkpointer({}, ckpt::RankInfo{0, 1});
  checkpointer->save(dir, make_state_dict());

  const auto marker = ckpt::read_commit_marker(dir);
  BOOST_REQUIRE(marker.has_value());
  BOOST_TEST(marker->version == ckpt::kCommitMarkerVersion);
  BOOST_TEST(marker->world_size == 1);
  BOOST_REQUIRE(marker->files.size() == 1u);
  BOOST_TEST((marker->files[0] == ckpt::describe_committed_file(dir, 0)));
  BOOST_TEST(!marker->time.empty());
  BOOST_TEST(ckpt::is_committed(dir));
}

BOOST_AUTO_TEST_CASE(a_job_of_one_rank_commits_with_a_barrier_that_exchanges_nothing) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  auto barrier = std::make_shared<PlainBarrier>();
  ckpt::CheckpointWriter writer({}, ckpt::RankInfo{0, 1}, barrier);
  writer.write(dir, make_state_dict());
  BOOST_TEST(barrier->calls == 1);
  BOOST_TEST(ckpt::is_committed(dir));
}

BOOST_AUTO_TEST_CASE(a_second_save_into_the_directory_commits_the_new_file) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  auto checkpointer = ckpt::make_sync_checkpointer({}, ckpt::RankInfo{0, 1});
  checkpointer->save(dir, make_state_dict(0));
  const auto first = ckpt::read_commit_marker(dir);
  checkpointer->save(dir, make_state_dict(9));
  const auto second = ckpt::read_commit_marker(dir);
  BOOST_REQUIRE(first && second);
  BOOST_TEST((second->files[0] == ckpt::describe_committed_file(dir, 0)));
  BOOST_TEST(ckpt::is_committed(dir));
}

BOOST_AUTO_TEST_CASE(several_ranks_without_a_barrier_write_no_marker) {
  TempDir temp;
  LogCapture logs;
  for (const auto& [rank, world] : std::vector<std::pair<std::int64_t, std::int64_t>>{{0, 2}, {1, 2}}) {
    const fs::path dir = temp / ("rank" + std::to_string(rank));
    auto checkpointer = ckpt::make_sync_checkpointer({}, ckpt::RankInfo{rank, world});
    checkpointer->save(dir, make_state_dict(rank));
    BOOST_TEST(fs::exists(dir / ckpt::checkpoint_file_name(rank)));
    BOOST_TEST(!fs::exists(dir / ckpt::kCommitMarkerName));
    BOOST_TEST(!ckpt::is_committed(dir));
  }
  // Whatever was logged (once per process) says so.
  for (const auto& [level, text] : logs.messages())
    BOOST_TEST(text.find("no commit marker") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(several_ranks_with_a_barrier_that_exchanges_nothing_write_no_marker) {
  TempDir temp;
  LogCapture logs;
  const fs::path dir = temp / "ckpt";
  auto barrier = std::make_shared<PlainBarrier>();
  ckpt::CheckpointWriter writer({}, ckpt::RankInfo{0, 2}, barrier);
  writer.write(dir, make_state_dict());
  BOOST_TEST(barrier->calls == 1);
  BOOST_TEST(fs::exists(dir / "checkpoint_0.pt"));
  BOOST_TEST(!fs::exists(dir / ckpt::kCommitMarkerName));
  for (const auto& [level, text] : logs.messages())
    BOOST_TEST(text.find("no commit marker") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(several_ranks_with_a_barrier_that_exchanges_reports_commit_every_file) {
  TempDir temp;
  const fs::path dir = temp / "ckpt";
  require_all_saved(save_ranks(dir, 3));
  const auto marker = ckpt::read_commit_marker(dir);
  BOOST_REQUIRE(marker.has_value());
  BOOST_TEST(marker->world_size == 3);
  BOOST_REQUIRE(marker->files.size() == 3u);
  for (std::int64_t r = 0; r < 3; ++r)
    BOOST_TEST((marker->files[static_cast<std::size_t>(r)] == ckpt::describe_committed_file(dir, r)));
  BOOST_TEST(ckpt::is_committed(dir));
}

BOOST_AUTO_TEST_SUITE_END()
