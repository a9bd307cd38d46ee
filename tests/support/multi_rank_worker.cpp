// One rank of a multi-rank checkpointing job, for tests/multi_rank_test.cpp:
// real rank processes started by ckpt-launch, a real c10d group, a real
// tcp_store barrier, real writer children.
//
//   ckpt-launch -n 4 --timeout S multi_rank_worker SCENARIO DIR   (a rank)
//   multi_rank_worker --fd N           (a writer child: the async checkpointer's
//                                       WriterOptions::executable, see below)
//
// What a rank does, in order:
//   1. joins the default process group (RANK, WORLD_SIZE, MASTER_ADDR,
//      MASTER_PORT from the launcher) and agrees with the others on a port for
//      the tcp_store barrier's own store;
//   2. builds a sync or async checkpointer with that barrier (and, for the
//      manager scenarios, a CheckpointManager on DIR);
//   3. runs SCENARIO (see `scenarios` at the bottom), printing one line per
//      observation: `RESULT <label> <outcome>`, where <outcome> is `ok`,
//      `CheckpointException failures={<rank>:<type>,...} msg=<text>`, or
//      `<ErrorType> msg=<text>` (its lines joined by " | ");
//   4. meets the other ranks through the group's store (rank 0, which hosts
//      the stores, leaves last, so nobody loses a store it still reads);
//   5. exits 0 when every observation of this rank was the one expected.
// Every wait is bounded (kBound); the test itself bounds the launcher too.
//
// As a writer child (argv[1] == "--fd") it runs ckpt::writer_main with the
// default writer plus a fault-injecting hook configured by the parent through
// WriterOptions::checkpoint_writer_init_args:
//   fail_pre_commit = true        pre_commit throws ckpt::IoError("injected on rank R")
//   block_pre_commit_of = NAME    when the checkpoint directory is named NAME,
//   signal_fifo = PATH            pre_commit writes one byte into the FIFO PATH
//                                 and then blocks (at most kBound): the parent
//                                 kills it there, before it reaches the barrier.
#include <ckpt/ckpt.hpp>

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <boost/asio/use_future.hpp>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

/// The bound on every wait of this program: only keeps a broken library from
/// hanging a rank; no check relies on it (the launcher's --timeout is longer).
constexpr auto kBound = 60s;

// --- the writer child ---------------------------------------------------------

class FaultHook : public ckpt::WriterHook {
 public:
  FaultHook(ckpt::RankInfo rank_info, const ckpt::Kwargs& args) : rank_(rank_info.global_rank) {
    if (const auto* a = args.find("fail_pre_commit")) fail_ = a->as_bool();
    if (const auto* a = args.find("block_pre_commit_of")) block_in_ = a->as_string();
    if (const auto* a = args.find("signal_fifo")) fifo_ = a->as_string();
  }

  void pre_commit(const fs::path& path, const ckpt::Kwargs&) override {
    if (fail_) throw ckpt::IoError(fmt::format("injected on rank {}", rank_));
    if (block_in_.empty() || path.filename() != block_in_) return;
    // The parent holds the FIFO open for reading, so this open does not block.
    const int fd = ::open(fifo_.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0 || ::write(fd, "!", 1) != 1)
      throw ckpt::IoError(fmt::format("cannot signal {}: {}", fifo_.string(), std::strerror(errno)));
    ::close(fd);
    // Blocked until killed; a parent that never kills it only costs kBound.
    const auto until = std::chrono::steady_clock::now() + kBound;
    while (std::chrono::steady_clock::now() < until) ::poll(nullptr, 0, 1000);
    throw ckpt::IoError("the blocked pre_commit hook was not killed");
  }

 private:
  std::int64_t rank_;
  bool fail_ = false;
  std::string block_in_;
  fs::path fifo_;
};

int writer_child(int argc, char** argv) {
  ckpt::WriterMainOptions options;
  options.writer_factory = [](const ckpt::WriterFactoryArgs& a) {
    return std::make_shared<ckpt::CheckpointWriter>(
        a.config, a.rank_info, ckpt::create_barrier_from_config(a.barrier_config, a.rank_info),
        std::make_shared<FaultHook>(a.rank_info, a.writer_init_args));
  };
  return ckpt::writer_main(argc, argv, options);
}

// --- a rank -----------------------------------------------------------------------

/// What a save did, as one line: "ok", or the error's type and text.
std::string outcome_of(const std::function<void()>& body) {
  const auto one_line = [](std::string text) {
    for (std::size_t at; (at = text.find('\n')) != std::string::npos;) text.replace(at, 1, " | ");
    return text;
  };
  try {
    body();
    return "ok";
  } catch (const ckpt::CheckpointException& e) {
    std::string failures;
    for (const auto& [rank, f] : e.failures())
      failures += fmt::format("{}{}:{}", failures.empty() ? "" : ",", rank, f.type);
    return fmt::format("CheckpointException failures={{{}}} msg={}", failures, one_line(e.what()));
  } catch (...) {
    const auto f = ckpt::describe_failure(std::current_exception());
    return fmt::format("{} msg={}", f.type, one_line(f.message));
  }
}

