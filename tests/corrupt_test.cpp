// Bad input: every hostile, damaged or foreign file is refused with a typed
// ckpt error whose message says what is wrong, and never crashes, hangs,
// allocates without bound or runs anything the file says.
//
// Each case builds its own file. Archives are built here with the library's
// own zip helpers (so that only the part under test is wrong) and pickles are
// written by hand, opcode by opcode, as torch.save writes them.
#include <ckpt/format.hpp>

#define BOOST_TEST_MODULE corrupt_test
#include <boost/test/unit_test.hpp>

#include <boost/core/demangle.hpp>

#include "format/zip.hpp"
#include "format/zip_image.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <csignal>
#include <cstring>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <new>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using ckpt::test::sh_quote;
using ckpt::test::TempDir;

namespace {

// --- files --------------------------------------------------------------------

void write_bytes(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  BOOST_REQUIRE(out.good());
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// --- checking errors ----------------------------------------------------------

/// Predicate for BOOST_CHECK_EXCEPTION: the message contains every part.
struct Says {
  std::vector<std::string> parts;
  bool operator()(const std::exception& e) const {
    const std::string what = e.what();
    bool ok = true;
    for (const auto& p : parts) {
      if (what.find(p) == std::string::npos) {
        BOOST_TEST_MESSAGE("error message lacks \"" << p << "\": " << what);
        ok = false;
      }
    }
    return ok;
  }
};

/// The message names the file and says `parts`.
Says says(const fs::path& file, std::initializer_list<std::string> parts) {
  Says s{std::vector<std::string>(parts)};
  s.parts.push_back(file.string());
  return s;
}

// --- zip archives ---------------------------------------------------------------

using ckpt::test::crc32_of;

struct Entry {
  std::string name;
  std::string data;
};

/// A sound stored zip of `entries`, laid out as ckpt lays out its files.
std::string build_zip(const std::vector<Entry>& entries) {
  std::vector<ckpt::RecordInfo> records;
  std::uint64_t at = 0;
  for (const auto& e : entries) {
    ckpt::RecordInfo r;
    r.name = e.name;
    r.size = e.data.size();
    r.crc32 = crc32_of(e.data);
    at = ckpt::detail::ZipImage::place(r, at);
    records.push_back(std::move(r));
  }
  const ckpt::detail::ZipImage zip(std::move(records), at);
  std::string out;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    out += zip.local_header(i);
    out += entries[i].data;
  }
  out += zip.central_directory();
  return out;
}

/// Offset of the central directory entry of `name` in the zip `file`.
std::size_t central_entry(const std::string& file, std::string_view name) {
  const std::string sig = "PK\x01\x02";
  for (auto at = file.find(sig); at != std::string::npos; at = file.find(sig, at + 1)) {
    if (at + 46 > file.size()) break;
    const auto* p = reinterpret_cast<const unsigned char*>(file.data() + at);
    const std::size_t len = ckpt::detail::get16(p + 28);
    if (at + 46 + len <= file.size() && std::string_view(file).substr(at + 46, len) == name) return at;
  }
  BOOST_FAIL("no central directory entry for " << name);
  return 0;
}

void patch16(std::string& file, std::size_t at, std::uint16_t v) {
  std::string b;
  ckpt::detail::put16(b, v);
  file.replace(at, b.size(), b);
}
void patch32(std::string& file, std::size_t at, std::uint32_t v) {
  std::string b;
  ckpt::detail::put32(b, v);
  file.replace(at, b.size(), b);
}

// --- pickles --------------------------------------------------------------------

/// Pickle bytes, opcode by opcode.
class Pkl {
 public:
  Pkl& byte(unsigned v) {
    b_.push_back(static_cast<char>(v));
    return *this;
  }
  Pkl& raw(std::string_view s) {
    b_.append(s);
    return *this;
  }
  Pkl& proto(unsigned v = 2) { return byte(0x80).byte(v); }
  Pkl& global(std::string_view module, std::string_view name) {
    return byte('c').raw(module).byte('\n').raw(name).byte('\n');
  }
  Pkl& str(std::string_view s) {
    byte('X');
    ckpt::detail::put32(b_, static_cast<std::uint32_t>(s.size()));
    return raw(s);
  }
  Pkl& short_str(std::string_view s) { return byte(0x8c).byte(static_cast<unsigned>(s.size())).raw(s); }
  Pkl& integer(std::int64_t v) {
    if (v >= INT32_MIN && v <= INT32_MAX) {
      byte('J');
      ckpt::detail::put32(b_, static_cast<std::uint32_t>(static_cast<std::int32_t>(v)));
    } else {
      byte(0x8a).byte(8);
      ckpt::detail::put64(b_, static_cast<std::uint64_t>(v));
    }
    return *this;
  }
  Pkl& ints(const std::vector<std::int64_t>& v) {
    mark();
    for (auto x : v) integer(x);
    return tuple();
  }
  Pkl& mark() { return byte('('); }
  Pkl& tuple() { return byte('t'); }
  Pkl& empty_tuple() { return byte(')'); }
  Pkl& tuple1() { return byte(0x85); }
  Pkl& empty_list() { return byte(']'); }
  Pkl& empty_dict() { return byte('}'); }
  Pkl& append() { return byte('a'); }
  Pkl& appends() { return byte('e'); }
  Pkl& setitem() { return byte('s'); }
  Pkl& reduce() { return byte('R'); }
  Pkl& binpersid() { return byte('Q'); }
  Pkl& newfalse() { return byte(0x89); }
  Pkl& none() { return byte('N'); }
  Pkl& pop() { return byte('0'); }
  Pkl& put(std::uint32_t idx) {
    byte('r');
    ckpt::detail::put32(b_, idx);
    return *this;
  }
  Pkl& get(std::uint32_t idx) {
    byte('j');
    ckpt::detail::put32(b_, idx);
    return *this;
  }
  /// module.name(arg): what a pickle does to run code.
  Pkl& call(std::string_view module, std::string_view name, std::string_view arg) {
    return global(module, name).str(arg).tuple1().reduce();
  }
  Pkl& stop() { return byte('.'); }
  std::string done() {
    stop();
    return b_;
  }
  const std::string& bytes() const { return b_; }

