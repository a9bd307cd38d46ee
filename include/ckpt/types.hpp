// Small value types shared by the checkpointer family: the rank of this process
// and the keyword arguments (PyTorch's **kwargs) that travel with a save.
#pragma once

#include <ckpt/error.hpp>

#include <concepts>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace ckpt {

/// Where this process stands in the job (upstream's RankInfo).
struct RankInfo {
  std::int64_t global_rank = 0;
  std::int64_t global_world_size = 1;

  friend bool operator==(const RankInfo&, const RankInfo&) = default;
};

/// RankInfo from torchrun's `RANK` and `WORLD_SIZE` when both are set, else
/// {0, 1}. Throws Error when they are set but malformed or inconsistent.
RankInfo rank_info_from_env();

/// One keyword argument's value: int, double, bool or string.
class Arg {
 public:
  using Value = std::variant<std::int64_t, double, bool, std::string>;

  template <std::integral T>
  requires(!std::same_as<T, bool>) Arg(T v) : value_(static_cast<std::int64_t>(v)) {}
  Arg(double v) : value_(v) {}
  Arg(bool v) : value_(v) {}
  Arg(const char* v) : value_(std::string(v)) {}
  Arg(std::string v) : value_(std::move(v)) {}

  const Value& value() const { return value_; }
  bool is_int() const { return std::holds_alternative<std::int64_t>(value_); }
  bool is_double() const { return std::holds_alternative<double>(value_); }
  bool is_bool() const { return std::holds_alternative<bool>(value_); }
  bool is_string() const { return std::holds_alternative<std::string>(value_); }
  /// The value as that type; throws Mismatch naming both types otherwise.
  std::int64_t as_int() const;
  double as_double() const;  ///< an int converts
  bool as_bool() const;
  const std::string& as_string() const;
  /// The value as Python would print it (strings quoted).
  std::string repr() const;

  friend bool operator==(const Arg&, const Arg&) = default;

 private:
  Value value_;
};

/// An ordered map of keyword arguments (PyTorch's **kwargs), e.g.
/// `Kwargs{{"custom_arg", "test_value"}, {"another_arg", 42}}`.
class Kwargs {
 public:
  Kwargs() = default;
  Kwargs(std::initializer_list<std::pair<std::string, Arg>> items);

  /// Sets `key` (replacing, keeping its place).
  void set(const std::string& key, Arg value);
  /// The argument `key`, or nullptr.
  const Arg* find(const std::string& key) const;
  /// The argument `key`; throws MissingKeys naming it when absent.
  const Arg& at(const std::string& key) const;
  bool contains(const std::string& key) const { return find(key) != nullptr; }
  std::size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  auto begin() const { return items_.begin(); }
  auto end() const { return items_.end(); }

  friend bool operator==(const Kwargs&, const Kwargs&) = default;

 private:
  std::vector<std::pair<std::string, Arg>> items_;
};

}  // namespace ckpt
