// The DCP core in one process: the default planners (upstream's
// test_planner.py cases: dedup of replicated items, index hints, read items
// from chunk overlaps, plan validation), the wire encodings, and the
// filesystem storage through save_state_dict / load_state_dict with no_dist —
// round trips, torch.load of a data file, a save over an existing checkpoint
// that fails before its commit, partial reads, and corrupt or hostile files.
#include <ckpt/dcp/planner.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/dcp/storage.hpp>

#define BOOST_TEST_MODULE dcp_core_test
#include <boost/test/unit_test.hpp>

#include <ckpt/error.hpp>
#include <ckpt/format.hpp>

#include "dcp/serialize.hpp"
#include "dcp/shared_reads.hpp"
#include "support/dcp_cases.hpp"
#include "support/test_support.hpp"

#include <fmt/format.h>

#include <sys/stat.h>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace dcp = ckpt::dcp;
using ckpt::test::TempDir;
using dcp::ChunkShardingSpec;
using dcp::ChunkStorageMetadata;
using dcp::DcpStateDict;
using dcp::ShardedTensor;
using dcp::TensorStorageMetadata;
using Sizes = std::vector<std::int64_t>;

using ckpt::test::mentions;
using ckpt::test::dcp_cases::load_alone;
using ckpt::test::dcp_cases::save_alone;
namespace {

/// A ShardedTensor of `world` row shards of a global value; this rank's shards.
ShardedTensor sharded_of(const at::Tensor& global, std::int64_t world, std::int64_t rank,
                         std::int64_t dim = 0) {
  ChunkShardingSpec spec{dim, {}};
  for (std::int64_t r = 0; r < world; ++r) spec.placements.push_back(fmt::format("rank:{}/cpu", r));
  return ShardedTensor::create(
      spec, global.sizes().vec(), {global.scalar_type(), false}, rank,
      [&](const Sizes& sizes, c10::Device) { return at::zeros(sizes, global.options()); });
}

/// The data file holding the chunk of `fqn` at `offsets` in the checkpoint
/// `dir`, and where its tensor record's bytes start in that file.
std::pair<std::filesystem::path, std::uint64_t> tensor_record(const std::filesystem::path& dir,
                                                              const std::string& fqn, const Sizes& offsets) {
  const auto md = dcp::read_checkpoint_metadata(dir);
  const auto& info = md.storage_data.at(dcp::MetadataIndex{fqn, offsets, std::nullopt});
  ckpt::FileReader archive(dir / info.relative_path, info.offset, info.length);
  return {dir / info.relative_path, archive.storage_record(*archive.root().tensor).data_offset};
}

/// Fills `st`'s local shards with their slices of `global`.
void fill(ShardedTensor& st, const at::Tensor& global) {
  for (auto& s : st.local_shards()) {
    at::Tensor v = global;
    for (std::size_t d = 0; d < s.metadata.offsets.size(); ++d)
      v = v.narrow(static_cast<std::int64_t>(d), s.metadata.offsets[d], s.metadata.sizes[d]);
    s.tensor.copy_(v);
  }
}

/// The SavePlan rank `rank` of `world` makes for a state dict of a 20×4
/// sharded tensor, a replicated 3×3 tensor and a value.
dcp::SavePlan local_plan(std::int64_t world, std::int64_t rank) {
  static std::vector<DcpStateDict> keep;  // the planner refers to the state dict
  keep.push_back({{"sharded", sharded_of(at::zeros({20, 4}), world, rank)},
                  {"replicated", at::zeros({3, 3})},
                  {"value", c10::IValue(std::string("hello"))}});
  dcp::DefaultSavePlanner planner;
  planner.set_up_planner(keep.back(), rank == 0);
  return planner.create_local_plan();
}

std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_text(const std::filesystem::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << text;
}

/// A checkpoint directory of ckpt's earlier JSON dialect, made as its writer
/// made one: every item in one torch zip by name ("w@0,0", "step"), and
/// `.metadata` JSON naming each tensor record's bytes and CRC-32.
void write_json_dialect(const std::filesystem::path& dir, const DcpStateDict& sd) {
  std::filesystem::create_directories(dir);
  c10::impl::GenericDict items(c10::StringType::get(), c10::AnyType::get());
  dcp::CheckpointMetadata md{dcp::create_default_local_metadata(sd), {}};
  for (const auto& [key, value] : sd) {
    if (const auto* t = std::get_if<at::Tensor>(&value))
      items.insert(dcp::detail::item_name({key, Sizes(t->dim(), 0), std::nullopt}), t->contiguous().clone());
    else
      items.insert(key, std::get<c10::IValue>(value));
  }
  ckpt::write_file(dir / "__0_0.distcp", items);
  ckpt::FileReader file(dir / "__0_0.distcp");
  for (const auto& [key, value] : sd) {
    if (const auto* t = std::get_if<at::Tensor>(&value)) {
      const dcp::MetadataIndex index{key, Sizes(t->dim(), 0), std::nullopt};
      const auto rec = file.storage_record(*file.root().find(dcp::detail::item_name(index))->tensor);
      md.storage_data[index] = {"__0_0.distcp", rec.data_offset, rec.size, rec.crc32, false, {}};
    } else {
      md.storage_data[{key, std::nullopt, std::nullopt}] = {"__0_0.distcp", 0, 0, 0, false, {}};
    }
  }
  write_text(dir / ".metadata", dcp::detail::encode_checkpoint_metadata(md));
}

/// The CheckpointException of `f`, or a test failure.
template <class F>
ckpt::CheckpointException checkpoint_exception(F&& f) {
  try {
    f();
  } catch (const ckpt::CheckpointException& e) {
    return e;
  }
  BOOST_FAIL("no CheckpointException");
  throw;
}

DcpStateDict sample(double base) {
  return {{"w", at::arange(12, at::kFloat).reshape({3, 4}) + base},
          {"step", c10::IValue(static_cast<std::int64_t>(base))},
          {"d", at::arange(5, at::kDouble) * base}};
}

}  // namespace

BOOST_AUTO_TEST_SUITE(planner)

BOOST_AUTO_TEST_CASE(local_plan_lists_tensors_shards_and_values) {
  const auto plan = local_plan(4, 1);
  BOOST_REQUIRE_EQUAL(plan.items.size(), 3u);
  BOOST_TEST((plan.items[0].type == dcp::WriteItemType::shard));
  BOOST_TEST(plan.items[0].index.fqn == "sharded");
  BOOST_TEST(*plan.items[0].index.offset == (Sizes{5, 0}), boost::test_tools::per_element());
  BOOST_TEST(plan.items[0].tensor_data->size == (Sizes{20, 4}), boost::test_tools::per_element());
  BOOST_TEST(plan.items[0].tensor_storage_size() == 5u * 4u * 4u);
  BOOST_TEST((plan.items[1].type == dcp::WriteItemType::tensor));
  BOOST_TEST(*plan.items[1].index.offset == (Sizes{0, 0}), boost::test_tools::per_element());
  BOOST_TEST((plan.items[2].type == dcp::WriteItemType::bytes));
  BOOST_TEST(!plan.items[2].index.offset);
}

BOOST_AUTO_TEST_CASE(global_plan_writes_replicated_items_once) {
  // upstream's test_dedup_plans: each rank keeps its shard; the replicated
  // tensor and the value go to the ranks with the least planned so far.
  std::vector<dcp::SavePlan> plans;
  for (std::int64_t r = 0; r < 4; ++r) plans.push_back(local_plan(4, r));
  dcp::DefaultSavePlanner planner;
  const auto [global, md] = planner.create_global_plan(plans);
  BOOST_REQUIRE_EQUAL(global.size(), 4u);
  std::map<std::string, int> writers;
  std::size_t total = 0;
  for (const auto& p : global) {
    total += p.items.size();
    for (const auto& w : p.items) ++writers[w.index.fqn];
  }
  BOOST_TEST(writers["sharded"] == 4);
  BOOST_TEST(writers["replicated"] == 1);
  BOOST_TEST(writers["value"] == 1);
  BOOST_TEST(total == 6u);
  // Balanced, in the order items are first met (rank 0's shard, then the
  // replicated tensor, then the value): rank 0 has its shard planned when the
  // replicated tensor comes, so that goes to rank 1; the value to rank 2.
  const auto has = [&](std::size_t rank, const std::string& fqn) {
    for (const auto& w : global[rank].items)
      if (w.index.fqn == fqn) return true;
    return false;
  };
  BOOST_TEST(has(1, "replicated"));
  BOOST_TEST(has(2, "value"));
  // Metadata: four chunks, and each item's index hint is its chunk's position.
  const auto& sharded = std::get<TensorStorageMetadata>(md.state_dict_metadata.at("sharded"));
  BOOST_REQUIRE_EQUAL(sharded.chunks.size(), 4u);
  for (std::size_t r = 0; r < 4; ++r)
    for (const auto& w : global[r].items)
      if (w.index.fqn == "sharded") {
        BOOST_REQUIRE(w.index.index);
        BOOST_TEST(sharded.chunks[static_cast<std::size_t>(*w.index.index)].offsets == *w.index.offset,
                   boost::test_tools::per_element());
      }
  BOOST_TEST(std::holds_alternative<dcp::BytesStorageMetadata>(md.state_dict_metadata.at("value")));
  // Without dedup every rank writes its copy.
  dcp::DefaultSavePlanner no_dedup(false);
  BOOST_CHECK_EXCEPTION(no_dedup.create_global_plan(plans), ckpt::Error,
                        [](const ckpt::Error& e) { return mentions(e, "overlap"); });
}