 private:
  std::string b_;
};

/// A tensor as torch.save pickles it; the hooks replace one argument with
/// arbitrary opcodes.
struct TensorSpec {
  std::string storage_type = "FloatStorage";
  std::string key = "0";
  std::string location = "cpu";
  std::int64_t numel = 2;
  std::int64_t offset = 0;
  std::vector<std::int64_t> sizes{2};
  std::vector<std::int64_t> strides{1};
  std::function<void(Pkl&)> location_op;  // replaces the location string
  std::function<void(Pkl&)> offset_op;    // replaces the storage offset
};

void put_tensor(Pkl& p, const TensorSpec& t) {
  p.global("torch._utils", "_rebuild_tensor_v2").mark();
  p.mark().str("storage").global("torch", t.storage_type).str(t.key);
  if (t.location_op)
    t.location_op(p);
  else
    p.str(t.location);
  p.integer(t.numel).tuple().binpersid();
  if (t.offset_op)
    t.offset_op(p);
  else
    p.integer(t.offset);
  p.ints(t.sizes).ints(t.strides).newfalse();
  p.global("collections", "OrderedDict").empty_tuple().reduce();
  p.tuple().reduce();
}

/// {'a': tensor} as torch.save pickles it.
std::string dict_pickle(const TensorSpec& t) {
  Pkl p;
  p.proto().empty_dict().str("a");
  put_tensor(p, t);
  return p.setitem().done();
}

std::string floats(std::size_t n, float v = 1.0f) {
  std::string s(n * sizeof(float), '\0');
  for (std::size_t i = 0; i < n; ++i) std::memcpy(s.data() + i * sizeof(float), &v, sizeof v);
  return s;
}

/// An archive of `pkl` as data.pkl, the `storages` and the version record.
std::string archive(const std::string& pkl, const std::vector<Entry>& storages = {}) {
  std::vector<Entry> e{{"archive/data.pkl", pkl}};
  for (const auto& s : storages) e.push_back({"archive/data/" + s.name, s.data});
  e.push_back({"archive/version", "3\n"});
  return build_zip(e);
}

/// {'a': tensor} with the storage record `record` under the spec's key.
std::string tensor_file(const TensorSpec& t, const std::string& record) {
  return archive(dict_pickle(t), {{t.key, record}});
}

fs::path put_file(const TempDir& dir, const std::string& name, std::string_view bytes) {
  auto p = dir / name;
  write_bytes(p, bytes);
  return p;
}

/// A good checkpoint written by ckpt itself: {'a': ones(2), 'b': arange(1000)}.
fs::path good_file(const TempDir& dir) {
  c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
  d.insert("a", at::ones({2}));
  d.insert("b", at::arange(1000, at::kFloat));
  auto p = dir / "good.pt";
  ckpt::WriteOptions o;
  o.direct_io = false;
  o.fsync = false;
  ckpt::write_file(p, d, o);
  return p;
}

/// The data offset of record `name` in the good file at `path`.
std::uint64_t data_offset(const fs::path& path, const std::string& name) {
  ckpt::FileReader r(path);
  r.verify();  // reads every local header
  for (const auto& rec : r.records())
    if (rec.name == name) return rec.data_offset;
  BOOST_FAIL("no record " << name);
  return 0;
}

/// Pickle that runs module.name(arg) and nothing else.
std::string hostile_call(std::string_view module, std::string_view name, std::string_view arg) {
  return Pkl().proto().call(module, name, arg).done();
}

std::string touch_command(const fs::path& canary) {
  return "touch " + sh_quote(canary.string());
}
std::string python_creating(const fs::path& canary) {
  return "open('" + canary.string() + "', 'w').close()";
}

/// Python's own pickle.loads on `pkl`: true when it ran without error.
bool python_unpickles(const TempDir& dir, const std::string& pkl) {
  auto file = put_file(dir, "payload.pkl", pkl);
  auto r = ckpt::test::run(ckpt::test::python() +
                           " -c 'import pickle, sys; pickle.loads(open(sys.argv[1], \"rb\").read())' " +
                           sh_quote(file.string()));
  BOOST_TEST_MESSAGE("python pickle.loads: status " << r.status << " " << r.output);
  return r.status == 0;
}

constexpr int kDeep = 200000;

}  // namespace

// --- controls: the builders make sound files, the payloads are real -------------

BOOST_AUTO_TEST_SUITE(controls)

BOOST_AUTO_TEST_CASE(built_archive_is_a_sound_checkpoint) {
  TempDir dir;
  auto p = put_file(dir, "ok.pt", tensor_file(TensorSpec{}, floats(2, 1.5f)));
  ckpt::ReadOptions o;
  o.verify_crc = true;
  auto v = ckpt::read_file(p, o);
  auto t = v.toGenericDict().at("a").toTensor();
  BOOST_TEST(at::equal(t, at::full({2}, 1.5f)));
  BOOST_CHECK_NO_THROW(ckpt::FileReader{p}.verify());
}

BOOST_AUTO_TEST_CASE(python_pickle_runs_the_code_execution_payloads) {
  TempDir dir;
  const auto canary = dir / "canary";
  BOOST_REQUIRE(python_unpickles(dir, hostile_call("posix", "system", touch_command(canary))));
  BOOST_TEST(fs::exists(canary));
  fs::remove(canary);
  BOOST_REQUIRE(python_unpickles(dir, hostile_call("builtins", "eval", python_creating(canary))));
  BOOST_TEST(fs::exists(canary));
  fs::remove(canary);
  BOOST_REQUIRE(python_unpickles(dir, hostile_call("builtins", "exec", python_creating(canary))));
  BOOST_TEST(fs::exists(canary));
}

