// dcp::AsyncSaver (async_saver.hpp has the steps). Three threads of the
// saver's own and one process take part:
//   - the caller's thread flattens the state dict and records device fences;
//   - the saver's I/O thread runs its strand, which chains the saves and
//     stages each into the arena (only after the previous save's write is
//     done: the child reads the arena until then), and the CheckpointProcess's
//     strand, which talks to the writer child;
//   - the save thread runs each save's collectives (save_state_dict) in turn,
//     over the saver's group; its write step hands this rank's staged archives
//     to the child and waits for them to be durable;
//   - the writer child writes the data file from the arena.
// The arena holds each tensor, local shard and value of the rank as the
// torch.save archive its data file gets, every archive on a 4096-byte
// boundary: the child copies nothing, it computes the CRCs and writes.
#include <ckpt/dcp/async_saver.hpp>

#include <ckpt/dcp/planner.hpp>
#include <ckpt/dcp/storage.hpp>
#include <ckpt/error.hpp>
#include <ckpt/log.hpp>

#include "async/arena.hpp"
#include "async/device_copy.hpp"
#include "async/event.hpp"
#include "async/save_futures.hpp"
#include "dcp/volume.hpp"
#include "format/file_writer.hpp"
#include "format/plan_layout.hpp"
#include "format/zip.hpp"
#include "format/zip_image.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/system_executor.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <typeinfo>

namespace asio = boost::asio;
namespace fs = std::filesystem;

