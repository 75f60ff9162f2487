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

// ---- Streaming kernels: element ranges of raw_data-layout tensors, never widened to whole int64 vectors.
// `first` / `n` count elements of the source tensor; for the packed 4-bit types `dst_first` is the element
// that dst's first byte starts with (even), and dst must be zeroed before nibbles are written into it.

// Smallest and largest of elements [first, first + n) (n > 0) of an integer tensor (not float8).
struct IntegerExtremes {
  int64_t min, max;
};
IntegerExtremes integer_extremes(const char* src, int32_t data_type, int64_t first, int64_t n);

// Smallest and largest number among elements [first, first + n) of a float32/16 or bfloat16 tensor, and
// whether any is NaN; accumulated over calls.
struct FloatExtremes {
  float min = INFINITY, max = -INFINITY;
  bool any_number = false, any_nan = false;
};
void float_extremes(const char* src, int32_t float_type, int64_t first, int64_t n, FloatExtremes& acc);

// Elements [first, first + n) written to dst (from element dst_first) unchanged, or as c - q: computed modulo
// 2^bits on the stored bits, which is exact for signed and unsigned types whenever c - q fits the type.
void copy_integers(const char* src, char* dst, int32_t data_type, int64_t first, int64_t n, int64_t dst_first);
void mirror_integers(const char* src, char* dst, int32_t data_type, int64_t first, int64_t n, int64_t dst_first,
                     int64_t c);
// Float8 bytes [first, first + n) negated (negate_float8).
void negate_float8_bytes(const char* src, char* dst, int64_t first, int64_t n, int64_t dst_first, bool fnuz);

// quantize_element() of elements [first, first + n) of a float32/16 or bfloat16 tensor, as exact integers
// in doubles (vectorisable: no per-element call).
void quantize_elements(const char* src, int32_t float_type, int64_t first, int64_t n, float s, int64_t z,
                       IntegerRange range, double* q);
// q[0..n) stored as integers of `data_type` at element dst_first + j of dst (4-bit: dst zeroed first).
void store_integers(const double* q, int64_t n, int32_t data_type, char* dst, int64_t dst_first);
// round_to_float_type((q[j] - z) * s) stored as float32/16 or bfloat16 at dst (element j).
void store_dequantized(const double* q, int64_t n, double z, double s, int32_t float_type, char* dst);

// ---- Per-column variants, for weights processed a row at a time (output channel on the last axis): the
// parameters of element first + j are p[j], so a caller passes its column arrays offset to the row segment.

// Mirror parameters in the integers' own bit layout (n columns, one element each; 4-bit: a byte each):
// q' = (q ^ flip) + add modulo 2^bits is q where flip = add = 0, and c - q where flip = all ones and
// add = c + 1 (two's complement: c - q = c + ~q + 1).
struct MirrorColumns {
  std::string flip, add;
  // 4-bit: columns 2t and 2t + 1 as the low and high nibble of byte t, for pieces that start on a whole byte:
  // x = b ^ flip, q' = ((x + add_low) & 0x0f) | (((x & 0xf0) + add_high) & 0xf0).
  std::string pair_flip, pair_add_low, pair_add_high;
};
MirrorColumns mirror_columns(int32_t data_type, const std::vector<int64_t>& c, const std::vector<char>& negated);
// Elements [first, first + n) written to dst (from element dst_first) as (q ^ flip[j]) + add[j], with the
// parameters of columns [column0, column0 + n) of `m`.
void mirror_integers(const char* src, char* dst, int32_t data_type, int64_t first, int64_t n, int64_t dst_first,
                     const MirrorColumns& m, int64_t column0);
// Column-wise extremes of `rows` consecutive rows of n elements starting at element `first`, merged into
// lo[j] / hi[j] (integer tensors, not float8; float tensors: NaN only sets nan[j]).
void integer_column_extremes(const char* src, int32_t data_type, int64_t first, int64_t rows, int64_t n, int64_t* lo,
                             int64_t* hi);
void float_column_extremes(const char* src, int32_t float_type, int64_t first, int64_t rows, int64_t n, float* lo,
                           float* hi, char* nan);
// quantize_elements() with scale s[j] and zero point z[j] for element first + j.
void quantize_elements(const char* src, int32_t float_type, int64_t first, int64_t n, const float* s, const double* z,
                       IntegerRange range, double* q);
// q[j] = add[j] + sign[j] * q[j] (sign +-1: exact on integers): the mirror applied to quantized values.
void mirror_values(double* q, int64_t n, const double* add, const double* sign);
// store_dequantized() with zero point z[j] and scale s[j] for element j.
void store_dequantized(const double* q, int64_t n, const double* z, const double* s, int32_t float_type, char* dst);

// The QAT form's new float32 weight straight from the old one, in float32 lanes (twice as many per vector
// as the double steps above, and no conversions between them):
//   q = QuantizeLinear(x; s, z),  q' = add + sign * q,  W' = (q' - z') * s'
// Bit for bit what quantize_elements + mirror_values + store_dequantized give, where
// requantizes_in_float32() holds: q' - z' is then an integer below 2^18 and s' a float32 value, so their
// float32 product is their exact (double) product rounded once. Elements [first, first + n) of `src`
// (float32, raw_data layout) go to `dst` from its start. The parameters are one for the whole run, or one per
// element (arrays indexed from 0). Returns true when a q whose sign is negative is range.lo: the negation
// that does not fit the type, which a deferred check reports.
bool requantize_float32(const char* src, int64_t first, int64_t n, float s, float z, float add, float sign,
                        float z_new, float s_new, IntegerRange range, char* dst);
bool requantize_float32(const char* src, int64_t first, int64_t n, const float* s, const float* z, const float* add,
                        const float* sign, const float* z_new, const float* s_new, IntegerRange range, char* dst);
// True when requantize_float32 gives the same bits as the double steps: a float32 weight, integers within
// +-2^22, and new scales that are float32 values.
bool requantizes_in_float32(int32_t float_type, IntegerRange range, const std::vector<double>& new_scales);

// Bytes per element of the integer and float8 types (0 for the packed 4-bit ones and any other type).
size_t quantized_width(int32_t data_type);
// Bytes taken by `count` elements of a quantized type (4-bit: packed), or nullopt for another type.
std::optional<size_t> quantized_bytes(int32_t data_type, int64_t count);

}  // namespace qdqfold::kernels