BOOST_AUTO_TEST_CASE(torch_load_runs_the_payload_inside_rebuild_arguments) {
  TempDir dir;
  const auto canary = dir / "canary";
  TensorSpec t;
  t.offset_op = [&](Pkl& p) { p.call("posix", "system", touch_command(canary)); };
  auto file = put_file(dir, "hostile.pt", tensor_file(t, floats(2)));
  auto r = ckpt::test::run(ckpt::test::python() + " -c 'import torch, sys; torch.load(sys.argv[1])' " +
                           sh_quote(file.string()));
  BOOST_TEST_MESSAGE("torch.load: status " << r.status << " " << r.output);
  BOOST_TEST(r.status == 0);
  BOOST_TEST(fs::exists(canary));
}

BOOST_AUTO_TEST_SUITE_END()

// --- globals that would execute code -------------------------------------------

BOOST_AUTO_TEST_SUITE(code_execution)

BOOST_AUTO_TEST_CASE(global_posix_system) {
  TempDir dir;
  const auto canary = dir / "canary";
  auto p = put_file(dir, "x.pt", archive(hostile_call("posix", "system", touch_command(canary))));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"refusing global 'posix.system'", "data.pkl"}));
  BOOST_TEST(!fs::exists(canary));
}

BOOST_AUTO_TEST_CASE(global_builtins_eval) {
  TempDir dir;
  const auto canary = dir / "canary";
  auto p = put_file(dir, "x.pt", archive(hostile_call("builtins", "eval", python_creating(canary))));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"refusing global 'builtins.eval'"}));
  BOOST_TEST(!fs::exists(canary));
}

BOOST_AUTO_TEST_CASE(global_builtins_exec) {
  TempDir dir;
  const auto canary = dir / "canary";
  auto p = put_file(dir, "x.pt", archive(hostile_call("builtins", "exec", python_creating(canary))));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"refusing global 'builtins.exec'"}));
  BOOST_TEST(!fs::exists(canary));
}

BOOST_AUTO_TEST_CASE(stack_global_os_system) {
  // Protocol 4 names globals with STACK_GLOBAL instead of GLOBAL's text lines.
  TempDir dir;
  const auto canary = dir / "canary";
  auto pkl = Pkl().proto(4).short_str("os").short_str("system").byte(0x93).str(touch_command(canary));
  auto p = put_file(dir, "x.pt", archive(pkl.tuple1().reduce().done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"refusing global 'os.system'"}));
  BOOST_TEST(!fs::exists(canary));
}

BOOST_AUTO_TEST_CASE(inst_opcode_calling_os_system) {
  // INST ('i') imports and calls a class in one opcode, without a GLOBAL.
  TempDir dir;
  const auto canary = dir / "canary";
  auto pkl = Pkl().mark().str(touch_command(canary)).byte('i').raw("os\nsystem\n").done();
  auto p = put_file(dir, "x.pt", archive(pkl));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"opcode 0x69", "not one torch.save writes"}));
  BOOST_TEST(!fs::exists(canary));
}

BOOST_AUTO_TEST_CASE(posix_system_inside_rebuild_tensor_arguments) {
  // The same file torch.load runs (see controls): the call is the storage offset.
  TempDir dir;
  const auto canary = dir / "canary";
  TensorSpec t;
  t.offset_op = [&](Pkl& p) { p.call("posix", "system", touch_command(canary)); };
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"refusing global 'posix.system'"}));
  BOOST_CHECK_EXCEPTION(ckpt::FileReader{p}, ckpt::CorruptCheckpoint, says(p, {"posix.system"}));
  BOOST_TEST(!fs::exists(canary));
}

BOOST_AUTO_TEST_CASE(builtins_eval_inside_persistent_id) {
  // The storage's location is computed by eval.
  TempDir dir;
  const auto canary = dir / "canary";
  TensorSpec t;
  t.location_op = [&](Pkl& p) { p.call("builtins", "eval", python_creating(canary) + " or 'cpu'"); };
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"refusing global 'builtins.eval'"}));
  BOOST_TEST(!fs::exists(canary));
}

BOOST_AUTO_TEST_CASE(builtins_exec_as_a_state_dict_value) {
  TempDir dir;
  const auto canary = dir / "canary";
  Pkl pkl;
  pkl.proto().empty_dict().str("weight").call("builtins", "exec", python_creating(canary)).setitem();
  auto p = put_file(dir, "x.pt", archive(pkl.done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"refusing global 'builtins.exec'"}));
  BOOST_TEST(!fs::exists(canary));
}

BOOST_AUTO_TEST_SUITE_END()

// --- files that are not checkpoints ------------------------------------------------

BOOST_AUTO_TEST_SUITE(not_a_checkpoint)

BOOST_AUTO_TEST_CASE(missing_file) {
  TempDir dir;
  const auto p = dir / "nothing-here.pt";
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::NotFound, says(p, {"does not exist"}));
}

BOOST_AUTO_TEST_CASE(directory_instead_of_file) {
  TempDir dir;
  const auto p = dir / "adir.pt";
  fs::create_directory(p);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"is a directory"}));
}

BOOST_AUTO_TEST_CASE(fifo_instead_of_file_is_refused_without_waiting_for_a_writer) {
  TempDir dir;
  const auto p = dir / "fifo.pt";
  BOOST_REQUIRE(::mkfifo(p.c_str(), 0600) == 0);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"not a regular file"}));
}

BOOST_AUTO_TEST_CASE(empty_file) {
  TempDir dir;
  auto p = put_file(dir, "empty.pt", "");
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"the file is empty"}));
}

BOOST_AUTO_TEST_CASE(text_file) {
  TempDir dir;
  auto p = put_file(dir, "notes.pt", "epoch 3: loss 0.25\nthis is not a checkpoint\n");
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"not a PyTorch checkpoint (no zip archive header)"}));
}

BOOST_AUTO_TEST_CASE(one_mebibyte_of_random_bytes) {
  TempDir dir;
  std::mt19937 gen(20240601u);  // the engine's output is fixed by the standard
  std::string bytes(std::size_t{1} << 20, '\0');
  for (std::size_t i = 0; i < bytes.size(); i += 4) {
    const std::uint32_t v = gen();
    std::memcpy(bytes.data() + i, &v, 4);
  }
  auto p = put_file(dir, "random.pt", bytes);
  const auto* b = reinterpret_cast<const unsigned char*>(bytes.data());
  BOOST_REQUIRE(ckpt::detail::get32(b) != ckpt::detail::kLocalSig);
  const std::string expect = b[0] == 0x80 ? "legacy" : "not a PyTorch checkpoint";
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {expect}));
}

