// The writer child process of the asynchronous checkpointer (upstream's
// checkpoint_process.py): started once, reused for every save, replaced when it
// dies. The protocol it speaks is described in lib/async/checkpoint_process.cpp.
#pragma once

#include <ckpt/barrier.hpp>
#include <ckpt/checkpoint_writer.hpp>
#include <ckpt/config.hpp>
#include <ckpt/staging.hpp>
#include <ckpt/types.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <chrono>
#include <filesystem>
#include <memory>
#include <vector>

namespace ckpt {

namespace detail {
class Event;
}

/// What the child is and how it starts (upstream's subprocess_init_fn and
/// checkpoint_writer_init_fn, in C++: a writer executable built on
/// ckpt::writer_main, and the arguments that travel to it).
struct WriterOptions {
  /// The writer executable. Empty: $CKPT_WRITER, else `ckpt-writer` beside the
  /// running program, else beside libckpt's install prefix (bin/).
  std::filesystem::path executable;
  /// Passed to the child's init function (upstream's subprocess_init_args).
  std::vector<Arg> subprocess_init_args;
  /// Passed to the child's writer factory (checkpoint_writer_init_args).
  Kwargs checkpoint_writer_init_args;
};

/// The executable WriterOptions{}.executable resolves to.
std::filesystem::path default_writer_executable();

/// A DCP data file staged in an arena (dcp::AsyncSaver): archives one after
/// another, each a torch.save archive laid out as staging lays out a file
/// (local headers with CRC fields zero, then data) or bytes written as they
/// are. The file gets them in this order, each on the next 4096-byte boundary.
struct StagedArchives {
  struct Archive {
    std::uint64_t offset = 0;         ///< where it starts in the arena (a multiple of 4096)
    std::uint64_t cd_offset = 0;      ///< a zip archive's directory offset, from its start
    std::vector<RecordInfo> records;  ///< a zip archive's records, offsets from its start
    std::uint64_t raw_size = 0;       ///< with no records: bytes written as they are
  };
  std::shared_ptr<detail::Arena> arena;
  std::vector<Archive> archives;
};

/// Upstream's CheckpointProcess: owns the writer child.
class CheckpointProcess {
 public:
  using executor_type = boost::asio::any_io_executor;
  using Signature = void(std::exception_ptr);

  /// Starts the child now (asynchronously): spawn, init, ping, all within
  /// `config.subprocess_init_timeout`. The child builds its writer from
  /// `writer_config`, `barrier_config` and `rank_info` with its writer factory.
  CheckpointProcess(executor_type executor, RankInfo rank_info, CheckpointProcessConfig config = {},
                    CheckpointWriterConfig writer_config = {}, BarrierConfig barrier_config = {},
                    WriterOptions options = {});
  virtual ~CheckpointProcess();
  CheckpointProcess(const CheckpointProcess&) = delete;
  CheckpointProcess& operator=(const CheckpointProcess&) = delete;

  /// Completes when the child answered its first ping (upstream's
  /// process_creation_future), or with the start's error (Timeout "Timed out
  /// ...", WriterProcessError).
  /// Completes on the handler's associated executor; honours per-operation
  /// cancellation (operation_aborted; the start goes on).
  template <boost::asio::completion_token_for<Signature> Token>
  auto async_wait_ready(Token&& token) {
    return boost::asio::async_initiate<Token, Signature>(
        [this](auto handler) {
          do_wait_ready(boost::asio::any_completion_handler<Signature>(std::move(handler)));
        },
        token);
  }

  /// Has the child write `staged` to `path/checkpoint_<rank>.pt` and commit it
  /// (its writer's pre_commit, barrier, post_commit, with `kwargs`). Completes
  /// when the file is durable, or with the error: the child's own (its type
  /// kept for ckpt errors, else WriterProcessError with its text), or
  /// WriterProcessError "Child process terminated unexpectedly" naming the
  /// signal or exit status and the path. A dead child is replaced at the next
  /// write. One write at a time.
  /// Completes on the handler's associated executor.
  template <boost::asio::completion_token_for<Signature> Token>
  auto async_write(StagedCheckpoint staged, std::filesystem::path path, Kwargs kwargs, Token&& token) {
    return boost::asio::async_initiate<Token, Signature>(
        [this](auto handler, StagedCheckpoint s, std::filesystem::path p, Kwargs k) {
          do_write(std::move(s), std::move(p), std::move(k),
                   boost::asio::any_completion_handler<Signature>(std::move(handler)));
        },
        token, std::move(staged), std::move(path), std::move(kwargs));
  }

  /// Has the child write `staged` into `file` durably (a temporary file,
  /// fsynced, renamed over `file`, the directory fsynced; `options` say
  /// whether with O_DIRECT and fsync), with no hooks and no barrier: a DCP
  /// data file, whose commit is someone else's. Completes as async_write does,
  /// with its errors; a dead child leaves no temporary. One write at a time.
  template <boost::asio::completion_token_for<Signature> Token>
  auto async_write_archives(StagedArchives staged, std::filesystem::path file, WriteOptions options,
                            Token&& token) {
    return boost::asio::async_initiate<Token, Signature>(
        [this](auto handler, StagedArchives s, std::filesystem::path f, WriteOptions o) {
          do_write_archives(std::move(s), std::move(f), o,
                            boost::asio::any_completion_handler<Signature>(std::move(handler)));
        },
        token, std::move(staged), std::move(file), options);
  }
  /// Tells the child to exit, waits up to the shutdown timeout, then kills it;
  /// reaps it. Idempotent; a write in progress fails. Blocking: the shutdown
  /// runs on the process's strand (the child's exit awaited through a pidfd);
  /// called on a thread that runs the executor, or once it stopped, it runs
  /// on the calling thread.
  virtual void close();
  /// The child's pid, or -1 when there is none.
  int pid() const;
  /// The configuration it was made with (a fake made without a child: the
  /// defaults).
  const CheckpointProcessConfig& config() const;

 protected:
  /// For fakes in tests: no child at all; ready at once.
  explicit CheckpointProcess(executor_type executor);
  virtual void do_write(StagedCheckpoint staged, std::filesystem::path path, Kwargs kwargs,
                        boost::asio::any_completion_handler<Signature> handler);
  virtual void do_write_archives(StagedArchives staged, std::filesystem::path file, WriteOptions options,
                                 boost::asio::any_completion_handler<Signature> handler);

 private:
  void do_wait_ready(boost::asio::any_completion_handler<Signature> handler);

  struct Impl;
  std::shared_ptr<Impl> impl_;
  std::shared_ptr<detail::Event> ready_;
};

}  // namespace ckpt
