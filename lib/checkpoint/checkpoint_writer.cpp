#include <ckpt/checkpoint_writer.hpp>

#include <ckpt/commit.hpp>
#include <ckpt/format.hpp>

#include "core/failures.hpp"
#include "core/log_once.hpp"
#include "format/file_writer.hpp"

#include <fmt/format.h>
#include <boost/json.hpp>

#include <atomic>
#include <map>
#include <optional>

#include <future>
#include <thread>

namespace ckpt {

namespace json = boost::json;

CheckpointWriter::CheckpointWriter(CheckpointWriterConfig config, RankInfo rank_info,
                                   std::shared_ptr<Barrier> barrier, std::shared_ptr<WriterHook> commit_hook)
    : config_(config),
      rank_info_(rank_info),
      barrier_(std::move(barrier)),
      commit_hook_(std::move(commit_hook)) {}

CheckpointWriter::~CheckpointWriter() = default;

namespace {

void make_directory(const std::filesystem::path& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec)
    throw IoError(fmt::format("cannot create checkpoint directory {}: {}", path.string(), ec.message()));
}

}  // namespace

void CheckpointWriter::write(const std::filesystem::path& path, const StateDict& state_dict,
                             const Kwargs& kwargs) {
  write_with(
      path, [&](const std::filesystem::path& file) { write_file(file, state_dict.to_ivalue()); }, kwargs);
}

void CheckpointWriter::write_with(
    const std::filesystem::path& path,
    const std::function<void(const std::filesystem::path& file)>& write_rank_file, const Kwargs& kwargs) {
  if (barrier_) {
    // This save's barrier round, named by its checkpoint.
    const std::int64_t count = rounds_joined_[path.lexically_normal().string()]++;
    barrier_->set_round(next_round_ ? *next_round_ : round_name(path, count));
    next_round_.reset();
  }
  try {
    make_directory(path);
    // What a killed save of this rank's file left (on a filesystem without
    // unnamed files, or killed between link and rename): the coordinator also
    // takes the commit marker's.
    const std::string name = checkpoint_file_name(rank_info_.global_rank);
    detail::remove_stale_temporaries(path, rank_info_.global_rank == 0 ? std::string() : name);
    write_rank_file(path / name);
  } catch (...) {
    report_failure(std::current_exception());
    throw;
  }
  commit(path, kwargs);
}

namespace {

std::string success_report(const CommittedFile& file) {
  return json::serialize(
      json::object{{"ok", true}, {"name", file.name}, {"size", file.size}, {"crc32", file.crc32}});
}

RankFailure parse_failure(const std::string& report) {
  return detail::decode_failure(report).value_or(RankFailure{"Error", report});
}

CommittedFile parse_success(std::int64_t rank, const std::string& report) {
  try {
    const auto o = json::parse(report).as_object();
    return {rank, std::string(o.at("name").as_string()), o.at("size").to_number<std::uint64_t>(),
            o.at("crc32").to_number<std::uint32_t>()};
  } catch (const std::exception& e) {
    throw Error(fmt::format("rank {} sent a malformed commit report ({}): {}", rank, e.what(), report));
  }
}

}  // namespace

void CheckpointWriter::report_failure(std::exception_ptr error) noexcept {
  // A rank that failed still arrives at the barrier, so that the others learn
  // of it at once instead of waiting out the timeout. Its own error is what it
  // throws; a failure to arrive changes nothing about that.
  if (!barrier_) return;
  try {
    run_barrier(detail::encode_failure(describe_failure(error)), true, false);
  } catch (...) {
  }
}

