#include <ckpt/state_dict.hpp>

#include <fmt/format.h>

namespace ckpt {
namespace {

c10::impl::GenericDict new_dict() {
  return c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get());
}

bool string_keyed(const c10::impl::GenericDict& d) {
  if (d.keyType()->kind() == c10::TypeKind::StringType) return true;
  // A dict typed with Any keys is fine as long as every key is a string.
  for (const auto& e : d)
    if (!e.key().isString()) return false;
  return true;
}

}  // namespace

StateDict::StateDict() : dict_(new_dict()) {}

StateDict::StateDict(c10::impl::GenericDict dict) : dict_(std::move(dict)) {
  if (!string_keyed(dict_))
    throw Mismatch(fmt::format("a StateDict needs string keys, not {} keys", dict_.keyType()->str()));
}

StateDict StateDict::from_ivalue(const c10::IValue& value) {
  if (!value.isGenericDict())
    throw Mismatch(fmt::format("a StateDict is made from a dict, not a {}", value.tagKind()));
  return StateDict(value.toGenericDict());
}

void StateDict::insert_value(const std::string& key, c10::IValue value) {
  dict_.insert_or_assign(key, std::move(value));
}

bool StateDict::contains(const std::string& key) const {
  return dict_.contains(key);
}

c10::IValue StateDict::at(const std::string& key) const {
  auto it = dict_.find(key);
  if (it == dict_.end()) throw MissingKeys(fmt::format("state dict has no key '{}'", key));
  return it->value();
}

std::optional<c10::IValue> StateDict::find(const std::string& key) const {
  auto it = dict_.find(key);
  if (it == dict_.end()) return std::nullopt;
  return it->value();
}

StateDict StateDict::sub(const std::string& key) const {
  c10::IValue v = at(key);
  if (!v.isGenericDict())
    throw Mismatch(fmt::format("state dict key '{}' holds a {}, not a dict", key, v.tagKind()));
  return StateDict(v.toGenericDict());
}

bool StateDict::erase(const std::string& key) {
  return dict_.erase(key) > 0;
}
std::size_t StateDict::size() const {
  return dict_.size();
}
bool StateDict::empty() const {
  return dict_.empty();
}
StateDict::iterator StateDict::begin() const {
  return dict_.begin();
}
StateDict::iterator StateDict::end() const {
  return dict_.end();
}
c10::IValue StateDict::to_ivalue() const {
  return c10::IValue(dict_);
}
bool StateDict::is(const StateDict& other) const {
  return dict_.is(other.dict_);
}

}  // namespace ckpt
