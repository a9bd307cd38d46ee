// Data-parallel training on several ranks that checkpoints asynchronously and
// resumes from the newest committed checkpoint.
//
// usage: ckpt-launch -n N multi_rank [DIR]   (default DIR: a fresh temporary directory)
//
// Every rank (torchrun's variables, as ckpt-launch sets them):
//   1. joins the default process group (TCPStore + Gloo) and agrees with the
//      others on a port for the checkpoint barrier's store;
//   2. trains the same MLP on batches of its own; gradients are all-reduced
//      (averaged) over Gloo, so every rank holds the same model;
//   3. every 10 steps saves through an async checkpointer and a
//      CheckpointManager (DIR/step_<n>, the two newest committed kept): the
//      writer child of each rank writes its file, the ranks meet at a tcp_store
//      barrier, rank 0 writes the commit marker;
//   4. "crashes" at step 35 (the checkpointer is dropped: step 30 is the newest
//      committed), restarts with a fresh model and optimizer, resumes from the
//      newest committed checkpoint through the manager, trains on to step 50;
//   5. checks: the restored state equals what step 30 saved; training on ends
//      bit-identical to a run that never stopped; and every rank holds the same
//      state (digests all-gathered over Gloo). Exits non-zero otherwise.
#include "../common/training.hpp"

#include <ckpt/dist.hpp>

#include <zlib.h>

#include <cstdio>

namespace fs = std::filesystem;

namespace {

constexpr int kSteps = 50;
constexpr int kEvery = 10;
constexpr int kCrashAt = 35;
constexpr double kLr = 1e-3;
constexpr std::int64_t kWidth = 256;

/// One data-parallel step: this rank's batch, gradients averaged over the group.
void train_step(c10d::ProcessGroup& group, torch::nn::Sequential& model, torch::optim::Adam& opt, int step) {
  const int world = group.getSize();
  auto gen = at::detail::createCPUGenerator(static_cast<std::uint64_t>(step * world + group.getRank()));
  auto x = at::randn({64, 16}, gen);
  opt.zero_grad();
  torch::mse_loss(model->forward(x), x.sum(1, true).sin()).backward();
  // One all-reduce of every gradient, flattened into one buffer.
  std::vector<at::Tensor> grads;
  for (auto& p : model->parameters()) grads.push_back(p.grad().reshape({-1}));
  std::vector<at::Tensor> flat{at::cat(grads)};
  group.allreduce(flat)->wait();
  flat[0].div_(world);
  std::int64_t at = 0;
  for (auto& p : model->parameters()) {
    const auto n = p.grad().numel();
    p.grad().copy_(flat[0].slice(0, at, at + n).view_as(p.grad()));
    at += n;
  }
  opt.step();
}

/// CRC-32 of the parameters and the Adam state.
std::int64_t digest(torch::nn::Sequential& model, torch::optim::Adam& opt) {
  uLong crc = crc32(0, nullptr, 0);
  auto add = [&](const at::Tensor& t) {
    auto c = t.contiguous();
    crc = crc32_z(crc, static_cast<const Bytef*>(c.data_ptr()), c.nbytes());
  };
  for (const auto& p : model->parameters()) {
    add(p);
    auto it = opt.state().find(sample::state_key(p));
    if (it == opt.state().end()) continue;
    auto& s = static_cast<torch::optim::AdamParamState&>(*it->second);
    add(s.exp_avg());
    add(s.exp_avg_sq());
  }
  return static_cast<std::int64_t>(crc);
}

/// Whether every rank has the same `value`.
bool same_on_every_rank(c10d::ProcessGroup& group, std::int64_t value) {
  std::vector<std::vector<at::Tensor>> all(1);
  for (int r = 0; r < group.getSize(); ++r) all[0].push_back(at::empty({1}, at::kLong));
  std::vector<at::Tensor> mine{at::full({1}, value, at::kLong)};
  group.allgather(all, mine)->wait();
  for (const auto& t : all[0])
    if (t.item<std::int64_t>() != value) return false;
  return true;
}

std::shared_ptr<ckpt::AsyncCheckpointer> make_checkpointer(const ckpt::dist::ProcessGroupHandle& pg,
                                                           const std::string& name) {
  ckpt::CheckpointerConfig config;
  config.barrier_config.barrier_type = "tcp_store";
  config.barrier_config.barrier_args = {
      {"barrier_prefix", "multi_rank"},
      {"tcpstore_port", ckpt::dist::agree_on_free_port(pg, name)},
      {"master_address", std::getenv("MASTER_ADDR") ? std::getenv("MASTER_ADDR") : "127.0.0.1"},
      {"timeout_secs", 120}};
  config.writer_config.write_barrier_timeout = std::chrono::seconds(120);
  return ckpt::make_async_checkpointer(config, pg.rank_info);
}

}  // namespace

