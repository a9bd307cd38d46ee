// Save and load plans, and the planners that make them (upstream's
// torch.distributed.checkpoint.planner and default_planner).
//
// A save: every rank's planner lists what it holds (a local SavePlan of write
// items); the coordinator merges the local plans into a global one (a
// replicated tensor is written once, by the rank with the least to write) and
// the checkpoint's Metadata; each rank then writes the items it was given.
// A load: every rank lists the byte ranges of saved chunks that overlap what it
// holds (read items); a checkpoint saved by N ranks loads on M ranks with
// another sharding.
#pragma once

#include <ckpt/dcp/metadata.hpp>

// ivalue.h first: clang needs IValue complete before ATen.h reaches c10::List.
#include <ATen/core/ivalue.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace ckpt::dcp {

/// Where a saved item's bytes lie: a file of the checkpoint (its name, relative
/// to the checkpoint directory), the offset and length of its bytes there, and
/// their CRC-32. Non-tensor items carry a path only.
struct StorageInfo {
  std::string relative_path;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  std::uint32_t crc32 = 0;
  /// The bytes are a whole torch.save archive holding the item (PyTorch's DCP
  /// files); false: a tensor chunk's raw bytes, with `crc32` (ckpt's JSON dialect).
  bool archive = false;
  /// Upstream's stream transforms the item's bytes went through, in order
  /// ("stream.zstd/1": a zstd frame of the archive); empty for none.
  std::vector<std::string> transforms;
  friend bool operator==(const StorageInfo&, const StorageInfo&) = default;
};

enum class WriteItemType { tensor, shard, bytes };
enum class LoadItemType { tensor, bytes };

/// What a tensor write item writes: one chunk of a tensor.
struct TensorWriteData {
  ChunkStorageMetadata chunk;
  TensorProperties properties;
  std::vector<std::int64_t> size;  ///< of the whole tensor
  friend bool operator==(const TensorWriteData&, const TensorWriteData&) = default;
};

struct WriteItem {
  MetadataIndex index;
  WriteItemType type = WriteItemType::tensor;
  std::optional<TensorWriteData> tensor_data;  ///< tensor and shard items
  /// Bytes this item will write (0 for non-tensor items, whose size is not
  /// known before they are serialized).
  std::uint64_t tensor_storage_size() const;
};

/// Copy `lengths` elements from the saved chunk `storage_index`, starting at
/// `storage_offsets` inside it, to the destination `dest_index`, starting at
/// `dest_offsets` inside it.
struct ReadItem {
  LoadItemType type = LoadItemType::tensor;
  MetadataIndex dest_index;
  std::vector<std::int64_t> dest_offsets;
  MetadataIndex storage_index;
  std::vector<std::int64_t> storage_offsets;
  std::vector<std::int64_t> lengths;
};

struct SavePlan {
  std::vector<WriteItem> items;
  /// Set by the storage layer (FileSystemWriter: the data file's name prefix).
  std::string storage_data;
  std::string planner_data;
};

struct LoadPlan {
  std::vector<ReadItem> items;
  std::string storage_data;
  std::string planner_data;
};

/// What writing an item produced.
struct WriteResult {
  MetadataIndex index;
  std::uint64_t size_in_bytes = 0;
  StorageInfo storage_data;
};

/// Metadata together with where every item was stored: what a checkpoint
/// directory's metadata file records.
struct CheckpointMetadata {
  Metadata metadata;
  std::map<MetadataIndex, StorageInfo> storage_data;
};

/// What a save of a state dict consists of. Called in this order on every
/// rank: set_up_planner, create_local_plan; create_global_plan on the
/// coordinator only; finish_plan with this rank's part of the global plan;
/// resolve_data for each item while writing.
namespace detail {
struct PlanCache;
}  // namespace detail

class SavePlanner {
 public:
  virtual ~SavePlanner() = default;
  /// Where save_state_dict keeps this planner's plans between saves (see
  /// DefaultSavePlanner's enable_plan_caching; save_state_dict fills the slot
  /// on the first save); null (the default): no caching.
  virtual std::shared_ptr<detail::PlanCache>* plan_cache() { return nullptr; }
  virtual void set_up_planner(const DcpStateDict& state_dict, bool is_coordinator) = 0;
  virtual SavePlan create_local_plan() = 0;
  /// Merges every rank's local plan (index = rank) into the global plan and the
  /// checkpoint's metadata. Throws Error when the plans do not fit together.
  virtual std::pair<std::vector<SavePlan>, Metadata> create_global_plan(std::vector<SavePlan> plans) = 0;
  virtual SavePlan finish_plan(SavePlan central_plan) = 0;
  /// The data of `item`: a CPU tensor holding exactly the chunk (tensor and
  /// shard items), or the value to save (bytes items).
  virtual c10::IValue resolve_data(const WriteItem& item) = 0;
};

