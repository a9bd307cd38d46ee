// Writing a checkpoint file durably.
//
// The commit order:
//   1. lay the file out (pickle, records, offsets) without copying tensor bytes;
//   2. open an unnamed file in the destination directory (O_TMPFILE; where the
//      filesystem has none, `.<name>.tmp-<host>-<pid>-<start>-<n>` at once);
//   3. stream every record (a ZipImage, zip_image.hpp, makes the bytes around
//      the data): the local header, then the data in slices; a small record's
//      CRC-32 is computed first (its header carries it), a large one's on a
//      second thread while its slices are copied out;
//   4. append the central directory (which carries the CRCs);
//   5. patch each record's CRC into its local header;
//   6. fsync the file, link it as `.<name>.tmp-<host>-<pid>-<start>-<n>`,
//      rename that over the destination, fsync the directory.
// Any failure before step 6 completes removes the temporary file and leaves the
// destination as it was; a writer killed before it leaves no file. A temporary
// that outlived its writer (killed between link and rename, or on a filesystem
// without O_TMPFILE) names its host and process, so remove_stale_temporaries()
// can tell it from a live writer's, on a shared filesystem too.
//
// With O_DIRECT, bytes pass through a few page-aligned buffers that are kept for
// the process's life (so a save touches no fresh memory) and an I/O thread
// writes one buffer while the caller fills the next.
#include <ckpt/format.hpp>

#include "core/io.hpp"
#include "format/file_writer.hpp"

#include "format/block_crcs.hpp"
#include "format/plan_layout.hpp"
#include "format/zip.hpp"
#include "format/zip_image.hpp"

#include <fmt/format.h>

#include <array>
#include <atomic>
#include <cctype>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace ckpt {
namespace detail {
namespace {

constexpr std::size_t kChunk = std::size_t{8} << 20;
constexpr std::size_t kBuffersPerWrite = 3;
constexpr std::size_t kCrcSlice = std::size_t{1} << 20;

/// Page-aligned, pre-faulted buffers, kept once allocated.
class BufferPool {
 public:
  static BufferPool& instance() {
    static BufferPool pool;
    return pool;
  }
  char* acquire() {
    {
      std::lock_guard lock(mutex_);
      if (!free_.empty()) {
        char* b = free_.back();
        free_.pop_back();
        return b;
      }
    }
    void* p =
        ::mmap(nullptr, kChunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED)
      throw IoError(fmt::format("mmap of a {} byte I/O buffer: {}", kChunk, std::strerror(errno)));
    return static_cast<char*>(p);
  }
  void release(char* b) {
    std::lock_guard lock(mutex_);
    free_.push_back(b);
  }

 private:
  std::mutex mutex_;
  std::vector<char*> free_;
};

/// Receives the file's bytes in order and writes them at increasing offsets.
class Sink {
 public:
  Sink(int fd, const std::filesystem::path& path, bool direct) : fd_(fd), path_(path), direct_(direct) {
    if (direct_) {
      for (std::size_t i = 0; i < kBuffersPerWrite; ++i) free_.push_back(BufferPool::instance().acquire());
      current_ = take_free();
      io_ = std::thread([this] { io_loop(); });
    }
  }
  ~Sink() {
    if (direct_) {
      {
        std::lock_guard lock(mutex_);
        stop_ = true;
      }
      cv_.notify_all();
      io_.join();
      if (current_) free_.push_back(current_);
      for (auto& [off, buf, n] : queue_) free_.push_back(buf);
      for (char* b : free_) BufferPool::instance().release(b);
    }
  }

  /// The 4 bytes at `offset` will be rewritten by patch(); keeps a copy of the
  /// block(s) holding them as they pass.
  void will_patch(std::uint64_t offset) {
    if (!direct_) return;
    for (std::uint64_t b : {offset / kAlign * kAlign, (offset + 3) / kAlign * kAlign}) {
      if (blocks_.count(b) == 0) {
        blocks_[b] = std::string();
        pending_blocks_.push_back(b);
      }
    }
  }

