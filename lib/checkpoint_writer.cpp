#include <ckpt/checkpoint_writer.hpp>

#include <ckpt/format.hpp>

#include "file_writer.hpp"

#include <fmt/format.h>

#include <future>
#include <thread>

namespace ckpt {

std::string checkpoint_file_name(std::int64_t rank) {
  return fmt::format("checkpoint_{}.pt", rank);
}

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
  make_directory(path);
  write_file(path / checkpoint_file_name(rank_info_.global_rank), state_dict.to_ivalue());
  commit(path, kwargs);
}

void CheckpointWriter::write_staged(const std::filesystem::path& path, StagedImage& image,
                                    const Kwargs& kwargs) {
  make_directory(path);
  detail::write_durably(path / checkpoint_file_name(rank_info_.global_rank), {},
                        [&](int fd, bool direct, const std::filesystem::path& temp) {
                          return detail::write_image(fd, direct, temp, image.data, image.records,
                                                     image.cd_offset);
                        });
  commit(path, kwargs);
}

void CheckpointWriter::commit(const std::filesystem::path& path, const Kwargs& kwargs) {
  if (commit_hook_) commit_hook_->pre_commit(path, kwargs);
  if (barrier_) {
    try {
      run_barrier();
    } catch (const Timeout& e) {
      throw Timeout(fmt::format("{} (rank {} of {}, checkpoint {}: written but not committed)", e.what(),
                                rank_info_.global_rank, rank_info_.global_world_size, path.string()));
    }
  }
  if (commit_hook_) commit_hook_->post_commit(path, kwargs);
}

void CheckpointWriter::run_barrier() {
  // The barrier runs on a thread of its own so that a barrier that never
  // returns cannot hold this one past the deadline. Such a thread is left
  // behind (it owns a reference to the barrier); nothing here waits for it.
  auto done = std::make_shared<std::promise<void>>();
  auto result = done->get_future();
  std::thread([barrier = barrier_, done] {
    try {
      barrier->execute_barrier();
      done->set_value();
    } catch (...) {
      done->set_exception(std::current_exception());
    }
  }).detach();
  if (result.wait_for(config_.write_barrier_timeout) != std::future_status::ready)
    throw Timeout(fmt::format("Timed out after {} ms waiting at the commit barrier",
                              config_.write_barrier_timeout.count()));
  result.get();
}

void CheckpointWriter::close() {}

}  // namespace ckpt
