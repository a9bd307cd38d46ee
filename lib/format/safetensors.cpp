// Hugging Face safetensors: the header parser and checks, the reader, the writer.
//
// Reading a file:
//   1. open it (a FIFO or a directory is refused), read the 8-byte header
//      length N and check it against the file's size and kMaxHeaderBytes before
//      anything is allocated;
//   2. parse the N bytes of JSON event by event (Boost.JSON's SAX parser; a
//      DOM parser keeps the last of two equal keys without a word), checking
//      the schema as it goes: a duplicate name, field or metadata key, a value
//      of the wrong type, a shape of more than kMaxRank dimensions is refused
//      at once;
//   3. check every tensor: a dtype the format names, a shape whose element
//      count (and torch's strides) fit in 64 bits, data_offsets that hold
//      exactly dtype × shape bytes, and, sorted by offset, tensors that tile the
//      data section from its first byte to the file's last without gap or
//      overlap;
//   4. only then read tensor bytes: pread straight into fresh tensors or the
//      caller's, or a private mapping of the file.
// An index is parsed the same way (weight_map: name → a shard file inside the
// index's directory); each shard is opened (1–4) when a tensor of it is first
// asked for, and must hold every name the index gives it.
//
// Saving:
//   1. flatten the state dict and check everything (names, dtypes, metadata)
//      before a byte is written;
//   2. split into shards when max_shard_bytes asks for it;
//   3. write each file durably (write_durably: an unnamed temporary file,
//      fsync, link, rename, directory fsync): the padded header, then each
//      tensor's bytes from its memory (through a contiguous CPU copy where it
//      has none);
//   4. for a sharded save, write the index last, the same way;
//   5. remove what an earlier save left at the path in the other form.
#include <ckpt/safetensors.hpp>

#include <ckpt/log.hpp>

#include "core/io.hpp"
#include "core/key_path.hpp"
#include "format/dtypes.hpp"
#include "format/file_writer.hpp"
#include "format/safetensors_writer.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <boost/json/basic_parser_impl.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/string_view.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <limits>
#include <random>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace ckpt::safetensors {
namespace fs = std::filesystem;

namespace {

constexpr std::string_view kMetadataKey = "__metadata__";
/// The metadata key through which a sharded save's index and shards name
/// their save; load strips it from what it returns.
constexpr std::string_view kSaveIdKey = "ckpt_save_id";
constexpr std::string_view kTotalSizeKey = "total_size";
constexpr std::string_view kSuffix = ".safetensors";
constexpr std::string_view kIndexSuffix = ".safetensors.index.json";
/// More dimensions than any real tensor has; bounds what a header can make
/// the parser allocate for one shape.
constexpr std::size_t kMaxRank = 1024;
/// How deep save() follows nested dicts (a dict that holds itself would
/// never end).
constexpr int kMaxNesting = 1000;
constexpr auto kInt64Max = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());

std::string json_quoted(std::string_view s) {
  return boost::json::serialize(boost::json::string_view(s.data(), s.size()));
}

bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t n = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      n = 1;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (s.size() - i <= n) return false;  // cut short
    for (std::size_t k = 1; k <= n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    // Overlong forms, surrogates and code points past U+10FFFF are not UTF-8.
    static constexpr std::uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += n + 1;
  }
  return true;
}

// --- JSON, event by event -------------------------------------------------------

/// What a JSON document says, in order, with keys and strings whole. A schema
/// implements it and throws CorruptCheckpoint at the first thing it refuses.
class JsonEvents {
 public:
  virtual ~JsonEvents() = default;
  virtual void object_begin() = 0;
  virtual void object_end() = 0;
  virtual void array_begin() = 0;
  virtual void array_end() = 0;
  /// A key or a string value, unescaped; valid only during the call.
  virtual void key(std::string_view k) = 0;
  virtual void string(std::string_view s) = 0;
  /// A non-negative integer that fits in 64 bits; `text` as the document has it.
  virtual void count(std::uint64_t n, std::string_view text) = 0;
  /// Any other scalar: `kind` says what it is ("a negative number", "null",
  /// ...), `text` is its JSON text.
  virtual void scalar(const char* kind, std::string_view text) = 0;
};

/// The handler Boost.JSON's basic_parser calls, passing events on whole.
struct JsonGlue {
  static constexpr std::size_t max_object_size = std::size_t(-1);
  static constexpr std::size_t max_array_size = std::size_t(-1);
  static constexpr std::size_t max_key_size = std::size_t(-1);
  static constexpr std::size_t max_string_size = std::size_t(-1);
  using error_code = boost::json::error_code;
  using string_view = boost::json::string_view;

  explicit JsonGlue(JsonEvents* events) : events(events) {}
  JsonEvents* events;
  std::string part;

  bool on_document_begin(error_code&) { return true; }
  bool on_document_end(error_code&) { return true; }
  bool on_object_begin(error_code&) {
    events->object_begin();
    return true;
  }
  bool on_object_end(std::size_t, error_code&) {
    events->object_end();
    return true;
  }
  bool on_array_begin(error_code&) {
    events->array_begin();
    return true;
  }
  bool on_array_end(std::size_t, error_code&) {
    events->array_end();
    return true;
  }
  bool on_key_part(string_view s, std::size_t, error_code&) {
    part.append(s.data(), s.size());
    return true;
  }
  // A key or string the parser hands over whole (the common case) is passed
  // on as a view of its buffer; one that came in parts, from `part`, which
  // keeps its capacity for the next.
  bool on_key(string_view s, std::size_t, error_code&) {
    if (part.empty()) {
      events->key({s.data(), s.size()});
      return true;
    }
    part.append(s.data(), s.size());
    events->key(part);
    part.clear();
    return true;
  }
  bool on_string_part(string_view s, std::size_t, error_code&) {
    part.append(s.data(), s.size());
    return true;
  }
  bool on_string(string_view s, std::size_t, error_code&) {
    if (part.empty()) {
      events->string({s.data(), s.size()});
      return true;
    }
    part.append(s.data(), s.size());
    events->string(part);
    part.clear();
    return true;
  }
  bool on_number_part(string_view, error_code&) { return true; }
  bool on_int64(std::int64_t i, string_view s, error_code&) {
    if (i >= 0)
      events->count(static_cast<std::uint64_t>(i), {s.data(), s.size()});
    else
      events->scalar("a negative number", {s.data(), s.size()});
    return true;
  }
  bool on_uint64(std::uint64_t u, string_view s, error_code&) {
    events->count(u, {s.data(), s.size()});
    return true;
  }
  bool on_double(double, string_view s, error_code&) {
    events->scalar("a number that is not an integer of 64 bits", {s.data(), s.size()});
    return true;
  }
  bool on_bool(bool b, error_code&) {
    events->scalar(b ? "true" : "false", b ? "true" : "false");
    return true;
  }
  bool on_null(error_code&) {
    events->scalar("null", "null");
    return true;
  }
  bool on_comment_part(string_view, error_code&) { return true; }
  bool on_comment(string_view, error_code&) { return true; }
};

/// Parses `text` (strict JSON: valid UTF-8, no comments, no trailing commas,
/// nesting at most 32 deep, nothing after the document but whitespace) into
/// `events`. Throws CorruptCheckpoint "<file>: <what> is not valid JSON ...".
void parse_json(std::string_view text, JsonEvents& events, const fs::path& file, std::string_view what) {
  boost::json::basic_parser<JsonGlue> parser(boost::json::parse_options{}, &events);
  boost::json::error_code ec;
  const std::size_t used = parser.write_some(false, text.data(), text.size(), ec);
  if (ec)
    throw CorruptCheckpoint(fmt::format("{}: {} is not valid JSON ({}, at byte {} of {})", file.string(),
                                        what, ec.message(), used, text.size()));
  // write_some stops at the document's end; only whitespace may follow it.
  const auto rest = text.find_first_not_of(" \t\n\r", used);
  if (rest != std::string_view::npos)
    throw CorruptCheckpoint(
        fmt::format("{}: {} is not valid JSON (more after the document, at byte {} of {})", file.string(),
                    what, rest, text.size()));
}

