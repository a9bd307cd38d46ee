// The `ckpt` command-line tool: inspect lists what was saved (text and JSON),
// verify passes a sound file and names the damaged record of a bad one; both
// for ckpt's own files and for Hugging Face safetensors files and shards.
#include <ckpt/format.hpp>
#include <ckpt/safetensors.hpp>

#define BOOST_TEST_MODULE cli_test
#include <boost/test/unit_test.hpp>

#include "support/test_support.hpp"

#include <boost/json.hpp>

#include <algorithm>
#include <fstream>

namespace fs = std::filesystem;
namespace json = boost::json;
using ckpt::test::flip_byte;
using ckpt::test::run;
using ckpt::test::sh_quote;
using ckpt::test::TempDir;

namespace {

const std::string cli = CKPT_CLI;

/// A checkpoint directory with one rank's file, like a Checkpointer writes.
fs::path make_checkpoint(const TempDir& dir) {
  auto model = c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get());
  model.insert("weight", at::ones({5, 10}));
  model.insert("bias", at::zeros({5}, at::kDouble));
  auto sd = c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get());
  sd.insert("model", model);
  sd.insert("epoch", int64_t{5});
  sd.insert("name", std::string("run-1"));
  const auto ckpt_dir = dir / "step_100";
  fs::create_directories(ckpt_dir);
  ckpt::write_file(ckpt_dir / "checkpoint_0.pt", sd);
  return ckpt_dir;
}

/// Three tensors, 272 bytes: model.weight F32 [5, 10] (200), model.bias F64
/// [5] (40), lm_head.weight BF16 [4, 4] (32).
ckpt::StateDict safetensors_state() {
  ckpt::StateDict sd;
  sd.insert("model.weight", at::ones({5, 10}));
  sd.insert("model.bias", at::zeros({5}, at::kDouble));
  sd.insert("lm_head.weight", at::ones({4, 4}, at::kBFloat16));
  return sd;
}

/// `dir/model.safetensors`, one file, with {"format": "pt"}.
fs::path make_safetensors(const TempDir& dir) {
  const auto file = dir / "model.safetensors";
  ckpt::safetensors::save(file, safetensors_state(), {.metadata = {{"format", "pt"}}});
  return file;
}

/// A sharded checkpoint in `dir`: the index and two shards, model.weight in
/// the first, model.bias and lm_head.weight in the second.
fs::path make_sharded_safetensors(const TempDir& dir) {
  ckpt::safetensors::save(dir / "model.safetensors", safetensors_state(),
                          {.metadata = {{"format", "pt"}}, .max_shard_bytes = 200});
  const auto index = dir / "model.safetensors.index.json";
  BOOST_REQUIRE(fs::exists(index));
  BOOST_REQUIRE(fs::exists(dir / "model-00001-of-00002.safetensors"));
  BOOST_REQUIRE(fs::exists(dir / "model-00002-of-00002.safetensors"));
  return index;
}

/// A safetensors file written byte by byte: the header's length, `header`, `data`.
void write_raw_safetensors(const fs::path& file, const std::string& header, const std::string& data) {
  std::string bytes(8, '\0');
  for (std::size_t i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  std::ofstream(file, std::ios::binary) << bytes << header << data;
}

/// Overwrites the 8-byte header length at the start of `file` with `n`.
void set_header_length(const fs::path& file, std::uint64_t n) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  for (int i = 0; i < 8; ++i) f.put(static_cast<char>((n >> (8 * i)) & 0xff));
  BOOST_REQUIRE(f);
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::size_t lines_starting(const std::string& text, const std::string& prefix) {
  std::size_t n = 0;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) n += line.starts_with(prefix) ? 1 : 0;
  return n;
}

/// The bytes `command` (a ckpt run) read with read(2) and its kin, libraries
/// and all: the kernel's rchar of the shell that ran it, which counts its
/// children once it has reaped them.
std::uint64_t bytes_read_by(const std::string& command) {
  auto r = run(command + " >/dev/null 2>&1; grep '^rchar:' /proc/$$/io");
  BOOST_REQUIRE_MESSAGE(r.output.starts_with("rchar: "), r.output);
  return std::stoull(r.output.substr(7));
}

}  // namespace

