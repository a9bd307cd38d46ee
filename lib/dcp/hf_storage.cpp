// HuggingFaceStorageWriter and HuggingFaceStorageReader: DCP over directories
// of safetensors files, with upstream's file names and DCP_SHARDING_INFO.
#include <ckpt/dcp/hf_storage.hpp>

#include <ckpt/error.hpp>
#include <ckpt/format.hpp>
#include <ckpt/safetensors.hpp>

#include "core/io.hpp"
#include "dcp/serialize.hpp"
#include "dcp/volume.hpp"
#include "format/file_writer.hpp"
#include "format/safetensors_writer.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <boost/json/parse.hpp>
#include <boost/json/value.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <random>
#include <set>
#include <sstream>
#include <string_view>

#include <fcntl.h>
#include <unistd.h>

namespace ckpt::dcp {

namespace fs = std::filesystem;

namespace {

using detail::volume;

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kShardedDir = "sharded";
constexpr const char* kShardingInfoKey = "DCP_SHARDING_INFO";
constexpr const char* kSaveIdKey = "ckpt_save_id";
constexpr const char* kFilesKey = "ckpt_files";

/// Upstream's _gen_file_name.
std::string file_name(int index, int highest, std::optional<int> shard) {
  if (shard) return fmt::format("shard-{:05}-model-{:05}-of-{:05}.safetensors", *shard, index, highest);
  return fmt::format("model-{:05}-of-{:05}.safetensors", index, highest);
}

/// Whether `name` is one of upstream's HF file names (written by a save).
bool is_hf_file_name(const std::string& name) {
  const auto digits = [&](std::size_t at) {
    if (name.size() < at + 5) return false;
    return std::all_of(name.begin() + static_cast<std::ptrdiff_t>(at),
                       name.begin() + static_cast<std::ptrdiff_t>(at + 5),
                       [](char c) { return c >= '0' && c <= '9'; });
  };
  std::size_t at = 0;
  if (name.rfind("shard-", 0) == 0) {
    if (!digits(6) || name.compare(11, 1, "-") != 0) return false;
    at = 12;
  }
  return name.compare(at, 6, "model-") == 0 && digits(at + 6) && name.compare(at + 11, 4, "-of-") == 0 &&
         digits(at + 15) && name.size() == at + 20 + 12 && name.ends_with(".safetensors");
}

std::string fresh_id() {
  std::random_device rd;
  std::string id;
  for (int i = 0; i < 4; ++i) id += fmt::format("{:08x}", static_cast<std::uint32_t>(rd()));
  return id;
}

/// What the coordinator tells each rank (SavePlan::storage_data): the save's
/// id, how many files it has, the highest file index, this rank's shard index
/// (0: none), and the file of each of its items.
struct RankStorage {
  std::string save_id;
  int files = 0;
  int highest = 1;
  int shard = 0;
  std::map<std::string, int> file_of;  // fqn → file index
};

std::string encode(const RankStorage& s) {
  std::string out =
      fmt::format("hf1 {} {} {} {} {}\n", s.save_id, s.files, s.highest, s.shard, s.file_of.size());
  for (const auto& [fqn, k] : s.file_of) out += fmt::format("{} {} {}\n", k, fqn.size(), fqn);
  return out;
}

RankStorage decode(const std::string& text) {
  const auto bad = [] { return Error("the save plan's storage data is not a HuggingFaceStorageWriter's"); };
  std::istringstream in(text);
  std::string magic;
  RankStorage s;
  std::size_t n = 0;
  if (!(in >> magic >> s.save_id >> s.files >> s.highest >> s.shard >> n) || magic != "hf1") throw bad();
  for (std::size_t i = 0; i < n; ++i) {
    int k = 0;
    std::size_t len = 0;
    if (!(in >> k >> len) || in.get() != ' ') throw bad();
    std::string fqn(len, '\0');
    if (!in.read(fqn.data(), static_cast<std::streamsize>(len))) throw bad();
    s.file_of[fqn] = k;
  }
  return s;
}

bool whole(const WriteItem& item) {
  const auto& t = *item.tensor_data;
  return t.chunk.sizes == t.size &&
         std::all_of(t.chunk.offsets.begin(), t.chunk.offsets.end(), [](std::int64_t o) { return o == 0; });
}

/// Writes `text` to `file` durably.
void write_text(const fs::path& file, const std::string& text, bool sync) {
  ckpt::detail::write_durably(file, WriteOptions{.direct_io = false, .fsync = sync},
                              [&](int fd, bool, const fs::path& temp) {
                                ckpt::detail::pwrite_full(fd, text.data(), text.size(), 0, temp);
                                return static_cast<std::uint64_t>(text.size());
                              });
}

/// Removes upstream-named files in `dir` that `keep` does not name (an
/// earlier save's); never throws (the new checkpoint is already committed).
void remove_stale(const fs::path& dir, const std::set<std::string>& keep) {
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::error_code rm;
    if (is_hf_file_name(name) && !keep.count(name)) fs::remove(it->path(), rm);
  }
}

ckpt::detail::Fd open_for_read(const fs::path& file) {
  ckpt::detail::Fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) {
    if (errno == ENOENT) throw CorruptCheckpoint(fmt::format("{} is missing", file.string()));
    ckpt::detail::throw_errno("open", file, errno);
  }
  return fd;
}

}  // namespace

