// A one-shot completion event with any number of waiters: what a pending write
// or a starting child process hands out. Waiters complete on their own
// associated executors (a callback without one runs on the thread that sets
// the event).
#pragma once

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/dispatch.hpp>

#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <vector>

namespace ckpt::detail {

class Event {
 public:
  using Signature = void(std::exception_ptr);
  using Handler = boost::asio::any_completion_handler<Signature>;

  /// Completes every waiter, now and later, with `error` (null: success).
  /// Only the first call counts.
  void set(std::exception_ptr error = nullptr) {
    std::vector<Handler> waiters;
    {
      std::lock_guard lock(mutex_);
      if (done_) return;
      done_ = true;
      error_ = error;
      waiters.swap(waiters_);
    }
    cv_.notify_all();
    for (auto& h : waiters) complete(std::move(h), error);
  }

  template <boost::asio::completion_token_for<Signature> Token>
  auto async_wait(Token&& token) {
    return boost::asio::async_initiate<Token, Signature>(
        [this](auto handler) {
          std::unique_lock lock(mutex_);
          if (!done_) {
            waiters_.emplace_back(std::move(handler));
            return;
          }
          auto error = error_;
          lock.unlock();
          complete(Handler(std::move(handler)), error);
        },
        token);
  }

  /// Blocks until set; returns its error (null: success), or throws nothing.
  std::exception_ptr wait() {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return done_; });
    return error_;
  }
  /// Blocks at most `timeout`; whether it was set.
  bool wait_for(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] { return done_; });
  }
  bool done() const {
    std::lock_guard lock(mutex_);
    return done_;
  }
  std::exception_ptr error() const {
    std::lock_guard lock(mutex_);
    return error_;
  }

 private:
  static void complete(Handler h, std::exception_ptr error) {
    auto ex = boost::asio::get_associated_executor(h);
    boost::asio::dispatch(ex, [h = std::move(h), error]() mutable { std::move(h)(error); });
  }

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
  std::vector<Handler> waiters_;
};

}  // namespace ckpt::detail
