// The POSIX backend of cpp/core/file_io.h: Linux (QDQFOLD_IO_LINUX) and every other POSIX system
// (QDQFOLD_IO_POSIX, POSIX.1-2008 calls only; on Linux with -DQDQFOLD_PORTABLE_IO=ON). What differs:
//
//                          Linux                               plain POSIX
//   copy unchanged bytes   copy_file_range (in the kernel)     write() from the mapping (guarded)
//   temporary output       mkstemps(".<name>.XXXXXX.tmp")      open(O_CREAT | O_EXCL, 0600) of the same
//                                                              pattern (mkstemp cannot keep the ".tmp" end)
//   guard's zero page      MAP_ANONYMOUS                       /dev/zero, else MAP_ANON(YMOUS) where the
//                                                              system has it (macOS cannot map /dev/zero)
//   drop resident pages    madvise(MADV_DONTNEED)              the range mapped again over itself (MAP_FIXED):
//                                                              posix_madvise(POSIX_MADV_DONTNEED) may do
//                                                              nothing (it does nothing on glibc)
//
// The rules (regular files only, never blocking on a FIFO, the SIGBUS guard, the atomic rename) are the same.
#include "backend.h"

#if !defined(QDQFOLD_IO_WINDOWS)

#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
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

#if defined(__GLIBC__) && !defined(__USE_XOPEN_EXTENDED) && !defined(__USE_MISC)
// POSIX.1-2008 moved realpath() from the XSI option to the base, but glibc still declares it only for X/Open
// (a strict -D_POSIX_C_SOURCE=200809L compile, tools/check_portable.sh): the function is there.
extern "C" char* realpath(const char* path, char* resolved);
#endif

namespace qdqfold::io {

void throw_os_error(const std::string& what, const std::string& path) {
  throw FileError(path + ": " + what + ": " + std::strerror(errno));
}

namespace {

FileKind kind_of(mode_t mode) {
  if (S_ISREG(mode)) return FileKind::regular;
  if (S_ISDIR(mode)) return FileKind::directory;
  if (S_ISFIFO(mode)) return FileKind::fifo;
  if (S_ISCHR(mode)) return FileKind::character_device;
  if (S_ISBLK(mode)) return FileKind::block_device;
  if (S_ISLNK(mode)) return FileKind::link;
#if defined(S_ISSOCK)
  if (S_ISSOCK(mode)) return FileKind::socket;
#endif
  return FileKind::other;
}

FileId id_of(const struct stat& st) { return FileId{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)}; }

// The modification time in nanoseconds.
int64_t mtime_of(const struct stat& st) {
#if defined(__APPLE__)
  const struct timespec& t = st.st_mtimespec;
#else
  const struct timespec& t = st.st_mtim;  // POSIX.1-2008
#endif
  return static_cast<int64_t>(t.tv_sec) * 1000000000 + static_cast<int64_t>(t.tv_nsec);
}

void close_keeping_errno(int fd) {
  const int saved = errno;
  ::close(fd);
  errno = saved;
}

// Opens `path` read-only. Throws FileError naming the path unless it is a regular file; never blocks on a
// FIFO or a device (the open is non-blocking and the type is checked before any read).
int open_regular(const std::string& path, const std::string& role) {
  // O_NONBLOCK: opening a FIFO with no writer (or a tty, or some devices) would otherwise wait forever.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    if (errno == ENOENT) throw FileError(path + ": " + role + " is missing");
    throw_os_error("cannot open " + role, path);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    close_keeping_errno(fd);
    throw_os_error("cannot stat " + role, path);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FileError(path + ": " + role + " is " + describe(kind_of(st.st_mode)) + ", not a regular file");
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  return fd;
}

}  // namespace

std::optional<FileId> file_id(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return id_of(st);
}

FileKind file_kind(const std::string& path, bool follow_links) {
  struct stat st {};
  if ((follow_links ? ::stat(path.c_str(), &st) : ::lstat(path.c_str(), &st)) != 0)
    return errno == ENOENT ? FileKind::missing : FileKind::inaccessible;
  return kind_of(st.st_mode);
}

bool remove_file(const std::string& path) { return ::unlink(path.c_str()) == 0; }

std::optional<std::string> real_path(const std::string& path) {
  std::unique_ptr<char, decltype(&free)> resolved(::realpath(path.c_str(), nullptr), &free);
  if (!resolved) return std::nullopt;
  return std::string(resolved.get());
}

