// Hugging Face safetensors in C++: what save() writes is the format byte for
// byte (checked here by a parser of the test's own), everything round-trips
// exactly (every dtype, 0-d and empty tensors, views, shards with an index,
// metadata), a partial load reads only the bytes asked for, in-place and mapped
// loads do what they say, and every hostile or damaged file is refused with a
// typed error naming the fault, never a crash or an unbounded allocation.
#include <ckpt/safetensors.hpp>

#define BOOST_TEST_MODULE safetensors_test
#include <boost/test/unit_test.hpp>

#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <boost/json.hpp>

#include <fmt/format.h>

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace st = ckpt::safetensors;
using ckpt::test::same_bits;
using ckpt::test::TempDir;

namespace {

// --- files ------------------------------------------------------------------------

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  BOOST_REQUIRE(out.good());
}

std::string le64(std::uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return out;
}

/// A safetensors file made by hand: the length (the header's own unless
/// `length` says otherwise), the header text as given, the data.
void write_raw(const fs::path& path, std::string_view header, std::string_view data = {},
               std::optional<std::uint64_t> length = std::nullopt) {
  write_bytes(path, le64(length.value_or(header.size())) + std::string(header) + std::string(data));
}

/// What the test's own reading of a file finds: the header length, the header
/// as JSON (Boost.JSON's DOM, keys in file order) and its raw text.
struct Parsed {
  std::uint64_t length = 0;
  std::string text;
  boost::json::object header;
};

Parsed parse_file(const fs::path& path) {
  const std::string bytes = read_bytes(path);
  BOOST_REQUIRE_GE(bytes.size(), 8u);
  Parsed p;
  for (int i = 7; i >= 0; --i)
    p.length = (p.length << 8) | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  BOOST_REQUIRE_LE(8 + p.length, bytes.size());
  p.text = bytes.substr(8, p.length);
  p.header = boost::json::parse(p.text).as_object();
  return p;
}

// --- values -----------------------------------------------------------------------

/// Every dtype safetensors and libtorch 1.13 share, with the values that go
/// wrong first: special floats, integer extremes, both bools.
std::vector<std::pair<std::string, at::Tensor>> every_dtype() {
  const std::vector<double> specials = {0.1,
                                        -0.0,
                                        INFINITY,
                                        -INFINITY,
                                        NAN,
                                        1e300,
                                        -1e-300,
                                        5e-324,
                                        65504,
                                        65505,
                                        1.0 / 3,
                                        3.4028234663852886e38,
                                        1.401298464324817e-45,
                                        -2.5};
  const auto floats = at::tensor(specials, at::kDouble);
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.emplace_back("f64", floats.reshape({2, 7}));
  out.emplace_back("f32", floats.to(at::kFloat));
  out.emplace_back("f16", floats.to(at::kHalf).reshape({7, 2}));
  out.emplace_back("bf16", floats.to(at::kBFloat16));
  out.emplace_back("i64", at::tensor(std::vector<std::int64_t>{std::numeric_limits<std::int64_t>::min(),
                                                               std::numeric_limits<std::int64_t>::max(), 0,
                                                               -1, std::int64_t{1} << 40}));
  out.emplace_back("i32",
                   at::tensor(std::vector<std::int64_t>{-2147483648LL, 2147483647, 0, -1}).to(at::kInt));
  out.emplace_back("i16", at::tensor(std::vector<std::int64_t>{-32768, 32767, 0, -1, 1}).to(at::kShort));
  out.emplace_back("i8", at::tensor(std::vector<std::int64_t>{-128, 127, 0, -1, 1}).to(at::kChar));
  out.emplace_back("u8", at::tensor(std::vector<std::int64_t>{0, 255, 1, 128, 127}).to(at::kByte));
  out.emplace_back("bool", at::tensor(std::vector<std::int64_t>{1, 0, 0, 1}).to(at::kBool).reshape({2, 2}));
  out.emplace_back("c64", at::view_as_complex(floats.to(at::kFloat).reshape({7, 2})));
  return out;
}

const std::map<std::string, std::string> kNames = {
    {"f64", "F64"}, {"f32", "F32"}, {"f16", "F16"}, {"bf16", "BF16"}, {"i64", "I64"}, {"i32", "I32"},
    {"i16", "I16"}, {"i8", "I8"},   {"u8", "U8"},   {"bool", "BOOL"}, {"c64", "C64"}};

ckpt::StateDict dict_of(const std::vector<std::pair<std::string, at::Tensor>>& items) {
  ckpt::StateDict sd;
  for (const auto& [k, v] : items) sd.insert(k, v);
  return sd;
}

std::vector<std::string> keys_of(const ckpt::StateDict& sd) {
  std::vector<std::string> keys;
  for (const auto& e : sd) keys.push_back(e.key().toStringRef());
  return keys;
}

/// `f32` of `n` distinct values starting at `from`.
at::Tensor ramp(std::int64_t n, double from = 0) {
  return at::arange(n, at::kFloat) + from;
}

// --- errors -----------------------------------------------------------------------

/// Predicate for BOOST_CHECK_EXCEPTION: the message contains every part.
struct Says {
  std::vector<std::string> parts;
  bool operator()(const std::exception& e) const {
    const std::string what = e.what();
    bool ok = true;
    for (const auto& p : parts)
      if (what.find(p) == std::string::npos) {
        BOOST_TEST_MESSAGE("error message lacks \"" << p << "\": " << what);
        ok = false;
      }
    return ok;
  }
};

Says says(std::initializer_list<std::string> parts) {
  return Says{std::vector<std::string>(parts)};
}

/// The message names `file` and says `parts`.
Says says(const fs::path& file, std::initializer_list<std::string> parts) {
  Says s{std::vector<std::string>(parts)};
  s.parts.push_back(file.string());
  return s;
}

/// A file whose header is `header` (and data `data`) is refused as corrupt,
/// with a message that names the file and says `parts`, whether loaded whole,
/// mapped or only opened.
void check_refused(const std::string& header, const std::string& data,
                   std::initializer_list<std::string> parts,
                   std::optional<std::uint64_t> length = std::nullopt) {
  TempDir dir;
  const fs::path p = dir / "bad.safetensors";
  write_raw(p, header, data, length);
  BOOST_CHECK_EXCEPTION(st::Reader{p}, ckpt::CorruptCheckpoint, says(p, parts));
  BOOST_CHECK_EXCEPTION(st::load(p, {.mmap = true}), ckpt::CorruptCheckpoint, says(p, parts));
}

// --- what the kernel says ---------------------------------------------------------

/// This process's `rchar` (bytes read by any read system call), or nothing
/// where the kernel keeps no I/O accounting.
std::optional<std::uint64_t> rchar() {
  std::ifstream io("/proc/self/io");
  std::string key;
  std::uint64_t value = 0;
  while (io >> key >> value)
    if (key == "rchar:") return value;
  return std::nullopt;
}

/// Whether `address` lies in a mapping of `file` (per /proc/self/maps).
bool in_mapping_of(const void* address, const fs::path& file) {
  std::ifstream maps("/proc/self/maps");
  const auto a = reinterpret_cast<std::uintptr_t>(address);
  const std::string want = fs::canonical(file).string();
  for (std::string line; std::getline(maps, line);) {
    std::uintptr_t from = 0, to = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &from, &to) != 2) continue;
    if (a < from || a >= to) continue;
    return line.size() >= want.size() && line.compare(line.size() - want.size(), want.size(), want) == 0;
  }
  return false;
}

