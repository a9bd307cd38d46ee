// Staging from accelerator memory (CUDA, or any device type with streams):
//   1. on the trainer's thread, when the save is asked for, an event is
//      recorded on each device's current stream (`DeviceFences`): staging must
//      see the values the trainer's queued kernels produce, not older ones;
//   2. on the staging strand, a side stream per device waits for that event,
//      then device→host copies of every record on that device are queued on it,
//      non-blocking, straight into the arena (page-locked with the driver, so the
//      copies are DMA transfers that do not hold up the trainer's stream);
//   3. the side stream is synchronised before staging completes.
// Nothing here names CUDA at compile time: streams and events go through c10's
// device-generic interfaces and the page-locking through the CUDA runtime's
// `cudaHostRegister`, looked up when first needed. On a CPU-only libtorch no
// record is on a device and none of this runs.
#pragma once

#include "format/layout.hpp"

#include <c10/core/Device.h>
#include <c10/core/Event.h>

#include <cstddef>
#include <memory>
#include <vector>

namespace ckpt::detail {

/// Step 1: an event on the current stream of every device `value` has tensors on.
class DeviceFences {
 public:
  DeviceFences() = default;
  explicit DeviceFences(const c10::IValue& value);
  bool empty() const { return fences_.empty(); }
  /// Makes `stream` wait for the fence taken on its device, if any.
  void block(const c10::Stream& stream) const;

 private:
  std::vector<std::pair<c10::Device, std::shared_ptr<c10::Event>>> fences_;
};

/// Steps 2 and 3: copies every record of `layout` with a `device_source` to
/// `base + data_offset`, on a side stream per device, and waits for the copies.
void copy_device_records(const Layout& layout, std::byte* base, const DeviceFences& fences,
                         bool non_blocking);

/// Whether any record of `layout` is still on a device.
bool has_device_records(const Layout& layout);

/// Page-locks [p, p + n) with the CUDA driver (cudaHostRegister). False, with
/// the reason in `why`, when there is no CUDA runtime or it refuses.
bool host_register(void* p, std::size_t n, std::string& why);
/// Undoes host_register.
void host_unregister(void* p);

}  // namespace ckpt::detail