  void put(const void* data, std::size_t n) {
    if (!direct_) {
      pwrite_full(fd_, data, n, offset_, path_);
      offset_ += n;
      return;
    }
    auto* p = static_cast<const char*>(data);
    while (n > 0) {
      const std::size_t room = kChunk - fill_;
      const std::size_t take = n < room ? n : room;
      std::memcpy(current_ + fill_, p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ == kChunk) submit();
    }
  }

  /// Writes out what is buffered and waits for the I/O thread.
  void flush() {
    if (!direct_) return;
    if (fill_ > 0) {
      const std::size_t padded = align_up(fill_, kAlign);
      std::memset(current_ + fill_, 0, padded - fill_);
      fill_ = padded;
      submit();
    }
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return (queue_.empty() && !busy_) || error_; });
    if (error_) std::rethrow_exception(error_);
  }

  void patch(std::uint64_t offset, const std::array<unsigned char, 4>& bytes) {
    if (!direct_) {
      pwrite_full(fd_, bytes.data(), bytes.size(), offset, path_);
      return;
    }
    for (int i = 0; i < 4; ++i) {
      const std::uint64_t at = offset + static_cast<std::uint64_t>(i);
      blocks_.at(at / kAlign * kAlign)[at % kAlign] = static_cast<char>(bytes[i]);
    }
  }

  /// Writes the patched blocks back.
  void write_patches() {
    if (!direct_ || blocks_.empty()) return;
    char* buf = take_free_wait();
    for (const auto& [off, block] : blocks_) {
      std::memcpy(buf, block.data(), kAlign);
      direct_write(buf, kAlign, off);
    }
    std::lock_guard lock(mutex_);
    free_.push_back(buf);
  }

 private:
  char* take_free() {
    char* b = free_.back();
    free_.pop_back();
    return b;
  }
  char* take_free_wait() {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return !free_.empty() || error_; });
    if (error_) std::rethrow_exception(error_);
    return take_free();
  }

  void submit() {
    const std::uint64_t end = offset_ + fill_;
    while (!pending_blocks_.empty() && pending_blocks_.front() < end) {
      const std::uint64_t b = pending_blocks_.front();
      blocks_[b].assign(current_ + (b - offset_), kAlign);
      pending_blocks_.pop_front();
    }
    {
      std::lock_guard lock(mutex_);
      if (error_) std::rethrow_exception(error_);
      queue_.push_back({offset_, current_, fill_});
    }
    cv_.notify_all();
    offset_ = end;
    fill_ = 0;
    current_ = nullptr;
    current_ = take_free_wait();
  }

  void direct_write(const char* buf, std::size_t n, std::uint64_t off) {
    write_maybe_direct(fd_, buf, n, off, path_);
  }

  void io_loop() {
    for (;;) {
      Job job;
      {
        std::unique_lock lock(mutex_);
        cv_.wait(lock, [&] { return !queue_.empty() || stop_; });
        if (queue_.empty()) return;
        job = queue_.front();
        queue_.pop_front();
        busy_ = true;
      }
      std::exception_ptr err;
      bool failed;
      {
        std::lock_guard lock(mutex_);
        failed = error_ != nullptr;
      }
      if (!failed) {  // after a failure the file is abandoned: skip the rest
        try {
          direct_write(job.buf, job.n, job.off);
        } catch (...) {
          err = std::current_exception();
        }
      }
      {
        std::lock_guard lock(mutex_);
        busy_ = false;
        free_.push_back(job.buf);
        if (err && !error_) error_ = err;
      }
      cv_.notify_all();
    }
  }

  struct Job {
    std::uint64_t off = 0;
    char* buf = nullptr;
    std::size_t n = 0;
  };

  int fd_;
  const std::filesystem::path& path_;
  bool direct_;
  std::uint64_t offset_ = 0;  // file offset of current_[0]
  char* current_ = nullptr;
  std::size_t fill_ = 0;
  std::map<std::uint64_t, std::string> blocks_;
  std::deque<std::uint64_t> pending_blocks_;

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  std::vector<char*> free_;
  bool busy_ = false;
  bool stop_ = false;
  std::exception_ptr error_;
  std::thread io_;
};

