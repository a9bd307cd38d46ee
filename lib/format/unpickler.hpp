// A safe unpickler for the pickles torch.save writes for state dicts.
#pragma once

#include <ckpt/format.hpp>

#include "format/tree_check.hpp"

#include <deque>
#include <filesystem>
#include <functional>
#include <string_view>

namespace ckpt::detail {

struct Pickle {
  std::deque<Node> nodes;  ///< owns every node; addresses are stable
  const Node* root = nullptr;
};

/// Checks a storage the pickle refers to: the record exists and holds `numel`
/// elements of `dtype`. Throws CorruptCheckpoint otherwise.
using StorageCheck = std::function<void(const std::string& key, c10::ScalarType dtype, std::int64_t numel)>;

/// What a pickle that names a global off the allowlist throws: a
/// CorruptCheckpoint to every caller; the DCP reader keeps such a value as an
/// opaque one instead.
class RefusedGlobal : public CorruptCheckpoint {
 public:
  using CorruptCheckpoint::CorruptCheckpoint;
};

/// Parses `data` (the bytes of data.pkl of `path`). Only the opcodes and the
/// globals torch.save emits for state dicts are accepted; any other global is
/// a RefusedGlobal naming it. Nothing is executed. The result is checked:
/// no cycles, nesting at most kMaxNesting, every tensor inside its storage.
Pickle unpickle(std::string_view data, const std::filesystem::path& path, const StorageCheck& check);

}  // namespace ckpt::detail
