// CheckpointReader: reads a rank's file from a checkpoint directory, fully or
// only the keys a target asks for (upstream's checkpoint_reader.py).
#pragma once

#include <ckpt/state_dict.hpp>
#include <ckpt/types.hpp>

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ckpt {

/// Where loaded tensors go (torch.load's map_location): the stored device (the
/// default), one device for all, a {stored location → device} map, or a
/// function of (tensor loaded on the CPU, stored location) returning the tensor
/// to keep.
class MapLocation {
 public:
  using Function = std::function<at::Tensor(const at::Tensor& tensor, const std::string& location)>;

  MapLocation() = default;
  MapLocation(c10::Device device);
  MapLocation(const char* device);
  MapLocation(const std::string& device);
  MapLocation(std::map<std::string, std::string> remap);
  MapLocation(Function fn);

  /// Whether anything is mapped.
  bool empty() const;
  /// The device for a storage stored at `location`, for the device forms.
  c10::Device device_for(const std::string& location) const;
  /// Whether this is the function form.
  bool is_function() const { return static_cast<bool>(fn_); }
  const Function& function() const { return fn_; }

 private:
  std::optional<c10::Device> device_;
  std::map<std::string, std::string> remap_;
  Function fn_;
};

/// How CheckpointReader::read reads.
struct ReaderOptions {
  MapLocation map_location{};
  /// Map the file (copy-on-write) instead of reading it; CPU only.
  bool mmap = false;
  /// Check the CRC-32 of every record read.
  bool verify_crc = false;
};

struct ReadResult {
  StateDict state_dict;
  /// Keys the target asked for that the file lacks, as `a.b` and `a[0]` paths.
  std::vector<std::string> missing_keys;
};

class CheckpointReader {
 public:
  explicit CheckpointReader(RankInfo rank_info);
  virtual ~CheckpointReader();

  /// Reads `path/checkpoint_<global_rank>.pt`.
  ///
  /// Without a target, everything is read. With one, only what it asks for is
  /// read, walking the target against the file: a None leaf takes the file's
  /// value whole; a tensor leaf is filled in place (sizes and dtype must match,
  /// else Mismatch naming the key and both sides); a dict takes only its keys;
  /// a list is matched element by element; keys the file lacks are reported in
  /// `missing_keys`; the returned dict is the target itself. A value of another
  /// kind than the file's (a dict where the file has a tensor) is a Mismatch
  /// naming the key; dict and OrderedDict count as one kind.
  ///
  /// Throws NotFound naming the file when it does not exist, CorruptCheckpoint
  /// for a damaged file. `kwargs` are accepted for parity and unused.
  virtual ReadResult read(const std::filesystem::path& path,
                          std::optional<StateDict> state_dict = std::nullopt,
                          const ReaderOptions& options = {}, const Kwargs& kwargs = {});

  const RankInfo& rank_info() const { return rank_info_; }

 private:
  RankInfo rank_info_;
};

}  // namespace ckpt