BOOST_AUTO_TEST_CASE(plans_that_do_not_fit_together_are_refused) {
  auto plans = std::vector<dcp::SavePlan>{local_plan(4, 0), local_plan(4, 1)};  // rows 10..20 missing
  dcp::DefaultSavePlanner planner;
  BOOST_CHECK_EXCEPTION(planner.create_global_plan(plans), ckpt::Error,
                        [](const ckpt::Error& e) { return mentions(e, "Failed to validate global plan"); });
  plans = {local_plan(2, 0), local_plan(2, 1)};
  plans[1].items[0].tensor_data->size = {20, 5};
  BOOST_CHECK_EXCEPTION(planner.create_global_plan(plans), ckpt::Error,
                        [](const ckpt::Error& e) { return mentions(e, "'sharded'"); });
  plans = {local_plan(2, 0), local_plan(2, 1)};
  plans[1].items[0].tensor_data->chunk.sizes = {11, 4};  // rows 10..21: past the end
  BOOST_CHECK_EXCEPTION(planner.create_global_plan(plans), ckpt::Error,
                        [](const ckpt::Error& e) { return mentions(e, "out of bounds"); });
}

BOOST_AUTO_TEST_CASE(read_items_cover_the_overlaps) {
  // Saved: rows [0, 5) and [5, 10) of 10×4. Local: rows [3, 8) → two items.
  TensorStorageMetadata md{{at::kFloat, false}, {10, 4}, {{{0, 0}, {5, 4}}, {{5, 0}, {5, 4}}}};
  const auto items = dcp::create_read_items_for_chunk_list("t", md, {{{3, 0}, {5, 4}}});
  BOOST_REQUIRE_EQUAL(items.size(), 2u);
  BOOST_TEST(items[0].storage_offsets == (Sizes{3, 0}), boost::test_tools::per_element());
  BOOST_TEST(items[0].dest_offsets == (Sizes{0, 0}), boost::test_tools::per_element());
  BOOST_TEST(items[0].lengths == (Sizes{2, 4}), boost::test_tools::per_element());
  BOOST_TEST(items[1].storage_offsets == (Sizes{0, 0}), boost::test_tools::per_element());
  BOOST_TEST(items[1].dest_offsets == (Sizes{2, 0}), boost::test_tools::per_element());
  BOOST_TEST(items[1].lengths == (Sizes{3, 4}), boost::test_tools::per_element());
  BOOST_TEST(*items[1].storage_index.index == 1);
  // Column chunk [0, 10) × [1, 3): both saved chunks, two columns each.
  const auto cols = dcp::create_read_items_for_chunk_list("t", md, {{{0, 1}, {10, 2}}});
  BOOST_REQUIRE_EQUAL(cols.size(), 2u);
  BOOST_TEST(cols[1].storage_offsets == (Sizes{0, 1}), boost::test_tools::per_element());
  BOOST_TEST(cols[1].dest_offsets == (Sizes{5, 0}), boost::test_tools::per_element());
  BOOST_TEST(cols[1].lengths == (Sizes{5, 2}), boost::test_tools::per_element());
  // Touching is not overlapping.
  BOOST_TEST(dcp::create_read_items_for_chunk_list("t", md, {{{5, 0}, {5, 4}}}).size() == 1u);
}

BOOST_AUTO_TEST_CASE(plans_and_metadata_survive_the_wire) {
  std::vector<dcp::SavePlan> plans{local_plan(2, 0), local_plan(2, 1)};
  dcp::DefaultSavePlanner planner;
  auto [global, md] = planner.create_global_plan(plans);
  global[1].storage_data = "__1_0";
  const auto back = dcp::detail::decode_save_plan(dcp::detail::encode(global[1]));
  BOOST_REQUIRE_EQUAL(back.items.size(), global[1].items.size());
  for (std::size_t i = 0; i < back.items.size(); ++i) {
    BOOST_TEST((back.items[i].index == global[1].items[i].index));
    BOOST_TEST((back.items[i].index.index == global[1].items[i].index.index));
    BOOST_TEST((back.items[i].type == global[1].items[i].type));
    BOOST_TEST((back.items[i].tensor_data == global[1].items[i].tensor_data));
  }
  BOOST_TEST(back.storage_data == "__1_0");
  const auto md_back = dcp::detail::decode_metadata(dcp::detail::encode(md));
  BOOST_TEST((md_back.state_dict_metadata == md.state_dict_metadata));
  // Error texts may quote bytes that are not UTF-8 (names from a damaged file).
  const std::map<std::int64_t, ckpt::RankFailure> failures{
      {2, {"std::invalid_argument", "rank fail 2\n\"x\""}},
      {3, {"CorruptCheckpoint", "bad name '\xff\xfe'"}}};
  BOOST_TEST((dcp::detail::decode_failures(dcp::detail::encode(failures)) == failures));
  BOOST_CHECK_THROW(dcp::detail::decode_save_plan("{\"items\": 3}"), ckpt::Error);
}

