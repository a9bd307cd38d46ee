// ckpt::dcp::convert: a source opened for its structure, its tensors as
// placeholders (storages of the right size with no memory behind them), the
// destination laid out over those, and each placeholder's bytes fetched from
// the source when the destination writes it.
#include <ckpt/dcp/convert.hpp>

#include <ckpt/dcp/hf_storage.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/format.hpp>
#include <ckpt/safetensors.hpp>

#include "format/file_writer.hpp"
#include "format/plan_layout.hpp"
#include "format/safetensors_writer.hpp"

#include <c10/core/CPUAllocator.h>
#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace ckpt::dcp {

namespace fs = std::filesystem;

namespace {

using Impl = const c10::StorageImpl*;

std::int64_t numel_of(c10::IntArrayRef sizes) {
  std::int64_t n = 1;
  for (auto s : sizes) n *= s;
  return n;
}

/// A storage of `nbytes` with no memory behind it: a tensor laid out over it
/// has its shape and dtype, and its bytes come from the source later.
at::Storage empty_storage(std::uint64_t nbytes) {
  return at::Storage(at::Storage::use_byte_size_t(), static_cast<std::size_t>(nbytes),
                     c10::DataPtr(nullptr, c10::Device(c10::kCPU)), nullptr, false);
}

at::Tensor over(const at::Storage& storage, c10::ScalarType dtype, std::int64_t offset,
                c10::IntArrayRef sizes, c10::IntArrayRef strides) {
  return at::empty({0}, at::TensorOptions().dtype(dtype)).set_(storage, offset, sizes, strides);
}

std::vector<std::int64_t> dense_strides(c10::IntArrayRef sizes) {
  std::vector<std::int64_t> strides(sizes.size(), 1);
  for (std::size_t d = sizes.size(); d-- > 1;)
    strides[d - 1] = strides[d] * std::max<std::int64_t>(sizes[d], 1);
  return strides;
}

/// A placeholder for a whole tensor of `dtype` and `sizes`.
at::Tensor placeholder(c10::ScalarType dtype, c10::IntArrayRef sizes) {
  const auto nbytes = static_cast<std::uint64_t>(numel_of(sizes)) * c10::elementSize(dtype);
  return over(empty_storage(nbytes), dtype, 0, sizes, dense_strides(sizes));
}

/// A checkpoint opened for conversion.
class Source {
 public:
  virtual ~Source() = default;
  /// The whole state, nested; its tensors are placeholders.
  const StateDict& state() const { return state_; }
  /// A safetensors source's `__metadata__`.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// The bytes of the placeholder storage `impl`: a CPU storage of at least
  /// its size, read now.
  virtual at::Storage bytes(Impl impl) = 0;
  /// The order the destination will ask for storages in (a hint).
  virtual void expect(const std::vector<Impl>& /*order*/) {}
  /// `placeholder`'s values: by default a view of its whole storage's bytes.
  virtual at::Tensor values(const at::Tensor& placeholder) {
    at::Storage s = bytes(placeholder.storage().unsafeGetStorageImpl());
    const auto need = static_cast<std::uint64_t>(placeholder.storage().nbytes());
    if (s.nbytes() < need)
      throw CorruptCheckpoint(
          fmt::format("the source gave {} bytes for a tensor of {} bytes", s.nbytes(), need));
    return over(s, placeholder.scalar_type(), placeholder.storage_offset(), placeholder.sizes(),
                placeholder.strides());
  }

 protected:
  StateDict state_;
  std::map<std::string, std::string> metadata_;
};

// --- torch.save files ----------------------------------------------------------------

class TorchSource : public Source {
 public:
  explicit TorchSource(const std::vector<fs::path>& files, bool nest_by_rank) {
    ReadOptions read;
    read.verify_crc = true;
    for (std::size_t f = 0; f < files.size(); ++f) {
      readers_.push_back(std::make_unique<FileReader>(files[f], read));
      partial_.emplace_back();
      const c10::IValue root = build(f, readers_.back()->root(), "");
      if (!root.isGenericDict())
        throw Unsupported(fmt::format("{} holds a {} at its root; ckpt convert takes a state dict (a dict)",
                                      files[f].string(), kind_name(readers_.back()->root().kind)));
      StateDict sd = StateDict::from_ivalue(root);
      if (nest_by_rank)
        state_.insert(rank_of(files[f]), sd);
      else
        state_ = sd;
    }
  }

