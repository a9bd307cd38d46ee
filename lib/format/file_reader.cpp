#include <ckpt/format.hpp>

#include "core/io.hpp"
#include "format/unpickler.hpp"
#include "format/zip.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <unordered_map>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace ckpt {

const Node* Node::find(std::string_view key) const {
  for (const auto& [k, v] : entries)
    if (k->kind == Kind::string && k->s == key) return v;
  return nullptr;
}

const char* kind_name(Node::Kind kind) {
  switch (kind) {
    case Node::Kind::none: return "None";
    case Node::Kind::boolean: return "bool";
    case Node::Kind::integer: return "int";
    case Node::Kind::real: return "float";
    case Node::Kind::string: return "str";
    case Node::Kind::list: return "list";
    case Node::Kind::tuple: return "tuple";
    case Node::Kind::dict: return "dict";
    case Node::Kind::tensor: return "tensor";
  }
  return "?";
}

namespace {

/// A private, copy-on-write mapping of the whole file, shared by the tensors
/// that point into it.
struct Mapping {
  void* base = MAP_FAILED;
  std::size_t size = 0;
  char* archive = nullptr;  // where the archive starts in the mapping
  ~Mapping() {
    if (base != MAP_FAILED) ::munmap(base, size);
  }
};

void release_mapping(void* ctx) {
  delete static_cast<std::shared_ptr<Mapping>*>(ctx);
}

}  // namespace

struct FileReader::Impl {
  std::filesystem::path path;
  ReadOptions options;
  detail::Fd fd;
  std::uint64_t file_size = 0;         // of the archive: the file's, or the slice's
  std::uint64_t base = 0;              // where the archive starts in the file
  std::optional<std::uint64_t> slice;  // the archive's length, when it is part of the file
  detail::Directory dir;
  std::unordered_map<std::string, std::size_t> by_name;
  std::string prefix;
  detail::Pickle pickle;
  std::unordered_map<std::string, at::Storage> storages;  // by key, on their target device
  std::shared_ptr<Mapping> mapping;
  std::unordered_map<const Node*, c10::IValue> converted;
  std::uint64_t bytes_read = 0;

  [[noreturn]] void corrupt(std::string_view what) const {
    throw CorruptCheckpoint(fmt::format("{}: {}", path.string(), what));
  }

  void open() {
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
    fd = detail::Fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
    if (!fd) {
      if (errno == ENOENT) throw NotFound(fmt::format("checkpoint file {} does not exist", path.string()));
      detail::throw_errno("open", path, errno);
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) detail::throw_errno("stat", path, errno);
    if (S_ISDIR(st.st_mode)) corrupt("is a directory, not a checkpoint file");
    if (!S_ISREG(st.st_mode)) corrupt("is not a regular file");
    file_size = static_cast<std::uint64_t>(st.st_size);
    if (slice) {
      if (base > file_size || *slice > file_size - base)
        corrupt(
            fmt::format("the archive at bytes [{}, {}) lies past the end of the file ({} bytes): truncated",
                        base, base + *slice, file_size));
      file_size = *slice;
    }
    if (file_size == 0) corrupt(slice ? "the archive is empty" : "the file is empty");

    unsigned char magic[4] = {};
    const std::size_t n = file_size < 4 ? file_size : 4;
    read(magic, n, 0);
    if (n < 4 || detail::get32(magic) != detail::kLocalSig) {
      if (magic[0] == 0x80)
        corrupt(
            "this is torch's legacy (pre-1.6, non-zip) serialization format, which ckpt does not read; "
            "re-save it with a current torch.save");
      corrupt("not a PyTorch checkpoint (no zip archive header)");
    }
    dir = detail::read_directory(fd.get(), file_size, path, base);
    for (std::size_t i = 0; i < dir.records.size(); ++i) by_name.emplace(dir.records[i].name, i);
    if (dir.records.empty()) corrupt("the archive has no records");

    // torch 1.x names records after the file's stem, torch 2.x "archive/": the
    // prefix is whatever comes before the first record's first '/'.
    const auto& first = dir.records.front().name;
    const auto slash = first.find('/');
    if (slash == std::string::npos || slash == 0)
      corrupt(fmt::format("record '{}' has no archive prefix", first));
    prefix = first.substr(0, slash);
    auto* pkl = find(prefix + "/data.pkl");
    if (!pkl) corrupt(fmt::format("the archive has no {}/data.pkl record", prefix));
    std::string bytes(pkl->size, '\0');
    read_record(*pkl, bytes.data(), 0, pkl->size, options.verify_crc);
    pickle =
        detail::unpickle(bytes, path, [&](const std::string& key, c10::ScalarType dtype, std::int64_t numel) {
          auto* rec = find(record_name(key));
          if (!rec) corrupt(fmt::format("record {} (a tensor's storage) is missing", record_name(key)));
          const auto item = static_cast<std::uint64_t>(c10::elementSize(dtype));
          if (rec->size % item != 0)
            corrupt(fmt::format("record {} has {} bytes, not a whole number of {}-byte {} elements",
                                rec->name, rec->size, item, c10::toString(dtype)));
          if (rec->size / item != static_cast<std::uint64_t>(numel))
            corrupt(fmt::format("record {} holds {} elements but the pickle says {}", rec->name,
                                rec->size / item, numel));
        });
  }

