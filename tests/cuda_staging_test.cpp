// The CUDA staging path, on a machine with a GPU (every case is skipped
// without one; CI has none, so run it where there is: `ctest -L cuda`).
//   - the arena is page-locked with the driver (cudaHostGetFlags and
//     cudaPointerGetAttributes on it, looked up with dlsym), also after it grows;
//   - a tensor still being written by kernels queued on the trainer's current
//     stream when the save is asked for is staged with its final values: sync
//     and async staging, the default stream and a non-default current stream,
//     and through AsyncCheckpointer (which stages on its own thread);
//   - a registration refused by the driver leaves no error for torch's next
//     CUDA call;
//   - every option combination stages CUDA tensors correctly.
// Times are printed for the record, never asserted.
#include <ckpt/async_checkpointer.hpp>
#include <ckpt/staging.hpp>

#define BOOST_TEST_MODULE cuda_staging_test
#include <boost/test/unit_test.hpp>

#include "async/arena.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <boost/asio/use_future.hpp>

#include <dlfcn.h>

#include <chrono>
#include <cstdio>
#include <optional>

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;

namespace {

const c10::Device kCuda(c10::kCUDA, 0);

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

/// What the CUDA runtime says of a host pointer: the cudaHostGetFlags result
/// (0 = success: registered or pinned) and the cudaPointerGetAttributes type
/// (0 unregistered, 1 host, 2 device, 3 managed).
struct PtrInfo {
  int host_get_flags_rc = -1;
  unsigned flags = 0;
  int attr_rc = -1;
  int type = -1;
};
PtrInfo pointer_info(const void* p) {
  using GetFlags = int (*)(unsigned*, void*);
  using GetAttr = int (*)(void*, const void*);
  using GetLast = int (*)();
  static auto get_flags = reinterpret_cast<GetFlags>(::dlsym(RTLD_DEFAULT, "cudaHostGetFlags"));
  static auto get_attr = reinterpret_cast<GetAttr>(::dlsym(RTLD_DEFAULT, "cudaPointerGetAttributes"));
  static auto get_last = reinterpret_cast<GetLast>(::dlsym(RTLD_DEFAULT, "cudaGetLastError"));
  BOOST_REQUIRE_MESSAGE(get_flags && get_attr && get_last, "CUDA runtime symbols not found with dlsym");
  PtrInfo info;
  info.host_get_flags_rc = get_flags(&info.flags, const_cast<void*>(p));
  alignas(16) unsigned char attrs[512] = {};  // cudaPointerAttributes; `type` is its first member
  info.attr_rc = get_attr(attrs, p);
  info.type = *reinterpret_cast<int*>(attrs);
  get_last();  // clear an error the queries left
  return info;
}

struct Closer {
  ckpt::CheckpointStager& stager;
  ~Closer() { stager.close(); }
};

/// Waits for the current and the default stream.
void sync_all() {
  c10::impl::VirtualGuardImpl impl(c10::kCUDA);
  impl.getStream(kCuda).synchronize();
  impl.getDefaultStream(kCuda).synchronize();
}

/// Queues about `ms` milliseconds of matrix products on the current stream and
/// returns their result; `marker` is recorded after them (to prove they are
/// still running when staging starts).
struct LongWork {
  at::Tensor big;
  LongWork() {
    big = at::randn({8192, 8192}, at::TensorOptions().device(kCuda)).div_(90.5);
    auto warm = at::mm(big, big);  // cuBLAS handle, workspace
    sync_all();
    const auto t0 = Clock::now();
    auto r = big;
    for (int i = 0; i < 4; ++i) r = at::mm(r, big);
    sync_all();
    per_mm = since(t0) / 4;
  }
  double per_mm = 0;
  at::Tensor queue(double seconds) {
    auto r = big;
    const int n = std::max(1, static_cast<int>(seconds / per_mm));
    for (int i = 0; i < n; ++i) r = at::mm(r, big);
    return r;
  }
};

LongWork& long_work() {
  static LongWork w;
  return w;
}

/// After queueing: is the current stream still busy?
bool still_running() {
  c10::impl::VirtualGuardImpl impl(c10::kCUDA);
  c10::Event e(c10::kCUDA);
  e.record(impl.getStream(kCuda));
  return !e.query();
}

enum class Via { sync_stage, async_stage, checkpointer };
enum class StreamKind { default_stream, pool_stream };

/// The in-flight scenario: target zeroed and synchronised; then ~0.5 s of
/// products (result `r`) and target.fill_(7) queued on the current stream; then
/// the save is asked for at once. Staged/written values must be 7 and r.
void in_flight(Via via, StreamKind kind) {
  auto& work = long_work();
  std::optional<c10::StreamGuard> guard;
  if (kind == StreamKind::pool_stream)
    guard.emplace(c10::impl::VirtualGuardImpl(c10::kCUDA).getStreamFromGlobalPool(kCuda));
  ckpt::test::TempDir tmp;
  std::unique_ptr<ckpt::AsyncCheckpointer> ck;
  if (via == Via::checkpointer) {
    ck = ckpt::make_async_checkpointer({}, ckpt::RankInfo{0, 1});
    ck->process().async_wait_ready(asio::use_future).get();
  }
  std::optional<ckpt::DefaultStager> stager;
  if (via != Via::checkpointer) {
    ckpt::CheckpointStagerConfig options;
    options.use_async_staging = via == Via::async_stage;
    stager.emplace(options);
  }
  auto target = at::zeros({16 << 20}, at::TensorOptions().device(kCuda));  // 64 MiB
  sync_all();
  auto r = work.queue(0.5);
  target.fill_(7.0f);
  ckpt::StateDict sd;
  sd.insert("target", target);
  sd.insert("product", r);
  const bool running = still_running();
  const auto t0 = Clock::now();
  at::Tensor staged_target, staged_product;
  if (via == Via::checkpointer) {
    auto futures = ck->save(tmp / "ck", sd);
    futures.staged.get();
    const double staged_s = since(t0);
    futures.written.get();
    ck->close();
    ckpt::LoadOptions lo;
    lo.map_location = ckpt::MapLocation("cpu");
    auto loaded = ck->load(tmp / "ck", lo);
    staged_target = loaded.at("target").toTensor();
    staged_product = loaded.at("product").toTensor();
    BOOST_TEST_MESSAGE("  products still running when save was asked: " << running << "; staged after "
                                                                        << staged_s << " s");
  } else {
    ckpt::StagedCheckpoint staged;
    if (via == Via::async_stage)
      staged = stager->async_stage(sd, asio::use_future).get();
    else
      staged = stager->stage(sd);
    BOOST_TEST_MESSAGE("  products still running when stage was asked: " << running << "; staged after "
                                                                         << since(t0) << " s");
    staged_target = staged.state_dict.at("target").toTensor().clone();
    staged_product = staged.state_dict.at("product").toTensor().clone();
    BOOST_CHECK(staged.arena->device_registered());
    stager->close();
  }
  sync_all();
  BOOST_CHECK(running);
  const auto sevens = staged_target.eq(7.0f).sum().item<std::int64_t>();
  BOOST_CHECK_MESSAGE(sevens == target.numel(), "target: " << sevens << " of " << target.numel()
                                                           << " elements staged as 7 (the rest old zeros)");
  BOOST_CHECK_MESSAGE(ckpt::test::identical(staged_product, r.cpu()), "the product staged differs");
}

}  // namespace