BOOST_AUTO_TEST_CASE(random_bytes_after_a_zip_signature) {
  TempDir dir;
  std::mt19937 gen(7u);
  std::string bytes = "PK\x03\x04";
  while (bytes.size() < (std::size_t{1} << 16)) bytes.push_back(static_cast<char>(gen() & 0xff));
  auto p = put_file(dir, "random.pt", bytes);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"no end-of-central-directory record"}));
}

BOOST_AUTO_TEST_CASE(legacy_pre_1_6_format) {
  TempDir dir;
  const auto p = dir / "legacy.pt";
  auto r = ckpt::test::run(ckpt::test::python() +
                           " -c \"import torch, sys; torch.save({'a': torch.ones(2)}, sys.argv[1], "
                           "_use_new_zipfile_serialization=False)\" " +
                           sh_quote(p.string()));
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.output);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"legacy (pre-1.6, non-zip) serialization format"}));
}

BOOST_AUTO_TEST_SUITE_END()

// --- damaged files ------------------------------------------------------------------

BOOST_AUTO_TEST_SUITE(damaged)

BOOST_AUTO_TEST_CASE(truncated_good_file_at_many_cut_points) {
  TempDir dir;
  const auto good = read_bytes(good_file(dir));
  BOOST_REQUIRE_GT(good.size(), 3 * ckpt::detail::kAlign);
  const std::size_t n = good.size();
  const std::size_t cuts[] = {1,    3,    4,     21,      22,     100,    4095, 4096,
                              4097, 8192, n / 2, n - 100, n - 22, n - 21, n - 1};
  for (std::size_t cut : cuts) {
    BOOST_TEST_CONTEXT("cut at " << cut << " of " << n) {
      auto p = put_file(dir, "cut.pt", std::string_view(good).substr(0, cut));
      BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                            [&](const ckpt::CorruptCheckpoint& e) {
                              const std::string what = e.what();
                              const bool said = what.find("truncated") != std::string::npos ||
                                                what.find("too short") != std::string::npos ||
                                                what.find("not a PyTorch checkpoint") != std::string::npos;
                              if (!said) BOOST_TEST_MESSAGE("unexpected message: " << what);
                              return said && what.find(p.string()) != std::string::npos;
                            });
    }
  }
}

BOOST_AUTO_TEST_CASE(bytes_lost_from_the_middle) {
  // The end record survives but the directory it points at moved.
  TempDir dir;
  auto good = read_bytes(good_file(dir));
  good.erase(ckpt::detail::kAlign, ckpt::detail::kAlign);
  auto p = put_file(dir, "short.pt", good);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"corrupt zip archive", "lies outside the file"}));
}

BOOST_AUTO_TEST_CASE(flipped_tensor_byte_fails_verify) {
  TempDir dir;
  const auto path = good_file(dir);
  const auto at = data_offset(path, "archive/data/1");
  auto bytes = read_bytes(path);
  bytes[at + 123] = static_cast<char>(bytes[at + 123] ^ 0x10);
  auto p = put_file(dir, "flipped.pt", bytes);
  ckpt::FileReader reader(p);  // the directory and the pickle are intact
  BOOST_CHECK_EXCEPTION(reader.verify(), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data/1 fails its CRC-32 check"}));
  ckpt::ReadOptions o;
  o.verify_crc = true;
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p, o), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data/1 fails its CRC-32 check (the file is damaged)"}));
}

BOOST_AUTO_TEST_CASE(flipped_pickle_byte_with_verify_crc) {
  TempDir dir;
  const auto path = good_file(dir);
  const auto at = data_offset(path, "archive/data.pkl");
  auto bytes = read_bytes(path);
  // The key 'a': the pickle still parses after the flip, only the CRC can tell.
  const auto a = bytes.find(std::string_view("X\x01\x00\x00\x00", 5), at);
  BOOST_REQUIRE(a != std::string::npos && bytes[a + 5] == 'a');
  bytes[a + 5] = 'z';
  auto p = put_file(dir, "flipped.pt", bytes);
  ckpt::ReadOptions o;
  o.verify_crc = true;
  BOOST_CHECK_EXCEPTION(ckpt::FileReader(p, o), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data.pkl fails its CRC-32 check"}));
}

BOOST_AUTO_TEST_SUITE_END()

// --- zip directories that lie ---------------------------------------------------

BOOST_AUTO_TEST_SUITE(zip_directory)

BOOST_AUTO_TEST_CASE(entry_size_runs_past_the_file) {
  TempDir dir;
  auto bytes = read_bytes(good_file(dir));
  const auto e = central_entry(bytes, "archive/data/1");
  patch32(bytes, e + 20, 0x7ffffff0u);  // compressed size
  patch32(bytes, e + 24, 0x7ffffff0u);  // uncompressed size
  auto p = put_file(dir, "lies.pt", bytes);
  BOOST_CHECK_EXCEPTION(
      ckpt::read_file(p), ckpt::CorruptCheckpoint,
      says(p, {"record archive/data/1", "2147483632 bytes", "lies outside the file's data area"}));
}

BOOST_AUTO_TEST_CASE(entry_size_smaller_than_the_storage) {
  TempDir dir;
  auto bytes = read_bytes(good_file(dir));
  const auto e = central_entry(bytes, "archive/data/1");
  patch32(bytes, e + 20, 400);
  patch32(bytes, e + 24, 400);
  auto p = put_file(dir, "lies.pt", bytes);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data/1 holds 100 elements but the pickle says 1000"}));
}

BOOST_AUTO_TEST_CASE(stored_and_uncompressed_sizes_differ) {
  TempDir dir;
  auto bytes = read_bytes(good_file(dir));
  const auto e = central_entry(bytes, "archive/data/0");
  patch32(bytes, e + 20, 4);
  auto p = put_file(dir, "lies.pt", bytes);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data/0: stored size 4 differs from its size 8"}));
}

BOOST_AUTO_TEST_CASE(end_record_claims_more_entries_than_fit) {
  TempDir dir;
  auto bytes = read_bytes(good_file(dir));
  const std::size_t eocd = bytes.size() - 22;
  patch16(bytes, eocd + 8, 60000);
  patch16(bytes, eocd + 10, 60000);
  auto p = put_file(dir, "lies.pt", bytes);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"directory claims 60000 entries"}));
}

