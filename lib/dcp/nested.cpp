// The modern DCP API over nested state dicts: flattening with upstream's
// rules (torch.distributed.checkpoint._traverse, torch >= 2.4), dcp::save,
// dcp::load and dcp::load_all.
#include <ckpt/dcp/hf_storage.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>

#include <ckpt/error.hpp>

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <fmt/format.h>

#include <memory>
#include <set>
#include <utility>

namespace ckpt::dcp {

namespace {

struct OpaqueHolder : torch::CustomClassHolder {
  explicit OpaqueHolder(OpaqueValue v) : value(std::move(v)) {}
  OpaqueValue value;
};

struct ShardedHolder : torch::CustomClassHolder {
  explicit ShardedHolder(ShardedTensor t) : tensor(std::move(t)) {}
  ShardedTensor tensor;
};

/// Where a leaf sits: its container and its key there (a dict key, or a
/// list index), so a load can replace it.
struct Slot {
  c10::IValue container;
  c10::IValue key;
};

struct Leaf {
  std::string fqn;
  ObjectPath path;
  c10::IValue value;
  Slot slot;
};

bool is_tensor_like(const c10::IValue& v) {
  return v.isTensor() || as_sharded(v) != nullptr;
}

/// upstream's _is_terminal: a dict never is; a list is unless it holds a
/// tensor or a container that is not terminal itself; anything else is.
bool terminal(const c10::IValue& v, int depth) {
  if (depth > 1000) throw Unsupported("a state dict nested deeper than 1000 levels");
  if (v.isGenericDict()) return false;
  if (!v.isList()) return true;
  for (const c10::IValue& e : v.toListRef()) {
    if ((e.isGenericDict() || e.isList()) && !terminal(e, depth + 1)) return false;
    if (is_tensor_like(e)) return false;
  }
  return true;
}

std::string join(const ObjectPath& path) {
  std::string out;
  for (const auto& part : path) {
    if (!out.empty()) out += '.';
    if (const auto* s = std::get_if<std::string>(&part))
      out += *s;
    else
      out += std::to_string(std::get<std::int64_t>(part));
  }
  return out;
}

std::string key_text(const c10::IValue& key, const ObjectPath& path) {
  if (key.isString()) return key.toStringRef();
  if (key.isInt()) return std::to_string(key.toInt());
  throw Unsupported(
      fmt::format("a dict under '{}' has a key of type {}; only text and int keys are flattened",
                  path.empty() ? "<root>" : join(path), key.tagKind()));
}

void traverse(ObjectPath& path, const c10::IValue& value, const Slot& slot, std::vector<Leaf>& out,
              int depth) {
  if (depth > 1000) throw Unsupported("a state dict nested deeper than 1000 levels");
  if (value.isGenericDict()) {
    const auto dict = value.toGenericDict();
    for (const auto& e : dict) {
      path.emplace_back(key_text(e.key(), path));
      traverse(path, e.value(), Slot{value, e.key()}, out, depth + 1);
      path.pop_back();
    }
  } else if (value.isList() && !terminal(value, depth)) {
    const auto list = value.toList();
    for (std::size_t i = 0; i < list.size(); ++i) {
      path.emplace_back(static_cast<std::int64_t>(i));
      traverse(path, list.get(i), Slot{value, c10::IValue(static_cast<std::int64_t>(i))}, out, depth + 1);
      path.pop_back();
    }
  } else {
    out.push_back(Leaf{join(path), path, value, slot});
  }
}

std::vector<Leaf> leaves(const StateDict& state_dict) {
  std::vector<Leaf> out;
  ObjectPath path;
  const c10::IValue root = state_dict.to_ivalue();
  traverse(path, root, Slot{}, out, 0);
  std::set<std::string> seen;
  for (const auto& l : out)
    if (!seen.insert(l.fqn).second)
      throw Error(fmt::format("two values of the state dict both flatten to the key '{}'", l.fqn));
  return out;
}

Value flat_value(const c10::IValue& v) {
  if (v.isTensor()) return v.toTensor();
  if (const ShardedTensor* st = as_sharded(v)) return *st;
  return v;
}

/// Sets `path` of `root` to `value`, making the dicts and lists on the way
/// (upstream's set_element: a list grows with None up to an index).
void set_element(c10::impl::GenericDict& root, const ObjectPath& path, const c10::IValue& value) {
  const auto text = [](const std::variant<std::string, std::int64_t>& part) {
    return std::get<std::string>(part);
  };
  const auto fresh = [](const std::variant<std::string, std::int64_t>& next) -> c10::IValue {
    if (std::holds_alternative<std::string>(next))
      return c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get());
    return c10::impl::GenericList(c10::AnyType::get());
  };
  const auto grow = [](c10::impl::GenericList& list, std::int64_t index) {
    if (index < 0 || index > (std::int64_t{1} << 24))
      throw CorruptCheckpoint(fmt::format("a planner data path holds the list index {}", index));
    while (static_cast<std::int64_t>(list.size()) <= index) list.push_back(c10::IValue());
  };
  c10::IValue current(root);
  for (std::size_t i = 0; i + 1 <= path.size(); ++i) {
    const auto& part = path[i];
    const bool last = i + 1 == path.size();
    if (current.isGenericDict()) {
      if (!std::holds_alternative<std::string>(part))
        throw CorruptCheckpoint("a planner data path indexes a dict with a number");
      auto dict = current.toGenericDict();
      if (last) {
        dict.insert_or_assign(text(part), value);
        return;
      }
      auto it = dict.find(text(part));
      if (it == dict.end()) it = dict.insert(text(part), fresh(path[i + 1])).first;
      current = it->value();
    } else if (current.isList()) {
      if (!std::holds_alternative<std::int64_t>(part))
        throw CorruptCheckpoint("a planner data path names a key of a list");
      auto list = current.toList();
      const auto index = std::get<std::int64_t>(part);
      grow(list, index);
      if (last) {
        list.set(static_cast<std::size_t>(index), value);
        return;
      }
      if (list.get(static_cast<std::size_t>(index)).isNone())
        list.set(static_cast<std::size_t>(index), fresh(path[i + 1]));
      current = list.get(static_cast<std::size_t>(index));
    } else {
      throw CorruptCheckpoint("two planner data paths disagree: one goes through the value of another");
    }
  }
}

}  // namespace

