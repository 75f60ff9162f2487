// Scalar conversions between the ONNX element types and double: IEEE half, bfloat16, the float8 formats,
// and packed 4-bit integers. Round-to-nearest-even everywhere, as onnx and numpy do.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace qdqfold::kernels {

inline float bits_to_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    float v = std::ldexp(static_cast<float>(man), -24);  // subnormal
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return sign | 0x7c00 | (abs > 0x7f800000u ? 0x200 : 0);  // inf / nan
  if (abs >= 0x477ff000u) return sign | 0x7c00;                                  // overflow to inf
  if (abs < 0x38800000u) {                                                         // subnormal or zero
    float v = bits_to_float(abs);
    // v * 2^24 rounded to nearest even gives the subnormal mantissa
    auto m = static_cast<uint32_t>(std::nearbyint(v * 16777216.0f));
    return sign | static_cast<uint16_t>(m);
  }
  uint32_t mant = abs & 0x7fffff;
  uint32_t exp = (abs >> 23) - 112;
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // may carry into the exponent, which is correct
  return sign | static_cast<uint16_t>(h);
}

inline float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }
inline uint16_t float_to_bf16(float f) {
  uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // quiet nan
  uint32_t rounding = 0x7fff + ((x >> 16) & 1);
  return static_cast<uint16_t>((x + rounding) >> 16);
}

// Signed 4-bit value at element i of packed data (low nibble first).
inline int int4_at(const uint8_t* p, int64_t i, bool is_signed) {
  int v = (i & 1) ? (p[i >> 1] >> 4) : (p[i >> 1] & 0x0f);
  if (is_signed && v >= 8) v -= 16;
  return v;
}
inline void set_int4_at(uint8_t* p, int64_t i, int v) {
  uint8_t nib = static_cast<uint8_t>(v) & 0x0f;
  uint8_t& b = p[i >> 1];
  b = (i & 1) ? static_cast<uint8_t>((b & 0x0f) | (nib << 4)) : static_cast<uint8_t>((b & 0xf0) | nib);
}

// Float8 negation is a flip of the sign bit, except in the "fnuz" formats, where 0x80 is NaN and zero has
// no negative form.
inline uint8_t negate_float8(uint8_t v, bool fnuz) {
  if (fnuz && (v & 0x7f) == 0) return v;
  return v ^ 0x80;
}

}  // namespace qdqfold::kernels
