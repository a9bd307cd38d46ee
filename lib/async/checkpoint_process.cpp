// The parent's side of the writer child.
//
// The protocol, over a Unix socket pair (the child's end is its fd 3, so that
// the staging arena's memfd can travel with a request as SCM_RIGHTS). Every
// message is a frame: a 4-byte little-endian length, then a JSON object that
// carries "v": 1 (the protocol version). Every request is answered by
// {"ok": true} or {"ok": false, "kind": <ckpt error type>, "error": <text>}.
//   1. The parent creates the socket pair and starts the writer executable
//      (Boost.Process v2) with `--fd 3 --parent <its pid>` (the child watches
//      its trainer and exits when it dies: writer_main.hpp).
//   2. init: {rank, world_size, write_barrier_timeout_ms, barrier_type,
//      barrier_args, init_args, writer_args}. The child runs its init function
//      with init_args, then builds its writer with its factory.
//   3. ping: the child answers; steps 1–3 must end within
//      subprocess_init_timeout, else the child is killed (Timeout, "Timed out").
//   4. write_checkpoint: {path, arena_size, cd_offset, records[{name,
//      header_offset, data_offset, size}], kwargs, sequence, round}, with the arena's
//      memfd attached. The child maps the arena (kept while the memfd is the
//      same), computes the CRCs, patches the headers, writes the file durably,
//      and runs pre_commit, the barrier (round `round`, `<path>#<n>` with n
//      the parent's count of writes to that path, so that a replacement child
//      meets the other ranks in the right round and a rank that skipped a
//      save puts nothing out of step; `sequence`, the parent's count of
//      writes, for barriers that count), the marker, post_commit. With a
//      tcp_store barrier, rank 0's parent hosts the barrier's store (it
//      outlives the child) and every child only connects. One write at a time. Errors come back
//      typed; a CheckpointException with its rank → error map.
//   4b. write_archives: {file, arena_size, direct, fsync, archives[{offset,
//      cd_offset, records} or {offset, raw_size}]}, with the arena's memfd
//      attached: a DCP data file (dcp::AsyncSaver). The child checks that every
//      archive lies within the arena, aligned, and is placed as staging places
//      it, then writes them one after another at 4096-byte boundaries (CRCs
//      computed and patched, central directories appended), durably: a
//      temporary file, fsync, rename, directory fsync. No hooks, no barrier:
//      the DCP commit is the coordinator's `.metadata`.
//   5. exit: the child answers and exits; after subprocess_shutdown_timeout it
//      is killed. The parent always reaps it.
// A child that dies shows as the end of the stream: the pending request fails
// with "Child process terminated unexpectedly", its exit status or signal and
// the path; the next write starts a new child.
#define BOOST_PROCESS_USE_STD_FS 1
#include <ckpt/checkpoint_process.hpp>

#include "async/arena.hpp"
#include "async/blocking.hpp"
#include "async/event.hpp"
#include "async/protocol.hpp"
#include "format/file_writer.hpp"

#include <ckpt/tcp_store_barrier.hpp>

#include <fmt/format.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
// Process v2 in Boost 1.81 names boost::optional without including it when it
// is told to use std::filesystem.
#include <boost/optional.hpp>
#include <boost/process/v2/process.hpp>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <future>
#include <limits>
#include <map>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

namespace asio = boost::asio;
namespace bp2 = boost::process::v2;
namespace json = boost::json;
using namespace boost::asio::experimental::awaitable_operators;

namespace ckpt {

std::filesystem::path default_writer_executable() {
  if (const char* env = std::getenv("CKPT_WRITER"); env && *env) return env;
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const auto beside = self.parent_path() / "ckpt-writer";
    if (std::filesystem::exists(beside)) return beside;
  }
  return std::filesystem::path(CKPT_INSTALL_BINDIR) / "ckpt-writer";
}

