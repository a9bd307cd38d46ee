// DCP through Hugging Face safetensors (HuggingFaceStorageWriter / Reader):
// upstream's file names and index, whole tensors and per-rank shards with
// DCP_SHARDING_INFO, consolidation, resharding on load, and the directories
// that must be refused (torn, incomplete, overlapping or holed chunks, bad
// sharding info). The multi-rank cases run tests/support/dcp_worker.cpp's
// hf_save on 3 ranks and hf_load on 1 and 2 through ckpt-launch (real c10d
// groups). safetensors_interop_test loads the same files in Python.
#include <ckpt/dcp/hf_storage.hpp>

#define BOOST_TEST_MODULE hf_storage_test
#include <boost/test/unit_test.hpp>

#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/error.hpp>
#include <ckpt/safetensors.hpp>

#include "support/dcp_cases.hpp"
#include "support/rank_runs.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <boost/json.hpp>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace dcp = ckpt::dcp;
using ckpt::test::identical;
using ckpt::test::TempDir;
using ckpt::test::dcp_cases::load_alone;
using ckpt::test::dcp_cases::save_alone;

namespace {

fs::path bin_dir() {
  return fs::path(CKPT_CLI).parent_path();
}

std::set<std::string> files_in(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

boost::json::object read_json(const fs::path& file) {
  std::ifstream in(file);
  std::stringstream text;
  text << in.rdbuf();
  return boost::json::parse(text.str()).as_object();
}

/// The model the single-process cases save: nested, three dtypes.
ckpt::StateDict model_state(bool zero) {
  const auto v = [&](at::Tensor t) { return zero ? at::zeros_like(t) : t; };
  ckpt::StateDict inner;
  inner.insert("embed", v(at::arange(24, at::kFloat).reshape({6, 4}) / 4));
  inner.insert("norm", v(at::arange(4, at::kFloat).to(at::kBFloat16) - 1));
  ckpt::StateDict sd;
  sd.insert("model", inner);
  sd.insert("head", v(at::arange(6, at::kDouble).reshape({3, 2}) * -0.5));
  return sd;
}

const std::map<std::string, int> kTwoFiles{{"model.embed", 1}, {"model.norm", 2}, {"head", 2}};

bool same_model(const ckpt::StateDict& got) {
  const auto want = model_state(false);
  const auto g = got.at("model").toGenericDict();
  const auto w = want.at("model").toGenericDict();
  return identical(g.at("embed").toTensor(), w.at("embed").toTensor()) &&
         identical(g.at("norm").toTensor(), w.at("norm").toTensor()) &&
         identical(got.at("head").toTensor(), want.at("head").toTensor());
}

/// The failure types of a CheckpointException `fn` raises ("" when none).
std::string failure_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const ckpt::CheckpointException& e) {
    std::string out;
    for (const auto& [rank, f] : e.failures()) out += fmt::format("{}:{}:{}", rank, f.type, f.message);
    return out;
  }
  return "";
}

/// read_metadata's CorruptCheckpoint message for `dir` ("" when it reads).
std::string refused(const fs::path& dir) {
  try {
    dcp::HuggingFaceStorageReader(dir).read_metadata();
  } catch (const ckpt::CorruptCheckpoint& e) {
    return e.what();
  }
  return "";
}

using Run = ckpt::test::RankRun;

Run launch(int ranks, const std::string& scenario, const fs::path& dir) {
  Run run =
      ckpt::test::run_bounded({(bin_dir() / "ckpt-launch").string(), "-n", std::to_string(ranks), "--timeout",
                               "120", (bin_dir() / "dcp_worker").string(), scenario, dir.string()},
                              std::chrono::seconds(180));
  BOOST_TEST_MESSAGE(scenario << " on " << ranks << " ranks exited " << run.status << ":\n" << run.output);
  return run;
}

void check_as_expected(const Run& run, int ranks) {
  BOOST_REQUIRE_MESSAGE(!run.hung, "did not finish:\n" << run.output);
  BOOST_CHECK_MESSAGE(run.status == 0, "exited " << run.status << ":\n" << run.output);
  BOOST_CHECK_MESSAGE(run.unexpected.empty(),
                      "unexpected: " << fmt::format("{}", fmt::join(run.unexpected, "; ")));
  BOOST_CHECK_EQUAL(run.results.size(), static_cast<std::size_t>(ranks));
  BOOST_CHECK(run.left_behind.empty());
}

}  // namespace