bool starts_with(const std::string& text, const std::string& prefix) {
  return text.compare(0, prefix.size(), prefix) == 0;
}

/// The group's options: the launcher's variables, every collective bounded by
/// kBound (the two-host scenario: kHostsBound, so that a cut link fails its
/// saves well before kBound).
constexpr auto kHostsBound = 20s;
ckpt::dist::InitOptions init_options(const std::string& scenario) {
  ckpt::dist::InitOptions options;
  options.timeout = scenario == "two-hosts" ? std::chrono::milliseconds(kHostsBound) : kBound;
  return options;
}

/// What every scenario shares.
class Rank {
 public:
  Rank(std::string scenario, fs::path dir)
      : scenario_(std::move(scenario)),
        dir_(std::move(dir)),
        pg_(ckpt::dist::init_process_group(init_options(scenario_))),
        rank_(pg_->rank_info.global_rank),
        world_(pg_->rank_info.global_world_size) {}

  std::int64_t rank() const { return rank_; }
  std::int64_t world() const { return world_; }
  const fs::path& dir() const { return dir_; }
  const ckpt::dist::ProcessGroupHandle& group() const { return *pg_; }
  const std::shared_ptr<ckpt::dist::ProcessGroupHandle>& group_handle() const { return pg_; }
  /// Goes on with a new group over fresh connections (after a cut link left
  /// this one out of step).
  void regroup(const std::string& name) { pg_ = ckpt::dist::new_group(pg_, scenario_ + "/" + name); }
  bool all_expected() const { return all_expected_; }

  /// A tcp_store barrier whose own timeout is `barrier_timeout`; the writer's
  /// barrier deadline is longer, so that a missing rank is reported by the
  /// barrier itself, which names it.
  ckpt::CheckpointerConfig config(std::chrono::seconds barrier_timeout) const {
    ckpt::CheckpointerConfig config;
    config.barrier_config.barrier_type = "tcp_store";
    config.barrier_config.barrier_args = {{"barrier_prefix", scenario_},
                                          {"tcpstore_port", ckpt::dist::agree_on_free_port(*pg_, scenario_)},
                                          {"master_address", pg_->master_addr},
                                          {"timeout_secs", barrier_timeout.count()}};
    config.writer_config.write_barrier_timeout = kBound;
    return config;
  }

  std::unique_ptr<ckpt::AsyncCheckpointer> make_async(std::chrono::seconds barrier_timeout,
                                                      ckpt::WriterOptions writer = {}) const {
    return ckpt::make_async_checkpointer(config(barrier_timeout), pg_->rank_info, std::move(writer));
  }
  std::unique_ptr<ckpt::SyncCheckpointer> make_sync(std::chrono::seconds barrier_timeout,
                                                    std::shared_ptr<ckpt::WriterHook> hook = nullptr) const {
    return ckpt::make_sync_checkpointer(config(barrier_timeout), pg_->rank_info, std::move(hook));
  }

  /// Prints `RESULT label outcome` and records whether it was expected.
  void report(const std::string& label, const std::string& outcome, bool expected) {
    std::printf("RESULT %s %s\n", label.c_str(), outcome.c_str());
    if (!expected) std::printf("UNEXPECTED %s\n", label.c_str());
    std::fflush(stdout);
    all_expected_ &= expected;
  }
  void expect(const std::string& label, const std::string& outcome, const std::string& prefix) {
    report(label, outcome, starts_with(outcome, prefix));
  }

  /// Returns once `n` ranks called meet(name, n) (through the group's store).
  void meet(const std::string& name, std::int64_t n) {
    const std::string key = scenario_ + "/meet/" + name;
    if (pg_->store->add(key + "/count", 1) == n) pg_->store->set(key + "/all", {'1'});
    pg_->store->wait({key + "/all"}, kBound);
  }

  /// The last step: rank 0 hosts the group's store (and, in the sync
  /// checkpointer, the barrier's), so it waits until every other rank of
  /// `participants` is done with them.
  void leave(std::int64_t participants) {
    const std::string key = scenario_ + "/left";
    if (rank_ == 0) {
      pg_->store->wait({key + "/all"}, kBound);
    } else if (pg_->store->add(key, 1) == participants - 1) {
      pg_->store->set(key + "/all", {'1'});
    }
  }

 private:
  std::string scenario_;
  fs::path dir_;
  std::shared_ptr<ckpt::dist::ProcessGroupHandle> pg_;
  std::int64_t rank_;
  std::int64_t world_;
  bool all_expected_ = true;
};

/// A state dict of this rank's own: its tensor is filled with `value`.
ckpt::StateDict state_of(std::int64_t rank, double value) {
  ckpt::StateDict sd;
  sd.insert("weight", at::full({8, 16}, value, at::kFloat));
  sd.insert("rank", rank);
  sd.insert("value", value);
  return sd;
}

