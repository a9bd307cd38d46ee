// Interop with real Python torch (/usr/bin/python3, torch 1.13; torch 2.6 of the
// trixie chroot when CKPT_INTEROP_TORCH=2), both ways, every value compared
// exactly: what torch.save writes ckpt reads, what ckpt writes torch.load
// reads, and state dicts survive Python -> ckpt -> Python unchanged. Also the
// raw zip of a ckpt file, as Python's zipfile sees it: every tensor record's
// data at a multiple of 4096 and every CRC right.
//
// Both sides build the same values from deterministic recipes run through the
// same torch kernels: expected_values() here, expected_values() in
// tests/interop/interop_common.py. Keep the two in step.
#define BOOST_TEST_MODULE interop_test
#include <ckpt/format.hpp>

#include <boost/test/unit_test.hpp>

#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using c10::IValue;
using ckpt::test::TempDir;

using ckpt::test::list_of;
namespace {

// --- running the Python side ------------------------------------------------

using ckpt::test::describe;
using ckpt::test::python_script;

// Runs a script (arguments as for python_script) and checks that it succeeded,
// printing what it said when it did not.
#define CHECK_PYTHON(...)                                        \
  do {                                                           \
    const auto result_ = python_script(__VA_ARGS__);             \
    BOOST_CHECK_MESSAGE(result_.status == 0, describe(result_)); \
  } while (0)
#define REQUIRE_PYTHON(...)                                        \
  do {                                                             \
    const auto result_ = python_script(__VA_ARGS__);               \
    BOOST_REQUIRE_MESSAGE(result_.status == 0, describe(result_)); \
  } while (0)

/// The files tests/interop/make_files.py writes with torch.save, made once.
struct PythonFiles {
  TempDir dir;
  ckpt::test::RunResult made = python_script("make_files.py", {dir.path().string()});
  fs::path operator/(const std::string& name) const { return dir / name; }
};

const PythonFiles& python_files() {
  static const PythonFiles files;
  BOOST_REQUIRE_MESSAGE(files.made.status == 0, describe(files.made));
  return files;
}

std::string read_text(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  BOOST_REQUIRE_MESSAGE(in, "cannot open " << file);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

ckpt::ReadOptions mmap_options() {
  ckpt::ReadOptions o;
  o.mmap = true;
  return o;
}

ckpt::ReadOptions crc_options() {
  ckpt::ReadOptions o;
  o.verify_crc = true;
  return o;
}

// --- building values ----------------------------------------------------------

c10::impl::GenericDict str_dict() {
  return c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get());
}
c10::impl::GenericDict int_dict() {
  return c10::impl::GenericDict(c10::IntType::get(), c10::AnyType::get());
}
IValue tuple_of(std::vector<IValue> items) {
  return IValue(c10::ivalue::Tuple::create(std::move(items)));
}

struct Dtype {
  const char* name;
  c10::ScalarType type;
  const char* torch_name;  // as Python prints it
};
const Dtype kDtypes[] = {
    {"f32", at::kFloat, "torch.float32"},
    {"f64", at::kDouble, "torch.float64"},
    {"f16", at::kHalf, "torch.float16"},
    {"bf16", at::kBFloat16, "torch.bfloat16"},
    {"i8", at::kChar, "torch.int8"},
    {"u8", at::kByte, "torch.uint8"},
    {"i16", at::kShort, "torch.int16"},
    {"i32", at::kInt, "torch.int32"},
    {"i64", at::kLong, "torch.int64"},
    {"bool", at::kBool, "torch.bool"},
    {"c64", at::kComplexFloat, "torch.complex64"},
    {"c128", at::kComplexDouble, "torch.complex128"},
};

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// interop_common.SPECIALS
const std::vector<double> kSpecials = {0.1,
                                       -0.0,
                                       kInf,
                                       -kInf,
                                       kNaN,
                                       1e300,
                                       -1e-300,
                                       5e-324,
                                       65504.0,
                                       65505.0,
                                       1.0 / 3.0,
                                       3.4028234663852886e38,
                                       1.401298464324817e-45,
                                       -2.5};
// interop_common.PLAIN_FLOATS
const std::vector<double> kPlainFloats = {
    0.1, -0.0, 0.0, 1e300, -1e-300, 5e-324, kInf, -kInf, kNaN, 1.0 / 3.0, 9007199254740994.0, -2.5};

// interop_common.UNICODE (with an embedded NUL) and UNICODE_KEY, as UTF-8.
const std::string kUnicode = std::string("h\xc3\xa9llo w\xc3\xb6rld \xe2\x80\x94 ") +
                             "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x9a\x80 " + std::string(1, '\0') +
                             " end";
const std::string kUnicodeKey = std::string("schl\xc3\xbc") + "ssel_\xd0\xba\xd0\xbb\xd1\x8e\xd1\x87";

bool is_floating(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

/// interop_common.pattern: a (2, 3, 4) tensor of distinct values.
at::Tensor pattern(c10::ScalarType dt) {
  auto base = at::arange(24, at::kDouble);
  at::Tensor out;
  if (dt == at::kBool)
    out = at::arange(24, at::kLong).remainder(3) == 0;
  else if (at::isComplexType(dt))
    out = at::complex(base * 0.25 - 2.5, base * -1.5 + 7.0).to(dt);
  else if (is_floating(dt))
    out = (base * 0.25 - 2.5).to(dt);
  else
    out = (at::arange(24, at::kLong) * 37 - 300).to(dt);
  return out.reshape({2, 3, 4});
}

/// interop_common.specials: special floats, or the integer type's extremes.
at::Tensor specials(c10::ScalarType dt) {
  auto s = at::tensor(kSpecials, at::kDouble);
  if (is_floating(dt)) return s.to(dt);
  if (at::isComplexType(dt)) return at::complex(s, s.flip({0})).to(dt);
  std::vector<std::int64_t> v;
  switch (dt) {
    case at::kChar: v = {-128, 127, 0, -1, 1}; break;
    case at::kByte: v = {0, 255, 1, 128, 127}; break;
    case at::kShort: v = {-32768, 32767, 0, -1, 1}; break;
    case at::kInt: v = {INT32_MIN, INT32_MAX, 0, -1, 1}; break;
    case at::kLong: v = {INT64_MIN, INT64_MAX, 0, -1, std::int64_t{1} << 40}; break;
    case at::kBool: v = {1, 0, 0, 1}; break;
    default: BOOST_FAIL("no specials for " << c10::toString(dt));
  }
  return at::tensor(v, at::kLong).to(dt);
}

/// interop_common.expected_values(python_side=False): what the tests save and
/// what they expect to load (a Python OrderedDict and Parameter load as a dict
/// and a tensor that requires grad).
c10::impl::GenericDict expected_values() {
  auto v = str_dict();
  auto dtypes = str_dict(), special = str_dict(), scalars = str_dict();
  for (const auto& d : kDtypes) {
    dtypes.insert(d.name, pattern(d.type));
    special.insert(d.name, specials(d.type));
    scalars.insert(d.name, pattern(d.type).flatten()[5].clone());
  }
  v.insert("dtypes", dtypes);
  v.insert("specials", special);
  v.insert("scalars", scalars);

  auto empty = str_dict();
  empty.insert("f32_0", at::empty({0}, at::kFloat));
  empty.insert("i16_2x0", at::zeros({2, 0}, at::kShort));
  empty.insert("c64_0x3", at::zeros({0, 3}, at::kComplexFloat));
  empty.insert("bool_0", at::zeros({0}, at::kBool));
  v.insert("empty", empty);

  auto base = at::arange(60, at::kFloat).reshape({6, 10});
  auto views = str_dict();
  views.insert("base", base);
  views.insert("transposed", base.t());
  views.insert("sliced", base.slice(0, 1, 5, 2).slice(1, 3, 9, 3));
  views.insert("row", base[4]);
  views.insert("element", base[5][7]);
  v.insert("views", views);
  v.insert("lonely_transposed", at::arange(12, at::kDouble).reshape({3, 4}).t());
  v.insert("lonely_slice", at::arange(100, at::kInt).slice(0, 10, 20, 3));
  v.insert("expanded", at::arange(3, at::kShort).expand({4, 3}));

  auto shared = at::arange(16, at::kLong);
  auto shared_dict = str_dict();
  shared_dict.insert("a", shared);
  v.insert("shared", shared_dict);
  v.insert("shared_list", list_of({shared.view({4, 4}).slice(0, 1, 3), "not a tensor"}));
  auto grad = at::arange(4, at::kFloat) * 0.5;
  grad.set_requires_grad(true);
  v.insert("requires_grad", grad);

  auto nested = str_dict();
  auto kv = str_dict();
  kv.insert("k", "v");
  nested.insert("list", list_of({1, 2.5, "x", IValue(), true, list_of({3, tuple_of({4, 5})}), kv}));
  nested.insert("tuple", tuple_of({1, "two", 3.0, IValue(), false, tuple_of({}), list_of({}), str_dict()}));
  auto ordered = str_dict();
  ordered.insert("z", 1);
  ordered.insert("a", 2);
  ordered.insert("m", list_of({3}));
  nested.insert("ordered", ordered);
  auto int_keys = int_dict();
  int_keys.insert(0, "zero");
  int_keys.insert(-5, "minus five");
  int_keys.insert(std::int64_t{1} << 40, "big");
  auto inner = int_dict();
  inner.insert(1, list_of({2}));
  int_keys.insert(7, inner);
  nested.insert("int_keys", int_keys);
  auto d = str_dict(), c = str_dict(), b = str_dict(), a = str_dict();
  d.insert("d", list_of({list_of({list_of({tuple_of({at::arange(3, at::kChar)})})})}));
  c.insert("c", d);
  b.insert("b", c);
  a.insert("a", b);
  nested.insert("deep", a);
  nested.insert("empty_dict", str_dict());
  nested.insert("empty_list", list_of({}));
  nested.insert("empty_tuple", tuple_of({}));
  v.insert("nested", nested);

  v.insert("unicode", kUnicode);
  v.insert(kUnicodeKey, kUnicodeKey);
  v.insert("empty_string", "");
  v.insert("big", std::int64_t{1} << 40);
  std::vector<IValue> ints;
  for (std::int64_t i :
       {std::int64_t{0}, std::int64_t{1}, std::int64_t{-1}, std::int64_t{255}, std::int64_t{256},
        std::int64_t{65535}, std::int64_t{65536}, std::int64_t{INT32_MIN}, std::int64_t{INT32_MAX},
        std::int64_t{1} << 31, INT64_MIN, INT64_MAX, -(std::int64_t{1} << 40)})
    ints.emplace_back(i);
  v.insert("ints", list_of(std::move(ints)));
  std::vector<IValue> floats;
  for (double x : kPlainFloats) floats.emplace_back(x);
  v.insert("floats", list_of(std::move(floats)));
  v.insert("none", IValue());
  v.insert("true", true);
  v.insert("false", false);
  return v;
}

/// interop_common.torch2_values()
c10::impl::GenericDict torch2_values() {
  auto v = str_dict();
  auto x = at::arange(10, at::kFloat) * 0.5;
  v.insert("weight", pattern(at::kFloat));
  v.insert("bias", specials(at::kBFloat16));
  v.insert("shared_a", x);
  v.insert("shared_b", x.slice(0, 2, 7));
  v.insert("step", 7);
  v.insert("name", "torch2");
  auto nested = int_dict();
  nested.insert(1, tuple_of({2.5, IValue()}));
  v.insert("nested", nested);
  return v;
}

// --- comparing ----------------------------------------------------------------

std::string tensor_bytes(const at::Tensor& t) {
  if (t.numel() == 0) return {};
  auto c = t.detach().contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()),
                     static_cast<std::size_t>(c.numel()) * static_cast<std::size_t>(c.element_size()));
}