/// Streams `layout` through `sink` as an archive starting at file offset
/// `base` (steps 3–5 of the commit order; the CRC fields are patched by
/// finish_patches once the sink is flushed); returns the archive's size.
/// Small records get their CRC before their header is written, so only large
/// ones are patched; a large record's CRC is computed on a second thread
/// while its bytes are written.
struct Patch {
  std::uint64_t offset;
  std::array<unsigned char, 4> bytes;
};
std::uint64_t stream(Sink& sink, Layout& layout, std::uint64_t base, std::vector<Patch>& patches,
                     std::vector<BlockCrcs>* table = nullptr) {
  ZipImage zip = zip_image(layout);
  std::vector<std::size_t> patched;
  for (std::size_t i = 0; i < layout.records.size(); ++i) {
    const auto& r = layout.records[i];
    const auto* p = static_cast<const char*>(r.data);
    at::Storage fetched;  // a record laid out before its bytes were at hand
    if (!p && r.size > 0) {
      if (!layout.fetch) throw Error(fmt::format("record {} of the layout has no data", r.name));
      fetched = layout.fetch(i);
      if (!fetched.device().is_cpu() || fetched.nbytes() != r.size || !fetched.data())
        throw Mismatch(fmt::format("record {} is {} bytes but its source gave {} bytes{}", r.name, r.size,
                                   fetched.nbytes(), fetched.device().is_cpu() ? "" : " not on the CPU"));
      p = static_cast<const char*>(fetched.data());
    }
    const bool small = r.size <= kCrcSlice;
    std::vector<std::uint32_t>* blocks = nullptr;
    if (table && listed_in_block_table(r.name)) {
      table->push_back({base + zip.records()[i].data_offset, r.size, {}});
      blocks = &table->back().crcs;
    }
    const auto crc_of = [blocks](const char* data, std::uint64_t size) {
      return blocks ? crc32_blocks(data, static_cast<std::size_t>(size), *blocks)
                    : crc32_of(data, static_cast<std::size_t>(size));
    };
    if (small)
      zip.set_crc(i, crc_of(p, r.size));
    else
      sink.will_patch(base + zip.crc_field_offset(i));
    const std::string header = zip.local_header(i);
    sink.put(header.data(), header.size());
    if (small) {
      sink.put(p, static_cast<std::size_t>(r.size));
      continue;
    }
    // The CRC on a second thread while the bytes go out (two passes over
    // memory, but on two cores: the copy-out no longer waits for the CRC).
    std::uint32_t crc = 0;
    std::exception_ptr crc_error;
    std::thread crc_thread([&, data = p, size = r.size] {
      try {
        crc = crc_of(data, size);
      } catch (...) {
        crc_error = std::current_exception();
      }
    });
    struct Join {
      std::thread& t;
      ~Join() {
        if (t.joinable()) t.join();
      }
    } join{crc_thread};
    for (std::uint64_t left = r.size; left > 0;) {
      const std::size_t n = left < kCrcSlice ? static_cast<std::size_t>(left) : kCrcSlice;
      sink.put(p, n);
      p += n;
      left -= n;
    }
    crc_thread.join();
    if (crc_error) std::rethrow_exception(crc_error);
    zip.set_crc(i, crc);
    patched.push_back(i);
  }
  const std::string cd = zip.central_directory();
  sink.put(cd.data(), cd.size());
  for (std::size_t i : patched) patches.push_back({base + zip.crc_field_offset(i), zip.crc_field(i)});
  for (std::size_t i = 0; i < layout.records.size(); ++i) layout.records[i].crc32 = zip.records()[i].crc32;
  return zip.cd_offset() + cd.size();
}

/// Flushes `sink` and writes the CRC fields `patches` into what it wrote.
void finish_patches(Sink& sink, const std::vector<Patch>& patches) {
  sink.flush();
  for (const auto& p : patches) sink.patch(p.offset, p.bytes);
  sink.write_patches();
}

std::atomic<unsigned> temp_counter{0};

