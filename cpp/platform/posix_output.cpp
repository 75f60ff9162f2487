// The POSIX backend's output file (cpp/core/file_io.h, OutputFile): a temporary file beside the destination,
// written in order or at offsets, unchanged bytes copied file to file, renamed over the destination on
// commit. posix.cpp has the rest of the backend (see there for what differs between Linux and plain POSIX).
#include "backend.h"

#if !defined(QDQFOLD_IO_WINDOWS)

#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#if defined(QDQFOLD_IO_LINUX)
#include <sys/xattr.h>
#endif
#include <cstdio>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

#include "../core/file_io.h"
#include "common.h"
#include "posix_detail.h"

namespace qdqfold::io {

using detail::close_keeping_errno;

// ------------------------------------------------------------------------------------------------- writing

OutputFile::OutputFile(std::string destination, std::string mode_like)
    : destination_(std::move(destination)), mode_like_(std::move(mode_like)) {
  const std::string prefix = directory_of(destination_) + "/." + file_name_of(destination_) + ".";
#if defined(QDQFOLD_IO_LINUX)
  temp_ = prefix + "XXXXXX.tmp";
  const int fd = mkstemps(temp_.data(), 4);
#else
  int fd = -1;
  for (int attempt = 0; attempt < 100; ++attempt) {
    temp_ = prefix + detail::unique_letters(6) + ".tmp";
    fd = ::open(temp_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY, 0600);
    if (fd >= 0 || errno != EEXIST) break;
  }
#endif
  if (fd < 0) throw_os_error("cannot write", destination_);
  file_ = fd;
}

OutputFile::~OutputFile() {
  if (file_ >= 0) ::close(static_cast<int>(file_));
  if (!committed_) ::unlink(temp_.c_str());
}

void OutputFile::write(const char* p, size_t n) {
  const int fd = static_cast<int>(file_);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw_os_error("cannot write", destination_);
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void OutputFile::pwrite_all(const char* p, size_t n, int64_t offset) {
  const int fd = static_cast<int>(file_);
  while (n > 0) {
    ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw_os_error("cannot write", destination_);
    p += w;
    n -= static_cast<size_t>(w);
    offset += w;
  }
}

#if defined(QDQFOLD_IO_LINUX)
namespace {

constexpr size_t kPipeBytes = size_t(1) << 20;

// Copies up to `n` bytes of `in` from `*from` to the current end of `out` through a pipe of kPipeBytes, in the
// kernel (splice reads page cache pages into the pipe by reference, the second splice copies them into the
// output's page cache); advances *from and returns the bytes left. Returns `n` untouched when there is no
// such pipe, and stops early when the input ends or cannot be spliced (the caller copies the rest another way).
// Why: copy_file_range between unaligned offsets on a file system without a copy of its own (ext4, tmpfs)
// goes through the kernel's splice with a 64 KB pipe, and ext4 then writes the output in 4 KB folios, each
// with its own block reservation: 494 MB took 0.21 s of system time where the same copy, page-aligned or
// through a 1 MB pipe, took 0.14 s (Linux 6.18). `cp` copies whole files, aligned, and never meets this.
size_t splice_through_pipe(int in, loff_t* from, int out, size_t n, const std::string& destination) {
  int ends[2];
  if (pipe2(ends, O_CLOEXEC) != 0) return n;
  struct Close {
    int* ends;
    ~Close() {
      close_keeping_errno(ends[0]);
      close_keeping_errno(ends[1]);
    }
  } close_both{ends};
  const int size = fcntl(ends[1], F_SETPIPE_SZ, static_cast<int>(kPipeBytes));
  if (size < static_cast<int>(kPipeBytes)) return n;  // over the user's pipe limit: no better than copy_file_range
  while (n > 0) {
    ssize_t got = splice(in, from, ends[1], nullptr, std::min(n, kPipeBytes), SPLICE_F_MOVE);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;  // the input ended early or cannot be spliced: the pipe is empty here
    n -= static_cast<size_t>(got);
    while (got > 0) {  // the pipe is drained before the next read, so neither splice ever blocks
      const ssize_t put = splice(ends[0], nullptr, out, nullptr, static_cast<size_t>(got), SPLICE_F_MOVE);
      if (put < 0 && errno == EINTR) continue;
      if (put <= 0) {
        if (put == 0) errno = EIO;
        throw_os_error("cannot write", destination);
      }
      got -= put;
    }
  }
  return n;
}

}  // namespace
#endif

void OutputFile::copy_from(const MappedFile& in, int64_t offset, size_t n) {
#if defined(QDQFOLD_IO_LINUX)
  loff_t from = offset;
  // copy_file_range where the file system may share or copy the blocks itself (a reflink on btrfs and XFS
  // needs block-aligned offsets), through a pipe of our own for large unaligned ranges (see above).
  const auto page = static_cast<int64_t>(detail::page_size());
  if (n >= kPipeBytes && (offset % page != 0 || ::lseek(static_cast<int>(file_), 0, SEEK_CUR) % page != 0))
    n = splice_through_pipe(static_cast<int>(in.file_), &from, static_cast<int>(file_), n, destination_);
  while (n > 0) {
    ssize_t c = copy_file_range(static_cast<int>(in.file_), &from, static_cast<int>(file_), nullptr, n, 0);
    if (c < 0 && errno == EINTR) continue;
    if (c <= 0) break;  // not supported here, or the input ended early: write the rest from the mapping
    n -= static_cast<size_t>(c);
  }
  if (n == 0) return;
  offset = from;
#endif
  // From the mapping (a read past a new end of the file reads the guard's zeros, and changed() says so).
  if (static_cast<size_t>(offset) + n > in.view().size())
    throw FileError(in.path() + ": the input changed while it was being folded");
  write(in.view().data() + offset, n);
}

namespace {

// The process's umask, read without changing it where the system tells (Linux: /proc/self/status): umask(0)
// and back would give a file another thread creates meanwhile the wrong mode.
mode_t current_umask() {
#if defined(QDQFOLD_IO_LINUX)
  if (FILE* status = std::fopen("/proc/self/status", "re")) {
    char line[256];
    unsigned mask = 0;
    bool found = false;
    while (!found && std::fgets(line, sizeof line, status)) found = std::sscanf(line, "Umask: %o", &mask) == 1;
    std::fclose(status);
    if (found) return static_cast<mode_t>(mask);
  }
#endif
  static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
  pthread_mutex_lock(&lock);
  const mode_t mask = umask(022);
  umask(mask);
  pthread_mutex_unlock(&lock);
  return mask;
}

#if defined(QDQFOLD_IO_LINUX)
// The extended attributes of `from` (ACLs, SELinux labels, user.*) copied onto `fd`, as far as permitted.
void copy_xattrs(const char* from, int fd) {
  const ssize_t size = listxattr(from, nullptr, 0);
  if (size <= 0) return;
  std::string names(static_cast<size_t>(size), '\0');
  const ssize_t got = listxattr(from, names.data(), names.size());
  if (got <= 0) return;
  names.resize(static_cast<size_t>(got));
  std::string value;
  for (size_t begin = 0; begin < names.size();) {
    const char* name = names.c_str() + begin;
    begin += std::strlen(name) + 1;
    const ssize_t n = getxattr(from, name, nullptr, 0);
    if (n < 0) continue;
    value.assign(static_cast<size_t>(n), '\0');
    const ssize_t m = getxattr(from, name, value.data(), value.size());
    if (m >= 0) fsetxattr(fd, name, value.data(), static_cast<size_t>(m), 0);  // not permitted: skipped
  }
}
#endif

}  // namespace

void OutputFile::commit() {
  const int fd = static_cast<int>(file_);
  // As cp onto an existing file and install: the existing file's mode (and owner, group and extended
  // attributes where permitted); a new file gets the umask's mode, whatever the input's mode.
  const std::string& like = mode_like_.empty() ? destination_ : mode_like_;
  struct stat existing {};
  if (::stat(like.c_str(), &existing) == 0 && S_ISREG(existing.st_mode)) {
#if defined(QDQFOLD_IO_LINUX)
    copy_xattrs(like.c_str(), fd);  // while the new file is still this user's: user.* needs write permission
#endif
    if (existing.st_uid != geteuid() || existing.st_gid != getegid()) {
      if (fchown(fd, existing.st_uid, existing.st_gid) != 0 && fchown(fd, static_cast<uid_t>(-1), existing.st_gid) != 0) {
        // not permitted (another user's file): the new file is this user's, as cp's is
      }
    }
    fchmod(fd, existing.st_mode & 07777);  // after fchown, which may clear set-user-ID bits
  } else {
    fchmod(fd, 0666 & ~current_umask());
  }
  file_ = -1;
  if (::close(fd) != 0) throw_os_error("cannot write", destination_);
  if (::rename(temp_.c_str(), destination_.c_str()) != 0) throw_os_error("cannot write", destination_);
  committed_ = true;
}

}  // namespace qdqfold::io

#endif  // !QDQFOLD_IO_WINDOWS
