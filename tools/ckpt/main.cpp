// ckpt — command-line tool for checkpoint files and directories.
//
//   ckpt inspect PATH [--json]   keys, dtypes, shapes, bytes and record offsets
//                                (safetensors: headers only, and the metadata)
//   ckpt verify PATH [--require-commit]
//                                structure and CRC-32 of every record and, for a
//                                directory, its commit marker (safetensors: every
//                                header and every tensor read whole); exit 0 when
//                                every file is sound (and, with --require-commit,
//                                the directory is committed), 1 when something is
//                                damaged, 3 when sound but not committed
//   ckpt convert SRC DST [--to torch|dcp|safetensors] [--dialect 2.4|2.0|1.13]
//                [--rank R] [--max-shard-bytes N] [--values-as-metadata]
//                [--skip-values] [--no-fsync]
//                                SRC into DST in another format, one tensor at a
//                                time (ckpt::dcp::convert; docs/convert.md); the
//                                format of DST from its name unless --to says;
//                                a progress line on a terminal
//
// PATH is a checkpoint file, a directory holding checkpoint_<rank>.pt files,
// a DCP checkpoint directory (one with `.metadata`: PyTorch's own format or
// ckpt's JSON dialect), or a Hugging Face safetensors checkpoint (a
// `.safetensors` file, a `.safetensors.index.json` and its shards, or a
// directory holding them). For a DCP directory, inspect lists every key's dtype,
// global shape and chunks with the file, offset and length of each, and verify
// reads every item: each chunk against its CRC-32 and its metadata, each
// PyTorch item archive's records against theirs. For safetensors, inspect reads
// only the headers (and the index) and lists every tensor's dtype, shape, bytes
// and where they lie; verify reads every tensor whole (the format has no
// checksums: it proves the headers sound and every byte readable).
#include <ckpt/commit.hpp>
#include <ckpt/dcp/convert.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/dcp/storage.hpp>
#include <ckpt/format.hpp>
#include <ckpt/safetensors.hpp>

#include <fmt/format.h>
#include <boost/json.hpp>

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace fs = std::filesystem;
namespace json = boost::json;

