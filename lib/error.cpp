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

RankFailure describe_failure(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const CheckpointException& e) {
    return {"CheckpointException", e.what()};
  } catch (const NotFound& e) {
    return {"NotFound", e.what()};
  } catch (const CorruptCheckpoint& e) {
    return {"CorruptCheckpoint", e.what()};
  } catch (const MissingKeys& e) {
    return {"MissingKeys", e.what()};
  } catch (const Mismatch& e) {
    return {"Mismatch", e.what()};
  } catch (const IoError& e) {
    return {"IoError", e.what()};
  } catch (const Unsupported& e) {
    return {"Unsupported", e.what()};
  } catch (const WriterProcessError& e) {
    return {"WriterProcessError", e.what()};
  } catch (const Timeout& e) {
    return {"Timeout", e.what()};
  } catch (const Error& e) {
    return {"Error", e.what()};
  } catch (const c10::Error& e) {
    return {"c10::Error", e.what_without_backtrace()};
  } catch (const std::invalid_argument& e) {
    return {"std::invalid_argument", e.what()};
  } catch (const std::logic_error& e) {
    return {"std::logic_error", e.what()};
  } catch (const std::runtime_error& e) {
    return {"std::runtime_error", e.what()};
  } catch (const std::exception& e) {
    return {typeid(e).name(), e.what()};
  } catch (...) {
    return {"unknown", "an exception of unknown type"};
  }
}

}  // namespace ckpt
