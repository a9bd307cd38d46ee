// Checkpoints larger than 4 GiB (zip64) through real Python torch, both ways:
// ckpt writes one record larger than 4 GiB and one that starts past 4 GiB and
// torch.load reads every byte right (tests/interop/large_files.py check); torch.save
// writes one and ckpt reads it, copied and mapped, and checks its CRCs.
//
// Byte patterns are t[i] = i % period, checked completely: the first period,
// then t[period:] == t[:-period], plus windows around 2 and 4 GiB compared
// directly. Each big file is deleted as soon as it was checked; at most one
// copy of the data lives in memory at a time (about 4.3 GiB).
#define BOOST_TEST_MODULE interop_large_test
#include <ckpt/format.hpp>

#include <boost/test/unit_test.hpp>

#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using c10::IValue;
using ckpt::test::TempDir;

namespace {

constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;
constexpr std::uint64_t kZip32Max = 0xffffffffu;
/// One record past 4 GiB (by an odd amount), then one that starts past 4 GiB.
constexpr std::int64_t kBig = (std::int64_t{4} << 30) + 123457;
constexpr std::int64_t kSecond = (std::int64_t{256} << 20) + 5;
/// What torch.save writes: one record past 4 GiB.
constexpr std::int64_t kPythonBig = (std::int64_t{4} << 30) + 99991;

using ckpt::test::describe;
using ckpt::test::python_script;

#define REQUIRE_PYTHON(...)                                        \
  do {                                                             \
    const auto result_ = python_script(__VA_ARGS__);               \
    BOOST_TEST_MESSAGE(result_.output);                            \
    BOOST_REQUIRE_MESSAGE(result_.status == 0, describe(result_)); \
  } while (0)

c10::impl::GenericDict str_dict() {
  return c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get());
}

/// uint8[n] with t[i] = i % period, filled by doubling copies.
at::Tensor periodic(std::int64_t n, int period) {
  auto t = at::empty({n}, at::kByte);
  auto* p = t.data_ptr<std::uint8_t>();
  const std::int64_t first = std::min<std::int64_t>(n, period);
  for (std::int64_t i = 0; i < first; ++i) p[i] = static_cast<std::uint8_t>(i);
  for (std::int64_t filled = first; filled < n;) {  // a multiple of period until the last copy
    const std::int64_t m = std::min(filled, n - filled);
    std::memcpy(p + filled, p, static_cast<std::size_t>(m));
    filled += m;
  }
  return t;
}

/// Checks that `t` is uint8[n] with t[i] = i % period, every byte of it.
void check_periodic(const IValue& v, std::int64_t n, int period, const std::string& name) {
  BOOST_TEST_CONTEXT(name) {
    BOOST_REQUIRE(v.isTensor());
    const auto& t = v.toTensor();
    BOOST_REQUIRE(t.scalar_type() == at::kByte);
    BOOST_REQUIRE(t.dim() == 1);
    BOOST_REQUIRE(t.size(0) == n);
    BOOST_REQUIRE(t.is_contiguous());
    const auto* p = t.data_ptr<std::uint8_t>();
    std::set<std::int64_t> starts;
    for (std::int64_t s : {std::int64_t{0}, n / 3, n / 2, (std::int64_t{1} << 31) - 2048,
                           (std::int64_t{1} << 32) - 2048, n - 4096})
      starts.insert(std::clamp<std::int64_t>(s, 0, std::max<std::int64_t>(n - 4096, 0)));
    for (std::int64_t s : starts) {
      for (std::int64_t i = s; i < std::min(s + 4096, n); ++i) {
        if (p[i] != i % period) {
          BOOST_ERROR("byte " << i << " is " << int{p[i]} << ", expected " << i % period);
          return;
        }
      }
    }
    for (std::int64_t i = 0; i < std::min<std::int64_t>(n, period); ++i) {
      if (p[i] != i) {
        BOOST_ERROR("byte " << i << " is " << int{p[i]});
        return;
      }
    }
    if (n > period)
      BOOST_CHECK_MESSAGE(std::memcmp(p + period, p, static_cast<std::size_t>(n - period)) == 0,
                          "the bytes do not repeat with period " << period);
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(ckpt_writes_over_4gib) {
  TempDir dir;
  const auto file = dir / "large.pt";
  {
    auto sd = str_dict();
    sd.insert("big", periodic(kBig, 251));
    sd.insert("second", periodic(kSecond, 241));
    sd.insert("tail", at::arange(1000, at::kLong) * 3);
    sd.insert("name", "ckpt-large");
    ckpt::write_file(file, sd);
  }  // the tensors are freed before Python loads the file
  BOOST_TEST(fs::file_size(file) > 4 * kGiB + kGiB / 4);
  {
    ckpt::FileReader reader(file);
    std::vector<std::string> names;
    for (const auto& r : reader.records()) names.push_back(r.name);
    const std::vector<std::string> want = {"archive/data.pkl", "archive/byteorder", "archive/data/0",
                                           "archive/data/1",   "archive/data/2",    "archive/version"};
    BOOST_TEST(names == want, boost::test_tools::per_element());
    BOOST_REQUIRE(names.size() == want.size());
    BOOST_TEST(reader.records()[2].size == static_cast<std::uint64_t>(kBig));
    BOOST_TEST(reader.records()[3].header_offset > kZip32Max);
  }
  REQUIRE_PYTHON("large_files.py", {"check", file.string(), std::to_string(kBig), std::to_string(kSecond)});
  fs::remove(file);
}

BOOST_AUTO_TEST_CASE(python_writes_over_4gib) {
  TempDir dir;
  const auto file = dir / "large.pt";
  REQUIRE_PYTHON("large_files.py", {"make", file.string(), std::to_string(kPythonBig)});
  BOOST_TEST(fs::file_size(file) > static_cast<std::uint64_t>(kPythonBig));

  for (bool mmap : {false, true}) {
    BOOST_TEST_CONTEXT("mmap " << mmap) {
      ckpt::ReadOptions options;
      options.mmap = mmap;
      ckpt::FileReader reader(file, options);
      BOOST_TEST(reader.prefix() == "large");  // torch 1.x names the archive after the file
      const ckpt::RecordInfo* big = nullptr;
      for (const auto& r : reader.records())
        if (r.name == "large/data/0") big = &r;
      BOOST_REQUIRE(big);
      BOOST_TEST(big->size == static_cast<std::uint64_t>(kPythonBig));
      const IValue loaded = reader.load();
      BOOST_REQUIRE(loaded.isGenericDict());
      auto sd = loaded.toGenericDict();
      BOOST_REQUIRE(sd.size() == 3u);
      check_periodic(sd.at("big"), kPythonBig, 251, "big");
      BOOST_TEST(ckpt::test::identical(sd.at("after").toTensor(), at::arange(1000, at::kLong) * 3));
      BOOST_TEST(sd.at("name").toStringRef() == "python-large");
      if (!mmap) reader.verify();  // torch's CRC-32s, the one of the > 4 GiB record included
    }
  }
  fs::remove(file);
}