/// The value every rank saves at `step` (or save number): distinct per rank and step.
double value_at(std::int64_t step, std::int64_t rank) {
  return static_cast<double>(100 * step + rank);
}

/// Whether `sd` is what state_of(rank, value) saved.
bool holds(const ckpt::StateDict& sd, std::int64_t rank, double value) {
  return sd.at("rank").toInt() == rank && sd.at("value").toDouble() == value &&
         at::equal(sd.at("weight").toTensor(), at::full({8, 16}, value, at::kFloat));
}

/// A target for a strict in-place restore.
ckpt::StateDict restore_target() {
  ckpt::StateDict sd;
  sd.insert("weight", at::zeros({8, 16}, at::kFloat));
  sd.insert("rank", c10::IValue());
  sd.insert("value", c10::IValue());
  return sd;
}

/// Saves and waits until durable (both checkpointers: the blocking form).
void save(ckpt::Checkpointer& ck, const fs::path& path, const ckpt::StateDict& sd) {
  auto futures = ck.save(path, sd);
  if (futures.staged.wait_for(kBound) != std::future_status::ready) throw std::runtime_error("staging hung");
  futures.staged.get();
  if (futures.written.wait_for(kBound) != std::future_status::ready) throw std::runtime_error("write hung");
  futures.written.get();
}

/// Waits for the async checkpointer's child to have started (and joined the
/// barrier's store).
void wait_ready(ckpt::AsyncCheckpointer& ck) {
  auto ready = ck.process().async_wait_ready(boost::asio::use_future);
  if (ready.wait_for(kBound) != std::future_status::ready)
    throw std::runtime_error("writer child did not start");
  ready.get();
}

std::unique_ptr<ckpt::Checkpointer> make(Rank& r, bool async, std::chrono::seconds barrier_timeout,
                                         std::shared_ptr<ckpt::WriterHook> hook = nullptr,
                                         ckpt::WriterOptions writer = {}) {
  if (!async) return r.make_sync(barrier_timeout, std::move(hook));
  auto ck = r.make_async(barrier_timeout, std::move(writer));
  wait_ready(*ck);
  return ck;
}

/// This program as the writer executable, with `args` for its hook.
ckpt::WriterOptions self_as_writer(ckpt::Kwargs args) {
  ckpt::WriterOptions options;
  options.executable = fs::canonical("/proc/self/exe");
  options.checkpoint_writer_init_args = std::move(args);
  return options;
}

// --- the scenarios ------------------------------------------------------------------

// A: two saves into two directories both commit; every rank reads its own back.
void commit(Rank& r, bool async) {
  std::unique_ptr<ckpt::Checkpointer> ck;
  std::shared_ptr<ckpt::Barrier> barrier;
  if (async) {
    ck = make(r, true, 60s);
  } else {
    // make_sync_checkpointer's parts, assembled here to watch the barrier's
    // rounds named by checkpoint.
    const auto config = r.config(60s);
    barrier = ckpt::create_barrier_from_config(config.barrier_config, r.group().rank_info);
    ck = std::make_unique<ckpt::SyncCheckpointer>(
        std::make_shared<ckpt::CheckpointWriter>(config.writer_config, r.group().rank_info, barrier),
        std::make_shared<ckpt::CheckpointReader>(r.group().rank_info));
  }
  for (int i = 1; i <= 2; ++i) {
    const auto path = r.dir() / fmt::format("save_{}", i);
    r.expect(fmt::format("save_{}", i),
             outcome_of([&] { save(*ck, path, state_of(r.rank(), value_at(i, r.rank()))); }), "ok");
    bool same = false;
    const auto loaded = outcome_of([&] { same = holds(ck->load(path), r.rank(), value_at(i, r.rank())); });
    r.report(fmt::format("load_{}", i), loaded == "ok" ? (same ? "own-values" : "OTHER-VALUES") : loaded,
             same);
  }
  if (barrier) {
    // Rounds are named by checkpoint: the last one passed is save_2's first.
    const auto round = dynamic_cast<ckpt::TCPStoreBarrier&>(*barrier).last_round();
    const auto expected = ckpt::CheckpointWriter::round_name(r.dir() / "save_2", 0);
    r.report("round", round, round == "commit-sync/" + expected);
  }
  if (r.rank() != 0) ck->close();
  r.leave(r.world());
  ck->close();
}