namespace {

int usage() {
  std::fputs(
      "usage: ckpt inspect PATH [--json]\n"
      "       ckpt verify PATH [--require-commit]\n"
      "       ckpt convert SRC DST [--to torch|dcp|safetensors] [--dialect 2.4|2.0|1.13] [--rank R]\n"
      "                    [--max-shard-bytes N] [--values-as-metadata] [--skip-values] [--no-fsync]\n"
      "PATH: a checkpoint file, a directory of checkpoint_<rank>.pt files, a DCP directory (.metadata),\n"
      "      or safetensors: a .safetensors file, a .safetensors.index.json, or a directory holding them\n",
      stderr);
  return 2;
}

std::vector<fs::path> files_of(const fs::path& path) {
  if (!fs::is_directory(path)) return {path};
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(path)) {
    const auto name = e.path().filename().string();
    if (e.is_regular_file() && name.starts_with("checkpoint_") && name.ends_with(".pt"))
      files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  if (files.empty())
    throw ckpt::NotFound(
        fmt::format("{} holds no checkpoint_<rank>.pt file, no DCP .metadata and no safetensors checkpoint",
                    path.string()));
  return files;
}

std::string key_text(const ckpt::Node& k) {
  switch (k.kind) {
    case ckpt::Node::Kind::string: return k.s;
    case ckpt::Node::Kind::integer: return std::to_string(k.i);
    case ckpt::Node::Kind::boolean: return k.b ? "True" : "False";
    case ckpt::Node::Kind::real: return fmt::format("{}", k.d);
    default: return "?";
  }
}

struct Entry {
  std::string key;
  json::object info;
};

void walk(ckpt::FileReader& reader, const ckpt::Node& n, const std::string& key, std::vector<Entry>& out) {
  using K = ckpt::Node::Kind;
  json::object o;
  switch (n.kind) {
    case K::dict:
      for (const auto& [k, v] : n.entries)
        walk(reader, *v, key.empty() ? key_text(*k) : key + "." + key_text(*k), out);
      if (!n.entries.empty()) return;
      o["type"] = "dict";
      break;
    case K::list:
    case K::tuple:
      for (std::size_t i = 0; i < n.items.size(); ++i)
        walk(reader, *n.items[i], fmt::format("{}[{}]", key, i), out);
      if (!n.items.empty()) return;
      o["type"] = ckpt::kind_name(n.kind);
      break;
    case K::tensor: {
      const auto& t = *n.tensor;
      std::int64_t numel = 1;
      for (auto s : t.sizes) numel *= s;
      o["type"] = "tensor";
      o["dtype"] = c10::toString(t.dtype);
      json::array shape;
      for (auto s : t.sizes) shape.push_back(s);
      o["shape"] = std::move(shape);
      o["bytes"] = numel * static_cast<std::int64_t>(c10::elementSize(t.dtype));
      o["location"] = t.location;
      const std::string name = reader.prefix() + "/data/" + t.storage_key;
      o["record"] = name;
      for (const auto& r : reader.records())
        if (r.name == name) {
          o["record_bytes"] = r.size;
          o["record_header_offset"] = r.header_offset;
        }
      o["storage_offset"] = t.storage_offset;
      break;
    }
    case K::none: o["type"] = "None"; break;
    case K::boolean:
      o["type"] = "bool";
      o["value"] = n.b;
      break;
    case K::integer:
      o["type"] = "int";
      o["value"] = n.i;
      break;
    case K::real:
      o["type"] = "float";
      o["value"] = n.d;
      break;
    case K::string:
      o["type"] = "str";
      o["value"] = n.s;
      break;
  }
  out.push_back({key.empty() ? "<root>" : key, std::move(o)});
}

// --- DCP checkpoint directories ----------------------------------------------

bool is_dcp(const fs::path& path) {
  std::error_code ec;
  return fs::is_directory(path, ec) && fs::exists(path / ckpt::dcp::kMetadataFileName, ec);
}

json::array ints(const std::vector<std::int64_t>& v) {
  json::array a;
  for (auto x : v) a.push_back(x);
  return a;
}

/// Where the item of `fqn` at `offsets` (nullopt: a value) is stored.
const ckpt::dcp::StorageInfo* storage_of(const ckpt::dcp::CheckpointMetadata& md, const std::string& fqn,
                                         const std::optional<std::vector<std::int64_t>>& offsets) {
  const auto it = md.storage_data.find(ckpt::dcp::MetadataIndex{fqn, offsets, std::nullopt});
  return it == md.storage_data.end() ? nullptr : &it->second;
}

json::object dcp_key(const ckpt::dcp::CheckpointMetadata& md, const std::string& fqn,
                     const ckpt::dcp::StorageMetadata& sm) {
  json::object o{{"key", fqn}};
  const auto where = [](const ckpt::dcp::StorageInfo* s) {
    if (!s) return json::object{{"file", nullptr}};
    return json::object{{"file", s->relative_path}, {"offset", s->offset}, {"length", s->length}};
  };
  if (const auto* t = std::get_if<ckpt::dcp::TensorStorageMetadata>(&sm)) {
    o["type"] = "tensor";
    o["dtype"] = c10::toString(t->properties.dtype);
    o["shape"] = ints(t->size);
    json::array chunks;
    for (const auto& c : t->chunks) {
      json::object co = where(storage_of(md, fqn, c.offsets));
      co["offsets"] = ints(c.offsets);
      co["sizes"] = ints(c.sizes);
      chunks.push_back(std::move(co));
    }
    o["chunks"] = std::move(chunks);
  } else {
    o["type"] = "value";
    o["storage"] = where(storage_of(md, fqn, std::nullopt));
  }
  return o;
}

int inspect_dcp(const fs::path& path, bool as_json) {
  const auto md = ckpt::dcp::read_checkpoint_metadata(path);
  const bool pytorch = !md.storage_data.empty() && md.storage_data.begin()->second.archive;
  const char* dialect = pytorch ? "pytorch" : "ckpt";
  if (as_json) {
    json::array keys;
    for (const auto& [fqn, sm] : md.metadata.state_dict_metadata) keys.push_back(dcp_key(md, fqn, sm));
    std::cout << json::serialize(json::object{{"dcp", path.string()}, {"dialect", dialect}, {"keys", keys}})
              << "\n";
    return 0;
  }
  fmt::print("{} (DCP, {} format, {} keys)\n", path.string(), dialect,
             md.metadata.state_dict_metadata.size());
  for (const auto& [fqn, sm] : md.metadata.state_dict_metadata) {
    const json::object o = dcp_key(md, fqn, sm);
    if (o.at("type").as_string() != "tensor") {
      const auto& s = o.at("storage").as_object();
      fmt::print("  {:<40} value          {}\n", fqn,
                 s.at("file").is_null() ? std::string("(stored nowhere)") : json::serialize(s));
      continue;
    }
    const auto& t = std::get<ckpt::dcp::TensorStorageMetadata>(sm);
    fmt::print("  {:<40} {:<14} [{}] in {} chunk{}\n", fqn, c10::toString(t.properties.dtype),
               fmt::join(t.size, ", "), t.chunks.size(), t.chunks.size() == 1 ? "" : "s");
    for (const auto& c : o.at("chunks").as_array())
      fmt::print(
          "      at [{}] size [{}]: {}\n", json::serialize(c.at("offsets")), json::serialize(c.at("sizes")),
          c.at("file").is_null() ? std::string("stored nowhere")
                                 : fmt::format("{} @ {} ({} bytes)", json::serialize(c.at("file")),
                                               c.at("offset").as_uint64(), c.at("length").as_uint64()));
  }
  return 0;
}

int verify_dcp(const fs::path& path) {
  const auto md = ckpt::dcp::read_checkpoint_metadata(path);
  int bad = 0;
  // Every key read whole, one at a time: every chunk's bytes against its
  // CRC-32 and its metadata, every value unpickled.
  for (const auto& [fqn, sm] : md.metadata.state_dict_metadata) {
    ckpt::dcp::DcpStateDict one;
    if (const auto* t = std::get_if<ckpt::dcp::TensorStorageMetadata>(&sm))
      one.emplace_back(fqn, at::empty(t->size, at::TensorOptions().dtype(t->properties.dtype)));
    else
      one.emplace_back(fqn, c10::IValue());
    try {
      ckpt::dcp::FileSystemReader reader(path);
      ckpt::dcp::DefaultLoadPlanner planner(/*allow_partial_load=*/true);
      ckpt::dcp::load_state_dict(one, reader, &planner, nullptr, 0, /*no_dist=*/true);
    } catch (const ckpt::Error& e) {
      fmt::print("BAD {}: {}\n", fqn, e.what());
      ++bad;
    }
  }
  // PyTorch's items are whole archives: every record of each against its CRC.
  for (const auto& [index, info] : md.storage_data) {
    if (!info.archive) continue;
    try {
      ckpt::FileReader(path / info.relative_path, info.offset, info.length).verify();
    } catch (const ckpt::Error& e) {
      fmt::print("BAD {}\n", e.what());
      ++bad;
    }
  }
  if (bad > 0) return 1;
  fmt::print("ok  {} (DCP, {} keys, {} items)\n", path.string(), md.metadata.state_dict_metadata.size(),
             md.storage_data.size());
  return 0;
}

// --- Hugging Face safetensors ------------------------------------------------------

namespace st = ckpt::safetensors;

bool ends_with(const fs::path& path, std::string_view suffix) {
  return path.filename().string().ends_with(suffix);
}

/// Whether `file` starts as a safetensors file does: a little-endian header
/// length within the format's bound, then the header's '{'. A zip (torch.save)
/// starts "PK\3\4" and a legacy pickle 0x80: both read as lengths far past it.
bool looks_like_safetensors(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::array<unsigned char, 9> head{};
  if (!in.read(reinterpret_cast<char*>(head.data()), head.size())) return false;
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | head[static_cast<std::size_t>(i)];
  return n >= 2 && n <= st::kMaxHeaderBytes && head[8] == '{';
}

/// What to open with st::Reader when `path` is a safetensors checkpoint: a
/// name ending in `.safetensors` or `.safetensors.index.json` (present or not:
/// Reader names what is missing), a file that starts like one, or a directory
/// holding `model.safetensors` / `model.safetensors.index.json` (Reader picks),
/// else its one index, else its one `.safetensors` file. A directory with
/// checkpoint_<rank>.pt files is ckpt's own and is not looked into.
std::optional<fs::path> safetensors_path(const fs::path& path) {
  if (ends_with(path, ".safetensors") || ends_with(path, ".safetensors.index.json")) return path;
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) return looks_like_safetensors(path) ? std::optional(path) : std::nullopt;
  if (!fs::is_directory(path, ec)) return std::nullopt;
  std::vector<fs::path> indexes, files;
  for (const auto& e : fs::directory_iterator(path)) {
    const auto name = e.path().filename().string();
    if (!e.is_regular_file()) continue;
    if (name.starts_with("checkpoint_") && name.ends_with(".pt")) return std::nullopt;
    if (name.ends_with(".safetensors.index.json")) indexes.push_back(e.path());
    if (name.ends_with(".safetensors")) files.push_back(e.path());
  }
  if (fs::exists(path / "model.safetensors", ec) || fs::exists(path / "model.safetensors.index.json", ec))
    return path;
  const auto& found = indexes.empty() ? files : indexes;
  if (found.size() == 1) return found.front();
  if (found.empty()) return std::nullopt;
  std::vector<std::string> names;
  for (const auto& f : found) names.push_back(f.filename().string());
  std::sort(names.begin(), names.end());
  throw ckpt::NotFound(fmt::format("{} holds several safetensors {} ({}) and no model.safetensors: name one",
                                   path.string(), indexes.empty() ? "files" : "indexes",
                                   fmt::join(names, ", ")));
}

