/* A system-call fault injector of the tests' own, loaded with LD_PRELOAD.
 *
 * It fails the Nth call of one write-path function in the processes it is
 * told to, so that a test can walk every such call of a save in turn:
 *
 *   CKPT_FAULT=CALL:N[:ERRNO]  fail the Nth (1-based) counted call of CALL
 *                              with ERRNO (EIO unless named: EIO, ENOSPC,
 *                              EDQUOT, EROFS, EACCES, EINTR is not offered),
 *                              or, with HOLD, block the call for good (once
 *                              reported: a process held mid-write, for a
 *                              test to kill).
 *                              CALL: open (an open or openat that may create
 *                              or write), write (write, pwrite, pwritev),
 *                              ftruncate, fsync (fsync, fdatasync), rename
 *                              (rename, renameat, renameat2), link (linkat),
 *                              mkdir (mkdir, mkdirat), sendmsg.
 *   CKPT_FAULT_IN=trainer|child|any   which processes count: the writer child
 *                              is the one started with `--parent`.
 *   CKPT_FAULT_UNDER=DIR       count only calls on paths (or fds open on paths)
 *                              under DIR; sendmsg is counted regardless.
 *   CKPT_FAULT_REPORT=FILE     when the fault fires, append "CALL N pid\n".
 *   CKPT_FAULT_NO_TMPFILE=1    open(O_TMPFILE) fails with EOPNOTSUPP (a
 *                              filesystem without unnamed files).
 *   CKPT_FAULT_COUNTS=FILE     fail nothing; at exit append "CALL COUNT\n"
 *                              for every CALL: how many calls were counted.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

enum { C_OPEN, C_WRITE, C_FTRUNCATE, C_FSYNC, C_RENAME, C_LINK, C_MKDIR, C_SENDMSG, C_COUNT };
static const char* const kNames[C_COUNT] = {"open",   "write", "ftruncate", "fsync",
                                            "rename", "link",  "mkdir",     "sendmsg"};

static int g_active = 0;       /* this process counts */
static int g_call = -1;        /* which call fails */
static long g_nth = 0;         /* the one that fails */
static int g_errno = EIO;
static int g_hold = 0;         /* the call blocks instead of failing */
static int g_no_tmpfile = 0;
static const char* g_under = NULL;
static const char* g_report = NULL;
static long g_seen[C_COUNT];   /* counted so far (one thread at a time matters little) */
static const char* g_counts = NULL;

__attribute__((constructor)) static void fault_init(void) {
  const char* spec = getenv("CKPT_FAULT");
  const char* in = getenv("CKPT_FAULT_IN");
  g_no_tmpfile = getenv("CKPT_FAULT_NO_TMPFILE") && strcmp(getenv("CKPT_FAULT_NO_TMPFILE"), "1") == 0;
  g_under = getenv("CKPT_FAULT_UNDER");
  if (g_under && !*g_under) g_under = NULL;
  g_report = getenv("CKPT_FAULT_REPORT");
  /* Is this the writer child? Its command line holds "--parent". */
  int child = 0;
  FILE* f = fopen("/proc/self/cmdline", "re");
  if (f) {
    char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    for (size_t i = 0; i < n; i += strlen(buf + i) + 1)
      if (strcmp(buf + i, "--parent") == 0) child = 1;
  }
  if (!in || strcmp(in, "any") == 0)
    g_active = 1;
  else if (strcmp(in, "child") == 0)
    g_active = child;
  else
    g_active = !child;
  g_counts = getenv("CKPT_FAULT_COUNTS");
  if (g_counts && *g_counts) return; /* counting only */
  g_counts = NULL;
  if (!spec || !*spec) {
    g_active = 0;
    return;
  }
  char call[32] = {0};
  long nth = 0;
  char err[32] = {0};
  int got = sscanf(spec, "%31[a-z]:%ld:%31[A-Z]", call, &nth, err);
  if (got < 2 || nth < 1) {
    g_active = 0;
    return;
  }
  for (int c = 0; c < C_COUNT; ++c)
    if (strcmp(call, kNames[c]) == 0) g_call = c;
  g_nth = nth;
  if (got == 3) {
    if (strcmp(err, "ENOSPC") == 0) g_errno = ENOSPC;
    else if (strcmp(err, "EDQUOT") == 0) g_errno = EDQUOT;
    else if (strcmp(err, "EROFS") == 0) g_errno = EROFS;
    else if (strcmp(err, "EACCES") == 0) g_errno = EACCES;
    else if (strcmp(err, "HOLD") == 0) g_hold = 1;
  }
}

