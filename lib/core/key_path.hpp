// How a dict key reads in a key path ("model.layer1.weight", "state.0.exp_avg").
#pragma once

#include <ATen/core/ivalue.h>

#include <fmt/format.h>

#include <string>

namespace ckpt::detail {

inline std::string key_text(const c10::IValue& k) {
  if (k.isString()) return k.toStringRef();
  if (k.isInt()) return std::to_string(k.toInt());
  if (k.isBool()) return k.toBool() ? "True" : "False";
  if (k.isDouble()) return fmt::format("{}", k.toDouble());
  return "?";
}

}  // namespace ckpt::detail