/// This host's name as it goes into a temporary's name: letters, digits, '.'
/// and '_' only (anything else becomes '_').
const std::string& host_token() {
  static const std::string token = [] {
    char buf[256] = {};
    if (::gethostname(buf, sizeof buf - 1) != 0 || buf[0] == '\0') return std::string("localhost");
    std::string t(buf);
    for (char& c : t)
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.') c = '_';
    return t;
  }();
  return token;
}

/// When process `pid` started (clock ticks after boot, field 22 of
/// /proc/<pid>/stat); nullopt when no such process runs.
std::optional<unsigned long long> start_time_of(long pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string line;
  if (!in || !std::getline(in, line)) return std::nullopt;
  const auto paren = line.rfind(')');  // the command name may hold spaces and ')'
  if (paren == std::string::npos) return std::nullopt;
  std::istringstream fields(line.substr(paren + 1));
  std::string field;
  for (int i = 3; i <= 22; ++i)
    if (!(fields >> field)) return std::nullopt;
  try {
    return std::stoull(field);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

unsigned long long own_start_time() {
  static const unsigned long long start = start_time_of(::getpid()).value_or(0);
  return start;
}

/// Names of the temporaries this process has in flight (for
/// remove_in_flight_temporaries()).
std::mutex in_flight_mutex;
std::set<std::string>& in_flight() {
  static std::set<std::string> names;
  return names;
}

struct InFlight {
  std::string name;
  explicit InFlight(std::string n) : name(std::move(n)) {
    std::lock_guard lock(in_flight_mutex);
    in_flight().insert(name);
  }
  ~InFlight() {
    std::lock_guard lock(in_flight_mutex);
    in_flight().erase(name);
  }
};

/// `temp`'s parts when it is a temporary of this writer's naming: the name it
/// stands in for, host, pid and start time.
struct TempName {
  std::string target, host;
  long pid = 0;
  unsigned long long start = 0;
};
std::optional<TempName> parse_temporary(const std::string& name) {
  if (name.size() < 2 || name[0] != '.') return std::nullopt;
  const auto tag = name.rfind(".tmp-");
  if (tag == std::string::npos || tag < 1) return std::nullopt;
  std::string rest = name.substr(tag + 5);
  std::array<std::string, 3> numbers;  // n, start, pid (from the right)
  for (auto& number : numbers) {
    const auto dash = rest.rfind('-');
    if (dash == std::string::npos) return std::nullopt;
    number = rest.substr(dash + 1);
    rest.resize(dash);
    if (number.empty() || number.find_first_not_of("0123456789") != std::string::npos || number.size() > 19)
      return std::nullopt;
  }
  if (rest.empty()) return std::nullopt;
  return TempName{name.substr(1, tag - 1), rest, std::stol(numbers[2]), std::stoull(numbers[1])};
}

/// Opens an unnamed file in `dir` (O_TMPFILE); -1 where the filesystem does
/// not offer them. Sets `direct` to whether O_DIRECT held. Errors name `temp`,
/// the name it will take.
int open_unnamed(const std::filesystem::path& dir, const std::filesystem::path& temp, bool& direct) {
  const int flags = O_TMPFILE | O_WRONLY | O_CLOEXEC;
  int fd = -1;
  if (direct) {
    fd = ::open(dir.c_str(), flags | O_DIRECT, 0644);
    if (fd < 0 && errno == EINVAL) direct = false;
  }
  if (fd < 0) fd = ::open(dir.c_str(), flags, 0644);
  if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) return -1;
  if (fd < 0) throw_errno("create", temp, errno);
  return fd;
}

}  // namespace

std::filesystem::path temporary_beside(const std::filesystem::path& file) {
  const auto dir = file.parent_path();
  return (dir.empty() ? std::filesystem::path(".") : dir) /
         fmt::format(".{}.tmp-{}-{}-{}-{}", file.filename().string(), host_token(), ::getpid(),
                     own_start_time(), temp_counter++);
}