  at::Storage bytes(Impl impl) override {
    const Where& w = where_.at(impl);
    at::Tensor target = at::empty({w.whole.storage_numel}, at::TensorOptions().dtype(w.whole.dtype));
    readers_[w.reader]->read_into(w.whole, target, w.key);
    return target.storage();
  }

  /// A view of part of a larger storage (a slice, or one parameter of a flat
  /// buffer that many views share) reads only the elements it spans, not the
  /// whole storage for each view.
  at::Tensor values(const at::Tensor& placeholder) override {
    const Where& w = where_.at(placeholder.storage().unsafeGetStorageImpl());
    const auto sizes = placeholder.sizes();
    const auto strides = placeholder.strides();
    if (placeholder.numel() == 0)
      return at::empty(sizes, at::TensorOptions().dtype(placeholder.scalar_type()));
    const std::int64_t lo = placeholder.storage_offset();
    std::int64_t hi = lo + 1;
    for (std::size_t d = 0; d < sizes.size(); ++d) hi += (sizes[d] - 1) * strides[d];
    if (lo == 0 && hi == w.whole.storage_numel) return Source::values(placeholder);
    // The span alone, bounds-checked by the reader; its record's CRC-32 covers
    // the whole storage and is checked where the whole is read.
    if (!partial_[w.reader]) partial_[w.reader] = std::make_unique<FileReader>(readers_[w.reader]->path());
    TensorInfo span = w.whole;
    span.storage_offset = lo;
    span.sizes = {hi - lo};
    at::Tensor target = at::empty({hi - lo}, at::TensorOptions().dtype(w.whole.dtype));
    partial_[w.reader]->read_into(span, target, w.key);
    return over(target.storage(), placeholder.scalar_type(), placeholder.storage_offset() - lo, sizes,
                strides);
  }

 private:
  struct Where {
    std::size_t reader;
    TensorInfo whole;  // the whole storage, as one contiguous tensor
    std::string key;
  };

  static std::string rank_of(const fs::path& file) {
    std::string stem = file.stem().string();  // checkpoint_<rank>
    return stem.substr(stem.find('_') + 1);
  }

  c10::IValue build(std::size_t f, const Node& n, const std::string& key) {
    using K = Node::Kind;
    switch (n.kind) {
      case K::tensor: {
        const TensorInfo& t = *n.tensor;
        auto [it, fresh] = storages_.try_emplace({f, t.storage_key});
        if (fresh) {
          const auto nbytes = static_cast<std::uint64_t>(t.storage_numel) * c10::elementSize(t.dtype);
          it->second = empty_storage(nbytes);
          TensorInfo whole = t;
          whole.storage_offset = 0;
          whole.sizes = {t.storage_numel};
          whole.strides = {1};
          where_.emplace(it->second.unsafeGetStorageImpl(), Where{f, std::move(whole), key});
        }
        return over(it->second, t.dtype, t.storage_offset, t.sizes, t.strides);
      }
      case K::dict: {
        bool all_str = true, all_int = true;
        for (const auto& [k, v] : n.entries) {
          all_str = all_str && k->kind == K::string;
          all_int = all_int && k->kind == K::integer;
        }
        c10::TypePtr key_type = all_str   ? c10::TypePtr(c10::StringType::get())
                                : all_int ? c10::TypePtr(c10::IntType::get())
                                          : c10::TypePtr(c10::AnyType::get());
        c10::impl::GenericDict dict(key_type, c10::AnyType::get());
        for (const auto& [k, v] : n.entries) {
          const c10::IValue kv = readers_[f]->to_ivalue(*k);
          const std::string text = kv.isString() ? kv.toStringRef()
                                   : kv.isInt()  ? std::to_string(kv.toInt())
                                                 : "?";
          dict.insert_or_assign(kv, build(f, *v, key.empty() ? text : key + "." + text));
        }
        return dict;
      }
      case K::list: {
        c10::impl::GenericList list(c10::AnyType::get());
        for (std::size_t i = 0; i < n.items.size(); ++i)
          list.push_back(build(f, *n.items[i], fmt::format("{}.{}", key, i)));
        return list;
      }
      case K::tuple: {
        std::vector<c10::IValue> elems;
        for (std::size_t i = 0; i < n.items.size(); ++i)
          elems.push_back(build(f, *n.items[i], fmt::format("{}.{}", key, i)));
        return c10::ivalue::Tuple::create(std::move(elems));
      }
      default: return readers_[f]->to_ivalue(n);
    }
  }

