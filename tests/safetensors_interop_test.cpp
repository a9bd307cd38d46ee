// Hugging Face safetensors against Python's own safetensors package (torch 2.6
// and python3-safetensors in the trixie chroot that cmake/install-deps.sh
// makes; Debian bookworm's Python has no safetensors):
//   - files written by safetensors.torch.save_file (every dtype the two share,
//     bf16 and bool among them) and save_model (a module with tied weights),
//     and a sharded checkpoint with the index transformers writes, load here
//     exactly: whole, partially, in place and mapped;
//   - files ckpt writes (single, sharded with an index, with metadata) load
//     exactly with safetensors.torch.load_file;
//   - a DCP save through HuggingFaceStorageWriter on 3 ranks (consolidated)
//     loads exactly with safetensors, and back here on 1 and 2 ranks;
//   - what `ckpt convert` writes from torch 2.6's files (a DCP directory, a
//     safetensors file, a torch.save file) loads exactly with upstream's
//     dcp_to_torch_save, safetensors and torch.load(weights_only=True), and
//     a DCP directory upstream's torch_save_to_dcp wrote converts exactly.
// tests/interop/safetensors_files.py is the Python side; every comparison is
// bit for bit against a torch.save of the same tensors. Root only (the
// chroot); elsewhere the test says it was skipped, and ctest reports it so.
#include <ckpt/safetensors.hpp>

#define BOOST_TEST_MODULE safetensors_interop_test
#include <boost/test/unit_test.hpp>

#include <ckpt/dcp/convert.hpp>
#include <ckpt/format.hpp>

#include "support/rank_runs.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <boost/json.hpp>

#include <fmt/format.h>

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace st = ckpt::safetensors;
using ckpt::test::describe;
using ckpt::test::same_bits;
using ckpt::test::TempDir;
using ckpt::test::torch2_script;

