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
// The output file (OutputFile) is in posix_output.cpp.
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

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

#include "../core/file_io.h"
#include "common.h"
#include "posix_detail.h"

#if defined(__GLIBC__) && !defined(__USE_XOPEN_EXTENDED) && !defined(__USE_MISC)
// POSIX.1-2008 moved realpath() from the XSI option to the base, but glibc still declares it only for X/Open
// (a strict -D_POSIX_C_SOURCE=200809L compile, tools/check_portable.sh): the function is there.
extern "C" char* realpath(const char* path, char* resolved);
#endif

namespace qdqfold::io {

using detail::close_keeping_errno;

const char* backend_name() {
#if defined(QDQFOLD_IO_LINUX)
  return "linux";
#else
  return "posix";
#endif
}

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

void detail::close_keeping_errno(int fd) {
  const int saved = errno;
  ::close(fd);
  errno = saved;
}

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

long detail::page_size() { return g_page_size; }

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

}  // namespace qdqfold::io

#endif  // !QDQFOLD_IO_WINDOWS
