#include <ckpt/checkpoint_reader.hpp>

#include <ckpt/commit.hpp>
#include <ckpt/format.hpp>

#include "core/key_path.hpp"

#include <fmt/format.h>

#include <ATen/ATen.h>

namespace ckpt {

MapLocation::MapLocation(c10::Device device) : device_(device) {}
MapLocation::MapLocation(const char* device) : MapLocation(std::string(device)) {}
MapLocation::MapLocation(const std::string& device) {
  try {
    device_ = c10::Device(device);
  } catch (const std::exception&) {
    throw Mismatch(fmt::format("map_location '{}' is not a device", device));
  }
}
MapLocation::MapLocation(std::map<std::string, std::string> remap) : remap_(std::move(remap)) {
  for (const auto& [from, to] : remap_) (void)MapLocation(to);  // each target must parse
}
MapLocation::MapLocation(Function fn) : fn_(std::move(fn)) {}

bool MapLocation::empty() const {
  return !device_ && remap_.empty() && !fn_;
}

c10::Device MapLocation::device_for(const std::string& location) const {
  if (device_) return *device_;
  if (auto it = remap_.find(location); it != remap_.end()) return c10::Device(it->second);
  return c10::Device(location);  // not remapped: where it was stored
}

namespace {

using detail::key_text;

bool same_key(const Node& file_key, const c10::IValue& k) {
  switch (file_key.kind) {
    case Node::Kind::string: return k.isString() && k.toStringRef() == file_key.s;
    case Node::Kind::integer: return k.isInt() && k.toInt() == file_key.i;
    case Node::Kind::boolean: return k.isBool() && k.toBool() == file_key.b;
    case Node::Kind::real: return k.isDouble() && k.toDouble() == file_key.d;
    default: return false;
  }
}

/// Walks a target against the file's tree (upstream's _partial_read).
class PartialRead {
 public:
  PartialRead(FileReader& reader, std::vector<std::string>& missing) : reader_(reader), missing_(missing) {}

  c10::IValue value(const c10::IValue& target, const Node& src, const std::string& path) {
    if (target.isNone()) return reader_.to_ivalue(src);  // the file's value, whole
    switch (src.kind) {
      case Node::Kind::tensor: {
        if (!target.isTensor()) mismatch(target, src, path);
        at::Tensor t = target.toTensor();
        reader_.read_into(*src.tensor, t, path);
        return target;
      }
      case Node::Kind::dict: {
        if (!target.isGenericDict()) mismatch(target, src, path);
        dict(target.toGenericDict(), src, path);
        return target;
      }
      case Node::Kind::list: {
        if (!target.isList()) mismatch(target, src, path);
        auto list = target.toList();
        for (std::size_t i = 0; i < std::max(list.size(), src.items.size()); ++i) {
          const std::string item_path = fmt::format("{}[{}]", path, i);
          if (i >= src.items.size()) {
            if (!list.get(i).isNone())
              throw Mismatch(fmt::format("{}: target list '{}' has {} items but the checkpoint's has {}",
                                         file(), path, list.size(), src.items.size()));
          } else if (i >= list.size()) {
            list.push_back(reader_.to_ivalue(*src.items[i]));
          } else {
            list.set(i, value(list.get(i), *src.items[i], item_path));
          }
        }
        return target;
      }
      case Node::Kind::tuple: {
        // Tuples are immutable: the result is a new tuple, element by element.
        if (!target.isTuple()) mismatch(target, src, path);
        const auto& elems = target.toTupleRef().elements();
        if (elems.size() > src.items.size())
          throw Mismatch(fmt::format("{}: target tuple '{}' has {} items but the checkpoint's has {}", file(),
                                     path, elems.size(), src.items.size()));
        std::vector<c10::IValue> out;
        for (std::size_t i = 0; i < src.items.size(); ++i)
          out.push_back(i < elems.size() ? value(elems[i], *src.items[i], fmt::format("{}[{}]", path, i))
                                         : reader_.to_ivalue(*src.items[i]));
        return c10::ivalue::Tuple::create(std::move(out));
      }
      case Node::Kind::none: mismatch(target, src, path);
      case Node::Kind::boolean:
        if (!target.isBool()) mismatch(target, src, path);
        return reader_.to_ivalue(src);
      case Node::Kind::integer:
        if (!target.isInt()) mismatch(target, src, path);
        return reader_.to_ivalue(src);
      case Node::Kind::real:
        if (!target.isDouble()) mismatch(target, src, path);
        return reader_.to_ivalue(src);
      case Node::Kind::string:
        if (!target.isString()) mismatch(target, src, path);
        return reader_.to_ivalue(src);
    }
    return target;
  }