std::string hex(std::string_view bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char ch : bytes) {
    out.push_back(digits[ch >> 4]);
    out.push_back(digits[ch & 15]);
  }
  return out;
}

std::string bits_hex(double d) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(std::bit_cast<std::uint64_t>(d)));
  return buf;
}

std::string show(const IValue& v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

/// The first difference between `got` and `want`, or nothing. Kinds must match
/// exactly; floats bit for bit (a NaN matches any NaN); tensors in dtype, sizes,
/// strides, storage offset, requires_grad and every byte; dicts in key type and
/// key order.
std::optional<std::string> compare(const IValue& got, const IValue& want, const std::string& path) {
  auto differ = [&](const std::string& what) { return std::optional<std::string>(path + ": " + what); };
  if (got.tagKind() != want.tagKind())
    return differ("is a " + got.tagKind() + " (" + show(got) + "), expected a " + want.tagKind());
  if (want.isTensor()) {
    const auto& g = got.toTensor();
    const auto& w = want.toTensor();
    if (g.scalar_type() != w.scalar_type())
      return differ(std::string("dtype ") + c10::toString(g.scalar_type()) + ", expected " +
                    c10::toString(w.scalar_type()));
    if (g.sizes() != w.sizes())
      return differ("sizes " + c10::str(g.sizes()) + ", expected " + c10::str(w.sizes()));
    if (g.strides() != w.strides())
      return differ("strides " + c10::str(g.strides()) + ", expected " + c10::str(w.strides()));
    if (g.storage_offset() != w.storage_offset())
      return differ("storage offset " + std::to_string(g.storage_offset()) + ", expected " +
                    std::to_string(w.storage_offset()));
    if (g.requires_grad() != w.requires_grad())
      return differ("requires_grad " + std::to_string(g.requires_grad()));
    if (g.device() != w.device()) return differ("device " + g.device().str());
    if (tensor_bytes(g) != tensor_bytes(w))
      return differ("bytes differ: got " + hex(tensor_bytes(g)) + ", expected " + hex(tensor_bytes(w)));
    return std::nullopt;
  }
  if (want.isGenericDict()) {
    auto g = got.toGenericDict();
    auto w = want.toGenericDict();
    if (g.keyType()->str() != w.keyType()->str())
      return differ("key type " + g.keyType()->str() + ", expected " + w.keyType()->str());
    if (g.size() != w.size())
      return differ(std::to_string(g.size()) + " entries, expected " + std::to_string(w.size()));
    auto gi = g.begin();
    for (auto wi = w.begin(); wi != w.end(); ++wi, ++gi) {
      if (auto m = compare(gi->key(), wi->key(), path + " key")) return m;
      if (auto m = compare(gi->value(), wi->value(), path + "[" + show(wi->key()) + "]")) return m;
    }
    return std::nullopt;
  }
  if (want.isList() || want.isTuple()) {
    const auto g = got.isList() ? got.toListRef().vec() : got.toTupleRef().elements().vec();
    const auto w = want.isList() ? want.toListRef().vec() : want.toTupleRef().elements().vec();
    if (g.size() != w.size())
      return differ("length " + std::to_string(g.size()) + ", expected " + std::to_string(w.size()));
    for (std::size_t i = 0; i < w.size(); ++i)
      if (auto m = compare(g[i], w[i], path + "[" + std::to_string(i) + "]")) return m;
    return std::nullopt;
  }
  if (want.isDouble()) {
    const double g = got.toDouble(), w = want.toDouble();
    if (std::isnan(w) ? !std::isnan(g) : std::bit_cast<std::uint64_t>(g) != std::bit_cast<std::uint64_t>(w))
      return differ("float bits " + bits_hex(g) + ", expected " + bits_hex(w));
    return std::nullopt;
  }
  if (want.isInt()) {
    if (got.toInt() != want.toInt())
      return differ(std::to_string(got.toInt()) + ", expected " + std::to_string(want.toInt()));
    return std::nullopt;
  }
  if (want.isBool()) {
    if (got.toBool() != want.toBool()) return differ(show(got) + ", expected " + show(want));
    return std::nullopt;
  }
  if (want.isString()) {
    if (got.toStringRef() != want.toStringRef())
      return differ("\"" + hex(got.toStringRef()) + "\" (hex), expected \"" + hex(want.toStringRef()) + "\"");
    return std::nullopt;
  }
  if (want.isNone()) return std::nullopt;
  return differ("cannot compare a " + want.tagKind());
}

#define CHECK_SAME(got, want)                                \
  do {                                                       \
    const auto mismatch_ = compare((got), (want), "$");      \
    BOOST_CHECK_MESSAGE(!mismatch_, mismatch_.value_or("")); \
  } while (0)

const char* torch_name(c10::ScalarType t) {
  for (const auto& d : kDtypes)
    if (d.type == t) return d.torch_name;
  return "?";
}

/// interop_common.dump(): one line per node; make_files.py writes the dump of
/// what torch.load reads next to each file it makes.
void dump(const IValue& v, const std::string& path, std::string& out) {
  auto join = [](c10::IntArrayRef xs) {
    std::string s;
    for (std::size_t i = 0; i < xs.size(); ++i) s += (i ? "," : "") + std::to_string(xs[i]);
    return s;
  };
  auto key_text = [](const IValue& k) -> std::string {
    if (k.isBool()) return k.toBool() ? "b1" : "b0";
    if (k.isInt()) return "i" + std::to_string(k.toInt());
    if (k.isString()) return "s" + hex(k.toStringRef());
    if (k.isDouble()) return "f" + bits_hex(k.toDouble());
    return "?" + k.tagKind();
  };
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    out += path + " tensor " + torch_name(t.scalar_type()) + " [" + join(t.sizes()) + "] [" +
           join(t.strides()) + "] " + std::to_string(t.storage_offset()) +
           " rg=" + (t.requires_grad() ? "1" : "0") + " " + hex(tensor_bytes(t)) + "\n";
  } else if (v.isGenericDict()) {
    auto d = v.toGenericDict();
    out += path + " dict " + std::to_string(d.size()) + "\n";
    for (const auto& e : d) dump(e.value(), path + "/" + key_text(e.key()), out);
  } else if (v.isList() || v.isTuple()) {
    const auto items = v.isList() ? v.toListRef().vec() : v.toTupleRef().elements().vec();
    out += path + (v.isList() ? " list " : " tuple ") + std::to_string(items.size()) + "\n";
    for (std::size_t i = 0; i < items.size(); ++i) dump(items[i], path + "/" + std::to_string(i), out);
  } else if (v.isNone()) {
    out += path + " none\n";
  } else if (v.isBool()) {
    out += path + " bool " + (v.toBool() ? "1" : "0") + "\n";
  } else if (v.isInt()) {
    out += path + " int " + std::to_string(v.toInt()) + "\n";
  } else if (v.isDouble()) {
    out += path + " float " + bits_hex(v.toDouble()) + "\n";
  } else if (v.isString()) {
    out += path + " str " + hex(v.toStringRef()) + "\n";
  } else {
    out += path + " ?" + v.tagKind() + "\n";
  }
}