BOOST_AUTO_TEST_CASE(a_rank_gets_only_the_metadata_it_loads) {
  // A checkpoint of a 12×4 tensor saved as rows [0,4), [4,8), [8,12), a
  // replicated tensor, a value, and a key no rank asks for.
  dcp::CheckpointMetadata whole;
  TensorStorageMetadata rows{{at::kFloat, false}, {12, 4}, {}};
  for (std::int64_t r = 0; r < 3; ++r) {
    rows.chunks.push_back({{4 * r, 0}, {4, 4}});
    whole.storage_data[{"rows", Sizes{4 * r, 0}, std::nullopt}] = {
        fmt::format("__{}_0.distcp", r), std::uint64_t(4096 * r), 64, 0, true, {}};
  }
  whole.metadata.state_dict_metadata["rows"] = rows;
  whole.metadata.state_dict_metadata["full"] = TensorStorageMetadata{{at::kDouble, true}, {2}, {{{0}, {2}}}};
  whole.storage_data[{"full", Sizes{0}, std::nullopt}] = {"__0_0.distcp",   8192, 16, 7, true,
                                                          {"stream.zstd/1"}};
  whole.metadata.state_dict_metadata["step"] = dcp::BytesStorageMetadata{};
  whole.storage_data[{"step", std::nullopt, std::nullopt}] = {"__0_0.distcp", 12288, 10, 0, true, {}};
  whole.metadata.state_dict_metadata["other"] = dcp::BytesStorageMetadata{};
  whole.storage_data[{"other", std::nullopt, std::nullopt}] = {"__1_0.distcp", 8192, 10, 0, true, {}};
  whole.metadata.planner_data["rows"] = {std::string("model"), std::string("rows")};
  whole.metadata.planner_data["step"] = {std::string("step"), std::int64_t{3}};
  whole.metadata.storage_meta = dcp::StorageMeta{"/ckpt/a", "save-1", ""};
  whole.metadata.version = "1.0.0";

  // A rank holding rows [3, 6) of "rows" (the first two saved chunks), all of
  // "full", "step", and a key the checkpoint lacks.
  dcp::MetadataRequest request;
  request.keys.push_back({"rows", std::vector<ChunkStorageMetadata>{{{3, 0}, {3, 4}}}});
  request.keys.push_back({"full", std::nullopt});
  request.keys.push_back({"step", std::nullopt});
  request.keys.push_back({"absent", std::nullopt});
  const auto part = dcp::metadata_part(whole, request);
  const auto& md = part.metadata.state_dict_metadata;
  BOOST_TEST(md.size() == 3u);
  BOOST_TEST(!md.count("other"));
  BOOST_TEST(!md.count("absent"));
  const auto& got_rows = std::get<TensorStorageMetadata>(md.at("rows"));
  BOOST_TEST(got_rows.size == rows.size, boost::test_tools::per_element());
  BOOST_REQUIRE_EQUAL(got_rows.chunks.size(), 2u);
  BOOST_TEST((got_rows.chunks[0] == rows.chunks[0]));
  BOOST_TEST((got_rows.chunks[1] == rows.chunks[1]));
  BOOST_TEST((md.at("full") == whole.metadata.state_dict_metadata.at("full")));
  BOOST_TEST(part.storage_data.size() == 4u);  // two row chunks, "full", "step"
  BOOST_TEST(!part.storage_data.count({"rows", Sizes{8, 0}, std::nullopt}));
  BOOST_TEST(!part.storage_data.count({"other", std::nullopt, std::nullopt}));
  BOOST_TEST(part.metadata.planner_data.size() == 2u);
  BOOST_TEST((part.metadata.storage_meta == whole.metadata.storage_meta));
  BOOST_TEST(part.metadata.version == "1.0.0");
  // A shard that touches no saved chunk's elements (an empty one) gets no
  // chunk; a chunk of the wrong number of dims gets all (the planner then
  // names the mismatch).
  request.keys = {{"rows", std::vector<ChunkStorageMetadata>{{{4, 0}, {0, 4}}}}};
  BOOST_TEST(std::get<TensorStorageMetadata>(
                 dcp::metadata_part(whole, request).metadata.state_dict_metadata.at("rows"))
                 .chunks.empty());
  request.keys = {{"rows", std::vector<ChunkStorageMetadata>{{{0}, {12}}}}};
  BOOST_TEST(std::get<TensorStorageMetadata>(
                 dcp::metadata_part(whole, request).metadata.state_dict_metadata.at("rows"))
                 .chunks.size() == 3u);

  // Cutting many parts at once (the coordinator's way, through an index of
  // each key's chunks) gives what a scan of every chunk gives: a 12×12 tensor
  // saved as a 3×4 grid, as columns and as uneven rows, against boxes of every
  // shape.
  const std::vector<std::vector<ChunkStorageMetadata>> layouts{
      {{{0, 0}, {4, 3}},
       {{0, 3}, {4, 3}},
       {{0, 6}, {4, 3}},
       {{0, 9}, {4, 3}},
       {{4, 0}, {4, 3}},
       {{4, 3}, {4, 3}},
       {{4, 6}, {4, 3}},
       {{4, 9}, {4, 3}},
       {{8, 0}, {4, 3}},
       {{8, 3}, {4, 3}},
       {{8, 6}, {4, 3}},
       {{8, 9}, {4, 3}}},
      {{{0, 8}, {12, 4}}, {{0, 0}, {12, 5}}, {{0, 5}, {12, 3}}},
      {{{7, 0}, {5, 12}}, {{0, 0}, {1, 12}}, {{1, 0}, {0, 12}}, {{1, 0}, {6, 12}}}};
  for (const auto& layout : layouts) {
    dcp::CheckpointMetadata grid;
    grid.metadata.state_dict_metadata["g"] = TensorStorageMetadata{{at::kFloat, false}, {12, 12}, layout};
    std::vector<dcp::MetadataRequest> requests;
    for (std::int64_t r0 = 0; r0 < 12; r0 += 3)
      for (std::int64_t c0 = 0; c0 < 12; c0 += 5)
        for (const Sizes& extent : {Sizes{1, 1}, Sizes{3, 7}, Sizes{12 - r0, 12 - c0}, Sizes{0, 4}})
          requests.push_back({{{"g", std::vector<ChunkStorageMetadata>{{{r0, c0}, extent}}}}});
    const auto parts = dcp::metadata_parts(grid, requests);
    BOOST_REQUIRE_EQUAL(parts.size(), requests.size());
    for (std::size_t i = 0; i < requests.size(); ++i) {
      const auto& box = requests[i].keys[0].chunks->front();
      std::vector<ChunkStorageMetadata> expected;
      for (const auto& c : layout) {
        bool meets = true;
        for (std::size_t d = 0; d < 2; ++d)
          meets = meets && std::max(c.offsets[d], box.offsets[d]) <
                               std::min(c.offsets[d] + c.sizes[d], box.offsets[d] + box.sizes[d]);
        if (meets) expected.push_back(c);
      }
      const auto& got = std::get<TensorStorageMetadata>(parts[i].metadata.state_dict_metadata.at("g")).chunks;
      BOOST_TEST((got == expected), "box at [" << box.offsets[0] << ", " << box.offsets[1] << "] of ["
                                               << box.sizes[0] << ", " << box.sizes[1] << "]");
    }
  }

  // The part and the request travel whole: storage data with its transforms,
  // planner data of text and integers, storage meta and version.
  const auto back = dcp::detail::decode_metadata_part(dcp::detail::encode_metadata_part(part));
  BOOST_TEST((back.metadata.state_dict_metadata == part.metadata.state_dict_metadata));
  BOOST_TEST((back.metadata.planner_data == part.metadata.planner_data));
  BOOST_TEST((back.metadata.storage_meta == part.metadata.storage_meta));
  BOOST_TEST(back.metadata.version == part.metadata.version);
  BOOST_TEST((back.storage_data == part.storage_data));
  const auto all = dcp::detail::decode_metadata_part(dcp::detail::encode_metadata_part(whole));
  BOOST_TEST((all.storage_data == whole.storage_data));
  // Any dtype a checkpoint holds travels, also those ckpt does not save.
  dcp::CheckpointMetadata odd;
  odd.metadata.state_dict_metadata["c"] = TensorStorageMetadata{{at::kComplexHalf, false}, {2}, {{{0}, {2}}}};
  BOOST_CHECK_THROW(dcp::detail::encode(odd.metadata), ckpt::Unsupported);
  BOOST_TEST((dcp::detail::decode_metadata_part(dcp::detail::encode_metadata_part(odd))
                  .metadata.state_dict_metadata == odd.metadata.state_dict_metadata));
  const dcp::MetadataRequest asked{
      {{"rows", std::vector<ChunkStorageMetadata>{{{3, 0}, {3, 4}}}}, {"full", std::nullopt}}};
  const auto asked_back = dcp::detail::decode_metadata_request(dcp::detail::encode(asked));
  BOOST_REQUIRE_EQUAL(asked_back.keys.size(), 2u);
  BOOST_TEST(asked_back.keys[0].fqn == "rows");
  BOOST_TEST((asked_back.keys[0].chunks == asked.keys[0].chunks));
  BOOST_TEST(!asked_back.keys[1].chunks.has_value());
  BOOST_CHECK_THROW(dcp::detail::decode_metadata_part("{\"keys\": 3}"), ckpt::Error);
  BOOST_CHECK_THROW(dcp::detail::decode_metadata_request("{\"keys\": [{}]}"), ckpt::Error);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(filesystem)

BOOST_AUTO_TEST_CASE(round_trip_without_a_process_group) {
  TempDir dir;
  const at::Tensor global = at::randn({9, 5});
  DcpStateDict saved = sample(1.0);
  saved.push_back({"sharded", sharded_of(global, 1, 0)});
  fill(std::get<ShardedTensor>(saved.back().second), global);
  saved.push_back({"nested", c10::IValue(std::vector<std::int64_t>{1, 2, 3, 4})});
  dcp::FileSystemWriter writer(dir.path());
  const auto md = dcp::save_state_dict(saved, writer, nullptr, nullptr, 0, true);
  BOOST_TEST(md.state_dict_metadata.size() == 5u);
  BOOST_TEST(std::filesystem::exists(dir / ".metadata"));
  BOOST_TEST(std::filesystem::exists(dir / "__0_0.distcp"));
  // PyTorch's format: a pickled .metadata, and every item a torch.save
  // archive of its own whose tensor record starts on a 4 KiB boundary.
  const auto text = read_text(dir / ".metadata");
  BOOST_TEST(static_cast<unsigned char>(text.at(0)) == 0x80u);
  const auto written = dcp::read_checkpoint_metadata(dir.path());
  BOOST_TEST(written.storage_data.size() == 5u);
  for (const auto& [index, info] : written.storage_data) {
    BOOST_TEST_CONTEXT(index.fqn) {
      BOOST_TEST(info.archive);
      BOOST_TEST(info.offset % 4096 == 0u);
      ckpt::FileReader archive(dir / info.relative_path, info.offset, info.length);
      if (index.offset) BOOST_TEST(archive.storage_record(*archive.root().tensor).data_offset % 4096 == 0u);
    }
  }

  DcpStateDict loaded = sample(0.0);
  loaded.push_back({"sharded", sharded_of(at::zeros({9, 5}), 1, 0)});
  loaded.push_back({"nested", c10::IValue()});
  const at::Tensor w_before = std::get<at::Tensor>(loaded[0].second);
  dcp::FileSystemReader reader(dir.path());
  dcp::load_state_dict(loaded, reader, nullptr, nullptr, 0, true);
  BOOST_TEST(
      ckpt::test::identical(std::get<at::Tensor>(loaded[0].second), std::get<at::Tensor>(saved[0].second)));
  // Tensors are filled in place: the caller's handle sees the values.
  BOOST_TEST(ckpt::test::identical(w_before, std::get<at::Tensor>(saved[0].second)));
  BOOST_TEST(std::get<c10::IValue>(loaded[1].second).toInt() == 1);
  BOOST_TEST(
      ckpt::test::identical(std::get<at::Tensor>(loaded[2].second), std::get<at::Tensor>(saved[2].second)));
  BOOST_TEST(
      ckpt::test::identical(std::get<ShardedTensor>(loaded[3].second).local_shards()[0].tensor, global));
  const auto nested = std::get<c10::IValue>(loaded[4].second).toList();
  BOOST_REQUIRE_EQUAL(nested.size(), 4u);
  for (std::size_t i = 0; i < 4; ++i) BOOST_TEST(nested.get(i).toInt() == static_cast<std::int64_t>(i + 1));
}

BOOST_AUTO_TEST_CASE(every_item_is_a_torch_save_archive) {
  TempDir dir;
  DcpStateDict saved = sample(2.0);
  dcp::FileSystemWriter writer(dir.path());
  dcp::save_state_dict(saved, writer, nullptr, nullptr, 0, true);
  const auto md = dcp::read_checkpoint_metadata(dir.path());
  const auto& w = md.storage_data.at(dcp::MetadataIndex{"w", Sizes{0, 0}, std::nullopt});
  const auto& step = md.storage_data.at(dcp::MetadataIndex{"step", std::nullopt, std::nullopt});
  // Python's torch.load reads each item from its slice of the data file.
  const auto r = ckpt::test::run(
      ckpt::test::python() + " -c " +
      ckpt::test::sh_quote(
          "import io, sys, torch\n"
          "data = open(sys.argv[1], 'rb').read()\n"
          "def item(o, n): return torch.load(io.BytesIO(data[int(o):int(o) + int(n)]))\n"
          "w = item(sys.argv[2], sys.argv[3])\n"
          "assert torch.equal(w, torch.arange(12, dtype=torch.float32).reshape(3, 4) + 2), w\n"
          "assert item(sys.argv[4], sys.argv[5]) == 2\n"
          "print('ok')\n") +
      fmt::format(" {} {} {} {} {}", ckpt::test::sh_quote((dir / w.relative_path).string()), w.offset,
                  w.length, step.offset, step.length));
  BOOST_TEST(r.status == 0, ckpt::test::describe(r));
  BOOST_TEST(r.output.find("ok") != std::string::npos, r.output);
}

BOOST_AUTO_TEST_CASE(plan_caching_reuses_unchanged_plans_and_never_data) {
  // A planner that counts the global plans it makes (what the cache spares).
  struct Counting : dcp::DefaultSavePlanner {
    explicit Counting(bool caching) : DefaultSavePlanner(true, caching) {}
    int merges = 0;
    std::pair<std::vector<dcp::SavePlan>, dcp::Metadata> create_global_plan(
        std::vector<dcp::SavePlan> plans) override {
      ++merges;
      return DefaultSavePlanner::create_global_plan(std::move(plans));
    }
  };
  // A writer that fails in write_data when told to.
  struct Failing : dcp::FileSystemWriter {
    using FileSystemWriter::FileSystemWriter;
    bool fail = false;
    std::future<std::vector<dcp::WriteResult>> write_data(const dcp::SavePlan& plan,
                                                          dcp::SavePlanner& planner) override {
      if (fail) throw std::runtime_error("disk gone");
      return FileSystemWriter::write_data(plan, planner);
    }
  };
  const auto state = [](double v, bool more) {
    DcpStateDict sd{{"a", at::full({4, 3}, v)},
                    {"s", ShardedTensor::full(ChunkShardingSpec{0, {"rank:0/cpu"}}, {6, 2}, 0, v)},
                    {"step", c10::IValue(static_cast<std::int64_t>(v))}};
    if (more) sd.emplace_back("b", at::full({2}, v));
    return sd;
  };
  const auto loads_as = [](const std::filesystem::path& dir, const DcpStateDict& saved) {
    DcpStateDict sd = saved;
    for (auto& [key, value] : sd) {
      if (auto* t = std::get_if<at::Tensor>(&value)) *t = at::zeros_like(*t);
      if (auto* st = std::get_if<ShardedTensor>(&value))
        for (auto& shard : st->local_shards()) shard.tensor = at::zeros_like(shard.tensor);
    }
    dcp::FileSystemReader reader(dir);
    dcp::load_state_dict(sd, reader, nullptr, nullptr, 0, true);
    BOOST_REQUIRE_EQUAL(sd.size(), saved.size());
    for (std::size_t i = 0; i < sd.size(); ++i) {
      const auto& [key, got] = sd[i];
      const auto& want = saved[i].second;
      if (const auto* t = std::get_if<at::Tensor>(&want))
        BOOST_TEST(at::equal(std::get<at::Tensor>(got), *t), key);
      else if (const auto* st = std::get_if<ShardedTensor>(&want))
        BOOST_TEST(
            at::equal(std::get<ShardedTensor>(got).local_shards()[0].tensor, st->local_shards()[0].tensor),
            key);
      else
        BOOST_TEST(std::get<c10::IValue>(got).toInt() == std::get<c10::IValue>(want).toInt(), key);
    }
  };
  TempDir dir;
  Counting planner(true);
  Failing writer(dir / "c");
  const auto save = [&](const DcpStateDict& sd) {
    writer.reset(dir / "c");
    dcp::save_state_dict(sd, writer, &planner, nullptr, 0, true);
  };
  save(state(1, false));
  BOOST_TEST(planner.merges == 1);
  // The same layout with new values: the plan is reused, the values are new.
  save(state(2, false));
  BOOST_TEST(planner.merges == 1);
  loads_as(dir / "c", state(2, false));
  // A key more: planned afresh.
  save(state(3, true));
  BOOST_TEST(planner.merges == 2);
  loads_as(dir / "c", state(3, true));
  // A failed save drops the cache: the next one plans afresh, and the last
  // good checkpoint stayed whole meanwhile.
  writer.fail = true;
  BOOST_CHECK_THROW(save(state(4, true)), ckpt::CheckpointException);
  loads_as(dir / "c", state(3, true));
  writer.fail = false;
  const int before = planner.merges;
  save(state(5, true));
  BOOST_TEST(planner.merges == before + 1);
  loads_as(dir / "c", state(5, true));
  save(state(6, true));
  BOOST_TEST(planner.merges == before + 1);
  loads_as(dir / "c", state(6, true));
  // Without caching every save plans.
  Counting plain(false);
  for (double v : {7.0, 8.0}) {
    writer.reset(dir / "c");
    dcp::save_state_dict(state(v, true), writer, &plain, nullptr, 0, true);
  }
  BOOST_TEST(plain.merges == 2);
  loads_as(dir / "c", state(8, true));
}

BOOST_AUTO_TEST_CASE(a_save_that_fails_before_its_commit_leaves_the_last_checkpoint_whole) {
  TempDir dir;
  dcp::FileSystemWriter first(dir.path());
  dcp::save_state_dict(sample(1.0), first, nullptr, nullptr, 0, true);

  struct FailsAtFinish : dcp::FileSystemWriter {
    using FileSystemWriter::FileSystemWriter;
    void finish(const dcp::Metadata&, const std::vector<std::vector<dcp::WriteResult>>&) override {
      throw ckpt::IoError("No space left on device (injected)");
    }
  } failing(dir.path());
  const auto e =
      checkpoint_exception([&] { dcp::save_state_dict(sample(7.0), failing, nullptr, nullptr, 0, true); });
  BOOST_REQUIRE_EQUAL(e.failures().size(), 1u);
  BOOST_TEST(e.failures().at(0).type == "IoError");
  BOOST_TEST(e.failures().at(0).message.find("No space left") != std::string::npos);
  // The new data went under a fresh token; the old checkpoint reads back as it was.
  std::size_t data_files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path()))
    data_files += entry.path().extension() == ".distcp";
  BOOST_TEST(data_files == 2u);
  DcpStateDict loaded = sample(0.0);
  dcp::FileSystemReader reader(dir.path());
  dcp::load_state_dict(loaded, reader, nullptr, nullptr, 0, true);
  BOOST_TEST(std::get<c10::IValue>(loaded[1].second).toInt() == 1);
  BOOST_TEST(ckpt::test::identical(std::get<at::Tensor>(loaded[0].second),
                                   std::get<at::Tensor>(sample(1.0)[0].second)));

  // The next save commits and removes every file the new metadata does not name.
  dcp::FileSystemWriter third(dir.path());
  dcp::save_state_dict(sample(3.0), third, nullptr, nullptr, 0, true);
  data_files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path()))
    data_files += entry.path().extension() == ".distcp";
  BOOST_TEST(data_files == 1u);
  dcp::FileSystemReader reader3(dir.path());
  dcp::load_state_dict(loaded, reader3, nullptr, nullptr, 0, true);
  BOOST_TEST(std::get<c10::IValue>(loaded[1].second).toInt() == 3);
}

