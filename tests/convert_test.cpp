// ckpt convert (ckpt::dcp::convert and the CLI): torch.save files, DCP
// directories and safetensors into one another.
//   - torch.save (written by Python's torch) → DCP → safetensors → torch.save is
//     bit for bit the file it started from, checked by Python's torch.load and
//     here; nested state with values keeps its values and paths through DCP;
//   - sharded DCP checkpoints and DCP's Hugging Face directories convert to
//     whole tensors, whatever the read batch;
//   - what a destination cannot hold is refused before it is touched, and a
//     damaged source leaves an earlier destination as it was;
//   - peak memory stays flat in the checkpoint's size (measured on the CLI's
//     process: the same largest tensor, 48 times the bytes).
#include <ckpt/dcp/convert.hpp>

#define BOOST_TEST_MODULE convert_test
#include <boost/test/unit_test.hpp>

#include <ckpt/dcp/hf_storage.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/error.hpp>
#include <ckpt/format.hpp>
#include <ckpt/safetensors.hpp>

#include "support/dcp_cases.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace dcp = ckpt::dcp;
using ckpt::test::describe;
using ckpt::test::python_script;
using ckpt::test::run;
using ckpt::test::same_bits;
using ckpt::test::sh_quote;
using ckpt::test::TempDir;
using ckpt::test::dcp_cases::load_alone;
using ckpt::test::dcp_cases::save_alone;

namespace {

const std::string cli = CKPT_CLI;

ckpt::test::RunResult ckpt_convert(const std::string& args) {
  return run(sh_quote(cli) + " convert " + args);
}

std::string q(const fs::path& p) {
  return sh_quote(p.string());
}

/// The files convert_files.py writes with Python's torch, made once.
struct PythonFiles {
  TempDir dir;
  ckpt::test::RunResult made = python_script("convert_files.py", {"write", dir.path().string()});
};

const TempDir& python_files() {
  static PythonFiles files;
  BOOST_REQUIRE_MESSAGE(files.made.status == 0, describe(files.made));
  return files.dir;
}

std::string bytes_of(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

/// Every tensor leaf of `a` (flat, name → tensor) is in `b`, bit for bit.
void check_flat_same(const ckpt::StateDict& a, const ckpt::StateDict& b) {
  BOOST_CHECK_EQUAL(a.size(), b.size());
  for (const auto& e : a.dict()) {
    const std::string name = e.key().toStringRef();
    BOOST_TEST_CONTEXT("tensor " << name) {
      BOOST_REQUIRE(b.contains(name));
      BOOST_CHECK(same_bits(e.value().toTensor(), b.at(name).toTensor()));
    }
  }
}

/// The peak resident memory (MiB) `ckpt convert ARGS` reports for itself.
long peak_mib(const std::string& args) {
  const auto r = ckpt_convert(args);
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.output);
  const std::string mark = "peak resident memory ";
  const auto at = r.output.find(mark);
  BOOST_REQUIRE_MESSAGE(at != std::string::npos, r.output);
  return std::stol(r.output.substr(at + mark.size()));
}

}  // namespace

BOOST_AUTO_TEST_CASE(torch_to_dcp_to_safetensors_to_torch_is_bit_identical) {
  const auto& py = python_files();
  TempDir dir;
  const auto via_dcp = dir / "dcp", st = dir / "model.safetensors", back = dir / "back.pt";
  for (const auto& [from, to] : {std::pair{py / "flat.pt", via_dcp}, {via_dcp, st}, {st, back}}) {
    const auto r = ckpt_convert(q(from) + " " + q(to));
    BOOST_REQUIRE_MESSAGE(r.status == 0, r.output);
    BOOST_CHECK_MESSAGE(r.output.find("14 tensors") != std::string::npos, r.output);
  }
  BOOST_CHECK(fs::exists(via_dcp / ".metadata"));
  // Python's torch.load says so, and so does ckpt's reader.
  const auto check = python_script("convert_files.py", {"check", (py / "flat.pt").string(), back.string()});
  BOOST_CHECK_MESSAGE(check.status == 0, describe(check));
  check_flat_same(ckpt::StateDict::from_ivalue(ckpt::read_file(py / "flat.pt")),
                  ckpt::StateDict::from_ivalue(ckpt::read_file(back)));
  // Each step on its own too: the DCP checkpoint and the safetensors file hold
  // the same tensors.
  check_flat_same(ckpt::safetensors::load(st), dcp::load_all(via_dcp, load_alone()));
}