std::string dump(const IValue& v) {
  std::string out;
  dump(v, "$", out);
  return out;
}

/// Checks the storages of expected_values() as loaded: the views of one base
/// share one storage and see each other's writes; distinct storages stay
/// distinct.
void check_sharing(const IValue& loaded) {
  auto root = loaded.toGenericDict();
  auto views = root.at("views").toGenericDict();
  auto base = views.at("base").toTensor();
  auto transposed = views.at("transposed").toTensor();
  auto sliced = views.at("sliced").toTensor();
  auto row = views.at("row").toTensor();
  auto element = views.at("element").toTensor();
  for (const auto& t : {transposed, sliced, row, element}) {
    BOOST_TEST(t.storage().data() == base.storage().data());
    BOOST_TEST(t.storage().is_alias_of(base.storage()));
  }
  auto a = root.at("shared").toGenericDict().at("a").toTensor();
  auto b = root.at("shared_list").toListRef()[0].toTensor();
  BOOST_TEST(a.storage().data() == b.storage().data());
  BOOST_TEST(a.storage().data() != base.storage().data());
  BOOST_TEST(root.at("lonely_slice").toTensor().storage().data() != base.storage().data());

  sliced[1][1].fill_(-1234.0);  // base[3][6]
  BOOST_TEST(base[3][6].item<float>() == -1234.0f);
  BOOST_TEST(transposed[6][3].item<float>() == -1234.0f);
  row[7].fill_(-99.0);  // base[4][7]
  BOOST_TEST(base[4][7].item<float>() == -99.0f);
  BOOST_TEST(transposed[7][4].item<float>() == -99.0f);
  element.fill_(4321.0);  // base[5][7]
  BOOST_TEST(base[5][7].item<float>() == 4321.0f);
  a[5].fill_(555);  // b[0][1]
  BOOST_TEST(b[0][1].item<std::int64_t>() == 555);
}