BOOST_AUTO_TEST_CASE(zip64_records_that_lie) {
  TempDir dir;
  const auto sound = archive(dict_pickle(TensorSpec{}), {{"0", floats(2)}});
  const std::size_t eocd = sound.size() - 22;
  const std::uint64_t cd_offset =
      ckpt::detail::get32(reinterpret_cast<const unsigned char*>(sound.data()) + eocd + 16);
  const std::uint64_t cd_size = eocd - cd_offset;
  // A zip64 end record (at eocd) and its locator, inserted before the end record.
  auto with_zip64 = [&](std::uint64_t entries, std::uint64_t size, std::uint64_t offset, std::uint64_t at) {
    std::string z;
    ckpt::detail::put32(z, ckpt::detail::kEocd64Sig);
    ckpt::detail::put64(z, 44);
    ckpt::detail::put16(z, 45);
    ckpt::detail::put16(z, 45);
    ckpt::detail::put32(z, 0);
    ckpt::detail::put32(z, 0);
    ckpt::detail::put64(z, entries);
    ckpt::detail::put64(z, entries);
    ckpt::detail::put64(z, size);
    ckpt::detail::put64(z, offset);
    ckpt::detail::put32(z, ckpt::detail::kLocator64Sig);
    ckpt::detail::put32(z, 0);
    ckpt::detail::put64(z, at);
    ckpt::detail::put32(z, 1);
    std::string out = sound;
    out.insert(eocd, z);
    return out;
  };
  struct Case {
    std::string bytes;
    std::string says;
  };
  const Case cases[] = {
      {with_zip64(3, cd_size, cd_offset, std::uint64_t{1} << 60), "zip64 locator points outside the file"},
      {with_zip64(3, cd_size, cd_offset, 0), "zip64 end record has a bad signature"},
      {with_zip64(3, std::uint64_t{1} << 62, cd_offset, eocd), "lies outside the file"},
      {with_zip64(std::uint64_t{1} << 40, cd_size, cd_offset, eocd),
       "directory claims 1099511627776 entries"},
  };
  // The control: honest zip64 records read.
  auto ok = put_file(dir, "ok.pt", with_zip64(3, cd_size, cd_offset, eocd));
  BOOST_CHECK_NO_THROW(ckpt::read_file(ok));
  for (const auto& c : cases) {
    BOOST_TEST_CONTEXT(c.says) {
      auto p = put_file(dir, "zip64.pt", c.bytes);
      BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {c.says}));
    }
  }
}

BOOST_AUTO_TEST_CASE(compressed_record_method_8) {
  // A real deflated archive, as a user's re-zipping tool would write it.
  TempDir dir;
  auto pkl = put_file(dir, "data.pkl", dict_pickle(TensorSpec{}));
  const auto p = dir / "deflated.pt";
  auto r = ckpt::test::run(ckpt::test::python() +
                           " -c \"import sys, zipfile\n"
                           "z = zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED)\n"
                           "z.writestr('archive/data.pkl', open(sys.argv[2], 'rb').read())\n"
                           "z.writestr('archive/data/0', bytes(8))\n"
                           "z.writestr('archive/version', b'3\\n')\n"
                           "z.close()\" " +
                           sh_quote(p.string()) + " " + sh_quote(pkl.string()));
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.output);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data.pkl is compressed (method 8)"}));
}

BOOST_AUTO_TEST_CASE(encrypted_record) {
  TempDir dir;
  auto bytes = archive(dict_pickle(TensorSpec{}), {{"0", floats(2)}});
  patch16(bytes, central_entry(bytes, "archive/data/0") + 8, 1);
  auto p = put_file(dir, "enc.pt", bytes);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data/0 is encrypted"}));
}

BOOST_AUTO_TEST_CASE(local_header_names_another_record) {
  TempDir dir;
  auto bytes = archive(dict_pickle(TensorSpec{}), {{"0", floats(2)}});
  // The first local header is data.pkl's: rename it there only.
  BOOST_REQUIRE_EQUAL(bytes.substr(30, 16), "archive/data.pkl");
  bytes[30 + 15] = 'X';
  auto p = put_file(dir, "names.pt", bytes);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data.pkl: local header names archive/data.pkX"}));
}

BOOST_AUTO_TEST_CASE(local_header_with_a_bad_signature) {
  TempDir dir;
  auto bytes = archive(dict_pickle(TensorSpec{}), {{"0", floats(2)}});
  const auto at = ckpt::detail::get32(reinterpret_cast<const unsigned char*>(bytes.data()) +
                                      central_entry(bytes, "archive/data/0") + 42);
  bytes[at + 2] = 'x';
  auto p = put_file(dir, "sig.pt", bytes);
  ckpt::FileReader reader(p);  // that record's header is read only when needed
  BOOST_CHECK_EXCEPTION(reader.load(), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data/0: bad local header signature"}));
}

BOOST_AUTO_TEST_CASE(local_header_extra_field_runs_into_the_directory) {
  TempDir dir;
  auto bytes = archive(dict_pickle(TensorSpec{}), {{"0", floats(2)}});
  patch16(bytes, 28, 0xffff);  // data.pkl's extra field length
  auto p = put_file(dir, "extra.pt", bytes);
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data.pkl", "runs into the directory"}));
}

BOOST_AUTO_TEST_CASE(record_without_an_archive_prefix) {
  TempDir dir;
  auto p = put_file(dir, "flat.pt", build_zip({{"data.pkl", Pkl().proto().none().done()}}));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"record 'data.pkl' has no archive prefix"}));
}