BOOST_AUTO_TEST_CASE(a_partial_load_reads_only_what_it_asks_for) {
  TempDir dir;
  DcpStateDict saved{{"big", at::randn({256, 256})}, {"small", at::arange(10, at::kLong)}};
  dcp::FileSystemWriter writer(dir.path());
  dcp::save_state_dict(saved, writer, nullptr, nullptr, 0, true);
  DcpStateDict loaded{{"small", at::zeros({10}, at::kLong)}, {"absent", at::zeros({1})}};
  dcp::FileSystemReader strict_reader(dir.path());
  const auto e =
      checkpoint_exception([&] { dcp::load_state_dict(loaded, strict_reader, nullptr, nullptr, 0, true); });
  BOOST_TEST(e.failures().at(0).type == "MissingKeys");
  BOOST_TEST(e.failures().at(0).message.find("absent") != std::string::npos);

  dcp::FileSystemReader reader(dir.path());
  dcp::DefaultLoadPlanner partial(true);
  dcp::load_state_dict(loaded, reader, &partial, nullptr, 0, true);
  BOOST_TEST(ckpt::test::identical(std::get<at::Tensor>(loaded[0].second), at::arange(10, at::kLong)));
  BOOST_TEST(std::get<at::Tensor>(loaded[1].second).item<float>() == 0.0f);
  // The metadata, the item's zip directory and pickle, and its 80 bytes:
  // nothing of "big".
  const auto floor = std::filesystem::file_size(dir / ".metadata") + 10 * sizeof(std::int64_t);
  BOOST_TEST(reader.bytes_read() >= floor);
  BOOST_TEST(reader.bytes_read() <= floor + 4096);
}

BOOST_AUTO_TEST_CASE(a_chunk_read_in_pieces_on_several_threads_is_checked_whole) {
  TempDir dir;
  const at::Tensor big = at::arange(512 * 512, at::kFloat).reshape({512, 512});  // 1 MiB
  dcp::FileSystemWriter writer(dir.path());
  dcp::save_state_dict(DcpStateDict{{"big", big}}, writer, nullptr, nullptr, 0, true);
  const auto load = [&](dcp::FileSystemReaderOptions options) {
    DcpStateDict loaded{{"big", at::zeros({512, 512})}};
    dcp::FileSystemReader reader(dir.path(), options);
    dcp::load_state_dict(loaded, reader, nullptr, nullptr, 0, true);
    BOOST_TEST(ckpt::test::identical(std::get<at::Tensor>(loaded[0].second), big));
    return reader.data_reads();
  };
  // 4 KiB pieces: 256 reads, spread over the threads, their CRC-32s combined.
  BOOST_TEST(load({.read_threads = 1, .read_size = 4096}) == 256u);
  BOOST_TEST(load({.read_threads = 3, .read_size = 4096}) == 256u);
  BOOST_TEST(load({}) == 1u);  // 4 MiB pieces: one read

  // A flipped byte in piece 100 fails the CRC-32 of the whole chunk.
  const auto [data, record] = tensor_record(dir.path(), "big", Sizes{0, 0});
  ckpt::test::flip_byte(data, record + 100 * 4096 + 7);
  for (const int threads : {1, 3}) {
    DcpStateDict loaded{{"big", at::zeros({512, 512})}};
    dcp::FileSystemReader reader(dir.path(), {.read_threads = threads, .read_size = 4096});
    const auto e =
        checkpoint_exception([&] { dcp::load_state_dict(loaded, reader, nullptr, nullptr, 0, true); });
    BOOST_TEST(e.failures().at(0).type == "CorruptCheckpoint");
    BOOST_TEST(e.failures().at(0).message.find("CRC-32") != std::string::npos, e.failures().at(0).message);
    BOOST_TEST(e.failures().at(0).message.find("big") != std::string::npos, e.failures().at(0).message);
  }
  BOOST_CHECK_THROW(dcp::FileSystemReader(dir.path(), {.read_threads = 0}), ckpt::Error);
}