  std::vector<std::unique_ptr<FileReader>> readers_;
  std::vector<std::unique_ptr<FileReader>> partial_;  // for spans of storages (no CRC: parts of records)
  std::map<std::pair<std::size_t, std::string>, at::Storage> storages_;
  std::unordered_map<Impl, Where> where_;
};

// --- DCP directories (FileSystemReader or HuggingFaceStorageReader) ------------------

class DcpSource : public Source {
 public:
  DcpSource(fs::path dir, bool hugging_face, std::uint64_t batch_bytes)
      : dir_(std::move(dir)), hf_(hugging_face), batch_bytes_(batch_bytes) {
    const CheckpointMetadata md = reader()->read_metadata();
    DcpStateDict flat, values;
    for (const auto& [fqn, sm] : md.metadata.state_dict_metadata) {
      if (const auto* t = std::get_if<TensorStorageMetadata>(&sm)) {
        at::Tensor p = placeholder(t->properties.dtype, t->size);
        index_.emplace(p.storage().unsafeGetStorageImpl(), keys_.size());
        keys_.push_back({fqn, t->properties.dtype, t->size});
        flat.emplace_back(fqn, p);
      } else {
        values.emplace_back(fqn, c10::IValue());
      }
    }
    // Values are small: all of them now, in one read.
    if (!values.empty()) load(values);
    for (auto& v : values) flat.push_back(std::move(v));
    state_ = unflatten_state_dict(flat, md.metadata.planner_data);
    for (std::size_t k = 0; k < keys_.size(); ++k) order_.push_back(k);
  }

  void expect(const std::vector<Impl>& order) override {
    order_.clear();
    for (Impl impl : order)
      if (auto it = index_.find(impl); it != index_.end()) order_.push_back(it->second);
  }

  at::Storage bytes(Impl impl) override {
    const std::size_t k = index_.at(impl);
    if (auto it = cache_.find(k); it != cache_.end()) {
      at::Storage s = it->second.storage();
      cache_.erase(it);
      return s;
    }
    // Not read ahead: what was read ahead and not asked for is dropped (the
    // destination's order differs from the one expected), then the keys from
    // this one on in the expected order are read, up to the batch's bytes.
    cache_.clear();
    std::size_t from = 0;
    while (from < order_.size() && order_[from] != k) ++from;
    DcpStateDict batch;
    std::vector<std::size_t> which;
    std::uint64_t bytes = 0;
    const auto add = [&](std::size_t key) {
      const Key& info = keys_[key];
      batch.emplace_back(info.fqn, at::empty(info.size, at::TensorOptions().dtype(info.dtype)));
      which.push_back(key);
      bytes += static_cast<std::uint64_t>(numel_of(info.size)) * c10::elementSize(info.dtype);
    };
    add(k);
    for (std::size_t i = from + 1; i < order_.size(); ++i) {
      const Key& info = keys_[order_[i]];
      const auto n = static_cast<std::uint64_t>(numel_of(info.size)) * c10::elementSize(info.dtype);
      if (bytes + n > batch_bytes_) break;
      add(order_[i]);
    }
    load(batch);
    for (std::size_t i = 1; i < which.size(); ++i)
      cache_.emplace(which[i], std::get<at::Tensor>(batch[i].second));
    return std::get<at::Tensor>(batch[0].second).storage();
  }

