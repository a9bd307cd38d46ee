#include "dcp/serialize.hpp"

#include "core/failures.hpp"
#include "format/dtypes.hpp"

#include <ckpt/dcp/storage.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <boost/json.hpp>

#include <array>
#include <filesystem>
#include <utility>

namespace ckpt::dcp::detail {

namespace json = boost::json;

namespace {

c10::ScalarType dtype_from(std::string_view name) {
  const c10::ScalarType t = ckpt::detail::dtype_of_torch_name(name);
  if (t == c10::ScalarType::Undefined || !ckpt::detail::storage_type_name(t))
    throw Error(fmt::format("unknown dtype '{}'", name));
  return t;
}

// --- writing -------------------------------------------------------------------

json::array ints(const std::vector<std::int64_t>& v) {
  json::array a;
  a.reserve(v.size());
  for (auto x : v) a.push_back(x);
  return a;
}

json::value to_json(const MetadataIndex& i) {
  json::object o{{"fqn", i.fqn}};
  if (i.offset) o["offset"] = ints(*i.offset);
  if (i.index) o["index"] = *i.index;
  return o;
}

json::value to_json(const ChunkStorageMetadata& c) {
  return json::object{{"offsets", ints(c.offsets)}, {"sizes", ints(c.sizes)}};
}

json::value to_json(const StorageInfo& s) {
  json::object o{{"path", s.relative_path}, {"offset", s.offset}, {"length", s.length}, {"crc32", s.crc32}};
  if (s.archive) o["archive"] = true;
  return o;
}

const char* write_type_name(WriteItemType t) {
  switch (t) {
    case WriteItemType::tensor: return "tensor";
    case WriteItemType::shard: return "shard";
    case WriteItemType::bytes: return "bytes";
  }
  return "?";
}

json::value to_json(const WriteItem& w) {
  json::object o{{"index", to_json(w.index)}, {"type", write_type_name(w.type)}};
  if (w.tensor_data)
    o["tensor"] = json::object{{"chunk", to_json(w.tensor_data->chunk)},
                               {"dtype", dtype_name(w.tensor_data->properties.dtype)},
                               {"requires_grad", w.tensor_data->properties.requires_grad},
                               {"size", ints(w.tensor_data->size)}};
  return o;
}

json::value to_json(const ReadItem& r) {
  return json::object{{"type", r.type == LoadItemType::tensor ? "tensor" : "bytes"},
                      {"dest", to_json(r.dest_index)},
                      {"dest_offsets", ints(r.dest_offsets)},
                      {"storage", to_json(r.storage_index)},
                      {"storage_offsets", ints(r.storage_offsets)},
                      {"lengths", ints(r.lengths)}};
}

/// `wire`: for another rank of this build (a metadata part), the dtype as its
/// number, so any dtype a checkpoint holds travels; else its torch name, for
/// files, refusing the dtypes DCP does not save.
json::value to_json(const Metadata& md, bool wire = false) {
  json::object keys;
  for (const auto& [fqn, sm] : md.state_dict_metadata) {
    if (const auto* t = std::get_if<TensorStorageMetadata>(&sm)) {
      json::array chunks;
      for (const auto& c : t->chunks) chunks.push_back(to_json(c));
      json::value dtype;
      if (wire)
        dtype = static_cast<std::int64_t>(t->properties.dtype);
      else
        dtype = dtype_name(t->properties.dtype);
      keys[fqn] = json::object{{"type", "tensor"},
                               {"dtype", std::move(dtype)},
                               {"requires_grad", t->properties.requires_grad},
                               {"size", ints(t->size)},
                               {"chunks", std::move(chunks)}};
    } else {
      keys[fqn] = json::object{{"type", "bytes"}};
    }
  }
  return keys;
}

// --- reading -------------------------------------------------------------------

const json::object& obj(const json::value& v) {
  return v.as_object();
}

std::vector<std::int64_t> ints_from(const json::value& v) {
  std::vector<std::int64_t> out;
  for (const auto& x : v.as_array()) out.push_back(x.to_number<std::int64_t>());
  return out;
}

std::string str(const json::value& v) {
  return std::string(v.as_string());
}

MetadataIndex index_from(const json::value& v) {
  const auto& o = obj(v);
  MetadataIndex i;
  i.fqn = str(o.at("fqn"));
  if (const auto* off = o.if_contains("offset")) i.offset = ints_from(*off);
  if (const auto* idx = o.if_contains("index")) i.index = idx->to_number<std::int64_t>();
  return i;
}

ChunkStorageMetadata chunk_from(const json::value& v) {
  const auto& o = obj(v);
  return {ints_from(o.at("offsets")), ints_from(o.at("sizes"))};
}

StorageInfo storage_from(const json::value& v) {
  const auto& o = obj(v);
  const auto* archive = o.if_contains("archive");
  return {str(o.at("path")),
          o.at("offset").to_number<std::uint64_t>(),
          o.at("length").to_number<std::uint64_t>(),
          o.at("crc32").to_number<std::uint32_t>(),
          archive && archive->as_bool(),
          {}};
}

WriteItem write_item_from(const json::value& v) {
  const auto& o = obj(v);
  WriteItem w;
  w.index = index_from(o.at("index"));
  const auto type = str(o.at("type"));
  if (type == "tensor")
    w.type = WriteItemType::tensor;
  else if (type == "shard")
    w.type = WriteItemType::shard;
  else if (type == "bytes")
    w.type = WriteItemType::bytes;
  else
    throw Error(fmt::format("unknown write item type '{}'", type));
  if (const auto* t = o.if_contains("tensor")) {
    const auto& to = obj(*t);
    w.tensor_data =
        TensorWriteData{chunk_from(to.at("chunk")),
                        {dtype_from(to.at("dtype").as_string()), to.at("requires_grad").as_bool()},
                        ints_from(to.at("size"))};
  }
  return w;
}

ReadItem read_item_from(const json::value& v) {
  const auto& o = obj(v);
  ReadItem r;
  const auto type = str(o.at("type"));
  if (type == "tensor")
    r.type = LoadItemType::tensor;
  else if (type == "bytes")
    r.type = LoadItemType::bytes;
  else
    throw Error(fmt::format("unknown read item type '{}'", type));
  r.dest_index = index_from(o.at("dest"));
  r.dest_offsets = ints_from(o.at("dest_offsets"));
  r.storage_index = index_from(o.at("storage"));
  r.storage_offsets = ints_from(o.at("storage_offsets"));
  r.lengths = ints_from(o.at("lengths"));
  return r;
}

LoadPlan load_plan_from(const json::value& v) {
  LoadPlan p;
  for (const auto& i : v.at("items").as_array()) p.items.push_back(read_item_from(i));
  p.storage_data = str(v.at("storage_data"));
  p.planner_data = str(v.at("planner_data"));
  return p;
}

Metadata metadata_from(const json::value& v, bool wire = false) {
  Metadata md;
  for (const auto& [key, value] : obj(v)) {
    const auto& o = obj(value);
    const auto type = str(o.at("type"));
    if (type == "bytes") {
      md.state_dict_metadata.emplace(std::string(key), BytesStorageMetadata{});
    } else if (type == "tensor") {
      TensorStorageMetadata t;
      c10::ScalarType dtype{};
      if (wire) {
        const auto n = o.at("dtype").to_number<std::int64_t>();
        if (n < 0 || n >= static_cast<std::int64_t>(c10::ScalarType::NumOptions))
          throw Error(fmt::format("key '{}' has dtype number {}", std::string_view(key), n));
        dtype = static_cast<c10::ScalarType>(n);
      } else {
        dtype = dtype_from(o.at("dtype").as_string());
      }
      t.properties = {dtype, o.at("requires_grad").as_bool()};
      t.size = ints_from(o.at("size"));
      for (const auto& c : o.at("chunks").as_array()) t.chunks.push_back(chunk_from(c));
      md.state_dict_metadata.emplace(std::string(key), std::move(t));
    } else {
      throw Error(fmt::format("key '{}' has unknown type '{}'", std::string_view(key), type));
    }
  }
  return md;
}

/// Error texts may quote bytes that are not UTF-8 (a damaged file's names):
/// they are written as they are, and must read back.
json::parse_options lenient() {
  json::parse_options o;
  o.allow_invalid_utf8 = true;
  return o;
}

template <class F>
auto parse(std::string_view text, const char* what, F&& f) {
  try {
    return f(json::parse(text, {}, lenient()));
  } catch (const std::exception& e) {
    throw Error(fmt::format("malformed {}: {}", what, e.what()));
  }
}

template <class Plan>
json::object plan_json(const Plan& plan) {
  json::array items;
  items.reserve(plan.items.size());
  for (const auto& i : plan.items) items.push_back(to_json(i));
  return json::object{
      {"items", std::move(items)}, {"storage_data", plan.storage_data}, {"planner_data", plan.planner_data}};
}

bool plain_name(const std::string& name) {
  const std::filesystem::path p(name);
  return !name.empty() && name != "." && name != ".." && !p.is_absolute() && !p.has_parent_path() &&
         name.find('\0') == std::string::npos && name.find('/') == std::string::npos;
}

}  // namespace

const char* dtype_name(c10::ScalarType dtype) {
  if (ckpt::detail::storage_type_name(dtype)) return ckpt::detail::torch_dtype_name(dtype);
  throw Unsupported(fmt::format("dtype {} cannot be saved by the DCP core", c10::toString(dtype)));
}

std::string item_name(const MetadataIndex& index) {
  if (!index.offset) return index.fqn;
  return fmt::format("{}@{}", index.fqn, fmt::join(*index.offset, ","));
}

std::string encode(const SavePlan& plan) {
  return json::serialize(plan_json(plan));
}

std::string encode(const LoadPlan& plan) {
  return json::serialize(plan_json(plan));
}

std::string encode(const ReadItem& item) {
  return json::serialize(to_json(item));
}

std::string encode(const SharedLoadPlan& plan) {
  json::array steps;
  steps.reserve(plan.steps.size());
  for (const auto& s : plan.steps) {
    json::array to;
    for (auto r : s.to) to.push_back(r);
    steps.push_back(
        json::object{{"tag", s.tag}, {"item", to_json(s.item)}, {"from", s.from}, {"to", std::move(to)}});
  }
  return json::serialize(json::object{{"plan", plan_json(plan.plan)},
                                      {"steps", std::move(steps)},
                                      {"any", plan.any},
                                      {"tag_base", plan.tag_base}});
}

std::string encode(const std::vector<WriteResult>& results) {
  json::array a;
  a.reserve(results.size());
  for (const auto& r : results)
    a.push_back(json::object{
        {"index", to_json(r.index)}, {"size", r.size_in_bytes}, {"storage", to_json(r.storage_data)}});
  return json::serialize(a);
}

std::string encode(const Metadata& metadata) {
  return json::serialize(to_json(metadata));
}

std::string encode(const std::map<std::int64_t, RankFailure>& failures) {
  return ckpt::detail::encode_failures(failures);
}

SavePlan decode_save_plan(std::string_view text) {
  return parse(text, "save plan", [](const json::value& v) {
    SavePlan p;
    for (const auto& i : v.at("items").as_array()) p.items.push_back(write_item_from(i));
    p.storage_data = str(v.at("storage_data"));
    p.planner_data = str(v.at("planner_data"));
    return p;
  });
}

LoadPlan decode_load_plan(std::string_view text) {
  return parse(text, "load plan", [](const json::value& v) { return load_plan_from(v); });
}

SharedLoadPlan decode_shared_load_plan(std::string_view text) {
  return parse(text, "shared load plan", [](const json::value& v) {
    SharedLoadPlan p;
    p.plan = load_plan_from(v.at("plan"));
    for (const auto& s : v.at("steps").as_array()) {
      ShareStep step;
      step.tag = s.at("tag").to_number<std::uint32_t>();
      step.item = read_item_from(s.at("item"));
      step.from = s.at("from").to_number<std::int64_t>();
      for (const auto& r : s.at("to").as_array()) step.to.push_back(r.to_number<std::int64_t>());
      p.steps.push_back(std::move(step));
    }
    p.any = v.at("any").as_bool();
    p.tag_base = v.at("tag_base").to_number<std::uint32_t>();
    if (p.tag_base % kMaxSharedItems != 0 || p.tag_base > kMaxTagBase)
      throw Error(fmt::format("tag base {}", p.tag_base));
    for (const auto& s : p.steps)
      if (s.tag >= kMaxSharedItems) throw Error(fmt::format("tag {}", s.tag));
    return p;
  });
}

std::vector<WriteResult> decode_write_results(std::string_view text) {
  return parse(text, "write results", [](const json::value& v) {
    std::vector<WriteResult> out;
    for (const auto& r : v.as_array())
      out.push_back({index_from(r.at("index")), r.at("size").to_number<std::uint64_t>(),
                     storage_from(r.at("storage"))});
    return out;
  });
}

Metadata decode_metadata(std::string_view text) {
  return parse(text, "metadata", [](const json::value& v) { return metadata_from(v); });
}

std::map<std::int64_t, RankFailure> decode_failures(std::string_view text) {
  return ckpt::detail::decode_failures(text);
}

std::string encode(const MetadataRequest& request) {
  json::array keys;
  keys.reserve(request.keys.size());
  for (const auto& k : request.keys) {
    json::object o{{"fqn", k.fqn}};
    if (k.chunks) {
      json::array chunks;
      for (const auto& c : *k.chunks) chunks.push_back(to_json(c));
      o["chunks"] = std::move(chunks);
    }
    keys.push_back(std::move(o));
  }
  return json::serialize(json::object{{"keys", std::move(keys)}});
}

MetadataRequest decode_metadata_request(std::string_view text) {
  return parse(text, "metadata request", [](const json::value& v) {
    MetadataRequest r;
    for (const auto& k : v.at("keys").as_array()) {
      MetadataRequest::Key key{str(k.at("fqn")), std::nullopt};
      if (const auto* chunks = obj(k).if_contains("chunks")) {
        key.chunks.emplace();
        for (const auto& c : chunks->as_array()) key.chunks->push_back(chunk_from(c));
      }
      r.keys.push_back(std::move(key));
    }
    return r;
  });
}

std::string encode_metadata_part(const CheckpointMetadata& metadata) {
  json::array storage;
  storage.reserve(metadata.storage_data.size());
  for (const auto& [index, info] : metadata.storage_data) {
    json::object s = to_json(info).as_object();
    if (!info.transforms.empty()) {
      json::array t;
      for (const auto& x : info.transforms) t.push_back(json::string(x));
      s["transforms"] = std::move(t);
    }
    storage.push_back(json::object{{"index", to_json(index)}, {"storage", std::move(s)}});
  }
  json::object paths;
  for (const auto& [fqn, path] : metadata.metadata.planner_data) {
    json::array parts;
    for (const auto& part : path) {
      if (const auto* text = std::get_if<std::string>(&part))
        parts.push_back(json::object{{"s", *text}});
      else
        parts.push_back(json::object{{"i", std::get<std::int64_t>(part)}});
    }
    paths[fqn] = std::move(parts);
  }
  json::object root{{"keys", to_json(metadata.metadata, /*wire=*/true)},
                    {"planner_data", std::move(paths)},
                    {"version", metadata.metadata.version},
                    {"storage_data", std::move(storage)}};
  if (const auto& m = metadata.metadata.storage_meta)
    root["storage_meta"] =
        json::object{{"checkpoint_id", m->checkpoint_id}, {"save_id", m->save_id}, {"load_id", m->load_id}};
  return json::serialize(root);
}

CheckpointMetadata decode_metadata_part(std::string_view text) {
  return parse(text, "metadata part", [](const json::value& v) {
    CheckpointMetadata out;
    out.metadata = metadata_from(v.at("keys"), /*wire=*/true);
    for (const auto& [fqn, parts] : obj(v.at("planner_data"))) {
      ObjectPath path;
      for (const auto& part : parts.as_array()) {
        if (const auto* text = obj(part).if_contains("s"))
          path.emplace_back(str(*text));
        else
          path.emplace_back(part.at("i").to_number<std::int64_t>());
      }
      out.metadata.planner_data.emplace(std::string(fqn), std::move(path));
    }
    out.metadata.version = str(v.at("version"));
    if (const auto* m = obj(v).if_contains("storage_meta"))
      out.metadata.storage_meta =
          StorageMeta{str(m->at("checkpoint_id")), str(m->at("save_id")), str(m->at("load_id"))};
    for (const auto& e : v.at("storage_data").as_array()) {
      StorageInfo info = storage_from(e.at("storage"));
      if (const auto* t = obj(e.at("storage")).if_contains("transforms"))
        for (const auto& x : t->as_array()) info.transforms.push_back(str(x));
      out.storage_data.emplace(index_from(e.at("index")), std::move(info));
    }
    return out;
  });
}

std::string encode_checkpoint_metadata(const CheckpointMetadata& metadata) {
  json::array storage;
  for (const auto& [index, info] : metadata.storage_data)
    storage.push_back(json::object{{"index", to_json(index)}, {"storage", to_json(info)}});
  json::object root{{"format", "ckpt-dcp"},
                    {"version", kMetadataVersion},
                    {"state_dict_metadata", to_json(metadata.metadata)},
                    {"storage_data", std::move(storage)}};
  return json::serialize(root) + "\n";
}

CheckpointMetadata decode_checkpoint_metadata(std::string_view text, const std::string& source) {
  const auto bad = [&](const std::string& why) {
    return CorruptCheckpoint(fmt::format("{}: {}", source, why));
  };
  json::value v;
  try {
    v = json::parse(text, {}, lenient());
  } catch (const std::exception& e) {
    throw bad(fmt::format("not JSON ({})", e.what()));
  }
  CheckpointMetadata out;
  try {
    const auto& o = v.as_object();
    const auto* format = o.if_contains("format");
    if (!format || !format->is_string() || format->as_string() != "ckpt-dcp")
      throw bad("not a ckpt DCP metadata file (no \"format\": \"ckpt-dcp\")");
    const auto version = o.at("version").to_number<std::int64_t>();
    if (version < 1 || version > kMetadataVersion)
      throw bad(fmt::format("metadata version {} is not one this library reads (1 to {})", version,
                            kMetadataVersion));
    out.metadata = metadata_from(o.at("state_dict_metadata"));
    for (const auto& e : o.at("storage_data").as_array())
      out.storage_data.emplace(index_from(e.at("index")), storage_from(e.at("storage")));
  } catch (const CorruptCheckpoint&) {
    throw;
  } catch (const std::exception& e) {
    throw bad(fmt::format("malformed ({})", e.what()));
  }
  check_checkpoint_metadata(out, source);
  return out;
}

void check_checkpoint_metadata(const CheckpointMetadata& out, const std::string& source) {
  const auto bad = [&](const std::string& why) {
    return CorruptCheckpoint(fmt::format("{}: {}", source, why));
  };
  // Every number checked before anything is sized or read from it.
  for (const auto& [fqn, sm] : out.metadata.state_dict_metadata) {
    const auto* t = std::get_if<TensorStorageMetadata>(&sm);
    if (!t) continue;
    const auto dims = t->size.size();
    std::int64_t bytes = static_cast<std::int64_t>(c10::elementSize(t->properties.dtype));
    for (auto s : t->size) {
      if (s < 0) throw bad(fmt::format("key '{}' has a negative size", fqn));
      if (__builtin_mul_overflow(bytes, s, &bytes) || bytes > (std::int64_t{1} << 62))
        throw bad(fmt::format("key '{}' of size [{}] is larger than any tensor can be", fqn,
                              fmt::join(t->size, ", ")));
    }
    for (const auto& c : t->chunks) {
      if (c.offsets.size() != dims || c.sizes.size() != dims)
        throw bad(fmt::format("a chunk of '{}' has {} dims, the tensor {}", fqn, c.sizes.size(), dims));
      for (std::size_t d = 0; d < dims; ++d)
        if (c.offsets[d] < 0 || c.sizes[d] < 0 || c.offsets[d] > t->size[d] ||
            c.sizes[d] > t->size[d] - c.offsets[d])
          throw bad(fmt::format("a chunk of '{}' lies outside the tensor", fqn));
    }
  }
  // The chunks of every key tile it exactly (else a load would leave gaps).
  for (const auto& [fqn, sm] : out.metadata.state_dict_metadata)
    if (const auto* t = std::get_if<TensorStorageMetadata>(&sm)) {
      try {
        validate_chunks(fqn, *t);
      } catch (const Error& e) {
        throw bad(e.what());
      }
    }
  for (const auto& [index, info] : out.storage_data) {
    if (!plain_name(info.relative_path))
      throw bad(
          fmt::format("item '{}' names file '{}', which is not a plain name in the checkpoint directory",
                      item_name(index), info.relative_path));
    if (info.length > (std::uint64_t{1} << 62) || info.offset > (std::uint64_t{1} << 62))
      throw bad(fmt::format("item '{}' has an impossible offset or length", item_name(index)));
  }
}

}  // namespace ckpt::dcp::detail