std::vector<std::string> files_in(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

// === round trips ======================================================================

BOOST_AUTO_TEST_CASE(every_dtype_round_trips_bit_for_bit) {
  TempDir dir;
  const auto values = every_dtype();
  st::save(dir / "all.safetensors", dict_of(values));
  st::Reader reader(dir / "all.safetensors");
  BOOST_CHECK(!reader.is_index());
  for (const auto& [name, want] : values) {
    BOOST_TEST_CONTEXT("tensor " << name) {
      BOOST_CHECK_EQUAL(reader.entry(name).dtype, kNames.at(name));
      BOOST_CHECK(reader.entry(name).scalar_type == want.scalar_type());
      BOOST_CHECK(same_bits(reader.tensor(name), want));
      BOOST_CHECK(same_bits(reader.mapped(name), want));
    }
  }
  const ckpt::StateDict loaded = st::load(dir / "all.safetensors");
  BOOST_CHECK_EQUAL(loaded.size(), values.size());
  for (const auto& [name, want] : values) BOOST_CHECK(same_bits(loaded.at(name).toTensor(), want));
}

BOOST_AUTO_TEST_CASE(zero_dimensional_and_empty_tensors_round_trip) {
  TempDir dir;
  const std::vector<std::pair<std::string, at::Tensor>> values = {
      {"scalar", at::scalar_tensor(2.5, at::kDouble)},
      {"scalar_bool", at::scalar_tensor(1, at::kBool)},
      {"empty", at::empty({0}, at::kFloat)},
      {"empty_2d", at::empty({2, 0, 3}, at::kHalf)},
      {"after", ramp(3)},
  };
  const fs::path p = dir / "edge.safetensors";
  st::save(p, dict_of(values));
  const Parsed parsed = parse_file(p);
  BOOST_CHECK(parsed.header.at("scalar").at("shape").as_array().empty());
  BOOST_CHECK_EQUAL(boost::json::serialize(parsed.header.at("empty_2d").at("shape")), "[2,0,3]");
  for (const bool mmap : {false, true}) {
    const auto loaded = st::load(p, {.mmap = mmap});
    for (const auto& [name, want] : values) {
      BOOST_TEST_CONTEXT("tensor " << name << (mmap ? " mapped" : "")) {
        const at::Tensor got = loaded.at(name).toTensor();
        BOOST_CHECK(same_bits(got, want));
        BOOST_CHECK_EQUAL(got.dim(), want.dim());
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(the_file_is_the_format_byte_for_byte) {
  TempDir dir;
  // Insertion order u8, f64, i16, f32, f64: the data goes largest element
  // first, insertion order within a size.
  ckpt::StateDict sd;
  sd.insert("a", at::arange(3, at::kByte));
  sd.insert("b", at::arange(2, at::kDouble));
  sd.insert("c", at::arange(3, at::kShort));
  sd.insert("d", at::arange(3, at::kFloat));
  sd.insert("e", at::arange(1, at::kDouble));
  const fs::path p = dir / "layout.safetensors";
  st::save(p, sd, {.metadata = {{"format", "pt"}, {"b", "2"}}});

  const Parsed parsed = parse_file(p);
  BOOST_CHECK_EQUAL(parsed.length % 8, 0u);  // the data starts 8-aligned
  const auto close = parsed.text.find_last_of('}');
  BOOST_CHECK(parsed.text.find_first_not_of(' ', close + 1) == std::string::npos);  // padded with spaces
  BOOST_CHECK_LT(parsed.text.size() - close - 1, 8u);

  std::vector<std::string> keys;
  for (const auto& kv : parsed.header) keys.emplace_back(kv.key());
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(keys, " ")), "__metadata__ b e d c a");
  BOOST_CHECK_EQUAL(boost::json::serialize(parsed.header.at("__metadata__")), R"({"b":"2","format":"pt"})");

  std::uint64_t at = 0;
  const std::map<std::string, std::size_t> sizes = {{"b", 8}, {"e", 8}, {"d", 4}, {"c", 2}, {"a", 1}};
  for (const std::string name : {"b", "e", "d", "c", "a"}) {
    BOOST_TEST_CONTEXT("tensor " << name) {
      const auto& info = parsed.header.at(name).as_object();
      const auto& off = info.at("data_offsets").as_array();
      const auto begin = off.at(0).to_number<std::uint64_t>(), end = off.at(1).to_number<std::uint64_t>();
      BOOST_CHECK_EQUAL(begin, at);  // contiguous, no gap
      BOOST_CHECK_EQUAL((8 + parsed.length + begin) % sizes.at(name), 0u);
      const at::Tensor t = sd.at(name).toTensor();
      BOOST_CHECK_EQUAL(end - begin, t.nbytes());
      BOOST_CHECK_EQUAL(
          std::memcmp(read_bytes(p).data() + 8 + parsed.length + begin, t.data_ptr(), t.nbytes()), 0);
      at = end;
    }
  }
  BOOST_CHECK_EQUAL(8 + parsed.length + at, fs::file_size(p));
  BOOST_CHECK_EQUAL(boost::json::serialize(parsed.header.at("d")),
                    R"({"dtype":"F32","shape":[3],"data_offsets":[24,36]})");

  // The same state dict and options give the same bytes.
  st::save(dir / "again.safetensors", sd, {.metadata = {{"format", "pt"}, {"b", "2"}}});
  BOOST_CHECK(read_bytes(p) == read_bytes(dir / "again.safetensors"));
  // Loading gives the data order.
  const auto loaded = st::load(p);
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(keys_of(loaded), " ")), "b e d c a");
}

BOOST_AUTO_TEST_CASE(an_empty_state_dict_is_an_empty_header) {
  TempDir dir;
  st::save(dir / "none.safetensors", ckpt::StateDict());
  BOOST_CHECK_EQUAL(read_bytes(dir / "none.safetensors"), le64(8) + "{}      ");
  BOOST_CHECK(st::load(dir / "none.safetensors").empty());
  BOOST_CHECK(st::metadata(dir / "none.safetensors").empty());
}

BOOST_AUTO_TEST_CASE(nested_dicts_flatten_with_dots) {
  TempDir dir;
  ckpt::StateDict layer;
  layer.insert("weight", ramp(4));
  ckpt::StateDict layers;
  layers.insert("0", layer);
  ckpt::StateDict model;
  model.insert("layers", layers);
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  state.insert(std::int64_t{3}, ramp(2, 10));
  ckpt::StateDict sd;
  sd.insert("model", model);
  sd.insert("state", c10::IValue(state));
  st::save(dir / "nested.safetensors", sd);
  const auto loaded = st::load(dir / "nested.safetensors");
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(keys_of(loaded), " ")), "model.layers.0.weight state.3");
  BOOST_CHECK(same_bits(loaded.at("state.3").toTensor(), ramp(2, 10)));
}

