// One rank of a DCP job, for tests/dcp_checkpoint_test.cpp: upstream's
// test/distributed/checkpoint/test_checkpoint.py (TestDistributedFailure) on
// real rank processes, a real c10d group (TCPStore + Gloo) and the real
// filesystem storage layers.
//
//   ckpt-launch -n N --timeout S dcp_worker SCENARIO DIR [GROUP_TIMEOUT_S]   (a rank)
//   dcp_worker SCENARIO DIR                     (the *_alone scenarios: no launcher,
//                                                no process group, one process)
// A scenario named async_<name> runs <name> with every save of its fault
// cases made through a dcp::AsyncSaver (made by every rank before the
// scenario starts): staged, then written on the saver's thread and group, its
// outcome that of the written future. async_child_killed is the saver's own.
//
// What a rank does, in order:
//   1. joins the default process group (RANK, WORLD_SIZE, MASTER_ADDR,
//      MASTER_PORT from the launcher), every collective bounded by
//      GROUP_TIMEOUT_S (default kBound; the dead and hung rank scenarios pass
//      a short one, which save_state_dict / load_state_dict take as theirs);
//   2. runs SCENARIO (see `scenarios` in main), printing one line per
//      observation: `RESULT <label> <outcome>`, where <outcome> is `ok`,
//      `CheckpointException ranks=[R,...] failures={R:<type>=<message>;...}`
//      or `<type> msg=<message>` (messages on one line), or another fact
//      (`as-saved`, `no`, `got=N expected=N`); a line `UNEXPECTED <label>`
//      follows each observation that is not what this rank expected, and a
//      line `DETAIL <text>` precedes each CheckpointException's (its what());
//   3. meets the other ranks through the group's store (rank 0, which hosts
//      the store, leaves last);
//   4. exits 0 when every observation was the expected one (else 1, and the
//      launcher reports it).
// The test checks the same lines again, against its own copy of the tables.
//
// The storage layers of the fault scenarios are upstream's FaultyStorageWriter
// and FaultyStorageReader, except that they delegate every call to a real
// FileSystemWriter / FileSystemReader: a fault is injected before the real
// call (so a failing finish never commits), a case without faults really saves
// and loads. The dead and hung rank scenarios use the same layers with an
// interceptor that, on one rank at one call, leaves the process (_Exit(0)
// without finishing: exiting 0 lets the launcher keep the other ranks) or
// blocks until the other ranks have timed out; where a rank dies, another
// (healthy) rank may be held in the same call until the victim's process is
// gone (a pidfd, no clock), so that it is still working when the others learn
// of the death.
// Every wait of this program is bounded (kBound, or the group's timeout).
#include <ckpt/dcp/async_saver.hpp>
#include <ckpt/dcp/hf_storage.hpp>
#include <ckpt/dcp/metadata.hpp>
#include <ckpt/dcp/planner.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/dcp/storage.hpp>
#include <ckpt/dist.hpp>
#include <ckpt/error.hpp>
#include <ckpt/format.hpp>

#include "dcp_cases.hpp"
#include "python_bound.hpp"

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/thread_pool.hpp>

#include <csignal>

#include <poll.h>
#include <sys/inotify.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using ckpt::dcp::ChunkShardingSpec;
using ckpt::dcp::DcpStateDict;
using ckpt::dcp::ShardedTensor;
using ckpt::dcp::TensorStorageMetadata;
using Sizes = std::vector<std::int64_t>;
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

namespace {

// --- saving, synchronously or through an AsyncSaver ----------------------------------

boost::asio::thread_pool& completions() {
  static boost::asio::thread_pool pool(1);
  return pool;
}
/// The saver of an async_ scenario (null: saves are synchronous).
std::unique_ptr<ckpt::dcp::AsyncSaver>& async_saver() {
  static std::unique_ptr<ckpt::dcp::AsyncSaver> saver;
  return saver;
}

/// The flat state dict as the nested one AsyncSaver takes (its keys have no
/// dots: they flatten to themselves).
ckpt::StateDict nested(const DcpStateDict& sd) {
  ckpt::StateDict out;
  for (const auto& [key, value] : sd) {
    if (const auto* t = std::get_if<at::Tensor>(&value))
      out.insert(key, *t);
    else if (const auto* st = std::get_if<ShardedTensor>(&value))
      out.insert(key, ckpt::dcp::sharded_value(*st));
    else
      out.insert(key, std::get<c10::IValue>(value));
  }
  return out;
}

/// save_state_dict(sd, writer, default planner, default group, coordinator,
/// no_dist), or the same through the scenario's AsyncSaver: staged, then
/// waited for until written (its error thrown).
void save_flat(const DcpStateDict& sd, ckpt::dcp::StorageWriter& writer, std::int64_t coordinator = 0,
               bool no_dist = false) {
  auto& saver = async_saver();
  if (!saver) {
    ckpt::dcp::save_state_dict(sd, writer, nullptr, nullptr, coordinator, no_dist);
    return;
  }
  ckpt::dcp::SaveOptions options;
  options.storage_writer = &writer;
  options.coordinator_rank = coordinator;
  options.no_dist = no_dist;
  auto futures = saver->save(nested(sd), options);
  // Bounded as every wait here (the saves themselves are bounded by the
  // group's timeout at every step).
  constexpr auto bound = std::chrono::seconds(120);
  if (futures.staged.wait_for(bound) != std::future_status::ready) throw std::runtime_error("staging hung");
  futures.staged.get();
  if (futures.written.wait_for(bound) != std::future_status::ready)
    throw std::runtime_error("the write hung");
  futures.written.get();
}

/// The bound on every wait of this program that is not a DCP call: only keeps
/// a broken library from hanging a rank (the launcher's --timeout is longer).
constexpr auto kBound = std::chrono::seconds(60);

// --- values every rank can compute -----------------------------------------------

/// Upstream's get_spec(): dim `dim`, placements rank:0/cpu .. rank:N-1/cpu.
ChunkShardingSpec spec_over(std::int64_t ranks, std::int64_t dim = 0) {
  ChunkShardingSpec spec;
  spec.dim = dim;
  for (std::int64_t r = 0; r < ranks; ++r) spec.placements.push_back(fmt::format("rank:{}/cpu", r));
  return spec;
}

/// `global` sharded by `spec`: this rank's shards hold their part of it.
ShardedTensor sharded_from(const at::Tensor& global, const ChunkShardingSpec& spec, std::int64_t rank) {
  auto st = ShardedTensor::zeros(spec, global.sizes().vec(), rank, global.scalar_type());
  for (auto& s : st.local_shards()) s.tensor.copy_(slice_of(global, s.metadata.offsets, s.metadata.sizes));
  return st;
}

c10::IValue int_list(const std::vector<std::int64_t>& values) {
  c10::impl::GenericList list(c10::IntType::get());
  for (auto v : values) list.push_back(v);
  return list;
}

/// Upstream's "bytes": [1, 2, 3, 4].
c10::IValue bytes_value() {
  return int_list({1, 2, 3, 4});
}

bool is_bytes_value(const c10::IValue& v) {
  if (!v.isList()) return false;
  const auto list = v.toListRef();
  if (list.size() != 4) return false;
  for (std::size_t i = 0; i < 4; ++i)
    if (!list[i].isInt() || list[i].toInt() != static_cast<std::int64_t>(i) + 1) return false;
  return true;
}

/// Same dtype, same sizes, every element equal.
bool identical(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() && (a.numel() == 0 || at::equal(a, b));
}

const c10::IValue* ivalue_at(const DcpStateDict& sd, const std::string& fqn) {
  for (const auto& [k, v] : sd)
    if (k == fqn) return std::get_if<c10::IValue>(&v);
  return nullptr;
}

/// Whether every tensor and local shard of `sd` holds its part of its global
/// value in `globals` (every other value of `sd` is left to the caller);
/// "as-saved", or what differs.
std::string compare_with(const DcpStateDict& sd, const std::map<std::string, at::Tensor>& globals) {
  std::string wrong;
  for (const auto& [fqn, value] : sd) {
    if (std::holds_alternative<c10::IValue>(value)) continue;
    const auto global = globals.find(fqn);
    bool same = global != globals.end();
    if (same && std::holds_alternative<at::Tensor>(value))
      same = identical(std::get<at::Tensor>(value), global->second);
    else if (same)
      for (const auto& s : std::get<ShardedTensor>(value).local_shards())
        same = same && identical(s.tensor, slice_of(global->second, s.metadata.offsets, s.metadata.sizes));
    if (!same) wrong += (wrong.empty() ? "DIFFERENT:" : ",") + fqn;
  }
  return wrong.empty() ? "as-saved" : wrong;
}

// --- the faulty storage layers (upstream's, over the real ones) ----------------------

/// fail key ("fail_write_data") → the ranks it fails on.
using FailConf = std::map<std::string, std::vector<std::int64_t>>;
/// Called on entry to each storage call with the call's name ("write_data").
using Interceptor = std::function<void(const std::string& call)>;

class TestStorageBase {
 public:
  TestStorageBase(FailConf fail_conf, std::int64_t rank, Interceptor intercept)
      : fail_conf_(std::move(fail_conf)), rank_(rank), intercept_(std::move(intercept)) {}