BOOST_AUTO_TEST_CASE(whole_tensors_go_into_upstream_files_with_the_index) {
  TempDir dir;
  dcp::HuggingFaceStorageWriter writer(dir / "hf", {.fqn_to_index_mapping = kTwoFiles});
  dcp::save(model_state(false), save_alone(std::nullopt, &writer));
  BOOST_CHECK((files_in(dir / "hf") == std::set<std::string>{"model-00001-of-00002.safetensors",
                                                             "model-00002-of-00002.safetensors",
                                                             "model.safetensors.index.json"}));
  const auto index = read_json(dir / "hf" / "model.safetensors.index.json");
  const auto& map = index.at("weight_map").as_object();
  BOOST_CHECK_EQUAL(map.at("model.embed").as_string(), "model-00001-of-00002.safetensors");
  BOOST_CHECK_EQUAL(map.at("model.norm").as_string(), "model-00002-of-00002.safetensors");
  BOOST_CHECK_EQUAL(map.at("head").as_string(), "model-00002-of-00002.safetensors");
  BOOST_CHECK_EQUAL(index.at("metadata").at("total_size").to_number<std::int64_t>(), 96 + 8 + 48);
  BOOST_CHECK_EQUAL(ckpt::safetensors::metadata(dir / "hf" / "model-00001-of-00002.safetensors").at("format"),
                    "pt");

  // What safetensors itself reads, what dcp::load reads (finding the format
  // on its own), and a partial load that reads no other tensor's bytes.
  const auto flat = ckpt::safetensors::load(dir / "hf");
  BOOST_CHECK(identical(flat.at("model.embed").toTensor(),
                        model_state(false).at("model").toGenericDict().at("embed").toTensor()));
  const auto target = model_state(true);
  dcp::load(target, load_alone(dir / "hf"));
  BOOST_CHECK(same_model(target));

  dcp::HuggingFaceStorageReader headers_only(dir / "hf");
  headers_only.read_metadata();
  dcp::HuggingFaceStorageReader reader(dir / "hf");
  dcp::DcpStateDict head{{"head", at::zeros({3, 2}, at::kDouble)}};
  dcp::DefaultLoadPlanner partial(true);
  dcp::load_state_dict(head, reader, &partial, nullptr, 0, true);
  BOOST_CHECK(identical(std::get<at::Tensor>(head[0].second), model_state(false).at("head").toTensor()));
  BOOST_CHECK_EQUAL(reader.bytes_read() - headers_only.bytes_read(), 48u);
}

BOOST_AUTO_TEST_CASE(what_safetensors_cannot_hold_is_refused_before_anything_is_written) {
  TempDir dir;
  auto sd = model_state(false);
  sd.insert("step", 7);
  dcp::HuggingFaceStorageWriter writer(dir / "a");
  const auto step = failure_of([&] { dcp::save(sd, save_alone(std::nullopt, &writer)); });
  BOOST_CHECK_MESSAGE(
      step.find("0:Unsupported:") == 0 && step.find("'step' is not a tensor") != std::string::npos, step);
  BOOST_CHECK(!fs::exists(dir / "a") || fs::is_empty(dir / "a"));

  dcp::HuggingFaceStorageWriter unmapped(dir / "b",
                                         {.fqn_to_index_mapping = {{"model.embed", 1}, {"model.norm", 1}}});
  const auto missing =
      failure_of([&] { dcp::save(model_state(false), save_alone(std::nullopt, &unmapped)); });
  BOOST_CHECK_MESSAGE(missing.find("names no file for 'head'") != std::string::npos, missing);
  BOOST_CHECK(!fs::exists(dir / "b") || fs::is_empty(dir / "b"));

  BOOST_CHECK_THROW(dcp::HuggingFaceStorageWriter(dir / "c", {.fqn_to_index_mapping = {{"x", 0}}}),
                    ckpt::Error);
  BOOST_CHECK_THROW(dcp::HuggingFaceStorageWriter(dir / "c", {.enable_consolidation = true}), ckpt::Error);
}