BOOST_AUTO_TEST_CASE(views_are_saved_as_their_values) {
  TempDir dir;
  const at::Tensor base = at::arange(24, at::kFloat).reshape({4, 6});
  const at::Tensor complex = at::view_as_complex(at::arange(8, at::kFloat).reshape({4, 2}));
  ckpt::StateDict sd;
  sd.insert("transposed", base.t());                       // non-contiguous
  sd.insert("slice", base.narrow(1, 2, 3));                // an offset into the storage, strided
  sd.insert("conjugated", complex.conj());                 // the conjugate bit
  sd.insert("expanded", at::ones({1, 3}).expand({4, 3}));  // stride 0
  sd.insert("grad", ramp(3).requires_grad_());
  st::save(dir / "views.safetensors", sd);
  const auto loaded = st::load(dir / "views.safetensors");
  BOOST_CHECK(same_bits(loaded.at("transposed").toTensor(), base.t().contiguous()));
  BOOST_CHECK(same_bits(loaded.at("slice").toTensor(), base.narrow(1, 2, 3).contiguous()));
  BOOST_CHECK(same_bits(loaded.at("conjugated").toTensor(), complex.conj().resolve_conj()));
  BOOST_CHECK(!loaded.at("conjugated").toTensor().is_conj());
  BOOST_CHECK(same_bits(loaded.at("expanded").toTensor(), at::ones({4, 3})));
  BOOST_CHECK(same_bits(loaded.at("grad").toTensor(), ramp(3)));
}

// === partial loads ====================================================================

BOOST_AUTO_TEST_CASE(a_partial_load_reads_only_the_bytes_asked_for) {
  TempDir dir;
  const fs::path p = dir / "partial.safetensors";
  ckpt::StateDict sd;
  sd.insert("small", ramp(4));
  sd.insert("big", at::ones({1 << 20}, at::kByte));  // 1 MiB never asked for
  sd.insert("mid", at::arange(8, at::kLong));
  st::save(p, sd);
  const std::uint64_t header = 8 + parse_file(p).length;

  const auto before = rchar();
  st::Reader reader(p);
  BOOST_CHECK_EQUAL(reader.bytes_read(), header);
  const auto loaded = reader.load({.names = {"mid", "small"}});
  const auto after = rchar();
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(keys_of(loaded), " ")), "mid small");
  BOOST_CHECK(same_bits(loaded.at("mid").toTensor(), at::arange(8, at::kLong)));
  BOOST_CHECK(same_bits(loaded.at("small").toTensor(), ramp(4)));
  const std::uint64_t expected = header + 8 * 8 + 4 * 4;
  BOOST_CHECK_EQUAL(reader.bytes_read(), expected);
  // The kernel's count agrees (it also counts reading /proc/self/io once).
  if (before && after) {
    BOOST_CHECK_GE(*after - *before, expected);
    BOOST_CHECK_LT(*after - *before, expected + 4096);
  } else {
    BOOST_TEST_MESSAGE("no /proc/self/io here: only ckpt's own count checked");
  }

  // Asking twice for one name reads it once.
  st::Reader again(p);
  again.load({.names = {"small", "small"}});
  BOOST_CHECK_EQUAL(again.bytes_read(), header + 16);
}

BOOST_AUTO_TEST_CASE(a_name_not_there_is_missing_unless_not_strict) {
  TempDir dir;
  const fs::path p = dir / "some.safetensors";
  ckpt::StateDict sd;
  sd.insert("a", ramp(2));
  st::save(p, sd);
  BOOST_CHECK_EXCEPTION(st::load(p, {.names = {"a", "nope", "gone"}}), ckpt::MissingKeys,
                        says(p, {"missing keys", "'nope'", "'gone'"}));
  const auto some = st::load(p, {.names = {"a", "nope"}, .strict = false});
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(keys_of(some), " ")), "a");
  st::Reader reader(p);
  BOOST_CHECK(!reader.contains("nope"));
  BOOST_CHECK_EXCEPTION(reader.tensor("nope"), ckpt::MissingKeys, says(p, {"'nope'"}));
  BOOST_CHECK_EXCEPTION(reader.entry("nope"), ckpt::MissingKeys, says(p, {"'nope'"}));
  BOOST_CHECK_EXCEPTION(st::load(p, {.state_dict = ckpt::StateDict(), .names = {"a"}}), ckpt::Error,
                        says({"not both"}));
}

// === in place ==========================================================================

BOOST_AUTO_TEST_CASE(an_in_place_load_fills_the_targets_own_memory) {
  TempDir dir;
  const fs::path p = dir / "model.safetensors";
  ckpt::StateDict saved;
  saved.insert("model.weight", ramp(6).reshape({2, 3}));
  saved.insert("model.bias", at::arange(2, at::kDouble));
  saved.insert("extra", at::arange(4, at::kInt));
  saved.insert("strided", ramp(12, 100).reshape({3, 4}));
  st::save(p, saved);

  at::Tensor weight = at::zeros({2, 3});
  at::Tensor bias = at::zeros({2}, at::kDouble).requires_grad_();
  at::Tensor buffer = at::zeros({4, 3});
  at::Tensor strided = buffer.t();  // a non-contiguous target
  ckpt::StateDict model;
  model.insert("weight", weight);
  model.insert("bias", bias);
  ckpt::StateDict target;
  target.insert("model", model);
  target.insert("extra", c10::IValue());  // None: filled with what the file has
  target.insert("strided", strided);
  const void* weight_memory = weight.data_ptr();

  st::Reader reader(p);
  const auto got = reader.load({.state_dict = target});
  BOOST_CHECK(got.is(target));
  BOOST_CHECK_EQUAL(weight.data_ptr(), weight_memory);
  BOOST_CHECK(same_bits(weight, ramp(6).reshape({2, 3})));
  BOOST_CHECK(same_bits(bias.detach(), at::arange(2, at::kDouble)));
  BOOST_CHECK(bias.requires_grad());
  BOOST_CHECK(same_bits(target.at("extra").toTensor(), at::arange(4, at::kInt)));
  BOOST_CHECK(same_bits(buffer.t(), ramp(12, 100).reshape({3, 4})));

  // read_into, one tensor at a time.
  at::Tensor again = at::zeros({2}, at::kDouble);
  reader.read_into("model.bias", again);
  BOOST_CHECK(same_bits(again, at::arange(2, at::kDouble)));
}

