// PyTorch's own DCP format, read by ckpt: checkpoint directories written by
// Python's FileSystemWriter (Debian's torch 1.13: one file per rank, one file
// per item) load exactly, and `.metadata` pickles that name anything off the
// allowlist are refused without running anything.
#define BOOST_TEST_MODULE dcp_interop_test
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/dcp/storage.hpp>
#include <ckpt/format.hpp>

#include <boost/test/unit_test.hpp>

#include "support/dcp_cases.hpp"
#include "support/python_bound.hpp"
#include "support/rank_runs.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <fmt/format.h>
#include <boost/json.hpp>

#include <bit>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using c10::IValue;
using ckpt::test::describe;
using ckpt::test::mentions;
using ckpt::test::python_script;
using ckpt::test::same_bits;
using ckpt::test::TempDir;
using ckpt::test::dcp_cases::load_alone;
using ckpt::test::dcp_cases::save_alone;
using ckpt::test::dcp_cases::writing_for;

namespace {

/// The checkpoints tests/interop/dcp_files.py writes with Python's DCP, made once.
struct PythonDcp {
  TempDir dir;
  ckpt::test::RunResult made = python_script("dcp_files.py", {dir.path().string()});
  fs::path operator/(const std::string& name) const { return dir / name; }
};

const PythonDcp& python_dcp() {
  static PythonDcp files;
  BOOST_REQUIRE_MESSAGE(files.made.status == 0, describe(files.made));
  return files;
}

/// A state dict to load into: for every key of `values`, a zeroed tensor of
/// its dtype and sizes (contiguous), or None for a plain value.
ckpt::dcp::DcpStateDict targets_for(const ckpt::StateDict& values) {
  ckpt::dcp::DcpStateDict out;
  for (const auto& e : values) {
    const std::string key = e.key().toStringRef();
    const IValue v = e.value();
    if (v.isTensor())
      out.emplace_back(key, at::zeros(v.toTensor().sizes(), v.toTensor().options()));
    else
      out.emplace_back(key, IValue());
  }
  return out;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}

/// Loads the DCP directory `dir` into targets shaped as values.pt and checks
/// every value against values.pt, bit for bit.
void check_loads_exactly(const fs::path& dir) {
  const auto values = ckpt::StateDict::from_ivalue(ckpt::read_file(python_dcp() / "values.pt"));
  auto target = targets_for(values);
  ckpt::dcp::FileSystemReader reader(dir);
  ckpt::dcp::load_state_dict(target, reader, nullptr, nullptr, 0, /*no_dist=*/true);
  BOOST_REQUIRE_EQUAL(target.size(), values.size());
  for (const auto& [key, loaded] : target) {
    BOOST_TEST_CONTEXT("key " << key) {
      const IValue& want = values.at(key);
      if (want.isTensor()) {
        BOOST_CHECK(same_bits(std::get<at::Tensor>(loaded), want.toTensor().contiguous()));
      } else {
        const IValue& got = std::get<IValue>(loaded);
        if (key == "nested") {  // {"x": tensor, "y": {"z": 3}}
          const auto d = got.toGenericDict();
          BOOST_CHECK(same_bits(d.at("x").toTensor(), want.toGenericDict().at("x").toTensor()));
          BOOST_CHECK_EQUAL(d.at("y").toGenericDict().at("z").toInt(), 3);
        } else {
          BOOST_CHECK_MESSAGE(got == want, "loaded " << got << ", saved " << want);
        }
      }
    }
  }
}

std::string text(const IValue& v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

/// Where `got` differs from `want` ("" when alike): tensors bit for bit,
/// floats by their bits, dicts by their keys' text (load_all's dict keys are
/// text, as upstream's), lists and tuples element by element.
std::string differences(const IValue& got, const IValue& want, const std::string& path) {
  const std::string at = path.empty() ? "<root>" : path;
  if (want.isTensor()) {
    if (!got.isTensor()) return fmt::format("{}: a {}, not a tensor\n", at, got.tagKind());
    return same_bits(got.toTensor(), want.toTensor().contiguous()) ? ""
                                                                   : fmt::format("{}: other values\n", at);
  }
  if (want.isGenericDict()) {
    if (!got.isGenericDict()) return fmt::format("{}: a {}, not a dict\n", at, got.tagKind());
    const auto g = got.toGenericDict();
    const auto w = want.toGenericDict();
    std::string out;
    if (g.size() != w.size()) out += fmt::format("{}: {} keys, not {}\n", at, g.size(), w.size());
    for (const auto& e : w) {
      const std::string key = e.key().isString() ? e.key().toStringRef() : fmt::format("{}", e.key().toInt());
      auto it = g.find(e.key());
      if (it == g.end() && !e.key().isString()) it = g.find(key);
      if (it == g.end()) {
        out += fmt::format("{}.{}: missing\n", at, key);
        continue;
      }
      out += differences(it->value(), e.value(), path.empty() ? key : path + "." + key);
    }
    return out;
  }
  if (want.isList() || want.isTuple()) {
    if (want.isList() != got.isList() || want.isTuple() != got.isTuple())
      return fmt::format("{}: a {}, not a {}\n", at, got.tagKind(), want.tagKind());
    const auto g = got.isList() ? got.toListRef().vec() : got.toTupleRef().elements().vec();
    const auto w = want.isList() ? want.toListRef().vec() : want.toTupleRef().elements().vec();
    if (g.size() != w.size()) return fmt::format("{}: {} elements, not {}\n", at, g.size(), w.size());
    std::string out;
    for (std::size_t i = 0; i < w.size(); ++i) out += differences(g[i], w[i], fmt::format("{}[{}]", path, i));
    return out;
  }
  if (want.isDouble()) {
    const bool same = got.isDouble() && std::bit_cast<std::uint64_t>(got.toDouble()) ==
                                            std::bit_cast<std::uint64_t>(want.toDouble());
    return same ? "" : fmt::format("{}: {}, not {}\n", at, text(got), text(want));
  }
  return got == want ? "" : fmt::format("{}: {}, not {}\n", at, text(got), text(want));
}

/// A target shaped as `value`: every tensor zeroed (same dtype and sizes,
/// contiguous), every dict and list rebuilt with text keys, every other value
/// None (a load puts the saved one there).
IValue zeroed(const IValue& value) {
  if (value.isTensor()) return at::zeros(value.toTensor().sizes(), value.toTensor().options());
  if (value.isGenericDict()) {
    c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
    for (const auto& e : value.toGenericDict())
      out.insert(e.key().isString() ? e.key().toStringRef() : fmt::format("{}", e.key().toInt()),
                 zeroed(e.value()));
    return out;
  }
  if (value.isList()) {
    c10::impl::GenericList out(c10::AnyType::get());
    for (const auto& e : value.toListRef()) out.push_back(zeroed(e));
    return out;
  }
  return IValue();
}

}  // namespace

BOOST_AUTO_TEST_SUITE(python_to_ckpt)

BOOST_AUTO_TEST_CASE(the_metadata_of_python_dcp_describes_every_key) {
  const auto md = ckpt::dcp::read_checkpoint_metadata(python_dcp() / "one_file");
  const auto values = ckpt::StateDict::from_ivalue(ckpt::read_file(python_dcp() / "values.pt"));
  BOOST_CHECK_EQUAL(md.metadata.state_dict_metadata.size(), values.size());
  for (const auto& e : values) {
    const std::string key = e.key().toStringRef();
    const IValue v = e.value();
    BOOST_TEST_CONTEXT("key " << key) {
      const auto it = md.metadata.state_dict_metadata.find(key);
      BOOST_REQUIRE(it != md.metadata.state_dict_metadata.end());
      if (!v.isTensor()) {
        BOOST_CHECK(std::holds_alternative<ckpt::dcp::BytesStorageMetadata>(it->second));
        continue;
      }
      const auto& t = std::get<ckpt::dcp::TensorStorageMetadata>(it->second);
      BOOST_CHECK(t.properties.dtype == v.toTensor().scalar_type());
      BOOST_CHECK(t.size == v.toTensor().sizes().vec());
      BOOST_REQUIRE_EQUAL(t.chunks.size(), 1u);
      BOOST_CHECK(t.chunks[0].sizes == t.size);
    }
  }
  for (const auto& [index, info] : md.storage_data) {
    BOOST_CHECK(info.archive);
    BOOST_CHECK_EQUAL(info.relative_path, "__0_0.distcp");
  }
}

BOOST_AUTO_TEST_CASE(one_file_per_rank_loads_exactly) {
  check_loads_exactly(python_dcp() / "one_file");
}

BOOST_AUTO_TEST_CASE(one_file_per_item_loads_exactly) {
  check_loads_exactly(python_dcp() / "per_item");
}

BOOST_AUTO_TEST_CASE(a_row_range_reads_only_its_rows) {
  // Rank 1 of 2 holds rows [128, 256) of "big" (256 x 1024 float32, 1 MiB), as
  // a resharded load would: it reads those rows, the metadata and the item's
  // zip headers and pickle, not the other half.
  const auto values = ckpt::StateDict::from_ivalue(ckpt::read_file(python_dcp() / "values.pt"));
  const at::Tensor whole = values.at("big").toTensor();
  ckpt::dcp::ShardedTensor st = ckpt::dcp::ShardedTensor::zeros(
      ckpt::dcp::ChunkShardingSpec{0, {"rank:0/cpu", "rank:1/cpu"}}, {256, 1024}, /*rank=*/1);
  ckpt::dcp::DcpStateDict target;
  target.emplace_back("big", st);
  ckpt::dcp::FileSystemReader reader(python_dcp() / "one_file");
  ckpt::dcp::DefaultLoadPlanner planner(/*allow_partial_load=*/true);
  ckpt::dcp::load_state_dict(target, reader, &planner, nullptr, 0, /*no_dist=*/true);
  const auto& shard = std::get<ckpt::dcp::ShardedTensor>(target[0].second).local_shards().at(0).tensor;
  BOOST_CHECK(same_bits(shard, whole.narrow(0, 128, 128)));
  const std::uint64_t half = 128 * 1024 * 4;
  const std::uint64_t metadata = fs::file_size(python_dcp() / "one_file" / ".metadata");
  BOOST_TEST_MESSAGE("read " << reader.bytes_read() << " bytes for a " << half << "-byte half");
  BOOST_CHECK_GE(reader.bytes_read(), half + metadata);
  BOOST_CHECK_LE(reader.bytes_read(), half + metadata + 4096);
}

BOOST_AUTO_TEST_CASE(a_damaged_chunk_fails_its_crc) {
  // Python's zip records carry real CRC-32s: a flipped byte inside a tensor
  // record is found.
  TempDir copy;
  fs::copy(python_dcp() / "one_file", copy.path(), fs::copy_options::recursive);
  const auto md = ckpt::dcp::read_checkpoint_metadata(copy.path());
  const auto& info =
      md.storage_data.at(ckpt::dcp::MetadataIndex{"pattern_f64", std::vector<std::int64_t>{0, 0, 0}, 0});
  ckpt::FileReader archive(copy.path() / info.relative_path, info.offset, info.length);
  const auto rec = archive.storage_record(*archive.root().tensor);
  std::string bytes = read_text(copy.path() / info.relative_path);
  bytes[rec.data_offset + 9] ^= 0x10;
  write_text(copy.path() / info.relative_path, bytes);

  const auto values = ckpt::StateDict::from_ivalue(ckpt::read_file(python_dcp() / "values.pt"));
  auto target = targets_for(values);
  ckpt::dcp::FileSystemReader reader(copy.path());
  try {
    ckpt::dcp::load_state_dict(target, reader, nullptr, nullptr, 0, /*no_dist=*/true);
    BOOST_ERROR("a damaged chunk loaded");
  } catch (const ckpt::CheckpointException& e) {
    BOOST_TEST_CONTEXT(e.what()) {
      BOOST_CHECK(mentions(e, "CRC-32"));
      BOOST_CHECK(mentions(e, "pattern_f64"));
    }
  }
  // `ckpt verify` finds it too, names the key and exits 1.
  const auto r =
      ckpt::test::run(std::string(CKPT_CLI) + " verify " + ckpt::test::sh_quote(copy.path().string()));
  BOOST_CHECK_EQUAL(r.status, 1);
  BOOST_CHECK_MESSAGE(r.output.find("BAD pattern_f64") != std::string::npos, r.output);
}

BOOST_AUTO_TEST_CASE(the_cli_inspects_and_verifies_a_python_dcp_directory) {
  const std::string cli = CKPT_CLI;
  const auto listed = ckpt::test::run(
      cli + " inspect " + ckpt::test::sh_quote((python_dcp() / "one_file").string()) + " --json 2>/dev/null");
  BOOST_REQUIRE_EQUAL(listed.status, 0);
  const auto doc = boost::json::parse(listed.output).as_object();
  BOOST_CHECK_EQUAL(doc.at("dialect").as_string(), "pytorch");
  const auto values = ckpt::StateDict::from_ivalue(ckpt::read_file(python_dcp() / "values.pt"));
  BOOST_CHECK_EQUAL(doc.at("keys").as_array().size(), values.size());
  for (const auto& k : doc.at("keys").as_array()) {
    const auto& o = k.as_object();
    if (o.at("key").as_string() != "big") continue;
    BOOST_CHECK_EQUAL(o.at("dtype").as_string(), "Float");
    BOOST_CHECK_EQUAL(boost::json::serialize(o.at("shape")), "[256,1024]");
    BOOST_CHECK_EQUAL(o.at("chunks").as_array().at(0).at("file").as_string(), "__0_0.distcp");
  }
  for (const char* name : {"one_file", "per_item"}) {
    BOOST_TEST_CONTEXT(name) {
      const auto r = ckpt::test::run(cli + " verify " + ckpt::test::sh_quote((python_dcp() / name).string()));
      BOOST_CHECK_MESSAGE(r.status == 0, r.output);
      BOOST_CHECK(r.output.find("ok ") != std::string::npos);
    }
  }
}

BOOST_AUTO_TEST_CASE(zstd_transformed_items_load_exactly) {
  // Every item through upstream's "stream.zstd/1" transform: decompressed
  // (through libzstd) and read as any other; a damaged or cut stream is a
  // CorruptCheckpoint naming the item.
  TempDir dir;
  const auto made =
      python_script("dcp_zstd.py", {(python_dcp() / "one_file").string(), (dir / "zstd").string()});
  BOOST_REQUIRE_MESSAGE(made.status == 0, describe(made));
  const auto md = ckpt::dcp::read_checkpoint_metadata(dir / "zstd");
  for (const auto& [index, info] : md.storage_data)
    BOOST_CHECK(info.transforms == std::vector<std::string>{"stream.zstd/1"});
  check_loads_exactly(dir / "zstd");

  const auto& big = md.storage_data.at(ckpt::dcp::MetadataIndex{"big", std::vector<std::int64_t>{0, 0}, 0});
  const fs::path data = dir / "zstd" / big.relative_path;
  const std::string good = read_text(data);
  const auto refused = [&](const std::string& says) {
    const auto values = ckpt::StateDict::from_ivalue(ckpt::read_file(python_dcp() / "values.pt"));
    auto target = targets_for(values);
    ckpt::dcp::FileSystemReader reader(dir / "zstd");
    try {
      ckpt::dcp::load_state_dict(target, reader, nullptr, nullptr, 0, /*no_dist=*/true);
      BOOST_ERROR("loaded");
    } catch (const ckpt::CheckpointException& e) {
      BOOST_TEST_CONTEXT(e.what()) {
        BOOST_CHECK(mentions(e, "big"));
        BOOST_CHECK(mentions(e, says));
      }
    }
  };
  std::string damaged = good;
  damaged[big.offset + big.length / 2] ^= 0x5a;
  write_text(data, damaged);
  refused("zstd");
  write_text(data, good.substr(0, big.offset + big.length / 2));
  refused("truncated");
}

BOOST_AUTO_TEST_CASE(torch_1_13_checkpoints_load_whole_through_load_all) {
  for (const char* name : {"one_file", "per_item"}) BOOST_TEST_CONTEXT(name) {
      const auto all = ckpt::dcp::load_all(python_dcp() / name, load_alone());
      const IValue want = ckpt::read_file(python_dcp() / "values.pt");
      const std::string diff = differences(all.to_ivalue(), want, "");
      BOOST_CHECK_MESSAGE(diff.empty(), diff);
    }
}

BOOST_AUTO_TEST_SUITE_END()

// --- Python torch 2.6 → ckpt ------------------------------------------------------

BOOST_AUTO_TEST_SUITE(torch2_to_ckpt)

/// The checkpoints tests/interop/dcp_torch2_files.py writes with torch 2.6's
/// dcp.save, made once: no_group, threads (two data files), gloo3 (DTensors
/// of 3 gloo ranks), module (a model and its AdamW from get_state_dict).
struct Torch2Dcp {
  TempDir dir;
  ckpt::test::RunResult made = ckpt::test::torch2_script("dcp_torch2_files.py", {dir.path().string()});
  fs::path operator/(const std::string& name) const { return dir / name; }
};

const Torch2Dcp& torch2_dcp() {
  static Torch2Dcp files;
  BOOST_REQUIRE_MESSAGE(files.made.status == 0, describe(files.made));
  return files;
}

const char* const kTorch2Cases[] = {"no_group", "threads", "gloo3", "module"};

BOOST_AUTO_TEST_CASE(every_case_loads_whole_through_load_all) {
  BOOST_CHECK_EQUAL(read_text(torch2_dcp() / "torch_version").substr(0, 4), "2.6.");
  for (const char* name : kTorch2Cases) BOOST_TEST_CONTEXT(name) {
      const auto all = ckpt::dcp::load_all(torch2_dcp() / name, load_alone());
      const IValue want = ckpt::read_file(torch2_dcp() / (std::string(name) + ".pt"));
      const std::string diff = differences(all.to_ivalue(), want, "");
      BOOST_CHECK_MESSAGE(diff.empty(), diff);
      // Python recorded every key's path (torch >= 2.4 flattens every dict).
      const auto md = ckpt::dcp::read_checkpoint_metadata(torch2_dcp() / name);
      BOOST_CHECK_EQUAL(md.metadata.planner_data.size(), md.metadata.state_dict_metadata.size());
      BOOST_CHECK(md.metadata.storage_meta.has_value());
    }
}

BOOST_AUTO_TEST_CASE(every_case_loads_into_targets_in_place) {
  for (const char* name : kTorch2Cases) BOOST_TEST_CONTEXT(name) {
      const IValue want = ckpt::read_file(torch2_dcp() / (std::string(name) + ".pt"));
      const auto target = ckpt::StateDict::from_ivalue(zeroed(want));
      ckpt::dcp::load(target, load_alone(torch2_dcp() / name));
      const std::string diff = differences(target.to_ivalue(), want, "");
      BOOST_CHECK_MESSAGE(diff.empty(), diff);
    }
}

BOOST_AUTO_TEST_CASE(two_ranks_load_row_shards_reading_only_their_overlaps) {
  // gloo3's "rows" (7 x 5, saved as 3 + 3 + 1 rows by 3 ranks) loaded as rank
  // 0 and rank 1 of 2 hold it (4 + 3 rows): each reads the metadata, the
  // headers of the archives it overlaps and the overlapping rows, no more.
  const auto want = ckpt::read_file(torch2_dcp() / "gloo3.pt").toGenericDict().at("rows").toTensor();
  const fs::path dir = torch2_dcp() / "gloo3";
  for (std::int64_t rank : {0, 1}) BOOST_TEST_CONTEXT("rank " << rank) {
      ckpt::dcp::DcpStateDict sd;
      sd.emplace_back("rows",
                      ckpt::dcp::ShardedTensor::zeros(
                          ckpt::dcp::ChunkShardingSpec{0, {"rank:0/cpu", "rank:1/cpu"}}, {7, 5}, rank));
      // Not looking for a table of block CRC-32s either (Python's files have
      // none; the look costs 24 bytes a file).
      ckpt::dcp::FileSystemReader reader(dir, {.verify_blocks = false});
      ckpt::dcp::DefaultLoadPlanner planner(/*allow_partial_load=*/true);
      ckpt::dcp::load_state_dict(sd, reader, &planner, nullptr, 0, /*no_dist=*/true);
      const auto& shard = std::get<ckpt::dcp::ShardedTensor>(sd[0].second).local_shards().at(0);
      BOOST_CHECK(
          same_bits(shard.tensor, want.narrow(0, shard.metadata.offsets[0], shard.metadata.sizes[0])));
      BOOST_CHECK_EQUAL(reader.bytes_read(), ckpt::test::dcp_cases::expected_bytes_read(dir, sd));
    }
}

BOOST_AUTO_TEST_CASE(the_cli_verifies_every_case) {
  for (const char* name : kTorch2Cases) BOOST_TEST_CONTEXT(name) {
      const auto r = ckpt::test::run(std::string(CKPT_CLI) + " verify " +
                                     ckpt::test::sh_quote((torch2_dcp() / name).string()));
      BOOST_CHECK_MESSAGE(r.status == 0, r.output);
    }
}

BOOST_AUTO_TEST_SUITE_END()

// --- hostile .metadata ---------------------------------------------------------

BOOST_AUTO_TEST_SUITE(hostile_metadata)

/// `.metadata` of one_file with `from` replaced by `to` (same length, so the
/// pickle's framing stays sound and only the name changes).
std::string swapped(const std::string& from, const std::string& to) {
  BOOST_REQUIRE_EQUAL(from.size(), to.size());
  std::string md = read_text(python_dcp() / "one_file" / ".metadata");
  const auto at = md.find(from);
  BOOST_REQUIRE(at != std::string::npos);
  md.replace(at, from.size(), to);
  return md;
}

void check_refused(const std::string& metadata, const std::vector<std::string>& says) {
  TempDir dir;
  fs::copy(python_dcp() / "one_file", dir.path(), fs::copy_options::recursive);
  write_text(dir / ".metadata", metadata);
  try {
    ckpt::dcp::read_checkpoint_metadata(dir.path());
    BOOST_ERROR("a hostile .metadata was read");
  } catch (const ckpt::CorruptCheckpoint& e) {
    BOOST_TEST_CONTEXT(e.what()) {
      BOOST_CHECK(mentions(e, (dir / ".metadata").string()));
      for (const auto& s : says) BOOST_CHECK(mentions(e, s));
    }
  }
}

BOOST_AUTO_TEST_CASE(a_class_off_the_allowlist_is_refused) {
  check_refused(swapped("TensorStorageMetadata", "TensorStorageMetadatX"),
                {"refusing global", "TensorStorageMetadatX"});
}

BOOST_AUTO_TEST_CASE(another_torch_function_is_refused) {
  check_refused(swapped("torch\x94\x8c\x04Size", "torch\x94\x8c\x04load"), {"refusing global", "torch.load"});
}

BOOST_AUTO_TEST_CASE(another_builtin_is_refused) {
  check_refused(swapped("getattr", "setattr"), {"refusing global", "builtins.setattr"});
}

BOOST_AUTO_TEST_CASE(a_relative_path_that_leaves_the_directory_is_refused) {
  check_refused(swapped("__0_0.distcp", "../../x.txt."), {"../../x.txt.", "not a plain name"});
}

BOOST_AUTO_TEST_CASE(a_truncated_pickle_is_refused) {
  const std::string md = read_text(python_dcp() / "one_file" / ".metadata");
  for (std::size_t cut : {std::size_t{1}, std::size_t{20}, md.size() / 2, md.size() - 1})
    BOOST_TEST_CONTEXT("cut at " << cut) {
      check_refused(md.substr(0, cut), {"bad pickle"});
    }
}

BOOST_AUTO_TEST_CASE(hostile_directories_are_refused_and_nothing_runs) {
  // tests/interop/dcp_hostile.py writes, with Python's own classes:
  //   metadata/<case>: a .metadata to refuse as it is read: objects whose
  //     unpickling would run code in Python (os.system, builtins.eval, a stray
  //     getattr, a Metadata subclass), impossible tensors (huge, chunks outside
  //     or not covering it), bad storage (negative length, paths out of the
  //     directory), wrong types;
  //   data/<case>: a sound .metadata over data that is not what it says
  //     (offsets and lengths past the end, a symlink, a FIFO, a missing file,
  //     an item that is no archive, an item whose pickle runs os.system).
  // Each is refused with a clear error, none hangs, and the canary file that
  // the code in them would create never appears.
  TempDir dir;
  const fs::path canary = dir / "canary";
  const auto made = python_script("dcp_hostile.py", {dir.path().string(), canary.string()});
  BOOST_REQUIRE_MESSAGE(made.status == 0, describe(made));
  int cases = 0;
  for (const auto& entry : fs::directory_iterator(dir / "metadata")) {
    ++cases;
    BOOST_TEST_CONTEXT("metadata case " << entry.path().filename()) {
      try {
        ckpt::dcp::read_checkpoint_metadata(entry.path());
        BOOST_ERROR("read");
      } catch (const ckpt::CorruptCheckpoint& e) {
        BOOST_CHECK(mentions(e, (entry.path() / ".metadata").string()));
      }
    }
  }
  for (const auto& entry : fs::directory_iterator(dir / "data")) {
    ++cases;
    BOOST_TEST_CONTEXT("data case " << entry.path().filename()) {
      const auto md = ckpt::dcp::read_checkpoint_metadata(entry.path());
      ckpt::dcp::DcpStateDict target;
      for (const auto& [fqn, sm] : md.metadata.state_dict_metadata) {
        if (const auto* t = std::get_if<ckpt::dcp::TensorStorageMetadata>(&sm))
          target.emplace_back(fqn, at::zeros(t->size, at::TensorOptions().dtype(t->properties.dtype)));
        else
          target.emplace_back(fqn, IValue());
      }
      ckpt::dcp::FileSystemReader reader(entry.path());
      if (entry.path().filename() == "hostile_item_pickle") {
        // An item whose pickle names os.system loads as an opaque value: its
        // bytes kept, never run; asking for its contents is a clear error.
        ckpt::dcp::load_state_dict(target, reader, nullptr, nullptr, 0, /*no_dist=*/true);
        const IValue& v = std::get<IValue>(target.at(0).second);
        const auto* opaque = ckpt::dcp::as_opaque(v);
        BOOST_REQUIRE(opaque);
        BOOST_CHECK_EQUAL(opaque->key, "v");
        BOOST_CHECK(opaque->reason.find("refusing global") != std::string::npos);
        BOOST_CHECK_EQUAL(opaque->archive.size(), fs::file_size(entry.path() / "__0_0.distcp"));
        BOOST_CHECK_EXCEPTION(ckpt::dcp::contents_of(v), ckpt::Unsupported,
                              [](const ckpt::Unsupported& e) { return mentions(e, "'v'"); });
        continue;
      }
      try {
        ckpt::dcp::load_state_dict(target, reader, nullptr, nullptr, 0, /*no_dist=*/true);
        BOOST_ERROR("loaded");
      } catch (const ckpt::CheckpointException& e) {
        BOOST_TEST_MESSAGE(e.what());
        BOOST_CHECK(mentions(e, entry.path().string()));
      }
    }
  }
  BOOST_CHECK_GE(cases, 20);
  BOOST_CHECK(!fs::exists(canary));
}

BOOST_AUTO_TEST_SUITE_END()

// --- ckpt → Python -------------------------------------------------------------

BOOST_AUTO_TEST_SUITE(ckpt_to_python)

/// Runs tests/interop/dcp_check.py MODE DIR EXPECTED with torch 2.6 (or 1.13
/// for the legacy mode) and requires it to pass.
void python_checks(const std::string& mode, const fs::path& dir, const fs::path& expected) {
  BOOST_TEST_CONTEXT("dcp_check.py " << mode) {
    const std::vector<std::string> args{mode, dir.string(), expected.string()};
    const auto r = mode == "legacy" ? python_script("dcp_check.py", args)
                                    : ckpt::test::torch2_script("dcp_check.py", args);
    BOOST_CHECK_MESSAGE(r.status == 0, describe(r));
  }
}

void cli_verifies(const fs::path& dir) {
  const auto r = ckpt::test::run(std::string(CKPT_CLI) + " verify " + ckpt::test::sh_quote(dir.string()));
  BOOST_CHECK_MESSAGE(r.status == 0, r.output);
}

BOOST_AUTO_TEST_CASE(a_nested_state_dict_saved_alone_loads_in_python_2_6) {
  // Rows and columns sharded in three pieces (all held here), a replicated
  // bfloat16 tensor, and nested plain values: Python's dcp.load (no group, and
  // on 2 gloo ranks into row-sharded DTensors) and dcp_to_torch_save read
  // exactly what was saved.
  TempDir dir;
  ckpt::dcp::save(ckpt::test::python_bound_state(0, 1, false), save_alone(dir / "ckpt"));
  ckpt::write_file(dir / "expected.pt", ckpt::test::python_bound_state(0, 1, true).to_ivalue());
  for (const char* mode : {"load", "to_torch_save", "gloo2"})
    python_checks(mode, dir / "ckpt", dir / "expected.pt");
  cli_verifies(dir / "ckpt");
}

BOOST_AUTO_TEST_CASE(three_ranks_save_what_python_2_6_loads) {
  TempDir dir;
  const fs::path bin = fs::path(CKPT_CLI).parent_path();
  const auto run =
      ckpt::test::run_bounded({(bin / "ckpt-launch").string(), "-n", "3", "--timeout", "120",
                               (bin / "dcp_worker").string(), "nested_save", dir.path().string()},
                              std::chrono::seconds(180));
  BOOST_REQUIRE_MESSAGE(run.status == 0 && !run.hung, run.output);
  for (int rank = 0; rank < 3; ++rank) BOOST_CHECK_EQUAL(run.at(rank, "nested_save"), "ok");
  // One data file per rank; every chunk where its rank wrote it.
  int data_files = 0;
  for (const auto& e : fs::directory_iterator(dir / "nested"))
    data_files += e.path().extension() == ".distcp";
  BOOST_CHECK_EQUAL(data_files, 3);
  for (const char* mode : {"load", "to_torch_save", "gloo2"})
    python_checks(mode, dir / "nested", dir / "nested.pt");
  cli_verifies(dir / "nested");
}

BOOST_AUTO_TEST_CASE(the_older_dialects_load_in_the_torch_of_their_era) {
  // torch 1.13 reads the 1.13 dialect (flat keys: 1.13 does not unflatten);
  // torch 2.6 reads the 2.0-2.3 one, as it reads files of those versions.
  TempDir dir;
  ckpt::dcp::DcpStateDict flat;
  const auto whole = ckpt::test::python_bound_state(0, 1, true);
  const auto [leaves, paths] = ckpt::dcp::flatten_state_dict(ckpt::test::python_bound_state(0, 1, false));
  ckpt::StateDict expected_flat;
  for (const auto& [key, value] : ckpt::dcp::flatten_state_dict(whole).first) {
    if (const auto* t = std::get_if<at::Tensor>(&value))
      expected_flat.insert(key, *t);
    else
      expected_flat.insert(key, std::get<IValue>(value));
  }
  ckpt::write_file(dir / "flat.pt", expected_flat.to_ivalue());
  ckpt::dcp::FileSystemWriter legacy(dir / "legacy", writing_for(ckpt::dcp::MetadataDialect::torch_1_13));
  ckpt::dcp::save_state_dict(leaves, legacy, nullptr, nullptr, 0, /*no_dist=*/true);
  python_checks("legacy", dir / "legacy", dir / "flat.pt");
  cli_verifies(dir / "legacy");

  ckpt::write_file(dir / "expected.pt", whole.to_ivalue());
  ckpt::dcp::FileSystemWriter older(dir / "torch20", writing_for(ckpt::dcp::MetadataDialect::torch_2_0));
  ckpt::dcp::save(ckpt::test::python_bound_state(0, 1, false), save_alone(std::nullopt, &older));
  python_checks("load", dir / "torch20", dir / "expected.pt");
  // ckpt reads back all three dialects alike.
  for (const char* name : {"legacy", "torch20"}) BOOST_TEST_CONTEXT(name) {
      const auto md = ckpt::dcp::read_checkpoint_metadata(dir / name);
      BOOST_CHECK_EQUAL(md.metadata.state_dict_metadata.size(), paths.size());
    }
}

BOOST_AUTO_TEST_SUITE_END()
