// Laying a state dict out as a checkpoint file (Layout, layout.hpp).
#pragma once

#include "format/layout.hpp"
#include "format/zip_image.hpp"

#include <ATen/core/ivalue.h>

#include <vector>

namespace ckpt::detail {

/// Serializes `value` to the pickle torch.save would write and lays out every
/// record. Throws Unsupported naming the key path of a value it cannot hold.
/// Tensors on an accelerator are copied to host memory here, unless
/// `defer_device_copies`: then their records name the device storage and the
/// caller copies them (staging does, on a side stream, into the arena).
Layout plan_layout(const c10::IValue& value, bool defer_device_copies = false);

/// The zip image of `layout`: its records (crc32 as known so far) and its
/// directory offset.
ZipImage zip_image(const Layout& layout);

}  // namespace ckpt::detail
