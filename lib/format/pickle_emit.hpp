// Emitting pickle opcodes (protocol 2 and later) into a byte string: the
// primitives shared by torch.save's data.pkl (pickle_writer.cpp) and DCP's
// `.metadata` (dcp/torch_metadata.cpp).
#pragma once

#include "format/zip.hpp"

#include <bit>
#include <cstdint>
#include <string>
#include <string_view>

#include <c10/util/ArrayRef.h>

namespace ckpt::detail {

class PickleEmitter {
 public:
  /// PROTO `protocol`; the pickle ends with stop().
  void proto(int protocol) {
    op('\x80');
    out_.push_back(static_cast<char>(protocol));
  }
  void stop() { op('.'); }
  std::string take() { return std::move(out_); }

  void op(char c) { out_.push_back(c); }
  void mark() { op('('); }
  void none() { op('N'); }
  void boolean(bool b) { op(b ? '\x88' : '\x89'); }
  /// GLOBAL "module\nname\n" (valid in every protocol).
  void global(std::string_view module, std::string_view name) {
    op('c');
    out_.append(module);
    op('\n');
    out_.append(name);
    op('\n');
  }
  /// BINUNICODE: UTF-8 text.
  void str(std::string_view s) {
    op('X');
    put32(out_, static_cast<std::uint32_t>(s.size()));
    out_.append(s);
  }
  void integer(std::int64_t v) {
    if (v >= 0 && v < 256) {
      op('K');
      out_.push_back(static_cast<char>(v));
    } else if (v >= 0 && v < 65536) {
      op('M');
      put16(out_, static_cast<std::uint16_t>(v));
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      op('J');
      put32(out_, static_cast<std::uint32_t>(static_cast<std::int32_t>(v)));
    } else {
      // LONG1: minimal little-endian two's complement.
      std::string bytes;
      const auto u = static_cast<std::uint64_t>(v);
      for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>((u >> (8 * i)) & 0xff));
      while (bytes.size() > 1) {
        const auto last = static_cast<unsigned char>(bytes.back());
        const auto prev = static_cast<unsigned char>(bytes[bytes.size() - 2]);
        if ((last == 0x00 && !(prev & 0x80)) || (last == 0xff && (prev & 0x80)))
          bytes.pop_back();
        else
          break;
      }
      op('\x8a');
      out_.push_back(static_cast<char>(bytes.size()));
      out_.append(bytes);
    }
  }
  /// BINFLOAT: a big-endian double.
  void real(double d) {
    op('G');
    const auto u = std::bit_cast<std::uint64_t>(d);
    for (int i = 7; i >= 0; --i) out_.push_back(static_cast<char>((u >> (8 * i)) & 0xff));
  }
  /// Makes a tuple of the last `n` values pushed (after a mark() when n > 3).
  void tuple(std::size_t n) {
    if (n == 0)
      op(')');
    else if (n == 1)
      op('\x85');
    else if (n == 2)
      op('\x86');
    else if (n == 3)
      op('\x87');
    else
      op('t');
  }
  /// Whether tuple(n) needs a mark() before its values.
  static bool tuple_needs_mark(std::size_t n) { return n > 3; }
  void int_tuple(c10::IntArrayRef xs) {
    if (tuple_needs_mark(xs.size())) mark();
    for (auto x : xs) integer(x);
    tuple(xs.size());
  }

 private:
  std::string out_;
};

}  // namespace ckpt::detail