/// `s` as it is, or JSON-quoted when it holds control characters (a tensor
/// name from a file off the internet must not drive the terminal).
std::string shown(const std::string& s) {
  for (const unsigned char c : s)
    if (c < 0x20 || c == 0x7f) return json::serialize(json::string(s));
  return s;
}

/// A metadata value, JSON-quoted, cut to a line's worth (at a UTF-8 boundary).
std::string shown_value(const std::string& v) {
  constexpr std::size_t kShown = 160;
  if (v.size() <= kShown) return json::serialize(json::string(v));
  std::size_t cut = kShown;
  while (cut > 0 && (static_cast<unsigned char>(v[cut]) & 0xc0) == 0x80) --cut;
  return fmt::format("{}... ({} bytes in all; --json shows it whole)",
                     json::serialize(json::string(v.substr(0, cut))), v.size());
}

/// Every tensor's header entry, in Reader::names() order (for an index this
/// reads each shard's header, never its data), and the files in first-use order.
struct SafetensorsListing {
  std::vector<const st::TensorEntry*> entries;
  std::vector<fs::path> files;
  std::uint64_t bytes = 0;
};

SafetensorsListing list_safetensors(st::Reader& reader) {
  SafetensorsListing l;
  for (const auto& name : reader.names()) {
    const st::TensorEntry& e = reader.entry(name);
    l.entries.push_back(&e);
    l.bytes += e.end - e.begin;
    if (std::find(l.files.begin(), l.files.end(), e.file) == l.files.end()) l.files.push_back(e.file);
  }
  return l;
}

