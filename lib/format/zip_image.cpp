#include "format/zip_image.hpp"

#include "format/block_crcs.hpp"

#include "core/io.hpp"
#include "format/zip.hpp"

#include <fmt/format.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <thread>
#include <utility>

namespace ckpt::detail {
namespace {

/// Whether record `name` holds a tensor storage ("<prefix>/data/<key>"):
/// those are the records whose data starts on a 4096 boundary.
bool storage_record(std::string_view name) {
  return name.find("/data/") != std::string_view::npos;
}

/// Bytes from a local header's start to its record's data, for a header at
/// `header_offset`: the fixed part, the name, the zip64 extra when needed and
/// a padding extra (at least its own 4 bytes), for a tensor storage up to the
/// next 4096 boundary.
std::uint64_t header_span(std::string_view name, std::uint64_t header_offset, std::uint64_t size) {
  const std::uint64_t fixed = kLocalHeaderSize + name.size() + (needs_zip64(size) ? 20 : 0) + 4;
  if (!storage_record(name)) return fixed;
  return align_up(header_offset + fixed, kAlign) - header_offset;
}

}  // namespace

std::uint64_t ZipImage::place(RecordInfo& record, std::uint64_t at) {
  record.header_offset = at;
  record.data_offset = at + header_span(record.name, at, record.size);
  return record.data_offset + record.size;
}

ZipImage::ZipImage(std::vector<RecordInfo> records, std::uint64_t cd_offset)
    : records_(std::move(records)), cd_offset_(cd_offset) {
  std::uint64_t at = 0;
  for (const auto& r : records_) {
    if (r.name.empty() || r.name.size() > 0xffff)
      throw Error(fmt::format("zip image: a record name of {} bytes", r.name.size()));
    RecordInfo expected{r.name, 0, 0, r.size, 0};
    const std::uint64_t end = place(expected, at);
    if (r.header_offset != expected.header_offset || r.data_offset != expected.data_offset)
      throw Error(fmt::format("zip image: record {} is at {} (data at {}), not at {} (data at {})", r.name,
                              r.header_offset, r.data_offset, expected.header_offset, expected.data_offset));
    if (r.size > cd_offset_ || expected.data_offset > cd_offset_ - r.size)
      throw Error(fmt::format("zip image: record {} ({} bytes at {}) runs past the directory at {}", r.name,
                              r.size, r.data_offset, cd_offset_));
    at = end;
  }
  if (at != cd_offset_)
    throw Error(fmt::format("zip image: the records end at {}, the directory is said to start at {}", at,
                            cd_offset_));
}

std::uint64_t ZipImage::crc_field_offset(std::size_t i) const {
  return records_.at(i).header_offset + kLocalCrcOffset;
}

std::array<unsigned char, 4> ZipImage::crc_field(std::size_t i) const {
  const std::uint32_t crc = records_.at(i).crc32;
  return {static_cast<unsigned char>(crc), static_cast<unsigned char>(crc >> 8),
          static_cast<unsigned char>(crc >> 16), static_cast<unsigned char>(crc >> 24)};
}

std::string ZipImage::local_header(std::size_t i) const {
  const RecordInfo& r = records_.at(i);
  const bool z64 = needs_zip64(r.size);
  const std::uint64_t total = r.data_offset - r.header_offset;
  const std::uint64_t extra_len = total - kLocalHeaderSize - r.name.size();
  const std::uint64_t pad = extra_len - 4 - (z64 ? 20 : 0);
  std::string h;
  h.reserve(total);
  put32(h, kLocalSig);
  put16(h, z64 ? kVersionZip64 : kVersionStored);
  put16(h, 0);     // flags
  put16(h, 0);     // method: stored
  put16(h, 0);     // time
  put16(h, 0x21);  // date: 1980-01-01
  put32(h, r.crc32);
  put32(h, z64 ? k32Max : static_cast<std::uint32_t>(r.size));
  put32(h, z64 ? k32Max : static_cast<std::uint32_t>(r.size));
  put16(h, static_cast<std::uint16_t>(r.name.size()));
  put16(h, static_cast<std::uint16_t>(extra_len));
  h.append(r.name);
  if (z64) {
    put16(h, kZip64ExtraId);
    put16(h, 16);
    put64(h, r.size);
    put64(h, r.size);
  }
  put16(h, kPadExtraId);
  put16(h, static_cast<std::uint16_t>(pad));
  h.append(pad, 'Z');
  return h;
}

void ZipImage::put_local_headers(std::byte* image) const {
  for (std::size_t i = 0; i < records_.size(); ++i) {
    const std::string h = local_header(i);
    std::memcpy(image + records_[i].header_offset, h.data(), h.size());
  }
}

std::string ZipImage::central_directory() const {
  std::string cd;
  for (const auto& r : records_) {
    const bool size64 = needs_zip64(r.size);
    const bool off64 = r.header_offset >= k32Max;
    std::string extra;
    if (size64 || off64) {
      put16(extra, kZip64ExtraId);
      put16(extra, static_cast<std::uint16_t>((size64 ? 16 : 0) + (off64 ? 8 : 0)));
      if (size64) {
        put64(extra, r.size);
        put64(extra, r.size);
      }
      if (off64) put64(extra, r.header_offset);
    }
    put32(cd, kCentralSig);
    put16(cd, kVersionZip64);  // made by
    put16(cd, (size64 || off64) ? kVersionZip64 : kVersionStored);
    put16(cd, 0);
    put16(cd, 0);
    put16(cd, 0);
    put16(cd, 0x21);
    put32(cd, r.crc32);
    put32(cd, size64 ? k32Max : static_cast<std::uint32_t>(r.size));
    put32(cd, size64 ? k32Max : static_cast<std::uint32_t>(r.size));
    put16(cd, static_cast<std::uint16_t>(r.name.size()));
    put16(cd, static_cast<std::uint16_t>(extra.size()));
    put16(cd, 0);  // comment
    put16(cd, 0);  // disk
    put16(cd, 0);  // internal attributes
    put32(cd, 0);  // external attributes
    put32(cd, off64 ? k32Max : static_cast<std::uint32_t>(r.header_offset));
    cd.append(r.name);
    cd.append(extra);
  }
  const std::uint64_t cd_size = cd.size();
  const std::uint64_t n = records_.size();
  const bool z64 = n >= 0xffff || cd_offset_ >= k32Max || cd_size >= k32Max;
  if (z64) {
    const std::uint64_t eocd64_offset = cd_offset_ + cd_size;
    put32(cd, kEocd64Sig);
    put64(cd, 44);
    put16(cd, kVersionZip64);
    put16(cd, kVersionZip64);
    put32(cd, 0);
    put32(cd, 0);
    put64(cd, n);
    put64(cd, n);
    put64(cd, cd_size);
    put64(cd, cd_offset_);
    put32(cd, kLocator64Sig);
    put32(cd, 0);
    put64(cd, eocd64_offset);
    put32(cd, 1);
  }
  put32(cd, kEocdSig);
  put16(cd, 0);
  put16(cd, 0);
  put16(cd, z64 ? 0xffff : static_cast<std::uint16_t>(n));
  put16(cd, z64 ? 0xffff : static_cast<std::uint16_t>(n));
  put32(cd, z64 ? k32Max : static_cast<std::uint32_t>(cd_size));
  put32(cd, z64 ? k32Max : static_cast<std::uint32_t>(cd_offset_));
  put16(cd, 0);
  return cd;
}

std::uint64_t ZipImage::file_size() const {
  return cd_offset_ + central_directory().size();
}

std::uint64_t ZipImage::write(int fd, bool direct, const std::filesystem::path& path, std::byte* image,
                              std::uint64_t file_base, bool block_crcs) {
  // CRCs on a second thread while the bodies (the whole 4096-byte blocks of
  // record data that share no block with a header) go to disk from the image;
  // on this thread for a small archive, where starting a thread costs more.
  std::vector<std::uint32_t> crcs(records_.size());
  std::vector<std::vector<std::uint32_t>> blocks(block_crcs ? records_.size() : 0);
  std::exception_ptr crc_error;
  const auto compute_crcs = [&] {
    try {
      for (std::size_t i = 0; i < records_.size(); ++i)
        crcs[i] = block_crcs ? crc32_blocks(image + records_[i].data_offset, records_[i].size, blocks[i])
                             : crc32_of(image + records_[i].data_offset, records_[i].size);
    } catch (...) {
      crc_error = std::current_exception();
    }
  };
  constexpr std::uint64_t kCrcThreadFrom = std::uint64_t{1} << 20;
  std::thread crc_thread;
  if (cd_offset_ >= kCrcThreadFrom)
    crc_thread = std::thread(compute_crcs);
  else
    compute_crcs();
  struct Join {
    std::thread& t;
    ~Join() {
      if (t.joinable()) t.join();
    }
  } join{crc_thread};

  std::uint64_t seam_start = 0;  // the block run holding the next header
  std::vector<std::pair<std::uint64_t, std::uint64_t>> seams;
  for (const auto& r : records_) {
    const std::uint64_t body_start = align_up(r.data_offset, kAlign);
    const std::uint64_t body_end = (r.data_offset + r.size) / kAlign * kAlign;
    if (body_end > body_start) {
      seams.emplace_back(seam_start, body_start);
      write_maybe_direct(fd, image + body_start, body_end - body_start, file_base + body_start, path);
      seam_start = body_end;
    }
  }
  if (crc_thread.joinable()) crc_thread.join();
  if (crc_error) std::rethrow_exception(crc_error);
  block_crcs_ = std::move(blocks);

  for (std::size_t i = 0; i < records_.size(); ++i) {
    set_crc(i, crcs[i]);
    const auto field = crc_field(i);
    std::memcpy(image + crc_field_offset(i), field.data(), field.size());
  }
  for (const auto& [from, to] : seams)
    if (to > from) write_maybe_direct(fd, image + from, to - from, file_base + from, path);

  // The tail: what is left of the last record, then the central directory, in
  // one aligned buffer.
  const std::string cd = central_directory();
  const std::uint64_t tail_len = cd_offset_ - seam_start + cd.size();
  const std::size_t padded = static_cast<std::size_t>(align_up(tail_len, kAlign));
  void* raw = nullptr;
  if (::posix_memalign(&raw, kAlign, padded) != 0) throw IoError("out of memory for the checkpoint's tail");
  std::unique_ptr<char, decltype(&std::free)> tail(static_cast<char*>(raw), &std::free);
  std::memcpy(tail.get(), image + seam_start, cd_offset_ - seam_start);
  std::memcpy(tail.get() + (cd_offset_ - seam_start), cd.data(), cd.size());
  std::memset(tail.get() + tail_len, 0, padded - tail_len);
  write_maybe_direct(fd, tail.get(), direct ? padded : static_cast<std::size_t>(tail_len),
                     file_base + seam_start, path);
  return cd_offset_ + cd.size();
}

}  // namespace ckpt::detail
