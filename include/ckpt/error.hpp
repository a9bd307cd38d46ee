// Typed errors. Every failure ckpt reports is a ckpt::Error (a std::runtime_error)
// whose message names what failed and where: the path, the key, the record.
#pragma once

#include <cstdint>
#include <exception>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>

namespace ckpt {

/// Base of every exception ckpt throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A checkpoint file or directory that does not exist.
class NotFound : public Error {
 public:
  using Error::Error;
};

/// A file that is not a sound checkpoint: truncated, bit-flipped, hostile or of
/// an unsupported format. Loading never executes anything a file says.
class CorruptCheckpoint : public Error {
 public:
  using Error::Error;
};

/// A strict load whose target asks for keys the checkpoint does not hold.
class MissingKeys : public Error {
 public:
  using Error::Error;
};

/// A value that does not fit its target: shape, dtype or kind.
class Mismatch : public Error {
 public:
  using Error::Error;
};

/// An operating-system failure while writing or reading (full disk, EIO, ...).
class IoError : public Error {
 public:
  using Error::Error;
};

/// A value the checkpoint format cannot represent (an unsupported IValue kind).
class Unsupported : public Error {
 public:
  using Error::Error;
};

/// The writer child process failed: it died ("Child process terminated
/// unexpectedly"), could not be started, or reported an error of its own.
class WriterProcessError : public Error {
 public:
  using Error::Error;
};

/// A wait that passed its deadline.
class Timeout : public Error {
 public:
  using Error::Error;
};

/// One rank's failure, as the other ranks learn it: the error's type
/// ("IoError", "Timeout", ... or the C++ type of a foreign exception) and text.
struct RankFailure {
  std::string type;
  std::string message;
  friend bool operator==(const RankFailure&, const RankFailure&) = default;
};

/// A collective operation failed on one or more ranks (upstream's
/// CheckpointException): `failures()` maps every failed rank to its error.
/// Every rank that learns of the failures raises it with the same map.
class CheckpointException : public Error {
 public:
  CheckpointException(const std::string& context, std::map<std::int64_t, RankFailure> failures);
  const std::map<std::int64_t, RankFailure>& failures() const { return failures_; }
  /// What failed ("checkpoint <path> was not committed"), without the ranks.
  const std::string& context() const { return context_; }

 private:
  std::string context_;
  std::map<std::int64_t, RankFailure> failures_;
};

/// The type name and text of `error` (RankFailure's fields): one of ckpt's
/// error kinds ("NotFound", ..., "Error" for ckpt::Error itself), else the C++
/// type of a foreign exception ("std::invalid_argument", "c10::Error", ...).
RankFailure describe_failure(std::exception_ptr error);

/// Whether `type` names one of ckpt's error kinds.
bool is_error_kind(std::string_view type);

/// Throws `failure` as the ckpt exception its kind names, with its message
/// (the receiving side of describe_failure: a kind raised in another process
/// or rank arrives as the same type). CheckpointException, which needs its
/// rank map, and names that are no kind are thrown as Error.
[[noreturn]] void throw_error_kind(const RankFailure& failure);

}  // namespace ckpt