BOOST_AUTO_TEST_CASE(an_in_place_load_refuses_a_target_that_does_not_fit_before_writing_any) {
  TempDir dir;
  const fs::path p = dir / "fit.safetensors";
  ckpt::StateDict saved;
  saved.insert("first", ramp(4));
  saved.insert("w", ramp(6).reshape({2, 3}));
  saved.insert("n", ramp(2));
  st::save(p, saved);

  at::Tensor first = at::zeros({4});
  ckpt::StateDict shape;
  shape.insert("first", first);
  shape.insert("w", at::zeros({3, 2}));
  BOOST_CHECK_EXCEPTION(st::load(p, {.state_dict = shape}), ckpt::Mismatch,
                        says(p, {"'w'", "[2, 3]", "[3, 2]", "F32"}));
  BOOST_CHECK(same_bits(first, at::zeros({4})));  // nothing was written

  ckpt::StateDict dtype;
  dtype.insert("w", at::zeros({2, 3}, at::kDouble));
  BOOST_CHECK_EXCEPTION(st::load(p, {.state_dict = dtype}), ckpt::Mismatch,
                        says(p, {"'w'", "Float", "Double"}));

  ckpt::StateDict kind;
  kind.insert("n", 5);
  BOOST_CHECK_EXCEPTION(st::load(p, {.state_dict = kind}), ckpt::Mismatch, says(p, {"'n'", "Int", "tensor"}));

  ckpt::StateDict missing;
  missing.insert("first", first);
  missing.insert("absent", at::zeros({1}));
  BOOST_CHECK_EXCEPTION(st::load(p, {.state_dict = missing}), ckpt::MissingKeys, says(p, {"'absent'"}));
  BOOST_CHECK(same_bits(first, at::zeros({4})));
  st::load(p, {.state_dict = missing, .strict = false});
  BOOST_CHECK(same_bits(first, ramp(4)));

  at::Tensor undefined_target;
  st::Reader reader(p);
  BOOST_CHECK_EXCEPTION(reader.read_into("w", undefined_target), ckpt::Mismatch,
                        says(p, {"'w'", "undefined"}));
  at::Tensor overlapping = at::zeros({1, 3}).expand({2, 3});
  BOOST_CHECK_EXCEPTION(reader.read_into("w", overlapping), ckpt::Mismatch, says(p, {"'w'"}));
}

// === mapped ============================================================================

BOOST_AUTO_TEST_CASE(a_mapped_load_points_into_a_private_mapping) {
  TempDir dir;
  const fs::path p = dir / "mapped.safetensors";
  const auto values = every_dtype();
  st::save(p, dict_of(values));
  const std::string before = read_bytes(p);

  at::Tensor kept;
  {
    st::Reader reader(p);
    const auto loaded = reader.load({.mmap = true});
    BOOST_CHECK_EQUAL(reader.bytes_read(), 8 + parse_file(p).length);  // only the header was read
    for (const auto& [name, want] : values) {
      BOOST_TEST_CONTEXT("tensor " << name) {
        const at::Tensor t = loaded.at(name).toTensor();
        BOOST_CHECK(same_bits(t, want));
        BOOST_CHECK(in_mapping_of(t.data_ptr(), p));
        BOOST_CHECK_EQUAL(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % t.element_size(), 0u);
      }
    }
    kept = loaded.at("f64").toTensor();
  }
  // Writing to a mapped tensor never reaches the file (copy-on-write), and the
  // tensor outlives its reader and the file's name.
  kept.fill_(7.0);
  BOOST_CHECK(read_bytes(p) == before);
  fs::remove(p);
  BOOST_CHECK(same_bits(kept, at::full({2, 7}, 7.0, at::kDouble)));
}

BOOST_AUTO_TEST_CASE(a_mapped_tensor_whose_bytes_are_not_aligned_is_copied) {
  TempDir dir;
  const fs::path p = dir / "unaligned.safetensors";
  // A header padded so that the data starts at 1 mod 4: the f32 at 0 is not
  // 4-aligned in the file; the u8 after it needs no alignment.
  std::string header =
      R"({"f":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"u":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}})";
  while ((8 + header.size()) % 4 != 1) header += ' ';
  const float f[2] = {1.5f, -2.25f};
  write_raw(p, header, std::string(reinterpret_cast<const char*>(f), 8) + std::string("\x01\x02\x03", 3));
  const auto loaded = st::load(p, {.mmap = true});
  const at::Tensor ft = loaded.at("f").toTensor(), ut = loaded.at("u").toTensor();
  BOOST_CHECK(same_bits(ft, at::tensor({1.5f, -2.25f})));
  BOOST_CHECK_EQUAL(reinterpret_cast<std::uintptr_t>(ft.data_ptr()) % 4, 0u);
  BOOST_CHECK(!in_mapping_of(ft.data_ptr(), p));  // copied
  BOOST_CHECK(in_mapping_of(ut.data_ptr(), p));   // mapped
  BOOST_CHECK(same_bits(ut, at::tensor(std::vector<std::int64_t>{1, 2, 3}).to(at::kByte)));
}

// === metadata ==========================================================================

BOOST_AUTO_TEST_CASE(metadata_round_trips_as_text) {
  TempDir dir;
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"note", "h\u00e9llo \"quoted\"\n\ttab \\ back"}, {"empty", ""}};
  ckpt::StateDict sd;
  sd.insert("w", ramp(3));
  st::save(dir / "m.safetensors", sd, {.metadata = meta});
  BOOST_CHECK(st::metadata(dir / "m.safetensors") == meta);
  BOOST_CHECK(st::Reader(dir / "m.safetensors").metadata() == meta);

  // Sharded: every shard carries it, the index too (with total_size); ckpt's
  // save id stays out of what load returns.
  st::save(dir / "s.safetensors", sd, {.metadata = meta, .max_shard_bytes = 4});
  auto index_meta = meta;
  index_meta["total_size"] = "12";
  BOOST_CHECK(st::metadata(dir / "s.safetensors.index.json") == index_meta);
  BOOST_CHECK(st::metadata(dir / "s-00001-of-00001.safetensors") == meta);
  BOOST_CHECK(parse_file(dir / "s-00001-of-00001.safetensors")
                  .header.at("__metadata__")
                  .as_object()
                  .contains("ckpt_save_id"));

  BOOST_CHECK_EXCEPTION(st::save(dir / "r.safetensors", sd, {.metadata = {{"ckpt_save_id", "x"}}}),
                        ckpt::Unsupported, says({"ckpt_save_id", "reserved"}));
  BOOST_CHECK_EXCEPTION(
      st::save(dir / "r.safetensors", sd, {.metadata = {{"total_size", "1"}}, .max_shard_bytes = 8}),
      ckpt::Unsupported, says({"total_size", "reserved"}));
  st::save(dir / "t.safetensors", sd, {.metadata = {{"total_size", "1"}}});  // unsharded: the user's own key
  BOOST_CHECK_EQUAL(st::metadata(dir / "t.safetensors").at("total_size"), "1");
}

BOOST_AUTO_TEST_CASE(non_tensor_leaves_are_refused_or_kept_as_metadata_text) {
  TempDir dir;
  ckpt::StateDict sd;
  sd.insert("w", ramp(2));
  sd.insert("epoch", 5);
  sd.insert("lr", 0.1);
  sd.insert("flag", true);
  sd.insert("name", "run-1");
  BOOST_CHECK_EXCEPTION(st::save(dir / "x.safetensors", sd), ckpt::Unsupported,
                        says({"'epoch'", "Int", "non_tensors_as_metadata"}));
  BOOST_CHECK(!fs::exists(dir / "x.safetensors"));

  st::save(dir / "x.safetensors", sd, {.metadata = {{"format", "pt"}}, .non_tensors_as_metadata = true});
  const std::map<std::string, std::string> want = {
      {"epoch", "5"}, {"lr", "0.1"}, {"flag", "true"}, {"name", "run-1"}, {"format", "pt"}};
  BOOST_CHECK(st::metadata(dir / "x.safetensors") == want);
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(keys_of(st::load(dir / "x.safetensors")), " ")), "w");

  ckpt::StateDict listed;
  listed.insert("list", ckpt::test::list_of({c10::IValue(1)}));
  BOOST_CHECK_EXCEPTION(st::save(dir / "y.safetensors", listed, {.non_tensors_as_metadata = true}),
                        ckpt::Unsupported, says({"'list'", "only tensors"}));
  ckpt::StateDict clash;
  clash.insert("format", 1);
  BOOST_CHECK_EXCEPTION(st::save(dir / "y.safetensors", clash,
                                 {.metadata = {{"format", "pt"}}, .non_tensors_as_metadata = true}),
                        ckpt::Unsupported, says({"'format'", "also a key"}));
}

