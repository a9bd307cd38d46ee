// Writing one safetensors file from tensors fetched one at a time: what
// safetensors::save, DCP's HuggingFaceStorageWriter and `ckpt convert` share.
#pragma once

#include <ckpt/state_dict.hpp>

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace ckpt::safetensors {
struct SaveOptions;
}

namespace ckpt::detail {

/// A tensor to be written: its name, dtype and shape, its data not yet at hand.
struct SafetensorsEntry {
  std::string name;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  std::vector<std::int64_t> shape;
};

/// Writes `entries` as one `.safetensors` file, durably (temporary file,
/// fsync when `fsync`, rename, directory fsync): the header (with `metadata`
/// as `__metadata__` when not empty) padded so the data starts 8-aligned, then
/// the data, largest element size first and in the given order within one
/// size. `data(i)` gives entry i's values (any device or strides; shape and
/// dtype must be the entry's, else Mismatch); it is called once per entry, in
/// file order, and its tensor is released before the next call, so at most one
/// fetched tensor is alive at a time. Returns each entry's byte offset in the
/// file (index i for entry i). Throws Unsupported for a dtype safetensors has
/// no name for, IoError on a failed write (the file is then as it was).
std::vector<std::uint64_t> write_safetensors(const std::filesystem::path& file,
                                             const std::vector<SafetensorsEntry>& entries,
                                             const std::map<std::string, std::string>& metadata,
                                             const std::function<at::Tensor(std::size_t)>& data, bool fsync);

/// Where a save takes each tensor's values from when its turn comes: `name`
/// and the state dict's tensor in, a tensor of the same shape and dtype out.
using TensorValues = std::function<at::Tensor(const std::string& name, const at::Tensor& tensor)>;

/// safetensors::save(), with each tensor's values given by `values` when the
/// tensor is written (one at a time, released before the next) rather than
/// read from the state dict's tensor, which may then be a placeholder with a
/// shape and a dtype and no data (`ckpt convert` streams a checkpoint so).
/// A null `values` is save() itself.
void save_streaming(const std::filesystem::path& path, const StateDict& state_dict,
                    const safetensors::SaveOptions& options, const TensorValues& values);

/// JSON text of `s` (a quoted string with escapes).
std::string json_string(const std::string& s);

}  // namespace ckpt::detail