// ------------------------------------------------------------------------------------------- the SIGBUS guard
//
// A read of a mapped page past the end of a file that shrank after it was mapped raises SIGBUS, which would
// kill the process (and leave its temporary output behind). Every mapping registers its range in a fixed
// table the handler can read without locks; a SIGBUS inside one maps a zero page over the faulting page and
// marks the slot, and the read goes on. MappedFile::changed() reports the mark, and fold_file throws before
// anything is committed. A SIGBUS anywhere else goes to the handler that was there before.

namespace {

constexpr int kGuardSlots = 1024;
struct GuardSlot {
  std::atomic<uintptr_t> begin{0}, end{0};
  std::atomic<bool> used{false}, faulted{false};
};
GuardSlot g_slots[kGuardSlots];
struct sigaction g_previous {};
// Not std::mutex: libstdc++'s <mutex> needs _GNU_SOURCE, and this file compiles without it.
pthread_mutex_t g_install_lock = PTHREAD_MUTEX_INITIALIZER;
long g_page_size = 4096;
#if !defined(QDQFOLD_IO_LINUX)
int g_zero_fd = -1;  // /dev/zero, opened when the guard is installed
#endif

// A read-only page of zeros at `page`, in place of what was mapped there. Only calls that are system calls
// on every system we know (mmap), as it runs in the signal handler.
bool map_zero_page(uintptr_t page) {
  void* const at = reinterpret_cast<void*>(page);
  const auto size = static_cast<size_t>(g_page_size);
#if defined(QDQFOLD_IO_LINUX)
  return mmap(at, size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED;
#else
  if (g_zero_fd >= 0 && mmap(at, size, PROT_READ, MAP_PRIVATE | MAP_FIXED, g_zero_fd, 0) != MAP_FAILED) return true;
#if defined(MAP_ANONYMOUS)
  return mmap(at, size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED;
#elif defined(MAP_ANON)
  return mmap(at, size, PROT_READ, MAP_PRIVATE | MAP_ANON | MAP_FIXED, -1, 0) != MAP_FAILED;
#else
  return false;
#endif
#endif
}

void forward_to_previous(int sig, siginfo_t* info, void* context) {
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction) {
      g_previous.sa_sigaction(sig, info, context);
      return;
    }
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN && g_previous.sa_handler) {
    g_previous.sa_handler(sig);
    return;
  }
  // Default action: restore it and return; the faulting instruction runs again and the process ends as it
  // would have without us.
  struct sigaction fallback {};
  fallback.sa_handler = SIG_DFL;
  sigemptyset(&fallback.sa_mask);
  sigaction(sig, &fallback, nullptr);
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  const auto address = reinterpret_cast<uintptr_t>(info ? info->si_addr : nullptr);
  for (auto& slot : g_slots) {
    if (!slot.used.load(std::memory_order_acquire)) continue;
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    const uintptr_t end = slot.end.load(std::memory_order_acquire);
    if (begin != 0 && address >= begin && address < end) {
      if (map_zero_page(address & ~static_cast<uintptr_t>(g_page_size - 1))) {
        slot.faulted.store(true, std::memory_order_release);
        return;
      }
    }
  }
  forward_to_previous(sig, info, context);
}

// Installs the handler, again if someone replaced it since (Python's faulthandler does, for one).
void install_guard() {
  pthread_mutex_lock(&g_install_lock);
  struct Unlock {
    ~Unlock() { pthread_mutex_unlock(&g_install_lock); }
  } unlock;
  struct sigaction current {};
  if (sigaction(SIGBUS, nullptr, &current) != 0) return;
  if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus) return;
  g_page_size = sysconf(_SC_PAGESIZE);
#if !defined(QDQFOLD_IO_LINUX)
  if (g_zero_fd < 0) g_zero_fd = ::open("/dev/zero", O_RDONLY | O_CLOEXEC);
#endif
  struct sigaction ours {};
  ours.sa_sigaction = on_sigbus;
  ours.sa_flags = SA_SIGINFO;
#if defined(SA_NODEFER)
  ours.sa_flags |= SA_NODEFER;
#endif
#if defined(SA_ONSTACK)
  ours.sa_flags |= SA_ONSTACK;
#endif
  sigemptyset(&ours.sa_mask);
  struct sigaction previous {};
  if (sigaction(SIGBUS, &ours, &previous) == 0) g_previous = previous;
}