c10::IValue opaque_value(OpaqueValue value) {
  return c10::IValue::make_capsule(c10::make_intrusive<OpaqueHolder>(std::move(value)));
}

const OpaqueValue* as_opaque(const c10::IValue& value) {
  if (!value.isCapsule()) return nullptr;
  const auto* holder = dynamic_cast<const OpaqueHolder*>(value.toCapsule().get());
  return holder ? &holder->value : nullptr;
}

const c10::IValue& contents_of(const c10::IValue& value) {
  if (const OpaqueValue* o = as_opaque(value))
    throw Unsupported(
        fmt::format("the value of '{}' is kept opaque, its contents unread: {}", o->key, o->reason));
  return value;
}

c10::IValue sharded_value(ShardedTensor tensor) {
  return c10::IValue::make_capsule(c10::make_intrusive<ShardedHolder>(std::move(tensor)));
}

const ShardedTensor* as_sharded(const c10::IValue& value) {
  if (!value.isCapsule()) return nullptr;
  const auto* holder = dynamic_cast<const ShardedHolder*>(value.toCapsule().get());
  return holder ? &holder->tensor : nullptr;
}

std::pair<DcpStateDict, std::map<std::string, ObjectPath>> flatten_state_dict(const StateDict& state_dict) {
  std::pair<DcpStateDict, std::map<std::string, ObjectPath>> out;
  for (auto& l : leaves(state_dict)) {
    out.first.emplace_back(l.fqn, flat_value(l.value));
    out.second.emplace(l.fqn, std::move(l.path));
  }
  return out;
}

StateDict unflatten_state_dict(const DcpStateDict& flat, const std::map<std::string, ObjectPath>& paths) {
  StateDict out;
  auto root = out.dict();
  for (const auto& [fqn, value] : flat) {
    c10::IValue v;
    if (const auto* t = std::get_if<at::Tensor>(&value))
      v = *t;
    else if (const auto* st = std::get_if<ShardedTensor>(&value))
      v = sharded_value(*st);
    else
      v = std::get<c10::IValue>(value);
    const auto it = paths.find(fqn);
    if (it == paths.end() || it->second.empty())
      set_element(root, ObjectPath{fqn}, v);
    else
      set_element(root, it->second, v);
  }
  return out;
}

