// StateDict: the handle a checkpoint holds (PyTorch's STATE_DICT, a dict[str, Any]).
// It takes every kind of value a state dict has, keeps insertion order, and is
// shared like a Python dict: copies, nested StateDicts and the IValue it converts
// to all refer to one dictionary.
#include <ckpt/state_dict.hpp>

#define BOOST_TEST_MODULE state_dict_test
#include <boost/test/unit_test.hpp>

#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

using c10::IValue;

using ckpt::test::mentions;
namespace {

/// The keys of `sd`, in iteration order.
std::vector<std::string> keys_of(const ckpt::StateDict& sd) {
  std::vector<std::string> keys;
  for (const auto& entry : sd) keys.push_back(entry.key().toStringRef());
  return keys;
}

c10::impl::GenericDict int_keyed_dict() {
  c10::impl::GenericDict d(c10::IntType::get(), c10::AnyType::get());
  d.insert(0, 1.5);
  d.insert(7, "seven");
  return d;
}

}  // namespace

BOOST_AUTO_TEST_CASE(default_constructed_is_empty) {
  ckpt::StateDict sd;
  BOOST_CHECK(sd.empty());
  BOOST_CHECK_EQUAL(sd.size(), 0u);
  BOOST_CHECK(sd.begin() == sd.end());
  BOOST_CHECK(!sd.contains("model"));
  BOOST_CHECK(!sd.find("model").has_value());
  BOOST_CHECK(sd.to_ivalue().isGenericDict());
}

BOOST_AUTO_TEST_CASE(insert_takes_every_kind_of_value) {
  ckpt::StateDict nested;
  nested.insert("lr", 0.01);

  c10::impl::GenericList list(c10::AnyType::get());
  list.push_back(1);
  list.push_back("two");
  list.push_back(at::ones({2}));

  ckpt::StateDict sd;
  const auto weight = at::arange(50, at::kFloat).reshape({5, 10});
  sd.insert("tensor", weight);
  sd.insert("int", 5);
  sd.insert("int64", std::int64_t{1} << 40);
  sd.insert("double", 0.25);
  sd.insert("bool", true);
  sd.insert("c_string", "adam");
  sd.insert("string", std::string("sgd"));
  sd.insert("none", IValue());
  sd.insert("int_list", c10::List<std::int64_t>({1, 2, 3}));
  sd.insert("list", IValue(list));
  sd.insert("tuple", IValue(c10::ivalue::Tuple::create({IValue(0.9), IValue(0.999)})));
  sd.insert("nested", nested);
  sd.insert("state", IValue(int_keyed_dict()));

  BOOST_CHECK_EQUAL(sd.size(), 13u);
  BOOST_CHECK(!sd.empty());

  BOOST_REQUIRE(sd.at("tensor").isTensor());
  BOOST_CHECK(sd.at("tensor").toTensor().is_same(weight));
  BOOST_REQUIRE(sd.at("int").isInt());
  BOOST_CHECK_EQUAL(sd.at("int").toInt(), 5);
  BOOST_REQUIRE(sd.at("int64").isInt());
  BOOST_CHECK_EQUAL(sd.at("int64").toInt(), std::int64_t{1} << 40);
  BOOST_REQUIRE(sd.at("double").isDouble());
  BOOST_CHECK_EQUAL(sd.at("double").toDouble(), 0.25);
  BOOST_REQUIRE(sd.at("bool").isBool());  // a bool stays a bool, not an int
  BOOST_CHECK_EQUAL(sd.at("bool").toBool(), true);
  BOOST_REQUIRE(sd.at("c_string").isString());  // a const char* is a string, not a bool
  BOOST_CHECK_EQUAL(sd.at("c_string").toStringRef(), "adam");
  BOOST_REQUIRE(sd.at("string").isString());
  BOOST_CHECK_EQUAL(sd.at("string").toStringRef(), "sgd");
  BOOST_CHECK(sd.at("none").isNone());
  BOOST_REQUIRE(sd.at("int_list").isList());
  BOOST_CHECK_EQUAL(sd.at("int_list").toList().size(), 3u);
  BOOST_REQUIRE(sd.at("list").isList());
  const auto got_list = sd.at("list").toList();
  BOOST_REQUIRE_EQUAL(got_list.size(), 3u);
  BOOST_CHECK_EQUAL(got_list.get(1).toStringRef(), "two");
  BOOST_REQUIRE(sd.at("tuple").isTuple());
  BOOST_CHECK_EQUAL(sd.at("tuple").toTupleRef().elements().size(), 2u);
  BOOST_CHECK_EQUAL(sd.at("tuple").toTupleRef().elements()[1].toDouble(), 0.999);
  BOOST_REQUIRE(sd.at("nested").isGenericDict());
  BOOST_CHECK_EQUAL(sd.sub("nested").at("lr").toDouble(), 0.01);
  BOOST_REQUIRE(sd.at("state").isGenericDict());
  const auto state = sd.at("state").toGenericDict();
  BOOST_CHECK_EQUAL(state.size(), 2u);
  BOOST_CHECK_EQUAL(state.at(7).toStringRef(), "seven");
}

