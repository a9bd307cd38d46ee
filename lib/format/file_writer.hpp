// Private entry points of the file writer, shared by write_file() (which
// streams from tensor memory) and the writer child (which writes a staged
// image from the shared arena).
#pragma once

#include <ckpt/format.hpp>

#include "format/plan_layout.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <vector>

namespace ckpt::detail {

/// Writes `n` bytes at `off` on a file that may be open with O_DIRECT; when the
/// filesystem refuses O_DIRECT at write time, clears it and writes buffered.
void write_maybe_direct(int fd, const void* buf, std::size_t n, std::uint64_t off,
                        const std::filesystem::path& path);

/// The durable commit order around `body`: create a temporary file beside
/// `file`, let `body(fd, direct, temp)` write it and return its size, truncate,
/// fsync, rename over `file`, fsync the directory. On failure the temporary file
/// is removed and `file` is left as it was.
void write_durably(
    const std::filesystem::path& file, const WriteOptions& options,
    const std::function<std::uint64_t(int fd, bool direct, const std::filesystem::path& temp)>& body);

/// Writes a staged file image: `image[0, cd_offset)` holds every record's local
/// header (CRC fields zero) and data. Computes each record's CRC-32 (on a
/// second thread, while the record bodies are being written), patches the
/// headers in `image`, writes them and the central directory. Sets the CRCs in
/// `records`; returns the file's size.
std::uint64_t write_image(int fd, bool direct, const std::filesystem::path& path, std::byte* image,
                          std::vector<RecordInfo>& records, std::uint64_t cd_offset);

/// write_file() of a layout made by plan_layout(): on return the file is
/// durable and every record's crc32 is set (record offsets are the layout's).
void write_layout(const std::filesystem::path& file, Layout& layout, const WriteOptions& options);

}  // namespace ckpt::detail
