#include "format/dtypes.hpp"

namespace ckpt::detail {
namespace {

struct StorageType {
  const char* name;
  c10::ScalarType dtype;
  bool written;             // whether ckpt writes it (every torch it targets can load it)
  const char* torch;        // the attribute of module torch naming the dtype
  const char* safetensors;  // its name in a safetensors header, if the format has one
};

constexpr StorageType kStorageTypes[] = {
    {"FloatStorage", c10::ScalarType::Float, true, "float32", "F32"},
    {"DoubleStorage", c10::ScalarType::Double, true, "float64", "F64"},
    {"HalfStorage", c10::ScalarType::Half, true, "float16", "F16"},
    {"BFloat16Storage", c10::ScalarType::BFloat16, true, "bfloat16", "BF16"},
    {"CharStorage", c10::ScalarType::Char, true, "int8", "I8"},
    {"ByteStorage", c10::ScalarType::Byte, true, "uint8", "U8"},
    {"ShortStorage", c10::ScalarType::Short, true, "int16", "I16"},
    {"IntStorage", c10::ScalarType::Int, true, "int32", "I32"},
    {"LongStorage", c10::ScalarType::Long, true, "int64", "I64"},
    {"BoolStorage", c10::ScalarType::Bool, true, "bool", "BOOL"},
    // safetensors names complex64 "C64" from release 0.7 on; complex128 has no name.
    {"ComplexFloatStorage", c10::ScalarType::ComplexFloat, true, "complex64", "C64"},
    {"ComplexDoubleStorage", c10::ScalarType::ComplexDouble, true, "complex128", nullptr},
    // torch 2.x saves complex32; torch 1.13 can neither save nor load it.
    {"ComplexHalfStorage", c10::ScalarType::ComplexHalf, false, "complex32", nullptr},
};

/// The dtypes a safetensors header may name that this libtorch (1.13) has no
/// dtype for: float8 (torch 2.1+), unsigned 16/32/64-bit (torch 2.3+), the
/// sub-byte MX formats. A libtorch that has one moves it into kStorageTypes.
struct ForeignSafetensorsType {
  const char* name;
  unsigned bits;
};

constexpr ForeignSafetensorsType kForeignSafetensorsTypes[] = {
    {"F8_E4M3", 8}, {"F8_E5M2", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8}, {"U16", 16},
    {"U32", 32},    {"U64", 64},    {"F4", 4},      {"F6_E2M3", 6},     {"F6_E3M2", 6},
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

const char* safetensors_dtype_name(c10::ScalarType dtype) {
  for (const auto& t : kStorageTypes)
    if (t.dtype == dtype) return t.safetensors;
  return nullptr;
}

SafetensorsDtype safetensors_dtype(std::string_view name) {
  for (const auto& t : kStorageTypes)
    if (t.safetensors && name == t.safetensors)
      return {t.dtype, static_cast<unsigned>(c10::elementSize(t.dtype) * 8)};
  for (const auto& t : kForeignSafetensorsTypes)
    if (name == t.name) return {c10::ScalarType::Undefined, t.bits};
  return {};
}

}  // namespace ckpt::detail