 private:
  struct Key {
    std::string fqn;
    c10::ScalarType dtype;
    std::vector<std::int64_t> size;
  };

  std::unique_ptr<StorageReader> reader() const {
    if (hf_) return std::make_unique<HuggingFaceStorageReader>(dir_);
    return std::make_unique<FileSystemReader>(dir_);
  }

  void load(DcpStateDict& part) const {
    auto storage = reader();
    DefaultLoadPlanner planner(/*allow_partial_load=*/false);
    load_state_dict(part, *storage, &planner, nullptr, 0, /*no_dist=*/true);
  }

  fs::path dir_;
  bool hf_;
  std::uint64_t batch_bytes_;
  std::vector<Key> keys_;
  std::unordered_map<Impl, std::size_t> index_;
  std::vector<std::size_t> order_;
  std::unordered_map<std::size_t, at::Tensor> cache_;
};

// --- safetensors files and indexes ---------------------------------------------------

class SafetensorsSource : public Source {
 public:
  explicit SafetensorsSource(const fs::path& path) : reader_(path) {
    for (const auto& name : reader_.names()) {
      const auto& e = reader_.entry(name);
      if (e.scalar_type == c10::ScalarType::Undefined)
        throw Unsupported(
            fmt::format("{}: '{}' is {}, a dtype this libtorch does not have", path.string(), name, e.dtype));
      at::Tensor p = placeholder(e.scalar_type, e.shape);
      names_.emplace(p.storage().unsafeGetStorageImpl(), name);
      state_.insert(name, p);
    }
    metadata_ = reader_.metadata();
  }

  at::Storage bytes(Impl impl) override {
    at::Tensor t = reader_.tensor(names_.at(impl));
    if (t.storage_offset() != 0 || !t.is_contiguous()) t = t.contiguous().clone();
    return t.storage();
  }

 private:
  safetensors::Reader reader_;
  std::unordered_map<Impl, std::string> names_;
};

// --- opening a source ---------------------------------------------------------------

bool has_file(const fs::path& dir, const char* name) {
  std::error_code ec;
  return fs::is_regular_file(dir / name, ec);
}

std::vector<fs::path> rank_files(const fs::path& dir) {
  std::vector<std::pair<long long, fs::path>> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_regular_file() || !name.starts_with("checkpoint_") || !name.ends_with(".pt")) continue;
    const std::string digits = name.substr(11, name.size() - 14);
    if (digits.empty() || digits.size() > 9 || !std::all_of(digits.begin(), digits.end(), ::isdigit))
      continue;
    found.emplace_back(std::stoll(digits), e.path());
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> out;
  for (auto& [r, p] : found) out.push_back(std::move(p));
  return out;
}

bool ends_with(const fs::path& p, std::string_view suffix) {
  return p.filename().string().ends_with(suffix);
}

std::unique_ptr<Source> open_source(const fs::path& source, CheckpointFormat format,
                                    const ConvertOptions& options) {
  std::error_code ec;
  const bool dir = fs::is_directory(source, ec);
  switch (format) {
    case CheckpointFormat::dcp: return std::make_unique<DcpSource>(source, false, options.read_batch_bytes);
    case CheckpointFormat::safetensors:
      // A plain safetensors checkpoint (one file, or an index) is read as it is;
      // a directory of DCP shards (DCP_SHARDING_INFO) through its storage reader.
      if (!dir || has_file(source, "model.safetensors") || has_file(source, "model.safetensors.index.json"))
        return std::make_unique<SafetensorsSource>(source);
      return std::make_unique<DcpSource>(source, true, options.read_batch_bytes);
    case CheckpointFormat::torch: {
      if (!dir) {
        if (options.rank)
          throw Error("--rank (ConvertOptions::rank) is for a directory of checkpoint_<rank>.pt files");
        return std::make_unique<TorchSource>(std::vector<fs::path>{source}, false);
      }
      std::vector<fs::path> files = rank_files(source);
      if (options.rank) {
        const fs::path one = source / fmt::format("checkpoint_{}.pt", *options.rank);
        if (std::find(files.begin(), files.end(), one) == files.end())
          throw NotFound(fmt::format("{} holds no checkpoint_{}.pt", source.string(), *options.rank));
        return std::make_unique<TorchSource>(std::vector<fs::path>{one}, false);
      }
      return std::make_unique<TorchSource>(files, files.size() > 1);
    }
  }
  throw Error("unknown checkpoint format");
}