BOOST_AUTO_TEST_CASE(nested_state_keeps_its_values_and_paths_through_dcp) {
  const auto& py = python_files();
  TempDir dir;
  dcp::torch_save_to_dcp(py / "nested.pt", dir / "dcp");
  dcp::dcp_to_torch_save(dir / "dcp", dir / "back.pt");
  // Dict keys come back as text, as upstream's DCP keeps them (optim.state."0").
  const auto check = python_script(
      "convert_files.py", {"check", (py / "nested.pt").string(), (dir / "back.pt").string(), "--str-keys"});
  BOOST_CHECK_MESSAGE(check.status == 0, describe(check));
  // torch.save to torch.save keeps even the int keys.
  const auto r = ckpt_convert(q(py / "nested.pt") + " " + q(dir / "same.pt"));
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.output);
  BOOST_CHECK_MESSAGE(
      r.output.find("6 tensors") != std::string::npos && r.output.find("8 values") != std::string::npos,
      r.output);
  const auto same =
      python_script("convert_files.py", {"check", (py / "nested.pt").string(), (dir / "same.pt").string()});
  BOOST_CHECK_MESSAGE(same.status == 0, describe(same));
  // The older dialects convert too, and read back the same.
  for (const char* dialect : {"2.0", "1.13"}) {
    BOOST_TEST_CONTEXT("dialect " << dialect) {
      const auto d = dir / fmt::format("dcp-{}", dialect);
      const auto to = ckpt_convert(q(py / "nested.pt") + " " + q(d) + " --dialect " + dialect);
      BOOST_REQUIRE_MESSAGE(to.status == 0, to.output);
      const auto pt = dir / fmt::format("back-{}.pt", dialect);
      const auto from = ckpt_convert(q(d) + " " + q(pt));
      BOOST_REQUIRE_MESSAGE(from.status == 0, from.output);
      // torch 1.13's DCP has no planner data: keys stay flat there.
      if (std::string(dialect) == "2.0") {
        const auto c = python_script("convert_files.py",
                                     {"check", (py / "nested.pt").string(), pt.string(), "--str-keys"});
        BOOST_CHECK_MESSAGE(c.status == 0, describe(c));
      } else {
        const auto flat = ckpt::StateDict::from_ivalue(ckpt::read_file(pt));
        BOOST_CHECK(flat.contains("optim.state.0.exp_avg"));
        BOOST_CHECK_EQUAL(flat.at("epoch").toInt(), 3);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(torch_to_torch_keeps_storages_shared) {
  TempDir dir;
  const at::Tensor base = at::arange(24, at::kFloat).reshape({4, 6});
  ckpt::StateDict sd;
  sd.insert("rows", base.narrow(0, 1, 2));
  sd.insert("t", base.t());
  sd.insert("other", at::ones({3}, at::kDouble));
  ckpt::write_file(dir / "src.pt", sd.to_ivalue());
  const auto r = dcp::convert(dir / "src.pt", dir / "out.pt");
  BOOST_CHECK_EQUAL(r.tensors, 3u);
  BOOST_CHECK_EQUAL(r.tensor_bytes, 24u * 4 + 3 * 8);  // two storages, the shared one once
  const auto out = ckpt::StateDict::from_ivalue(ckpt::read_file(dir / "out.pt"));
  const at::Tensor rows = out.at("rows").toTensor(), t = out.at("t").toTensor();
  BOOST_CHECK(same_bits(rows, base.narrow(0, 1, 2)));
  BOOST_CHECK(same_bits(t, base.t()));
  BOOST_CHECK(rows.storage().is_alias_of(t.storage()));
  BOOST_CHECK_EQUAL(rows.storage_offset(), 6);
}

BOOST_AUTO_TEST_CASE(a_sharded_dcp_checkpoint_converts_to_whole_tensors_in_any_batch) {
  TempDir dir;
  const at::Tensor global = at::arange(60, at::kFloat).reshape({10, 6});
  // Two row shards and a column-sharded one, all local to this one rank.
  dcp::ChunkShardingSpec rows{0, {"rank:0/cpu", "rank:0/cpu"}};
  dcp::ChunkShardingSpec cols{1, {"rank:0/cpu", "rank:0/cpu", "rank:0/cpu"}};
  const auto make = [&](const dcp::ChunkShardingSpec& spec) {
    auto st = dcp::ShardedTensor::create(
        spec, {10, 6}, {at::kFloat, false}, 0,
        [](const std::vector<std::int64_t>& s, c10::Device) { return at::zeros(s, at::kFloat); });
    for (auto& s : st.local_shards())
      s.tensor.copy_(global.narrow(0, s.metadata.offsets[0], s.metadata.sizes[0])
                         .narrow(1, s.metadata.offsets[1], s.metadata.sizes[1]));
    return st;
  };
  ckpt::StateDict sd;
  sd.insert("by_rows", dcp::sharded_value(make(rows)));
  sd.insert("by_cols", dcp::sharded_value(make(cols)));
  sd.insert("plain", at::full({3}, 7, at::kInt));
  dcp::save(sd, save_alone(dir / "dcp"));

  for (const std::uint64_t batch : {std::uint64_t{1}, std::uint64_t{64} << 20}) {
    BOOST_TEST_CONTEXT("read batch " << batch) {
      dcp::ConvertOptions options;
      options.read_batch_bytes = batch;
      std::vector<dcp::ConvertProgress> seen;
      options.progress = [&](const dcp::ConvertProgress& p) { seen.push_back(p); };
      const auto st = dir / fmt::format("whole-{}.safetensors", batch);
      const auto r = dcp::convert(dir / "dcp", st, options);
      BOOST_CHECK(r.from == dcp::CheckpointFormat::dcp && r.to == dcp::CheckpointFormat::safetensors);
      BOOST_CHECK_EQUAL(r.tensors, 3u);
      BOOST_CHECK_EQUAL(r.tensor_bytes, 2u * 60 * 4 + 12);
      BOOST_CHECK_EQUAL(r.largest_tensor_bytes, 240u);
      const auto loaded = ckpt::safetensors::load(st);
      BOOST_CHECK(same_bits(loaded.at("by_rows").toTensor(), global));
      BOOST_CHECK(same_bits(loaded.at("by_cols").toTensor(), global));
      BOOST_CHECK(same_bits(loaded.at("plain").toTensor(), at::full({3}, 7, at::kInt)));
      BOOST_REQUIRE_EQUAL(seen.size(), 3u);
      BOOST_CHECK_EQUAL(seen.back().tensors_done, 3u);
      BOOST_CHECK_EQUAL(seen.back().tensors, 3u);
      BOOST_CHECK_EQUAL(seen.back().bytes_done, seen.back().bytes);
      BOOST_CHECK_EQUAL(ckpt::safetensors::metadata(st).at("format"), "pt");
    }
  }
}

BOOST_AUTO_TEST_CASE(a_hugging_face_dcp_directory_converts_like_any_dcp_checkpoint) {
  TempDir dir;
  ckpt::StateDict sd;
  sd.insert("w", at::arange(12, at::kDouble).reshape({3, 4}));
  sd.insert("b", at::arange(5, at::kShort));
  dcp::HuggingFaceStorageWriter writer(dir / "hf", {.save_distributed = true});
  dcp::save(sd, save_alone(std::nullopt, &writer));
  BOOST_CHECK(dcp::detect_format(dir / "hf") == dcp::CheckpointFormat::safetensors);
  const auto r = ckpt_convert(q(dir / "hf") + " " + q(dir / "out.pt"));
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.output);
  check_flat_same(sd, ckpt::StateDict::from_ivalue(ckpt::read_file(dir / "out.pt")));
}

BOOST_AUTO_TEST_CASE(a_safetensors_destination_shards_and_says_what_it_cannot_hold) {
  const auto& py = python_files();
  TempDir dir;
  // Values: refused by name before anything is written, unless asked.
  const auto refused = ckpt_convert(q(py / "nested.pt") + " " + q(dir / "x.safetensors"));
  BOOST_CHECK_EQUAL(refused.status, 1);
  BOOST_CHECK_MESSAGE(refused.output.find("safetensors holds only tensors") != std::string::npos &&
                          refused.output.find("--skip-values") != std::string::npos,
                      refused.output);
  BOOST_CHECK(fs::is_empty(dir.path()));
  const auto skipped = ckpt_convert(q(py / "nested.pt") + " " + q(dir / "x.safetensors") + " --skip-values");
  BOOST_REQUIRE_MESSAGE(skipped.status == 0, skipped.output);
  BOOST_CHECK_MESSAGE(skipped.output.find("(8 left out)") != std::string::npos, skipped.output);
  const auto x = ckpt::safetensors::load(dir / "x.safetensors");
  BOOST_CHECK(x.contains("optim.state.0.exp_avg"));
  BOOST_CHECK_EQUAL(x.size(), 6u);
  // int, float, bool and str as text in __metadata__; a list is still refused.
  const auto lists =
      ckpt_convert(q(py / "nested.pt") + " " + q(dir / "y.safetensors") + " --values-as-metadata");
  BOOST_CHECK_EQUAL(lists.status, 1);
  BOOST_CHECK_MESSAGE(lists.output.find("optim.param_groups.0.betas") != std::string::npos, lists.output);
  ckpt::StateDict scalars;
  scalars.insert("w", at::ones({2, 2}));
  scalars.insert("epoch", 3);
  scalars.insert("name", "run");
  ckpt::write_file(dir / "scalars.pt", scalars.to_ivalue());
  const auto meta =
      ckpt_convert(q(dir / "scalars.pt") + " " + q(dir / "s.safetensors") + " --values-as-metadata");
  BOOST_REQUIRE_MESSAGE(meta.status == 0, meta.output);
  const auto md = ckpt::safetensors::metadata(dir / "s.safetensors");
  BOOST_CHECK_EQUAL(md.at("epoch"), "3");
  BOOST_CHECK_EQUAL(md.at("name"), "run");
  // An index destination: shards of at most --max-shard-bytes and the index.
  const auto sharded =
      ckpt_convert(q(py / "flat.pt") + " " + q(dir / "m.safetensors.index.json") + " --max-shard-bytes 600");
  BOOST_REQUIRE_MESSAGE(sharded.status == 0, sharded.output);
  BOOST_CHECK(fs::exists(dir / "m.safetensors.index.json"));
  BOOST_CHECK(fs::exists(dir / "m-00001-of-00003.safetensors"));
  check_flat_same(ckpt::StateDict::from_ivalue(ckpt::read_file(py / "flat.pt")),
                  ckpt::safetensors::load(dir / "m.safetensors.index.json"));
}

BOOST_AUTO_TEST_CASE(bad_input_gets_a_clear_error_and_leaves_the_destination_as_it_was) {
  TempDir dir;
  ckpt::StateDict sd;
  sd.insert("w", at::arange(4096, at::kFloat));
  ckpt::write_file(dir / "src.pt", sd.to_ivalue());
  BOOST_REQUIRE_EQUAL(ckpt_convert(q(dir / "src.pt") + " " + q(dir / "out.safetensors")).status, 0);
  BOOST_REQUIRE_EQUAL(ckpt_convert(q(dir / "src.pt") + " " + q(dir / "out")).status, 0);
  const std::string before = bytes_of(dir / "out.safetensors");
  const std::string metadata_before = bytes_of(dir / "out" / ".metadata");

  // A flipped byte in the tensor's record: its CRC-32 fails, nothing replaced.
  ckpt::FileReader reader(dir / "src.pt");
  const auto record = reader.storage_record(*reader.root().find("w")->tensor);
  ckpt::test::flip_byte(dir / "src.pt", record.data_offset + 100);
  for (const char* to : {"out.safetensors", "out"}) {
    BOOST_TEST_CONTEXT("into " << to) {
      const auto r = ckpt_convert(q(dir / "src.pt") + " " + q(dir / to));
      BOOST_CHECK_EQUAL(r.status, 1);
      BOOST_CHECK_MESSAGE(r.output.find("CRC-32") != std::string::npos, r.output);
    }
  }
  BOOST_CHECK(bytes_of(dir / "out.safetensors") == before);
  BOOST_CHECK(bytes_of(dir / "out" / ".metadata") == metadata_before);
  BOOST_CHECK(same_bits(dcp::load_all(dir / "out", load_alone()).at("w").toTensor(), sd.at("w").toTensor()));
  std::size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir / "out")) files += e.path().filename() != ".metadata";
  BOOST_CHECK_EQUAL(files, 1u);  // the committed data file, no temporary

  // The library's refusals.
  BOOST_CHECK_THROW(dcp::convert(dir / "missing.pt", dir / "x.pt"), ckpt::NotFound);
  BOOST_CHECK_THROW(dcp::convert(dir / "out.safetensors", dir / "out.safetensors"), ckpt::Error);
  BOOST_CHECK_THROW(dcp::convert(dir / "out", dir / "out.safetensors", {.to = dcp::CheckpointFormat::dcp}),
                    ckpt::Error);
  BOOST_CHECK_THROW(dcp::convert(dir / "out", dir / "y.pt", {.max_shard_bytes = 10}), ckpt::Error);
  fs::create_directories(dir / "empty");
  BOOST_CHECK_THROW(dcp::convert(dir / "empty", dir / "z.pt"), ckpt::NotFound);
  // The CLI's.
  for (const auto& [args, says] : std::vector<std::pair<std::string, std::string>>{
           {q(dir / "out") + " " + q(dir / "a.pt") + " --dialect 2.4", "--dialect is for a DCP destination"},
           {q(dir / "out") + " " + q(dir / "a.pt") + " --to json", "--to takes torch, dcp or safetensors"},
           {q(dir / "out") + " " + q(dir / "a") + " --dialect 3", "--dialect takes 2.4, 2.0 or 1.13"},
           {q(dir / "out") + " " + q(dir / "a.safetensors") + " --max-shard-bytes x", "takes a number"},
           {q(dir / "out") + " " + q(dir / "a.pt") + " --rank 0", "--rank"},
           {q(dir / "nothing") + " " + q(dir / "a.pt"), "does not exist"}}) {
    BOOST_TEST_CONTEXT(args) {
      const auto r = ckpt_convert(args);
      BOOST_CHECK_EQUAL(r.status, 1);
      BOOST_CHECK_MESSAGE(r.output.find(says) != std::string::npos, r.output);
    }
  }
  BOOST_CHECK_EQUAL(ckpt_convert(q(dir / "out")).status, 2);  // usage
}