/// Checks a file that holds expected_values(): every value, then the sharing.
void check_values_file(const fs::path& file, const ckpt::ReadOptions& options) {
  const IValue loaded = ckpt::read_file(file, options);
  BOOST_REQUIRE(loaded.isGenericDict());
  CHECK_SAME(loaded, IValue(expected_values()));
  check_sharing(loaded);
}

/// Every tensor record starts on a 4096 boundary (checked after reading
/// every local header).
void check_aligned(const fs::path& file) {
  ckpt::FileReader reader(file);
  reader.verify();  // reads every local header and checks every CRC
  BOOST_TEST(reader.records().size() >= 3u);
  for (const auto& r : reader.records()) {
    BOOST_TEST_INFO("record " << r.name);
    if (r.name.find("/data/") != std::string::npos) BOOST_TEST(r.data_offset % 4096 == 0u);
    BOOST_TEST(r.data_offset > r.header_offset);
  }
}

}  // namespace

// ---------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(python_to_ckpt)

BOOST_AUTO_TEST_CASE(values_read_exactly) {
  check_values_file(python_files() / "values.pt", {});
}

BOOST_AUTO_TEST_CASE(values_read_exactly_with_mmap) {
  check_values_file(python_files() / "values.pt", mmap_options());
}

BOOST_AUTO_TEST_CASE(values_read_exactly_with_crc_checks) {
  check_values_file(python_files() / "values.pt", crc_options());
}

