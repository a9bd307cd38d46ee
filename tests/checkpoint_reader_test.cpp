// CheckpointReader, ported from upstream's test_checkpoint_reader.py: full reads
// (lists of tensors included), map_location, a missing checkpoint, extra kwargs,
// partial reads and the missing keys they report, every common dtype; and beyond
// upstream, the partial-read rules of its header: tensors filled in place, a
// wrong shape, dtype or kind named with the key and both sides.
#include <ckpt/checkpoint_reader.hpp>

#define BOOST_TEST_MODULE checkpoint_reader_test
#include <boost/test/unit_test.hpp>

#include <ckpt/format.hpp>

#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using c10::IValue;
using ckpt::test::identical;
using ckpt::test::TempDir;

using ckpt::test::list_of;
using ckpt::test::mentions;
namespace {

bool has(const std::vector<std::string>& keys, const std::string& key) {
  return std::find(keys.begin(), keys.end(), key) != keys.end();
}

/// Whether the message holds one of `spellings` (a shape or dtype may be printed
/// the C++ way or the Python way).
bool mentions_any(const std::exception& e, std::initializer_list<const char*> spellings) {
  for (const char* s : spellings)
    if (mentions(e, s)) return true;
  return false;
}

/// upstream's deep_compare, stricter: same kinds, same keys in the same order,
/// tensors bit-identical with the same dtype.
bool deep_equal(const IValue& a, const IValue& b) {
  if (a.isTensor() && b.isTensor()) return identical(a.toTensor(), b.toTensor());
  if (a.isGenericDict() && b.isGenericDict()) {
    const auto da = a.toGenericDict(), db = b.toGenericDict();
    if (da.size() != db.size()) return false;
    for (auto ia = da.begin(), ib = db.begin(); ia != da.end(); ++ia, ++ib)
      if (!deep_equal(ia->key(), ib->key()) || !deep_equal(ia->value(), ib->value())) return false;
    return true;
  }
  if (a.isList() && b.isList()) {
    const auto la = a.toList(), lb = b.toList();
    if (la.size() != lb.size()) return false;
    for (std::size_t i = 0; i < la.size(); ++i)
      if (!deep_equal(la.get(i), lb.get(i))) return false;
    return true;
  }
  if (a.isTuple() && b.isTuple()) {
    const auto& ea = a.toTupleRef().elements();
    const auto& eb = b.toTupleRef().elements();
    if (ea.size() != eb.size()) return false;
    for (std::size_t i = 0; i < ea.size(); ++i)
      if (!deep_equal(ea[i], eb[i])) return false;
    return true;
  }
  if (a.isNone() || b.isNone()) return a.isNone() && b.isNone();
  if (a.isBool() || b.isBool()) return a.isBool() && b.isBool() && a.toBool() == b.toBool();
  if (a.isInt() || b.isInt()) return a.isInt() && b.isInt() && a.toInt() == b.toInt();
  if (a.isDouble() || b.isDouble()) return a.isDouble() && b.isDouble() && a.toDouble() == b.toDouble();
  if (a.isString() || b.isString()) return a.isString() && b.isString() && a.toStringRef() == b.toStringRef();
  return false;
}

/// upstream's setUp: the state dict (lists of tensors inside the model and the
/// optimizer's param group), written as `<temp>/checkpoint/checkpoint_0.pt`.
struct ReaderFixture {
  TempDir temp_dir;
  ckpt::RankInfo rank_info{.global_rank = 0, .global_world_size = 1};
  ckpt::CheckpointReader reader{rank_info};
  ckpt::StateDict state_dict = make_state_dict();
  fs::path checkpoint_path = temp_dir / "checkpoint";

  ReaderFixture() { save(state_dict, checkpoint_path); }

  static ckpt::StateDict make_state_dict() {
    ckpt::StateDict model;
    model.insert("weight", at::randn({10, 5}));
    model.insert("bias", at::randn({5}));
    model.insert("test_list", list_of({at::randn({2}), at::randn({2})}));
    ckpt::StateDict group;
    group.insert("lr", 0.01);
    group.insert("test_list", list_of({at::randn({2}), at::randn({2})}));
    ckpt::StateDict optimizer;
    optimizer.insert("param_groups", list_of({group.to_ivalue()}));

    ckpt::StateDict sd;
    sd.insert("model", model);
    sd.insert("optimizer", optimizer);
    sd.insert("epoch", 5);
    sd.insert("step", 1000);
    return sd;
  }