boost::test_tools::assertion_result cuda_available(boost::unit_test::test_unit_id) {
  return at::hasCUDA();
}

BOOST_AUTO_TEST_SUITE(cuda, *boost::unit_test::precondition(cuda_available))

BOOST_AUTO_TEST_CASE(matrix_products_for_the_in_flight_cases) {
  BOOST_TEST_MESSAGE("per 8192^3 fp32 product: " << long_work().per_mm * 1e3 << " ms");
}

BOOST_AUTO_TEST_CASE(arena_is_registered_with_the_driver) {
  for (bool pinned : {true, false}) {
    BOOST_TEST_CONTEXT("use_pinned_memory " << pinned) {
      ckpt::CheckpointStagerConfig options;
      options.use_pinned_memory = pinned;
      ckpt::DefaultStager stager(options);
      Closer closer{stager};
      ckpt::StateDict sd;
      const auto src = at::randn({64 << 20}, at::TensorOptions().device(kCuda));  // 256 MiB
      sd.insert("w", src);
      sd.insert("cpu", at::arange(10));
      auto t0 = Clock::now();
      auto staged = stager.stage(sd);
      const double first = since(t0);
      BOOST_CHECK(ckpt::test::identical(staged.state_dict.at("w").toTensor(), src.cpu()));
      BOOST_CHECK(ckpt::test::identical(staged.state_dict.at("cpu").toTensor(), at::arange(10)));
      const auto info = pointer_info(staged.arena->data());
      BOOST_TEST_MESSAGE("  device_registered " << staged.arena->device_registered()
                                                << ", cudaHostGetFlags rc " << info.host_get_flags_rc
                                                << " flags " << info.flags << ", cudaPointerGetAttributes rc "
                                                << info.attr_rc << " type " << info.type << ", mlocked "
                                                << stager.pinned());
      BOOST_CHECK_EQUAL(staged.arena->device_registered(), pinned);
      BOOST_CHECK_EQUAL(info.host_get_flags_rc == 0, pinned);
      BOOST_CHECK_EQUAL(info.type == 1, pinned);
      double best = 1e300;
      for (int i = 0; i < 3; ++i) {
        t0 = Clock::now();
        staged = stager.stage(sd);
        best = std::min(best, since(t0));
      }
      BOOST_TEST_MESSAGE("  256 MiB from cuda:0: first stage " << first << " s, warm best " << best
                                                               << " s = " << 0.268435456 / best << " GB/s");
      // Grow: the new mapping must be registered, the old one unregistered.
      const void* old_base = staged.arena->data();
      staged = ckpt::StagedCheckpoint();
      sd.insert("w2", at::randn({32 << 20}, at::TensorOptions().device(kCuda)));
      staged = stager.stage(sd);
      BOOST_CHECK(ckpt::test::identical(staged.state_dict.at("w2").toTensor(), sd.at("w2").toTensor().cpu()));
      const auto grown = pointer_info(staged.arena->data());
      BOOST_TEST_MESSAGE("  after growing: base moved " << (staged.arena->data() != old_base)
                                                        << ", cudaHostGetFlags rc " << grown.host_get_flags_rc
                                                        << ", type " << grown.type);
      BOOST_CHECK_EQUAL(grown.host_get_flags_rc == 0, pinned);
      // Only where the new mapping does not cover the old address (a top-down
      // mmap of the larger size often does: then the old address is pinned as
      // part of the new arena).
      const auto* nb = reinterpret_cast<const char*>(staged.arena->data());
      const auto* ob = static_cast<const char*>(old_base);
      if (ob < nb || ob >= nb + staged.arena->size()) {
        const auto old = pointer_info(old_base);
        BOOST_TEST_MESSAGE("  old base: cudaHostGetFlags rc " << old.host_get_flags_rc << ", type "
                                                              << old.type);
        BOOST_CHECK(old.host_get_flags_rc != 0);
      }
      // And a CPU-only dict on a registered arena still stages.
      ckpt::StateDict cpu_sd;
      cpu_sd.insert("x", at::randn({1000}));
      auto cpu_staged = stager.stage(cpu_sd);
      BOOST_CHECK(ckpt::test::identical(cpu_staged.state_dict.at("x").toTensor(), cpu_sd.at("x").toTensor()));
    }
  }
}