// B: rank 2's write fails for real (its file's name is taken by a directory:
// the rename fails) or its pre_commit hook throws; every rank learns it.
void rank_fails(Rank& r, bool async, bool in_hook) {
  const bool failing = r.rank() == 2;
  std::unique_ptr<ckpt::Checkpointer> ck;
  if (!in_hook)
    ck = make(r, async, 60s);
  else if (async)
    ck = make(r, true, 60s, nullptr, self_as_writer({{"fail_pre_commit", failing}}));
  else
    ck = make(r, false, 60s,
              failing
                  ? std::make_shared<FaultHook>(r.group().rank_info, ckpt::Kwargs{{"fail_pre_commit", true}})
                  : nullptr);
  if (failing && !in_hook) fs::create_directories(r.dir() / ckpt::checkpoint_file_name(2));
  const auto outcome = outcome_of([&] { save(*ck, r.dir(), state_of(r.rank(), value_at(1, r.rank()))); });
  if (failing)
    r.expect("save", outcome,
             in_hook ? "IoError msg=injected on rank 2" : "IoError msg=cannot write checkpoint");
  else
    r.expect("save", outcome, "CheckpointException failures={2:IoError} ");
  if (r.rank() != 0) ck->close();
  r.leave(r.world());
  ck->close();
}

// C: rank 3 joins the barrier's store but never arrives: it leaves at once
// (its store clients disconnect), or it stays, blocked until the others timed
// out. The others time out naming it.
void rank_missing(Rank& r, bool async, bool hangs) {
  constexpr std::int64_t missing = 3;
  auto ck = make(r, async, 3s);
  if (r.rank() == missing) {
    if (hangs) {
      // Alive and connected, but never at the barrier, until the others are done.
      r.meet("timed-out", r.world());
      r.report("save", "not-attempted", true);
    } else {
      r.report("save", "not-attempted", true);
      ck->close();
      ck.reset();
    }
  } else {
    // The three that arrive start together: the 3 s barrier timeout must only
    // ever run out on the missing rank, however busy the machine is.
    r.meet("ready", r.world() - 1);
    const auto outcome = outcome_of([&] { save(*ck, r.dir(), state_of(r.rank(), value_at(1, r.rank()))); });
    const bool named = outcome.find("Timed out") != std::string::npos &&
                       outcome.find(fmt::format("[{}]", missing)) != std::string::npos;
    r.report("save", outcome, starts_with(outcome, "Timeout msg=") && named);
    if (hangs) r.meet("timed-out", r.world());
  }
  if (ck && r.rank() != 0) ck->close();
  r.leave(r.world());
  if (ck) ck->close();
}

/// Sets a key of the group's store right before this rank's commit barrier
/// (pre_commit) of a checkpoint directory named `name`.
class SignalHook : public ckpt::WriterHook {
 public:
  SignalHook(c10::intrusive_ptr<c10d::Store> store, std::string name, std::string key)
      : store_(std::move(store)), name_(std::move(name)), key_(std::move(key)) {}
  void pre_commit(const fs::path& path, const ckpt::Kwargs&) override {
    if (path.filename() == name_) store_->set(key_, {'1'});
  }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
  std::string name_;
  std::string key_;
};

// C, then again: rank 3 misses the barrier of a first save — it saves once the
// others have timed out (`late`), or not at all — then every rank saves into
// another directory with the same (sync) checkpointers. Rank 0 is the first at
// that barrier (the others start once it is there), so a barrier that still
// counted the first round's arrivals would let it through alone.
void save_after_a_timeout(Rank& r, bool late) {
  constexpr std::int64_t missing = 3;
  const std::string go = "rank-0-at-the-second-barrier";
  auto ck = make(r, false, 3s,
                 r.rank() == 0 ? std::make_shared<SignalHook>(r.group().store, "again", go) : nullptr);
  const auto first = [&] { save(*ck, r.dir() / "first", state_of(r.rank(), value_at(1, r.rank()))); };
  if (r.rank() == missing) {
    r.meet("timed-out", r.world());
    // What the late rank is told is judged by the test (see its cases).
    r.report("save", late ? outcome_of(first) : "not-attempted", true);
  } else {
    r.meet("ready", r.world() - 1);  // the three that arrive start together
    const auto outcome = outcome_of(first);
    r.report("save", outcome,
             starts_with(outcome, "Timeout msg=") &&
                 outcome.find(fmt::format("[{}]", missing)) != std::string::npos);
    r.meet("timed-out", r.world());
  }
  const auto again = outcome_of([&] {
    if (r.rank() != 0) r.group().store->wait({go}, kBound);
    save(*ck, r.dir() / "again", state_of(r.rank(), value_at(2, r.rank())));
  });
  r.expect("save_again", again, "ok");
  if (r.rank() != 0) ck->close();
  r.leave(r.world());
  ck->close();
}

/// Step directories of `manager`'s committed checkpoints, as "[9, 10]".
std::string committed_steps(const ckpt::CheckpointManager& manager) {
  std::vector<std::int64_t> steps;
  for (const auto& c : manager.committed()) steps.push_back(c.step);
  return fmt::format("[{}]", fmt::join(steps, ", "));
}

/// Restores the newest committed checkpoint and checks it is step `step`'s.
void check_restore(Rank& r, ckpt::CheckpointManager& manager, std::int64_t step) {
  std::optional<std::int64_t> from;
  auto target = restore_target();
  const auto outcome = outcome_of([&] { from = manager.restore_latest(target); });
  const bool same = from && holds(target, r.rank(), value_at(step, r.rank()));
  r.report("restore",
           outcome == "ok"
               ? fmt::format("step={} {}", from ? *from : -1, same ? "own-values" : "OTHER-VALUES")
               : outcome,
           from == step && same);
}