void CheckpointWriter::commit(const std::filesystem::path& path, const Kwargs& kwargs) {
  const bool coordinator = rank_info_.global_rank == 0;
  const bool alone = rank_info_.global_world_size == 1;
  std::optional<CommittedFile> mine;
  try {
    if (commit_hook_) commit_hook_->pre_commit(path, kwargs);
    // What the marker records of this rank's file (a read of its zip directory).
    if (alone || barrier_) mine = describe_committed_file(path, rank_info_.global_rank);
  } catch (...) {
    report_failure(std::current_exception());
    throw;
  }

  BarrierOutcome outcome;
  if (barrier_) {
    try {
      outcome = run_barrier(success_report(*mine), false, coordinator);
    } catch (const Timeout& e) {
      throw Timeout(fmt::format("{} (rank {} of {}, checkpoint {}: written but not committed)", e.what(),
                                rank_info_.global_rank, rank_info_.global_world_size, path.string()));
    }
    if (!outcome.failures.empty()) {
      std::map<std::int64_t, RankFailure> failures;
      for (const auto& [rank, report] : outcome.failures) failures[rank] = parse_failure(report);
      throw CheckpointException(fmt::format("checkpoint {} was not committed", path.string()),
                                std::move(failures));
    }
  }

  // The commit point: the coordinator's marker; the others wait for it.
  if (coordinator) {
    CommitMarker marker;
    marker.world_size = rank_info_.global_world_size;
    if (alone) {
      marker.files.push_back(*mine);
    } else if (outcome.exchanged) {
      for (std::int64_t r = 0; r < marker.world_size; ++r)
        marker.files.push_back(parse_success(r, outcome.reports.at(static_cast<std::size_t>(r))));
    } else {
      static std::atomic<bool> logged_no_reports{false};
      static std::atomic<bool> logged_no_barrier{false};
      if (barrier_)
        detail::log_once(logged_no_reports, LogLevel::warning,
                         "the barrier does not exchange reports: no commit marker is written");
      else
        detail::log_once(logged_no_barrier, LogLevel::warning,
                         "no barrier with several ranks: no commit marker is written");
    }
    if (barrier_ && outcome.exchanged && !barrier_->begin_commit())
      throw Timeout(fmt::format(
          "checkpoint {} was not committed: another rank gave up waiting at the barrier", path.string()));
    try {
      if (!marker.files.empty()) write_commit_marker(path, std::move(marker));
    } catch (...) {
      if (barrier_ && outcome.exchanged) barrier_->end_commit(describe_failure(std::current_exception()));
      throw;
    }
    if (barrier_ && outcome.exchanged) barrier_->end_commit(std::nullopt);
  } else if (barrier_ && outcome.exchanged) {
    if (const auto failure = barrier_->await_commit()) {
      if (failure->type == "Timeout")
        throw Timeout(fmt::format("checkpoint {} was not committed (rank {} of {}): {}", path.string(),
                                  rank_info_.global_rank, rank_info_.global_world_size, failure->message));
      throw CheckpointException(fmt::format("checkpoint {} was not committed", path.string()),
                                {{0, *failure}});
    }
  }
  if (commit_hook_) commit_hook_->post_commit(path, kwargs);
}

BarrierOutcome CheckpointWriter::run_barrier(const std::string& report, bool failed, bool want_reports) {
  // A barrier that bounds its own waits (the built-in ones) runs here, told
  // the deadline: no thread. Any other runs on a thread of its own so that a
  // barrier that never returns cannot hold this one past the deadline; such a
  // thread is left behind (it owns a reference to the barrier).
  if (barrier_->bounds_its_waits()) {
    barrier_->limit_wait(config_.write_barrier_timeout);
    return barrier_->arrive(report, failed, want_reports);
  }
  auto done = std::make_shared<std::promise<BarrierOutcome>>();
  auto result = done->get_future();
  std::thread([barrier = barrier_, done, report, failed, want_reports] {
    try {
      done->set_value(barrier->arrive(report, failed, want_reports));
    } catch (...) {
      done->set_exception(std::current_exception());
    }
  }).detach();
  if (result.wait_for(config_.write_barrier_timeout) != std::future_status::ready)
    throw Timeout(fmt::format("Timed out after {} ms waiting at the commit barrier",
                              config_.write_barrier_timeout.count()));
  return result.get();
}

void CheckpointWriter::run_barrier() {
  run_barrier({}, false, false);
}

void CheckpointWriter::close() {}

void CheckpointWriter::set_barrier_sequence(std::int64_t sequence) {
  if (barrier_) barrier_->set_sequence(sequence);
}

void CheckpointWriter::set_barrier_round(std::string name) {
  next_round_ = std::move(name);
}

std::string CheckpointWriter::round_name(const std::filesystem::path& path, std::int64_t count) {
  return fmt::format("{}#{}", path.lexically_normal().string(), count);
}

}  // namespace ckpt
