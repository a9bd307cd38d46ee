// The one table between torch dtypes, the storage class names a pickle names
// them by (torch.FloatStorage, ...) and their names as attributes of module
// torch (torch.float32, ...): the pickle writer, the unpickler and DCP's
// metadata use it.
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

}  // namespace ckpt::detail