void check_latest(Rank& r, const ckpt::CheckpointManager& manager, const std::string& label,
                  std::int64_t step) {
  const auto latest = manager.latest_committed();
  r.report(label, latest ? std::to_string(latest->step) : "none", latest && latest->step == step);
}

// D: ten saves through a manager keeping two.
void manager_keeps_two(Rank& r) {
  std::shared_ptr<ckpt::AsyncCheckpointer> ck = r.make_async(60s);
  ckpt::CheckpointManager manager(r.dir(), ck, {.keep_last_n = 2, .rank_info = r.group().rank_info});
  std::string failed;
  for (std::int64_t step = 1; step <= 10; ++step) {
    const auto outcome = outcome_of([&] {
      auto futures = manager.save(step, state_of(r.rank(), value_at(step, r.rank())));
      futures.staged.get();
      if (futures.written.wait_for(kBound) != std::future_status::ready)
        throw std::runtime_error("write hung");
      futures.written.get();
    });
    if (outcome != "ok") failed += fmt::format(" step_{}: {}", step, outcome);
  }
  r.report("saves", failed.empty() ? "ok" : failed, failed.empty());
  manager.close();  // rank 0: the last pruning is done
  r.meet("pruned", r.world());
  check_latest(r, manager, "latest", 10);
  const auto committed = committed_steps(manager);
  r.report("committed", committed, committed == "[9, 10]");
  check_restore(r, manager, 10);
  if (r.rank() != 0) ck->close();
  r.leave(r.world());
  ck->close();
}

/// A FIFO that this process holds open for reading (and writing, so that it
/// never reads end-of-file): the writer child's hook signals through it.
class Fifo {
 public:
  explicit Fifo(fs::path path) : path_(std::move(path)) {
    if (::mkfifo(path_.c_str(), 0600) != 0)
      throw std::runtime_error("mkfifo: " + std::string(std::strerror(errno)));
    fd_ = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error("open fifo: " + std::string(std::strerror(errno)));
  }
  ~Fifo() {
    ::close(fd_);
    ::unlink(path_.c_str());
  }
  /// Waits (at most kBound) for one byte.
  void wait() {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(kBound).count())) != 1)
      throw std::runtime_error("the writer child never reached its pre_commit hook");
    char c;
    if (::read(fd_, &c, 1) != 1) throw std::runtime_error("read fifo: " + std::string(std::strerror(errno)));
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
  int fd_ = -1;
};

// E: the step-3 save's writer child on rank 1 is killed before it reaches the
// barrier; the manager resumes from step 2 and the next save commits.
void manager_survives_kill(Rank& r) {
  constexpr std::int64_t victim = 1;
  std::optional<Fifo> fifo;
  ckpt::Kwargs hook_args;
  if (r.rank() == victim) {
    fifo.emplace(r.dir() / "writer_child_blocked.fifo");
    hook_args = {{"block_pre_commit_of", "step_3"}, {"signal_fifo", fifo->path().string()}};
  }
  // Long enough for the saves every rank reaches on a busy machine; it runs
  // out only at step 3, waiting for the killed child.
  std::shared_ptr<ckpt::AsyncCheckpointer> ck = r.make_async(10s, self_as_writer(hook_args));
  ckpt::CheckpointManager manager(r.dir(), ck, {.keep_last_n = 2, .rank_info = r.group().rank_info});
  const auto save_step = [&](std::int64_t step, const std::function<void()>& after_staged = {}) {
    auto futures = manager.save(step, state_of(r.rank(), value_at(step, r.rank())));
    futures.staged.get();
    if (after_staged) after_staged();
    if (futures.written.wait_for(kBound) != std::future_status::ready) throw std::runtime_error("write hung");
    futures.written.get();
  };
  for (std::int64_t step : {1, 2})
    r.expect(fmt::format("step_{}", step), outcome_of([&] { save_step(step); }), "ok");

  // Step 3: rank 1 kills its child as soon as the child is held in pre_commit.
  const auto step3 = outcome_of([&] {
    save_step(3, [&] {
      if (r.rank() != victim) return;
      fifo->wait();
      const int pid = ck->process().pid();
      if (pid <= 0 || ::kill(pid, SIGKILL) != 0) throw std::runtime_error("cannot kill the writer child");
      r.report("killed_writer_child", "ok", true);
    });
  });
  if (r.rank() == victim)
    r.expect("step_3", step3, "WriterProcessError msg=Child process terminated unexpectedly");
  else
    r.report("step_3", step3,
             starts_with(step3, "Timeout msg=Timed out") &&
                 step3.find(fmt::format("[{}]", victim)) != std::string::npos);
  r.meet("step-3-failed", r.world());
  check_latest(r, manager, "latest_after_kill", 2);
  check_restore(r, manager, 2);
  r.meet("restored", r.world());  // nobody prunes step_2 while another rank reads it

  // Step 4: the async checkpointer fails the first save after a failed write
  // with that write's error, once (async_checkpointer.hpp); then a new child
  // (on rank 1) writes it.
  const auto retry = outcome_of([&] { save_step(4); });
  r.expect("step_4_first_attempt", retry, step3.substr(0, step3.find(' ')));
  r.expect("step_4", outcome_of([&] { save_step(4); }), "ok");
  manager.close();
  r.meet("step-4-done", r.world());
  check_latest(r, manager, "latest", 4);
  const auto committed = committed_steps(manager);
  r.report("committed", committed, committed == "[2, 4]");
  if (r.rank() != 0) ck->close();
  r.leave(r.world());
  ck->close();
}

