// The pickle torch.save writes for a state dict (protocol 2), emitted directly:
//   tensor  -> torch._utils._rebuild_tensor_v2(persistent storage id, offset,
//              size, stride, requires_grad, OrderedDict())
//   storage -> BINPERSID ('storage', torch.<T>Storage, key, location, numel)
//   dict/list/tuple/int/float/bool/str/None -> the plain pickle opcodes.
// Storages are keyed by their StorageImpl, so tensors sharing one storage share
// one record, written once.
#include "format/pickle_writer.hpp"

#include "core/key_path.hpp"
#include "format/dtypes.hpp"
#include "format/layout.hpp"
#include "format/pickle_emit.hpp"
#include "format/zip.hpp"

#include <fmt/format.h>

#include <ATen/ATen.h>

#include <cstring>
#include <unordered_map>

namespace ckpt::detail {

namespace {

constexpr int kMaxDepth = 1000;
constexpr std::size_t kBatch = 1000;  // pickle batches APPENDS/SETITEMS as Python does

class Pickler : PickleEmitter {
 public:
  Pickler(Layout& layout, bool defer_device_copies) : layout_(layout), defer_(defer_device_copies) {}

  std::string run(const c10::IValue& v) {
    proto(2);
    std::string path;
    value(v, path, 0);
    stop();
    return take();
  }

 private:
  struct StorageRec {
    std::string key;
    c10::ScalarType dtype;
  };

  [[noreturn]] void unsupported(const std::string& path, std::string_view what) {
    throw Unsupported(fmt::format("cannot save '{}': {}", path.empty() ? "<root>" : path, what));
  }

  void dict_key(const c10::IValue& k, const std::string& path) {
    if (k.isString())
      str(k.toStringRef());
    else if (k.isInt())
      integer(k.toInt());
    else if (k.isBool())
      op(k.toBool() ? '\x88' : '\x89');
    else if (k.isDouble())
      real(k.toDouble());
    else
      unsupported(path, fmt::format("dict key of type {}", k.tagKind()));
  }

  void value(const c10::IValue& v, std::string& path, int depth) {
    if (depth > kMaxDepth) unsupported(path, fmt::format("nesting deeper than {}", kMaxDepth));
    if (v.isNone()) {
      op('N');
    } else if (v.isBool()) {
      op(v.toBool() ? '\x88' : '\x89');
    } else if (v.isInt()) {
      integer(v.toInt());
    } else if (v.isDouble()) {
      real(v.toDouble());
    } else if (v.isString()) {
      str(v.toStringRef());
    } else if (v.isTensor()) {
      tensor(v.toTensor(), path);
    } else if (v.isGenericDict()) {
      op('}');
      auto dict = v.toGenericDict();
      std::size_t n = 0;
      for (const auto& entry : dict) {
        if (n % kBatch == 0) op('(');
        dict_key(entry.key(), path);
        const auto saved = path.size();
        path += (path.empty() ? "" : ".") + key_text(entry.key());
        value(entry.value(), path, depth + 1);
        path.resize(saved);
        if (++n % kBatch == 0) op('u');
      }
      if (n % kBatch != 0) op('u');
    } else if (v.isList()) {
      op(']');
      auto list = v.toListRef();
      std::size_t n = 0;
      for (const auto& item : list) {
        if (n % kBatch == 0) op('(');
        const auto saved = path.size();
        path += fmt::format("[{}]", n);
        value(item, path, depth + 1);
        path.resize(saved);
        if (++n % kBatch == 0) op('e');
      }
      if (n % kBatch != 0) op('e');
    } else if (v.isTuple()) {
      const auto& elems = v.toTupleRef().elements();
      if (elems.empty()) {
        op(')');
        return;
      }
      if (tuple_needs_mark(elems.size())) mark();
      for (std::size_t i = 0; i < elems.size(); ++i) {
        const auto saved = path.size();
        path += fmt::format("[{}]", i);
        value(elems[i], path, depth + 1);
        path.resize(saved);
      }
      tuple(elems.size());
    } else {
      unsupported(path, fmt::format("values of type {} are not part of a state dict", v.tagKind()));
    }
  }

  void tensor(at::Tensor t, const std::string& path) {
    if (!t.defined()) {
      op('N');  // an undefined tensor pickles as None
      return;
    }
    if (t.layout() != c10::kStrided) unsupported(path, "only strided (dense) tensors can be saved");
    if (t.is_quantized()) unsupported(path, "quantized tensors are not supported");
    if (t.is_meta()) unsupported(path, "meta tensors have no data to save");
    if (t.is_conj() || t.is_neg()) t = t.resolve_conj().resolve_neg();
    const auto dtype = t.scalar_type();
    const char* type_name = storage_type_name(dtype);
    if (!type_name)
      unsupported(path, fmt::format("dtype {} has no torch storage type", c10::toString(dtype)));

    const at::Storage& storage = t.storage();
    const auto item = static_cast<std::int64_t>(c10::elementSize(dtype));
    const auto nbytes = static_cast<std::int64_t>(storage.nbytes());
    if (nbytes % item != 0)
      unsupported(path, fmt::format("storage of {} bytes is not a whole number of {} elements", nbytes,
                                    c10::toString(dtype)));
    const std::int64_t numel = nbytes / item;

    auto [it, fresh] = storages_.try_emplace(storage.unsafeGetStorageImpl(),
                                             StorageRec{std::to_string(storages_.size()), dtype});
    if (fresh) layout_.record_of_storage.emplace(storage.unsafeGetStorageImpl(), layout_.records.size());
    if (!fresh && it->second.dtype != dtype)
      unsupported(path, fmt::format("shares its storage with a tensor of dtype {} (saved as {}); "
                                    "torch.save refuses this too",
                                    c10::toString(it->second.dtype), c10::toString(dtype)));
    std::string location = "cpu";
    if (fresh) {
      LayoutRecord rec;
      rec.name = fmt::format("{}/data/{}", kArchivePrefix, it->second.key);
      rec.size = static_cast<std::uint64_t>(nbytes);
      if (t.device().is_cpu()) {
        rec.data = storage.data();
        layout_.storages.push_back(storage);
      } else if (defer_) {
        rec.device_source = storage;
        rec.device = t.device();
      } else {
        // Bring the whole storage to host memory; it is written as it is stored.
        auto whole = at::empty({0}, t.options()).set_(storage, 0, {numel}, {1});
        auto host = whole.to(at::kCPU);
        rec.data = host.storage().data();
        layout_.storages.push_back(host.storage());
      }
      layout_.records.push_back(std::move(rec));
    }
    if (!t.device().is_cpu()) location = t.device().str();

    global("torch._utils", "_rebuild_tensor_v2");
    op('(');
    op('(');
    str("storage");
    global("torch", type_name);
    str(it->second.key);
    str(location);
    integer(numel);
    op('t');
    op('Q');
    integer(t.storage_offset());
    int_tuple(t.sizes());
    int_tuple(t.strides());
    op(t.requires_grad() ? '\x88' : '\x89');
    global("collections", "OrderedDict");
    op(')');
    op('R');
    op('t');
    op('R');
  }

  Layout& layout_;
  bool defer_;
  std::unordered_map<const c10::StorageImpl*, StorageRec> storages_;
};

}  // namespace

std::string write_pickle(const c10::IValue& value, Layout& layout, bool defer_device_copies) {
  Pickler pickler(layout, defer_device_copies);
  return pickler.run(value);
}

}  // namespace ckpt::detail
