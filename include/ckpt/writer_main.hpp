// Building a writer executable of one's own: the C++ form of upstream's
// subprocess_init_fn(*subprocess_init_args) and
// checkpoint_writer_init_fn(**checkpoint_writer_init_args).
//
//   int main(int argc, char** argv) {
//     return ckpt::writer_main(argc, argv, {
//         .init_fn = [](const std::vector<ckpt::Arg>& args) { ... },
//         .writer_factory = [](const ckpt::WriterFactoryArgs& a) {
//           return std::make_shared<ckpt::CheckpointWriter>(a.config, a.rank_info, nullptr,
//                                                           std::make_shared<MyHook>());
//         }});
//   }
//
// and point WriterOptions::executable (or $CKPT_WRITER) at it.
#pragma once

#include <ckpt/barrier.hpp>
#include <ckpt/checkpoint_writer.hpp>
#include <ckpt/types.hpp>

#include <functional>
#include <memory>
#include <vector>

namespace ckpt {

/// What a writer factory gets.
struct WriterFactoryArgs {
  CheckpointWriterConfig config;
  RankInfo rank_info;
  BarrierConfig barrier_config;
  /// WriterOptions::checkpoint_writer_init_args, from the parent.
  Kwargs writer_init_args;
};

struct WriterMainOptions {
  /// Runs first in the child, with WriterOptions::subprocess_init_args.
  /// Throwing fails the start; the message reaches the parent.
  std::function<void(const std::vector<Arg>& init_args)> init_fn{};
  /// Builds the child's writer. Default: CheckpointWriter(config, rank_info,
  /// create_barrier_from_config(barrier_config, rank_info)), no hook.
  std::function<std::shared_ptr<CheckpointWriter>(const WriterFactoryArgs&)> writer_factory{};
};

/// The status a writer child exits with when its trainer died: started with
/// `--parent PID` (as CheckpointProcess starts it), the child watches that
/// process and, as soon as it is gone, abandons whatever it is doing (the
/// write in flight, the barrier), unlinks its named temporaries and exits.
inline constexpr int kOrphanedExitStatus = 70;

/// The writer child's main loop; returns the process's exit status.
int writer_main(int argc, char** argv, const WriterMainOptions& options = {});

}  // namespace ckpt
