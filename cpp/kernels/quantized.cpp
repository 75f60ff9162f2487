#include "quantized.h"

#include <algorithm>
#include <cstring>
#include <limits>

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

size_t quantized_width(int32_t t) {
  switch (static_cast<DataType>(t)) {
    case DataType::Int8: case DataType::Uint8: return 1;
    case DataType::Int16: case DataType::Uint16: return 2;
    case DataType::Int32: return 4;
    default: return is_float8(t) ? 1 : 0;
  }
}

std::optional<size_t> quantized_bytes(int32_t t, int64_t count) {
  const auto d = static_cast<DataType>(t);
  if (d == DataType::Int4 || d == DataType::Uint4) return static_cast<size_t>((count + 1) / 2);
  const size_t w = quantized_width(t);
  if (w == 0) return std::nullopt;
  return static_cast<size_t>(count) * w;
}

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

// ---------------------------------------------------------------- streaming kernels

namespace {

bool is_4bit(int32_t t) { return t == static_cast<int32_t>(DataType::Int4) || t == static_cast<int32_t>(DataType::Uint4); }

template <class T>
IntegerExtremes extremes_of(const char* src, int64_t first, int64_t n) {
  constexpr int64_t kChunk = 1024;
  T buf[kChunk];
  T lo = std::numeric_limits<T>::max(), hi = std::numeric_limits<T>::lowest();
  for (int64_t done = 0; done < n; done += kChunk) {
    const int64_t k = std::min(kChunk, n - done);
    std::memcpy(buf, src + (first + done) * sizeof(T), static_cast<size_t>(k) * sizeof(T));
    for (int64_t i = 0; i < k; ++i) {
      lo = buf[i] < lo ? buf[i] : lo;
      hi = buf[i] > hi ? buf[i] : hi;
    }
  }
  return {static_cast<int64_t>(lo), static_cast<int64_t>(hi)};
}

// c - q on the stored bits (unsigned arithmetic wraps modulo 2^bits).
template <class U>
void mirror_of(const char* src, char* dst, int64_t n, int64_t c) {
  constexpr int64_t kChunk = 1024;
  U buf[kChunk];
  const auto cu = static_cast<U>(static_cast<uint64_t>(c));
  for (int64_t done = 0; done < n; done += kChunk) {
    const int64_t k = std::min(kChunk, n - done);
    std::memcpy(buf, src + done * sizeof(U), static_cast<size_t>(k) * sizeof(U));
    for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<U>(cu - buf[i]);
    std::memcpy(dst + done * sizeof(U), buf, static_cast<size_t>(k) * sizeof(U));
  }
}

// Float element `i` of a float32/16 or bfloat16 tensor.
float load_float(const char* src, int32_t t, int64_t i) {
  if (t == static_cast<int32_t>(DataType::Float)) {
    float f;
    std::memcpy(&f, src + i * 4, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, src + i * 2, 2);
  return t == static_cast<int32_t>(DataType::Float16) ? half_to_float(h) : bf16_to_float(h);
}

// Elements [first, first + k) as float32, k <= 1024.
void load_floats(const char* src, int32_t t, int64_t first, int64_t k, float* out) {
  if (t == static_cast<int32_t>(DataType::Float)) {
    std::memcpy(out, src + first * 4, static_cast<size_t>(k) * 4);
    return;
  }
  for (int64_t i = 0; i < k; ++i) out[i] = load_float(src, t, first + i);
}

}  // namespace

IntegerExtremes integer_extremes(const char* src, int32_t t, int64_t first, int64_t n) {
  switch (static_cast<DataType>(t)) {
    case DataType::Int8: return extremes_of<int8_t>(src, first, n);
    case DataType::Uint8: return extremes_of<uint8_t>(src, first, n);
    case DataType::Int16: return extremes_of<int16_t>(src, first, n);
    case DataType::Uint16: return extremes_of<uint16_t>(src, first, n);
    case DataType::Int32: return extremes_of<int32_t>(src, first, n);
    default: break;
  }
  const auto* p = reinterpret_cast<const uint8_t*>(src);
  IntegerExtremes e{INT64_MAX, INT64_MIN};
  for (int64_t i = first; i < first + n; ++i) {
    const int64_t v = is_4bit(t) ? int4_at(p, i, t == static_cast<int32_t>(DataType::Int4)) : p[i];
    e.min = std::min(e.min, v);
    e.max = std::max(e.max, v);
  }
  return e;
}

void float_extremes(const char* src, int32_t t, int64_t first, int64_t n, FloatExtremes& acc) {
  constexpr int64_t kChunk = 1024;
  float buf[kChunk];
  float lo = acc.min, hi = acc.max;
  bool nan = false;
  for (int64_t done = 0; done < n; done += kChunk) {
    const int64_t k = std::min(kChunk, n - done);
    load_floats(src, t, first + done, k, buf);
    for (int64_t i = 0; i < k; ++i) {
      const float x = buf[i];
      nan |= x != x;  // NaN compares false below, so min and max skip it
      lo = x < lo ? x : lo;
      hi = x > hi ? x : hi;
    }
  }
  acc.any_nan |= nan;
  acc.any_number |= lo <= hi;
  acc.min = lo;
  acc.max = hi;
}

void copy_integers(const char* src, char* dst, int32_t t, int64_t first, int64_t n, int64_t dst_first) {
  if (is_4bit(t)) {
    const auto* p = reinterpret_cast<const uint8_t*>(src);
    auto* d = reinterpret_cast<uint8_t*>(dst);
    for (int64_t i = first; i < first + n; ++i)
      d[(i - dst_first) >> 1] |= static_cast<uint8_t>(((i & 1) ? p[i >> 1] >> 4 : p[i >> 1] & 0x0f) << (4 * ((i - dst_first) & 1)));
    return;
  }
  const size_t w = quantized_width(t);
  std::memcpy(dst + (first - dst_first) * w, src + first * w, static_cast<size_t>(n) * w);
}

void mirror_integers(const char* src, char* dst, int32_t t, int64_t first, int64_t n, int64_t dst_first, int64_t c) {
  if (is_4bit(t)) {
    const auto* p = reinterpret_cast<const uint8_t*>(src);
    auto* d = reinterpret_cast<uint8_t*>(dst);
    for (int64_t i = first; i < first + n; ++i) {
      const int nibble = (i & 1) ? p[i >> 1] >> 4 : p[i >> 1] & 0x0f;
      d[(i - dst_first) >> 1] |= static_cast<uint8_t>(((c - nibble) & 0x0f) << (4 * ((i - dst_first) & 1)));
    }
    return;
  }
  const size_t w = quantized_width(t);
  const char* s = src + first * w;
  char* o = dst + (first - dst_first) * w;
  switch (w) {
    case 1: mirror_of<uint8_t>(s, o, n, c); break;
    case 2: mirror_of<uint16_t>(s, o, n, c); break;
    default: mirror_of<uint32_t>(s, o, n, c); break;
  }
}

void negate_float8_bytes(const char* src, char* dst, int64_t first, int64_t n, int64_t dst_first, bool fnuz) {
  const auto* p = reinterpret_cast<const uint8_t*>(src);
  auto* d = reinterpret_cast<uint8_t*>(dst);
  for (int64_t i = first; i < first + n; ++i) d[i - dst_first] = negate_float8(p[i], fnuz);
}

void quantize_elements(const char* src, int32_t t, int64_t first, int64_t n, float s, int64_t z, IntegerRange range,
                       double* q) {
  constexpr int64_t kChunk = 1024;
  float buf[kChunk];
  const double zd = static_cast<double>(z), lo = static_cast<double>(range.lo), hi = static_cast<double>(range.hi);
  const double nan_value = range.contains(z) ? zd : lo;
  for (int64_t done = 0; done < n; done += kChunk) {
    const int64_t k = std::min(kChunk, n - done);
    load_floats(src, t, first + done, k, buf);
    double* out = q + done;
    for (int64_t i = 0; i < k; ++i) {
      const float ratio = buf[i] / s;
      const double r = ratio;
      // nearbyint (ties to even) without a library call: adding and removing 1.5 * 2^52 rounds a double of
      // magnitude below 2^51 to an integer; floats of magnitude 2^23 and more are integers already.
      // (Both sides are computed and then selected: no floating-point work under a condition, so it vectorises.)
      const double magic = (r + 0x1.8p52) - 0x1.8p52;
      const double rounded = std::fabs(r) < 0x1p31 ? magic : r;
      const double v = rounded + zd;  // -0 + z is +0: no negative zero reaches the integers
      const double low = v <= lo ? lo : v;
      const double clamped = low >= hi ? hi : low;
      out[i] = ratio != ratio ? nan_value : clamped;
    }
  }
}

void store_integers(const double* q, int64_t n, int32_t t, char* dst, int64_t dst_first) {
  if (is_4bit(t)) {
    auto* d = reinterpret_cast<uint8_t*>(dst);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t e = dst_first + j;
      d[e >> 1] |= static_cast<uint8_t>((static_cast<int64_t>(q[j]) & 0x0f) << (4 * (e & 1)));
    }
    return;
  }
  const size_t w = quantized_width(t);
  char* o = dst + dst_first * static_cast<int64_t>(w);
  for (int64_t j = 0; j < n; ++j) {
    const auto v = static_cast<uint32_t>(static_cast<int64_t>(q[j]));
    switch (w) {
      case 1: o[j] = static_cast<char>(static_cast<uint8_t>(v)); break;
      case 2: { auto u = static_cast<uint16_t>(v); std::memcpy(o + j * 2, &u, 2); break; }
      default: std::memcpy(o + j * 4, &v, 4); break;
    }
  }
}

void store_dequantized(const double* q, int64_t n, double z, double s, int32_t t, char* dst) {
  constexpr int64_t kChunk = 1024;
  if (t == static_cast<int32_t>(DataType::Float)) {
    float buf[kChunk];
    for (int64_t done = 0; done < n; done += kChunk) {
      const int64_t k = std::min(kChunk, n - done);
      for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<float>((q[done + i] - z) * s);
      std::memcpy(dst + done * 4, buf, static_cast<size_t>(k) * 4);
    }
    return;
  }
  const bool half = t == static_cast<int32_t>(DataType::Float16);
  for (int64_t i = 0; i < n; ++i) {
    const double v = (q[i] - z) * s;
    const uint16_t h = half ? double_to_half(v) : double_to_bf16(v);
    std::memcpy(dst + i * 2, &h, 2);
  }
}

}  // namespace qdqfold::kernels
