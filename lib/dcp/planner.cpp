#include <ckpt/dcp/planner.hpp>

#include "dcp/object_paths.hpp"
#include "dcp/volume.hpp"

#include <ckpt/error.hpp>

#include <c10/core/GradMode.h>
#include <c10/core/ScalarType.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <limits>
#include <map>
#include <typeinfo>
#include <utility>

namespace ckpt::dcp {

namespace {

using detail::volume;

std::string dims(const std::vector<std::int64_t>& v) {
  return fmt::format("[{}]", fmt::join(v, ", "));
}

/// Whether two chunks share at least one element.
bool overlap(const ChunkStorageMetadata& a, const ChunkStorageMetadata& b) {
  for (std::size_t d = 0; d < a.offsets.size(); ++d) {
    const auto lo = std::max(a.offsets[d], b.offsets[d]);
    const auto hi = std::min(a.offsets[d] + a.sizes[d], b.offsets[d] + b.sizes[d]);
    if (hi <= lo) return false;
  }
  return true;
}

std::map<std::string, std::size_t> positions(const DcpStateDict& sd) {
  std::map<std::string, std::size_t> out;
  for (std::size_t i = 0; i < sd.size(); ++i)
    if (!out.emplace(sd[i].first, i).second)
      throw Error(fmt::format("key '{}' appears twice in the state dict", sd[i].first));
  return out;
}

const Shard* find_shard(const ShardedTensor& st, const std::optional<std::vector<std::int64_t>>& offsets) {
  if (!offsets) return nullptr;
  for (const auto& s : st.local_shards())
    if (s.metadata.offsets == *offsets) return &s;
  return nullptr;
}

}  // namespace

std::uint64_t WriteItem::tensor_storage_size() const {
  if (!tensor_data) return 0;
  return static_cast<std::uint64_t>(volume(tensor_data->chunk.sizes)) *
         c10::elementSize(tensor_data->properties.dtype);
}

// --- save ------------------------------------------------------------------------

void DefaultSavePlanner::set_up_planner(const DcpStateDict& state_dict, bool is_coordinator) {
  position_ = positions(state_dict);
  state_dict_ = &state_dict;
  is_coordinator_ = is_coordinator;
}

SavePlan DefaultSavePlanner::create_local_plan() {
  if (!state_dict_) throw Error("create_local_plan before set_up_planner");
  SavePlan plan;
  for (const auto& [fqn, value] : *state_dict_) {
    if (const auto* t = std::get_if<at::Tensor>(&value)) {
      const auto size = t->sizes().vec();
      WriteItem w;
      w.index = {fqn, std::vector<std::int64_t>(size.size(), 0), std::nullopt};
      w.type = WriteItemType::tensor;
      w.tensor_data = TensorWriteData{{*w.index.offset, size}, TensorProperties::from_tensor(*t), size};
      plan.items.push_back(std::move(w));
    } else if (const auto* st = std::get_if<ShardedTensor>(&value)) {
      for (const auto& shard : st->local_shards()) {
        if (volume(shard.metadata.sizes) == 0) continue;
        WriteItem w;
        w.index = {fqn, shard.metadata.offsets, std::nullopt};
        w.type = WriteItemType::shard;
        w.tensor_data =
            TensorWriteData{{shard.metadata.offsets, shard.metadata.sizes}, st->properties(), st->size()};
        plan.items.push_back(std::move(w));
      }
    } else {
      WriteItem w;
      w.index = {fqn, std::nullopt, std::nullopt};
      w.type = WriteItemType::bytes;
      plan.items.push_back(std::move(w));
    }
  }
  if (!planner_data_.empty()) plan.planner_data = detail::encode_object_paths(planner_data_);
  return plan;
}

std::pair<std::vector<SavePlan>, Metadata> DefaultSavePlanner::create_global_plan(
    std::vector<SavePlan> plans) {
  if (dedup_) {
    // upstream's _dedup_save_plans: an item that several ranks plan is kept by
    // the one with the least planned so far, in the order items are first met.
    std::vector<std::pair<MetadataIndex, std::vector<std::size_t>>> holders;
    std::map<MetadataIndex, std::size_t> where;
    std::vector<std::uint64_t> bytes_of_item;
    for (std::size_t p = 0; p < plans.size(); ++p)
      for (const auto& w : plans[p].items) {
        auto [it, fresh] = where.emplace(w.index, holders.size());
        if (fresh) {
          holders.push_back({w.index, {}});
          bytes_of_item.push_back(std::max<std::uint64_t>(w.tensor_storage_size(), 1));
        }
        holders[it->second].second.push_back(p);
      }
    std::vector<std::uint64_t> planned(plans.size(), 0);
    std::vector<std::map<MetadataIndex, bool>> keep(plans.size());
    for (std::size_t i = 0; i < holders.size(); ++i) {
      const auto& ranks = holders[i].second;
      const auto chosen = *std::min_element(ranks.begin(), ranks.end(), [&](std::size_t a, std::size_t b) {
        return std::tie(planned[a], a) < std::tie(planned[b], b);
      });
      planned[chosen] += bytes_of_item[i];
      keep[chosen][holders[i].first] = true;
    }
    for (std::size_t p = 0; p < plans.size(); ++p)
      std::erase_if(plans[p].items, [&](const WriteItem& w) { return !keep[p].count(w.index); });
  }

  // The metadata, and each item's index hint: its chunk's position.
  Metadata md;
  for (auto& plan : plans) {
    for (auto& w : plan.items) {
      const auto& fqn = w.index.fqn;
      auto it = md.state_dict_metadata.find(fqn);
      if (w.type == WriteItemType::bytes) {
        if (it != md.state_dict_metadata.end() && !std::holds_alternative<BytesStorageMetadata>(it->second))
          throw Error(fmt::format("key '{}' is a tensor on some ranks and a value on others", fqn));
        md.state_dict_metadata.emplace(fqn, BytesStorageMetadata{});
        continue;
      }
      if (!w.tensor_data) throw Error(fmt::format("tensor item '{}' has no tensor data", fqn));
      if (it == md.state_dict_metadata.end())
        it = md.state_dict_metadata
                 .emplace(fqn, TensorStorageMetadata{w.tensor_data->properties, w.tensor_data->size, {}})
                 .first;
      auto* t = std::get_if<TensorStorageMetadata>(&it->second);
      if (!t) throw Error(fmt::format("key '{}' is a tensor on some ranks and a value on others", fqn));
      if (t->size != w.tensor_data->size || t->properties.dtype != w.tensor_data->properties.dtype)
        throw Error(fmt::format("key '{}' is {} {} on one rank and {} {} on another", fqn,
                                c10::toString(t->properties.dtype), dims(t->size),
                                c10::toString(w.tensor_data->properties.dtype), dims(w.tensor_data->size)));
      w.index.index = static_cast<std::int64_t>(t->chunks.size());
      t->chunks.push_back(w.tensor_data->chunk);
    }
  }
  for (const auto& [fqn, sm] : md.state_dict_metadata)
    if (const auto* t = std::get_if<TensorStorageMetadata>(&sm)) validate_chunks(fqn, *t);
  // Every rank's paths, for the keys saved (upstream merges them the same way).
  for (auto& plan : plans) {
    if (plan.planner_data.empty()) continue;
    for (auto& [fqn, path] : detail::decode_object_paths(plan.planner_data))
      if (md.state_dict_metadata.count(fqn)) md.planner_data.emplace(fqn, std::move(path));
    plan.planner_data.clear();
  }
  return {std::move(plans), std::move(md)};
}

SavePlan DefaultSavePlanner::finish_plan(SavePlan central_plan) {
  return central_plan;
}

c10::IValue DefaultSavePlanner::resolve_data(const WriteItem& item) {
  const auto it = position_.find(item.index.fqn);
  if (!state_dict_ || it == position_.end())
    throw Error(fmt::format("the plan names key '{}', which the state dict does not hold", item.index.fqn));
  const auto& value = (*state_dict_)[it->second].second;
  if (item.type == WriteItemType::bytes) {
    if (const auto* v = std::get_if<c10::IValue>(&value)) return *v;
    throw Error(fmt::format("key '{}' was planned as a value but is a tensor", item.index.fqn));
  }
  at::Tensor t;
  if (const auto* plain = std::get_if<at::Tensor>(&value)) {
    t = *plain;
  } else if (const auto* st = std::get_if<ShardedTensor>(&value)) {
    const Shard* shard = find_shard(*st, item.index.offset);
    if (!shard)
      throw Error(fmt::format("key '{}' holds no local shard at {}", item.index.fqn,
                              dims(item.index.offset.value_or(std::vector<std::int64_t>{}))));
    t = shard->tensor;
  } else {
    throw Error(fmt::format("key '{}' was planned as a tensor but is a value", item.index.fqn));
  }
  return t.detach();
}

// --- load ------------------------------------------------------------------------

void DefaultLoadPlanner::set_up_planner(DcpStateDict& state_dict, const Metadata& metadata,
                                        bool is_coordinator) {
  position_ = positions(state_dict);
  state_dict_ = &state_dict;
  metadata_ = &metadata;
  is_coordinator_ = is_coordinator;
}

LoadPlan DefaultLoadPlanner::create_local_plan() {
  if (!state_dict_ || !metadata_) throw Error("create_local_plan before set_up_planner");
  LoadPlan plan;
  std::vector<std::string> missing;
  for (const auto& [fqn, value] : *state_dict_) {
    const auto found = metadata_->state_dict_metadata.find(fqn);
    if (found == metadata_->state_dict_metadata.end()) {
      missing.push_back(fqn);
      continue;
    }
    const auto* md = std::get_if<TensorStorageMetadata>(&found->second);
    const bool is_value = std::holds_alternative<c10::IValue>(value);
    if (!md) {
      if (!is_value)
        throw Mismatch(fmt::format("key '{}' was saved as a value, but here it is a tensor", fqn));
      ReadItem r;
      r.type = LoadItemType::bytes;
      r.dest_index = {fqn, std::nullopt, std::nullopt};
      r.storage_index = {fqn, std::nullopt, std::nullopt};
      plan.items.push_back(std::move(r));
      continue;
    }
    if (is_value) throw Mismatch(fmt::format("key '{}' was saved as a tensor, but here it is a value", fqn));
    std::vector<ChunkStorageMetadata> chunks;
    std::vector<std::int64_t> size;
    c10::ScalarType dtype{};
    if (const auto* t = std::get_if<at::Tensor>(&value)) {
      size = t->sizes().vec();
      dtype = t->scalar_type();
      chunks.push_back({std::vector<std::int64_t>(size.size(), 0), size});
    } else {
      const auto& st = std::get<ShardedTensor>(value);
      size = st.size();
      dtype = st.properties().dtype;
      for (const auto& s : st.local_shards()) chunks.push_back({s.metadata.offsets, s.metadata.sizes});
    }
    if (size != md->size)
      throw Mismatch(fmt::format("Size mismatch between saved {} and current: {} for {}", dims(md->size),
                                 dims(size), fqn));
    if (dtype != md->properties.dtype)
      throw Mismatch(fmt::format("dtype mismatch for {}: saved {}, here {}", fqn,
                                 c10::toString(md->properties.dtype), c10::toString(dtype)));
    auto items = create_read_items_for_chunk_list(fqn, *md, chunks);
    plan.items.insert(plan.items.end(), std::make_move_iterator(items.begin()),
                      std::make_move_iterator(items.end()));
  }
  if (!missing.empty() && !allow_partial_)
    throw MissingKeys(fmt::format("Missing key in checkpoint state_dict: {}", fmt::join(missing, ", ")));
  return plan;
}

std::vector<LoadPlan> DefaultLoadPlanner::create_global_plan(std::vector<LoadPlan> plans) {
  return plans;
}

LoadPlan DefaultLoadPlanner::finish_plan(LoadPlan central_plan) {
  return central_plan;
}

void DefaultLoadPlanner::load_value(const ReadItem& item, c10::IValue value) {
  const auto it = position_.find(item.dest_index.fqn);
  if (!state_dict_ || it == position_.end())
    throw Error(
        fmt::format("the plan names key '{}', which the state dict does not hold", item.dest_index.fqn));
  (*state_dict_)[it->second].second = std::move(value);
}

at::Tensor DefaultLoadPlanner::destination(const MetadataIndex& index) const {
  const auto it = position_.find(index.fqn);
  if (!state_dict_ || it == position_.end())
    throw Error(fmt::format("the plan names key '{}', which the state dict does not hold", index.fqn));
  const auto& value = (*state_dict_)[it->second].second;
  if (const auto* t = std::get_if<at::Tensor>(&value)) return *t;
  if (const auto* st = std::get_if<ShardedTensor>(&value)) {
    if (const Shard* s = find_shard(*st, index.offset)) return s->tensor;
    throw Error(fmt::format("key '{}' holds no local shard at {}", index.fqn,
                            dims(index.offset.value_or(std::vector<std::int64_t>{}))));
  }
  throw Error(fmt::format("key '{}' is not a tensor", index.fqn));
}

namespace {
at::Tensor narrowed(at::Tensor t, const ReadItem& item) {
  if (item.dest_offsets.size() != static_cast<std::size_t>(t.dim()) ||
      item.lengths.size() != item.dest_offsets.size())
    throw Error(fmt::format("read item for '{}' has {} dims, its destination {}", item.dest_index.fqn,
                            item.lengths.size(), t.dim()));
  for (std::size_t d = 0; d < item.lengths.size(); ++d)
    t = t.narrow(static_cast<std::int64_t>(d), item.dest_offsets[d], item.lengths[d]);
  return t;
}
}  // namespace

at::Tensor DefaultLoadPlanner::resolve_tensor(const ReadItem& item) {
  at::Tensor view = narrowed(destination(item.dest_index).detach(), item);
  if (view.device().is_cpu()) return view;
  return at::empty(view.sizes(), view.options().device(c10::kCPU));
}

void DefaultLoadPlanner::commit_tensor(const ReadItem& item, const at::Tensor& tensor) {
  at::Tensor view = narrowed(destination(item.dest_index).detach(), item);
  if (!view.is_same(tensor)) {
    c10::NoGradGuard no_grad;
    view.copy_(tensor);
  }
}

// --- chunks ----------------------------------------------------------------------

std::vector<ReadItem> create_read_items_for_chunk_list(
    const std::string& fqn, const TensorStorageMetadata& checkpoint_md,
    const std::vector<ChunkStorageMetadata>& local_chunks) {
  std::vector<ReadItem> out;
  for (std::size_t li = 0; li < local_chunks.size(); ++li) {
    const auto& c = local_chunks[li];
    for (std::size_t si = 0; si < checkpoint_md.chunks.size(); ++si) {
      const auto& s = checkpoint_md.chunks[si];
      if (s.offsets.size() != c.offsets.size())
        throw Mismatch(fmt::format("key '{}': a saved chunk has {} dims, the destination {}", fqn,
                                   s.offsets.size(), c.offsets.size()));
      if (!overlap(s, c)) continue;
      ReadItem r;
      r.type = LoadItemType::tensor;
      r.dest_index = {fqn, c.offsets, static_cast<std::int64_t>(li)};
      r.storage_index = {fqn, s.offsets, static_cast<std::int64_t>(si)};
      for (std::size_t d = 0; d < c.offsets.size(); ++d) {
        const auto lo = std::max(c.offsets[d], s.offsets[d]);
        const auto hi = std::min(s.offsets[d] + s.sizes[d], c.offsets[d] + c.sizes[d]);
        r.storage_offsets.push_back(lo - s.offsets[d]);
        r.dest_offsets.push_back(lo - c.offsets[d]);
        r.lengths.push_back(hi - lo);
      }
      out.push_back(std::move(r));
    }
  }
  return out;
}

void validate_chunks(const std::string& fqn, const TensorStorageMetadata& md) {
  const auto bad = [&](const std::string& why) {
    return Error(
        fmt::format("Failed to validate global plan: key '{}' of size {}: {}", fqn, dims(md.size), why));
  };
  std::int64_t covered = 0;
  std::vector<const ChunkStorageMetadata*> chunks;
  for (const auto& c : md.chunks) {
    if (c.offsets.size() != md.size.size() || c.sizes.size() != md.size.size())
      throw bad(fmt::format("chunk at {} has the wrong number of dims", dims(c.offsets)));
    for (std::size_t d = 0; d < md.size.size(); ++d)
      if (c.offsets[d] < 0 || c.sizes[d] < 0 || c.offsets[d] + c.sizes[d] > md.size[d])
        throw bad(fmt::format("chunk at {} of size {} is out of bounds", dims(c.offsets), dims(c.sizes)));
    covered += volume(c.sizes);
    if (volume(c.sizes) > 0) chunks.push_back(&c);
  }
  // Overlaps: sweep along dim 0 (chunks that cannot meet there are not compared).
  if (!md.size.empty()) {
    std::sort(chunks.begin(), chunks.end(), [](auto* a, auto* b) { return a->offsets < b->offsets; });
    std::vector<const ChunkStorageMetadata*> active;
    for (const auto* c : chunks) {
      std::erase_if(active, [&](auto* a) { return a->offsets[0] + a->sizes[0] <= c->offsets[0]; });
      for (const auto* a : active)
        if (overlap(*a, *c))
          throw bad(fmt::format("chunks at {} and {} overlap", dims(a->offsets), dims(c->offsets)));
      active.push_back(c);
    }
  } else if (chunks.size() > 1) {
    throw bad("a scalar saved more than once");
  }
  if (covered != volume(md.size))
    throw bad(fmt::format("the chunks hold {} of its {} elements", covered, volume(md.size)));
}

}  // namespace ckpt::dcp