 protected:
  void enter(const std::string& call) const {
    if (intercept_) intercept_(call);
  }
  bool fails(const std::string& name) const {
    const auto it = fail_conf_.find(name);
    return it != fail_conf_.end() &&
           std::find(it->second.begin(), it->second.end(), rank_) != it->second.end();
  }
  void fail_rank(const std::string& name) const {
    if (fails(name)) throw std::invalid_argument(fmt::format("rank fail {} for {}", rank_, name));
  }
  /// A future holding upstream's async failure, when `name` fails on this rank.
  template <class T>
  std::optional<std::future<T>> fail_rank_async(const std::string& name) const {
    if (!fails(name)) return std::nullopt;
    std::promise<T> failed;
    failed.set_exception(std::make_exception_ptr(
        std::invalid_argument(fmt::format("async rank fail {} for {}", rank_, name))));
    return failed.get_future();
  }

 private:
  FailConf fail_conf_;
  std::int64_t rank_;
  Interceptor intercept_;
};

class FaultyStorageWriter : public TestStorageBase, public ckpt::dcp::StorageWriter {
 public:
  FaultyStorageWriter(fs::path path, FailConf fail_conf, std::int64_t rank, Interceptor intercept = {})
      : TestStorageBase(std::move(fail_conf), rank, std::move(intercept)), real_(std::move(path)) {}

  void reset(const std::optional<fs::path>& checkpoint_id) override { real_.reset(checkpoint_id); }
  void set_up_storage_writer(bool is_coordinator) override {
    enter("set_up_storage_writer");
    fail_rank("fail_set_up_storage_writer");
    real_.set_up_storage_writer(is_coordinator);
  }
  ckpt::dcp::SavePlan prepare_local_plan(ckpt::dcp::SavePlan plan) override {
    enter("prepare_local_plan");
    fail_rank("fail_prepare_local_plan");
    return real_.prepare_local_plan(std::move(plan));
  }
  std::vector<ckpt::dcp::SavePlan> prepare_global_plan(std::vector<ckpt::dcp::SavePlan> plans) override {
    enter("prepare_global_plan");
    fail_rank("fail_prepare_global_plan");
    return real_.prepare_global_plan(std::move(plans));
  }
  std::future<std::vector<ckpt::dcp::WriteResult>> write_data(const ckpt::dcp::SavePlan& plan,
                                                              ckpt::dcp::SavePlanner& planner) override {
    enter("write_data");
    fail_rank("fail_write_data");
    if (auto failed = fail_rank_async<std::vector<ckpt::dcp::WriteResult>>("fail_write_data_async"))
      return std::move(*failed);
    return real_.write_data(plan, planner);
  }
  void finish(const ckpt::dcp::Metadata& metadata,
              const std::vector<std::vector<ckpt::dcp::WriteResult>>& results) override {
    enter("finish");
    fail_rank("fail_finish");  // before the commit point: nothing is committed
    real_.finish(metadata, results);
  }
  bool validate_checkpoint_id(const fs::path& checkpoint_id) const override {
    return real_.validate_checkpoint_id(checkpoint_id);
  }

 private:
  ckpt::dcp::FileSystemWriter real_;
};

class FaultyStorageReader : public TestStorageBase, public ckpt::dcp::StorageReader {
 public:
  FaultyStorageReader(fs::path path, FailConf fail_conf, std::int64_t rank, Interceptor intercept = {})
      : TestStorageBase(std::move(fail_conf), rank, std::move(intercept)), real_(std::move(path)) {}

  void reset(const std::optional<fs::path>& checkpoint_id) override { real_.reset(checkpoint_id); }
  ckpt::dcp::CheckpointMetadata read_metadata() override {
    enter("read_metadata");
    fail_rank("fail_read_metadata");
    return real_.read_metadata();
  }
  void set_up_storage_reader(const ckpt::dcp::CheckpointMetadata& metadata, bool is_coordinator) override {
    enter("set_up_storage_reader");
    fail_rank("fail_set_up_storage_reader");
    real_.set_up_storage_reader(metadata, is_coordinator);
  }
  ckpt::dcp::LoadPlan prepare_local_plan(ckpt::dcp::LoadPlan plan) override {
    enter("prepare_local_plan");
    fail_rank("fail_prepare_local_plan");
    return real_.prepare_local_plan(std::move(plan));
  }
  std::vector<ckpt::dcp::LoadPlan> prepare_global_plan(std::vector<ckpt::dcp::LoadPlan> plans) override {
    enter("prepare_global_plan");
    fail_rank("fail_prepare_global_plan");
    return real_.prepare_global_plan(std::move(plans));
  }
  std::future<void> read_data(const ckpt::dcp::LoadPlan& plan, ckpt::dcp::LoadPlanner& planner) override {
    enter("read_data");
    fail_rank("fail_read_data");
    if (auto failed = fail_rank_async<void>("fail_read_data_async")) return std::move(*failed);
    auto done = real_.read_data(plan, planner);
    done.wait();
    enter("read_data done");
    return done;
  }
  bool validate_checkpoint_id(const fs::path& checkpoint_id) const override {
    return real_.validate_checkpoint_id(checkpoint_id);
  }

