// When a public blocking call may wait for work it posts to a strand.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>

namespace ckpt::detail {

/// Whether a thread other than the caller can run handlers of `ex` now: false
/// when its io_context has stopped, or when the calling thread itself runs it
/// (an io_context or a thread pool). Then posting to a strand of `ex` and
/// waiting for it would wait for nothing, or for itself: the caller does the
/// strand's work itself instead.
inline bool others_run(const boost::asio::any_io_executor& ex) {
  if (auto* io = ex.target<boost::asio::io_context::executor_type>())
    return !io->context().stopped() && !io->running_in_this_thread();
  if (auto* pool = ex.target<boost::asio::thread_pool::executor_type>())
    return !pool->running_in_this_thread();
  return true;
}

}  // namespace ckpt::detail
