// The DCP core's vocabulary (upstream's torch.distributed.checkpoint.metadata
// and its sharded tensors): what a distributed checkpoint records per key, and
// the sharded tensor values it saves.
//
// A DCP state dict maps fully qualified names ("model.layer1.weight") to a
// tensor (replicated: every rank holds all of it), a ShardedTensor (each rank
// holds some chunks of a global tensor), or any other value (saved as bytes).
#pragma once

// ivalue.h first: clang needs IValue complete before ATen.h reaches c10::List.
#include <ATen/core/ivalue.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

namespace ckpt::dcp {

/// A chunk of a tensor: where it starts in the global tensor, and its sizes.
struct ChunkStorageMetadata {
  std::vector<std::int64_t> offsets;
  std::vector<std::int64_t> sizes;
  friend bool operator==(const ChunkStorageMetadata&, const ChunkStorageMetadata&) = default;
};

/// What a tensor is, beside its data (upstream keeps layout and memory format
/// too, marked deprecated; dense strided tensors are all DCP saves).
struct TensorProperties {
  c10::ScalarType dtype = c10::ScalarType::Float;
  bool requires_grad = false;
  static TensorProperties from_tensor(const at::Tensor& t);
  friend bool operator==(const TensorProperties&, const TensorProperties&) = default;
};

/// A tensor key: its global size and every chunk saved of it.
struct TensorStorageMetadata {
  TensorProperties properties;
  std::vector<std::int64_t> size;
  std::vector<ChunkStorageMetadata> chunks;
  friend bool operator==(const TensorStorageMetadata&, const TensorStorageMetadata&) = default;
};

/// A key whose value is not a tensor: saved as serialized bytes.
struct BytesStorageMetadata {
  friend bool operator==(const BytesStorageMetadata&, const BytesStorageMetadata&) = default;
};

using StorageMetadata = std::variant<TensorStorageMetadata, BytesStorageMetadata>;

/// Names one saved item: a key, and for a tensor the offsets of its chunk.
/// `index` is only a hint for finding the chunk; it takes no part in equality.
struct MetadataIndex {
  std::string fqn;
  std::optional<std::vector<std::int64_t>> offset;
  std::optional<std::int64_t> index;
  friend bool operator==(const MetadataIndex& a, const MetadataIndex& b) {
    return a.fqn == b.fqn && a.offset == b.offset;
  }
  friend bool operator<(const MetadataIndex& a, const MetadataIndex& b) {
    return std::tie(a.fqn, a.offset) < std::tie(b.fqn, b.offset);
  }
};

/// Where a flattened key sits in the nested state dict it came from: the dict
/// keys and list indices from the root (upstream's planner_data values).
using ObjectPath = std::vector<std::variant<std::string, std::int64_t>>;

/// Upstream's StorageMeta (torch >= 2.4): which checkpoint and save this is.
struct StorageMeta {
  std::string checkpoint_id;
  std::string save_id;
  std::string load_id;
  friend bool operator==(const StorageMeta&, const StorageMeta&) = default;
};

/// A checkpoint's global metadata: every key and what it holds.
struct Metadata {
  std::map<std::string, StorageMetadata> state_dict_metadata;
  /// For each flattened key, its path in the nested state dict (empty when
  /// the save flattened nothing, as torch 1.13 and ckpt's JSON dialect).
  std::map<std::string, ObjectPath> planner_data;
  /// Set when the checkpoint records one (torch >= 2.4 writers).
  std::optional<StorageMeta> storage_meta;
  /// Upstream's format version ("1.0.0" from torch 2.9 on; empty before).
  std::string version;
};

// --- sharded tensors ---------------------------------------------------------------

/// One shard of a sharded tensor: where it lies in the global tensor and which
/// rank holds it, on which device.
struct ShardMetadata {
  std::vector<std::int64_t> offsets;
  std::vector<std::int64_t> sizes;
  std::int64_t rank = 0;
  c10::Device device = c10::Device(c10::kCPU);
  friend bool operator==(const ShardMetadata&, const ShardMetadata&) = default;
};

/// Upstream's ChunkShardingSpec: the tensor is cut along `dim` into as many
/// chunks as placements ("rank:1/cpu", "rank:0/cuda:0"); chunk i has
/// ceil(size / n) rows (the last ones fewer, possibly none) and lives on
/// placement i.
struct ChunkShardingSpec {
  std::int64_t dim = 0;
  std::vector<std::string> placements;