BOOST_AUTO_TEST_CASE(inspect_lists_keys_dtypes_shapes_and_records) {
  TempDir dir;
  const auto ckpt_dir = make_checkpoint(dir);
  for (const auto& target : {ckpt_dir, ckpt_dir / "checkpoint_0.pt"}) {
    auto r = run(cli + " inspect " + sh_quote(target.string()));
    BOOST_TEST_MESSAGE(r.output);
    BOOST_CHECK_EQUAL(r.status, 0);
    for (const char* expected : {"model.weight", "[5, 10]", "Float", "200 bytes", "model.bias", "Double",
                                 "epoch", "5", "name", "run-1", "archive/data/0"})
      BOOST_CHECK_MESSAGE(r.output.find(expected) != std::string::npos, "inspect output lacks " << expected);
  }
}

BOOST_AUTO_TEST_CASE(inspect_json_parses_and_describes_every_key) {
  TempDir dir;
  const auto ckpt_dir = make_checkpoint(dir);
  auto r = run(cli + " inspect " + sh_quote(ckpt_dir.string()) + " --json 2>/dev/null");
  BOOST_REQUIRE_EQUAL(r.status, 0);
  json::value v = json::parse(r.output);
  const auto& files = v.as_array();
  BOOST_REQUIRE_EQUAL(files.size(), 1u);
  std::map<std::string, json::object> by_key;
  for (const auto& k : files[0].at("keys").as_array())
    by_key[json::value_to<std::string>(k.at("key"))] = k.as_object();
  BOOST_REQUIRE(by_key.count("model.weight"));
  const auto& w = by_key["model.weight"];
  BOOST_CHECK_EQUAL(json::value_to<std::string>(w.at("dtype")), "Float");
  BOOST_CHECK_EQUAL(w.at("shape").as_array().size(), 2u);
  BOOST_CHECK_EQUAL(w.at("shape").as_array()[0].as_int64(), 5);
  BOOST_CHECK_EQUAL(w.at("bytes").as_int64(), 200);
  BOOST_CHECK_EQUAL(by_key["epoch"].at("value").as_int64(), 5);
  BOOST_CHECK_EQUAL(json::value_to<std::string>(by_key["name"].at("value")), "run-1");
  for (const auto& rec : files[0].at("records").as_array()) BOOST_CHECK(rec.as_object().contains("crc32"));
}