BOOST_AUTO_TEST_CASE(in_flight_sync_default_stream) {
  in_flight(Via::sync_stage, StreamKind::default_stream);
}
BOOST_AUTO_TEST_CASE(in_flight_async_default_stream) {
  in_flight(Via::async_stage, StreamKind::default_stream);
}
BOOST_AUTO_TEST_CASE(in_flight_sync_pool_stream) {
  in_flight(Via::sync_stage, StreamKind::pool_stream);
}
BOOST_AUTO_TEST_CASE(in_flight_async_pool_stream) {
  in_flight(Via::async_stage, StreamKind::pool_stream);
}
BOOST_AUTO_TEST_CASE(in_flight_checkpointer_default_stream) {
  in_flight(Via::checkpointer, StreamKind::default_stream);
}
BOOST_AUTO_TEST_CASE(in_flight_checkpointer_pool_stream) {
  in_flight(Via::checkpointer, StreamKind::pool_stream);
}

BOOST_AUTO_TEST_CASE(a_refused_registration_leaves_no_cuda_error_behind) {
  // The arena is registered by someone else first: ckpt's cudaHostRegister is
  // refused (already registered). Staging still works, and the next kernel
  // launched on this thread must not fail with that stale error.
  using RegFn = int (*)(void*, std::size_t, unsigned);
  using UnregFn = int (*)(void*);
  auto reg = reinterpret_cast<RegFn>(::dlsym(RTLD_DEFAULT, "cudaHostRegister"));
  auto unreg = reinterpret_cast<UnregFn>(::dlsym(RTLD_DEFAULT, "cudaHostUnregister"));
  BOOST_REQUIRE(reg && unreg);
  ckpt::CheckpointStagerConfig options;
  options.use_async_staging = false;  // staging on this thread
  ckpt::DefaultStager stager(options);
  Closer closer{stager};
  ckpt::StateDict cpu_sd;
  cpu_sd.insert("x", at::zeros({1 << 20}));
  auto staged = stager.stage(cpu_sd);  // maps the arena, registers nothing
  auto arena = staged.arena;
  BOOST_REQUIRE(!arena->device_registered());
  BOOST_REQUIRE_EQUAL(reg(arena->data(), arena->size(), 0), 0);
  ckpt::StateDict sd;
  sd.insert("x", at::randn({1 << 20}, at::TensorOptions().device(kCuda)));
  staged = stager.stage(sd);
  BOOST_CHECK(ckpt::test::identical(staged.state_dict.at("x").toTensor(), sd.at("x").toTensor().cpu()));
  BOOST_TEST_MESSAGE("  ckpt's own registration: " << arena->device_registered());
  try {
    auto y = at::ones({1000}, at::TensorOptions().device(kCuda)).mul(2).sum().item<float>();
    BOOST_CHECK_EQUAL(y, 2000.0f);
  } catch (const std::exception& e) {
    BOOST_ERROR("a kernel launched after staging failed: " << e.what());
  }
  unreg(arena->data());
}

