// The asynchronous save, as a coroutine on the checkpointer's strand:
//   0. take this save's place in the chain (before any co_await, so that a
//      save issued right after this one waits for it: the strand is released
//      at every co_await, and the arena must not be staged into while the
//      child still writes it);
//   1. wait for the previous save's write; if it failed and nobody has been
//      told through a save yet, fail this save with its error (once);
//   2. stop here if the save was cancelled;
//   3. co_await staging (the stager's strand owns the arena), ordered after the
//      work the caller had queued on its devices' current streams when it
//      asked for the save: the fences are recorded on its thread and handed to
//      the stager (this coroutine runs on the checkpointer's strand, whose
//      current streams are not the caller's);
//   4. hand the image to the writer child and complete with a PendingWrite:
//      the caller may now change its tensors; the write goes on.
#include <ckpt/async_checkpointer.hpp>

#include <ckpt/log.hpp>

#include "async/blocking.hpp"
#include "async/event.hpp"
#include "async/save_futures.hpp"

#include <fmt/format.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <future>
#include <optional>
#include <thread>

namespace asio = boost::asio;

namespace ckpt {

PendingWrite::PendingWrite(std::shared_ptr<detail::Event> event, std::filesystem::path path)
    : event_(std::move(event)), path_(std::move(path)) {}

void PendingWrite::wait() const {
  if (!event_) throw Error("waiting on an empty PendingWrite");
  if (auto e = event_->wait()) std::rethrow_exception(e);
}

bool PendingWrite::done() const {
  return event_ && event_->done();
}

void PendingWrite::do_wait(asio::any_completion_handler<Signature> handler) const {
  if (event_) return event_->add_waiter(std::move(handler));
  auto ex = asio::get_associated_executor(handler, asio::system_executor());
  asio::dispatch(ex, [h = std::move(handler)]() mutable {
    std::move(h)(std::make_exception_ptr(Error("waiting on an empty PendingWrite")));
  });
}

struct AsyncCheckpointer::Impl {
  // For the builder without an executor: an io_context and its thread. First,
  // so that it is destroyed last, after the strands and sockets that use it.
  std::unique_ptr<asio::io_context> own_context;
  std::unique_ptr<asio::executor_work_guard<asio::io_context::executor_type>> own_work;
  std::thread own_thread;

  asio::any_io_executor executor;
  asio::strand<asio::any_io_executor> strand;
  std::shared_ptr<CheckpointStager> stager;
  std::shared_ptr<CheckpointProcess> process;
  std::shared_ptr<CheckpointReader> reader;

  /// One save's write, in the chain of saves (touched on the strand only).
  struct Slot {
    std::shared_ptr<detail::Event> written = detail::Event::create();
    bool reported = false;  // its error was given to a later save
  };
  std::shared_ptr<Slot> last;  // on the strand
  bool closed = false;         // on the strand
  std::atomic<bool> close_started{false};

  explicit Impl(asio::any_io_executor ex) : executor(ex), strand(asio::make_strand(ex)) {}

  /// Cancellation of one save, recorded as it is emitted (the coroutine may
  /// not have started yet, and would then miss the signal).
  struct Cancel {
    std::atomic<bool> cancelled{false};
    asio::cancellation_signal signal;
  };

