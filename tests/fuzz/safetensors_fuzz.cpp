// libFuzzer target for the safetensors header and index parsers: any input
// must either load or be refused with a ckpt::Error. Anything else — a crash, a
// sanitizer report, an exception of another type (a check the reader missed
// and torch caught) — is a finding.
//
// An input that starts with '{' is an index (`model.safetensors.index.json`
// in a scratch directory beside a sound shard `a.safetensors` holding "x" and
// "y", which it may name); any other input is a `.safetensors` file. Each is
// loaded whole, mapped, and entry by entry.
//
// Built with CKPT_SAFETENSORS_SEEDS, the same file is the seed maker instead:
// `safetensors_seeds DIR DICT` writes sound files and indexes made by ckpt
// into DIR and a libFuzzer dictionary of the format's words to DICT.
#include <ckpt/safetensors.hpp>

#include <ATen/ATen.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace fs = std::filesystem;
namespace st = ckpt::safetensors;

namespace {

/// The sound shard an index input may name: "x" (f32 [2]) and "y" (u8 [3]).
void write_shard(const fs::path& file) {
  ckpt::StateDict sd;
  sd.insert("x", at::arange(2, at::kFloat));
  sd.insert("y", at::arange(3, at::kByte));
  st::save(file, sd, {.metadata = {{"format", "pt"}}, .fsync = false});
}

}  // namespace

#ifndef CKPT_SAFETENSORS_SEEDS

namespace {

int input_fd() {
  static const int fd = ::memfd_create("ckpt-safetensors-fuzz", 0);
  return fd;
}

fs::path& scratch_dir() {
  static fs::path dir;
  return dir;
}

void remove_scratch() {
  std::error_code ec;
  fs::remove_all(scratch_dir(), ec);
}

/// A directory of this process's own, removed when it exits.
const fs::path& scratch() {
  if (scratch_dir().empty()) {
    std::string tmpl = (fs::temp_directory_path() / "ckpt-st-fuzz-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) std::abort();
    scratch_dir() = tmpl;
    std::atexit(remove_scratch);
    write_shard(scratch_dir() / "a.safetensors");
  }
  return scratch_dir();
}

volatile std::uint8_t sink = 0;

/// Reads every byte of `t`: memory a tensor points at that is not its own
/// (past a mapping, past an allocation) is a finding.
void touch(const at::Tensor& t) {
  if (t.numel() == 0) return;
  const auto* p = static_cast<const std::uint8_t*>(t.data_ptr());
  std::uint8_t x = 0;
  for (std::size_t i = 0; i < t.nbytes(); ++i) x ^= p[i];
  sink = x;
}

void exercise(const fs::path& path) {
  try {
    st::Reader reader(path);
    (void)reader.metadata();
    for (const auto& name : reader.names()) {
      try {
        const st::TensorEntry& e = reader.entry(name);
        touch(reader.tensor(e.name));
        touch(reader.mapped(e.name));
      } catch (const ckpt::Error&) {
        // this entry refused (a dtype this libtorch lacks, a shard missing):
        // the others are still tried
      }
    }
  } catch (const ckpt::Error&) {
    // refused with a clear error: the expected outcome for bad input
  }
  try {
    for (const auto& e : st::load(path, {.mmap = true})) touch(e.value().toTensor());
  } catch (const ckpt::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > 0 && data[0] == '{') {
    const fs::path index = scratch() / "model.safetensors.index.json";
    {
      std::ofstream out(index, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
      if (!out) return 0;
    }
    exercise(index);
    return 0;
  }
  const int fd = input_fd();
  if (fd < 0 || ::ftruncate(fd, 0) != 0) return 0;
  if (size > 0 && ::pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) return 0;
  exercise("/proc/self/fd/" + std::to_string(fd));
  return 0;
}

#else  // the seed maker

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: safetensors_seeds DIR DICT\n");
    return 2;
  }
  const fs::path dir = argv[1];
  // Every dtype, 0-d and empty tensors, metadata.
  ckpt::StateDict all;
  all.insert("f64", at::arange(3, at::kDouble));
  all.insert("f32", at::arange(6, at::kFloat).reshape({2, 3}));
  all.insert("f16", at::arange(2, at::kHalf));
  all.insert("bf16", at::arange(2, at::kBFloat16));
  all.insert("i64", at::arange(2, at::kLong));
  all.insert("i32", at::arange(2, at::kInt));
  all.insert("i16", at::arange(2, at::kShort));
  all.insert("i8", at::arange(2, at::kChar));
  all.insert("u8", at::arange(2, at::kByte));
  all.insert("bool", at::ones({2}, at::kBool));
  all.insert("c64", at::zeros({1}, at::kComplexFloat));
  all.insert("scalar", at::scalar_tensor(1.5));
  all.insert("empty", at::empty({0, 2}));
  st::save(dir / "all.safetensors", all, {.metadata = {{"format", "pt"}, {"note", "seed"}}, .fsync = false});
  write_shard(dir / "small.safetensors");
  st::save(dir / "none.safetensors", ckpt::StateDict(), {.fsync = false});
  // A sharded save: its index names shards that the fuzzer's scratch directory
  // lacks; an index naming the scratch shard.
  ckpt::StateDict two;
  two.insert("x", at::arange(2, at::kFloat));
  two.insert("z", at::arange(4, at::kFloat));
  st::save(dir / "sharded.safetensors", two, {.max_shard_bytes = 8, .fsync = false});
  std::ofstream(dir / "index.json") << R"({"metadata":{"total_size":11},"weight_map":{"x":"a.safetensors",)"
                                    << R"("y":"a.safetensors"}})";
  // The words of the format, for libFuzzer's -dict.
  std::ofstream dict(argv[2]);
  for (const char* word : {"__metadata__", "dtype",      "shape",         "data_offsets", "weight_map",
                           "metadata",     "total_size", "ckpt_save_id",  "F64",          "F32",
                           "F16",          "BF16",       "I64",           "I32",          "I16",
                           "I8",           "U8",         "BOOL",          "C64",          "F8_E4M3",
                           "F4",           "U16",        "a.safetensors", "../",          "null"})
    dict << '"' << word << "\"\n";
  return dict ? 0 : 1;
}

#endif
