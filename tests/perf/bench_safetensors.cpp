// Loading a safetensors file of about 1 GiB: ckpt's whole load (pread into
// fresh tensors) and its mapped load (a private mapping, nothing read until
// touched), against Python's `safetensors.torch.load_file` (torch 2.6 in the
// trixie chroot) on the same file in the same run. Two columns: the load call
// alone, and the load followed by a read of one byte per 4 KiB page of every
// tensor (the time until the data is in memory: load_file itself maps the
// file, so its call alone reads nothing). The file is in the page cache for
// every reader (read once before timing), so this compares the readers, not
// the disk. Best of 5 rounds each.
//
//   bench_safetensors [DIR] [MIB]      (default: $TMPDIR or /tmp, 1024 MiB)
#include <ckpt/safetensors.hpp>

#include "bench_support.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace fs = std::filesystem;
namespace st = ckpt::safetensors;

namespace {

constexpr int kRounds = 5;
constexpr std::int64_t kTensorMiB = 16;

double seconds(const std::function<void()>& fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double best_of(const std::function<void()>& fn) {
  double best = 1e30;
  for (int i = 0; i < kRounds; ++i) best = std::min(best, seconds(fn));
  return best;
}

/// Reads the whole file once, so that every reader finds it in the page cache.
void warm(const fs::path& file) {
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + file.string());
  std::vector<char> buf(std::size_t{8} << 20);
  while (::read(fd, buf.data(), buf.size()) > 0) {
  }
  ::close(fd);
}

/// Reads one byte of every 4 KiB page of every tensor of `sd`.
void touch(const ckpt::StateDict& sd) {
  for (const auto& entry : sd) {
    const at::Tensor t = entry.value().toTensor();
    const at::Tensor bytes = t.reshape(-1).view(at::kByte);
    (void)bytes.slice(0, 0, bytes.numel(), 4096).sum().item<std::int64_t>();
  }
}

/// The Python side: the best of kRounds of load_file alone, then of load_file
/// and the same touch.
constexpr const char* kPythonScript = R"(import sys, time, torch
from safetensors.torch import load_file
rounds = int(sys.argv[2])
call = touched = 1e30
for _ in range(rounds):
    t = time.perf_counter(); d = load_file(sys.argv[1]); call = min(call, time.perf_counter() - t); del d
for _ in range(rounds):
    t = time.perf_counter(); d = load_file(sys.argv[1])
    for v in d.values(): v.reshape(-1).view(torch.uint8)[::4096].sum().item()
    touched = min(touched, time.perf_counter() - t); del d
print(call, touched)
)";

/// Python's load_file on `file` in the torch 2.6 chroot: the call alone, and
/// the call and touch, in seconds; nullopt when the chroot is not there (or
/// this is not root).
std::optional<std::pair<double, double>> python_load_file(const fs::path& file) {
  const fs::path script = file.parent_path() / "load_file.py";
  std::ofstream(script) << kPythonScript;
  try {
    const std::string out = ckpt::bench::capture(
        fmt::format("CKPT_CHROOT_BIND='{}' '{}/cmake/chroot-python' '{}' '{}' {} 2>&1",
                    file.parent_path().string(), CKPT_SOURCE_DIR, script.string(), file.string(), kRounds));
    std::size_t used = 0;
    const double call = std::stod(out, &used);
    return std::make_pair(call, std::stod(out.substr(used)));
  } catch (const std::exception& e) {
    fmt::print("(no Python safetensors peer: {})\n", e.what());
    return std::nullopt;
  }
}

}  // namespace

int main(int argc, char** argv) try {
  const char* tmp = std::getenv("TMPDIR");
  const fs::path root =
      fs::path(argc > 1 ? argv[1] : (tmp && *tmp ? tmp : "/tmp")) / "ckpt-bench-safetensors";
  const std::int64_t mib = argc > 2 ? std::stoll(argv[2]) : 1024;
  fs::remove_all(root);
  fs::create_directories(root);
  const fs::path file = root / "model.safetensors";

  // A model's worth of tensors: kTensorMiB each, float32 and bfloat16.
  ckpt::StateDict sd;
  const std::int64_t count = std::max<std::int64_t>(1, mib / kTensorMiB);
  for (std::int64_t i = 0; i < count; ++i) {
    const auto dtype = i % 4 == 3 ? at::kBFloat16 : at::kFloat;
    const std::int64_t numel = (kTensorMiB << 20) / static_cast<std::int64_t>(c10::elementSize(dtype));
    sd.insert(fmt::format("layers.{}.weight", i), at::arange(numel, at::kFloat).mul_(1e-3).to(dtype));
  }
  st::save(file, sd, {.metadata = {{"format", "pt"}}});
  const double bytes = static_cast<double>(fs::file_size(file));
  fmt::print("loading {} tensors, {:.0f} MiB of safetensors (page cache warm), best of {} rounds\n\n", count,
             bytes / (1 << 20), kRounds);

  // The values loaded are the values saved (checked once per way).
  const auto check = [&](const ckpt::StateDict& loaded) {
    for (std::int64_t i = 0; i < count; i += 7) {
      const auto key = fmt::format("layers.{}.weight", i);
      if (!at::equal(loaded.at(key).toTensor(), sd.at(key).toTensor()))
        throw std::runtime_error("loaded values differ at " + key);
    }
  };
  warm(file);
  check(st::load(file));
  check(st::load(file, {.mmap = true}));
  const double whole = best_of([&] { (void)st::load(file); });
  const double mapped = best_of([&] { (void)st::load(file, {.mmap = true}); });
  const double whole_touched = best_of([&] { touch(st::load(file)); });
  const double mapped_touched = best_of([&] { touch(st::load(file, {.mmap = true})); });
  warm(file);
  const auto python = python_load_file(file);

  fmt::print("{:<36} {:>9} {:>13} {:>14} {:>20}\n", "reader", "call s", "call+touch s", "vs load_file",
             "vs load_file+touch");
  const auto row = [&](const std::string& who, double call, double touched) {
    if (python)
      fmt::print("{:<36} {:>9.6f} {:>13.4f} {:>13.2f}x {:>19.2f}x\n", who, call, touched,
                 python->first / call, python->second / touched);
    else
      fmt::print("{:<36} {:>9.6f} {:>13.4f}\n", who, call, touched);
  };
  row("ckpt safetensors::load", whole, whole_touched);
  row("ckpt safetensors::load {.mmap=true}", mapped, mapped_touched);
  if (python) row("python safetensors load_file (2.6)", python->first, python->second);
  fs::remove_all(root);
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "bench_safetensors: {}\n", e.what());
  return 1;
}
