// Throughput of writing and reading a checkpoint file, as ratios against
// references measured in the same run on the same state dict (the machines are
// shared and noisy, so only ratios mean something).
//
// usage: bench_format [DIR] [GIB]    (default DIR $TMPDIR or /tmp, 1 GiB)
//
// State dict: GIB GiB of 16 MiB float32 tensors. Each figure is the best of
// three runs unless marked. References: warm memcpy, an O_DIRECT write + fsync
// of the same bytes, Python torch.save + fsync and torch.load, libtorch
// torch::save + fsync and torch::load (one run each: they are slow), pread of
// the file into fresh and into warm memory. Reads are measured with the file in
// the page cache (it is read once first), the same for every reader. Loads into
// fresh memory (ckpt full and mmap loads, Python torch.load, pread into fresh
// memory) each run in a new process, as a job that loads at start-up would: in
// one long process, freed memory is handed back warm and hides the page-fault
// cost that dominates a real first load.
#include <ckpt/format.hpp>

#include <torch/serialize.h>

#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace {

constexpr std::int64_t kTensorNumel = 4 << 20;  // 16 MiB of float32

double seconds(const std::function<void()>& fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Best of `runs` runs of `self --once MODE FILE`, each in a fresh process.
double best_in_fresh_process(const std::string& self, const std::string& mode, const fs::path& file,
                             int runs = 3) {
  double best = 1e300;
  for (int i = 0; i < runs; ++i) {
    const std::string cmd = self + " --once " + mode + " " + file.string();
    FILE* p = ::popen(cmd.c_str(), "r");
    char buf[128] = {};
    if (!p || !std::fgets(buf, sizeof buf, p) || ::pclose(p) != 0) throw std::runtime_error("failed: " + cmd);
    best = std::min(best, std::stod(buf));
  }
  return best;
}

double best_of(int runs, const std::function<void()>& fn) {
  double best = 1e300;
  for (int i = 0; i < runs; ++i) best = std::min(best, seconds(fn));
  return best;
}

std::string run_python(const std::string& args) {
  const std::string cmd = "/usr/bin/python3 " + std::string(CKPT_PERF_DIR) + "/torch_reference.py " + args;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) throw std::runtime_error("cannot run " + cmd);
  char buf[256] = {};
  std::string out;
  while (std::fgets(buf, sizeof buf, p)) out += buf;
  if (::pclose(p) != 0) throw std::runtime_error("failed: " + cmd + "\n" + out);
  return out;
}

struct Anon {  // fresh anonymous memory: pages are faulted in by whoever writes first
  void* p;
  std::size_t n;
  explicit Anon(std::size_t bytes) : n(bytes) {
    p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
  }
  ~Anon() { ::munmap(p, n); }
};

void pread_all(const fs::path& file, void* dst, std::size_t n) {
  int fd = ::open(file.c_str(), O_RDONLY);
  auto* out = static_cast<char*>(dst);
  for (std::size_t done = 0; done < n;) {
    ssize_t got =
        ::pread(fd, out + done, std::min<std::size_t>(n - done, 64 << 20), static_cast<off_t>(done));
    if (got <= 0) break;
    done += static_cast<std::size_t>(got);
  }
  ::close(fd);
}

void direct_write(const fs::path& file, const void* src, std::size_t n) {
  int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  if (fd < 0) throw std::runtime_error("O_DIRECT open failed");
  const auto* in = static_cast<const char*>(src);
  for (std::size_t done = 0; done < n;) {
    ssize_t put = ::write(fd, in + done, std::min<std::size_t>(n - done, 8 << 20));
    if (put <= 0) throw std::runtime_error("O_DIRECT write failed");
    done += static_cast<std::size_t>(put);
  }
  ::fsync(fd);
  ::close(fd);
}

void fsync_path(const fs::path& file) {
  int fd = ::open(file.c_str(), O_RDONLY);
  ::fsync(fd);
  ::close(fd);
}

struct Row {
  std::string what;
  double secs;
  std::string note;
};

}  // namespace

/// `--once MODE FILE`: one timed load in this (fresh) process; prints seconds.
int once(const std::string& mode, const fs::path& file) {
  double t = 0;
  if (mode == "full") {
    t = seconds([&] { auto v = ckpt::read_file(file); });
  } else if (mode == "mmap") {
    t = seconds([&] { auto v = ckpt::read_file(file, {.mmap = true}); });
  } else if (mode == "pread") {
    const std::size_t n = fs::file_size(file);
    t = seconds([&] {
      Anon fresh(n);
      pread_all(file, fresh.p, n);
    });
  } else {
    return 2;
  }
  std::printf("%.6f\n", t);
  return 0;
}

