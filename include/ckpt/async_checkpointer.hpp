// AsyncCheckpointer: a save blocks the trainer only while the state is staged
// (copied into shared memory); the writer child makes it durable meanwhile
// (upstream's AsyncCheckpointer).
//
//   auto ck = ckpt::make_async_checkpointer(io.get_executor());
//   auto written = co_await ck->async_save(path, sd, {}, asio::use_awaitable);  // staged
//   ...train on...
//   co_await written.async_wait(asio::use_awaitable);                         // durable
#pragma once

#include <ckpt/checkpoint_process.hpp>
#include <ckpt/checkpointer.hpp>
#include <ckpt/detail/event.hpp>
#include <ckpt/staging.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <filesystem>
#include <memory>

namespace ckpt {

/// A write in progress: what async_save hands back once the state is staged.
class PendingWrite {
 public:
  using Signature = void(std::exception_ptr);

  PendingWrite() = default;
  PendingWrite(std::shared_ptr<detail::Event> event, std::filesystem::path path)
      : event_(std::move(event)), path_(std::move(path)) {}

  /// Completes when the checkpoint is durable and committed, or with the
  /// write's error.
  template <boost::asio::completion_token_for<Signature> Token =
                boost::asio::default_completion_token_t<boost::asio::any_io_executor>>
  auto async_wait(Token&& token = {}) const {
    return event_->async_wait(std::forward<Token>(token));
  }
  /// Blocks until durable; throws the write's error.
  void wait() const;
  bool done() const { return event_ && event_->done(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::shared_ptr<detail::Event> event_;
  std::filesystem::path path_;
};

class AsyncCheckpointer : public Checkpointer {
 public:
  using executor_type = boost::asio::any_io_executor;
  using SaveSignature = void(std::exception_ptr, PendingWrite);

  /// Saves are sequenced on a strand of `executor`, which must be run by some
  /// thread (for the blocking save(), by another thread than the caller's).
  AsyncCheckpointer(executor_type executor, std::shared_ptr<CheckpointStager> checkpoint_stager,
                    std::shared_ptr<CheckpointProcess> checkpoint_process,
                    std::shared_ptr<CheckpointReader> reader);
  ~AsyncCheckpointer() override;

  /// The save, as an asynchronous operation. It first waits for the previous
  /// write (if that failed, this save fails with its error, once), then stages
  /// `state_dict`, hands the image to the writer child and completes — with a
  /// PendingWrite for the durable write. After completion the caller may change
  /// its tensors. Cancellation before staging starts fails it with
  /// operation_aborted. Any completion token works.
  template <boost::asio::completion_token_for<SaveSignature> Token =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_save(std::filesystem::path path, StateDict state_dict, Kwargs kwargs = {}, Token&& token = {}) {
    return boost::asio::async_initiate<Token, SaveSignature>(
        [this](auto handler, std::filesystem::path p, StateDict sd, Kwargs k) {
          do_save(std::move(p), std::move(sd), std::move(k),
                  boost::asio::any_completion_handler<SaveSignature>(std::move(handler)));
        },
        token, std::move(path), std::move(state_dict), std::move(kwargs));
  }

  /// The blocking form: {staged, written} futures, as upstream's
  /// (stage_future, write_future). Errors arrive through the futures.
  SaveFutures save(const std::filesystem::path& path, const StateDict& state_dict,
                   const Kwargs& kwargs = {}) override;
  /// As SyncCheckpointer::load (loading is synchronous, as upstream).
  StateDict load(const std::filesystem::path& path, const LoadOptions& options = {},
                 const Kwargs& kwargs = {}) override;
  /// Waits for a write in progress (up to the writer's shutdown timeout), then
  /// closes the stager and the child. Idempotent.
  void close() override;

  executor_type get_executor() const;
  CheckpointStager& stager() const;
  CheckpointProcess& process() const;

 private:
  void do_save(std::filesystem::path path, StateDict state_dict, Kwargs kwargs,
               boost::asio::any_completion_handler<SaveSignature> handler);

  friend std::unique_ptr<AsyncCheckpointer> make_async_checkpointer(const CheckpointerConfig&,
                                                                    std::optional<RankInfo>, WriterOptions);
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

/// An AsyncCheckpointer on `executor` with a DefaultStager(config.staging_config)
/// and a CheckpointProcess whose child builds its writer from
/// config.writer_config and config.barrier_config (upstream's builder ignores
/// both). Rank from `rank_info`, else rank_info_from_env().
std::unique_ptr<AsyncCheckpointer> make_async_checkpointer(boost::asio::any_io_executor executor,
                                                           const CheckpointerConfig& config = {},
                                                           std::optional<RankInfo> rank_info = std::nullopt,
                                                           WriterOptions writer_options = {});

/// The same on an io_context of its own, run by one thread of its own: for
/// code that only uses the blocking save().
std::unique_ptr<AsyncCheckpointer> make_async_checkpointer(const CheckpointerConfig& config = {},
                                                           std::optional<RankInfo> rank_info = std::nullopt,
                                                           WriterOptions writer_options = {});

}  // namespace ckpt
