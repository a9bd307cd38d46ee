// The `ckpt` command-line tool: inspect lists what was saved (text and JSON),
// verify passes a sound file and names the damaged record of a bad one.
#include <ckpt/format.hpp>

#define BOOST_TEST_MODULE cli_test
#include <boost/test/unit_test.hpp>

#include "support/test_support.hpp"

#include <boost/json.hpp>

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
