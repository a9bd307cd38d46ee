// A data-parallel trainer with a sharded embedding that checkpoints with
// dcp::AsyncSaver, crashes, and resumes on another number of ranks.
//
// usage: ckpt-launch -n N dcp_trainer DIR train     (steps 1..20, then a crash)
//        ckpt-launch -n M dcp_trainer DIR resume    (from the newest committed, to step 30)
//
// The model: an embedding table E (64 rows × 16) sharded by rows over the
// ranks (a ShardedTensor: each rank holds and updates its rows), a head w
// (16) replicated on every rank, and momentum buffers of both. A step draws a
// global batch of 48 token ids (the same on every rank); each rank computes
// the loss terms of the tokens whose rows it holds, and the head's gradient is
// assembled exactly: every rank writes its tokens' terms into a zero tensor of
// the whole batch, one all-reduce sums them (each element has one non-zero
// term, so the sum is exact in any order), and every rank adds them up in
// token order. A step's result is thus the same bits on any number of ranks:
// what makes a resume on another rank count checkable bit for bit.
//
// train: every 5 steps the state is saved through the saver (DIR/step_<n>):
// the call returns once the state is staged, training goes on while the
// writer child writes, and the save is waited for before the next one. At
// step 20 the save is asked for and the process dies at once (a crash in the
// middle of a write): step 20 is committed or not, step 15 is.
// resume: the newest committed checkpoint is loaded into the state as this
// rank count shards it, training goes on to step 30, and every rank checks
// its shard and the head against a run from step 0 that never stopped, made
// here on the same ranks, bit for bit. Exits non-zero otherwise.
#include <ckpt/ckpt.hpp>

#include <boost/asio/thread_pool.hpp>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <optional>
#include <string>

namespace fs = std::filesystem;
namespace dcp = ckpt::dcp;

namespace {

constexpr std::int64_t kRows = 64;
constexpr std::int64_t kDim = 16;
constexpr std::int64_t kBatch = 48;
constexpr int kEvery = 5;
constexpr int kCrashAt = 20;
constexpr int kLastStep = 30;
constexpr double kLr = 0.05;
constexpr double kMomentum = 0.9;

/// The trainer's state as this rank holds it.
struct State {
  dcp::ShardedTensor embedding;  // rows sharded over the ranks
  dcp::ShardedTensor embedding_momentum;
  at::Tensor head;  // replicated
  at::Tensor head_momentum;
  std::int64_t step = 0;
};

dcp::ChunkShardingSpec by_rows(std::int64_t world) {
  dcp::ChunkShardingSpec spec;
  spec.dim = 0;
  for (std::int64_t r = 0; r < world; ++r) spec.placements.push_back(fmt::format("rank:{}/cpu", r));
  return spec;
}

/// The state at step 0: the same global values on any number of ranks.
State initial_state(std::int64_t rank, std::int64_t world) {
  State s;
  const auto global = at::sin(at::arange(kRows * kDim, at::kFloat).reshape({kRows, kDim}) * 0.37f) * 0.5f;
  s.embedding = dcp::ShardedTensor::zeros(by_rows(world), {kRows, kDim}, rank, at::kFloat);
  for (auto& shard : s.embedding.local_shards())
    shard.tensor.copy_(global.narrow(0, shard.metadata.offsets[0], shard.metadata.sizes[0]));
  s.embedding_momentum = dcp::ShardedTensor::zeros(by_rows(world), {kRows, kDim}, rank, at::kFloat);
  s.head = at::cos(at::arange(kDim, at::kFloat) * 0.5f);
  s.head_momentum = at::zeros({kDim});
  return s;
}

/// One step (see the top of the file): `group` null when alone.
void train_step(State& s, c10d::ProcessGroup* group) {
  ++s.step;
  auto gen = at::detail::createCPUGenerator(static_cast<std::uint64_t>(1000 + s.step));
  const auto ids = at::randint(kRows, {kBatch}, gen, at::kLong);
  const auto* id = ids.data_ptr<std::int64_t>();
  auto head_terms = at::zeros({kBatch, kDim});
  for (std::size_t k = 0; k < s.embedding.local_shards().size(); ++k) {
    auto& shard = s.embedding.local_shards()[k];
    auto& momentum = s.embedding_momentum.local_shards()[k].tensor;
    const std::int64_t first = shard.metadata.offsets[0], rows = shard.metadata.sizes[0];
    auto grad = at::zeros_like(shard.tensor);
    for (std::int64_t t = 0; t < kBatch; ++t) {
      if (id[t] < first || id[t] >= first + rows) continue;
      const auto row = shard.tensor[id[t] - first];
      const float target = std::sin(0.1f * float(id[t]) + 0.01f * float(s.step));
      const auto residual = (row * s.head).sum() - target;
      grad[id[t] - first].add_(s.head * residual * 2.0f);
      head_terms[t].copy_(row * residual * 2.0f);
    }
    momentum.mul_(kMomentum).add_(grad);
    shard.tensor.sub_(momentum * kLr);
  }
  if (group) {
    std::vector<at::Tensor> terms{head_terms};
    group->allreduce(terms)->wait();
  }
  // The same tensor on every rank, whatever their number: the same sum.
  s.head_momentum.mul_(kMomentum).add_(head_terms.sum(0) / float(kBatch));
  s.head.sub_(s.head_momentum * kLr);
}

ckpt::StateDict as_state_dict(const State& s) {
  ckpt::StateDict model, optim;
  model.insert("embedding", dcp::sharded_value(s.embedding));
  model.insert("head", s.head);
  optim.insert("embedding_momentum", dcp::sharded_value(s.embedding_momentum));
  optim.insert("head_momentum", s.head_momentum);
  ckpt::StateDict sd;
  sd.insert("model", model);
  sd.insert("optim", optim);
  sd.insert("step", s.step);
  return sd;
}

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         std::memcmp(a.contiguous().data_ptr(), b.contiguous().data_ptr(), a.nbytes()) == 0;
}