/// Base of the two schemas: where the parse is, and refusing.
class Schema : public JsonEvents {
 protected:
  Schema(const fs::path& file, std::string_view what) : file_(file), what_(what) {}

  [[noreturn]] void refuse(std::string_view why) const {
    throw CorruptCheckpoint(fmt::format("{}: bad safetensors {}: {}", file_.string(), what_, why));
  }

  /// Skipping a value the schema ignores: how deep inside it the parse is.
  std::size_t skip_depth_ = 0;

  const fs::path& file_;
  std::string_view what_;
};

/// What a tensor's header entry gave beyond its TensorEntry fields, for the
/// checks made once the header is parsed.
struct EntryFields {
  unsigned seen = 0;         // kDtype, kShape, kOffsets
  std::uint8_t offsets = 0;  // how many numbers data_offsets held
};
constexpr unsigned kDtype = 1, kShape = 2, kOffsets = 4;

/// The header: {"__metadata__": {str: str} | null, name: {"dtype": str,
/// "shape": [uint...], "data_offsets": [uint, uint], other fields ignored}}.
/// Parsed straight into TensorEntry values (shape dimensions as the file has
/// them, bit for bit: one past the int64 range is refused by check_entries).
class HeaderSchema final : public Schema {
 public:
  /// `header_bytes`: the header's length, to size the entry list up front.
  HeaderSchema(const fs::path& file, std::uint64_t header_bytes) : Schema(file, "header") {
    // The shortest entry, `"a":{"dtype":"F8","shape":[],"data_offsets":[0,0]},`, is 51 bytes.
    const auto most = static_cast<std::size_t>(std::min<std::uint64_t>(header_bytes / 51 + 1, 4096));
    entries.reserve(most);
    fields.reserve(most);
  }

  std::vector<TensorEntry> entries;
  std::vector<EntryFields> fields;  // one per entry
  std::map<std::string, std::string> metadata;

  void object_begin() override {
    switch (at_) {
      case At::start: at_ = At::top; return;
      case At::top:
        if (key_ == kMetadataKey) {
          at_ = At::metadata;
        } else {
          entries.emplace_back().name = key_;
          fields.emplace_back();
          others_.clear();
          at_ = At::tensor;
        }
        return;
      case At::tensor:
        if (field_) wrong_field("an object");
        start_skip();
        return;
      case At::skip: ++skip_depth_; return;
      default: wrong("an object");
    }
  }
  void object_end() override {
    switch (at_) {
      case At::top: at_ = At::done; return;
      case At::metadata:
      case At::tensor: at_ = At::top; return;
      case At::skip: end_skip(); return;
      default: return;
    }
  }
  void array_begin() override {
    switch (at_) {
      case At::tensor:
        if (field_ == kShape) {
          dims_.clear();
          at_ = At::shape;
        } else if (field_ == kOffsets) {
          at_ = At::offsets;
        } else if (field_) {
          wrong_field("an array");
        } else {
          start_skip();
        }
        return;
      case At::skip: ++skip_depth_; return;
      default: wrong("an array");
    }
  }
  void array_end() override {
    switch (at_) {
      case At::shape:
        // Kept bit for bit; check_entries refuses a dimension past int64.
        entries.back().shape.assign(dims_.begin(), dims_.end());
        at_ = At::tensor;
        return;
      case At::offsets: at_ = At::tensor; return;
      case At::skip: end_skip(); return;
      default: return;
    }
  }
  void key(std::string_view k) override {
    switch (at_) {
      case At::top:
        // A tensor's name given twice is found where the names are indexed
        // (open_shard; a set here would cost an allocation per tensor).
        if (k == kMetadataKey) {
          if (metadata_seen_) refuse(fmt::format("the name {} appears twice", json_quoted(k)));
          metadata_seen_ = true;
        }
        key_.assign(k);
        return;
      case At::metadata:
        if (metadata.count(std::string(k)))
          refuse(fmt::format("__metadata__ has the key {} twice", json_quoted(k)));
        key_.assign(k);
        return;
      case At::tensor: {
        field_ = k == "dtype" ? kDtype : k == "shape" ? kShape : k == "data_offsets" ? kOffsets : 0u;
        EntryFields& f = fields.back();
        const bool again =
            field_ ? (f.seen & field_) != 0 : std::find(others_.begin(), others_.end(), k) != others_.end();
        if (again)
          refuse(fmt::format("tensor {} has the field {} twice", json_quoted(entries.back().name),
                             json_quoted(k)));
        if (field_)
          f.seen |= field_;
        else
          others_.emplace_back(k);
        return;
      }
      default: return;  // inside a skipped value
    }
  }
  void string(std::string_view s) override {
    switch (at_) {
      case At::metadata: metadata.emplace(key_, s); return;
      case At::tensor:
        if (field_ == kDtype)
          entries.back().dtype.assign(s);
        else if (field_)
          wrong_field("a string");
        return;
      case At::skip: return;
      default: wrong("a string");
    }
  }
  void count(std::uint64_t n, std::string_view text) override {
    switch (at_) {
      case At::shape:
        if (dims_.size() == kMaxRank)
          refuse(fmt::format("the shape of {} has more than {} dimensions", json_quoted(entries.back().name),
                             kMaxRank));
        dims_.push_back(n);
        return;
      case At::offsets: {
        EntryFields& f = fields.back();
        if (f.offsets == 2)
          refuse(fmt::format("data_offsets of {} has more than 2 numbers", json_quoted(entries.back().name)));
        (f.offsets == 0 ? entries.back().begin : entries.back().end) = n;
        ++f.offsets;
        return;
      }
      default: other(fmt::format("the number {}", text));
    }
  }
  void scalar(const char* kind, std::string_view text) override {
    if (at_ == At::top && key_ == kMetadataKey && text == "null") return;  // no metadata
    other(text == kind ? std::string(kind) : fmt::format("{} ({})", kind, text));
  }

 private:
  enum class At { start, top, metadata, tensor, shape, offsets, skip, done };

  /// A scalar where the schema may have no place for it.
  void other(const std::string& kind) {
    switch (at_) {
      case At::tensor:
        if (field_) wrong_field(kind);
        return;
      case At::skip: return;
      default: wrong(kind);
    }
  }

  [[noreturn]] void wrong_field(std::string_view kind) const {
    const char* name = field_ == kDtype ? "dtype" : field_ == kShape ? "shape" : "data_offsets";
    const char* want = field_ == kDtype   ? "a string"
                       : field_ == kShape ? "an array of integers"
                                          : "[begin, end]";
    refuse(
        fmt::format("the {} of tensor {} is {}, not {}", name, json_quoted(entries.back().name), kind, want));
  }

  [[noreturn]] void wrong(std::string_view kind) const {
    switch (at_) {
      case At::start: refuse(fmt::format("the header is {}, not a JSON object", kind));
      case At::shape:
      case At::offsets:
        refuse(fmt::format("{} of {} holds {}, not a non-negative integer",
                           at_ == At::shape ? "the shape" : "data_offsets", json_quoted(entries.back().name),
                           kind));
      case At::top:
        if (key_ == kMetadataKey) refuse(fmt::format("__metadata__ is {}, not an object of strings", kind));
        refuse(fmt::format("tensor {} is described by {}, not an object", json_quoted(key_), kind));
      case At::metadata:
        refuse(fmt::format("the __metadata__ value of {} is {}, not a string", json_quoted(key_), kind));
      default: refuse(fmt::format("unexpected {}", kind));
    }
  }

  void start_skip() {
    skip_depth_ = 1;
    at_ = At::skip;
  }
  void end_skip() {
    if (--skip_depth_ == 0) at_ = At::tensor;
  }

