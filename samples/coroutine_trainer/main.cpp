// An Asio coroutine trainer that checkpoints asynchronously.
//
// usage: coroutine_trainer [DIR]   (default: a fresh temporary directory)
//
// Trains an MLP with Adam; every 25 steps it `co_await`s a save, which resumes
// as soon as the state is staged (copied into shared memory): training goes on
// while the ckpt-writer child makes the checkpoint durable. One line per save:
// how long training was blocked, how long the durable write took, GB/s. Then a
// "crash" at step 110, a restart that resumes from the newest checkpoint, and
// two checks: the restored state equals what was saved, and training on from
// it ends bit-identical to a run that never stopped.
#include "../common/training.hpp"

#include <boost/asio.hpp>

#include <chrono>
#include <cstdio>

namespace asio = boost::asio;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kSteps = 150;
constexpr int kEvery = 25;
constexpr int kCrashAt = 110;
constexpr double kLr = 1e-3;
constexpr std::int64_t kWidth = 1024;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// 1. Reports a save once it is durable, while training goes on. A plain
//    callback runs on the checkpointer's own I/O thread the moment the child
//    answers, so the time it takes is the write's, not the training step's.
void report(const ckpt::PendingWrite& written, Clock::time_point start, double blocked) {
  written.async_wait([written, start, blocked](std::exception_ptr e) {
    const double total = seconds_since(start);
    if (e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        std::printf("save to %s FAILED: %s\n", written.path().c_str(), x.what());
      }
      return;
    }
    const auto bytes = fs::file_size(written.path() / ckpt::checkpoint_file_name(0));
    std::printf("saved %s: training blocked %.1f ms; durable after %.1f ms (%.2f GB/s)\n",
                written.path().c_str(), blocked * 1e3, total * 1e3, static_cast<double>(bytes) / total / 1e9);
  });
}

// 2. The run that crashes.
asio::awaitable<void> train_until_crash(ckpt::AsyncCheckpointer& ck, const fs::path& dir,
                                        sample::SavedStates& saved) {
  auto ex = co_await asio::this_coro::executor;
  torch::manual_seed(0);
  auto model = sample::make_model(kWidth);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(kLr));
  for (int step = 1; step <= kCrashAt; ++step) {
    sample::train_step(model, opt, step);
    if (step % kEvery == 0) {
      const auto start = Clock::now();
      auto written = co_await ck.async_save(dir / ("step_" + std::to_string(step)),
                                            sample::state_of(model, opt, kLr, step), {}, asio::use_awaitable);
      const double blocked = seconds_since(start);
      // Staged: the model may change now; remember what this checkpoint holds.
      for (const auto& p : model->named_parameters()) saved[step][p.key()] = p.value().detach().clone();
      report(written, start, blocked);
    }
    co_await asio::post(ex, asio::use_awaitable);  // let completions run between steps
  }
  std::printf("crash at step %d\n", kCrashAt);
}

}  // namespace

int main(int argc, char** argv) try {
  const bool temporary = argc < 2;
  const fs::path dir = temporary ? sample::temporary_directory("coroutine-trainer") : fs::path(argv[1]);
  fs::create_directories(dir);
  sample::SavedStates saved;

  {
    asio::io_context io;                        // the trainer's
    auto ck = ckpt::make_async_checkpointer();  // its own I/O thread; starts the ckpt-writer child
    std::exception_ptr failed;
    asio::co_spawn(io, train_until_crash(*ck, dir, saved), [&](std::exception_ptr e) { failed = e; });
    io.run();
    if (failed) std::rethrow_exception(failed);
    ck->close();  // the writes in flight finish; the child exits
  }

  // 3. Restart, as a fresh process would, and check the state.
  const bool ok = sample::resume_and_check(dir, saved, kWidth, kLr, kSteps);
  if (temporary) fs::remove_all(dir);
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "coroutine_trainer: %s\n", e.what());
  return 1;
}