BOOST_AUTO_TEST_CASE(values_the_format_cannot_hold_are_refused_naming_the_key) {
  TempDir dir;
  const fs::path p = dir / "v.safetensors";
  const auto refused = [&](const std::string& key, const c10::IValue& value,
                           std::initializer_list<std::string> parts) {
    ckpt::StateDict sd;
    sd.insert("fine", ramp(2));
    sd.insert(key, value);
    Says s = says(parts);
    s.parts.push_back("'" + key + "'");
    BOOST_CHECK_EXCEPTION(st::save(p, sd), ckpt::Unsupported, s);
  };
  refused("c128", at::zeros({2}, at::kComplexDouble), {"ComplexDouble", "no name"});
  refused("undefined", at::Tensor(), {"undefined"});
  refused("sparse", at::zeros({2, 2}).to_sparse(), {"dense"});
  refused("meta", at::empty({2}, at::TensorOptions().device(at::kMeta)), {"meta"});
  refused("__metadata__", ramp(1), {"reserved"});
  refused("bad\xff", ramp(1), {"UTF-8"});
  refused("none", c10::IValue(), {"only tensors"});
  BOOST_CHECK(!fs::exists(p));

  ckpt::StateDict inner;
  inner.insert("b", ramp(1));
  ckpt::StateDict twice;
  twice.insert("a", inner);
  twice.insert("a.b", ramp(1));
  BOOST_CHECK_EXCEPTION(st::save(p, twice), ckpt::Unsupported, says({"'a.b'", "twice"}));
  BOOST_CHECK_EXCEPTION(st::save(p, dict_of({{"w", ramp(1)}}), {.metadata = {{"k", "\xc3"}}}),
                        ckpt::Unsupported, says({"UTF-8"}));
}

// === durability ========================================================================

BOOST_AUTO_TEST_CASE(a_failed_save_leaves_the_file_as_it_was_and_no_temporaries) {
  TempDir dir;
  const fs::path p = dir / "keep.safetensors";
  st::save(p, dict_of({{"w", ramp(4)}}));
  const std::string before = read_bytes(p);

  ckpt::StateDict bad;
  bad.insert("w", ramp(8));
  bad.insert("z", at::zeros({1}, at::kComplexDouble));
  BOOST_CHECK_THROW(st::save(p, bad), ckpt::Unsupported);
  BOOST_CHECK(read_bytes(p) == before);
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(files_in(dir.path()), " ")), "keep.safetensors");

  BOOST_CHECK_EXCEPTION(st::save(dir / "no" / "such" / "dir.safetensors", bad), ckpt::Error,
                        says({"dir.safetensors"}));
  BOOST_CHECK_EXCEPTION(st::save(dir / "no" / "x.safetensors", dict_of({{"w", ramp(1)}})), ckpt::IoError,
                        says({"x.safetensors"}));

  // A successful save over it replaces it whole, and leaves nothing else.
  st::save(p, dict_of({{"w", ramp(8, 1)}}));
  BOOST_CHECK(same_bits(st::load(p).at("w").toTensor(), ramp(8, 1)));
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(files_in(dir.path()), " ")), "keep.safetensors");
}

// === shards ============================================================================

BOOST_AUTO_TEST_CASE(a_sharded_save_splits_by_size_and_writes_the_index) {
  TempDir dir;
  ckpt::StateDict sd;
  for (int i = 0; i < 5; ++i)
    sd.insert(std::string(1, static_cast<char>('a' + i)), ramp(250, i * 1000));  // 1000 B each
  sd.insert("tail", at::arange(3, at::kByte));
  sd.insert("huge", ramp(1000));  // 4000 B: past the bound, a shard of its own
  const fs::path p = dir / "model.safetensors";
  st::save(p, sd, {.max_shard_bytes = 2500});

  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(files_in(dir.path()), " ")),
                    "model-00001-of-00004.safetensors model-00002-of-00004.safetensors "
                    "model-00003-of-00004.safetensors model-00004-of-00004.safetensors "
                    "model.safetensors.index.json");
  const auto index = boost::json::parse(read_bytes(dir / "model.safetensors.index.json")).as_object();
  BOOST_CHECK_EQUAL(index.at("metadata").at("total_size").to_number<std::uint64_t>(), 5u * 1000 + 4000 + 3);
  const auto& wm = index.at("weight_map").as_object();
  const std::map<std::string, std::string> want = {
      {"a", "model-00001-of-00004.safetensors"},   {"b", "model-00001-of-00004.safetensors"},
      {"c", "model-00002-of-00004.safetensors"},   {"d", "model-00002-of-00004.safetensors"},
      {"e", "model-00003-of-00004.safetensors"},   {"tail", "model-00003-of-00004.safetensors"},
      {"huge", "model-00004-of-00004.safetensors"}};
  BOOST_CHECK_EQUAL(wm.size(), want.size());
  for (const auto& [name, file] : want) BOOST_CHECK_EQUAL(wm.at(name).as_string(), file);

  // Every shard is a safetensors file of its own.
  BOOST_CHECK_EQUAL(
      fmt::format("{}", fmt::join(keys_of(st::load(dir / "model-00003-of-00004.safetensors")), " ")),
      "e tail");
  // The index loads whole: through its own name, the name saved to, the directory.
  for (const fs::path& through : {dir / "model.safetensors.index.json", p, dir.path()}) {
    BOOST_TEST_CONTEXT("through " << through) {
      st::Reader reader(through);
      BOOST_CHECK(reader.is_index());
      const auto loaded = reader.load();
      BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(keys_of(loaded), " ")), "a b c d e tail huge");
      for (const auto& e : sd)
        BOOST_CHECK(same_bits(loaded.at(e.key().toStringRef()).toTensor(), e.value().toTensor()));
    }
  }
  const auto mapped = st::load(p, {.mmap = true});
  BOOST_CHECK(
      in_mapping_of(mapped.at("huge").toTensor().data_ptr(), dir / "model-00004-of-00004.safetensors"));
  BOOST_CHECK(same_bits(mapped.at("e").toTensor(), ramp(250, 4000)));
}