  std::string record_name(const std::string& key) const { return prefix + "/data/" + key; }

  RecordInfo* find(const std::string& name) {
    auto it = by_name.find(name);
    return it == by_name.end() ? nullptr : &dir.records[it->second];
  }

  void read(void* buf, std::size_t n, std::uint64_t offset) {
    detail::pread_full(fd.get(), buf, n, base + offset, path);
    bytes_read += n;
  }

  void ensure_data_offset(RecordInfo& rec) {
    if (rec.data_offset == 0) detail::read_local_header(fd.get(), rec, dir, path, base);
  }

  /// Reads bytes [from, from + n) of `rec` into `buf`; checks the CRC when the
  /// whole record was read and `check` is set.
  void read_record(RecordInfo& rec, void* buf, std::uint64_t from, std::uint64_t n, bool check) {
    ensure_data_offset(rec);
    if (from > rec.size || n > rec.size - from)
      corrupt(fmt::format("read past the end of record {}", rec.name));
    if (n > 0) read(buf, n, rec.data_offset + from);
    if (check && from == 0 && n == rec.size && detail::crc32_of(buf, n) != rec.crc32)
      corrupt(fmt::format("record {} fails its CRC-32 check (the file is damaged)", rec.name));
  }

  /// The device a storage stored at `location` goes to: only devices this
  /// build can allocate on.
  c10::Device device_for(const TensorInfo& info) const {
    std::optional<c10::Device> device;
    if (options.map_location) {
      device = options.map_location(info.location);
    } else {
      try {
        device = c10::Device(info.location);
      } catch (const std::exception&) {
        corrupt(fmt::format("storage {} has an unknown location '{}'", info.storage_key, info.location));
      }
    }
    const bool usable = device->is_cpu() || (device->is_cuda() && at::hasCUDA());
    if (!usable)
      throw Mismatch(
          fmt::format("{}: storage {} is stored on '{}', which this build cannot allocate on{}; load "
                      "it with map_location=\"cpu\"",
                      path.string(), info.storage_key, device->str(),
                      options.map_location ? " (where map_location sent it)" : ""));
    return *device;
  }

  at::Storage storage(const TensorInfo& info) {
    if (auto it = storages.find(info.storage_key); it != storages.end()) return it->second;
    RecordInfo& rec = *find(record_name(info.storage_key));
    const c10::Device device = device_for(info);
    at::Storage st;
    if (options.mmap && device.is_cpu()) {
      map_file();
      ensure_data_offset(rec);
      auto* base = mapping->archive + rec.data_offset;
      if (options.verify_crc && detail::crc32_of(base, rec.size) != rec.crc32)
        corrupt(fmt::format("record {} fails its CRC-32 check (the file is damaged)", rec.name));
      c10::DataPtr ptr(base, new std::shared_ptr<Mapping>(mapping), &release_mapping, c10::Device(c10::kCPU));
      st = at::Storage(at::Storage::use_byte_size_t(), static_cast<std::size_t>(rec.size), std::move(ptr),
                       nullptr, false);
    } else {
      st = at::Storage(at::Storage::use_byte_size_t(), static_cast<std::int64_t>(rec.size),
                       c10::GetCPUAllocator(), false);
      // data() is const from torch 2.x on; the storage is fresh and ours to fill.
      read_record(rec, const_cast<void*>(static_cast<const void*>(st.data())), 0, rec.size,
                  options.verify_crc);
      if (!device.is_cpu()) {
        auto whole = at::empty({0}, at::TensorOptions().dtype(info.dtype))
                         .set_(st, 0, {info.storage_numel}, {1})
                         .to(device);
        st = whole.storage();
      }
    }
    storages.emplace(info.storage_key, st);
    return st;
  }