BOOST_AUTO_TEST_CASE(tree_describes_python_objects) {
  ckpt::FileReader reader(python_files() / "values.pt");
  BOOST_TEST(reader.prefix() == "values");  // torch 1.x names the archive after the file
  reader.verify();                          // torch's CRCs
  const auto& root = reader.root();
  BOOST_TEST(std::string(ckpt::kind_name(root.kind)) == "dict");
  BOOST_TEST(!root.ordered);
  const auto* nested = root.find("nested");
  BOOST_REQUIRE(nested);
  BOOST_REQUIRE(nested->find("ordered"));
  BOOST_TEST(nested->find("ordered")->ordered);
  BOOST_TEST(!nested->find("int_keys")->ordered);
  BOOST_REQUIRE(nested->find("ordered")->entries.size() == 3u);
  BOOST_TEST(nested->find("ordered")->entries[0].first->s == "z");  // insertion order kept

  const auto* param = root.find("requires_grad");
  BOOST_REQUIRE(param);
  BOOST_REQUIRE(std::string(ckpt::kind_name(param->kind)) == "tensor");
  BOOST_TEST(param->tensor->is_parameter);
  BOOST_TEST(param->tensor->requires_grad);

  const auto* views = root.find("views");
  BOOST_REQUIRE(views);
  const auto& base = *views->find("base")->tensor;
  const auto& sliced = *views->find("sliced")->tensor;
  const auto& transposed = *views->find("transposed")->tensor;
  const auto& element = *views->find("element")->tensor;
  BOOST_TEST(base.storage_numel == 60);
  BOOST_TEST(sliced.storage_key == base.storage_key);
  BOOST_TEST(transposed.storage_key == base.storage_key);
  BOOST_TEST(element.storage_key == base.storage_key);
  BOOST_TEST(sliced.storage_offset == 13);
  BOOST_TEST(sliced.sizes == (std::vector<std::int64_t>{2, 2}), boost::test_tools::per_element());
  BOOST_TEST(sliced.strides == (std::vector<std::int64_t>{20, 3}), boost::test_tools::per_element());
  BOOST_TEST(transposed.strides == (std::vector<std::int64_t>{1, 10}), boost::test_tools::per_element());
  BOOST_TEST(element.sizes.empty());
  BOOST_TEST(element.storage_offset == 57);
  BOOST_TEST(root.find("expanded")->tensor->strides == (std::vector<std::int64_t>{0, 1}),
             boost::test_tools::per_element());
  BOOST_TEST(root.find("lonely_slice")->tensor->storage_numel == 100);
  for (const auto& d : kDtypes) {
    BOOST_TEST_INFO("dtype " << d.name);
    const auto* t = root.find("dtypes")->find(d.name);
    BOOST_REQUIRE(t);
    BOOST_TEST(t->tensor->dtype == d.type);
    BOOST_TEST(t->tensor->location == "cpu");
  }
  BOOST_TEST(root.find(kUnicodeKey)->s == kUnicodeKey);
  BOOST_TEST(root.find("big")->i == std::int64_t{1} << 40);
}

