// The asynchronous save, as ratios against references measured in the same run
// on the same state dict (the machines are shared and noisy: only ratios mean
// something).
//
// usage: bench_async [DIR] [GIB]    (default DIR $TMPDIR or /tmp, 1 GiB)
//   CKPT_BENCH_DEVICE=cuda: the state dict lives on cuda:0 (staging copies it
//   device to host); the copy reference is then a warm device-to-host copy into
//   page-locked memory. CKPT_BENCH_PYTHON: the Python with torch for the
//   torch.save reference (default /usr/bin/python3).
//
// State dict: GIB GiB of 16 MiB float32 tensors. After the saves, the last file
// is read back and every tensor checked against the original. Reported:
//   - the first (cold) save: blocking time and time to durable, separately;
//   - warm saves (best of three): blocking time until staged, vs a warm memcpy
//     of the same bytes; durable write throughput, vs `dd oflag=direct
//     conv=fsync` of the same size; blocking time vs Python torch.save + fsync;
//   - training during the background write: steps per second of matrix
//     products on one intra-op thread (the trainer's core; the writer child has
//     the other), alone and while a write is in flight (best of three each).
#include <ckpt/async_checkpointer.hpp>

#include <boost/asio/use_future.hpp>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <sys/mman.h>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::int64_t kTensorNumel = 4 << 20;  // 16 MiB of float32

double seconds(const std::function<void()>& fn) {
  const auto start = Clock::now();
  fn();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string capture(const std::string& cmd) {
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) throw std::runtime_error("cannot run " + cmd);
  char buf[512] = {};
  std::string out;
  while (std::fgets(buf, sizeof buf, p)) out += buf;
  if (::pclose(p) != 0) throw std::runtime_error("failed: " + cmd + "\n" + out);
  return out;
}

/// A "training step": matrix products on one thread.
void train(int steps) {
  static const auto b = at::ones({256, 256});
  auto a = at::ones({256, 256});
  for (int i = 0; i < steps; ++i) a = at::mm(a, b).div_(256.0f);
}

}  // namespace

