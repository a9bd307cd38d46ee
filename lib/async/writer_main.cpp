// The writer child: answers the parent's requests on the socket it inherited
// (see the protocol in checkpoint_process.cpp), writing staged images from the
// shared arena with its writer.
#include <ckpt/writer_main.hpp>

#include "async/arena.hpp"
#include "async/protocol.hpp"
#include "format/file_writer.hpp"
#include "format/zip.hpp"
#include "format/zip_image.hpp"

#include <fmt/format.h>

#include <charconv>
#include <csignal>
#include <cstring>
#include <string_view>
#include <thread>

#include <poll.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace json = boost::json;

namespace ckpt {
namespace {

/// The arena as the child sees it: mapped once, kept while the parent sends
/// the same memfd (same inode, same size).
class ArenaView {
 public:
  std::byte* map(int fd, std::uint64_t size) {
    struct stat st {};
    if (::fstat(fd, &st) != 0)
      throw IoError(fmt::format("cannot stat the staging arena: {}", std::strerror(errno)));
    if (static_cast<std::uint64_t>(st.st_size) < size)
      throw IoError(fmt::format("the staging arena holds {} bytes, the image needs {}", st.st_size, size));
    if (!(st.st_ino == inode_ && static_cast<std::uint64_t>(st.st_size) == mapping_.size)) {
      mapping_.map(fd, static_cast<std::uint64_t>(st.st_size));
      inode_ = st.st_ino;
    }
    return mapping_.base;
  }

 private:
  detail::ArenaMapping mapping_;
  ino_t inode_ = 0;
};

std::uint64_t u64(const json::object& o, const char* key) {
  const auto& v = o.at(key);
  if (v.is_uint64()) return v.as_uint64();
  if (v.is_int64() && v.as_int64() >= 0) return static_cast<std::uint64_t>(v.as_int64());
  throw WriterProcessError(fmt::format("protocol field '{}' is not a size", key));
}

/// The value of option `name` (a non-negative int); -1 when absent or malformed.
int int_option(int argc, char** argv, std::string_view name) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string_view(argv[i]) == name) {
      int value = -1;
      std::string_view s(argv[i + 1]);
      auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
      if (ec == std::errc() && p == s.data() + s.size() && value >= 0) return value;
    }
  }
  return -1;
}

[[noreturn]] void abandon(pid_t trainer) {
  detail::remove_in_flight_temporaries();
  ::signal(SIGPIPE, SIG_IGN);  // stderr may be a pipe whose reader died with the trainer
  const std::string line =
      fmt::format("ckpt-writer: the trainer (pid {}) is gone; the write in flight is abandoned\n", trainer);
  [[maybe_unused]] auto n = ::write(STDERR_FILENO, line.data(), line.size());
  ::_exit(kOrphanedExitStatus);
}

/// The documented rule for an orphan: as soon as the trainer that started this
/// child is gone, the child abandons whatever it is doing (a write, a barrier),
/// unlinks its named temporaries and exits. A thread waits on a pidfd of the
/// trainer (polls its parent pid where pidfds are missing).
void watch_trainer(pid_t trainer) {
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, trainer, 0));
  if (::getppid() != trainer) abandon(trainer);  // gone before the watch began
  std::thread([trainer, pidfd] {
    if (pidfd >= 0) {
      pollfd p{pidfd, POLLIN, 0};
      while (::poll(&p, 1, -1) < 0 && errno == EINTR) {
      }
    } else {
      while (::getppid() == trainer) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    abandon(trainer);
  }).detach();
}

}  // namespace