__attribute__((destructor)) static void fault_fini(void) {
  if (!g_counts || !g_active) return;
  FILE* f = fopen(g_counts, "ae");
  if (!f) return;
  for (int c = 0; c < C_COUNT; ++c) fprintf(f, "%s %ld\n", kNames[c], g_seen[c]);
  fclose(f);
}

static int path_counts(const char* path) {
  if (!g_under) return 1;
  if (!path) return 0;
  if (path[0] != '/') {
    char cwd[4096];
    if (!getcwd(cwd, sizeof cwd)) return 0;
    return strncmp(cwd, g_under, strlen(g_under)) == 0;
  }
  return strncmp(path, g_under, strlen(g_under)) == 0;
}

static int fd_counts(int fd) {
  if (!g_under) return 1;
  char link[64], target[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, target, sizeof target - 1);
  if (n < 0) return 0;
  target[n] = 0;
  return strncmp(target, g_under, strlen(g_under)) == 0;
}

/* Counts a call of `c`; nonzero when it is the one to fail (errno is set). */
static int fails(int c, int counts) {
  if (g_counts) {
    if (g_active && counts) __atomic_add_fetch(&g_seen[c], 1, __ATOMIC_RELAXED);
    return 0;
  }
  if (!g_active || c != g_call || !counts) return 0;
  if (__atomic_add_fetch(&g_seen[c], 1, __ATOMIC_RELAXED) != g_nth) return 0;
  if (g_report) {
    FILE* f = fopen(g_report, "ae");
    if (f) {
      fprintf(f, "%s %ld %d\n", kNames[c], g_nth, (int)getpid());
      fclose(f);
    }
  }
  if (g_hold)
    for (;;) pause(); /* until killed */
  errno = g_errno;
  return 1;
}