  At at_ = At::start;
  std::string key_;
  bool metadata_seen_ = false;
  unsigned field_ = 0;               // the tensor field whose value comes next: kDtype, ...; 0 another
  std::vector<std::uint64_t> dims_;  // the shape being read
  std::vector<std::string> others_;  // other fields of the tensor, seen
};

/// The index: {"metadata": {str: any}, "weight_map": {name: file}, other keys
/// ignored}. Metadata values that are not strings are kept as their JSON
/// text; nested objects and arrays there are left out.
class IndexSchema final : public Schema {
 public:
  explicit IndexSchema(const fs::path& file) : Schema(file, "index") {}

  std::vector<std::pair<std::string, std::string>> weight_map;
  std::map<std::string, std::string> metadata;
  bool has_weight_map = false;

  void object_begin() override {
    switch (at_) {
      case At::start: at_ = At::top; return;
      case At::top:
        if (key_ == "metadata") {
          at_ = At::metadata;
        } else if (key_ == "weight_map") {
          has_weight_map = true;
          at_ = At::weight_map;
        } else {
          start_skip(At::top);
        }
        return;
      case At::metadata: start_skip(At::metadata); return;
      case At::skip: ++skip_depth_; return;
      default: wrong("an object");
    }
  }
  void object_end() override {
    switch (at_) {
      case At::top: at_ = At::done; return;
      case At::metadata:
      case At::weight_map: at_ = At::top; return;
      case At::skip: end_skip(); return;
      default: return;
    }
  }
  void array_begin() override {
    switch (at_) {
      case At::top:
        if (key_ == "metadata" || key_ == "weight_map") wrong("an array");
        start_skip(At::top);
        return;
      case At::metadata: start_skip(At::metadata); return;
      case At::skip: ++skip_depth_; return;
      default: wrong("an array");
    }
  }
  void array_end() override {
    if (at_ == At::skip) end_skip();
  }
  void key(std::string_view k) override {
    switch (at_) {
      case At::top:
        key_.assign(k);
        if (!top_keys_.insert(key_).second) refuse(fmt::format("the key {} appears twice", json_quoted(k)));
        return;
      case At::metadata:
        key_.assign(k);
        if (metadata.count(key_)) refuse(fmt::format("metadata has the key {} twice", json_quoted(k)));
        return;
      case At::weight_map:
        key_.assign(k);
        if (!names_.insert(key_).second) refuse(fmt::format("weight_map names {} twice", json_quoted(k)));
        return;
      default: return;
    }
  }
  void string(std::string_view s) override {
    switch (at_) {
      case At::metadata: metadata.emplace(key_, s); return;
      case At::weight_map: weight_map.emplace_back(key_, s); return;
      case At::top:
        if (key_ == "metadata" || key_ == "weight_map") wrong("a string");
        return;
      case At::skip: return;
      default: wrong("a string");
    }
  }
  void count(std::uint64_t, std::string_view text) override { scalar("a number", text); }
  void scalar(const char* kind, std::string_view text) override {
    switch (at_) {
      case At::metadata: metadata.emplace(key_, std::string(text)); return;
      case At::top:
        if (key_ == "metadata" && text == "null") return;
        if (key_ == "metadata" || key_ == "weight_map") wrong(kind);
        return;
      case At::skip: return;
      default: wrong(kind);
    }
  }

 private:
  enum class At { start, top, metadata, weight_map, skip, done };

  [[noreturn]] void wrong(const char* kind) const {
    switch (at_) {
      case At::start: refuse(fmt::format("the index is {}, not a JSON object", kind));
      case At::top: refuse(fmt::format("{} is {}, not an object", key_, kind));
      case At::weight_map:
        refuse(fmt::format("weight_map maps {} to {}, not to a file name", json_quoted(key_), kind));
      default: refuse(fmt::format("unexpected {}", kind));
    }
  }

  void start_skip(At back) {
    skip_depth_ = 1;
    back_ = back;
    at_ = At::skip;
  }
  void end_skip() {
    if (--skip_depth_ == 0) at_ = back_;
  }

  At at_ = At::start;
  At back_ = At::top;
  std::string key_;
  std::unordered_set<std::string> top_keys_;
  std::unordered_set<std::string> names_;
};

// --- checking a header ----------------------------------------------------------

/// a × b, or nothing when it passes `limit`.
std::optional<std::uint64_t> times(std::uint64_t a, std::uint64_t b, std::uint64_t limit) {
  if (a != 0 && b > limit / a) return std::nullopt;
  return a * b;
}

/// The shape as the file gives it (a dimension past int64 as its unsigned value).
std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out;
  for (std::size_t i = 0; i < shape.size(); ++i)
    fmt::format_to(std::back_inserter(out), "{}{}", i ? ", " : "", static_cast<std::uint64_t>(shape[i]));
  return out;
}

/// Checks the entries of a header (`fields` says what each had) and puts them
/// in the order of their data.
void check_entries(std::vector<TensorEntry>& entries, const std::vector<EntryFields>& fields,
                   const fs::path& file, std::uint64_t data_start, std::uint64_t data_size) {
  const auto refuse = [&](const std::string& why) {
    throw CorruptCheckpoint(fmt::format("{}: bad safetensors header: {}", file.string(), why));
  };
  for (std::size_t i = 0; i < entries.size(); ++i) {
    TensorEntry& e = entries[i];
    const EntryFields& f = fields[i];
    // The quoted name, for a refusal only (quoting every name costs).
    const auto name = [&e] { return json_quoted(e.name); };
    if (!(f.seen & kDtype)) refuse(fmt::format("tensor {} has no dtype", name()));
    if (!(f.seen & kShape)) refuse(fmt::format("tensor {} has no shape", name()));
    if (!(f.seen & kOffsets)) refuse(fmt::format("tensor {} has no data_offsets", name()));
    if (f.offsets != 2)
      refuse(fmt::format("data_offsets of {} has {} numbers, not 2 ([begin, end])", name(), f.offsets));
    const detail::SafetensorsDtype dtype = detail::safetensors_dtype(e.dtype);
    if (dtype.bits == 0)
      refuse(fmt::format("tensor {} has the unknown dtype {}", name(), json_quoted(e.dtype)));

    // The element count, and the product of the sizes with 0 counted as 1
    // (what torch's strides multiply up to), must both fit in an int64.
    std::uint64_t numel = 1, extent = 1;
    for (const std::int64_t dim : e.shape) {
      const auto d = static_cast<std::uint64_t>(dim);
      if (d > kInt64Max)
        refuse(fmt::format("the shape [{}] of {} has a dimension past the int64 range", shape_text(e.shape),
                           name()));
      const auto n = times(numel, d, kInt64Max);
      const auto x = times(extent, std::max<std::uint64_t>(d, 1), kInt64Max);
      if (!n || !x)
        refuse(fmt::format("the shape [{}] of {} overflows: its size does not fit in 64 bits",
                           shape_text(e.shape), name()));
      numel = *n;
      extent = *x;
    }
    const auto bits = times(numel, dtype.bits, std::numeric_limits<std::uint64_t>::max());
    if (!bits)
      refuse(fmt::format("{} {} [{}] overflows: its byte size does not fit in 64 bits", name(), e.dtype,
                         shape_text(e.shape)));
    if (*bits % 8 != 0)
      refuse(fmt::format("{} holds {} elements of {}, not a whole number of bytes", name(), numel, e.dtype));
    const std::uint64_t nbytes = *bits / 8;
    if (e.end < e.begin)
      refuse(fmt::format("data_offsets of {} are [{}, {}]: the end is before the start", name(), e.begin,
                         e.end));
    if (e.end - e.begin != nbytes)
      refuse(fmt::format("{} is {} [{}], {} bytes, but its data_offsets [{}, {}] hold {} bytes", name(),
                         e.dtype, shape_text(e.shape), nbytes, e.begin, e.end, e.end - e.begin));
    e.scalar_type = dtype.dtype;
    e.file_offset = data_start + e.begin;
  }

  // The tensors must tile the data section: sorted by offset, each starts where
  // the one before ends, the first at 0, the last at the end of the file.
  // Sorted through indices (an entry is large to move), then put in that order.
  const auto before = [](const TensorEntry& x, const TensorEntry& y) {
    return x.begin != y.begin ? x.begin < y.begin : x.end < y.end;
  };
  if (!std::is_sorted(entries.begin(), entries.end(), before)) {
    std::vector<std::uint32_t> order(entries.size());
    for (std::uint32_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](std::uint32_t a, std::uint32_t b) { return before(entries[a], entries[b]); });
    std::vector<TensorEntry> by_offset;
    by_offset.reserve(entries.size());
    for (const auto i : order) by_offset.push_back(std::move(entries[i]));
    entries = std::move(by_offset);
  }
  std::uint64_t at = 0;
  const TensorEntry* previous = nullptr;
  for (const auto& e : entries) {
    if (e.end > data_size)
      refuse(fmt::format(
          "the data of {} runs past the end of the file: its data_offsets end at {} but the data section "
          "holds {} bytes (truncated file?)",
          json_quoted(e.name), e.end, data_size));
    if (e.begin < at)
      refuse(fmt::format("the data of {} [{}, {}) overlaps that of {} [{}, {})", json_quoted(e.name), e.begin,
                         e.end, json_quoted(previous->name), previous->begin, previous->end));
    if (e.begin > at)
      refuse(fmt::format("bytes [{}, {}) of the data section belong to no tensor (a gap before {})", at,
                         e.begin, json_quoted(e.name)));
    at = e.end;
    previous = &e;
  }
  if (at != data_size)
    refuse(
        fmt::format("the last {} bytes of the file belong to no tensor (the data section holds {} bytes, "
                    "its tensors {})",
                    data_size - at, data_size, at));
}