namespace ckpt::dcp {
namespace {

constexpr std::uint64_t kParallelCopy = std::uint64_t{64} << 20;  // below this one thread is faster

using ItemKey = std::pair<std::string, std::vector<std::int64_t>>;

std::vector<std::int64_t> dense_strides(c10::IntArrayRef sizes) {
  std::vector<std::int64_t> strides(sizes.size(), 1);
  for (std::size_t d = sizes.size(); d-- > 1;)
    strides[d - 1] = strides[d] * std::max<std::int64_t>(sizes[d], 1);
  return strides;
}

/// A tensor of `t`'s dtype and shape over a storage of exactly its bytes with
/// no memory behind it: its layout names the record, whose bytes staging
/// copies from `t` itself.
at::Tensor placeholder_of(const at::Tensor& t) {
  const auto nbytes = static_cast<std::size_t>(t.numel()) * t.element_size();
  at::Storage storage(at::Storage::use_byte_size_t(), nbytes, c10::DataPtr(nullptr, c10::Device(c10::kCPU)),
                      nullptr, false);
  return at::empty({0}, at::TensorOptions().dtype(t.scalar_type()))
      .set_(storage, 0, t.sizes(), dense_strides(t.sizes()));
}

/// A device tensor that owns exactly its bytes, contiguous (copied on the
/// caller's stream when it is not: a view, a slice, a conjugate).
at::Tensor exact_on_device(at::Tensor t) {
  const bool requires_grad = t.requires_grad();
  t = t.detach();
  if (t.is_conj()) t = t.resolve_conj();
  if (t.is_neg()) t = t.resolve_neg();
  if (!t.is_contiguous() || t.storage_offset() != 0 ||
      t.storage().nbytes() != static_cast<std::size_t>(t.numel()) * t.element_size())
    t = t.clone(c10::MemoryFormat::Contiguous);
  if (requires_grad) t.set_requires_grad(true);  // as the metadata records it
  return t;
}

/// One archive in the arena: a tensor or local shard, or a value.
struct StagedItem {
  ItemKey key;
  StagedArchives::Archive archive;
  std::uint64_t file_size = 0;   // its size in the data file
  std::uint64_t data_bytes = 0;  // bytes of tensor data (a WriteResult's size)
  const void* data = nullptr;    // a tensor's staged bytes in the arena
  std::uint64_t nbytes = 0;
  c10::IValue value;  // a value as staged
};

/// What one save staged: the state dict over the arena, and its archives.
struct Staged {
  std::shared_ptr<ckpt::detail::Arena> arena;
  DcpStateDict state_dict;
  std::map<std::string, ObjectPath> paths;
  std::vector<StagedItem> items;
  std::map<ItemKey, std::size_t> index;
};

/// What the caller's thread hands the strand.
struct Request {
  DcpStateDict flat;
  std::map<std::string, ObjectPath> paths;
  std::shared_ptr<ckpt::detail::DeviceFences> fences;
};

/// The source of one tensor archive, while staging.
struct TensorSource {
  std::size_t item = 0;
  at::Tensor source;  // CPU: copied from; a device tensor: in the layout
  ckpt::detail::Layout layout;
  std::size_t record = 0;  // the tensor's record in `layout`
};

at::Tensor over_arena(const std::shared_ptr<ckpt::detail::Arena>& arena, std::uint64_t offset,
                      const at::Tensor& like) {
  auto* keep = new std::shared_ptr<ckpt::detail::Arena>(arena);
  const auto nbytes = static_cast<std::size_t>(like.numel()) * like.element_size();
  c10::DataPtr ptr(
      arena->data() + offset, keep,
      [](void* ctx) { delete static_cast<std::shared_ptr<ckpt::detail::Arena>*>(ctx); },
      c10::Device(c10::kCPU));
  at::Storage storage(at::Storage::use_byte_size_t(), nbytes, std::move(ptr), nullptr, false);
  at::Tensor t = at::empty({0}, at::TensorOptions().dtype(like.scalar_type()))
                     .set_(storage, 0, like.sizes(), dense_strides(like.sizes()));
  if (like.requires_grad()) t.set_requires_grad(true);
  return t;
}

/// Stages `request` into `arena` (growing it when needed): the layout of
/// every archive, then the copies (large ones split over two threads), then
/// the state dict over the arena.
Staged stage(Request& request, const std::shared_ptr<ckpt::detail::Arena>& arena, bool register_device,
             bool non_blocking) {
  Staged out;
  out.arena = arena;
  out.paths = std::move(request.paths);
  // Deques: a layout's records point into its own strings, which must not
  // move (a vector would copy them as it grows: a deque's move may throw).
  std::deque<TensorSource> tensors;
  std::deque<ckpt::detail::Layout> value_layouts;
  std::vector<std::pair<std::size_t, std::size_t>> value_of_item;
  std::uint64_t at = 0;

  const auto place = [&](StagedItem item, std::uint64_t span) {
    item.archive.offset = ckpt::detail::align_up(at, ckpt::detail::kAlign);
    at = item.archive.offset + span;
    out.index.emplace(item.key, out.items.size());
    out.items.push_back(std::move(item));
    return out.items.size() - 1;
  };
  const auto place_tensor = [&](const std::string& fqn, std::vector<std::int64_t> offsets,
                                const at::Tensor& t) {
    if (!t.defined()) throw Unsupported(fmt::format("'{}' is an undefined tensor", fqn));
    TensorSource src;
    // Laid out over a placeholder on the CPU, as dcp::save lays out the CPU
    // copy it writes (location "cpu"); a device tensor's record then names
    // its storage, which copy_device_records copies from.
    src.source = t;  // on a device: exact_on_device already
    src.layout = ckpt::detail::plan_layout(placeholder_of(t));
    src.record = src.layout.record_of_storage.begin()->second;
    if (!t.device().is_cpu()) {
      auto& rec = src.layout.records[src.record];
      rec.device_source = t.storage();
      rec.device = t.device();
    }
    const ckpt::detail::ZipImage zip = ckpt::detail::zip_image(src.layout);
    StagedItem item;
    item.key = {fqn, std::move(offsets)};
    item.archive.cd_offset = zip.cd_offset();
    item.archive.records = zip.records();
    item.file_size = zip.file_size();
    item.nbytes = src.layout.records[src.record].size;
    for (const auto& r : src.layout.records)
      if (r.name.find("/data/") != std::string::npos) item.data_bytes += r.size;
    src.item = place(std::move(item), zip.cd_offset());
    tensors.push_back(std::move(src));
  };

  // 1. The layout: every archive placed, nothing copied.
  for (auto& [fqn, value] : request.flat) {
    if (const auto* t = std::get_if<at::Tensor>(&value)) {
      place_tensor(fqn, std::vector<std::int64_t>(static_cast<std::size_t>(t->dim()), 0), *t);
    } else if (const auto* st = std::get_if<ShardedTensor>(&value)) {
      for (const auto& shard : st->local_shards())
        if (dcp::detail::volume(shard.metadata.sizes) > 0)
          place_tensor(fqn, shard.metadata.offsets, shard.tensor);
    } else {
      // A copy of its own: what the caller's object holds now, whatever
      // training does to it later (a fallback write reads it). An opaque
      // value is immutable bytes.
      auto& held = std::get<c10::IValue>(value);
      if (!as_opaque(held)) held = held.deepcopy();
      const c10::IValue& v = held;
      StagedItem item;
      item.key = {fqn, {}};
      item.value = v;
      if (const OpaqueValue* opaque = as_opaque(v)) {
        item.archive.raw_size = opaque->archive.size();
        item.file_size = opaque->archive.size();
        value_of_item.emplace_back(place(std::move(item), opaque->archive.size()), SIZE_MAX);
      } else {
        ckpt::detail::Layout layout = ckpt::detail::plan_layout(v);
        const ckpt::detail::ZipImage zip = ckpt::detail::zip_image(layout);
        item.archive.cd_offset = zip.cd_offset();
        item.archive.records = zip.records();
        item.file_size = zip.file_size();
        for (const auto& r : layout.records)
          if (r.name.find("/data/") != std::string::npos) item.data_bytes += r.size;
        value_of_item.emplace_back(place(std::move(item), zip.cd_offset()), value_layouts.size());
        value_layouts.push_back(std::move(layout));
      }
    }
  }

  // 2. The arena, grown when this part is larger than any before.
  arena->reserve(std::max<std::uint64_t>(at, 1));
  std::byte* base = arena->data();
  bool from_device = false;
  for (const auto& src : tensors) from_device = from_device || !src.source.device().is_cpu();
  if (from_device && register_device) arena->register_with_device();

  // 3. The copies: headers (CRC fields zero: the child computes them), values'
  // records, then tensor bytes; device tensors on a side stream per device.
  struct Copy {
    std::byte* to;
    const void* from;
    std::uint64_t size;
  };
  std::vector<Copy> copies;
  std::vector<std::pair<std::byte*, const at::Tensor*>> strided;  // CPU sources that are not dense
  std::uint64_t copy_bytes = 0;
  for (auto& src : tensors) {
    StagedItem& item = out.items[src.item];
    std::byte* archive = base + item.archive.offset;
    ckpt::detail::ZipImage(item.archive.records, item.archive.cd_offset).put_local_headers(archive);
    for (std::size_t r = 0; r < src.layout.records.size(); ++r) {
      const auto& rec = src.layout.records[r];
      if (r == src.record) continue;
      if (rec.size > 0 && rec.data) copies.push_back({archive + rec.data_offset, rec.data, rec.size});
    }
    const auto& rec = src.layout.records[src.record];
    item.data = archive + rec.data_offset;
    if (!src.source.device().is_cpu()) continue;  // below, by device_copy
    const at::Tensor& s = src.source;
    if (s.is_contiguous() && !s.is_conj() && !s.is_neg()) {
      if (rec.size > 0) copies.push_back({archive + rec.data_offset, s.data_ptr(), rec.size});
      copy_bytes += rec.size;
    } else {
      strided.emplace_back(archive + rec.data_offset, &s);
    }
  }
  for (const auto& [i, layout_index] : value_of_item) {
    StagedItem& item = out.items[i];
    std::byte* archive = base + item.archive.offset;
    if (layout_index == SIZE_MAX) {
      const auto& bytes = as_opaque(item.value)->archive;
      copies.push_back({archive, bytes.data(), bytes.size()});
      continue;
    }
    ckpt::detail::ZipImage(item.archive.records, item.archive.cd_offset).put_local_headers(archive);
    for (const auto& rec : value_layouts[layout_index].records)
      if (rec.size > 0 && rec.data) copies.push_back({archive + rec.data_offset, rec.data, rec.size});
  }
  const auto copy_range = [&](std::size_t from, std::size_t to) {
    for (std::size_t i = from; i < to; ++i) std::memcpy(copies[i].to, copies[i].from, copies[i].size);
  };
  if (copy_bytes >= kParallelCopy && copies.size() > 1) {
    // Two halves of about equal bytes; the second on another thread.
    std::size_t split = 0;
    for (std::uint64_t half = 0; split < copies.size() && half < copy_bytes / 2; ++split)
      half += copies[split].size;
    std::exception_ptr other_error;
    std::thread other([&] {
      try {
        copy_range(split, copies.size());
      } catch (...) {
        other_error = std::current_exception();
      }
    });
    copy_range(0, split);
    other.join();
    if (other_error) std::rethrow_exception(other_error);
  } else {
    copy_range(0, copies.size());
  }
  for (const auto& [to, source] : strided)
    at::from_blob(to, source->sizes(), at::TensorOptions().dtype(source->scalar_type())).copy_(*source);
  for (auto& src : tensors) {
    if (src.source.device().is_cpu()) continue;
    const StagedItem& item = out.items[src.item];
    ckpt::detail::copy_device_records(src.layout, base + item.archive.offset,
                                      request.fences ? *request.fences : ckpt::detail::DeviceFences(),
                                      non_blocking);
  }

  // 4. The staged state dict: its tensors over the arena, its values as staged.
  const auto staged_tensor = [&](const std::string& fqn, std::vector<std::int64_t> offsets,
                                 const at::Tensor& t) {
    const StagedItem& item = out.items[out.index.at({fqn, std::move(offsets)})];
    return over_arena(arena, static_cast<std::uint64_t>(static_cast<const std::byte*>(item.data) - base), t);
  };
  for (auto& [fqn, value] : request.flat) {
    if (const auto* t = std::get_if<at::Tensor>(&value)) {
      out.state_dict.emplace_back(
          fqn, staged_tensor(fqn, std::vector<std::int64_t>(static_cast<std::size_t>(t->dim()), 0), *t));
    } else if (const auto* st = std::get_if<ShardedTensor>(&value)) {
      ShardedTensor copy = *st;
      for (auto& shard : copy.local_shards())
        if (dcp::detail::volume(shard.metadata.sizes) > 0)
          shard.tensor = staged_tensor(fqn, shard.metadata.offsets, shard.tensor);
      out.state_dict.emplace_back(fqn, std::move(copy));
    } else {
      out.state_dict.emplace_back(fqn, std::get<c10::IValue>(value));
    }
  }
  return out;
}

/// Whether `a` is the value `b` (the same object; a double by its bits, so
/// that a NaN is itself).
bool same_value(const c10::IValue& a, const c10::IValue& b) {
  if (a.isDouble() && b.isDouble()) {
    const double x = a.toDouble(), y = b.toDouble();
    return std::memcmp(&x, &y, sizeof x) == 0;
  }
  return a.isSameIdentity(b);
}

/// The storage writer of a save whose storage is a FileSystemWriter: every
/// call goes to it, except that this rank's data file is written by the
/// writer child from the staged archives. When the planner's data for an
/// item is not what was staged for it (a planner that makes its own), the
/// FileSystemWriter writes the file itself, from that data.
class ChildWriter : public StorageWriter {
 public:
  ChildWriter(FileSystemWriter& real, const Staged& staged, CheckpointProcess& process)
      : real_(real), staged_(staged), process_(process) {}
  void reset(const std::optional<fs::path>& checkpoint_id) override { real_.reset(checkpoint_id); }
  void set_up_storage_writer(bool is_coordinator) override { real_.set_up_storage_writer(is_coordinator); }
  SavePlan prepare_local_plan(SavePlan plan) override { return real_.prepare_local_plan(std::move(plan)); }
  std::vector<SavePlan> prepare_global_plan(std::vector<SavePlan> plans) override {
    return real_.prepare_global_plan(std::move(plans));
  }
  void finish(const Metadata& metadata, const std::vector<std::vector<WriteResult>>& results) override {
    real_.finish(metadata, results);
  }
  bool validate_checkpoint_id(const fs::path& checkpoint_id) const override {
    return real_.validate_checkpoint_id(checkpoint_id);
  }

