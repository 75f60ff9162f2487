// Per-channel arithmetic on float tensors (float32, float16, bfloat16, float64) stored in raw_data layout:
// every element is mapped as  y = x * scale[channel] + shift[channel]  in double and rounded once to the
// element type (round to nearest even, no double rounding through float32).
//
// Which channel an element belongs to is described by a ChannelAxis: the tensor is viewed as
// [groups, outer, channels, inner], and element (g, o, c, i) belongs to channel g * channels + c. That covers
//   a plain axis k of dims d          groups 1, outer d[0]*..*d[k-1], channels d[k], inner d[k+1]*..
//   Conv weight [M, C/g, k...], out    groups 1, outer 1, channels M, inner C/g * k
//   ConvTranspose [C, M/g, k...], out  groups g, outer C/g, channels M/g, inner k   (channel g*(M/g) + j)
//   Gemm B [K, N] (transB=0), out      groups 1, outer K, channels N, inner 1
// (folds/common/layout.h builds these from a WeightLayout: WeightLayout::output_axis() / input_axis()).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qdqfold::kernels {

struct ChannelAxis {
  int64_t groups = 1, outer = 1, channels = 1, inner = 1;

  int64_t channel_count() const { return groups * channels; }
  int64_t element_count() const { return groups * outer * channels * inner; }
  // The channel of dimension `axis` of a tensor with `dims` (no groups).
  static ChannelAxis of_dimension(const std::vector<int64_t>& dims, size_t axis);
};

// True for the element types these kernels read and write: float32, float16, bfloat16, float64.
bool is_supported_float(int32_t data_type);

struct AffineResult {
  bool ok = false;           // false: unsupported type, or `src` / factors do not match `axis`
  int64_t overflowed = 0;    // elements finite in `src` that became +-Inf (or NaN) in `dst`
  int64_t first_overflow_channel = -1;
};

// dst = src * scale[ch] + shift[ch] for every element (shift may be null: no shift). `src` holds
// axis.element_count() elements of `data_type` in raw_data layout; `dst` receives src.size() bytes in the
// same layout (both any alignment, e.g. straight into an output buffer). The result counts the values that
// overflow, written or not; dst == nullptr only checks, and nothing is written. scale and shift hold
// axis.channel_count() values. With an element range [first, last) only those elements are computed, and
// dst receives them from its start (a chunk of the output at a time); last = -1 means the end.
AffineResult affine_channels(int32_t data_type, std::string_view src, const ChannelAxis& axis, const double* scale,
                             const double* shift, char* dst, int64_t first = 0, int64_t last = -1);

// The same into a string (resized to src.size()).
AffineResult affine_channels(int32_t data_type, std::string_view src, const ChannelAxis& axis, const double* scale,
                             const double* shift, std::string& dst);

// Convenience for the common case: every element scaled by its channel's factor.
inline AffineResult scale_channels(int32_t data_type, std::string_view src, const ChannelAxis& axis,
                                   const std::vector<double>& factor, std::string& dst) {
  return affine_channels(data_type, src, axis, factor.data(), nullptr, dst);
}

// `values` rounded once to `data_type`, in raw_data layout. nullopt for unsupported types or when a finite
// value does not fit (overflows to Inf).
std::optional<std::string> store_values(int32_t data_type, const std::vector<double>& values);

// Correctly rounded conversions from double (a direct double -> float16 / bfloat16 rounding; going through
// float32 first could round twice).
uint16_t double_to_half(double v);
uint16_t double_to_bf16(double v);

}  // namespace qdqfold::kernels
