// What dcp_worker (which runs the scenarios) and dcp_checkpoint_test (which
// checks what every rank reported and what is on disk) share: upstream's fault
// tables (test_checkpoint.py, TestDistributedFailure), the deterministic
// global values the scenarios save, and the overlap arithmetic the resharding
// checks use (independent of the library's planner).
#pragma once

#include <ckpt/dcp/metadata.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/dcp/storage.hpp>
#include <ckpt/format.hpp>

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ckpt::test::dcp_cases {

/// One call of upstream's _test_save / _test_load: the coordinator, the fail
/// key (empty: no fault) and the ranks it fails on.
struct Case {
  std::int64_t coordinator = 0;
  std::string key;
  std::vector<std::int64_t> ranks;
  bool ignore_exception_type = false;
};

// test_save_error_handling
inline const std::vector<Case> kSaveCases{
    {0, "fail_set_up_storage_writer", {0}}, {0, "fail_finish", {0}},     {0, "fail_prepare_global_plan", {0}},
    {0, "fail_prepare_local_plan", {0}},    {0, "fail_write_data", {2}}, {0, "fail_write_data_async", {3}},
    {1, "fail_set_up_storage_writer", {1}}, {1, "fail_finish", {1}},
};
// test_save_error_handling_no_dist
inline const std::vector<Case> kSaveNoDistCases{
    {0, "fail_set_up_storage_writer", {0}}, {0, "fail_finish", {0}},     {0, "fail_prepare_global_plan", {0}},
    {0, "fail_prepare_local_plan", {0}},    {0, "fail_write_data", {0}}, {0, "fail_write_data_async", {0}},
};
// test_load_error_handling
inline const std::vector<Case> kLoadCases{
    {0, "", {}},
    {0, "fail_set_up_storage_reader", {0}},
    {0, "fail_prepare_global_plan", {0}},
    {0, "fail_read_metadata", {0}, true},
    {0, "fail_prepare_local_plan", {1}},
    {0, "fail_read_data", {3}},
    {0, "fail_read_data_async", {1}},
    {3, "fail_set_up_storage_reader", {0}},
    {1, "fail_read_metadata", {3}, true},
    {2, "fail_read_data", {0}},
    {3, "fail_read_data_async", {2}},
    {1, "fail_prepare_global_plan", {1}},
};
// test_load_error_handling_no_dist
inline const std::vector<Case> kLoadNoDistCases{
    {0, "", {}},
    {0, "fail_set_up_storage_reader", {0}},
    {0, "fail_read_metadata", {0}, true},
    {0, "fail_prepare_local_plan", {0}},
    {0, "fail_prepare_global_plan", {0}},
    {0, "fail_read_data", {0}},
    {0, "fail_read_data_async", {0}},
};

/// A case's label, also the directory a save case writes to (under DIR).
inline std::string label_of(const std::string& table, const Case& c) {
  return fmt::format("{}/c{}/{}", table, c.coordinator, c.key.empty() ? "none" : c.key);
}

// --- values (exact in binary: every check is bitwise) --------------------------------

inline at::Tensor sharded_value() {
  return at::arange(400, at::kFloat).reshape({20, 20}).div_(8);
}
inline at::Tensor replicated_value() {
  return at::arange(100, at::kFloat).reshape({10, 10}).mul_(0.5).sub_(3);
}
inline at::Tensor rows_value() {
  return at::arange(120, at::kFloat).reshape({20, 6});
}
inline at::Tensor uneven_value() {
  return at::arange(30, at::kDouble).reshape({10, 3}).sub_(7).mul_(0.25);
}
inline at::Tensor reshard_replicated_value() {
  return at::arange(35, at::kFloat).reshape({7, 5}).mul_(1.5);
}
/// What the resharding scenarios save: key → global value.
inline std::map<std::string, at::Tensor> reshard_globals() {
  return {{"rows", rows_value()}, {"uneven", uneven_value()}, {"replicated", reshard_replicated_value()}};
}

/// The part of `global` at `offsets` of `sizes`.
inline at::Tensor slice_of(const at::Tensor& global, const std::vector<std::int64_t>& offsets,
                           const std::vector<std::int64_t>& sizes) {
  at::Tensor t = global;
  for (std::size_t d = 0; d < offsets.size(); ++d)
    t = t.narrow(static_cast<std::int64_t>(d), offsets[d], sizes[d]);
  return t;
}

/// Bytes the chunk at `offsets` of `sizes` shares with the saved chunks of
/// `md`: per saved chunk, the product over dims of min(end) − max(start)
/// (none when any is ≤ 0).
inline std::uint64_t overlap_bytes(const dcp::TensorStorageMetadata& md,
                                   const std::vector<std::int64_t>& offsets,
                                   const std::vector<std::int64_t>& sizes) {
  std::uint64_t elements = 0;
  for (const auto& chunk : md.chunks) {
    std::uint64_t n = 1;
    for (std::size_t d = 0; d < offsets.size(); ++d) {
      const auto lo = std::max(chunk.offsets[d], offsets[d]);
      const auto hi = std::min(chunk.offsets[d] + chunk.sizes[d], offsets[d] + sizes[d]);
      n *= hi > lo ? static_cast<std::uint64_t>(hi - lo) : 0;
    }
    elements += n;
  }
  return elements * c10::elementSize(md.properties.dtype);
}

/// What a FileSystemReader must have read to load `sd` from `directory`: its
/// metadata file (only on the rank that reads it: `reads_metadata`); of every saved chunk that overlaps a
/// tensor or local shard of `sd`, the headers of its archive (zip directory, pickle: what opening the item
/// costs) once; and the bytes of every overlap.
inline std::uint64_t expected_bytes_read(const std::filesystem::path& directory, const dcp::DcpStateDict& sd,
                                         bool reads_metadata = true) {
  const auto saved = dcp::read_checkpoint_metadata(directory);
  std::uint64_t n = reads_metadata ? std::filesystem::file_size(directory / dcp::kMetadataFileName) : 0;
  for (const auto& [fqn, value] : sd) {
    const auto& md = std::get<dcp::TensorStorageMetadata>(saved.metadata.state_dict_metadata.at(fqn));
    std::vector<std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>>> regions;
    if (const auto* t = std::get_if<at::Tensor>(&value))
      regions.emplace_back(std::vector<std::int64_t>(static_cast<std::size_t>(t->dim()), 0),
                           t->sizes().vec());
    else if (const auto* st = std::get_if<dcp::ShardedTensor>(&value))
      for (const auto& s : st->local_shards()) regions.emplace_back(s.metadata.offsets, s.metadata.sizes);
    for (const auto& chunk : md.chunks) {
      bool read = false;
      for (const auto& [offsets, sizes] : regions) {
        dcp::TensorStorageMetadata one = md;
        one.chunks = {chunk};
        read = read || overlap_bytes(one, offsets, sizes) > 0;
      }
      if (!read) continue;
      const auto& info = saved.storage_data.at(dcp::MetadataIndex{fqn, chunk.offsets, std::nullopt});
      ckpt::FileReader archive(directory / info.relative_path, info.offset, info.length);
      archive.storage_record(*archive.root().tensor);
      n += archive.bytes_read();
    }
    for (const auto& [offsets, sizes] : regions) n += overlap_bytes(md, offsets, sizes);
  }
  return n;
}

/// Options of a save or load by this process alone (no process group).
inline dcp::SaveOptions save_alone(std::optional<std::filesystem::path> checkpoint_id,
                                   dcp::StorageWriter* writer = nullptr) {
  dcp::SaveOptions o;
  o.checkpoint_id = std::move(checkpoint_id);
  o.storage_writer = writer;
  o.no_dist = true;
  return o;
}
inline dcp::LoadOptions load_alone(std::optional<std::filesystem::path> checkpoint_id = std::nullopt) {
  dcp::LoadOptions o;
  o.checkpoint_id = std::move(checkpoint_id);
  o.no_dist = true;
  return o;
}
inline dcp::FileSystemWriterOptions writing_for(dcp::MetadataDialect dialect) {
  dcp::FileSystemWriterOptions o;
  o.dialect = dialect;
  return o;
}

}  // namespace ckpt::test::dcp_cases
