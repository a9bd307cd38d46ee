// A training loop that checkpoints and resumes.
//
// usage: trainer [DIR]   (default: ./trainer-checkpoints)
//
// Trains a small MLP on a synthetic regression task, writes a checkpoint every
// 50 steps (DIR/step_<n>/checkpoint_0.pt), then simulates a restart: a fresh
// model loads the newest checkpoint in place and trains on. The resumed run must
// end bit-identical to a run that never stopped.
#include <ckpt/ckpt.hpp>

#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <filesystem>

namespace fs = std::filesystem;

namespace {

constexpr int kSteps = 300;
constexpr int kEvery = 50;
constexpr int kCrashAt = 220;  // the "crash": the newest checkpoint is step 200

torch::nn::Sequential make_model() {
  return torch::nn::Sequential(torch::nn::Linear(16, 64), torch::nn::ReLU(), torch::nn::Linear(64, 1));
}

// Step i always sees the same batch, so two runs can be compared exactly.
std::pair<torch::Tensor, torch::Tensor> batch(int step) {
  auto gen = at::detail::createCPUGenerator(static_cast<std::uint64_t>(step));
  auto x = at::randn({32, 16}, gen);
  auto y = x.sum(1, true).sin();
  return {x, y};
}

float train_step(torch::nn::Sequential& model, torch::optim::SGD& opt, int step) {
  auto [x, y] = batch(step);
  opt.zero_grad();
  auto loss = torch::mse_loss(model->forward(x), y);
  loss.backward();
  opt.step();
  return loss.item<float>();
}

// 1. The state to save: parameters by name, plus the step.
c10::impl::GenericDict state_of(torch::nn::Sequential& model, int step) {
  c10::impl::GenericDict params(c10::StringType::get(), c10::AnyType::get());
  for (const auto& p : model->named_parameters()) params.insert(p.key(), p.value().detach());
  c10::impl::GenericDict sd(c10::StringType::get(), c10::AnyType::get());
  sd.insert("model", params);
  sd.insert("step", static_cast<std::int64_t>(step));
  return sd;
}

// 2. Resume: read the parameters straight into the model's own tensors.
int restore(torch::nn::Sequential& model, const fs::path& file) {
  ckpt::FileReader reader(file);
  const ckpt::Node* params = reader.root().find("model");
  for (auto& p : model->named_parameters()) {
    const ckpt::Node* leaf = params ? params->find(p.key()) : nullptr;
    if (!leaf || leaf->kind != ckpt::Node::Kind::tensor)
      throw ckpt::MissingKeys("checkpoint lacks model." + p.key());
    at::Tensor target = p.value();
    reader.read_into(*leaf->tensor, target, "model." + p.key());
  }
  return static_cast<int>(reader.root().find("step")->i);
}

}  // namespace

int main(int argc, char** argv) try {
  const fs::path dir = argc > 1 ? argv[1] : "trainer-checkpoints";
  fs::create_directories(dir);
  torch::manual_seed(0);

  // 3. The run that crashes: train, checkpointing every kEvery steps.
  auto model = make_model();
  torch::optim::SGD opt(model->parameters(), 0.05);
  fs::path newest;
  for (int step = 1; step <= kCrashAt; ++step) {
    const float loss = train_step(model, opt, step);
    if (step % kEvery == 0) {
      const auto start = std::chrono::steady_clock::now();
      newest = dir / ("step_" + std::to_string(step));
      fs::create_directories(newest);
      ckpt::write_file(newest / "checkpoint_0.pt", state_of(model, step));
      const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
      std::printf("step %3d  loss %.5f  checkpoint %s (%.1f ms)\n", step, loss, newest.c_str(), took.count());
    }
  }
  std::printf("crash at step %d; newest checkpoint %s\n", kCrashAt, newest.c_str());

  // 4. The reference: a run that never stops (same seeds, same batches).
  torch::manual_seed(0);
  auto reference = make_model();
  torch::optim::SGD ref_opt(reference->parameters(), 0.05);
  for (int step = 1; step <= kSteps; ++step) train_step(reference, ref_opt, step);

  // 5. Restart: a fresh model, different initial weights, restored in place.
  torch::manual_seed(1234);
  auto resumed = make_model();
  torch::optim::SGD res_opt(resumed->parameters(), 0.05);
  const int from = restore(resumed, newest / "checkpoint_0.pt");
  std::printf("resumed from step %d\n", from);
  float loss = 0;
  for (int step = from + 1; step <= kSteps; ++step) loss = train_step(resumed, res_opt, step);

  bool same = true;
  auto a = resumed->named_parameters(), b = reference->named_parameters();
  for (const auto& p : a) same = same && torch::equal(p.value(), b[p.key()]);
  std::printf("final loss %.5f; resumed run %s the uninterrupted run\n", loss,
              same ? "matches" : "DIFFERS FROM");
  return same ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "trainer: %s\n", e.what());
  return 1;
}