BOOST_AUTO_TEST_CASE(every_file_matches_what_torch_load_sees) {
  // make_files.py dumps what torch.load reads from each file; ckpt must read the same.
  for (const char* name : {"values", "module", "adam", "torch2"}) {
    const auto want = read_text(python_files() / (std::string(name) + ".dump"));
    for (const auto& options : {ckpt::ReadOptions{}, mmap_options(), crc_options()}) {
      BOOST_TEST_INFO(name << ".pt, mmap " << options.mmap << ", verify_crc " << options.verify_crc);
      BOOST_TEST(dump(ckpt::read_file(python_files() / (std::string(name) + ".pt"), options)) == want);
    }
  }
}

BOOST_AUTO_TEST_CASE(module_state_dict) {
  ckpt::FileReader reader(python_files() / "module.pt");
  BOOST_TEST(reader.root().ordered);  // state_dict() is an OrderedDict (with _metadata)
  reader.verify();
  const IValue loaded = reader.load();
  BOOST_REQUIRE(loaded.isGenericDict());
  auto sd = loaded.toGenericDict();
  BOOST_TEST(sd.keyType()->str() == "str");
  const std::vector<std::pair<std::string, std::vector<std::int64_t>>> want = {
      {"0.weight", {4, 3}}, {"0.bias", {4}}, {"2.weight", {2, 4}}, {"2.bias", {2}}};
  BOOST_REQUIRE(sd.size() == want.size());
  std::size_t i = 0;
  for (const auto& e : sd) {
    BOOST_TEST_INFO("entry " << i);
    BOOST_TEST(e.key().toStringRef() == want[i].first);
    const auto& t = e.value().toTensor();
    BOOST_TEST(t.scalar_type() == at::kFloat);
    BOOST_TEST(t.sizes().vec() == want[i].second, boost::test_tools::per_element());
    BOOST_TEST(t.is_contiguous());
    BOOST_TEST(!t.requires_grad());  // state_dict() detaches
    ++i;
  }
}