// --- files ----------------------------------------------------------------------

/// A private, copy-on-write mapping of a whole file, kept alive by the tensors
/// that point into it: each holds a reference (its DataPtr's context), and so
/// does the shard that made it. Counted in place, so a mapped tensor costs no
/// allocation of its own for it.
class Mapping {
 public:
  /// Maps `size` bytes of `fd`, holding one reference; nullptr and errno when mmap fails.
  static Mapping* make(int fd, std::size_t size) {
    void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (base == MAP_FAILED) return nullptr;
    try {
      return new Mapping(base, size);
    } catch (...) {
      ::munmap(base, size);
      throw;
    }
  }
  char* data() const { return static_cast<char*>(base_); }
  Mapping* hold() {
    refs_.fetch_add(1, std::memory_order_relaxed);
    return this;
  }
  /// Drops a reference; the last one unmaps.
  static void release(void* ctx) {
    auto* m = static_cast<Mapping*>(ctx);
    if (m->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete m;
  }

 private:
  Mapping(void* base, std::size_t size) : base_(base), size_(size) {}
  ~Mapping() { ::munmap(base_, size_); }
  void* base_;
  std::size_t size_;
  std::atomic<std::size_t> refs_{1};
};

/// A shard's own reference to its mapping.
struct MappingRef {
  Mapping* m = nullptr;
  MappingRef() = default;
  MappingRef(MappingRef&& o) noexcept : m(std::exchange(o.m, nullptr)) {}
  MappingRef& operator=(MappingRef&& o) noexcept {
    if (this != &o) {
      if (m) Mapping::release(m);
      m = std::exchange(o.m, nullptr);
    }
    return *this;
  }
  ~MappingRef() {
    if (m) Mapping::release(m);
  }
};

/// One `.safetensors` file: the whole checkpoint, or one shard of an index.
struct Shard {
  fs::path path;
  detail::Fd fd;
  std::uint64_t size = 0;
  bool open = false;
  std::vector<TensorEntry> entries;                      // in the order of their data
  std::unordered_map<std::string, std::size_t> by_name;  // once indexed (Reader::Impl::by_name)
  bool indexed = false;
  std::map<std::string, std::string> metadata;  // without ckpt's save id
  std::optional<std::string> save_id;           // ckpt's save id
  MappingRef mapping;
  /// For a shard: the names the index gives it.
  std::vector<std::string> expected;
};

std::uint64_t le64(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string le64_bytes(std::uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return out;
}

/// `path` without a trailing ".safetensors": what shard and index names grow from.
std::string base_of(const fs::path& path) {
  std::string s = path.string();
  if (s.size() > kSuffix.size() && s.compare(s.size() - kSuffix.size(), kSuffix.size(), kSuffix) == 0)
    s.resize(s.size() - kSuffix.size());
  return s;
}

fs::path index_path_for(const fs::path& path) {
  return base_of(path) + std::string(kIndexSuffix);
}

std::string shard_name(const std::string& stem, std::size_t i, std::size_t n) {
  return fmt::format("{}-{:05d}-of-{:05d}{}", stem, i + 1, n, kSuffix);
}

/// Whether `name` is one of save()'s shard names for `stem`
/// (`<stem>-NNNNN-of-NNNNN.safetensors`).
bool is_shard_name(const std::string& name, const std::string& stem) {
  const auto digits = [&](std::size_t at) {
    if (name.size() < at + 5) return false;
    for (std::size_t i = at; i < at + 5; ++i)
      if (name[i] < '0' || name[i] > '9') return false;
    return true;
  };
  const std::size_t a = stem.size() + 1, b = a + 5 + 4;
  return name.size() == b + 5 + kSuffix.size() && name.compare(0, stem.size(), stem) == 0 &&
         name[stem.size()] == '-' && digits(a) && name.compare(a + 5, 4, "-of-") == 0 && digits(b) &&
         name.compare(b + 5, kSuffix.size(), kSuffix) == 0;
}

/// Opens `file` for reading and returns its size; refuses what is not a
/// regular file. A missing file is NotFound, or, for `shard_of` (an index's
/// path), an incomplete checkpoint.
detail::Fd open_file(const fs::path& file, std::uint64_t& size, const fs::path* shard_of = nullptr) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
  detail::Fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!fd) {
    if (errno == ENOENT && shard_of)
      throw CorruptCheckpoint(
          fmt::format("{}: the shard {} it names does not exist: the checkpoint is incomplete",
                      shard_of->string(), file.string()));
    if (errno == ENOENT) throw NotFound(fmt::format("safetensors file {} does not exist", file.string()));
    detail::throw_errno("open", file, errno);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) detail::throw_errno("stat", file, errno);
  if (S_ISDIR(st.st_mode))
    throw CorruptCheckpoint(fmt::format("{}: is a directory, not a safetensors file", file.string()));
  if (!S_ISREG(st.st_mode)) throw CorruptCheckpoint(fmt::format("{}: is not a regular file", file.string()));
  size = static_cast<std::uint64_t>(st.st_size);
  return fd;
}

/// The whole text of the index `file` (at most kMaxHeaderBytes); its size in `size`.
std::string read_index_text(const fs::path& file, std::uint64_t& size) {
  const detail::Fd fd = open_file(file, size);
  if (size > kMaxHeaderBytes)
    throw CorruptCheckpoint(fmt::format("{}: the index has {} bytes, more than the {} ckpt parses",
                                        file.string(), size, kMaxHeaderBytes));
  std::string text(static_cast<std::size_t>(size), '\0');
  detail::pread_full(fd.get(), text.data(), text.size(), 0, file);
  return text;
}

std::string missing_text(const fs::path& path, const std::vector<std::string>& missing) {
  std::vector<std::string> q;
  q.reserve(missing.size());
  for (const auto& m : missing) q.push_back(fmt::format("'{}'", m));
  return fmt::format("safetensors checkpoint {} is missing keys: [{}]", path.string(), fmt::join(q, ", "));
}

