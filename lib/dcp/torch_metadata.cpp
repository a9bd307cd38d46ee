#include "dcp/torch_metadata.hpp"

#include "dcp/serialize.hpp"
#include "format/dtypes.hpp"
#include "format/pickle_emit.hpp"
#include "format/py_pickle.hpp"

#include <ckpt/error.hpp>

#include <fmt/format.h>

#include <array>
#include <string_view>

namespace ckpt::dcp::detail {
namespace {

using ckpt::detail::PyNode;
using Kind = PyNode::Kind;

constexpr std::string_view kMetadataModules[] = {
    "torch.distributed.checkpoint.metadata",         // torch 2.x
    "torch.distributed._shard.checkpoint.metadata",  // torch 1.13 (and 2.x's alias)
};
constexpr std::string_view kFilesystemModules[] = {
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed._shard.checkpoint.filesystem",
};
constexpr const char* kZstdTransform = "stream.zstd/1";  // upstream's ZStandard extension
constexpr std::string_view kShardedTensorModule = "torch.distributed._shard.sharded_tensor.metadata";
constexpr std::string_view kMemoryFormats[] = {"TORCH_CONTIGUOUS_FORMAT", "TORCH_CHANNELS_LAST",
                                               "TORCH_PRESERVE_FORMAT"};
constexpr std::string_view kPathClasses[] = {
    "pathlib.PosixPath",        "pathlib.WindowsPath",        "pathlib.Path",
    "pathlib.PurePosixPath",    "pathlib.PureWindowsPath",    "pathlib._local.Path",
    "pathlib._local.PosixPath", "pathlib._local.WindowsPath",
};

template <std::size_t N>
bool one_of(std::string_view s, const std::string_view (&set)[N]) {
  for (auto e : set)
    if (s == e) return true;
  return false;
}

/// "Metadata" for "torch.distributed.checkpoint.metadata.Metadata" and the
/// other metadata modules; empty otherwise.
std::string_view metadata_class(std::string_view global) {
  for (auto m : kMetadataModules)
    if (global.size() > m.size() + 1 && global.starts_with(m) && global[m.size()] == '.')
      return global.substr(m.size() + 1);
  return {};
}

bool memory_format_enum(std::string_view global) {
  return global == fmt::format("{}.MEM_FORMAT_ENCODING", kShardedTensorModule) ||
         metadata_class(global) == "MEM_FORMAT_ENCODING" || metadata_class(global) == "_MEM_FORMAT_ENCODING";
}

/// The globals a `.metadata` of torch 1.13 to 2.x may name (research: the
/// pickled classes per torch version), and nothing else.
bool allowed(std::string_view module, std::string_view name) {
  const std::string global = fmt::format("{}.{}", module, name);
  const std::string_view cls = metadata_class(global);
  if (cls == "Metadata" || cls == "TensorStorageMetadata" || cls == "ChunkStorageMetadata" ||
      cls == "BytesStorageMetadata" || cls == "MetadataIndex" || cls == "TensorProperties" ||
      cls == "StorageMeta")
    return true;
  if (memory_format_enum(global)) return true;
  if (module == kShardedTensorModule && name == "TensorProperties") return true;
  if (one_of(module, kFilesystemModules) && name == "_StorageInfo") return true;
  if (global == "torch.Size" || global == "torch.serialization._get_layout" || global == "builtins.getattr")
    return true;
  if (module == "torch" && ckpt::detail::dtype_of_torch_name(name) != c10::ScalarType::Undefined) return true;
  return one_of(global, kPathClasses);
}

class Decoder {
 public:
  explicit Decoder(const std::string& source) : source_(source) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw CorruptCheckpoint(fmt::format("{}: {}", source_, what));
  }

