// A message logged once per process (a fallback noticed on every save).
#pragma once

#include <ckpt/log.hpp>

#include <atomic>
#include <string_view>

namespace ckpt::detail {

/// Logs `text` at `level` the first time `flag` is seen unset.
inline void log_once(std::atomic<bool>& flag, LogLevel level, std::string_view text) {
  if (!flag.exchange(true)) log(level, text);
}

}  // namespace ckpt::detail