int main(int argc, char** argv) try {
  auto pg = ckpt::dist::init_process_group();  // 1.
  auto& group = *pg->group;
  const auto rank = pg->rank_info.global_rank;
  const auto world = pg->rank_info.global_world_size;

  // Rank 0 makes the directory and tells the others where it is.
  fs::path dir;
  const bool temporary = argc < 2;
  if (rank == 0) {
    dir = temporary ? sample::temporary_directory("multi-rank") : fs::path(argv[1]);
    fs::create_directories(dir);
    const std::string text = dir.string();
    pg->store->set("sample/dir", std::vector<std::uint8_t>(text.begin(), text.end()));
  }
  const auto text = pg->store->get("sample/dir");
  dir = std::string(text.begin(), text.end());

  // 2–3. Train, saving every kEvery steps, until the "crash".
  std::map<int, std::int64_t> saved;  // step → digest of what it saved
  {
    auto ck = make_checkpointer(*pg, "first run");
    ckpt::CheckpointManager manager(dir, ck, {.keep_last_n = 2, .rank_info = pg->rank_info});
    torch::manual_seed(0);  // the same initial weights on every rank
    auto model = sample::make_model(kWidth);
    torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(kLr));
    std::future<void> written;
    for (int step = 1; step <= kCrashAt; ++step) {
      train_step(group, model, opt, step);
      if (step % kEvery == 0) {
        if (written.valid()) written.get();  // the previous save's: committed and pruned
        auto futures = manager.save(step, sample::state_of(model, opt, kLr, step));
        futures.staged.get();  // the model may change from here on
        saved[step] = digest(model, opt);
        written = std::move(futures.written);
      }
    }
    written.get();
    manager.close();
    ck->close();
    std::printf("crash at step %d; committed checkpoints:", kCrashAt);
    for (const auto& c : manager.committed()) std::printf(" %s", c.path.filename().c_str());
    std::printf("\n");
  }

  // 4. Restart: a fresh model (other weights), resumed through the manager.
  auto ck = make_checkpointer(*pg, "second run");
  ckpt::CheckpointManager manager(dir, ck, {.keep_last_n = 2, .rank_info = pg->rank_info});
  torch::manual_seed(1234);
  auto model = sample::make_model(kWidth);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(kLr));
  auto target = sample::restore_target(model);
  const auto from = manager.restore_latest(target);
  if (!from) throw ckpt::NotFound("no committed checkpoint under " + dir.string());
  sample::apply_restored(target, model, opt);
  const bool restored_equal =
      saved.count(static_cast<int>(*from)) && saved.at(static_cast<int>(*from)) == digest(model, opt);
  std::printf("resumed from step %lld: restored state %s the saved one\n", static_cast<long long>(*from),
              restored_equal ? "equals" : "DIFFERS FROM");
  for (int step = static_cast<int>(*from) + 1; step <= kSteps; ++step) train_step(group, model, opt, step);
  ck->close();

  // 5. The run that never stopped, and the comparison across ranks.
  torch::manual_seed(0);
  auto reference = sample::make_model(kWidth);
  torch::optim::Adam ref_opt(reference->parameters(), torch::optim::AdamOptions(kLr));
  for (int step = 1; step <= kSteps; ++step) train_step(group, reference, ref_opt, step);
  const bool matches = digest(model, opt) == digest(reference, ref_opt);
  const bool identical = same_on_every_rank(group, digest(model, opt));
  std::printf("after step %d the resumed run %s the uninterrupted run; state %s on all %lld ranks\n", kSteps,
              matches ? "matches" : "DIFFERS FROM", identical ? "identical" : "NOT identical",
              static_cast<long long>(world));

  const bool ok = restored_equal && matches && identical;
  group.barrier()->wait();  // nobody removes the directory while another reads it
  if (temporary && rank == 0) fs::remove_all(dir);
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "multi_rank: %s\n", e.what());
  return 1;
}