 private:
  ckpt::dcp::FileSystemReader real_;
};

// --- outcomes -----------------------------------------------------------------------

std::string one_line(std::string text) {
  for (std::size_t at; (at = text.find('\n')) != std::string::npos;) text.replace(at, 1, " | ");
  return text;
}

bool starts_with(const std::string& text, const std::string& prefix) {
  return text.compare(0, prefix.size(), prefix) == 0;
}

std::string describe(const std::map<std::int64_t, ckpt::RankFailure>& failures) {
  std::vector<std::int64_t> ranks;
  std::string text;
  for (const auto& [rank, f] : failures) {
    ranks.push_back(rank);
    text += fmt::format("{}{}:{}={}", text.empty() ? "" : ";", rank, f.type, one_line(f.message));
  }
  return fmt::format("CheckpointException ranks=[{}] failures={{{}}}", fmt::join(ranks, ","), text);
}

/// What `body` did, as one line: "ok", the CheckpointException's failures, or
/// another error's type and text.
std::string outcome_of(const std::function<void()>& body) {
  try {
    body();
    return "ok";
  } catch (const ckpt::CheckpointException& e) {
    std::printf("DETAIL %s\n", one_line(e.what()).c_str());  // for a reader of the log
    return describe(e.failures());
  } catch (...) {
    const auto f = ckpt::describe_failure(std::current_exception());
    return fmt::format("{} msg={}", f.type, one_line(f.message));
  }
}

// --- a rank -------------------------------------------------------------------------

class Rank {
 public:
  /// `join`: joins the default group with the launcher's variables; else
  /// this process is alone (rank 0 of 1, no group).
  Rank(std::string scenario, fs::path dir, std::chrono::seconds timeout, bool join)
      : scenario_(std::move(scenario)), dir_(std::move(dir)) {
    if (join) {
      ckpt::dist::InitOptions options;
      options.timeout = timeout;
      pg_ = ckpt::dist::init_process_group(options);
      rank_ = pg_->rank_info.global_rank;
      world_ = pg_->rank_info.global_world_size;
    }
  }

  std::int64_t rank() const { return rank_; }
  std::int64_t world() const { return world_; }
  const fs::path& dir() const { return dir_; }
  /// The group's store (only with a group).
  c10d::Store& store() const { return *pg_->store; }
  /// The group (only with one).
  c10d::ProcessGroup& group() const { return *pg_->group; }
  bool all_expected() const { return all_expected_; }

  /// Prints `RESULT label outcome` and records whether it was expected.
  void report(const std::string& label, const std::string& outcome, bool expected) {
    std::printf("RESULT %s %s\n", label.c_str(), outcome.c_str());
    if (!expected) std::printf("UNEXPECTED %s\n", label.c_str());
    std::fflush(stdout);
    all_expected_ = all_expected_ && expected;
  }
  void expect(const std::string& label, const std::string& outcome, const std::string& wanted) {
    report(label, outcome, outcome == wanted);
  }

  /// Returns once `n` ranks called meet(name, n) (through the group's store).
  void meet(const std::string& name, std::int64_t n) {
    if (!pg_) return;
    const std::string key = scenario_ + "/meet/" + name;
    if (pg_->store->add(key + "/count", 1) == n) pg_->store->set(key + "/all", {'1'});
    pg_->store->wait({key + "/all"}, kBound);
  }

  /// The last step: rank 0 hosts the group's store, so it waits until every
  /// other rank of `participants` is done with it.
  void leave(std::int64_t participants) {
    if (!pg_) return;
    const std::string key = scenario_ + "/left";
    if (rank_ == 0) {
      if (participants > 1) pg_->store->wait({key + "/all"}, kBound);
    } else if (pg_->store->add(key, 1) == participants - 1) {
      pg_->store->set(key + "/all", {'1'});
    }
  }

 private:
  std::string scenario_;
  fs::path dir_;
  std::shared_ptr<ckpt::dist::ProcessGroupHandle> pg_;
  std::int64_t rank_ = 0;
  std::int64_t world_ = 1;
  bool all_expected_ = true;
};

// --- 1. the fault tables (TestDistributedFailure) ---------------------------------

/// What every rank must report for a failing case whose type is checked.
std::string expected_failure(const Case& c) {
  const bool async = c.key.size() > 6 && c.key.compare(c.key.size() - 6, 6, "_async") == 0;
  std::map<std::int64_t, ckpt::RankFailure> failures;
  for (auto r : c.ranks)
    failures[r] = {"std::invalid_argument",
                   fmt::format("{}rank fail {} for {}", async ? "async " : "", r, c.key)};
  return describe(failures);
}

/// Upstream's _test_dist_failure: no fault, no exception; else a
/// CheckpointException whose failures are exactly the bad ranks, each a
/// ValueError (std::invalid_argument) unless the type is ignored.
bool as_upstream_expects(const Case& c, const std::string& outcome) {
  if (c.ranks.empty()) return outcome == "ok";
  if (c.ignore_exception_type)
    return starts_with(outcome, fmt::format("CheckpointException ranks=[{}] ", fmt::join(c.ranks, ",")));
  return outcome == expected_failure(c);
}

FailConf fail_conf_of(const Case& c) {
  if (c.key.empty()) return {};
  return {{c.key, c.ranks}};
}

/// Upstream's TestDistributedFailure state dict (random values).
DcpStateDict random_state_dict(const Rank& r) {
  return {{"sharded", ShardedTensor::rand(spec_over(r.world()), {20, 20}, r.rank())},
          {"replicated", at::rand({10, 10})},
          {"bytes", bytes_value()}};
}
/// The no-dist tests' state dict.
DcpStateDict random_no_dist_state_dict() {
  return {{"replicated", at::rand({10, 10})}, {"bytes", bytes_value()}};
}

/// The state dict of the dummy checkpoint: deterministic values.
DcpStateDict known_state_dict(const Rank& r) {
  return {{"sharded", sharded_from(sharded_value(), spec_over(r.world()), r.rank())},
          {"replicated", replicated_value()},
          {"bytes", bytes_value()}};
}
/// A load target for it: zeros, and a list that is not [1, 2, 3, 4].
DcpStateDict zero_state_dict(const Rank& r, bool with_sharded) {
  DcpStateDict sd;
  if (with_sharded)
    sd.emplace_back("sharded", ShardedTensor::zeros(spec_over(r.world()), {20, 20}, r.rank()));
  sd.emplace_back("replicated", at::zeros({10, 10}));
  sd.emplace_back("bytes", int_list({0}));
  return sd;
}

/// After a load of the dummy checkpoint: every value as saved.
void check_loaded_known_values(Rank& r, const std::string& label, const DcpStateDict& sd, bool with_sharded) {
  std::map<std::string, at::Tensor> globals{{"replicated", replicated_value()}};
  if (with_sharded) globals.emplace("sharded", sharded_value());
  std::string values = compare_with(sd, globals);
  const auto* bytes = ivalue_at(sd, "bytes");
  if (!bytes || !is_bytes_value(*bytes)) values += values == "as-saved" ? " DIFFERENT:bytes" : ",bytes";
  r.report(label + "/values", values, values == "as-saved");
}

void run_save_case(Rank& r, const std::string& table, const Case& c, const DcpStateDict& sd, bool no_dist) {
  const auto label = label_of(table, c);
  const auto path = r.dir() / label;
  const std::int64_t rank = no_dist ? 0 : r.rank();
  FaultyStorageWriter writer(path, fail_conf_of(c), rank);
  const auto outcome = outcome_of([&] { save_flat(sd, writer, c.coordinator, no_dist); });
  r.report(label, outcome, as_upstream_expects(c, outcome));
  const bool committed = fs::exists(path / ckpt::dcp::kMetadataFileName);
  r.report(label + "/committed", committed ? "yes" : "no", committed == c.ranks.empty());
}

void run_load_case(Rank& r, const std::string& table, const Case& c, const fs::path& checkpoint,
                   bool no_dist) {
  const auto label = label_of(table, c);
  const std::int64_t rank = no_dist ? 0 : r.rank();
  // Upstream loads into its random state dict; a case without faults loads
  // into zeros, to see the saved values arrive.
  auto sd = c.ranks.empty() ? zero_state_dict(r, !no_dist)
                            : (no_dist ? random_no_dist_state_dict() : random_state_dict(r));
  FaultyStorageReader reader(checkpoint, fail_conf_of(c), rank);
  const auto outcome =
      outcome_of([&] { ckpt::dcp::load_state_dict(sd, reader, nullptr, nullptr, c.coordinator, no_dist); });
  r.report(label, outcome, as_upstream_expects(c, outcome));
  if (c.ranks.empty()) check_loaded_known_values(r, label, sd, !no_dist);
}

/// test_dummy_writer_works, test_dummy_reader_works: a save and a load of
/// known values through the faulty layers without faults.
void dummy_round_trip(Rank& r, bool no_dist) {
  const auto path = r.dir() / "dummy";
  const auto saved = no_dist ? DcpStateDict{{"replicated", replicated_value()}, {"bytes", bytes_value()}}
                             : known_state_dict(r);
  {
    FaultyStorageWriter writer(path, {}, r.rank());
    r.expect("test_dummy_writer_works", outcome_of([&] { save_flat(saved, writer, 0, no_dist); }), "ok");
    const bool committed = fs::exists(path / ckpt::dcp::kMetadataFileName);
    r.report("test_dummy_writer_works/committed", committed ? "yes" : "no", committed);
  }
  auto sd = zero_state_dict(r, !no_dist);
  FaultyStorageReader reader(path, {}, r.rank());
  r.expect("test_dummy_reader_works",
           outcome_of([&] { ckpt::dcp::load_state_dict(sd, reader, nullptr, nullptr, 0, no_dist); }), "ok");
  check_loaded_known_values(r, "test_dummy_reader_works", sd, !no_dist);
}

void no_dist_tables(Rank& r) {
  const auto dummy = r.dir() / "dummy";
  for (const auto& c : kSaveNoDistCases)
    run_save_case(r, "test_save_error_handling_no_dist", c, random_no_dist_state_dict(), true);
  for (const auto& c : kLoadNoDistCases) run_load_case(r, "test_load_error_handling_no_dist", c, dummy, true);
}

// faults: 4 ranks, one process group, every case in turn.
void faults(Rank& r) {
  dummy_round_trip(r, false);
  for (const auto& c : kSaveCases)
    run_save_case(r, "test_save_error_handling", c, random_state_dict(r), false);
  for (const auto& c : kLoadCases) run_load_case(r, "test_load_error_handling", c, r.dir() / "dummy", false);
  // The no-dist tables on rank 0 alone (no_dist = true, the group left aside).
  if (r.rank() == 0) no_dist_tables(r);
  r.meet("no-dist-done", r.world());
  r.leave(r.world());
}

// faults_alone: one process without a process group (upstream's
// test_*_no_dist, where dist is not initialized).
void faults_alone(Rank& r) {
  dummy_round_trip(r, true);
  no_dist_tables(r);
  // Beyond upstream: no group, no_dist left false, WORLD_SIZE unset: the save
  // and the load run alone all the same.
  const auto path = r.dir() / "implicit_no_dist";
  const DcpStateDict saved{{"replicated", replicated_value()}, {"bytes", bytes_value()}};
  ckpt::dcp::FileSystemWriter writer(path);
  r.expect("implicit_no_dist/save", outcome_of([&] { ckpt::dcp::save_state_dict(saved, writer); }), "ok");
  auto sd = zero_state_dict(r, false);
  ckpt::dcp::FileSystemReader reader(path);
  r.expect("implicit_no_dist/load", outcome_of([&] { ckpt::dcp::load_state_dict(sd, reader); }), "ok");
  check_loaded_known_values(r, "implicit_no_dist", sd, false);
}

// --- 2. dead and hung ranks ------------------------------------------------------

struct Missing {
  std::int64_t victim;
  std::string call;  ///< the storage call it dies or hangs in
  bool dies;         ///< leaves the process; else blocks until the others timed out
  std::int64_t coordinator;
  bool load;  ///< in a load (of a checkpoint saved first); else in a save
  /// A healthy rank that is still in the same call when the victim dies: it
  /// goes on only once the victim's process is gone (-1: none).
  std::int64_t slow = -1;
};

/// A DefaultLoadPlanner that calls `intercept("share")` at each commit once
/// its rank's own reads are done: in the share step of a load whose
/// replicated reads are shared, as the rank takes in what it received.
class SharePlanner : public ckpt::dcp::DefaultLoadPlanner {
 public:
  explicit SharePlanner(Interceptor intercept) : intercept_(std::move(intercept)) {}
  void commit_tensor(const ckpt::dcp::ReadItem& item, const at::Tensor& tensor) override {
    if (read_done) intercept_("share");
    DefaultLoadPlanner::commit_tensor(item, tensor);
  }
  bool read_done = false;