/// Where a file lies, as the index names it (relative to the index's directory).
std::string file_text(const st::Reader& reader, const fs::path& file) {
  return file.lexically_relative(reader.path().parent_path()).string();
}

int inspect_safetensors(const fs::path& path, bool as_json) {
  st::Reader reader(path);
  const SafetensorsListing l = list_safetensors(reader);
  if (as_json) {
    json::object meta;
    for (const auto& [k, v] : reader.metadata()) meta[k] = v;
    json::array files, keys;
    for (const auto& f : l.files) files.push_back(json::string(f.string()));
    for (const auto* e : l.entries) {
      json::object o{{"key", e->name}, {"type", "tensor"}};
      if (e->scalar_type == c10::ScalarType::Undefined)
        o["dtype"] = nullptr;  // this libtorch has no type for it
      else
        o["dtype"] = c10::toString(e->scalar_type);
      o["safetensors_dtype"] = e->dtype;
      o["shape"] = ints(e->shape);
      o["bytes"] = e->end - e->begin;
      o["file"] = e->file.string();
      o["offset"] = e->file_offset;
      o["data_offsets"] = json::array{e->begin, e->end};
      keys.push_back(std::move(o));
    }
    std::cout << json::serialize(json::object{{"safetensors", reader.path().string()},
                                              {"sharded", reader.is_index()},
                                              {"files", std::move(files)},
                                              {"metadata", std::move(meta)},
                                              {"keys", std::move(keys)},
                                              {"tensors", l.entries.size()},
                                              {"bytes", l.bytes}})
              << "\n";
    return 0;
  }
  const std::size_t n = l.entries.size();
  fmt::print("{} (safetensors, {}, {} tensor{})\n", reader.path().string(),
             reader.is_index() ? fmt::format("{} shard{}", l.files.size(), l.files.size() == 1 ? "" : "s")
                               : std::string("1 file"),
             n, n == 1 ? "" : "s");
  const char* meta_name = reader.is_index() ? "metadata" : "__metadata__";
  for (const auto& [k, v] : reader.metadata())
    fmt::print("  {}[{}] = {}\n", meta_name, json::serialize(json::string(k)), shown_value(v));
  for (const auto* e : l.entries)
    fmt::print("  {:<40} {:<14} [{}] {} bytes  {}@ {}\n", shown(e->name), e->dtype, fmt::join(e->shape, ", "),
               e->end - e->begin, reader.is_index() ? file_text(reader, e->file) + " " : std::string(),
               e->file_offset);
  fmt::print("  total: {} tensor{}, {} bytes{}\n", n, n == 1 ? "" : "s", l.bytes,
             reader.is_index() ? fmt::format(" in {} shard{}", l.files.size(), l.files.size() == 1 ? "" : "s")
                               : std::string());
  return 0;
}