BOOST_AUTO_TEST_CASE(a_partial_read_is_checked_block_by_block) {
  // ckpt's writers keep a CRC-32 per 4 KiB block of every record after a data
  // file's archives: a load that reads part of a chunk checks what it reads,
  // which the record's one CRC-32 cannot do.
  TempDir dir;
  const at::Tensor big = at::arange(256 * 1024, at::kFloat).reshape({256, 1024});  // rows of 4 KiB
  dcp::FileSystemWriter writer(dir.path());
  dcp::save_state_dict(DcpStateDict{{"big", big}}, writer, nullptr, nullptr, 0, true);
  const auto [data, record] = tensor_record(dir.path(), "big", Sizes{0, 0});
  // Rank `rank` of 2 loads its half of the rows (dim 0) or of the columns (dim 1).
  const auto load_half = [&](std::int64_t dim, std::int64_t rank, dcp::FileSystemReaderOptions options = {}) {
    const ChunkShardingSpec spec{dim, {"rank:0/cpu", "rank:1/cpu"}};
    DcpStateDict loaded{{"big", ShardedTensor::zeros(spec, {256, 1024}, rank, at::kFloat)}};
    dcp::FileSystemReader reader(dir.path(), options);
    dcp::load_state_dict(loaded, reader, nullptr, nullptr, 0, true);
    return std::get<ShardedTensor>(loaded[0].second).local_shards().at(0).tensor;
  };
  BOOST_TEST(ckpt::test::identical(load_half(0, 1), big.narrow(0, 128, 128)));
  BOOST_TEST(ckpt::test::identical(load_half(1, 0), big.narrow(1, 0, 512)));

  // A flipped byte in row 200 (block 200): a load that reads any of that
  // block fails, naming it; the half of the rows without it loads.
  ckpt::test::flip_byte(data, record + 200 * 4096 + 100);
  for (const auto& [dim, rank] : {std::pair<std::int64_t, std::int64_t>{0, 1}, {1, 0}, {1, 1}}) {
    BOOST_TEST_CONTEXT("rank " << rank << "'s half along dim " << dim) {
      const auto e = checkpoint_exception([&] { load_half(dim, rank); });
      const auto& f = e.failures().at(0);
      BOOST_TEST(f.type == "CorruptCheckpoint");
      BOOST_TEST(f.message.find("block 200 ") != std::string::npos, f.message);
      BOOST_TEST(f.message.find("CRC-32") != std::string::npos, f.message);
      BOOST_TEST(f.message.find("big") != std::string::npos, f.message);
    }
  }
  BOOST_TEST(ckpt::test::identical(load_half(0, 0), big.narrow(0, 0, 128)));
  // Rows of 4,000 bytes: a half starts and ends inside a block, whose other
  // bytes are read around the rows (into scratch memory) to check it.
  TempDir odd_dir;
  const at::Tensor odd = at::arange(300 * 1000, at::kFloat).reshape({300, 1000});
  dcp::FileSystemWriter odd_writer(odd_dir.path());
  dcp::save_state_dict(DcpStateDict{{"odd", odd}}, odd_writer, nullptr, nullptr, 0, true);
  const auto load_odd_half = [&](std::int64_t rank) {
    const ChunkShardingSpec spec{0, {"rank:0/cpu", "rank:1/cpu"}};
    DcpStateDict loaded{{"odd", ShardedTensor::zeros(spec, {300, 1000}, rank, at::kFloat)}};
    dcp::FileSystemReader reader(odd_dir.path());
    dcp::load_state_dict(loaded, reader, nullptr, nullptr, 0, true);
    return std::get<ShardedTensor>(loaded[0].second).local_shards().at(0).tensor;
  };
  BOOST_TEST(ckpt::test::identical(load_odd_half(1), odd.narrow(0, 150, 150)));
  BOOST_TEST(ckpt::test::identical(load_odd_half(0), odd.narrow(0, 0, 150)));
  // Row 149's last byte shares block 146 with row 150: both halves check it.
  const auto [odd_data, odd_record] = tensor_record(odd_dir.path(), "odd", Sizes{0, 0});
  ckpt::test::flip_byte(odd_data, odd_record + 150 * 4000 - 1);
  for (const std::int64_t rank : {0, 1}) BOOST_TEST_CONTEXT("rank " << rank) {
      const auto e = checkpoint_exception([&] { load_odd_half(rank); });
      BOOST_TEST(e.failures().at(0).message.find("block 146 ") != std::string::npos,
                 e.failures().at(0).message);
    }

  // Unchecked, the damage goes through: what the blocks' CRCs buy.
  BOOST_TEST(!ckpt::test::identical(load_half(0, 1, {.verify_blocks = false}), big.narrow(0, 128, 128)));
  ckpt::test::flip_byte(data, record + 200 * 4096 + 100);

  // A damaged table is reported as such.
  const auto size = std::filesystem::file_size(data);
  ckpt::test::flip_byte(data, size - 30);
  const auto e = checkpoint_exception([&] { load_half(0, 1); });
  BOOST_TEST(e.failures().at(0).type == "CorruptCheckpoint");
  BOOST_TEST(e.failures().at(0).message.find("table of block CRC-32s is damaged") != std::string::npos,
             e.failures().at(0).message);
  ckpt::test::flip_byte(data, size - 30);
  BOOST_TEST(ckpt::test::identical(load_half(0, 1), big.narrow(0, 128, 128)));

  // A footer that claims the whole file as its table is refused before the
  // table is read (its head says how long it can be).
  std::string footer(24, '\0');
  {
    std::ifstream in(data, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(size - 24));
    in.read(footer.data(), 24);
  }
  std::string hostile = footer;
  const std::uint64_t whole = size - 24;
  std::memset(hostile.data(), 0, 8);  // the table at offset 0
  for (int b = 0; b < 8; ++b) hostile[8 + b] = static_cast<char>((whole >> (8 * b)) & 0xff);
  const auto put = [&](std::uint64_t at, const std::string& bytes) {
    std::fstream out(data, std::ios::binary | std::ios::in | std::ios::out);
    out.seekp(static_cast<std::streamoff>(at));
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  };
  put(size - 24, hostile);
  auto refused = checkpoint_exception([&] { load_half(0, 1); });
  BOOST_TEST(refused.failures().at(0).message.find("not a table of") != std::string::npos,
             refused.failures().at(0).message);
  // ... even with a table's head there (in row 0, which rank 1 never reads):
  // one record cannot need most of the file.
  std::string claim(24, '\0');
  for (int b = 0; b < 8; ++b) {
    claim[b] = static_cast<char>((record >> (8 * b)) & 0xff);
    claim[8 + b] = static_cast<char>(((size - 24 - record) >> (8 * b)) & 0xff);
  }
  claim.replace(16, 8, footer.substr(16, 8));
  const std::string row0 = read_text(data).substr(record, 16);
  put(record, std::string("CKPTBLKS\x00\x10\x00\x00\x01\x00\x00\x00", 16));
  put(size - 24, claim);
  refused = checkpoint_exception([&] { load_half(0, 1); });
  BOOST_TEST(refused.failures().at(0).message.find("do not fit a table of 1 records") != std::string::npos,
             refused.failures().at(0).message);
  put(record, row0);
  put(size - 24, footer);
  BOOST_TEST(ckpt::test::identical(load_half(0, 1), big.narrow(0, 128, 128)));
}

BOOST_AUTO_TEST_CASE(a_column_shard_of_narrow_rows_is_read_by_a_few_reads) {
  // 4096 rows of 64 bytes; the first 8 of the 16 columns are 4096 ranges of
  // 32 bytes, 32 bytes apart.
  TempDir dir;
  const at::Tensor narrow = at::arange(4096 * 16, at::kFloat).reshape({4096, 16});
  dcp::FileSystemWriter writer(dir.path());
  dcp::save_state_dict(DcpStateDict{{"narrow", narrow}}, writer, nullptr, nullptr, 0, true);
  const ChunkShardingSpec by_columns{1, {"rank:0/cpu", "rank:1/cpu"}};
  const auto load = [&](dcp::FileSystemReaderOptions options) {
    DcpStateDict loaded{{"narrow", ShardedTensor::zeros(by_columns, {4096, 16}, 0, at::kFloat)}};
    auto reader = std::make_unique<dcp::FileSystemReader>(dir.path(), options);
    dcp::load_state_dict(loaded, *reader, nullptr, nullptr, 0, true);
    const auto& shard = std::get<ShardedTensor>(loaded[0].second).local_shards().at(0).tensor;
    BOOST_TEST(ckpt::test::identical(shard, narrow.narrow(1, 0, 8)));
    return reader;
  };
  const auto exact = load({.coalesce_gap = 0, .verify_blocks = false});
  BOOST_TEST(exact->data_reads() == 4096u);  // one read per row
  // The default joins the ranges and their 4095 gaps: one read of the span.
  const auto joined = load({.verify_blocks = false});
  BOOST_TEST(joined->data_reads() == 1u);
  BOOST_TEST(joined->bytes_read() == exact->bytes_read() + 4095 * 32);

  // Rows of 16 KiB, half of each: ranges of 8 KiB, 8 KiB apart. Joined (a
  // coalesce_gap of 8 KiB) they are one vectored read of 127 buffers, the
  // ranges read straight into the shard.
  TempDir wide_dir;
  const at::Tensor wide = at::arange(64 * 4096, at::kFloat).reshape({64, 4096});
  dcp::FileSystemWriter wide_writer(wide_dir.path());
  dcp::save_state_dict(DcpStateDict{{"wide", wide}}, wide_writer, nullptr, nullptr, 0, true);
  for (const std::size_t gap : {std::size_t{0}, std::size_t{8192}}) {
    DcpStateDict loaded{{"wide", ShardedTensor::zeros(by_columns, {64, 4096}, 0, at::kFloat)}};
    dcp::FileSystemReader reader(wide_dir.path(), {.coalesce_gap = gap, .verify_blocks = false});
    dcp::load_state_dict(loaded, reader, nullptr, nullptr, 0, true);
    const auto& shard = std::get<ShardedTensor>(loaded[0].second).local_shards().at(0).tensor;
    BOOST_TEST(ckpt::test::identical(shard, wide.narrow(1, 0, 2048)));
    BOOST_TEST(reader.data_reads() == (gap == 0 ? 64u : 1u));
  }

  // Three dims: saved in 2 chunks along dim 1, loaded split along dim 2, so
  // every read walks dim 0 and strides along dim 1; either way the same values.
  TempDir cube_dir;
  const at::Tensor cube = at::arange(6 * 10 * 12, at::kFloat).reshape({6, 10, 12});
  {
    auto saved =
        ShardedTensor::zeros(ChunkShardingSpec{1, {"rank:0/cpu", "rank:0/cpu"}}, {6, 10, 12}, 0, at::kFloat);
    fill(saved, cube);
    dcp::FileSystemWriter cube_writer(cube_dir.path());
    dcp::save_state_dict(DcpStateDict{{"cube", saved}}, cube_writer, nullptr, nullptr, 0, true);
  }
  for (const std::size_t gap : {std::size_t{0}, std::size_t{4096}}) {
    const ChunkShardingSpec by_dim2{2, {"rank:0/cpu", "rank:1/cpu"}};
    DcpStateDict loaded{{"cube", ShardedTensor::zeros(by_dim2, {6, 10, 12}, 1, at::kFloat)}};
    dcp::FileSystemReader reader(cube_dir.path(), {.coalesce_gap = gap, .verify_blocks = false});
    dcp::load_state_dict(loaded, reader, nullptr, nullptr, 0, true);
    const auto& shard = std::get<ShardedTensor>(loaded[0].second).local_shards().at(0).tensor;
    BOOST_TEST(ckpt::test::identical(shard, cube.narrow(2, 6, 6)));
    // Per saved chunk, 6 x 5 ranges of 24 bytes: one read each, or one per
    // row of dim 0 (the ranges along dim 1 joined).
    BOOST_TEST(reader.data_reads() == (gap == 0 ? 60u : 12u));
  }
}

