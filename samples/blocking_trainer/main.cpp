// A blocking training loop that checkpoints through SyncCheckpointer and
// resumes from its newest checkpoint.
//
// usage: blocking_trainer [DIR]   (default: a fresh temporary directory)
//
// Trains a small MLP with Adam on a synthetic regression task and saves model
// and optimizer every 50 steps into DIR/step_<n>/ (one line per save: bytes,
// seconds, GB/s). At step 220 it "crashes"; a fresh model and optimizer then
// resume from the newest checkpoint (step 200). The program checks that the
// restored state equals what was saved, and that training on from it ends
// bit-identical to a run that never stopped. Exit status 0 only if both hold.
#include <ckpt/ckpt.hpp>

#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>

namespace fs = std::filesystem;

namespace {

constexpr int kSteps = 300;
constexpr int kEvery = 50;
constexpr int kCrashAt = 220;
constexpr double kLr = 0.01;

torch::nn::Sequential make_model() {
  return torch::nn::Sequential(torch::nn::Linear(16, 64), torch::nn::ReLU(), torch::nn::Linear(64, 1));
}

// Step i always sees the same batch, so two runs can be compared exactly.
std::pair<torch::Tensor, torch::Tensor> batch(int step) {
  auto gen = at::detail::createCPUGenerator(static_cast<std::uint64_t>(step));
  auto x = at::randn({32, 16}, gen);
  return {x, x.sum(1, true).sin()};
}

void train_step(torch::nn::Sequential& model, torch::optim::Adam& opt, int step) {
  auto [x, y] = batch(step);
  opt.zero_grad();
  torch::mse_loss(model->forward(x), y).backward();
  opt.step();
}

std::string state_key(const torch::Tensor& p) {
  return c10::guts::to_string(p.unsafeGetTensorImpl());
}

// 1. What a checkpoint holds, laid out as Python's model.state_dict() and
//    optimizer.state_dict() are: parameters by name; Adam state by parameter
//    index (integer keys) and the parameter groups.
ckpt::StateDict state_of(torch::nn::Sequential& model, torch::optim::Adam& opt, int step) {
  ckpt::StateDict params;
  for (const auto& p : model->named_parameters()) params.insert(p.key(), p.value().detach());

  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  const auto ps = model->parameters();
  c10::impl::GenericList indices(c10::IntType::get());
  for (std::size_t i = 0; i < ps.size(); ++i) {
    indices.push_back(static_cast<std::int64_t>(i));
    auto it = opt.state().find(state_key(ps[i]));
    if (it == opt.state().end()) continue;
    auto& s = static_cast<torch::optim::AdamParamState&>(*it->second);
    ckpt::StateDict entry;
    entry.insert("step", s.step());
    entry.insert("exp_avg", s.exp_avg());
    entry.insert("exp_avg_sq", s.exp_avg_sq());
    state.insert(static_cast<std::int64_t>(i), entry.to_ivalue());
  }
  ckpt::StateDict group;
  group.insert("lr", kLr);
  group.insert("betas", c10::ivalue::Tuple::create({c10::IValue(0.9), c10::IValue(0.999)}));
  group.insert("eps", 1e-8);
  group.insert("weight_decay", 0.0);
  group.insert("amsgrad", false);
  group.insert("params", indices);
  c10::impl::GenericList groups(c10::AnyType::get());
  groups.push_back(group.to_ivalue());
  ckpt::StateDict optimizer;
  optimizer.insert("state", state);
  optimizer.insert("param_groups", groups);

  ckpt::StateDict sd;
  sd.insert("model", params);
  sd.insert("optimizer", optimizer);
  sd.insert("step", step);
  return sd;
}

// 2. Resume: parameters are read straight into the model's tensors (a partial,
//    strict load whose target holds them); the optimizer's state comes whole
//    (a None leaf) and is handed back to Adam.
int restore(ckpt::Checkpointer& checkpointer, const fs::path& path, torch::nn::Sequential& model,
            torch::optim::Adam& opt) {
  ckpt::StateDict params;
  for (const auto& p : model->named_parameters()) params.insert(p.key(), p.value().detach());
  ckpt::StateDict target;
  target.insert("model", params);
  target.insert("optimizer", c10::IValue());
  target.insert("step", c10::IValue());
  checkpointer.load(path, {.state_dict = target, .strict = true});

  const auto ps = model->parameters();
  for (const auto& entry : target.sub("optimizer").at("state").toGenericDict()) {
    const auto i = static_cast<std::size_t>(entry.key().toInt());
    ckpt::StateDict saved(entry.value().toGenericDict());
    auto s = std::make_unique<torch::optim::AdamParamState>();
    s->step(saved.at("step").toInt());
    s->exp_avg(saved.at("exp_avg").toTensor());
    s->exp_avg_sq(saved.at("exp_avg_sq").toTensor());
    opt.state()[state_key(ps.at(i))] = std::move(s);
  }
  return static_cast<int>(target.at("step").toInt());
}

fs::path newest_checkpoint(const fs::path& dir) {
  fs::path newest;
  int best = -1;
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto name = e.path().filename().string();
    if (name.rfind("step_", 0) != 0 || !fs::exists(e.path() / ckpt::checkpoint_file_name(0))) continue;
    const int n = std::atoi(name.c_str() + 5);
    if (n > best) best = n, newest = e.path();
  }
  if (best < 0) throw ckpt::NotFound("no checkpoint under " + dir.string());
  return newest;
}

