#include <ckpt/log.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace ckpt {
namespace {

std::mutex handler_mutex;
LogHandler handler;

LogLevel level_from_env() {
  const char* v = std::getenv("CKPT_LOG_LEVEL");
  if (!v || !*v) return LogLevel::warning;
  if (auto level = parse_log_level(v)) return *level;
  fmt::print(stderr,
             "ckpt: CKPT_LOG_LEVEL={} is not a level (debug, info, warning, error, off); using warning\n", v);
  return LogLevel::warning;
}

std::atomic<int>& threshold() {
  static std::atomic<int> t{static_cast<int>(level_from_env())};
  return t;
}

}  // namespace

std::optional<LogLevel> parse_log_level(std::string_view name) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower == "debug") return LogLevel::debug;
  if (lower == "info") return LogLevel::info;
  if (lower == "warning" || lower == "warn") return LogLevel::warning;
  if (lower == "error") return LogLevel::error;
  if (lower == "off" || lower == "none") return LogLevel::off;
  return std::nullopt;
}

LogHandler set_log_handler(LogHandler h) {
  std::lock_guard lock(handler_mutex);
  std::swap(handler, h);
  return h;
}

void set_log_level(LogLevel level) {
  threshold().store(static_cast<int>(level));
}

LogLevel log_level() {
  return static_cast<LogLevel>(threshold().load());
}

void log(LogLevel level, std::string_view text) {
  if (level == LogLevel::off || static_cast<int>(level) < threshold().load()) return;
  std::lock_guard lock(handler_mutex);
  if (handler)
    handler(level, text);
  else
    fmt::print(stderr, "ckpt: {}\n", text);
}

}  // namespace ckpt