BOOST_AUTO_TEST_CASE(adam_state_dict) {
  ckpt::FileReader reader(python_files() / "adam.pt");
  reader.verify();
  const auto* state_node = reader.root().find("state");
  BOOST_REQUIRE(state_node);
  for (const auto& [k, v] : state_node->entries) BOOST_TEST(std::string(ckpt::kind_name(k->kind)) == "int");

  const IValue loaded = reader.load();
  auto root = loaded.toGenericDict();
  BOOST_TEST(root.keyType()->str() == "str");
  auto state = root.at("state").toGenericDict();
  BOOST_TEST(state.keyType()->str() == "int");
  BOOST_REQUIRE(state.size() == 4u);
  const std::vector<std::vector<std::int64_t>> shapes = {{4, 3}, {4}, {2, 4}, {2}};
  std::int64_t id = 0;
  for (const auto& e : state) {
    BOOST_TEST_INFO("param " << id);
    BOOST_TEST(e.key().toInt() == id);
    auto s = e.value().toGenericDict();
    BOOST_REQUIRE(s.size() == 3u);
    auto step = s.at("step").toTensor();
    BOOST_TEST(step.dim() == 0);
    BOOST_TEST(step.scalar_type() == at::kFloat);
    BOOST_TEST(step.item<float>() == 1.0f);
    for (const char* name : {"exp_avg", "exp_avg_sq"}) {
      auto t = s.at(name).toTensor();
      BOOST_TEST(t.sizes().vec() == shapes[static_cast<std::size_t>(id)], boost::test_tools::per_element());
      BOOST_TEST(t.scalar_type() == at::kFloat);
    }
    // After one step from zero: exp_avg = 0.1 g and exp_avg_sq = 0.001 g^2 >= 0.
    BOOST_TEST(s.at("exp_avg_sq").toTensor().ge(0).all().item<bool>());
    BOOST_TEST(s.at("exp_avg").toTensor().ne(0).any().item<bool>());
    ++id;
  }
  auto groups = root.at("param_groups").toListRef();
  BOOST_REQUIRE(groups.size() == 1u);
  auto g = groups[0].toGenericDict();
  BOOST_TEST(g.at("lr").toDouble() == 1e-3);
  BOOST_REQUIRE(g.at("betas").isTuple());
  BOOST_TEST(g.at("betas").toTupleRef().elements()[0].toDouble() == 0.9);
  BOOST_TEST(g.at("betas").toTupleRef().elements()[1].toDouble() == 0.999);
  BOOST_TEST(g.at("eps").toDouble() == 1e-8);
  BOOST_TEST(g.at("weight_decay").isInt());
  BOOST_TEST(g.at("amsgrad").isBool());
  BOOST_TEST(g.at("foreach").isNone());
  auto params = g.at("params").toListRef();
  BOOST_REQUIRE(params.size() == 4u);
  for (std::size_t i = 0; i < params.size(); ++i)
    BOOST_TEST(params[i].toInt() == static_cast<std::int64_t>(i));
}

