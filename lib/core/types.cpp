#include <ckpt/types.hpp>

#include <fmt/format.h>

#include <charconv>
#include <cstdlib>
#include <optional>

namespace ckpt {
namespace {

std::optional<std::int64_t> env_int(const char* name) {
  const char* s = std::getenv(name);
  if (!s || !*s) return std::nullopt;
  std::int64_t v = 0;
  const char* end = s + std::char_traits<char>::length(s);
  auto [p, ec] = std::from_chars(s, end, v);
  if (ec != std::errc() || p != end)
    throw Error(fmt::format("environment variable {}='{}' is not an integer", name, s));
  return v;
}

const char* type_name(const Arg::Value& v) {
  switch (v.index()) {
    case 0: return "int";
    case 1: return "float";
    case 2: return "bool";
    default: return "str";
  }
}

}  // namespace

RankInfo rank_info_from_env() {
  const auto rank = env_int("RANK");
  const auto world = env_int("WORLD_SIZE");
  if (!rank && !world) return {};
  if (!rank || !world) throw Error("RANK and WORLD_SIZE must be set together");
  if (*world < 1 || *rank < 0 || *rank >= *world)
    throw Error(fmt::format("RANK={} is not a rank of WORLD_SIZE={}", *rank, *world));
  return {*rank, *world};
}

std::int64_t Arg::as_int() const {
  if (auto* v = std::get_if<std::int64_t>(&value_)) return *v;
  throw Mismatch(fmt::format("argument is a {}, not an int", type_name(value_)));
}
double Arg::as_double() const {
  if (auto* v = std::get_if<double>(&value_)) return *v;
  if (auto* v = std::get_if<std::int64_t>(&value_)) return static_cast<double>(*v);
  throw Mismatch(fmt::format("argument is a {}, not a float", type_name(value_)));
}
bool Arg::as_bool() const {
  if (auto* v = std::get_if<bool>(&value_)) return *v;
  throw Mismatch(fmt::format("argument is a {}, not a bool", type_name(value_)));
}
const std::string& Arg::as_string() const {
  if (auto* v = std::get_if<std::string>(&value_)) return *v;
  throw Mismatch(fmt::format("argument is a {}, not a str", type_name(value_)));
}
std::string Arg::repr() const {
  switch (value_.index()) {
    case 0: return std::to_string(std::get<std::int64_t>(value_));
    case 1: return fmt::format("{}", std::get<double>(value_));
    case 2: return std::get<bool>(value_) ? "True" : "False";
    default: return fmt::format("'{}'", std::get<std::string>(value_));
  }
}

Kwargs::Kwargs(std::initializer_list<std::pair<std::string, Arg>> items) {
  for (const auto& [k, v] : items) set(k, v);
}

void Kwargs::set(const std::string& key, Arg value) {
  for (auto& [k, v] : items_)
    if (k == key) {
      v = std::move(value);
      return;
    }
  items_.emplace_back(key, std::move(value));
}

const Arg* Kwargs::find(const std::string& key) const {
  for (const auto& [k, v] : items_)
    if (k == key) return &v;
  return nullptr;
}

const Arg& Kwargs::at(const std::string& key) const {
  if (const Arg* a = find(key)) return *a;
  throw MissingKeys(fmt::format("no argument '{}'", key));
}

}  // namespace ckpt