namespace {

/// Hands `fd` to the child as `target` (Boost.Process v2's own bind_fd is
/// broken in 1.81): whitelisted so the launcher does not close it, dup2'd in
/// the child before exec.
struct PassFd {
  int fd;
  int target;
  bp2::error_code on_setup(bp2::posix::default_launcher& launcher, const std::filesystem::path&,
                           const char* const*) {
    launcher.fd_whitelist.push_back(target);
    return {};
  }
  bp2::error_code on_exec_setup(bp2::posix::default_launcher&, const std::filesystem::path&,
                                const char* const*) {
    if (fd == target) {
      const int flags = ::fcntl(fd, F_GETFD);
      if (flags < 0 || ::fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC) != 0) return {errno, bp2::system_category()};
    } else if (::dup2(fd, target) == -1) {
      return {errno, bp2::system_category()};
    }
    return {};
  }
};

/// Lowers the child's scheduling priority by `increment` before exec.
struct Niceness {
  int increment;
  bp2::error_code on_exec_setup(bp2::posix::default_launcher&, const std::filesystem::path&,
                                const char* const*) {
    if (increment == 0) return {};
    errno = 0;
    if (::nice(increment) == -1 && errno != 0) return {errno, bp2::system_category()};
    return {};
  }
};

std::string describe_status(int status) {
  if (WIFSIGNALED(status))
    return fmt::format("killed by signal {} ({})", WTERMSIG(status), ::strsignal(WTERMSIG(status)));
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  return "stopped";
}

}  // namespace

struct CheckpointProcess::Impl : std::enable_shared_from_this<Impl> {
  asio::strand<asio::any_io_executor> strand;
  RankInfo rank_info;
  CheckpointProcessConfig config;
  std::int64_t writes_asked = 0;                     // on the strand
  std::map<std::string, std::int64_t> rounds_asked;  // writes asked per path, on the strand
  // Rank 0 of a tcp_store barrier: the store, hosted here so that it outlives
  // the writer child (whose barrier only connects: host_store = false).
  std::unique_ptr<TCPStoreBarrierHost> store_host;
  CheckpointWriterConfig writer_config;
  BarrierConfig barrier_config;
  WriterOptions options;

  // Owned by the strand: every coroutine below runs there, and the public
  // blocking calls post to it. `pid_seen` mirrors `pid` for pid() and for
  // close() when the executor no longer runs.
  std::unique_ptr<asio::local::stream_protocol::socket> socket;
  int pid = -1;
  bool closed = false;
  bool writing = false;
  std::shared_ptr<detail::Event> ready;  // the current child's start
  std::atomic<int> pid_seen{-1};
  std::atomic<bool> close_started{false};

  Impl(asio::any_io_executor ex) : strand(asio::make_strand(ex)) {}

  std::filesystem::path executable() const {
    return options.executable.empty() ? default_writer_executable() : options.executable;
  }

  void set_pid(int p) {
    pid = p;
    pid_seen = p;
  }

  /// Kills the child (if any) and reaps it; returns how it ended.
  std::string kill_and_reap() {
    const int p = pid;
    set_pid(-1);
    if (socket) {
      boost::system::error_code ignored;
      socket->close(ignored);
    }
    if (p <= 0) return "not running";
    ::kill(p, SIGKILL);
    int status = 0;
    while (::waitpid(p, &status, 0) < 0 && errno == EINTR) {
    }
    return describe_status(status);
  }

