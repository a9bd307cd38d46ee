// What the training samples share: a small MLP on a synthetic regression task,
// and its model + Adam state as a ckpt::StateDict laid out like Python's
// model.state_dict() and optimizer.state_dict() (so Python can load it too).
#pragma once

#include <ckpt/ckpt.hpp>

#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>

namespace sample {

inline torch::nn::Sequential make_model(std::int64_t width) {
  return torch::nn::Sequential(torch::nn::Linear(16, width), torch::nn::ReLU(),
                               torch::nn::Linear(width, width), torch::nn::ReLU(),
                               torch::nn::Linear(width, 1));
}

/// Step i always sees the same batch, so two runs can be compared exactly.
inline void train_step(torch::nn::Sequential& model, torch::optim::Adam& opt, int step) {
  auto gen = at::detail::createCPUGenerator(static_cast<std::uint64_t>(step));
  auto x = at::randn({64, 16}, gen);
  opt.zero_grad();
  torch::mse_loss(model->forward(x), x.sum(1, true).sin()).backward();
  opt.step();
}

inline std::string state_key(const torch::Tensor& p) {
  return c10::guts::to_string(p.unsafeGetTensorImpl());
}

/// Model parameters by name; Adam state by parameter index (integer keys) and
/// the parameter groups; the step.
inline ckpt::StateDict state_of(torch::nn::Sequential& model, torch::optim::Adam& opt, double lr, int step) {
  ckpt::StateDict params;
  for (const auto& p : model->named_parameters()) params.insert(p.key(), p.value().detach());
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  c10::impl::GenericList indices(c10::IntType::get());
  const auto ps = model->parameters();
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
  group.insert("lr", lr);
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

/// What a resume loads into: the model's own parameter tensors (read in
/// place), and slots for the optimizer state and the step.
inline ckpt::StateDict restore_target(torch::nn::Sequential& model) {
  ckpt::StateDict params;
  for (const auto& p : model->named_parameters()) params.insert(p.key(), p.value().detach());
  ckpt::StateDict target;
  target.insert("model", params);
  target.insert("optimizer", c10::IValue());
  target.insert("step", c10::IValue());
  return target;
}

/// Hands the optimizer state of a loaded `target` to Adam; returns the step.
inline int apply_restored(const ckpt::StateDict& target, torch::nn::Sequential& model,
                          torch::optim::Adam& opt) {
  const auto ps = model->parameters();
  for (const auto& entry : target.sub("optimizer").at("state").toGenericDict()) {
    ckpt::StateDict saved(entry.value().toGenericDict());
    auto s = std::make_unique<torch::optim::AdamParamState>();
    s->step(saved.at("step").toInt());
    s->exp_avg(saved.at("exp_avg").toTensor());
    s->exp_avg_sq(saved.at("exp_avg_sq").toTensor());
    opt.state()[state_key(ps.at(static_cast<std::size_t>(entry.key().toInt())))] = std::move(s);
  }
  return static_cast<int>(target.at("step").toInt());
}

/// Resumes from `path`: parameters read straight into the model's tensors (a
/// strict partial load), the optimizer state taken whole and handed to Adam.
/// Returns the step it was saved at.
inline int restore(ckpt::Checkpointer& checkpointer, const std::filesystem::path& path,
                   torch::nn::Sequential& model, torch::optim::Adam& opt) {
  auto target = restore_target(model);
  checkpointer.load(path, {.state_dict = target, .strict = true});
  return apply_restored(target, model, opt);
}

/// The newest `step_<n>` directory under `dir` holding rank 0's file.
inline std::filesystem::path newest_checkpoint(const std::filesystem::path& dir) {
  std::filesystem::path newest;
  int best = -1;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const auto name = e.path().filename().string();
    if (name.rfind("step_", 0) != 0 || !std::filesystem::exists(e.path() / ckpt::checkpoint_file_name(0)))
      continue;
    const int n = std::atoi(name.c_str() + 5);
    if (n > best) best = n, newest = e.path();
  }
  if (best < 0) throw ckpt::NotFound("no checkpoint under " + dir.string());
  return newest;
}

inline std::filesystem::path temporary_directory(const char* name) {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/" + name + "-XXXXXX";
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  return tmpl;
}

/// Whether two models hold bit-identical parameters.
inline bool same_parameters(torch::nn::Sequential& a, torch::nn::Sequential& b) {
  auto pb = b->named_parameters();
  for (const auto& p : a->named_parameters())
    if (!torch::equal(p.value(), pb[p.key()])) return false;
  return true;
}

/// What each saved step held: parameters by name.
using SavedStates = std::map<int, std::map<std::string, torch::Tensor>>;

/// The restart after a "crash": trains a reference run that never stopped
/// (seed 0), then a fresh model and optimizer (other initial weights) resumed
/// from the newest checkpoint under `dir`; checks the restored state equals
/// what that step saved and that training on ends bit-identical to the
/// reference. Prints one line for each check; returns whether both hold.
inline bool resume_and_check(const std::filesystem::path& dir, const SavedStates& saved, std::int64_t width,
                             double lr, int steps) {
  torch::manual_seed(0);
  auto reference = make_model(width);
  torch::optim::Adam ref_opt(reference->parameters(), torch::optim::AdamOptions(lr));
  for (int step = 1; step <= steps; ++step) train_step(reference, ref_opt, step);

  torch::manual_seed(1234);
  auto resumed = make_model(width);
  torch::optim::Adam res_opt(resumed->parameters(), torch::optim::AdamOptions(lr));
  auto checkpointer = ckpt::make_sync_checkpointer();
  const auto newest = newest_checkpoint(dir);
  const int from = restore(*checkpointer, newest, resumed, res_opt);
  auto it = saved.find(from);
  bool restored_equal = it != saved.end();
  for (const auto& p : resumed->named_parameters())
    restored_equal = restored_equal && torch::equal(p.value(), it->second.at(p.key()));
  std::printf("resumed from %s (step %d): restored state %s the saved one\n", newest.c_str(), from,
              restored_equal ? "equals" : "DIFFERS FROM");

  for (int step = from + 1; step <= steps; ++step) train_step(resumed, res_opt, step);
  const bool same = same_parameters(resumed, reference);
  std::printf("after step %d the resumed run %s the uninterrupted run\n", steps,
              same ? "matches" : "DIFFERS FROM");
  checkpointer->close();
  return restored_equal && same;
}

}  // namespace sample
