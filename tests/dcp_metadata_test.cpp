// The DCP core's metadata, ported from upstream's test_checkpoint.py
// (TestDistributedCheckpointing, two ranks; test names kept). Upstream builds
// the metadata locally on each rank — no collective is involved — so each
// rank's view is computed here for rank 0 and rank 1 in turn. Beyond
// upstream: the chunks' offsets and sizes, and the sharding spec's errors.
#include <ckpt/dcp/metadata.hpp>

#define BOOST_TEST_MODULE dcp_metadata_test
#include <boost/test/unit_test.hpp>

#include "support/test_support.hpp"

#include <ckpt/error.hpp>

#include <string>
#include <vector>

using ckpt::dcp::BytesStorageMetadata;
using ckpt::dcp::ChunkShardingSpec;
using ckpt::dcp::ChunkStorageMetadata;
using ckpt::dcp::ShardedTensor;
using ckpt::dcp::TensorStorageMetadata;
using Sizes = std::vector<std::int64_t>;

using ckpt::test::mentions;
namespace {

constexpr std::int64_t kWorld = 2;

}  // namespace

BOOST_AUTO_TEST_SUITE(TestDistributedCheckpointing)

BOOST_AUTO_TEST_CASE(test_tensor_metadata_with_missing_rank_spec) {
  const ChunkShardingSpec spec{0, {"rank:1/cpu"}};
  for (std::int64_t rank = 0; rank < kWorld; ++rank) {
    BOOST_TEST_CONTEXT("rank " << rank) {
      auto st = ShardedTensor::zeros(spec, {4, 4}, rank, at::kDouble);
      const auto md = ckpt::dcp::create_default_local_metadata({{"st", st}});
      const auto& tm = std::get<TensorStorageMetadata>(md.state_dict_metadata.at("st"));
      BOOST_TEST(tm.chunks.size() == 1u);
      // Beyond upstream: the one chunk, the global size and the dtype, on the
      // rank that holds it and on the one that does not.
      BOOST_TEST((tm.chunks[0] == ChunkStorageMetadata{{0, 0}, {4, 4}}));
      BOOST_TEST(tm.size == (Sizes{4, 4}), boost::test_tools::per_element());
      BOOST_TEST(tm.properties.dtype == at::kDouble);
      BOOST_TEST(st.local_shards().size() == (rank == 1 ? 1u : 0u));
    }
  }
}

