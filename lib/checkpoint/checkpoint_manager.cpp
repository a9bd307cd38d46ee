#include <ckpt/checkpoint_manager.hpp>

#include <ckpt/commit.hpp>
#include <ckpt/error.hpp>
#include <ckpt/log.hpp>

#include "format/file_writer.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>

namespace fs = std::filesystem;

namespace ckpt {

namespace {

constexpr std::string_view kStepPrefix = "step_";

/// The step a directory name stands for; nullopt for other names.
std::optional<std::int64_t> step_of(const std::string& name) {
  if (name.size() <= kStepPrefix.size() || name.compare(0, kStepPrefix.size(), kStepPrefix) != 0)
    return std::nullopt;
  std::int64_t step = 0;
  const char* first = name.data() + kStepPrefix.size();
  const char* last = name.data() + name.size();
  const auto [end, ec] = std::from_chars(first, last, step);
  if (ec != std::errc() || end != last || step < 0) return std::nullopt;
  if (*first == '0' && last - first > 1) return std::nullopt;  // one spelling per step
  return step;
}

/// Every step directory under `root`, by step.
std::vector<std::pair<std::int64_t, fs::path>> step_dirs(const fs::path& root) {
  std::vector<std::pair<std::int64_t, fs::path>> out;
  std::error_code ec;
  fs::directory_iterator it(root, ec);
  if (ec) {
    if (ec == std::errc::no_such_file_or_directory) return out;
    throw IoError(fmt::format("cannot list checkpoints in {}: {}", root.string(), ec.message()));
  }
  for (const auto& entry : it) {
    std::error_code type_ec;
    if (!entry.is_directory(type_ec)) continue;
    if (const auto step = step_of(entry.path().filename().string())) out.emplace_back(*step, entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

CheckpointManager::CheckpointManager(fs::path root, std::shared_ptr<Checkpointer> checkpointer,
                                     CheckpointManagerOptions options)
    : root_(std::move(root)),
      checkpointer_(std::move(checkpointer)),
      options_(options),
      rank_info_(options.rank_info ? *options.rank_info : rank_info_from_env()) {
  if (!checkpointer_) throw Error("CheckpointManager needs a checkpointer");
  // Temporaries of saves killed before this job started (when the filesystem
  // gave them names): this rank takes its own file's, the coordinator the
  // commit markers' too; only where the writer ran on this host and is gone.
  const std::string own =
      rank_info_.global_rank == 0 ? std::string() : checkpoint_file_name(rank_info_.global_rank);
  try {
    for (const auto& [step, path] : step_dirs(root_)) detail::remove_stale_temporaries(path, own);
  } catch (const IoError&) {
    // a root that cannot be listed fails the first save, with its reason
  }
}

CheckpointManager::~CheckpointManager() {
  close();
}

fs::path CheckpointManager::path_of(std::int64_t step) const {
  return root_ / fmt::format("{}{}", kStepPrefix, step);
}

SaveFutures CheckpointManager::save(std::int64_t step, const StateDict& state_dict, const Kwargs& kwargs) {
  close();  // the previous save's write and pruning
  if (step < 0) throw Error(fmt::format("step {} is negative", step));
  // The directory is scanned once (each committed checkpoint costs a read of
  // every rank's zip directory); later, each commit moves the floor up.
  if (!floor_step_) {
    const auto latest = latest_committed();
    floor_step_ = latest ? latest->step : -1;
  }
  if (step <= *floor_step_)
    throw Error(fmt::format("step {} is not above the newest committed checkpoint (step {} in {})", step,
                            *floor_step_, path_of(*floor_step_).string()));
  auto futures = checkpointer_->save(path_of(step), state_dict, kwargs);
  in_flight_ = step;
  std::promise<void> done;
  auto written = done.get_future();
  after_write_ =
      std::thread([this, step, write = std::move(futures.written), done = std::move(done)]() mutable {
        try {
          write.get();
        } catch (...) {
          done.set_exception(std::current_exception());
          return;
        }
        in_flight_ = -1;
        floor_step_ = step;  // committed: the next save goes above it (read after close() joined here)
        try {
          prune();
        } catch (const std::exception& e) {
          log(LogLevel::warning,
              fmt::format("pruning old checkpoints in {} failed (the new one is committed): {}",
                          root_.string(), e.what()));
        }
        done.set_value();
      });
  return {std::move(futures.staged), std::move(written)};
}

std::vector<CommittedCheckpoint> CheckpointManager::committed() const {
  std::vector<CommittedCheckpoint> out;
  for (const auto& [step, path] : step_dirs(root_))
    if (is_committed(path)) out.push_back({step, path});
  return out;
}

std::optional<CommittedCheckpoint> CheckpointManager::latest_committed() const {
  const auto dirs = step_dirs(root_);
  for (auto it = dirs.rbegin(); it != dirs.rend(); ++it)
    if (is_committed(it->second)) return CommittedCheckpoint{it->first, it->second};
  return std::nullopt;
}

std::optional<std::int64_t> CheckpointManager::restore_latest(const StateDict& target, LoadOptions options) {
  const auto all = committed();
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    try {
      options.state_dict = target;
      checkpointer_->load(it->path, options);
      return it->step;
    } catch (const Error& e) {
      // Damaged since its commit (CorruptCheckpoint), or a file gone (NotFound).
      if (!dynamic_cast<const CorruptCheckpoint*>(&e) && !dynamic_cast<const NotFound*>(&e)) throw;
      log(LogLevel::warning,
          fmt::format("committed checkpoint {} no longer reads back ({}); trying the one before it",
                      it->path.string(), e.what()));
    }
  }
  return std::nullopt;
}

std::vector<fs::path> CheckpointManager::prune() {
  std::vector<fs::path> removed;
  if (rank_info_.global_rank != 0) return removed;
  const auto dirs = step_dirs(root_);
  std::vector<std::pair<std::int64_t, fs::path>> good;
  for (const auto& d : dirs)
    if (is_committed(d.second)) good.push_back(d);
  if (good.empty()) return removed;  // nothing is known good: remove nothing
  const std::int64_t newest = good.back().first;
  const std::size_t keep =
      options_.keep_last_n == 0 ? good.size() : std::max<std::size_t>(options_.keep_last_n, 1);
  std::vector<fs::path> doomed;
  for (std::size_t i = 0; i + keep < good.size(); ++i) doomed.push_back(good[i].second);
  // Debris of failed saves: uncommitted, older than the newest committed one.
  for (const auto& [step, path] : dirs)
    if (step < newest && step != in_flight_ && !is_committed(path)) doomed.push_back(path);
  for (const auto& path : doomed) {
    // The marker goes first: a directory half removed is uncommitted, never
    // mistaken for a good checkpoint.
    std::error_code ec;
    fs::remove(path / kCommitMarkerName, ec);
    fs::remove_all(path, ec);
    if (ec) throw IoError(fmt::format("cannot remove old checkpoint {}: {}", path.string(), ec.message()));
    removed.push_back(path);
  }
  return removed;
}

void CheckpointManager::close() {
  if (after_write_.joinable()) after_write_.join();
}

}  // namespace ckpt