  /// Writes `sd` the way upstream's setUp does with torch.save: straight into
  /// `<dir>/checkpoint_<rank>.pt`, no writer involved.
  void save(const ckpt::StateDict& sd, const fs::path& dir) const {
    fs::create_directories(dir);
    ckpt::write_file(dir / ("checkpoint_" + std::to_string(rank_info.global_rank) + ".pt"), sd.to_ivalue());
  }

  at::Tensor saved_weight() const { return state_dict.sub("model").at("weight").toTensor(); }
};

}  // namespace

BOOST_FIXTURE_TEST_SUITE(TestCheckpointReader, ReaderFixture)

BOOST_AUTO_TEST_CASE(read_checkpoint) {
  const auto [read_state_dict, missing_keys] = reader.read(checkpoint_path);
  BOOST_CHECK(missing_keys.empty());
  BOOST_CHECK(read_state_dict.contains("model"));
  BOOST_CHECK(read_state_dict.contains("optimizer"));
  BOOST_CHECK(deep_equal(read_state_dict.to_ivalue(), state_dict.to_ivalue()));
  BOOST_CHECK(!read_state_dict.is(state_dict));  // freshly read, not the source
}

BOOST_AUTO_TEST_CASE(read_with_map_location) {
  // Upstream maps to "cuda" where it exists; this build is CPU-only.
  for (int round = 0; round < 2; ++round) {  // upstream reads twice
    BOOST_TEST_CONTEXT("read " << round) {
      const auto result = reader.read(checkpoint_path, std::nullopt, {.map_location = "cpu"});
      const auto& read_state_dict = result.state_dict;
      BOOST_CHECK(read_state_dict.contains("model"));
      BOOST_CHECK(read_state_dict.contains("optimizer"));
      BOOST_CHECK_EQUAL(read_state_dict.at("epoch").toInt(), 5);
      BOOST_CHECK_EQUAL(read_state_dict.at("step").toInt(), 1000);
      const auto weight = read_state_dict.sub("model").at("weight").toTensor();
      BOOST_CHECK(weight.device().is_cpu());
      BOOST_CHECK(identical(weight, saved_weight()));
    }
  }
}

BOOST_AUTO_TEST_CASE(read_nonexistent_checkpoint) {
  const fs::path nonexistent_path = temp_dir / "nonexistent_checkpoint";
  const std::string file = (nonexistent_path / "checkpoint_0.pt").string();
  BOOST_CHECK_EXCEPTION(reader.read(nonexistent_path), ckpt::NotFound,
                        [&](const ckpt::NotFound& e) { return mentions(e, file); });
  // A directory that exists but lacks this rank's file is just as missing.
  ckpt::CheckpointReader rank1(ckpt::RankInfo{.global_rank = 1, .global_world_size = 2});
  BOOST_CHECK_EXCEPTION(rank1.read(checkpoint_path), ckpt::NotFound,
                        [](const ckpt::NotFound& e) { return mentions(e, "checkpoint_1.pt"); });
}

BOOST_AUTO_TEST_CASE(read_with_kwargs) {
  const ckpt::Kwargs kwargs{{"extra", "value"}};
  const auto result = reader.read(checkpoint_path, std::nullopt, {}, kwargs);
  BOOST_CHECK(result.missing_keys.empty());
  BOOST_CHECK_EQUAL(result.state_dict.at("epoch").toInt(), 5);
}

BOOST_AUTO_TEST_CASE(partial_read) {
  ckpt::StateDict partial_state_dict;
  partial_state_dict.insert("optimizer", IValue());
  ckpt::StateDict model;
  auto target_weight = at::randn({10, 5});
  const void* target_data = target_weight.data_ptr();
  model.insert("weight", target_weight);
  partial_state_dict.insert("model", model);
  partial_state_dict.insert("epoch", IValue());

  const auto [updated_state_dict, missing_keys] = reader.read(checkpoint_path, partial_state_dict);

  BOOST_CHECK(updated_state_dict.is(partial_state_dict));  // the target itself comes back
  BOOST_CHECK(missing_keys.empty());
  BOOST_CHECK(updated_state_dict.contains("model"));
  BOOST_CHECK(updated_state_dict.contains("epoch"));
  const auto weight = updated_state_dict.sub("model").at("weight").toTensor();
  BOOST_CHECK(identical(weight, saved_weight()));
  // Filled in place: the caller's tensor, its memory, now holding the file's values.
  BOOST_CHECK(weight.is_same(target_weight));
  BOOST_CHECK(target_weight.data_ptr() == target_data);
  BOOST_CHECK(identical(target_weight, saved_weight()));

  BOOST_CHECK(deep_equal(updated_state_dict.at("optimizer"), state_dict.at("optimizer")));
  BOOST_CHECK_EQUAL(updated_state_dict.at("epoch").toInt(), 5);

  BOOST_CHECK(!updated_state_dict.sub("model").contains("bias"));
  BOOST_CHECK(!updated_state_dict.contains("step"));
}

