// Small text helpers every layer uses for error messages.
#pragma once

#include <string>
#include <string_view>

namespace ckpt::detail {

/// The first line of `text` (an exception's what(), say): messages quote it so
/// that one failure reads as one line.
inline std::string first_line(std::string_view text) {
  return std::string(text.substr(0, text.find('\n')));
}

}  // namespace ckpt::detail
