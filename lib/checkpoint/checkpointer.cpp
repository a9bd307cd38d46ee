#include <ckpt/checkpointer.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace ckpt {
namespace {

SaveFutures ready_futures() {
  std::promise<void> staged, written;
  staged.set_value();
  written.set_value();
  return {staged.get_future(), written.get_future()};
}

}  // namespace

StateDict load_checked(CheckpointReader& reader, const std::filesystem::path& path,
                       const LoadOptions& options, const Kwargs& kwargs) {
  ReaderOptions read_options{options.map_location, options.mmap, options.verify_crc};
  ReadResult result = reader.read(path, options.state_dict, read_options, kwargs);
  if (options.strict && !result.missing_keys.empty()) {
    std::vector<std::string> quoted;
    for (const auto& k : result.missing_keys) quoted.push_back(fmt::format("'{}'", k));
    throw MissingKeys(
        fmt::format("Checkpoint at {} is missing keys: [{}]", path.string(), fmt::join(quoted, ", ")));
  }
  return result.state_dict;
}

SyncCheckpointer::SyncCheckpointer(std::shared_ptr<CheckpointWriter> writer,
                                   std::shared_ptr<CheckpointReader> reader)
    : writer_(std::move(writer)), reader_(std::move(reader)) {
  if (!writer_ || !reader_) throw Error("SyncCheckpointer needs a writer and a reader");
}

SyncCheckpointer::~SyncCheckpointer() {
  try {
    close();
  } catch (...) {
  }
}

SaveFutures SyncCheckpointer::save(const std::filesystem::path& path, const StateDict& state_dict,
                                   const Kwargs& kwargs) {
  if (closed_) throw Error(fmt::format("cannot save {}: the checkpointer is closed", path.string()));
  writer_->write(path, state_dict, kwargs);
  return ready_futures();
}

StateDict SyncCheckpointer::load(const std::filesystem::path& path, const LoadOptions& options,
                                 const Kwargs& kwargs) {
  return load_checked(*reader_, path, options, kwargs);
}

void SyncCheckpointer::close() {
  if (closed_) return;
  closed_ = true;
  writer_->close();
}

std::unique_ptr<SyncCheckpointer> make_sync_checkpointer(const CheckpointerConfig& config,
                                                         std::optional<RankInfo> rank_info,
                                                         std::shared_ptr<WriterHook> commit_hook) {
  const RankInfo rank = rank_info ? *rank_info : rank_info_from_env();
  auto barrier = create_barrier_from_config(config.barrier_config, rank);
  auto writer = std::make_shared<CheckpointWriter>(config.writer_config, rank, std::move(barrier),
                                                   std::move(commit_hook));
  auto reader = std::make_shared<CheckpointReader>(rank);
  return std::make_unique<SyncCheckpointer>(std::move(writer), std::move(reader));
}

}  // namespace ckpt
