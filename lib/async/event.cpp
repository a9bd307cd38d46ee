#include "async/event.hpp"

#include <boost/asio/any_completion_executor.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/system_executor.hpp>
#include <boost/system/system_error.hpp>

namespace asio = boost::asio;

namespace ckpt::detail {

namespace {

using WorkExecutor = asio::any_completion_executor;

/// The handler's executor, tracking outstanding work while the waiter is parked.
WorkExecutor tracked_executor_of(const Event::Handler& handler) {
  WorkExecutor ex = asio::get_associated_executor(handler, asio::system_executor());
  return asio::prefer(ex, asio::execution::outstanding_work.tracked);
}

}  // namespace

struct Event::Waiter {
  // Constructed, never assigned: Boost 1.81's any_completion_handler move
  // assignment recurses without end.
  Waiter(std::uint64_t i, Handler h, WorkExecutor w, bool slot)
      : id(i), handler(std::move(h)), work(std::move(w)), has_slot(slot) {}
  std::uint64_t id;
  Handler handler;
  WorkExecutor work;  // keeps the handler's executor busy until completion
  bool has_slot;
};

namespace {

/// Runs a handler with `error` on its executor, dispatched. When
/// `from_cancellation` (inside the canceller's emit), it first hops through the
/// system executor, so that emit returns before the handler runs (a completion
/// executor cannot be told never to block, so it cannot be posted to). A
/// cancellation slot is cleared on the handler's side first: it belongs there.
void complete(Event::Handler handler, WorkExecutor work, bool has_slot, std::exception_ptr error,
              bool from_cancellation = false) {
  auto ex = asio::get_associated_executor(handler, asio::system_executor());
  auto run = [handler = std::move(handler), work = std::move(work), has_slot, error]() mutable {
    if (has_slot) asio::get_associated_cancellation_slot(handler).clear();
    auto h = std::move(handler);
    work = WorkExecutor();  // the work ends as the handler runs
    std::move(h)(error);
  };
  if (from_cancellation)
    asio::post(asio::system_executor(),
               [ex, run = std::move(run)]() mutable { asio::dispatch(ex, std::move(run)); });
  else
    asio::dispatch(ex, std::move(run));
}

}  // namespace

Event::~Event() = default;

void Event::set(std::exception_ptr error) {
  std::list<std::shared_ptr<Waiter>> waiters;
  {
    std::lock_guard lock(mutex_);
    if (done_) return;
    done_ = true;
    error_ = error;
    waiters.swap(waiters_);
  }
  cv_.notify_all();
  for (auto& w : waiters) complete(std::move(w->handler), std::move(w->work), w->has_slot, error);
}

void Event::add_waiter(Handler handler) {
  std::unique_lock lock(mutex_);
  if (done_) {
    auto error = error_;
    lock.unlock();
    complete(std::move(handler), WorkExecutor(), false, error);
    return;
  }
  auto slot = asio::get_associated_cancellation_slot(handler);
  auto work = tracked_executor_of(handler);
  auto waiter =
      std::make_shared<Waiter>(next_id_++, std::move(handler), std::move(work), slot.is_connected());
  if (slot.is_connected()) {
    std::weak_ptr<Event> self = weak_from_this();
    const std::uint64_t id = waiter->id;
    slot.assign([self, id](asio::cancellation_type type) {
      if (type == asio::cancellation_type::none) return;
      if (auto event = self.lock()) event->cancel(id);
    });
  }
  waiters_.push_back(std::move(waiter));
}

void Event::cancel(std::uint64_t id) {
  std::shared_ptr<Waiter> waiter;
  {
    std::lock_guard lock(mutex_);
    for (auto it = waiters_.begin(); it != waiters_.end(); ++it)
      if ((*it)->id == id) {
        waiter = std::move(*it);
        waiters_.erase(it);
        break;
      }
  }
  if (!waiter) return;  // set() took it first
  // Called from inside the slot's emit: the handler is posted, not run here.
  auto aborted = std::make_exception_ptr(boost::system::system_error(asio::error::operation_aborted));
  complete(std::move(waiter->handler), std::move(waiter->work), waiter->has_slot, aborted, true);
}

std::exception_ptr Event::wait() {
  std::unique_lock lock(mutex_);
  cv_.wait(lock, [&] { return done_; });
  return error_;
}

bool Event::wait_for(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  return cv_.wait_for(lock, timeout, [&] { return done_; });
}

bool Event::done() const {
  std::lock_guard lock(mutex_);
  return done_;
}

std::exception_ptr Event::error() const {
  std::lock_guard lock(mutex_);
  return error_;
}

}  // namespace ckpt::detail