// --- HuggingFaceStorageWriter --------------------------------------------------------

HuggingFaceStorageWriter::HuggingFaceStorageWriter(fs::path path, HuggingFaceStorageWriterOptions options)
    : path_(std::move(path)), options_(std::move(options)) {
  for (const auto& [fqn, k] : options_.fqn_to_index_mapping)
    if (k < 1 || k > 99999)
      throw Error(
          fmt::format("HuggingFaceStorageWriter: fqn_to_index_mapping puts '{}' into file {}; "
                      "files are numbered 1 to N (at most 99999)",
                      fqn, k));
  if (options_.enable_consolidation && !options_.save_distributed)
    throw Error(
        "HuggingFaceStorageWriter: enable_consolidation merges the shards of save_distributed; "
        "without it every file already holds whole tensors");
}

void HuggingFaceStorageWriter::reset(const std::optional<fs::path>& checkpoint_id) {
  if (checkpoint_id) path_ = *checkpoint_id;
}

void HuggingFaceStorageWriter::set_up_storage_writer(bool is_coordinator) {
  const fs::path data_dir = options_.enable_consolidation ? path_ / kShardedDir : path_;
  std::error_code ec;
  fs::create_directories(data_dir, ec);
  if (ec)
    throw IoError(fmt::format("cannot create checkpoint directory {}: {}", data_dir.string(), ec.message()));
  // Temporaries of killed saves: the coordinator sweeps its host's, the first
  // local rank of each other host that host's (as FileSystemWriter does).
  const char* local_rank = std::getenv("LOCAL_RANK");
  if (is_coordinator || (local_rank && std::string_view(local_rank) == "0")) {
    ckpt::detail::remove_stale_temporaries(data_dir);
    if (data_dir != path_) ckpt::detail::remove_stale_temporaries(path_);
  }
}

SavePlan HuggingFaceStorageWriter::prepare_local_plan(SavePlan plan) {
  return plan;
}

std::vector<SavePlan> HuggingFaceStorageWriter::prepare_global_plan(std::vector<SavePlan> plans) {
  const auto& mapping = options_.fqn_to_index_mapping;
  int highest = 1;
  for (const auto& [fqn, k] : mapping) highest = std::max(highest, k);
  std::vector<RankStorage> storage(plans.size());
  std::map<int, std::size_t> writer_of_file;  // whole tensors: file → the rank writing it
  int files = 0;
  for (std::size_t r = 0; r < plans.size(); ++r) {
    std::set<int> own;
    for (const auto& item : plans[r].items) {
      const std::string& fqn = item.index.fqn;
      if (item.type == WriteItemType::bytes || !item.tensor_data)
        throw Unsupported(
            fmt::format("HuggingFaceStorageWriter: '{}' is not a tensor; safetensors files "
                        "hold only tensors (save other values with another storage)",
                        fqn));
      int k = 1;
      if (!mapping.empty()) {
        const auto it = mapping.find(fqn);
        if (it == mapping.end())
          throw Error(
              fmt::format("HuggingFaceStorageWriter: fqn_to_index_mapping names no file for '{}'", fqn));
        k = it->second;
      }
      if (!options_.save_distributed) {
        if (!whole(item))
          throw Error(
              fmt::format("HuggingFaceStorageWriter: '{}' is sharded (rank {} holds a chunk at [{}]); "
                          "save it with save_distributed (and enable_consolidation for whole "
                          "tensors on disk)",
                          fqn, r, fmt::join(item.tensor_data->chunk.offsets, ", ")));
        const auto [at, fresh] = writer_of_file.emplace(k, r);
        if (!fresh && at->second != r)
          throw Error(
              fmt::format("HuggingFaceStorageWriter: {} would be written by ranks {} and {}; give a "
                          "fqn_to_index_mapping that keeps each rank's tensors in files of their "
                          "own, or save with save_distributed and enable_consolidation",
                          file_name(k, highest, std::nullopt), at->second, r));
      }
      if (!storage[r].file_of.emplace(fqn, k).second)
        throw Error(
            fmt::format("HuggingFaceStorageWriter: rank {} holds two chunks of '{}'; a safetensors "
                        "file names each tensor once",
                        r, fqn));
      own.insert(k);
    }
    files += static_cast<int>(own.size());
  }
  if (!options_.save_distributed) files = static_cast<int>(writer_of_file.size());
  save_id_ = fresh_id();
  for (std::size_t r = 0; r < plans.size(); ++r) {
    storage[r].save_id = save_id_;
    storage[r].files = files;
    storage[r].highest = highest;
    storage[r].shard = options_.save_distributed ? static_cast<int>(r) + 1 : 0;
    plans[r].storage_data = encode(storage[r]);
  }
  return plans;
}