// --- progress -------------------------------------------------------------------------

class Progress {
 public:
  Progress(const ConvertOptions& options, ConvertResult& result) : options_(options), result_(result) {}
  /// What the destination will write: its tensors (storages, for a torch.save
  /// destination) in the order it fetches them.
  void plan(const std::vector<std::uint64_t>& sizes) {
    p_ = ConvertProgress{};
    p_.tensors = sizes.size();
    for (auto n : sizes) p_.bytes += n;
  }
  /// A tensor of `nbytes` was fetched for writing.
  void done(std::uint64_t nbytes) {
    ++p_.tensors_done;
    p_.bytes_done += nbytes;
    result_.tensor_bytes += nbytes;
    result_.largest_tensor_bytes = std::max(result_.largest_tensor_bytes, nbytes);
    if (options_.progress) options_.progress(p_);
  }

 private:
  const ConvertOptions& options_;
  ConvertResult& result_;
  ConvertProgress p_;
};

std::uint64_t nbytes_of(const at::Tensor& t) {
  return static_cast<std::uint64_t>(t.numel()) * t.element_size();
}

// --- destinations --------------------------------------------------------------------

void write_torch(Source& source, const fs::path& destination, const ConvertOptions& options,
                 Progress& progress, ConvertResult& result) {
  ckpt::detail::Layout layout = ckpt::detail::plan_layout(source.state().to_ivalue());
  std::vector<Impl> impl_of(layout.records.size(), nullptr);
  for (const auto& [impl, record] : layout.record_of_storage) impl_of[record] = impl;
  std::vector<Impl> order;
  std::vector<std::uint64_t> sizes;
  for (std::size_t r = 0; r < impl_of.size(); ++r)
    if (impl_of[r]) {
      order.push_back(impl_of[r]);
      sizes.push_back(layout.records[r].size);
    }
  source.expect(order);
  progress.plan(sizes);
  layout.fetch = [&](std::size_t record) {
    if (!impl_of[record]) throw Error(fmt::format("record {} has no source", layout.records[record].name));
    at::Storage s = source.bytes(impl_of[record]);
    progress.done(layout.records[record].size);
    return s;
  };
  ckpt::detail::write_layout(destination, layout,
                             WriteOptions{.direct_io = true, .fsync = options.sync_files});
  auto [flat, paths] = flatten_state_dict(source.state());
  for (const auto& [fqn, v] : flat)
    ++(std::holds_alternative<at::Tensor>(v) ? result.tensors : result.values);
}

/// The save planner of a DCP destination: the placeholders' values fetched as
/// each item is written.
class StreamingSavePlanner : public DefaultSavePlanner {
 public:
  StreamingSavePlanner(Source& source, Progress& progress) : source_(source), progress_(progress) {}
  c10::IValue resolve_data(const WriteItem& item) override {
    c10::IValue v = DefaultSavePlanner::resolve_data(item);
    if (!v.isTensor()) return v;
    at::Tensor t = source_.values(v.toTensor());
    progress_.done(nbytes_of(t));
    return t;
  }

 private:
  Source& source_;
  Progress& progress_;
};

