// Integer-side arithmetic of the QDQ folds: ranges of the quantized element types, reading and writing their
// raw_data layout (4-bit values packed two per byte, float8 kept as raw bytes), and onnxruntime's
// QuantizeLinear for one element, so a fold can predict exactly which integers a quantizer produces.
//
//   QuantizeLinear(x) = clamp(round_half_even(x / s) + z, lo, hi)      (x / s in float32, as onnxruntime does)
//   DequantizeLinear(q) = (q - z) * s
//
// Negating a dequantized value keeps the integers on the grid: with any constant c,
//   q' = c - q,  z' = c - z   gives   (q' - z') * s = -(q - z) * s.
// c = 2z keeps the zero point, c = 0 negates it, c = lo + hi (the complement: -1 - q signed, hi - q unsigned)
// always fits the type.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qdqfold::kernels {

struct IntegerRange {
  int64_t lo = 0, hi = 0;
  bool contains(int64_t v) const { return v >= lo && v <= hi; }
};

// Range of the integer element types QuantizeLinear/DequantizeLinear use (int8, uint8, int16, uint16, int4,
// uint4, int32); nullopt for any other type.
std::optional<IntegerRange> integer_range(int32_t data_type);
bool is_float8(int32_t data_type);
bool is_fnuz_float8(int32_t data_type);

// Elements of a quantized tensor in raw_data layout as integers (float8: the byte values). nullopt when the
// type is not one of integer_range()'s or a float8, or `raw` is too short for `count` elements.
std::optional<std::vector<int64_t>> read_quantized(std::string_view raw, int32_t data_type, int64_t count);
// The inverse: raw_data layout of `values` (each must fit the type).
std::string write_quantized(const std::vector<int64_t>& values, int32_t data_type);

// `v` as it reads back after being stored in float type `data_type` (float32/16, bfloat16, float64).
double round_to_float_type(double v, int32_t data_type);

// One element of QuantizeLinear(x) with scale s and zero point z, as onnxruntime computes it.
inline int64_t quantize_element(float x, float s, int64_t z, IntegerRange range) {
  const float ratio = x / s;
  if (std::isnan(ratio)) return range.contains(z) ? z : range.lo;
  const double r = std::nearbyint(static_cast<double>(ratio)) + static_cast<double>(z);  // ties to even
  if (r <= static_cast<double>(range.lo)) return range.lo;
  if (r >= static_cast<double>(range.hi)) return range.hi;
  return static_cast<int64_t>(r);
}

}  // namespace qdqfold::kernels
