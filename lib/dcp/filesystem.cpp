// FileSystemWriter and FileSystemReader: PyTorch's DCP directories (one data
// file per rank of torch.save archives, aligned and CRC-checked, fsynced;
// `.metadata` pickled last), and the reading of ckpt's earlier JSON dialect.
#include <ckpt/dcp/storage.hpp>

#include <ckpt/error.hpp>
#include <ckpt/format.hpp>

#include "core/io.hpp"
#include "dcp/serialize.hpp"
#include "dcp/torch_metadata.hpp"
#include "dcp/volume.hpp"
#include "format/block_crcs.hpp"
#include "format/file_writer.hpp"
#include "format/plan_layout.hpp"
#include "format/unpickler.hpp"
#include "format/zip.hpp"

#include <ATen/core/Dict.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string_view>
#include <thread>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <zstd.h>

namespace ckpt::dcp {

namespace fs = std::filesystem;

namespace {

using detail::volume;

constexpr std::uint64_t kMaxMetadataBytes = std::uint64_t{1} << 32;

std::string fresh_token() {
  std::random_device rd;
  return fmt::format("{:08x}", static_cast<std::uint32_t>(rd()));
}

bool is_data_file(const std::string& name) {
  return name.size() > 9 && name.rfind("__", 0) == 0 && name.ends_with(".distcp");
}

/// A CPU tensor that owns exactly its bytes (the record written is its
/// storage), copied at most once.
at::Tensor exact_cpu(at::Tensor t) {
  t = t.detach();
  if (t.is_conj()) t = t.resolve_conj();
  if (t.is_neg()) t = t.resolve_neg();
  if (!t.device().is_cpu())
    return t.to(c10::kCPU, /*non_blocking=*/false, /*copy=*/false, c10::MemoryFormat::Contiguous);
  if (!t.is_contiguous()) return t.contiguous();  // a fresh storage of exactly its bytes
  if (t.storage_offset() != 0 ||
      t.storage().nbytes() != static_cast<std::size_t>(t.numel()) * t.element_size())
    return t.clone();
  return t;
}

/// Opens a regular file for reading (never a FIFO or device, whose open or
/// read could block); `follow`: through a symbolic link too. A null Fd with
/// errno set when it cannot be opened.
ckpt::detail::Fd open_regular(const fs::path& file, bool follow, std::uint64_t& size) {
  ckpt::detail::Fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | (follow ? 0 : O_NOFOLLOW)));
  if (!fd && errno == ELOOP && !follow)
    throw CorruptCheckpoint(fmt::format(
        "{} is a symbolic link; a checkpoint's data files are regular files in it", file.string()));
  if (!fd) return fd;
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) ckpt::detail::throw_errno("stat", file, errno);
  if (!S_ISREG(st.st_mode)) throw CorruptCheckpoint(fmt::format("{} is not a regular file", file.string()));
  size = static_cast<std::uint64_t>(st.st_size);
  return fd;
}

}  // namespace

// --- FileSystemWriter ------------------------------------------------------------

FileSystemWriter::FileSystemWriter(fs::path path, FileSystemWriterOptions options)
    : path_(std::move(path)), options_(options) {}

void FileSystemWriter::reset(const std::optional<fs::path>& checkpoint_id) {
  if (checkpoint_id) path_ = *checkpoint_id;
}

void FileSystemWriter::set_up_storage_writer(bool is_coordinator) {
  std::error_code ec;
  fs::create_directories(path_, ec);
  if (ec)
    throw IoError(fmt::format("cannot create checkpoint directory {}: {}", path_.string(), ec.message()));
  // What killed saves left here (temporaries, when the filesystem gave them a
  // name): only the host that wrote one can tell its writer is gone, so the
  // coordinator takes its host's, and on every other host the first local rank
  // (LOCAL_RANK 0) takes that host's data files'. One listing per host.
  const char* local_rank = std::getenv("LOCAL_RANK");
  if (is_coordinator)
    ckpt::detail::remove_stale_temporaries(path_);
  else if (local_rank && std::string_view(local_rank) == "0")
    ckpt::detail::remove_stale_temporaries(path_, "__");
}

SavePlan FileSystemWriter::prepare_local_plan(SavePlan plan) {
  return plan;
}

std::vector<SavePlan> FileSystemWriter::prepare_global_plan(std::vector<SavePlan> plans) {
  // Over a checkpoint already there, write under a fresh token: that one stays
  // whole until the new .metadata replaces it.
  std::error_code ec;
  const bool free = !fs::exists(path_ / kMetadataFileName, ec) && !ec;
  std::string token = free ? "0" : fresh_token();
  // Never a token whose files are there already (another save's, committed or not).
  const auto taken = [&](const std::string& t) {
    for (const auto& entry : fs::directory_iterator(path_, ec)) {
      const std::string name = entry.path().filename().string();
      if (is_data_file(name) && name.ends_with("_" + t + ".distcp")) return true;
    }
    return false;
  };
  if (!free)
    while (taken(token)) token = fresh_token();
  for (std::size_t r = 0; r < plans.size(); ++r) plans[r].storage_data = fmt::format("__{}_{}", r, token);
  return plans;
}

