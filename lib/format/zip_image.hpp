// The zip image of one checkpoint file, from plan to finish: where each
// record's header and data go, the local headers, the CRCs, the central
// directory, and writing the finished file on a descriptor. The three ways a
// file gets written all go through it:
//   - write_file() streams it from tensor memory (file_writer.cpp);
//   - staging puts the local headers and data into the shared arena
//     (async/staging.cpp), and
//   - the writer child finishes that arena image on the file (write()).
#pragma once

#include <ckpt/format.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace ckpt::detail {

class ZipImage {
 public:
  /// Plans one record: places its local header at `at` and its data on the
  /// next 4096-byte boundary that leaves room for the header. Sets
  /// `record.header_offset` and `record.data_offset` from `record.name` and
  /// `record.size`; returns where the next record may start.
  static std::uint64_t place(RecordInfo& record, std::uint64_t at);

  /// The image of `records`, placed by place() one after another from offset
  /// 0, with the central directory at `cd_offset`. Throws Error naming the
  /// first record that is not where place() would have put it (records that
  /// arrive from another process are checked before anything is written).
  ZipImage(std::vector<RecordInfo> records, std::uint64_t cd_offset);

  const std::vector<RecordInfo>& records() const { return records_; }
  std::uint64_t cd_offset() const { return cd_offset_; }
  /// The size of the finished file: records, central directory, end records.
  std::uint64_t file_size() const;

  /// Record `i`'s local header, padded up to its data; its CRC field holds the
  /// record's crc32 as known so far (0 until set_crc).
  std::string local_header(std::size_t i) const;
  /// Writes every local header into `image`, which holds the file's first
  /// cd_offset() bytes.
  void put_local_headers(std::byte* image) const;

  void set_crc(std::size_t i, std::uint32_t crc) { records_.at(i).crc32 = crc; }
  /// File offset of record `i`'s CRC field, and the 4 bytes it finally holds.
  std::uint64_t crc_field_offset(std::size_t i) const;
  std::array<unsigned char, 4> crc_field(std::size_t i) const;

  /// The central directory and end records (zip64 ones when needed), with the
  /// CRCs set so far.
  std::string central_directory() const;

  /// Finishes a file whose first cd_offset() bytes are at `image` (local
  /// headers with CRC fields zero, then data): computes every CRC on a second
  /// thread while the record bodies go to `fd`, patches the CRC fields into
  /// `image`, writes the headers and the central directory. `direct`: `fd` was
  /// opened with O_DIRECT. `file_base`: where the archive starts in the file
  /// (a multiple of 4096; an archive among others). Returns the archive's size.
  /// `block_crcs`: also keep each record's CRC-32 per kCrcBlock bytes
  /// (block_crcs()).
  std::uint64_t write(int fd, bool direct, const std::filesystem::path& path, std::byte* image,
                      std::uint64_t file_base = 0, bool block_crcs = false);
  /// Record `i`'s block CRC-32s, once a write(..., true) computed them.
  const std::vector<std::uint32_t>& block_crcs(std::size_t i) const { return block_crcs_.at(i); }

 private:
  std::vector<RecordInfo> records_;
  std::vector<std::vector<std::uint32_t>> block_crcs_;
  std::uint64_t cd_offset_ = 0;
};

}  // namespace ckpt::detail