  std::future<std::vector<WriteResult>> write_data(const SavePlan& plan, SavePlanner& planner) override {
    if (plan.items.empty()) return real_.write_data(plan, planner);
    if (plan.storage_data.empty() || plan.storage_data.find('/') != std::string::npos)
      return real_.write_data(plan, planner);  // its error
    std::vector<const StagedItem*> items;
    items.reserve(plan.items.size());
    for (const auto& w : plan.items) {
      const StagedItem* item = staged_item(w, planner.resolve_data(w));
      if (!item) return real_.write_data(plan, planner);
      items.push_back(item);
    }
    const std::string name = plan.storage_data + ".distcp";
    StagedArchives request{staged_.arena, {}};
    std::vector<std::uint64_t> sizes;
    for (const auto* item : items) {
      request.archives.push_back(item->archive);
      sizes.push_back(item->file_size);
    }
    const auto options = real_.options();
    process_
        .async_write_archives(std::move(request), real_.path() / name,
                              WriteOptions{.direct_io = options.direct_io, .fsync = options.sync_files},
                              asio::use_future)
        .get();
    const auto extents = ckpt::detail::place_archives(sizes);
    std::vector<WriteResult> results;
    for (std::size_t i = 0; i < items.size(); ++i)
      results.push_back(
          WriteResult{plan.items[i].index, items[i]->data_bytes,
                      StorageInfo{name, extents[i].offset, extents[i].length, 0, /*archive=*/true, {}}});
    std::promise<std::vector<WriteResult>> done;
    done.set_value(std::move(results));
    return done.get_future();
  }