namespace ckpt::dcp {

std::optional<MetadataRequest> DefaultLoadPlanner::metadata_request(const DcpStateDict& state_dict) const {
  // A subclass may read keys its state dict does not name (renaming them,
  // say): it gets all of the metadata unless it asks for less itself.
  if (typeid(*this) != typeid(DefaultLoadPlanner)) return std::nullopt;
  return request_for(state_dict);
}

MetadataRequest DefaultLoadPlanner::request_for(const DcpStateDict& state_dict) {
  MetadataRequest request;
  request.keys.reserve(state_dict.size());
  for (const auto& [fqn, value] : state_dict) {
    MetadataRequest::Key key{fqn, std::nullopt};
    if (const auto* st = std::get_if<ShardedTensor>(&value)) {
      key.chunks.emplace();
      for (const auto& s : st->local_shards()) key.chunks->push_back({s.metadata.offsets, s.metadata.sizes});
    }
    request.keys.push_back(std::move(key));
  }
  return request;
}

namespace {

/// The saved chunks of one tensor, indexed along the dim where their offsets
/// differ most (the dim it was sharded on): sorted by their start there, with
/// the largest end so far, so the chunks that may overlap a box are found by
/// two binary searches instead of a scan of every chunk.
class ChunkIndex {
 public:
  explicit ChunkIndex(const TensorStorageMetadata& t) : t_(t) {
    const std::size_t dims = t.size.size();
    order_.resize(t.chunks.size());
    for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = i;
    // Chunks of another number of dims (metadata no reader checked): no
    // index; every chunk is handed out, and the planner names the fault.
    for (const auto& c : t.chunks)
      if (c.offsets.size() != dims || c.sizes.size() != dims) return;
    indexed_ = dims > 0;
    std::size_t most = 0;
    for (std::size_t d = 0; d < dims; ++d) {
      std::vector<std::int64_t> starts;
      starts.reserve(t.chunks.size());
      for (const auto& c : t.chunks) starts.push_back(c.offsets[d]);
      std::sort(starts.begin(), starts.end());
      const auto distinct =
          static_cast<std::size_t>(std::unique(starts.begin(), starts.end()) - starts.begin());
      if (distinct > most) {
        most = distinct;
        dim_ = d;
      }
    }
    if (!indexed_) return;
    std::sort(order_.begin(), order_.end(), [&](std::size_t a, std::size_t b) {
      return t.chunks[a].offsets[dim_] < t.chunks[b].offsets[dim_];
    });
    max_end_.reserve(order_.size());
    std::int64_t most_end = std::numeric_limits<std::int64_t>::min();
    for (const auto i : order_) {
      most_end = std::max(most_end, t.chunks[i].offsets[dim_] + t.chunks[i].sizes[dim_]);
      max_end_.push_back(most_end);
    }
  }

