// The checkpoint file format, through the public API: what is written reads back
// exactly, views and shared storages survive, partial reads read only what they
// need, and a failed save leaves the previous checkpoint untouched.
#include <ckpt/format.hpp>

#define BOOST_TEST_MODULE format_test
#include <boost/test/unit_test.hpp>

#include "format/zip.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <sys/resource.h>
#include <csignal>
#include <fstream>

namespace fs = std::filesystem;
using ckpt::test::identical;
using ckpt::test::TempDir;

namespace {

c10::impl::GenericDict str_dict() {
  return c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get());
}

at::Tensor pattern(c10::ScalarType dtype, at::IntArrayRef sizes) {
  std::int64_t n = 1;
  for (auto s : sizes) n *= s;
  auto base = at::arange(n, at::kDouble);
  if (dtype == at::kBool) return (base.remainder(3) == 0).reshape(sizes);
  if (at::isComplexType(dtype)) return at::complex(base, -base).to(dtype).reshape(sizes);
  if (dtype == at::kByte || dtype == at::kChar) return base.remainder(100).to(dtype).reshape(sizes);
  return (base * 0.5 - 3).to(dtype).reshape(sizes);
}

const c10::ScalarType kAllDtypes[] = {at::kFloat, at::kDouble, at::kHalf,         at::kBFloat16,
                                      at::kChar,  at::kByte,   at::kShort,        at::kInt,
                                      at::kLong,  at::kBool,   at::kComplexFloat, at::kComplexDouble};

