#include "file_io.h"

#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <mutex>

namespace qdqfold::io {

void throw_os_error(const std::string& what, const std::string& path) {
  throw FileError(path + ": " + what + ": " + std::strerror(errno));
}

std::optional<FileId> file_id(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return FileId{st.st_dev, st.st_ino};
}

const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISLNK(mode)) return "a symbolic link";
  return "not a regular file";
}

std::string directory_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string file_name_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::optional<std::string> real_path(const std::string& path) {
  std::unique_ptr<char, decltype(&free)> resolved(::realpath(path.c_str(), nullptr), &free);
  if (!resolved) return std::nullopt;
  return std::string(resolved.get());
}

bool is_inside(const std::string& path, const std::string& directory) {
  if (directory == "/") return path.size() > 1 && path[0] == '/';
  return path.size() > directory.size() + 1 && path.compare(0, directory.size(), directory) == 0 &&
         path[directory.size()] == '/';
}

int open_regular(const std::string& path, const std::string& role) {
  // O_NONBLOCK: opening a FIFO with no writer (or a tty, or some devices) would otherwise wait forever.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    if (errno == ENOENT) throw FileError(path + ": " + role + " is missing");
    throw_os_error("cannot open " + role, path);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int saved = errno;
    ::close(fd);
    errno = saved;
    throw_os_error("cannot stat " + role, path);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FileError(path + ": " + role + " is " + file_kind(st.st_mode) + ", not a regular file");
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  return fd;
}

// ------------------------------------------------------------------------------------------- the SIGBUS guard
//
// A read of a mapped page past the end of a file that shrank after it was mapped raises SIGBUS, which would
// kill the process (and leave its temporary output behind). Every mapping registers its range in a fixed
// table the handler can read without locks; a SIGBUS inside one maps an anonymous zero page over the faulting
// page and marks the slot, and the read goes on. MappedFile::changed() reports the mark, and fold_file throws
// before anything is committed. A SIGBUS anywhere else goes to the handler that was there before.

namespace {

constexpr int kGuardSlots = 1024;
struct GuardSlot {
  std::atomic<uintptr_t> begin{0}, end{0};
  std::atomic<bool> used{false}, faulted{false};
};
GuardSlot g_slots[kGuardSlots];
struct sigaction g_previous {};
std::mutex g_install_lock;
long g_page_size = 4096;

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
      const uintptr_t page = address & ~static_cast<uintptr_t>(g_page_size - 1);
      void* p = mmap(reinterpret_cast<void*>(page), static_cast<size_t>(g_page_size), PROT_READ,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      if (p != MAP_FAILED) {
        slot.faulted.store(true, std::memory_order_release);
        return;
      }
    }
  }
  forward_to_previous(sig, info, context);
}

// Installs the handler, again if someone replaced it since (Python's faulthandler does, for one).
void install_guard() {
  std::lock_guard<std::mutex> hold(g_install_lock);
  struct sigaction current {};
  if (sigaction(SIGBUS, nullptr, &current) != 0) return;
  if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus) return;
  g_page_size = sysconf(_SC_PAGESIZE);
  struct sigaction ours {};
  ours.sa_sigaction = on_sigbus;
  ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
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

}  // namespace

GuardedRange::GuardedRange(const char* data, size_t size) : slot_(size > 0 ? claim_slot(data, size) : -1) {}
GuardedRange::~GuardedRange() { free_slot(slot_); }
bool GuardedRange::faulted() const {
  return slot_ >= 0 && g_slots[slot_].faulted.load(std::memory_order_acquire);
}

MappedFile::MappedFile(const std::string& path, const std::string& role) : path_(path) {
  fd_ = open_regular(path, role);
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    ::close(fd_);
    throw_os_error("cannot stat " + role, path);
  }
  id_ = FileId{st.st_dev, st.st_ino};
  mtime_ = st.st_mtim;
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (p == MAP_FAILED) {
      const int saved = errno;
      ::close(fd_);
      errno = saved;
      throw_os_error("cannot map " + role, path);
    }
    data_ = static_cast<const char*>(p);
    guard_slot_ = claim_slot(data_, size_);
    madvise(p, size_, MADV_SEQUENTIAL);
  }
}

MappedFile::~MappedFile() {
  free_slot(guard_slot_);
  if (data_) munmap(const_cast<char*>(data_), size_);
  if (fd_ >= 0) ::close(fd_);
}

void MappedFile::drop_resident() const {
  if (data_) madvise(const_cast<char*>(data_), size_, MADV_DONTNEED);
}

void MappedFile::release(std::string_view bytes) const {
  if (bytes.empty() || !contains(bytes.data()) || !contains(bytes.data() + bytes.size() - 1)) return;
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = (reinterpret_cast<uintptr_t>(bytes.data()) + page - 1) & ~(page - 1);
  const auto end = (reinterpret_cast<uintptr_t>(bytes.data()) + bytes.size()) & ~(page - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

bool MappedFile::changed() const {
  if (guard_slot_ >= 0 && g_slots[guard_slot_].faulted.load(std::memory_order_acquire)) return true;
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return true;
  return static_cast<size_t>(st.st_size) != size_ || st.st_mtim.tv_sec != mtime_.tv_sec ||
         st.st_mtim.tv_nsec != mtime_.tv_nsec;
}

// ------------------------------------------------------------------------------------------------- writing

OutputFile::OutputFile(std::string destination) : destination_(std::move(destination)) {
  temp_ = directory_of(destination_) + "/." + file_name_of(destination_) + ".XXXXXX.tmp";
  fd_ = mkstemps(temp_.data(), 4);
  if (fd_ < 0) throw_os_error("cannot write", destination_);
}

OutputFile::~OutputFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(temp_.c_str());
}

void OutputFile::write(const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd_, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw_os_error("cannot write", destination_);
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void OutputFile::pwrite_all(const char* p, size_t n, int64_t offset) {
  while (n > 0) {
    ssize_t w = ::pwrite(fd_, p, n, offset);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw_os_error("cannot write", destination_);
    p += w;
    n -= static_cast<size_t>(w);
    offset += w;
  }
}

void OutputFile::copy_from(const MappedFile& in, int64_t offset, size_t n) {
  loff_t from = offset;
  while (n > 0) {
    ssize_t c = copy_file_range(in.fd(), &from, fd_, nullptr, n, 0);
    if (c < 0 && errno == EINTR) continue;
    if (c <= 0) {  // not supported here, or the input ended early: write from the mapping (guarded)
      if (static_cast<size_t>(from) + n > in.view().size())
        throw FileError(in.path() + ": the input changed while it was being folded");
      write(in.view().data() + from, n);
      return;
    }
    n -= static_cast<size_t>(c);
  }
}

void OutputFile::commit() {
  mode_t mask = umask(0);
  umask(mask);
  fchmod(fd_, 0666 & ~mask);
  if (::close(fd_) != 0) {
    fd_ = -1;
    throw_os_error("cannot write", destination_);
  }
  fd_ = -1;
  if (::rename(temp_.c_str(), destination_.c_str()) != 0) throw_os_error("cannot write", destination_);
  committed_ = true;
}

// ---------------------------------------------------------------------------------------------- interrupts

namespace {
std::atomic<uint64_t> g_interrupts{0};
}

void interrupt() { g_interrupts.fetch_add(1, std::memory_order_acq_rel); }
uint64_t interrupt_generation() { return g_interrupts.load(std::memory_order_acquire); }

}  // namespace qdqfold::io