 private:
  Interceptor intercept_;
};

/// Returns once the process `pid` has exited (at most kBound).
void wait_for_exit(pid_t pid) {
  // Through syscall(): glibc 2.36's <sys/pidfd.h> lacks C linkage for C++.
  const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) {
    if (errno == ESRCH) return;  // gone already
    throw std::runtime_error(fmt::format("pidfd_open({}): {}", pid, std::strerror(errno)));
  }
  pollfd p{fd, POLLIN, 0};
  const int n = ::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(kBound).count()));
  ::close(fd);
  if (n != 1) throw std::runtime_error(fmt::format("process {} did not exit", pid));
}

// Every other rank raises a CheckpointException naming the victim alone, as a
// Timeout; the victim, when it only hung, is let go once they have, and its
// own call fails too (the others are gone). Nothing is committed.
void missing_rank(Rank& r, const Missing& m) {
  const auto path = r.dir() / "ckpt";
  const auto sd = known_state_dict(r);
  if (m.load) {
    ckpt::dcp::FileSystemWriter writer(path);
    r.expect("save", outcome_of([&] { ckpt::dcp::save_state_dict(sd, writer); }), "ok");
  }
  const std::string victim_pid = "victim-pid";
  std::unique_ptr<SharePlanner> share_planner;
  const Interceptor intercept = [&](const std::string& call) {
    if (call == "read_data done" && share_planner) share_planner->read_done = true;
    if (call != m.call) return;
    if (r.rank() == m.slow) {
      // Still in the call when the victim dies (well within the timeout).
      r.store().wait({victim_pid}, kBound);
      const auto pid = r.store().get(victim_pid);
      wait_for_exit(static_cast<pid_t>(std::stol(std::string(pid.begin(), pid.end()))));
      r.report("slow", "went on after the victim died", true);
      return;
    }
    if (r.rank() != m.victim) return;
    if (m.dies) {
      const auto pid = std::to_string(::getpid());
      r.store().set(victim_pid, std::vector<std::uint8_t>(pid.begin(), pid.end()));
      r.report("victim", "dies in " + call, true);
      std::fflush(stdout);
      std::fflush(stderr);
      std::_Exit(0);  // exits 0: the launcher lets the other ranks finish
    }
    r.report("victim", "hangs in " + call, true);
    r.meet("timed-out", r.world());
  };
  // Every rank starts the call together: only the victim can run the
  // (short) timeout out, however busy the machine is.
  r.meet("ready", r.world());
  const auto outcome = outcome_of([&] {
    if (m.load) {
      auto target = zero_state_dict(r, true);
      FaultyStorageReader reader(path, {}, r.rank(), intercept);
      if (m.call == "share") {
        // Rank 0 reads the replicated tensor (every rank has as much to
        // read: the lowest), and it goes 0 → 1, 0 → 2, 1 → 3.
        share_planner = std::make_unique<SharePlanner>(intercept);
        ckpt::dcp::load_state_dict(target, reader, share_planner.get(), nullptr, m.coordinator, false,
                                   std::nullopt, ckpt::dcp::ReplicatedReads::once);
      } else {
        ckpt::dcp::load_state_dict(target, reader, nullptr, nullptr, m.coordinator);
      }
    } else {
      FaultyStorageWriter writer(path, {}, r.rank(), intercept);
      save_flat(sd, writer, m.coordinator);
    }
  });
  if (r.rank() == m.victim) {
    // Came late: the others have given up, so its call cannot succeed.
    r.report("late", outcome, starts_with(outcome, "CheckpointException "));
  } else {
    r.report("outcome", outcome,
             starts_with(outcome, fmt::format("CheckpointException ranks=[{}] failures={{{}:Timeout=",
                                              m.victim, m.victim)));
    if (!m.dies) r.meet("timed-out", r.world());
  }
  if (!m.load) {
    const bool committed = fs::exists(path / ckpt::dcp::kMetadataFileName);
    r.report("committed", committed ? "yes" : "no", !committed);
  }
  r.leave(m.dies ? r.world() - 1 : r.world());
}

