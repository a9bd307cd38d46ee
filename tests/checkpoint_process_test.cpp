// CheckpointProcess, ported from upstream's test_checkpoint_process.py (test
// names kept). The writer child is tests/support/test_writer (built on
// ckpt::writer_main): its init arguments pick what its init function does
// ("check-parent" NAME PID is upstream's subprocess_init_fn) and its writer
// factory records what it got in <checkpoint dir>/factory_args.txt.
// Beyond upstream: a dead child is replaced at the next write, a child that
// does not start in time is killed, and the child computes the CRCs into the
// shared arena.
#include <ckpt/checkpoint_process.hpp>

#define BOOST_TEST_MODULE checkpoint_process_test
#include <boost/test/unit_test.hpp>

#include <ckpt/format.hpp>

#include "async/arena.hpp"
#include "async/protocol.hpp"
#include "format/zip.hpp"
#include "support/io_threads.hpp"
#include "support/test_support.hpp"

#include <ATen/ATen.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

namespace asio = boost::asio;
namespace fs = std::filesystem;
namespace json = boost::json;
using namespace std::chrono_literals;
using c10::IValue;
using ckpt::test::identical;
using ckpt::test::TempDir;

using ckpt::test::child_processes;
using ckpt::test::IoThread;
using ckpt::test::kWaitBound;
using ckpt::test::list_of;
using ckpt::test::mentions;
using ckpt::test::process_gone;
using ckpt::test::upstream_state_dict;
using ckpt::test::wait_get;
namespace {

/// The tests' writer executable, beside this test program.
fs::path test_writer() {
  return fs::canonical("/proc/self/exe").parent_path() / "test_writer";
}

std::string read_text(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// Whether process `pid` exists (a zombie counts: it is not reaped yet).
bool exists(int pid) {
  return pid > 0 && ::kill(pid, 0) == 0;
}

/// The parent of process `pid`, from /proc.
int parent_of(int pid) {
  const std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");
  std::istringstream rest(stat.substr(stat.rfind(')') + 1));
  char state = 0;
  int ppid = 0;
  rest >> state >> ppid;
  return ppid;
}

ckpt::CheckpointStagerConfig stager_config() {
  ckpt::CheckpointStagerConfig c;
  c.use_async_staging = true;
  c.use_shared_memory = true;
  c.use_pinned_memory = false;
  c.use_non_blocking_copy = false;
  return c;
}

/// upstream's setUp and _create_checkpoint_process.
struct ProcessFixture {
  IoThread io;
  TempDir temp_dir;
  ckpt::RankInfo rank_info{.global_rank = 0, .global_world_size = 1};
  ckpt::CheckpointWriterConfig writer_config;
  ckpt::StateDict test_state_dict = upstream_state_dict();
  ckpt::DefaultStager stager{stager_config()};

  /// upstream's subprocess_init_args: the name and this process's pid.
  static std::vector<ckpt::Arg> check_parent_args() {
    return {"check-parent", "test-async-checkpointer", ::getpid()};
  }

  std::unique_ptr<ckpt::CheckpointProcess> create_checkpoint_process(
      std::optional<std::vector<ckpt::Arg>> subprocess_init_args_override = std::nullopt,
      std::chrono::milliseconds subprocess_init_timeout = 30s,
      std::chrono::milliseconds subprocess_shutdown_timeout = 60s,
      ckpt::Kwargs checkpoint_writer_init_args = {{"name", "test-checkpointer"}}, int writer_niceness = 10) {
    ckpt::CheckpointProcessConfig config;
    config.writer_niceness = writer_niceness;
    config.subprocess_init_timeout = subprocess_init_timeout;
    config.subprocess_shutdown_timeout = subprocess_shutdown_timeout;
    ckpt::WriterOptions options;
    options.executable = test_writer();
    options.subprocess_init_args = subprocess_init_args_override.value_or(check_parent_args());
    options.checkpoint_writer_init_args = std::move(checkpoint_writer_init_args);
    return std::make_unique<ckpt::CheckpointProcess>(io.executor(), rank_info, config, writer_config,
                                                     ckpt::BarrierConfig{}, std::move(options));
  }

  /// process_creation_future.result()
  static void wait_ready(ckpt::CheckpointProcess& process) {
    auto ready = process.async_wait_ready(asio::use_future);
    wait_get(ready);
  }

  /// checkpoint_process.write(state_dict, path, **kwargs).result(), staging first.
  void write(ckpt::CheckpointProcess& process, const ckpt::StateDict& sd, const fs::path& path,
             const ckpt::Kwargs& kwargs = {}) {
    auto written = process.async_write(stager.stage(sd), path, kwargs, asio::use_future);
    wait_get(written);
  }

  fs::path file_in(const fs::path& dir) const {
    return dir / ckpt::checkpoint_file_name(rank_info.global_rank);
  }
};

/// Closes a process at the end of a scope, as upstream's tests do last.
struct Closer {
  ckpt::CheckpointProcess& process;
  ~Closer() { process.close(); }
};

/// A writer child started by hand, to speak the protocol to it directly.
struct RawChild {
  int pid = -1;
  int fd = -1;

  explicit RawChild(const fs::path& exe) {
    int sv[2];
    BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    const std::string path = exe.string();
    pid = ::fork();
    BOOST_REQUIRE(pid >= 0);
    if (pid == 0) {  // only async-signal-safe calls until exec
      if (sv[1] == 3) {
        ::fcntl(3, F_SETFD, 0);
      } else if (::dup2(sv[1], 3) < 0) {
        ::_exit(127);
      }
      ::execl(path.c_str(), path.c_str(), "--fd", "3", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::close(sv[1]);
    fd = sv[0];
  }
  ~RawChild() {
    if (fd >= 0) ::close(fd);
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }

  json::object ask(const json::object& request) {
    ckpt::detail::protocol::send(fd, request);
    pollfd p{fd, POLLIN, 0};
    BOOST_REQUIRE_MESSAGE(::poll(&p, 1, static_cast<int>(kWaitBound / 1ms)) == 1, "the child did not answer");
    auto reply = ckpt::detail::protocol::receive(fd, nullptr);
    BOOST_REQUIRE_MESSAGE(reply.has_value(), "the child closed the channel");
    return *reply;
  }
  /// Waits for the child to exit; its wait status.
  int reap() {
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid = -1;
    return status;
  }
};

json::object request(const char* type) {
  return {{"v", ckpt::detail::protocol::kVersion}, {"type", type}};
}

}  // namespace

// --- upstream: TestRequestTypes ---------------------------------------------------
// Upstream's request and response types are Python dataclasses; here they are
// the messages of the pipe protocol (lib/checkpoint_process.cpp).

BOOST_AUTO_TEST_SUITE(TestRequestTypes)

BOOST_AUTO_TEST_CASE(request_type_enum) {
  // ping, write_checkpoint and exit are the requests the child knows.
  RawChild child(test_writer());

  const auto pong = child.ask(request("ping"));
  BOOST_CHECK(pong.at("ok").as_bool());
  BOOST_CHECK_NO_THROW(ckpt::detail::protocol::throw_if_error(pong));

  // write_checkpoint is known (it is refused for want of init, not as unknown).
  const auto refused = child.ask(request("write_checkpoint"));
  BOOST_CHECK(!refused.at("ok").as_bool());
  BOOST_CHECK_EQUAL(refused.at("error").as_string(), "write_checkpoint before init");

  const auto unknown = child.ask(request("shutdown"));
  BOOST_CHECK(!unknown.at("ok").as_bool());
  BOOST_CHECK_EQUAL(unknown.at("error").as_string(), "unknown request 'shutdown'");

  const auto bye = child.ask(request("exit"));
  BOOST_CHECK(bye.at("ok").as_bool());
  const int status = child.reap();
  BOOST_CHECK(WIFEXITED(status));
  BOOST_CHECK_EQUAL(WEXITSTATUS(status), 0);
}

BOOST_AUTO_TEST_CASE(worker_request) {
  json::object message = request("ping");
  message["payload"] = json::object{{"test", "data"}};
  const std::string bytes = ckpt::detail::protocol::frame(message);
  BOOST_REQUIRE_GT(bytes.size(), 4u);
  std::uint32_t length = 0;
  for (int i = 0; i < 4; ++i)
    length |= static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  BOOST_CHECK_EQUAL(length, bytes.size() - 4);

  const auto parsed = ckpt::detail::protocol::parse(std::string_view(bytes).substr(4));
  BOOST_CHECK_EQUAL(parsed.at("type").as_string(), "ping");
  BOOST_CHECK_EQUAL(parsed.at("payload").as_object().at("test").as_string(), "data");

  // A message of another protocol version is refused.
  BOOST_CHECK_THROW(ckpt::detail::protocol::parse(R"({"v": 2, "type": "ping"})"), ckpt::WriterProcessError);
  BOOST_CHECK_THROW(ckpt::detail::protocol::parse("not json"), ckpt::WriterProcessError);
}

BOOST_AUTO_TEST_CASE(worker_response) {
  const auto success = ckpt::detail::protocol::ok();
  BOOST_CHECK(success.at("ok").as_bool());
  BOOST_CHECK_EQUAL(success.at("v").as_int64(), ckpt::detail::protocol::kVersion);
  BOOST_CHECK(success.if_contains("error") == nullptr);
  BOOST_CHECK_NO_THROW(ckpt::detail::protocol::throw_if_error(success));

  const auto failure =
      ckpt::detail::protocol::error_reply(std::make_exception_ptr(std::runtime_error("the result")));
  BOOST_CHECK(!failure.at("ok").as_bool());
  BOOST_CHECK_EQUAL(failure.at("error").as_string(), "the result");
  BOOST_CHECK_EXCEPTION(
      ckpt::detail::protocol::throw_if_error(failure), ckpt::WriterProcessError,
      [](const ckpt::WriterProcessError& e) { return std::string(e.what()) == "the result"; });

  // A ckpt error keeps its type across the process boundary.
  const auto timeout = ckpt::detail::protocol::error_reply(std::make_exception_ptr(ckpt::Timeout("late")));
  BOOST_CHECK_EQUAL(timeout.at("kind").as_string(), "Timeout");
  BOOST_CHECK_THROW(ckpt::detail::protocol::throw_if_error(timeout), ckpt::Timeout);
}

BOOST_AUTO_TEST_SUITE_END()

// --- upstream: TestCheckpointProcessConfig ---------------------------------------

BOOST_AUTO_TEST_SUITE(TestCheckpointProcessConfig)

BOOST_AUTO_TEST_CASE(default_options) {
  const ckpt::CheckpointProcessConfig options;
  BOOST_CHECK(options.subprocess_init_timeout == 30s);
  BOOST_CHECK(options.subprocess_shutdown_timeout == 60s);
  BOOST_CHECK(options.write_timeout == 1h);        // ckpt's own
  BOOST_CHECK_EQUAL(options.writer_niceness, 10);  // ckpt's own
}

BOOST_AUTO_TEST_CASE(custom_options) {
  const ckpt::CheckpointProcessConfig options{.subprocess_init_timeout = 10s,
                                              .subprocess_shutdown_timeout = 30s};
  BOOST_CHECK(options.subprocess_init_timeout == 10s);
  BOOST_CHECK(options.subprocess_shutdown_timeout == 30s);
}

BOOST_AUTO_TEST_SUITE_END()

// --- upstream: TestCheckpointProcess ----------------------------------------------

BOOST_FIXTURE_TEST_SUITE(TestCheckpointProcess, ProcessFixture)

BOOST_AUTO_TEST_CASE(checkpoint_process_initialization) {
  auto checkpoint_process = create_checkpoint_process();
  wait_ready(*checkpoint_process);

  const int pid = checkpoint_process->pid();
  BOOST_REQUIRE_GT(pid, 0);
  BOOST_CHECK(exists(pid));  // alive
  BOOST_CHECK_NE(pid, ::getpid());
  BOOST_CHECK_EQUAL(parent_of(pid), ::getpid());

  checkpoint_process->close();

  BOOST_CHECK(process_gone(pid));  // terminated and reaped
  BOOST_CHECK_EQUAL(checkpoint_process->pid(), -1);
}

BOOST_AUTO_TEST_CASE(the_child_runs_at_the_configured_niceness) {
  // A background write must yield the CPU to training: the child's niceness
  // is the parent's plus writer_niceness (capped at 19), and unchanged with 0.
  errno = 0;
  const int own = ::getpriority(PRIO_PROCESS, 0);
  BOOST_REQUIRE_EQUAL(errno, 0);
  for (int increment : {10, 0}) {
    BOOST_TEST_CONTEXT("writer_niceness " << increment) {
      auto checkpoint_process =
          create_checkpoint_process(std::nullopt, 30s, 60s, {{"name", "test-checkpointer"}}, increment);
      wait_ready(*checkpoint_process);
      errno = 0;
      const int child = ::getpriority(PRIO_PROCESS, static_cast<id_t>(checkpoint_process->pid()));
      BOOST_REQUIRE_EQUAL(errno, 0);
      BOOST_CHECK_EQUAL(child, std::min(own + increment, 19));
      // and it still writes
      write(*checkpoint_process, test_state_dict, temp_dir.path());
      BOOST_CHECK(fs::exists(file_in(temp_dir.path())));
      checkpoint_process->close();
    }
  }
}

BOOST_AUTO_TEST_CASE(checkpoint_write_sync_state_dict) {
  auto checkpoint_process = create_checkpoint_process();
  Closer closer{*checkpoint_process};
  wait_ready(*checkpoint_process);
  const fs::path checkpoint_path = temp_dir / "test_checkpoint";

  // Upstream: write() returns a Future. Here the token picks the form.
  std::future<void> future =
      checkpoint_process->async_write(stager.stage(test_state_dict), checkpoint_path, {}, asio::use_future);
  wait_get(future);

  const fs::path expected_file = file_in(checkpoint_path);
  BOOST_REQUIRE(fs::exists(expected_file));

  const auto loaded_state_dict = ckpt::StateDict::from_ivalue(ckpt::read_file(expected_file));
  BOOST_CHECK(loaded_state_dict.contains("model"));
  BOOST_CHECK(loaded_state_dict.contains("optimizer"));
  BOOST_CHECK_EQUAL(loaded_state_dict.at("epoch").toInt(), 5);
  BOOST_CHECK_EQUAL(loaded_state_dict.at("step").toInt(), 1000);
  BOOST_CHECK(identical(loaded_state_dict.sub("model").at("weight").toTensor(),
                        test_state_dict.sub("model").at("weight").toTensor()));
}

BOOST_AUTO_TEST_CASE(checkpoint_write_future_state_dict) {
  // Upstream writes from a Future of the state dict; here the write is chained
  // on the stager's asynchronous result, in a coroutine.
  auto checkpoint_process = create_checkpoint_process();
  Closer closer{*checkpoint_process};
  wait_ready(*checkpoint_process);
  const fs::path checkpoint_path = temp_dir / "test_checkpoint";

  auto write_future = asio::co_spawn(
      io.io,
      [&]() -> asio::awaitable<void> {
        auto staged = co_await stager.async_stage(test_state_dict, asio::use_awaitable);
        co_await checkpoint_process->async_write(std::move(staged), checkpoint_path, {}, asio::use_awaitable);
      },
      asio::use_future);
  wait_get(write_future);

  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));
}

BOOST_AUTO_TEST_CASE(checkpoint_write_with_kwargs) {
  auto checkpoint_process = create_checkpoint_process();
  Closer closer{*checkpoint_process};
  wait_ready(*checkpoint_process);
  const fs::path checkpoint_path = temp_dir / "test_checkpoint";

  write(*checkpoint_process, test_state_dict, checkpoint_path,
        {{"custom_arg", "test_value"}, {"another_arg", 42}});

  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));
  // The kwargs reached the child's writer (its hook records them).
  const std::string args = read_text(checkpoint_path / "factory_args.txt");
  BOOST_TEST_MESSAGE("factory_args.txt:\n" << args);
  BOOST_CHECK(args.find("kwarg custom_arg='test_value'\n") != std::string::npos);
  BOOST_CHECK(args.find("kwarg another_arg=42\n") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(subprocess_initialization_timeout) {
  // An init function that really hangs ("hang" never returns).
  auto checkpoint_process = create_checkpoint_process(std::vector<ckpt::Arg>{"hang"}, 500ms);
  Closer closer{*checkpoint_process};

  auto ready = checkpoint_process->async_wait_ready(asio::use_future);
  BOOST_REQUIRE(ready.wait_for(kWaitBound) == std::future_status::ready);
  BOOST_CHECK_EXCEPTION(ready.get(), ckpt::Timeout, [](const ckpt::Timeout& e) {
    BOOST_TEST_MESSAGE("init timeout: " << e.what());
    return mentions(e, "Timed out");
  });

  // Beyond upstream: the child that did not answer was killed and reaped.
  BOOST_CHECK_EQUAL(checkpoint_process->pid(), -1);
  BOOST_CHECK(child_processes("test_writer").empty());
}

BOOST_AUTO_TEST_CASE(subprocess_initialization_failure) {
  auto checkpoint_process = create_checkpoint_process(std::vector<ckpt::Arg>{"fail"});
  Closer closer{*checkpoint_process};

  auto ready = checkpoint_process->async_wait_ready(asio::use_future);
  BOOST_REQUIRE(ready.wait_for(kWaitBound) == std::future_status::ready);
  BOOST_CHECK_EXCEPTION(ready.get(), ckpt::WriterProcessError, [](const ckpt::WriterProcessError& e) {
    BOOST_TEST_MESSAGE("init failure: " << e.what());
    return mentions(e, "init failed on purpose");
  });
  BOOST_CHECK_EQUAL(checkpoint_process->pid(), -1);
  BOOST_CHECK(child_processes("test_writer").empty());
}

BOOST_AUTO_TEST_CASE(graceful_termination) {
  auto checkpoint_process = create_checkpoint_process();
  wait_ready(*checkpoint_process);
  const int pid = checkpoint_process->pid();
  BOOST_REQUIRE(exists(pid));

  BOOST_CHECK_NO_THROW(checkpoint_process->close());
  BOOST_CHECK(process_gone(pid));
  BOOST_CHECK_EQUAL(checkpoint_process->pid(), -1);
  BOOST_CHECK_NO_THROW(checkpoint_process->close());  // idempotent
}

BOOST_AUTO_TEST_CASE(forced_termination) {
  // Upstream mocks join() to time out. Here the child really does not exit:
  // it is stopped (SIGSTOP), so it cannot read the exit request; close() waits
  // out the shutdown timeout and kills it.
  auto checkpoint_process = create_checkpoint_process(std::nullopt, 30s, 200ms);
  wait_ready(*checkpoint_process);
  const int pid = checkpoint_process->pid();
  BOOST_REQUIRE(exists(pid));

  BOOST_REQUIRE(::kill(pid, SIGSTOP) == 0);
  siginfo_t info{};
  // Wait until it is stopped, leaving its state for the library (WNOWAIT).
  BOOST_REQUIRE(::waitid(P_PID, static_cast<id_t>(pid), &info, WSTOPPED | WNOWAIT) == 0);
  BOOST_CHECK_EQUAL(info.si_code, CLD_STOPPED);

  BOOST_CHECK_NO_THROW(checkpoint_process->close());
  BOOST_CHECK(process_gone(pid));  // killed and reaped
  BOOST_CHECK_EQUAL(checkpoint_process->pid(), -1);
}

BOOST_AUTO_TEST_CASE(communication_error_handling) {
  // Upstream closes the parent's end of the pipe; here the child dies (SIGKILL).
  auto checkpoint_process = create_checkpoint_process();
  Closer closer{*checkpoint_process};
  wait_ready(*checkpoint_process);
  const int old_pid = checkpoint_process->pid();
  BOOST_REQUIRE_GT(old_pid, 0);

  BOOST_REQUIRE(::kill(old_pid, SIGKILL) == 0);
  siginfo_t info{};
  // Wait until it is dead, leaving it for the library to reap (WNOWAIT).
  BOOST_REQUIRE(::waitid(P_PID, static_cast<id_t>(old_pid), &info, WEXITED | WNOWAIT) == 0);

  const fs::path failed_path = temp_dir / "test";
  BOOST_CHECK_EXCEPTION(write(*checkpoint_process, test_state_dict, failed_path), ckpt::WriterProcessError,
                        [&](const ckpt::WriterProcessError& e) {
                          BOOST_TEST_MESSAGE("dead child: " << e.what());
                          return mentions(e, "Child process terminated unexpectedly") &&
                                 mentions(e, "signal 9") && mentions(e, failed_path.string());
                        });
  BOOST_CHECK(!fs::exists(file_in(failed_path)));
  BOOST_CHECK(process_gone(old_pid));  // reaped
  BOOST_CHECK_EQUAL(checkpoint_process->pid(), -1);

  // Beyond upstream: the next write starts a new child and succeeds.
  const fs::path checkpoint_path = temp_dir / "after_the_child_died";
  BOOST_CHECK_NO_THROW(write(*checkpoint_process, test_state_dict, checkpoint_path));
  BOOST_CHECK(fs::exists(file_in(checkpoint_path)));
  const int new_pid = checkpoint_process->pid();
  BOOST_CHECK_GT(new_pid, 0);
  BOOST_CHECK_NE(new_pid, old_pid);
  BOOST_CHECK(exists(new_pid));
  BOOST_CHECK_EQUAL(
      ckpt::StateDict::from_ivalue(ckpt::read_file(file_in(checkpoint_path))).at("epoch").toInt(), 5);
}

BOOST_AUTO_TEST_CASE(shared_memory_tensor_ipc) {
  // Upstream: the child sees the parent's shared-memory tensor, writes 42.0 into
  // it, and the parent reads 42.0 at the same place. Here the child maps the
  // staging arena: it writes the file from the parent's bytes, and the CRCs it
  // computes land in the local headers of the same arena.
  auto checkpoint_process = create_checkpoint_process();
  Closer closer{*checkpoint_process};
  wait_ready(*checkpoint_process);

  const auto shared_tensor = at::randn({100, 100});
  const auto regular_tensor = at::randn({50, 50});
  ckpt::StateDict test_sd;
  test_sd.insert("shared_tensor", shared_tensor);
  test_sd.insert("regular_tensor", regular_tensor);

  const auto staged = stager.stage(test_sd);
  BOOST_REQUIRE(staged.arena != nullptr);
  const auto* image = reinterpret_cast<const unsigned char*>(staged.arena->data());
  const auto crc_field = [&](const ckpt::StagedRecord& r) {
    std::uint32_t v = 0;
    for (int b = 0; b < 4; ++b)
      v |= static_cast<std::uint32_t>(image[r.header_offset + ckpt::detail::kLocalCrcOffset + b]) << (8 * b);
    return v;
  };
  for (const auto& r : staged.records) BOOST_CHECK_EQUAL(crc_field(r), 0u);  // the parent leaves them zero
  const auto staged_shared = staged.state_dict.at("shared_tensor").toTensor();
  const void* staged_data_ptr = staged_shared.data_ptr();

  auto written = checkpoint_process->async_write(staged, temp_dir.path(), {}, asio::use_future);
  wait_get(written);

  const fs::path file = file_in(temp_dir.path());
  const std::string bytes = read_text(file);
  BOOST_REQUIRE_GE(bytes.size(), staged.cd_offset);
  // The file holds exactly the staged image (up to the central directory).
  BOOST_CHECK(std::memcmp(bytes.data(), image, staged.cd_offset) == 0);

  // The child's CRCs are in the parent's arena, the same as in the file.
  ckpt::FileReader reader(file);
  std::map<std::string, std::uint32_t> file_crcs;
  for (const auto& r : reader.records()) file_crcs[r.name] = r.crc32;
  int nonzero = 0;
  for (const auto& r : staged.records) {
    BOOST_TEST_CONTEXT("record " << r.name) {
      BOOST_REQUIRE(file_crcs.count(r.name) == 1);
      BOOST_CHECK_EQUAL(crc_field(r), file_crcs[r.name]);
      if (crc_field(r) != 0) ++nonzero;
    }
  }
  BOOST_CHECK_GT(nonzero, 0);
  BOOST_CHECK_NO_THROW(reader.verify());

  // The staged tensor is still where it was, with its values.
  BOOST_CHECK(staged_shared.data_ptr() == staged_data_ptr);
  BOOST_CHECK(identical(staged_shared, shared_tensor));
  const auto loaded = ckpt::StateDict::from_ivalue(ckpt::read_file(file));
  BOOST_CHECK(identical(loaded.at("shared_tensor").toTensor(), shared_tensor));
  BOOST_CHECK(identical(loaded.at("regular_tensor").toTensor(), regular_tensor));
}

BOOST_AUTO_TEST_CASE(a_write_whose_records_are_not_where_the_image_puts_them_is_refused) {
  // The child writes from shared memory at offsets that come over the socket:
  // it checks them against the zip image before it writes a byte.
  auto checkpoint_process = create_checkpoint_process();
  Closer closer{*checkpoint_process};
  wait_ready(*checkpoint_process);
  ckpt::StateDict test_sd;
  test_sd.insert("weight", at::randn({64, 64}));
  test_sd.insert("bias", at::randn({64}));
  const auto staged = stager.stage(test_sd);
  BOOST_REQUIRE_GE(staged.records.size(), 3u);

  auto moved = staged;
  moved.records[2].data_offset += ckpt::detail::kAlign;
  auto past_end = staged;
  past_end.records[2].size += past_end.cd_offset;
  for (const auto* bad : {&moved, &past_end}) {
    const fs::path dir = temp_dir.path() / (bad == &moved ? "moved" : "past_end");
    fs::create_directories(dir);
    auto written = checkpoint_process->async_write(*bad, dir, {}, asio::use_future);
    try {
      wait_get(written);
      BOOST_ERROR("a write of a misplaced record succeeded");
    } catch (const ckpt::WriterProcessError& e) {
      BOOST_TEST_CONTEXT(e.what()) {
        BOOST_CHECK(mentions(e, staged.records[2].name));
        BOOST_CHECK(mentions(e, "bad image"));
      }
    }
    BOOST_CHECK(fs::is_empty(dir));  // no file, no temporary
  }

  // The child is still there and writes the sound image.
  auto written = checkpoint_process->async_write(staged, temp_dir.path(), {}, asio::use_future);
  wait_get(written);
  const auto loaded = ckpt::StateDict::from_ivalue(ckpt::read_file(file_in(temp_dir.path())));
  BOOST_CHECK(identical(loaded.at("bias").toTensor(), test_sd.at("bias").toTensor()));
}

BOOST_AUTO_TEST_SUITE_END()

// --- a writer executable of one's own (subprocess_init_fn, checkpoint_writer_init_fn)

BOOST_FIXTURE_TEST_SUITE(custom_writer, ProcessFixture)

BOOST_AUTO_TEST_CASE(init_and_writer_factory_run_in_a_child_with_their_arguments) {
  rank_info = {.global_rank = 3, .global_world_size = 8};
  writer_config.write_barrier_timeout = 300s;
  // The init hook gets ("test-async-checkpointer", this pid) and checks it runs
  // in another process whose parent is this one; a failed check fails the start.
  auto checkpoint_process =
      create_checkpoint_process(check_parent_args(), 30s, 60s, {{"purpose", "unit-test"}, {"shards", 2}});
  Closer closer{*checkpoint_process};
  BOOST_REQUIRE_NO_THROW(wait_ready(*checkpoint_process));
  const int pid = checkpoint_process->pid();
  BOOST_CHECK_NE(pid, ::getpid());
  BOOST_CHECK_EQUAL(parent_of(pid), ::getpid());

  const fs::path checkpoint_path = temp_dir / "custom";
  write(*checkpoint_process, test_state_dict, checkpoint_path, {{"step", 1000}});
  BOOST_CHECK(fs::exists(checkpoint_path / "checkpoint_3.pt"));

  // The factory got checkpoint_writer_init_args, rank_info and the config.
  const std::string args = read_text(checkpoint_path / "factory_args.txt");
  BOOST_TEST_MESSAGE("factory_args.txt:\n" << args);
  BOOST_CHECK(args.find("rank 3 of 8\n") != std::string::npos);
  BOOST_CHECK(args.find("write_barrier_timeout_ms 300000\n") != std::string::npos);
  BOOST_CHECK(args.find("writer_arg purpose='unit-test'\n") != std::string::npos);
  BOOST_CHECK(args.find("writer_arg shards=2\n") != std::string::npos);
  BOOST_CHECK(args.find("kwarg step=1000\n") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(init_refuses_an_unexpected_name) {
  auto checkpoint_process =
      create_checkpoint_process(std::vector<ckpt::Arg>{"check-parent", "test-checkpointer", ::getpid()});
  Closer closer{*checkpoint_process};
  auto ready = checkpoint_process->async_wait_ready(asio::use_future);
  BOOST_REQUIRE(ready.wait_for(kWaitBound) == std::future_status::ready);
  BOOST_CHECK_EXCEPTION(ready.get(), ckpt::WriterProcessError, [](const ckpt::WriterProcessError& e) {
    return mentions(e, "Unexpected subprocess name");
  });
}

BOOST_AUTO_TEST_CASE(init_refuses_a_parent_that_is_not_this_process) {
  // pid 1 is not the child's parent: the init hook's third check fails.
  auto checkpoint_process =
      create_checkpoint_process(std::vector<ckpt::Arg>{"check-parent", "test-async-checkpointer", 1});
  Closer closer{*checkpoint_process};
  auto ready = checkpoint_process->async_wait_ready(asio::use_future);
  BOOST_REQUIRE(ready.wait_for(kWaitBound) == std::future_status::ready);
  BOOST_CHECK_EXCEPTION(ready.get(), ckpt::WriterProcessError, [](const ckpt::WriterProcessError& e) {
    return mentions(e, "This was supposed to run as a child to main process");
  });
}

BOOST_AUTO_TEST_CASE(the_default_writer_is_ckpt_writer_beside_the_program) {
  BOOST_CHECK(fs::equivalent(ckpt::default_writer_executable(),
                             fs::canonical("/proc/self/exe").parent_path() / "ckpt-writer"));
  ckpt::CheckpointProcess checkpoint_process(io.executor(), rank_info);  // WriterOptions{}: ckpt-writer
  Closer closer{checkpoint_process};
  wait_ready(checkpoint_process);
  BOOST_CHECK(child_processes("ckpt-writer").size() == 1u);

  const fs::path checkpoint_path = temp_dir / "default_writer";
  write(checkpoint_process, test_state_dict, checkpoint_path);
  BOOST_CHECK_EQUAL(
      ckpt::StateDict::from_ivalue(ckpt::read_file(file_in(checkpoint_path))).at("step").toInt(), 1000);
  BOOST_CHECK(!fs::exists(checkpoint_path / "factory_args.txt"));
}

BOOST_AUTO_TEST_SUITE_END()