BOOST_AUTO_TEST_CASE(test_default_metadata) {
  const ChunkShardingSpec spec{0, {"rank:0/cpu", "rank:1/cpu"}};
  for (std::int64_t rank = 0; rank < kWorld; ++rank) {
    BOOST_TEST_CONTEXT("rank " << rank) {
      auto st = ShardedTensor::rand(spec, {10, 10}, rank);
      c10::impl::GenericList bytes(c10::IntType::get());
      for (std::int64_t v : {1, 2, 3, 4}) bytes.push_back(v);
      const ckpt::dcp::DcpStateDict state_dict{
          {"sharded", st}, {"replicated", at::rand({4})}, {"bytes", c10::IValue(bytes)}};
      const auto md = ckpt::dcp::create_default_local_metadata(state_dict);

      BOOST_REQUIRE(md.state_dict_metadata.count("bytes"));
      BOOST_TEST(std::holds_alternative<BytesStorageMetadata>(md.state_dict_metadata.at("bytes")));

      BOOST_REQUIRE(md.state_dict_metadata.count("replicated"));
      const auto* replicated = std::get_if<TensorStorageMetadata>(&md.state_dict_metadata.at("replicated"));
      BOOST_REQUIRE(replicated);
      BOOST_TEST(replicated->size == (Sizes{4}), boost::test_tools::per_element());
      BOOST_TEST(replicated->properties.dtype == at::kFloat);
      BOOST_TEST(replicated->chunks.size() == 1u);
      BOOST_TEST((replicated->chunks[0] == ChunkStorageMetadata{{0}, {4}}));

      BOOST_REQUIRE(md.state_dict_metadata.count("sharded"));
      const auto* sharded = std::get_if<TensorStorageMetadata>(&md.state_dict_metadata.at("sharded"));
      BOOST_REQUIRE(sharded);
      BOOST_TEST(sharded->properties.dtype == at::kFloat);
      BOOST_TEST(sharded->size == st.size(), boost::test_tools::per_element());
      BOOST_TEST(sharded->size == (Sizes{10, 10}), boost::test_tools::per_element());
      BOOST_TEST(sharded->chunks.size() == 2u);
      // Beyond upstream: the global layout, the same on both ranks.
      BOOST_TEST((sharded->chunks[0] == ChunkStorageMetadata{{0, 0}, {5, 10}}));
      BOOST_TEST((sharded->chunks[1] == ChunkStorageMetadata{{5, 0}, {5, 10}}));
      // This rank holds its own rows only.
      BOOST_REQUIRE(st.local_shards().size() == 1u);
      BOOST_TEST(st.local_shards()[0].metadata.offsets == (Sizes{5 * rank, 0}),
                 boost::test_tools::per_element());
      BOOST_TEST(st.local_shards()[0].tensor.sizes().vec() == (Sizes{5, 10}),
                 boost::test_tools::per_element());
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(sharding_spec)

BOOST_AUTO_TEST_CASE(chunks_are_ceil_of_size_over_placements) {
  // 20 rows over 4 ranks: 5 each; 10 rows over 4: 3, 3, 3, 1; 2 rows over 4:
  // 1, 1, 0, 0 (empty shards are kept in the layout).
  const ChunkShardingSpec spec{0, {"rank:0/cpu", "rank:1/cpu", "rank:2/cpu", "rank:3/cpu"}};
  const auto four = spec.build_metadata({20, 20});
  for (std::int64_t r = 0; r < 4; ++r) {
    BOOST_TEST(four[static_cast<std::size_t>(r)].offsets == (Sizes{5 * r, 0}),
               boost::test_tools::per_element());
    BOOST_TEST(four[static_cast<std::size_t>(r)].sizes == (Sizes{5, 20}), boost::test_tools::per_element());
    BOOST_TEST(four[static_cast<std::size_t>(r)].rank == r);
  }
  std::vector<std::int64_t> rows;
  for (const auto& m : spec.build_metadata({10, 3})) rows.push_back(m.sizes[0]);
  BOOST_TEST(rows == (Sizes{3, 3, 3, 1}), boost::test_tools::per_element());
  rows.clear();
  for (const auto& m : spec.build_metadata({2})) rows.push_back(m.sizes[0]);
  BOOST_TEST(rows == (Sizes{1, 1, 0, 0}), boost::test_tools::per_element());
  // Empty shards have nothing to save: the metadata lists the two others.
  const auto st = ShardedTensor::zeros(spec, {2}, 0);
  const auto md = ckpt::dcp::create_default_local_metadata({{"st", st}});
  BOOST_TEST(std::get<TensorStorageMetadata>(md.state_dict_metadata.at("st")).chunks.size() == 2u);
}

BOOST_AUTO_TEST_CASE(other_dims_and_bad_specs) {
  const auto cols = ChunkShardingSpec{1, {"rank:0/cpu", "rank:1/cpu"}}.build_metadata({4, 6});
  BOOST_TEST(cols[1].offsets == (Sizes{0, 3}), boost::test_tools::per_element());
  BOOST_TEST(cols[1].sizes == (Sizes{4, 3}), boost::test_tools::per_element());

  for (const std::string bad : {"1/cpu", "rank:x/cpu", "rank:1", "rank:1/nodevice"}) {
    BOOST_TEST_CONTEXT(bad) {
      BOOST_CHECK_EXCEPTION(ChunkShardingSpec({0, {bad}}).build_metadata({4}), ckpt::Error,
                            [&](const ckpt::Error& e) { return mentions(e, bad); });
    }
  }
  BOOST_CHECK_EXCEPTION(ChunkShardingSpec({2, {"rank:0/cpu"}}).build_metadata({4, 4}), ckpt::Error,
                        [](const ckpt::Error& e) { return mentions(e, "dim 2"); });
  BOOST_CHECK_THROW(ChunkShardingSpec({0, {}}).build_metadata({4}), ckpt::Error);
  BOOST_CHECK_EXCEPTION(
      ckpt::dcp::create_default_local_metadata({{"a", at::zeros({1})}, {"a", at::zeros({1})}}), ckpt::Error,
      [](const ckpt::Error& e) { return mentions(e, "'a'"); });
}

BOOST_AUTO_TEST_SUITE_END()
