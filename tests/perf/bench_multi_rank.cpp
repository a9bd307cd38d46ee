// Multi-rank saving, as ratios against references measured in the same run.
//
// usage: bench_multi_rank [DIR] [GIB]   (default DIR $TMPDIR or /tmp, 1 GiB in all)
//
// Run without RANK it is the driver: it runs itself under ckpt-launch (found
// beside it) and prints two tables.
//   1. 1, 2 and 4 local ranks save and then load the same total bytes (GIB in
//      all, split evenly) through sync checkpointers with a tcp_store barrier;
//      reported: aggregate GB/s, and the ratio against 1 rank.
//   2. 1, 2, 4, 8 and 16 ranks save a small state (one 4 KiB tensor per rank)
//      20 times, with the tcp_store barrier and the commit marker, and without
//      any barrier (no marker with several ranks): the difference per save is
//      what the barrier and the marker cost; and the bare barrier alone.
// Each measured section starts and ends at a Gloo barrier; rank 0 reports the
// slowest rank's time.
#include <ckpt/ckpt.hpp>

#include "bench_support.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <fcntl.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>

namespace fs = std::filesystem;

namespace {

using ckpt::bench::capture;
using ckpt::bench::result_of;
using ckpt::bench::timed;

ckpt::CheckpointerConfig barrier_config(const ckpt::dist::ProcessGroupHandle& pg, const std::string& name) {
  ckpt::CheckpointerConfig config;
  config.barrier_config = {"tcp_store",
                           {{"barrier_prefix", name},
                            {"tcpstore_port", ckpt::dist::agree_on_free_port(pg, name)},
                            {"master_address", "127.0.0.1"},
                            {"timeout_secs", 300}}};
  return config;
}

int rank_main(const std::string& mode, const fs::path& dir, double gib) {
  auto pg = ckpt::dist::init_process_group();
  auto& group = *pg->group;
  const auto rank = pg->rank_info.global_rank;
  const auto world = pg->rank_info.global_world_size;
  if (mode == "io") {
    // GIB in all, in 16 MiB tensors, split evenly over the ranks.
    const std::int64_t per_tensor = 4 << 20;
    const int n = std::max<int>(1, static_cast<int>(gib * 64 / static_cast<double>(world)));
    ckpt::StateDict sd;
    for (int i = 0; i < n; ++i) sd.insert("t" + std::to_string(i), at::full({per_tensor}, float(rank)));
    auto ck = ckpt::make_sync_checkpointer(barrier_config(*pg, "io"), pg->rank_info);
    const double save = timed(group, [&] { ck->save(dir / "io", sd); });
    // Loads read back from the page cache would flatter them: drop this
    // rank's file from it first (as a fresh job's load would find it, mostly).
    {
      const auto file = dir / "io" / ckpt::checkpoint_file_name(rank);
      const int fd = ::open(file.c_str(), O_RDONLY);
      if (fd >= 0) ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), ::close(fd);
    }
    const double load = timed(group, [&] { ck->load(dir / "io"); });
    const double bytes = static_cast<double>(n) * per_tensor * 4 * static_cast<double>(world);
    if (rank == 0) std::printf("RESULT %.6f %.6f %.0f\n", save, load, bytes);
    ck->close();
  } else {
    ckpt::StateDict sd;
    sd.insert("small", at::full({1024}, float(rank)));
    constexpr int kSaves = 20;
    auto with = ckpt::make_sync_checkpointer(barrier_config(*pg, "small"), pg->rank_info);
    auto without = ckpt::make_sync_checkpointer({}, pg->rank_info);
    const double t_without = timed(group, [&] {
      for (int i = 0; i < kSaves; ++i) without->save(dir / fmt::format("plain_{}", i), sd);
    });
    const double t_with = timed(group, [&] {
      for (int i = 0; i < kSaves; ++i) with->save(dir / fmt::format("committed_{}", i), sd);
    });
    ckpt::TCPStoreBarrier bare(
        ckpt::TCPStoreBarrierOptions::from_args(barrier_config(*pg, "bare").barrier_config.barrier_args));
    const double t_bare = timed(group, [&] {
      for (int i = 0; i < kSaves; ++i) bare.execute_barrier();
    });
    if (rank == 0)
      std::printf("RESULT %.6f %.6f %.6f\n", t_without / kSaves, t_with / kSaves, t_bare / kSaves);
    with->close();
    without->close();
  }
  group.barrier()->wait();
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  if (std::getenv("RANK") && argc >= 4) return rank_main(argv[1], argv[2], std::stod(argv[3]));

  const char* tmp = std::getenv("TMPDIR");
  const fs::path root = fs::path(argc > 1 ? argv[1] : (tmp && *tmp ? tmp : "/tmp")) / "ckpt-bench-multi-rank";
  const double gib = argc > 2 ? std::stod(argv[2]) : 1.0;
  const fs::path self = fs::canonical("/proc/self/exe");
  const fs::path launcher = self.parent_path() / "ckpt-launch";
  const auto launch = [&](int n, const std::string& mode) {
    fs::remove_all(root);
    fs::create_directories(root);
    const auto out = capture(fmt::format("'{}' -n {} --timeout 600 '{}' {} '{}' {} 2>&1", launcher.string(),
                                         n, self.string(), mode, root.string(), gib));
    return result_of(out);
  };

  fmt::print("saving and loading {:.2f} GiB in all, split over the ranks ({})\n\n", gib, root.string());
  fmt::print("{:>5} {:>12} {:>10} {:>12} {:>10}\n", "ranks", "save GB/s", "vs 1 rank", "load GB/s",
             "vs 1 rank");
  double save1 = 0, load1 = 0;
  for (int n : {1, 2, 4}) {
    const auto r = launch(n, "io");
    const double save = r[2] / r[0] / 1e9, load = r[2] / r[1] / 1e9;
    if (n == 1) save1 = save, load1 = load;
    fmt::print("{:>5} {:>12.2f} {:>10.2f} {:>12.2f} {:>10.2f}\n", n, save, save / save1, load, load / load1);
  }

  fmt::print("\nsmall state (4 KiB per rank), per save, 20 saves\n\n");
  fmt::print("{:>5} {:>16} {:>20} {:>18} {:>16}\n", "ranks", "no barrier ms", "barrier+marker ms",
             "barrier+marker cost", "bare barrier ms");
  for (int n : {1, 2, 4, 8, 16}) {
    const auto r = launch(n, "small");
    fmt::print("{:>5} {:>16.2f} {:>20.2f} {:>17.2f}x {:>16.3f}\n", n, r[0] * 1e3, r[1] * 1e3, r[1] / r[0],
               r[2] * 1e3);
  }
  fs::remove_all(root);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_multi_rank: %s\n", e.what());
  return 1;
}