fs::path temporary_directory() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/blocking-trainer-XXXXXX";
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  return tmpl;
}

}  // namespace

int main(int argc, char** argv) try {
  const bool temporary = argc < 2;
  const fs::path dir = temporary ? temporary_directory() : fs::path(argv[1]);
  fs::create_directories(dir);
  auto checkpointer = ckpt::make_sync_checkpointer();  // rank from RANK/WORLD_SIZE, else {0, 1}

  // 3. The run that crashes: train, checkpointing every kEvery steps.
  torch::manual_seed(0);
  auto model = make_model();
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(kLr));
  std::map<std::string, torch::Tensor> saved;  // what the newest checkpoint holds
  for (int step = 1; step <= kCrashAt; ++step) {
    train_step(model, opt, step);
    if (step % kEvery != 0) continue;
    const fs::path path = dir / ("step_" + std::to_string(step));
    const auto start = std::chrono::steady_clock::now();
    checkpointer->save(path, state_of(model, opt, step), {{"step", step}});
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const auto bytes = fs::file_size(path / ckpt::checkpoint_file_name(0));
    std::printf("step %3d  saved %s: %ju bytes in %.4f s (%.3f GB/s)\n", step, path.c_str(),
                static_cast<std::uintmax_t>(bytes), secs, static_cast<double>(bytes) / secs / 1e9);
    saved.clear();
    for (const auto& p : model->named_parameters()) saved[p.key()] = p.value().detach().clone();
  }
  std::printf("crash at step %d\n", kCrashAt);

  // 4. The reference: the same training, never interrupted.
  torch::manual_seed(0);
  auto reference = make_model();
  torch::optim::Adam ref_opt(reference->parameters(), torch::optim::AdamOptions(kLr));
  for (int step = 1; step <= kSteps; ++step) train_step(reference, ref_opt, step);

  // 5. Restart: fresh model (other initial weights) and optimizer, restored.
  torch::manual_seed(1234);
  auto resumed = make_model();
  torch::optim::Adam res_opt(resumed->parameters(), torch::optim::AdamOptions(kLr));
  const fs::path newest = newest_checkpoint(dir);
  const int from = restore(*checkpointer, newest, resumed, res_opt);
  bool restored_equal = true;
  for (const auto& p : resumed->named_parameters())
    restored_equal = restored_equal && torch::equal(p.value(), saved.at(p.key()));
  std::printf("resumed from %s (step %d): restored state %s the saved one\n", newest.c_str(), from,
              restored_equal ? "equals" : "DIFFERS FROM");

  for (int step = from + 1; step <= kSteps; ++step) train_step(resumed, res_opt, step);
  bool same = true;
  auto ref_params = reference->named_parameters();
  for (const auto& p : resumed->named_parameters())
    same = same && torch::equal(p.value(), ref_params[p.key()]);
  std::printf("after step %d the resumed run %s the uninterrupted run\n", kSteps,
              same ? "matches" : "DIFFERS FROM");

  checkpointer->close();
  if (temporary) fs::remove_all(dir);
  return restored_equal && same ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "blocking_trainer: %s\n", e.what());
  return 1;
}
