// libFuzzer target for the checkpoint reader: any input must either load or be
// refused with a ckpt::Error. Anything else — a crash, a sanitizer report, an
// exception of another type (a check the reader missed and torch caught) — is a
// finding.
#include <ckpt/format.hpp>

#include <sys/mman.h>
#include <unistd.h>
#include <cstdint>
#include <cstdio>
#include <string>

namespace {

int input_fd() {
  static int fd = ::memfd_create("ckpt-fuzz", 0);
  return fd;
}

void exercise(const std::string& path, bool mmap) {
  try {
    ckpt::FileReader reader(path, {.mmap = mmap, .verify_crc = !mmap});
    (void)reader.load();
    reader.verify();
  } catch (const ckpt::Error&) {
    // refused with a clear error: the expected outcome for bad input
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const int fd = input_fd();
  if (fd < 0 || ::ftruncate(fd, 0) != 0) return 0;
  if (size > 0 && ::pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) return 0;
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  exercise(path, false);
  exercise(path, true);
  return 0;
}