BOOST_AUTO_TEST_CASE(wrong_shapes_and_dtypes_are_refused) {
  TempDir dir;
  dcp::FileSystemWriter writer(dir.path());
  dcp::save_state_dict(sample(1.0), writer, nullptr, nullptr, 0, true);
  DcpStateDict shape = sample(0.0);
  shape[0].second = at::zeros({4, 3});
  dcp::FileSystemReader reader(dir.path());
  auto e = checkpoint_exception([&] { dcp::load_state_dict(shape, reader, nullptr, nullptr, 0, true); });
  BOOST_TEST(e.failures().at(0).type == "Mismatch");
  BOOST_TEST(e.failures().at(0).message.find(
                 "Size mismatch between saved [3, 4] and current: [4, 3] for w") != std::string::npos);
  DcpStateDict dtype = sample(0.0);
  dtype[0].second = at::zeros({3, 4}, at::kDouble);
  e = checkpoint_exception([&] { dcp::load_state_dict(dtype, reader, nullptr, nullptr, 0, true); });
  BOOST_TEST(e.failures().at(0).type == "Mismatch");
  BOOST_TEST(e.failures().at(0).message.find("dtype") != std::string::npos);
  DcpStateDict kind = sample(0.0);
  kind[1].second = at::zeros({1});
  e = checkpoint_exception([&] { dcp::load_state_dict(kind, reader, nullptr, nullptr, 0, true); });
  BOOST_TEST(e.failures().at(0).message.find("saved as a value") != std::string::npos);
}

/// The one failure of loading sample(0.0) from `dir` alone.
ckpt::RankFailure first_load_failure(const std::filesystem::path& dir) {
  DcpStateDict sd = sample(0.0);
  dcp::FileSystemReader reader(dir);
  const auto e = checkpoint_exception([&] { dcp::load_state_dict(sd, reader, nullptr, nullptr, 0, true); });
  BOOST_REQUIRE_EQUAL(e.failures().size(), 1u);
  return e.failures().at(0);
}

BOOST_AUTO_TEST_CASE(corrupt_checkpoints_are_reported_and_never_followed) {
  TempDir dir;
  dcp::FileSystemWriter writer(dir.path());
  dcp::save_state_dict(sample(1.0), writer, nullptr, nullptr, 0, true);
  const auto md_text = read_text(dir / ".metadata");
  const auto load_error = [&] { return first_load_failure(dir.path()); };

  // A flipped byte in a tensor's data: its record's CRC-32 says so.
  const auto md = dcp::read_checkpoint_metadata(dir.path());
  const auto& w = md.storage_data.at(dcp::MetadataIndex{"w", Sizes{0, 0}, std::nullopt});
  const auto [data, w_data] = tensor_record(dir.path(), "w", Sizes{0, 0});
  ckpt::test::flip_byte(data, w_data + 5);
  auto f = load_error();
  BOOST_TEST(f.type == "CorruptCheckpoint");
  BOOST_TEST(f.message.find("CRC-32") != std::string::npos, f.message);
  ckpt::test::flip_byte(data, w_data + 5);

  // A truncated data file.
  const auto size = std::filesystem::file_size(data);
  const auto whole = read_text(data);
  std::filesystem::resize_file(data, w.offset + w.length / 2);
  f = load_error();
  BOOST_TEST(f.type == "CorruptCheckpoint");
  BOOST_TEST(f.message.find("truncated") != std::string::npos, f.message);
  write_text(data, whole);
  BOOST_TEST(std::filesystem::file_size(data) == size);

  // Metadata cut short.
  write_text(dir / ".metadata", md_text.substr(0, md_text.size() / 2));
  f = load_error();
  BOOST_TEST(f.type == "CorruptCheckpoint");
  // A file name that leaves the directory (same length, so the pickle holds).
  const auto name = w.relative_path;
  std::string escaped = md_text;
  for (auto at = escaped.find(name); at != std::string::npos; at = escaped.find(name, at + 1))
    escaped.replace(at, 3, "../");
  write_text(dir / ".metadata", escaped);
  f = load_error();
  BOOST_TEST(f.type == "CorruptCheckpoint");
  BOOST_TEST(f.message.find("not a plain name") != std::string::npos, f.message);
  // A FIFO where the metadata should be: refused, never waited on.
  std::filesystem::remove(dir / ".metadata");
  BOOST_REQUIRE(::mkfifo((dir / ".metadata").c_str(), 0600) == 0);
  f = load_error();
  BOOST_TEST(f.type == "CorruptCheckpoint");
  BOOST_TEST(f.message.find("not a regular file") != std::string::npos, f.message);

  // No checkpoint at all.
  std::filesystem::remove(dir / ".metadata");
  f = load_error();
  BOOST_TEST(f.type == "NotFound");
  // Nothing was harmed: restore the metadata and everything loads again.
  write_text(dir / ".metadata", md_text);
  DcpStateDict sd = sample(0.0);
  dcp::FileSystemReader reader(dir.path());
  dcp::load_state_dict(sd, reader, nullptr, nullptr, 0, true);
  BOOST_TEST(std::get<c10::IValue>(sd[1].second).toInt() == 1);
}

BOOST_AUTO_TEST_CASE(ckpt_json_dialect_directories_still_load) {
  // What ckpt's earlier FileSystemWriter wrote: one torch zip per rank
  // holding every item by name, and JSON metadata pointing at each tensor
  // record's bytes with their CRC-32.
  TempDir dir;
  write_json_dialect(dir.path(), sample(1.0));
  const auto md_text = read_text(dir / ".metadata");
  const auto load_error = [&] { return first_load_failure(dir.path()); };
  {
    DcpStateDict sd = sample(0.0);
    dcp::FileSystemReader reader(dir.path());
    dcp::load_state_dict(sd, reader, nullptr, nullptr, 0, true);
    for (std::size_t i : {0u, 2u})
      BOOST_TEST(ckpt::test::identical(std::get<at::Tensor>(sd[i].second),
                                       std::get<at::Tensor>(sample(1.0)[i].second)));
    BOOST_TEST(std::get<c10::IValue>(sd[1].second).toInt() == 1);
  }
  // A flipped byte: the chunk's CRC-32 in the JSON says so.
  const auto md = dcp::read_checkpoint_metadata(dir.path());
  const auto& w = md.storage_data.at(dcp::MetadataIndex{"w", Sizes{0, 0}, std::nullopt});
  BOOST_TEST(!w.archive);
  ckpt::test::flip_byte(dir / "__0_0.distcp", w.offset + 5);
  auto f = load_error();
  BOOST_TEST(f.message.find("CRC-32") != std::string::npos, f.message);
  ckpt::test::flip_byte(dir / "__0_0.distcp", w.offset + 5);

  // Metadata that points outside the directory, is newer, or is not JSON.
  const auto replaced = [&](const std::string& from, const std::string& to) {
    auto t = md_text;
    for (auto at = t.find(from); at != std::string::npos; at = t.find(from, at + to.size()))
      t.replace(at, from.size(), to);
    return t;
  };
  write_text(dir / ".metadata", replaced("__0_0.distcp", "../__0_0.distcp"));
  f = load_error();
  BOOST_TEST(f.type == "CorruptCheckpoint");
  BOOST_TEST(f.message.find("not a plain name") != std::string::npos, f.message);
  write_text(dir / ".metadata", replaced("\"version\":1", "\"version\":99"));
  f = load_error();
  BOOST_TEST(f.message.find("version 99") != std::string::npos, f.message);
  write_text(dir / ".metadata", md_text.substr(0, md_text.size() / 2));
  f = load_error();
  BOOST_TEST(f.type == "CorruptCheckpoint");
  BOOST_TEST(f.message.find("not JSON") != std::string::npos, f.message);
  write_text(dir / ".metadata", replaced("\"sizes\":[3,4]", "\"sizes\":[3,400000000000]"));
  f = load_error();
  BOOST_TEST(f.type == "CorruptCheckpoint");
  BOOST_TEST(f.message.find("outside the tensor") != std::string::npos, f.message);
  // Chunks that leave part of a tensor uncovered: a load would leave a gap.
  write_text(dir / ".metadata", replaced("\"chunks\":[{\"offsets\":[0,0],\"sizes\":[3,4]}]",
                                         "\"chunks\":[{\"offsets\":[0,0],\"sizes\":[2,4]}]"));
  f = load_error();
  BOOST_TEST(f.type == "CorruptCheckpoint");
  BOOST_TEST(f.message.find("Failed to validate") != std::string::npos, f.message);
}