// G: the tcp_store barrier's store lives in rank 0's trainer, not in its
// writer child: rank 0's child is killed between saves; the saves right after
// it fail (rank 0's for its dead child, then once more with that error, as the
// async checkpointer tells a failed write; the others time out naming rank 0),
// and the next one commits on every rank through the same store.
void rank0_child_dies(Rank& r) {
  auto ck = r.make_async(5s);
  wait_ready(*ck);
  const auto save_n = [&](int n) {
    return outcome_of(
        [&] { save(*ck, r.dir() / fmt::format("save_{}", n), state_of(r.rank(), value_at(n, r.rank()))); });
  };
  r.expect("save_1", save_n(1), "ok");
  r.meet("saved-1", r.world());
  if (r.rank() == 0) {
    const int pid = ck->process().pid();
    const bool killed = pid > 0 && ::kill(pid, SIGKILL) == 0;
    r.report("killed_writer_child", killed ? "ok" : "failed", killed);
  }
  r.meet("killed", r.world());
  std::string outcome;
  int n = 2;
  for (; n <= 4; ++n) {
    outcome = save_n(n);
    r.report(fmt::format("save_{}", n), outcome, true);
    r.meet(fmt::format("tried-{}", n), r.world());
    if (outcome == "ok") break;
  }
  r.report("first_commit_after_kill", fmt::format("save_{}", n), outcome == "ok");
  if (r.rank() != 0) ck->close();
  r.leave(r.world());
  ck->close();
}

// H: a training job that is killed as a whole and restarted (multi_rank_test
// kills its process group): it restores the newest committed step through
// the manager ("resumed" = that step, or none; "restored" = whether every
// value is the one saved at that step), then saves step after step ("saved_S")
// until it has saved JOB_STEPS steps past the one it resumed from.
void job(Rank& r) {
  const char* steps_env = std::getenv("JOB_STEPS");
  const std::int64_t steps = steps_env ? std::stoll(steps_env) : 1000000;
  std::shared_ptr<ckpt::AsyncCheckpointer> ck = r.make_async(30s);
  wait_ready(*ck);
  ckpt::CheckpointManager manager(r.dir(), ck, {.keep_last_n = 3, .rank_info = r.group().rank_info});
  auto target = restore_target();
  std::optional<std::int64_t> from;
  const auto outcome = outcome_of([&] { from = manager.restore_latest(target); });
  r.report("resumed", outcome == "ok" ? (from ? std::to_string(*from) : "none") : outcome, outcome == "ok");
  const bool same = !from || holds(target, r.rank(), value_at(*from, r.rank()));
  r.report("restored", same ? "own-values" : "OTHER-VALUES", same);
  r.meet("resumed", r.world());  // nobody prunes what another rank restores
  const std::int64_t first = from.value_or(0) + 1;
  for (std::int64_t step = first; step < first + steps; ++step) {
    auto futures = manager.save(step, state_of(r.rank(), value_at(step, r.rank())));
    futures.staged.get();
    if (futures.written.wait_for(kBound) != std::future_status::ready) throw std::runtime_error("write hung");
    futures.written.get();
    r.report(fmt::format("saved_{}", step), "ok", true);
  }
  manager.close();
  if (r.rank() != 0) ck->close();
  r.leave(r.world());
  ck->close();
}

// I: two hosts (multihost_test: ranks 0 and 1 in one network namespace, 2 and
// 3 in another, joined by a veth pair). A single-file save (sync
// checkpointer, tcp_store barrier) and a DCP save commit across the hosts.
// The test cuts the link while every rank is inside a save — at its
// pre_commit hook, then inside a DCP write — and lets them go on: every rank
// fails naming what it cannot reach (ranks 0 and 1: ranks 2 and 3, which
// never arrived; ranks 2 and 3: rank 0, whose host holds the stores), and
// nothing commits. With the link back, the ranks go on over a new group and
// the next saves commit and load back exactly.
//
// The test and the ranks meet through lines and a FIFO: a rank prints
// `RESULT hold_<what> waiting` and reads one byte from GO_FIFO (the test
// holds it open and writes one byte per rank once it has acted).

