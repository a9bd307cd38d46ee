#include "format/block_crcs.hpp"

#include <ckpt/error.hpp>

#include "core/io.hpp"
#include "format/zip.hpp"

#include <fmt/format.h>
#include <zlib.h>

#include <cstring>

namespace ckpt::detail {

namespace {

constexpr char kTableMagic[] = "CKPTBLKS";
constexpr char kFooterMagic[] = "CKPTBLKE";
constexpr std::uint64_t kFooterSize = 24;
}  // namespace

bool listed_in_block_table(const std::string& record_name) {
  return record_name.find("/data/") != std::string::npos;  // as ZipImage tells storage records
}

std::uint32_t crc32_blocks(const void* data, std::size_t size, std::vector<std::uint32_t>& blocks) {
  static const uLong op = crc32_combine_gen64(static_cast<z_off64_t>(kCrcBlock));
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint32_t whole = 0;
  blocks.reserve(blocks.size() + (size + kCrcBlock - 1) / kCrcBlock);
  for (std::size_t at = 0; at < size; at += kCrcBlock) {
    const std::size_t n = std::min<std::size_t>(kCrcBlock, size - at);
    const std::uint32_t crc = crc32_of(p + at, n);
    blocks.push_back(crc);
    whole =
        static_cast<std::uint32_t>(n == kCrcBlock ? crc32_combine_op(whole, crc, op)
                                                  : crc32_combine64(whole, crc, static_cast<z_off64_t>(n)));
  }
  return whole;
}

std::string encode_block_table(const std::vector<BlockCrcs>& records, std::uint64_t offset) {
  std::string out(kTableMagic, 8);
  put32(out, static_cast<std::uint32_t>(kCrcBlock));
  put32(out, static_cast<std::uint32_t>(records.size()));
  for (const auto& r : records) {
    put64(out, r.data_offset);
    put64(out, r.size);
  }
  for (const auto& r : records)
    for (const std::uint32_t crc : r.crcs) put32(out, crc);
  put32(out, crc32_of(out.data(), out.size()));
  const std::uint64_t length = out.size();
  put64(out, offset);
  put64(out, length);
  out.append(kFooterMagic, 8);
  return out;
}

std::optional<std::vector<BlockCrcs>> read_block_table(int fd, std::uint64_t file_size,
                                                       const std::filesystem::path& path,
                                                       std::uint64_t& bytes_read) {
  if (file_size < kFooterSize) return std::nullopt;
  unsigned char footer[kFooterSize];
  pread_full(fd, footer, kFooterSize, file_size - kFooterSize, path);
  bytes_read += kFooterSize;
  if (std::memcmp(footer + 16, kFooterMagic, 8) != 0) return std::nullopt;
  const auto bad = [&](const std::string& why) {
    return CorruptCheckpoint(
        fmt::format("{}: its table of block CRC-32s is damaged: {}", path.string(), why));
  };
  const std::uint64_t offset = get64(footer), length = get64(footer + 8);
  if (length < 20 || offset > file_size - kFooterSize || length != file_size - kFooterSize - offset)
    throw bad(fmt::format("it claims {} bytes at offset {} in a file of {}", length, offset, file_size));
  // Its head first: the length must be what `count` records of disjoint data
  // before the table can need, before that much is read.
  unsigned char head[16];
  pread_full(fd, head, sizeof head, offset, path);
  if (std::memcmp(head, kTableMagic, 8) != 0 || get32(head + 8) != kCrcBlock)
    throw bad("not a table of 4096-byte blocks");
  const std::uint64_t count = get32(head + 12);
  if (count > kMaxBlockTableRecords || 16 + count * 16 + 4 > length ||
      length > 16 + count * 16 + 4 * (offset / kCrcBlock + count) + 4)
    throw bad(fmt::format("{} bytes do not fit a table of {} records", length, count));
  std::string table(static_cast<std::size_t>(length), '\0');
  pread_full(fd, table.data(), table.size(), offset, path);
  bytes_read += length;
  const auto* p = reinterpret_cast<const unsigned char*>(table.data());
  if (crc32_of(p, table.size() - 4) != get32(p + table.size() - 4)) throw bad("its CRC-32 does not match");
  std::vector<BlockCrcs> records(static_cast<std::size_t>(count));
  std::uint64_t at = 16 + count * 16, blocks = 0;
  for (std::size_t i = 0; i < records.size(); ++i) {
    auto& r = records[i];
    r.data_offset = get64(p + 16 + i * 16);
    r.size = get64(p + 16 + i * 16 + 8);
    if (r.data_offset > offset || r.size > offset - r.data_offset)
      throw bad(fmt::format("a record at {} of {} bytes lies outside the data", r.data_offset, r.size));
    blocks += (r.size + kCrcBlock - 1) / kCrcBlock;
    if (blocks > (length - at - 4) / 4) throw bad("its records need more block CRC-32s than it holds");
  }
  if (at + blocks * 4 + 4 != length) throw bad("its block count does not match its length");
  for (auto& r : records) {
    r.crcs.resize(static_cast<std::size_t>((r.size + kCrcBlock - 1) / kCrcBlock));
    for (auto& crc : r.crcs) {
      crc = get32(p + at);
      at += 4;
    }
  }
  return records;
}

}  // namespace ckpt::detail
