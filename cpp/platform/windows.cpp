// The Windows backend of cpp/core/file_io.h (MinGW-w64 and MSVC): the same rules as posix.cpp with Win32
// calls. Paths are UTF-8 (as Python gives them) and converted to UTF-16 for every call.
//
//   file identity      volume serial number + file index (GetFileInformationByHandle)
//   links              reparse points (symbolic links, junctions) count as links: followed like a POSIX link
//                      for the output, resolved by real_path() (GetFinalPathNameByHandleW) for reads
//   special files      anything GetFileType does not call a disk file (NUL, CON, pipes) is refused
//   mapping            CreateFileMappingW + MapViewOfFile; a mapped file cannot be truncated on Windows, so
//                      there is no SIGBUS to guard against: changed() compares size and last-write time
//   drop resident      VirtualUnlock of unlocked pages takes them out of the working set
//   temporary output   CreateFileW(CREATE_NEW) of ".<name>.<random>.tmp" beside the destination; every write
//                      is positional (OVERLAPPED offsets), so write() and pwrite_all() mix freely
//   commit             MoveFileExW(MOVEFILE_REPLACE_EXISTING): atomic on one volume
#include "backend.h"

#if defined(QDQFOLD_IO_WINDOWS)

#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <windows.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../core/file_io.h"
#include "common.h"