void write_dcp(Source& source, const fs::path& destination, const ConvertOptions& options, Progress& progress,
               ConvertResult& result) {
  auto [flat, paths] = flatten_state_dict(source.state());
  std::vector<Impl> order;
  std::vector<std::uint64_t> sizes;
  for (const auto& [fqn, v] : flat) {
    if (const auto* t = std::get_if<at::Tensor>(&v)) {
      order.push_back(t->storage().unsafeGetStorageImpl());
      sizes.push_back(nbytes_of(*t));
      ++result.tensors;
    } else {
      ++result.values;
    }
  }
  source.expect(order);
  progress.plan(sizes);
  FileSystemWriter writer(
      destination, FileSystemWriterOptions{
                       .sync_files = options.sync_files, .direct_io = true, .dialect = options.dialect});
  StreamingSavePlanner planner(source, progress);
  SaveOptions save;
  save.storage_writer = &writer;
  save.planner = &planner;
  save.no_dist = true;
  dcp::save(source.state(), save);
}

bool is_scalar(const c10::IValue& v) {
  return v.isInt() || v.isDouble() || v.isBool() || v.isString();
}

void write_safetensors(Source& source, fs::path destination, const ConvertOptions& options,
                       Progress& progress, ConvertResult& result) {
  safetensors::SaveOptions save;
  save.max_shard_bytes = options.max_shard_bytes;
  const std::string name = destination.filename().string();
  if (name.ends_with(".safetensors.index.json")) {
    destination.replace_filename(name.substr(0, name.size() - std::string_view(".index.json").size()));
    if (save.max_shard_bytes == 0) save.max_shard_bytes = ~std::uint64_t{0};
  }
  save.non_tensors_as_metadata = options.values_as_metadata;
  save.fsync = options.sync_files;
  for (const auto& [k, v] : source.metadata())
    if (!k.starts_with("ckpt_") && !(save.max_shard_bytes > 0 && k == "total_size"))
      save.metadata.emplace(k, v);
  save.metadata.emplace("format", "pt");  // what transformers expects

  auto [flat, paths] = flatten_state_dict(source.state());
  StateDict out;
  for (const auto& [fqn, v] : flat) {
    if (const auto* t = std::get_if<at::Tensor>(&v)) {
      out.insert(fqn, *t);
      ++result.tensors;
      continue;
    }
    const c10::IValue& value = std::get<c10::IValue>(v);
    if (options.skip_values) {
      ++result.skipped;
      continue;
    }
    if (!options.values_as_metadata || !is_scalar(value))
      throw Unsupported(fmt::format(
          "'{}' is {}, and safetensors holds only tensors: skip_values (--skip-values) leaves such values "
          "out{}",
          fqn, value.tagKind(),
          is_scalar(value) ? ", values_as_metadata (--values-as-metadata) keeps them as text in __metadata__"
                           : ""));
    out.insert(fqn, value);
    ++result.values;
  }
  // The order the writer asks in: shards in the state dict's order, each
  // written largest element size first (safetensors::save's rules).
  std::vector<std::vector<at::Tensor>> shards(1);
  std::uint64_t in_shard = 0;
  for (const auto& entry : out.dict()) {
    if (!entry.value().isTensor()) continue;
    const at::Tensor& t = entry.value().toTensor();
    const auto n = static_cast<std::uint64_t>(t.numel()) * t.element_size();
    if (save.max_shard_bytes > 0 && !shards.back().empty() && in_shard + n > save.max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(t);
    in_shard += n;
  }
  std::vector<Impl> order;
  std::vector<std::uint64_t> sizes;
  for (auto& shard : shards) {
    std::stable_sort(shard.begin(), shard.end(), [](const at::Tensor& a, const at::Tensor& b) {
      return a.element_size() > b.element_size();
    });
    for (const auto& t : shard) {
      order.push_back(t.storage().unsafeGetStorageImpl());
      sizes.push_back(nbytes_of(t));
    }
  }
  source.expect(order);
  progress.plan(sizes);
  ckpt::detail::save_streaming(destination, out, save, [&](const std::string&, const at::Tensor& t) {
    at::Tensor v = source.values(t);
    progress.done(nbytes_of(v));
    return v;
  });
}

}  // namespace

const char* format_name(CheckpointFormat format) {
  switch (format) {
    case CheckpointFormat::torch: return "torch";
    case CheckpointFormat::dcp: return "dcp";
    case CheckpointFormat::safetensors: return "safetensors";
  }
  return "?";
}