std::future<std::vector<WriteResult>> FileSystemWriter::write_data(const SavePlan& plan,
                                                                   SavePlanner& planner) {
  std::promise<std::vector<WriteResult>> done;
  try {
    std::vector<WriteResult> results;
    if (!plan.items.empty()) {
      if (plan.storage_data.empty() || plan.storage_data.find('/') != std::string::npos)
        throw Error("the save plan names no data file (prepare_global_plan was not run on it)");
      const std::string name = plan.storage_data + ".distcp";
      // Each item is a torch.save archive of its own: the tensor chunk (a
      // storage of exactly its bytes) or the value. Items are resolved one at
      // a time as their turn comes, so a planner that produces its data on
      // demand (ckpt convert) keeps one item in memory.
      std::vector<std::uint64_t> data_bytes(plan.items.size(), 0);
      const auto make = [&](std::size_t i) {
        const WriteItem& item = plan.items[i];
        c10::IValue data = planner.resolve_data(item);
        if (item.type != WriteItemType::bytes) {
          if (!data.isTensor())
            throw Error(fmt::format("resolve_data gave no tensor for '{}'", detail::item_name(item.index)));
          at::Tensor t = exact_cpu(data.toTensor());
          if (item.tensor_data && (t.sizes().vec() != item.tensor_data->chunk.sizes ||
                                   t.scalar_type() != item.tensor_data->properties.dtype))
            throw Mismatch(
                fmt::format("'{}' is not the chunk its plan describes", detail::item_name(item.index)));
          data = t;
        }
        ckpt::detail::Archive archive;
        if (const OpaqueValue* opaque = as_opaque(data)) {
          archive.raw = &opaque->archive;  // written as it was read
          archive.keep = data;
        } else {
          archive.layout = ckpt::detail::plan_layout(data);
          for (const auto& rec : archive.layout.records)
            if (rec.name.find("/data/") != std::string::npos) data_bytes[i] += rec.size;
        }
        return archive;
      };
      const auto extents = ckpt::detail::write_archives(
          path_ / name, plan.items.size(), make,
          WriteOptions{.direct_io = options_.direct_io, .fsync = options_.sync_files});
      for (std::size_t i = 0; i < plan.items.size(); ++i)
        results.push_back(
            WriteResult{plan.items[i].index, data_bytes[i],
                        StorageInfo{name, extents[i].offset, extents[i].length, 0, /*archive=*/true, {}}});
    }
    done.set_value(std::move(results));
  } catch (...) {
    done.set_exception(std::current_exception());
  }
  return done.get_future();
}

