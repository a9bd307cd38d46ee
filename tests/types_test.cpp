// types: RankInfo (upstream test_types.py), rank_info_from_env (torchrun's RANK
// and WORLD_SIZE), and the keyword arguments (Arg, Kwargs) that travel with a save.
#include <ckpt/types.hpp>

#define BOOST_TEST_MODULE types_test
#include <boost/test/unit_test.hpp>

#include "support/test_support.hpp"

#include <ckpt/state_dict.hpp>

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

using ckpt::test::mentions;
namespace {

/// Saves RANK and WORLD_SIZE, clears them, and puts them back afterwards, so the
/// cases neither see nor leak the environment they run in.
struct RankEnv {
  std::optional<std::string> rank = get("RANK");
  std::optional<std::string> world_size = get("WORLD_SIZE");

  RankEnv() {
    ::unsetenv("RANK");
    ::unsetenv("WORLD_SIZE");
  }
  ~RankEnv() {
    restore("RANK", rank);
    restore("WORLD_SIZE", world_size);
  }
  static void set(const char* rank, const char* world_size) {
    ::setenv("RANK", rank, 1);
    ::setenv("WORLD_SIZE", world_size, 1);
  }
  static std::optional<std::string> get(const char* name) {
    const char* v = std::getenv(name);
    return v ? std::optional<std::string>(v) : std::nullopt;
  }
  static void restore(const char* name, const std::optional<std::string>& value) {
    if (value)
      ::setenv(name, value->c_str(), 1);
    else
      ::unsetenv(name);
  }
};

}  // namespace

// --- upstream: test_types.py ---------------------------------------------------

BOOST_AUTO_TEST_SUITE(TestRankInfo)

BOOST_AUTO_TEST_CASE(rank_info_initialization) {
  const ckpt::RankInfo rank_info{.global_rank = 0, .global_world_size = 4};
  BOOST_CHECK_EQUAL(rank_info.global_rank, 0);
  BOOST_CHECK_EQUAL(rank_info.global_world_size, 4);
}

BOOST_AUTO_TEST_CASE(rank_info_default_initialization) {
  const ckpt::RankInfo rank_info{.global_rank = 0, .global_world_size = 1};
  BOOST_CHECK_EQUAL(rank_info.global_rank, 0);
  BOOST_CHECK_EQUAL(rank_info.global_world_size, 1);
  // And with nothing given: a single-process job, as the builders assume.
  const ckpt::RankInfo defaulted;
  BOOST_CHECK(defaulted == rank_info);
  BOOST_CHECK(!(defaulted == (ckpt::RankInfo{1, 2})));
}

BOOST_AUTO_TEST_CASE(state_dict_type_alias) {
  // {"model": {"weight": [1, 2, 3]}, "optimizer": {"lr": 0.01}}
  ckpt::StateDict model;
  model.insert("weight", c10::List<std::int64_t>({1, 2, 3}));
  ckpt::StateDict optimizer;
  optimizer.insert("lr", 0.01);
  ckpt::StateDict state_dict;
  state_dict.insert("model", model);
  state_dict.insert("optimizer", optimizer);

  const ckpt::StateDict state_dict_var = state_dict;
  BOOST_CHECK(state_dict_var.is(state_dict));
  BOOST_REQUIRE_EQUAL(state_dict_var.size(), 2u);
  const auto weight = state_dict_var.sub("model").at("weight").toList();
  BOOST_REQUIRE_EQUAL(weight.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i)
    BOOST_CHECK_EQUAL(weight.get(i).toInt(), static_cast<std::int64_t>(i + 1));
  BOOST_CHECK_EQUAL(state_dict_var.sub("optimizer").at("lr").toDouble(), 0.01);
}

BOOST_AUTO_TEST_SUITE_END()

// --- rank_info_from_env ----------------------------------------------------------

BOOST_FIXTURE_TEST_SUITE(rank_info_from_env, RankEnv)

BOOST_AUTO_TEST_CASE(reads_rank_and_world_size) {
  set("3", "8");
  const auto info = ckpt::rank_info_from_env();
  BOOST_CHECK_EQUAL(info.global_rank, 3);
  BOOST_CHECK_EQUAL(info.global_world_size, 8);

  set("0", "1");
  BOOST_CHECK((ckpt::rank_info_from_env() == ckpt::RankInfo{0, 1}));
}