namespace {

/// Why the test cannot run here, if it cannot.
std::optional<std::string> cannot_run() {
  if (::geteuid() != 0) return std::string("not root (the torch 2.6 chroot needs root)");
  const char* env = std::getenv("CKPT_TRIXIE_ROOT");
  const fs::path root = env && *env ? env : "/var/lib/ckpt/trixie";
  if (!fs::exists(root / ".ckpt-ready"))
    return fmt::format("no torch 2.6 chroot at {} (run cmake/install-deps.sh as root)", root.string());
  return std::nullopt;
}

/// Prints the line ctest's SKIP_REGULAR_EXPRESSION catches; true when skipped.
bool skipped() {
  if (const auto why = cannot_run()) {
    std::printf("safetensors_interop_test skipped: %s\n", why->c_str());
    return true;
  }
  return false;
}

/// The files safetensors_files.py writes with Python's safetensors, made once.
struct PythonFiles {
  TempDir dir;
  ckpt::test::RunResult made = torch2_script("safetensors_files.py", {"write", dir.path().string()});
  fs::path operator/(const std::string& name) const { return dir / name; }
};

const PythonFiles& python_files() {
  static PythonFiles files;
  BOOST_REQUIRE_MESSAGE(files.made.status == 0, describe(files.made));
  return files;
}

/// A .pt that torch.save (Python) or ckpt::write_file wrote: a flat dict.
ckpt::StateDict reference(const fs::path& pt) {
  return ckpt::StateDict::from_ivalue(ckpt::read_file(pt));
}

std::uint64_t header_length(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  unsigned char b[8] = {};
  in.read(reinterpret_cast<char*>(b), 8);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | b[i];
  return n;
}

/// Loads `path` whole, mapped, partially and in place, each compared bit for
/// bit with `want` (every name of the file, and only those).
void check_loads_exactly(const fs::path& path, const ckpt::StateDict& want) {
  for (const bool mmap : {false, true}) {
    BOOST_TEST_CONTEXT((mmap ? "mapped" : "whole")) {
      const auto loaded = st::load(path, {.mmap = mmap});
      BOOST_CHECK_EQUAL(loaded.size(), want.size());
      for (const auto& e : want) {
        const std::string name = e.key().toStringRef();
        BOOST_TEST_CONTEXT("tensor " << name) {
          BOOST_REQUIRE(loaded.contains(name));
          const at::Tensor t = loaded.at(name).toTensor();
          BOOST_CHECK(same_bits(t, e.value().toTensor()));
          if (t.numel() > 0)
            BOOST_CHECK_EQUAL(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % t.element_size(), 0u);
        }
      }
    }
  }
  // In place: zeroed targets of the same dtypes and shapes, nested by the
  // first dot ("a.weight" as {"a": {"weight": ...}}).
  ckpt::StateDict target;
  std::map<std::string, ckpt::StateDict> groups;
  std::vector<std::pair<std::string, at::Tensor>> targets;
  for (const auto& e : want) {
    const std::string name = e.key().toStringRef();
    const at::Tensor w = e.value().toTensor();
    const at::Tensor t = at::zeros(w.sizes(), w.options());
    targets.emplace_back(name, t);
    const auto dot = name.find('.');
    if (dot == std::string::npos) {
      target.insert(name, t);
    } else {
      auto [it, fresh] = groups.try_emplace(name.substr(0, dot));
      if (fresh) target.insert(name.substr(0, dot), it->second);
      it->second.insert(name.substr(dot + 1), t);
    }
  }
  BOOST_CHECK(st::load(path, {.state_dict = target}).is(target));
  for (const auto& [name, t] : targets) BOOST_TEST_CONTEXT("in place " << name) {
      BOOST_CHECK(same_bits(t, want.at(name).toTensor()));
    }
}

/// `dict`'s tensors under their dotted names, as contiguous copies.
void flatten_into(ckpt::StateDict& flat, const c10::impl::GenericDict& dict, const std::string& prefix) {
  for (const auto& e : dict) {
    const std::string name = prefix + e.key().toStringRef();
    if (e.value().isGenericDict())
      flatten_into(flat, e.value().toGenericDict(), name + ".");
    else
      flat.insert(name, e.value().toTensor().contiguous().clone());
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(save_file_of_every_dtype_loads_exactly) {
  if (skipped()) return;
  const auto& py = python_files();
  const fs::path file = py / "dtypes.safetensors";
  const auto want = reference(py / "dtypes.pt");
  BOOST_TEST_MESSAGE("written by torch " << ckpt::test::run("cat " + (py / "torch_version").string()).output);
  check_loads_exactly(file, want);

  st::Reader reader(file);
  const std::map<std::string, std::string> meta = {{"format", "pt"},
                                                   {"note", "h\u00e9llo \"quoted\" \u65e5\u672c"}};
  BOOST_CHECK(reader.metadata() == meta);
  for (const auto& [name, dtype] : std::vector<std::pair<std::string, std::string>>{
           {"bf16", "BF16"}, {"bool", "BOOL"}, {"f16", "F16"}, {"i8", "I8"}, {"u8", "U8"}})
    BOOST_CHECK_EQUAL(reader.entry(name).dtype, dtype);
  BOOST_CHECK(reader.entry("scalar").shape.empty());

  // Partial: only the bytes of what is asked for are read.
  const auto some = reader.load({.names = {"bf16", "bool"}});
  BOOST_CHECK(same_bits(some.at("bf16").toTensor(), want.at("bf16").toTensor()));
  BOOST_CHECK(same_bits(some.at("bool").toTensor(), want.at("bool").toTensor()));
  BOOST_CHECK_EQUAL(reader.bytes_read(), 8 + header_length(file) + want.at("bf16").toTensor().nbytes() +
                                             want.at("bool").toTensor().nbytes());
}

BOOST_AUTO_TEST_CASE(save_model_with_tied_weights_loads_exactly) {
  if (skipped()) return;
  const auto& py = python_files();
  const fs::path file = py / "model.safetensors";
  const auto state = reference(py / "model.pt");  // model.state_dict(): both tied names
  // save_model keeps one of the tied names and says so in the metadata.
  const auto meta = st::metadata(file);
  BOOST_CHECK_EQUAL(meta.at("format"), "pt");
  BOOST_REQUIRE_EQUAL(meta.count("head.weight"), 1u);
  BOOST_CHECK_EQUAL(meta.at("head.weight"), "embed.weight");
  st::Reader reader(file);
  BOOST_CHECK(!reader.contains("head.weight"));
  ckpt::StateDict want;
  for (const auto& name : reader.names()) want.insert(name, state.at(name));
  BOOST_CHECK_EQUAL(want.size(), state.size() - 1);
  check_loads_exactly(file, want);
  // The dropped name restored from the metadata: the same values as the one kept.
  const auto loaded = st::load(file);
  BOOST_CHECK(same_bits(loaded.at(meta.at("head.weight")).toTensor(), state.at("head.weight").toTensor()));
}

BOOST_AUTO_TEST_CASE(a_sharded_checkpoint_with_the_transformers_index_loads_exactly) {
  if (skipped()) return;
  const auto& py = python_files();
  const fs::path index = py / "sharded" / "model.safetensors.index.json";
  const auto want = reference(py / "sharded.pt");
  check_loads_exactly(index, want);
  check_loads_exactly(py / "sharded", want);  // the directory
  st::Reader reader(index);
  BOOST_CHECK(reader.is_index());
  BOOST_CHECK_EQUAL(reader.metadata().at("total_size"), "80");
  // Partial: only the shard holding it is opened.
  const auto one = reader.load({.names = {"b.mask"}});
  BOOST_CHECK(same_bits(one.at("b.mask").toTensor(), want.at("b.mask").toTensor()));
  const fs::path shard = py / "sharded" / "model-00002-of-00002.safetensors";
  BOOST_CHECK_EQUAL(reader.bytes_read(), fs::file_size(index) + 8 + header_length(shard) + 2);
}

BOOST_AUTO_TEST_CASE(what_ckpt_writes_loads_exactly_in_python) {
  if (skipped()) return;
  TempDir dir;
  boost::json::object files, indexes, metadata;
  const auto add = [&](const std::string& name, const ckpt::StateDict& sd,
                       const st::SaveOptions& options = {}) {
    st::save(dir / (name + ".safetensors"), sd, options);
    // The reference: what Python must see, made here without the library's
    // safetensors code: flat names, each tensor's contiguous values.
    ckpt::StateDict flat;
    flatten_into(flat, sd.dict(), "");
    ckpt::write_file(dir / (name + ".pt"), flat.to_ivalue());
    if (options.max_shard_bytes)
      indexes[name] = name + ".safetensors.index.json";
    else
      files[name] = name + ".safetensors";
    boost::json::object meta;
    for (const auto& [k, v] : options.metadata) meta[k] = v;
    metadata[name] = std::move(meta);
  };

  // Every dtype Python's safetensors 0.4 knows (not C64: it came in 0.7), with
  // special values; views; 0-d and empty tensors; nested names; metadata.
  const auto floats =
      at::tensor(std::vector<double>{0.1, -0.0, INFINITY, -INFINITY, NAN, 1e300, 5e-324, -2.5});
  ckpt::StateDict dtypes;
  dtypes.insert("f64", floats.reshape({2, 4}));
  dtypes.insert("f32", floats.to(at::kFloat));
  dtypes.insert("f16", floats.to(at::kHalf));
  dtypes.insert("bf16", floats.to(at::kBFloat16).reshape({4, 2}));
  dtypes.insert("i64", at::tensor(std::vector<std::int64_t>{INT64_MIN, INT64_MAX, 0, -1}));
  dtypes.insert("i32", at::tensor(std::vector<std::int64_t>{INT32_MIN, INT32_MAX, 0}).to(at::kInt));
  dtypes.insert("i16", at::tensor(std::vector<std::int64_t>{-32768, 32767}).to(at::kShort));
  dtypes.insert("i8", at::tensor(std::vector<std::int64_t>{-128, 127, 0}).to(at::kChar));
  dtypes.insert("u8", at::tensor(std::vector<std::int64_t>{0, 255, 7}).to(at::kByte));
  dtypes.insert("bool", at::tensor(std::vector<std::int64_t>{1, 0, 1}).to(at::kBool));
  add("dtypes", dtypes);

  const at::Tensor base = at::arange(24, at::kFloat).reshape({4, 6});
  ckpt::StateDict views;
  views.insert("transposed", base.t());
  views.insert("slice", base.narrow(1, 1, 3));
  views.insert("expanded", at::arange(3, at::kDouble).expand({2, 3}));
  add("views", views);

  ckpt::StateDict edge;
  edge.insert("scalar", at::scalar_tensor(3.5, at::kDouble));
  edge.insert("empty", at::empty({0}, at::kFloat));
  edge.insert("empty_2d", at::empty({3, 0}, at::kBFloat16));
  edge.insert("one", at::ones({1}, at::kByte));
  add("edge", edge);

  ckpt::StateDict layer;
  layer.insert("weight", at::randn({3, 2}));
  layer.insert("bias", at::randn({3}).to(at::kHalf));
  ckpt::StateDict model;
  model.insert("layer", layer);
  model.insert("scale", at::ones({1}, at::kDouble));
  ckpt::StateDict nested;
  nested.insert("model", model);
  add("nested", nested, {.metadata = {{"format", "pt"}, {"note", "h\u00e9llo"}}});

  ckpt::StateDict big;
  for (int i = 0; i < 5; ++i) big.insert(fmt::format("layers.{}.weight", i), at::randn({16, 8}));
  big.insert("layers.mask", at::ones({5}, at::kBool));
  add("sharded", big, {.metadata = {{"format", "pt"}}, .max_shard_bytes = 1200});
  BOOST_CHECK(fs::exists(dir / "sharded-00003-of-00003.safetensors"));

  std::ofstream(dir / "manifest.json") << boost::json::serialize(
      boost::json::object{{"files", files}, {"indexes", indexes}, {"metadata", metadata}});
  const auto checked = torch2_script("safetensors_files.py", {"check", dir.path().string()});
  BOOST_TEST_MESSAGE(checked.output);
  BOOST_REQUIRE_MESSAGE(checked.status == 0, describe(checked));
  for (const std::string name : {"dtypes", "views", "edge", "nested", "sharded"})
    BOOST_CHECK_MESSAGE(checked.output.find("ok " + name + "\n") != std::string::npos,
                        "no 'ok " << name << "'");
}

BOOST_AUTO_TEST_CASE(a_dcp_save_on_three_ranks_loads_in_python_and_back_on_one_and_two) {
  // dcp_worker's hf_save: 3 ranks save row-sharded and replicated tensors
  // through HuggingFaceStorageWriter, consolidated into upstream's
  // model-0000k-of-00002.safetensors and index; Python's safetensors loads
  // them exactly; 1 and 2 ranks load them back (and the shards) exactly.
  if (skipped()) return;
  TempDir dir;
  const fs::path bin = fs::path(CKPT_CLI).parent_path();
  const auto launch = [&](int ranks, const char* scenario) {
    auto run =
        ckpt::test::run_bounded({(bin / "ckpt-launch").string(), "-n", std::to_string(ranks), "--timeout",
                                 "120", (bin / "dcp_worker").string(), scenario, dir.path().string()},
                                std::chrono::seconds(180));
    BOOST_TEST_MESSAGE(scenario << " on " << ranks << " ranks:\n" << run.output);
    BOOST_CHECK_MESSAGE(run.status == 0 && !run.hung && run.unexpected.empty(), run.output);
    BOOST_CHECK_EQUAL(run.results.size(), static_cast<std::size_t>(ranks));
  };
  launch(3, "hf_save");
  std::ofstream(dir / "manifest.json") << boost::json::serialize(
      boost::json::object{{"files", boost::json::object{}},
                          {"indexes", boost::json::object{{"hf", "hf/model.safetensors.index.json"}}},
                          {"metadata", boost::json::object{}}});
  const auto checked = torch2_script("safetensors_files.py", {"check", dir.path().string()});
  BOOST_TEST_MESSAGE(checked.output);
  BOOST_CHECK_MESSAGE(checked.status == 0 && checked.output.find("ok hf\n") != std::string::npos,
                      describe(checked));
  launch(1, "hf_load");
  launch(2, "hf_load");
}

BOOST_AUTO_TEST_CASE(what_ckpt_convert_writes_loads_exactly_in_python) {
  if (skipped()) return;
  TempDir dir;
  const auto made = torch2_script("convert_files.py", {"write", dir.path().string()});
  BOOST_REQUIRE_MESSAGE(made.status == 0, describe(made));
  const auto check = [&](std::vector<std::string> args) {
    const auto r = torch2_script("convert_files.py", args);
    BOOST_CHECK_MESSAGE(r.status == 0 && r.output.find("same") != std::string::npos, describe(r));
  };
  const std::string flat = (dir / "flat.pt").string(), nested = (dir / "nested.pt").string();
  // torch.save (torch 2.6) -> DCP, read by upstream's dcp_to_torch_save.
  ckpt::dcp::convert(dir / "flat.pt", dir / "flat-dcp");
  check({"check-dcp", (dir / "flat-dcp").string(), flat});
  ckpt::dcp::convert(dir / "nested.pt", dir / "nested-dcp");
  check({"check-dcp", (dir / "nested-dcp").string(), nested, "--str-keys"});
  // DCP -> safetensors, read by safetensors.torch.load_file.
  ckpt::dcp::convert(dir / "flat-dcp", dir / "flat.safetensors");
  check({"check-safetensors", (dir / "flat.safetensors").string(), flat});
  // safetensors -> torch.save and DCP -> torch.save, read by torch.load(weights_only=True).
  ckpt::dcp::convert(dir / "flat.safetensors", dir / "back.pt");
  check({"check", flat, (dir / "back.pt").string()});
  ckpt::dcp::convert(dir / "nested-dcp", dir / "nested-back.pt");
  check({"check", nested, (dir / "nested-back.pt").string(), "--str-keys"});
  // What upstream's torch_save_to_dcp writes converts back exactly.
  const auto py_dcp = torch2_script("convert_files.py", {"to-dcp", nested, (dir / "py-dcp").string()});
  BOOST_REQUIRE_MESSAGE(py_dcp.status == 0, describe(py_dcp));
  ckpt::dcp::convert(dir / "py-dcp", dir / "from-py.pt");
  check({"check", nested, (dir / "from-py.pt").string(), "--str-keys"});
}
