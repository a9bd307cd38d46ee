// The commit marker of a multi-rank checkpoint directory.
//
// Every rank writes its file durably and waits at the barrier; then the
// coordinator (rank 0) writes `ckpt_commit.json` atomically (temporary file,
// fsync, rename, directory fsync). The marker names every rank's file with its
// size and a digest, so that a directory is committed exactly when the marker
// is there and every file it names matches it. Directories without a marker
// (PyTorch writes none) still load; `ckpt verify DIR` reports them as
// uncommitted and the resume helpers (CheckpointManager) skip them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace ckpt {

/// Name of rank `rank`'s file inside a checkpoint directory (checkpoint_<rank>.pt).
std::string checkpoint_file_name(std::int64_t rank);

/// The marker's file name inside a checkpoint directory.
inline constexpr const char* kCommitMarkerName = "ckpt_commit.json";
/// The marker format version this library writes and reads.
inline constexpr int kCommitMarkerVersion = 1;

/// One rank's file as the marker records it.
struct CommittedFile {
  std::int64_t rank = 0;
  std::string name;         ///< relative to the directory: checkpoint_<rank>.pt
  std::uint64_t size = 0;   ///< bytes
  std::uint32_t crc32 = 0;  ///< CRC-32 of the file's zip directory, which holds every record's CRC-32
  friend bool operator==(const CommittedFile&, const CommittedFile&) = default;
};

struct CommitMarker {
  int version = kCommitMarkerVersion;
  std::int64_t world_size = 1;
  std::vector<CommittedFile> files;  ///< one per rank, by rank
  std::string time;                  ///< UTC, ISO 8601, when the marker was written
};

/// Describes rank `rank`'s file in `dir` (size and directory digest). Throws
/// NotFound or CorruptCheckpoint.
CommittedFile describe_committed_file(const std::filesystem::path& dir, std::int64_t rank);

/// Writes `marker` into `dir` atomically and durably (its time is set now).
void write_commit_marker(const std::filesystem::path& dir, CommitMarker marker);

/// The marker of `dir`; nullopt when there is none. Throws CorruptCheckpoint
/// for a marker that does not parse, names a path outside `dir`, or is of a
/// newer version.
std::optional<CommitMarker> read_commit_marker(const std::filesystem::path& dir);

/// Checks that every file the marker names is in `dir` with its size and
/// digest. Throws CorruptCheckpoint naming the first file that is not.
void verify_commit(const std::filesystem::path& dir, const CommitMarker& marker);

/// Whether `dir` holds a marker that parses and whose files match it.
bool is_committed(const std::filesystem::path& dir);

}  // namespace ckpt