/// Reads the bytes of a tensor whose dtype this libtorch lacks (Reader::tensor
/// refuses those): the file is sound when they are all there.
void read_raw(const st::TensorEntry& e) {
  std::ifstream in(e.file, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(e.file_offset));
  std::vector<char> buf(std::min<std::uint64_t>(e.end - e.begin, std::uint64_t{16} << 20));
  for (std::uint64_t left = e.end - e.begin; left > 0;) {
    const auto chunk = static_cast<std::streamsize>(std::min<std::uint64_t>(left, buf.size()));
    if (!in.read(buf.data(), chunk))
      throw ckpt::IoError(fmt::format("{}: cannot read the {} bytes of '{}' at offset {}", e.file.string(),
                                      e.end - e.begin, e.name, e.file_offset));
    left -= static_cast<std::uint64_t>(chunk);
  }
}

int verify_safetensors(const fs::path& path) {
  std::optional<st::Reader> reader;
  try {
    reader.emplace(path);
  } catch (const ckpt::Error& e) {
    fmt::print("BAD {}\n", e.what());
    return 1;
  }
  // Every tensor read whole, one at a time. A fault of a whole shard (missing,
  // torn, a bad header) is met again by each of its tensors: said once.
  std::set<std::string> said;
  std::size_t bad = 0, unconverted = 0;
  struct FileTally {
    fs::path file;
    std::size_t tensors = 0;
    std::uint64_t bytes = 0;
  };
  std::vector<FileTally> files;
  std::uint64_t bytes = 0;
  for (const auto& name : reader->names()) {
    const st::TensorEntry* e = nullptr;
    try {
      e = &reader->entry(name);
    } catch (const ckpt::Error& err) {
      if (said.insert(err.what()).second) fmt::print("BAD {}\n", err.what());
      ++bad;
      continue;
    }
    try {
      if (e->scalar_type == c10::ScalarType::Undefined) {
        read_raw(*e);
        ++unconverted;
      } else {
        reader->tensor(name);
      }
    } catch (const ckpt::Error& err) {
      fmt::print("BAD {}: {}\n", shown(name), err.what());
      ++bad;
      continue;
    }
    auto it = std::find_if(files.begin(), files.end(), [&](const FileTally& f) { return f.file == e->file; });
    if (it == files.end()) it = files.insert(files.end(), FileTally{e->file});
    ++it->tensors;
    it->bytes += e->end - e->begin;
    bytes += e->end - e->begin;
  }
  if (bad > 0) return 1;
  const std::size_t n = reader->names().size();
  if (reader->is_index())
    for (const auto& f : files)
      fmt::print("ok  {} ({} tensor{}, {} bytes)\n", f.file.string(), f.tensors, f.tensors == 1 ? "" : "s",
                 f.bytes);
  fmt::print("ok  {} (safetensors, {}{} tensor{}, {} bytes of data read{})\n", reader->path().string(),
             reader->is_index() ? fmt::format("{} shard{}, ", files.size(), files.size() == 1 ? "" : "s")
                                : std::string(),
             n, n == 1 ? "" : "s", bytes,
             unconverted == 0
                 ? std::string()
                 : fmt::format("; {} of a dtype this libtorch lacks, read as bytes", unconverted));
  return 0;
}

