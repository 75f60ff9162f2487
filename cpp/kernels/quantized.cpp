#include "quantized.h"

#include <cstring>

#include "../wire/fields.h"
#include "numeric.h"
#include "per_channel.h"

namespace qdqfold::kernels {

using wire::DataType;

std::optional<IntegerRange> integer_range(int32_t t) {
  switch (static_cast<DataType>(t)) {
    case DataType::Int8: return IntegerRange{-128, 127};
    case DataType::Uint8: return IntegerRange{0, 255};
    case DataType::Int16: return IntegerRange{-32768, 32767};
    case DataType::Uint16: return IntegerRange{0, 65535};
    case DataType::Int4: return IntegerRange{-8, 7};
    case DataType::Uint4: return IntegerRange{0, 15};
    case DataType::Int32: return IntegerRange{INT32_MIN, INT32_MAX};
    default: return std::nullopt;
  }
}

bool is_float8(int32_t t) {
  auto d = static_cast<DataType>(t);
  return d == DataType::Float8E4M3FN || d == DataType::Float8E4M3FNUZ || d == DataType::Float8E5M2 ||
         d == DataType::Float8E5M2FNUZ;
}
bool is_fnuz_float8(int32_t t) {
  auto d = static_cast<DataType>(t);
  return d == DataType::Float8E4M3FNUZ || d == DataType::Float8E5M2FNUZ;
}

namespace {

// Bytes per element of the unpacked types (1 for float8), 0 for the packed 4-bit ones.
size_t quantized_width(int32_t t) {
  switch (static_cast<DataType>(t)) {
    case DataType::Int8: case DataType::Uint8: return 1;
    case DataType::Int16: case DataType::Uint16: return 2;
    case DataType::Int32: return 4;
    default: return is_float8(t) ? 1 : 0;
  }
}

}  // namespace

std::optional<std::vector<int64_t>> read_quantized(std::string_view raw, int32_t t, int64_t count) {
  const auto* p = reinterpret_cast<const uint8_t*>(raw.data());
  std::vector<int64_t> out(static_cast<size_t>(count));
  const auto d = static_cast<DataType>(t);
  if (d == DataType::Int4 || d == DataType::Uint4) {
    if (raw.size() < static_cast<size_t>((count + 1) / 2)) return std::nullopt;
    for (int64_t i = 0; i < count; ++i) out[i] = int4_at(p, i, d == DataType::Int4);
    return out;
  }
  const size_t w = quantized_width(t);
  if (w == 0 || raw.size() < static_cast<size_t>(count) * w) return std::nullopt;
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* e = p + i * w;
    switch (d) {
      case DataType::Int8: out[i] = static_cast<int8_t>(e[0]); break;
      case DataType::Int16: { int16_t v; std::memcpy(&v, e, 2); out[i] = v; break; }
      case DataType::Uint16: { uint16_t v; std::memcpy(&v, e, 2); out[i] = v; break; }
      case DataType::Int32: { int32_t v; std::memcpy(&v, e, 4); out[i] = v; break; }
      default: out[i] = e[0]; break;  // uint8 and the float8 bytes
    }
  }
  return out;
}

std::string write_quantized(const std::vector<int64_t>& values, int32_t t) {
  const auto d = static_cast<DataType>(t);
  std::string out;
  if (d == DataType::Int4 || d == DataType::Uint4) {
    out.assign((values.size() + 1) / 2, '\0');
    auto* p = reinterpret_cast<uint8_t*>(out.data());
    for (size_t i = 0; i < values.size(); ++i) set_int4_at(p, static_cast<int64_t>(i), static_cast<int>(values[i]));
    return out;
  }
  const size_t w = quantized_width(t);
  out.resize(values.size() * w);
  for (size_t i = 0; i < values.size(); ++i) {
    char* e = out.data() + i * w;
    switch (w) {
      case 1: e[0] = static_cast<char>(static_cast<uint8_t>(values[i] & 0xff)); break;
      case 2: { auto v = static_cast<uint16_t>(values[i] & 0xffff); std::memcpy(e, &v, 2); break; }
      default: { auto v = static_cast<uint32_t>(values[i] & 0xffffffff); std::memcpy(e, &v, 4); break; }
    }
  }
  return out;
}

double round_to_float_type(double v, int32_t t) {
  switch (static_cast<DataType>(t)) {
    case DataType::Float: return static_cast<double>(static_cast<float>(v));
    case DataType::Float16: return half_to_float(double_to_half(v));
    case DataType::Bfloat16: return bf16_to_float(double_to_bf16(v));
    default: return v;
  }
}

}  // namespace qdqfold::kernels