std::size_t remove_stale_temporaries(const std::filesystem::path& dir, const std::string& prefix) noexcept {
  std::size_t removed = 0;
  std::error_code ec;
  const auto d = dir.empty() ? std::filesystem::path(".") : dir;
  for (std::filesystem::directory_iterator it(d, ec), end; !ec && it != end; it.increment(ec)) {
    try {
      const std::string name = it->path().filename().string();
      if (name.empty() || name[0] != '.') continue;
      const auto temp = parse_temporary(name);
      if (!temp || temp->host != host_token() || !temp->target.starts_with(prefix)) continue;
      const auto start = start_time_of(temp->pid);
      if (start && *start == temp->start) continue;  // its writer still runs
      std::error_code rm;
      if (std::filesystem::remove(it->path(), rm)) ++removed;
    } catch (const std::exception&) {
      // an entry that cannot be read is left alone
    }
  }
  return removed;
}

void remove_in_flight_temporaries() noexcept {
  std::lock_guard lock(in_flight_mutex);
  for (const auto& name : in_flight()) ::unlink(name.c_str());
}

void write_durably(
    const std::filesystem::path& file, const WriteOptions& options,
    const std::function<std::uint64_t(int fd, bool direct, const std::filesystem::path& temp)>& body) {
  const auto dir = file.parent_path().empty() ? std::filesystem::path(".") : file.parent_path();
  const auto temp = temporary_beside(file);
  // The bytes get a name only once they are whole and durable: written into an
  // unnamed file (O_TMPFILE), linked as `temp`, renamed over `file`. A writer
  // killed on the way leaves nothing. Where the filesystem has no unnamed
  // files, `temp` is created at once and a killed writer's temporary is removed
  // by a later remove_stale_temporaries().
  bool direct = options.direct_io;
  Fd fd(open_unnamed(dir, temp, direct));
  const bool unnamed = static_cast<bool>(fd);
  std::optional<InFlight> registered;
  if (!unnamed) {
    const int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC;
    registered.emplace(temp.string());
    direct = options.direct_io;
    if (direct) {
      fd = Fd(::open(temp.c_str(), flags | O_DIRECT, 0644));
      if (!fd && errno == EINVAL)
        direct = false;  // tmpfs and friends
      else if (!fd)
        throw_errno("create", temp, errno);
    }
    if (!fd) {
      fd = Fd(::open(temp.c_str(), flags, 0644));
      if (!fd) throw_errno("create", temp, errno);
    }
  }
  bool named = !unnamed;
  try {
    const std::uint64_t size = body(fd.get(), direct, temp);
    if (direct && ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) throw_errno("truncate", temp, errno);
    if (options.fsync) fsync_fd(fd.get(), temp);
    if (unnamed) {
      registered.emplace(temp.string());
      const auto self = fmt::format("/proc/self/fd/{}", fd.get());
      if (::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, temp.c_str(), AT_SYMLINK_FOLLOW) != 0)
        throw_errno("link", temp, errno);
      named = true;
    }
    fd.reset();
    if (::rename(temp.c_str(), file.c_str()) != 0)
      throw_errno("rename to " + file.string() + ":", temp, errno);
    named = false;
  } catch (const IoError& e) {
    fd.reset();
    if (named) ::unlink(temp.c_str());
    throw IoError(
        fmt::format("cannot write checkpoint {} (nothing was changed there): {}", file.string(), e.what()));
  } catch (...) {
    fd.reset();
    if (named) ::unlink(temp.c_str());
    throw;
  }
  if (options.fsync) fsync_dir(dir);
}

}  // namespace detail

