#include <ckpt/dcp/metadata.hpp>

#include "dcp/volume.hpp"

#include <ckpt/error.hpp>

#include <fmt/format.h>

#include <charconv>

namespace ckpt::dcp {

namespace {

/// "rank:R/DEVICE" → (R, DEVICE).
std::pair<std::int64_t, c10::Device> parse_placement(const std::string& placement) {
  const auto bad = [&](const std::string& why) {
    return Error(fmt::format("placement '{}' is not of the form rank:<r>/<device>: {}", placement, why));
  };
  if (placement.rfind("rank:", 0) != 0) throw bad("no 'rank:'");
  const auto slash = placement.find('/');
  if (slash == std::string::npos) throw bad("no '/<device>'");
  std::int64_t rank = -1;
  const char* first = placement.data() + 5;
  const char* last = placement.data() + slash;
  const auto [end, ec] = std::from_chars(first, last, rank);
  if (ec != std::errc() || end != last || rank < 0) throw bad("the rank is not a number");
  try {
    return {rank, c10::Device(placement.substr(slash + 1))};
  } catch (const c10::Error& e) {
    throw bad(e.what_without_backtrace());
  }
}

}  // namespace

TensorProperties TensorProperties::from_tensor(const at::Tensor& t) {
  return {t.scalar_type(), t.requires_grad()};
}

std::vector<ShardMetadata> ChunkShardingSpec::build_metadata(const std::vector<std::int64_t>& sizes) const {
  if (placements.empty()) throw Error("a ChunkShardingSpec needs at least one placement");
  if (dim < 0 || dim >= static_cast<std::int64_t>(sizes.size()))
    throw Error(fmt::format("sharding dim {} is out of range for a tensor of {} dims", dim, sizes.size()));
  const auto d = static_cast<std::size_t>(dim);
  const auto n = static_cast<std::int64_t>(placements.size());
  const std::int64_t split = (sizes[d] + n - 1) / n;
  std::vector<ShardMetadata> out;
  for (std::int64_t i = 0; i < n; ++i) {
    const auto [rank, device] = parse_placement(placements[static_cast<std::size_t>(i)]);
    ShardMetadata m;
    m.rank = rank;
    m.device = device;
    m.offsets.assign(sizes.size(), 0);
    m.sizes = sizes;
    m.offsets[d] = split * i;
    m.sizes[d] = std::max<std::int64_t>(std::min(sizes[d], split * (i + 1)) - split * i, 0);
    out.push_back(std::move(m));
  }
  return out;
}

ShardedTensor ShardedTensor::zeros(const ChunkShardingSpec& spec, std::vector<std::int64_t> sizes,
                                   std::int64_t rank, c10::ScalarType dtype) {
  return create(spec, std::move(sizes), {dtype, false}, rank, [&](const auto& s, c10::Device device) {
    return at::zeros(s, at::TensorOptions().dtype(dtype).device(device));
  });
}

ShardedTensor ShardedTensor::rand(const ChunkShardingSpec& spec, std::vector<std::int64_t> sizes,
                                  std::int64_t rank, c10::ScalarType dtype) {
  return create(spec, std::move(sizes), {dtype, false}, rank, [&](const auto& s, c10::Device device) {
    return at::rand(s, at::TensorOptions().dtype(dtype).device(device));
  });
}

ShardedTensor ShardedTensor::full(const ChunkShardingSpec& spec, std::vector<std::int64_t> sizes,
                                  std::int64_t rank, double value, c10::ScalarType dtype) {
  return create(spec, std::move(sizes), {dtype, false}, rank, [&](const auto& s, c10::Device device) {
    return at::full(s, value, at::TensorOptions().dtype(dtype).device(device));
  });
}

Metadata create_default_local_metadata(const DcpStateDict& state_dict) {
  Metadata md;
  for (const auto& [fqn, value] : state_dict) {
    if (md.state_dict_metadata.count(fqn))
      throw Error(fmt::format("key '{}' appears twice in the state dict", fqn));
    if (const auto* t = std::get_if<at::Tensor>(&value)) {
      TensorStorageMetadata tm;
      tm.properties = TensorProperties::from_tensor(*t);
      tm.size = t->sizes().vec();
      tm.chunks.push_back({std::vector<std::int64_t>(tm.size.size(), 0), tm.size});
      md.state_dict_metadata.emplace(fqn, std::move(tm));
    } else if (const auto* st = std::get_if<ShardedTensor>(&value)) {
      TensorStorageMetadata tm;
      tm.properties = st->properties();
      tm.size = st->size();
      // The global layout: every shard, wherever it lives (empty ones have
      // nothing to save).
      for (const auto& m : st->shards_metadata())
        if (detail::volume(m.sizes) > 0) tm.chunks.push_back({m.offsets, m.sizes});
      md.state_dict_metadata.emplace(fqn, std::move(tm));
    } else {
      md.state_dict_metadata.emplace(fqn, BytesStorageMetadata{});
    }
  }
  return md;
}

}  // namespace ckpt::dcp