BOOST_AUTO_TEST_CASE(a_save_over_a_larger_one_leaves_only_its_own_files) {
  TempDir dir;
  {
    dcp::HuggingFaceStorageWriter three(
        dir / "hf", {.fqn_to_index_mapping = {{"model.embed", 1}, {"model.norm", 2}, {"head", 3}}});
    dcp::save(model_state(false), save_alone(std::nullopt, &three));
  }
  BOOST_CHECK_EQUAL(files_in(dir / "hf").size(), 4u);
  dcp::HuggingFaceStorageWriter one(dir / "hf");
  dcp::save(model_state(false), save_alone(std::nullopt, &one));
  BOOST_CHECK((files_in(dir / "hf") ==
               std::set<std::string>{"model-00001-of-00001.safetensors", "model.safetensors.index.json"}));
  const auto target = model_state(true);
  dcp::load(target, load_alone(dir / "hf"));
  BOOST_CHECK(same_model(target));
}

BOOST_AUTO_TEST_CASE(plain_safetensors_files_reshard_on_load) {
  // A file as Python or transformers write it (whole tensors, no sharding
  // info) loads into a tensor sharded two ways.
  TempDir dir;
  fs::create_directories(dir / "plain");
  const at::Tensor w = at::arange(40, at::kFloat).reshape({10, 4});
  ckpt::StateDict sd;
  sd.insert("w", w);
  ckpt::safetensors::save(dir / "plain" / "model.safetensors", sd);
  for (const std::int64_t d : {0, 1}) {
    dcp::ChunkShardingSpec spec;
    spec.dim = d;
    spec.placements = {"rank:0/cpu", "rank:0/cpu", "rank:0/cpu"};
    dcp::DcpStateDict target{{"w", dcp::ShardedTensor::zeros(spec, {10, 4}, 0)}};
    dcp::HuggingFaceStorageReader reader(dir / "plain");
    dcp::load_state_dict(target, reader, nullptr, nullptr, 0, true);
    for (const auto& s : std::get<dcp::ShardedTensor>(target[0].second).local_shards())
      BOOST_CHECK(
          identical(s.tensor, ckpt::test::dcp_cases::slice_of(w, s.metadata.offsets, s.metadata.sizes)));
  }
}

BOOST_AUTO_TEST_CASE(torn_incomplete_and_inconsistent_directories_are_refused) {
  TempDir dir;
  const auto sharded_save = [&](const fs::path& to) {
    dcp::HuggingFaceStorageWriter w(to, {.fqn_to_index_mapping = kTwoFiles, .save_distributed = true});
    dcp::save(model_state(false), save_alone(std::nullopt, &w));
  };
  sharded_save(dir / "a");
  sharded_save(dir / "b");
  const std::string second = "shard-00001-model-00002-of-00002.safetensors";
  BOOST_CHECK(
      (files_in(dir / "a") == std::set<std::string>{"shard-00001-model-00001-of-00002.safetensors", second}));
  const auto info = ckpt::safetensors::metadata(dir / "a" / second);
  BOOST_CHECK_EQUAL(info.at("DCP_VERSION"), "1.0");
  BOOST_CHECK(boost::json::parse(info.at("DCP_SHARDING_INFO")).at("head").at("saved_offsets") ==
              boost::json::parse("[0,0]"));
  BOOST_CHECK_EQUAL(refused(dir / "a"), "");

  // A file of another save copied in: torn. One missing: incomplete.
  fs::copy_file(dir / "b" / second, dir / "a" / second, fs::copy_options::overwrite_existing);
  BOOST_CHECK_MESSAGE(refused(dir / "a").find("torn") != std::string::npos, refused(dir / "a"));
  fs::remove(dir / "a" / second);
  BOOST_CHECK_MESSAGE(refused(dir / "a").find("incomplete") != std::string::npos, refused(dir / "a"));
  const auto target = model_state(true);
  BOOST_CHECK_THROW(dcp::load(target, load_alone(dir / "a")), ckpt::CheckpointException);

  // Hand-made shards: what the sharding info says must hold together.
  const auto shard = [&](const fs::path& d, const std::string& name, const at::Tensor& t,
                         const std::string& info) {
    fs::create_directories(d);
    ckpt::StateDict sd;
    sd.insert("w", t);
    ckpt::safetensors::save(d / name, sd, {.metadata = {{"DCP_SHARDING_INFO", info}}});
  };
  const at::Tensor part = at::ones({4, 2});
  const auto offsets = [](int r, int c) {
    return fmt::format(R"({{"w":{{"saved_offsets":[{},{}]}}}})", r, c);
  };
  shard(dir / "overlap", "1.safetensors", part, offsets(0, 0));
  shard(dir / "overlap", "2.safetensors", part, offsets(2, 0));
  BOOST_CHECK_MESSAGE(refused(dir / "overlap").find("overlap") != std::string::npos,
                      "[" << refused(dir / "overlap") << "]");
  shard(dir / "hole", "1.safetensors", part, offsets(0, 0));
  shard(dir / "hole", "2.safetensors", part, offsets(6, 0));
  BOOST_CHECK_MESSAGE(refused(dir / "hole") != "", "a hole in the rows was not refused");
  shard(dir / "not_json", "1.safetensors", part, "[1");
  BOOST_CHECK_MESSAGE(refused(dir / "not_json").find("not a JSON object") != std::string::npos,
                      refused(dir / "not_json"));
  shard(dir / "unnamed", "1.safetensors", part, R"({"v":{"saved_offsets":[0,0]}})");
  BOOST_CHECK_MESSAGE(refused(dir / "unnamed").find("no saved_offsets for 'w'") != std::string::npos,
                      refused(dir / "unnamed"));
  shard(dir / "rank", "1.safetensors", part, R"({"w":{"saved_offsets":[0]}})");
  BOOST_CHECK_MESSAGE(refused(dir / "rank").find("2 dims") != std::string::npos, refused(dir / "rank"));
  shard(dir / "negative", "1.safetensors", part, offsets(-4, 0));
  BOOST_CHECK_MESSAGE(refused(dir / "negative").find("out of range") != std::string::npos,
                      refused(dir / "negative"));
  shard(dir / "dtype", "1.safetensors", part, offsets(0, 0));
  shard(dir / "dtype", "2.safetensors", part.to(at::kDouble), offsets(4, 0));
  BOOST_CHECK_MESSAGE(refused(dir / "dtype").find("disagree") != std::string::npos, refused(dir / "dtype"));
  shard(dir / "twice", "1.safetensors", part, offsets(0, 0));
  shard(dir / "twice", "2.safetensors", part, offsets(0, 0));
  BOOST_CHECK_MESSAGE(refused(dir / "twice").find("two files hold") != std::string::npos,
                      refused(dir / "twice"));
  BOOST_CHECK_THROW(dcp::HuggingFaceStorageReader(dir / "empty_dir").read_metadata(), ckpt::NotFound);
}