  /// Waits until the child exits, at most `timeout`, without blocking the
  /// strand: its pidfd becomes readable when it exits. Reaps it then and says
  /// how it ended; nullopt when it is still running at the deadline.
  asio::awaitable<std::optional<std::string>> await_exit(std::chrono::milliseconds timeout) {
    const int p = pid;
    if (p <= 0) co_return "not running";
    const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, p, 0));
    if (pidfd >= 0) {
      asio::posix::stream_descriptor exited(strand, pidfd);
      asio::steady_timer timer(strand, timeout);
      co_await (
          exited.async_wait(asio::posix::stream_descriptor::wait_read, asio::as_tuple(asio::use_awaitable)) ||
          timer.async_wait(asio::as_tuple(asio::use_awaitable)));
    } else {
      // A kernel without pidfds (before 5.3): check at the deadline only.
      asio::steady_timer timer(strand, timeout);
      co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
    }
    if (auto how = try_reap(p)) co_return how;
    co_return std::nullopt;
  }

  /// Reaps the child `p` if it has exited; how it ended.
  std::optional<std::string> try_reap(int p) {
    int status = 0;
    int r;
    while ((r = ::waitpid(p, &status, WNOHANG)) < 0 && errno == EINTR) {
    }
    if (r == p || (r < 0 && errno == ECHILD)) {
      set_pid(-1);
      return r == p ? describe_status(status) : std::string("already reaped");
    }
    return std::nullopt;
  }

  /// After the stream ended: the child is exiting or dead. Waits for it (up to
  /// two seconds, then kills it) and says how it ended.
  asio::awaitable<std::string> reap_after_eof() {
    if (auto how = co_await await_exit(std::chrono::seconds(2))) co_return *how;
    co_return kill_and_reap();
  }

  /// Sends one frame, `pass_fd` attached, waiting for the socket to take it
  /// without blocking the strand. Returns why it could not (the child is
  /// gone), or nullopt once sent. It does not throw: awaitable `||` waits for
  /// the first operation to *succeed*, so a throwing send would be ignored
  /// until the timer beside it fired.
  asio::awaitable<std::optional<std::string>> send(const json::object& message, int pass_fd) {
    const std::string bytes = detail::protocol::frame(message);
    std::size_t sent = 0;
    try {
      while (sent < bytes.size()) {
        const std::ptrdiff_t n = detail::protocol::send_some(socket->native_handle(), bytes.data() + sent,
                                                             bytes.size() - sent, sent == 0 ? pass_fd : -1);
        if (n < 0) {
          auto [ec] =
              co_await socket->async_wait(asio::socket_base::wait_write, asio::as_tuple(asio::use_awaitable));
          if (ec) co_return fmt::format("cannot send to the writer process: {}", ec.message());
          continue;
        }
        sent += static_cast<std::size_t>(n);
      }
    } catch (const std::exception& e) {
      co_return std::string(e.what());
    }
    co_return std::nullopt;
  }

  /// One reply. The end of the stream (the child died) comes back as an error
  /// code, not an exception: awaitable `||` waits for the first operation to
  /// *succeed*, so a throwing read would be ignored until the timer fired.
  asio::awaitable<std::pair<boost::system::error_code, json::object>> read_reply() {
    char len[4];
    auto [ec, n1] =
        co_await asio::async_read(*socket, asio::buffer(len), asio::as_tuple(asio::use_awaitable));
    if (ec) co_return std::pair{ec, json::object{}};
    std::uint32_t n = 0;
    for (int i = 0; i < 4; ++i)
      n |= static_cast<std::uint32_t>(static_cast<unsigned char>(len[i])) << (8 * i);
    if (n > detail::protocol::kMaxFrame)
      throw WriterProcessError("the writer process sent an oversized message");
    std::string body(n, '\0');
    auto [ec2, n2] =
        co_await asio::async_read(*socket, asio::buffer(body), asio::as_tuple(asio::use_awaitable));
    if (ec2) co_return std::pair{ec2, json::object{}};
    co_return std::pair{boost::system::error_code{}, detail::protocol::parse(body)};
  }

  /// Sends `request` and waits for the answer, at most `timeout`. Returns the
  /// reply; nothing on timeout. Throws boost::system::system_error when the
  /// stream ends (the child died).
  asio::awaitable<std::optional<json::object>> exchange(const json::object& request, int pass_fd,
                                                        std::chrono::milliseconds timeout) {
    asio::steady_timer timer(strand, timeout);
    {
      auto sent = co_await (send(request, pass_fd) || timer.async_wait(asio::use_awaitable));
      if (sent.index() == 1) co_return std::nullopt;  // the child reads nothing: as a late answer
      if (auto why = std::get<0>(sent)) throw WriterProcessError(*why);
    }
    auto result = co_await (read_reply() || timer.async_wait(asio::use_awaitable));
    if (result.index() == 1) co_return std::nullopt;
    auto [ec, reply] = std::get<0>(std::move(result));
    if (ec) throw boost::system::system_error(ec, "reading from the writer process");
    co_return std::move(reply);
  }

  /// Removes what a child that died mid-write left: its temporary file
  /// beside `file`, when the filesystem gave it a name.
  static void remove_temporaries(const std::filesystem::path& file) {
    detail::remove_stale_temporaries(file.parent_path(), file.filename().string());
  }

  json::object init_message() const {
    json::object m{{"v", detail::protocol::kVersion}, {"type", "init"}};
    m["rank"] = rank_info.global_rank;
    m["world_size"] = rank_info.global_world_size;
    m["write_barrier_timeout_ms"] = writer_config.write_barrier_timeout.count();
    m["barrier_type"] =
        barrier_config.barrier_type ? json::value(*barrier_config.barrier_type) : json::value(nullptr);
    Kwargs barrier_args = barrier_config.barrier_args;
    if (hosts_barrier_store()) barrier_args.set("host_store", false);
    m["barrier_args"] = detail::protocol::kwargs_to_json(barrier_args);
    m["init_args"] = detail::protocol::args_to_json(options.subprocess_init_args);
    m["writer_args"] = detail::protocol::kwargs_to_json(options.checkpoint_writer_init_args);
    return m;
  }

  /// Whether the barrier is tcp_store's, whose store this process hosts: on
  /// every rank the child's barrier only connects, and rank 0 hosts it here.
  bool hosts_barrier_store() const {
    return barrier_config.barrier_type && *barrier_config.barrier_type == "tcp_store" &&
           !barrier_config.barrier_args.contains("host_store");
  }

  /// Rank 0 of a tcp_store barrier: starts the store once, for every child.
  void host_barrier_store() {
    if (store_host || !hosts_barrier_store()) return;
    Kwargs args = barrier_config.barrier_args;
    if (!args.contains("global_rank")) args.set("global_rank", rank_info.global_rank);
    if (!args.contains("global_world_size")) args.set("global_world_size", rank_info.global_world_size);
    const auto o = TCPStoreBarrierOptions::from_args(args);
    if (o.global_rank == 0) store_host = std::make_unique<TCPStoreBarrierHost>(o);
  }

  /// Steps 1–3. Sets `ready` with the outcome.
  asio::awaitable<void> start() {
    auto event = detail::Event::create();
    ready = event;
    try {
      host_barrier_store();
      co_await start_child();
      event->set();
    } catch (...) {
      event->set(std::current_exception());
      throw;
    }
  }

  asio::awaitable<void> start_child() {
    const auto exe = executable();
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
      throw WriterProcessError(fmt::format("socketpair for the writer process: {}", std::strerror(errno)));
    try {
      bp2::process proc(strand.get_inner_executor(), exe,
                        std::vector<std::string>{"--fd", "3", "--parent", std::to_string(::getpid())},
                        PassFd{sv[1], 3}, Niceness{config.writer_niceness});
      set_pid(proc.id());
      proc.detach();  // reaped here, not by Boost.Process
    } catch (const std::exception& e) {
      ::close(sv[0]);
      ::close(sv[1]);
      throw WriterProcessError(fmt::format("cannot start the writer process {}: {}", exe.string(), e.what()));
    }
    ::close(sv[1]);
    socket =
        std::make_unique<asio::local::stream_protocol::socket>(strand, asio::local::stream_protocol(), sv[0]);

    const auto deadline = std::chrono::steady_clock::now() + config.subprocess_init_timeout;
    auto left = [&] {
      return std::max(std::chrono::milliseconds(0), std::chrono::duration_cast<std::chrono::milliseconds>(
                                                        deadline - std::chrono::steady_clock::now()));
    };
    std::string failure;
    bool stream_ended = false;
    try {
      for (const auto& request :
           {init_message(), json::object{{"v", detail::protocol::kVersion}, {"type", "ping"}}}) {
        auto reply = co_await exchange(request, -1, left());
        if (!reply) {
          const std::string how = kill_and_reap();
          throw Timeout(
              fmt::format("Timed out after {} ms waiting for the writer process {} to start (init and "
                          "first ping); it was killed ({})",
                          config.subprocess_init_timeout.count(), exe.string(), how));
        }
        try {
          detail::protocol::throw_if_error(*reply);
        } catch (const std::exception& e) {
          failure = e.what();
          break;
        }
      }
    } catch (const boost::system::system_error&) {
      stream_ended = true;  // the child died while starting
    }
    if (stream_ended) {
      const std::string how = co_await reap_after_eof();
      throw WriterProcessError(
          fmt::format("Child process terminated unexpectedly while starting ({}): {}", how, exe.string()));
    }
    if (!failure.empty()) {
      kill_and_reap();
      throw WriterProcessError(
          fmt::format("the writer process {} failed to initialise: {}", exe.string(), failure));
    }
  }

  /// The one write in progress: `writing` while it lives.
  struct WriteSlot {
    bool& writing;
    ~WriteSlot() { writing = false; }
  };
  /// Takes the one write slot for a write to `target`; throws when the child
  /// is closed or a write is in progress.
  WriteSlot claim_write(const std::filesystem::path& target) {
    if (closed)
      throw WriterProcessError(fmt::format("cannot write {}: the writer process is closed", target.string()));
    if (writing) throw WriterProcessError("one write at a time: the previous write has not completed");
    writing = true;
    return WriteSlot{writing};
  }
  /// A running child: a dead one is replaced (steps 1–3); its start's error.
  asio::awaitable<void> ensure_child() {
    if (pid <= 0) co_await start();
    if (auto e = ready->error()) std::rethrow_exception(e);
  }

  /// Step 4 (and 1–3 first when there is no child).
  asio::awaitable<void> write(StagedCheckpoint staged, std::filesystem::path path, Kwargs kwargs) {
    // Every write asked for takes a barrier round, whatever becomes of it: the
    // ranks' counts stay equal across failed writes and restarted children.
    const std::int64_t sequence = writes_asked++;
    const std::string round =
        CheckpointWriter::round_name(path, rounds_asked[path.lexically_normal().string()]++);
    const WriteSlot slot = claim_write(path);
    co_await ensure_child();
    if (!staged.arena) throw WriterProcessError("the staged checkpoint has no arena for the writer process");

    json::object request{{"v", detail::protocol::kVersion}, {"type", "write_checkpoint"}};
    request["path"] = path.string();
    request["arena_size"] = staged.arena->size();
    request["cd_offset"] = staged.cd_offset;
    request["records"] = detail::protocol::records_to_json(staged.records);
    request["kwargs"] = detail::protocol::kwargs_to_json(kwargs);
    request["sequence"] = sequence;
    request["round"] = round;
    co_await run_write(request, staged.arena->fd(), path, path / checkpoint_file_name(rank_info.global_rank));
  }

  /// Step 4b: a DCP data file from archives staged in the arena.
  asio::awaitable<void> write_archives(StagedArchives staged, std::filesystem::path file,
                                       WriteOptions options) {
    const WriteSlot slot = claim_write(file);
    co_await ensure_child();
    if (!staged.arena) throw WriterProcessError("the staged archives have no arena for the writer process");

    json::object request{{"v", detail::protocol::kVersion}, {"type", "write_archives"}};
    request["file"] = file.string();
    request["arena_size"] = staged.arena->size();
    request["direct"] = options.direct_io;
    request["fsync"] = options.fsync;
    json::array archives;
    archives.reserve(staged.archives.size());
    for (const auto& a : staged.archives) {
      json::object o{{"offset", a.offset}};
      if (a.records.empty()) {
        o["raw_size"] = a.raw_size;
      } else {
        o["cd_offset"] = a.cd_offset;
        o["records"] = detail::protocol::records_to_json(a.records);
      }
      archives.push_back(std::move(o));
    }
    request["archives"] = std::move(archives);
    co_await run_write(request, staged.arena->fd(), file, file);
  }

  /// Sends a write request with the arena and awaits its answer (at most the
  /// write timeout). `target`: what the errors name; `file`: the file whose
  /// temporaries a dead or killed child leaves.
  asio::awaitable<void> run_write(const json::object& request, int arena_fd,
                                  const std::filesystem::path& target, const std::filesystem::path& file) {
    std::optional<json::object> reply;
    bool stream_ended = false;
    try {
      reply = co_await exchange(request, arena_fd, config.write_timeout);
    } catch (const boost::system::system_error&) {
      stream_ended = true;  // the child died
    } catch (const WriterProcessError&) {
      stream_ended = true;  // the request could not be sent: the child is gone
    }
    if (stream_ended) {
      const std::string how = co_await reap_after_eof();
      remove_temporaries(file);
      throw WriterProcessError(
          fmt::format("Child process terminated unexpectedly ({}) while writing {}", how, file.string()));
    }
    if (!reply) {
      const std::string how = kill_and_reap();
      remove_temporaries(file);
      throw Timeout(
          fmt::format("Timed out after {} ms waiting for the writer process to write {}; it was killed ({})",
                      config.write_timeout.count(), target.string(), how));
    }
    detail::protocol::throw_if_error(*reply);
  }

  static json::object exit_message() { return {{"v", detail::protocol::kVersion}, {"type", "exit"}}; }

  /// Step 5, on the strand: tells the child to exit, awaits its exit up to the
  /// shutdown timeout, else kills it; reaps it; closes the socket. A write in
  /// progress then fails (its read sees the end of the stream).
  asio::awaitable<void> shutdown() {
    if (closed) co_return;
    closed = true;
    if (pid > 0) {
      asio::steady_timer timer(strand, config.subprocess_shutdown_timeout);
      bool told = false;
      try {
        auto sent = co_await (send(exit_message(), -1) || timer.async_wait(asio::use_awaitable));
        told = sent.index() == 0 && !std::get<0>(sent);
      } catch (const std::exception&) {
        // already gone: reaped below
      }
      std::optional<std::string> how;
      if (told) how = co_await await_exit(config.subprocess_shutdown_timeout);
      if (!how) how = try_reap(pid);
      if (!how) kill_and_reap();
    }
    if (socket) {
      boost::system::error_code ignored;
      socket->close(ignored);
    }
  }

  /// Step 5 on the calling thread, for when the strand cannot run it (the
  /// executor stopped, or the caller is on the strand): the same steps,
  /// blocking, each bounded.
  void shutdown_here() {
    if (closed) return;
    closed = true;
    const int p = pid;
    if (p > 0) {
      bool told = true;
      try {
        detail::protocol::send(socket->native_handle(), exit_message());
      } catch (const std::exception&) {
        told = false;
      }
      if (told) {
        const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, p, 0));
        if (pidfd >= 0) {
          pollfd exited{pidfd, POLLIN, 0};
          const auto ms = static_cast<int>(std::min<std::int64_t>(config.subprocess_shutdown_timeout.count(),
                                                                  std::numeric_limits<int>::max()));
          while (::poll(&exited, 1, ms) < 0 && errno == EINTR) {
          }
          ::close(pidfd);
        }
      }
      if (!try_reap(p)) kill_and_reap();
    }
    if (socket) {
      boost::system::error_code ignored;
      socket->close(ignored);
    }
  }
};

