#include <ckpt/commit.hpp>

#include <ckpt/error.hpp>

#include "core/io.hpp"
#include "format/file_writer.hpp"
#include "format/zip.hpp"

#include <fmt/format.h>
#include <boost/json.hpp>

#include <cerrno>
#include <chrono>
#include <ctime>
#include <fstream>
#include <sstream>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace json = boost::json;
namespace fs = std::filesystem;

namespace ckpt {

std::string checkpoint_file_name(std::int64_t rank) {
  return fmt::format("checkpoint_{}.pt", rank);
}

namespace {

constexpr std::uint64_t kMaxMarkerBytes = 64 << 20;

std::string utc_now() {
  const std::time_t t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

[[noreturn]] void bad_marker(const fs::path& file, const std::string& why) {
  throw CorruptCheckpoint(fmt::format("commit marker {}: {}", file.string(), why));
}

}  // namespace

CommittedFile describe_committed_file(const fs::path& dir, std::int64_t rank) {
  CommittedFile out;
  out.rank = rank;
  out.name = checkpoint_file_name(rank);
  const fs::path file = dir / out.name;
  detail::Fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) throw NotFound(fmt::format("Checkpoint file not found at {}", file.string()));
    throw IoError(fmt::format("cannot open {}: {}", file.string(), std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0)
    throw IoError(fmt::format("stat {}: {}", file.string(), std::strerror(errno)));
  out.size = static_cast<std::uint64_t>(st.st_size);
  const detail::Directory directory = detail::read_directory(fd.get(), out.size, file);
  std::string tail(out.size - directory.cd_offset, '\0');
  detail::pread_full(fd.get(), tail.data(), tail.size(), directory.cd_offset, file);
  out.crc32 = detail::crc32_of(tail.data(), tail.size());
  return out;
}

void write_commit_marker(const fs::path& dir, CommitMarker marker) {
  marker.time = utc_now();
  json::array files;
  for (const auto& f : marker.files)
    files.push_back(json::object{{"rank", f.rank}, {"name", f.name}, {"size", f.size}, {"crc32", f.crc32}});
  const std::string text = json::serialize(json::object{{"format", "ckpt-commit"},
                                                        {"version", marker.version},
                                                        {"world_size", marker.world_size},
                                                        {"time", marker.time},
                                                        {"files", std::move(files)}}) +
                           "\n";
  detail::write_durably(dir / kCommitMarkerName, WriteOptions{.direct_io = false, .fsync = true},
                        [&](int fd, bool, const fs::path& temp) {
                          detail::pwrite_full(fd, text.data(), text.size(), 0, temp);
                          return static_cast<std::uint64_t>(text.size());
                        });
}

std::optional<CommitMarker> read_commit_marker(const fs::path& dir) {
  const fs::path file = dir / kCommitMarkerName;
  std::error_code ec;
  const auto size = fs::file_size(file, ec);
  if (ec) {
    if (ec == std::errc::no_such_file_or_directory) return std::nullopt;
    throw IoError(fmt::format("cannot read commit marker {}: {}", file.string(), ec.message()));
  }
  if (size > kMaxMarkerBytes) bad_marker(file, fmt::format("{} bytes is too large for a marker", size));
  std::ifstream in(file, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in && !in.eof()) throw IoError(fmt::format("cannot read commit marker {}", file.string()));

  json::value v;
  try {
    v = json::parse(text.str());
  } catch (const std::exception& e) {
    bad_marker(file, fmt::format("not JSON ({})", e.what()));
  }
  CommitMarker marker;
  try {
    const auto& o = v.as_object();
    if (o.at("format").as_string() != "ckpt-commit") bad_marker(file, "not a ckpt commit marker");
    marker.version = static_cast<int>(o.at("version").to_number<std::int64_t>());
    if (marker.version > kCommitMarkerVersion)
      bad_marker(file, fmt::format("version {} is newer than this library reads ({})", marker.version,
                                   kCommitMarkerVersion));
    marker.world_size = o.at("world_size").to_number<std::int64_t>();
    marker.time = std::string(o.at("time").as_string());
    for (const auto& f : o.at("files").as_array()) {
      const auto& fo = f.as_object();
      CommittedFile cf;
      cf.rank = fo.at("rank").to_number<std::int64_t>();
      cf.name = std::string(fo.at("name").as_string());
      cf.size = fo.at("size").to_number<std::uint64_t>();
      cf.crc32 = fo.at("crc32").to_number<std::uint32_t>();
      // A marker names files of its own directory only.
      const fs::path name(cf.name);
      if (cf.name.empty() || name.is_absolute() || name.has_parent_path() || cf.name == "." ||
          cf.name == "..")
        bad_marker(file, fmt::format("file name '{}' is not a plain name in the directory", cf.name));
      marker.files.push_back(std::move(cf));
    }
  } catch (const CorruptCheckpoint&) {
    throw;
  } catch (const std::exception& e) {
    bad_marker(file, fmt::format("malformed ({})", e.what()));
  }
  if (marker.world_size < 1 || static_cast<std::uint64_t>(marker.world_size) != marker.files.size())
    bad_marker(file, fmt::format("world size {} but {} files", marker.world_size, marker.files.size()));
  for (std::size_t i = 0; i < marker.files.size(); ++i)
    if (marker.files[i].rank != static_cast<std::int64_t>(i))
      bad_marker(file, fmt::format("file {} is for rank {}, expected rank {}", i, marker.files[i].rank, i));
  return marker;
}

void verify_commit(const fs::path& dir, const CommitMarker& marker) {
  for (const auto& expected : marker.files) {
    CommittedFile actual;
    try {
      actual = describe_committed_file(dir, expected.rank);
    } catch (const Error& e) {
      throw CorruptCheckpoint(fmt::format("{} is committed but rank {}'s file is not sound: {}", dir.string(),
                                          expected.rank, e.what()));
    }
    if (actual.name != expected.name || actual.size != expected.size || actual.crc32 != expected.crc32)
      throw CorruptCheckpoint(
          fmt::format("{}: rank {}'s file {} does not match the commit marker (size {} vs {}, directory "
                      "CRC-32 {:08x} vs {:08x})",
                      dir.string(), expected.rank, expected.name, actual.size, expected.size, actual.crc32,
                      expected.crc32));
  }
}

bool is_committed(const fs::path& dir) {
  try {
    const auto marker = read_commit_marker(dir);
    if (!marker) return false;
    verify_commit(dir, *marker);
    return true;
  } catch (const Error&) {
    return false;
  }
}

}  // namespace ckpt
