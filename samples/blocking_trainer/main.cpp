// A blocking training loop that checkpoints through the futures form of the
// asynchronous checkpointer, and resumes from its newest checkpoint.
//
// usage: blocking_trainer [DIR]   (default: a fresh temporary directory)
//
// Trains a small MLP with Adam and saves model and optimizer every 50 steps
// into DIR/step_<n>/: `save()` returns {staged, written} futures (upstream's
// (stage_future, write_future)); the loop waits for `staged` only, so training
// overlaps the durable write. One line per save: bytes, seconds, GB/s. At step
// 220 it "crashes"; a fresh model and optimizer resume from the newest
// checkpoint, the restored state must equal what was saved, and training on
// from it must end bit-identical to a run that never stopped.
#include "../common/training.hpp"

#include <chrono>
#include <cstdio>

namespace fs = std::filesystem;

namespace {

constexpr int kSteps = 300;
constexpr int kEvery = 50;
constexpr int kCrashAt = 220;
constexpr double kLr = 0.01;
constexpr std::int64_t kWidth = 64;

}  // namespace

int main(int argc, char** argv) try {
  const bool temporary = argc < 2;
  const fs::path dir = temporary ? sample::temporary_directory("blocking-trainer") : fs::path(argv[1]);
  fs::create_directories(dir);

  // 1. The run that crashes. The checkpointer runs its own I/O thread and the
  //    ckpt-writer child; rank from RANK/WORLD_SIZE, else {0, 1}.
  sample::SavedStates saved;
  {
    auto checkpointer = ckpt::make_async_checkpointer();
    torch::manual_seed(0);
    auto model = sample::make_model(kWidth);
    torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(kLr));
    std::vector<std::pair<fs::path, std::future<void>>> writes;
    for (int step = 1; step <= kCrashAt; ++step) {
      sample::train_step(model, opt, step);
      if (step % kEvery != 0) continue;
      const fs::path path = dir / ("step_" + std::to_string(step));
      const auto start = std::chrono::steady_clock::now();
      auto [staged, written] =
          checkpointer->save(path, sample::state_of(model, opt, kLr, step), {{"step", step}});
      staged.get();  // copied out: training may go on
      const double blocked = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      written.get();  // durable (a trainer would check this later; here each line reports it)
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const auto bytes = fs::file_size(path / ckpt::checkpoint_file_name(0));
      std::printf("step %3d  saved %s: %ju bytes, blocked %.4f s, durable in %.4f s (%.3f GB/s)\n", step,
                  path.c_str(), static_cast<std::uintmax_t>(bytes), blocked, secs,
                  static_cast<double>(bytes) / secs / 1e9);
      for (const auto& p : model->named_parameters()) saved[step][p.key()] = p.value().detach().clone();
    }
    std::printf("crash at step %d\n", kCrashAt);
    checkpointer->close();
  }

  // 2. Restart, as a fresh process would, and check the state.
  const bool ok = sample::resume_and_check(dir, saved, kWidth, kLr, kSteps);
  if (temporary) fs::remove_all(dir);
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "blocking_trainer: %s\n", e.what());
  return 1;
}
