// The writer child's protocol: framing, fd passing and JSON helpers shared by
// the parent (checkpoint_process.cpp) and the child (writer_main.cpp). The
// protocol itself is described step by step in checkpoint_process.cpp.
#pragma once

#include <ckpt/error.hpp>
#include <ckpt/format.hpp>
#include <ckpt/types.hpp>

#include <boost/json.hpp>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace ckpt::detail::protocol {

inline constexpr std::int64_t kVersion = 1;
inline constexpr std::uint32_t kMaxFrame = 64u << 20;

/// The length prefix of a frame: 4 bytes, little-endian.
std::string frame(const boost::json::object& message);

/// Sends what the socket `fd` takes now of `data[0, size)` without blocking,
/// with `pass_fd` (if >= 0) attached as SCM_RIGHTS to the first byte sent.
/// Returns the bytes sent, or -1 when the socket's buffer is full. Throws
/// WriterProcessError when the peer is gone.
std::ptrdiff_t send_some(int fd, const char* data, std::size_t size, int pass_fd);

/// Sends one frame on the socket `fd`, with `pass_fd` (if >= 0) attached as
/// SCM_RIGHTS. Blocking (the child's side; the parent sends asynchronously,
/// with send_some). Throws WriterProcessError when the peer is gone or reads
/// nothing for 10 s.
void send(int fd, const boost::json::object& message, int pass_fd = -1);

/// Receives one frame from the socket `fd`, blocking; any descriptor attached
/// lands in `received_fd`. Returns nothing on a clean end of stream.
std::optional<boost::json::object> receive(int fd, int* received_fd);

/// Parses a frame body; throws WriterProcessError on a bad or foreign message.
boost::json::object parse(std::string_view body);

/// The records of a staged image, as write_checkpoint carries them.
boost::json::array records_to_json(const std::vector<RecordInfo>& records);
/// Throws WriterProcessError for a malformed list; where the records lie is
/// checked by the ZipImage the child makes of them.
std::vector<RecordInfo> records_from_json(const boost::json::value& v);

boost::json::object kwargs_to_json(const Kwargs& kwargs);
Kwargs kwargs_from_json(const boost::json::value& v);
boost::json::array args_to_json(const std::vector<Arg>& args);
std::vector<Arg> args_from_json(const boost::json::value& v);

/// {"v":1,"ok":true}
boost::json::object ok();
/// {"v":1,"ok":false,"kind":..., "error":...} for the exception in flight.
boost::json::object error_reply(std::exception_ptr error);
/// Throws the error a reply carries (ckpt error types kept, others as
/// WriterProcessError with the child's text); returns if the reply is ok.
void throw_if_error(const boost::json::object& reply);

}  // namespace ckpt::detail::protocol