CheckpointProcess::CheckpointProcess(executor_type executor, RankInfo rank_info,
                                     CheckpointProcessConfig config, CheckpointWriterConfig writer_config,
                                     BarrierConfig barrier_config, WriterOptions options)
    : impl_(std::make_shared<Impl>(executor)), ready_(detail::Event::create()) {
  impl_->rank_info = rank_info;
  impl_->config = config;
  impl_->writer_config = writer_config;
  impl_->barrier_config = std::move(barrier_config);
  impl_->options = std::move(options);
  auto ready = ready_;
  asio::co_spawn(
      impl_->strand, [impl = impl_]() -> asio::awaitable<void> { co_await impl->start(); },
      [ready](std::exception_ptr e) { ready->set(e); });
}

CheckpointProcess::CheckpointProcess(executor_type executor)
    : impl_(std::make_shared<Impl>(executor)), ready_(detail::Event::create()) {
  ready_->set();
}

void CheckpointProcess::do_wait_ready(asio::any_completion_handler<Signature> handler) {
  ready_->add_waiter(std::move(handler));
}

CheckpointProcess::~CheckpointProcess() {
  try {
    close();
  } catch (...) {
  }
}

void CheckpointProcess::do_write(StagedCheckpoint staged, std::filesystem::path path, Kwargs kwargs,
                                 asio::any_completion_handler<Signature> handler) {
  auto impl = impl_;
  auto ready = ready_;
  asio::co_spawn(
      impl->strand,
      [impl, ready, staged = std::move(staged), path = std::move(path),
       kwargs = std::move(kwargs)]() mutable -> asio::awaitable<void> {
        // The first write waits for the start begun by the constructor.
        if (!ready->done()) co_await ready->async_wait(asio::use_awaitable);
        co_await impl->write(std::move(staged), std::move(path), std::move(kwargs));
      },
      std::move(handler));
}