 private:
  /// The staged archive of `w` when `data` is what was staged for it.
  const StagedItem* staged_item(const WriteItem& w, const c10::IValue& data) const {
    const auto it = staged_.index.find({w.index.fqn, w.index.offset.value_or(std::vector<std::int64_t>{})});
    if (it == staged_.index.end()) return nullptr;
    const StagedItem& item = staged_.items[it->second];
    if (w.type == WriteItemType::bytes) return !item.data && same_value(item.value, data) ? &item : nullptr;
    if (!data.isTensor() || !item.data) return nullptr;
    const at::Tensor& t = data.toTensor();
    // What the plan says of the chunk must hold (as FileSystemWriter checks).
    if (w.tensor_data &&
        (t.sizes().vec() != w.tensor_data->chunk.sizes || t.scalar_type() != w.tensor_data->properties.dtype))
      throw Mismatch(fmt::format("'{}' is not the chunk its plan describes", w.index.fqn));
    // (An empty tensor has no data pointer: its bytes are none either way.)
    const bool same = t.device().is_cpu() && t.is_contiguous() && !t.is_conj() && !t.is_neg() &&
                      static_cast<std::uint64_t>(t.numel()) * t.element_size() == item.nbytes &&
                      (t.numel() == 0 || t.data_ptr() == item.data);
    return same ? &item : nullptr;
  }