  void map_file() {
    if (mapping) return;
    auto m = std::make_shared<Mapping>();
    // mmap maps from a page boundary: from the one at or before the archive.
    const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
    const std::uint64_t from = base / page * page;
    m->size = static_cast<std::size_t>(file_size + (base - from));
    m->base =
        ::mmap(nullptr, m->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd.get(), static_cast<off_t>(from));
    if (m->base == MAP_FAILED) detail::throw_errno("mmap", path, errno);
    m->archive = static_cast<char*>(m->base) + (base - from);
    mapping = std::move(m);
  }

  at::Tensor tensor(const TensorInfo& info) {
    at::Tensor t = raw_tensor(info);
    if (options.map_tensor) t = options.map_tensor(t, info.location);
    return t;
  }

  at::Tensor raw_tensor(const TensorInfo& info) {
    at::Storage st = storage(info);
    auto options = at::TensorOptions().dtype(info.dtype).device(st.device());
    auto t = at::empty({0}, options).set_(st, info.storage_offset, info.sizes, info.strides);
    if (info.requires_grad && (at::isFloatingType(info.dtype) || at::isComplexType(info.dtype)))
      t.set_requires_grad(true);
    return t;
  }

  static bool contiguous(const TensorInfo& info) {
    std::int64_t expect = 1;
    for (std::size_t d = info.sizes.size(); d-- > 0;) {
      if (info.sizes[d] != 1 && info.strides[d] != expect) return false;
      expect *= info.sizes[d];
    }
    return true;
  }

  void read_into(const TensorInfo& info, at::Tensor& target, std::string_view key) {
    if (!target.defined())
      throw Mismatch(fmt::format("{}: target for '{}' is an undefined tensor", path.string(), key));
    if (target.sizes() != c10::IntArrayRef(info.sizes) || target.scalar_type() != info.dtype)
      throw Mismatch(fmt::format("{}: '{}' is {} [{}] in the checkpoint but the target is {} [{}]",
                                 path.string(), key, c10::toString(info.dtype), fmt::join(info.sizes, ", "),
                                 c10::toString(target.scalar_type()), fmt::join(target.sizes(), ", ")));
    c10::NoGradGuard no_grad;
    const auto numel = target.numel();
    auto it = storages.find(info.storage_key);
    if (it == storages.end() && target.device().is_cpu() && target.is_contiguous() && contiguous(info) &&
        !options.mmap && numel > 0) {
      RecordInfo& rec = *find(record_name(info.storage_key));
      const auto item = static_cast<std::uint64_t>(c10::elementSize(info.dtype));
      const auto from = static_cast<std::uint64_t>(info.storage_offset) * item;
      const auto n = static_cast<std::uint64_t>(numel) * item;
      if (!options.verify_crc || (from == 0 && n == rec.size)) {
        read_record(rec, target.data_ptr(), from, n, options.verify_crc);
        return;
      }
    }
    target.copy_(raw_tensor(info));
  }

  /// Converts each node once: objects the pickle shares stay shared, as in
  /// Python (and the walk stays linear in the file's size).
  c10::IValue to_ivalue(const Node& n) {
    if (auto it = converted.find(&n); it != converted.end()) return it->second;
    c10::IValue v = convert(n);
    converted.emplace(&n, v);
    return v;
  }