BOOST_AUTO_TEST_CASE(a_partial_load_of_an_index_opens_only_the_shards_it_needs) {
  TempDir dir;
  ckpt::StateDict sd;
  for (int i = 0; i < 4; ++i) sd.insert("t" + std::to_string(i), ramp(256, i));
  const fs::path p = dir / "model.safetensors";
  st::save(p, sd, {.max_shard_bytes = 1024});            // one tensor a shard
  fs::remove(dir / "model-00001-of-00004.safetensors");  // a shard never needed

  st::Reader reader(p);
  const std::uint64_t index_bytes = fs::file_size(dir / "model.safetensors.index.json");
  BOOST_CHECK_EQUAL(reader.bytes_read(), index_bytes);
  const auto loaded = reader.load({.names = {"t2"}});
  BOOST_CHECK(same_bits(loaded.at("t2").toTensor(), ramp(256, 2)));
  const std::uint64_t shard_header = 8 + parse_file(dir / "model-00003-of-00004.safetensors").length;
  BOOST_CHECK_EQUAL(reader.bytes_read(), index_bytes + shard_header + 1024);
  // The missing shard is an error only once asked for.
  BOOST_CHECK_EXCEPTION(
      reader.tensor("t0"), ckpt::CorruptCheckpoint,
      says(dir / "model.safetensors.index.json", {"model-00001-of-00004.safetensors", "does not exist"}));
}

BOOST_AUTO_TEST_CASE(a_save_replaces_the_other_form_left_at_its_path) {
  TempDir dir;
  const fs::path p = dir / "model.safetensors";
  ckpt::StateDict three;
  for (int i = 0; i < 3; ++i) three.insert("t" + std::to_string(i), ramp(4, i));
  st::save(p, three);
  st::save(p, three, {.max_shard_bytes = 16});  // sharded over single: the single file goes
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(files_in(dir.path()), " ")),
                    "model-00001-of-00003.safetensors model-00002-of-00003.safetensors "
                    "model-00003-of-00003.safetensors model.safetensors.index.json");
  st::save(p, three, {.max_shard_bytes = 32});  // two shards now: the three-shard files go
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(files_in(dir.path()), " ")),
                    "model-00001-of-00002.safetensors model-00002-of-00002.safetensors "
                    "model.safetensors.index.json");
  BOOST_CHECK(same_bits(st::load(p).at("t2").toTensor(), ramp(4, 2)));
  write_bytes(dir / "other.txt", "not ours");
  st::save(p, three);  // single over sharded: the index and its shards go
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(files_in(dir.path()), " ")), "model.safetensors other.txt");
  BOOST_CHECK(!st::Reader(p).is_index());
}

BOOST_AUTO_TEST_CASE(a_torn_sharded_save_is_refused_not_mixed) {
  TempDir a, b;
  ckpt::StateDict first, second;
  for (int i = 0; i < 2; ++i) {
    first.insert("t" + std::to_string(i), ramp(4, i));
    second.insert("t" + std::to_string(i), ramp(4, 10 + i));
  }
  st::save(a / "model.safetensors", first, {.max_shard_bytes = 16});
  st::save(b / "model.safetensors", second, {.max_shard_bytes = 16});
  // What a crash between the shards and the index of a save over `a` leaves:
  // a new shard beside the old index.
  fs::copy_file(b / "model-00002-of-00002.safetensors", a / "model-00002-of-00002.safetensors",
                fs::copy_options::overwrite_existing);
  st::Reader reader(a / "model.safetensors");
  BOOST_CHECK(same_bits(reader.tensor("t0"), ramp(4, 0)));
  BOOST_CHECK_EXCEPTION(
      reader.tensor("t1"), ckpt::CorruptCheckpoint,
      says(a / "model.safetensors.index.json", {"torn", "model-00002-of-00002.safetensors"}));
}

// === dtypes this libtorch lacks ==========================================================

BOOST_AUTO_TEST_CASE(a_dtype_this_libtorch_lacks_is_refused_by_name_only_when_read) {
  TempDir dir;
  const fs::path p = dir / "f8.safetensors";
  write_raw(p,
            R"({"f8":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]},)"
            R"("u16":{"dtype":"U16","shape":[2],"data_offsets":[4,8]},)"
            R"("x":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
            std::string(8, '\x01') + std::string("\0\0\xc0\x3f", 4));
  st::Reader reader(p);
  BOOST_CHECK_EQUAL(reader.entry("f8").dtype, "F8_E4M3");
  BOOST_CHECK(reader.entry("f8").scalar_type == c10::ScalarType::Undefined);
  BOOST_CHECK_EXCEPTION(reader.tensor("f8"), ckpt::Unsupported, says(p, {"'f8'", "F8_E4M3", "libtorch"}));
  BOOST_CHECK_EXCEPTION(reader.mapped("u16"), ckpt::Unsupported, says(p, {"'u16'", "U16"}));
  BOOST_CHECK(same_bits(st::load(p, {.names = {"x"}}).at("x").toTensor(), at::tensor({1.5f})));
  BOOST_CHECK_EXCEPTION(st::load(p), ckpt::Unsupported, says(p, {"F8_E4M3"}));
  // Sub-byte dtypes: the element count must make whole bytes.
  check_refused(R"({"f4":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}})", std::string(1, '\0'),
                {"\"f4\"", "not a whole number of bytes"});
  write_raw(dir / "f4.safetensors", R"({"f4":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}})", "ab");
  st::Reader f4(dir / "f4.safetensors");
  BOOST_CHECK_EQUAL(f4.entry("f4").end - f4.entry("f4").begin, 2u);
  BOOST_CHECK_EXCEPTION(f4.tensor("f4"), ckpt::Unsupported, says({"F4"}));
}

BOOST_AUTO_TEST_CASE(files_of_other_writers_load) {
  TempDir dir;
  const fs::path p = dir / "other.safetensors";
  // Tensors listed out of data order, metadata last, an unknown field (which
  // safetensors ignores), whitespace, "__metadata__": null.
  write_raw(p,
            "{ \"b\" : "
            "{\"data_offsets\":[4,8],\"dtype\":\"I32\",\"shape\":[1],\"extra\":{\"x\":[1,{\"y\":null}]}},\n"
            "  \"a\" : {\"dtype\":\"U8\",\"shape\":[2,2],\"data_offsets\":[0,4]},\n"
            "  \"__metadata__\" : null }",
            std::string("\x01\x02\x03\x04\x05\x00\x00\x00", 8));
  const auto loaded = st::load(p);
  BOOST_CHECK_EQUAL(fmt::format("{}", fmt::join(keys_of(loaded), " ")), "a b");
  BOOST_CHECK(same_bits(loaded.at("b").toTensor(), at::tensor(std::vector<std::int64_t>{5}).to(at::kInt)));
  BOOST_CHECK(st::metadata(p).empty());
}

// === hostile files ======================================================================

BOOST_AUTO_TEST_CASE(hostile_a_file_too_short_for_a_header_length) {
  TempDir dir;
  write_bytes(dir / "short.safetensors", "abc");
  BOOST_CHECK_EXCEPTION(st::Reader{dir / "short.safetensors"}, ckpt::CorruptCheckpoint,
                        says(dir / "short.safetensors", {"3 bytes", "too few"}));
  write_bytes(dir / "empty.safetensors", "");
  BOOST_CHECK_EXCEPTION(st::Reader{dir / "empty.safetensors"}, ckpt::CorruptCheckpoint, says({"0 bytes"}));
}

BOOST_AUTO_TEST_CASE(hostile_a_header_length_past_the_end_of_the_file) {
  check_refused("{}", "", {"header length 1000", "past the end", "truncated"}, 1000);
}

