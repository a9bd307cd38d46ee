// Hugging Face safetensors as a storage of the DCP core (upstream's
// torch.distributed.checkpoint.HuggingFaceStorageWriter / Reader, torch >= 2.8).
//
// On disk, with upstream's names:
//   - whole tensors (save_distributed false): `model-0000k-of-0000N.safetensors`
//     (file k of N, as fqn_to_index_mapping puts each key; all in
//     `model-00001-of-00001.safetensors` without one) and
//     `model.safetensors.index.json` ({"metadata": {"total_size": bytes},
//     "weight_map": {fqn: file}}), written last: what transformers and
//     safetensors load.
//   - sharded (save_distributed): each rank writes the chunks it holds as
//     `shard-0000s-model-0000k-of-0000N.safetensors` (s = rank + 1), each
//     chunk under its key with its place in the whole tensor in `__metadata__`
//     (`DCP_SHARDING_INFO`: {fqn: {"saved_offsets": [...]}}, with
//     "DCP_VERSION": "1.0" and "format": "pt"). With enable_consolidation they
//     go into `sharded/` and the coordinator's finish merges them into the
//     whole-tensor form above, one tensor in memory at a time.
// Every file is written durably (temporary, fsync, rename, directory fsync)
// and carries the save's id (`ckpt_save_id`) and how many files the save has
// (`ckpt_files`), so that a directory holding files of two saves, or missing
// one, is refused as torn instead of read as a mix. The names are fixed by the
// format, so a save over an earlier one replaces its files one by one: save
// each checkpoint into a directory of its own to keep the last one whole.
//
// HuggingFaceStorageReader reads either form, and any directory of
// `.safetensors` files (Python's, transformers'), resharding as for any DCP
// checkpoint. dcp::load and dcp::load_all pick it for a checkpoint_id that
// holds `.safetensors` files and no `.metadata`.
#pragma once

#include <ckpt/dcp/storage.hpp>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ckpt::dcp {

struct HuggingFaceStorageWriterOptions {
  /// Which file (1 to N) each key goes into; empty: every key into file 1 of 1.
  /// When given, it must name every tensor saved.
  std::map<std::string, int> fqn_to_index_mapping{};
  /// Every rank writes the chunks it holds (sharded tensors), each into a
  /// `shard-…` file of its own. When false, every item must be a whole tensor
  /// and each file's tensors must all be written by one rank.
  bool save_distributed = false;
  /// With save_distributed: the shards go into `sharded/` and finish writes
  /// the whole tensors under upstream's file names (plus the index).
  bool enable_consolidation = false;
  /// fsync every file and the directory (off only for scratch data).
  bool sync_files = true;
};

/// Saves to a directory in Hugging Face's format. Holds tensors only: a
/// non-tensor value is refused (Unsupported, naming its key) before anything
/// is written.
class HuggingFaceStorageWriter : public StorageWriter {
 public:
  explicit HuggingFaceStorageWriter(std::filesystem::path path, HuggingFaceStorageWriterOptions options = {});
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
  HuggingFaceStorageWriterOptions options_;
  std::string save_id_;  // set by prepare_global_plan (on the coordinator)
};

/// Loads from a directory of `.safetensors` files: the index's files when
/// `model.safetensors.index.json` is there, else every `*.safetensors` file
/// in it. A file's tensors are whole ones unless its `__metadata__` has
/// `DCP_SHARDING_INFO`, which places each as a chunk of a larger tensor.
/// Everything is checked before a byte of data is read: each header (as
/// safetensors::Reader does), the sharding info (every key, offsets of the
/// tensor's rank), the chunks of each key (no overlap, no hole), the files of
/// one save (one save id, none missing). Reads only the rows of a chunk that
/// a read item needs.
class HuggingFaceStorageReader : public StorageReader {
 public:
  explicit HuggingFaceStorageReader(std::filesystem::path path);
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
  /// Bytes read from storage since construction: headers and tensor data.
  std::uint64_t bytes_read() const { return bytes_read_; }

 private:
  std::filesystem::path path_;
  CheckpointMetadata metadata_;
  std::atomic<std::uint64_t> bytes_read_{0};
};

/// Whether `directory` holds a checkpoint in Hugging Face's format: `.safetensors`
/// files (or the index) and no DCP `.metadata`.
bool is_hugging_face_checkpoint(const std::filesystem::path& directory);

}  // namespace ckpt::dcp
