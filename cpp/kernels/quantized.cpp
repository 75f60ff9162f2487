#include "quantized.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "../wire/fields.h"
#include "numeric.h"
#include "element_access.h"
#include "per_channel.h"
#include "vector_clones.h"

namespace qdqfold::kernels {

using wire::DataType;
using detail::is_4bit;
using detail::load_float;
using detail::load_floats;

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

// ---------------------------------------------------------------- streaming kernels (the per-column ones are
// in quantized_columns.cpp)

namespace {

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

QDQFOLD_VECTOR_CLONES
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

namespace {

// A parameter that is the same for every element, or one per element (indexed from the run's first element).
template <class T>
struct Same {
  T v;
  T operator[](int64_t) const { return v; }
};

// QuantizeLinear of one element in float32 lanes (twice as many per vector as double), for integer types
// whose range [lo, hi] lies within +-2^22 (every weight type but int32). It gives quantize_element's integers:
// below 2^22 in magnitude, adding and removing 1.5 * 2^23 rounds a float to the nearest integer, ties to even,
// and integer + zero point (|z| <= 2^16) is exact; a larger ratio is clamped to the range whatever its
// rounding. Both sides of each choice are computed and one selected, so the loops calling it vectorise.
inline float quantize_in_float_lanes(float x, float s, float z, float lo, float hi) {
  const float nan_value = z >= lo && z <= hi ? z : lo;
  const float r = x / s;
  const float magic = (r + 0x1.8p23f) - 0x1.8p23f;
  const float rounded = std::fabs(r) < 0x1p22f ? magic : r;
  const float v = rounded + z;
  const float low = v <= lo ? lo : v;
  const float clamped = low >= hi ? hi : low;
  return r != r ? nan_value : clamped;
}

// Elements [first, first + n) of a float tensor, read as float32 a chunk at a time, each mapped to
// q[j] = quantize(x, j) (j counted from `first`).
template <class Quantize>
void quantize_chunks(const char* src, int32_t t, int64_t first, int64_t n, double* q, Quantize quantize) {
  constexpr int64_t kChunk = 1024;
  float buf[kChunk];
  for (int64_t done = 0; done < n; done += kChunk) {
    const int64_t k = std::min(kChunk, n - done);
    load_floats(src, t, first + done, k, buf);
    for (int64_t i = 0; i < k; ++i) q[done + i] = quantize(buf[i], done + i);
  }
}

template <class S, class Z>
void quantize_impl(const char* src, int32_t t, int64_t first, int64_t n, S s, Z z, IntegerRange range, double* q) {
  if (range.lo >= -(int64_t{1} << 22) && range.hi <= (int64_t{1} << 22)) {  // see quantize_in_float_lanes
    const auto lo = static_cast<float>(range.lo), hi = static_cast<float>(range.hi);
    return quantize_chunks(src, t, first, n, q, [&](float x, int64_t j) {
      return quantize_in_float_lanes(x, s[j], static_cast<float>(z[j]), lo, hi);
    });
  }
  const double lo = static_cast<double>(range.lo), hi = static_cast<double>(range.hi);
  quantize_chunks(src, t, first, n, q, [&](float x, int64_t j) {
    const double zd = z[j];
    const double nan_value = zd >= lo && zd <= hi ? zd : lo;
    const float ratio = x / s[j];
    const double r = ratio;
    // nearbyint (ties to even) without a library call: adding and removing 1.5 * 2^52 rounds a double of
    // magnitude below 2^51 to an integer; floats of magnitude 2^23 and more are integers already.
    // (Both sides are computed and then selected: no floating-point work under a condition, so it vectorises.)
    const double magic = (r + 0x1.8p52) - 0x1.8p52;
    const double rounded = std::fabs(r) < 0x1p31 ? magic : r;
    const double v = rounded + zd;  // -0 + z is +0: no negative zero reaches the integers
    const double low = v <= lo ? lo : v;
    const double clamped = low >= hi ? hi : low;
    return ratio != ratio ? nan_value : clamped;
  });
}

template <class Z, class S>
void store_dequantized_impl(const double* q, int64_t n, Z z, S s, int32_t t, char* dst) {
  constexpr int64_t kChunk = 1024;
  if (t == static_cast<int32_t>(DataType::Float)) {
    float buf[kChunk];
    for (int64_t done = 0; done < n; done += kChunk) {
      const int64_t k = std::min(kChunk, n - done);
      for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<float>((q[done + i] - z[done + i]) * s[done + i]);
      std::memcpy(dst + done * 4, buf, static_cast<size_t>(k) * 4);
    }
    return;
  }
  const bool half = t == static_cast<int32_t>(DataType::Float16);
  for (int64_t i = 0; i < n; ++i) {
    const double v = (q[i] - z[i]) * s[i];
    const uint16_t h = half ? double_to_half(v) : double_to_bf16(v);
    std::memcpy(dst + i * 2, &h, 2);
  }
}

}  // namespace

QDQFOLD_VECTOR_CLONES
void quantize_elements(const char* src, int32_t t, int64_t first, int64_t n, float s, int64_t z, IntegerRange range,
                       double* q) {
  quantize_impl(src, t, first, n, Same<float>{s}, Same<double>{static_cast<double>(z)}, range, q);
}

QDQFOLD_VECTOR_CLONES
void quantize_elements(const char* src, int32_t t, int64_t first, int64_t n, const float* s, const double* z,
                       IntegerRange range, double* q) {
  quantize_impl(src, t, first, n, s, z, range, q);
}

namespace {

template <class P>
bool requantize_float32_impl(const char* src, int64_t first, int64_t n, P s, P z, P add, P sign, P z_new, P s_new,
                             IntegerRange range, char* dst) {
  constexpr int64_t kChunk = 1024;
  float in[kChunk], out[kChunk];
  const auto lo = static_cast<float>(range.lo), hi = static_cast<float>(range.hi);
  int lowest_negated = 0;
  for (int64_t done = 0; done < n; done += kChunk) {
    const int64_t k = std::min(kChunk, n - done);
    std::memcpy(in, src + (first + done) * 4, static_cast<size_t>(k) * 4);
    for (int64_t i = 0; i < k; ++i) {
      const int64_t e = done + i;
      const float q = quantize_in_float_lanes(in[i], s[e], z[e], lo, hi);
      lowest_negated |= static_cast<int>(q == lo) & static_cast<int>(sign[e] < 0);  // | : no branch
      out[i] = (add[e] + sign[e] * q - z_new[e]) * s_new[e];
    }
    std::memcpy(dst + done * 4, out, static_cast<size_t>(k) * 4);
  }
  return lowest_negated != 0;
}

}  // namespace

QDQFOLD_VECTOR_CLONES
bool requantize_float32(const char* src, int64_t first, int64_t n, float s, float z, float add, float sign,
                        float z_new, float s_new, IntegerRange range, char* dst) {
  return requantize_float32_impl(src, first, n, Same<float>{s}, Same<float>{z}, Same<float>{add}, Same<float>{sign},
                                 Same<float>{z_new}, Same<float>{s_new}, range, dst);
}

QDQFOLD_VECTOR_CLONES
bool requantize_float32(const char* src, int64_t first, int64_t n, const float* s, const float* z, const float* add,
                        const float* sign, const float* z_new, const float* s_new, IntegerRange range, char* dst) {
  return requantize_float32_impl(src, first, n, s, z, add, sign, z_new, s_new, range, dst);
}

bool requantizes_in_float32(int32_t float_type, IntegerRange range, const std::vector<double>& new_scales) {
  if (float_type != static_cast<int32_t>(DataType::Float)) return false;
  if (range.lo < -(int64_t{1} << 22) || range.hi > (int64_t{1} << 22)) return false;
  for (double v : new_scales)
    if (static_cast<double>(static_cast<float>(v)) != v) return false;
  return true;
}

QDQFOLD_VECTOR_CLONES
void mirror_values(double* q, int64_t n, const double* add, const double* sign) {
  for (int64_t j = 0; j < n; ++j) q[j] = add[j] + sign[j] * q[j];
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

QDQFOLD_VECTOR_CLONES
void store_dequantized(const double* q, int64_t n, double z, double s, int32_t t, char* dst) {
  store_dequantized_impl(q, n, Same<double>{z}, Same<double>{s}, t, dst);
}

QDQFOLD_VECTOR_CLONES
void store_dequantized(const double* q, int64_t n, const double* z, const double* s, int32_t t, char* dst) {
  store_dequantized_impl(q, n, z, s, t, dst);
}

}  // namespace qdqfold::kernels