BOOST_AUTO_TEST_CASE(verify_passes_a_sound_checkpoint) {
  TempDir dir;
  const auto ckpt_dir = make_checkpoint(dir);
  auto r = run(cli + " verify " + sh_quote(ckpt_dir.string()));
  BOOST_TEST_MESSAGE(r.output);
  BOOST_CHECK_EQUAL(r.status, 0);
  BOOST_CHECK(r.output.find("ok") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(verify_fails_on_one_flipped_byte_naming_the_record) {
  TempDir dir;
  const auto ckpt_dir = make_checkpoint(dir);
  const auto file = ckpt_dir / "checkpoint_0.pt";
  std::uint64_t at = 0;
  {
    ckpt::FileReader reader(file);
    reader.verify();
    for (const auto& rec : reader.records())
      if (rec.name == "archive/data/0") at = rec.data_offset + 17;
  }
  BOOST_REQUIRE(at > 0);
  flip_byte(file, at);
  for (const auto& target : {ckpt_dir, file}) {
    auto r = run(cli + " verify " + sh_quote(target.string()));
    BOOST_TEST_MESSAGE(r.output);
    BOOST_CHECK_NE(r.status, 0);
    BOOST_CHECK(r.output.find("archive/data/0") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(verify_and_inspect_fail_clearly_on_bad_paths) {
  TempDir dir;
  auto missing = run(cli + " verify " + sh_quote((dir / "nothing").string()));
  BOOST_CHECK_NE(missing.status, 0);
  BOOST_CHECK(missing.output.find("nothing") != std::string::npos);
  auto empty_dir = run(cli + " inspect " + sh_quote(dir.path().string()));
  BOOST_CHECK_NE(empty_dir.status, 0);
  BOOST_CHECK(empty_dir.output.find("checkpoint_") != std::string::npos);
  auto usage = run(cli + " frobnicate x");
  BOOST_CHECK_EQUAL(usage.status, 2);
  BOOST_CHECK(usage.output.find("usage") != std::string::npos);
}

// --- Hugging Face safetensors ---------------------------------------------------

BOOST_AUTO_TEST_CASE(inspect_lists_a_safetensors_file_its_metadata_and_totals) {
  TempDir dir;
  const auto file = make_safetensors(dir);
  // The file, its directory, and the same bytes under a name that says nothing.
  fs::copy_file(file, dir / "weights.bin");
  for (const auto& target : {file, dir.path(), dir / "weights.bin"}) {
    auto r = run(cli + " inspect " + sh_quote(target.string()));
    BOOST_TEST_MESSAGE(r.output);
    BOOST_CHECK_EQUAL(r.status, 0);
    for (const char* expected :
         {"(safetensors, 1 file, 3 tensors)", "__metadata__[\"format\"] = \"pt\"", "model.weight", "F32",
          "[5, 10] 200 bytes", "model.bias", "F64", "[5] 40 bytes", "lm_head.weight", "BF16",
          "[4, 4] 32 bytes", "total: 3 tensors, 272 bytes"})
      BOOST_CHECK_MESSAGE(contains(r.output, expected), "inspect output lacks " << expected);
    // One line per tensor, each with where its bytes start in the file.
    ckpt::safetensors::Reader reader(file);
    for (const auto& name : reader.names()) {
      BOOST_CHECK_EQUAL(lines_starting(r.output, "  " + name + " "), 1u);
      BOOST_CHECK_MESSAGE(
          contains(r.output, "bytes  @ " + std::to_string(reader.entry(name).file_offset) + "\n"),
          "inspect output lacks the offset of " << name);
    }
  }
}

BOOST_AUTO_TEST_CASE(inspect_json_describes_every_safetensors_tensor) {
  TempDir dir;
  const auto file = make_safetensors(dir);
  ckpt::safetensors::Reader reader(file);
  const auto& weight = reader.entry("model.weight");
  auto r = run(cli + " inspect " + sh_quote(file.string()) + " --json 2>/dev/null");
  BOOST_REQUIRE_EQUAL(r.status, 0);
  const json::object v = json::parse(r.output).as_object();
  BOOST_CHECK_EQUAL(json::value_to<std::string>(v.at("safetensors")), file.string());
  BOOST_CHECK_EQUAL(v.at("sharded").as_bool(), false);
  BOOST_CHECK_EQUAL(json::value_to<std::string>(v.at("metadata").at("format")), "pt");
  BOOST_CHECK_EQUAL(v.at("tensors").as_int64(), 3);
  BOOST_CHECK_EQUAL(v.at("bytes").as_int64(), 272);
  std::map<std::string, json::object> by_key;
  for (const auto& k : v.at("keys").as_array())
    by_key[json::value_to<std::string>(k.at("key"))] = k.as_object();
  BOOST_REQUIRE_EQUAL(by_key.size(), 3u);
  const auto& w = by_key["model.weight"];
  BOOST_CHECK_EQUAL(json::value_to<std::string>(w.at("dtype")), "Float");
  BOOST_CHECK_EQUAL(json::value_to<std::string>(w.at("safetensors_dtype")), "F32");
  BOOST_CHECK_EQUAL(w.at("shape").as_array().size(), 2u);
  BOOST_CHECK_EQUAL(w.at("shape").as_array()[1].as_int64(), 10);
  BOOST_CHECK_EQUAL(w.at("bytes").as_int64(), 200);
  BOOST_CHECK_EQUAL(w.at("offset").as_int64(), static_cast<std::int64_t>(weight.file_offset));
  BOOST_CHECK_EQUAL(w.at("data_offsets").as_array()[0].as_int64(), static_cast<std::int64_t>(weight.begin));
  BOOST_CHECK_EQUAL(json::value_to<std::string>(by_key["lm_head.weight"].at("dtype")), "BFloat16");
}

BOOST_AUTO_TEST_CASE(inspect_and_verify_a_sharded_safetensors_checkpoint) {
  TempDir dir;
  const auto index = make_sharded_safetensors(dir);
  // The index, its directory, and the path save() was given (which is not there).
  for (const auto& target : {index, dir.path(), dir / "model.safetensors"}) {
    auto r = run(cli + " inspect " + sh_quote(target.string()));
    BOOST_TEST_MESSAGE(r.output);
    BOOST_CHECK_EQUAL(r.status, 0);
    for (const char* expected : {"model.safetensors.index.json (safetensors, 2 shards, 3 tensors)",
                                 "metadata[\"total_size\"] = \"272\"", "metadata[\"format\"] = \"pt\"",
                                 "total: 3 tensors, 272 bytes in 2 shards"})
      BOOST_CHECK_MESSAGE(contains(r.output, expected), "inspect output lacks " << expected);
    // Each tensor's line names its shard.
    std::istringstream lines(r.output);
    std::map<std::string, std::string> shard_of;
    for (std::string line; std::getline(lines, line);)
      for (const char* name : {"model.weight", "model.bias", "lm_head.weight"})
        if (line.starts_with(std::string("  ") + name + " ")) shard_of[name] = line;
    BOOST_REQUIRE_EQUAL(shard_of.size(), 3u);
    BOOST_CHECK(contains(shard_of["model.weight"], "[5, 10] 200 bytes  model-00001-of-00002.safetensors @ "));
    BOOST_CHECK(contains(shard_of["model.bias"], "[5] 40 bytes  model-00002-of-00002.safetensors @ "));
    BOOST_CHECK(contains(shard_of["lm_head.weight"], "model-00002-of-00002.safetensors @ "));

    auto v = run(cli + " verify " + sh_quote(target.string()) + " --require-commit");
    BOOST_TEST_MESSAGE(v.output);
    BOOST_CHECK_EQUAL(v.status, 0);
    BOOST_CHECK_EQUAL(lines_starting(v.output, "ok  "), 3u);
    BOOST_CHECK(contains(v.output, "model-00001-of-00002.safetensors (1 tensor, 200 bytes)"));
    BOOST_CHECK(contains(v.output, "model-00002-of-00002.safetensors (2 tensors, 72 bytes)"));
    BOOST_CHECK(contains(v.output, "(safetensors, 2 shards, 3 tensors, 272 bytes of data read)"));
  }
  auto j = run(cli + " inspect " + sh_quote(index.string()) + " --json 2>/dev/null");
  BOOST_REQUIRE_EQUAL(j.status, 0);
  const json::object v = json::parse(j.output).as_object();
  BOOST_CHECK_EQUAL(v.at("sharded").as_bool(), true);
  BOOST_CHECK_EQUAL(v.at("files").as_array().size(), 2u);
  for (const auto& k : v.at("keys").as_array())
    if (k.at("key") == "model.bias")
      BOOST_CHECK_EQUAL(json::value_to<std::string>(k.at("file")),
                        (dir / "model-00002-of-00002.safetensors").string());
}

BOOST_AUTO_TEST_CASE(inspect_reads_only_safetensors_headers_and_verify_every_byte) {
  TempDir dir;
  constexpr std::uint64_t kData = std::uint64_t{32} << 20;
  ckpt::StateDict sd;
  sd.insert("big", at::ones({static_cast<std::int64_t>(kData / 4)}));
  const auto file = dir / "big.safetensors";
  ckpt::safetensors::save(file, sd);
  const auto inspected = bytes_read_by(cli + " inspect " + sh_quote(file.string()));
  const auto verified = bytes_read_by(cli + " verify " + sh_quote(file.string()));
  BOOST_TEST_MESSAGE("inspect read " << inspected << " bytes, verify " << verified);
  BOOST_CHECK_LT(inspected, kData / 4);  // the header, and the program's own libraries
  BOOST_CHECK_GE(verified, kData);
}

BOOST_AUTO_TEST_CASE(verify_reads_every_tensor_of_a_safetensors_file) {
  TempDir dir;
  const auto file = make_safetensors(dir);
  for (const auto& target : {file, dir.path()}) {
    auto r = run(cli + " verify " + sh_quote(target.string()) + " --require-commit");
    BOOST_TEST_MESSAGE(r.output);
    BOOST_CHECK_EQUAL(r.status, 0);
    BOOST_CHECK(
        contains(r.output, "ok  " + file.string() + " (safetensors, 3 tensors, 272 bytes of data read)"));
  }
}

BOOST_AUTO_TEST_CASE(verify_and_inspect_refuse_a_truncated_safetensors_file_in_one_line) {
  TempDir dir;
  const auto file = make_safetensors(dir);
  fs::resize_file(file, fs::file_size(file) - 4);
  auto v = run(cli + " verify " + sh_quote(file.string()));
  BOOST_TEST_MESSAGE(v.output);
  BOOST_CHECK_EQUAL(v.status, 1);
  BOOST_CHECK_EQUAL(std::count(v.output.begin(), v.output.end(), '\n'), 1);
  BOOST_CHECK(v.output.starts_with("BAD " + file.string() + ": "));
  BOOST_CHECK(contains(v.output, "runs past the end of the file"));
  BOOST_CHECK(contains(v.output, "truncated"));
  auto i = run(cli + " inspect " + sh_quote(file.string()));
  BOOST_CHECK_EQUAL(i.status, 1);
  BOOST_CHECK_EQUAL(std::count(i.output.begin(), i.output.end(), '\n'), 1);
  BOOST_CHECK(i.output.starts_with("ckpt: " + file.string() + ": "));
  BOOST_CHECK(contains(i.output, "truncated"));
}

BOOST_AUTO_TEST_CASE(verify_and_inspect_refuse_a_safetensors_header_length_past_the_end) {
  TempDir dir;
  const auto file = make_safetensors(dir);
  set_header_length(file, fs::file_size(file));  // 8 more than there are
  for (const char* command : {" verify ", " inspect "}) {
    auto r = run(cli + command + sh_quote(file.string()));
    BOOST_TEST_MESSAGE(r.output);
    BOOST_CHECK_EQUAL(r.status, 1);
    BOOST_CHECK_EQUAL(std::count(r.output.begin(), r.output.end(), '\n'), 1);
    BOOST_CHECK(contains(r.output, file.string() + ": the header length " +
                                       std::to_string(fs::file_size(file)) +
                                       " runs past the end of the file"));
  }
  // A length past the format's bound is refused before anything is allocated.
  set_header_length(file, std::uint64_t{1} << 62);
  auto r = run(cli + " verify " + sh_quote(file.string()));
  BOOST_TEST_MESSAGE(r.output);
  BOOST_CHECK_EQUAL(r.status, 1);
  BOOST_CHECK(contains(r.output, "BAD " + file.string() + ": the header length"));
}

BOOST_AUTO_TEST_CASE(verify_names_a_missing_shard_once) {
  TempDir dir;
  const auto index = make_sharded_safetensors(dir);
  const auto lost = dir / "model-00002-of-00002.safetensors";  // model.bias and lm_head.weight
  fs::remove(lost);
  auto v = run(cli + " verify " + sh_quote(index.string()));
  BOOST_TEST_MESSAGE(v.output);
  BOOST_CHECK_EQUAL(v.status, 1);
  BOOST_CHECK_EQUAL(lines_starting(v.output, "BAD "), 1u);
  BOOST_CHECK_EQUAL(lines_starting(v.output, "ok "), 0u);
  BOOST_CHECK(contains(v.output, index.string()));
  BOOST_CHECK(contains(v.output, lost.string()));
  BOOST_CHECK(contains(v.output, "incomplete"));
  auto i = run(cli + " inspect " + sh_quote(index.string()));
  BOOST_CHECK_EQUAL(i.status, 1);
  BOOST_CHECK(contains(i.output, lost.string()));
}

BOOST_AUTO_TEST_CASE(verify_passes_a_safetensors_dtype_this_libtorch_lacks) {
  // F8_E4M3 (torch 2.1+): listed, its bytes read, not a fault of the file.
  TempDir dir;
  const auto file = dir / "fp8.safetensors";
  write_raw_safetensors(file,
                        R"({"scale":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                        R"("w":{"dtype":"F8_E4M3","shape":[2,3],"data_offsets":[4,10]}})",
                        std::string(10, '\x01'));
  auto i = run(cli + " inspect " + sh_quote(file.string()));
  BOOST_TEST_MESSAGE(i.output);
  BOOST_CHECK_EQUAL(i.status, 0);
  BOOST_CHECK(contains(i.output, "F8_E4M3"));
  BOOST_CHECK(contains(i.output, "[2, 3] 6 bytes"));
  auto j = run(cli + " inspect " + sh_quote(file.string()) + " --json 2>/dev/null");
  BOOST_REQUIRE_EQUAL(j.status, 0);
  const json::value listing = json::parse(j.output);
  for (const auto& k : listing.at("keys").as_array())
    if (k.at("key") == "w") BOOST_CHECK(k.at("dtype").is_null());
  auto v = run(cli + " verify " + sh_quote(file.string()));
  BOOST_TEST_MESSAGE(v.output);
  BOOST_CHECK_EQUAL(v.status, 0);
  BOOST_CHECK(contains(v.output, "2 tensors, 10 bytes of data read; 1 of a dtype this libtorch lacks"));
}