// --- 3. resharding ------------------------------------------------------------------

// reshard_save: 4 ranks write DIR/reshard.
void reshard_save(Rank& r) {
  const DcpStateDict sd{{"rows", sharded_from(rows_value(), spec_over(r.world(), 0), r.rank())},
                        {"uneven", sharded_from(uneven_value(), spec_over(r.world(), 0), r.rank())},
                        {"replicated", reshard_replicated_value()}};
  ckpt::dcp::FileSystemWriter writer(r.dir() / "reshard");
  r.expect("reshard_save", outcome_of([&] { ckpt::dcp::save_state_dict(sd, writer); }), "ok");
  r.leave(r.world());
}

void load_and_check(Rank& r, const std::string& label, DcpStateDict sd) {
  const auto path = r.dir() / "reshard";
  // No gaps read to join ranges, no reads widened to checked blocks: exactly
  // the bytes asked for.
  ckpt::dcp::FileSystemReader reader(path, {.coalesce_gap = 0, .verify_blocks = false});
  r.expect(label, outcome_of([&] { ckpt::dcp::load_state_dict(sd, reader); }), "ok");
  const auto values = compare_with(sd, reshard_globals());
  r.report(label + "/values", values, values == "as-saved");
  // The coordinator (rank 0) alone reads the metadata; the others get the
  // part they load from it.
  const auto expected = expected_bytes_read(path, sd, r.rank() == 0);
  r.report(label + "/bytes_read", fmt::format("got={} expected={}", reader.bytes_read(), expected),
           reader.bytes_read() == expected);
}

// reshard_load: M ranks load DIR/reshard (saved by 4) with their own sharding.
void reshard_load(Rank& r) {
  const auto n = r.world();
  load_and_check(r, "by_rows",
                 {{"rows", ShardedTensor::zeros(spec_over(n, 0), {20, 6}, r.rank(), at::kFloat)},
                  {"uneven", ShardedTensor::zeros(spec_over(n, 0), {10, 3}, r.rank(), at::kDouble)},
                  {"replicated", at::zeros({7, 5}, at::kFloat)}});
  // Sharded by columns: every saved chunk is read in strided runs.
  load_and_check(r, "by_columns",
                 {{"rows", ShardedTensor::zeros(spec_over(n, 1), {20, 6}, r.rank(), at::kFloat)},
                  {"uneven", ShardedTensor::zeros(spec_over(n, 1), {10, 3}, r.rank(), at::kDouble)}});
  r.leave(r.world());
}

// --- 3b. replicated reads shared ------------------------------------------------------

/// Sums over the group, element by element.
std::vector<double> summed(Rank& r, const std::vector<double>& values) {
  std::vector<at::Tensor> t{at::tensor(values, at::kDouble)};
  r.group().allreduce(t)->wait(kBound);
  return {t[0].data_ptr<double>(), t[0].data_ptr<double>() + t[0].numel()};
}

/// Every rank loads the whole of "rows" (four saved chunks) and of
/// "replicated" from DIR/reshard with `mode`, as two hosts of two ranks
/// (GROUP_RANK = rank / 2). Reported: the
/// values, and the bytes each host read from storage (the coordinator's
/// include the metadata) against what `mode` reads: each saved item once per
/// rank, once per host, or once in all.
void shared_load(Rank& r, const std::string& label, ckpt::dcp::ReplicatedReads mode) {
  using ckpt::dcp::ReplicatedReads;
  const auto path = r.dir() / "reshard";
  const std::int64_t host = r.rank() / 2;
  ::setenv("GROUP_RANK", std::to_string(host).c_str(), 1);
  // Transposed views (not contiguous) on rank 0, which reads "replicated"
  // in every mode, and rank 3, which receives it in every sharing mode.
  at::Tensor replicated =
      r.rank() == 0 || r.rank() == 3 ? at::zeros({5, 7}, at::kFloat).t() : at::zeros({7, 5}, at::kFloat);
  DcpStateDict sd{{"rows", at::zeros({20, 6}, at::kFloat)}, {"replicated", replicated}};
  // Exactly the bytes asked for: no gaps joined, no blocks widened.
  ckpt::dcp::FileSystemReader reader(path, {.coalesce_gap = 0, .verify_blocks = false});
  r.expect(label, outcome_of([&] {
             ckpt::dcp::load_state_dict(sd, reader, nullptr, nullptr, 0, false, std::nullopt, mode);
           }),
           "ok");
  const bool same = identical(std::get<at::Tensor>(sd[0].second), rows_value()) &&
                    identical(replicated, reshard_replicated_value());
  r.report(label + "/values", same ? "as-saved" : "DIFFERENT", same);

  // One rank's data: every saved chunk of both keys, whole.
  const DcpStateDict whole{{"rows", rows_value()}, {"replicated", reshard_replicated_value()}};
  const auto data = static_cast<double>(expected_bytes_read(path, whole, false));
  const auto metadata = static_cast<double>(fs::file_size(path / ckpt::dcp::kMetadataFileName));
  const auto read = static_cast<double>(reader.bytes_read());
  const auto got = summed(r, {host == 0 ? read : 0.0, host == 1 ? read : 0.0});
  const double copies = mode == ReplicatedReads::every_rank      ? 2
                        : mode == ReplicatedReads::once_per_host ? 1
                                                                 : 0;
  std::vector<double> expected{copies * data + metadata, copies * data};
  if (mode == ReplicatedReads::once) expected = {data + metadata, 0};  // the total: whichever host read it
  const bool right = mode == ReplicatedReads::once ? got[0] + got[1] == expected[0] : got == expected;
  r.report(label + "/host_bytes",
           fmt::format("got={:.0f},{:.0f} expected={:.0f},{:.0f}", got[0], got[1], expected[0], expected[1]),
           right);
  // Shared reads are spread over the ranks that load them: none reads all.
  std::vector<at::Tensor> most{at::tensor({read - (r.rank() == 0 ? metadata : 0.0)}, at::kDouble)};
  c10d::AllreduceOptions max;
  max.reduceOp = c10d::ReduceOp::MAX;
  r.group().allreduce(most, max)->wait(kBound);
  const double top = most[0].item<double>();
  r.report(label + "/most_by_one_rank", fmt::format("got={:.0f} of={:.0f}", top, data),
           mode == ReplicatedReads::every_rank ? top == data : top < data);
}

/// A DefaultLoadPlanner that, when `bad`, resolves float64 tensors for what
/// it commits after its rank's own reads (what it receives in the share step).
class BadSharePlanner : public ckpt::dcp::DefaultLoadPlanner {
 public:
  explicit BadSharePlanner(bool bad) : bad_(bad) {}
  at::Tensor resolve_tensor(const ckpt::dcp::ReadItem& item) override {
    if (bad_ && read_done) return at::zeros(item.lengths, at::kDouble);
    return DefaultLoadPlanner::resolve_tensor(item);
  }
  bool read_done = false;

 private:
  bool bad_;
};

