// Writes small valid checkpoints with ckpt, to seed the fuzzer's corpus.
#include <ckpt/format.hpp>

#include <ATen/ATen.h>

#include <string>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  c10::impl::GenericDict sd(c10::StringType::get(), c10::AnyType::get());
  auto base = at::arange(12, at::kFloat).reshape({3, 4});
  sd.insert("w", base);
  sd.insert("wt", base.t());
  sd.insert("n", int64_t{1} << 40);
  ckpt::write_file(dir + "/views.pt", sd);

  c10::impl::GenericList list(c10::AnyType::get());
  list.push_back(at::ones({2}, at::kBFloat16));
  list.push_back(
      c10::ivalue::Tuple::create({c10::IValue(0.5), c10::IValue(std::string("s")), c10::IValue()}));
  c10::impl::GenericDict by_int(c10::IntType::get(), c10::AnyType::get());
  by_int.insert(int64_t{0}, list);
  ckpt::write_file(dir + "/nested.pt", by_int);
  return 0;
}
