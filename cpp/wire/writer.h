// Output assembly. A rewritten message is a list of pieces: views into the input buffer (copied through
// untouched), bytes the fold produced, or a generator that writes a known number of bytes straight into the
// final buffer. Sizes are known before anything is written, so the output is allocated once at its final
// size and every byte is written exactly once.
#pragma once

#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qdqfold::wire {

struct Piece {
  const char* data = nullptr;                // view or owned bytes (owned ones live in Output::arena_)
  size_t size = 0;
  std::function<void(char*)> generate;       // set instead of data: writes exactly `size` bytes
  std::function<void(char*, size_t, size_t)> generate_range;  // optional: bytes [begin, end) only
};

class Pieces {
 public:
  // Appends a view of bytes that outlive the output (the input buffer, or the arena).
  void view(std::string_view bytes) {
    if (bytes.empty()) return;
    if (!list_.empty() && !list_.back().generate && list_.back().data + list_.back().size == bytes.data()) {
      list_.back().size += bytes.size();  // adjacent views of the input coalesce into one copy
    } else {
      list_.push_back(Piece{bytes.data(), bytes.size(), {}, {}});
    }
    size_ += bytes.size();
  }
  void generated(size_t n, std::function<void(char*)> gen, std::function<void(char*, size_t, size_t)> range = {}) {
    if (n == 0) return;
    list_.push_back(Piece{nullptr, n, std::move(gen), std::move(range)});
    size_ += n;
  }
  void append(const Pieces& other) {
    for (const Piece& p : other.list_) {
      if (p.generate) generated(p.size, p.generate, p.generate_range);
      else view(std::string_view(p.data, p.size));
    }
  }
  size_t size() const { return size_; }
  void write_to(char* dst) const {
    for (const Piece& p : list_) {
      if (p.generate) p.generate(dst);
      else std::memcpy(dst, p.data, p.size);
      dst += p.size;
    }
  }
  const std::vector<Piece>& list() const { return list_; }

 private:
  std::vector<Piece> list_;
  size_t size_ = 0;
};

// Keeps produced bytes alive (stable addresses) until the output is written.
class Arena {
 public:
  std::string_view keep(std::string bytes) {
    chunks_.push_back(std::make_unique<std::string>(std::move(bytes)));
    return *chunks_.back();
  }

 private:
  std::deque<std::unique_ptr<std::string>> chunks_;
};

// Encoding helpers for bytes the folds produce.
inline void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
inline void put_tag(std::string& out, uint32_t field, uint32_t wire_type) { put_varint(out, (uint64_t(field) << 3) | wire_type); }
inline void put_bytes_field(std::string& out, uint32_t field, std::string_view bytes) {
  put_tag(out, field, 2);
  put_varint(out, bytes.size());
  out.append(bytes.data(), bytes.size());
}
inline void put_varint_field(std::string& out, uint32_t field, uint64_t v) {
  put_tag(out, field, 0);
  put_varint(out, v);
}
inline void put_fixed32_field(std::string& out, uint32_t field, uint32_t bits) {
  put_tag(out, field, 5);
  char b[4];
  std::memcpy(b, &bits, 4);
  out.append(b, 4);
}
inline size_t varint_size(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) { v >>= 7; ++n; }
  return n;
}
// Header (tag + length) of a length-delimited field whose payload is `payload_size` bytes.
inline std::string bytes_header(uint32_t field, size_t payload_size) {
  std::string h;
  put_tag(h, field, 2);
  put_varint(h, payload_size);
  return h;
}

}  // namespace qdqfold::wire