// shared_reads: 4 ranks load DIR/reshard (saved by 4) with each ReplicatedReads
// mode; then a reader whose read fails, a receiver whose planner fails in the
// share step, and the load after them (on the same group).
void shared_reads(Rank& r) {
  using ckpt::dcp::ReplicatedReads;
  shared_load(r, "every_rank", ReplicatedReads::every_rank);
  shared_load(r, "once_per_host", ReplicatedReads::once_per_host);
  shared_load(r, "once", ReplicatedReads::once);
  {
    // Rank 2 reads some of the shared items (they are spread over all four)
    // and fails: no rank waits for them, every rank names rank 2.
    DcpStateDict sd{{"rows", at::zeros({20, 6}, at::kFloat)}, {"replicated", at::zeros({7, 5}, at::kFloat)}};
    FaultyStorageReader reader(r.dir() / "reshard", {{"fail_read_data", {2}}}, r.rank());
    const auto outcome = outcome_of([&] {
      ckpt::dcp::load_state_dict(sd, reader, nullptr, nullptr, 0, false, std::nullopt, ReplicatedReads::once);
    });
    r.report("reader_fails", outcome,
             starts_with(outcome,
                         "CheckpointException ranks=[2] failures={2:std::invalid_argument=rank fail 2 for "
                         "fail_read_data}"));
  }
  {
    // Rank 3's planner resolves a float64 tensor for what it receives (the
    // share step, after its own reads): it fails with Mismatch, alone, and
    // the walk still ends on every rank, so the group stays usable.
    DcpStateDict sd{{"rows", at::zeros({20, 6}, at::kFloat)}, {"replicated", at::zeros({7, 5}, at::kFloat)}};
    BadSharePlanner planner(r.rank() == 3);
    FaultyStorageReader reader(r.dir() / "reshard", {}, r.rank(), [&](const std::string& call) {
      if (call == "read_data done") planner.read_done = true;
    });
    const auto outcome = outcome_of([&] {
      ckpt::dcp::load_state_dict(sd, reader, &planner, nullptr, 0, false, std::nullopt,
                                 ReplicatedReads::once);
    });
    r.report("receiver_mismatch", outcome,
             starts_with(outcome, "CheckpointException ranks=[3] failures={3:Mismatch=resolve_tensor for '"));
  }
  shared_load(r, "after_a_failure", ReplicatedReads::once);
  r.leave(r.world());
}

// --- 4. partial loads -----------------------------------------------------------

// missing_key: a checkpoint of "a" only, loaded into a state dict that also
// has "b" (a tensor) and "c" (a sharded tensor).
void missing_key(Rank& r) {
  const auto path = r.dir() / "partial";
  const auto a = at::arange(12, at::kFloat).reshape({3, 4});
  {
    ckpt::dcp::FileSystemWriter writer(path);
    r.expect("save", outcome_of([&] { ckpt::dcp::save_state_dict({{"a", a}}, writer); }), "ok");
  }
  const auto target = [&] {
    return DcpStateDict{{"a", at::zeros({3, 4})},
                        {"b", at::full({2}, 7.0)},
                        {"c", ShardedTensor::full(spec_over(r.world()), {8, 2}, r.rank(), 3.0)}};
  };
  {
    auto sd = target();
    ckpt::dcp::FileSystemReader reader(path);
    std::optional<std::map<std::int64_t, ckpt::RankFailure>> failures;
    const auto outcome = outcome_of([&] {
      try {
        ckpt::dcp::load_state_dict(sd, reader);
      } catch (const ckpt::CheckpointException& e) {
        failures = e.failures();
        throw;
      }
    });
    bool expected = failures && failures->size() == static_cast<std::size_t>(r.world());
    if (failures)
      for (const auto& [rank, f] : *failures) expected = expected && f.type == "MissingKeys";
    r.report("strict", outcome, expected);
  }
  {
    auto sd = target();
    ckpt::dcp::FileSystemReader reader(path);
    ckpt::dcp::DefaultLoadPlanner planner(/*allow_partial_load=*/true);
    r.expect("partial", outcome_of([&] { ckpt::dcp::load_state_dict(sd, reader, &planner); }), "ok");
    // "a" as saved, "b" and "c" as they were.
    const auto values = compare_with(sd, {{"a", a}, {"b", at::full({2}, 7.0)}, {"c", at::full({8, 2}, 3.0)}});
    r.report("partial/values", values, values == "as-saved");
  }
  r.leave(r.world());
}

// --- 5. a step longer than the group's Gloo timeout ------------------------------------

// slow_write (4 ranks, launched with a 5 s group timeout): rank 1 takes 7 s to
// write, longer than the group's Gloo timeout; the save's own timeout (120 s)
// is what bounds how long the others wait, so the save commits.
void slow_write(Rank& r) {
  struct SlowWriter : ckpt::dcp::FileSystemWriter {
    using FileSystemWriter::FileSystemWriter;
    std::int64_t rank = 0;
    std::future<std::vector<ckpt::dcp::WriteResult>> write_data(const ckpt::dcp::SavePlan& plan,
                                                                ckpt::dcp::SavePlanner& planner) override {
      if (rank == 1) ::poll(nullptr, 0, 7000);  // a slow write, not a synchronisation
      return FileSystemWriter::write_data(plan, planner);
    }
  } writer(r.dir() / "slow");
  writer.rank = r.rank();
  const DcpStateDict sd{{"t", ShardedTensor::full(spec_over(r.world()), {8, 2}, r.rank(), 3.0)}};
  r.expect("save", outcome_of([&] {
             ckpt::dcp::save_state_dict(sd, writer, nullptr, nullptr, 0, false, std::chrono::seconds(120));
           }),
           "ok");
  r.expect("committed", fs::exists(r.dir() / "slow" / ckpt::dcp::kMetadataFileName) ? "yes" : "no", "yes");
  r.leave(r.world());
}

// --- 6. metadata ------------------------------------------------------------------

// metadata (2 ranks): upstream's TestDistributedCheckpointing cases, each rank
// computing its own view (upstream computes the metadata locally too).
void metadata(Rank& r) {
  {
    const auto st = ShardedTensor::zeros(ChunkShardingSpec{0, {"rank:1/cpu"}}, {4, 4}, r.rank(), at::kDouble);
    const auto md = ckpt::dcp::create_default_local_metadata({{"st", st}});
    const auto* t = std::get_if<TensorStorageMetadata>(&md.state_dict_metadata.at("st"));
    const bool ok = t && t->chunks.size() == 1 && t->properties.dtype == at::kDouble &&
                    st.local_shards().size() == (r.rank() == 1 ? 1u : 0u);
    r.expect("test_tensor_metadata_with_missing_rank_spec", ok ? "ok" : "mismatch", "ok");
  }
  {
    const auto st = ShardedTensor::rand(spec_over(r.world()), {10, 10}, r.rank());
    const DcpStateDict sd{{"sharded", st},
                          {"replicated", at::rand({4})},
                          {"bytes", c10::IValue(std::vector<std::int64_t>{1, 2, 3, 4})}};
    const auto md = ckpt::dcp::create_default_local_metadata(sd);
    const auto& keys = md.state_dict_metadata;
    const auto* replicated = std::get_if<TensorStorageMetadata>(&keys.at("replicated"));
    const auto* sharded = std::get_if<TensorStorageMetadata>(&keys.at("sharded"));
    const bool ok = std::holds_alternative<ckpt::dcp::BytesStorageMetadata>(keys.at("bytes")) && replicated &&
                    replicated->properties.dtype == at::kFloat &&
                    replicated->size == std::vector<std::int64_t>{4} && replicated->chunks.size() == 1 &&
                    sharded && sharded->properties.dtype == at::kFloat &&
                    sharded->size == std::vector<std::int64_t>{10, 10} && sharded->chunks.size() == 2;
    r.expect("test_default_metadata", ok ? "ok" : "mismatch", "ok");
  }
  r.leave(r.world());
}