std::future<std::vector<WriteResult>> HuggingFaceStorageWriter::write_data(const SavePlan& plan,
                                                                           SavePlanner& planner) {
  std::promise<std::vector<WriteResult>> done;
  try {
    std::vector<WriteResult> results(plan.items.size());
    if (!plan.items.empty()) {
      const RankStorage storage = decode(plan.storage_data);
      std::map<int, std::vector<std::size_t>> by_file;  // file index → items
      for (std::size_t i = 0; i < plan.items.size(); ++i) {
        const auto it = storage.file_of.find(plan.items[i].index.fqn);
        if (it == storage.file_of.end() || !plan.items[i].tensor_data)
          throw Error(fmt::format("the save plan names no file for '{}'", plan.items[i].index.fqn));
        by_file[it->second].push_back(i);
      }
      const bool sharded = storage.shard > 0;
      const std::string prefix = options_.enable_consolidation ? std::string(kShardedDir) + "/" : "";
      for (const auto& [k, items] : by_file) {
        const std::string name =
            file_name(k, storage.highest, sharded ? std::optional<int>(storage.shard) : std::nullopt);
        std::vector<ckpt::detail::SafetensorsEntry> entries;
        std::string info = "{";
        for (const std::size_t i : items) {
          const auto& item = plan.items[i];
          entries.push_back(
              {item.index.fqn, item.tensor_data->properties.dtype, item.tensor_data->chunk.sizes});
          if (info.size() > 1) info += ',';
          info += fmt::format(R"({}:{{"saved_offsets":[{}]}})", ckpt::detail::json_string(item.index.fqn),
                              fmt::join(item.tensor_data->chunk.offsets, ","));
        }
        std::map<std::string, std::string> metadata{
            {"format", "pt"}, {kSaveIdKey, storage.save_id}, {kFilesKey, std::to_string(storage.files)}};
        if (sharded) {
          metadata.emplace(kShardingInfoKey, info + "}");
          metadata.emplace("DCP_VERSION", "1.0");
        }
        const auto offsets = ckpt::detail::write_safetensors(
            path_ / (prefix + name), entries, metadata,
            [&](std::size_t e) {
              const auto& item = plan.items[items[e]];
              const c10::IValue data = planner.resolve_data(item);
              if (!data.isTensor())
                throw Error(fmt::format("resolve_data gave no tensor for '{}'", item.index.fqn));
              return data.toTensor();
            },
            options_.sync_files);
        for (std::size_t e = 0; e < items.size(); ++e) {
          const auto& item = plan.items[items[e]];
          const std::uint64_t nbytes = item.tensor_storage_size();
          results[items[e]] =
              WriteResult{item.index, nbytes, StorageInfo{prefix + name, offsets[e], nbytes, 0, false, {}}};
        }
      }
    }
    done.set_value(std::move(results));
  } catch (...) {
    done.set_exception(std::current_exception());
  }
  return done.get_future();
}