bool same_state(const State& a, const State& b) {
  bool same = a.step == b.step && same_bits(a.head, b.head) && same_bits(a.head_momentum, b.head_momentum);
  for (std::size_t k = 0; k < a.embedding.local_shards().size(); ++k) {
    same = same && same_bits(a.embedding.local_shards()[k].tensor, b.embedding.local_shards()[k].tensor);
    same = same && same_bits(a.embedding_momentum.local_shards()[k].tensor,
                             b.embedding_momentum.local_shards()[k].tensor);
  }
  return same;
}

/// The newest step_<n> under `dir` that holds a committed checkpoint.
std::optional<int> newest_committed(const fs::path& dir) {
  std::optional<int> newest;
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto name = e.path().filename().string();
    if (name.rfind("step_", 0) != 0 || !fs::exists(e.path() / dcp::kMetadataFileName)) continue;
    const int step = std::stoi(name.substr(5));
    if (!newest || step > *newest) newest = step;
  }
  return newest;
}

int train(const fs::path& dir, const std::shared_ptr<ckpt::dist::ProcessGroupHandle>& pg) {
  const auto rank = pg->rank_info.global_rank, world = pg->rank_info.global_world_size;
  boost::asio::thread_pool completions(1);
  dcp::AsyncSaver saver(completions.get_executor());  // every rank, together: its own group
  State s = initial_state(rank, world);
  std::optional<std::future<void>> written;
  while (s.step < kCrashAt) {
    train_step(s, pg->group.get());
    if (s.step % kEvery != 0) continue;
    if (written) written->get();  // the previous save is committed (or throws)
    dcp::SaveOptions options;
    options.checkpoint_id = dir / fmt::format("step_{}", s.step);
    auto futures = saver.save(as_state_dict(s), options);
    futures.staged.get();  // from here training may change the state
    written = std::move(futures.written);
    if (s.step == kCrashAt) {
      std::fflush(stdout);
      std::_Exit(0);  // a crash while the writer children write step 20
    }
    if (rank == 0) fmt::print("step {}: saved (staged; the write goes on)\n", s.step);
  }
  return 0;
}

int resume(const fs::path& dir, const std::shared_ptr<ckpt::dist::ProcessGroupHandle>& pg) {
  const auto rank = pg->rank_info.global_rank, world = pg->rank_info.global_world_size;
  const auto step = newest_committed(dir);
  if (!step) {
    fmt::print(stderr, "rank {}: no committed checkpoint in {}\n", rank, dir.string());
    return 1;
  }
  // A fresh state, sharded for this rank count, filled from the checkpoint.
  State s = initial_state(rank, world);
  s.head.zero_();
  auto sd = as_state_dict(s);
  dcp::LoadOptions options;
  options.checkpoint_id = dir / fmt::format("step_{}", *step);
  dcp::load(sd, options);
  s.step = sd.at("step").toInt();
  // The run that never stopped, on these ranks.
  State reference = initial_state(rank, world);
  while (reference.step < s.step) train_step(reference, pg->group.get());
  bool ok = same_state(s, reference);
  if (rank == 0)
    fmt::print("resumed from step {} (saved on another rank count) on {} ranks: {}\n", *step, world,
               ok ? "as saved" : "DIFFERENT");
  while (s.step < kLastStep) {
    train_step(s, pg->group.get());
    train_step(reference, pg->group.get());
  }
  const bool same_end = same_state(s, reference);
  ok = ok && same_end;
  if (rank == 0)
    fmt::print("step {}: {} a run that never stopped\n", kLastStep,
               same_end ? "bit-identical to" : "DIFFERS from");
  // Every rank's verdict, all-reduced: the job fails if any rank's failed.
  std::vector<at::Tensor> bad{at::full({1}, ok ? 0.0f : 1.0f)};
  pg->group->allreduce(bad)->wait();
  return bad[0].item<float>() == 0.0f ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc != 3 || (std::string(argv[2]) != "train" && std::string(argv[2]) != "resume")) {
    std::fprintf(stderr, "usage: ckpt-launch -n N %s DIR train|resume\n", argv[0]);
    return 2;
  }
  const fs::path dir = argv[1];
  fs::create_directories(dir);
  auto pg = ckpt::dist::init_process_group();
  ckpt::dist::set_default_process_group(pg);
  return std::string(argv[2]) == "train" ? train(dir, pg) : resume(dir, pg);
} catch (const std::exception& e) {
  std::fprintf(stderr, "dcp_trainer: %s\n", e.what());
  return 1;
}