  /// Adds to `out` the positions of the saved chunks that overlap `box`.
  void overlapping(const ChunkStorageMetadata& box, std::vector<std::size_t>& out) const {
    if (!indexed_) {
      out.insert(out.end(), order_.begin(), order_.end());
      return;
    }
    const std::int64_t lo = box.offsets[dim_], hi = lo + box.sizes[dim_];
    // Before `first`, every chunk ends at or before lo; from `last` on, every
    // chunk starts at or after hi.
    const auto first =
        static_cast<std::size_t>(std::upper_bound(max_end_.begin(), max_end_.end(), lo) - max_end_.begin());
    const auto last = static_cast<std::size_t>(
        std::lower_bound(order_.begin(), order_.end(), hi,
                         [&](std::size_t i, std::int64_t v) { return t_.chunks[i].offsets[dim_] < v; }) -
        order_.begin());
    for (std::size_t k = first; k < last; ++k)
      if (overlap(t_.chunks[order_[k]], box)) out.push_back(order_[k]);
  }

 private:
  const TensorStorageMetadata& t_;
  bool indexed_ = false;
  std::size_t dim_ = 0;
  std::vector<std::size_t> order_;
  std::vector<std::int64_t> max_end_;
};

}  // namespace

std::vector<CheckpointMetadata> metadata_parts(const CheckpointMetadata& metadata,
                                               const std::vector<MetadataRequest>& requests) {
  std::map<std::string, ChunkIndex> indexes;  // built for a key when first asked for by chunks
  std::vector<CheckpointMetadata> parts;
  parts.reserve(requests.size());
  std::vector<std::size_t> found;
  for (const auto& request : requests) {
    CheckpointMetadata& out = parts.emplace_back();
    out.metadata.storage_meta = metadata.metadata.storage_meta;
    out.metadata.version = metadata.metadata.version;
    const auto storage_of = [&](MetadataIndex index) {
      if (const auto it = metadata.storage_data.find(index); it != metadata.storage_data.end())
        out.storage_data.emplace(std::move(index), it->second);
    };
    for (const auto& key : request.keys) {
      const auto entry = metadata.metadata.state_dict_metadata.find(key.fqn);
      if (entry == metadata.metadata.state_dict_metadata.end()) continue;
      if (const auto path = metadata.metadata.planner_data.find(key.fqn);
          path != metadata.metadata.planner_data.end())
        out.metadata.planner_data.emplace(*path);
      const auto* tensor = std::get_if<TensorStorageMetadata>(&entry->second);
      if (!tensor) {
        out.metadata.state_dict_metadata.emplace(*entry);
        storage_of({key.fqn, std::nullopt, std::nullopt});
        continue;
      }
      bool all = !key.chunks;
      if (!all)
        for (const auto& c : *key.chunks)
          all = all || c.offsets.size() != tensor->size.size() || c.sizes.size() != tensor->size.size();
      found.clear();
      if (all) {
        for (std::size_t i = 0; i < tensor->chunks.size(); ++i) found.push_back(i);
      } else {
        auto index = indexes.find(key.fqn);
        if (index == indexes.end()) index = indexes.emplace(key.fqn, ChunkIndex(*tensor)).first;
        for (const auto& c : *key.chunks) index->second.overlapping(c, found);
        // In the checkpoint's order, each once (two local chunks may share one).
        std::sort(found.begin(), found.end());
        found.erase(std::unique(found.begin(), found.end()), found.end());
      }
      TensorStorageMetadata part{tensor->properties, tensor->size, {}};
      part.chunks.reserve(found.size());
      for (const auto i : found) {
        part.chunks.push_back(tensor->chunks[i]);
        storage_of({key.fqn, tensor->chunks[i].offsets, std::nullopt});
      }
      out.metadata.state_dict_metadata.emplace(key.fqn, std::move(part));
    }
  }
  return parts;
}

CheckpointMetadata metadata_part(const CheckpointMetadata& metadata, const MetadataRequest& request) {
  return std::move(metadata_parts(metadata, {request}).front());
}

}  // namespace ckpt::dcp
