// The writer child process of the asynchronous checkpointer (upstream's
// checkpoint_process.py).
#pragma once

#include <chrono>

namespace ckpt {

struct CheckpointProcessConfig {
  /// How long the child may take to start and answer its first ping.
  std::chrono::milliseconds subprocess_init_timeout = std::chrono::seconds(30);
  /// How long the child may take to exit after being told to, before SIGKILL.
  std::chrono::milliseconds subprocess_shutdown_timeout = std::chrono::seconds(60);
};

}  // namespace ckpt
