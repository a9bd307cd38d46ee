// Private entry points of the file writer, shared by write_file() (which
// streams from tensor memory), the writer child (which finishes a staged
// ZipImage from the shared arena) and DCP's data files.
#pragma once

#include <ckpt/format.hpp>

#include "format/plan_layout.hpp"
#include "format/zip_image.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace ckpt::detail {

/// The durable commit order around `body`: open an unnamed file in `file`'s
/// directory (O_TMPFILE; a named temporary where the filesystem has none), let
/// `body(fd, direct, temp)` write it and return its size, truncate, fsync, link
/// it as `temp` (temporary_beside(file)), rename that over `file`, fsync the
/// directory. On failure the temporary file is removed and `file` is left as it
/// was; a process killed on the way leaves no file (or, without O_TMPFILE or in
/// the instant between link and rename, a temporary that
/// remove_stale_temporaries() removes).
void write_durably(
    const std::filesystem::path& file, const WriteOptions& options,
    const std::function<std::uint64_t(int fd, bool direct, const std::filesystem::path& temp)>& body);

/// A fresh name beside `file` for its temporary:
/// `.<name>.tmp-<host>-<pid>-<start>-<n>`, where host, pid and start (the
/// process's start time) say which process on which host writes it.
std::filesystem::path temporary_beside(const std::filesystem::path& file);

/// Removes the temporaries in `dir` (of files whose names start with
/// `prefix`; of any file when it is empty) whose writer is gone: written on this host by a
/// process that no longer runs. Another host's temporaries are left alone (a
/// shared filesystem). Returns how many were removed; never throws.
std::size_t remove_stale_temporaries(const std::filesystem::path& dir,
                                     const std::string& prefix = {}) noexcept;

/// Unlinks the named temporaries this process's writes have in flight (for a
/// writer that abandons its work and exits).
void remove_in_flight_temporaries() noexcept;

/// write_file() of a layout made by plan_layout(): on return the file is
/// durable and every record's crc32 is set (record offsets are the layout's).
void write_layout(const std::filesystem::path& file, Layout& layout, const WriteOptions& options);

/// Where one archive lies in a file of several.
struct ArchiveExtent {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
};

/// One archive of a file of several (write_archives): a layout made by
/// plan_layout(), or, where `raw` is not null, bytes written as they are
/// (`keep` keeps them alive).
struct Archive {
  Layout layout;
  const std::string* raw = nullptr;
  c10::IValue keep;
};

/// Writes `count` archives one after another into one file, durably as
/// write_layout does: each a whole archive on its own (its offsets counted from
/// its first byte, as torch.load of the slice reads it), starting on a kAlign
/// boundary so its records stay aligned in the file; zeros between. Archive i
/// is made by `make(i)` when its turn comes and released once written, so one
/// archive at a time is in memory (with what it refers to). Every record's
/// crc32 is checked or set as it is written. Returns each archive's extent.
std::vector<ArchiveExtent> write_archives(const std::filesystem::path& file, std::size_t count,
                                          const std::function<Archive(std::size_t)>& make,
                                          const WriteOptions& options);

/// One archive of a file of several, already staged in an image (the DCP
/// saver's arena): at `image_offset` (a multiple of kAlign), a zip archive
/// (`zip`: local headers with CRC fields zero, then data, as staging lays it
/// out) or, where `zip` is empty, `raw_size` bytes written as they are.
struct ImageArchive {
  std::uint64_t image_offset = 0;
  std::optional<ZipImage> zip;
  std::uint64_t raw_size = 0;
  /// Its size in the file (with the central directory a zip archive gets).
  std::uint64_t file_size() const { return zip ? zip->file_size() : raw_size; }
};

/// Where archives of `sizes` bytes lie in a file write_archives makes of
/// them: each on the next kAlign boundary.
std::vector<ArchiveExtent> place_archives(const std::vector<std::uint64_t>& sizes);

/// Writes `archives` from `image` into `fd` at the places place_archives
/// gives (zeros between): the zip archives' CRCs computed, set in their
/// ZipImage and patched into the image, their central directories appended.
/// Returns the file's size. (The body of a write_durably.)
std::uint64_t write_image_archives(int fd, bool direct, const std::filesystem::path& path, std::byte* image,
                                   std::vector<ImageArchive>& archives);

}  // namespace ckpt::detail