  /// A dataclass instance: NEWOBJ of the metadata class `cls` with no
  /// arguments. Returns its state (nullptr when BUILD set none).
  const PyNode* instance(const PyNode* n, std::string_view cls, std::string_view what) const {
    if (n->kind != Kind::object || metadata_class(n->callee->s) != cls)
      fail(fmt::format("{} is a {}, not a {}", what, describe(n), cls));
    if (!n->items.empty()) fail(fmt::format("{} is made with arguments", what));
    return n->state;
  }
  /// The state dict of an instance; fields not given are absent.
  const PyNode& fields(const PyNode* state, std::string_view what) const {
    static const PyNode empty = [] {
      PyNode n;
      n.kind = Kind::dict;
      return n;
    }();
    if (!state) return empty;
    if (state->kind != Kind::dict) fail(fmt::format("{}'s state is a {}, not a dict", what, describe(state)));
    for (const auto& [k, v] : state->entries)
      if (k->kind != Kind::string) fail(fmt::format("{} has a field named by a {}", what, describe(k)));
    return *state;
  }
  const PyNode* required(const PyNode& f, std::string_view field, std::string_view what) const {
    const PyNode* v = f.find(field);
    if (!v) fail(fmt::format("{} has no {}", what, field));
    return v;
  }
  static bool none(const PyNode* n) { return !n || n->kind == Kind::none; }

  std::string describe(const PyNode* n) const {
    if ((n->kind == Kind::object || n->kind == Kind::call) && n->callee)
      return fmt::format("{} of {}", ckpt::detail::py_kind_name(n->kind), n->callee->s);
    if (n->kind == Kind::global) return fmt::format("global {}", n->s);
    return ckpt::detail::py_kind_name(n->kind);
  }

  const std::string& str(const PyNode* n, std::string_view what) const {
    if (n->kind != Kind::string) fail(fmt::format("{} is a {}, not a str", what, describe(n)));
    return n->s;
  }
  std::int64_t integer(const PyNode* n, std::string_view what) const {
    if (n->kind != Kind::integer) fail(fmt::format("{} is a {}, not an int", what, describe(n)));
    return n->i;
  }
  bool boolean(const PyNode* n, std::string_view what) const {
    if (n->kind != Kind::boolean) fail(fmt::format("{} is a {}, not a bool", what, describe(n)));
    return n->b;
  }

  /// torch.Size((d0, d1, ...)), every dim >= 0.
  std::vector<std::int64_t> size(const PyNode* n, std::string_view what) const {
    if (!n->is(Kind::call, "torch.Size") || n->items.size() != 1 || n->items[0]->kind != Kind::tuple)
      fail(fmt::format("{} is a {}, not a torch.Size", what, describe(n)));
    const auto& dims = n->items[0]->items;
    if (dims.size() > 64) fail(fmt::format("{} has {} dimensions", what, dims.size()));
    std::vector<std::int64_t> out;
    for (const PyNode* d : dims) {
      const std::int64_t v = integer(d, what);
      if (v < 0) fail(fmt::format("{} has a negative dimension {}", what, v));
      out.push_back(v);
    }
    return out;
  }

  /// TensorProperties: its state is the 5-tuple of its __getstate__ (dtype,
  /// layout, requires_grad, memory_format, pin_memory), or a dict of them.
  TensorProperties properties(const PyNode* n, std::string_view what) const {
    const bool known = n->kind == Kind::object && n->callee &&
                       (metadata_class(n->callee->s) == "TensorProperties" ||
                        n->callee->s == fmt::format("{}.TensorProperties", kShardedTensorModule));
    if (!known) fail(fmt::format("{} is a {}, not a TensorProperties", what, describe(n)));
    if (!n->items.empty()) fail(fmt::format("{} is made with arguments", what));
    const PyNode *dtype = nullptr, *layout = nullptr, *requires_grad = nullptr, *memory_format = nullptr,
                 *pin_memory = nullptr;
    if (n->state && n->state->kind == Kind::tuple) {
      if (n->state->items.size() != 5)
        fail(fmt::format("{} has a state of {} values, not 5", what, n->state->items.size()));
      dtype = n->state->items[0];
      layout = n->state->items[1];
      requires_grad = n->state->items[2];
      memory_format = n->state->items[3];
      pin_memory = n->state->items[4];
    } else {
      const PyNode& f = fields(n->state, what);
      dtype = required(f, "dtype", what);
      layout = f.find("layout");
      requires_grad = f.find("requires_grad");
      memory_format = f.find("memory_format");
      pin_memory = f.find("pin_memory");
    }
    TensorProperties p;
    if (dtype->kind != Kind::global || !dtype->s.starts_with("torch."))
      fail(fmt::format("{}'s dtype is a {}, not a torch dtype", what, describe(dtype)));
    p.dtype = ckpt::detail::dtype_of_torch_name(std::string_view(dtype->s).substr(6));
    if (p.dtype == c10::ScalarType::Undefined)
      fail(fmt::format("{}'s dtype is {}, not a torch dtype", what, dtype->s));
    if (layout && !none(layout)) {
      if (!layout->is(Kind::call, "torch.serialization._get_layout") || layout->items.size() != 1)
        fail(fmt::format("{}'s layout is a {}, not a torch layout", what, describe(layout)));
      const std::string& name = str(layout->items[0], "a layout's name");
      if (name != "torch.strided")
        throw Unsupported(
            fmt::format("{}: {} has layout {}; only strided tensors are read", source_, what, name));
    }
    if (requires_grad && !none(requires_grad)) p.requires_grad = boolean(requires_grad, "requires_grad");
    if (memory_format && !none(memory_format)) check_memory_format(memory_format, what);
    if (pin_memory && !none(pin_memory)) boolean(pin_memory, "pin_memory");
    return p;
  }

