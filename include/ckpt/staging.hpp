// Staging: copying a state dict out of the training tensors, into one
// shared-memory arena laid out exactly as the checkpoint file will be
// (upstream's staging.py). Once staging completes the trainer may change its
// tensors: what is written is the state at the moment of the save.
#pragma once

#include <ckpt/config.hpp>
#include <ckpt/format.hpp>
#include <ckpt/state_dict.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

namespace ckpt {

namespace detail {
class Arena;
class DeviceFences;
}  // namespace detail

/// What staging must come after on accelerators: an event recorded on the
/// current stream of every device a state dict has tensors on, on the thread
/// that asks for the save (only there are the trainer's current streams
/// known). Staging started later, on any thread, copies after the work that
/// was queued then. Empty for CPU tensors, and on a CPU-only libtorch.
class StagingFences {
 public:
  StagingFences() = default;
  /// Records the fences of `state_dict` now, on this thread. Throws
  /// Unsupported for tensors on a device this libtorch cannot stage from.
  static StagingFences record(const StateDict& state_dict);
  bool empty() const;
  /// The fences themselves (null when empty).
  const detail::DeviceFences* get() const { return fences_.get(); }

 private:
  std::shared_ptr<const detail::DeviceFences> fences_;
};

/// One record of a staged file image: the format's one record description
/// (name, header and data offsets, size; the CRC is computed by the writer).
using StagedRecord = RecordInfo;

/// A staged state dict: the checkpoint file's image in the stager's arena
/// (local headers with their CRC fields still zero, record data, no central
/// directory yet), and the staged state as a StateDict whose tensors point into
/// the arena. Valid until the stager stages again or closes.
struct StagedCheckpoint {
  std::shared_ptr<detail::Arena> arena;  ///< null for a stager without an arena
  std::vector<RecordInfo> records;
  std::uint64_t cd_offset = 0;  ///< where the central directory goes
  StateDict state_dict;
};

/// Upstream's CheckpointStager: tests and users may put in their own.
class CheckpointStager {
 public:
  using Signature = void(std::exception_ptr, StagedCheckpoint);
  virtual ~CheckpointStager() = default;

  /// Stages `state_dict` after the work queued on its devices' current
  /// streams now (fences recorded on this thread). Completes with the staged
  /// checkpoint, or an exception, on the handler's associated executor
  /// (DefaultStager: a handler with none runs on the stager's strand). A token
  /// is always passed.
  template <boost::asio::completion_token_for<Signature> Token>
  auto async_stage(const StateDict& state_dict, Token&& token) {
    return boost::asio::async_initiate<Token, Signature>(
        [this](auto handler, StateDict sd) {
          record_and_stage(std::move(sd), boost::asio::any_completion_handler<Signature>(std::move(handler)));
        },
        token, state_dict);
  }
  /// The same after `fences` recorded earlier, maybe on another thread (the
  /// asynchronous checkpointer records them when the save is asked for).
  template <boost::asio::completion_token_for<Signature> Token>
  auto async_stage(const StateDict& state_dict, StagingFences fences, Token&& token) {
    return boost::asio::async_initiate<Token, Signature>(
        [this](auto handler, StateDict sd, StagingFences f) {
          do_stage(std::move(sd), std::move(f),
                   boost::asio::any_completion_handler<Signature>(std::move(handler)));
        },
        token, state_dict, std::move(fences));
  }
  /// Stages and waits (the blocking form).
  StagedCheckpoint stage(const StateDict& state_dict);
  /// Releases what the stager holds. Idempotent.
  virtual void close() = 0;

 protected:
  /// Stages `state_dict` after `fences` and completes `handler`.
  virtual void do_stage(StateDict state_dict, StagingFences fences,
                        boost::asio::any_completion_handler<Signature> handler) = 0;

 private:
  void record_and_stage(StateDict state_dict, boost::asio::any_completion_handler<Signature> handler);
};

/// The default stager: one arena in shared memory (memfd), allocated and
/// touched once, kept across saves, grown only for a larger state dict; staging
/// runs on a strand that owns the arena, on the stager's own threads when
/// `use_async_staging`, else on the caller's thread. Large state dicts are
/// copied by two threads.
class DefaultStager : public CheckpointStager {
 public:
  explicit DefaultStager(CheckpointStagerConfig config = {});
  ~DefaultStager() override;

  /// Allocates and touches the arena for a file of `bytes` now, before the
  /// first save, off the training thread's critical path.
  void reserve(std::uint64_t bytes);
  /// The same, with the size a dry run over `state_dict` gives.
  void reserve_for(const StateDict& state_dict);
  /// The arena's size (the largest file staged so far, rounded to pages).
  std::uint64_t arena_size() const;
  /// Whether the arena is page-locked.
  bool pinned() const;
  void close() override;

 protected:
  void do_stage(StateDict state_dict, StagingFences fences,
                boost::asio::any_completion_handler<Signature> handler) override;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

/// The size of the file `state_dict` makes (a dry run: no tensor byte is read).
std::uint64_t checkpoint_file_size(const StateDict& state_dict);

}  // namespace ckpt