/// When the last hold() was let go.
std::chrono::steady_clock::time_point last_go;

/// Seconds since the last hold() was let go, as text (reported, not checked).
std::string seconds_since_go() {
  return fmt::format("{:.1f}",
                     std::chrono::duration<double>(std::chrono::steady_clock::now() - last_go).count());
}

/// Waits (at most kBound) for the test's go, after telling it where this rank waits.
void hold(Rank& r, const std::string& what) {
  r.report("hold_" + what, "waiting", true);
  const char* path = std::getenv("GO_FIFO");
  if (!path) throw std::runtime_error("GO_FIFO is not set");
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);  // the test holds it open: no block
  if (fd < 0) throw std::runtime_error(fmt::format("open {}: {}", path, std::strerror(errno)));
  pollfd p{fd, POLLIN, 0};
  char c = 0;
  const bool got = ::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(kBound).count())) == 1 &&
                   ::read(fd, &c, 1) == 1;
  ::close(fd);
  if (!got) throw std::runtime_error("the test never said go after hold_" + what);
  last_go = std::chrono::steady_clock::now();
}

/// Holds at the pre_commit of a checkpoint directory named `name`.
class HoldHook : public ckpt::WriterHook {
 public:
  HoldHook(Rank& r, std::string name, std::string what)
      : r_(r), name_(std::move(name)), what_(std::move(what)) {}
  void pre_commit(const fs::path& path, const ckpt::Kwargs&) override {
    if (path.filename() == name_) hold(r_, what_);
  }

 private:
  Rank& r_;
  std::string name_;
  std::string what_;
};

/// A DCP FileSystemWriter that holds on entering write_data when `hold_as` is set.
class HoldingWriter : public ckpt::dcp::FileSystemWriter {
 public:
  HoldingWriter(fs::path path, Rank& r, std::string hold_as)
      : FileSystemWriter(std::move(path)), r_(r), what_(std::move(hold_as)) {}
  std::future<std::vector<ckpt::dcp::WriteResult>> write_data(const ckpt::dcp::SavePlan& plan,
                                                              ckpt::dcp::SavePlanner& planner) override {
    if (!what_.empty()) hold(r_, what_);
    return FileSystemWriter::write_data(plan, planner);
  }

 private:
  Rank& r_;
  std::string what_;
};

/// The DCP state of save `n`: a 16 x 6 tensor whose rows are sharded over the
/// ranks, and a replicated one; distinct per save.
at::Tensor dcp_rows(int n) {
  return at::arange(96, at::kFloat).reshape({16, 6}).add_(1000.0 * n);
}
at::Tensor dcp_replicated(int n) {
  return at::full({3, 5}, 0.25 * n, at::kDouble);
}
ckpt::dcp::DcpStateDict dcp_state(const Rank& r, int n, bool zeros) {
  ckpt::dcp::ChunkShardingSpec spec;
  for (std::int64_t k = 0; k < r.world(); ++k) spec.placements.push_back(fmt::format("rank:{}/cpu", k));
  auto rows = ckpt::dcp::ShardedTensor::zeros(spec, {16, 6}, r.rank(), at::kFloat);
  if (!zeros)
    for (auto& s : rows.local_shards())
      s.tensor.copy_(dcp_rows(n).narrow(0, s.metadata.offsets[0], s.metadata.sizes[0]));
  return {{"rows", rows}, {"replicated", zeros ? at::zeros({3, 5}, at::kDouble) : dcp_replicated(n)}};
}

/// Loads DCP save `n` into zeros and says whether every value is the saved one.
std::string dcp_load_check(Rank& r, const fs::path& path, int n) {
  auto target = dcp_state(r, n, true);
  ckpt::dcp::FileSystemReader reader(path);
  ckpt::dcp::load_state_dict(target, reader, nullptr, r.group_handle());
  bool same = at::equal(std::get<at::Tensor>(target[1].second), dcp_replicated(n));
  for (auto& s : std::get<ckpt::dcp::ShardedTensor>(target[0].second).local_shards())
    same = same && at::equal(s.tensor, dcp_rows(n).narrow(0, s.metadata.offsets[0], s.metadata.sizes[0]));
  return same ? "as-saved" : "DIFFERENT";
}

