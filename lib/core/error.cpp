#include <ckpt/error.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <c10/util/Exception.h>

#include <typeinfo>
#include <vector>

namespace ckpt {

namespace {

std::string summary(const std::string& context, const std::map<std::int64_t, RankFailure>& failures) {
  std::vector<std::int64_t> ranks;
  std::string details;
  for (const auto& [rank, f] : failures) {
    ranks.push_back(rank);
    details += fmt::format("\n  rank {}: {}: {}", rank, f.type, f.message);
  }
  return fmt::format("{}: failed on rank{} [{}]{}", context, ranks.size() == 1 ? "" : "s",
                     fmt::join(ranks, ", "), details);
}

}  // namespace

CheckpointException::CheckpointException(const std::string& context,
                                         std::map<std::int64_t, RankFailure> failures)
    : Error(summary(context, failures)), context_(context), failures_(std::move(failures)) {}

namespace {

/// One of ckpt's error kinds: its name on every path that carries a failure
/// (the commit barrier's reports, the writer child's replies, DCP's step
/// failures, the store barriers' verdicts), how to recognise it and how to
/// raise it again.
struct ErrorKind {
  const char* name;
  bool (*is)(const std::exception&);
  void (*raise)(const std::string&);  // throws
};

template <class E>
constexpr ErrorKind kind(const char* name) {
  return {name, [](const std::exception& e) { return dynamic_cast<const E*>(&e) != nullptr; },
          [](const std::string& message) -> void { throw E(message); }};
}

// Most derived first: the first match names an exception. CheckpointException
// is recognised here but raised only with its rank map (see its users).
const ErrorKind kKinds[] = {
    {"CheckpointException",
     [](const std::exception& e) { return dynamic_cast<const CheckpointException*>(&e) != nullptr; },
     [](const std::string& message) -> void { throw Error(message); }},
    kind<NotFound>("NotFound"),
    kind<CorruptCheckpoint>("CorruptCheckpoint"),
    kind<MissingKeys>("MissingKeys"),
    kind<Mismatch>("Mismatch"),
    kind<IoError>("IoError"),
    kind<Unsupported>("Unsupported"),
    kind<WriterProcessError>("WriterProcessError"),
    kind<Timeout>("Timeout"),
    kind<Error>("Error"),
};

}  // namespace

bool is_error_kind(std::string_view type) {
  for (const auto& k : kKinds)
    if (type == k.name) return true;
  return false;
}

void throw_error_kind(const RankFailure& failure) {
  for (const auto& k : kKinds)
    if (failure.type == k.name) k.raise(failure.message);
  throw Error(failure.message);
}

RankFailure describe_failure(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const c10::Error& e) {
    return {"c10::Error", e.what_without_backtrace()};
  } catch (const std::exception& e) {
    for (const auto& k : kKinds)
      if (k.is(e)) return {k.name, e.what()};
    if (dynamic_cast<const std::invalid_argument*>(&e)) return {"std::invalid_argument", e.what()};
    if (dynamic_cast<const std::logic_error*>(&e)) return {"std::logic_error", e.what()};
    if (dynamic_cast<const std::runtime_error*>(&e)) return {"std::runtime_error", e.what()};
    return {typeid(e).name(), e.what()};
  } catch (...) {
    return {"unknown", "an exception of unknown type"};
  }
}

}  // namespace ckpt
