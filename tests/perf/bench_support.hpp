// Shared by the benchmarks that run themselves under ckpt-launch: running a
// command for its output, the numbers on rank 0's "RESULT" line, and timing a
// section on every rank.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace ckpt::bench {

/// What `cmd` prints (through /bin/sh); throws when it fails.
inline std::string capture(const std::string& cmd) {
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) throw std::runtime_error("cannot run " + cmd);
  char buf[4096];
  std::string out;
  while (std::fgets(buf, sizeof buf, p)) out += buf;
  if (::pclose(p) != 0) throw std::runtime_error("failed: " + cmd + "\n" + out);
  return out;
}

/// The numbers on rank 0's "RESULT" line.
inline std::vector<double> result_of(const std::string& output) {
  const auto at = output.find("[rank 0] RESULT");
  if (at == std::string::npos) throw std::runtime_error("no result in:\n" + output);
  std::vector<double> out;
  std::size_t pos = at + std::string("[rank 0] RESULT").size();
  const auto end = output.find('\n', pos);
  while (pos < end) {
    std::size_t used = 0;
    out.push_back(std::stod(output.substr(pos, end - pos), &used));
    pos += used;
    while (pos < end && output[pos] == ' ') ++pos;
  }
  return out;
}

/// Seconds the slowest rank spent in `fn`, between two group barriers.
inline double timed(c10d::ProcessGroup& group, const std::function<void()>& fn) {
  group.barrier()->wait();
  const auto start = std::chrono::steady_clock::now();
  fn();
  const double mine = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::vector<at::Tensor> t{at::full({1}, mine, at::kDouble)};
  c10d::AllreduceOptions max;
  max.reduceOp = c10d::ReduceOp::MAX;
  group.allreduce(t, max)->wait();
  return t[0].item<double>();
}

}  // namespace ckpt::bench