int main(int argc, char** argv) try {
  if (argc == 4 && std::string(argv[1]) == "--once") return once(argv[2], argv[3]);
  const std::string self = fs::canonical("/proc/self/exe").string();
  const char* tmp = std::getenv("TMPDIR");
  const fs::path dir = fs::path(argc > 1 ? argv[1] : (tmp && *tmp ? tmp : "/tmp")) / "ckpt-bench";
  const double gib = argc > 2 ? std::stod(argv[2]) : 1.0;
  fs::create_directories(dir);
  const int n = std::max(1, static_cast<int>(gib * 1024 / 16));
  const std::size_t bytes = static_cast<std::size_t>(n) * kTensorNumel * 4;
  const double gb = static_cast<double>(bytes) / 1e9;
  fmt::print("state dict: {} float32 tensors of 16 MiB = {:.2f} GB, in {}\n", n, gb, dir.string());

  c10::impl::GenericDict sd(c10::StringType::get(), c10::AnyType::get());
  std::vector<at::Tensor> tensors;
  for (int i = 0; i < n; ++i) {
    tensors.push_back(at::full({kTensorNumel}, float(i)));
    sd.insert("t" + std::to_string(i), tensors.back());
  }
  const fs::path ours = dir / "ckpt.pt", py = dir / "torch.pt", lt = dir / "libtorch.pt",
                 raw = dir / "raw.bin";

  // --- references -----------------------------------------------------------
  Anon warm(bytes);
  std::memset(warm.p, 1, bytes);
  const double t_memcpy = best_of(3, [&] {
    std::size_t off = 0;
    for (const auto& t : tensors) {
      std::memcpy(static_cast<char*>(warm.p) + off, t.data_ptr(), t.nbytes());
      off += t.nbytes();
    }
  });
  const double t_direct = best_of(3, [&] { direct_write(raw, warm.p, bytes); });
  fs::remove(raw);

  // --- write --------------------------------------------------------------
  const double t_write = best_of(3, [&] { ckpt::write_file(ours, sd); });
  const double t_py_save = std::stod(run_python(fmt::format("save {} {} {}", py.string(), n, kTensorNumel)));
  fs::remove(py);
  const double t_lt_save = seconds([&] {
    torch::save(tensors, lt.string());
    fsync_path(lt);
  });

  // --- read (file in the page cache for every reader) -------------------------
  const std::size_t file_bytes = fs::file_size(ours);
  pread_all(ours, warm.p, std::min(file_bytes, bytes));
  const double t_pread_fresh = best_in_fresh_process(self, "pread", ours);
  const double t_pread_warm = best_of(3, [&] { pread_all(ours, warm.p, std::min(file_bytes, bytes)); });
  const double t_load = best_in_fresh_process(self, "full", ours);

  std::vector<at::Tensor> targets;
  for (int i = 0; i < n; ++i) targets.push_back(at::zeros({kTensorNumel}));
  const double t_inplace = best_of(3, [&] {
    ckpt::FileReader reader(ours);
    for (int i = 0; i < n; ++i) {
      const std::string key = "t" + std::to_string(i);
      reader.read_into(*reader.root().find(key)->tensor, targets[static_cast<std::size_t>(i)], key);
    }
  });
  const double t_mmap = best_in_fresh_process(self, "mmap", ours);
  const double t_mmap_touch = best_of(3, [&] {
    auto v = ckpt::read_file(ours, {.mmap = true}).toGenericDict();
    double sum = 0;
    for (const auto& e : v) sum += e.value().toTensor().sum().item<double>();
    if (sum < 0) std::puts("");
  });
  double t_py_load = 1e300;  // one load per fresh Python process, best of three
  for (int i = 0; i < 3; ++i) t_py_load = std::min(t_py_load, std::stod(run_python("load " + ours.string())));
  const double t_lt_load = seconds([&] {
    std::vector<at::Tensor> back;
    torch::load(back, lt.string());
  });
  fs::remove(lt);
  fs::remove(ours);

  auto rate = [&](double s) { return gb / s; };
  fmt::print("\n{:<50} {:>8} {:>9}\n", "operation", "GB/s", "seconds");
  const std::vector<Row> rows = {
      {"reference: warm memcpy", t_memcpy, ""},
      {"reference: O_DIRECT write + fsync", t_direct, ""},
      {"reference: Python torch.save + fsync", t_py_save, ""},
      {"reference: libtorch torch::save + fsync (1 run)", t_lt_save, ""},
      {"reference: pread into fresh memory (new process)", t_pread_fresh, ""},
      {"reference: pread into warm memory", t_pread_warm, ""},
      {"reference: Python torch.load (new process)", t_py_load, ""},
      {"reference: libtorch torch::load (1 run)", t_lt_load, ""},
      {"ckpt write + fsync", t_write, ""},
      {"ckpt full load (new process)", t_load, ""},
      {"ckpt in-place load", t_inplace, ""},
      {"ckpt mmap load (new process)", t_mmap, ""},
      {"ckpt mmap load + touch every byte", t_mmap_touch, ""},
  };
  for (const auto& r : rows) fmt::print("{:<50} {:>8.2f} {:>9.4f}\n", r.what, rate(r.secs), r.secs);

  struct Ratio {
    std::string what;
    double ratio;
    double target;
  };
  const std::vector<Ratio> ratios = {
      {"write+fsync vs Python torch.save+fsync", t_py_save / t_write, 1.5},
      {"write+fsync vs libtorch torch::save+fsync", t_lt_save / t_write, 0},
      {"write+fsync vs O_DIRECT write+fsync", t_direct / t_write, 0},
      {"full load vs Python torch.load", t_py_load / t_load, 5},
      {"full load vs libtorch torch::load", t_lt_load / t_load, 0},
      {"full load vs pread into fresh memory", t_pread_fresh / t_load, 0.8},
      {"in-place load vs pread into warm memory", t_pread_warm / t_inplace, 0.8},
      {"mmap load vs Python torch.load", t_py_load / t_mmap, 50},
  };
  fmt::print("\n{:<50} {:>8} {:>8}\n", "ratio (higher is better)", "x", "target");
  bool all = true;
  for (const auto& r : ratios) {
    const bool met = r.ratio >= r.target;
    all = all && met;
    fmt::print("{:<50} {:>8.2f} {:>8}\n", r.what, r.ratio,
               r.target > 0 ? fmt::format("{}{}", r.target, met ? " met" : " MISSED") : "-");
  }
  fmt::print("\n{}\n", all ? "all targets met" : "some targets missed");
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_format: %s\n", e.what());
  return 1;
}
