#include "format/zip.hpp"

#include "core/io.hpp"

#include <libdeflate.h>
#include <zlib.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

namespace ckpt::detail {

std::uint32_t crc32_of(const void* data, std::size_t size, std::uint32_t crc) {
  return libdeflate_crc32(crc, data, size);  // zlib's polynomial, about three times as fast
}
std::uint32_t crc32_combine(std::uint32_t first, std::uint32_t second, std::uint64_t second_size) {
  return static_cast<std::uint32_t>(::crc32_combine64(first, second, static_cast<z_off64_t>(second_size)));
}
namespace {

[[noreturn]] void corrupt(const std::filesystem::path& path, std::string_view what) {
  throw CorruptCheckpoint(fmt::format("{}: corrupt zip archive: {}", path.string(), what));
}

}  // namespace

void put16(std::string& out, std::uint16_t v) {
  out.push_back(static_cast<char>(v & 0xff));
  out.push_back(static_cast<char>(v >> 8));
}
void put32(std::string& out, std::uint32_t v) {
  put16(out, static_cast<std::uint16_t>(v & 0xffff));
  put16(out, static_cast<std::uint16_t>(v >> 16));
}
void put64(std::string& out, std::uint64_t v) {
  put32(out, static_cast<std::uint32_t>(v & k32Max));
  put32(out, static_cast<std::uint32_t>(v >> 32));
}
std::uint16_t get16(const unsigned char* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
std::uint32_t get32(const unsigned char* p) {
  return static_cast<std::uint32_t>(get16(p)) | (static_cast<std::uint32_t>(get16(p + 2)) << 16);
}
std::uint64_t get64(const unsigned char* p) {
  return static_cast<std::uint64_t>(get32(p)) | (static_cast<std::uint64_t>(get32(p + 4)) << 32);
}

Directory read_directory(int fd, std::uint64_t file_size, const std::filesystem::path& path,
                         std::uint64_t base) {
  constexpr std::uint64_t kEocdSize = 22;
  if (file_size < kEocdSize) corrupt(path, fmt::format("file of {} bytes is too short", file_size));
  // The end record sits at the very end unless the archive has a comment
  // (writers of checkpoints add none): try those 22 bytes first, and search
  // the last 64 KiB only when they are not it.
  std::uint64_t tail_len = kEocdSize;
  std::vector<unsigned char> tail(tail_len);
  pread_full(fd, tail.data(), tail_len, base + file_size - tail_len, path);
  if (get32(tail.data()) != kEocdSig || get16(tail.data() + 20) != 0) {
    tail_len = std::min<std::uint64_t>(file_size, kEocdSize + 0xffff);
    tail.resize(tail_len);
    pread_full(fd, tail.data(), tail_len, base + file_size - tail_len, path);
  }

  // The end record is the last signature whose comment length fits exactly.
  std::int64_t pos = -1;
  for (std::int64_t i = static_cast<std::int64_t>(tail_len - kEocdSize); i >= 0; --i) {
    const unsigned char* p = tail.data() + i;
    if (get32(p) == kEocdSig && i + kEocdSize + get16(p + 20) == tail_len) {
      pos = i;
      break;
    }
  }
  if (pos < 0) corrupt(path, "no end-of-central-directory record (not a zip file, or truncated)");
  const unsigned char* e = tail.data() + pos;
  const std::uint64_t eocd_offset = file_size - tail_len + static_cast<std::uint64_t>(pos);
  if (get16(e + 4) != 0 || get16(e + 6) != 0) corrupt(path, "multi-disk archives are not supported");
  std::uint64_t entries = get16(e + 10);
  std::uint64_t cd_size = get32(e + 12);
  std::uint64_t cd_offset = get32(e + 16);
  std::uint64_t cd_end_limit = eocd_offset;

  // Zip64: a locator right before the end record points at the zip64 end record.
  if (eocd_offset >= 20) {
    unsigned char loc[20];
    pread_full(fd, loc, sizeof loc, base + eocd_offset - 20, path);
    if (get32(loc) == kLocator64Sig) {
      const std::uint64_t off64 = get64(loc + 8);
      if (off64 > eocd_offset - 20 || eocd_offset - 20 - off64 < 56)
        corrupt(path, "zip64 locator points outside the file");
      unsigned char e64[56];
      pread_full(fd, e64, sizeof e64, base + off64, path);
      if (get32(e64) != kEocd64Sig) corrupt(path, "zip64 end record has a bad signature");
      entries = get64(e64 + 32);
      cd_size = get64(e64 + 40);
      cd_offset = get64(e64 + 48);
      cd_end_limit = off64;
    }
  }
  if (cd_offset > cd_end_limit || cd_size > cd_end_limit - cd_offset)
    corrupt(path,
            fmt::format("central directory (offset {}, {} bytes) lies outside the file", cd_offset, cd_size));
  if (entries > cd_size / 46)
    corrupt(path, fmt::format("directory claims {} entries in {} bytes", entries, cd_size));

  std::vector<unsigned char> cd(cd_size);
  if (cd_size > 0) pread_full(fd, cd.data(), cd_size, base + cd_offset, path);

  Directory dir;
  dir.cd_offset = cd_offset;
  dir.records.reserve(entries);
  std::uint64_t at = 0;
  for (std::uint64_t k = 0; k < entries; ++k) {
    if (cd_size - at < 46) corrupt(path, fmt::format("directory entry {} is truncated", k));
    const unsigned char* c = cd.data() + at;
    if (get32(c) != kCentralSig) corrupt(path, fmt::format("directory entry {} has a bad signature", k));
    const std::uint16_t flags = get16(c + 8);
    const std::uint16_t method = get16(c + 10);
    RecordInfo r;
    r.crc32 = get32(c + 16);
    std::uint64_t csize = get32(c + 20);
    std::uint64_t usize = get32(c + 24);
    const std::uint64_t name_len = get16(c + 28);
    const std::uint64_t extra_len = get16(c + 30);
    const std::uint64_t comment_len = get16(c + 32);
    r.header_offset = get32(c + 42);
    if (cd_size - at - 46 < name_len + extra_len + comment_len)
      corrupt(path, fmt::format("directory entry {} runs past the directory", k));
    r.name.assign(reinterpret_cast<const char*>(c + 46), name_len);
    // Zip64 extra: the 64-bit values of the fields that hold 0xffffffff, in order.
    const unsigned char* x = c + 46 + name_len;
    for (std::uint64_t xi = 0; xi + 4 <= extra_len;) {
      const std::uint16_t id = get16(x + xi);
      const std::uint16_t len = get16(x + xi + 2);
      if (xi + 4 + len > extra_len) corrupt(path, fmt::format("record {}: extra field overruns", r.name));
      if (id == kZip64ExtraId) {
        const unsigned char* v = x + xi + 4;
        std::uint64_t left = len;
        auto take = [&](std::uint64_t& field) {
          if (field != k32Max) return;
          if (left < 8) corrupt(path, fmt::format("record {}: short zip64 field", r.name));
          field = get64(v);
          v += 8;
          left -= 8;
        };
        take(usize);
        take(csize);
        take(r.header_offset);
      }
      xi += 4 + len;
    }
    if (flags & 1) corrupt(path, fmt::format("record {} is encrypted", r.name));
    if (method != 0)
      corrupt(path, fmt::format("record {} is compressed (method {}); checkpoint records are stored", r.name,
                                method));
    if (csize != usize)
      corrupt(path, fmt::format("record {}: stored size {} differs from its size {}", r.name, csize, usize));
    r.size = usize;
    if (r.header_offset > cd_offset || cd_offset - r.header_offset < kLocalHeaderSize + name_len ||
        r.size > cd_offset - r.header_offset - kLocalHeaderSize - name_len)
      corrupt(path, fmt::format("record {} (offset {}, {} bytes) lies outside the file's data area", r.name,
                                r.header_offset, r.size));
    dir.records.push_back(std::move(r));
    at += 46 + name_len + extra_len + comment_len;
  }
  return dir;
}

void read_local_header(int fd, RecordInfo& rec, const Directory& dir, const std::filesystem::path& path,
                       std::uint64_t base) {
  unsigned char h[kLocalHeaderSize];
  pread_full(fd, h, sizeof h, base + rec.header_offset, path);
  if (get32(h) != kLocalSig) corrupt(path, fmt::format("record {}: bad local header signature", rec.name));
  const std::uint64_t name_len = get16(h + 26);
  const std::uint64_t extra_len = get16(h + 28);
  if (name_len != rec.name.size())
    corrupt(path, fmt::format("record {}: local header names another record", rec.name));
  std::string name(name_len, '\0');
  pread_full(fd, name.data(), name_len, base + rec.header_offset + kLocalHeaderSize, path);
  if (name != rec.name) corrupt(path, fmt::format("record {}: local header names {}", rec.name, name));
  const std::uint64_t data = rec.header_offset + kLocalHeaderSize + name_len + extra_len;
  if (data > dir.cd_offset || rec.size > dir.cd_offset - data)
    corrupt(path, fmt::format("record {} (data at {}, {} bytes) runs into the directory", rec.name, data,
                              rec.size));
  rec.data_offset = data;
}

}  // namespace ckpt::detail
