// Per-block CRC-32s of a data file's records, kept in a table after its last
// archive where PyTorch's readers never look (they read only the byte ranges
// the checkpoint's metadata names). A reader that reads part of a record
// checks every 4 KiB block it touches against them, which a record's one
// zip CRC-32 cannot do.
//
// On disk, from a kAlign boundary after the last archive to the end of the
// file (little-endian):
//   "CKPTBLKS", u32 block size, u32 record count,
//   per record: u64 data offset in the file, u64 size,
//   per record, per block: u32 CRC-32,
//   u32 CRC-32 of the table so far,
//   then the 24-byte footer: u64 table offset, u64 table length, "CKPTBLKE".
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace ckpt::detail {

inline constexpr std::uint64_t kCrcBlock = 4096;
/// The most records a table lists; a file with more gets no table (its
/// partial reads go unchecked, as a file of PyTorch's would).
inline constexpr std::size_t kMaxBlockTableRecords = std::size_t{1} << 24;

/// Whether a record belongs in the table: tensor data (`<archive>/data/<key>`),
/// the only records read in part.
bool listed_in_block_table(const std::string& record_name);

/// The CRC-32 of `data[0, size)`; appends the CRC-32 of each kCrcBlock bytes
/// of it (the last block may be shorter) to `blocks`.
std::uint32_t crc32_blocks(const void* data, std::size_t size, std::vector<std::uint32_t>& blocks);

/// One record's block CRC-32s.
struct BlockCrcs {
  std::uint64_t data_offset = 0;  ///< in the file
  std::uint64_t size = 0;
  std::vector<std::uint32_t> crcs;
};

/// The table of `records` (at most kMaxBlockTableRecords) with its footer,
/// to be written at file offset `offset`.
std::string encode_block_table(const std::vector<BlockCrcs>& records, std::uint64_t offset);

/// The block table at the end of a file of `file_size` bytes: nullopt when
/// the file has none (another writer's); CorruptCheckpoint naming `path` when
/// it is damaged. Adds the bytes it read to `bytes_read`.
std::optional<std::vector<BlockCrcs>> read_block_table(int fd, std::uint64_t file_size,
                                                       const std::filesystem::path& path,
                                                       std::uint64_t& bytes_read);

}  // namespace ckpt::detail