  /// Fills the keys of `target` that the file has; reports the others.
  void dict(c10::impl::GenericDict target, const Node& src, const std::string& path) {
    // Collect first: assigning while iterating a c10::Dict is not allowed.
    std::vector<std::pair<c10::IValue, c10::IValue>> updates;
    for (const auto& entry : target) {
      const std::string key_path = path.empty() ? key_text(entry.key()) : path + "." + key_text(entry.key());
      const Node* found = nullptr;
      for (const auto& [k, v] : src.entries)
        if (same_key(*k, entry.key())) found = v;
      if (!found) {
        missing_.push_back(key_path);
        continue;
      }
      updates.emplace_back(entry.key(), value(entry.value(), *found, key_path));
    }
    for (auto& [k, v] : updates) target.insert_or_assign(std::move(k), std::move(v));
  }

 private:
  static const char* kind_of(const c10::IValue& v) {
    if (v.isTensor()) return "tensor";
    if (v.isGenericDict()) return "dict";
    if (v.isList()) return "list";
    if (v.isTuple()) return "tuple";
    if (v.isBool()) return "bool";
    if (v.isInt()) return "int";
    if (v.isDouble()) return "float";
    if (v.isString()) return "str";
    return v.tagKind().c_str();
  }
  [[noreturn]] void mismatch(const c10::IValue& target, const Node& src, const std::string& path) const {
    throw Mismatch(fmt::format("{}: target value '{}' is a {} but the checkpoint holds a {}", file(),
                               path.empty() ? "<root>" : path, kind_of(target), kind_name(src.kind)));
  }
  std::string file() const { return reader_.path().string(); }

  FileReader& reader_;
  std::vector<std::string>& missing_;
};

}  // namespace

CheckpointReader::CheckpointReader(RankInfo rank_info) : rank_info_(rank_info) {}
CheckpointReader::~CheckpointReader() = default;

ReadResult CheckpointReader::read(const std::filesystem::path& path, std::optional<StateDict> state_dict,
                                  const ReaderOptions& options, const Kwargs& /*kwargs*/) {
  const auto file = path / checkpoint_file_name(rank_info_.global_rank);
  if (!std::filesystem::exists(file))
    throw NotFound(fmt::format("Checkpoint file not found at {}", file.string()));

  ReadOptions read_options;
  read_options.mmap = options.mmap;
  read_options.verify_crc = options.verify_crc;
  const MapLocation& map = options.map_location;
  if (map.is_function()) {
    // The function sees each tensor on the CPU, with where it was stored.
    read_options.map_location = [](const std::string&) { return c10::Device(c10::kCPU); };
    read_options.map_tensor = map.function();
  } else if (!map.empty()) {
    read_options.map_location = [map](const std::string& location) { return map.device_for(location); };
  }

  FileReader reader(file, read_options);
  if (reader.root().kind != Node::Kind::dict)
    throw Mismatch(
        fmt::format("{} holds a {}, not a state dict", file.string(), kind_name(reader.root().kind)));
  ReadResult result;
  if (!state_dict) {
    result.state_dict = StateDict::from_ivalue(reader.load());
    return result;
  }
  PartialRead(reader, result.missing_keys).dict(state_dict->dict(), reader.root(), "");
  result.state_dict = *state_dict;
  return result;
}

}  // namespace ckpt
