#include "async/protocol.hpp"

#include "core/failures.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

namespace json = boost::json;

namespace ckpt::detail::protocol {

std::string frame(const json::object& message) {
  const std::string body = json::serialize(message);
  std::string out(4, '\0');
  const auto n = static_cast<std::uint32_t>(body.size());
  for (int i = 0; i < 4; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + body;
}

std::ptrdiff_t send_some(int fd, const char* data, std::size_t size, int pass_fd) {
  for (;;) {
    iovec iov{const_cast<char*>(data), size};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    if (pass_fd >= 0) {
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
    }
    const ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) return n;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return -1;
    throw WriterProcessError(fmt::format("cannot send to the peer process: {}", std::strerror(errno)));
  }
}

void send(int fd, const json::object& message, int pass_fd) {
  const std::string bytes = frame(message);
  std::size_t sent = 0;
  while (sent < bytes.size()) {
    const std::ptrdiff_t n =
        send_some(fd, bytes.data() + sent, bytes.size() - sent, sent == 0 ? pass_fd : -1);
    if (n < 0) {  // the socket's buffer is full: wait until it drains, bounded
      pollfd p{fd, POLLOUT, 0};
      int r;
      while ((r = ::poll(&p, 1, 10000)) < 0 && errno == EINTR) {
      }
      if (r <= 0) throw WriterProcessError("cannot send to the peer process: it reads nothing (10 s)");
      continue;
    }
    sent += static_cast<std::size_t>(n);
  }
}

namespace {

/// Reads exactly `n` bytes; false on end of stream before the first byte.
bool read_exact(int fd, char* buf, std::size_t n, int* received_fd) {
  std::size_t got = 0;
  while (got < n) {
    iovec iov{buf + got, n - got};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t r = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw WriterProcessError(fmt::format("cannot read from the peer process: {}", std::strerror(errno)));
    }
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        int passed = -1;
        std::memcpy(&passed, CMSG_DATA(c), sizeof(int));
        if (received_fd && *received_fd < 0)
          *received_fd = passed;
        else
          ::close(passed);
      }
    }
    if (r == 0) {
      if (got == 0) return false;
      throw WriterProcessError("the peer process closed the channel in the middle of a message");
    }
    got += static_cast<std::size_t>(r);
  }
  return true;
}

}  // namespace

std::optional<json::object> receive(int fd, int* received_fd) {
  char len[4];
  if (!read_exact(fd, len, 4, received_fd)) return std::nullopt;
  std::uint32_t n = 0;
  for (int i = 0; i < 4; ++i) n |= static_cast<std::uint32_t>(static_cast<unsigned char>(len[i])) << (8 * i);
  if (n > kMaxFrame) throw WriterProcessError(fmt::format("a protocol message of {} bytes is too large", n));
  std::string body(n, '\0');
  if (n > 0 && !read_exact(fd, body.data(), n, received_fd))
    throw WriterProcessError("the peer process closed the channel in the middle of a message");
  return parse(body);
}

json::object parse(std::string_view body) {
  json::error_code ec;
  json::value v = json::parse(body, ec);
  if (ec || !v.is_object()) throw WriterProcessError("the writer protocol carried a malformed message");
  auto& o = v.as_object();
  const auto* version = o.if_contains("v");
  if (!version || !version->is_int64() || version->as_int64() != kVersion)
    throw WriterProcessError(fmt::format("the writer speaks protocol version {}, this library {}",
                                         version ? json::serialize(*version) : "none", kVersion));
  return std::move(o);
}

json::array records_to_json(const std::vector<RecordInfo>& records) {
  json::array out;
  out.reserve(records.size());
  for (const auto& r : records)
    out.push_back(json::object{{"name", r.name},
                               {"header_offset", r.header_offset},
                               {"data_offset", r.data_offset},
                               {"size", r.size}});
  return out;
}

std::vector<RecordInfo> records_from_json(const json::value& v) {
  std::vector<RecordInfo> out;
  try {
    for (const auto& r : v.as_array()) {
      const auto& o = r.as_object();
      RecordInfo info;
      info.name = std::string(o.at("name").as_string());
      info.header_offset = o.at("header_offset").to_number<std::uint64_t>();
      info.data_offset = o.at("data_offset").to_number<std::uint64_t>();
      info.size = o.at("size").to_number<std::uint64_t>();
      out.push_back(std::move(info));
    }
  } catch (const std::exception& e) {
    throw WriterProcessError(fmt::format("the writer protocol carried malformed records: {}", e.what()));
  }
  return out;
}

json::object kwargs_to_json(const Kwargs& kwargs) {
  json::object o;
  for (const auto& [k, a] : kwargs) {
    if (a.is_int())
      o[k] = a.as_int();
    else if (a.is_double())
      o[k] = a.as_double();
    else if (a.is_bool())
      o[k] = a.as_bool();
    else
      o[k] = a.as_string();
  }
  return o;
}

namespace {
Arg arg_from_json(const json::value& v) {
  if (v.is_int64()) return Arg(v.as_int64());
  if (v.is_uint64()) return Arg(static_cast<std::int64_t>(v.as_uint64()));
  if (v.is_double()) return Arg(v.as_double());
  if (v.is_bool()) return Arg(v.as_bool());
  if (v.is_string()) return Arg(std::string(v.as_string()));
  throw WriterProcessError("the writer protocol carried an argument that is not int, float, bool or str");
}
}  // namespace

Kwargs kwargs_from_json(const json::value& v) {
  Kwargs out;
  if (!v.is_object()) return out;
  for (const auto& [k, a] : v.as_object()) out.set(std::string(k), arg_from_json(a));
  return out;
}

json::array args_to_json(const std::vector<Arg>& args) {
  json::array a;
  for (const auto& arg : args) {
    Kwargs one{{"x", arg}};
    a.push_back(kwargs_to_json(one).at("x"));
  }
  return a;
}

std::vector<Arg> args_from_json(const json::value& v) {
  std::vector<Arg> out;
  if (!v.is_array()) return out;
  for (const auto& a : v.as_array()) out.push_back(arg_from_json(a));
  return out;
}

json::object ok() {
  return {{"v", kVersion}, {"ok", true}};
}

json::object error_reply(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const CheckpointException& e) {
    return {{"v", kVersion},
            {"ok", false},
            {"kind", "CheckpointException"},
            {"error", e.what()},
            {"context", e.context()},
            {"failures", failures_to_json(e.failures())}};
  } catch (...) {
    const RankFailure f = describe_failure(std::current_exception());
    return {{"v", kVersion}, {"ok", false}, {"kind", f.type}, {"error", f.message}};
  }
}

void throw_if_error(const json::object& reply) {
  const auto* okv = reply.if_contains("ok");
  if (okv && okv->is_bool() && okv->as_bool()) return;
  const auto* k = reply.if_contains("kind");
  const auto* e = reply.if_contains("error");
  const std::string kind = k && k->is_string() ? std::string(k->as_string()) : "exception";
  const std::string text = e && e->is_string() ? std::string(e->as_string()) : "the writer process failed";
  if (kind == "CheckpointException") {
    try {
      throw CheckpointException(std::string(reply.at("context").as_string()),
                                failures_from_json(reply.at("failures")));
    } catch (const CheckpointException&) {
      throw;
    } catch (const std::exception&) {
      throw WriterProcessError(text);  // a malformed reply: keep the text
    }
  }
  // ckpt's kinds arrive as themselves; anything else the child threw is the
  // writer process's error, with its text.
  if (is_error_kind(kind)) throw_error_kind({kind, text});
  throw WriterProcessError(text);
}

}  // namespace ckpt::detail::protocol
