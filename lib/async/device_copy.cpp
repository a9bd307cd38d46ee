#include "async/device_copy.hpp"

#include <ckpt/error.hpp>

#include <fmt/format.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <dlfcn.h>

#include <map>

namespace ckpt::detail {

namespace {

void collect_devices(const c10::IValue& v, std::vector<c10::Device>& out) {
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    // Meta tensors have no data: laying the file out refuses them, by key.
    if (t.defined() && !t.device().is_cpu() && !t.is_meta() &&
        std::find(out.begin(), out.end(), t.device()) == out.end())
      out.push_back(t.device());
  } else if (v.isGenericDict()) {
    for (const auto& e : v.toGenericDict()) collect_devices(e.value(), out);
  } else if (v.isList()) {
    for (const auto& e : v.toList()) collect_devices(e, out);
  } else if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) collect_devices(e, out);
  }
}

// The CUDA runtime's entry points, resolved once from what the process has
// loaded (libtorch_cuda links the runtime): nothing to link against here.
using RegisterFn = int (*)(void*, std::size_t, unsigned int);
using UnregisterFn = int (*)(void*);
using ErrorStringFn = const char* (*)(int);
using GetLastErrorFn = int (*)();

struct CudaRuntime {
  RegisterFn reg = nullptr;
  UnregisterFn unreg = nullptr;
  ErrorStringFn error_string = nullptr;
  GetLastErrorFn get_last_error = nullptr;
  CudaRuntime() {
    reg = reinterpret_cast<RegisterFn>(::dlsym(RTLD_DEFAULT, "cudaHostRegister"));
    unreg = reinterpret_cast<UnregisterFn>(::dlsym(RTLD_DEFAULT, "cudaHostUnregister"));
    error_string = reinterpret_cast<ErrorStringFn>(::dlsym(RTLD_DEFAULT, "cudaGetErrorString"));
    get_last_error = reinterpret_cast<GetLastErrorFn>(::dlsym(RTLD_DEFAULT, "cudaGetLastError"));
  }
};

const CudaRuntime& cuda_runtime() {
  static const CudaRuntime runtime;
  return runtime;
}

}  // namespace

DeviceFences::DeviceFences(const c10::IValue& value) {
  std::vector<c10::Device> devices;
  collect_devices(value, devices);
  for (const auto& d : devices) {
    if (!c10::impl::hasDeviceGuardImpl(d.type()))
      throw Unsupported(fmt::format("tensors on {}: this libtorch has no support for that device", d.str()));
    try {
      c10::impl::VirtualGuardImpl impl(d.type());
      auto event = std::make_shared<c10::Event>(d.type());
      event->record(impl.getStream(d));
      fences_.emplace_back(d, std::move(event));
    } catch (const c10::Error& e) {
      throw Unsupported(
          fmt::format("tensors on {} cannot be staged: {}", d.str(), e.what_without_backtrace()));
    }
  }
}

void DeviceFences::block(const c10::Stream& stream) const {
  for (const auto& [device, event] : fences_)
    if (device == stream.device()) event->block(stream);
}

bool has_device_records(const Layout& layout) {
  for (const auto& r : layout.records)
    if (r.device_source) return true;
  return false;
}

void copy_device_records(const Layout& layout, std::byte* base, const DeviceFences& fences,
                         bool non_blocking) {
  std::map<std::pair<int, int>, std::vector<const LayoutRecord*>> by_device;
  for (const auto& r : layout.records)
    if (r.device_source) by_device[{static_cast<int>(r.device.type()), r.device.index()}].push_back(&r);
  for (const auto& [key, records] : by_device) {
    const c10::Device device = records.front()->device;
    if (!c10::impl::hasDeviceGuardImpl(device.type()))
      throw Unsupported(
          fmt::format("tensors on {}: this libtorch has no support for that device", device.str()));
    c10::impl::VirtualGuardImpl impl(device.type());
    c10::DeviceGuard device_guard(device);
    const c10::Stream side = impl.getStreamFromGlobalPool(device);
    fences.block(side);
    {
      c10::StreamGuard stream_guard(side);
      for (const LayoutRecord* r : records) {
        const auto n = static_cast<std::int64_t>(r->size);
        auto src = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(device))
                       .set_(r->device_source, 0, {n}, {1});
        auto dst = at::from_blob(base + r->data_offset, {n}, at::TensorOptions().dtype(at::kByte));
        dst.copy_(src, non_blocking);
      }
    }
    side.synchronize();
  }
}

bool host_register(void* p, std::size_t n, std::string& why) {
  const auto& rt = cuda_runtime();
  if (!rt.reg || !rt.unreg) {
    why = "no CUDA runtime is loaded";
    return false;
  }
  const int rc = rt.reg(p, n, 0 /* cudaHostRegisterDefault */);
  if (rc != 0) {
    why = rt.error_string ? rt.error_string(rc) : fmt::format("cudaHostRegister error {}", rc);
    // The runtime keeps the error as this thread's last error too: torch checks
    // that after its kernel launches, and would report it there.
    if (rt.get_last_error) rt.get_last_error();
    return false;
  }
  return true;
}

void host_unregister(void* p) {
  if (const auto& rt = cuda_runtime(); rt.unreg && rt.unreg(p) != 0 && rt.get_last_error) rt.get_last_error();
}

}  // namespace ckpt::detail
