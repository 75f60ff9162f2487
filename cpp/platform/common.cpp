// The parts of cpp/core/file_io.h that are the same on every system: paths as strings, file kinds as words,
// interrupts. No operating system header.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <random>

#include "../core/file_io.h"
#include "backend.h"
#include "common.h"

namespace qdqfold::io {

namespace {
bool is_separator(char c) {
#if defined(QDQFOLD_IO_WINDOWS)
  return c == '/' || c == '\\';
#else
  return c == '/';
#endif
}

size_t last_separator(const std::string& path) {
  for (size_t k = path.size(); k > 0; --k)
    if (is_separator(path[k - 1])) return k - 1;
  return std::string::npos;
}
}  // namespace

std::string one_line(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u != 0x7f) {
      out.push_back(c);
      continue;
    }
    static constexpr char kHex[] = "0123456789abcdef";
    switch (c) {
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default: out += "\\x"; out.push_back(kHex[u >> 4]); out.push_back(kHex[u & 15]);
    }
  }
  return out;
}

const char* describe(FileKind kind) {
  switch (kind) {
    case FileKind::directory: return "a directory";
    case FileKind::fifo: return "a FIFO (named pipe)";
    case FileKind::character_device: return "a character device";
    case FileKind::block_device: return "a block device";
    case FileKind::socket: return "a socket";
    case FileKind::link: return "a symbolic link";
    default: return "not a regular file";
  }
}

std::string directory_of(const std::string& path) {
  const size_t slash = last_separator(path);
  if (slash == std::string::npos) return ".";
#if defined(QDQFOLD_IO_WINDOWS)
  if (slash == 2 && path[1] == ':') return path.substr(0, 3);  // "C:/m.onnx": "C:/" (not "C:", which is a
                                                                 // drive's current directory)
#endif
  return slash == 0 ? path.substr(0, 1) : path.substr(0, slash);
}

std::string file_name_of(const std::string& path) {
  const size_t slash = last_separator(path);
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

bool is_inside(const std::string& path, const std::string& directory) {
  // A directory that ends with a separator is a root ("/", "C:/"): everything below it starts with it.
  if (!directory.empty() && directory.back() == '/')
    return path.size() > directory.size() && path.compare(0, directory.size(), directory) == 0;
  return path.size() > directory.size() + 1 && path.compare(0, directory.size(), directory) == 0 &&
         path[directory.size()] == '/';
}

// ---------------------------------------------------------------------------------------------- interrupts

namespace {
std::atomic<uint64_t> g_interrupts{0};
}

void interrupt() { g_interrupts.fetch_add(1, std::memory_order_acq_rel); }
uint64_t interrupt_generation() { return g_interrupts.load(std::memory_order_acquire); }

namespace detail {

std::string unique_letters(size_t n) {
  static constexpr char kLetters[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  static std::atomic<uint64_t> counter{0};
  static const uint64_t seed = [] {
    std::random_device device;
    return (uint64_t(device()) << 32) ^ device() ^
           static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }();
  // splitmix64 of (seed + call number): distinct per call, spread over the whole alphabet.
  uint64_t x = seed + 0x9E3779B97F4A7C15ull * (counter.fetch_add(1, std::memory_order_relaxed) + 1);
  std::string letters;
  while (letters.size() < n) {
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    for (int k = 0; k < 10 && letters.size() < n; ++k, z /= 62) letters.push_back(kLetters[z % 62]);
  }
  return letters;
}

}  // namespace detail
}  // namespace qdqfold::io
