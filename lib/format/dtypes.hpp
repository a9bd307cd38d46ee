// The one table between torch dtypes, the storage class names a pickle names
// them by (torch.FloatStorage, ...), their names as attributes of module torch
// (torch.float32, ...) and their names in a safetensors header ("F32", ...):
// the pickle writer, the unpickler, DCP's metadata and safetensors use it.
#pragma once

#include <c10/core/ScalarType.h>

#include <string_view>

namespace ckpt::detail {

/// The storage class name ckpt writes for `dtype` ("FloatStorage"); nullptr when
/// ckpt does not write that dtype (complex32: torch 1.13 cannot load it).
const char* storage_type_name(c10::ScalarType dtype);

/// The dtype of a storage class name read from a pickle; Undefined when the
/// name is not one torch.save writes.
c10::ScalarType dtype_of_storage(std::string_view name);

/// "float32", "bfloat16", ... for `dtype`; nullptr for a dtype not in the table.
const char* torch_dtype_name(c10::ScalarType dtype);

/// The dtype named `torch.<name>`; Undefined when the name is not in the table.
c10::ScalarType dtype_of_torch_name(std::string_view name);

/// The safetensors name of `dtype` ("F32", "BF16", "C64", ...); nullptr when
/// the safetensors format has none for it (complex128, complex32, ...).
const char* safetensors_dtype_name(c10::ScalarType dtype);

/// A dtype name as a safetensors header gives it.
struct SafetensorsDtype {
  /// The torch dtype; Undefined where this libtorch has none (F8_E4M3, U16, ...).
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  /// Bits per element (4 for F4, 6 for F6_E2M3); 0 when the format knows no
  /// dtype of that name.
  unsigned bits = 0;
};

/// What the safetensors format says of the dtype `name`.
SafetensorsDtype safetensors_dtype(std::string_view name);

}  // namespace ckpt::detail