CheckpointFormat detect_format(const fs::path& source) {
  std::error_code ec;
  if (!fs::exists(source, ec)) throw NotFound(fmt::format("{} does not exist", source.string()));
  if (!fs::is_directory(source, ec)) {
    if (ends_with(source, ".safetensors") || ends_with(source, ".json")) return CheckpointFormat::safetensors;
    return CheckpointFormat::torch;
  }
  if (has_file(source, kMetadataFileName)) return CheckpointFormat::dcp;
  if (!rank_files(source).empty()) return CheckpointFormat::torch;
  if (is_hugging_face_checkpoint(source)) return CheckpointFormat::safetensors;
  throw NotFound(
      fmt::format("{} holds no DCP .metadata, no checkpoint_<rank>.pt file and no safetensors checkpoint",
                  source.string()));
}

CheckpointFormat format_for_destination(const fs::path& destination) {
  if (ends_with(destination, ".safetensors") || ends_with(destination, ".safetensors.index.json"))
    return CheckpointFormat::safetensors;
  for (const char* ext : {".pt", ".pth", ".bin", ".ckpt"})
    if (destination.extension() == ext) return CheckpointFormat::torch;
  return CheckpointFormat::dcp;
}

ConvertResult convert(const fs::path& source, const fs::path& destination, const ConvertOptions& options) {
  ConvertResult result;
  result.from = detect_format(source);
  result.to = options.to ? *options.to : format_for_destination(destination);
  std::error_code ec;
  if (fs::exists(destination, ec) && fs::equivalent(source, destination, ec))
    throw Error(fmt::format("{} is the source itself: convert into another path", destination.string()));
  if (result.to == CheckpointFormat::dcp && fs::exists(destination, ec) && !fs::is_directory(destination, ec))
    throw Error(fmt::format("{} is a file; a DCP checkpoint is a directory", destination.string()));
  if (result.to != CheckpointFormat::dcp && fs::is_directory(destination, ec))
    throw Error(fmt::format("{} is a directory; a {} checkpoint is a file", destination.string(),
                            format_name(result.to)));
  if (result.to != CheckpointFormat::safetensors &&
      (options.skip_values || options.values_as_metadata || options.max_shard_bytes > 0))
    throw Error("skip_values, values_as_metadata and max_shard_bytes are for a safetensors destination");
  if (options.rank && !(result.from == CheckpointFormat::torch && fs::is_directory(source, ec)))
    throw Error(
        fmt::format("{} is a {} checkpoint; --rank (ConvertOptions::rank) is for a directory of "
                    "checkpoint_<rank>.pt files",
                    source.string(), format_name(result.from)));
  std::unique_ptr<Source> src = open_source(source, result.from, options);
  Progress progress(options, result);
  switch (result.to) {
    case CheckpointFormat::torch: write_torch(*src, destination, options, progress, result); break;
    case CheckpointFormat::dcp: write_dcp(*src, destination, options, progress, result); break;
    case CheckpointFormat::safetensors:
      write_safetensors(*src, destination, options, progress, result);
      break;
  }
  return result;
}

void dcp_to_torch_save(const fs::path& dcp_checkpoint_dir, const fs::path& torch_save_path) {
  ConvertOptions options;
  options.to = CheckpointFormat::torch;
  if (detect_format(dcp_checkpoint_dir) != CheckpointFormat::dcp)
    throw Error(fmt::format("{} is not a DCP checkpoint directory", dcp_checkpoint_dir.string()));
  convert(dcp_checkpoint_dir, torch_save_path, options);
}

void torch_save_to_dcp(const fs::path& torch_save_path, const fs::path& dcp_checkpoint_dir) {
  ConvertOptions options;
  options.to = CheckpointFormat::dcp;
  if (detect_format(torch_save_path) != CheckpointFormat::torch)
    throw Error(fmt::format("{} is not a torch.save file", torch_save_path.string()));
  convert(torch_save_path, dcp_checkpoint_dir, options);
}

}  // namespace ckpt::dcp
