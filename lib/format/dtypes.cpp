#include "format/dtypes.hpp"

namespace ckpt::detail {
namespace {

struct StorageType {
  const char* name;
  c10::ScalarType dtype;
  bool written;  // whether ckpt writes it (every torch it targets can load it)
};

constexpr StorageType kStorageTypes[] = {
    {"FloatStorage", c10::ScalarType::Float, true},
    {"DoubleStorage", c10::ScalarType::Double, true},
    {"HalfStorage", c10::ScalarType::Half, true},
    {"BFloat16Storage", c10::ScalarType::BFloat16, true},
    {"CharStorage", c10::ScalarType::Char, true},
    {"ByteStorage", c10::ScalarType::Byte, true},
    {"ShortStorage", c10::ScalarType::Short, true},
    {"IntStorage", c10::ScalarType::Int, true},
    {"LongStorage", c10::ScalarType::Long, true},
    {"BoolStorage", c10::ScalarType::Bool, true},
    {"ComplexFloatStorage", c10::ScalarType::ComplexFloat, true},
    {"ComplexDoubleStorage", c10::ScalarType::ComplexDouble, true},
    // torch 2.x saves complex32; torch 1.13 can neither save nor load it.
    {"ComplexHalfStorage", c10::ScalarType::ComplexHalf, false},
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

}  // namespace ckpt::detail
