// The subset of the zip format PyTorch archives use: stored (uncompressed)
// records, zip64 for large files, no encryption, one disk. This header holds
// the constants and the reading side; ZipImage (zip_image.hpp) writes.
#pragma once

#include <ckpt/format.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ckpt::detail {

inline constexpr std::uint64_t kAlign = 4096;
inline constexpr std::uint32_t kLocalSig = 0x04034b50;
inline constexpr std::uint32_t kCentralSig = 0x02014b50;
inline constexpr std::uint32_t kEocdSig = 0x06054b50;
inline constexpr std::uint32_t kEocd64Sig = 0x06064b50;
inline constexpr std::uint32_t kLocator64Sig = 0x07064b50;
inline constexpr std::size_t kLocalHeaderSize = 30;
/// Offset of the CRC-32 field inside a local header.
inline constexpr std::size_t kLocalCrcOffset = 14;
inline constexpr std::uint32_t k32Max = 0xffffffffu;
inline constexpr std::uint16_t kZip64ExtraId = 0x0001;
/// PyTorch pads with an extra field of id "FB" filled with 'Z'; so do we.
inline constexpr std::uint16_t kPadExtraId = 0x4246;
inline constexpr std::uint16_t kVersionStored = 20;
inline constexpr std::uint16_t kVersionZip64 = 45;

/// Whether a record of `size` bytes needs zip64 size fields.
constexpr bool needs_zip64(std::uint64_t size) {
  return size >= k32Max;
}

constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t a) {
  return (v + a - 1) / a * a;
}

/// Appends little-endian integers.
void put16(std::string& out, std::uint16_t v);
void put32(std::string& out, std::uint32_t v);
void put64(std::string& out, std::uint64_t v);
std::uint16_t get16(const unsigned char* p);
std::uint32_t get32(const unsigned char* p);
std::uint64_t get64(const unsigned char* p);

/// The zip CRC-32 of `data[0, size)`, continuing from `crc` (0 to start).
std::uint32_t crc32_of(const void* data, std::size_t size, std::uint32_t crc = 0);
/// The CRC-32 of two byte strings one after the other, from theirs and the
/// second one's length.
std::uint32_t crc32_combine(std::uint32_t first, std::uint32_t second, std::uint64_t second_size);

/// The parsed directory of an archive.
struct Directory {
  std::vector<RecordInfo> records;
  std::uint64_t cd_offset = 0;  ///< record data must end before this
};

/// Reads and checks the zip directory of the archive that occupies bytes
/// [base, base + size) of the file open on `fd` (the whole file, or one item
/// of a DCP data file). Offsets in the result are relative to `base`. Throws
/// CorruptCheckpoint naming `path` and what is wrong.
Directory read_directory(int fd, std::uint64_t size, const std::filesystem::path& path,
                         std::uint64_t base = 0);

/// Reads the local header of `rec` and sets its data_offset, after checking it
/// against the directory. Throws CorruptCheckpoint.
void read_local_header(int fd, RecordInfo& rec, const Directory& dir, const std::filesystem::path& path,
                       std::uint64_t base = 0);

}  // namespace ckpt::detail