std::uint64_t rchar() {
  std::ifstream io("/proc/self/io");
  std::string key;
  std::uint64_t value = 0;
  while (io >> key >> value)
    if (key == "rchar:") return value;
  throw std::runtime_error("no rchar in /proc/self/io");
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(round_trip)

BOOST_AUTO_TEST_CASE(every_dtype_reads_back_exactly) {
  TempDir dir;
  for (bool direct : {true, false}) {
    auto sd = str_dict();
    for (auto dtype : kAllDtypes) sd.insert(c10::toString(dtype), pattern(dtype, {3, 5}));
    const auto file = dir / (direct ? "direct.pt" : "buffered.pt");
    ckpt::write_file(file, sd, {.direct_io = direct});
    auto back = ckpt::read_file(file).toGenericDict();
    BOOST_REQUIRE_EQUAL(back.size(), sd.size());
    for (auto dtype : kAllDtypes) {
      BOOST_TEST_CONTEXT(c10::toString(dtype) << (direct ? " direct" : " buffered")) {
        BOOST_CHECK(identical(back.at(c10::toString(dtype)).toTensor(), pattern(dtype, {3, 5})));
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(zero_dim_and_empty_tensors) {
  TempDir dir;
  auto sd = str_dict();
  sd.insert("scalar", at::scalar_tensor(2.5, at::kDouble));
  sd.insert("empty", at::empty({0}, at::kFloat));
  sd.insert("empty_2d", at::empty({4, 0}, at::kLong));
  ckpt::write_file(dir / "a.pt", sd);
  auto back = ckpt::read_file(dir / "a.pt").toGenericDict();
  auto scalar = back.at("scalar").toTensor();
  BOOST_CHECK_EQUAL(scalar.dim(), 0);
  BOOST_CHECK_EQUAL(scalar.item<double>(), 2.5);
  BOOST_CHECK(identical(back.at("empty").toTensor(), at::empty({0}, at::kFloat)));
  BOOST_CHECK(identical(back.at("empty_2d").toTensor(), at::empty({4, 0}, at::kLong)));
}

BOOST_AUTO_TEST_CASE(views_keep_offset_and_strides_and_storages_are_shared) {
  TempDir dir;
  auto base = pattern(at::kFloat, {6, 4});
  auto sd = str_dict();
  sd.insert("base", base);
  sd.insert("transposed", base.t());
  sd.insert("slice", base.narrow(0, 2, 3).narrow(1, 1, 2));
  ckpt::write_file(dir / "v.pt", sd);

  ckpt::FileReader reader(dir / "v.pt");
  // One storage record for the three tensors.
  int data_records = 0;
  for (const auto& r : reader.records()) data_records += r.name.find("/data/") != std::string::npos;
  BOOST_CHECK_EQUAL(data_records, 1);

  auto back = reader.load().toGenericDict();
  auto b = back.at("base").toTensor(), t = back.at("transposed").toTensor(), s = back.at("slice").toTensor();
  BOOST_CHECK(identical(t, base.t()));
  BOOST_CHECK(t.strides() == base.t().strides());
  BOOST_CHECK(identical(s, base.narrow(0, 2, 3).narrow(1, 1, 2)));
  BOOST_CHECK_EQUAL(s.storage_offset(), 9);
  // Shared again after loading: a write through one is seen through the others.
  BOOST_CHECK(b.storage().data() == t.storage().data());
  b.index_put_({3, 2}, 1000.0f);
  BOOST_CHECK_EQUAL(t.index({2, 3}).item<float>(), 1000.0f);
  BOOST_CHECK_EQUAL(s.index({1, 1}).item<float>(), 1000.0f);
}

BOOST_AUTO_TEST_CASE(containers_and_scalars) {
  TempDir dir;
  auto inner = c10::impl::GenericDict(c10::IntType::get(), c10::AnyType::get());
  inner.insert(int64_t{0}, std::string("zero"));
  inner.insert(int64_t{7}, at::ones({2}));
  c10::impl::GenericList list(c10::AnyType::get());
  list.push_back(int64_t{1} << 40);
  list.push_back(-(int64_t{1} << 62));
  list.push_back(c10::IValue(0.1));
  list.push_back(c10::IValue());
  list.push_back(true);
  list.push_back(
      c10::ivalue::Tuple::create({c10::IValue(int64_t{-1}), c10::IValue(std::string("ünïcødé ✓"))}));
  auto sd = str_dict();
  sd.insert("by_int", inner);
  sd.insert("list", list);
  sd.insert("empty_list", c10::impl::GenericList(c10::AnyType::get()));
  sd.insert("empty_dict", str_dict());
  sd.insert("empty_tuple", c10::ivalue::Tuple::create({}));
  ckpt::write_file(dir / "c.pt", sd);

  auto back = ckpt::read_file(dir / "c.pt").toGenericDict();
  std::vector<std::string> keys;
  for (const auto& e : back) keys.push_back(e.key().toStringRef());
  BOOST_CHECK(
      (keys == std::vector<std::string>{"by_int", "list", "empty_list", "empty_dict", "empty_tuple"}));
  auto by_int = back.at("by_int").toGenericDict();
  BOOST_CHECK_EQUAL(by_int.at(int64_t{0}).toStringRef(), "zero");
  BOOST_CHECK(identical(by_int.at(int64_t{7}).toTensor(), at::ones({2})));
  auto l = back.at("list").toList();
  BOOST_REQUIRE_EQUAL(l.size(), 6u);
  BOOST_CHECK_EQUAL(l.get(0).toInt(), int64_t{1} << 40);
  BOOST_CHECK_EQUAL(l.get(1).toInt(), -(int64_t{1} << 62));
  BOOST_CHECK_EQUAL(l.get(2).toDouble(), 0.1);
  BOOST_CHECK(l.get(3).isNone());
  BOOST_CHECK(l.get(4).toBool());
  auto tup = l.get(5).toTupleRef().elements();
  BOOST_CHECK_EQUAL(tup[0].toInt(), -1);
  BOOST_CHECK_EQUAL(tup[1].toStringRef(), "ünïcødé ✓");
  BOOST_CHECK_EQUAL(back.at("empty_list").toList().size(), 0u);
  BOOST_CHECK_EQUAL(back.at("empty_dict").toGenericDict().size(), 0u);
  BOOST_CHECK_EQUAL(back.at("empty_tuple").toTupleRef().elements().size(), 0u);
}

BOOST_AUTO_TEST_CASE(integers_at_every_encoding_boundary) {
  TempDir dir;
  const std::int64_t values[] = {0,
                                 1,
                                 255,
                                 256,
                                 65535,
                                 65536,
                                 -1,
                                 -128,
                                 -129,
                                 INT32_MAX,
                                 INT32_MIN,
                                 int64_t{INT32_MAX} + 1,
                                 int64_t{INT32_MIN} - 1,
                                 INT64_MAX,
                                 INT64_MIN,
                                 128,
                                 -32768};
  c10::impl::GenericList list(c10::AnyType::get());
  for (auto v : values) list.push_back(v);
  ckpt::write_file(dir / "i.pt", list);
  auto back = ckpt::read_file(dir / "i.pt").toList();
  BOOST_REQUIRE_EQUAL(back.size(), std::size(values));
  for (std::size_t i = 0; i < back.size(); ++i) BOOST_CHECK_EQUAL(back.get(i).toInt(), values[i]);
}

BOOST_AUTO_TEST_CASE(unsupported_values_are_refused_with_their_key) {
  TempDir dir;
  auto sd = str_dict();
  auto nested = str_dict();
  nested.insert("q", at::quantize_per_tensor(at::ones({2}), 0.1, 0, at::kQInt8));
  sd.insert("model", nested);
  BOOST_CHECK_EXCEPTION(
      ckpt::write_file(dir / "u.pt", sd), ckpt::Unsupported,
      [](const ckpt::Unsupported& e) { return std::string(e.what()).find("model.q") != std::string::npos; });
  BOOST_CHECK(names_in(dir.path()).empty());
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(reading)

BOOST_AUTO_TEST_CASE(tensor_records_are_4096_aligned_and_crcs_verify) {
  TempDir dir;
  auto sd = str_dict();
  sd.insert("a", pattern(at::kFloat, {1000}));
  sd.insert("b", pattern(at::kDouble, {3}));
  sd.insert("c", pattern(at::kLong, {5000}));
  ckpt::write_file(dir / "a.pt", sd);
  ckpt::FileReader reader(dir / "a.pt");
  reader.verify();
  // Every tensor storage starts on a page (mmap, O_DIRECT); the pickle and
  // the small records follow each other unpadded.
  std::size_t storages = 0;
  for (const auto& r : reader.records()) {
    BOOST_TEST_CONTEXT(r.name) {
      if (r.name.find("/data/") == std::string::npos) continue;
      ++storages;
      BOOST_CHECK_EQUAL(r.data_offset % 4096, 0u);
    }
  }
  BOOST_CHECK_EQUAL(storages, 3u);
  BOOST_CHECK_LT(reader.records().front().data_offset, 4096u);
  BOOST_CHECK_EQUAL(reader.prefix(), "archive");
}

BOOST_AUTO_TEST_CASE(verify_and_crc_checked_reads_catch_a_flipped_byte) {
  TempDir dir;
  auto sd = str_dict();
  sd.insert("w", pattern(at::kFloat, {4096}));
  ckpt::write_file(dir / "a.pt", sd);
  std::uint64_t at_byte = 0;
  {
    ckpt::FileReader reader(dir / "a.pt");
    reader.verify();  // materializes data offsets
    for (const auto& r : reader.records())
      if (r.name == "archive/data/0") at_byte = r.data_offset + 1234;
  }
  BOOST_REQUIRE(at_byte > 0);
  ckpt::test::flip_byte(dir / "a.pt", at_byte, 0x10);
  auto names_record = [](const ckpt::CorruptCheckpoint& e) {
    return std::string(e.what()).find("archive/data/0") != std::string::npos;
  };
  ckpt::FileReader reader(dir / "a.pt");
  BOOST_CHECK_EXCEPTION(reader.verify(), ckpt::CorruptCheckpoint, names_record);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(dir / "a.pt", {.verify_crc = true}), ckpt::CorruptCheckpoint,
                        names_record);
  // Without the check the (damaged) bytes load: the CRC check is what catches it.
  BOOST_CHECK_NO_THROW(ckpt::read_file(dir / "a.pt"));
}

BOOST_AUTO_TEST_CASE(mmap_load_points_into_a_private_mapping) {
  TempDir dir;
  auto base = pattern(at::kFloat, {64, 64});
  auto sd = str_dict();
  sd.insert("w", base);
  sd.insert("wt", base.t());
  ckpt::write_file(dir / "m.pt", sd);
  {
    auto back = ckpt::read_file(dir / "m.pt", {.mmap = true}).toGenericDict();
    auto w = back.at("w").toTensor();
    BOOST_CHECK(identical(w, base));
    BOOST_CHECK(identical(back.at("wt").toTensor(), base.t()));
    BOOST_CHECK_EQUAL(reinterpret_cast<std::uintptr_t>(w.data_ptr()) % 4096, 0u);
    // Copy-on-write: writing to the tensor does not change the file.
    w.fill_(-1.0f);
    BOOST_CHECK_EQUAL(back.at("wt").toTensor().index({0, 0}).item<float>(), -1.0f);
  }
  auto again = ckpt::read_file(dir / "m.pt").toGenericDict();
  BOOST_CHECK(identical(again.at("w").toTensor(), base));
}

BOOST_AUTO_TEST_CASE(mapped_tensors_outlive_their_reader) {
  TempDir dir;
  auto sd = str_dict();
  sd.insert("w", pattern(at::kDouble, {100}));
  ckpt::write_file(dir / "m.pt", sd);
  at::Tensor w;
  {
    ckpt::FileReader reader(dir / "m.pt", {.mmap = true});
    w = reader.tensor(*reader.root().find("w")->tensor);
  }
  fs::remove(dir / "m.pt");
  BOOST_CHECK(identical(w, pattern(at::kDouble, {100})));
}

BOOST_AUTO_TEST_CASE(read_into_fills_the_target_in_place) {
  TempDir dir;
  auto sd = str_dict();
  sd.insert("w", pattern(at::kFloat, {8, 16}));
  sd.insert("view", pattern(at::kDouble, {10, 10}).narrow(1, 3, 4));
  ckpt::write_file(dir / "a.pt", sd);
  ckpt::FileReader reader(dir / "a.pt");

  auto target = at::zeros({8, 16}, at::kFloat);
  const void* before = target.data_ptr();
  reader.read_into(*reader.root().find("w")->tensor, target, "w");
  BOOST_CHECK(target.data_ptr() == before);
  BOOST_CHECK(identical(target, pattern(at::kFloat, {8, 16})));

  auto strided_target = at::zeros({4, 10}, at::kDouble).t();  // non-contiguous target
  reader.read_into(*reader.root().find("view")->tensor, strided_target, "view");
  BOOST_CHECK(identical(strided_target, pattern(at::kDouble, {10, 10}).narrow(1, 3, 4)));
}

BOOST_AUTO_TEST_CASE(read_into_refuses_a_wrong_shape_or_dtype_naming_both) {
  TempDir dir;
  auto sd = str_dict();
  sd.insert("w", pattern(at::kFloat, {8, 16}));
  ckpt::write_file(dir / "a.pt", sd);
  ckpt::FileReader reader(dir / "a.pt");
  const auto& info = *reader.root().find("w")->tensor;
  auto wrong_shape = at::zeros({16, 8}, at::kFloat);
  BOOST_CHECK_EXCEPTION(
      reader.read_into(info, wrong_shape, "model.w"), ckpt::Mismatch, [](const ckpt::Mismatch& e) {
        std::string m = e.what();
        return m.find("model.w") != std::string::npos && m.find("[8, 16]") != std::string::npos &&
               m.find("[16, 8]") != std::string::npos;
      });
  auto wrong_dtype = at::zeros({8, 16}, at::kDouble);
  BOOST_CHECK_EXCEPTION(
      reader.read_into(info, wrong_dtype, "model.w"), ckpt::Mismatch, [](const ckpt::Mismatch& e) {
        std::string m = e.what();
        return m.find("Float") != std::string::npos && m.find("Double") != std::string::npos;
      });
  BOOST_CHECK(at::equal(wrong_shape, at::zeros({16, 8})));  // untouched
}

BOOST_AUTO_TEST_CASE(partial_read_of_a_small_tensor_reads_only_its_record) {
  // Acceptance: reading one 4 KiB tensor of a >= 512 MiB file reads < 8 MiB.
  TempDir dir;
  auto sd = str_dict();
  for (int i = 0; i < 33; ++i)
    sd.insert("big" + std::to_string(i), at::full({4 << 20}, float(i)));  // 16 MiB each
  sd.insert("small", pattern(at::kFloat, {1024}));                        // 4 KiB
  ckpt::write_file(dir / "big.pt", sd);
  BOOST_REQUIRE_GE(fs::file_size(dir / "big.pt"), std::uint64_t{512} << 20);
  sd = str_dict();  // drop the 528 MiB of sources

  const std::uint64_t before = rchar();
  ckpt::FileReader reader(dir / "big.pt");
  auto small = reader.tensor(*reader.root().find("small")->tensor);
  const std::uint64_t read = rchar() - before;
  BOOST_CHECK(identical(small, pattern(at::kFloat, {1024})));
  BOOST_TEST_MESSAGE("partial read of 4 KiB from a " << fs::file_size(dir / "big.pt") << " byte file read "
                                                     << read << " bytes");
  BOOST_CHECK_LT(read, std::uint64_t{8} << 20);
  BOOST_CHECK_LE(reader.bytes_read(), read);  // rchar also counts this process's other reads
}

BOOST_AUTO_TEST_CASE(missing_file_is_not_found_naming_it) {
  TempDir dir;
  BOOST_CHECK_EXCEPTION(ckpt::read_file(dir / "nope.pt"), ckpt::NotFound, [](const ckpt::NotFound& e) {
    return std::string(e.what()).find("nope.pt") != std::string::npos;
  });
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(durability)

BOOST_AUTO_TEST_CASE(overwrite_replaces_the_file_and_leaves_no_temporary) {
  TempDir dir;
  auto a = str_dict();
  a.insert("v", at::full({10}, 1.0f));
  ckpt::write_file(dir / "c.pt", a);
  auto b = str_dict();
  b.insert("v", at::full({10}, 2.0f));
  ckpt::write_file(dir / "c.pt", b);
  BOOST_CHECK(
      identical(ckpt::read_file(dir / "c.pt").toGenericDict().at("v").toTensor(), at::full({10}, 2.0f)));
  BOOST_CHECK((names_in(dir.path()) == std::vector<std::string>{"c.pt"}));
}

// A save that fails midway (the file-size limit is hit) leaves nothing at its
// final path, no temporary file, and an earlier checkpoint untouched.
BOOST_AUTO_TEST_CASE(failed_save_leaves_the_previous_checkpoint_untouched) {
  std::signal(SIGXFSZ, SIG_IGN);  // get EFBIG instead of being killed
  for (bool direct : {true, false}) {
    BOOST_TEST_CONTEXT((direct ? "O_DIRECT" : "buffered")) {
      TempDir dir;
      auto good = str_dict();
      good.insert("w", pattern(at::kFloat, {1000}));
      ckpt::write_file(dir / "c.pt", good, {.direct_io = direct});
      const auto good_size = fs::file_size(dir / "c.pt");

      auto bigger = str_dict();
      bigger.insert("w", at::ones({4 << 20}));  // 16 MiB
      rlimit saved{};
      ::getrlimit(RLIMIT_FSIZE, &saved);
      rlimit small = saved;
      small.rlim_cur = 6 << 20;
      BOOST_REQUIRE_EQUAL(::setrlimit(RLIMIT_FSIZE, &small), 0);
      bool threw = false;
      try {
        ckpt::write_file(dir / "c.pt", bigger, {.direct_io = direct});
      } catch (const ckpt::IoError& e) {
        threw = true;
        BOOST_TEST_MESSAGE("failed as expected: " << e.what());
        BOOST_CHECK(std::string(e.what()).find("c.pt") != std::string::npos);
      }
      ::setrlimit(RLIMIT_FSIZE, &saved);
      BOOST_CHECK(threw);
      BOOST_CHECK((names_in(dir.path()) == std::vector<std::string>{"c.pt"}));
      BOOST_CHECK_EQUAL(fs::file_size(dir / "c.pt"), good_size);
      ckpt::FileReader reader(dir / "c.pt");
      reader.verify();
      BOOST_CHECK(identical(reader.load().toGenericDict().at("w").toTensor(), pattern(at::kFloat, {1000})));

      // A save to a new path fails the same way and leaves nothing behind.
      ::setrlimit(RLIMIT_FSIZE, &small);
      BOOST_CHECK_THROW(ckpt::write_file(dir / "new.pt", bigger, {.direct_io = direct}), ckpt::IoError);
      ::setrlimit(RLIMIT_FSIZE, &saved);
      BOOST_CHECK((names_in(dir.path()) == std::vector<std::string>{"c.pt"}));
    }
  }
}

BOOST_AUTO_TEST_CASE(save_into_a_missing_directory_fails_cleanly) {
  TempDir dir;
  auto sd = str_dict();
  sd.insert("x", int64_t{1});
  BOOST_CHECK_THROW(ckpt::write_file(dir / "no" / "such" / "c.pt", sd), ckpt::IoError);
}

BOOST_AUTO_TEST_SUITE_END()