BOOST_AUTO_TEST_CASE(views_conjugates_and_look_alike_names) {
  TempDir dir;
  const at::Tensor base = at::randn({6, 4});
  const at::Tensor z = at::randn({5}, at::kComplexFloat);
  DcpStateDict saved{{"column", base.select(1, 2)},   // strided view of a larger storage
                     {"rows", base.narrow(0, 2, 3)},  // offset view
                     {"conj", z.conj()}};
  dcp::FileSystemWriter writer(dir.path());
  dcp::save_state_dict(saved, writer, nullptr, nullptr, 0, true);
  DcpStateDict loaded{
      {"column", at::zeros({6})}, {"rows", at::zeros({3, 4})}, {"conj", at::zeros({5}, at::kComplexFloat)}};
  dcp::FileSystemReader reader(dir.path());
  dcp::load_state_dict(loaded, reader, nullptr, nullptr, 0, true);
  BOOST_TEST(ckpt::test::identical(std::get<at::Tensor>(loaded[0].second), base.select(1, 2).contiguous()));
  BOOST_TEST(
      ckpt::test::identical(std::get<at::Tensor>(loaded[1].second), base.narrow(0, 2, 3).contiguous()));
  BOOST_TEST(ckpt::test::identical(std::get<at::Tensor>(loaded[2].second), z.conj().resolve_conj()));
  // Only the bytes of the views were written, not their whole storage.
  const auto md = dcp::read_checkpoint_metadata(dir.path());
  const auto& column = md.storage_data.at(dcp::MetadataIndex{"column", Sizes{0}, std::nullopt});
  ckpt::FileReader archive(dir / column.relative_path, column.offset, column.length);
  BOOST_TEST(archive.storage_record(*archive.root().tensor).size == 6u * 4u);
  // A value named like another key's item ("w@0") is an item of its own.
  TempDir clash;
  dcp::FileSystemWriter clash_writer(clash.path());
  dcp::save_state_dict({{"w", at::ones({2})}, {"w@0", c10::IValue(1)}}, clash_writer, nullptr, nullptr, 0,
                       true);
  DcpStateDict back{{"w", at::zeros({2})}, {"w@0", c10::IValue()}};
  dcp::FileSystemReader clash_reader(clash.path());
  dcp::load_state_dict(back, clash_reader, nullptr, nullptr, 0, true);
  BOOST_TEST(ckpt::test::identical(std::get<at::Tensor>(back[0].second), at::ones({2})));
  BOOST_TEST(std::get<c10::IValue>(back[1].second).toInt() == 1);
}

BOOST_AUTO_TEST_CASE(without_a_group_several_ranks_is_an_error) {
  TempDir dir;
  ::setenv("WORLD_SIZE", "4", 1);
  dcp::FileSystemWriter writer(dir.path());
  BOOST_CHECK_EXCEPTION(dcp::save_state_dict(sample(1.0), writer), ckpt::Error,
                        [](const ckpt::Error& e) { return mentions(e, "no process group"); });
  ::unsetenv("WORLD_SIZE");
  // With WORLD_SIZE unset, no group means this process alone.
  dcp::save_state_dict(sample(1.0), writer);
  BOOST_TEST(std::filesystem::exists(dir / ".metadata"));
}

BOOST_AUTO_TEST_SUITE_END()

// --- the modern API over nested state dicts -------------------------------------