// --- 5. what Python loads ---------------------------------------------------------

// nested_save: the nested state dict of python_bound.hpp saved with dcp::save
// by every rank into DIR/nested (rows and columns sharded over the ranks);
// rank 0 also writes DIR/nested.pt, the same values whole, for Python.
void nested_save(Rank& r) {
  const auto sd = ckpt::test::python_bound_state(r.rank(), r.world(), false);
  ckpt::dcp::SaveOptions options;
  options.checkpoint_id = r.dir() / "nested";
  r.expect("nested_save", outcome_of([&] { ckpt::dcp::save(sd, options); }), "ok");
  if (r.rank() == 0)
    ckpt::write_file(r.dir() / "nested.pt", ckpt::test::python_bound_state(0, 1, true).to_ivalue());
  r.leave(r.world());
}

// --- 6. Hugging Face safetensors storage ---------------------------------------------

/// What the hf_* scenarios save, as rank `rank` of `n` holds it: rows and
/// uneven sharded along `dim`, replicated whole (zeros when `zero`).
DcpStateDict hf_state(std::int64_t rank, std::int64_t n, std::int64_t dim, bool zero) {
  const auto value = [&](const at::Tensor& global) { return zero ? at::zeros_like(global) : global; };
  return {{"rows", sharded_from(value(rows_value()), spec_over(n, dim), rank)},
          {"uneven", sharded_from(value(uneven_value()), spec_over(n, dim), rank)},
          {"replicated", value(reshard_replicated_value())}};
}

// hf_save: every rank saves hf_state through HuggingFaceStorageWriter into
// DIR/hf (shards in DIR/hf/sharded, consolidated into two files: rows in the
// first, the others in the second) and into DIR/hf_sharded (shards only);
// a save of whole tensors only is refused on every rank, the coordinator
// named. Rank 0 also writes DIR/hf.pt, the global values, for Python.
void hf_save(Rank& r) {
  const auto sd = hf_state(r.rank(), r.world(), 0, false);
  ckpt::dcp::HuggingFaceStorageWriterOptions consolidated;
  consolidated.fqn_to_index_mapping = {{"rows", 1}, {"uneven", 2}, {"replicated", 2}};
  consolidated.save_distributed = true;
  consolidated.enable_consolidation = true;
  ckpt::dcp::HuggingFaceStorageWriter writer(r.dir() / "hf", consolidated);
  r.expect("hf_save/consolidated", outcome_of([&] { ckpt::dcp::save_state_dict(sd, writer); }), "ok");
  ckpt::dcp::HuggingFaceStorageWriter sharded(r.dir() / "hf_sharded", {.save_distributed = true});
  r.expect("hf_save/sharded", outcome_of([&] { ckpt::dcp::save_state_dict(sd, sharded); }), "ok");
  ckpt::dcp::HuggingFaceStorageWriter whole(r.dir() / "hf_whole");
  const auto refused = outcome_of([&] { ckpt::dcp::save_state_dict(sd, whole); });
  r.report("hf_save/whole_refused", refused,
           starts_with(refused, "CheckpointException ranks=[0] failures={0:Error=") &&
               refused.find("save_distributed") != std::string::npos);
  if (r.rank() == 0) {
    ckpt::StateDict globals;
    for (const auto& [k, v] : reshard_globals()) globals.insert(k, v);
    ckpt::write_file(r.dir() / "hf.pt", globals.to_ivalue());
  }
  r.leave(r.world());
}

// hf_load: M ranks load each form hf_save wrote (the consolidated files, the
// shards they came from, the shards alone), sharded by rows and by columns,
// and everything whole through dcp::load_all (which finds the format itself).
void hf_load(Rank& r) {
  for (const std::string form : {"hf", "hf/sharded", "hf_sharded"})
    for (const std::int64_t dim : {0, 1}) {
      const std::string label = fmt::format("{}/dim{}", form, dim);
      auto sd = hf_state(r.rank(), r.world(), dim, true);
      ckpt::dcp::HuggingFaceStorageReader reader(r.dir() / form);
      r.expect(label, outcome_of([&] { ckpt::dcp::load_state_dict(sd, reader); }), "ok");
      const auto values = compare_with(sd, reshard_globals());
      r.report(label + "/values", values, values == "as-saved");
    }
  ckpt::StateDict all;
  r.expect("hf/load_all", outcome_of([&] { all = ckpt::dcp::load_all(r.dir() / "hf"); }), "ok");
  bool same = all.size() == reshard_globals().size();
  for (const auto& [k, v] : reshard_globals())
    same = same && all.contains(k) && identical(all.at(k).toTensor(), v);
  r.report("hf/load_all/values", same ? "as-saved" : "different", same);
  r.leave(r.world());
}

// plan_cache: every rank saves into DIR/cached with its own caching planner
// (enable_plan_caching): two saves of one layout with new values, one where
// rank 2 holds a key more, then two more of that layout after rank 0 (the
// coordinator) took a fresh planner, as a restarted coordinator would. After
// each save every rank loads it back and checks the values of that save;
// rank 0 reports how many global plans each of its planners made: 2 (the
// first save, and the one whose layout changed) and 1 (the first save after
// its restart, for which the others send their plans again).
void plan_cache(Rank& r) {
  struct Counting : ckpt::dcp::DefaultSavePlanner {
    Counting() : DefaultSavePlanner(true, true) {}
    int merges = 0;
    std::pair<std::vector<ckpt::dcp::SavePlan>, ckpt::dcp::Metadata> create_global_plan(
        std::vector<ckpt::dcp::SavePlan> plans) override {
      ++merges;
      return DefaultSavePlanner::create_global_plan(std::move(plans));
    }
  };
  Counting planner;
  Counting restarted;  // rank 0's planner from the fourth save on: a coordinator without the cache
  Counting* active = &planner;
  const auto path = r.dir() / "cached";
  const auto state = [&](double v, bool more) {
    DcpStateDict sd{{"rows", ShardedTensor::full(spec_over(r.world(), 0), {8, 3}, r.rank(), v)},
                    {"replicated", at::full({5}, v)}};
    if (more && r.rank() == 2) sd.emplace_back("extra", at::full({2}, v));
    return sd;
  };
  const auto round = [&](const std::string& label, double v, bool more) {
    ckpt::dcp::FileSystemWriter writer(path);
    r.expect(label, outcome_of([&] { ckpt::dcp::save_state_dict(state(v, more), writer, active); }), "ok");
    DcpStateDict sd = state(0, more);
    ckpt::dcp::FileSystemReader reader(path);
    r.expect(label + "/load", outcome_of([&] { ckpt::dcp::load_state_dict(sd, reader); }), "ok");
    bool same = true;
    for (const auto& [key, value] : sd) {
      if (const auto* t = std::get_if<at::Tensor>(&value)) same = same && at::equal(*t, at::full_like(*t, v));
      if (const auto* st = std::get_if<ShardedTensor>(&value))
        for (const auto& shard : st->local_shards())
          same = same && at::equal(shard.tensor, at::full_like(shard.tensor, v));
    }
    r.report(label + "/values", same ? "as-saved" : "different", same);
  };
  round("save1", 1, false);
  round("save2", 2, false);
  round("save3", 3, true);
  // The coordinator restarts with an empty cache while the others keep
  // theirs: it asks them for their plans in full, once.
  if (r.rank() == 0) active = &restarted;
  round("save4", 4, true);
  round("save5", 5, true);
  if (r.rank() == 0) {
    r.report("global_plans_made", std::to_string(planner.merges), planner.merges == 2);
    r.report("global_plans_made_after_restart", std::to_string(restarted.merges), restarted.merges == 1);
  }
  r.leave(r.world());
}