BOOST_AUTO_TEST_CASE(torch2_layout) {
  const auto file = python_files() / "torch2.pt";
  ckpt::FileReader reader(file);
  BOOST_TEST(reader.prefix() == "archive");
  std::vector<std::string> names;
  for (const auto& r : reader.records()) names.push_back(r.name);
  const std::vector<std::string> want_names = {"archive/data.pkl",
                                               "archive/.format_version",
                                               "archive/.storage_alignment",
                                               "archive/byteorder",
                                               "archive/data/0",
                                               "archive/data/1",
                                               "archive/data/2",
                                               "archive/version",
                                               "archive/.data/version",
                                               "archive/.data/serialization_id"};
  BOOST_TEST(names == want_names, boost::test_tools::per_element());
  reader.verify();
  for (const auto& r : reader.records()) {
    BOOST_TEST_INFO("record " << r.name);
    BOOST_TEST(r.data_offset % 64 == 0u);
  }
  for (const auto& options : {ckpt::ReadOptions{}, mmap_options(), crc_options()}) {
    BOOST_TEST_INFO("mmap " << options.mmap << ", verify_crc " << options.verify_crc);
    const IValue loaded = ckpt::read_file(file, options);
    CHECK_SAME(loaded, IValue(torch2_values()));
    auto root = loaded.toGenericDict();
    auto a = root.at("shared_a").toTensor();
    auto b = root.at("shared_b").toTensor();
    BOOST_TEST(a.storage().data() == b.storage().data());
    b[0].fill_(-7.0);
    BOOST_TEST(a[2].item<float>() == -7.0f);
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(ckpt_to_python)

BOOST_AUTO_TEST_CASE(values_checked_by_torch_load) {
  TempDir dir;
  const auto file = dir / "values.pt";
  ckpt::write_file(file, expected_values());
  CHECK_PYTHON("check_files.py", {"values", file.string()});
}

BOOST_AUTO_TEST_CASE(values_checked_by_torch_load_buffered_without_fsync) {
  TempDir dir;
  const auto file = dir / "values.pt";
  ckpt::WriteOptions options;
  options.direct_io = false;
  options.fsync = false;
  ckpt::write_file(file, expected_values(), options);
  CHECK_PYTHON("check_files.py", {"values", file.string()});
}

BOOST_AUTO_TEST_CASE(written_from_views_of_a_mapping) {
  // Tensors loaded with mmap point into the mapping; saving them writes from it.
  TempDir dir;
  const auto first = dir / "first.pt";
  const auto second = dir / "second.pt";
  ckpt::write_file(first, expected_values());
  ckpt::write_file(second, ckpt::read_file(first, mmap_options()));
  CHECK_PYTHON("check_files.py", {"values", second.string()});
}

BOOST_AUTO_TEST_CASE(resaved_by_torch_reads_back) {
  // ckpt -> torch.load -> torch.save -> ckpt: the values and the sharing survive.
  TempDir dir;
  const auto file = dir / "values.pt";
  const auto resaved = dir / "resaved.pt";
  ckpt::write_file(file, expected_values());
  REQUIRE_PYTHON("check_files.py", {"resave", file.string(), resaved.string()});
  check_values_file(resaved, {});
  check_values_file(resaved, mmap_options());
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------
// Acceptance item 2: the raw zip of a ckpt file.
BOOST_AUTO_TEST_SUITE(raw_zip)

BOOST_AUTO_TEST_CASE(records_aligned_and_crcs_right) {
  TempDir dir;
  std::vector<std::string> files;
  auto add = [&](const std::string& name, const IValue& value, bool direct_io) {
    const auto file = dir / name;
    ckpt::WriteOptions options;
    options.direct_io = direct_io;
    ckpt::write_file(file, value, options);
    check_aligned(file);
    files.push_back(file.string());
  };
  add("values.pt", expected_values(), true);
  add("values_buffered.pt", expected_values(), false);
  add("empty.pt", str_dict(), true);
  // Records whose sizes straddle the 4096-byte boundary, and a multi-MiB one.
  auto sizes = str_dict();
  for (std::int64_t n : std::vector<std::int64_t>{1, 4095, 4096, 4097, 8191, (std::int64_t{3} << 20) + 5})
    sizes.insert("u8_" + std::to_string(n), at::arange(n, at::kLong).remainder(251).to(at::kByte));
  add("sizes.pt", sizes, true);
  add("sizes_buffered.pt", sizes, false);

  std::vector<std::string> args = {"zip"};
  args.insert(args.end(), files.begin(), files.end());
  CHECK_PYTHON("check_files.py", args);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------
// Python state dicts through ckpt and back to Python, compared to the originals.
BOOST_AUTO_TEST_SUITE(round_trip)

BOOST_AUTO_TEST_CASE(module_adam_and_torch2_files) {
  // Each file read by ckpt (copied, then mapped) and written again by ckpt;
  // torch.load must see exactly what it saw in the original.
  TempDir dir;
  std::vector<std::string> pairs = {"roundtrip"};
  std::vector<std::string> resaved_files = {"zip"};
  for (const char* name : {"module", "adam", "torch2"}) {
    for (bool mmap : {false, true}) {
      const auto orig = python_files() / (std::string(name) + ".pt");
      const auto resaved = dir / (std::string(name) + (mmap ? "_mmap" : "") + ".pt");
      ckpt::write_file(resaved, ckpt::read_file(orig, mmap ? mmap_options() : ckpt::ReadOptions{}));
      pairs.insert(pairs.end(), {orig.string(), resaved.string()});
      resaved_files.push_back(resaved.string());
    }
  }
  CHECK_PYTHON("check_files.py", pairs);
  CHECK_PYTHON("check_files.py", resaved_files);
}

BOOST_AUTO_TEST_CASE(values_python_ckpt_python) {
  // Python's values (an OrderedDict, a Parameter, shared storages) re-saved by
  // ckpt: torch.load sees the same values and storages shared again.
  TempDir dir;
  for (bool mmap : {false, true}) {
    BOOST_TEST_INFO("mmap " << mmap);
    const auto resaved = dir / (mmap ? "values_mmap.pt" : "values.pt");
    ckpt::write_file(
        resaved, ckpt::read_file(python_files() / "values.pt", mmap ? mmap_options() : ckpt::ReadOptions{}));
    CHECK_PYTHON("check_files.py", {"values", resaved.string()});
  }
}

BOOST_AUTO_TEST_SUITE_END()
