// Shared by the benchmarks that run themselves under ckpt-launch: running a
// command for its output, and the numbers on rank 0's "RESULT" line.
#pragma once

#include <cstdio>
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

}  // namespace ckpt::bench