// --- 7. the AsyncSaver's own -------------------------------------------------------

/// Watches a directory for a file to be created (inotify: no sleeping, no polling).
class CreatedWatch {
 public:
  explicit CreatedWatch(const fs::path& dir) : fd_(::inotify_init1(IN_CLOEXEC | IN_NONBLOCK)) {
    if (fd_ < 0 || ::inotify_add_watch(fd_, dir.c_str(), IN_CREATE) < 0)
      throw std::runtime_error(fmt::format("inotify on {}: {}", dir.string(), std::strerror(errno)));
  }
  ~CreatedWatch() { ::close(fd_); }
  CreatedWatch(const CreatedWatch&) = delete;
  CreatedWatch& operator=(const CreatedWatch&) = delete;
  /// Whether `name` was created there within `bound`.
  bool wait(const std::string& name, std::chrono::milliseconds bound) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    alignas(inotify_event) char buf[4096];
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd_, POLLIN, 0};
      const int ready = ::poll(&p, 1, static_cast<int>(left.count()));
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) return false;
      const ssize_t n = ::read(fd_, buf, sizeof buf);
      for (ssize_t at = 0; at < n;) {
        const auto* ev = reinterpret_cast<const inotify_event*>(buf + at);
        if (ev->len > 0 && name == ev->name) return true;
        at += static_cast<ssize_t>(sizeof(inotify_event) + ev->len);
      }
    }
  }

 private:
  int fd_;
};

// async_child_killed: 4 ranks save through their AsyncSavers; rank 2's writer
// child has the tests' fault injector, which holds its first write of a data
// file under DIR/second, and rank 2 kills it there (SIGKILL). Every rank raises
// the same CheckpointException, naming rank 2 alone (its child terminated);
// nothing is committed; the next save (a new child on rank 2) commits and
// loads back as saved.
void child_killed(Rank& r) {
  constexpr std::int64_t victim = 2;
  const auto first = r.dir() / "first", second = r.dir() / "second", watch_dir = r.dir() / "watch";
  const char* const fault_vars[] = {"LD_PRELOAD", "CKPT_FAULT", "CKPT_FAULT_IN", "CKPT_FAULT_UNDER",
                                    "CKPT_FAULT_REPORT"};
  if (r.rank() == victim) {
    fs::create_directories(watch_dir);
    const std::string values[] = {CKPT_FAULT_SHIM, "write:1:HOLD", "child", second.string(),
                                  (watch_dir / "held").string()};
    for (std::size_t i = 0; i < std::size(values); ++i) ::setenv(fault_vars[i], values[i].c_str(), 1);
  }
  auto& saver = async_saver();
  saver = std::make_unique<ckpt::dcp::AsyncSaver>(completions().get_executor());
  const auto sd = known_state_dict(r);
  {
    // A first save (elsewhere) once the child runs: its environment is set.
    ckpt::dcp::FileSystemWriter writer(first);
    r.expect("first_save", outcome_of([&] { save_flat(sd, writer); }), "ok");
  }
  if (r.rank() == victim)
    for (const char* v : fault_vars) ::unsetenv(v);

  std::optional<CreatedWatch> watch;
  if (r.rank() == victim) watch.emplace(watch_dir);
  {
    ckpt::dcp::FileSystemWriter writer(second);
    ckpt::dcp::SaveOptions options;
    options.storage_writer = &writer;
    auto futures = saver->save(nested(sd), options);
    const auto outcome = outcome_of([&] {
      if (futures.staged.wait_for(kBound) != std::future_status::ready)
        throw std::runtime_error("staging hung");
      futures.staged.get();
      if (r.rank() == victim) {
        const bool held = watch->wait("held", kBound);
        r.report("held", held ? "yes" : "no", held);
        const int child = saver->writer_pid();
        r.report("killed", child > 0 && ::kill(child, SIGKILL) == 0 ? "yes" : "no", true);
      }
      if (futures.written.wait_for(kBound) != std::future_status::ready)
        throw std::runtime_error("the write hung");
      futures.written.get();
    });
    r.report("killed_save", outcome,
             starts_with(outcome,
                         "CheckpointException ranks=[2] failures={2:WriterProcessError=Child process "
                         "terminated unexpectedly (killed by signal 9"));
  }
  const bool committed = fs::exists(second / ckpt::dcp::kMetadataFileName);
  r.report("killed_save/committed", committed ? "yes" : "no", !committed);
  {
    ckpt::dcp::FileSystemWriter writer(second);
    r.expect("next_save", outcome_of([&] { save_flat(sd, writer); }), "ok");
  }
  auto target = zero_state_dict(r, true);
  ckpt::dcp::FileSystemReader reader(second);
  r.expect("next_save/load", outcome_of([&] { ckpt::dcp::load_state_dict(target, reader); }), "ok");
  check_loaded_known_values(r, "next_save", target, true);
  saver.reset();
  r.leave(r.world());
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc != 3 && argc != 4) {
    std::fprintf(stderr, "usage: ckpt-launch -n N dcp_worker SCENARIO DIR [GROUP_TIMEOUT_S]\n");
    return 2;
  }
  const std::string scenario = argv[1];
  const auto timeout = argc == 4 ? std::chrono::seconds(std::stoi(argv[3])) : kBound;
  const auto missing = [](Missing m) { return [m](Rank& r) { missing_rank(r, m); }; };
  const std::map<std::string, std::function<void(Rank&)>> scenarios{
      {"faults", faults},
      {"faults_alone", faults_alone},
      {"rank_dies_in_write_data", missing({3, "write_data", true, 0, false, 1})},
      {"coordinator_dies_in_write_data", missing({2, "write_data", true, 2, false, 1})},
      {"coordinator_dies_in_finish", missing({1, "finish", true, 1, false})},
      {"rank_hangs_in_read_data", missing({3, "read_data", false, 0, true})},
      {"rank_dies_in_share", missing({1, "share", true, 0, true})},
      {"rank_hangs_in_set_up_storage_writer", missing({2, "set_up_storage_writer", false, 0, false})},
      {"coordinator_hangs_in_prepare_local_plan", missing({1, "prepare_local_plan", false, 1, false})},
      {"coordinator_hangs_in_prepare_global_plan", missing({2, "prepare_global_plan", false, 2, true})},
      {"reshard_save", reshard_save},
      {"reshard_load", reshard_load},
      {"shared_reads", shared_reads},
      {"missing_key", missing_key},
      {"metadata", metadata},
      {"slow_write", slow_write},
      {"nested_save", nested_save},
      {"hf_save", hf_save},
      {"hf_load", hf_load},
      {"plan_cache", plan_cache},
      {"child_killed", child_killed},
  };
  const bool through_saver = scenario.rfind("async_", 0) == 0;
  const std::string name = through_saver ? scenario.substr(6) : scenario;
  const auto it = scenarios.find(name);
  if (it == scenarios.end()) {
    std::fprintf(stderr, "dcp_worker: unknown scenario '%s'\n", scenario.c_str());
    return 2;
  }
  const bool alone = scenario.size() > 6 && scenario.compare(scenario.size() - 6, 6, "_alone") == 0;
  Rank rank(scenario, argv[2], timeout, !alone);
  // Every rank makes its saver together (its group is a collective).
  if (through_saver && name != "child_killed")
    async_saver() = std::make_unique<ckpt::dcp::AsyncSaver>(completions().get_executor());
  it->second(rank);
  async_saver().reset();
  return rank.all_expected() ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "dcp_worker: %s\n", e.what());
  return 1;
}