  /// Every shard of a tensor of `sizes`, in placement order (empty ones kept).
  /// Throws Error for a malformed placement or a dim out of range.
  std::vector<ShardMetadata> build_metadata(const std::vector<std::int64_t>& sizes) const;
};

/// A local shard: this rank's tensor and where it lies.
struct Shard {
  at::Tensor tensor;
  ShardMetadata metadata;
};

/// A tensor cut into shards over ranks; each rank holds its own shards.
class ShardedTensor {
 public:
  /// The shards `spec` places on `rank`, allocated with `make(sizes)`.
  template <class Make>
  static ShardedTensor create(const ChunkShardingSpec& spec, std::vector<std::int64_t> sizes,
                              TensorProperties properties, std::int64_t rank, Make make) {
    ShardedTensor st;
    st.size_ = std::move(sizes);
    st.properties_ = properties;
    st.shards_metadata_ = spec.build_metadata(st.size_);
    for (const auto& m : st.shards_metadata_)
      if (m.rank == rank) st.local_shards_.push_back({make(m.sizes, m.device), m});
    return st;
  }
  /// sharded_tensor.zeros / rand / full of upstream.
  static ShardedTensor zeros(const ChunkShardingSpec& spec, std::vector<std::int64_t> sizes,
                             std::int64_t rank, c10::ScalarType dtype = c10::ScalarType::Float);
  static ShardedTensor rand(const ChunkShardingSpec& spec, std::vector<std::int64_t> sizes, std::int64_t rank,
                            c10::ScalarType dtype = c10::ScalarType::Float);
  static ShardedTensor full(const ChunkShardingSpec& spec, std::vector<std::int64_t> sizes, std::int64_t rank,
                            double value, c10::ScalarType dtype = c10::ScalarType::Float);

  /// The global size.
  const std::vector<std::int64_t>& size() const { return size_; }
  const TensorProperties& properties() const { return properties_; }
  /// Every shard, on every rank (the global layout).
  const std::vector<ShardMetadata>& shards_metadata() const { return shards_metadata_; }
  /// This rank's shards.
  const std::vector<Shard>& local_shards() const { return local_shards_; }
  std::vector<Shard>& local_shards() { return local_shards_; }

 private:
  std::vector<std::int64_t> size_;
  TensorProperties properties_;
  std::vector<ShardMetadata> shards_metadata_;
  std::vector<Shard> local_shards_;
};

/// A saved value ckpt does not unpickle: its torch.save archive names a
/// Python class off ckpt's allowlist (a numpy array, a custom object). It is
/// kept as the archive's bytes, never executed; saving it again writes those
/// bytes as they were, so Python reads it back unchanged.
struct OpaqueValue {
  std::string key;      ///< the key it was saved under
  std::string archive;  ///< the item's torch.save archive
  std::string reason;   ///< why it was not unpickled (the refused global)
};

/// An opaque value as a value of a state dict (an IValue capsule), and back:
/// as_opaque() is null for any other value.
c10::IValue opaque_value(OpaqueValue value);
const OpaqueValue* as_opaque(const c10::IValue& value);
/// `value` itself, or for an opaque value an Unsupported error naming its key
/// and why its contents cannot be read.
const c10::IValue& contents_of(const c10::IValue& value);

/// A value of a DCP state dict.
using Value = std::variant<at::Tensor, ShardedTensor, c10::IValue>;

/// A DCP state dict: fully qualified names to values, in insertion order.
using DcpStateDict = std::vector<std::pair<std::string, Value>>;

/// Upstream's _create_default_local_metadata: the metadata a save of
/// `state_dict` records, computed locally — a tensor as one chunk, a sharded
/// tensor as every shard of its global layout, anything else as bytes.
Metadata create_default_local_metadata(const DcpStateDict& state_dict);

}  // namespace ckpt::dcp