  /// An enum member, as Python 3.11 pickles it (getattr(cls, "NAME")) or as
  /// other versions do (cls(value)).
  void check_memory_format(const PyNode* n, std::string_view what) const {
    if (n->kind == Kind::call && n->callee->s == "builtins.getattr") {
      if (n->items.size() != 2 || n->items[0]->kind != Kind::global || !memory_format_enum(n->items[0]->s) ||
          n->items[1]->kind != Kind::string || !one_of(n->items[1]->s, kMemoryFormats))
        fail(fmt::format("{}'s memory format is a getattr of something that is not a memory format", what));
      return;
    }
    if (n->kind == Kind::call && memory_format_enum(n->callee->s) && n->items.size() == 1 &&
        n->items[0]->kind == Kind::integer && n->items[0]->i >= 0 && n->items[0]->i < 3)
      return;
    fail(fmt::format("{}'s memory format is a {}, not a memory format", what, describe(n)));
  }

  StorageMetadata storage_metadata(const std::string& fqn, const PyNode* n) const {
    const std::string what = fmt::format("the metadata of '{}'", fqn);
    if (n->kind == Kind::object && metadata_class(n->callee->s) == "BytesStorageMetadata") {
      instance(n, "BytesStorageMetadata", what);
      return BytesStorageMetadata{};
    }
    const PyNode& f = fields(instance(n, "TensorStorageMetadata", what), what);
    TensorStorageMetadata t;
    t.properties = properties(required(f, "properties", what), what);
    t.size = size(required(f, "size", what), what + "'s size");
    const PyNode* chunks = required(f, "chunks", what);
    if (chunks->kind != Kind::list)
      fail(fmt::format("{}'s chunks are a {}, not a list", what, describe(chunks)));
    for (const PyNode* c : chunks->items) {
      const std::string cw = fmt::format("a chunk of '{}'", fqn);
      const PyNode& cf = fields(instance(c, "ChunkStorageMetadata", cw), cw);
      t.chunks.push_back({size(required(cf, "offsets", cw), cw + "'s offsets"),
                          size(required(cf, "sizes", cw), cw + "'s sizes")});
    }
    return t;
  }

  MetadataIndex index(const PyNode* n) const {
    const std::string what = "a storage_data key";
    const PyNode& f = fields(instance(n, "MetadataIndex", what), what);
    MetadataIndex i;
    i.fqn = str(required(f, "fqn", what), what + "'s fqn");
    if (const PyNode* o = f.find("offset"); !none(o))
      i.offset = size(o, fmt::format("the offset of '{}'", i.fqn));
    if (const PyNode* x = f.find("index"); !none(x))
      i.index = integer(x, fmt::format("the index of '{}'", i.fqn));
    return i;
  }