BOOST_AUTO_TEST_CASE(a_directory_of_rank_files_converts_whole_or_one_rank) {
  TempDir dir;
  fs::create_directories(dir / "step");
  for (int r = 0; r < 2; ++r) {
    ckpt::StateDict sd;
    sd.insert("w", at::full({2, 3}, r, at::kFloat));
    ckpt::write_file(dir / "step" / fmt::format("checkpoint_{}.pt", r), sd.to_ivalue());
  }
  const auto both = ckpt_convert(q(dir / "step") + " " + q(dir / "both.safetensors"));
  BOOST_REQUIRE_MESSAGE(both.status == 0, both.output);
  const auto loaded = ckpt::safetensors::load(dir / "both.safetensors");
  BOOST_CHECK(same_bits(loaded.at("0.w").toTensor(), at::zeros({2, 3})));
  BOOST_CHECK(same_bits(loaded.at("1.w").toTensor(), at::ones({2, 3})));
  const auto one = ckpt_convert(q(dir / "step") + " " + q(dir / "one.safetensors") + " --rank 1");
  BOOST_REQUIRE_MESSAGE(one.status == 0, one.output);
  BOOST_CHECK(
      same_bits(ckpt::safetensors::load(dir / "one.safetensors").at("w").toTensor(), at::ones({2, 3})));
}