  FileSystemWriter& real_;
  const Staged& staged_;
  CheckpointProcess& process_;
};

}  // namespace

struct AsyncSaver::Impl {
  AsyncSaverConfig config;
  asio::any_io_executor executor;  // completions without an executor of their own
  asio::strand<asio::any_io_executor> user_strand;

  // The saver's I/O thread: first, so that it is destroyed last.
  asio::io_context io;
  asio::executor_work_guard<asio::io_context::executor_type> work{io.get_executor()};
  std::thread io_thread;
  asio::strand<asio::io_context::executor_type> strand{io.get_executor()};

  std::shared_ptr<dist::ProcessGroupHandle> group;  // null: alone
  std::unique_ptr<CheckpointProcess> process;
  std::shared_ptr<ckpt::detail::Arena> arena;
  DefaultSavePlanner planner;

  // On the strand: the last save's write, which the next staging waits for.
  std::shared_ptr<ckpt::detail::Event> last;
  bool closed = false;  // on the strand
  std::atomic<bool> close_started{false};
  std::mutex spawn_mutex;  // a save is spawned onto the strand, or close() has begun: not both
  std::atomic<std::uint64_t> arena_bytes{0};
  std::atomic<bool> arena_pinned{false};

  // The save thread and its queue.
  struct Job {
    Staged staged;
    SaveOptions options;
    std::shared_ptr<ckpt::detail::Event> written;
  };
  std::mutex mutex;
  std::condition_variable cv;
  std::deque<Job> jobs;
  bool stopping = false;
  std::thread save_thread;

  Impl(asio::any_io_executor ex, AsyncSaverConfig c)
      : config(std::move(c)),
        executor(ex),
        user_strand(asio::make_strand(ex)),
        arena(std::make_shared<ckpt::detail::Arena>(config.staging.use_pinned_memory)),
        planner(config.dedup_replicated, config.enable_plan_caching) {}

  void run_jobs() {
    for (;;) {
      Job job;
      {
        std::unique_lock lock(mutex);
        cv.wait(lock, [&] { return stopping || !jobs.empty(); });
        if (jobs.empty()) return;
        job = std::move(jobs.front());
        jobs.pop_front();
      }
      std::exception_ptr error;
      try {
        run(job);
      } catch (...) {
        error = std::current_exception();
      }
      auto written = std::move(job.written);
      job = Job{};  // the staged state dict lets go of the arena before the next staging
      written->set(error);
    }
  }