#define REAL(ret, name, ...)                                       \
  static ret (*real_##name)(__VA_ARGS__);                          \
  static ret (*get_##name(void))(__VA_ARGS__) {                    \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name);       \
    return real_##name;                                            \
  }

REAL(int, open, const char*, int, ...)
REAL(int, open64, const char*, int, ...)
REAL(int, openat, int, const char*, int, ...)
REAL(int, openat64, int, const char*, int, ...)
REAL(ssize_t, write, int, const void*, size_t)
REAL(ssize_t, pwrite, int, const void*, size_t, off_t)
REAL(ssize_t, pwrite64, int, const void*, size_t, off_t)
REAL(ssize_t, pwritev, int, const struct iovec*, int, off_t)
REAL(int, ftruncate, int, off_t)
REAL(int, ftruncate64, int, off_t)
REAL(int, fsync, int)
REAL(int, fdatasync, int)
REAL(int, rename, const char*, const char*)
REAL(int, renameat, int, const char*, int, const char*)
REAL(int, renameat2, int, const char*, int, const char*, unsigned)
REAL(int, linkat, int, const char*, int, const char*, int)
REAL(int, mkdir, const char*, mode_t)
REAL(int, mkdirat, int, const char*, mode_t)
REAL(ssize_t, sendmsg, int, const struct msghdr*, int)

static int opens_for_writing(int flags) {
  return (flags & (O_WRONLY | O_RDWR | O_CREAT)) || (flags & O_TMPFILE) == O_TMPFILE;
}

static int open_common(int dirfd, const char* path, int flags, mode_t mode, int which) {
  if ((flags & O_TMPFILE) == O_TMPFILE && g_no_tmpfile && path_counts(path)) {
    errno = EOPNOTSUPP;
    return -1;
  }
  if (opens_for_writing(flags) && fails(C_OPEN, path_counts(path))) return -1;
  switch (which) {
    case 0: return get_open()(path, flags, mode);
    case 1: return get_open64()(path, flags, mode);
    case 2: return get_openat()(dirfd, path, flags, mode);
    default: return get_openat64()(dirfd, path, flags, mode);
  }
}

static mode_t mode_of(int flags, va_list ap) {
  return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(ap, int) : 0;
}

int open(const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  mode_t mode = mode_of(flags, ap);
  va_end(ap);
  return open_common(AT_FDCWD, path, flags, mode, 0);
}
int open64(const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  mode_t mode = mode_of(flags, ap);
  va_end(ap);
  return open_common(AT_FDCWD, path, flags, mode, 1);
}
int openat(int dirfd, const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  mode_t mode = mode_of(flags, ap);
  va_end(ap);
  return open_common(dirfd, path, flags, mode, 2);
}
int openat64(int dirfd, const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  mode_t mode = mode_of(flags, ap);
  va_end(ap);
  return open_common(dirfd, path, flags, mode, 3);
}

ssize_t write(int fd, const void* buf, size_t n) {
  if (fd > 2 && fails(C_WRITE, g_active && (g_counts || g_call == C_WRITE) && fd_counts(fd))) return -1;
  return get_write()(fd, buf, n);
}
ssize_t pwrite(int fd, const void* buf, size_t n, off_t off) {
  if (fails(C_WRITE, g_active && (g_counts || g_call == C_WRITE) && fd_counts(fd))) return -1;
  return get_pwrite()(fd, buf, n, off);
}
ssize_t pwrite64(int fd, const void* buf, size_t n, off_t off) {
  if (fails(C_WRITE, g_active && (g_counts || g_call == C_WRITE) && fd_counts(fd))) return -1;
  return get_pwrite64()(fd, buf, n, off);
}
ssize_t pwritev(int fd, const struct iovec* iov, int n, off_t off) {
  if (fails(C_WRITE, g_active && (g_counts || g_call == C_WRITE) && fd_counts(fd))) return -1;
  return get_pwritev()(fd, iov, n, off);
}
int ftruncate(int fd, off_t len) {
  if (fails(C_FTRUNCATE, g_active && (g_counts || g_call == C_FTRUNCATE) && fd_counts(fd))) return -1;
  return get_ftruncate()(fd, len);
}
int ftruncate64(int fd, off_t len) {
  if (fails(C_FTRUNCATE, g_active && (g_counts || g_call == C_FTRUNCATE) && fd_counts(fd))) return -1;
  return get_ftruncate64()(fd, len);
}
int fsync(int fd) {
  if (fails(C_FSYNC, g_active && (g_counts || g_call == C_FSYNC) && fd_counts(fd))) return -1;
  return get_fsync()(fd);
}
int fdatasync(int fd) {
  if (fails(C_FSYNC, g_active && (g_counts || g_call == C_FSYNC) && fd_counts(fd))) return -1;
  return get_fdatasync()(fd);
}
int rename(const char* from, const char* to) {
  if (fails(C_RENAME, path_counts(to))) return -1;
  return get_rename()(from, to);
}
int renameat(int a, const char* from, int b, const char* to) {
  if (fails(C_RENAME, path_counts(to))) return -1;
  return get_renameat()(a, from, b, to);
}
int renameat2(int a, const char* from, int b, const char* to, unsigned flags) {
  if (fails(C_RENAME, path_counts(to))) return -1;
  return get_renameat2()(a, from, b, to, flags);
}
int linkat(int a, const char* from, int b, const char* to, int flags) {
  if (fails(C_LINK, path_counts(to))) return -1;
  return get_linkat()(a, from, b, to, flags);
}
int mkdir(const char* path, mode_t mode) {
  if (fails(C_MKDIR, path_counts(path))) return -1;
  return get_mkdir()(path, mode);
}
int mkdirat(int dirfd, const char* path, mode_t mode) {
  if (fails(C_MKDIR, path_counts(path))) return -1;
  return get_mkdirat()(dirfd, path, mode);
}
ssize_t sendmsg(int fd, const struct msghdr* msg, int flags) {
  if (fails(C_SENDMSG, 1)) return -1;
  return get_sendmsg()(fd, msg, flags);
}