  StorageInfo storage_info(const PyNode* n, const MetadataIndex& index) const {
    const std::string what = fmt::format("where '{}' is stored", item_name(index));
    const bool known = n->kind == Kind::object && n->callee &&
                       (n->callee->s == fmt::format("{}._StorageInfo", kFilesystemModules[0]) ||
                        n->callee->s == fmt::format("{}._StorageInfo", kFilesystemModules[1]));
    if (!known) fail(fmt::format("{} is a {}, not a _StorageInfo", what, describe(n)));
    if (!n->items.empty()) fail(fmt::format("{} is made with arguments", what));
    const PyNode& f = fields(n->state, what);
    StorageInfo s;
    s.archive = true;
    s.relative_path = str(required(f, "relative_path", what), what);
    const std::int64_t offset = integer(required(f, "offset", what), what);
    const std::int64_t length = integer(required(f, "length", what), what);
    if (offset < 0 || length < 0) fail(fmt::format("{} has a negative offset or length", what));
    s.offset = static_cast<std::uint64_t>(offset);
    s.length = static_cast<std::uint64_t>(length);
    if (const PyNode* t = f.find("transform_descriptors"); !none(t)) {
      if (t->kind != Kind::list && t->kind != Kind::tuple)
        fail(fmt::format("{} has transform descriptors that are a {}", what, describe(t)));
      for (const PyNode* d : t->items) {
        const std::string& name = str(d, "a transform descriptor");
        if (name != kZstdTransform)
          throw Unsupported(fmt::format("{}: {} goes through the transform '{}'; ckpt reads '{}' only",
                                        source_, what, name, kZstdTransform));
        s.transforms.push_back(name);
      }
    }
    return s;
  }

  /// A pathlib path as text (its parts joined), or a str.
  std::string path_text(const PyNode* n, std::string_view what) const {
    if (n->kind == Kind::string) return n->s;
    if (n->kind != Kind::call || !one_of(n->callee->s, kPathClasses))
      fail(fmt::format("{} is a {}, not a str or a path", what, describe(n)));
    std::string out;
    for (const PyNode* p : n->items) {
      const std::string& part = str(p, what);
      if (!out.empty() && out.back() != '/') out += '/';
      out += part;
    }
    return out;
  }

  ObjectPath object_path(const PyNode* n, const std::string& fqn) const {
    const std::string what = fmt::format("the planner data of '{}'", fqn);
    if (n->kind != Kind::tuple && n->kind != Kind::list)
      fail(fmt::format("{} is a {}, not a tuple", what, describe(n)));
    ObjectPath out;
    for (const PyNode* e : n->items) {
      if (e->kind == Kind::string)
        out.emplace_back(e->s);
      else if (e->kind == Kind::integer)
        out.emplace_back(e->i);
      else
        fail(fmt::format("{} holds a {}, not a key or an index", what, describe(e)));
    }
    return out;
  }

  CheckpointMetadata decode(const PyNode* root) const {
    const PyNode& f = fields(instance(root, "Metadata", "the pickled object"), "Metadata");
    CheckpointMetadata out;
    const PyNode* sdm = required(f, "state_dict_metadata", "Metadata");
    if (sdm->kind != Kind::dict) fail(fmt::format("state_dict_metadata is a {}, not a dict", describe(sdm)));
    for (const auto& [k, v] : sdm->entries) {
      const std::string& fqn = str(k, "a state_dict_metadata key");
      if (!out.metadata.state_dict_metadata.emplace(fqn, storage_metadata(fqn, v)).second)
        fail(fmt::format("key '{}' is described twice", fqn));
    }
    const PyNode* sd = f.find("storage_data");
    if (none(sd)) fail("the metadata records no storage_data: nowhere says where anything is stored");
    if (sd->kind != Kind::dict) fail(fmt::format("storage_data is a {}, not a dict", describe(sd)));
    for (const auto& [k, v] : sd->entries) {
      MetadataIndex i = index(k);
      StorageInfo s = storage_info(v, i);
      if (!out.storage_data.emplace(i, std::move(s)).second)
        fail(fmt::format("item '{}' is stored twice", item_name(i)));
    }
    if (const PyNode* pd = f.find("planner_data"); !none(pd)) {
      if (pd->kind != Kind::dict) fail(fmt::format("planner_data is a {}, not a dict", describe(pd)));
      for (const auto& [k, v] : pd->entries) {
        const std::string& fqn = str(k, "a planner_data key");
        out.metadata.planner_data[fqn] = object_path(v, fqn);
      }
    }
    if (const PyNode* sm = f.find("storage_meta"); !none(sm)) {
      const PyNode& mf = fields(instance(sm, "StorageMeta", "storage_meta"), "storage_meta");
      StorageMeta m;
      if (const PyNode* c = mf.find("checkpoint_id"); !none(c))
        m.checkpoint_id = path_text(c, "checkpoint_id");
      if (const PyNode* s = mf.find("save_id"); !none(s)) m.save_id = str(s, "save_id");
      if (const PyNode* l = mf.find("load_id"); !none(l)) m.load_id = str(l, "load_id");
      out.metadata.storage_meta = std::move(m);
    }
    if (const PyNode* v = f.find("version"); !none(v)) out.metadata.version = str(v, "version");
    return out;
  }