void HuggingFaceStorageWriter::finish(const Metadata& metadata,
                                      const std::vector<std::vector<WriteResult>>& results) {
  std::map<MetadataIndex, StorageInfo> where;
  std::set<std::string> written;
  for (const auto& rank_results : results)
    for (const auto& r : rank_results) {
      where[r.index] = r.storage_data;
      written.insert(r.storage_data.relative_path);
    }
  for (const auto& [fqn, sm] : metadata.state_dict_metadata)
    if (const auto* t = std::get_if<TensorStorageMetadata>(&sm))
      for (const auto& c : t->chunks)
        if (!where.count(MetadataIndex{fqn, c.offsets, std::nullopt}))
          throw Error(
              fmt::format("no rank wrote the chunk of '{}' at [{}]", fqn, fmt::join(c.offsets, ", ")));

  if (options_.save_distributed && !options_.enable_consolidation) {
    // The shard files are the checkpoint: an earlier save's others go.
    std::set<std::string> keep;
    for (const auto& f : written) keep.insert(fs::path(f).filename().string());
    remove_stale(path_, keep);
    if (options_.sync_files) ckpt::detail::fsync_dir(path_);
    return;
  }

  std::map<std::string, std::string> weight_map;  // fqn → file
  std::uint64_t total = 0;
  if (!options_.save_distributed) {
    for (const auto& [index, info] : where) {
      weight_map[index.fqn] = info.relative_path;
      total += info.length;
    }
  } else {
    // Consolidation: each output file's tensors whole, assembled one at a
    // time from the chunks the ranks wrote.
    int highest = 1;
    for (const auto& [fqn, k] : options_.fqn_to_index_mapping) highest = std::max(highest, k);
    std::map<int, std::vector<std::string>> keys_of_file;
    for (const auto& [fqn, sm] : metadata.state_dict_metadata) {
      if (!std::holds_alternative<TensorStorageMetadata>(sm)) continue;
      const auto it = options_.fqn_to_index_mapping.find(fqn);
      keys_of_file[it == options_.fqn_to_index_mapping.end() ? 1 : it->second].push_back(fqn);
    }
    std::map<std::string, ckpt::detail::Fd> open;
    const auto fd_of = [&](const std::string& rel) {
      auto it = open.find(rel);
      if (it == open.end()) it = open.emplace(rel, open_for_read(path_ / rel)).first;
      return it->second.get();
    };
    const std::string files = std::to_string(keys_of_file.size());
    for (const auto& [k, keys] : keys_of_file) {
      const std::string name = file_name(k, highest, std::nullopt);
      std::vector<ckpt::detail::SafetensorsEntry> entries;
      for (const auto& fqn : keys) {
        const auto& t = std::get<TensorStorageMetadata>(metadata.state_dict_metadata.at(fqn));
        entries.push_back({fqn, t.properties.dtype, t.size});
        total += static_cast<std::uint64_t>(volume(t.size)) * c10::elementSize(t.properties.dtype);
        weight_map[fqn] = name;
      }
      ckpt::detail::write_safetensors(
          path_ / name, entries, {{"format", "pt"}, {kSaveIdKey, save_id_}, {kFilesKey, files}},
          [&](std::size_t e) {
            const auto& t = std::get<TensorStorageMetadata>(metadata.state_dict_metadata.at(keys[e]));
            const auto options = at::TensorOptions().dtype(t.properties.dtype);
            at::Tensor out = at::empty(t.size, options);
            for (const auto& c : t.chunks) {
              const StorageInfo& info = where.at(MetadataIndex{keys[e], c.offsets, std::nullopt});
              at::Tensor chunk = at::empty(c.sizes, options);
              if (info.length != static_cast<std::uint64_t>(chunk.nbytes()))
                throw Error(fmt::format("the chunk of '{}' at [{}] was written as {} bytes, not {}", keys[e],
                                        fmt::join(c.offsets, ", "), info.length, chunk.nbytes()));
              ckpt::detail::pread_full(fd_of(info.relative_path), chunk.data_ptr(), chunk.nbytes(),
                                       info.offset, path_ / info.relative_path);
              at::Tensor region = out;
              for (std::size_t d = 0; d < c.offsets.size(); ++d)
                region = region.narrow(static_cast<std::int64_t>(d), c.offsets[d], c.sizes[d]);
              region.copy_(chunk);
            }
            return out;
          },
          options_.sync_files);
    }
  }

  std::string text =
      fmt::format("{{\n  \"metadata\": {{\n    \"total_size\": {},\n    \"{}\": \"{}\"\n  }},\n", total,
                  kSaveIdKey, save_id_);
  text += "  \"weight_map\": {";
  bool first = true;
  std::set<std::string> keep;
  for (const auto& [fqn, file] : weight_map) {
    text += fmt::format("{}\n    {}: {}", first ? "" : ",", ckpt::detail::json_string(fqn),
                        ckpt::detail::json_string(file));
    keep.insert(file);
    first = false;
  }
  text += first ? "}\n}\n" : "\n  }\n}\n";
  write_text(path_ / kIndexName, text, options_.sync_files);  // the commit point
  remove_stale(path_, keep);
  if (options_.sync_files) ckpt::detail::fsync_dir(path_);
}