/// A target's or a state dict's leaf: its flattened name and where it lives.
struct Leaf {
  std::string name;
  c10::impl::GenericDict dict;
  c10::IValue key;
  c10::IValue value;
};

void flatten(const c10::impl::GenericDict& dict, const std::string& prefix, std::vector<Leaf>& out,
             int depth) {
  if (depth > kMaxNesting)
    throw Unsupported(
        fmt::format("state dict nested more than {} dicts deep at '{}' (a dict that holds itself?)",
                    kMaxNesting, prefix));
  for (const auto& e : dict) {
    const std::string name = prefix + detail::key_text(e.key());
    if (e.value().isGenericDict())
      flatten(e.value().toGenericDict(), name + ".", out, depth + 1);
    else
      out.push_back(Leaf{name, dict, e.key(), e.value()});
  }
}

}  // namespace

// --- reading ----------------------------------------------------------------------

struct Reader::Impl {
  fs::path path;
  bool index = false;
  std::vector<std::string> names;
  /// For an index: each name's shard (a single file's names are its by_name).
  std::unordered_map<std::string, std::size_t> shard_of;

  bool has(const std::string& name) const {
    return index ? shard_of.count(name) > 0 : by_name(const_cast<Shard&>(shards[0])).count(name) > 0;
  }
  std::vector<Shard> shards;
  std::map<std::string, std::string> metadata;
  std::optional<std::string> save_id;
  std::uint64_t bytes_read = 0;

  [[noreturn]] void corrupt(const fs::path& file, std::string_view what) const {
    throw CorruptCheckpoint(fmt::format("{}: {}", file.string(), what));
  }

  void read(const Shard& s, void* buf, std::size_t n, std::uint64_t offset) {
    detail::pread_full(s.fd.get(), buf, n, offset, s.path);
    bytes_read += n;
  }

  /// Builds `s.by_name` over `entries` (its entries, or those it will take).
  static void index_names(Shard& s, const std::vector<TensorEntry>& entries) {
    s.by_name.clear();
    s.by_name.reserve(entries.size());
    for (std::size_t i = 0; i < entries.size(); ++i) s.by_name.emplace(entries[i].name, i);
    s.indexed = true;
  }
  static const std::unordered_map<std::string, std::size_t>& by_name(Shard& s) {
    if (!s.indexed) index_names(s, s.entries);
    return s.by_name;
  }

  void open_shard(Shard& s, bool shard_of_index) {
    if (s.open) return;
    s.fd = open_file(s.path, s.size, shard_of_index ? &path : nullptr);
    if (s.size < 8)
      corrupt(s.path, fmt::format("the file has {} bytes, too few for a safetensors file (8 bytes of header "
                                  "length come first)",
                                  s.size));
    unsigned char len[8];
    read(s, len, 8, 0);
    const std::uint64_t n = le64(len);
    if (n > kMaxHeaderBytes)
      corrupt(s.path, fmt::format("the header length {} passes the {}-byte bound of the safetensors format "
                                  "(not a safetensors file?)",
                                  n, kMaxHeaderBytes));
    if (n > s.size - 8)
      corrupt(s.path, fmt::format("the header length {} runs past the end of the file ({} bytes; truncated?)",
                                  n, s.size));
    // A header of up to 16 KiB (a model of a few hundred tensors) is read
    // onto the stack: a large heap block would cost more than its parse.
    constexpr std::size_t kOnStack = 16 << 10;
    char small[kOnStack];
    std::unique_ptr<char[]> large;
    char* text = small;
    if (n > kOnStack) {
      large.reset(new char[static_cast<std::size_t>(n)]);
      text = large.get();
    }
    read(s, text, static_cast<std::size_t>(n), 8);
    HeaderSchema header(s.path, n);
    parse_json({text, static_cast<std::size_t>(n)}, header, s.path, "the header");
    std::vector<TensorEntry>& entries = header.entries;
    check_entries(entries, header.fields, s.path, 8 + n, s.size - 8 - n);
    {
      // A name given twice: found by sorting the names (no map is built
      // until a name is looked up).
      std::vector<std::string_view> sorted;
      sorted.reserve(entries.size());
      for (const auto& e : entries) sorted.emplace_back(e.name);
      std::sort(sorted.begin(), sorted.end());
      const auto twice = std::adjacent_find(sorted.begin(), sorted.end());
      if (twice != sorted.end())
        corrupt(s.path, fmt::format("bad safetensors header: the name {} appears twice",
                                    json_quoted(std::string(*twice))));
    }
    std::optional<std::string> id;
    if (auto it = header.metadata.find(std::string(kSaveIdKey)); it != header.metadata.end()) {
      id = it->second;
      header.metadata.erase(it);
    }
    if (shard_of_index) {
      if (save_id && id != save_id)
        corrupt(path, fmt::format("the shard {} belongs to another save ({} {}, the index names {}): the "
                                  "checkpoint is torn (a save over it was interrupted)",
                                  s.path.string(), kSaveIdKey, id ? json_quoted(*id) : "none",
                                  json_quoted(*save_id)));
      index_names(s, entries);
      for (const auto& name : s.expected)
        if (!s.by_name.count(name))
          corrupt(path, fmt::format("its weight_map puts {} in {}, which does not hold it", json_quoted(name),
                                    s.path.string()));
    }
    // Sound: only now does the shard take what was read.
    s.entries = std::move(entries);
    s.metadata = std::move(header.metadata);
    s.save_id = std::move(id);
    s.open = true;
  }

  void open_index() {
    std::uint64_t size = 0;
    const std::string text = read_index_text(path, size);
    bytes_read += size;
    IndexSchema schema(path);
    parse_json(text, schema, path, "the index");
    if (!schema.has_weight_map) corrupt(path, "bad safetensors index: it has no weight_map");
    metadata = std::move(schema.metadata);
    if (auto it = metadata.find(std::string(kSaveIdKey)); it != metadata.end()) {
      save_id = it->second;
      metadata.erase(it);
    }
    const fs::path dir = path.parent_path();
    std::unordered_map<std::string, std::size_t> by_file;
    names.reserve(schema.weight_map.size());
    for (auto& entry : schema.weight_map) {
      std::string& name = entry.first;
      const std::string& file_name = entry.second;
      const fs::path rel(file_name);
      const auto refuse = [&](std::string_view why) {
        corrupt(path, fmt::format("bad safetensors index: weight_map puts {} in {}, {}", json_quoted(name),
                                  json_quoted(file_name), why));
      };
      if (file_name.empty()) refuse("an empty file name");
      if (file_name.find('\0') != std::string::npos) refuse("a name with a NUL character");
      if (rel.is_absolute()) refuse("an absolute path: shards must lie in the index's directory");
      for (const auto& part : rel)
        if (part == "..") refuse("outside the index's directory");
      const std::string key = rel.lexically_normal().string();
      auto [it, fresh] = by_file.emplace(key, shards.size());
      if (fresh) {
        shards.emplace_back();
        shards.back().path = dir / rel;
      }
      shards[it->second].expected.push_back(name);
      shard_of.emplace(name, it->second);
      names.push_back(std::move(name));
    }
  }

  void open(const fs::path& given) {
    path = given;
    if (path.extension() == ".safetensors") {
      // The common case, without a stat first: a file of that name.
      shards.emplace_back();
      shards.back().path = path;
      try {
        open_single();
        return;
      } catch (const NotFound&) {
        shards.clear();  // not there: an index of that name, or nothing
      } catch (const CorruptCheckpoint&) {
        std::error_code dir_ec;
        if (!fs::is_directory(path, dir_ec)) throw;
        shards.clear();  // a directory of that name
      }
    }
    std::error_code ec;
    const auto st = fs::status(path, ec);
    if (fs::is_directory(st)) {
      if (fs::exists(path / "model.safetensors", ec))
        path = path / "model.safetensors";
      else if (fs::exists(path / "model.safetensors.index.json", ec))
        path = path / "model.safetensors.index.json";
      else
        throw NotFound(fmt::format("{} holds neither model.safetensors nor model.safetensors.index.json",
                                   given.string()));
    } else if (!fs::exists(st)) {
      const fs::path idx = index_path_for(path);
      if (path.extension() != ".json" && fs::exists(idx, ec)) path = idx;
    }
    index = path.extension() == ".json";
    if (index) {
      open_index();
      return;
    }
    shards.emplace_back();
    shards.back().path = path;
    open_single();
  }

