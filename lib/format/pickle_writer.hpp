// The pickle torch.save writes for a state dict (pickle_writer.cpp explains
// the opcodes).
#pragma once

#include "format/layout.hpp"

#include <ATen/core/ivalue.h>

#include <string>

namespace ckpt::detail {

/// Serializes `value` as torch.save's data.pkl and appends to `layout` one
/// record per tensor storage (unplaced: no offsets yet), each written once.
/// Throws Unsupported naming the key path of a value it cannot hold.
std::string write_pickle(const c10::IValue& value, Layout& layout, bool defer_device_copies);

}  // namespace ckpt::detail
