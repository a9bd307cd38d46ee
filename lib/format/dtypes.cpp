#include "format/dtypes.hpp"

namespace ckpt::detail {
namespace {

struct StorageType {
  const char* name;
  c10::ScalarType dtype;
  bool written;       // whether ckpt writes it (every torch it targets can load it)
  const char* torch;  // the attribute of module torch naming the dtype
};

constexpr StorageType kStorageTypes[] = {
    {"FloatStorage", c10::ScalarType::Float, true, "float32"},
    {"DoubleStorage", c10::ScalarType::Double, true, "float64"},
    {"HalfStorage", c10::ScalarType::Half, true, "float16"},
    {"BFloat16Storage", c10::ScalarType::BFloat16, true, "bfloat16"},
    {"CharStorage", c10::ScalarType::Char, true, "int8"},
    {"ByteStorage", c10::ScalarType::Byte, true, "uint8"},
    {"ShortStorage", c10::ScalarType::Short, true, "int16"},
    {"IntStorage", c10::ScalarType::Int, true, "int32"},
    {"LongStorage", c10::ScalarType::Long, true, "int64"},
    {"BoolStorage", c10::ScalarType::Bool, true, "bool"},
    {"ComplexFloatStorage", c10::ScalarType::ComplexFloat, true, "complex64"},
    {"ComplexDoubleStorage", c10::ScalarType::ComplexDouble, true, "complex128"},
    // torch 2.x saves complex32; torch 1.13 can neither save nor load it.
    {"ComplexHalfStorage", c10::ScalarType::ComplexHalf, false, "complex32"},
};

}  // namespace

const char* storage_type_name(c10::ScalarType dtype) {
  for (const auto& t : kStorageTypes)
    if (t.dtype == dtype && t.written) return t.name;
  return nullptr;
}

c10::ScalarType dtype_of_storage(std::string_view name) {
  for (const auto& t : kStorageTypes)
    if (name == t.name) return t.dtype;
  return c10::ScalarType::Undefined;
}

const char* torch_dtype_name(c10::ScalarType dtype) {
  for (const auto& t : kStorageTypes)
    if (t.dtype == dtype) return t.torch;
  return nullptr;
}

c10::ScalarType dtype_of_torch_name(std::string_view name) {
  for (const auto& t : kStorageTypes)
    if (name == t.torch) return t.dtype;
  return c10::ScalarType::Undefined;
}

}  // namespace ckpt::detail