BOOST_AUTO_TEST_CASE(three_ranks_save_shards_and_consolidate_then_one_and_two_ranks_load) {
  TempDir dir;
  const Run saved = launch(3, "hf_save", dir.path());
  check_as_expected(saved, 3);
  for (int rank = 0; rank < 3; ++rank) {
    BOOST_CHECK_EQUAL(saved.at(rank, "hf_save/consolidated"), "ok");
    BOOST_CHECK_EQUAL(saved.at(rank, "hf_save/sharded"), "ok");
  }
  BOOST_CHECK((files_in(dir / "hf") == std::set<std::string>{"model-00001-of-00002.safetensors",
                                                             "model-00002-of-00002.safetensors",
                                                             "model.safetensors.index.json", "sharded"}));
  BOOST_CHECK_EQUAL(files_in(dir / "hf" / "sharded").size(), 6u);
  BOOST_CHECK_EQUAL(files_in(dir / "hf_sharded").size(), 3u);
  // Rank 1 holds rows 7 to 13 of "rows" (20 rows over 3 ranks).
  const auto info = boost::json::parse(
      ckpt::safetensors::metadata(dir / "hf" / "sharded" / "shard-00002-model-00001-of-00002.safetensors")
          .at("DCP_SHARDING_INFO"));
  BOOST_CHECK(info.at("rows").at("saved_offsets") == boost::json::parse("[7,0]"));
  // The consolidated files hold the whole tensors, as safetensors reads them.
  const auto whole = ckpt::safetensors::load(dir / "hf");
  for (const auto& [k, v] : ckpt::test::dcp_cases::reshard_globals())
    BOOST_CHECK_MESSAGE(identical(whole.at(k).toTensor(), v), k);

  for (const int ranks : {1, 2}) {
    BOOST_TEST_CONTEXT(ranks << " ranks") {
      const Run loaded = launch(ranks, "hf_load", dir.path());
      check_as_expected(loaded, ranks);
      for (int rank = 0; rank < ranks; ++rank)
        for (const std::string form : {"hf", "hf/sharded", "hf_sharded"})
          for (const char* dim : {"dim0", "dim1"})
            BOOST_CHECK_EQUAL(loaded.at(rank, fmt::format("{}/{}/values", form, dim)), "as-saved");
    }
  }
}