BOOST_AUTO_TEST_CASE(unset_means_a_single_process) {
  const auto info = ckpt::rank_info_from_env();
  BOOST_CHECK_EQUAL(info.global_rank, 0);
  BOOST_CHECK_EQUAL(info.global_world_size, 1);
}

BOOST_AUTO_TEST_CASE(malformed_values_are_an_error) {
  const std::vector<std::pair<const char*, const char*>> bad = {
      {"abc", "4"},  // not a number
      {"1", "four"},
      {"1x", "4"},                       // trailing garbage
      {"-1", "4"},                       // negative rank
      {"4", "4"},                        // rank outside the world
      {"0", "0"},                        // empty world
      {"99999999999999999999999", "4"},  // out of range
  };
  for (const auto& [rank, world_size] : bad) {
    BOOST_TEST_CONTEXT("RANK='" << rank << "' WORLD_SIZE='" << world_size << "'") {
      set(rank, world_size);
      BOOST_CHECK_THROW(ckpt::rank_info_from_env(), ckpt::Error);
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

// --- Arg ------------------------------------------------------------------------

BOOST_AUTO_TEST_SUITE(arg)

BOOST_AUTO_TEST_CASE(integers_of_every_width_are_int) {
  const ckpt::Arg from_int(42);
  BOOST_CHECK(from_int.is_int());
  BOOST_CHECK(!from_int.is_double() && !from_int.is_bool() && !from_int.is_string());
  BOOST_CHECK_EQUAL(from_int.as_int(), 42);

  const ckpt::Arg from_int64(std::int64_t{1} << 40);
  BOOST_CHECK_EQUAL(from_int64.as_int(), std::int64_t{1} << 40);
  const ckpt::Arg from_size(std::size_t{7});
  BOOST_CHECK(from_size.is_int());
  BOOST_CHECK_EQUAL(from_size.as_int(), 7);
  const ckpt::Arg from_short(static_cast<short>(-3));
  BOOST_CHECK_EQUAL(from_short.as_int(), -3);
  BOOST_CHECK(ckpt::Arg(42) == ckpt::Arg(std::int64_t{42}));
}

BOOST_AUTO_TEST_CASE(double_bool_and_string_keep_their_kind) {
  const ckpt::Arg d(0.5);
  BOOST_CHECK(d.is_double());
  BOOST_CHECK_EQUAL(d.as_double(), 0.5);

  const ckpt::Arg b(true);
  BOOST_CHECK(b.is_bool());  // not an int, as in Python's kwargs
  BOOST_CHECK(!b.is_int());
  BOOST_CHECK_EQUAL(b.as_bool(), true);

  const ckpt::Arg s("test_value");  // a literal is a string, not a bool
  BOOST_CHECK(s.is_string());
  BOOST_CHECK_EQUAL(s.as_string(), "test_value");
  const ckpt::Arg owned(std::string("value"));
  BOOST_CHECK(owned.is_string());
  BOOST_CHECK_EQUAL(owned.as_string(), "value");

  BOOST_CHECK(std::get<double>(d.value()) == 0.5);
  BOOST_CHECK(!(ckpt::Arg(1) == ckpt::Arg(1.0)));  // different kinds are different values
  BOOST_CHECK(!(ckpt::Arg(true) == ckpt::Arg(1)));
}

BOOST_AUTO_TEST_CASE(an_int_converts_to_double) {
  BOOST_CHECK_EQUAL(ckpt::Arg(42).as_double(), 42.0);
  BOOST_CHECK_EQUAL(ckpt::Arg(-3).as_double(), -3.0);
}

BOOST_AUTO_TEST_CASE(wrong_conversions_throw_mismatch_naming_both_types) {
  const auto names_int_and_string = [](const ckpt::Mismatch& e) {
    return mentions(e, "int") && mentions(e, "str");
  };
  BOOST_CHECK_EXCEPTION(ckpt::Arg("x").as_int(), ckpt::Mismatch, names_int_and_string);
  BOOST_CHECK_EXCEPTION(ckpt::Arg(42).as_string(), ckpt::Mismatch, names_int_and_string);
  BOOST_CHECK_THROW(ckpt::Arg(1.5).as_int(), ckpt::Mismatch);  // no silent truncation
  BOOST_CHECK_THROW(ckpt::Arg(true).as_int(), ckpt::Mismatch);
  BOOST_CHECK_THROW(ckpt::Arg(1).as_bool(), ckpt::Mismatch);
  BOOST_CHECK_THROW(ckpt::Arg("1.5").as_double(), ckpt::Mismatch);
  BOOST_CHECK_THROW(ckpt::Arg(true).as_double(), ckpt::Mismatch);
  BOOST_CHECK_THROW(ckpt::Arg(0.5).as_string(), ckpt::Mismatch);
  BOOST_CHECK_THROW(ckpt::Arg(1).as_string(), ckpt::Error);  // one catch for every ckpt error
}

BOOST_AUTO_TEST_CASE(repr_is_what_python_prints) {
  BOOST_CHECK_EQUAL(ckpt::Arg(42).repr(), "42");
  BOOST_CHECK_EQUAL(ckpt::Arg(-7).repr(), "-7");
  BOOST_CHECK_EQUAL(ckpt::Arg(true).repr(), "True");
  BOOST_CHECK_EQUAL(ckpt::Arg(false).repr(), "False");
  BOOST_CHECK_EQUAL(ckpt::Arg(0.5).repr(), "0.5");
  BOOST_CHECK_EQUAL(ckpt::Arg("test_value").repr(), "'test_value'");
}

BOOST_AUTO_TEST_SUITE_END()

// --- Kwargs ---------------------------------------------------------------------

BOOST_AUTO_TEST_SUITE(kwargs)

BOOST_AUTO_TEST_CASE(empty_by_default) {
  const ckpt::Kwargs kw;
  BOOST_CHECK(kw.empty());
  BOOST_CHECK_EQUAL(kw.size(), 0u);
  BOOST_CHECK(kw.begin() == kw.end());
  BOOST_CHECK(kw.find("extra") == nullptr);
}

BOOST_AUTO_TEST_CASE(built_from_a_list_in_order) {
  const ckpt::Kwargs kw{{"custom_arg", "test_value"}, {"another_arg", 42}, {"ratio", 0.5}, {"flag", false}};
  BOOST_CHECK_EQUAL(kw.size(), 4u);
  std::vector<std::string> keys;
  for (const auto& [key, value] : kw) keys.push_back(key);
  BOOST_CHECK((keys == std::vector<std::string>{"custom_arg", "another_arg", "ratio", "flag"}));
  BOOST_CHECK_EQUAL(kw.at("custom_arg").as_string(), "test_value");
  BOOST_CHECK_EQUAL(kw.at("another_arg").as_int(), 42);
  BOOST_CHECK_EQUAL(kw.at("ratio").as_double(), 0.5);
  BOOST_CHECK_EQUAL(kw.at("flag").as_bool(), false);
}

BOOST_AUTO_TEST_CASE(find_contains_and_at) {
  const ckpt::Kwargs kw{{"extra", "value"}};
  BOOST_CHECK(kw.contains("extra"));
  BOOST_CHECK(!kw.contains("missing"));
  const ckpt::Arg* found = kw.find("extra");
  BOOST_REQUIRE(found != nullptr);
  BOOST_CHECK_EQUAL(found->as_string(), "value");
  BOOST_CHECK(kw.find("missing") == nullptr);
  BOOST_CHECK_EXCEPTION(kw.at("missing"), ckpt::MissingKeys,
                        [](const ckpt::MissingKeys& e) { return mentions(e, "missing"); });
}

BOOST_AUTO_TEST_CASE(set_adds_or_replaces_in_place) {
  ckpt::Kwargs kw{{"a", 1}, {"b", 2}};
  kw.set("c", "three");
  kw.set("a", 10.5);  // replaced, keeps its place
  BOOST_CHECK_EQUAL(kw.size(), 3u);
  std::vector<std::string> keys;
  for (const auto& [key, value] : kw) keys.push_back(key);
  BOOST_CHECK((keys == std::vector<std::string>{"a", "b", "c"}));
  BOOST_CHECK(kw.at("a").is_double());
  BOOST_CHECK_EQUAL(kw.at("a").as_double(), 10.5);
  BOOST_CHECK_EQUAL(kw.at("c").as_string(), "three");
}

BOOST_AUTO_TEST_CASE(equality_compares_keys_and_values) {
  const ckpt::Kwargs a{{"x", 1}, {"y", "z"}};
  BOOST_CHECK(a == (ckpt::Kwargs{{"x", 1}, {"y", "z"}}));
  BOOST_CHECK(!(a == (ckpt::Kwargs{{"x", 2}, {"y", "z"}})));
  BOOST_CHECK(!(a == (ckpt::Kwargs{{"x", 1}})));
  BOOST_CHECK(!(a == ckpt::Kwargs{}));
}

BOOST_AUTO_TEST_SUITE_END()
