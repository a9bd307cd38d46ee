// Storage layers of the DCP core (upstream's StorageWriter / StorageReader) and
// the filesystem ones.
//
// On disk, a checkpoint directory is PyTorch's own DCP format, which Python's
// torch.distributed.checkpoint reads and writes: `.metadata` (the pickled
// Metadata dataclass, written last by the coordinator: a checkpoint exists
// once it does) and one data file per rank, `__<rank>_<token>.distcp`.
//   - A data file is a concatenation of whole torch.save archives, one per
//     tensor chunk or value; `.metadata` says where each lies (file, offset,
//     length). ckpt starts each archive on a 4 KiB boundary, so every tensor
//     record is 4 KiB-aligned in its file, and every record carries its
//     CRC-32 (Python ignores both; ckpt's reader and `ckpt verify` check the
//     CRCs). Data files are fsynced before `.metadata` is written.
//   - `.metadata` is pickled with the class paths of the torch generation
//     asked for (MetadataDialect: torch >= 2.4 by default), written to a
//     temporary file, fsynced, renamed and its directory fsynced.
//   - Saving into a directory that already holds a checkpoint writes data files
//     under a new token: the old checkpoint stays whole until the new
//     `.metadata` replaces it; its files are removed after that.
// The reader also takes directories of ckpt's earlier JSON dialect
// (`.metadata` JSON, "format": "ckpt-dcp"), which nothing writes any more.
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
  /// The checkpoint's metadata: read on every rank, or, where
  /// shares_metadata(), on the coordinator alone.
  virtual CheckpointMetadata read_metadata() = 0;
  /// Whether the coordinator alone may read the metadata and send each rank
  /// the part its planner asks for (LoadPlanner::metadata_request): a rank's
  /// load then costs O(its items), not O(the checkpoint), and shared storage
  /// serves one metadata read instead of one per rank. read_metadata is then
  /// not called on the other ranks, and set_up_storage_reader gets the part.
  /// Default false: every rank reads it, as upstream's readers expect.
  virtual bool shares_metadata() const { return false; }
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

/// Which readers a FileSystemWriter's `.metadata` is pickled for: the class
/// paths it names exist in those torch versions.
enum class MetadataDialect {
  torch_2_4,   ///< torch >= 2.4 (the default): 2.3+ class paths and StorageMeta
  torch_2_0,   ///< torch 2.0 to 2.3: TensorProperties of _shard, no StorageMeta
  torch_1_13,  ///< torch 1.13's torch.distributed._shard.checkpoint; no planner data
};

struct FileSystemWriterOptions {
  /// fsync data files, `.metadata` and the directory (off only for scratch data).
  bool sync_files = true;
  /// Write data files with O_DIRECT where the filesystem accepts it.
  bool direct_io = true;
  /// The torch generation whose readers `.metadata` is written for.
  MetadataDialect dialect = MetadataDialect::torch_2_4;
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
  const FileSystemWriterOptions& options() const { return options_; }

 private:
  std::filesystem::path path_;
  FileSystemWriterOptions options_;
};

struct FileSystemReaderOptions {
  /// Reads in flight at once during read_data: threads, the caller's among
  /// them (1: the caller's thread alone). Cold storage needs several to reach
  /// its bandwidth.
  int read_threads = 4;
  /// The most one read asks for: a chunk read whole is read in pieces of this
  /// size, spread over the threads (each piece's CRC-32 computed by the thread
  /// that read it and combined).
  std::size_t read_size = std::size_t{4} << 20;
  /// Two ranges of one chunk at most this many bytes apart are read by one
  /// vectored read, the gap read into scratch memory (a column shard of
  /// narrow rows: one read for many rows instead of one per row). 0: only the
  /// bytes asked for are read.
  std::size_t coalesce_gap = 4096;
  /// Check a part of a record read (a resharded or partial load) against the
  /// per-block CRC-32s ckpt's writers keep after a data file's archives: the
  /// reads are widened to whole 4 KiB blocks. (Files of PyTorch's writers
  /// have no such table; there, as for any chunk read whole, the record's
  /// CRC-32 is checked when the whole record is read.)
  bool verify_blocks = true;
};

/// Loads from a directory a FileSystemWriter saved to, or Python's
/// FileSystemWriter of torch 1.13 or 2.x. Everything read is checked: the
/// metadata's classes (an allowlist), bounds and file names; every item's
/// bounds against its file; the CRC-32 of every record read whole.
class FileSystemReader : public StorageReader {
 public:
  explicit FileSystemReader(std::filesystem::path path, FileSystemReaderOptions options = {});
  void reset(const std::optional<std::filesystem::path>& checkpoint_id = std::nullopt) override;
  CheckpointMetadata read_metadata() override;
  /// True: it needs nothing of the metadata but what set_up_storage_reader gives.
  bool shares_metadata() const override { return true; }
  void set_up_storage_reader(const CheckpointMetadata& metadata, bool is_coordinator) override;
  LoadPlan prepare_local_plan(LoadPlan plan) override;
  std::vector<LoadPlan> prepare_global_plan(std::vector<LoadPlan> plans) override;
  std::future<void> read_data(const LoadPlan& plan, LoadPlanner& planner) override;
  bool validate_checkpoint_id(const std::filesystem::path& checkpoint_id) const override;
  const std::filesystem::path& path() const { return path_; }
  /// Bytes read from storage since construction: metadata, chunk data and the
  /// data files' own headers where a non-tensor value was read.
  std::uint64_t bytes_read() const { return bytes_read_; }
  /// Read calls (pread or preadv) that fetched tensor data since construction.
  std::uint64_t data_reads() const { return data_reads_; }
  const FileSystemReaderOptions& options() const { return options_; }

 private:
  std::filesystem::path path_;
  FileSystemReaderOptions options_;
  CheckpointMetadata metadata_;
  std::atomic<std::uint64_t> bytes_read_{0};
  std::atomic<std::uint64_t> data_reads_{0};
};

/// Reads and checks a checkpoint directory's `.metadata` (NotFound when there
/// is none, CorruptCheckpoint naming the fault when it is not sound).
CheckpointMetadata read_checkpoint_metadata(const std::filesystem::path& directory);

}  // namespace ckpt::dcp
