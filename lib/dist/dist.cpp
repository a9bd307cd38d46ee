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
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
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

/// A group could not be made: Timeout when its ranks did not all come in time.
[[noreturn]] void group_failed(const std::string& where, const std::exception& e) {
  const std::string text =
      fmt::format("cannot create the process group ({}): {}", where, first_line(e.what()));
  if (mentions_timeout(e.what())) throw Timeout(text);
  throw Error(text);
}

/// A Gloo group of `handle`'s ranks over its store; its device: the
/// interface GLOO_SOCKET_IFNAME names, else gloo_hostname, else loopback when
/// the master is on loopback, else this host's name.
c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_group(const ProcessGroupHandle& handle) {
#ifdef CKPT_HAVE_GLOO
  auto gloo = c10d::ProcessGroupGloo::Options::create(handle.timeout);
  if (const auto ifname = env("GLOO_SOCKET_IFNAME"))
    gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(*ifname));
  else if (handle.gloo_hostname)
    gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(*handle.gloo_hostname));
  else if (is_loopback(handle.master_addr))
    gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  else
    gloo->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  return c10::make_intrusive<c10d::ProcessGroupGloo>(
      handle.store, static_cast<int>(handle.rank_info.global_rank),
      static_cast<int>(handle.rank_info.global_world_size), gloo);
#else
  (void)handle;
  throw Error(
      "this libtorch was built without Gloo's headers, so no Gloo group can be made here: create a "
      "c10d::ProcessGroup yourself and fill a ckpt::dist::ProcessGroupHandle with it");
#endif
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
  handle->master_addr = addr;
  handle->master_port = port;
  handle->gloo_hostname = options.gloo_hostname;
  try {
    c10d::TCPStoreOptions store_options;
    store_options.port = port;
    store_options.isServer = info.global_rank == 0;
    store_options.numWorkers = static_cast<std::size_t>(info.global_world_size);
    store_options.waitWorkers = true;
    store_options.timeout = options.timeout;
    handle->store = c10::make_intrusive<c10d::TCPStore>(addr, store_options);

    handle->group = make_gloo_group(*handle);
  } catch (const std::exception& e) {
    group_failed(where, e);
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

std::shared_ptr<ProcessGroupHandle> new_group(const std::shared_ptr<const ProcessGroupHandle>& base,
                                              const std::string& name) {
  if (!base) throw Error("new_group needs a base group");
  if (name.empty()) throw Error("new_group needs a name");
  const RankInfo& info = base->rank_info;
  const std::string where = fmt::format("group '{}', rank {} of {}, master {}:{}", name, info.global_rank,
                                        info.global_world_size, base->master_addr, base->master_port);
  auto handle = std::make_shared<ProcessGroupHandle>();
  handle->rank_info = info;
  handle->timeout = base->timeout;
  handle->master_addr = base->master_addr;
  handle->master_port = base->master_port;
  handle->gloo_hostname = base->gloo_hostname;
  handle->base = base->base ? base->base : base;
  try {
    c10d::TCPStoreOptions client;
    client.port = base->master_port;
    client.isServer = false;
    client.waitWorkers = false;
    client.timeout = base->timeout;
    auto connection = c10::make_intrusive<c10d::TCPStore>(base->master_addr, client);
    handle->store = c10::make_intrusive<c10d::PrefixStore>(name, connection);
    handle->group = make_gloo_group(*handle);
  } catch (const std::exception& e) {
    group_failed(where, e);
  }
  return handle;
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