  c10::IValue convert(const Node& n) {
    switch (n.kind) {
      case Node::Kind::none: return c10::IValue();
      case Node::Kind::boolean: return c10::IValue(n.b);
      case Node::Kind::integer: return c10::IValue(n.i);
      case Node::Kind::real: return c10::IValue(n.d);
      case Node::Kind::string: return c10::IValue(n.s);
      case Node::Kind::tensor: return c10::IValue(tensor(*n.tensor));
      case Node::Kind::list: {
        c10::impl::GenericList list(c10::AnyType::get());
        list.reserve(n.items.size());
        for (const Node* e : n.items) list.push_back(to_ivalue(*e));
        return c10::IValue(std::move(list));
      }
      case Node::Kind::tuple: {
        std::vector<c10::IValue> elems;
        elems.reserve(n.items.size());
        for (const Node* e : n.items) elems.push_back(to_ivalue(*e));
        return c10::IValue(c10::ivalue::Tuple::create(std::move(elems)));
      }
      case Node::Kind::dict: {
        bool all_str = true, all_int = true;
        for (const auto& [k, v] : n.entries) {
          all_str = all_str && k->kind == Node::Kind::string;
          all_int = all_int && k->kind == Node::Kind::integer;
        }
        c10::TypePtr key_type = all_str   ? c10::TypePtr(c10::StringType::get())
                                : all_int ? c10::TypePtr(c10::IntType::get())
                                          : c10::TypePtr(c10::AnyType::get());
        c10::impl::GenericDict dict(key_type, c10::AnyType::get());
        dict.reserve(n.entries.size());
        for (const auto& [k, v] : n.entries) dict.insert_or_assign(to_ivalue(*k), to_ivalue(*v));
        return c10::IValue(std::move(dict));
      }
    }
    return c10::IValue();
  }

  void verify() {
    std::uint64_t largest = 0;
    for (const auto& rec : dir.records) largest = std::max(largest, rec.size);
    std::vector<char> buf(static_cast<std::size_t>(std::min<std::uint64_t>(largest, std::uint64_t{8} << 20)));
    for (auto& rec : dir.records) {
      ensure_data_offset(rec);
      std::uint32_t crc = 0;
      for (std::uint64_t at = 0; at < rec.size;) {
        const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), rec.size - at));
        read(buf.data(), n, rec.data_offset + at);
        crc = detail::crc32_of(buf.data(), n, crc);
        at += n;
      }
      if (crc != rec.crc32)
        corrupt(fmt::format("record {} fails its CRC-32 check (stored {:08x}, computed {:08x})", rec.name,
                            rec.crc32, crc));
    }
  }
};

FileReader::FileReader(const std::filesystem::path& file, ReadOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->path = file;
  impl_->options = std::move(options);
  impl_->open();
}

FileReader::FileReader(const std::filesystem::path& file, std::uint64_t offset, std::uint64_t length,
                       ReadOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->path = file;
  impl_->options = std::move(options);
  impl_->base = offset;
  impl_->slice = length;
  impl_->open();
}

std::uint64_t FileReader::archive_offset() const {
  return impl_->base;
}
FileReader::~FileReader() = default;
FileReader::FileReader(FileReader&&) noexcept = default;
FileReader& FileReader::operator=(FileReader&&) noexcept = default;

const std::filesystem::path& FileReader::path() const {
  return impl_->path;
}
const std::string& FileReader::prefix() const {
  return impl_->prefix;
}
const Node& FileReader::root() const {
  return *impl_->pickle.root;
}
const std::vector<RecordInfo>& FileReader::records() const {
  return impl_->dir.records;
}
RecordInfo FileReader::storage_record(const TensorInfo& info) {
  RecordInfo* rec = impl_->find(impl_->record_name(info.storage_key));
  if (!rec) impl_->corrupt(fmt::format("no record holds storage {}", info.storage_key));
  impl_->ensure_data_offset(*rec);
  RecordInfo out = *rec;
  out.header_offset += impl_->base;
  out.data_offset += impl_->base;
  return out;
}

at::Tensor FileReader::tensor(const TensorInfo& info) {
  return impl_->tensor(info);
}
void FileReader::read_into(const TensorInfo& info, at::Tensor& target, std::string_view key) {
  impl_->read_into(info, target, key);
}
c10::IValue FileReader::to_ivalue(const Node& node) {
  return impl_->to_ivalue(node);
}
c10::IValue FileReader::load() {
  return impl_->to_ivalue(root());
}
void FileReader::verify() {
  impl_->verify();
}
std::uint64_t FileReader::bytes_read() const {
  return impl_->bytes_read;
}

c10::IValue read_file(const std::filesystem::path& file, const ReadOptions& options) {
  FileReader reader(file, options);
  return reader.load();
}

}  // namespace ckpt
