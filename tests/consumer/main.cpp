// Saves and loads a checkpoint through the installed ckpt package.
#include <ckpt/ckpt.hpp>

#include <ATen/ATen.h>

#include <cstdio>
#include <filesystem>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: consumer DIR\n");
    return 2;
  }
  const auto file = std::filesystem::path(argv[1]) / "checkpoint_0.pt";
  c10::impl::GenericDict sd(c10::StringType::get(), c10::AnyType::get());
  sd.insert("weight", at::arange(6, at::kFloat));
  sd.insert("epoch", int64_t{3});
  ckpt::write_file(file, sd);
  auto back = ckpt::read_file(file).toGenericDict();
  const bool ok =
      at::equal(back.at("weight").toTensor(), at::arange(6, at::kFloat)) && back.at("epoch").toInt() == 3;
  std::printf("consumer: %s\n", ok ? "ok" : "MISMATCH");
  return ok ? 0 : 1;
}