BOOST_AUTO_TEST_CASE(iteration_follows_insertion_order) {
  ckpt::StateDict sd;
  sd.insert("step", 1000);
  sd.insert("model", ckpt::StateDict());
  sd.insert("epoch", 5);
  sd.insert("optimizer", ckpt::StateDict());
  BOOST_CHECK((keys_of(sd) == std::vector<std::string>{"step", "model", "epoch", "optimizer"}));
  BOOST_CHECK_EQUAL(sd.size(), 4u);
}

BOOST_AUTO_TEST_CASE(replacing_a_value_keeps_its_place) {
  ckpt::StateDict sd;
  sd.insert("a", 1);
  sd.insert("b", 2);
  sd.insert("c", 3);
  sd.insert("b", "two");
  BOOST_CHECK_EQUAL(sd.size(), 3u);
  BOOST_CHECK((keys_of(sd) == std::vector<std::string>{"a", "b", "c"}));
  BOOST_REQUIRE(sd.at("b").isString());
  BOOST_CHECK_EQUAL(sd.at("b").toStringRef(), "two");
}

BOOST_AUTO_TEST_CASE(lookup_with_contains_find_and_at) {
  ckpt::StateDict sd;
  sd.insert("epoch", 5);
  BOOST_CHECK(sd.contains("epoch"));
  BOOST_CHECK(!sd.contains("step"));

  const auto found = sd.find("epoch");
  BOOST_REQUIRE(found.has_value());
  BOOST_CHECK_EQUAL(found->toInt(), 5);
  BOOST_CHECK(!sd.find("step").has_value());

  BOOST_CHECK_EQUAL(sd.at("epoch").toInt(), 5);
  BOOST_CHECK_EXCEPTION(sd.at("step"), ckpt::MissingKeys,
                        [](const ckpt::MissingKeys& e) { return mentions(e, "step"); });
  // A MissingKeys is a ckpt::Error, so one catch handles every ckpt failure.
  BOOST_CHECK_THROW(sd.at("step"), ckpt::Error);
}

BOOST_AUTO_TEST_CASE(sub_returns_the_nested_dict_or_a_typed_error) {
  ckpt::StateDict sd;
  ckpt::StateDict model;
  model.insert("weight", at::zeros({5, 10}));
  sd.insert("model", model);
  sd.insert("epoch", 5);
  sd.insert("state", IValue(int_keyed_dict()));

  BOOST_CHECK(sd.sub("model").is(model));
  BOOST_CHECK_EXCEPTION(sd.sub("optimizer"), ckpt::MissingKeys,
                        [](const ckpt::MissingKeys& e) { return mentions(e, "optimizer"); });
  BOOST_CHECK_EXCEPTION(sd.sub("epoch"), ckpt::Mismatch,
                        [](const ckpt::Mismatch& e) { return mentions(e, "epoch"); });
  // An optimizer's int-keyed state is a dict, but not a StateDict.
  BOOST_CHECK_THROW(sd.sub("state"), ckpt::Mismatch);
}

