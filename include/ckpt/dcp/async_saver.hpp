// dcp::AsyncSaver: the DCP save the design draws (upstream's dcp.async_save
// with a stager and a checkpoint process of its own). A save blocks its caller
// only while the rank's part of the state dict is staged; the writer child
// writes the rank's data file from the staging arena, and the save's
// collectives run on a thread of the saver's, over a process group of its own.
//
//   ckpt::dcp::AsyncSaver saver(io.get_executor());          // every rank, together
//   auto written = co_await saver.async_save(sd, {.checkpoint_id = dir}, asio::use_awaitable);
//   ...train on: sd's tensors may change...
//   co_await written.async_wait(asio::use_awaitable);      // committed, or the CheckpointException
//
// A save, step by step:
//   1. on the caller's thread: the state dict is flattened (dcp::save's rules)
//      and, for tensors on an accelerator, a fence is recorded on their
//      streams;
//   2. on the saver's strand, once the previous save's write has finished:
//      every tensor, local shard and value of the rank is staged into the
//      saver's arena (shared memory, kept across saves and grown only when
//      needed, page-locked where the limits allow), each as the torch.save
//      archive its `.distcp` file will hold; the save then completes with a
//      PendingWrite, and the caller may change its tensors;
//   3. on the saver's save thread: save_state_dict over the staged state dict
//      and the saver's group (plan, with plan caching; write; finish), where
//      writing this rank's data file is the writer child's: it writes the
//      staged archives from the arena, durably; the coordinator then writes
//      `.metadata`, the commit point. The PendingWrite completes then, or with
//      the CheckpointException that every rank raises alike (a rank whose
//      child died, whose write failed, or that died or hung is named).
// A storage writer other than a FileSystemWriter (or a planner whose data is
// not the staged state dict's) is run on the save thread as it is, with the
// staged copy: the save is still asynchronous, written by this process.
#pragma once

#include <ckpt/async_checkpointer.hpp>
#include <ckpt/checkpoint_process.hpp>
#include <ckpt/checkpointer.hpp>
#include <ckpt/config.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/dist.hpp>
#include <ckpt/state_dict.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <cstdint>
#include <memory>
#include <string>

namespace ckpt::dcp {

struct AsyncSaverConfig {
  /// The arena: use_pinned_memory page-locks it (mlock, and cudaHostRegister
  /// for device tensors) where allowed; use_non_blocking_copy copies from
  /// devices without blocking their streams. (Staging always runs on the
  /// saver's strand while the caller waits: use_async_staging and
  /// use_shared_memory are not read.)
  CheckpointStagerConfig staging;
  /// The writer child: its timeouts (write_timeout bounds one data file) and
  /// niceness.
  CheckpointProcessConfig process;
  WriterOptions writer;
  /// The group whose ranks save together. Null: the default group, or none
  /// (this process saves alone) when there is no default group.
  std::shared_ptr<dist::ProcessGroupHandle> process_group;
  /// Whether the saver's collectives run over a group of their own, made at
  /// construction over `process_group`'s store (dist::new_group, a collective:
  /// every rank constructs its saver together), so that they never interleave
  /// with training's. False: over `process_group` itself.
  bool own_group = true;
  /// The saver's DefaultSavePlanner (used when a save names none).
  bool dedup_replicated = true;
  bool enable_plan_caching = true;
};

class AsyncSaver {
 public:
  using executor_type = boost::asio::any_io_executor;
  using SaveSignature = void(std::exception_ptr, PendingWrite);

  /// Starts the writer child, and with several ranks makes the saver's group
  /// (see AsyncSaverConfig::own_group). Completions without an executor of
  /// their own run on `executor`'s strand, which some thread must run.
  explicit AsyncSaver(executor_type executor, AsyncSaverConfig config = {});
  /// close().
  ~AsyncSaver();
  AsyncSaver(const AsyncSaver&) = delete;
  AsyncSaver& operator=(const AsyncSaver&) = delete;

  /// The save, as an asynchronous operation (steps above): completes once the
  /// rank's part is staged, with a PendingWrite for the committed checkpoint
  /// (its error: the CheckpointException every rank raises alike). Every rank
  /// of the group calls it, in the same order. `options` as for dcp::save;
  /// process_group, when given, is saved over instead of the saver's group
  /// (its collectives then run on the save thread: keep training off that
  /// group meanwhile), and no_dist saves alone. A planner or storage writer
  /// passed in `options` must live until the write completes. A staging
  /// error (a closed saver, an unsupported value) completes the operation
  /// with it. A PendingWrite's completion handler without an executor runs
  /// on the save thread: it must not block on a later save or close the saver.
  template <boost::asio::completion_token_for<SaveSignature> Token>
  auto async_save(StateDict state_dict, SaveOptions options, Token&& token) {
    return boost::asio::async_initiate<Token, SaveSignature>(
        [this](auto handler, StateDict sd, SaveOptions o) {
          do_save(std::move(sd), std::move(o),
                  boost::asio::any_completion_handler<SaveSignature>(std::move(handler)));
        },
        token, std::move(state_dict), std::move(options));
  }

  /// The blocking form (upstream's AsyncSaveResponse): {staged, written}.
  /// Errors arrive through the futures. Completed on the saver's own threads:
  /// it works from the thread that runs the executor, too.
  SaveFutures save(const StateDict& state_dict, const SaveOptions& options);

  /// Waits for the write in progress (up to the child's write timeout and the
  /// group's timeout), then stops the save thread and the child. Idempotent.
  void close();

  /// The arena's size (the largest rank part staged so far, in pages).
  std::uint64_t arena_size() const;
  /// Whether the arena is page-locked.
  bool pinned() const;
  /// The writer child's pid (-1 when none runs).
  int writer_pid() const;
  /// The group the saver's collectives run over (null: it saves alone).
  std::shared_ptr<dist::ProcessGroupHandle> process_group() const;

 private:
  void do_save(StateDict state_dict, SaveOptions options,
               boost::asio::any_completion_handler<SaveSignature> handler);
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace ckpt::dcp
