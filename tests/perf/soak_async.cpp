// A soak of the asynchronous checkpointer under a CheckpointManager (a
// program, not a test): SAVES saves, the writer child SIGKILLed in the middle
// of every KILL_EVERY-th write. Every save that commits is loaded back and
// compared; every 100 saves it prints the process's resident memory,
// descriptors and threads, the entries of /dev/shm and of the checkpoint
// root (recursively), so that growth shows.
//
//   soak_async DIR [SAVES=1000] [KILL_EVERY=50] [MIB=8]
#include <ckpt/async_checkpointer.hpp>
#include <ckpt/checkpoint_manager.hpp>
#include <ckpt/error.hpp>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include <unistd.h>

namespace fs = std::filesystem;

namespace {

ckpt::StateDict state_of(std::int64_t step, std::int64_t mib) {
  ckpt::StateDict sd;
  sd.insert("w", at::arange(mib * (1 << 18), at::kInt).add_(static_cast<std::int32_t>(step)));
  sd.insert("step", step);
  return sd;
}

std::size_t entries(const fs::path& dir, bool recursive) {
  std::size_t n = 0;
  std::error_code ec;
  if (recursive) {
    for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) ++n;
  } else {
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) ++n;
  }
  return n;
}

std::size_t resident_kib() {
  std::ifstream in("/proc/self/statm");
  std::size_t pages = 0, resident = 0;
  in >> pages >> resident;
  return resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)) / 1024;
}

struct Sample {
  std::int64_t save;
  std::size_t rss_kib, fds, threads, shm, dir;
};

Sample sample(std::int64_t save, const fs::path& root) {
  return {save,
          resident_kib(),
          entries("/proc/self/fd", false),
          entries("/proc/self/task", false),
          entries("/dev/shm", false),
          entries(root, true)};
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 2) {
    fmt::print(stderr, "usage: soak_async DIR [SAVES=1000] [KILL_EVERY=50] [MIB=8]\n");
    return 2;
  }
  const fs::path root = argv[1];
  const std::int64_t saves = argc > 2 ? std::stoll(argv[2]) : 1000;
  const std::int64_t kill_every = argc > 3 ? std::stoll(argv[3]) : 50;
  const std::int64_t mib = argc > 4 ? std::stoll(argv[4]) : 8;
  fs::create_directories(root);
  auto ck = std::shared_ptr<ckpt::AsyncCheckpointer>(ckpt::make_async_checkpointer({}, ckpt::RankInfo{0, 1}));
  ckpt::CheckpointManager manager(root, ck, {.keep_last_n = 2, .rank_info = ckpt::RankInfo{0, 1}});

  std::map<std::string, std::int64_t> outcomes;
  std::int64_t kills = 0, checked = 0, wrong = 0;
  std::vector<Sample> samples{sample(0, root)};
  fmt::print("{:>6} {:>10} {:>5} {:>7} {:>9} {:>8}\n", "save", "rss KiB", "fds", "threads", "/dev/shm",
             "entries");
  const auto print = [](const Sample& s) {
    fmt::print("{:>6} {:>10} {:>5} {:>7} {:>9} {:>8}\n", s.save, s.rss_kib, s.fds, s.threads, s.shm, s.dir);
  };
  print(samples.back());
  for (std::int64_t step = 1; step <= saves; ++step) {
    std::string outcome = "ok";
    try {
      auto futures = manager.save(step, state_of(step, mib));
      futures.staged.get();
      if (step % kill_every == 0) {
        // In the middle of the write (or just before it): the child dies.
        const int pid = ck->process().pid();
        if (pid > 0 && ::kill(pid, SIGKILL) == 0) ++kills;
      }
      futures.written.get();
    } catch (const ckpt::Error& e) {
      outcome = ckpt::describe_failure(std::current_exception()).type;
    }
    ++outcomes[outcome];
    if (outcome == "ok") {
      // What committed loads back exactly.
      const auto loaded = ck->load(manager.path_of(step));
      ++checked;
      if (!loaded.at("w").toTensor().equal(state_of(step, mib).at("w").toTensor()) ||
          loaded.at("step").toInt() != step)
        ++wrong;
    }
    if (step % 100 == 0) {
      samples.push_back(sample(step, root));
      print(samples.back());
    }
  }
  manager.close();
  ck->close();
  fmt::print("saves {}, child kills {}, outcomes:", saves, kills);
  for (const auto& [k, n] : outcomes) fmt::print(" {} {}", k, n);
  fmt::print("\ncommitted saves loaded back {}, wrong {}\n", checked, wrong);
  return wrong == 0 ? 0 : 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "soak_async: {}\n", e.what());
  return 1;
}
