// Staging into the arena, on a strand that owns it:
//   1. lay the file out (plan_layout: pickle, records, offsets; no tensor byte
//      is read);
//   2. grow the arena if this file is larger than any before (allocated,
//      touched and locked once, then kept);
//   3. copy every record — local header (CRC zero: the child computes CRCs),
//      then its data — to its offset; large state dicts with two threads;
//      tensors on an accelerator are copied device→host on a side stream after
//      the trainer's queued work (device_copy.hpp), non-blocking into the
//      arena registered with the driver, then the stream is synchronised;
//   4. describe the image (records, central directory offset) and build the
//      staged StateDict, whose tensors point into the arena.
#include <ckpt/staging.hpp>

#include "async/arena.hpp"
#include "async/device_copy.hpp"
#include "core/log_once.hpp"
#include "format/plan_layout.hpp"
#include "format/zip_image.hpp"

#include <fmt/format.h>

#include <ATen/ATen.h>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/system_executor.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_future.hpp>

#include <atomic>
#include <cstring>
#include <future>
#include <unordered_map>

namespace asio = boost::asio;

namespace ckpt {

StagingFences StagingFences::record(const StateDict& state_dict) {
  StagingFences out;
  auto fences = std::make_shared<detail::DeviceFences>(state_dict.to_ivalue());
  if (!fences->empty()) out.fences_ = std::move(fences);
  return out;
}

bool StagingFences::empty() const {
  return !fences_;
}

void CheckpointStager::record_and_stage(StateDict state_dict,
                                        asio::any_completion_handler<Signature> handler) {
  // On the caller's thread: what it has queued on its devices' streams is what
  // staging must see (a failure to record is the staging's error).
  StagingFences fences;
  try {
    fences = StagingFences::record(state_dict);
  } catch (...) {
    auto ex = asio::get_associated_executor(handler, asio::system_executor());
    asio::dispatch(ex, [h = std::move(handler), e = std::current_exception()]() mutable {
      std::move(h)(e, StagedCheckpoint{});
    });
    return;
  }
  do_stage(std::move(state_dict), std::move(fences), std::move(handler));
}

StagedCheckpoint CheckpointStager::stage(const StateDict& state_dict) {
  std::promise<StagedCheckpoint> done;
  auto result = done.get_future();
  async_stage(state_dict, [&done](std::exception_ptr e, StagedCheckpoint staged) {
    if (e)
      done.set_exception(e);
    else
      done.set_value(std::move(staged));
  });
  return result.get();
}

std::uint64_t checkpoint_file_size(const StateDict& state_dict) {
  const auto layout = detail::plan_layout(state_dict.to_ivalue(), /*defer_device_copies=*/true);
  return detail::zip_image(layout).file_size();
}

namespace {

constexpr std::uint64_t kParallelCopy = std::uint64_t{64} << 20;  // below this one thread is faster

/// The staged state: `value` with every tensor replaced by one over the arena.
class StagedView {
 public:
  StagedView(const detail::Layout& layout, std::shared_ptr<detail::Arena> arena)
      : layout_(layout), arena_(std::move(arena)) {}

  c10::IValue value(const c10::IValue& v) {
    if (v.isTensor()) return tensor(v.toTensor());
    if (v.isGenericDict()) {
      auto src = v.toGenericDict();
      c10::impl::GenericDict out(src.keyType(), src.valueType());
      for (const auto& e : src) out.insert(e.key(), value(e.value()));
      return out;
    }
    if (v.isList()) {
      auto src = v.toList();
      c10::impl::GenericList out(src.elementType());
      for (const auto& e : src) out.push_back(value(e));
      return out;
    }
    if (v.isTuple()) {
      std::vector<c10::IValue> out;
      for (const auto& e : v.toTupleRef().elements()) out.push_back(value(e));
      return c10::ivalue::Tuple::create(std::move(out));
    }
    return v;
  }

 private:
  at::Tensor tensor(at::Tensor t) {
    if (!t.defined()) return t;
    if (t.is_conj() || t.is_neg()) t = t.resolve_conj().resolve_neg();
    const std::size_t index = layout_.record_of_storage.at(t.storage().unsafeGetStorageImpl());
    auto [it, fresh] = storages_.try_emplace(index);
    if (fresh) {
      const auto& rec = layout_.records[index];
      auto* keep = new std::shared_ptr<detail::Arena>(arena_);
      c10::DataPtr ptr(
          arena_->data() + rec.data_offset, keep,
          [](void* ctx) { delete static_cast<std::shared_ptr<detail::Arena>*>(ctx); },
          c10::Device(c10::kCPU));
      it->second = at::Storage(at::Storage::use_byte_size_t(), static_cast<std::size_t>(rec.size),
                               std::move(ptr), nullptr, false);
    }
    return at::empty({0}, at::TensorOptions().dtype(t.scalar_type()))
        .set_(it->second, t.storage_offset(), t.sizes(), t.strides());
  }

  const detail::Layout& layout_;
  std::shared_ptr<detail::Arena> arena_;
  std::unordered_map<std::size_t, at::Storage> storages_;
};

}  // namespace

struct DefaultStager::Impl {
  CheckpointStagerConfig config;
  asio::thread_pool pool{2};
  asio::strand<asio::thread_pool::executor_type> strand{pool.get_executor()};
  std::shared_ptr<detail::Arena> arena;
  // `arena` belongs to the strand: staging, reserve() and close() all touch
  // it there. What other threads may read is mirrored in atomics.
  std::atomic<std::uint64_t> arena_bytes{0};
  std::atomic<bool> arena_pinned{false};
  std::atomic<bool> closed{false};