/// What a rank will load, as the coordinator needs it to send the rank only
/// its part of the checkpoint's metadata: each key, and for a key of which
/// the rank holds only some chunks (a sharded tensor), those chunks.
struct MetadataRequest {
  struct Key {
    std::string fqn;
    /// The chunks of the global tensor the rank loads; nullopt: all of the key.
    std::optional<std::vector<ChunkStorageMetadata>> chunks;
  };
  std::vector<Key> keys;
};

/// The part of `metadata` that `request` needs: the keys it names that the
/// checkpoint holds, of a tensor only the saved chunks that overlap a chunk
/// asked for (all of them when no chunks are given, or when a chunk asked for
/// has another number of dims than the tensor), their storage data, the keys'
/// planner data, and the checkpoint's storage meta and version.
CheckpointMetadata metadata_part(const CheckpointMetadata& metadata, const MetadataRequest& request);
/// metadata_part for each of `requests` (a coordinator cutting every rank its
/// part): each key's saved chunks are indexed once, along the dim where their
/// offsets differ most, so a request costs O(its keys × log(chunks) + the
/// chunks it gets) for a checkpoint sharded along one dim, not O(all chunks).
std::vector<CheckpointMetadata> metadata_parts(const CheckpointMetadata& metadata,
                                               const std::vector<MetadataRequest>& requests);

/// What a load into a state dict consists of. Called in this order on every
/// rank: set_up_planner (after the metadata was read), create_local_plan;
/// create_global_plan on the coordinator only; finish_plan; while reading,
/// resolve_tensor / commit_tensor for each tensor item, load_value for each
/// bytes item. A storage reader may resolve many items before it commits
/// them (FileSystemReader resolves a batch of up to 512 MiB, reads it on
/// several threads, then commits), and commits in any order: each
/// resolve_tensor must return memory of its own until its commit.
class LoadPlanner {
 public:
  virtual ~LoadPlanner() = default;
  /// Which part of the checkpoint's metadata this planner needs to load
  /// `state_dict`, asked before set_up_planner. Where the storage reader
  /// shares its metadata (StorageReader::shares_metadata), the coordinator
  /// alone reads it and sends each rank the part it asked for: set_up_planner
  /// then sees only that part. nullopt (the default): all of it, for planners
  /// that look at keys their state dict does not name (renaming, say).
  virtual std::optional<MetadataRequest> metadata_request(const DcpStateDict& state_dict) const {
    (void)state_dict;
    return std::nullopt;
  }
  virtual void set_up_planner(DcpStateDict& state_dict, const Metadata& metadata, bool is_coordinator) = 0;
  virtual LoadPlan create_local_plan() = 0;
  virtual std::vector<LoadPlan> create_global_plan(std::vector<LoadPlan> plans) = 0;
  virtual LoadPlan finish_plan(LoadPlan central_plan) = 0;
  /// The value saved for a bytes item, read back (never executed: it went
  /// through ckpt's restricted unpickler).
  virtual void load_value(const ReadItem& item, c10::IValue value) = 0;
  /// Where to read `item` to: a tensor of `item.lengths` sizes, of the saved
  /// dtype, on the CPU (a view of the destination when it can be one).
  virtual at::Tensor resolve_tensor(const ReadItem& item) = 0;
  /// Called once `tensor` (from resolve_tensor) holds the item's values.
  virtual void commit_tensor(const ReadItem& item, const at::Tensor& tensor) = 0;
};