BOOST_AUTO_TEST_CASE(erase_removes_a_key_and_says_whether_it_was_there) {
  ckpt::StateDict sd;
  sd.insert("a", 1);
  sd.insert("b", 2);
  sd.insert("c", 3);
  BOOST_CHECK(sd.erase("b"));
  BOOST_CHECK(!sd.erase("b"));
  BOOST_CHECK(!sd.erase("never_there"));
  BOOST_CHECK(!sd.contains("b"));
  BOOST_CHECK_EQUAL(sd.size(), 2u);
  BOOST_CHECK((keys_of(sd) == std::vector<std::string>{"a", "c"}));
  BOOST_CHECK(sd.erase("a"));
  BOOST_CHECK(sd.erase("c"));
  BOOST_CHECK(sd.empty());
}

BOOST_AUTO_TEST_CASE(copies_share_one_dictionary) {
  ckpt::StateDict a;
  ckpt::StateDict b = a;
  BOOST_CHECK(a.is(b));
  b.insert("epoch", 5);
  BOOST_CHECK(a.contains("epoch"));
  a.erase("epoch");
  BOOST_CHECK(b.empty());

  ckpt::StateDict other;
  BOOST_CHECK(!a.is(other));  // two empty dicts are still two dicts
}

BOOST_AUTO_TEST_CASE(a_nested_state_dict_stays_the_same_object) {
  ckpt::StateDict outer;
  ckpt::StateDict inner;
  outer.insert("model", inner);
  inner.insert("weight", at::ones({2}));  // after insertion: still seen through outer
  BOOST_CHECK(outer.sub("model").is(inner));
  BOOST_CHECK(outer.sub("model").contains("weight"));
  outer.sub("model").insert("bias", at::zeros({2}));
  BOOST_CHECK(inner.contains("bias"));
}

BOOST_AUTO_TEST_CASE(tensors_are_held_not_copied) {
  ckpt::StateDict sd;
  auto t = at::zeros({3});
  sd.insert("t", t);
  t.fill_(2.0);
  BOOST_CHECK(at::equal(sd.at("t").toTensor(), at::full({3}, 2.0)));
  BOOST_CHECK(sd.at("t").toTensor().data_ptr() == t.data_ptr());
}

BOOST_AUTO_TEST_CASE(to_ivalue_and_from_ivalue_share_without_copying) {
  ckpt::StateDict sd;
  sd.insert("epoch", 5);

  IValue v = sd.to_ivalue();
  BOOST_REQUIRE(v.isGenericDict());
  v.toGenericDict().insert("step", 1000);  // a mutation through the IValue ...
  BOOST_CHECK(sd.contains("step"));        // ... is seen by the StateDict

  ckpt::StateDict back = ckpt::StateDict::from_ivalue(v);
  BOOST_CHECK(back.is(sd));
  back.insert("model", ckpt::StateDict());  // and the other way round
  BOOST_CHECK(v.toGenericDict().contains("model"));
  BOOST_CHECK(sd.contains("model"));
  BOOST_CHECK(sd.dict().is(back.dict()));

  c10::impl::GenericDict raw(c10::StringType::get(), c10::AnyType::get());
  ckpt::StateDict wrapped(raw);
  wrapped.insert("x", 1);
  BOOST_CHECK(raw.contains("x"));
}

BOOST_AUTO_TEST_CASE(from_ivalue_refuses_what_is_not_a_string_keyed_dict) {
  BOOST_CHECK_THROW(ckpt::StateDict::from_ivalue(IValue(5)), ckpt::Mismatch);
  BOOST_CHECK_THROW(ckpt::StateDict::from_ivalue(IValue()), ckpt::Mismatch);
  BOOST_CHECK_THROW(ckpt::StateDict::from_ivalue(IValue(at::zeros({2}))), ckpt::Mismatch);
  BOOST_CHECK_THROW(ckpt::StateDict::from_ivalue(IValue(c10::List<std::int64_t>({1}))), ckpt::Mismatch);
  BOOST_CHECK_THROW(ckpt::StateDict::from_ivalue(IValue(int_keyed_dict())), ckpt::Mismatch);
  BOOST_CHECK_THROW(ckpt::StateDict{int_keyed_dict()}, ckpt::Mismatch);
}