void FileSystemWriter::finish(const Metadata& metadata,
                              const std::vector<std::vector<WriteResult>>& results) {
  CheckpointMetadata out{metadata, {}};
  std::set<std::string> files;
  for (const auto& rank_results : results)
    for (const auto& r : rank_results) {
      out.storage_data[r.index] = r.storage_data;
      files.insert(r.storage_data.relative_path);
    }
  // Every chunk the metadata lists was written somewhere.
  for (const auto& [fqn, sm] : metadata.state_dict_metadata) {
    if (const auto* t = std::get_if<TensorStorageMetadata>(&sm)) {
      for (const auto& c : t->chunks)
        if (!out.storage_data.count(MetadataIndex{fqn, c.offsets, std::nullopt}))
          throw Error(
              fmt::format("no rank wrote the chunk of '{}' at [{}]", fqn, fmt::join(c.offsets, ", ")));
    } else if (!out.storage_data.count(MetadataIndex{fqn, std::nullopt, std::nullopt})) {
      throw Error(fmt::format("no rank wrote the value of '{}'", fqn));
    }
  }
  if (!out.metadata.storage_meta)
    out.metadata.storage_meta =
        StorageMeta{fs::absolute(path_).lexically_normal().string(), fresh_token(), ""};
  const std::string text = detail::encode_torch_metadata(out, options_.dialect);
  ckpt::detail::write_durably(path_ / kMetadataFileName,
                              WriteOptions{.direct_io = false, .fsync = options_.sync_files},
                              [&](int fd, bool, const fs::path& temp) {
                                ckpt::detail::pwrite_full(fd, text.data(), text.size(), 0, temp);
                                return static_cast<std::uint64_t>(text.size());
                              });
  // The checkpoint this one replaced: its data files are garbage now.
  // (Committed now: nothing below may fail the save.)
  std::error_code ec;
  for (fs::directory_iterator it(path_, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::error_code rm;
    if (is_data_file(name) && !files.count(name)) fs::remove(it->path(), rm);
  }
}

bool FileSystemWriter::validate_checkpoint_id(const fs::path& checkpoint_id) const {
  std::error_code ec;
  return !checkpoint_id.empty() && (!fs::exists(checkpoint_id, ec) || fs::is_directory(checkpoint_id, ec));
}

// --- FileSystemReader ------------------------------------------------------------

CheckpointMetadata read_checkpoint_metadata(const fs::path& directory) {
  const fs::path file = directory / kMetadataFileName;
  std::uint64_t size = 0;
  ckpt::detail::Fd fd = open_regular(file, true, size);
  if (!fd) {
    if (errno == ENOENT)
      throw NotFound(
          fmt::format("{} holds no DCP checkpoint (no {})", directory.string(), kMetadataFileName));
    ckpt::detail::throw_errno("open", file, errno);
  }
  if (size > kMaxMetadataBytes)
    throw CorruptCheckpoint(fmt::format("{}: {} bytes is too large", file.string(), size));
  std::string text(size, '\0');
  ckpt::detail::pread_full(fd.get(), text.data(), text.size(), 0, file);
  if (detail::is_torch_metadata(text)) return detail::decode_torch_metadata(text, file.string());
  return detail::decode_checkpoint_metadata(text, file.string());
}

FileSystemReader::FileSystemReader(fs::path path, FileSystemReaderOptions options)
    : path_(std::move(path)), options_(options) {
  if (options_.read_threads < 1) throw Error("FileSystemReaderOptions::read_threads must be at least 1");
  if (options_.read_size < 4096) throw Error("FileSystemReaderOptions::read_size must be at least 4096");
}

void FileSystemReader::reset(const std::optional<fs::path>& checkpoint_id) {
  if (checkpoint_id) path_ = *checkpoint_id;
}

CheckpointMetadata FileSystemReader::read_metadata() {
  auto md = read_checkpoint_metadata(path_);
  std::error_code ec;
  bytes_read_ += fs::file_size(path_ / kMetadataFileName, ec);
  return md;
}

void FileSystemReader::set_up_storage_reader(const CheckpointMetadata& metadata, bool) {
  metadata_ = metadata;
}

LoadPlan FileSystemReader::prepare_local_plan(LoadPlan plan) {
  return plan;
}

std::vector<LoadPlan> FileSystemReader::prepare_global_plan(std::vector<LoadPlan> plans) {
  return plans;
}

namespace {

struct OpenFile {
  fs::path path;
  ckpt::detail::Fd fd;
  std::uint64_t size = 0;
  /// Its table of block CRC-32s, once looked for (empty: it has none).
  std::optional<std::vector<ckpt::detail::BlockCrcs>> blocks;
  bool blocks_read = false;
  std::unique_ptr<FileReader> archive;  // only when a value is read from it
  /// The torch.save archives of PyTorch's DCP items, by offset, once opened.
  std::map<std::uint64_t, std::unique_ptr<FileReader>> items;
  /// Decompressed archives of transformed items (anonymous memory files), by offset.
  std::map<std::uint64_t, std::pair<ckpt::detail::Fd, std::uint64_t>> plain;
};

/// The bytes [offset, offset + length) of `fd`, one zstd stream (upstream's
/// "stream.zstd/1" transform), decompressed into an anonymous memory file; at
/// most `limit` bytes. Returns it and its size. CorruptCheckpoint names `what`
/// when the stream is damaged, truncated or larger than the limit.
std::pair<ckpt::detail::Fd, std::uint64_t> decompressed(int fd, const fs::path& file, std::uint64_t offset,
                                                        std::uint64_t length, std::uint64_t limit,
                                                        const std::string& what) {
  const auto bad = [&](const std::string& why) {
    return CorruptCheckpoint(fmt::format("{}: the zstd stream of '{}': {}", file.string(), what, why));
  };
  ckpt::detail::Fd out(::memfd_create("ckpt-zstd-item", MFD_CLOEXEC));
  if (!out) ckpt::detail::throw_errno("memfd_create for", file, errno);
  std::unique_ptr<ZSTD_DStream, decltype(&ZSTD_freeDStream)> stream(ZSTD_createDStream(), &ZSTD_freeDStream);
  if (!stream) throw IoError("out of memory for a zstd stream");
  ZSTD_initDStream(stream.get());
  std::vector<char> in(ZSTD_DStreamInSize()), buf(ZSTD_DStreamOutSize());
  std::uint64_t done = 0, written = 0;
  std::size_t last = 1;
  while (done < length) {
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(in.size(), length - done));
    ckpt::detail::pread_full(fd, in.data(), n, offset + done, file);
    done += n;
    ZSTD_inBuffer input{in.data(), n, 0};
    while (input.pos < input.size) {
      ZSTD_outBuffer output{buf.data(), buf.size(), 0};
      last = ZSTD_decompressStream(stream.get(), &output, &input);
      if (ZSTD_isError(last)) throw bad(ZSTD_getErrorName(last));
      if (written + output.pos > limit)
        throw bad(fmt::format("it holds more than the {} bytes its item can be", limit));
      ckpt::detail::pwrite_full(out.get(), buf.data(), output.pos, written, file);
      written += output.pos;
    }
  }
  if (last != 0) throw bad("it ends before its frame does (truncated)");
  return {std::move(out), written};
}

/// Whether `strides` lay `sizes` out row-major without gaps (dims of size 1
/// may have any stride; an empty tensor is laid out any way).
bool row_major(const std::vector<std::int64_t>& sizes, const std::vector<std::int64_t>& strides) {
  if (sizes.size() != strides.size()) return false;
  std::int64_t expect = 1;
  for (std::size_t d = sizes.size(); d-- > 0;) {
    if (sizes[d] == 0) return true;
    if (sizes[d] != 1 && strides[d] != expect) return false;
    expect *= sizes[d];
  }
  return true;
}

/// The saved chunk a read item names, checked against its storage.
const ChunkStorageMetadata& saved_chunk(const CheckpointMetadata& md, const MetadataIndex& index) {
  const auto it = md.metadata.state_dict_metadata.find(index.fqn);
  const auto* t =
      it == md.metadata.state_dict_metadata.end() ? nullptr : std::get_if<TensorStorageMetadata>(&it->second);
  if (!t || !index.offset) throw Error(fmt::format("no saved tensor '{}'", index.fqn));
  if (index.index && *index.index >= 0 && static_cast<std::size_t>(*index.index) < t->chunks.size() &&
      t->chunks[static_cast<std::size_t>(*index.index)].offsets == *index.offset)
    return t->chunks[static_cast<std::size_t>(*index.index)];
  for (const auto& c : t->chunks)
    if (c.offsets == *index.offset) return c;
  throw Error(fmt::format("no saved chunk of '{}' at [{}]", index.fqn, fmt::join(*index.offset, ", ")));
}

/// Ranges of a read, `count` of `bytes` bytes each: the first at `offset` in
/// the file, the next ones `stride` bytes further each; into memory one after
/// the other from `out` on.
struct ReadPart {
  std::uint64_t offset = 0;
  char* out = nullptr;
  std::size_t bytes = 0;
  std::size_t count = 1;
  std::uint64_t stride = 0;
};

/// Reads that one thread does in a row, from one file.
struct ReadTask {
  int fd = -1;
  const fs::path* file = nullptr;
  std::vector<ReadPart> parts;
  /// When set: the CRC-32 of the bytes read (parts of one range each).
  std::uint32_t* crc = nullptr;
  /// When set: the block CRC-32s of the record the parts lie in; every range
  /// is read widened to whole blocks, and each block checked.
  const ckpt::detail::BlockCrcs* blocks = nullptr;
  const ReadItem* item = nullptr;  ///< what the parts are of (for errors)
};

struct ReadCounts {
  std::uint64_t bytes = 0, calls = 0;
};

/// Reads the bytes [from, to) of `task`'s file, widened to the whole blocks
/// of its record that hold them, and checks every block against its CRC-32.
/// With `out`, the bytes asked for go straight there and only the widening
/// into `scratch`; without, all of it goes into `scratch`. Returns where
/// `from`'s byte is.
const char* read_checked(const ReadTask& task, std::uint64_t from, std::uint64_t to, char* out,
                         std::vector<char>& scratch, ReadCounts& counts) {
  using ckpt::detail::kCrcBlock;
  const ckpt::detail::BlockCrcs& b = *task.blocks;
  const std::uint64_t first = (from - b.data_offset) / kCrcBlock;
  const std::uint64_t lo = b.data_offset + first * kCrcBlock;
  const std::uint64_t hi = std::min(
      b.data_offset + (to - b.data_offset + kCrcBlock - 1) / kCrcBlock * kCrcBlock, b.data_offset + b.size);
  // What was read, in file order: [lo, from), [from, to), [to, hi).
  std::array<std::pair<const char*, std::size_t>, 3> pieces;
  if (out) {
    const auto head = static_cast<std::size_t>(from - lo), tail = static_cast<std::size_t>(hi - to);
    if (scratch.size() < head + tail) scratch.resize(head + tail);
    pieces = {
        {{scratch.data(), head}, {out, static_cast<std::size_t>(to - from)}, {scratch.data() + head, tail}}};
    std::array<iovec, 3> iov{};
    int n = 0;
    for (const auto& [p, len] : pieces)
      if (len > 0) iov[static_cast<std::size_t>(n++)] = {const_cast<char*>(p), len};
    ckpt::detail::preadv_full(task.fd, iov.data(), n, lo, *task.file);
  } else {
    const auto n = static_cast<std::size_t>(hi - lo);
    if (scratch.size() < n) scratch.resize(n);
    ckpt::detail::pread_full(task.fd, scratch.data(), n, lo, *task.file);
    pieces = {{{scratch.data(), n}, {nullptr, 0}, {nullptr, 0}}};
  }
  counts.bytes += hi - lo;
  ++counts.calls;
  std::size_t piece = 0, in_piece = 0;
  for (std::uint64_t at = lo, block = first; at < hi; at += kCrcBlock, ++block) {
    const auto len = static_cast<std::size_t>(std::min(kCrcBlock, hi - at));
    std::uint32_t crc = 0;
    for (std::size_t left = len; left > 0;) {
      while (in_piece == pieces[piece].second) {
        ++piece;
        in_piece = 0;
      }
      const std::size_t n = std::min(left, pieces[piece].second - in_piece);
      crc = ckpt::detail::crc32_of(pieces[piece].first + in_piece, n, crc);
      in_piece += n;
      left -= n;
    }
    if (crc != b.crcs[static_cast<std::size_t>(block)])
      throw CorruptCheckpoint(
          fmt::format("{}: chunk '{}': block {} of its record (bytes [{}, {}) of the file) fails its CRC-32: "
                      "the data is not what was saved",
                      task.file->string(), detail::item_name(task.item->storage_index), block, at, at + len));
  }
  return out ? out : scratch.data() + (from - lo);
}

/// Runs one task. The ranges of a part at most `coalesce_gap` apart are read
/// together: small ones (a column of narrow rows) by one read of their span
/// into scratch memory and copies out of it (cheaper than the kernel's cost
/// per buffer), larger ones by vectored reads of up to 1,024 buffers, the
/// gaps into scratch memory. Other ranges are read one by one.
void run_read_task(const ReadTask& task, std::size_t coalesce_gap, std::vector<char>& scratch,
                   ReadCounts& counts) {
  constexpr std::size_t kSmallRange = 4096, kRangesPerCall = 512;  // 1,023 buffers
  std::uint32_t crc = 0;
  std::vector<iovec> iov;
  if (task.blocks) {
    // Checked reads, each range widened to blocks: a range on its own read
    // straight into its place, the widening into scratch memory; ranges less
    // than a block apart (they share blocks) read as one span into scratch
    // memory and copied out.
    const std::uint64_t join = std::max<std::uint64_t>(coalesce_gap, ckpt::detail::kCrcBlock);
    for (const ReadPart& p : task.parts) {
      const std::uint64_t gap = p.count > 1 ? p.stride - p.bytes : 0;
      if (p.count == 1 || gap > join) {
        for (std::size_t r = 0; r < p.count; ++r) {
          const std::uint64_t at = p.offset + r * p.stride;
          read_checked(task, at, at + p.bytes, p.out + r * p.bytes, scratch, counts);
        }
      } else {
        const char* src = read_checked(task, p.offset, p.offset + (p.count - 1) * p.stride + p.bytes, nullptr,
                                       scratch, counts);
        for (std::size_t r = 0; r < p.count; ++r)
          std::memcpy(p.out + r * p.bytes, src + r * p.stride, p.bytes);
      }
    }
    return;
  }
  for (const ReadPart& p : task.parts) {
    const std::uint64_t gap = p.count > 1 ? p.stride - p.bytes : 0;
    if (p.count == 1 || gap > coalesce_gap) {
      for (std::size_t r = 0; r < p.count; ++r) {
        char* to = p.out + r * p.bytes;
        ckpt::detail::pread_full(task.fd, to, p.bytes, p.offset + r * p.stride, *task.file);
        if (task.crc) crc = ckpt::detail::crc32_of(to, p.bytes, crc);
        counts.bytes += p.bytes;
        ++counts.calls;
      }
      continue;
    }
    if (p.bytes < kSmallRange) {
      const auto span = static_cast<std::size_t>((p.count - 1) * p.stride + p.bytes);
      if (scratch.size() < span) scratch.resize(span);
      ckpt::detail::pread_full(task.fd, scratch.data(), span, p.offset, *task.file);
      for (std::size_t r = 0; r < p.count; ++r)
        std::memcpy(p.out + r * p.bytes, scratch.data() + r * p.stride, p.bytes);
      counts.bytes += span;
      ++counts.calls;
      continue;
    }
    // Every gap is read into the same scratch bytes: they are thrown away.
    if (scratch.size() < gap) scratch.resize(static_cast<std::size_t>(gap));
    for (std::size_t r = 0; r < p.count; r += kRangesPerCall) {
      const std::size_t n = std::min(kRangesPerCall, p.count - r);
      iov.clear();
      for (std::size_t q = r; q < r + n; ++q) {
        if (q > r) iov.push_back({scratch.data(), static_cast<std::size_t>(gap)});
        iov.push_back({p.out + q * p.bytes, p.bytes});
      }
      ckpt::detail::preadv_full(task.fd, iov.data(), static_cast<int>(iov.size()), p.offset + r * p.stride,
                                *task.file);
      counts.bytes += (n - 1) * p.stride + p.bytes;
      ++counts.calls;
    }
  }
  if (task.crc) *task.crc = crc;
}

/// Runs `tasks` on up to `threads` threads, the caller's among them; the first
/// failure stops the rest and is rethrown.
ReadCounts run_read_tasks(const std::vector<ReadTask>& tasks, int threads, std::size_t coalesce_gap) {
  ReadCounts total;
  if (tasks.empty()) return total;
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex mutex;
  const auto work = [&] {
    std::vector<char> scratch;
    ReadCounts counts;
    try {
      for (std::size_t i; !failed && (i = next++) < tasks.size();)
        run_read_task(tasks[i], coalesce_gap, scratch, counts);
    } catch (...) {
      failed = true;
      std::lock_guard lock(mutex);
      if (!error) error = std::current_exception();
    }
    std::lock_guard lock(mutex);
    total.bytes += counts.bytes;
    total.calls += counts.calls;
  };
  {
    std::vector<std::jthread> pool;  // joined when it goes, also when a thread cannot be made
    const auto extra = std::min<std::size_t>(static_cast<std::size_t>(threads), tasks.size()) - 1;
    for (std::size_t t = 0; t < extra; ++t) pool.emplace_back(work);
    work();
  }
  if (error) std::rethrow_exception(error);
  return total;
}

/// A tensor item whose reads are queued: committed to the planner once they
/// are done and its CRC-32 (when it was read whole) is checked.
struct PendingTensor {
  const ReadItem* item = nullptr;
  at::Tensor dest, target;
  std::optional<std::uint32_t> whole_crc;
  std::vector<std::pair<const std::uint32_t*, std::uint64_t>> pieces;  ///< CRC-32 and length, in order
  const fs::path* file = nullptr;
};

}  // namespace