Metadata save(const StateDict& state_dict, const SaveOptions& options) {
  std::optional<FileSystemWriter> own;
  StorageWriter* storage = options.storage_writer;
  if (!storage) {
    if (!options.checkpoint_id) throw Error("dcp::save needs a checkpoint_id or a storage_writer");
    storage = &own.emplace(*options.checkpoint_id);
  } else if (options.checkpoint_id) {
    storage->reset(options.checkpoint_id);
  }
  auto [flat, paths] = flatten_state_dict(state_dict);
  DefaultSavePlanner default_planner;
  SavePlanner* planner = options.planner ? options.planner : &default_planner;
  if (auto* d = dynamic_cast<DefaultSavePlanner*>(planner)) d->set_planner_data(std::move(paths));
  return save_state_dict(flat, *storage, planner, options.process_group, options.coordinator_rank,
                         options.no_dist, options.timeout);
}

namespace {

/// The storage to load from: the one given, else a HuggingFaceStorageReader
/// for a directory of safetensors files, else a FileSystemReader.
StorageReader& reader_of(const LoadOptions& options, std::unique_ptr<StorageReader>& own, const char* what) {
  if (options.storage_reader) {
    if (options.checkpoint_id) options.storage_reader->reset(options.checkpoint_id);
    return *options.storage_reader;
  }
  if (!options.checkpoint_id) throw Error(fmt::format("{} needs a checkpoint_id or a storage_reader", what));
  if (is_hugging_face_checkpoint(*options.checkpoint_id))
    own = std::make_unique<HuggingFaceStorageReader>(*options.checkpoint_id);
  else
    own = std::make_unique<FileSystemReader>(*options.checkpoint_id);
  return *own;
}

}  // namespace

void load(const StateDict& state_dict, const LoadOptions& options) {
  std::unique_ptr<StorageReader> own;
  StorageReader& storage = reader_of(options, own, "dcp::load");
  std::vector<Leaf> ls = leaves(state_dict);
  DcpStateDict flat;
  flat.reserve(ls.size());
  for (const auto& l : ls) flat.emplace_back(l.fqn, flat_value(l.value));
  load_state_dict(flat, storage, options.planner, options.process_group, options.coordinator_rank,
                  options.no_dist, options.timeout, options.replicated_reads);
  // Tensors and shards were filled in place; other leaves are put back.
  for (std::size_t i = 0; i < ls.size(); ++i) {
    const auto* v = std::get_if<c10::IValue>(&flat[i].second);
    if (!v || is_tensor_like(ls[i].value) || v->isSameIdentity(ls[i].value)) continue;
    const Slot& slot = ls[i].slot;
    if (slot.container.isGenericDict())
      slot.container.toGenericDict().insert_or_assign(slot.key, *v);
    else if (slot.container.isList())
      slot.container.toList().set(static_cast<std::size_t>(slot.key.toInt()), *v);
  }
}

StateDict load_all(const std::filesystem::path& checkpoint_id, const LoadOptions& options) {
  std::unique_ptr<StorageReader> own;
  LoadOptions with_id = options;
  with_id.checkpoint_id = checkpoint_id;
  StorageReader& storage = reader_of(with_id, own, "dcp::load_all");
  const CheckpointMetadata md = storage.read_metadata();
  DcpStateDict flat;
  for (const auto& [fqn, sm] : md.metadata.state_dict_metadata) {
    if (const auto* t = std::get_if<TensorStorageMetadata>(&sm))
      flat.emplace_back(fqn, at::empty(t->size, at::TensorOptions().dtype(t->properties.dtype)));
    else
      flat.emplace_back(fqn, c10::IValue());
  }
  load_state_dict(flat, storage, options.planner, options.process_group, options.coordinator_rank,
                  options.no_dist, options.timeout, options.replicated_reads);
  return unflatten_state_dict(flat, md.metadata.planner_data);
}

}  // namespace ckpt::dcp
