// Private entry points of the file writer, shared by write_file() (which
// streams from tensor memory), the writer child (which finishes a staged
// ZipImage from the shared arena) and DCP's data files.
#pragma once

#include <ckpt/format.hpp>

#include "format/plan_layout.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>

namespace ckpt::detail {

/// The durable commit order around `body`: create a temporary file beside
/// `file`, let `body(fd, direct, temp)` write it and return its size, truncate,
/// fsync, rename over `file`, fsync the directory. On failure the temporary file
/// is removed and `file` is left as it was.
void write_durably(
    const std::filesystem::path& file, const WriteOptions& options,
    const std::function<std::uint64_t(int fd, bool direct, const std::filesystem::path& temp)>& body);

/// write_file() of a layout made by plan_layout(): on return the file is
/// durable and every record's crc32 is set (record offsets are the layout's).
void write_layout(const std::filesystem::path& file, Layout& layout, const WriteOptions& options);

}  // namespace ckpt::detail