// --- checkpoint files -----------------------------------------------------------

int inspect(const fs::path& path, bool as_json) {
  if (is_dcp(path)) return inspect_dcp(path, as_json);
  if (const auto st_path = safetensors_path(path)) return inspect_safetensors(*st_path, as_json);
  json::array files;
  for (const auto& file : files_of(path)) {
    ckpt::FileReader reader(file);
    std::vector<Entry> entries;
    walk(reader, reader.root(), "", entries);
    if (as_json) {
      json::object f;
      f["file"] = file.string();
      json::array keys;
      for (auto& e : entries) {
        e.info["key"] = e.key;
        keys.push_back(std::move(e.info));
      }
      f["keys"] = std::move(keys);
      json::array recs;
      for (const auto& r : reader.records())
        recs.push_back(json::object{{"name", r.name},
                                    {"offset", r.header_offset},
                                    {"bytes", r.size},
                                    {"crc32", fmt::format("{:08x}", r.crc32)}});
      f["records"] = std::move(recs);
      files.push_back(std::move(f));
      continue;
    }
    fmt::print("{} ({} records)\n", file.string(), reader.records().size());
    for (const auto& e : entries) {
      const auto& o = e.info;
      const std::string type = json::value_to<std::string>(o.at("type"));
      if (type == "tensor") {
        std::vector<std::int64_t> shape;
        for (const auto& s : o.at("shape").as_array()) shape.push_back(s.as_int64());
        fmt::print("  {:<40} {:<14} [{}] {} bytes  {} @ {}\n", e.key,
                   json::value_to<std::string>(o.at("dtype")), fmt::join(shape, ", "),
                   o.at("bytes").as_int64(), json::value_to<std::string>(o.at("record")),
                   o.contains("record_header_offset") ? o.at("record_header_offset").as_uint64() : 0);
      } else if (o.contains("value")) {
        fmt::print("  {:<40} {:<14} {}\n", e.key, type, json::serialize(o.at("value")));
      } else {
        fmt::print("  {:<40} {}\n", e.key, type);
      }
    }
  }
  if (as_json) std::cout << json::serialize(files) << "\n";
  return 0;
}

