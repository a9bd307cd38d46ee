// The configuration of a checkpointer (upstream's CheckpointerConfig and the
// configs it holds): plain values, with no dependency on how a save runs, so
// that code which only configures or saves synchronously compiles no Asio.
#pragma once

#include <ckpt/types.hpp>

#include <chrono>
#include <optional>
#include <string>

namespace ckpt {

/// Upstream's CheckpointWriterConfig.
struct CheckpointWriterConfig {
  /// How long the barrier may take (upstream: write_barrier_timeout_secs = 600,
  /// logged only; here a barrier that takes longer fails the write with Timeout).
  std::chrono::milliseconds write_barrier_timeout = std::chrono::seconds(600);
};

/// Upstream's CheckpointStagerConfig; all true by default, as upstream. On a
/// build without CUDA, pinned memory degrades to mlock where the limits allow
/// and non-blocking copies to plain copies, each logged once, instead of failing.
struct CheckpointStagerConfig {
  bool use_pinned_memory = true;
  bool use_shared_memory = true;
  bool use_async_staging = true;
  bool use_non_blocking_copy = true;
};

/// Upstream's CheckpointProcessConfig (the writer child's timeouts).
struct CheckpointProcessConfig {
  /// How long the child may take to start, run its init function and answer
  /// its first ping; past it the child is killed and the start fails (Timeout).
  std::chrono::milliseconds subprocess_init_timeout = std::chrono::seconds(30);
  /// How long the child may take to exit after being told to, before SIGKILL.
  std::chrono::milliseconds subprocess_shutdown_timeout = std::chrono::seconds(60);
  /// How long one write (file, hooks and barrier) may take in the child.
  std::chrono::milliseconds write_timeout = std::chrono::hours(1);
  /// Added to the child's scheduling niceness (`nice(2)`): the writer yields
  /// the CPU to training when both want it, so a background write slows the
  /// trainer as little as possible; alone it runs at full speed. 0 keeps the
  /// parent's priority.
  int writer_niceness = 10;
};

/// Which barrier a checkpointer uses: none by default, else a registered type
/// ("tcp_store", "dist_barrier", or one a user registered) with its arguments.
struct BarrierConfig {
  std::optional<std::string> barrier_type;
  Kwargs barrier_args;
};

/// Upstream's CheckpointerConfig.
struct CheckpointerConfig {
  CheckpointWriterConfig writer_config;
  CheckpointStagerConfig staging_config;
  CheckpointProcessConfig process_config;
  BarrierConfig barrier_config;
};

}  // namespace ckpt
