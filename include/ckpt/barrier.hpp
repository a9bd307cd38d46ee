// Barriers: every rank waits until all ranks have written their files before
// any rank commits (upstream's barriers.py).
#pragma once

#include <ckpt/types.hpp>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ckpt {

/// A synchronization point across ranks.
class Barrier {
 public:
  virtual ~Barrier() = default;
  /// Returns once every rank reached the barrier. Throws Timeout when that does
  /// not happen within the barrier's own timeout.
  virtual void execute_barrier() = 0;
};

/// Which barrier a checkpointer uses: none by default, else a registered type
/// ("tcp_store", "dist_barrier", or one a user registered) with its arguments.
struct BarrierConfig {
  std::optional<std::string> barrier_type;
  Kwargs barrier_args;
};

/// Makes a barrier of a registered type from its arguments.
using BarrierFactory = std::function<std::shared_ptr<Barrier>(const Kwargs& barrier_args)>;

/// Registers (or replaces) a barrier type under `name`. Thread-safe.
void register_barrier(const std::string& name, BarrierFactory factory);
/// The registered barrier type names, sorted.
std::vector<std::string> registered_barriers();
/// The barrier `config` describes: nullptr when it names none. Throws Error
/// "Unknown barrier type '<name>'", listing the known ones, for an unknown name.
std::shared_ptr<Barrier> create_barrier_from_config(const BarrierConfig& config);

}  // namespace ckpt