int claim_slot(const char* data, size_t size) {
  install_guard();
  const auto page = static_cast<uintptr_t>(g_page_size);
  for (int k = 0; k < kGuardSlots; ++k) {
    bool expected = false;
    if (g_slots[k].used.compare_exchange_strong(expected, true, std::memory_order_acq_rel)) {
      g_slots[k].faulted.store(false, std::memory_order_relaxed);
      g_slots[k].end.store((reinterpret_cast<uintptr_t>(data) + size + page - 1) & ~(page - 1),
                           std::memory_order_release);
      g_slots[k].begin.store(reinterpret_cast<uintptr_t>(data), std::memory_order_release);
      return k;
    }
  }
  return -1;  // more than kGuardSlots files mapped at once: unguarded (the size check still applies)
}

void free_slot(int k) {
  if (k < 0) return;
  g_slots[k].begin.store(0, std::memory_order_release);
  g_slots[k].end.store(0, std::memory_order_release);
  g_slots[k].used.store(false, std::memory_order_release);
}

// Gives back the resident pages of [begin, end) (page-aligned, inside the mapping of `fd` at `data`).
void drop_pages(const char* data, int fd, uintptr_t begin, uintptr_t end) {
  if (end <= begin) return;
#if defined(QDQFOLD_IO_LINUX)
  (void)data;
  (void)fd;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
#else
  // The same bytes of the same file mapped again over the range: the old pages are unmapped (atomically, as
  // MAP_FIXED replaces a mapping) and the next read faults them in from the page cache again.
  mmap(reinterpret_cast<void*>(begin), end - begin, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd,
       static_cast<off_t>(begin - reinterpret_cast<uintptr_t>(data)));
#endif
}

}  // namespace

GuardedRange::GuardedRange(const char* data, size_t size) : slot_(size > 0 ? claim_slot(data, size) : -1) {}
GuardedRange::~GuardedRange() { free_slot(slot_); }
bool GuardedRange::faulted() const {
  return slot_ >= 0 && g_slots[slot_].faulted.load(std::memory_order_acquire);
}

MappedFile::MappedFile(const std::string& path, const std::string& role) : path_(path) {
  const int fd = open_regular(path, role);
  file_ = fd;
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    close_keeping_errno(fd);
    throw_os_error("cannot stat " + role, path);
  }
  id_ = id_of(st);
  mtime_ = mtime_of(st);
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      close_keeping_errno(fd);
      throw_os_error("cannot map " + role, path);
    }
    data_ = static_cast<const char*>(p);
    guard_slot_ = claim_slot(data_, size_);
#if defined(QDQFOLD_IO_LINUX)
    madvise(p, size_, MADV_SEQUENTIAL);
#else
    posix_madvise(p, size_, POSIX_MADV_SEQUENTIAL);
#endif
  }
}

MappedFile::~MappedFile() {
  free_slot(guard_slot_);
  if (data_) munmap(const_cast<char*>(data_), size_);
  if (file_ >= 0) ::close(static_cast<int>(file_));
}

void MappedFile::drop_resident() const {
  if (!data_) return;
  const auto page = static_cast<uintptr_t>(g_page_size);
  const auto begin = reinterpret_cast<uintptr_t>(data_);
  drop_pages(data_, static_cast<int>(file_), begin, (begin + size_ + page - 1) & ~(page - 1));
}

void MappedFile::release(std::string_view bytes) const {
  if (bytes.empty() || !contains(bytes.data()) || !contains(bytes.data() + bytes.size() - 1)) return;
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = (reinterpret_cast<uintptr_t>(bytes.data()) + page - 1) & ~(page - 1);
  const auto end = (reinterpret_cast<uintptr_t>(bytes.data()) + bytes.size()) & ~(page - 1);
  drop_pages(data_, static_cast<int>(file_), begin, end);
}

bool MappedFile::changed() const {
  if (guard_slot_ >= 0 && g_slots[guard_slot_].faulted.load(std::memory_order_acquire)) return true;
  struct stat st {};
  if (::fstat(static_cast<int>(file_), &st) != 0) return true;
  return static_cast<size_t>(st.st_size) != size_ || mtime_of(st) != mtime_;
}

void MappedFile::let_go_of(const FileId&) {}  // POSIX replaces and removes mapped files

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
  const auto page = static_cast<int64_t>(g_page_size);
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
