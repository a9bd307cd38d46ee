// A one-shot completion event with any number of waiters: what a pending write
// or a starting child process hands out.
//
// - A waiter completes on its handler's associated executor (through
//   dispatch); a handler without one runs on the thread that sets the event.
// - A parked waiter keeps outstanding work on its executor, so an io_context
//   whose only business is the wait does not run out of work and return.
// - A waiter honours per-operation cancellation (terminal, partial or total):
//   cancelled, it completes with operation_aborted at once and the event is
//   unaffected (the write it stands for goes on). That is what makes
//   `written.async_wait(use_awaitable) || timer.async_wait(use_awaitable)`
//   return when the timer fires.
// - Events are owned by shared pointers; a waiter holds its event.
#pragma once

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/async_result.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <list>
#include <memory>
#include <mutex>

namespace ckpt::detail {

class Event : public std::enable_shared_from_this<Event> {
 public:
  using Signature = void(std::exception_ptr);
  using Handler = boost::asio::any_completion_handler<Signature>;

  static std::shared_ptr<Event> create() { return std::shared_ptr<Event>(new Event()); }
  ~Event();

  /// Completes every waiter, now and later, with `error` (null: success).
  /// Only the first call counts.
  void set(std::exception_ptr error = nullptr);
  /// Completes `handler` once the event is set (at once when it is), or with
  /// operation_aborted when its cancellation slot is emitted first.
  void add_waiter(Handler handler);
  /// add_waiter for any completion token; the operation holds the event.
  template <boost::asio::completion_token_for<Signature> Token>
  auto async_wait(Token&& token) {
    return boost::asio::async_initiate<Token, Signature>(
        [self = shared_from_this()](auto handler) { self->add_waiter(Handler(std::move(handler))); }, token);
  }
  /// Blocks until set; returns its error (null: success), or throws nothing.
  std::exception_ptr wait();
  /// Blocks at most `timeout`; whether it was set.
  bool wait_for(std::chrono::milliseconds timeout);
  bool done() const;
  std::exception_ptr error() const;

 private:
  struct Waiter;
  Event() = default;
  void cancel(std::uint64_t id);

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
  std::uint64_t next_id_ = 0;
  std::list<std::shared_ptr<Waiter>> waiters_;
};

}  // namespace ckpt::detail