BOOST_AUTO_TEST_CASE(missing_data_pkl) {
  TempDir dir;
  auto p = put_file(dir, "nopkl.pt", build_zip({{"archive/data/0", floats(2)}, {"archive/version", "3\n"}}));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"the archive has no archive/data.pkl record"}));
}

BOOST_AUTO_TEST_SUITE_END()

// --- storages and views ---------------------------------------------------------

BOOST_AUTO_TEST_SUITE(storages)

BOOST_AUTO_TEST_CASE(missing_storage_record) {
  TempDir dir;
  auto p = put_file(dir, "x.pt", archive(dict_pickle(TensorSpec{}), {}));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data/0 (a tensor's storage) is missing"}));
}

BOOST_AUTO_TEST_CASE(storage_key_that_leaves_the_archive) {
  TempDir dir;
  for (std::string key : {"../../../../etc/passwd", "/etc/passwd", "..", "0/../../version", ""}) {
    BOOST_TEST_CONTEXT("key '" << key << "'") {
      TensorSpec t;
      t.key = key;
      // The archive even holds a record of that name, to tempt a reader.
      auto p = put_file(dir, "x.pt", archive(dict_pickle(t), {{key, floats(2)}}));
      BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                            says(p, {"storage key '" + key + "' is not a plain record name"}));
    }
  }
}

BOOST_AUTO_TEST_CASE(unknown_storage_type) {
  TempDir dir;
  for (std::string type : {"QUInt8Storage", "FooStorage", "UntypedStorage"}) {
    BOOST_TEST_CONTEXT(type) {
      TensorSpec t;
      t.storage_type = type;
      auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
      BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                            says(p, {"refusing global 'torch." + type + "'"}));
    }
  }
}

BOOST_AUTO_TEST_CASE(ragged_record) {
  TempDir dir;
  auto p = put_file(dir, "x.pt", tensor_file(TensorSpec{}, floats(2).substr(0, 7)));
  BOOST_CHECK_EXCEPTION(
      ckpt::read_file(p), ckpt::CorruptCheckpoint,
      says(p, {"record archive/data/0 has 7 bytes, not a whole number of 4-byte Float elements"}));
}

BOOST_AUTO_TEST_CASE(storage_numel_disagrees_with_record) {
  TempDir dir;
  TensorSpec t;
  t.numel = 3;
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"record archive/data/0 holds 2 elements but the pickle says 3"}));
}

BOOST_AUTO_TEST_CASE(huge_storage_numel_is_not_allocated) {
  TempDir dir;
  TensorSpec t;
  t.numel = std::int64_t{1} << 60;
  t.sizes = {t.numel};
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"holds 2 elements but the pickle says 1152921504606846976"}));
}

BOOST_AUTO_TEST_CASE(negative_storage_numel) {
  TempDir dir;
  TensorSpec t;
  t.numel = -2;
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"storage 0 has a negative size -2"}));
}

BOOST_AUTO_TEST_CASE(storage_described_twice_differently) {
  TempDir dir;
  TensorSpec a, b;
  b.storage_type = "IntStorage";
  Pkl pkl;
  pkl.proto().empty_dict().str("a");
  put_tensor(pkl, a);
  pkl.setitem().str("b");
  put_tensor(pkl, b);
  pkl.setitem();
  auto p = put_file(dir, "x.pt", archive(pkl.done(), {{"0", floats(2)}}));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"storage 0 is described twice, differently"}));
}

BOOST_AUTO_TEST_CASE(view_outside_its_storage) {
  TempDir dir;
  TensorSpec t;
  t.offset = 1;
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"tensor on storage 0", "reaches element 2 of a storage of 2"}));
}

BOOST_AUTO_TEST_CASE(strided_view_outside_its_storage) {
  TempDir dir;
  TensorSpec t;
  t.numel = 4;
  t.sizes = {2, 2};
  t.strides = {2, 2};  // reaches element 4
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(4)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"reaches element 4 of a storage of 4"}));
}

BOOST_AUTO_TEST_CASE(empty_view_past_its_storage) {
  TempDir dir;
  TensorSpec t;
  t.offset = 3;
  t.sizes = {0};
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"offset 3 is past its storage of 2 elements"}));
}

BOOST_AUTO_TEST_CASE(negative_storage_offset) {
  TempDir dir;
  TensorSpec t;
  t.offset = -1;
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"has a negative storage offset -1"}));
}

BOOST_AUTO_TEST_CASE(negative_size) {
  TempDir dir;
  TensorSpec t;
  t.sizes = {-2};
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"has a negative size -2"}));
}

BOOST_AUTO_TEST_CASE(negative_stride) {
  TempDir dir;
  TensorSpec t;
  t.offset = 1;
  t.strides = {-1};
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"has a negative stride -1"}));
}

BOOST_AUTO_TEST_CASE(sizes_overflow_int64) {
  TempDir dir;
  TensorSpec t;
  t.sizes = {std::int64_t{1} << 32, std::int64_t{1} << 32};
  t.strides = {0, 0};
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"its size overflows 64 bits"}));
}

BOOST_AUTO_TEST_CASE(strides_overflow_int64) {
  TempDir dir;
  struct Case {
    std::int64_t offset;
    std::vector<std::int64_t> sizes, strides;
  };
  const Case cases[] = {
      {0, {3}, {std::int64_t{1} << 62}},    // (3 - 1) * 2^62
      {INT64_MAX, {2}, {1}},                // offset + 1
      {0, {2, 2}, {INT64_MAX, INT64_MAX}},  // sum of reaches
      {0, {INT64_MAX, 1}, {INT64_MAX, 1}},  // (2^63 - 2) * (2^63 - 1)
  };
  for (const auto& c : cases) {
    BOOST_TEST_CONTEXT("offset " << c.offset << " stride " << c.strides[0]) {
      TensorSpec t;
      t.offset = c.offset;
      t.sizes = c.sizes;
      t.strides = c.strides;
      auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
      BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                            says(p, {"its strides overflow 64 bits"}));
    }
  }
}