bool HuggingFaceStorageWriter::validate_checkpoint_id(const fs::path& checkpoint_id) const {
  std::error_code ec;
  return !checkpoint_id.empty() && (!fs::exists(checkpoint_id, ec) || fs::is_directory(checkpoint_id, ec));
}

// --- HuggingFaceStorageReader --------------------------------------------------------

HuggingFaceStorageReader::HuggingFaceStorageReader(fs::path path) : path_(std::move(path)) {}

void HuggingFaceStorageReader::reset(const std::optional<fs::path>& checkpoint_id) {
  if (checkpoint_id) path_ = *checkpoint_id;
}

namespace {

/// The saved_offsets of every tensor of `file` from its DCP_SHARDING_INFO.
std::map<std::string, std::vector<std::int64_t>> sharding_info(const std::string& text, const fs::path& file,
                                                               const safetensors::Reader& reader) {
  const auto bad = [&](const std::string& why) {
    return CorruptCheckpoint(fmt::format("{}: {} in __metadata__ {}", file.string(), kShardingInfoKey, why));
  };
  boost::system::error_code ec;
  const boost::json::value v = boost::json::parse(text, ec);
  if (ec || !v.is_object()) throw bad("is not a JSON object");
  std::map<std::string, std::vector<std::int64_t>> out;
  for (const auto& name : reader.names()) {
    const auto* entry = v.as_object().if_contains(name);
    const auto* offsets =
        entry && entry->is_object() ? entry->as_object().if_contains("saved_offsets") : nullptr;
    if (!offsets || !offsets->is_array()) throw bad(fmt::format("gives no saved_offsets for '{}'", name));
    std::vector<std::int64_t> o;
    for (const auto& x : offsets->as_array()) {
      if (!x.is_int64() && !x.is_uint64())
        throw bad(fmt::format("has an offset of '{}' that is not an integer", name));
      if ((x.is_int64() && x.as_int64() < 0) || (x.is_uint64() && x.as_uint64() > (std::uint64_t{1} << 62)))
        throw bad(fmt::format("has an offset of '{}' out of range", name));
      o.push_back(x.is_int64() ? x.as_int64() : static_cast<std::int64_t>(x.as_uint64()));
    }
    out.emplace(name, std::move(o));
  }
  return out;
}

}  // namespace