BOOST_AUTO_TEST_CASE(partial_read_missing_keys) {
  ckpt::StateDict partial_state_dict;
  partial_state_dict.insert("model", IValue());
  partial_state_dict.insert("nonexistent_key", IValue());
  ckpt::StateDict nested;
  nested.insert("nested", IValue());
  partial_state_dict.insert("another_missing_key", nested);

  const auto [updated_state_dict, missing_keys] = reader.read(checkpoint_path, partial_state_dict);

  BOOST_CHECK(has(missing_keys, "nonexistent_key"));
  BOOST_CHECK(has(missing_keys, "another_missing_key"));
  BOOST_CHECK(!has(missing_keys, "model"));
  BOOST_CHECK_EQUAL(missing_keys.size(), 2u);
  // The present key was still read.
  BOOST_CHECK(deep_equal(updated_state_dict.at("model"), state_dict.at("model")));
}

BOOST_AUTO_TEST_CASE(partial_read_different_dtypes) {
  ckpt::StateDict dtype_state_dict;
  dtype_state_dict.insert("float32", at::randn({10, 10}, at::kFloat));
  dtype_state_dict.insert("float64", at::randn({10, 10}, at::kDouble));
  dtype_state_dict.insert("int32", at::randint(-100, 100, {10, 10}, at::kInt));
  dtype_state_dict.insert("int64", at::randint(-100, 100, {10, 10}, at::kLong));
  dtype_state_dict.insert("bool", at::randint(0, 2, {10, 10}, at::kLong).to(at::kBool));

  const fs::path dtype_checkpoint_path = temp_dir / "dtype_checkpoint";
  save(dtype_state_dict, dtype_checkpoint_path);

  ckpt::StateDict partial_state_dict;
  partial_state_dict.insert("float32", at::randn({10, 10}, at::kFloat));
  partial_state_dict.insert("float64", IValue());
  partial_state_dict.insert("int32", IValue());
  partial_state_dict.insert("int64", IValue());
  partial_state_dict.insert("bool", IValue());

  const auto result = reader.read(dtype_checkpoint_path, partial_state_dict);
  BOOST_CHECK(result.missing_keys.empty());
  for (const auto& entry : dtype_state_dict) {
    const std::string& key = entry.key().toStringRef();
    BOOST_TEST_CONTEXT("key " << key) {
      BOOST_REQUIRE(result.state_dict.contains(key));
      const auto got = result.state_dict.at(key).toTensor();
      const auto want = entry.value().toTensor();
      BOOST_CHECK_EQUAL(got.scalar_type(), want.scalar_type());
      BOOST_CHECK(identical(got, want));
    }
  }
}

// --- beyond upstream: the partial-read rules -------------------------------------

BOOST_AUTO_TEST_CASE(partial_read_reports_nested_missing_keys_as_paths) {
  ckpt::StateDict model;
  model.insert("weight", IValue());
  model.insert("running_mean", IValue());
  ckpt::StateDict group;
  group.insert("lr", IValue());
  group.insert("momentum", IValue());
  ckpt::StateDict optimizer;
  optimizer.insert("param_groups", list_of({group.to_ivalue()}));
  ckpt::StateDict target;
  target.insert("model", model);
  target.insert("optimizer", optimizer);

  const auto [got, missing_keys] = reader.read(checkpoint_path, target);
  BOOST_CHECK(has(missing_keys, "model.running_mean"));
  BOOST_CHECK(has(missing_keys, "optimizer.param_groups[0].momentum"));
  BOOST_CHECK_EQUAL(missing_keys.size(), 2u);
  BOOST_CHECK(identical(got.sub("model").at("weight").toTensor(), saved_weight()));
  const auto groups = got.sub("optimizer").at("param_groups").toList();
  BOOST_REQUIRE_EQUAL(groups.size(), 1u);
  BOOST_CHECK_EQUAL(ckpt::StateDict::from_ivalue(groups.get(0)).at("lr").toDouble(), 0.01);
}