BOOST_AUTO_TEST_CASE(sizes_and_strides_of_different_lengths) {
  TempDir dir;
  TensorSpec t;
  t.sizes = {1, 2};
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"has 2 sizes but 1 strides"}));
}

BOOST_AUTO_TEST_CASE(too_many_dimensions) {
  TempDir dir;
  TensorSpec t;
  t.sizes.assign(65, 1);
  t.strides.assign(65, 1);
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"has 65 dimensions"}));
}

BOOST_AUTO_TEST_CASE(unknown_tensor_location) {
  TempDir dir;
  TensorSpec t;
  t.location = "nowhere:7";
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  ckpt::FileReader reader(p);  // the location is resolved when the tensor is read
  BOOST_CHECK_EXCEPTION(reader.load(), ckpt::CorruptCheckpoint,
                        says(p, {"storage 0 has an unknown location 'nowhere:7'"}));
}

BOOST_AUTO_TEST_CASE(cuda_storage_without_cuda) {
  if (at::hasCUDA()) {
    BOOST_TEST_MESSAGE("this build has CUDA: nothing to refuse");
    return;
  }
  TempDir dir;
  TensorSpec t;
  t.location = "cuda:0";
  auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
  ckpt::FileReader reader(p);
  BOOST_CHECK_EXCEPTION(reader.load(), ckpt::Mismatch,
                        says(p, {"storage 0 is stored on 'cuda:0', which this build cannot allocate on"}));
}

BOOST_AUTO_TEST_CASE(storage_on_a_device_this_build_lacks) {
  // Valid device names whose backends are not built in: FileReader::tensor
  // throws "Mismatch when the location cannot be mapped to a device here".
  TempDir dir;
  for (std::string location : {"xla:0", "mps", "hip:0", "vulkan"}) {
    BOOST_TEST_CONTEXT(location) {
      TensorSpec t;
      t.location = location;
      auto p = put_file(dir, "x.pt", tensor_file(t, floats(2)));
      ckpt::FileReader reader(p);
      try {
        BOOST_CHECK_EXCEPTION(reader.load(), ckpt::Mismatch, says(p, {location}));
      } catch (const std::exception& e) {
        BOOST_ERROR("not a ckpt::Mismatch but " << boost::core::demangle(typeid(e).name()) << ": "
                                                << std::string(e.what()).substr(0, 160));
      }
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

// --- hostile pickles --------------------------------------------------------------

BOOST_AUTO_TEST_SUITE(pickle)

BOOST_AUTO_TEST_CASE(nesting_200000_deep_lists_by_append) {
  TempDir dir;
  Pkl pkl;
  pkl.proto();
  for (int i = 0; i < kDeep; ++i) pkl.empty_list();
  for (int i = 1; i < kDeep; ++i) pkl.append();
  auto p = put_file(dir, "x.pt", archive(pkl.done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"containers nest deeper than 1000 levels"}));
}

BOOST_AUTO_TEST_CASE(nesting_200000_deep_lists_by_mark_appends) {
  TempDir dir;
  Pkl pkl;
  pkl.proto();
  for (int i = 1; i < kDeep; ++i) pkl.empty_list().mark();
  pkl.empty_list();
  for (int i = 1; i < kDeep; ++i) pkl.appends();
  auto p = put_file(dir, "x.pt", archive(pkl.done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"deeper than 1000"}));
}

BOOST_AUTO_TEST_CASE(nesting_200000_deep_dicts) {
  TempDir dir;
  Pkl pkl;
  pkl.proto();
  for (int i = 1; i < kDeep; ++i) pkl.empty_dict().str("k");
  pkl.empty_dict();
  for (int i = 1; i < kDeep; ++i) pkl.setitem();
  auto p = put_file(dir, "x.pt", archive(pkl.done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"deeper than 1000"}));
}

BOOST_AUTO_TEST_CASE(nesting_200000_deep_tuples_by_tuple1) {
  TempDir dir;
  Pkl pkl;
  pkl.proto().none();
  for (int i = 0; i < kDeep; ++i) pkl.tuple1();
  auto p = put_file(dir, "x.pt", archive(pkl.done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"deeper than 1000"}));
}

BOOST_AUTO_TEST_CASE(nesting_200000_deep_tuples_by_mark_tuple) {
  TempDir dir;
  Pkl pkl;
  pkl.proto();
  for (int i = 0; i < kDeep; ++i) pkl.mark();
  for (int i = 0; i < kDeep; ++i) pkl.tuple();
  auto p = put_file(dir, "x.pt", archive(pkl.done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"deeper than 1000"}));
}

BOOST_AUTO_TEST_CASE(list_that_contains_itself) {
  TempDir dir;
  auto pkl = Pkl().proto().empty_list().put(0).get(0).append().done();
  auto p = put_file(dir, "x.pt", archive(pkl));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"the object contains itself (a reference cycle)"}));
}

BOOST_AUTO_TEST_CASE(dict_cycle_through_a_list) {
  TempDir dir;
  // d = {}; d['l'] = [d]
  auto pkl = Pkl().proto().empty_dict().put(0).str("l").empty_list().get(0).append().setitem().done();
  auto p = put_file(dir, "x.pt", archive(pkl));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"reference cycle"}));
}

BOOST_AUTO_TEST_CASE(shared_references_that_expand_exponentially) {
  // l0 = []; l(k) = [l(k-1), l(k-1)]: 64 levels of memo references, a 2^64-node
  // tree when each reference is expanded. It must load sharing its lists (as
  // Python does) or be refused, never expanded.
  TempDir dir;
  Pkl pkl;
  pkl.proto().empty_list().put(0).pop();
  constexpr std::uint32_t kLevels = 64;
  for (std::uint32_t k = 1; k <= kLevels; ++k)
    pkl.empty_list().mark().get(k - 1).get(k - 1).appends().put(k).pop();
  pkl.get(kLevels);
  auto p = put_file(dir, "x.pt", archive(pkl.done()));
  // Refused on open, before any walk of the tree could expand it.
  BOOST_CHECK_EXCEPTION(ckpt::FileReader{p}, ckpt::CorruptCheckpoint, says(p, {"expand to over"}));
  const std::string outcome = ckpt::test::run_in_bounded_child([&] { (void)ckpt::read_file(p); });
  BOOST_TEST_MESSAGE("loading it: " << outcome);
  BOOST_TEST(outcome.rfind("CorruptCheckpoint: ", 0) == 0, "loading 2^64 shared references: " << outcome);
}