int main(int argc, char** argv) try {
  const char* tmp = std::getenv("TMPDIR");
  const char* device_env = std::getenv("CKPT_BENCH_DEVICE");
  const c10::Device device(device_env && *device_env ? device_env : "cpu");
  if (!device.is_cpu() && !device.is_cuda()) throw std::runtime_error("CKPT_BENCH_DEVICE: cpu or cuda");
  if (device.is_cuda() && !at::hasCUDA()) throw std::runtime_error("CKPT_BENCH_DEVICE=cuda: no CUDA device");
  const c10::Device dev = device.is_cuda() && !device.has_index() ? c10::Device(c10::kCUDA, 0) : device;
  const char* python_env = std::getenv("CKPT_BENCH_PYTHON");
  const std::string python = python_env && *python_env ? python_env : "/usr/bin/python3";
  const fs::path dir = fs::path(argc > 1 ? argv[1] : (tmp && *tmp ? tmp : "/tmp")) / "ckpt-bench-async";
  const double gib = argc > 2 ? std::stod(argv[2]) : 1.0;
  fs::create_directories(dir);
  at::set_num_threads(1);  // the trainer's core; the writer child has the other
  const int n = std::max(1, static_cast<int>(gib * 1024 / 16));
  const std::size_t bytes = static_cast<std::size_t>(n) * kTensorNumel * 4;
  const double gb = static_cast<double>(bytes) / 1e9;
  fmt::print("state dict: {} float32 tensors of 16 MiB = {:.2f} GB on {}, in {}\n", n, gb, dev.str(),
             dir.string());

  ckpt::StateDict sd;
  std::vector<at::Tensor> tensors;
  for (int i = 0; i < n; ++i) {
    tensors.push_back(at::full({kTensorNumel}, float(i), at::TensorOptions().device(dev)));
    sd.insert("t" + std::to_string(i), tensors.back());
  }

  // References.
  double t_memcpy = 1e300;
  if (dev.is_cuda()) {
    // A warm device-to-host copy of the same bytes into page-locked memory.
    auto host = at::empty({static_cast<std::int64_t>(bytes)},
                          at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    for (int r = 0; r < 4; ++r) {  // the first round warms up
      const double s = seconds([&] {
        std::int64_t off = 0;
        for (const auto& t : tensors) {
          const auto nb = static_cast<std::int64_t>(t.nbytes());
          host.slice(0, off, off + nb).copy_(t.view(at::kByte), /*non_blocking=*/true);
          off += nb;
        }
        tensors.front().cpu();  // waits for the copies queued before it on the stream
      });
      if (r > 0) t_memcpy = std::min(t_memcpy, s);
    }
  } else {
    void* warm =
        ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    for (int r = 0; r < 3; ++r)
      t_memcpy = std::min(t_memcpy, seconds([&] {
                            std::size_t off = 0;
                            for (const auto& t : tensors) {
                              std::memcpy(static_cast<char*>(warm) + off, t.data_ptr(), t.nbytes());
                              off += t.nbytes();
                            }
                          }));
    ::munmap(warm, bytes);
  }
  const fs::path dd_file = dir / "dd.bin";
  double t_dd = 1e300;
  for (int r = 0; r < 3; ++r)
    t_dd =
        std::min(t_dd, seconds([&] {
                   capture(fmt::format("dd if=/dev/zero of={} bs=16M count={} oflag=direct conv=fsync 2>&1",
                                       dd_file.string(), n));
                 }));
  fs::remove(dd_file);
  const double t_py_save =
      std::stod(capture(fmt::format("{} {}/torch_reference.py save {} {} {} {}", python, CKPT_PERF_DIR,
                                    (dir / "py.pt").string(), n, kTensorNumel, dev.str())));
  fs::remove(dir / "py.pt");

  // The checkpointer: its own I/O thread, the default ckpt-writer child.
  auto ck = ckpt::make_async_checkpointer({}, ckpt::RankInfo{0, 1});
  ck->process().async_wait_ready(boost::asio::use_future).get();

  struct Save {
    double blocked, durable;
  };
  int seq = 0;
  auto one_save = [&] {
    const auto path = dir / ("save_" + std::to_string(seq++ % 2));
    const auto start = Clock::now();
    auto futures = ck->save(path, sd);
    futures.staged.get();
    const double blocked = std::chrono::duration<double>(Clock::now() - start).count();
    futures.written.get();
    const double durable = std::chrono::duration<double>(Clock::now() - start).count();
    return Save{blocked, durable};
  };
  const Save cold = one_save();
  Save warm_best{1e300, 1e300};
  for (int r = 0; r < 3; ++r) {
    const Save s = one_save();
    warm_best.blocked = std::min(warm_best.blocked, s.blocked);
    warm_best.durable = std::min(warm_best.durable, s.durable);
  }

  // Training steps per second alone, over as long as a write takes, then while
  // a write is in flight (counted only until the write is durable).
  auto rate_while = [&](const std::function<bool()>& going) {
    int steps = 0;
    const double t = seconds([&] {
      while (going()) {
        train(1);
        ++steps;
      }
    });
    return steps / t;
  };
  double rate_alone = 0, rate_during = 0;
  for (int r = 0; r < 3; ++r) {
    const auto until = Clock::now() + std::chrono::duration<double>(warm_best.durable);
    rate_alone = std::max(rate_alone, rate_while([&] { return Clock::now() < until; }));
    auto futures = ck->save(dir / "overlap", sd);
    futures.staged.get();
    rate_during =
        std::max(rate_during, rate_while([&] {
                   return futures.written.wait_for(std::chrono::seconds(0)) != std::future_status::ready;
                 }));
    futures.written.get();
  }
  // What was written is what was saved: the last warm save, read back to host memory.
  {
    ckpt::LoadOptions options;
    options.map_location = ckpt::MapLocation("cpu");
    const auto loaded = ck->load(dir / ("save_" + std::to_string((seq - 1) % 2)), options);
    int bad = 0;
    for (int i = 0; i < n; ++i) {
      const auto t = loaded.at("t" + std::to_string(i)).toTensor();
      if (!t.device().is_cpu() || !t.equal(tensors[static_cast<std::size_t>(i)].cpu())) ++bad;
    }
    if (bad)
      throw std::runtime_error(fmt::format("{} of {} tensors read back differ from the originals", bad, n));
    fmt::print("read back: all {} tensors equal the originals\n", n);
  }
  ck->close();
  for (const auto& e : fs::directory_iterator(dir)) fs::remove_all(e.path());

  fmt::print("\n{:<52} {:>9} {:>8}\n", "operation", "seconds", "GB/s");
  auto row = [&](const std::string& what, double s) {
    fmt::print("{:<52} {:>9.4f} {:>8.2f}\n", what, s, gb / s);
  };
  row(dev.is_cuda() ? "reference: warm D2H copy into pinned memory" : "reference: warm memcpy", t_memcpy);
  row("reference: dd oflag=direct conv=fsync", t_dd);
  row("reference: Python torch.save + fsync", t_py_save);
  row("first (cold) save: blocked until staged", cold.blocked);
  row("first (cold) save: until durable", cold.durable);
  row("warm save: blocked until staged", warm_best.blocked);
  row("warm save: until durable", warm_best.durable);
  fmt::print("{:<52} {:>9.1f} steps/s\n", "training alone", rate_alone);
  fmt::print("{:<52} {:>9.1f} steps/s\n", "training while a write is in flight", rate_during);

  struct Ratio {
    std::string what;
    double value;
    std::string target;
    bool met;
  };
  const double slowdown = rate_alone / rate_during - 1.0;
  const std::vector<Ratio> ratios = {
      {dev.is_cuda() ? "warm blocking time / warm pinned D2H copy" : "warm blocking time / warm memcpy",
       warm_best.blocked / t_memcpy, "<= 1.5", warm_best.blocked / t_memcpy <= 1.5},
      {"durable throughput / dd oflag=direct", t_dd / warm_best.durable, ">= 0.8",
       t_dd / warm_best.durable >= 0.8},
      {"Python torch.save+fsync / warm blocking time", t_py_save / warm_best.blocked, ">= 10",
       t_py_save / warm_best.blocked >= 10},
      {"training slowdown during the write", slowdown, "< 0.10", slowdown < 0.10},
  };
  fmt::print("\n{:<52} {:>9} {:>8}\n", "ratio", "value", "target");
  bool all = true;
  for (const auto& r : ratios) {
    all = all && r.met;
    fmt::print("{:<52} {:>9.3f} {:>8} {}\n", r.what, r.value, r.target, r.met ? "met" : "MISSED");
  }
  fmt::print("\n{}\n", all ? "all targets met" : "some targets missed");
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_async: %s\n", e.what());
  return 1;
}