int writer_main(int argc, char** argv, const WriterMainOptions& options) {
  const int sock = int_option(argc, argv, "--fd");
  if (sock < 0) {
    fmt::print(stderr, "{}: a ckpt writer process, started by ckpt's CheckpointProcess (usage: {} --fd N)\n",
               argc > 0 ? argv[0] : "ckpt-writer", argc > 0 ? argv[0] : "ckpt-writer");
    return 2;
  }
  if (const int trainer = int_option(argc, argv, "--parent"); trainer > 0) watch_trainer(trainer);
  std::shared_ptr<CheckpointWriter> writer;
  ArenaView arena;
  for (;;) {
    int passed_fd = -1;
    std::optional<json::object> message;
    try {
      message = detail::protocol::receive(sock, &passed_fd);
    } catch (const std::exception& e) {
      fmt::print(stderr, "ckpt-writer: {}\n", e.what());
      return 1;
    }
    if (!message) return 0;  // the parent is gone
    struct CloseFd {
      int& fd;
      ~CloseFd() {
        if (fd >= 0) ::close(fd);
      }
    } close_fd{passed_fd};

    json::object reply;
    std::string type;
    try {
      type = std::string(message->at("type").as_string());
      if (type == "init") {
        if (options.init_fn) options.init_fn(detail::protocol::args_from_json(message->at("init_args")));
        WriterFactoryArgs args;
        args.rank_info = {message->at("rank").as_int64(), message->at("world_size").as_int64()};
        args.config.write_barrier_timeout =
            std::chrono::milliseconds(message->at("write_barrier_timeout_ms").as_int64());
        if (const auto& t = message->at("barrier_type"); t.is_string())
          args.barrier_config.barrier_type = std::string(t.as_string());
        args.barrier_config.barrier_args = detail::protocol::kwargs_from_json(message->at("barrier_args"));
        args.writer_init_args = detail::protocol::kwargs_from_json(message->at("writer_args"));
        writer = options.writer_factory
                     ? options.writer_factory(args)
                     : std::make_shared<CheckpointWriter>(
                           args.config, args.rank_info,
                           create_barrier_from_config(args.barrier_config, args.rank_info));
        if (!writer) throw WriterProcessError("the writer factory returned no writer");
        reply = detail::protocol::ok();
      } else if (type == "ping") {
        reply = detail::protocol::ok();
      } else if (type == "write_checkpoint") {
        if (!writer) throw WriterProcessError("write_checkpoint before init");
        if (passed_fd < 0) throw WriterProcessError("write_checkpoint without the staging arena");
        // The staged image: local headers (CRC fields zero) and record data
        // at their offsets in the arena, the central directory to come at
        // cd_offset. ZipImage checks the records' placement, then write()
        // computes the CRCs, patches them in and appends the directory.
        const std::uint64_t arena_size = u64(*message, "arena_size");
        detail::ZipImage zip = [&] {
          try {
            return detail::ZipImage(detail::protocol::records_from_json(message->at("records")),
                                    u64(*message, "cd_offset"));
          } catch (const WriterProcessError&) {
            throw;
          } catch (const Error& e) {
            throw WriterProcessError(fmt::format("write_checkpoint carried a bad image: {}", e.what()));
          }
        }();
        if (zip.cd_offset() > arena_size)
          throw WriterProcessError(fmt::format("the staged image ends at {}, past the arena's {} bytes",
                                               zip.cd_offset(), arena_size));
        std::byte* image = arena.map(passed_fd, arena_size);
        if (const auto* seq = message->if_contains("sequence"))
          writer->set_barrier_sequence(seq->to_number<std::int64_t>());
        if (const auto* round = message->if_contains("round"); round && round->is_string())
          writer->set_barrier_round(std::string(round->as_string()));
        writer->write_with(
            std::filesystem::path(std::string(message->at("path").as_string())),
            [&](const std::filesystem::path& file) {
              detail::write_durably(file, {}, [&](int fd, bool direct, const std::filesystem::path& temp) {
                return zip.write(fd, direct, temp, image);
              });
            },
            detail::protocol::kwargs_from_json(message->at("kwargs")));
        reply = detail::protocol::ok();
      } else if (type == "write_archives") {
        // A DCP data file: archives staged one after another in the arena,
        // each a zip image (CRC fields zero) or raw bytes, written into one
        // file at kAlign boundaries, durably (write_image_archives).
        if (passed_fd < 0) throw WriterProcessError("write_archives without the staging arena");
        const std::uint64_t arena_size = u64(*message, "arena_size");
        std::vector<detail::ImageArchive> archives;
        for (const auto& v : message->at("archives").as_array()) {
          const auto& a = v.as_object();
          detail::ImageArchive archive;
          archive.image_offset = u64(a, "offset");
          std::uint64_t span = 0;
          if (const auto* records = a.if_contains("records")) {
            try {
              archive.zip.emplace(detail::protocol::records_from_json(*records), u64(a, "cd_offset"));
            } catch (const WriterProcessError&) {
              throw;
            } catch (const Error& e) {
              throw WriterProcessError(fmt::format("write_archives carried a bad archive: {}", e.what()));
            }
            span = archive.zip->cd_offset();
          } else {
            archive.raw_size = u64(a, "raw_size");
            span = archive.raw_size;
          }
          if (archive.image_offset % detail::kAlign != 0 || archive.image_offset > arena_size ||
              span > arena_size - archive.image_offset)
            throw WriterProcessError(
                fmt::format("write_archives: an archive of {} bytes at {} is not within "
                            "the arena's {} bytes, or not aligned",
                            span, archive.image_offset, arena_size));
          archives.push_back(std::move(archive));
        }
        std::byte* image = arena.map(passed_fd, arena_size);
        const WriteOptions write_options{.direct_io = message->at("direct").as_bool(),
                                         .fsync = message->at("fsync").as_bool()};
        detail::write_durably(std::filesystem::path(std::string(message->at("file").as_string())),
                              write_options, [&](int fd, bool direct, const std::filesystem::path& temp) {
                                return detail::write_image_archives(fd, direct, temp, image, archives);
                              });
        reply = detail::protocol::ok();
      } else if (type == "exit") {
        if (writer) writer->close();
        detail::protocol::send(sock, detail::protocol::ok());
        return 0;
      } else {
        throw WriterProcessError(fmt::format("unknown request '{}'", type));
      }
    } catch (...) {
      reply = detail::protocol::error_reply(std::current_exception());
    }
    try {
      detail::protocol::send(sock, reply);
    } catch (const std::exception& e) {
      fmt::print(stderr, "ckpt-writer: {}\n", e.what());
      return 1;
    }
  }
}

}  // namespace ckpt