BOOST_AUTO_TEST_CASE(hostile_a_header_length_above_the_bound) {
  check_refused("{}", "", {"header length 100000001", "bound"}, 100'000'001);
  check_refused("{}", "", {"header length 18446744073709551615", "bound"},
                std::numeric_limits<std::uint64_t>::max());
}

BOOST_AUTO_TEST_CASE(hostile_lengths_and_sizes_never_drive_an_allocation) {
  TempDir dir;
  // A length just under the bound over a tiny file, a tensor of 2^40 bytes
  // with offsets to match: each refused with less than 64 MiB to spare.
  write_raw(dir / "long.safetensors", "{}", "", 99'999'999);
  write_raw(dir / "huge.safetensors",
            R"({"h":{"dtype":"U8","shape":[1099511627776],"data_offsets":[0,1099511627776]}})");
  write_raw(dir / "wide.safetensors",
            R"({"z":{"dtype":"F32","shape":[0,4611686018427387904,4],"data_offsets":[0,0]}})");
  const std::uint64_t margin = std::uint64_t{64} << 20;
  for (const std::string name : {"long", "huge"}) {
    for (const bool mmap : {false, true}) {
      const std::string out = ckpt::test::run_in_bounded_child(
          [&] { st::load(dir / (name + ".safetensors"), {.mmap = mmap}); }, margin);
      BOOST_TEST_CONTEXT(name << (mmap ? " mapped" : "")) {
        BOOST_CHECK_MESSAGE(out.rfind("CorruptCheckpoint: ", 0) == 0, out);
      }
    }
  }
  // Zero elements, but strides that would pass int64: refused, not built.
  BOOST_CHECK_EXCEPTION(st::load(dir / "wide.safetensors"), ckpt::CorruptCheckpoint,
                        says({"\"z\"", "overflows"}));
}

BOOST_AUTO_TEST_CASE(hostile_a_header_that_is_not_json) {
  check_refused("this is not json", "", {"not valid JSON", "at byte"});
  check_refused(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} trailing)", "x", {"not valid JSON"});
  check_refused(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],}})", "x",
                {"not valid JSON"});  // trailing comma
  check_refused("{} // comment", "", {"not valid JSON"});
  // Deeper than the parser goes, inside a field that is otherwise ignored.
  check_refused(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"deep":)" + std::string(40, '[') +
                    std::string(40, ']') + "}}",
                "x", {"not valid JSON"});
  check_refused("", "", {"not valid JSON"});
}

BOOST_AUTO_TEST_CASE(hostile_a_header_that_is_not_utf8) {
  check_refused("{\"a\xff\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "x",
                {"not valid JSON"});
  check_refused("{\"__metadata__\":{\"k\":\"\xc3\"}}", "", {"not valid JSON"});
}

BOOST_AUTO_TEST_CASE(hostile_a_header_that_is_not_an_object) {
  check_refused("[1,2]", "", {"the header is an array, not a JSON object"});
  check_refused("\"text\"", "", {"the header is a string, not a JSON object"});
  check_refused("42      ", "", {"the header is the number 42, not a JSON object"});
  check_refused("null", "", {"the header is null"});
}

BOOST_AUTO_TEST_CASE(hostile_entries_of_the_wrong_shape) {
  check_refused(R"({"a":5})", "", {"tensor \"a\" is described by the number 5, not an object"});
  check_refused(R"({"a":[1]})", "", {"tensor \"a\" is described by an array"});
  check_refused(R"({"a":"F32"})", "", {"tensor \"a\" is described by a string"});
  check_refused(R"({"__metadata__":[]})", "", {"__metadata__ is an array, not an object of strings"});
  check_refused(R"({"__metadata__":{"k":1}})", "",
                {"__metadata__ value of \"k\" is the number 1, not a string"});
  check_refused(R"({"__metadata__":{"k":{"x":"y"}}})", "", {"__metadata__ value of \"k\" is an object"});
}

BOOST_AUTO_TEST_CASE(hostile_fields_of_the_wrong_type) {
  check_refused(R"({"a":{"dtype":1,"shape":[1],"data_offsets":[0,1]}})", "x",
                {"the dtype of tensor \"a\" is the number 1, not a string"});
  check_refused(R"({"a":{"dtype":"U8","shape":"1","data_offsets":[0,1]}})", "x",
                {"the shape of tensor \"a\" is a string"});
  check_refused(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", "x",
                {"the shape of \"a\" holds a negative number (-1)"});
  check_refused(R"({"a":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}})", "x",
                {"the shape of \"a\" holds", "1.5"});
  check_refused(R"({"a":{"dtype":"U8","shape":[[1]],"data_offsets":[0,1]}})", "x",
                {"the shape of \"a\" holds an array"});
  check_refused(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,"1"]}})", "x",
                {"data_offsets of \"a\" holds a string"});
  check_refused(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":{"b":0}}})", "x",
                {"the data_offsets of tensor \"a\" is an object"});
  check_refused(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1e2]}})", "x",
                {"data_offsets of \"a\" holds a number that is not an integer"});
  check_refused(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551616]}})", "x",
                {"data_offsets of \"a\" holds"});
}

BOOST_AUTO_TEST_CASE(hostile_fields_missing_or_miscounted) {
  check_refused(R"({"a":{"shape":[1],"data_offsets":[0,1]}})", "x", {"tensor \"a\" has no dtype"});
  check_refused(R"({"a":{"dtype":"U8","data_offsets":[0,1]}})", "x", {"tensor \"a\" has no shape"});
  check_refused(R"({"a":{"dtype":"U8","shape":[1]}})", "x", {"tensor \"a\" has no data_offsets"});
  check_refused(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[1]}})", "x",
                {"data_offsets of \"a\" has 1 numbers, not 2"});
  check_refused(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", "x",
                {"data_offsets of \"a\" has more than 2 numbers"});
  std::string ones = "1";
  for (int i = 0; i < 1024; ++i) ones += ",1";  // 1025 dimensions
  check_refused(R"({"a":{"dtype":"U8","shape":[)" + ones + R"(],"data_offsets":[0,1]}})", "x",
                {"more than 1024 dimensions"});
}

BOOST_AUTO_TEST_CASE(hostile_an_unknown_dtype) {
  check_refused(R"({"a":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}})", "x",
                {"tensor \"a\" has the unknown dtype \"F7\""});
  check_refused(R"({"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", "xxxx",
                {"unknown dtype \"f32\""});
}

BOOST_AUTO_TEST_CASE(hostile_offsets_that_overlap) {
  check_refused(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
      std::string(12, 'x'), {"the data of \"b\" [4, 12) overlaps that of \"a\" [0, 8)"});
  check_refused(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
      std::string(8, 'x'), {"overlaps"});
}

BOOST_AUTO_TEST_CASE(hostile_offsets_that_leave_a_gap) {
  check_refused(
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
      std::string(12, 'x'), {"bytes [4, 8) of the data section belong to no tensor", "before \"b\""});
  check_refused(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, 'x'),
                {"bytes [0, 4)", "before \"a\""});
}