std::future<void> FileSystemReader::read_data(const LoadPlan& plan, LoadPlanner& planner) {
  std::promise<void> done;
  try {
    std::map<std::string, OpenFile> files;
    const auto open = [&](const std::string& name) -> OpenFile& {
      auto it = files.find(name);
      if (it != files.end()) return it->second;
      const fs::path file = path_ / name;
      OpenFile f;
      f.path = file;
      f.fd = open_regular(file, false, f.size);
      if (!f.fd) {
        if (errno == ENOENT)
          throw CorruptCheckpoint(fmt::format("{}: data file {} is missing", path_.string(), name));
        ckpt::detail::throw_errno("open", file, errno);
      }
      return files.emplace(name, std::move(f)).first->second;
    };
    // Tensor data is read in batches: the reads of a batch's items are queued
    // as tasks and run on the reader's threads, then each item's CRC-32 is
    // checked and it is committed. A batch ends at kBatchBytes, which bounds
    // the memory of targets that are not their destination.
    constexpr std::uint64_t kBatchBytes = std::uint64_t{512} << 20;
    std::vector<ReadTask> tasks;
    std::deque<std::uint32_t> crcs;  // the pieces' CRC-32s (stable addresses)
    std::vector<PendingTensor> pending;
    std::uint64_t batch_bytes = 0;
    const auto run_batch = [&] {
      const ReadCounts counts = run_read_tasks(tasks, options_.read_threads, options_.coalesce_gap);
      bytes_read_ += counts.bytes;
      data_reads_ += counts.calls;
      for (auto& p : pending) {
        if (p.whole_crc) {
          std::uint32_t crc = 0;
          for (const auto& [piece, length] : p.pieces) crc = ckpt::detail::crc32_combine(crc, *piece, length);
          if (crc != *p.whole_crc)
            throw CorruptCheckpoint(
                fmt::format("{}: chunk '{}': CRC-32 mismatch: the data is not what was saved",
                            p.file->string(), detail::item_name(p.item->storage_index)));
        }
        if (!p.target.is_same(p.dest)) p.dest.copy_(p.target);
        planner.commit_tensor(*p.item, p.dest);
      }
      tasks.clear();
      crcs.clear();
      pending.clear();
      batch_bytes = 0;
    };
    for (const auto& item : plan.items) {
      const auto info_it = metadata_.storage_data.find(item.storage_index);
      if (info_it == metadata_.storage_data.end())
        throw CorruptCheckpoint(fmt::format("{}: the metadata says nowhere where '{}' is stored",
                                            path_.string(), detail::item_name(item.storage_index)));
      const StorageInfo& info = info_it->second;
      OpenFile& file = open(info.relative_path);
      const fs::path file_path = path_ / info.relative_path;

      // PyTorch's items are whole torch.save archives at [offset, offset + length)
      // (after their transforms: zstd, decompressed into memory).
      const auto plain_archive = [&]() -> const std::pair<ckpt::detail::Fd, std::uint64_t>* {
        if (info.transforms.empty()) return nullptr;
        auto it = file.plain.find(info.offset);
        if (it == file.plain.end()) {
          std::uint64_t limit = std::uint64_t{1} << 32;  // a value's archive
          if (item.type == LoadItemType::tensor) {
            const auto& tmd = std::get<TensorStorageMetadata>(
                metadata_.metadata.state_dict_metadata.at(item.storage_index.fqn));
            limit = static_cast<std::uint64_t>(volume(saved_chunk(metadata_, item.storage_index).sizes)) *
                        c10::elementSize(tmd.properties.dtype) +
                    (std::uint64_t{16} << 20);
          }
          it = file.plain
                   .emplace(info.offset, decompressed(file.fd.get(), file_path, info.offset, info.length,
                                                      limit, detail::item_name(item.storage_index)))
                   .first;
          bytes_read_ += info.length;
        }
        return &it->second;
      };
      const auto item_archive = [&]() -> FileReader& {
        if (info.offset > file.size || info.length > file.size - info.offset)
          throw CorruptCheckpoint(fmt::format(
              "{}: item '{}' at bytes [{}, {}) lies past the end of the file ({} bytes): truncated",
              file_path.string(), detail::item_name(item.storage_index), info.offset,
              info.offset + info.length, file.size));
        auto& slot = file.items[info.offset];
        if (!slot) {
          if (const auto* plain = plain_archive())
            slot = std::make_unique<FileReader>(fmt::format("/proc/self/fd/{}", plain->first.get()), 0,
                                                plain->second, ReadOptions{.verify_crc = true});
          else
            slot = std::make_unique<FileReader>(file_path, info.offset, info.length,
                                                ReadOptions{.verify_crc = true});
          bytes_read_ += slot->bytes_read();
        }
        return *slot;
      };

      if (item.type == LoadItemType::bytes && info.archive) {
        c10::IValue value;
        try {
          FileReader& archive = item_archive();
          const std::uint64_t before = archive.bytes_read();
          value = archive.to_ivalue(archive.root());
          bytes_read_ += archive.bytes_read() - before;
        } catch (const ckpt::detail::RefusedGlobal& e) {
          // A Python object ckpt does not unpickle: kept as its archive's bytes.
          const auto* plain = plain_archive();
          OpaqueValue opaque{item.storage_index.fqn, std::string(plain ? plain->second : info.length, '\0'),
                             e.what()};
          ckpt::detail::pread_full(plain ? plain->first.get() : file.fd.get(), opaque.archive.data(),
                                   opaque.archive.size(), plain ? 0 : info.offset, file_path);
          bytes_read_ += plain ? 0 : info.length;
          value = opaque_value(std::move(opaque));
        }
        planner.load_value(item, std::move(value));
        continue;
      }
      if (item.type == LoadItemType::bytes) {
        std::uint64_t before = 0;  // a fresh reader's count includes its headers
        if (file.archive)
          before = file.archive->bytes_read();
        else
          file.archive = std::make_unique<FileReader>(file_path);
        const Node* node = file.archive->root().find(detail::item_name(item.storage_index));
        if (!node)
          throw CorruptCheckpoint(fmt::format("{}: holds no value '{}'", file_path.string(),
                                              detail::item_name(item.storage_index)));
        c10::IValue value = file.archive->to_ivalue(*node);
        bytes_read_ += file.archive->bytes_read() - before;
        planner.load_value(item, std::move(value));
        continue;
      }

      const auto& chunk = saved_chunk(metadata_, item.storage_index);
      const auto& tmd =
          std::get<TensorStorageMetadata>(metadata_.metadata.state_dict_metadata.at(item.storage_index.fqn));
      const std::size_t elem = c10::elementSize(tmd.properties.dtype);
      const auto dims = chunk.sizes.size();
      const auto bad = [&](const std::string& why) {
        return CorruptCheckpoint(fmt::format("{}: chunk '{}': {}", file_path.string(),
                                             detail::item_name(item.storage_index), why));
      };
      if (item.storage_offsets.size() != dims || item.lengths.size() != dims)
        throw Error(fmt::format("read item for '{}' has the wrong number of dims", item.storage_index.fqn));
      for (std::size_t d = 0; d < dims; ++d)
        if (item.storage_offsets[d] < 0 || item.lengths[d] < 0 ||
            item.storage_offsets[d] + item.lengths[d] > chunk.sizes[d])
          throw Error(fmt::format("read item for '{}' lies outside its saved chunk", item.storage_index.fqn));
      const std::uint64_t chunk_bytes = static_cast<std::uint64_t>(volume(chunk.sizes)) * elem;
      // Where the chunk's bytes start in the file, and the CRC-32 they have
      // when read whole (if one covers exactly them).
      std::uint64_t data_start = info.offset;
      int data_fd = file.fd.get();  // where data_start is: the file, or a transformed item's plain archive
      std::optional<std::uint32_t> whole_crc;
      std::uint64_t record_offset = 0, record_size = 0;  // of the storage record (archives)
      if (info.archive) {
        FileReader& archive = item_archive();
        if (const auto* plain = plain_archive()) data_fd = plain->first.get();
        const Node& root = archive.root();
        if (root.kind != Node::Kind::tensor || !root.tensor)
          throw bad(fmt::format("the item's archive holds a {}, not a tensor", kind_name(root.kind)));
        const TensorInfo& t = *root.tensor;
        if (t.dtype != tmd.properties.dtype || t.sizes != chunk.sizes)
          throw bad(fmt::format("the item is a {} {} tensor, the metadata says {} {}", c10::toString(t.dtype),
                                fmt::join(t.sizes, "x"), c10::toString(tmd.properties.dtype),
                                fmt::join(chunk.sizes, "x")));
        if (!row_major(t.sizes, t.strides)) {
          // Saved as a strided view (torch writes a view whole when it spans
          // its storage): read the tensor, copy out the part asked for.
          const std::uint64_t before = archive.bytes_read();
          at::Tensor src = archive.tensor(t);
          bytes_read_ += archive.bytes_read() - before;
          for (std::size_t d = 0; d < dims; ++d)
            src = src.narrow(static_cast<std::int64_t>(d), item.storage_offsets[d], item.lengths[d]);
          at::Tensor dest = planner.resolve_tensor(item);
          if (dest.sizes() != src.sizes() || dest.scalar_type() != src.scalar_type())
            throw Mismatch(fmt::format("resolve_tensor for '{}' gave a {} {} tensor, not {} {}",
                                       item.dest_index.fqn, c10::toString(dest.scalar_type()),
                                       fmt::join(dest.sizes(), "x"), c10::toString(src.scalar_type()),
                                       fmt::join(src.sizes(), "x")));
          dest.copy_(src);
          planner.commit_tensor(item, dest);
          continue;
        }
        const std::uint64_t before = archive.bytes_read();
        const RecordInfo rec = archive.storage_record(t);
        bytes_read_ += archive.bytes_read() - before;
        const std::uint64_t skip = static_cast<std::uint64_t>(t.storage_offset) * elem;
        if (skip > rec.size || chunk_bytes > rec.size - skip)
          throw bad(fmt::format("the tensor reaches past its storage record of {} bytes", rec.size));
        data_start = rec.data_offset + skip;
        record_offset = rec.data_offset;
        record_size = rec.size;
        if (skip == 0 && chunk_bytes == rec.size) whole_crc = rec.crc32;
      } else {
        if (info.length != chunk_bytes)
          throw bad(fmt::format("{} bytes stored for a chunk of {} bytes", info.length, chunk_bytes));
        if (info.offset > file.size || info.length > file.size - info.offset)
          throw bad(fmt::format("bytes [{}, {}) lie past the end of the file ({} bytes): truncated",
                                info.offset, info.offset + info.length, file.size));
        whole_crc = info.crc32;
      }

      at::Tensor dest = planner.resolve_tensor(item);
      if (!dest.device().is_cpu() || dest.sizes().vec() != item.lengths ||
          dest.scalar_type() != tmd.properties.dtype)
        throw Mismatch(fmt::format("resolve_tensor for '{}' gave a {} {} tensor on {}, not {} {} on the CPU",
                                   item.dest_index.fqn, c10::toString(dest.scalar_type()),
                                   fmt::join(dest.sizes(), "x"), dest.device().str(),
                                   c10::toString(tmd.properties.dtype), fmt::join(item.lengths, "x")));
      if (chunk_bytes == 0) {  // nothing to read (and strides of other dims may not fit)
        planner.commit_tensor(item, dest);
        continue;
      }
      at::Tensor target = dest.is_contiguous() ? dest : at::empty(dest.sizes(), dest.options());
      auto* out = static_cast<char*>(target.data_ptr());

      // The region is a set of ranges, contiguous in the saved chunk: the dims
      // after the last one not read whole (k) are read whole. The ranges
      // along dim k - 1 lie a fixed stride apart: one part each.
      std::ptrdiff_t k = static_cast<std::ptrdiff_t>(dims) - 1;
      while (k >= 0 && item.storage_offsets[static_cast<std::size_t>(k)] == 0 &&
             item.lengths[static_cast<std::size_t>(k)] == chunk.sizes[static_cast<std::size_t>(k)])
        --k;
      std::vector<std::int64_t> stride(dims, 1);
      for (std::ptrdiff_t d = static_cast<std::ptrdiff_t>(dims) - 2; d >= 0; --d)
        stride[static_cast<std::size_t>(d)] =
            stride[static_cast<std::size_t>(d) + 1] * chunk.sizes[static_cast<std::size_t>(d) + 1];
      const auto uk = static_cast<std::size_t>(std::max<std::ptrdiff_t>(k, 0));
      const std::size_t range_bytes =
          static_cast<std::size_t>(k < 0 ? volume(chunk.sizes) : item.lengths[uk] * stride[uk]) * elem;
      // Dims [0, k - 1) are walked; dim k - 1 (when k > 0) is each part's ranges.
      const std::size_t walked = k > 0 ? uk - 1 : 0;
      const std::size_t per_part = k > 0 ? static_cast<std::size_t>(item.lengths[uk - 1]) : 1;
      const std::uint64_t part_stride = k > 0 ? static_cast<std::uint64_t>(stride[uk - 1]) * elem : 0;
      std::int64_t parts = 1;
      for (std::size_t d = 0; d < walked; ++d) parts *= item.lengths[d];
      std::vector<std::int64_t> at(walked, 0);

      PendingTensor p{&item, dest, target, std::nullopt, {}, &file.path};
      if (k < 0 && whole_crc && chunk_bytes > 0) p.whole_crc = whole_crc;
      // A part of a record, read from the file itself: checked block by
      // block where the file has a table of block CRC-32s (ckpt's writers
      // keep one; PyTorch's do not).
      const ckpt::detail::BlockCrcs* blocks = nullptr;
      if (!p.whole_crc && info.archive && data_fd == file.fd.get() && options_.verify_blocks &&
          chunk_bytes > 0) {
        if (!file.blocks_read) {
          std::uint64_t n = 0;
          file.blocks = ckpt::detail::read_block_table(file.fd.get(), file.size, file.path, n);
          file.blocks_read = true;
          bytes_read_ += n;
        }
        if (file.blocks) {
          const auto& table = *file.blocks;
          const auto it = std::lower_bound(table.begin(), table.end(), record_offset,
                                           [](const auto& e, std::uint64_t v) { return e.data_offset < v; });
          if (it == table.end() || it->data_offset != record_offset || it->size != record_size)
            throw bad(fmt::format("the file's table of block CRC-32s has no entry for its record at byte {}",
                                  record_offset));
          blocks = &*it;
        }
      }
      const std::size_t piece = options_.read_size;
      ReadTask task{data_fd, &file.path, {}, nullptr, blocks, &item};
      std::uint64_t task_bytes = 0;
      const auto queue = [&] {
        if (!task.parts.empty()) tasks.push_back(std::move(task));
        task = ReadTask{data_fd, &file.path, {}, nullptr, blocks, &item};
        task_bytes = 0;
      };
      for (std::int64_t n = 0; n < parts && range_bytes > 0 && per_part > 0; ++n) {
        std::int64_t start = k >= 0 ? item.storage_offsets[uk] * stride[uk] : 0;
        if (k > 0) start += item.storage_offsets[uk - 1] * stride[uk - 1];
        for (std::size_t d = 0; d < walked; ++d) start += (item.storage_offsets[d] + at[d]) * stride[d];
        const std::uint64_t offset = data_start + static_cast<std::uint64_t>(start) * elem;
        if (range_bytes >= piece) {
          // Long ranges: pieces of their own, each (when the chunk is read
          // whole) with its CRC-32.
          for (std::size_t r = 0; r < per_part; ++r)
            for (std::size_t done_bytes = 0; done_bytes < range_bytes; done_bytes += piece) {
              const std::size_t len = std::min(piece, range_bytes - done_bytes);
              tasks.push_back(ReadTask{data_fd,
                                       &file.path,
                                       {{offset + r * part_stride + done_bytes, out + done_bytes, len}},
                                       nullptr,
                                       blocks,
                                       &item});
              if (p.whole_crc) {
                tasks.back().crc = &crcs.emplace_back(0);
                p.pieces.emplace_back(tasks.back().crc, len);
              }
              if (done_bytes + len == range_bytes) out += range_bytes;
            }
        } else {
          // Parts of at most `piece` bytes of span; tasks of about `piece`.
          const std::size_t fit =
              per_part == 1 ? 1
                            : std::max<std::size_t>(
                                  1, static_cast<std::size_t>((piece - range_bytes) / part_stride + 1));
          for (std::size_t r = 0; r < per_part; r += fit) {
            const std::size_t count = std::min(fit, per_part - r);
            task.parts.push_back({offset + r * part_stride, out, range_bytes, count, part_stride});
            out += count * range_bytes;
            task_bytes += count > 1 ? (count - 1) * part_stride + range_bytes : range_bytes;
            if (task_bytes >= piece) queue();
          }
        }
        for (std::size_t d = walked; d-- > 0;) {  // next index, last dim fastest
          if (++at[d] < item.lengths[d]) break;
          at[d] = 0;
        }
      }
      if (p.whole_crc && !task.parts.empty()) {  // a whole chunk smaller than a piece
        task.crc = &crcs.emplace_back(0);
        p.pieces.emplace_back(task.crc, task_bytes);
      }
      queue();
      batch_bytes += static_cast<std::uint64_t>(parts) * per_part * range_bytes;
      pending.push_back(std::move(p));
      if (batch_bytes >= kBatchBytes) run_batch();
    }
    run_batch();
    done.set_value();
  } catch (...) {
    done.set_exception(std::current_exception());
  }
  return done.get_future();
}

bool FileSystemReader::validate_checkpoint_id(const fs::path& checkpoint_id) const {
  std::error_code ec;
  return fs::is_regular_file(checkpoint_id / kMetadataFileName, ec);
}

}  // namespace ckpt::dcp