  /// The save, on the strand. A static coroutine over a shared owner: the
  /// frame holds `self`, never a raw Impl*.
  static asio::awaitable<PendingWrite> save(std::shared_ptr<Impl> self, std::filesystem::path path,
                                            StateDict state_dict, Kwargs kwargs,
                                            std::shared_ptr<Cancel> cancel, StagingFences fences,
                                            std::exception_ptr fence_error) {
    if (self->closed) throw Error(fmt::format("cannot save {}: the checkpointer is closed", path.string()));
    // 0.
    auto previous = self->last;
    auto mine = std::make_shared<Slot>();
    self->last = mine;
    struct Release {  // a save that ends before its write releases the chain
      std::shared_ptr<detail::Event> event;
      bool handed = false;
      ~Release() {
        if (!handed) event->set();
      }
    } release{mine->written};
    // 1.
    if (previous) {
      if (!previous->written->done()) {
        try {
          co_await previous->written->async_wait(asio::use_awaitable);
        } catch (...) {
        }
      }
      if (auto error = previous->written->error(); error && !previous->reported) {
        previous->reported = true;
        std::rethrow_exception(error);
      }
    }
    // 2.
    auto cs = co_await asio::this_coro::cancellation_state;
    if (cancel->cancelled || cs.cancelled() != asio::cancellation_type::none)
      throw boost::system::system_error(asio::error::operation_aborted,
                                        "save of " + path.string() + " cancelled");
    // 3. After the fences the caller's thread recorded.
    if (fence_error) std::rethrow_exception(fence_error);
    StagedCheckpoint staged =
        co_await self->stager->async_stage(state_dict, std::move(fences), asio::use_awaitable);
    // 4.
    auto event = mine->written;
    release.handed = true;
    self->process->async_write(std::move(staged), path, std::move(kwargs),
                               [event](std::exception_ptr e) { event->set(e); });
    co_return PendingWrite(event, path);
  }
};

AsyncCheckpointer::AsyncCheckpointer(executor_type executor,
                                     std::shared_ptr<CheckpointStager> checkpoint_stager,
                                     std::shared_ptr<CheckpointProcess> checkpoint_process,
                                     std::shared_ptr<CheckpointReader> reader)
    : impl_(std::make_shared<Impl>(executor)) {
  if (!checkpoint_stager || !checkpoint_process || !reader)
    throw Error("AsyncCheckpointer needs a stager, a process and a reader");
  impl_->stager = std::move(checkpoint_stager);
  impl_->process = std::move(checkpoint_process);
  impl_->reader = std::move(reader);
}

AsyncCheckpointer::~AsyncCheckpointer() {
  try {
    close();
  } catch (...) {
  }
}

void AsyncCheckpointer::do_save(std::filesystem::path path, StateDict state_dict, Kwargs kwargs,
                                asio::any_completion_handler<SaveSignature> handler) {
  // On the caller's thread: the work it has queued on its devices' streams is
  // what staging must see (reported, if it fails, as the save's error).
  StagingFences fences;
  std::exception_ptr fence_error;
  try {
    fences = StagingFences::record(state_dict);
  } catch (...) {
    fence_error = std::current_exception();
  }
  auto cancel = std::make_shared<Impl::Cancel>();
  auto slot = asio::get_associated_cancellation_slot(handler);
  if (slot.is_connected())
    slot.assign([cancel](asio::cancellation_type type) {
      if (type == asio::cancellation_type::none) return;
      cancel->cancelled = true;
      cancel->signal.emit(type);
    });
  // The completion handler owns `cancel` too: co_spawn's own cancellation
  // handler lives in cancel->signal until the operation completes, which can be
  // after the coroutine frame (the other owner) is gone.
  auto ex = asio::get_associated_executor(handler, impl_->strand);
  auto complete = [cancel, handler = std::move(handler)](std::exception_ptr e, PendingWrite w) mutable {
    std::move(handler)(e, std::move(w));
  };
  asio::co_spawn(
      impl_->strand,
      Impl::save(impl_, std::move(path), std::move(state_dict), std::move(kwargs), cancel, std::move(fences),
                 fence_error),
      asio::bind_cancellation_slot(cancel->signal.slot(), asio::bind_executor(ex, std::move(complete))));
}

SaveFutures AsyncCheckpointer::save(const std::filesystem::path& path, const StateDict& state_dict,
                                    const Kwargs& kwargs) {
  detail::SaveFuturesHandler<PendingWrite> handler;
  SaveFutures futures = handler.futures();
  async_save(path, state_dict, kwargs, handler);
  return futures;
}

StateDict AsyncCheckpointer::load(const std::filesystem::path& path, const LoadOptions& options,
                                  const Kwargs& kwargs) {
  return load_checked(*impl_->reader, path, options, kwargs);
}

void AsyncCheckpointer::close() {
  if (impl_->close_started.exchange(true)) return;
  // The chain of saves belongs to the strand: close it there (at once when
  // called on it), and learn which write is the last.
  auto impl = impl_;
  auto mark_closed = [impl] {
    impl->closed = true;
    return impl->last;
  };
  // When no other thread can run the strand (its context stopped, or this
  // thread is the one that runs it), this thread reads the chain itself.
  std::shared_ptr<Impl::Slot> last;
  if (impl->strand.running_in_this_thread() || !detail::others_run(impl->executor)) {
    last = mark_closed();
  } else {
    auto marked = asio::post(impl->strand, asio::use_future(mark_closed));
    // Bounded: an executor that nobody runs any more never answers; the
    // stager and the child are closed all the same.
    const auto bound = impl->process->config().subprocess_shutdown_timeout;
    if (marked.wait_for(bound) == std::future_status::ready)
      last = marked.get();
    else
      log(LogLevel::warning, fmt::format("AsyncCheckpointer::close: its executor did not run within {} ms; "
                                         "closing without waiting for a write in progress",
                                         bound.count()));
  }
  // A write in progress completes first (bounded by the write's own timeout);
  // then the child is asked to exit.
  if (last) last->written->wait_for(impl_->process->config().write_timeout);
  impl_->stager->close();
  impl_->process->close();
  if (impl_->own_context) {
    impl_->own_work.reset();
    impl_->own_context->stop();
    if (impl_->own_thread.joinable()) impl_->own_thread.join();
  }
}

AsyncCheckpointer::executor_type AsyncCheckpointer::get_executor() const {
  return impl_->executor;
}
CheckpointStager& AsyncCheckpointer::stager() const {
  return *impl_->stager;
}
CheckpointProcess& AsyncCheckpointer::process() const {
  return *impl_->process;
}

std::unique_ptr<AsyncCheckpointer> make_async_checkpointer(asio::any_io_executor executor,
                                                           const CheckpointerConfig& config,
                                                           std::optional<RankInfo> rank_info,
                                                           WriterOptions writer_options) {
  const RankInfo rank = rank_info ? *rank_info : rank_info_from_env();
  auto stager = std::make_shared<DefaultStager>(config.staging_config);
  auto process =
      std::make_shared<CheckpointProcess>(executor, rank, config.process_config, config.writer_config,
                                          config.barrier_config, std::move(writer_options));
  auto reader = std::make_shared<CheckpointReader>(rank);
  return std::make_unique<AsyncCheckpointer>(executor, std::move(stager), std::move(process),
                                             std::move(reader));
}

std::unique_ptr<AsyncCheckpointer> make_async_checkpointer(const CheckpointerConfig& config,
                                                           std::optional<RankInfo> rank_info,
                                                           WriterOptions writer_options) {
  auto context = std::make_unique<asio::io_context>();
  auto work =
      std::make_unique<asio::executor_work_guard<asio::io_context::executor_type>>(context->get_executor());
  std::thread thread([ctx = context.get()] { ctx->run(); });
  auto ck = make_async_checkpointer(context->get_executor(), config, rank_info, std::move(writer_options));
  ck->impl_->own_context = std::move(context);
  ck->impl_->own_work = std::move(work);
  ck->impl_->own_thread = std::move(thread);
  return ck;
}

}  // namespace ckpt