 private:
  const std::string& source_;
};

/// Pickles a Metadata as the torch generation of `dialect` does.
class Encoder : ckpt::detail::PickleEmitter {
 public:
  explicit Encoder(MetadataDialect dialect) : dialect_(dialect) {}

  std::string run(const CheckpointMetadata& md) {
    proto(4);
    begin_object(metadata_module(), "Metadata");
    begin_fields();
    field("state_dict_metadata");
    begin_dict();
    std::size_t n = 0;
    for (const auto& [fqn, sm] : md.metadata.state_dict_metadata) {
      batch(n);
      str(fqn);
      if (const auto* t = std::get_if<TensorStorageMetadata>(&sm))
        tensor_metadata(*t);
      else
        empty_object(metadata_module(), "BytesStorageMetadata");
      n = end_entry(n);
    }
    end_dict(n);
    field("planner_data");
    if (dialect_ == MetadataDialect::torch_1_13) {
      none();
    } else {
      begin_dict();
      n = 0;
      for (const auto& [fqn, sm] : md.metadata.state_dict_metadata) {
        batch(n);
        str(fqn);
        const auto it = md.metadata.planner_data.find(fqn);
        object_path(it == md.metadata.planner_data.end() ? ObjectPath{fqn} : it->second);
        n = end_entry(n);
      }
      end_dict(n);
    }
    field("storage_data");
    begin_dict();
    n = 0;
    for (const auto& [index, info] : md.storage_data) {
      if (!info.archive)
        throw Error(
            fmt::format("item '{}' is not a torch.save archive: PyTorch's format cannot say where it is",
                        item_name(index)));
      batch(n);
      metadata_index(index);
      storage_info(info);
      n = end_entry(n);
    }
    end_dict(n);
    if (dialect_ == MetadataDialect::torch_2_4) {
      field("storage_meta");
      const StorageMeta sm = md.metadata.storage_meta.value_or(StorageMeta{});
      begin_object(metadata_module(), "StorageMeta");
      begin_fields();
      field("checkpoint_id");
      str(sm.checkpoint_id);
      field("save_id");
      optional_str(sm.save_id);
      field("load_id");
      optional_str(sm.load_id);
      field("modules");
      op(']');
      end_fields();
    }
    end_fields();
    stop();
    return take();
  }

 private:
  std::string_view metadata_module() const {
    return dialect_ == MetadataDialect::torch_1_13 ? kMetadataModules[1] : kMetadataModules[0];
  }

  /// NEWOBJ(cls, ()): a dataclass instance before its BUILD.
  void begin_object(std::string_view module, std::string_view cls) {
    global(module, cls);
    tuple(0);
    op('\x81');
  }
  void empty_object(std::string_view module, std::string_view cls) {
    begin_object(module, cls);
    op('}');
    op('b');
  }
  /// The field dict that BUILD sets: begin_fields, field(name) + value, ...,
  /// end_fields().
  void begin_fields() {
    op('}');
    mark();
  }
  void field(std::string_view name) { str(name); }
  void end_fields() {
    op('u');
    op('b');
  }
  void begin_dict() { op('}'); }
  /// Dict entries go in SETITEMS batches of 1000, as Python writes them.
  static constexpr std::size_t kBatch = 1000;
  void batch(std::size_t n) {
    if (n % kBatch == 0) mark();
  }
  std::size_t end_entry(std::size_t n) {
    if (++n % kBatch == 0) op('u');
    return n;
  }
  void end_dict(std::size_t n) {
    if (n % kBatch != 0) op('u');
  }
  void optional_str(const std::string& s) {
    if (s.empty())
      none();
    else
      str(s);
  }

