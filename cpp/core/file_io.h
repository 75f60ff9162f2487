// The files fold_file reads and writes, and nothing else of the operating system: every open, map, write and
// rename goes through here, so the rules a downloaded model can never bend are written once.
//
//   reading:  MappedFile      refuses FIFOs, devices, sockets and directories before anything can block on
//                             them (O_NONBLOCK), and names what the path is instead; then a read-only
//                             mapping whose reads never kill the process: a SIGBUS in it (the file
//                             was truncated underneath) maps a zero page there and marks the mapping, and
//                             changed() tells the caller, who throws "the input changed while it was being
//                             folded" instead of writing an output computed from zeros.
//   writing:  OutputFile      a temporary file beside the destination, renamed over it by commit(), removed on
//                             every other way out (exceptions included).
//   errors:   FileError       a FoldError about one file: its message starts with that file's path.
//
// This header is the whole interface; no operating system header is included here. The backends
// (cpp/platform/, chosen at compile time, see cpp/platform/backend.h) implement it:
//   posix.cpp    Linux (copy_file_range, mkstemps, madvise, an anonymous zero page for the guard) and, with
//                QDQFOLD_PORTABLE_IO or on any other POSIX system, the same file rules with POSIX.1-2008
//                calls only (write from the mapping, O_EXCL temporary files, a /dev/zero page for the guard).
//   windows.cpp  Win32 (CreateFileMappingW, MoveFileExW(MOVEFILE_REPLACE_EXISTING), volume serial number +
//                file index as file identity, reparse points as links).
//   common.cpp   what is the same everywhere: paths as strings, interrupts.
#pragma once

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

// "path: what: <the operating system's reason for the last failed call of this thread>".
[[noreturn]] void throw_os_error(const std::string& what, const std::string& path);

// `text` on one line: control characters escaped (newline "\n", tab "\t", carriage return "\r", others
// "\xNN"), so that a path holding a newline cannot split a message in two.
std::string one_line(const std::string& text);

// Which file a path names (after links): two names of one file compare equal. POSIX: device and inode;
// Windows: volume serial number and file index.
struct FileId {
  uint64_t device = 0;
  uint64_t inode = 0;
  bool operator==(const FileId& o) const { return device == o.device && inode == o.inode; }
  bool operator!=(const FileId& o) const { return !(*this == o); }
  bool operator<(const FileId& o) const { return device != o.device ? device < o.device : inode < o.inode; }
};
std::optional<FileId> file_id(const std::string& path);  // nullopt when it does not exist (or cannot be stat'ed)

// What a path names. `inaccessible`: it could not be examined for another reason than not existing (the
// reason is kept for throw_os_error).
enum class FileKind { missing, inaccessible, regular, directory, link, fifo, character_device, block_device, socket, other };
// The kind of file at `path`; a symbolic link (Windows: a reparse point) is reported as `link` unless
// `follow_links`, when the file it leads to is examined.
FileKind file_kind(const std::string& path, bool follow_links);
// "a FIFO", "a directory", "a character device", ... for a file type that is not a regular file.
const char* describe(FileKind kind);
// Removes the file `path` (not a directory); false when it could not be removed.
bool remove_file(const std::string& path);

std::string directory_of(const std::string& path);
std::string file_name_of(const std::string& path);
// The absolute path with every link resolved; nullopt when it does not exist.
std::optional<std::string> real_path(const std::string& path);
// On Windows both '/' and '\\' separate names, and real_path gives '/' throughout ("C:/models/m.onnx").
// True when `path` (absolute, links resolved) lies inside `directory` (absolute, links resolved).
bool is_inside(const std::string& path, const std::string& directory);

// A read-only mapping of a whole regular file (see the header comment for its guard). The constructor throws
// FileError naming the path unless it is a regular file, and never blocks on a FIFO or a device (POSIX: the
// open is non-blocking and the type is checked before any read). `role` says what the file is, with its
// article, for the message ("the model", "the external data file of tensor 'w'").
//
// Windows has no SIGBUS: a mapped file cannot be truncated there while the mapping exists (SetEndOfFile
// fails), so the guard is the size and last-write-time comparison of changed() alone. A read error of a
// mapped page (EXCEPTION_IN_PAGE_ERROR: a network file gone, a disk error) is not caught, as structured
// exceptions would be compiler-specific; it ends the process as it would any Windows program.
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
  const std::string& path() const { return path_; }
  FileId id() const { return id_; }
  // True when the file was truncated, grown or written since it was opened (a read past its new end hit
  // the guard, or its size or modification time differ now).
  bool changed() const;

  // Windows only (a no-op elsewhere): a file this process maps can be neither replaced nor removed there. An
  // in-place fold commits its outputs over files it read, and removes some, after it has read everything:
  // OutputFile::commit() and remove_file() then call this to unmap the calling thread's mappings of that
  // file and close them (view() is empty afterwards, and changed() false).
  static void let_go_of(const FileId& id);

 private:
  friend class OutputFile;
  std::string path_;
  intptr_t file_ = -1;     // POSIX: the descriptor; Windows: the file HANDLE
  const char* data_ = nullptr;
  size_t size_ = 0;
  FileId id_;
  int64_t mtime_ = 0;      // the modification time when opened, in the backend's unit
  int guard_slot_ = -1;    // POSIX: the SIGBUS guard's slot for this mapping
  bool let_go_ = false;    // Windows: unmapped and closed by let_go_of()
};

// A temporary file beside `destination`, renamed over it by commit(); removed if never committed.
// `mode_like`: the file whose mode (and owner) the new file takes when it exists (empty: `destination`); a data
// file follows its model file this way.
class OutputFile {
 public:
  explicit OutputFile(std::string destination, std::string mode_like = {});
  ~OutputFile();
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  void write(const char* p, size_t n);
  void pwrite_all(const char* p, size_t n, int64_t offset);
  // Copies [offset, offset + n) of `in` to the current end, inside the kernel where it can.
  void copy_from(const MappedFile& in, int64_t offset, size_t n);
  // Gives the file the mode cp and install would (POSIX: the temporary file is made 0600): an existing
  // `mode_like` file's mode, owner and group where permitted, and (Linux) extended attributes; else the
  // umask's mode (0666 & ~umask). Then closes it and renames it over the destination (Windows: MoveFileExW
  // with MOVEFILE_REPLACE_EXISTING).
  void commit();
  const std::string& destination() const { return destination_; }

 private:
  std::string destination_, mode_like_, temp_;
  intptr_t file_ = -1;     // POSIX: the descriptor; Windows: the HANDLE
  int64_t position_ = 0;   // Windows: where write() goes next (every write there is positional)
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

// The backend this build compiled (cpp/platform/backend.h): "linux", "posix" (POSIX.1-2008 only, e.g. Linux
// with -DQDQFOLD_PORTABLE_IO=ON, which only the platform sources see) or "windows".
const char* backend_name();

}  // namespace qdqfold::io
