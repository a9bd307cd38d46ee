// An io_context run by threads of a test's own. Include after
// <boost/test/unit_test.hpp> (it reports through Boost.Test).
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <exception>
#include <future>
#include <string>
#include <vector>

namespace ckpt::test {

/// An io_context run by `n` threads of their own, kept running by a work guard
/// until destruction; then it is let run dry (and stopped only if it does not
/// within a minute, which is an error). A handler that throws is recorded as
/// an error and its thread goes on, so one fault does not stall every later
/// wait.
class IoThreads {
 public:
  IoThreads(boost::asio::io_context& io, int n) : io_(io), work_(io.get_executor()) {
    for (int i = 0; i < n; ++i) runs_.push_back(std::async(std::launch::async, [this] { return run(); }));
  }
  ~IoThreads() {
    work_.reset();
    for (auto& r : runs_) {
      if (r.wait_for(std::chrono::seconds(60)) != std::future_status::ready) {
        BOOST_ERROR("the io_context did not run dry");
        io_.stop();
      }
      for (const auto& e : r.get()) BOOST_ERROR("a handler threw on an io thread: " << e);
    }
  }
  IoThreads(const IoThreads&) = delete;
  IoThreads& operator=(const IoThreads&) = delete;

 private:
  std::vector<std::string> run() {
    std::vector<std::string> thrown;
    for (;;) {
      try {
        io_.run();
        return thrown;
      } catch (const std::exception& e) {
        thrown.emplace_back(e.what());
      }
    }
  }

  boost::asio::io_context& io_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  std::vector<std::future<std::vector<std::string>>> runs_;
};

/// An io_context of its own, run by one thread of its own.
struct IoThread {
  boost::asio::io_context io;
  IoThreads threads{io, 1};
  boost::asio::any_io_executor executor() { return io.get_executor(); }
};

}  // namespace ckpt::test
