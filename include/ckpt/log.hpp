// Logging: every message the library writes goes through log(), with a level.
// By default messages at or above the level CKPT_LOG_LEVEL names (debug, info,
// warning, error, off; default warning) go to stderr as "ckpt: <text>". A
// program may install its own handler (its logger), which then gets every
// message at or above the level.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <string_view>

namespace ckpt {

enum class LogLevel { debug = 0, info = 1, warning = 2, error = 3, off = 4 };

/// What a handler receives: the message's level and its text (one line, no
/// "ckpt:" prefix, no newline). Handlers may be called from any thread, one
/// call at a time.
using LogHandler = std::function<void(LogLevel level, std::string_view text)>;

/// Replaces the handler (null: back to stderr). Returns the previous one.
LogHandler set_log_handler(LogHandler handler);
/// Sets the threshold (default: CKPT_LOG_LEVEL, else warning).
void set_log_level(LogLevel level);
LogLevel log_level();
/// The level a name denotes ("info", "WARNING", ...), or nullopt.
std::optional<LogLevel> parse_log_level(std::string_view name);

/// Writes `text` at `level` when the threshold allows.
void log(LogLevel level, std::string_view text);

}  // namespace ckpt
