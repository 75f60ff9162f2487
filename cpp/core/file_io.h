// The files fold_file reads and writes, and nothing else of the operating system: every open, map, write and
// rename goes through here, so the rules a downloaded model can never bend are written once.
//
//   reading:  open_regular()  refuses FIFOs, devices, sockets and directories before anything can block on
//                             them (O_NONBLOCK), and names what the path is instead.
//             MappedFile      a read-only mapping whose reads never kill the process: a SIGBUS in it (the file
//                             was truncated underneath) maps a zero page there and marks the mapping, and
//                             changed() tells the caller, who throws "the input changed while it was being
//                             folded" instead of writing an output computed from zeros.
//   writing:  OutputFile      a temporary file beside the destination, renamed over it by commit(), removed on
//                             every other way out (exceptions included).
//   errors:   FileError       a FoldError about one file: its message starts with that file's path.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "api.h"

namespace qdqfold::io {

// A FoldError caused by one file (cannot open, cannot write, not a regular file, changed while read, refused
// to overwrite): the message starts with the path at fault, so callers never put another path in front.
class FileError : public FoldError {
 public:
  using FoldError::FoldError;
};

// "path: what: strerror(errno)".
[[noreturn]] void throw_os_error(const std::string& what, const std::string& path);

// Which file a path names (after links): two names of one file compare equal.
struct FileId {
  dev_t device = 0;
  ino_t inode = 0;
  bool operator==(const FileId& o) const { return device == o.device && inode == o.inode; }
  bool operator!=(const FileId& o) const { return !(*this == o); }
  bool operator<(const FileId& o) const { return device != o.device ? device < o.device : inode < o.inode; }
};
std::optional<FileId> file_id(const std::string& path);  // nullopt when it does not exist (or cannot be stat'ed)

// "a FIFO", "a directory", "a character device", ... for a file type that is not a regular file.
const char* file_kind(mode_t mode);

std::string directory_of(const std::string& path);
std::string file_name_of(const std::string& path);
// The absolute path with every link resolved; nullopt when it does not exist.
std::optional<std::string> real_path(const std::string& path);
// True when `path` (absolute, links resolved) lies inside `directory` (absolute, links resolved).
bool is_inside(const std::string& path, const std::string& directory);

// Opens `path` read-only. Throws FileError naming the path unless it is a regular file; never blocks on a
// FIFO or a device (the open is non-blocking and the type is checked before any read). `role` says what the
// file is, with its article, for the message ("the model", "the external data file of tensor 'w'").
int open_regular(const std::string& path, const std::string& role);

// A read-only mapping of a whole regular file (see the header comment for its guard).
class MappedFile {
 public:
  MappedFile(const std::string& path, const std::string& role);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::string_view view() const { return {data_ ? data_ : "", size_}; }
  // Gives back the resident pages of the mapping: they stay in the page cache, and a later read maps them
  // again, but this process's memory does not grow with every weight it reads.
  void drop_resident() const;
  // The same for the whole pages inside `bytes`, when they lie in this mapping.
  void release(std::string_view bytes) const;
  bool contains(const char* p) const { return data_ && p >= data_ && p < data_ + size_; }
  int64_t offset_of(const char* p) const { return p - data_; }
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  FileId id() const { return id_; }
  // True when the file was truncated, grown or written since it was opened (a read past its new end hit
  // the guard, or its size or modification time differ now).
  bool changed() const;

 private:
  std::string path_;
  int fd_ = -1;
  const char* data_ = nullptr;
  size_t size_ = 0;
  FileId id_;
  struct timespec mtime_ {};
  int guard_slot_ = -1;
};

// A temporary file beside `destination`, renamed over it by commit(); removed if never committed.
class OutputFile {
 public:
  explicit OutputFile(std::string destination);
  ~OutputFile();
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  void write(const char* p, size_t n);
  void pwrite_all(const char* p, size_t n, int64_t offset);
  // Copies [offset, offset + n) of `in` to the current end, inside the kernel where it can.
  void copy_from(const MappedFile& in, int64_t offset, size_t n);
  // Gives the file the permissions a plain create would (mkstemp makes it 0600), closes and renames it.
  void commit();
  const std::string& destination() const { return destination_; }

 private:
  std::string destination_, temp_;
  int fd_ = -1;
  bool committed_ = false;
};

// Guards a mapping this module did not make (a caller's mmap handed over as a buffer): while the guard lives,
// a SIGBUS inside [data, data + size) reads zeros instead of killing the process, and faulted() says it
// happened (the file behind the mapping shrank). A no-op for memory that is not file-backed.
class GuardedRange {
 public:
  GuardedRange(const char* data, size_t size);
  ~GuardedRange();
  GuardedRange(const GuardedRange&) = delete;
  GuardedRange& operator=(const GuardedRange&) = delete;
  bool faulted() const;

 private:
  int slot_ = -1;
};

// Interrupting running folds (the CLI's Ctrl-C): interrupt() makes every fold_file started before it stop at
// its next chunk, remove its temporary files and throw FileError("<output>: interrupted"). A fold started
// after the call is not affected.
void interrupt();
uint64_t interrupt_generation();

}  // namespace qdqfold::io
