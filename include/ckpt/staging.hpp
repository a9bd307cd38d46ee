// Staging: copying a state dict out of the training tensors before it is written
// (upstream's staging.py).
#pragma once

namespace ckpt {

/// Upstream's CheckpointStagerConfig; all true by default, as upstream. On a
/// build without CUDA, pinned memory and non-blocking copies degrade (logged
/// once) instead of failing.
struct CheckpointStagerConfig {
  bool use_pinned_memory = true;
  bool use_shared_memory = true;
  bool use_async_staging = true;
  bool use_non_blocking_copy = true;
};

}  // namespace ckpt
