// Checkpointer: save and load a rank's state dict (upstream's checkpointer.py),
// and the builders that assemble one from a configuration (builder.py).
#pragma once

#include <ckpt/barrier.hpp>
#include <ckpt/checkpoint_reader.hpp>
#include <ckpt/checkpoint_writer.hpp>
#include <ckpt/config.hpp>
#include <ckpt/state_dict.hpp>
#include <ckpt/types.hpp>

#include <filesystem>
#include <future>
#include <memory>
#include <optional>

namespace ckpt {

/// What Checkpointer::load reads and how.
struct LoadOptions {
  /// A target: only its keys are read, tensors in place (see CheckpointReader).
  std::optional<StateDict> state_dict{};
  /// Upstream's default_map_location.
  MapLocation map_location{};
  /// Missing keys are an error (MissingKeys) rather than only reported.
  bool strict = false;
  /// Map the file (copy-on-write) instead of reading it; CPU only.
  bool mmap = false;
  /// Check the CRC-32 of every record read.
  bool verify_crc = false;
};

/// The two stages of a save (upstream's (stage_future, write_future)): the
/// state is copied out (training may change it), the checkpoint is durable.
struct SaveFutures {
  std::future<void> staged;
  std::future<void> written;
};

/// Upstream's Checkpointer.
class Checkpointer {
 public:
  virtual ~Checkpointer() = default;
  /// Saves `state_dict` into the checkpoint directory `path`.
  virtual SaveFutures save(const std::filesystem::path& path, const StateDict& state_dict,
                           const Kwargs& kwargs = {}) = 0;
  /// Loads from the checkpoint directory `path`. Throws MissingKeys ("Checkpoint
  /// at <path> is missing keys: [...]") when `strict` and keys are missing.
  virtual StateDict load(const std::filesystem::path& path, const LoadOptions& options = {},
                         const Kwargs& kwargs = {}) = 0;
  /// Releases resources. Idempotent.
  virtual void close() = 0;
};

/// Saves and loads on the calling thread.
class SyncCheckpointer : public Checkpointer {
 public:
  SyncCheckpointer(std::shared_ptr<CheckpointWriter> writer, std::shared_ptr<CheckpointReader> reader);
  ~SyncCheckpointer() override;

  /// Writes and commits before returning; the futures it returns are already
  /// satisfied (upstream returns None). Errors are thrown here.
  SaveFutures save(const std::filesystem::path& path, const StateDict& state_dict,
                   const Kwargs& kwargs = {}) override;
  StateDict load(const std::filesystem::path& path, const LoadOptions& options = {},
                 const Kwargs& kwargs = {}) override;
  void close() override;

 private:
  std::shared_ptr<CheckpointWriter> writer_;
  std::shared_ptr<CheckpointReader> reader_;
  bool closed_ = false;
};

/// Loads through `reader` and applies `strict` (shared by every checkpointer).
StateDict load_checked(CheckpointReader& reader, const std::filesystem::path& path,
                       const LoadOptions& options, const Kwargs& kwargs);

/// A SyncCheckpointer with the barrier `config.barrier_config` names (none by
/// default), rank from `rank_info` or else rank_info_from_env(), and
/// `commit_hook` (may be null).
std::unique_ptr<SyncCheckpointer> make_sync_checkpointer(const CheckpointerConfig& config = {},
                                                         std::optional<RankInfo> rank_info = std::nullopt,
                                                         std::shared_ptr<WriterHook> commit_hook = nullptr);

}  // namespace ckpt