BOOST_AUTO_TEST_CASE(peak_memory_stays_flat_in_the_checkpoints_size) {
  // The same largest tensor (16 MiB); one checkpoint holds 1 of them, the
  // other 48 (768 MiB). Holding the state would cost the second 752 MiB more.
  TempDir dir;
  constexpr std::int64_t kElems = std::int64_t{4} << 20;
  for (const int n : {1, 48}) {
    ckpt::StateDict sd;
    for (int i = 0; i < n; ++i) sd.insert(fmt::format("t{:02}", i), at::full({kElems}, i, at::kFloat));
    ckpt::write_file(dir / fmt::format("n{}.pt", n), sd.to_ivalue(), {.direct_io = true, .fsync = false});
  }
  struct Step {
    std::string from_prefix, from_suffix, to_prefix, to_suffix;
  };
  for (const Step& s : {Step{"n", ".pt", "dcp", ""}, Step{"dcp", "", "st", ".safetensors"},
                        Step{"st", ".safetensors", "back", ".pt"}}) {
    long mib[2] = {0, 0};
    int k = 0;
    for (const int n : {1, 48})
      mib[k++] = peak_mib(q(dir / fmt::format("{}{}{}", s.from_prefix, n, s.from_suffix)) + " " +
                          q(dir / fmt::format("{}{}{}", s.to_prefix, n, s.to_suffix)) + " --no-fsync");
    BOOST_TEST_MESSAGE(fmt::format("{} -> {}: peak resident memory {} MiB for 16 MiB, {} MiB for 768 MiB",
                                   s.from_prefix, s.to_prefix, mib[0], mib[1]));
    // Holding the state would cost 752 MiB more; a read batch is 64 MiB.
    BOOST_CHECK_MESSAGE(mib[1] - mib[0] < 256, fmt::format("{} -> {}: {} MiB more for 47 more tensors",
                                                           s.from_prefix, s.to_prefix, mib[1] - mib[0]));
  }
  // And the bytes made it.
  const auto back = ckpt::StateDict::from_ivalue(ckpt::read_file(dir / "back48.pt"));
  BOOST_CHECK_EQUAL(back.size(), 48u);
  BOOST_CHECK(same_bits(back.at("t47").toTensor(), at::full({kElems}, 47, at::kFloat)));

  // 48 views of 16 MiB into one flat 768 MiB storage (as a flat parameter
  // buffer saves): each view is read alone, not the whole storage per view.
  {
    const at::Tensor flat = at::arange(48 * kElems, at::kFloat);
    ckpt::StateDict sd;
    for (int i = 0; i < 48; ++i) sd.insert(fmt::format("t{:02}", i), flat.narrow(0, i * kElems, kElems));
    ckpt::write_file(dir / "flat48.pt", sd.to_ivalue(), {.direct_io = true, .fsync = false});
  }
  const long one = peak_mib(q(dir / "n1.pt") + " " + q(dir / "one.safetensors") + " --no-fsync");
  const long views = peak_mib(q(dir / "flat48.pt") + " " + q(dir / "views.safetensors") + " --no-fsync");
  BOOST_TEST_MESSAGE(
      fmt::format("views -> st: peak resident memory {} MiB, {} MiB for one tensor", views, one));
  BOOST_CHECK_MESSAGE(views - one < 256,
                      fmt::format("views of one storage: {} MiB more than one tensor", views - one));
  const auto st = ckpt::safetensors::load(dir / "views.safetensors");
  BOOST_CHECK(same_bits(st.at("t47").toTensor(), at::arange(47 * kElems, 48 * kElems, at::kFloat)));
}
