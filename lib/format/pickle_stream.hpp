// The byte stream of a pickle, read with every length checked: what both
// pickle readers (unpickler.hpp for state dicts, py_pickle.hpp for objects)
// take their opcodes and arguments from.
#pragma once

#include <ckpt/error.hpp>

#include <fmt/format.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace ckpt::detail {

class PickleStream {
 public:
  /// `context` starts every error ("<file>: bad pickle in data.pkl").
  PickleStream(std::string_view data, std::string context) : data_(data), context_(std::move(context)) {}

  /// Throws E (a CorruptCheckpoint by default) saying `what` after the context.
  template <class E = CorruptCheckpoint>
  [[noreturn]] void fail(std::string_view what) const {
    throw E(fmt::format("{}: {}", context_, what));
  }
  std::size_t pos() const { return pos_; }

  unsigned char byte() {
    need(1);
    return static_cast<unsigned char>(data_[pos_++]);
  }
  const unsigned char* take(std::size_t n) {
    need(n);
    auto p = reinterpret_cast<const unsigned char*>(data_.data() + pos_);
    pos_ += n;
    return p;
  }
  /// The text up to the next newline (GLOBAL's arguments).
  std::string_view line() {
    auto end = data_.find('\n', pos_);
    if (end == std::string_view::npos) fail("GLOBAL without a newline");
    auto s = data_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return s;
  }
  /// `n` bytes of a string argument.
  std::string_view text(std::uint64_t n) {
    if (n > data_.size() - pos_)
      fail(fmt::format("a string claims {} bytes at offset {} but only {} remain", n, pos_,
                       data_.size() - pos_));
    auto s = data_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  /// LONG1/LONG4's little-endian two's complement integer of `n` bytes.
  std::int64_t long_int(std::uint64_t n) {
    if (n > 8) fail(fmt::format("an integer of {} bytes does not fit 64 bits", n));
    auto p = take(static_cast<std::size_t>(n));
    std::uint64_t u = 0;
    for (std::uint64_t i = 0; i < n; ++i) u |= static_cast<std::uint64_t>(p[i]) << (8 * i);
    if (n > 0 && n < 8 && (p[n - 1] & 0x80)) u |= ~std::uint64_t{0} << (8 * n);  // sign-extend
    return static_cast<std::int64_t>(u);
  }
  /// BINFLOAT's big-endian double.
  double binfloat() {
    auto p = take(8);
    std::uint64_t u = 0;
    for (int i = 0; i < 8; ++i) u = (u << 8) | p[i];
    double d;
    static_assert(sizeof d == sizeof u);
    __builtin_memcpy(&d, &u, sizeof d);
    return d;
  }

 private:
  void need(std::size_t n) const {
    if (data_.size() - pos_ < n)
      fail(fmt::format("needs {} bytes at offset {} but only {} remain (truncated, or no STOP opcode)", n,
                       pos_, data_.size() - pos_));
  }

  std::string_view data_;
  std::size_t pos_ = 0;
  std::string context_;
};

}  // namespace ckpt::detail
