// Storage layers of the DCP core (upstream's StorageWriter / StorageReader) and
// the filesystem ones.
//
// On disk, a checkpoint directory holds one data file per rank that wrote,
// `__<rank>_<token>.distcp`, and `.metadata`, written last and atomically by
// the coordinator: a checkpoint exists once `.metadata` does.
//   - A data file is a PyTorch zip archive (torch.load reads it: a dict from
//     item names to tensor chunks and values) written through ckpt's format:
//     records aligned to 4 KiB, each with its CRC-32, fsynced before the save
//     goes on.
//   - `.metadata` is JSON ("format": "ckpt-dcp", "version": 1): every key's
//     dtype, size and chunks, and where each chunk's bytes lie (file, offset,
//     length, CRC-32). File names in it are plain names inside the directory;
//     anything else is refused as corrupt.
//   - Saving into a directory that already holds a checkpoint writes data files
//     under a new token: the old checkpoint stays whole until the new
//     `.metadata` replaces it; its files are removed after that.
#pragma once

#include <ckpt/dcp/metadata.hpp>
#include <ckpt/dcp/planner.hpp>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <future>
#include <optional>
#include <string>
#include <vector>

namespace ckpt::dcp {

class StorageWriter {
 public:
  virtual ~StorageWriter() = default;
  /// Starts a new save (to `checkpoint_id` when given).
  virtual void reset(const std::optional<std::filesystem::path>& checkpoint_id = std::nullopt) = 0;
  virtual void set_up_storage_writer(bool is_coordinator) = 0;
  virtual SavePlan prepare_local_plan(SavePlan plan) = 0;
  /// On the coordinator: every rank's plan (index = rank).
  virtual std::vector<SavePlan> prepare_global_plan(std::vector<SavePlan> plans) = 0;
  /// Writes this rank's items durably; the future holds one result per item.
  virtual std::future<std::vector<WriteResult>> write_data(const SavePlan& plan, SavePlanner& planner) = 0;
  /// On the coordinator, once every rank's data is durable: records the
  /// checkpoint (the commit point). `results[r]` are rank r's.
  virtual void finish(const Metadata& metadata, const std::vector<std::vector<WriteResult>>& results) = 0;
  /// Whether `checkpoint_id` names a place this writer can save to.
  virtual bool validate_checkpoint_id(const std::filesystem::path& checkpoint_id) const = 0;
};

class StorageReader {
 public:
  virtual ~StorageReader() = default;
  virtual void reset(const std::optional<std::filesystem::path>& checkpoint_id = std::nullopt) = 0;
  /// The checkpoint's metadata (every rank reads it).
  virtual CheckpointMetadata read_metadata() = 0;
  virtual void set_up_storage_reader(const CheckpointMetadata& metadata, bool is_coordinator) = 0;
  virtual LoadPlan prepare_local_plan(LoadPlan plan) = 0;
  virtual std::vector<LoadPlan> prepare_global_plan(std::vector<LoadPlan> plans) = 0;
  /// Reads every item of `plan` into the planner's destinations.
  virtual std::future<void> read_data(const LoadPlan& plan, LoadPlanner& planner) = 0;
  virtual bool validate_checkpoint_id(const std::filesystem::path& checkpoint_id) const = 0;
};

/// The name of a checkpoint directory's metadata file.
inline constexpr const char* kMetadataFileName = ".metadata";
/// The version of the metadata format this build writes (and the newest it reads).
inline constexpr int kMetadataVersion = 1;

struct FileSystemWriterOptions {
  /// fsync data files, `.metadata` and the directory (off only for scratch data).
  bool sync_files = true;
  /// Write data files with O_DIRECT where the filesystem accepts it.
  bool direct_io = true;
};

/// Saves to a directory (created when missing).
class FileSystemWriter : public StorageWriter {
 public:
  explicit FileSystemWriter(std::filesystem::path path, FileSystemWriterOptions options = {});
  void reset(const std::optional<std::filesystem::path>& checkpoint_id = std::nullopt) override;
  void set_up_storage_writer(bool is_coordinator) override;
  SavePlan prepare_local_plan(SavePlan plan) override;
  std::vector<SavePlan> prepare_global_plan(std::vector<SavePlan> plans) override;
  std::future<std::vector<WriteResult>> write_data(const SavePlan& plan, SavePlanner& planner) override;
  void finish(const Metadata& metadata, const std::vector<std::vector<WriteResult>>& results) override;
  bool validate_checkpoint_id(const std::filesystem::path& checkpoint_id) const override;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  FileSystemWriterOptions options_;
};

/// Loads from a directory a FileSystemWriter saved to. Everything read is
/// checked: the metadata's format, version and file names; every chunk's
/// bounds against its file; the CRC-32 of every chunk read whole.
class FileSystemReader : public StorageReader {
 public:
  explicit FileSystemReader(std::filesystem::path path);
  void reset(const std::optional<std::filesystem::path>& checkpoint_id = std::nullopt) override;
  CheckpointMetadata read_metadata() override;
  void set_up_storage_reader(const CheckpointMetadata& metadata, bool is_coordinator) override;
  LoadPlan prepare_local_plan(LoadPlan plan) override;
  std::vector<LoadPlan> prepare_global_plan(std::vector<LoadPlan> plans) override;
  std::future<void> read_data(const LoadPlan& plan, LoadPlanner& planner) override;
  bool validate_checkpoint_id(const std::filesystem::path& checkpoint_id) const override;
  const std::filesystem::path& path() const { return path_; }
  /// Bytes read from storage since construction: metadata, chunk data and the
  /// data files' own headers where a non-tensor value was read.
  std::uint64_t bytes_read() const { return bytes_read_; }

 private:
  std::filesystem::path path_;
  CheckpointMetadata metadata_;
  std::atomic<std::uint64_t> bytes_read_{0};
};

/// Reads and checks a checkpoint directory's `.metadata` (NotFound when there
/// is none, CorruptCheckpoint naming the fault when it is not sound).
CheckpointMetadata read_checkpoint_metadata(const std::filesystem::path& directory);

}  // namespace ckpt::dcp