int verify(const fs::path& path, bool require_commit) {
  if (is_dcp(path)) return verify_dcp(path);  // committed once .metadata exists
  // Committed once its file (or its index, written after every shard) exists:
  // each is renamed into place whole, and a torn save is refused as damaged.
  if (const auto st_path = safetensors_path(path)) return verify_safetensors(*st_path);
  int bad = 0;
  for (const auto& file : files_of(path)) {
    try {
      ckpt::FileReader reader(file);
      reader.verify();
      fmt::print("ok  {} ({} records)\n", file.string(), reader.records().size());
    } catch (const ckpt::Error& e) {
      fmt::print("BAD {}\n", e.what());
      ++bad;
    }
  }
  if (!fs::is_directory(path)) return bad == 0 ? 0 : 1;
  bool committed = false;
  try {
    if (const auto marker = ckpt::read_commit_marker(path)) {
      ckpt::verify_commit(path, *marker);
      committed = true;
      fmt::print("committed: {} rank{}, marker written {}\n", marker->world_size,
                 marker->world_size == 1 ? "" : "s", marker->time);
    } else {
      fmt::print("uncommitted: no {} (a save that did not finish, or a directory written by PyTorch)\n",
                 ckpt::kCommitMarkerName);
    }
  } catch (const ckpt::Error& e) {
    fmt::print("BAD {}\n", e.what());
    ++bad;
  }
  if (bad > 0) return 1;
  return committed || !require_commit ? 0 : 3;
}

std::string gib(std::uint64_t bytes) {
  return fmt::format("{:.2f} GiB", static_cast<double>(bytes) / (1ull << 30));
}

/// This process's peak resident memory in MiB (VmHWM: counted from its exec,
/// unlike getrusage, which carries over the peak of the process that forked it).
long peak_resident_mib() {
  std::ifstream status("/proc/self/status");
  std::string key;
  long kib = -1;
  while (status >> key) {
    if (key == "VmHWM:") {
      status >> kib;
      break;
    }
    status.ignore(4096, '\n');
  }
  return kib < 0 ? -1 : kib / 1024;
}

