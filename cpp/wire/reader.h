// A protobuf wire-format reader in the style of mapbox/protozero: two pointers into a buffer the caller
// owns. It never allocates, reads fixed-width values with memcpy and throws WireError (with the byte offset
// from the start of the model) instead of reading past the end.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>

namespace qdqfold::wire {

// Thrown for malformed input. `what()` names the problem and where it was found.
class WireError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class WireType : uint8_t { Varint = 0, Fixed64 = 1, Bytes = 2, StartGroup = 3, EndGroup = 4, Fixed32 = 5 };

// One field of a message: its number, wire type, the bytes of its payload (for Bytes) or its scalar value,
// and the whole span [tag, end) so that untouched fields can be copied through as they were.
struct Field {
  uint32_t number = 0;
  WireType type = WireType::Varint;
  uint64_t scalar = 0;        // Varint, Fixed32 and Fixed64 payloads
  std::string_view bytes;     // the payload as it stands: a Bytes field's content, or a scalar's encoding
  std::string_view whole;     // tag + payload, as it stands in the buffer
};

class Reader {
 public:
  // `base` is the start of the whole model, used only to report offsets in errors.
  Reader(std::string_view data, const char* base) : pos_(data.data()), end_(data.data() + data.size()), base_(base) {}

  bool done() const { return pos_ >= end_; }

  // Reads the next field. Precondition: !done().
  Field next(const char* context) {
    Field f;
    const char* start = pos_;
    uint64_t tag = varint(context);
    uint64_t number = tag >> 3;
    auto type = static_cast<uint8_t>(tag & 7);
    if (number == 0 || number > 536870911u) fail(context, start, "invalid field number " + std::to_string(number));
    f.number = static_cast<uint32_t>(number);
    f.type = static_cast<WireType>(type);
    const char* payload = pos_;
    switch (f.type) {
      case WireType::Varint: f.scalar = varint(context); break;
      case WireType::Fixed64: f.scalar = fixed<uint64_t>(context); break;
      case WireType::Fixed32: f.scalar = fixed<uint32_t>(context); break;
      case WireType::Bytes: {
        uint64_t len = varint(context);
        if (len > static_cast<uint64_t>(end_ - pos_))
          fail(context, start, "field " + std::to_string(number) + " declares " + std::to_string(len) +
                                   " bytes but only " + std::to_string(end_ - pos_) + " remain");
        f.bytes = std::string_view(pos_, static_cast<size_t>(len));
        pos_ += len;
        break;
      }
      default:
        fail(context, start, "unsupported wire type " + std::to_string(type) + " for field " + std::to_string(number));
    }
    if (f.type != WireType::Bytes) f.bytes = std::string_view(payload, static_cast<size_t>(pos_ - payload));
    f.whole = std::string_view(start, static_cast<size_t>(pos_ - start));
    return f;
  }

  size_t offset_of(const char* p) const { return static_cast<size_t>(p - base_); }

  [[noreturn]] void fail(const char* context, const char* at, const std::string& what) const {
    throw WireError(std::string(context) + ": " + what + " (at byte " + std::to_string(offset_of(at)) + ")");
  }

 private:
  uint64_t varint(const char* context) {
    const char* start = pos_;
    uint64_t value = 0;
    for (int shift = 0; shift < 70; shift += 7) {
      if (pos_ >= end_) fail(context, start, "truncated varint");
      auto byte = static_cast<uint8_t>(*pos_++);
      if (shift == 63 && byte > 1) fail(context, start, "varint longer than 64 bits");
      value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return value;
    }
    fail(context, start, "varint longer than 10 bytes");
  }

  template <class T>
  T fixed(const char* context) {
    if (static_cast<size_t>(end_ - pos_) < sizeof(T)) fail(context, pos_, "truncated fixed-width value");
    T v;
    std::memcpy(&v, pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  const char* pos_;
  const char* end_;
  const char* base_;
};

// Decodes a packed repeated varint field (or a single unpacked value), calling `sink(uint64_t)` for each.
template <class Sink>
void for_each_varint(const Field& f, const char* base, const char* context, Sink&& sink) {
  if (f.type == WireType::Varint) {
    sink(f.scalar);
    return;
  }
  if (f.type != WireType::Bytes) Reader(f.whole, base).fail(context, f.whole.data(), "expected varint or packed varints");
  const char* p = f.bytes.data();
  const char* end = p + f.bytes.size();
  while (p < end) {
    uint64_t value = 0;
    int shift = 0;
    for (;;) {
      if (p >= end || shift > 63) Reader(f.whole, base).fail(context, p, "malformed packed varint");
      auto byte = static_cast<uint8_t>(*p++);
      value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) break;
      shift += 7;
    }
    sink(value);
  }
}

}  // namespace qdqfold::wire