BOOST_AUTO_TEST_CASE(hostile_offsets_past_the_end_and_bytes_past_the_last_tensor) {
  check_refused(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(10, 'x'),
                {"the data of \"a\" runs past the end of the file", "16", "10 bytes", "truncated"});
  check_refused(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", std::string(9, 'x'),
                {"the last 5 bytes of the file belong to no tensor"});
  check_refused("{}", "x", {"the last 1 bytes"});
}

BOOST_AUTO_TEST_CASE(hostile_offsets_that_disagree_with_dtype_and_shape) {
  check_refused(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", std::string(20, 'x'),
                {"\"a\" is F32 [2, 3], 24 bytes, but its data_offsets [0, 20] hold 20 bytes"});
  check_refused(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", "",
                {"the end is before the start"});
  // Element count × size past 64 bits, and a count past 64 bits.
  check_refused(R"({"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})", "",
                {"\"a\"", "overflows", "byte size"});
  check_refused(R"({"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", "",
                {"\"a\"", "overflows"});
  check_refused(R"({"a":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}})", "",
                {"\"a\"", "past the int64 range"});
}

BOOST_AUTO_TEST_CASE(hostile_duplicate_names_fields_and_keys) {
  check_refused(
      R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
      "xx", {"the name \"a\" appears twice"});
  check_refused(R"({"a":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}})", "x",
                {"tensor \"a\" has the field \"dtype\" twice"});
  check_refused(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1,"x":2}})", "x",
                {"tensor \"a\" has the field \"x\" twice"});
  check_refused(R"({"__metadata__":{"k":"1","k":"2"}})", "", {"__metadata__ has the key \"k\" twice"});
  check_refused(R"({"__metadata__":{},"__metadata__":{}})", "", {"the name \"__metadata__\" appears twice"});
  // Escapes are resolved before comparing: "\u0061" is "a".
  check_refused(
      R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"\u0061":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
      "xx", {"\"a\" appears twice"});
}

BOOST_AUTO_TEST_CASE(hostile_not_a_file) {
  TempDir dir;
  BOOST_CHECK_EXCEPTION(st::Reader{dir / "absent.safetensors"}, ckpt::NotFound,
                        says(dir / "absent.safetensors", {"does not exist"}));
  BOOST_CHECK_EXCEPTION(st::Reader{dir.path()}, ckpt::NotFound, says(dir.path(), {"model.safetensors"}));
  fs::create_directory(dir / "d.safetensors");
  fs::create_directory(dir / "d.safetensors" / "model.safetensors");
  BOOST_CHECK_EXCEPTION(st::Reader{dir / "d.safetensors"}, ckpt::CorruptCheckpoint, says({"is a directory"}));
  BOOST_REQUIRE_EQUAL(::mkfifo((dir / "fifo.safetensors").c_str(), 0600), 0);
  BOOST_CHECK_EXCEPTION(st::Reader{dir / "fifo.safetensors"}, ckpt::CorruptCheckpoint,
                        says(dir / "fifo.safetensors", {"not a regular file"}));
}

// --- hostile indexes ---------------------------------------------------------------------

namespace {

/// A directory with shard `a.safetensors` (tensor "x") and an index whose text is `index`.
struct IndexCase {
  TempDir dir;
  fs::path index = dir / "model.safetensors.index.json";
  explicit IndexCase(const std::string& text) {
    st::save(dir / "a.safetensors", dict_of({{"x", ramp(2)}}));
    write_bytes(index, text);
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(hostile_an_index_of_the_wrong_shape) {
  for (const auto& [text, part] : std::vector<std::pair<std::string, std::string>>{
           {R"([])", "the index is an array, not a JSON object"},
           {R"({"metadata":{}})", "it has no weight_map"},
           {R"({"weight_map":[]})", "weight_map is an array, not an object"},
           {R"({"weight_map":{"x":1}})", "weight_map maps \"x\" to a number, not to a file name"},
           {R"({"weight_map":{"x":"a.safetensors","x":"a.safetensors"}})", "weight_map names \"x\" twice"},
           {R"({"weight_map":{},"weight_map":{}})", "the key \"weight_map\" appears twice"},
           {R"({"metadata":{"k":1,"k":2},"weight_map":{}})", "metadata has the key \"k\" twice"},
           {R"({"metadata":"x","weight_map":{}})", "metadata is a string, not an object"},
           {R"({"weight_map":{"x":"a.safetensors"})", "not valid JSON"},
       }) {
    BOOST_TEST_CONTEXT(text) {
      IndexCase c(text);
      BOOST_CHECK_EXCEPTION(st::Reader{c.index}, ckpt::CorruptCheckpoint, says(c.index, {part}));
    }
  }
}

BOOST_AUTO_TEST_CASE(hostile_index_entries_outside_the_directory) {
  for (const auto& [file, part] : std::vector<std::pair<std::string, std::string>>{
           {"../a.safetensors", "outside the index's directory"},
           {"sub/../../a.safetensors", "outside the index's directory"},
           {"/etc/passwd", "an absolute path"},
           {"", "an empty file name"},
       }) {
    BOOST_TEST_CONTEXT(file) {
      IndexCase c(R"({"weight_map":{"x":)" + boost::json::serialize(boost::json::value(file)) + "}}");
      BOOST_CHECK_EXCEPTION(st::Reader{c.index}, ckpt::CorruptCheckpoint, says(c.index, {"\"x\"", part}));
    }
  }
  IndexCase nul(R"({"weight_map":{"x":"a.safetensors\u0000.txt"}})");
  BOOST_CHECK_EXCEPTION(st::Reader{nul.index}, ckpt::CorruptCheckpoint, says(nul.index, {"NUL"}));
  // Inside the directory is fine, in a subdirectory too.
  IndexCase fine(
      R"({"metadata":{"total_size":8,"nested":{"a":[1]},"flag":true},"weight_map":{"x":"./a.safetensors"},"other":[1]})");
  BOOST_CHECK(same_bits(st::load(fine.index).at("x").toTensor(), ramp(2)));
  const std::map<std::string, std::string> meta = {{"total_size", "8"}, {"flag", "true"}};
  BOOST_CHECK(st::metadata(fine.index) == meta);
}

BOOST_AUTO_TEST_CASE(hostile_an_index_whose_shards_do_not_match) {
  IndexCase missing(R"({"weight_map":{"x":"a.safetensors","y":"gone.safetensors"}})");
  BOOST_CHECK_EXCEPTION(st::load(missing.index), ckpt::CorruptCheckpoint,
                        says(missing.index, {"gone.safetensors", "does not exist", "incomplete"}));
  IndexCase elsewhere(R"({"weight_map":{"x":"a.safetensors","y":"a.safetensors"}})");
  BOOST_CHECK_EXCEPTION(st::load(elsewhere.index), ckpt::CorruptCheckpoint,
                        says(elsewhere.index, {"\"y\"", "a.safetensors", "does not hold it"}));
  IndexCase corrupt(R"({"weight_map":{"x":"a.safetensors","y":"bad.safetensors"}})");
  write_raw(corrupt.dir / "bad.safetensors", "[]");
  BOOST_CHECK_EXCEPTION(st::load(corrupt.index), ckpt::CorruptCheckpoint,
                        says(corrupt.dir / "bad.safetensors", {"not a JSON object"}));
  IndexCase empty(R"({"weight_map":{}})");
  BOOST_CHECK(st::load(empty.index).empty());
}