BOOST_AUTO_TEST_CASE(shared_references_stay_shared_after_loading) {
  // The control for the case above: x = [1]; {'a': x, 'b': x} loads with one
  // list seen under both keys, as Python's pickle gives it.
  TempDir dir;
  auto pkl = Pkl()
                 .proto()
                 .empty_dict()
                 .str("a")
                 .empty_list()
                 .put(0)
                 .integer(1)
                 .append()
                 .setitem()
                 .str("b")
                 .get(0)
                 .setitem()
                 .done();
  auto p = put_file(dir, "x.pt", archive(pkl));
  auto d = ckpt::read_file(p).toGenericDict();
  BOOST_CHECK(d.at("a").is(d.at("b")));
  BOOST_CHECK_EQUAL(d.at("b").toList().get(0).toInt(), 1);
}

BOOST_AUTO_TEST_CASE(dangling_memo_reference) {
  TempDir dir;
  auto pkl = Pkl().proto().empty_list().put(0).pop().get(7).done();
  auto p = put_file(dir, "x.pt", archive(pkl));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"memo reference 7 was never stored (dangling)"}));
}

BOOST_AUTO_TEST_CASE(pickle_without_stop) {
  TempDir dir;
  auto pkl = Pkl().proto().empty_dict().str("a").integer(1).setitem().bytes();
  auto p = put_file(dir, "x.pt", archive(pkl));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"truncated, or no STOP opcode"}));
}

BOOST_AUTO_TEST_CASE(empty_pickle) {
  TempDir dir;
  auto p = put_file(dir, "x.pt", archive(""));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"needs 1 bytes at offset 0 but only 0 remain"}));
}

BOOST_AUTO_TEST_CASE(string_claims_more_bytes_than_the_file_has) {
  TempDir dir;
  struct Case {
    std::string pkl;
    std::string says;
  };
  std::string binunicode8 = Pkl().proto(4).byte(0x8d).bytes();
  ckpt::detail::put64(binunicode8, std::uint64_t{1} << 63);
  std::string binunicode = Pkl().proto().byte('X').bytes();
  ckpt::detail::put32(binunicode, 0xfffffff0u);
  const Case cases[] = {
      {binunicode + "abc.", "a string claims 4294967280 bytes at offset 7 but only 4 remain"},
      {binunicode8 + "abc.", "a string claims 9223372036854775808 bytes"},
      {Pkl().proto(4).byte(0x8c).byte(200).raw("abc.").bytes(), "a string claims 200 bytes"},
  };
  for (const auto& c : cases) {
    BOOST_TEST_CONTEXT(c.says) {
      auto p = put_file(dir, "x.pt", archive(c.pkl));
      BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {c.says}));
    }
  }
}

BOOST_AUTO_TEST_CASE(integer_wider_than_64_bits) {
  TempDir dir;
  std::string pkl = Pkl().proto().byte(0x8b).bytes();  // LONG4
  ckpt::detail::put32(pkl, 9);
  pkl += std::string(9, '\x7f') + ".";
  auto p = put_file(dir, "x.pt", archive(pkl));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"an integer of 9 bytes does not fit 64 bits"}));
}

BOOST_AUTO_TEST_CASE(unknown_pickle_protocol) {
  TempDir dir;
  auto p = put_file(dir, "x.pt", archive(Pkl().proto(9).none().done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"pickle protocol 9 is unknown"}));
}

BOOST_AUTO_TEST_CASE(opcode_torch_save_never_writes) {
  TempDir dir;
  // STRING ('S'): the text protocol's quoted string.
  auto p = put_file(dir, "x.pt", archive(Pkl().proto().raw("S'abc'\n").done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"opcode 0x53 at offset 2 is not one torch.save writes"}));
}

BOOST_AUTO_TEST_CASE(stack_underflow) {
  TempDir dir;
  auto p = put_file(dir, "x.pt", archive(Pkl().proto().append().done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"pops from an empty stack"}));
}

BOOST_AUTO_TEST_CASE(stop_with_two_values_on_the_stack) {
  TempDir dir;
  auto p = put_file(dir, "x.pt", archive(Pkl().proto().none().none().done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"pickle ends with 2 values on its stack, not 1"}));
}

BOOST_AUTO_TEST_CASE(stop_with_an_open_mark) {
  TempDir dir;
  auto p = put_file(dir, "x.pt", archive(Pkl().proto().none().mark().done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint, says(p, {"ends with an open MARK"}));
}

BOOST_AUTO_TEST_CASE(persistent_id_that_is_not_a_storage_tuple) {
  TempDir dir;
  auto p = put_file(dir, "x.pt", archive(Pkl().proto().str("0").binpersid().done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"a persistent id is not a 5-tuple"}));
}

BOOST_AUTO_TEST_CASE(reduce_of_something_not_a_global) {
  TempDir dir;
  auto p = put_file(dir, "x.pt", archive(Pkl().proto().empty_dict().empty_tuple().reduce().done()));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"REDUCE calls something that is not an allowed global"}));
}

BOOST_AUTO_TEST_CASE(reduce_calling_a_storage_class) {
  TempDir dir;
  auto pkl = Pkl().proto().global("torch", "FloatStorage").integer(1 << 30).tuple1().reduce().done();
  auto p = put_file(dir, "x.pt", archive(pkl));
  BOOST_CHECK_EXCEPTION(ckpt::read_file(p), ckpt::CorruptCheckpoint,
                        says(p, {"REDUCE calls a storage class"}));
}

BOOST_AUTO_TEST_SUITE_END()
