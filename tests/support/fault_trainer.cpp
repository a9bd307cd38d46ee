// A trainer of the fault tests' own: it saves and loads one state through the
// sync or async checkpointer or DCP, as a process of its own, so that the tests
// can kill it (or its writer child) for real, or run it under the fault shim.
//
//   fault_trainer save DIR KIND VALUE MIB [CHECK_DIR...]
//       one save of state(VALUE) to DIR; prints "save ok" or "save error
//       TYPE: MESSAGE" (a ckpt error, on one line), then for each CHECK_DIR
//       what `check` prints of it;
//   fault_trainer check DIR KIND MIB
//       loads DIR (through a fresh reader); prints "check value V committed
//       C" when it holds exactly state(V) (C: 1 when its commit marker says
//       it is whole; always 1 for dcp), "check none" when there is no
//       checkpoint, "check error TYPE: MESSAGE" otherwise;
// Both exit 0 unless something other than a ckpt error went wrong.
//   fault_trainer loop DIR KIND FIRST MIB
//       saves state(FIRST), state(FIRST + 1), ... until killed; before each
//       save it prints "saving V", once an async save is staged "writing V
//       child PID", after the save "saved V";
//   fault_trainer hold DIR MIB FIFO
//       an async save whose child's pre_commit waits on FIFO (the writer is
//       $CKPT_WRITER, the tests' test_writer); prints "child PID" once the
//       save is staged, then waits to be killed.
// KIND: sync, async (a ckpt-writer child; the path is DIR itself) or dcp
// (dcp::save without a process group). state(V): "w", an int32 tensor of MIB
// MiB holding V, V + 1, ...; "step", an int64 tensor {V}.
#include <ckpt/async_checkpointer.hpp>
#include <ckpt/checkpointer.hpp>
#include <ckpt/commit.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/error.hpp>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cstdio>
#include <iostream>
#include <string>

#include <unistd.h>

namespace {

ckpt::StateDict state_of(std::int64_t value, std::int64_t mib) {
  ckpt::StateDict sd;
  const std::int64_t n = mib * (1 << 20) / 4;
  sd.insert("w", at::arange(n, at::kInt).add_(static_cast<std::int32_t>(value)));
  sd.insert("step", at::full({1}, value, at::kLong));
  return sd;
}

/// The V of state(V) that `sd` holds exactly; -1 when it is none.
std::int64_t value_of(const ckpt::StateDict& sd, std::int64_t mib) {
  if (sd.size() != 2 || !sd.contains("w") || !sd.contains("step")) return -1;
  const at::Tensor step = sd.at("step").toTensor();
  if (step.scalar_type() != at::kLong || step.numel() != 1) return -1;
  const std::int64_t v = step.item<std::int64_t>();
  const at::Tensor w = sd.at("w").toTensor();
  return w.scalar_type() == at::kInt && w.equal(state_of(v, mib).at("w").toTensor()) ? v : -1;
}

/// "error TYPE: MESSAGE" of a ckpt error, on one line.
std::string describe(std::exception_ptr error) {
  const ckpt::RankFailure f = ckpt::describe_failure(error);
  std::string message = f.message;
  for (auto nl = message.find('\n'); nl != std::string::npos; nl = message.find('\n'))
    message.replace(nl, 1, " / ");
  return fmt::format("error {}: {}", f.type, message);
}

/// What `dir` holds: "check value V committed C", "check none" or "check error ...".
std::string check(const std::filesystem::path& dir, const std::string& kind, std::int64_t mib) {
  ckpt::StateDict sd;
  try {
    if (kind == "dcp") {
      ckpt::dcp::LoadOptions o;
      o.no_dist = true;
      sd = ckpt::dcp::load_all(dir, o);
    } else {
      sd = ckpt::make_sync_checkpointer({}, ckpt::RankInfo{0, 1})->load(dir);
    }
  } catch (const ckpt::NotFound&) {
    return "check none";
  } catch (const ckpt::Error&) {
    return "check " + describe(std::current_exception());
  }
  const std::int64_t v = value_of(sd, mib);
  if (v < 0) return "check error Mismatch: the checkpoint holds no state the trainer saves";
  const bool committed = kind == "dcp" || ckpt::is_committed(dir);
  return fmt::format("check value {} committed {}", v, committed ? 1 : 0);
}

void print_line(const std::string& line) {
  std::cout << line << std::endl;  // flushed: the test reads it from a pipe
}

void save(const std::string& kind, const std::filesystem::path& dir, const ckpt::StateDict& sd,
          ckpt::Checkpointer* checkpointer) {
  if (kind == "dcp") {
    ckpt::dcp::SaveOptions o;
    o.checkpoint_id = dir;
    o.no_dist = true;
    ckpt::dcp::save(sd, o);
  } else {
    auto futures = checkpointer->save(dir, sd);
    futures.staged.get();
    futures.written.get();
  }
}

std::unique_ptr<ckpt::Checkpointer> make(const std::string& kind) {
  const ckpt::RankInfo alone{0, 1};
  if (kind == "sync") return ckpt::make_sync_checkpointer({}, alone);
  if (kind == "async") return ckpt::make_async_checkpointer({}, alone);
  return nullptr;
}

int run(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: fault_trainer save|check|loop|hold DIR ...\n";
    return 2;
  }
  const std::string command = argv[1];
  const std::filesystem::path dir = argv[2];
  if (command == "hold") {
    const std::int64_t mib = std::stoll(argv[3]);
    auto ck = ckpt::make_async_checkpointer({}, ckpt::RankInfo{0, 1});
    auto futures = ck->save(dir, state_of(1, mib), {{"hold_fifo", std::string(argv[4])}});
    futures.staged.get();
    print_line(fmt::format("child {}", ck->process().pid()));
    for (;;) ::pause();
  }
  const std::string kind = argv[3];
  if (kind != "sync" && kind != "async" && kind != "dcp") {
    std::cerr << "fault_trainer: KIND is sync, async or dcp\n";
    return 2;
  }
  auto checkpointer = make(kind);
  if (command == "save" && argc >= 6) {
    const std::int64_t mib = std::stoll(argv[5]);
    try {
      save(kind, dir, state_of(std::stoll(argv[4]), mib), checkpointer.get());
      if (checkpointer) checkpointer->close();
      print_line("save ok");
    } catch (const ckpt::Error&) {
      print_line("save " + describe(std::current_exception()));
    }
    for (int i = 6; i < argc; ++i) print_line(check(argv[i], kind, mib));
    return 0;
  }
  if (command == "check" && argc == 5) {
    print_line(check(dir, kind, std::stoll(argv[4])));
    return 0;
  }
  if (command == "loop" && argc == 6) {
    const std::int64_t mib = std::stoll(argv[5]);
    for (std::int64_t v = std::stoll(argv[4]);; ++v) {
      const ckpt::StateDict sd = state_of(v, mib);
      print_line(fmt::format("saving {}", v));
      if (kind == "async") {
        auto futures = checkpointer->save(dir, sd);
        futures.staged.get();
        const int child = static_cast<ckpt::AsyncCheckpointer*>(checkpointer.get())->process().pid();
        print_line(fmt::format("writing {} child {}", v, child));
        futures.written.get();
      } else {
        save(kind, dir, sd, checkpointer.get());
      }
      print_line(fmt::format("saved {}", v));
    }
  }
  std::cerr << "fault_trainer: bad arguments\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const ckpt::Error&) {
    print_line(describe(std::current_exception()));
    return 3;
  } catch (const std::exception& e) {
    print_line(fmt::format("error foreign: {}", e.what()));
    return 4;
  }
}