namespace detail {
void write_layout(const std::filesystem::path& file, Layout& layout, const WriteOptions& options) {
  write_durably(file, options, [&](int fd, bool direct, const std::filesystem::path& temp) {
    Sink sink(fd, temp, direct);
    std::vector<Patch> patches;
    const std::uint64_t size = stream(sink, layout, 0, patches);
    finish_patches(sink, patches);
    return size;
  });
}

std::vector<ArchiveExtent> write_archives(const std::filesystem::path& file, std::size_t count,
                                          const std::function<Archive(std::size_t)>& make,
                                          const WriteOptions& options) {
  std::vector<ArchiveExtent> extents;
  write_durably(file, options, [&](int fd, bool direct, const std::filesystem::path& temp) {
    extents.clear();
    Sink sink(fd, temp, direct);
    std::vector<Patch> patches;
    std::vector<BlockCrcs> table;
    static const std::array<char, kAlign> zeros{};
    std::uint64_t at = 0;
    for (std::size_t i = 0; i < count; ++i) {
      const std::uint64_t base = align_up(at, kAlign);
      sink.put(zeros.data(), static_cast<std::size_t>(base - at));
      Archive archive = make(i);
      std::uint64_t size = 0;
      if (archive.raw) {
        sink.put(archive.raw->data(), archive.raw->size());
        size = archive.raw->size();
      } else {
        size = stream(sink, archive.layout, base, patches, &table);
      }
      extents.push_back({base, size});
      at = base + size;
    }
    // The table of block CRC-32s after the last archive.
    if (table.size() <= kMaxBlockTableRecords) {
      const std::uint64_t table_at = align_up(at, kAlign);
      sink.put(zeros.data(), static_cast<std::size_t>(table_at - at));
      const std::string table_bytes = encode_block_table(table, table_at);
      sink.put(table_bytes.data(), table_bytes.size());
      at = table_at + table_bytes.size();
    }
    finish_patches(sink, patches);
    return at;
  });
  return extents;
}
std::vector<ArchiveExtent> place_archives(const std::vector<std::uint64_t>& sizes) {
  std::vector<ArchiveExtent> extents;
  extents.reserve(sizes.size());
  std::uint64_t at = 0;
  for (const std::uint64_t size : sizes) {
    const std::uint64_t base = align_up(at, kAlign);
    extents.push_back({base, size});
    at = base + size;
  }
  return extents;
}

std::uint64_t write_image_archives(int fd, bool direct, const std::filesystem::path& path, std::byte* image,
                                   std::vector<ImageArchive>& archives) {
  std::vector<std::uint64_t> sizes;
  sizes.reserve(archives.size());
  for (const auto& a : archives) sizes.push_back(a.file_size());
  const auto extents = place_archives(sizes);
  std::uint64_t end = 0;
  std::vector<BlockCrcs> table;
  for (std::size_t i = 0; i < archives.size(); ++i) {
    auto& a = archives[i];
    if (a.zip) {
      a.zip->write(fd, direct, path, image + a.image_offset, extents[i].offset, /*block_crcs=*/true);
      for (std::size_t r = 0; r < a.zip->records().size(); ++r)
        if (listed_in_block_table(a.zip->records()[r].name))
          table.push_back({extents[i].offset + a.zip->records()[r].data_offset, a.zip->records()[r].size,
                           a.zip->block_crcs(r)});
    } else if (a.raw_size > 0) {
      write_maybe_direct(fd, image + a.image_offset, static_cast<std::size_t>(a.raw_size), extents[i].offset,
                         path);
    }
    end = extents[i].offset + extents[i].length;
  }
  // The table of block CRC-32s after the last archive, in one aligned buffer.
  if (table.size() > kMaxBlockTableRecords) return end;
  const std::uint64_t table_at = align_up(end, kAlign);
  const std::string table_bytes = encode_block_table(table, table_at);
  const std::size_t padded = static_cast<std::size_t>(align_up(table_bytes.size(), kAlign));
  void* raw = nullptr;
  if (::posix_memalign(&raw, kAlign, padded) != 0)
    throw IoError("out of memory for a table of block CRC-32s");
  std::unique_ptr<char, decltype(&std::free)> buffer(static_cast<char*>(raw), &std::free);
  std::memcpy(buffer.get(), table_bytes.data(), table_bytes.size());
  std::memset(buffer.get() + table_bytes.size(), 0, padded - table_bytes.size());
  write_maybe_direct(fd, buffer.get(), direct ? padded : table_bytes.size(), table_at, path);
  return table_at + table_bytes.size();
}

}  // namespace detail

void write_file(const std::filesystem::path& file, const c10::IValue& value, const WriteOptions& options) {
  detail::Layout layout = detail::plan_layout(value);
  detail::write_layout(file, layout, options);
}

}  // namespace ckpt