  /// torch.Size(dims)
  void size(const std::vector<std::int64_t>& dims) {
    global("torch", "Size");
    int_tuple(dims);
    tuple(1);
    op('R');
  }

  void tensor_metadata(const TensorStorageMetadata& t) {
    begin_object(metadata_module(), "TensorStorageMetadata");
    begin_fields();
    field("properties");
    properties(t.properties);
    field("size");
    size(t.size);
    field("chunks");
    op(']');
    if (!t.chunks.empty()) {
      std::size_t n = 0;
      for (const auto& c : t.chunks) {
        if (n % kBatch == 0) mark();
        begin_object(metadata_module(), "ChunkStorageMetadata");
        begin_fields();
        field("offsets");
        size(c.offsets);
        field("sizes");
        size(c.sizes);
        end_fields();
        if (++n % kBatch == 0) op('e');
      }
      if (n % kBatch != 0) op('e');
    }
    end_fields();
  }

  /// TensorProperties with the 5-tuple state of its __getstate__: dtype,
  /// layout, requires_grad, memory format (contiguous), pin_memory.
  void properties(const TensorProperties& p) {
    const std::string_view module =
        dialect_ == MetadataDialect::torch_2_4 ? kMetadataModules[0] : kShardedTensorModule;
    const std::string_view encoding =
        dialect_ == MetadataDialect::torch_2_4 ? "_MEM_FORMAT_ENCODING" : "MEM_FORMAT_ENCODING";
    begin_object(module, "TensorProperties");
    mark();
    const char* dtype = ckpt::detail::torch_dtype_name(p.dtype);
    if (!dtype) throw Unsupported(fmt::format("dtype {} has no name in torch", c10::toString(p.dtype)));
    global("torch", dtype);
    global("torch.serialization", "_get_layout");
    str("torch.strided");
    tuple(1);
    op('R');
    boolean(p.requires_grad);
    global(module, encoding);  // the enum member cls(0): TORCH_CONTIGUOUS_FORMAT
    integer(0);
    tuple(1);
    op('R');
    boolean(false);
    tuple(5);
    op('b');
  }

  void object_path(const ObjectPath& path) {
    if (tuple_needs_mark(path.size())) mark();
    for (const auto& part : path) {
      if (const auto* key = std::get_if<std::string>(&part))
        str(*key);
      else
        integer(std::get<std::int64_t>(part));
    }
    tuple(path.size());
  }

  void metadata_index(const MetadataIndex& i) {
    begin_object(metadata_module(), "MetadataIndex");
    begin_fields();
    field("fqn");
    str(i.fqn);
    field("index");
    if (i.index)
      integer(*i.index);
    else
      none();
    if (i.offset) {
      field("offset");
      size(*i.offset);
    }
    end_fields();
  }

  void storage_info(const StorageInfo& s) {
    begin_object(dialect_ == MetadataDialect::torch_1_13 ? kFilesystemModules[1] : kFilesystemModules[0],
                 "_StorageInfo");
    begin_fields();
    field("relative_path");
    str(s.relative_path);
    field("offset");
    integer(static_cast<std::int64_t>(s.offset));
    field("length");
    integer(static_cast<std::int64_t>(s.length));
    end_fields();
  }

  MetadataDialect dialect_;
};

}  // namespace

std::string encode_torch_metadata(const CheckpointMetadata& metadata, MetadataDialect dialect) {
  return Encoder(dialect).run(metadata);
}

bool is_torch_metadata(std::string_view bytes) {
  return !bytes.empty() && static_cast<unsigned char>(bytes[0]) == 0x80;  // PROTO
}

CheckpointMetadata decode_torch_metadata(std::string_view bytes, const std::string& source) {
  const auto pickle = ckpt::detail::parse_py_pickle(bytes, source, allowed);
  CheckpointMetadata out = Decoder(source).decode(pickle.root);
  check_checkpoint_metadata(out, source);
  return out;
}

}  // namespace ckpt::dcp::detail