CheckpointMetadata HuggingFaceStorageReader::read_metadata() {
  const fs::path dir = path_;
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw NotFound(fmt::format("{} is not a directory of safetensors files", dir.string()));

  // The files: the index's, else every *.safetensors here.
  std::vector<fs::path> files;
  std::optional<std::string> index_id;
  const fs::path index = dir / kIndexName;
  if (fs::is_regular_file(index, ec)) {
    safetensors::Reader reader(index);
    std::set<fs::path> seen;
    for (const auto& name : reader.names()) {
      const fs::path f = reader.entry(name).file;
      if (seen.insert(f).second) files.push_back(f);
    }
    index_id = reader.save_id();
    bytes_read_ += reader.bytes_read();
  } else {
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
      if (it->path().extension() == ".safetensors" && it->is_regular_file()) files.push_back(it->path());
    if (ec) ckpt::detail::throw_errno("list", dir, ec.value());
    std::sort(files.begin(), files.end());
  }
  if (files.empty()) throw NotFound(fmt::format("{} holds no .safetensors files", dir.string()));

  CheckpointMetadata out;
  std::set<std::string> save_ids;
  std::size_t with_id = 0;
  std::optional<std::string> files_said;
  for (const auto& file : files) {
    safetensors::Reader reader(file);
    bytes_read_ += reader.bytes_read();
    const auto& md = reader.metadata();
    if (reader.save_id()) {
      save_ids.insert(*reader.save_id());
      ++with_id;
    }
    if (const auto it = md.find(kFilesKey); it != md.end()) files_said = it->second;
    std::map<std::string, std::vector<std::int64_t>> offsets;
    if (const auto it = md.find(kShardingInfoKey); it != md.end())
      offsets = sharding_info(it->second, file, reader);
    const std::string rel = file.lexically_relative(dir).string();
    for (const auto& name : reader.names()) {
      const auto& e = reader.entry(name);
      if (e.scalar_type == c10::ScalarType::Undefined)
        throw Unsupported(
            fmt::format("{}: '{}' is {}, a dtype this libtorch does not have", file.string(), name, e.dtype));
      std::vector<std::int64_t> at(e.shape.size(), 0);
      if (const auto it = offsets.find(name); it != offsets.end()) at = it->second;
      if (at.size() != e.shape.size())
        throw CorruptCheckpoint(fmt::format("{}: {} places '{}' ({} dims) at [{}]", file.string(),
                                            kShardingInfoKey, name, e.shape.size(), fmt::join(at, ", ")));
      auto [slot, fresh] = out.metadata.state_dict_metadata.try_emplace(name, TensorStorageMetadata{});
      auto& t = std::get<TensorStorageMetadata>(slot->second);
      if (fresh) {
        t.properties.dtype = e.scalar_type;
        t.size.assign(e.shape.size(), 0);
      } else if (t.properties.dtype != e.scalar_type || t.size.size() != e.shape.size()) {
        throw CorruptCheckpoint(fmt::format("{}: the chunks of '{}' disagree on its dtype or rank ({} here)",
                                            dir.string(), name, e.dtype));
      }
      for (std::size_t d = 0; d < at.size(); ++d) t.size[d] = std::max(t.size[d], at[d] + e.shape[d]);
      t.chunks.push_back(ChunkStorageMetadata{at, e.shape});
      const MetadataIndex index{name, at, std::nullopt};
      if (!out.storage_data.emplace(index, StorageInfo{rel, e.file_offset, e.end - e.begin, 0, false, {}})
               .second)
        throw CorruptCheckpoint(fmt::format("{}: two files hold the chunk of '{}' at [{}]", dir.string(),
                                            name, fmt::join(at, ", ")));
    }
  }
  // One save, whole: the same id everywhere (and in the index), every file of it here.
  if (index_id) save_ids.insert(*index_id);
  if (save_ids.size() > 1 || (with_id > 0 && with_id != files.size()))
    throw CorruptCheckpoint(
        fmt::format("{} holds files of more than one save: the checkpoint is torn (a save "
                    "over it was interrupted, or files of another were copied in)",
                    dir.string()));
  if (files_said && *files_said != std::to_string(files.size()))
    throw CorruptCheckpoint(
        fmt::format("{}: the save wrote {} files and {} are here: the checkpoint is "
                    "incomplete",
                    dir.string(), *files_said, files.size()));
  for (const auto& [fqn, sm] : out.metadata.state_dict_metadata) {
    try {
      validate_chunks(fqn, std::get<TensorStorageMetadata>(sm));
    } catch (const Error& e) {
      throw CorruptCheckpoint(fmt::format("{}: {}", dir.string(), e.what()));
    }
  }
  out.metadata.storage_meta = StorageMeta{fs::absolute(dir).lexically_normal().string(), "", ""};
  return out;
}

void HuggingFaceStorageReader::set_up_storage_reader(const CheckpointMetadata& metadata, bool) {
  metadata_ = metadata;
}

LoadPlan HuggingFaceStorageReader::prepare_local_plan(LoadPlan plan) {
  return plan;
}

std::vector<LoadPlan> HuggingFaceStorageReader::prepare_global_plan(std::vector<LoadPlan> plans) {
  return plans;
}

