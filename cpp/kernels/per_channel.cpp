#include "per_channel.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../wire/fields.h"
#include "numeric.h"
#include "vector_clones.h"

namespace qdqfold::kernels {

using wire::DataType;

ChannelAxis ChannelAxis::of_dimension(const std::vector<int64_t>& dims, size_t axis) {
  ChannelAxis a;
  for (size_t d = 0; d < dims.size(); ++d) {
    if (d < axis) a.outer *= dims[d];
    else if (d == axis) a.channels = dims[d];
    else a.inner *= dims[d];
  }
  return a;
}

bool is_supported_float(int32_t t) {
  auto d = static_cast<DataType>(t);
  return d == DataType::Float || d == DataType::Float16 || d == DataType::Bfloat16 || d == DataType::Double;
}

// Rounds to float32 with "round to odd": the result is exact, or the neighbour whose last mantissa bit is 1.
// Rounding that value to a format with at least two fewer mantissa bits (float16: 11, bfloat16: 8 vs 24)
// gives the correctly rounded result of the original double.
static float to_float_round_to_odd(double v) {
  float f = static_cast<float>(v);
  if (!std::isfinite(f) || static_cast<double>(f) == v) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);  // truncate
  return bits_to_float(float_to_bits(f) | 1u);
}

uint16_t double_to_half(double v) { return float_to_half(to_float_round_to_odd(v)); }
uint16_t double_to_bf16(double v) { return float_to_bf16(to_float_round_to_odd(v)); }

namespace {

// Element codecs: the stored type and its conversions from and to double.
// finite(): the exponent bits are not all ones, tested on the bit pattern (integer SIMD, no conversion).
struct Float32 {
  using Stored = float;
  static double load(float x) { return x; }
  static float store(double v) { return static_cast<float>(v); }
  static bool finite(float x) { return (float_to_bits(x) & 0x7f800000u) != 0x7f800000u; }
};
struct Float64 {
  using Stored = double;
  static double load(double x) { return x; }
  static double store(double v) { return v; }
  static bool finite(double x) {
    uint64_t bits;
    std::memcpy(&bits, &x, 8);
    return (bits & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
  }
};
struct Float16 {
  using Stored = uint16_t;
  static double load(uint16_t x) { return half_to_float(x); }
  static uint16_t store(double v) { return double_to_half(v); }
  static bool finite(uint16_t x) { return (x & 0x7c00u) != 0x7c00u; }
};
struct Bfloat16 {
  using Stored = uint16_t;
  static double load(uint16_t x) { return bf16_to_float(x); }
  static uint16_t store(double v) { return double_to_bf16(v); }
  static bool finite(uint16_t x) { return (x & 0x7f80u) != 0x7f80u; }
};

// y[i] = x[i] * s[i] + t[i] over one contiguous run of n elements, with the factors per element
// (PerElement) or one for the whole run. Works through aligned chunks (the source may be an unaligned view
// of the model, the destination a position in the output buffer); the inner loops are straight-line and
// vectorise for float32/float64. It counts the elements that were finite and are not any more (overflow),
// and writes them when given a destination: a check-only pass, or the writing and its check in one pass.
template <class Codec, bool PerElement>
int64_t affine_run(const char* src, char* dst, int64_t n, const double* s, const double* t) {
  using T = typename Codec::Stored;
  constexpr int64_t kChunk = 1024;
  T in[kChunk], out[kChunk];
  int64_t overflowed = 0;
  for (int64_t done = 0; done < n; done += kChunk) {
    const int64_t k = std::min(kChunk, n - done);
    std::memcpy(in, src + done * sizeof(T), static_cast<size_t>(k) * sizeof(T));
    const double* sc = PerElement ? s + done : s;
    const double* sh = t ? (PerElement ? t + done : t) : nullptr;
    if (sh) {
      for (int64_t i = 0; i < k; ++i)
        out[i] = Codec::store(Codec::load(in[i]) * sc[PerElement ? i : 0] + sh[PerElement ? i : 0]);
    } else {
      for (int64_t i = 0; i < k; ++i) out[i] = Codec::store(Codec::load(in[i]) * sc[PerElement ? i : 0]);
    }
    if (dst) std::memcpy(dst + done * sizeof(T), out, static_cast<size_t>(k) * sizeof(T));
    for (int64_t i = 0; i < k; ++i)  // & rather than &&: no branch, so the loop vectorises
      overflowed += static_cast<int>(Codec::finite(in[i])) & static_cast<int>(!Codec::finite(out[i]));
  }
  return overflowed;
}

// Elements [first, last) of the tensor (all of it by default); dst receives them from its start.
template <class Codec>
AffineResult affine_typed(std::string_view src, const ChannelAxis& a, const double* scale, const double* shift,
                          char* dst, int64_t first, int64_t last) {
  using T = typename Codec::Stored;
  AffineResult result;
  const int64_t n = a.element_count();
  if (n < 0 || src.size() != static_cast<size_t>(n) * sizeof(T)) return result;
  if (last < 0) last = n;
  if (first < 0 || first > last || last > n) return result;
  auto note = [&](int64_t overflowed, int64_t channel) {
    if (overflowed && result.overflowed == 0) result.first_overflow_channel = channel;
    result.overflowed += overflowed;
  };
  // One run of `len` elements starting at element `base`, clipped to [first, last).
  auto run = [&](int64_t base, int64_t len, const double* s, const double* t, int64_t channel, bool per_element) {
    const int64_t from = std::max(base, first), to = std::min(base + len, last);
    if (from >= to) return;
    const char* in = src.data() + from * sizeof(T);
    char* out = dst ? dst + (from - first) * sizeof(T) : nullptr;
    const int64_t skip = from - base;
    const int64_t over = per_element ? affine_run<Codec, true>(in, out, to - from, s + skip, t ? t + skip : nullptr)
                                     : affine_run<Codec, false>(in, out, to - from, s, t);
    note(over, channel + (per_element ? skip : 0));
  };
  const int64_t group_size = a.outer * a.channels * a.inner;
  for (int64_t g = first / std::max<int64_t>(group_size, 1); g < a.groups; ++g) {
    const double* s = scale + g * a.channels;
    const double* t = shift ? shift + g * a.channels : nullptr;
    const int64_t row = a.channels * a.inner;
    int64_t base = g * group_size;
    if (base >= last) break;
    for (int64_t o = 0; o < a.outer; ++o, base += row) {
      if (base + row <= first) continue;
      if (base >= last) break;
      if (a.inner == 1) {  // one row of `channels` elements, a factor each
        run(base, a.channels, s, t, g * a.channels, true);
        continue;
      }
      for (int64_t c = 0; c < a.channels; ++c)  // `inner` elements sharing one factor
        run(base + c * a.inner, a.inner, s + c, t ? t + c : nullptr, g * a.channels + c, false);
    }
  }
  result.ok = true;
  return result;
}

template <class Codec>
std::optional<std::string> store_typed(const std::vector<double>& values) {
  using T = typename Codec::Stored;
  std::vector<T> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    out[i] = Codec::store(values[i]);
    if (std::isfinite(values[i]) && !std::isfinite(Codec::load(out[i]))) return std::nullopt;
  }
  return std::string(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(T));
}

}  // namespace

