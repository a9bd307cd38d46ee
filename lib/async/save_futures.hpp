// The blocking form of an asynchronous save: a completion handler that keeps
// upstream's pair of futures, {staged, written}.
#pragma once

#include <ckpt/checkpointer.hpp>

#include <exception>
#include <future>
#include <memory>

namespace ckpt::detail {

/// Pass it to an async_save: `staged` completes with the save (its error
/// too), `written` with the PendingWrite it hands back (a staging error
/// fails both). `Pending`: PendingWrite (a parameter, so that this header
/// need not include the checkpointer's, which includes it).
template <class Pending>
class SaveFuturesHandler {
 public:
  SaveFutures futures() { return {staged_->get_future(), written_->get_future()}; }

  void operator()(std::exception_ptr e, Pending w) const {
    if (e) {
      staged_->set_exception(e);
      written_->set_exception(e);
      return;
    }
    staged_->set_value();
    w.async_wait([written = written_](std::exception_ptr we) {
      if (we)
        written->set_exception(we);
      else
        written->set_value();
    });
  }

 private:
  std::shared_ptr<std::promise<void>> staged_ = std::make_shared<std::promise<void>>();
  std::shared_ptr<std::promise<void>> written_ = std::make_shared<std::promise<void>>();
};

}  // namespace ckpt::detail
