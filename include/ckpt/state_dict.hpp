// StateDict: the value a checkpoint holds, like PyTorch's STATE_DICT
// (dict[str, Any]).
#pragma once

#include <ckpt/error.hpp>

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace ckpt {

/// A string-keyed, insertion-ordered dictionary of checkpointable values:
/// tensors, int, double, bool, string, None (`c10::IValue()`), lists, tuples,
/// nested dicts (which may have integer keys, as optimizer states do) and nested
/// StateDicts.
///
/// A StateDict is a handle, shared like a Python dict: copies refer to the same
/// dictionary, and a nested StateDict inserted into another stays the same
/// object. It converts to and from `c10::IValue` without copying.
class StateDict {
 public:
  using iterator = c10::impl::GenericDict::iterator;

  /// A new, empty dictionary.
  StateDict();
  /// Shares `dict`, whose keys must be strings; throws Mismatch otherwise.
  explicit StateDict(c10::impl::GenericDict dict);
  /// Shares the dict held by `value`; throws Mismatch if it holds no dict with
  /// string keys.
  static StateDict from_ivalue(const c10::IValue& value);

  /// Sets `key` to `value` (replacing an earlier value; the key keeps its place).
  /// `value` is anything c10::IValue holds, a nested StateDict (shared, not
  /// copied), a string literal, bool, any integer (stored as int64) or any
  /// floating-point number (stored as double).
  template <typename T>
  void insert(const std::string& key, T&& value) {
    insert_value(key, make_value(std::forward<T>(value)));
  }

  bool contains(const std::string& key) const;
  /// The value of `key`; throws MissingKeys naming it when absent.
  c10::IValue at(const std::string& key) const;
  /// The value of `key`, or nothing.
  std::optional<c10::IValue> find(const std::string& key) const;
  /// The nested dictionary at `key`, shared; throws MissingKeys or Mismatch.
  StateDict sub(const std::string& key) const;
  /// Removes `key`; returns whether it was there.
  bool erase(const std::string& key);

  std::size_t size() const;
  bool empty() const;
  iterator begin() const;
  iterator end() const;

  /// The dictionary as an IValue, shared (no copy).
  c10::IValue to_ivalue() const;
  const c10::impl::GenericDict& dict() const { return dict_; }
  /// Whether both handles refer to the same dictionary.
  bool is(const StateDict& other) const;

 private:
  template <typename T>
  static c10::IValue make_value(T&& value) {
    using V = std::remove_cvref_t<T>;
    if constexpr (std::is_same_v<V, StateDict>)
      return value.to_ivalue();
    else if constexpr (std::is_same_v<V, bool>)
      return c10::IValue(static_cast<bool>(value));
    else if constexpr (std::is_integral_v<V>)
      return c10::IValue(static_cast<std::int64_t>(value));
    else if constexpr (std::is_floating_point_v<V>)
      return c10::IValue(static_cast<double>(value));
    else if constexpr (std::is_convertible_v<T, std::string_view> && !std::is_same_v<V, c10::IValue>)
      return c10::IValue(std::string(std::string_view(value)));
    else
      return c10::IValue(std::forward<T>(value));
  }
  void insert_value(const std::string& key, c10::IValue value);

  c10::impl::GenericDict dict_;
};

}  // namespace ckpt