/// upstream's DefaultSavePlanner: one item per tensor (the whole tensor), per
/// local shard of a sharded tensor (empty shards skipped) and per other value.
class DefaultSavePlanner : public SavePlanner {
 public:
  /// `dedup_replicated`: a tensor that several ranks hold (replicated) is
  /// written once, by the rank with the least planned so far (ties: the lowest).
  /// `enable_plan_caching` (upstream's): save after save with this planner, a
  /// rank whose local plan is what it was does not send it again, and when no
  /// rank's plan changed the coordinator reuses its global plan and metadata
  /// instead of merging and validating every plan; a rank whose part of the
  /// global plan is unchanged gets only its new storage data. The cache holds
  /// only plans (layouts), never data; it is dropped when a save fails, and
  /// not used when the coordinator or the group's size changed.
  explicit DefaultSavePlanner(bool dedup_replicated = true, bool enable_plan_caching = false)
      : dedup_(dedup_replicated), caching_(enable_plan_caching) {}
  std::shared_ptr<detail::PlanCache>* plan_cache() override { return caching_ ? &cache_ : nullptr; }
  void set_up_planner(const DcpStateDict& state_dict, bool is_coordinator) override;
  SavePlan create_local_plan() override;
  std::pair<std::vector<SavePlan>, Metadata> create_global_plan(std::vector<SavePlan> plans) override;
  SavePlan finish_plan(SavePlan central_plan) override;
  c10::IValue resolve_data(const WriteItem& item) override;
  /// Where each key of the state dict sits in the nested state dict it was
  /// flattened from (dcp::save sets it): sent with the local plan and
  /// recorded as the checkpoint's planner data.
  void set_planner_data(std::map<std::string, ObjectPath> paths) { planner_data_ = std::move(paths); }

 protected:
  std::map<std::string, ObjectPath> planner_data_;
  const DcpStateDict* state_dict_ = nullptr;
  bool is_coordinator_ = false;
  bool dedup_ = true;
  std::map<std::string, std::size_t> position_;  // fqn → position in the state dict
  bool caching_ = false;
  std::shared_ptr<detail::PlanCache> cache_;  // with enable_plan_caching, from the first save on
};

/// upstream's DefaultLoadPlanner: every tensor and local shard of the state
/// dict is read from the saved chunks that overlap it; other values are
/// replaced by the saved ones.
class DefaultLoadPlanner : public LoadPlanner {
 public:
  /// `allow_partial_load`: keys of the state dict that the checkpoint lacks
  /// are left as they are (else MissingKeys names them). Keys the checkpoint
  /// has and the state dict lacks are never read.
  explicit DefaultLoadPlanner(bool allow_partial_load = false) : allow_partial_(allow_partial_load) {}
  /// request_for(state_dict); for a subclass, nullopt (all of the metadata:
  /// a subclass may read keys its state dict does not name). A subclass that
  /// reads only its state dict's keys overrides this to return request_for.
  std::optional<MetadataRequest> metadata_request(const DcpStateDict& state_dict) const override;
  /// Each key of `state_dict`: a tensor or a value whole, a sharded tensor's
  /// local shards.
  static MetadataRequest request_for(const DcpStateDict& state_dict);
  void set_up_planner(DcpStateDict& state_dict, const Metadata& metadata, bool is_coordinator) override;
  LoadPlan create_local_plan() override;
  std::vector<LoadPlan> create_global_plan(std::vector<LoadPlan> plans) override;
  LoadPlan finish_plan(LoadPlan central_plan) override;
  void load_value(const ReadItem& item, c10::IValue value) override;
  at::Tensor resolve_tensor(const ReadItem& item) override;
  void commit_tensor(const ReadItem& item, const at::Tensor& tensor) override;

 protected:
  /// The destination chunk of `index` (the whole tensor, or a local shard).
  at::Tensor destination(const MetadataIndex& index) const;
  DcpStateDict* state_dict_ = nullptr;
  const Metadata* metadata_ = nullptr;
  bool is_coordinator_ = false;
  bool allow_partial_ = false;
  std::map<std::string, std::size_t> position_;
};

/// upstream's create_read_items_for_chunk_list: the read items that fill the
/// destination chunks `local_chunks` of `fqn` from the saved chunks of
/// `checkpoint_md` (one per overlapping pair; the overlap of a saved chunk s
/// and a local chunk c along each dim starts at max(s.off, c.off) and is
/// min(s.off + s.size, c.off + c.size) − max(s.off, c.off) long).
std::vector<ReadItem> create_read_items_for_chunk_list(const std::string& fqn,
                                                       const TensorStorageMetadata& checkpoint_md,
                                                       const std::vector<ChunkStorageMetadata>& local_chunks);

/// Throws Error when the chunks of `md` do not tile its tensor exactly: a
/// chunk out of bounds, two chunks overlapping, or elements no chunk holds
/// (upstream's _validate_global_plan).
void validate_chunks(const std::string& fqn, const TensorStorageMetadata& md);

}  // namespace ckpt::dcp
