// A writer executable of the tests' own, built on ckpt::writer_main: its init
// function does what its first init argument says, so tests can make a child
// that hangs, fails, or checks where it runs.
//
//   "ok"                      nothing
//   "hang"                    blocks forever (an init that never answers)
//   "fail"                    throws "init failed on purpose"
//   "check-parent" NAME PID   checks NAME is "test-async-checkpointer", that it
//                             runs in another process than PID and that PID is
//                             its parent (upstream's subprocess_init_fn checks)
// Its writer factory records the arguments it got in the environment of the
// writer it builds: a hook writes them into `<checkpoint dir>/factory_args.txt`.
// The hook also obeys two keyword arguments of a save:
//   hold_fifo=PATH   pre_commit waits until one byte can be read from the FIFO
//                    PATH (a write the test holds open, and then releases);
//   throw=KIND       pre_commit throws the ckpt error KIND ("Error", "Mismatch",
//                    ...; "foreign" throws a std::runtime_error).
#include <ckpt/writer_main.hpp>

#include <ckpt/error.hpp>

#include <fmt/format.h>

#include <fstream>
#include <stdexcept>

#include <cerrno>

#include <fcntl.h>
#include <unistd.h>

namespace {

class RecordingHook : public ckpt::WriterHook {
 public:
  explicit RecordingHook(std::string text) : text_(std::move(text)) {}
  void pre_commit(const std::filesystem::path& path, const ckpt::Kwargs& kwargs) override {
    std::ofstream out(path / "factory_args.txt");
    out << text_;
    for (const auto& [k, v] : kwargs) out << "kwarg " << k << "=" << v.repr() << "\n";
    out.close();
    if (const ckpt::Arg* fifo = kwargs.find("hold_fifo")) {
      const int fd = ::open(fifo->as_string().c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) throw std::runtime_error("cannot open " + fifo->as_string());
      char byte;
      while (::read(fd, &byte, 1) < 0 && errno == EINTR) {
      }
      ::close(fd);
    }
    if (const ckpt::Arg* kind = kwargs.find("throw")) {
      const std::string message = fmt::format("pre_commit of {} failed on purpose", path.string());
      if (kind->as_string() == "foreign") throw std::runtime_error(message);
      ckpt::throw_error_kind({kind->as_string(), message});
    }
  }

 private:
  std::string text_;
};

}  // namespace

int main(int argc, char** argv) {
  ckpt::WriterMainOptions options;
  options.init_fn = [](const std::vector<ckpt::Arg>& args) {
    const std::string mode = args.empty() ? "ok" : args[0].as_string();
    if (mode == "hang") {
      for (;;) ::pause();
    }
    if (mode == "fail") throw std::runtime_error("init failed on purpose");
    if (mode == "check-parent") {
      if (args.size() != 3) throw std::runtime_error("check-parent needs NAME and PID");
      if (args[1].as_string() != "test-async-checkpointer")
        throw std::runtime_error("Unexpected subprocess name");
      const auto parent = args[2].as_int();
      if (::getpid() == parent) throw std::runtime_error("This was supposed to run in a different process");
      if (::getppid() != parent)
        throw std::runtime_error("This was supposed to run as a child to main process");
    }
  };
  options.writer_factory = [](const ckpt::WriterFactoryArgs& a) {
    std::string text = fmt::format("rank {} of {}\nwrite_barrier_timeout_ms {}\n", a.rank_info.global_rank,
                                   a.rank_info.global_world_size, a.config.write_barrier_timeout.count());
    for (const auto& [k, v] : a.writer_init_args) text += fmt::format("writer_arg {}={}\n", k, v.repr());
    return std::make_shared<ckpt::CheckpointWriter>(a.config, a.rank_info,
                                                    ckpt::create_barrier_from_config(a.barrier_config),
                                                    std::make_shared<RecordingHook>(text));
  };
  return ckpt::writer_main(argc, argv, options);
}