  /// One save's collectives, on the save thread.
  void run(Job& job) {
    const SaveOptions& o = job.options;
    std::optional<FileSystemWriter> own;
    StorageWriter* storage = o.storage_writer;
    if (!storage)
      storage = &own.emplace(*o.checkpoint_id);
    else if (o.checkpoint_id)
      storage->reset(o.checkpoint_id);
    SavePlanner* chosen = o.planner ? o.planner : &planner;
    if (auto* d = dynamic_cast<DefaultSavePlanner*>(chosen)) d->set_planner_data(job.staged.paths);
    std::optional<ChildWriter> child;
    if (typeid(*storage) == typeid(FileSystemWriter))
      child.emplace(static_cast<FileSystemWriter&>(*storage), job.staged, *process);
    StorageWriter& writer = child ? static_cast<StorageWriter&>(*child) : *storage;
    auto pg = o.process_group ? o.process_group : group;
    const bool alone = o.no_dist || !pg;
    save_state_dict(job.staged.state_dict, writer, chosen, pg, o.coordinator_rank, alone, o.timeout);
  }

  /// The save's place in the chain, staging and the hand-over to the save
  /// thread (on the strand).
  asio::awaitable<PendingWrite> save(Request request, SaveOptions options) {
    // The chain first, before any co_await: a save asked for right after this
    // one waits for this one's write.
    auto previous = last;
    auto written = ckpt::detail::Event::create();
    last = written;
    struct FailUnlessHanded {
      std::shared_ptr<ckpt::detail::Event> event;
      ~FailUnlessHanded() {
        if (event) event->set(std::make_exception_ptr(Error("the save was not staged")));
      }
    } guard{written};
    if (previous && !previous->done()) {
      try {
        co_await previous->async_wait(asio::use_awaitable);
      } catch (...) {
        // its own PendingWrite carries its error
      }
    }
    if (closed) throw Error("the AsyncSaver is closed");
    const fs::path where =
        options.checkpoint_id ? *options.checkpoint_id
        : (options.storage_writer && typeid(*options.storage_writer) == typeid(FileSystemWriter))
            ? static_cast<FileSystemWriter*>(options.storage_writer)->path()
            : fs::path();
    Staged staged =
        stage(request, arena, config.staging.use_pinned_memory, config.staging.use_non_blocking_copy);
    arena_bytes = arena->size();
    arena_pinned = arena->locked();
    {
      std::lock_guard lock(mutex);
      if (stopping) throw Error("the AsyncSaver is closed");
      jobs.push_back(Job{std::move(staged), std::move(options), written});
    }
    guard.event.reset();
    cv.notify_one();
    co_return PendingWrite(written, where);
  }
};

AsyncSaver::AsyncSaver(executor_type executor, AsyncSaverConfig config)
    : impl_(std::make_shared<Impl>(executor, std::move(config))) {
  auto& impl = *impl_;
  auto base = impl.config.process_group ? impl.config.process_group : dist::default_process_group();
  if (base && base->rank_info.global_world_size > 1) {
    impl.group = impl.config.own_group
                     ? dist::new_group(base, fmt::format("ckpt-dcp-async-saver-{}",
                                                         base->next_sequence("ckpt-dcp-async-saver")))
                     : base;
  }
  const RankInfo rank = impl.group ? impl.group->rank_info : RankInfo{0, 1};
  impl.process =
      std::make_unique<CheckpointProcess>(impl.io.get_executor(), rank, impl.config.process,
                                          CheckpointWriterConfig{}, BarrierConfig{}, impl.config.writer);
  impl.io_thread = std::thread([this_impl = impl_.get()] { this_impl->io.run(); });
  try {
    impl.save_thread = std::thread([this_impl = impl_.get()] { this_impl->run_jobs(); });
  } catch (...) {
    impl.process->close();
    impl.work.reset();
    impl.io.stop();
    impl.io_thread.join();
    throw;
  }
}

AsyncSaver::~AsyncSaver() {
  try {
    close();
  } catch (...) {
  }
}

void AsyncSaver::do_save(StateDict state_dict, SaveOptions options,
                         asio::any_completion_handler<SaveSignature> handler) {
  auto ex = asio::get_associated_executor(handler, impl_->user_strand);
  auto complete = [ex, handler = std::move(handler)](std::exception_ptr e, PendingWrite w) mutable {
    asio::dispatch(
        ex, [h = std::move(handler), e, w = std::move(w)]() mutable { std::move(h)(e, std::move(w)); });
  };
  Request request;
  std::unique_lock spawning(impl_->spawn_mutex);
  try {
    if (impl_->close_started) throw Error("the AsyncSaver is closed");
    if (!options.checkpoint_id && !options.storage_writer)
      throw Error("dcp::AsyncSaver::async_save needs a checkpoint_id or a storage_writer");
    // On the caller's thread: device tensors made exact on its streams, and a
    // fence after them, which staging (on another thread) waits for.
    auto [flat, paths] = flatten_state_dict(state_dict);
    std::vector<at::Tensor> on_device;
    for (auto& [fqn, value] : flat) {
      if (auto* t = std::get_if<at::Tensor>(&value)) {
        if (t->defined() && !t->device().is_cpu()) on_device.push_back(*t = exact_on_device(*t));
      } else if (auto* st = std::get_if<ShardedTensor>(&value)) {
        ShardedTensor copy = *st;
        bool any = false;
        for (auto& shard : copy.local_shards())
          if (shard.tensor.defined() && !shard.tensor.device().is_cpu()) {
            on_device.push_back(shard.tensor = exact_on_device(shard.tensor));
            any = true;
          }
        if (any) value = std::move(copy);
      }
    }
    if (!on_device.empty()) {
      c10::impl::GenericList list(c10::TensorType::get());
      for (const auto& t : on_device) list.push_back(t);
      request.fences = std::make_shared<ckpt::detail::DeviceFences>(c10::IValue(list));
    }
    request.flat = std::move(flat);
    request.paths = std::move(paths);
  } catch (...) {
    spawning.unlock();
    complete(std::current_exception(), PendingWrite{});
    return;
  }
  // Under the lock: close() has not begun, so the strand will run it.
  asio::co_spawn(
      impl_->strand,
      [impl = impl_, request = std::move(request), options = std::move(options)]() mutable {
        return impl->save(std::move(request), std::move(options));
      },
      std::move(complete));
}

SaveFutures AsyncSaver::save(const StateDict& state_dict, const SaveOptions& options) {
  ckpt::detail::SaveFuturesHandler<PendingWrite> handler;
  SaveFutures futures = handler.futures();
  // Completed wherever the save completes (the system executor): no thread of
  // the caller's executor needs to run (the caller may be the one that runs
  // it, blocked on the futures), and a closed saver still answers.
  async_save(state_dict, options, asio::bind_executor(asio::system_executor(), handler));
  return futures;
}

void AsyncSaver::close() {
  auto impl = impl_;
  if (std::this_thread::get_id() == impl->save_thread.get_id())
    throw Error("AsyncSaver::close() from the save thread (a PendingWrite's completion without an executor)");
  {
    std::lock_guard spawning(impl->spawn_mutex);
    if (impl->close_started.exchange(true)) return;
  }
  // The chain belongs to the strand: mark it closed there and learn the last write.
  auto last = asio::post(impl->strand, asio::use_future([impl] {
                           impl->closed = true;
                           return impl->last;
                         }))
                  .get();
  // Every wait of a save is bounded (the child's write timeout, the group's
  // timeout at each step): the last write finishes.
  if (last) last->wait();
  {
    std::lock_guard lock(impl->mutex);
    impl->stopping = true;
  }
  impl->cv.notify_all();
  if (impl->save_thread.joinable()) impl->save_thread.join();
  if (impl->process) impl->process->close();
  impl->work.reset();
  impl->io.stop();
  if (impl->io_thread.joinable()) impl->io_thread.join();
  impl->arena->release();
  impl->arena_bytes = 0;
}

std::uint64_t AsyncSaver::arena_size() const {
  return impl_->arena_bytes;
}
bool AsyncSaver::pinned() const {
  return impl_->arena_pinned;
}
int AsyncSaver::writer_pid() const {
  return impl_->process ? impl_->process->pid() : -1;
}
std::shared_ptr<dist::ProcessGroupHandle> AsyncSaver::process_group() const {
  return impl_->group;
}

}  // namespace ckpt::dcp