  void open_single() {
    Shard& s = shards.back();
    open_shard(s, false);
    metadata = s.metadata;
    save_id = s.save_id;
  }

  /// Every name: an index's weight_map order, a file's data order (listed
  /// when first asked for).
  const std::vector<std::string>& all_names() {
    if (!index && names.empty() && !shards.empty() && !shards[0].entries.empty()) {
      names.reserve(shards[0].entries.size());
      for (const auto& e : shards[0].entries) names.push_back(e.name);
    }
    return names;
  }

  std::pair<Shard*, TensorEntry*> find(const std::string& name) {
    if (!index) {
      Shard& s = shards[0];
      const auto& names_of = by_name(s);
      auto e = names_of.find(name);
      if (e == names_of.end()) throw MissingKeys(missing_text(path, {name}));
      return {&s, &s.entries[e->second]};
    }
    auto it = shard_of.find(name);
    if (it == shard_of.end()) throw MissingKeys(missing_text(path, {name}));
    Shard& s = shards[it->second];
    open_shard(s, index);
    return {&s, &s.entries[by_name(s).at(name)]};
  }

  static void check_loadable(const Shard& s, const TensorEntry& e) {
    if (e.scalar_type == c10::ScalarType::Undefined)
      throw Unsupported(fmt::format("{}: tensor '{}' is {}, a dtype this libtorch has no type for",
                                    s.path.string(), e.name, e.dtype));
  }

  static void check_fits(const Shard& s, const TensorEntry& e, const at::Tensor& target,
                         std::string_view key) {
    if (target.sizes() != c10::IntArrayRef(e.shape) || target.scalar_type() != e.scalar_type)
      throw Mismatch(fmt::format("{}: '{}' is {} [{}] ({}) in the file but the target is {} [{}]",
                                 s.path.string(), key, c10::toString(e.scalar_type), fmt::join(e.shape, ", "),
                                 e.dtype, c10::toString(target.scalar_type()),
                                 fmt::join(target.sizes(), ", ")));
  }

  at::Tensor fresh(Shard& s, const TensorEntry& e) {
    check_loadable(s, e);
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.scalar_type));
    const std::uint64_t n = e.end - e.begin;
    if (n > 0) read(s, t.data_ptr(), static_cast<std::size_t>(n), e.file_offset);
    return t;
  }

  at::Tensor mapped(Shard& s, const TensorEntry& e) {
    check_loadable(s, e);
    if (e.end == e.begin) return fresh(s, e);
    if (!s.mapping.m) {
      s.mapping.m = Mapping::make(s.fd.get(), static_cast<std::size_t>(s.size));
      if (!s.mapping.m) detail::throw_errno("mmap", s.path, errno);
    }
    char* data = s.mapping.m->data() + e.file_offset;
    // A tensor's data must be aligned to its element size; a file whose
    // header length is not padded to 8 can put it anywhere: copy it then.
    if (reinterpret_cast<std::uintptr_t>(data) % c10::elementSize(e.scalar_type) != 0) return fresh(s, e);
    // The tensor made directly over a storage whose DataPtr holds the
    // mapping: no std::function context (from_blob's) and no dispatch.
    c10::DataPtr ptr(data, s.mapping.m->hold(), &Mapping::release, c10::Device(c10::kCPU));
    at::Storage storage(at::Storage::use_byte_size_t(), static_cast<std::size_t>(e.end - e.begin),
                        std::move(ptr), nullptr, false);
    auto impl =
        c10::make_intrusive<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                             caffe2::TypeMeta::fromScalarType(e.scalar_type));
    impl->set_sizes_contiguous(e.shape);
    return at::Tensor(std::move(impl));
  }

  void fill(Shard& s, const TensorEntry& e, at::Tensor& target) {
    const std::uint64_t n = e.end - e.begin;
    if (n == 0) return;
    if (target.device().is_cpu() && target.is_contiguous() && !target.is_conj() && !target.is_neg()) {
      read(s, target.data_ptr(), static_cast<std::size_t>(n), e.file_offset);
      return;
    }
    at::Tensor value = fresh(s, e);
    c10::NoGradGuard no_grad;
    try {
      target.copy_(value);
    } catch (const c10::Error& err) {
      throw Mismatch(fmt::format("{}: cannot write '{}' into its target: {}", s.path.string(), e.name,
                                 err.what_without_backtrace()));
    }
  }

  /// The names asked for, each once, in order; those absent are an error when
  /// `strict`, else dropped.
  std::vector<std::string> resolve(const std::vector<std::string>& asked, bool strict) const {
    std::vector<std::string> present, missing;
    std::unordered_set<std::string> seen;
    for (const auto& n : asked) {
      if (!seen.insert(n).second) continue;
      (has(n) ? present : missing).push_back(n);
    }
    if (strict && !missing.empty()) throw MissingKeys(missing_text(path, missing));
    return present;
  }

  StateDict load_names(const LoadOptions& options) {
    if (options.names.empty() && !index) {
      // Everything of one file: its entries in order, each checked first.
      Shard& s = shards[0];
      for (const auto& e : s.entries) check_loadable(s, e);
      StateDict out;
      c10::impl::GenericDict(out.dict()).reserve(static_cast<std::int64_t>(s.entries.size()));
      for (const auto& e : s.entries) out.insert(e.name, options.mmap ? mapped(s, e) : fresh(s, e));
      return out;
    }
    const std::vector<std::string> wanted =
        resolve(options.names.empty() ? all_names() : options.names, options.strict);
    // Every header read and every dtype checked before a byte of data is read.
    std::vector<std::pair<Shard*, const TensorEntry*>> found;
    found.reserve(wanted.size());
    for (const auto& n : wanted) {
      found.push_back(find(n));
      check_loadable(*found.back().first, *found.back().second);
    }
    StateDict out;
    for (const auto& [s, e] : found) out.insert(e->name, options.mmap ? mapped(*s, *e) : fresh(*s, *e));
    return out;
  }

  StateDict load_into(const StateDict& target, const LoadOptions& options) {
    std::vector<Leaf> leaves;
    flatten(target.dict(), "", leaves, 0);
    std::vector<std::string> asked;
    asked.reserve(leaves.size());
    std::unordered_set<std::string> seen;
    for (const auto& l : leaves) {
      if (!seen.insert(l.name).second)
        throw Mismatch(fmt::format("the target has two keys that flatten to '{}'", l.name));
      asked.push_back(l.name);
    }
    const std::vector<std::string> wanted = resolve(asked, options.strict);
    const std::unordered_set<std::string> present(wanted.begin(), wanted.end());
    struct Job {
      const Leaf* leaf;
      Shard* shard;
      const TensorEntry* entry;
      bool in_place;
    };
    std::vector<Job> jobs;
    jobs.reserve(wanted.size());
    for (const auto& l : leaves) {
      if (!present.count(l.name)) continue;
      auto [s, e] = find(l.name);
      check_loadable(*s, *e);
      bool in_place = false;
      if (l.value.isTensor() && l.value.toTensor().defined()) {
        check_fits(*s, *e, l.value.toTensor(), l.name);
        in_place = true;
      } else if (!l.value.isNone() && !l.value.isTensor()) {
        throw Mismatch(fmt::format("{}: '{}' is {} in the target but a tensor in the file", s->path.string(),
                                   l.name, l.value.tagKind()));
      }
      jobs.push_back({&l, s, e, in_place});
    }
    for (const auto& j : jobs) {
      if (j.in_place) {
        at::Tensor t = j.leaf->value.toTensor();
        fill(*j.shard, *j.entry, t);
      } else {
        c10::impl::GenericDict dict = j.leaf->dict;
        dict.insert_or_assign(j.leaf->key,
                              options.mmap ? mapped(*j.shard, *j.entry) : fresh(*j.shard, *j.entry));
      }
    }
    return target;
  }
};

