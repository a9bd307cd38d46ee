// c10d plumbing: the default process group (TCPStore + Gloo), the rank of a
// group and a port every rank agrees on.
#include <ckpt/dist.hpp>

#include <ckpt/error.hpp>

#include "core/text.hpp"
#include "dist/store_rounds.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>
// A libtorch without Gloo's headers (PyTorch's pip wheel ships none) builds
// all of this but the Gloo group of init_process_group.
#if __has_include(<gloo/algorithm.h>)
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#define CKPT_HAVE_GLOO 1
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

namespace ckpt::dist {

using namespace ckpt::detail;

// --- the default process group -----------------------------------------------------

namespace {

std::mutex default_mutex;
std::shared_ptr<ProcessGroupHandle> default_group;

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  return std::string(v);
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

}  // namespace

std::shared_ptr<ProcessGroupHandle> init_process_group(InitOptions options) {
  const RankInfo info = options.rank_info ? *options.rank_info : rank_info_from_env();
  const std::string addr =
      options.master_addr ? *options.master_addr : env("MASTER_ADDR").value_or("127.0.0.1");
  std::uint16_t port = 0;
  if (options.master_port) {
    port = *options.master_port;
  } else if (const auto p = env("MASTER_PORT")) {
    char* end = nullptr;
    const long v = std::strtol(p->c_str(), &end, 10);
    if (*end != '\0' || v < 1 || v > 65535)
      throw Error(fmt::format("MASTER_PORT '{}' is not a port number", *p));
    port = static_cast<std::uint16_t>(v);
  } else if (info.global_world_size > 1) {
    throw Error(fmt::format("a process group of {} ranks needs MASTER_PORT (or InitOptions::master_port)",
                            info.global_world_size));
  }
  const std::string where =
      fmt::format("rank {} of {}, master {}:{}", info.global_rank, info.global_world_size, addr, port);
  auto handle = std::make_shared<ProcessGroupHandle>();
  handle->rank_info = info;
  handle->timeout = options.timeout;
  try {
    c10d::TCPStoreOptions store_options;
    store_options.port = port;
    store_options.isServer = info.global_rank == 0;
    store_options.numWorkers = static_cast<std::size_t>(info.global_world_size);
    store_options.waitWorkers = true;
    store_options.timeout = options.timeout;
    handle->store = c10::make_intrusive<c10d::TCPStore>(addr, store_options);

#ifdef CKPT_HAVE_GLOO
    auto gloo = c10d::ProcessGroupGloo::Options::create(options.timeout);
    if (const auto ifname = env("GLOO_SOCKET_IFNAME"))
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(*ifname));
    else if (options.gloo_hostname)
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(*options.gloo_hostname));
    else if (is_loopback(addr))
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    else
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    handle->group = c10::make_intrusive<c10d::ProcessGroupGloo>(
        handle->store, static_cast<int>(info.global_rank), static_cast<int>(info.global_world_size), gloo);
#else
    throw Error(
        "this libtorch was built without Gloo's headers, so no Gloo group can be made here: create a "
        "c10d::ProcessGroup yourself and fill a ckpt::dist::ProcessGroupHandle with it");
#endif
  } catch (const std::exception& e) {
    const std::string text =
        fmt::format("cannot create the process group ({}): {}", where, first_line(e.what()));
    if (mentions_timeout(e.what())) throw Timeout(text);
    throw Error(text);
  }
  set_default_process_group(handle);
  return handle;
}

std::shared_ptr<ProcessGroupHandle> default_process_group() {
  std::lock_guard lock(default_mutex);
  return default_group;
}

void set_default_process_group(std::shared_ptr<ProcessGroupHandle> group) {
  std::lock_guard lock(default_mutex);
  default_group = std::move(group);
}

void destroy_process_group() {
  set_default_process_group(nullptr);
}

std::uint16_t agree_on_free_port(const ProcessGroupHandle& group, const std::string& name) {
  const std::string key = "ckpt/free_port/" + name;
  if (group.rank_info.global_rank == 0) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw IoError(fmt::format("socket: {}", std::strerror(errno)));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    socklen_t len = sizeof addr;
    const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                    ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
    const int err = errno;
    ::close(fd);
    if (!ok) throw IoError(fmt::format("cannot find a free port: {}", std::strerror(err)));
    group.store->set(key, to_bytes(std::to_string(ntohs(addr.sin_port))));
  }
  try {
    return static_cast<std::uint16_t>(std::stoi(to_string(group.store->get(key))));
  } catch (const std::exception& e) {
    throw Timeout(fmt::format("rank {} did not learn the port '{}' from rank 0: {}",
                              group.rank_info.global_rank, name, first_line(e.what())));
  }
}

std::int64_t ProcessGroupHandle::next_sequence(const std::string& name) {
  std::lock_guard lock(sequences_mutex_);
  return sequences_[name]++;
}

RankInfo rank_info_from(const c10d::ProcessGroup& group) {
  return RankInfo{.global_rank = group.getRank(), .global_world_size = group.getSize()};
}

}  // namespace ckpt::dist