BOOST_AUTO_TEST_CASE(all_option_combinations_with_cuda_tensors) {
  ckpt::StateDict inner;
  inner.insert("w", at::randn({300, 7}, at::TensorOptions().device(kCuda)));
  auto base = at::randn({1000}, at::TensorOptions().device(kCuda));
  ckpt::StateDict sd;
  sd.insert("inner", inner);
  sd.insert("view", base.slice(0, 10, 500, 3));  // a strided view with an offset
  sd.insert("same", base);
  sd.insert("half", at::randn({33}, at::TensorOptions().device(kCuda).dtype(at::kHalf)));
  sd.insert("cpu", at::randn({5}));
  sd.insert("n", 3);
  for (int bits = 0; bits < 16; ++bits) {
    ckpt::CheckpointStagerConfig o;
    o.use_pinned_memory = bits & 1;
    o.use_shared_memory = bits & 2;
    o.use_async_staging = bits & 4;
    o.use_non_blocking_copy = bits & 8;
    BOOST_TEST_CONTEXT("bits " << bits) {
      ckpt::DefaultStager stager(o);
      Closer closer{stager};
      auto staged = o.use_async_staging ? stager.async_stage(sd, asio::use_future).get() : stager.stage(sd);
      const auto& s = staged.state_dict;
      BOOST_CHECK(ckpt::test::identical(s.at("inner").toGenericDict().at("w").toTensor(),
                                        inner.at("w").toTensor().cpu()));
      const auto view = s.at("view").toTensor();
      BOOST_CHECK(view.device().is_cpu());
      BOOST_CHECK(ckpt::test::identical(view, sd.at("view").toTensor().cpu()));
      BOOST_CHECK(ckpt::test::identical(s.at("same").toTensor(), base.cpu()));
      BOOST_CHECK(view.storage().data() == s.at("same").toTensor().storage().data());
      BOOST_CHECK(ckpt::test::identical(s.at("half").toTensor(), sd.at("half").toTensor().cpu()));
      BOOST_CHECK(ckpt::test::identical(s.at("cpu").toTensor(), sd.at("cpu").toTensor()));
      BOOST_CHECK_EQUAL(staged.arena->device_registered(), o.use_pinned_memory);
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()
