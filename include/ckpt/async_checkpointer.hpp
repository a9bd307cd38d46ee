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
#include <ckpt/staging.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <concepts>
#include <filesystem>
#include <memory>
#include <type_traits>

namespace ckpt {

namespace detail {
class Event;
}

/// A write in progress: what async_save hands back once the state is staged.
/// Copies share the one write.
class PendingWrite {
 public:
  using Signature = void(std::exception_ptr);

  PendingWrite() = default;
  PendingWrite(std::shared_ptr<detail::Event> event, std::filesystem::path path);

  /// Completes when the checkpoint is durable and committed (null), or with
  /// the write's error. Completes on the handler's associated executor (for
  /// use_awaitable, the coroutine's); a handler with none runs on the thread
  /// that saw the write finish. While parked it keeps work on that executor.
  /// Honours per-operation cancellation: a cancelled wait completes at once
  /// with operation_aborted (boost::system::system_error), and the write goes
  /// on. Any completion token works; there is no default token.
  template <boost::asio::completion_token_for<Signature> Token>
  auto async_wait(Token&& token) const {
    return boost::asio::async_initiate<Token, Signature>(
        [this](auto handler) { do_wait(boost::asio::any_completion_handler<Signature>(std::move(handler))); },
        token);
  }
  /// Blocks until durable; throws the write's error.
  void wait() const;
  /// Whether the write has finished (either way).
  bool done() const;
  const std::filesystem::path& path() const { return path_; }

 private:
  void do_wait(boost::asio::any_completion_handler<Signature> handler) const;

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
  /// operation_aborted. Completes on the handler's associated executor (for
  /// use_awaitable, the coroutine's; a handler with none runs on the
  /// checkpointer's strand). Any completion token works; there is no default
  /// (Boost 1.81's any_io_executor names none), so one is always passed.
  template <boost::asio::completion_token_for<SaveSignature> Token>
  auto async_save(std::filesystem::path path, StateDict state_dict, Kwargs kwargs, Token&& token) {
    return boost::asio::async_initiate<Token, SaveSignature>(
        [this](auto handler, std::filesystem::path p, StateDict sd, Kwargs k) {
          do_save(std::move(p), std::move(sd), std::move(k),
                  boost::asio::any_completion_handler<SaveSignature>(std::move(handler)));
        },
        token, std::move(path), std::move(state_dict), std::move(kwargs));
  }
  /// The same with no keyword arguments: `async_save(path, sd, use_awaitable)`.
  template <boost::asio::completion_token_for<SaveSignature> Token>
  requires(!std::same_as<std::decay_t<Token>, Kwargs>) auto async_save(std::filesystem::path path,
                                                                       StateDict state_dict, Token&& token) {
    return async_save(std::move(path), std::move(state_dict), Kwargs{}, std::forward<Token>(token));
  }

  /// The blocking form: {staged, written} futures, as upstream's
  /// (stage_future, write_future). Errors arrive through the futures.
  SaveFutures save(const std::filesystem::path& path, const StateDict& state_dict,
                   const Kwargs& kwargs = {}) override;
  /// As SyncCheckpointer::load (loading is synchronous, as upstream).
  StateDict load(const std::filesystem::path& path, const LoadOptions& options = {},
                 const Kwargs& kwargs = {}) override;
  /// Waits for a write in progress (up to the process config's write_timeout),
  /// then closes the stager and the child. Idempotent. Blocking: it asks the
  /// checkpointer's strand which write is the last; called on a thread that
  /// runs the executor (or once the io_context has stopped) it looks itself,
  /// so call it there only when no save is in progress.
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