void CheckpointProcess::do_write_archives(StagedArchives staged, std::filesystem::path file,
                                          WriteOptions options,
                                          asio::any_completion_handler<Signature> handler) {
  auto impl = impl_;
  auto ready = ready_;
  asio::co_spawn(
      impl->strand,
      [impl, ready, staged = std::move(staged), file = std::move(file),
       options]() mutable -> asio::awaitable<void> {
        if (!ready->done()) co_await ready->async_wait(asio::use_awaitable);
        co_await impl->write_archives(std::move(staged), std::move(file), options);
      },
      std::move(handler));
}

void CheckpointProcess::close() {
  if (impl_->close_started.exchange(true)) return;
  // A child still starting: let its start finish or time out first, so that
  // close() leaves no process behind.
  if (!ready_->done()) ready_->wait_for(impl_->config.subprocess_init_timeout + std::chrono::seconds(5));
  auto impl = impl_;
  // When no other thread can run the strand (its context stopped, or this
  // thread is the one that runs it), this thread shuts the child down itself.
  if (impl->strand.running_in_this_thread() || !detail::others_run(impl->strand.get_inner_executor())) {
    impl->shutdown_here();
    return;
  }
  auto done = asio::co_spawn(
      impl->strand, [impl]() -> asio::awaitable<void> { co_await impl->shutdown(); }, asio::use_future);
  // shutdown() is bounded by the shutdown timeout twice (send, exit); beyond
  // that the executor is not running it: kill the child from here.
  if (done.wait_for(2 * impl->config.subprocess_shutdown_timeout + std::chrono::seconds(5)) ==
      std::future_status::ready) {
    done.get();
    return;
  }
  if (const int p = impl->pid_seen.exchange(-1); p > 0) {
    ::kill(p, SIGKILL);
    while (::waitpid(p, nullptr, 0) < 0 && errno == EINTR) {
    }
  }
}

const CheckpointProcessConfig& CheckpointProcess::config() const {
  static const CheckpointProcessConfig defaults;
  return impl_ ? impl_->config : defaults;
}

int CheckpointProcess::pid() const {
  return impl_->pid_seen;
}

}  // namespace ckpt
