// dcp::AsyncSaver in one process: what a save commits is the state at the
// moment it was staged; the data file the writer child writes is the very
// file the synchronous save writes, which Python's torch loads; a child
// killed mid-write or a full disk fails the save, keeps the last checkpoint
// and lets the next save commit; planners and storage writers of the user's
// own still save asynchronously. (The fault tables and dead or hung ranks
// through the saver run on 4 ranks in dcp_checkpoint_test.)
#define BOOST_TEST_MODULE dcp_async_test
#include <ckpt/dcp/async_saver.hpp>
#include <ckpt/dcp/planner.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/dcp/storage.hpp>
#include <ckpt/error.hpp>
#include <ckpt/format.hpp>

#include <boost/test/unit_test.hpp>

#include "support/dcp_cases.hpp"
#include "support/dir_watch.hpp"
#include "support/python_bound.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <thread>

namespace fs = std::filesystem;
namespace asio = boost::asio;
using ckpt::StateDict;
using ckpt::test::DirWatch;
using ckpt::test::TempDir;
using ckpt::test::wait_get;
using ckpt::test::dcp_cases::load_alone;
using ckpt::test::dcp_cases::save_alone;

namespace {

/// A state dict of every kind of leaf: dtypes, a view that is not
/// contiguous, a 0-dim and an empty tensor, nested values.
StateDict mixed_state() {
  StateDict optim;
  optim.insert("step", 7);
  optim.insert("lr", 0.125);
  optim.insert("name", std::string("adam"));
  optim.insert("exp_avg", at::arange(6, at::kDouble).reshape({2, 3}));
  StateDict sd;
  sd.insert("weight", at::randn({64, 33}));
  sd.insert("half", at::randn({5, 7}).to(at::kBFloat16));
  sd.insert("ids", at::arange(40, at::kLong).reshape({5, 8}).t());  // not contiguous
  sd.insert("scalar", at::scalar_tensor(3.5));
  sd.insert("empty", at::zeros({0, 4}));
  sd.insert("flags", at::tensor({1, 0, 1}, at::kInt).to(at::kBool));
  sd.insert("optim", optim);
  return sd;
}

c10::IValue deep_copy(const c10::IValue& v) {
  if (v.isTensor()) return v.toTensor().clone();
  if (v.isGenericDict()) {
    const auto src = v.toGenericDict();
    c10::impl::GenericDict out(src.keyType(), src.valueType());
    for (const auto& e : src) out.insert(e.key(), deep_copy(e.value()));
    return out;
  }
  return v;
}

/// A deep copy (what the state was when it was saved).
StateDict snapshot(const StateDict& sd) {
  return StateDict::from_ivalue(deep_copy(sd.to_ivalue()));
}

/// Adds one to every floating tensor, in place (training going on).
void train_step(const StateDict& sd) {
  const auto value = sd.to_ivalue();
  std::function<void(const c10::IValue&)> walk = [&](const c10::IValue& v) {
    if (v.isTensor()) {
      auto t = v.toTensor();
      if (t.is_floating_point() && t.numel() > 0) t.add_(1);
    } else if (v.isGenericDict()) {
      for (const auto& e : v.toGenericDict()) walk(e.value());
    }
  };
  walk(value);
}

/// The same values: tensors bit for bit (any layout), dicts key by key.
bool same_value(const c10::IValue& a, const c10::IValue& b) {
  if (a.isTensor() || b.isTensor())
    return a.isTensor() && b.isTensor() && ckpt::test::same_bits(a.toTensor(), b.toTensor());
  if (a.isGenericDict() || b.isGenericDict()) {
    if (!a.isGenericDict() || !b.isGenericDict()) return false;
    const auto da = a.toGenericDict(), db = b.toGenericDict();
    if (da.size() != db.size()) return false;
    for (const auto& e : da) {
      const auto it = db.find(e.key());
      if (it == db.end() || !same_value(e.value(), it->value())) return false;
    }
    return true;
  }
  return a.tagKind() == b.tagKind() && c10::_fastEqualsForContainer(a, b);
}

bool same_state(const StateDict& a, const StateDict& b) {
  return same_value(a.to_ivalue(), b.to_ivalue());
}

std::string file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

std::set<std::string> names_in(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

/// The error a future holds, described ("" when none).
std::string error_of(std::future<void>& f) {
  try {
    wait_get(f);
    return "";
  } catch (const ckpt::CheckpointException& e) {
    std::string out = fmt::format("CheckpointException: {}", e.what());
    for (const auto& [rank, f] : e.failures())
      out += fmt::format(" | rank {}: {}: {}", rank, f.type, f.message);
    return out;
  } catch (...) {
    const auto d = ckpt::describe_failure(std::current_exception());
    return d.type + ": " + d.message;
  }
}

/// Saves `sd` into `dir` with a saver made for it, and requires it committed.
void save_with_a_saver_of_its_own(const StateDict& sd, const fs::path& dir) {
  asio::thread_pool completions(1);
  ckpt::dcp::AsyncSaver saver(completions.get_executor());
  auto f = saver.save(sd, save_alone(dir));
  BOOST_REQUIRE_EQUAL(error_of(f.written), "");
}

/// A saver with the tests' fault injector in its writer child: `fault` (the
/// shim's CKPT_FAULT) on writes under `under`, reported into `report`. The
/// variables are set only until the child has run a first save (elsewhere).
struct FaultySaver {
  asio::thread_pool completions{1};
  std::unique_ptr<ckpt::dcp::AsyncSaver> saver;
  int first_pid = -1;

  FaultySaver(const std::string& fault, const fs::path& under, const fs::path& report,
              const fs::path& warm_up) {
    ::setenv("LD_PRELOAD", CKPT_FAULT_SHIM, 1);
    ::setenv("CKPT_FAULT", fault.c_str(), 1);
    ::setenv("CKPT_FAULT_IN", "child", 1);
    ::setenv("CKPT_FAULT_UNDER", under.c_str(), 1);
    ::setenv("CKPT_FAULT_REPORT", report.c_str(), 1);
    saver = std::make_unique<ckpt::dcp::AsyncSaver>(completions.get_executor());
    auto warm = saver->save(mixed_state(), save_alone(warm_up));
    const std::string warm_error = error_of(warm.written);
    for (const char* v :
         {"LD_PRELOAD", "CKPT_FAULT", "CKPT_FAULT_IN", "CKPT_FAULT_UNDER", "CKPT_FAULT_REPORT"})
      ::unsetenv(v);
    BOOST_REQUIRE_MESSAGE(warm_error.empty(), warm_error);
    first_pid = saver->writer_pid();
    BOOST_REQUIRE_GT(first_pid, 0);
  }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(async_saver)

BOOST_AUTO_TEST_CASE(a_save_commits_the_state_staged_while_training_goes_on) {
  TempDir dir;
  asio::thread_pool completions(1);
  ckpt::dcp::AsyncSaver saver(completions.get_executor());
  const StateDict sd = mixed_state();
  const StateDict at_save = snapshot(sd);
  auto futures = saver.save(sd, save_alone(dir / "ckpt"));
  wait_get(futures.staged);
  train_step(sd);  // the tensors change while the child writes
  BOOST_REQUIRE_EQUAL(error_of(futures.written), "");
  BOOST_CHECK(fs::exists(dir / "ckpt" / ckpt::dcp::kMetadataFileName));
  const StateDict loaded = ckpt::dcp::load_all(dir / "ckpt", load_alone());
  BOOST_CHECK_MESSAGE(same_state(loaded, at_save), "the checkpoint is not the state at the save");
  BOOST_CHECK(!same_state(loaded, sd));
  BOOST_CHECK_GE(saver.arena_size(), ckpt::checkpoint_file_size(at_save) / 2);
  saver.close();
  saver.close();  // idempotent
}

BOOST_AUTO_TEST_CASE(the_data_file_is_byte_for_byte_the_synchronous_saves) {
  TempDir dir;
  const StateDict sd = ckpt::test::python_bound_state(0, 1, false);  // shards, bf16, nested values
  ckpt::dcp::save(sd, save_alone(dir / "sync"));
  asio::thread_pool completions(1);
  ckpt::dcp::AsyncSaver saver(completions.get_executor());
  auto futures = saver.save(sd, save_alone(dir / "async"));
  BOOST_REQUIRE_EQUAL(error_of(futures.written), "");
  const auto file = "__0_0.distcp";
  BOOST_REQUIRE(fs::exists(dir / "sync" / file));
  BOOST_REQUIRE(fs::exists(dir / "async" / file));
  BOOST_CHECK_MESSAGE(file_bytes(dir / "sync" / file) == file_bytes(dir / "async" / file),
                      "the data files differ");
  BOOST_CHECK(same_state(ckpt::dcp::load_all(dir / "async", load_alone()),
                         ckpt::dcp::load_all(dir / "sync", load_alone())));
  const auto verify =
      ckpt::test::run(std::string(CKPT_CLI) + " verify " + ckpt::test::sh_quote((dir / "async").string()));
  BOOST_CHECK_MESSAGE(verify.status == 0, verify.output);
}

BOOST_AUTO_TEST_CASE(python_loads_what_the_saver_wrote) {
  TempDir dir;
  asio::thread_pool completions(1);
  ckpt::dcp::AsyncSaver saver(completions.get_executor());
  // torch 2.6: dcp.load and dcp_to_torch_save of a nested, sharded state dict.
  auto futures = saver.save(ckpt::test::python_bound_state(0, 1, false), save_alone(dir / "ckpt"));
  BOOST_REQUIRE_EQUAL(error_of(futures.written), "");
  ckpt::write_file(dir / "expected.pt", ckpt::test::python_bound_state(0, 1, true).to_ivalue());
  for (const char* mode : {"load", "to_torch_save"}) {
    const auto r = ckpt::test::torch2_script("dcp_check.py",
                                             {mode, (dir / "ckpt").string(), (dir / "expected.pt").string()});
    BOOST_CHECK_MESSAGE(r.status == 0, mode << ": " << ckpt::test::describe(r));
  }
  // torch 1.13: a flat state dict, `.metadata` in its dialect.
  const auto [leaves, paths] = ckpt::dcp::flatten_state_dict(ckpt::test::python_bound_state(0, 1, false));
  StateDict flat;
  for (const auto& [key, value] : leaves) {
    if (const auto* t = std::get_if<at::Tensor>(&value))
      flat.insert(key, *t);
    else if (const auto* st = std::get_if<ckpt::dcp::ShardedTensor>(&value))
      flat.insert(key, ckpt::dcp::sharded_value(*st));
    else
      flat.insert(key, std::get<c10::IValue>(value));
  }
  StateDict expected_flat;
  for (const auto& [key, value] :
       ckpt::dcp::flatten_state_dict(ckpt::test::python_bound_state(0, 1, true)).first) {
    if (const auto* t = std::get_if<at::Tensor>(&value))
      expected_flat.insert(key, *t);
    else
      expected_flat.insert(key, std::get<c10::IValue>(value));
  }
  ckpt::write_file(dir / "flat.pt", expected_flat.to_ivalue());
  ckpt::dcp::FileSystemWriter legacy(
      dir / "legacy", ckpt::test::dcp_cases::writing_for(ckpt::dcp::MetadataDialect::torch_1_13));
  auto legacy_futures = saver.save(flat, save_alone(std::nullopt, &legacy));
  BOOST_REQUIRE_EQUAL(error_of(legacy_futures.written), "");
  const auto r = ckpt::test::python_script("dcp_check.py",
                                           {"legacy", (dir / "legacy").string(), (dir / "flat.pt").string()});
  BOOST_CHECK_MESSAGE(r.status == 0, "legacy: " << ckpt::test::describe(r));
}

BOOST_AUTO_TEST_CASE(saves_into_one_directory_replace_each_other_in_one_arena) {
  TempDir dir;
  asio::thread_pool completions(1);
  ckpt::dcp::AsyncSaver saver(completions.get_executor());
  const StateDict sd = mixed_state();
  std::uint64_t arena = 0;
  int child = -1;
  for (int i = 0; i < 3; ++i) {
    BOOST_TEST_CONTEXT("save " << i) {
      const StateDict at_save = snapshot(sd);
      auto futures = saver.save(sd, save_alone(dir / "ckpt"));
      wait_get(futures.staged);
      train_step(sd);
      BOOST_REQUIRE_EQUAL(error_of(futures.written), "");
      BOOST_CHECK(same_state(ckpt::dcp::load_all(dir / "ckpt", load_alone()), at_save));
      std::size_t data_files = 0;
      for (const auto& name : names_in(dir / "ckpt")) data_files += name.ends_with(".distcp");
      BOOST_CHECK_EQUAL(data_files, 1u);  // the replaced checkpoint's file is gone
      if (i == 0) {
        arena = saver.arena_size();
        child = saver.writer_pid();
      }
      BOOST_CHECK_EQUAL(saver.arena_size(), arena);  // kept, not grown again
      BOOST_CHECK_EQUAL(saver.writer_pid(), child);  // one child for every save
    }
  }
}

BOOST_AUTO_TEST_CASE(saves_asked_for_back_to_back_are_written_in_order) {
  // The second save waits for the first write before it stages into the
  // arena the child is still reading.
  TempDir dir;
  asio::thread_pool completions(1);
  ckpt::dcp::AsyncSaver saver(completions.get_executor());
  StateDict a, b;
  a.insert("w", at::full({1024, 1024}, 1.0));
  b.insert("w", at::full({1024, 1024}, 2.0));
  auto first = saver.save(a, save_alone(dir / "a"));
  auto second = saver.save(b, save_alone(dir / "b"));
  BOOST_REQUIRE_EQUAL(error_of(first.written), "");
  BOOST_REQUIRE_EQUAL(error_of(second.written), "");
  BOOST_CHECK(same_state(ckpt::dcp::load_all(dir / "a", load_alone()), a));
  BOOST_CHECK(same_state(ckpt::dcp::load_all(dir / "b", load_alone()), b));
}

BOOST_AUTO_TEST_CASE(async_save_is_awaited_from_a_coroutine) {
  TempDir dir;
  asio::io_context io;
  ckpt::dcp::AsyncSaver saver(io.get_executor());
  const StateDict sd = mixed_state();
  const StateDict at_save = snapshot(sd);
  auto done = asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        ckpt::dcp::SaveOptions options = save_alone(dir / "ckpt");
        auto written = co_await saver.async_save(sd, options, asio::use_awaitable);
        train_step(sd);
        co_await written.async_wait(asio::use_awaitable);
      },
      asio::use_future);
  io.run();
  BOOST_REQUIRE_NO_THROW(wait_get(done));
  BOOST_CHECK(same_state(ckpt::dcp::load_all(dir / "ckpt", load_alone()), at_save));
}

BOOST_AUTO_TEST_CASE(a_writer_child_killed_mid_write_fails_the_save_and_the_next_commits) {
  TempDir dir;
  const StateDict v1 = mixed_state();
  save_with_a_saver_of_its_own(v1, dir / "ckpt");
  fs::create_directories(dir / "watch");
  // The child's first write of a data file under ckpt/ blocks; once it has,
  // it is killed.
  FaultySaver faulty("write:1:HOLD", dir / "ckpt", dir / "watch" / "held", dir / "warm");
  DirWatch watch(dir / "watch");
  StateDict v2;
  v2.insert("weight", at::randn({256, 256}));
  auto killed = faulty.saver->save(v2, save_alone(dir / "ckpt"));
  BOOST_REQUIRE_EQUAL(error_of(killed.staged), "");
  BOOST_REQUIRE_MESSAGE(!watch.wait_created("held", ckpt::test::kWaitBound).empty(),
                        "the child never reached the held write");
  BOOST_REQUIRE_EQUAL(::kill(faulty.first_pid, SIGKILL), 0);
  const std::string error = error_of(killed.written);
  BOOST_TEST_MESSAGE("the killed write: " << error);
  BOOST_CHECK(error.starts_with("CheckpointException: "));
  BOOST_CHECK(error.find("rank 0: WriterProcessError: ") != std::string::npos);
  BOOST_CHECK(error.find("Child process terminated unexpectedly") != std::string::npos);
  BOOST_CHECK(error.find("signal 9") != std::string::npos);
  BOOST_CHECK(ckpt::test::process_gone(faulty.first_pid));
  // The last good checkpoint is whole, and nothing else is left there.
  BOOST_CHECK(same_state(ckpt::dcp::load_all(dir / "ckpt", load_alone()), snapshot(v1)));
  for (const auto& name : names_in(dir / "ckpt"))
    BOOST_CHECK_MESSAGE(name == ckpt::dcp::kMetadataFileName || name == "__0_0.distcp",
                        "left behind: " << name);
  // The next save starts a new child and commits.
  auto next = faulty.saver->save(v2, save_alone(dir / "ckpt"));
  BOOST_REQUIRE_EQUAL(error_of(next.written), "");
  BOOST_CHECK_NE(faulty.saver->writer_pid(), faulty.first_pid);
  BOOST_CHECK(same_state(ckpt::dcp::load_all(dir / "ckpt", load_alone()), snapshot(v2)));
}

BOOST_AUTO_TEST_CASE(a_full_disk_in_the_child_fails_the_save_and_keeps_the_last_checkpoint) {
  TempDir dir;
  const StateDict v1 = mixed_state();
  save_with_a_saver_of_its_own(v1, dir / "ckpt");
  FaultySaver faulty("write:1:ENOSPC", dir / "ckpt", dir / "report", dir / "warm");
  auto full = faulty.saver->save(mixed_state(), save_alone(dir / "ckpt"));
  const std::string error = error_of(full.written);
  BOOST_TEST_MESSAGE("the full disk: " << error);
  BOOST_CHECK(error.starts_with("CheckpointException: "));
  BOOST_CHECK(error.find("rank 0: IoError: ") != std::string::npos);
  BOOST_CHECK(error.find(std::strerror(ENOSPC)) != std::string::npos);
  BOOST_CHECK_EQUAL(faulty.saver->writer_pid(), faulty.first_pid);  // the child lives on
  BOOST_CHECK(same_state(ckpt::dcp::load_all(dir / "ckpt", load_alone()), snapshot(v1)));
  auto next = faulty.saver->save(v1, save_alone(dir / "ckpt"));
  BOOST_REQUIRE_EQUAL(error_of(next.written), "");  // the fault fired once
}

namespace {

/// A planner whose data is its own: every tensor doubled.
class DoublingPlanner : public ckpt::dcp::DefaultSavePlanner {
 public:
  c10::IValue resolve_data(const ckpt::dcp::WriteItem& item) override {
    auto v = DefaultSavePlanner::resolve_data(item);
    if (v.isTensor()) return v.toTensor() * 2;
    return v;
  }
};

/// A storage writer of the user's own (over a FileSystemWriter): which
/// thread wrote.
class RecordingWriter : public ckpt::dcp::StorageWriter {
 public:
  explicit RecordingWriter(fs::path path) : real_(std::move(path)) {}
  void reset(const std::optional<fs::path>& id) override { real_.reset(id); }
  void set_up_storage_writer(bool c) override { real_.set_up_storage_writer(c); }
  ckpt::dcp::SavePlan prepare_local_plan(ckpt::dcp::SavePlan p) override {
    return real_.prepare_local_plan(p);
  }
  std::vector<ckpt::dcp::SavePlan> prepare_global_plan(std::vector<ckpt::dcp::SavePlan> p) override {
    return real_.prepare_global_plan(p);
  }
  std::future<std::vector<ckpt::dcp::WriteResult>> write_data(const ckpt::dcp::SavePlan& plan,
                                                              ckpt::dcp::SavePlanner& planner) override {
    writer_thread = std::this_thread::get_id();
    return real_.write_data(plan, planner);
  }
  void finish(const ckpt::dcp::Metadata& md,
              const std::vector<std::vector<ckpt::dcp::WriteResult>>& r) override {
    real_.finish(md, r);
  }
  bool validate_checkpoint_id(const fs::path& id) const override { return real_.validate_checkpoint_id(id); }
  std::thread::id writer_thread;

