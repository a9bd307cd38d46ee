// The nested state dict that the C++ → Python DCP cases save
// (dcp_interop_test and dcp_worker's nested_save): Python's dcp.load must
// read it back exactly.
#pragma once

#include <ckpt/dcp/metadata.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/state_dict.hpp>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cstdint>
#include <string>
#include <vector>

namespace ckpt::test {

/// Three pieces along `dim`, piece i on rank i % world (all local on one rank).
inline ckpt::dcp::ChunkShardingSpec three_pieces(std::int64_t dim, std::int64_t world) {
  ckpt::dcp::ChunkShardingSpec spec;
  spec.dim = dim;
  for (std::int64_t i = 0; i < 3; ++i) spec.placements.push_back(fmt::format("rank:{}/cpu", i % world));
  return spec;
}

/// `global` as rank `rank` holds it under `spec`, or whole.
inline c10::IValue held(const at::Tensor& global, const ckpt::dcp::ChunkShardingSpec& spec, std::int64_t rank,
                        bool whole) {
  if (whole) return global;
  auto st = ckpt::dcp::ShardedTensor::zeros(spec, global.sizes().vec(), rank, global.scalar_type());
  for (auto& s : st.local_shards()) {
    at::Tensor part = global;
    for (std::size_t d = 0; d < s.metadata.offsets.size(); ++d)
      part = part.narrow(static_cast<std::int64_t>(d), s.metadata.offsets[d], s.metadata.sizes[d]);
    s.tensor.copy_(part);
  }
  return ckpt::dcp::sharded_value(std::move(st));
}

/// model: rows (7x5 float32) sharded by rows, cols (4x8 float64) by columns
/// (uneven pieces), norm (3x3 bfloat16) replicated; extra: an int, a float,
/// text, a list of mixed values and a dict of them. `whole`: every tensor
/// whole (the expected values); else as rank `rank` of `world` holds them.
inline ckpt::StateDict python_bound_state(std::int64_t rank, std::int64_t world, bool whole) {
  ckpt::StateDict model;
  model.insert("rows",
               held(at::arange(35, at::kFloat).reshape({7, 5}) / 8, three_pieces(0, world), rank, whole));
  model.insert("cols",
               held(at::arange(32, at::kDouble).reshape({4, 8}) * -1.5, three_pieces(1, world), rank, whole));
  model.insert("norm", at::arange(9, at::kFloat).reshape({3, 3}).to(at::kBFloat16) / 3);
  c10::impl::GenericList mixed(c10::AnyType::get());
  mixed.push_back(c10::IValue(std::int64_t{1}));
  mixed.push_back(c10::IValue(2.5));
  mixed.push_back(c10::IValue(std::string("x")));
  mixed.push_back(c10::IValue());
  ckpt::StateDict sched;
  sched.insert("last_epoch", 3);
  sched.insert("gamma", 0.5);
  ckpt::StateDict extra;
  extra.insert("step", 11);
  extra.insert("lr", 0.125);
  extra.insert("name", std::string("h\u00e9llo"));
  extra.insert("mixed", c10::IValue(mixed));
  extra.insert("sched", sched);
  ckpt::StateDict sd;
  sd.insert("model", model);
  sd.insert("extra", extra);
  return sd;
}

}  // namespace ckpt::test