int convert(const std::vector<std::string>& args) {
  // Tensor buffers of 1 MiB and more are mapped and unmapped whole. glibc's
  // default raises its mapping threshold as buffers are freed (up to 32 MiB)
  // and then keeps buffers below it in the heap, where freed ones may stay
  // resident: converting 48 tensors of 16 MiB then peaked at 750 MiB instead
  // of 190 MiB. A fixed threshold keeps the peak at one tensor.
  ::mallopt(M_MMAP_THRESHOLD, 1 << 20);
  using ckpt::dcp::CheckpointFormat;
  std::vector<std::string> paths;
  ckpt::dcp::ConvertOptions options;
  const auto number = [](const std::string& flag, const std::string& text) {
    std::size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(text, &used);
    } catch (const std::exception&) {
    }
    if (used != text.size() || v < 0)
      throw ckpt::Error(fmt::format("{} takes a number, not '{}'", flag, text));
    return v;
  };
  bool dialect_given = false;
  for (std::size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    const bool has_value = i + 1 < args.size();
    if (a == "--to" && has_value) {
      const std::string& v = args[++i];
      if (v == "torch")
        options.to = CheckpointFormat::torch;
      else if (v == "dcp")
        options.to = CheckpointFormat::dcp;
      else if (v == "safetensors")
        options.to = CheckpointFormat::safetensors;
      else
        throw ckpt::Error(fmt::format("--to takes torch, dcp or safetensors, not '{}'", v));
    } else if (a == "--dialect" && has_value) {
      const std::string& v = args[++i];
      dialect_given = true;
      if (v == "2.4")
        options.dialect = ckpt::dcp::MetadataDialect::torch_2_4;
      else if (v == "2.0")
        options.dialect = ckpt::dcp::MetadataDialect::torch_2_0;
      else if (v == "1.13")
        options.dialect = ckpt::dcp::MetadataDialect::torch_1_13;
      else
        throw ckpt::Error(
            fmt::format("--dialect takes 2.4, 2.0 or 1.13 (the torch versions whose readers "
                        "take the .metadata), not '{}'",
                        v));
    } else if (a == "--rank" && has_value) {
      options.rank = number(a, args[++i]);
    } else if (a == "--max-shard-bytes" && has_value) {
      options.max_shard_bytes = static_cast<std::uint64_t>(number(a, args[++i]));
    } else if (a == "--values-as-metadata") {
      options.values_as_metadata = true;
    } else if (a == "--skip-values") {
      options.skip_values = true;
    } else if (a == "--no-fsync") {
      options.sync_files = false;
    } else if (a.starts_with("--")) {
      return usage();
    } else {
      paths.push_back(a);
    }
  }
  if (paths.size() != 2) return usage();
  const fs::path src = paths[0], dst = paths[1];
  const CheckpointFormat to = options.to ? *options.to : ckpt::dcp::format_for_destination(dst);
  if (dialect_given && to != CheckpointFormat::dcp) throw ckpt::Error("--dialect is for a DCP destination");

  // The progress line: on a terminal, once the conversion has run a second.
  const auto start = std::chrono::steady_clock::now();
  auto last = start;
  bool shown = false;
  if (::isatty(STDERR_FILENO))
    options.progress = [&](const ckpt::dcp::ConvertProgress& p) {
      const auto now = std::chrono::steady_clock::now();
      if (now - start < std::chrono::seconds(1) ||
          (now - last < std::chrono::milliseconds(200) && p.tensors_done < p.tensors))
        return;
      last = now;
      shown = true;
      const double s = std::chrono::duration<double>(now - start).count();
      fmt::print(stderr, "\r  {}/{} tensors, {} of {} ({:.0f} MB/s)\x1b[K", p.tensors_done, p.tensors,
                 gib(p.bytes_done), gib(p.bytes), static_cast<double>(p.bytes_done) / 1e6 / s);
      std::fflush(stderr);
    };
  ckpt::dcp::ConvertResult r;
  try {
    r = ckpt::dcp::convert(src, dst, options);
  } catch (...) {
    if (shown) fmt::print(stderr, "\n");
    throw;
  }
  if (shown) fmt::print(stderr, "\n");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("{} ({}) -> {} ({}): {} tensor{} ({}), {} value{}{} in {:.1f} s, peak resident memory {} MiB\n",
             src.string(), ckpt::dcp::format_name(r.from), dst.string(), ckpt::dcp::format_name(r.to),
             r.tensors, r.tensors == 1 ? "" : "s", gib(r.tensor_bytes), r.values, r.values == 1 ? "" : "s",
             r.skipped ? fmt::format(" ({} left out)", r.skipped) : std::string(), s, peak_resident_mib());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() < 2) return usage();
  try {
    if (args[0] == "inspect") {
      bool as_json = args.size() == 3 && args[2] == "--json";
      if (args.size() > 3 || (args.size() == 3 && !as_json)) return usage();
      return inspect(args[1], as_json);
    }
    if (args[0] == "convert") return convert(args);
    if (args[0] == "verify" && args.size() == 2) return verify(args[1], false);
    if (args[0] == "verify" && args.size() == 3 && args[2] == "--require-commit")
      return verify(args[1], true);
    return usage();
  } catch (const std::exception& e) {
    fmt::print(stderr, "ckpt: {}\n", e.what());
    return 1;
  }
}