void two_hosts(Rank& r) {
  const bool first_host = r.rank() < 2;  // ranks 0 and 1 share rank 0's host
  const auto has = [](const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos;
  };
  auto ck = r.make_sync(10s, std::make_shared<HoldHook>(r, "save_2", "cut_in_barrier"));
  const auto save_n = [&](int n) {
    return outcome_of(
        [&] { save(*ck, r.dir() / fmt::format("save_{}", n), state_of(r.rank(), value_at(n, r.rank()))); });
  };
  const auto dcp_save = [&](int n, const std::string& hold_as) {
    return outcome_of([&] {
      HoldingWriter writer(r.dir() / fmt::format("dcp_{}", n), r, hold_as);
      ckpt::dcp::save_state_dict(dcp_state(r, n, false), writer, nullptr, r.group_handle());
    });
  };
  const auto committed = [&](const std::string& name) {
    return name.starts_with("dcp") ? fs::exists(r.dir() / name / ckpt::dcp::kMetadataFileName)
                                   : ckpt::is_committed(r.dir() / name);
  };

  // Both kinds commit across the hosts.
  r.expect("save_1", save_n(1), "ok");
  r.expect("dcp_1", dcp_save(1, ""), "ok");
  std::string values;
  r.expect("dcp_1_load", outcome_of([&] { values = dcp_load_check(r, r.dir() / "dcp_1", 1); }), "ok");
  r.report("dcp_1_values", values, values == "as-saved");

  // The link is cut while every rank holds at save_2's pre_commit.
  const auto cut_single = save_n(2);
  r.report("save_2_seconds_after_the_cut", seconds_since_go(), true);
  // Ranks 0 and 1 time out at the barrier naming the two that never came;
  // ranks 2 and 3 cannot reach the barrier's store, on rank 0's host.
  r.report("save_2", cut_single,
           first_host ? starts_with(cut_single, "Timeout msg=") && has(cut_single, "[2, 3]")
                      : starts_with(cut_single, "Timeout msg=") && has(cut_single, "hosted by rank 0"));
  hold(r, "link_back_1");
  r.report("save_2_committed", committed("save_2") ? "yes" : "no", !committed("save_2"));

  // And again inside a DCP write: the results never reach the coordinator.
  const auto cut_dcp = dcp_save(2, "cut_in_dcp_write");
  r.report("dcp_2_seconds_after_the_cut", seconds_since_go(), true);
  r.report("dcp_2", cut_dcp,
           starts_with(cut_dcp, first_host ? "CheckpointException failures={2:Timeout,3:Timeout} "
                                           : "CheckpointException failures={0:Timeout} ") &&
               (first_host || has(cut_dcp, "hosted by rank 0")));
  hold(r, "link_back_2");
  r.report("dcp_2_committed", committed("dcp_2") ? "yes" : "no", !committed("dcp_2"));

  // The link is back: a new group (the old one's connections are out of
  // step), the same checkpointer (its barrier reconnects by itself).
  r.expect("regroup", outcome_of([&] { r.regroup("after-the-cut"); }), "ok");
  r.expect("save_3", save_n(3), "ok");
  bool same = false;
  const auto loaded =
      outcome_of([&] { same = holds(ck->load(r.dir() / "save_3"), r.rank(), value_at(3, r.rank())); });
  r.report("save_3_load", loaded == "ok" ? (same ? "own-values" : "OTHER-VALUES") : loaded, same);
  r.expect("dcp_3", dcp_save(3, ""), "ok");
  r.expect("dcp_3_load", outcome_of([&] { values = dcp_load_check(r, r.dir() / "dcp_3", 3); }), "ok");
  r.report("dcp_3_values", values, values == "as-saved");
  if (r.rank() != 0) ck->close();
  r.leave(r.world());
  ck->close();
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc >= 2 && std::string(argv[1]) == "--fd") return writer_child(argc, argv);
  if (argc != 3) {
    std::fprintf(stderr, "usage: ckpt-launch -n 4 multi_rank_worker SCENARIO DIR\n");
    return 2;
  }
  const std::map<std::string, std::function<void(Rank&)>> scenarios{
      {"commit-sync", [](Rank& r) { commit(r, false); }},
      {"commit-async", [](Rank& r) { commit(r, true); }},
      {"rank-fails-sync", [](Rank& r) { rank_fails(r, false, false); }},
      {"rank-fails-async", [](Rank& r) { rank_fails(r, true, false); }},
      {"hook-fails-sync", [](Rank& r) { rank_fails(r, false, true); }},
      {"hook-fails-async", [](Rank& r) { rank_fails(r, true, true); }},
      {"rank-leaves-sync", [](Rank& r) { rank_missing(r, false, false); }},
      {"rank-leaves-async", [](Rank& r) { rank_missing(r, true, false); }},
      {"rank-hangs-sync", [](Rank& r) { rank_missing(r, false, true); }},
      {"rank-hangs-async", [](Rank& r) { rank_missing(r, true, true); }},
      {"rank-late-sync", [](Rank& r) { save_after_a_timeout(r, true); }},
      {"manager-keeps-two", manager_keeps_two},
      {"manager-survives-kill", manager_survives_kill},
      {"rank0-child-dies", rank0_child_dies},
      {"job", job},
      {"two-hosts", two_hosts},
  };
  const auto it = scenarios.find(argv[1]);
  if (it == scenarios.end()) {
    std::fprintf(stderr, "multi_rank_worker: unknown scenario '%s'\n", argv[1]);
    return 2;
  }
  Rank rank(argv[1], argv[2]);
  it->second(rank);
  return rank.all_expected() ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "multi_rank_worker: %s\n", e.what());
  return 1;
}