Reader::Reader(const fs::path& path) : impl_(std::make_unique<Impl>()) {
  impl_->open(path);
}
Reader::~Reader() = default;
Reader::Reader(Reader&&) noexcept = default;
Reader& Reader::operator=(Reader&&) noexcept = default;

const fs::path& Reader::path() const {
  return impl_->path;
}
bool Reader::is_index() const {
  return impl_->index;
}
const std::vector<std::string>& Reader::names() const {
  return impl_->all_names();
}
bool Reader::contains(const std::string& name) const {
  return impl_->has(name);
}
const std::map<std::string, std::string>& Reader::metadata() const {
  return impl_->metadata;
}
const std::optional<std::string>& Reader::save_id() const {
  return impl_->save_id;
}
const TensorEntry& Reader::entry(const std::string& name) {
  auto [s, e] = impl_->find(name);
  // Its file is named when first asked for (a copy of the path for every
  // tensor would cost a load more than its parse).
  if (e->file.empty()) e->file = s->path;
  return *e;
}
at::Tensor Reader::tensor(const std::string& name) {
  auto [s, e] = impl_->find(name);
  return impl_->fresh(*s, *e);
}
at::Tensor Reader::mapped(const std::string& name) {
  auto [s, e] = impl_->find(name);
  return impl_->mapped(*s, *e);
}
void Reader::read_into(const std::string& name, at::Tensor& target) {
  auto [s, e] = impl_->find(name);
  Impl::check_loadable(*s, *e);
  if (!target.defined())
    throw Mismatch(fmt::format("{}: the target for '{}' is an undefined tensor", s->path.string(), name));
  Impl::check_fits(*s, *e, target, name);
  impl_->fill(*s, *e, target);
}
StateDict Reader::load(const LoadOptions& options) {
  if (options.state_dict && !options.names.empty())
    throw Error("safetensors load: give either state_dict (a target to fill) or names, not both");
  if (options.state_dict) return impl_->load_into(*options.state_dict, options);
  return impl_->load_names(options);
}
std::uint64_t Reader::bytes_read() const {
  return impl_->bytes_read;
}

StateDict load(const fs::path& path, const LoadOptions& options) {
  Reader reader(path);
  return reader.load(options);
}

std::map<std::string, std::string> metadata(const fs::path& path) {
  return Reader(path).metadata();
}

// --- writing ----------------------------------------------------------------------

namespace {

/// A tensor to write.
struct Item {
  std::string name;
  at::Tensor tensor;
  const char* dtype;
  std::size_t element_size;
  std::uint64_t nbytes;
};

/// `t`'s values as a contiguous CPU tensor (itself when it is one).
at::Tensor contiguous_cpu(at::Tensor t) {
  t = t.detach();
  if (t.is_conj()) t = t.resolve_conj();
  if (t.is_neg()) t = t.resolve_neg();
  if (!t.device().is_cpu()) t = t.to(at::kCPU);
  return t.contiguous();
}

/// Writes one `.safetensors` file of `items` durably.
void write_one(const fs::path& file, const std::vector<const Item*>& items,
               const std::map<std::string, std::string>& metadata, bool fsync,
               const detail::TensorValues& values) {
  std::vector<detail::SafetensorsEntry> entries;
  entries.reserve(items.size());
  for (const Item* item : items)
    entries.push_back({item->name, item->tensor.scalar_type(), item->tensor.sizes().vec()});
  detail::write_safetensors(
      file, entries, metadata,
      [&](std::size_t i) { return values ? values(items[i]->name, items[i]->tensor) : items[i]->tensor; },
      fsync);
}

std::string random_save_id() {
  std::random_device rd;
  std::string id;
  for (int i = 0; i < 4; ++i) id += fmt::format("{:08x}", static_cast<std::uint32_t>(rd()));
  return id;
}

/// The shard files an earlier index at `index` names that save() made for
/// `stem` (and so may remove); empty when there is no sound index there.
std::vector<std::string> earlier_shards(const fs::path& index, const std::string& stem) {
  std::vector<std::string> out;
  try {
    std::error_code ec;
    if (!fs::is_regular_file(index, ec)) return out;
    std::uint64_t size = 0;
    const std::string text = read_index_text(index, size);
    IndexSchema schema(index);
    parse_json(text, schema, index, "the index");
    std::unordered_set<std::string> seen;
    for (const auto& [name, file] : schema.weight_map)
      if (is_shard_name(file, stem) && seen.insert(file).second) out.push_back(file);
  } catch (const Error&) {
    // An unreadable earlier index: nothing of it is removed.
  }
  return out;
}

/// Removes `file` if it is there; a failure is logged, never thrown (the new
/// checkpoint is already durable).
void remove_quietly(const fs::path& file) {
  if (::unlink(file.c_str()) != 0 && errno != ENOENT)
    log(LogLevel::warning, fmt::format("safetensors save: could not remove the stale {}: {}", file.string(),
                                       std::strerror(errno)));
}

}  // namespace

void save(const fs::path& path, const StateDict& state_dict, const SaveOptions& options) {
  detail::save_streaming(path, state_dict, options, nullptr);
}

}  // namespace ckpt::safetensors

