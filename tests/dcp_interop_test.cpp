// PyTorch's own DCP format, read by ckpt: checkpoint directories written by
// Python's FileSystemWriter (Debian's torch 1.13: one file per rank, one file
// per item) load exactly, and `.metadata` pickles that name anything off the
// allowlist are refused without running anything.
#define BOOST_TEST_MODULE dcp_interop_test
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/dcp/storage.hpp>
#include <ckpt/format.hpp>

#include <boost/test/unit_test.hpp>

#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <boost/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using c10::IValue;
using ckpt::test::describe;
using ckpt::test::mentions;
using ckpt::test::python_script;
using ckpt::test::same_bits;
using ckpt::test::TempDir;

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
