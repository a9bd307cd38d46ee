#include <ckpt/barrier.hpp>

namespace ckpt {

BarrierOutcome Barrier::arrive(const std::string&, bool failed, bool) {
  if (!failed) execute_barrier();
  return {};
}

}  // namespace ckpt