namespace qdqfold::io {

const char* backend_name() { return "windows"; }

namespace {

thread_local DWORD g_last_error = 0;  // the reason throw_os_error gives: of the last call here that failed

void remember_error() { g_last_error = GetLastError(); }

bool is_missing(DWORD error) { return error == ERROR_FILE_NOT_FOUND || error == ERROR_PATH_NOT_FOUND; }

std::wstring wide(const std::string& s) {
  if (s.empty()) return {};
  const int n = MultiByteToWideChar(CP_UTF8, 0, s.data(), static_cast<int>(s.size()), nullptr, 0);
  std::wstring w(static_cast<size_t>(n), L'\0');
  MultiByteToWideChar(CP_UTF8, 0, s.data(), static_cast<int>(s.size()), w.data(), n);
  return w;
}

std::string narrow(const wchar_t* w, size_t size) {
  if (size == 0) return {};
  const int n = WideCharToMultiByte(CP_UTF8, 0, w, static_cast<int>(size), nullptr, 0, nullptr, nullptr);
  std::string s(static_cast<size_t>(n), '\0');
  WideCharToMultiByte(CP_UTF8, 0, w, static_cast<int>(size), s.data(), n, nullptr, nullptr);
  return s;
}

std::string error_text(DWORD code) {
  wchar_t* buffer = nullptr;
  const DWORD n = FormatMessageW(FORMAT_MESSAGE_ALLOCATE_BUFFER | FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS,
                                 nullptr, code, 0, reinterpret_cast<wchar_t*>(&buffer), 0, nullptr);
  std::string text = n ? narrow(buffer, n) : "Windows error " + std::to_string(code);
  if (buffer) LocalFree(buffer);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ' || text.back() == '.'))
    text.pop_back();
  return text;
}

HANDLE handle_of(intptr_t h) { return reinterpret_cast<HANDLE>(h); }

constexpr DWORD kShareAll = FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE;

// A handle for asking about `path` (directories too); INVALID_HANDLE_VALUE with the error remembered.
HANDLE open_for_query(const std::string& path, bool follow_links) {
  HANDLE h = CreateFileW(wide(path).c_str(), FILE_READ_ATTRIBUTES, kShareAll, nullptr, OPEN_EXISTING,
                         FILE_FLAG_BACKUP_SEMANTICS | (follow_links ? 0 : FILE_FLAG_OPEN_REPARSE_POINT), nullptr);
  if (h == INVALID_HANDLE_VALUE) remember_error();
  return h;
}

FileId id_of(const BY_HANDLE_FILE_INFORMATION& info) {
  return FileId{info.dwVolumeSerialNumber, (uint64_t(info.nFileIndexHigh) << 32) | info.nFileIndexLow};
}
uint64_t size_of(const BY_HANDLE_FILE_INFORMATION& info) { return (uint64_t(info.nFileSizeHigh) << 32) | info.nFileSizeLow; }
int64_t write_time_of(const BY_HANDLE_FILE_INFORMATION& info) {
  return static_cast<int64_t>((uint64_t(info.ftLastWriteTime.dwHighDateTime) << 32) | info.ftLastWriteTime.dwLowDateTime);
}

// The kind of the file an open handle is.
FileKind kind_of(HANDLE h) {
  switch (GetFileType(h)) {
    case FILE_TYPE_CHAR: return FileKind::character_device;
    case FILE_TYPE_PIPE: return FileKind::fifo;
    case FILE_TYPE_DISK: break;
    default: return FileKind::other;
  }
  BY_HANDLE_FILE_INFORMATION info{};
  if (!GetFileInformationByHandle(h, &info)) return FileKind::other;
  if (info.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY) return FileKind::directory;
  return FileKind::regular;
}

}  // namespace

namespace {
// Every MappedFile alive in this process, with the thread that made it, for let_go_of().
std::mutex g_mapped_lock;
std::vector<std::pair<MappedFile*, std::thread::id>> g_mapped;

// After `call` failed because `path` is mapped here (an in-place fold replacing or removing a file it read):
// lets go of those mappings and tries once more. GetLastError() is the failure's when it returns false.
template <typename Call>
bool retry_unmapped(const std::string& path, Call call) {
  const DWORD error = GetLastError();
  if (error != ERROR_ACCESS_DENIED && error != ERROR_SHARING_VIOLATION && error != ERROR_USER_MAPPED_FILE) return false;
  const auto id = file_id(path);
  SetLastError(error);
  if (!id) return false;
  MappedFile::let_go_of(*id);
  return call();
}
}  // namespace

void throw_os_error(const std::string& what, const std::string& path) {
  throw FileError(path + ": " + what + ": " + error_text(g_last_error));
}

std::optional<FileId> file_id(const std::string& path) {
  HANDLE h = open_for_query(path, true);
  if (h == INVALID_HANDLE_VALUE) return std::nullopt;
  BY_HANDLE_FILE_INFORMATION info{};
  const bool ok = GetFileInformationByHandle(h, &info);
  if (!ok) remember_error();
  CloseHandle(h);
  if (!ok) return std::nullopt;
  return id_of(info);
}

FileKind file_kind(const std::string& path, bool follow_links) {
  if (!follow_links) {
    const DWORD attributes = GetFileAttributesW(wide(path).c_str());
    if (attributes == INVALID_FILE_ATTRIBUTES) {
      remember_error();
      return is_missing(g_last_error) ? FileKind::missing : FileKind::inaccessible;
    }
    if (attributes & FILE_ATTRIBUTE_REPARSE_POINT) return FileKind::link;
  }
  HANDLE h = open_for_query(path, true);
  if (h == INVALID_HANDLE_VALUE) return is_missing(g_last_error) ? FileKind::missing : FileKind::inaccessible;
  const FileKind kind = kind_of(h);
  CloseHandle(h);
  return kind;
}

bool remove_file(const std::string& path) {
  auto remove = [&path] { return DeleteFileW(wide(path).c_str()) != 0; };
  if (remove() || retry_unmapped(path, remove)) return true;
  remember_error();
  return false;
}

std::optional<std::string> real_path(const std::string& path) {
  HANDLE h = open_for_query(path, true);
  if (h == INVALID_HANDLE_VALUE) return std::nullopt;
  std::wstring buffer(512, L'\0');
  DWORD n = GetFinalPathNameByHandleW(h, buffer.data(), static_cast<DWORD>(buffer.size()), FILE_NAME_NORMALIZED | VOLUME_NAME_DOS);
  if (n >= buffer.size()) {
    buffer.resize(n + 1);
    n = GetFinalPathNameByHandleW(h, buffer.data(), static_cast<DWORD>(buffer.size()), FILE_NAME_NORMALIZED | VOLUME_NAME_DOS);
  }
  if (n == 0 || n >= buffer.size()) {
    remember_error();
    CloseHandle(h);
    return std::nullopt;
  }
  CloseHandle(h);
  buffer.resize(n);
  // "\\?\C:\models\m.onnx" -> "C:/models/m.onnx"; "\\?\UNC\server\share\m.onnx" -> "//server/share/m.onnx".
  if (buffer.rfind(L"\\\\?\\UNC\\", 0) == 0) buffer = L"\\\\" + buffer.substr(8);
  else if (buffer.rfind(L"\\\\?\\", 0) == 0) buffer = buffer.substr(4);
  std::replace(buffer.begin(), buffer.end(), L'\\', L'/');
  return narrow(buffer.data(), buffer.size());
}

// ---------------------------------------------------------------------------------------------- reading


// Only the calling thread's mappings: a fold maps its files and commits its outputs on one thread, and a
// mapping another fold is reading at the same time stays (that commit then fails, naming the file).
void MappedFile::let_go_of(const FileId& id) {
  std::lock_guard<std::mutex> hold(g_mapped_lock);
  for (const auto& [m, thread] : g_mapped) {
    if (m->id_ != id || m->let_go_ || thread != std::this_thread::get_id()) continue;
    if (m->data_) UnmapViewOfFile(m->data_);
    if (m->file_ != -1) CloseHandle(handle_of(m->file_));
    m->data_ = nullptr;
    m->file_ = -1;
    m->size_ = 0;
    m->let_go_ = true;
  }
}

// No guard on Windows (a read error on a mapped page would need structured exceptions; see docs/development.md,
// "The platform layer"): a caller's buffer is read as it is.
GuardedRange::GuardedRange(const char*, size_t) {}
GuardedRange::~GuardedRange() = default;
bool GuardedRange::faulted() const { return false; }

MappedFile::MappedFile(const std::string& path, const std::string& role) : path_(path) {
  // FILE_FLAG_BACKUP_SEMANTICS opens a directory too, so it is named as one instead of "access denied".
  // FILE_SHARE_DELETE: the fold may rename its output over this file (in place), as on POSIX.
  HANDLE h = CreateFileW(wide(path).c_str(), GENERIC_READ, kShareAll, nullptr, OPEN_EXISTING,
                         FILE_FLAG_BACKUP_SEMANTICS | FILE_FLAG_SEQUENTIAL_SCAN, nullptr);
  if (h == INVALID_HANDLE_VALUE) {
    remember_error();
    if (is_missing(g_last_error)) throw FileError(path + ": " + role + " is missing");
    throw_os_error("cannot open " + role, path);
  }
  file_ = reinterpret_cast<intptr_t>(h);
  const FileKind kind = kind_of(h);
  if (kind != FileKind::regular) {
    CloseHandle(h);
    file_ = -1;
    throw FileError(path + ": " + role + " is " + describe(kind) + ", not a regular file");
  }
  BY_HANDLE_FILE_INFORMATION info{};
  if (!GetFileInformationByHandle(h, &info)) {
    remember_error();
    CloseHandle(h);
    file_ = -1;
    throw_os_error("cannot stat " + role, path);
  }
  id_ = id_of(info);
  mtime_ = write_time_of(info);
  size_ = static_cast<size_t>(size_of(info));
  if (size_ > 0) {
    HANDLE mapping = CreateFileMappingW(h, nullptr, PAGE_READONLY, 0, 0, nullptr);
    const void* p = mapping ? MapViewOfFile(mapping, FILE_MAP_READ, 0, 0, 0) : nullptr;
    if (!p) remember_error();
    if (mapping) CloseHandle(mapping);  // the view keeps the section
    if (!p) {
      CloseHandle(h);
      file_ = -1;
      throw_os_error("cannot map " + role, path);
    }
    data_ = static_cast<const char*>(p);
  }
  std::lock_guard<std::mutex> hold(g_mapped_lock);
  g_mapped.emplace_back(this, std::this_thread::get_id());
}

MappedFile::~MappedFile() {
  {
    std::lock_guard<std::mutex> hold(g_mapped_lock);
    g_mapped.erase(std::remove_if(g_mapped.begin(), g_mapped.end(), [this](const auto& m) { return m.first == this; }),
                   g_mapped.end());
  }
  if (data_) UnmapViewOfFile(data_);
  if (file_ != -1) CloseHandle(handle_of(file_));
}

void MappedFile::drop_resident() const {
  if (data_) VirtualUnlock(const_cast<char*>(data_), size_);  // fails with ERROR_NOT_LOCKED, as intended
}

void MappedFile::release(std::string_view bytes) const {
  if (bytes.empty() || !contains(bytes.data()) || !contains(bytes.data() + bytes.size() - 1)) return;
  SYSTEM_INFO system{};
  GetSystemInfo(&system);
  const auto page = static_cast<uintptr_t>(system.dwPageSize);
  const auto begin = (reinterpret_cast<uintptr_t>(bytes.data()) + page - 1) & ~(page - 1);
  const auto end = (reinterpret_cast<uintptr_t>(bytes.data()) + bytes.size()) & ~(page - 1);
  if (end > begin) VirtualUnlock(reinterpret_cast<void*>(begin), end - begin);
}

bool MappedFile::changed() const {
  if (let_go_) return false;  // replaced by this fold's own commit, after everything was read and checked
  BY_HANDLE_FILE_INFORMATION info{};
  if (!GetFileInformationByHandle(handle_of(file_), &info)) return true;
  return size_of(info) != size_ || write_time_of(info) != mtime_;
}

// ---------------------------------------------------------------------------------------------- writing

OutputFile::OutputFile(std::string destination, std::string mode_like)
    : destination_(std::move(destination)), mode_like_(std::move(mode_like)) {  // mode_like: POSIX modes only
  const std::string prefix = directory_of(destination_) + "/." + file_name_of(destination_) + ".";
  HANDLE h = INVALID_HANDLE_VALUE;
  for (int attempt = 0; attempt < 100 && h == INVALID_HANDLE_VALUE; ++attempt) {
    temp_ = prefix + detail::unique_letters(6) + ".tmp";
    h = CreateFileW(wide(temp_).c_str(), GENERIC_WRITE, FILE_SHARE_READ | FILE_SHARE_DELETE, nullptr, CREATE_NEW,
                    FILE_ATTRIBUTE_NORMAL, nullptr);
    if (h == INVALID_HANDLE_VALUE) {
      remember_error();
      if (g_last_error != ERROR_FILE_EXISTS && g_last_error != ERROR_ALREADY_EXISTS) break;
    }
  }
  if (h == INVALID_HANDLE_VALUE) throw_os_error("cannot write", destination_);
  file_ = reinterpret_cast<intptr_t>(h);
}

OutputFile::~OutputFile() {
  if (file_ != -1) CloseHandle(handle_of(file_));
  if (!committed_) DeleteFileW(wide(temp_).c_str());
}

void OutputFile::write(const char* p, size_t n) {
  pwrite_all(p, n, position_);
  position_ += static_cast<int64_t>(n);
}

void OutputFile::pwrite_all(const char* p, size_t n, int64_t offset) {
  while (n > 0) {
    const DWORD chunk = static_cast<DWORD>(std::min<size_t>(n, size_t(1) << 30));
    OVERLAPPED at{};
    at.Offset = static_cast<DWORD>(static_cast<uint64_t>(offset));
    at.OffsetHigh = static_cast<DWORD>(static_cast<uint64_t>(offset) >> 32);
    DWORD written = 0;
    if (!WriteFile(handle_of(file_), p, chunk, &written, &at) || written == 0) {
      remember_error();
      throw_os_error("cannot write", destination_);
    }
    p += written;
    n -= written;
    offset += written;
  }
}

void OutputFile::copy_from(const MappedFile& in, int64_t offset, size_t n) {
  if (static_cast<size_t>(offset) + n > in.view().size())
    throw FileError(in.path() + ": the input changed while it was being folded");
  write(in.view().data() + offset, n);
}

void OutputFile::commit() {
  HANDLE h = handle_of(file_);
  file_ = -1;
  if (!CloseHandle(h)) {
    remember_error();
    throw_os_error("cannot write", destination_);
  }
  auto move = [this] { return MoveFileExW(wide(temp_).c_str(), wide(destination_).c_str(), MOVEFILE_REPLACE_EXISTING) != 0; };
  if (!move() && !retry_unmapped(destination_, move)) {
    remember_error();
    throw_os_error("cannot write", destination_);
  }
  committed_ = true;
}

}  // namespace qdqfold::io

#endif  // QDQFOLD_IO_WINDOWS