AffineResult affine_channels(int32_t data_type, std::string_view src, const ChannelAxis& axis, const double* scale,
                             const double* shift, std::string& dst) {
  dst.resize(src.size());
  return affine_channels(data_type, src, axis, scale, shift, dst.data());
}

QDQFOLD_VECTOR_CLONES
AffineResult affine_channels(int32_t data_type, std::string_view src, const ChannelAxis& axis, const double* scale,
                             const double* shift, char* dst, int64_t first, int64_t last) {
  if (axis.groups < 1 || axis.outer < 0 || axis.channels < 0 || axis.inner < 1) return {};
  switch (static_cast<DataType>(data_type)) {
    case DataType::Float: return affine_typed<Float32>(src, axis, scale, shift, dst, first, last);
    case DataType::Double: return affine_typed<Float64>(src, axis, scale, shift, dst, first, last);
    case DataType::Float16: return affine_typed<Float16>(src, axis, scale, shift, dst, first, last);
    case DataType::Bfloat16: return affine_typed<Bfloat16>(src, axis, scale, shift, dst, first, last);
    default: return {};
  }
}

std::optional<std::string> store_values(int32_t data_type, const std::vector<double>& values) {
  switch (static_cast<DataType>(data_type)) {
    case DataType::Float: return store_typed<Float32>(values);
    case DataType::Double: return store_typed<Float64>(values);
    case DataType::Float16: return store_typed<Float16>(values);
    case DataType::Bfloat16: return store_typed<Bfloat16>(values);
    default: return std::nullopt;
  }
}

}  // namespace qdqfold::kernels