namespace ckpt::detail {

void save_streaming(const std::filesystem::path& path, const StateDict& state_dict,
                    const safetensors::SaveOptions& options, const TensorValues& values) {
  using namespace ckpt::safetensors;
  std::vector<Leaf> leaves;
  flatten(state_dict.dict(), "", leaves, 0);

  std::map<std::string, std::string> metadata = options.metadata;
  for (const auto& [k, v] : metadata) {
    if (!valid_utf8(k) || !valid_utf8(v))
      throw Unsupported(fmt::format("safetensors save {}: metadata key {} or its value is not UTF-8 text",
                                    path.string(), json_quoted(k)));
    if (k == kSaveIdKey || (options.max_shard_bytes > 0 && k == kTotalSizeKey))
      throw Unsupported(
          fmt::format("safetensors save {}: the metadata key '{}' is reserved ({})", path.string(), k,
                      k == kSaveIdKey ? "ckpt names a sharded save with it" : "the index's total_size"));
  }

  std::vector<Item> items;
  items.reserve(leaves.size());
  std::unordered_set<std::string> names;
  for (const auto& l : leaves) {
    const auto refuse = [&](const std::string& why) {
      throw Unsupported(fmt::format("safetensors save {}: '{}' {}", path.string(), l.name, why));
    };
    if (!names.insert(l.name).second) refuse("appears twice once nested dicts are flattened with '.'");
    if (l.name == kMetadataKey)
      refuse("is reserved: safetensors keeps the header's metadata under that name");
    if (!valid_utf8(l.name)) refuse("is not UTF-8 text (safetensors names are JSON strings)");
    const c10::IValue& v = l.value;
    if (!v.isTensor()) {
      if (!options.non_tensors_as_metadata || !(v.isInt() || v.isDouble() || v.isBool() || v.isString()))
        refuse(fmt::format("is {}: safetensors holds only tensors{}", v.tagKind(),
                           v.isInt() || v.isDouble() || v.isBool() || v.isString()
                               ? " (SaveOptions::non_tensors_as_metadata keeps it as text in __metadata__)"
                               : ""));
      std::string text = v.isInt()      ? std::to_string(v.toInt())
                         : v.isBool()   ? std::string(v.toBool() ? "true" : "false")
                         : v.isDouble() ? fmt::format("{}", v.toDouble())
                                        : v.toStringRef();
      if (!valid_utf8(text)) refuse("is a string that is not UTF-8 text");
      if (!metadata.emplace(l.name, std::move(text)).second) refuse("is also a key of SaveOptions::metadata");
      continue;
    }
    const at::Tensor& t = v.toTensor();
    if (!t.defined()) refuse("is an undefined tensor");
    if (t.layout() != at::kStrided)
      refuse("is not a dense (strided) tensor, the only kind safetensors holds");
    if (t.is_meta()) refuse("is on the meta device and has no data");
    const char* dtype = detail::safetensors_dtype_name(t.scalar_type());
    if (!dtype)
      refuse(fmt::format("is {}, a dtype safetensors has no name for", c10::toString(t.scalar_type())));
    const std::size_t elem = t.element_size();
    items.push_back(Item{l.name, t, dtype, elem, static_cast<std::uint64_t>(t.numel()) * elem});
  }

  const std::string base = base_of(path);
  const fs::path index = index_path_for(path);
  const fs::path dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  const std::string stem = fs::path(base).filename().string();

  if (options.max_shard_bytes == 0) {
    std::vector<const Item*> all;
    for (const auto& i : items) all.push_back(&i);
    const auto stale = earlier_shards(index, stem);
    write_one(path, std::move(all), metadata, options.fsync, values);
    // The file now wins over an earlier sharded save here (Reader opens a file
    // before an index): the index and its shards are leftovers.
    std::error_code ec;
    if (fs::exists(index, ec)) {
      remove_quietly(index);
      for (const auto& f : stale) remove_quietly(dir / f);
      if (options.fsync) detail::fsync_dir(dir);
    }
    return;
  }

  // Shards in the state dict's order: a new shard starts where the next tensor
  // would take the current one past max_shard_bytes.
  std::vector<std::vector<const Item*>> shards(1);
  std::uint64_t in_shard = 0, total = 0;
  for (const auto& i : items) {
    if (!shards.back().empty() && in_shard + i.nbytes > options.max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(&i);
    in_shard += i.nbytes;
    total += i.nbytes;
  }
  const std::string id = random_save_id();
  std::map<std::string, std::string> shard_metadata = metadata;
  shard_metadata.emplace(kSaveIdKey, id);
  const auto stale = earlier_shards(index, stem);
  std::vector<std::string> files;
  for (std::size_t s = 0; s < shards.size(); ++s) {
    files.push_back(shard_name(stem, s, shards.size()));
    write_one(dir / files.back(), shards[s], shard_metadata, options.fsync, values);
  }

  std::string text = fmt::format("{{\n  \"metadata\": {{\n    \"{}\": {}", kTotalSizeKey, total);
  for (const auto& [k, v] : metadata) text += fmt::format(",\n    {}: {}", json_quoted(k), json_quoted(v));
  text += fmt::format(",\n    \"{}\": \"{}\"\n  }},\n  \"weight_map\": {{", kSaveIdKey, id);
  bool first = true;
  for (std::size_t s = 0; s < shards.size(); ++s)
    for (const Item* i : shards[s]) {
      text += fmt::format("{}\n    {}: {}", first ? "" : ",", json_quoted(i->name), json_quoted(files[s]));
      first = false;
    }
  text += first ? "}\n}\n" : "\n  }\n}\n";
  WriteOptions write;
  write.direct_io = false;
  write.fsync = options.fsync;
  detail::write_durably(index, write, [&](int fd, bool, const fs::path& temp) {
    detail::pwrite_full(fd, text.data(), text.size(), 0, temp);
    return static_cast<std::uint64_t>(text.size());
  });

  // Committed: a single file at `path` (which Reader would open first) and the
  // shards of an earlier index that this one does not name are leftovers.
  const std::unordered_set<std::string> now(files.begin(), files.end());
  std::error_code ec;
  const bool single = fs::is_regular_file(path, ec) && path != index;
  if (single) remove_quietly(path);
  bool removed = single;
  for (const auto& f : stale)
    if (!now.count(f)) {
      remove_quietly(dir / f);
      removed = true;
    }
  if (removed && options.fsync) detail::fsync_dir(dir);
}

std::string json_string(const std::string& s) {
  return safetensors::json_quoted(s);
}

std::vector<std::uint64_t> write_safetensors(const std::filesystem::path& file,
                                             const std::vector<SafetensorsEntry>& entries,
                                             const std::map<std::string, std::string>& metadata,
                                             const std::function<at::Tensor(std::size_t)>& data, bool fsync) {
  using safetensors::json_quoted;
  struct Planned {
    std::size_t index;
    const char* dtype;
    std::size_t element_size;
    std::uint64_t nbytes;
  };
  std::vector<Planned> order;
  order.reserve(entries.size());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    const char* name = safetensors_dtype_name(e.dtype);
    if (!name)
      throw Unsupported(fmt::format("safetensors file {}: '{}' is {}, a dtype safetensors has no name for",
                                    file.string(), e.name, c10::toString(e.dtype)));
    const std::size_t elem = c10::elementSize(e.dtype);
    std::uint64_t n = elem;
    for (const auto d : e.shape) {
      if (d < 0)
        throw Error(fmt::format("safetensors file {}: '{}' has a negative size", file.string(), e.name));
      n *= static_cast<std::uint64_t>(d);
    }
    order.push_back({i, name, elem, n});
  }
  // Largest element first, keeping the given order within a size: every
  // offset stays a multiple of the element size of the tensor there.
  std::stable_sort(order.begin(), order.end(),
                   [](const Planned& a, const Planned& b) { return a.element_size > b.element_size; });
  std::string header = "{";
  const auto add = [&](std::string_view key, const std::string& value) {
    if (header.size() > 1) header += ',';
    header += json_quoted(key);
    header += ':';
    header += value;
  };
  if (!metadata.empty()) {
    std::string m = "{";
    for (const auto& [k, v] : metadata) {
      if (m.size() > 1) m += ',';
      m += json_quoted(k) + ':' + json_quoted(v);
    }
    add(safetensors::kMetadataKey, m + '}');
  }
  std::uint64_t at = 0;
  for (const auto& p : order) {
    add(entries[p.index].name, fmt::format(R"({{"dtype":"{}","shape":[{}],"data_offsets":[{},{}]}})", p.dtype,
                                           fmt::join(entries[p.index].shape, ","), at, at + p.nbytes));
    at += p.nbytes;
  }
  header += '}';
  // Spaces (JSON whitespace) pad the header so that the data starts 8-aligned.
  header.append((8 - header.size() % 8) % 8, ' ');
  const std::string head = safetensors::le64_bytes(header.size()) + header;

  std::vector<std::uint64_t> offsets(entries.size());
  WriteOptions options;
  options.direct_io = false;
  options.fsync = fsync;
  write_durably(file, options, [&](int fd, bool, const std::filesystem::path& temp) {
    pwrite_full(fd, head.data(), head.size(), 0, temp);
    std::uint64_t off = head.size();
    for (const auto& p : order) {
      const auto& e = entries[p.index];
      offsets[p.index] = off;
      at::Tensor t = data(p.index);
      if (!t.defined() || t.scalar_type() != e.dtype || t.sizes().vec() != e.shape)
        throw Mismatch(fmt::format("safetensors file {}: the data given for '{}' is not a {} tensor of [{}]",
                                   file.string(), e.name, c10::toString(e.dtype), fmt::join(e.shape, ", ")));
      if (p.nbytes == 0) continue;
      t = safetensors::contiguous_cpu(std::move(t));
      pwrite_full(fd, t.data_ptr(), static_cast<std::size_t>(p.nbytes), off, temp);
      off += p.nbytes;
    }
    return off;
  });
  return offsets;
}

}  // namespace ckpt::detail