namespace {

/// A nested state dict as a trainer holds one: a model's parameters, an
/// optimizer state keyed by parameter number, lists of values and of tensors.
ckpt::StateDict nested_sample(double base) {
  ckpt::StateDict layer;
  layer.insert("weight", at::arange(6, at::kFloat).reshape({2, 3}) + base);
  ckpt::StateDict model;
  model.insert("layer", layer);
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  c10::impl::GenericDict slot(c10::StringType::get(), c10::AnyType::get());
  slot.insert("exp_avg", at::full({3}, base, at::kDouble));
  slot.insert("step", c10::IValue(static_cast<std::int64_t>(base)));
  state.insert(c10::IValue(std::int64_t{0}), slot);
  c10::impl::GenericDict group(c10::StringType::get(), c10::AnyType::get());
  group.insert("lr", c10::IValue(0.5 * base));
  group.insert("params", c10::IValue(std::vector<std::string>{"layer.weight"}));
  c10::impl::GenericList groups(c10::AnyType::get());
  groups.push_back(group);
  ckpt::StateDict optim;
  optim.insert("state", c10::IValue(state));
  optim.insert("param_groups", c10::IValue(groups));
  c10::impl::GenericList tensors(c10::AnyType::get());
  tensors.push_back(at::arange(4, at::kLong) * static_cast<std::int64_t>(base));
  tensors.push_back(c10::IValue(std::string("between")));
  ckpt::StateDict sd;
  sd.insert("model", model);
  sd.insert("optim", optim);
  sd.insert("flags", c10::IValue(std::vector<double>{1.0, base}));
  sd.insert("tensors", c10::IValue(tensors));
  sd.insert("pair", c10::ivalue::Tuple::create({c10::IValue(1), c10::IValue(base)}));
  return sd;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(nested)

BOOST_AUTO_TEST_CASE(flattening_follows_upstreams_rules) {
  const auto [flat, paths] = dcp::flatten_state_dict(nested_sample(2.0));
  std::vector<std::string> keys;
  for (const auto& [k, v] : flat) keys.push_back(k);
  // Every dict is entered (an int key as text), a list only when it holds a
  // tensor, a tuple never.
  const std::vector<std::string> want{"model.layer.weight",
                                      "optim.state.0.exp_avg",
                                      "optim.state.0.step",
                                      "optim.param_groups.0.lr",
                                      "optim.param_groups.0.params",
                                      "flags",
                                      "tensors.0",
                                      "tensors.1",
                                      "pair"};
  BOOST_TEST(keys == want, boost::test_tools::per_element());
  BOOST_TEST(std::holds_alternative<at::Tensor>(flat[0].second));
  BOOST_TEST(std::holds_alternative<c10::IValue>(flat[5].second));
  const dcp::ObjectPath state_path{std::string("optim"), std::string("state"), std::string("0"),
                                   std::string("exp_avg")};
  BOOST_TEST((paths.at("optim.state.0.exp_avg") == state_path));
  const dcp::ObjectPath list_path{std::string("tensors"), std::int64_t{1}};
  BOOST_TEST((paths.at("tensors.1") == list_path));

  // Two leaves that flatten to one key are refused.
  ckpt::StateDict clash;
  clash.insert("a.b", 1);
  ckpt::StateDict a;
  a.insert("b", 2);
  clash.insert("a", a);
  BOOST_CHECK_EXCEPTION(dcp::flatten_state_dict(clash), ckpt::Error,
                        [](const ckpt::Error& e) { return mentions(e, "'a.b'"); });
}

BOOST_AUTO_TEST_CASE(save_load_and_load_all_round_trip) {
  TempDir dir;
  const auto saved = nested_sample(3.0);
  dcp::save(saved, save_alone(dir.path()));
  const auto md = dcp::read_checkpoint_metadata(dir.path());
  BOOST_TEST(md.metadata.planner_data.size() == 9u);
  BOOST_TEST(md.metadata.storage_meta.has_value());

  // In place: tensors filled, values replaced where they sit (the int key stays an int).
  auto target = nested_sample(0.0);
  const at::Tensor weight = target.sub("model").sub("layer").at("weight").toTensor();
  dcp::load(target, load_alone(dir.path()));
  BOOST_TEST(ckpt::test::identical(weight, at::arange(6, at::kFloat).reshape({2, 3}) + 3.0));
  const auto slot =
      target.sub("optim").at("state").toGenericDict().at(c10::IValue(std::int64_t{0})).toGenericDict();
  BOOST_TEST(slot.at("step").toInt() == 3);
  BOOST_TEST(ckpt::test::identical(slot.at("exp_avg").toTensor(), at::full({3}, 3.0, at::kDouble)));
  const auto flags = target.at("flags").toListRef();
  BOOST_REQUIRE_EQUAL(flags.size(), 2u);
  BOOST_TEST(flags[1].toDouble() == 3.0);
  BOOST_TEST(target.at("pair").toTupleRef().elements().at(1).toDouble() == 3.0);
  const auto groups = target.sub("optim").at("param_groups").toList();
  BOOST_TEST(groups.get(0).toGenericDict().at("lr").toDouble() == 1.5);

  // Everything, unflattened from the planner data (dict keys come back as text, as upstream's).
  const auto all = dcp::load_all(dir.path(), load_alone());
  BOOST_TEST(ckpt::test::identical(all.sub("model").sub("layer").at("weight").toTensor(), weight));
  const auto all_slot = all.sub("optim").sub("state").sub("0");
  BOOST_TEST(all_slot.at("step").toInt() == 3);
  const auto list = all.at("tensors").toList();
  BOOST_REQUIRE_EQUAL(list.size(), 2u);
  BOOST_TEST(ckpt::test::identical(list.get(0).toTensor(), at::arange(4, at::kLong) * 3));
  BOOST_TEST(list.get(1).toStringRef() == "between");
  BOOST_TEST(
      all.sub("optim").at("param_groups").toList().get(0).toGenericDict().at("params").toList().get(0) ==
      c10::IValue(std::string("layer.weight")));
}

BOOST_AUTO_TEST_CASE(sharded_tensors_sit_in_nested_state_dicts) {
  TempDir dir;
  const at::Tensor global = at::randn({6, 4});
  ShardedTensor st = sharded_of(global, 1, 0);
  fill(st, global);
  ckpt::StateDict inner;
  inner.insert("embedding", dcp::sharded_value(st));
  ckpt::StateDict sd;
  sd.insert("model", inner);
  dcp::save(sd, save_alone(dir.path()));
  // Loaded into two row shards of a group of two (as rank 1 would hold them).
  ckpt::StateDict target_inner;
  target_inner.insert("embedding", dcp::sharded_value(sharded_of(at::zeros({6, 4}), 2, 1)));
  ckpt::StateDict target;
  target.insert("model", target_inner);
  dcp::load(target, load_alone(dir.path()));
  const auto* loaded = dcp::as_sharded(target.sub("model").at("embedding"));
  BOOST_REQUIRE(loaded);
  BOOST_TEST(ckpt::test::identical(loaded->local_shards().at(0).tensor, global.narrow(0, 3, 3)));
  BOOST_TEST(dcp::as_sharded(c10::IValue(1)) == nullptr);
  BOOST_CHECK_EXCEPTION(dcp::save(sd, {}), ckpt::Error,
                        [](const ckpt::Error& e) { return mentions(e, "checkpoint_id"); });
}

BOOST_AUTO_TEST_SUITE_END()

// --- replicated reads shared (the coordinator's plan) -----------------------------

BOOST_AUTO_TEST_SUITE(shared_reads)

namespace {

dcp::ReadItem read_of(const std::string& fqn, std::int64_t rows, std::int64_t dest_row = 0) {
  dcp::ReadItem item;
  item.dest_index = {fqn, std::vector<std::int64_t>{dest_row, 0}, std::nullopt};
  item.dest_offsets = {0, 0};
  item.storage_index = {fqn, std::vector<std::int64_t>{0, 0}, std::nullopt};
  item.storage_offsets = {0, 0};
  item.lengths = {rows, 10};
  return item;
}

/// 8 ranks on two hosts (0-3, 4-7): every rank plans "r" (100 rows) alike and
/// a chunk of its own; ranks 0 and 1 also plan "c" (50 rows) alike.
std::vector<dcp::LoadPlan> eight_plans() {
  std::vector<dcp::LoadPlan> plans(8);
  for (std::int64_t r = 0; r < 8; ++r) {
    plans[r].items.push_back(read_of(fmt::format("own{}", r), 10));
    plans[r].items.push_back(read_of("r", 100, r));  // each rank's destination differs
    if (r < 2) plans[r].items.push_back(read_of("c", 50));
  }
  return plans;
}

const std::vector<std::string> kHosts{"a", "a", "a", "a", "b", "b", "b", "b"};

/// The steps of tag `tag`, by rank.
std::map<std::int64_t, dcp::detail::ShareStep> steps_of(
    const std::vector<std::vector<dcp::detail::ShareStep>>& all, std::uint32_t tag) {
  std::map<std::int64_t, dcp::detail::ShareStep> out;
  for (std::size_t r = 0; r < all.size(); ++r)
    for (const auto& s : all[r])
      if (s.tag == tag) out.emplace(static_cast<std::int64_t>(r), s);
  return out;
}

bool plans_item(const dcp::LoadPlan& plan, const std::string& fqn) {
  for (const auto& i : plan.items)
    if (i.storage_index.fqn == fqn) return true;
  return false;
}

/// Follows the tree of one item from its reader: every member gets it once,
/// from a member that had it in an earlier round; returns the edges that
/// cross hosts, and checks that each member's parent lists it as a child.
int walk_tree(const std::map<std::int64_t, dcp::detail::ShareStep>& steps) {
  std::vector<std::int64_t> order;  // in the order they get the item
  for (const auto& [r, s] : steps)
    if (s.from < 0) order.push_back(r);
  BOOST_REQUIRE_EQUAL(order.size(), 1u);
  std::set<std::int64_t> have(order.begin(), order.end());
  int crossing = 0;
  for (std::size_t i = 0; i < order.size(); ++i)
    for (const auto child : steps.at(order[i]).to) {
      BOOST_REQUIRE(steps.count(child));
      BOOST_CHECK_EQUAL(steps.at(child).from, order[i]);
      BOOST_CHECK_MESSAGE(have.insert(child).second, "rank " << child << " gets the item twice");
      crossing += kHosts[order[i]] != kHosts[child];
      order.push_back(child);
    }
  BOOST_CHECK_EQUAL(have.size(), steps.size());
  return crossing;
}

}  // namespace

BOOST_AUTO_TEST_CASE(once_in_all_reads_each_item_once_and_sends_it_along_a_tree) {
  auto plans = eight_plans();
  const auto steps = dcp::detail::share_replicated_reads(plans, kHosts, /*once_in_all=*/true);
  // "c" and "r": tags in the order of what they read.
  const auto c = steps_of(steps, 0), r = steps_of(steps, 1);
  BOOST_REQUIRE_EQUAL(c.size(), 2u);
  BOOST_REQUIRE_EQUAL(r.size(), 8u);
  // The biggest item first, to the rank with the least to read (rank 0 of
  // the ties); the next to the least loaded of its ranks (rank 1).
  BOOST_CHECK_EQUAL(r.at(0).from, -1);
  BOOST_CHECK_EQUAL(c.at(1).from, -1);
  // Only the reader keeps the item in its plan; its own chunk stays with
  // every rank.
  for (std::int64_t rank = 0; rank < 8; ++rank) {
    BOOST_TEST_CONTEXT("rank " << rank) {
      BOOST_CHECK_EQUAL(plans_item(plans[rank], "r"), rank == 0);
      BOOST_CHECK_EQUAL(plans_item(plans[rank], "c"), rank == 1);
      BOOST_CHECK(plans_item(plans[rank], fmt::format("own{}", rank)));
      // Each rank's step carries its own destination.
      BOOST_CHECK_EQUAL(r.at(rank).item.dest_index.offset->at(0), rank);
      // A binomial tree: no rank sends more than log2(8) copies.
      BOOST_CHECK_LE(r.at(rank).to.size(), 3u);
    }
  }
  // One copy crosses to the other host; within it, the host's first rank passes it on.
  BOOST_CHECK_EQUAL(walk_tree(r), 1);
  BOOST_CHECK_EQUAL(r.at(4).from, 0);
  BOOST_CHECK_EQUAL(walk_tree(c), 0);
  // What the coordinator sends reads back the same.
  const dcp::detail::SharedLoadPlan sent{plans[4], steps[4], true};
  const auto back = dcp::detail::decode_shared_load_plan(dcp::detail::encode(sent));
  BOOST_REQUIRE_EQUAL(back.steps.size(), sent.steps.size());
  for (std::size_t i = 0; i < back.steps.size(); ++i) {
    BOOST_CHECK_EQUAL(back.steps[i].tag, sent.steps[i].tag);
    BOOST_CHECK_EQUAL(back.steps[i].from, sent.steps[i].from);
    BOOST_CHECK(back.steps[i].to == sent.steps[i].to);
    BOOST_CHECK_EQUAL(dcp::detail::encode(back.steps[i].item), dcp::detail::encode(sent.steps[i].item));
  }
  BOOST_CHECK(back.any);
  BOOST_CHECK_EQUAL(dcp::detail::encode(back.plan), dcp::detail::encode(sent.plan));
}

BOOST_AUTO_TEST_CASE(once_per_host_reads_each_item_once_on_every_host) {
  auto plans = eight_plans();
  const auto steps = dcp::detail::share_replicated_reads(plans, kHosts, /*once_in_all=*/false);
  int readers_a = 0, readers_b = 0;
  for (std::int64_t rank = 0; rank < 8; ++rank)
    if (plans_item(plans[rank], "r")) (rank < 4 ? readers_a : readers_b) += 1;
  BOOST_CHECK_EQUAL(readers_a, 1);
  BOOST_CHECK_EQUAL(readers_b, 1);
  // Two trees of "r" (one per host), none crossing hosts.
  std::set<std::uint32_t> tags;
  for (const auto& per_rank : steps)
    for (const auto& s : per_rank) tags.insert(s.tag);
  BOOST_REQUIRE_EQUAL(tags.size(), 3u);  // "c" on host a, "r" on a, "r" on b
  for (const auto tag : tags) BOOST_CHECK_EQUAL(walk_tree(steps_of(steps, tag)), 0);
  // Each rank walks its steps in tag order (what keeps the exchange from deadlocking).
  for (const auto& per_rank : steps)
    BOOST_CHECK(std::is_sorted(per_rank.begin(), per_rank.end(),
                               [](const auto& x, const auto& y) { return x.tag < y.tag; }));
}

BOOST_AUTO_TEST_CASE(items_one_rank_plans_are_left_alone) {
  std::vector<dcp::LoadPlan> plans(3);
  for (std::int64_t r = 0; r < 3; ++r) plans[r].items.push_back(read_of(fmt::format("own{}", r), 10));
  const auto before = plans;
  const auto steps = dcp::detail::share_replicated_reads(plans, {"a", "b", "c"}, true);
  for (std::size_t r = 0; r < 3; ++r) {
    BOOST_CHECK(steps[r].empty());
    BOOST_CHECK_EQUAL(dcp::detail::encode(plans[r]), dcp::detail::encode(before[r]));
  }
  // Alike, but on different hosts: once per host reads each on its own.
  std::vector<dcp::LoadPlan> apart(2);
  for (auto& p : apart) p.items.push_back(read_of("r", 5));
  const auto none = dcp::detail::share_replicated_reads(apart, {"a", "b"}, false);
  BOOST_CHECK(none[0].empty() && none[1].empty());
  BOOST_CHECK(plans_item(apart[0], "r") && plans_item(apart[1], "r"));
}

BOOST_AUTO_TEST_SUITE_END()