BOOST_AUTO_TEST_CASE(partial_read_fills_tensors_inside_lists_in_place) {
  auto first = at::zeros({2});
  auto second = at::zeros({2});
  const void* first_data = first.data_ptr();
  ckpt::StateDict model;
  model.insert("test_list", list_of({first, second}));
  ckpt::StateDict target;
  target.insert("model", model);

  const auto result = reader.read(checkpoint_path, target);
  BOOST_CHECK(result.missing_keys.empty());
  const auto saved = state_dict.sub("model").at("test_list").toList();
  BOOST_CHECK(identical(first, saved.get(0).toTensor()));
  BOOST_CHECK(identical(second, saved.get(1).toTensor()));
  BOOST_CHECK(first.data_ptr() == first_data);
}

BOOST_AUTO_TEST_CASE(partial_read_refuses_a_wrong_shape_naming_key_and_both_shapes) {
  ckpt::StateDict model;
  auto wrong = at::zeros({5, 10});  // the file holds 10x5
  model.insert("weight", wrong);
  ckpt::StateDict target;
  target.insert("model", model);
  BOOST_CHECK_EXCEPTION(reader.read(checkpoint_path, target), ckpt::Mismatch, [](const ckpt::Mismatch& e) {
    BOOST_TEST_MESSAGE("shape mismatch: " << e.what());
    return mentions(e, "model.weight") && mentions_any(e, {"[10, 5]", "(10, 5)", "10x5"}) &&
           mentions_any(e, {"[5, 10]", "(5, 10)", "5x10"});
  });
  BOOST_CHECK(at::equal(wrong, at::zeros({5, 10})));  // left as it was
}

BOOST_AUTO_TEST_CASE(partial_read_refuses_a_wrong_dtype_naming_key_and_both_dtypes) {
  ckpt::StateDict model;
  model.insert("weight", at::zeros({10, 5}, at::kDouble));  // the file holds float32
  ckpt::StateDict target;
  target.insert("model", model);
  BOOST_CHECK_EXCEPTION(reader.read(checkpoint_path, target), ckpt::Mismatch, [](const ckpt::Mismatch& e) {
    BOOST_TEST_MESSAGE("dtype mismatch: " << e.what());
    return mentions(e, "model.weight") && mentions_any(e, {"Float", "float32"}) &&
           mentions_any(e, {"Double", "float64"});
  });
}

BOOST_AUTO_TEST_CASE(partial_read_refuses_a_value_of_another_kind_naming_the_key) {
  ckpt::StateDict where_a_tensor_is;
  where_a_tensor_is.insert("x", IValue());
  ckpt::StateDict model;
  model.insert("weight", where_a_tensor_is);  // a dict where the file has a tensor
  ckpt::StateDict target;
  target.insert("model", model);
  BOOST_CHECK_EXCEPTION(reader.read(checkpoint_path, target), ckpt::Mismatch,
                        [](const ckpt::Mismatch& e) { return mentions(e, "model.weight"); });

  ckpt::StateDict epoch_as_tensor;
  epoch_as_tensor.insert("epoch", at::zeros({1}));  // a tensor where the file has an int
  BOOST_CHECK_EXCEPTION(reader.read(checkpoint_path, epoch_as_tensor), ckpt::Mismatch,
                        [](const ckpt::Mismatch& e) { return mentions(e, "epoch"); });
}

BOOST_AUTO_TEST_CASE(read_with_a_map_location_function) {
  std::vector<std::string> locations;
  const ckpt::MapLocation::Function fn = [&](const at::Tensor& t, const std::string& location) {
    locations.push_back(location);
    return t * 2;  // what the function returns is what is kept
  };
  const auto result = reader.read(checkpoint_path, std::nullopt, {.map_location = ckpt::MapLocation(fn)});
  BOOST_CHECK(!locations.empty());
  BOOST_CHECK(std::all_of(locations.begin(), locations.end(), [](const auto& l) { return l == "cpu"; }));
  BOOST_CHECK(identical(result.state_dict.sub("model").at("weight").toTensor(), saved_weight() * 2));
}

BOOST_AUTO_TEST_CASE(read_of_a_corrupt_file_is_corrupt_checkpoint) {
  const fs::path bad = temp_dir / "bad";
  fs::create_directories(bad);
  {
    std::FILE* f = std::fopen((bad / "checkpoint_0.pt").c_str(), "wb");
    BOOST_REQUIRE(f);
    std::fputs("this is not a zip archive", f);
    std::fclose(f);
  }
  BOOST_CHECK_THROW(reader.read(bad), ckpt::CorruptCheckpoint);
}

BOOST_AUTO_TEST_SUITE_END()