 private:
  ckpt::dcp::FileSystemWriter real_;
};

}  // namespace

BOOST_AUTO_TEST_CASE(a_planner_with_data_of_its_own_is_saved_from_that_data) {
  TempDir dir;
  asio::thread_pool completions(1);
  ckpt::dcp::AsyncSaver saver(completions.get_executor());
  StateDict sd;
  sd.insert("w", at::arange(12, at::kFloat).reshape({3, 4}));
  DoublingPlanner planner;
  auto options = save_alone(dir / "ckpt");
  options.planner = &planner;
  auto futures = saver.save(sd, options);
  BOOST_REQUIRE_EQUAL(error_of(futures.written), "");
  const auto loaded = ckpt::dcp::load_all(dir / "ckpt", load_alone());
  BOOST_CHECK(at::equal(loaded.at("w").toTensor(), at::arange(12, at::kFloat).reshape({3, 4}) * 2));
}

BOOST_AUTO_TEST_CASE(a_storage_writer_of_the_users_own_writes_on_the_save_thread) {
  TempDir dir;
  asio::thread_pool completions(1);
  ckpt::dcp::AsyncSaver saver(completions.get_executor());
  const StateDict sd = mixed_state();
  const StateDict at_save = snapshot(sd);
  RecordingWriter writer(dir / "ckpt");
  auto futures = saver.save(sd, save_alone(std::nullopt, &writer));
  wait_get(futures.staged);
  train_step(sd);
  BOOST_REQUIRE_EQUAL(error_of(futures.written), "");
  BOOST_CHECK(writer.writer_thread != std::thread::id());
  BOOST_CHECK(writer.writer_thread != std::this_thread::get_id());
  BOOST_CHECK(same_state(ckpt::dcp::load_all(dir / "ckpt", load_alone()), at_save));
}

BOOST_AUTO_TEST_CASE(values_are_saved_as_they_were_when_staged) {
  // A list changed in place after staging; written by a storage writer of
  // the user's own (from the staged copy, on the save thread).
  TempDir dir;
  asio::thread_pool completions(1);
  ckpt::dcp::AsyncSaver saver(completions.get_executor());
  c10::impl::GenericList history(c10::IntType::get());
  history.push_back(std::int64_t{1});
  StateDict sd;
  sd.insert("w", at::ones({4}));
  sd.insert("history", c10::IValue(history));
  RecordingWriter writer(dir / "ckpt");
  auto futures = saver.save(sd, save_alone(std::nullopt, &writer));
  wait_get(futures.staged);
  history.push_back(std::int64_t{2});
  BOOST_REQUIRE_EQUAL(error_of(futures.written), "");
  const auto loaded = ckpt::dcp::load_all(dir / "ckpt", load_alone());
  BOOST_CHECK_EQUAL(loaded.at("history").toList().size(), 1u);
}

BOOST_AUTO_TEST_CASE(a_shard_that_is_not_its_chunk_fails_the_save_and_keeps_the_last) {
  TempDir dir;
  const StateDict v1 = mixed_state();
  save_with_a_saver_of_its_own(v1, dir / "ckpt");
  ckpt::dcp::ChunkShardingSpec spec;
  spec.dim = 0;
  spec.placements = {"rank:0/cpu", "rank:0/cpu"};
  auto st = ckpt::dcp::ShardedTensor::zeros(spec, {4, 3}, 0, at::kFloat);
  st.local_shards()[1].tensor = at::zeros({2, 5});  // not the 2 x 3 chunk the metadata says
  StateDict bad;
  bad.insert("table", ckpt::dcp::sharded_value(st));
  asio::thread_pool completions(1);
  ckpt::dcp::AsyncSaver saver(completions.get_executor());
  auto futures = saver.save(bad, save_alone(dir / "ckpt"));
  const std::string error = error_of(futures.written);
  BOOST_TEST_MESSAGE("the wrong shard: " << error);
  BOOST_CHECK(error.find("rank 0: Mismatch: ") != std::string::npos);
  BOOST_CHECK(same_state(ckpt::dcp::load_all(dir / "ckpt", load_alone()), snapshot(v1)));
}

BOOST_AUTO_TEST_CASE(bad_requests_fail_at_once_and_a_closed_saver_refuses) {
  TempDir dir;
  asio::thread_pool completions(1);
  ckpt::dcp::AsyncSaver saver(completions.get_executor());
  auto nowhere = saver.save(mixed_state(), ckpt::dcp::SaveOptions{});
  BOOST_CHECK(error_of(nowhere.staged).find("needs a checkpoint_id or a storage_writer") !=
              std::string::npos);
  auto ok = saver.save(mixed_state(), save_alone(dir / "ckpt"));
  saver.close();  // waits for the write: committed by now
  BOOST_CHECK(fs::exists(dir / "ckpt" / ckpt::dcp::kMetadataFileName));
  BOOST_CHECK_EQUAL(error_of(ok.written), "");
  BOOST_CHECK_EQUAL(saver.writer_pid(), -1);
  auto refused = saver.save(mixed_state(), save_alone(dir / "later"));
  BOOST_CHECK(error_of(refused.staged).find("closed") != std::string::npos);
  BOOST_CHECK(!fs::exists(dir / "later"));
}

BOOST_AUTO_TEST_SUITE_END()