  explicit Impl(CheckpointStagerConfig c)
      : config(c), arena(std::make_shared<detail::Arena>(c.use_pinned_memory)) {
    static std::atomic<bool> no_accelerator{false};
    if ((config.use_pinned_memory || config.use_non_blocking_copy) && !at::hasCUDA())
      detail::log_once(
          no_accelerator, LogLevel::info,
          "no CUDA device: staging copies from CPU tensors; pinned memory means mlock of the arena "
          "where the limits allow, and copies are plain copies");
  }

  std::shared_ptr<detail::Arena> current_arena() {
    if (closed || !arena) throw Error("the stager is closed");
    return arena;
  }

  /// Runs `f` on the strand and waits for it: at once when already there
  /// (a completion handler that stages again), else posted.
  template <class F>
  auto on_strand(F f) -> decltype(f()) {
    if (strand.running_in_this_thread()) return f();
    return asio::post(strand, asio::use_future(std::move(f))).get();
  }

  void grow(const std::shared_ptr<detail::Arena>& a, std::uint64_t bytes) {
    a->reserve(bytes);
    arena_bytes = a->size();
    arena_pinned = a->locked();
  }

  /// Steps 1–4, on the strand (or the caller's thread without async staging).
  StagedCheckpoint stage(const StateDict& state_dict, const detail::DeviceFences& fences) {
    auto a = current_arena();
    detail::Layout layout = detail::plan_layout(state_dict.to_ivalue(), /*defer_device_copies=*/true);
    grow(a, layout.cd_offset);
    const bool from_device = detail::has_device_records(layout);
    if (from_device && config.use_pinned_memory) a->register_with_device();

    // The image: local headers (CRC fields zero: the child computes the CRCs
    // as it writes), then each record's data at its offset.
    detail::ZipImage zip = detail::zip_image(layout);
    std::byte* base = a->data();
    zip.put_local_headers(base);
    const auto copy_range = [&](std::size_t from, std::size_t to) {
      for (std::size_t i = from; i < to; ++i) {
        const auto& r = layout.records[i];
        if (r.size > 0 && r.data) std::memcpy(base + r.data_offset, r.data, r.size);
      }
    };
    const std::size_t n = layout.records.size();
    if (layout.cd_offset >= kParallelCopy && n > 1) {
      // Split the records in two halves of about equal bytes; the second half
      // is copied by another thread of the pool.
      std::size_t split = 0;
      while (split < n && layout.records[split].data_offset < layout.cd_offset / 2) ++split;
      std::promise<void> other;
      auto other_done = other.get_future();
      asio::post(pool, [&] {
        try {
          copy_range(split, n);
          other.set_value();
        } catch (...) {
          other.set_exception(std::current_exception());
        }
      });
      copy_range(0, split);
      other_done.get();
    } else {
      copy_range(0, n);
    }
    if (from_device) detail::copy_device_records(layout, base, fences, config.use_non_blocking_copy);

    StagedCheckpoint staged;
    staged.arena = a;
    staged.cd_offset = zip.cd_offset();
    staged.records = zip.records();
    staged.state_dict = StateDict::from_ivalue(StagedView(layout, a).value(state_dict.to_ivalue()));
    return staged;
  }
};

DefaultStager::DefaultStager(CheckpointStagerConfig config) : impl_(std::make_shared<Impl>(config)) {}

DefaultStager::~DefaultStager() {
  try {
    close();
  } catch (...) {
  }
}

void DefaultStager::reserve(std::uint64_t bytes) {
  if (impl_->closed) throw Error("the stager is closed");
  // On the strand, so that the arena is never remapped under a staging copy.
  impl_->on_strand([impl = impl_.get(), bytes] { impl->grow(impl->current_arena(), bytes); });
}
void DefaultStager::reserve_for(const StateDict& state_dict) {
  reserve(checkpoint_file_size(state_dict));
}
std::uint64_t DefaultStager::arena_size() const {
  return impl_->arena_bytes;
}
bool DefaultStager::pinned() const {
  return impl_->arena_pinned;
}

void DefaultStager::close() {
  if (impl_->closed.exchange(true)) return;
  // Staged views may still point into the arena: the memory goes with the last
  // of them (the arena is shared); the stager lets go of it now, on the strand,
  // after any staging already posted there.
  asio::post(impl_->strand, [impl = impl_] {
    impl->arena.reset();
    impl->arena_bytes = 0;
  });
  impl_->pool.join();
}

void DefaultStager::do_stage(StateDict state_dict, StagingFences fences,
                             asio::any_completion_handler<Signature> handler) {
  auto run = [impl = impl_, sd = std::move(state_dict), fences = std::move(fences),
              handler = std::move(handler)]() mutable {
    std::exception_ptr error;
    StagedCheckpoint staged;
    try {
      staged = impl->stage(sd, fences.get() ? *fences.get() : detail::DeviceFences());
    } catch (...) {
      error = std::current_exception();
    }
    // Completions run on the strand, unless the stager is closed (its threads
    // are gone): then on the system executor.
    const asio::any_io_executor fallback =
        impl->closed ? asio::any_io_executor(asio::system_executor()) : asio::any_io_executor(impl->strand);
    auto ex = asio::get_associated_executor(handler, fallback);
    asio::dispatch(ex, [handler = std::move(handler), error, staged = std::move(staged)]() mutable {
      std::move(handler)(error, std::move(staged));
    });
  };
  if (impl_->closed) {
    run();  // fails with "the stager is closed"
  } else if (impl_->config.use_async_staging) {
    asio::post(impl_->strand, std::move(run));
  } else {
    // Without async staging the caller waits, but the arena is still only
    // touched on the strand.
    impl_->on_strand(std::move(run));
  }
}

}  // namespace ckpt