std::future<void> HuggingFaceStorageReader::read_data(const LoadPlan& plan, LoadPlanner& planner) {
  std::promise<void> done;
  try {
    std::map<std::string, ckpt::detail::Fd> open;
    for (const auto& item : plan.items) {
      if (item.type != LoadItemType::tensor)
        throw Error(fmt::format("'{}' is not a tensor; a safetensors checkpoint holds only tensors",
                                item.storage_index.fqn));
      const auto info_it = metadata_.storage_data.find(item.storage_index);
      const auto md_it = metadata_.metadata.state_dict_metadata.find(item.storage_index.fqn);
      if (info_it == metadata_.storage_data.end() || md_it == metadata_.metadata.state_dict_metadata.end())
        throw CorruptCheckpoint(
            fmt::format("{}: no file holds '{}'", path_.string(), detail::item_name(item.storage_index)));
      const StorageInfo& info = info_it->second;
      const auto& tmd = std::get<TensorStorageMetadata>(md_it->second);
      const ChunkStorageMetadata* chunk = nullptr;
      for (const auto& c : tmd.chunks)
        if (c.offsets == *item.storage_index.offset) chunk = &c;
      if (!chunk)
        throw CorruptCheckpoint(
            fmt::format("{}: no chunk '{}'", path_.string(), detail::item_name(item.storage_index)));
      const fs::path file = path_ / info.relative_path;
      auto fd_it = open.find(info.relative_path);
      if (fd_it == open.end()) fd_it = open.emplace(info.relative_path, open_for_read(file)).first;

      // The rows of the chunk (dim 0) the item needs are one run of bytes.
      const auto& sizes = chunk->sizes;
      const std::size_t elem = c10::elementSize(tmd.properties.dtype);
      std::vector<std::int64_t> slab_sizes = sizes;
      std::uint64_t row_bytes = elem, first_row = 0;
      if (!sizes.empty()) {
        row_bytes = static_cast<std::uint64_t>(volume(sizes)) * elem /
                    static_cast<std::uint64_t>(std::max<std::int64_t>(sizes[0], 1));
        first_row = static_cast<std::uint64_t>(item.storage_offsets.at(0));
        slab_sizes[0] = item.lengths.at(0);
      }
      const std::uint64_t rows = sizes.empty() ? 1 : static_cast<std::uint64_t>(slab_sizes[0]);
      const std::uint64_t n = rows * row_bytes;
      if (first_row * row_bytes + n > info.length)
        throw CorruptCheckpoint(fmt::format("{}: '{}' asks for bytes past its chunk", file.string(),
                                            detail::item_name(item.storage_index)));
      at::Tensor target = planner.resolve_tensor(item).detach();
      bool rest_whole = true;
      for (std::size_t d = 1; d < sizes.size(); ++d)
        rest_whole = rest_whole && item.storage_offsets[d] == 0 && item.lengths[d] == sizes[d];
      if (rest_whole && target.device().is_cpu() && target.is_contiguous() &&
          target.scalar_type() == tmd.properties.dtype && target.sizes().vec() == slab_sizes) {
        if (n > 0)
          ckpt::detail::pread_full(fd_it->second.get(), target.data_ptr(), n,
                                   info.offset + first_row * row_bytes, file);
      } else {
        at::Tensor slab = at::empty(slab_sizes, at::TensorOptions().dtype(tmd.properties.dtype));
        if (n > 0)
          ckpt::detail::pread_full(fd_it->second.get(), slab.data_ptr(), n,
                                   info.offset + first_row * row_bytes, file);
        for (std::size_t d = 1; d < sizes.size(); ++d)
          slab = slab.narrow(static_cast<std::int64_t>(d), item.storage_offsets[d], item.lengths[d]);
        if (target.sizes() != slab.sizes())
          throw Mismatch(fmt::format("'{}': the destination is [{}] and the saved region [{}]",
                                     detail::item_name(item.dest_index), fmt::join(target.sizes(), ", "),
                                     fmt::join(slab.sizes(), ", ")));
        target.copy_(slab);
      }
      bytes_read_ += n;
      planner.commit_tensor(item, target);
    }
    done.set_value();
  } catch (...) {
    done.set_exception(std::current_exception());
  }
  return done.get_future();
}

bool HuggingFaceStorageReader::validate_checkpoint_id(const fs::path& checkpoint_id) const {
  return is_hugging_face_checkpoint(checkpoint_id);
}

bool is_hugging_face_checkpoint(const fs::path& directory) {
  std::error_code ec;
  if (!fs::is_directory(directory, ec) || fs::exists(directory / kMetadataFileName, ec)) return false;
  if (fs::is_regular_file(directory / kIndexName, ec)) return true;
  for (fs::directory_iterator it(directory, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().extension() == ".safetensors") return true;
  return false;
}

}  // namespace ckpt::dcp
