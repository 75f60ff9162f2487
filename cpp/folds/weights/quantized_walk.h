// How a quantized weight is walked (shared by the rescale's read-only passes and the generator that writes
// the new weight): runs of elements sharing one output channel and one scale element, or, where the output
// channel is the last axis, rows with per-column parameters.
#pragma once

#include <algorithm>
#include <numeric>
#include <optional>
#include <vector>

#include "folds/weights/quantized_weight.h"

namespace qdqfold::folds::walk {

// Walks elements [first, last) of the weight in order, as runs that share one output channel o and one scale
// element k: f(begin, length, o, k), which returns false to stop. The output channel depends on i / R (Conv,
// Gemm transB=1: on i / (Q * R)) and the scale element is constant on aligned runs of layout.run_length(),
// so aligned runs of their gcd share both (a whole input-channel block for a per-channel Conv).
template <class F>
void for_each_run(const WeightLayout& wl, const QuantLayout& layout, int64_t count, int64_t first, int64_t last, F&& f) {
  const int64_t QR = wl.Q * wl.R;
  const int64_t by_channel = wl.p_is_output ? QR : wl.R;
  const int64_t by_scale = layout.per_tensor() ? count : layout.run_length();
  const int64_t L = std::max<int64_t>(std::gcd(by_channel, by_scale), 1);
  for (int64_t i = first - first % L; i < last; i += L) {
    const int64_t from = std::max(i, first), to = std::min(i + L, last);
    if (!f(from, to - from, wl.output_of(i / QR, (i / wl.R) % wl.Q), layout.scale_index(i))) return;
  }
}

// Weights whose output channel is the last axis (MatMul [K, N], Gemm transB=0, 1x1 ConvTranspose): element
// i = r * n + j belongs to output channel j and, for the scale layouts met there (QuantLayout::row_step), to
// scale element base(r) + step * j. for_each_run would see runs of one element; these weights are walked a
// row at a time with per-column parameters instead. (Float8 weights keep the run walk.)
struct RowView {
  int64_t n = 0;  // row length: the output channels
  int64_t step = 0;
};

inline std::optional<RowView> row_view(const WeightLayout& wl, const QuantLayout& layout, int32_t int_type) {
  if (wl.p_is_output || wl.R != 1 || wl.groups != 1 || wl.Q <= 0 || kernels::is_float8(int_type)) return std::nullopt;
  const int step = layout.row_step(wl.Q);
  if (step < 0) return std::nullopt;
  return RowView{wl.Q, step};
}

// Rows [0, rows) in groups of consecutive rows with one scale base: f(first_row, rows, base), false to stop.
template <class F>
void for_each_row_group(const RowView& v, const QuantLayout& layout, int64_t rows, F&& f) {
  for (int64_t r = 0; r < rows;) {
    const int64_t base = layout.scale_index(r * v.n);
    int64_t end = r + 1;
    while (end < rows && layout.scale_index(end * v.n) == base) ++end;
    if (!f(r, end - r, base)) return;
    r = end;
  }
}

// Elements [first, last) as pieces of rows (a piece is partial where [first, last) cuts a row):
// f(i, j0, j1, base) for columns [j0, j1) of the row whose column j0 is element i; false to stop.
template <class F>
void for_each_row_piece(const RowView& v, const QuantLayout& layout, int64_t first, int64_t last, F&& f) {
  for (int64_t r = first / v.n; r * v.n < last; ++r) {
    const int64_t row = r * v.n, i0 = std::max(first, row), i1 = std::min(last, row + v.n);
    if (!f(i0, i0 - row, i1 - row, layout.scale_index(row))) return;
  }
}

// f(o, k) with the output channel and scale element of every element in element order (a row view visits one
// row of each group of rows with the same pairs); f returns false to stop.
template <class F>
void for_each_channel_scale(const QuantizedWeight& w, const WeightLayout& wl, const QuantLayout& layout, F&& f) {
  if (auto v = row_view(wl, layout, w.int_type)) {
    for_each_row_group(*v, layout, w.count / v->n, [&](int64_t, int64_t, int64_t base) {
      for (int64_t j = 0; j < v->n; ++j)
        if (!f(j, base + v->step * j)) return false;
      return true;
    });
    return;
  }
  for_each_run(wl, layout, w.count, 0, w.count, [&](int64_t, int64_t, int64_t o, int64_t k) { return f(o, k); });
}

// What the output channels covered by each scale element need: one factor |a|, and whether any of them is

// The rescale per scale element (old scale and zero point: one when the scale was promoted), and per column
// for a row view.
struct Rescale {
  bool promoted = false;
  std::vector<char> negative;  // per output channel
  std::vector<int64_t> mirror, old_zero, zero;
  std::vector<double> old_scale, scale;

  size_t old(int64_t k) const { return promoted ? 0 : static_cast<size_t>(k); }
};

inline Rescale rescale_of(const QuantizedWeight& w, const RescaledWeight& r) {
  return Rescale{r.promoted, r.negative, r.mirror, w.zero, r.zero, w.scale, r.scale};
}

// The parameters of columns 0..n of the rows with scale base `base`: for the int form the integer mirror, for
// the QAT form the old quantizer, the mirror q' = add + sign * q and the new scale and zero point.
struct Columns {
  int64_t base = -1;
  kernels::MirrorColumns mirror;
  std::vector<float> old_scale;
  std::vector<double> old_zero, add, sign, zero, scale;
  std::vector<float> old_zero_f, add_f, sign_f, zero_f, scale_f;  // the same as float32 (requantize_float32)
};

inline Columns columns(const Rescale& p, const RowView& v, int64_t base, int32_t int_type, bool qat) {
  Columns c;
  c.base = base;
  const auto n = static_cast<size_t>(v.n);
  std::vector<int64_t> mirror(n);
  for (size_t j = 0; j < n; ++j) mirror[j] = p.mirror[static_cast<size_t>(base + v.step * static_cast<int64_t>(j))];
  if (!qat) {
    c.mirror = kernels::mirror_columns(int_type, mirror, p.negative);
    return c;
  }
  c.old_scale.resize(n);
  c.old_zero.resize(n);
  c.add.resize(n);
  c.sign.resize(n);
  c.zero.resize(n);
  c.scale.resize(n);
  for (size_t j = 0; j < n; ++j) {
    const int64_t k = base + v.step * static_cast<int64_t>(j);
    c.old_scale[j] = static_cast<float>(p.old_scale[p.old(k)]);
    c.old_zero[j] = static_cast<double>(p.old_zero[p.old(k)]);
    c.add[j] = p.negative[j] ? static_cast<double>(mirror[j]) : 0.0;
    c.sign[j] = p.negative[j] ? -1.0 : 1.0;
    c.zero[j] = static_cast<double>(p.zero[static_cast<size_t>(k)]);
    c.scale[j] = p.scale[static_cast<size_t>(k)];
  }
  auto as_float = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  c.old_zero_f = as_float(c.old_zero);
  c.add_f = as_float(c.add);
  c.sign_f = as_float(c.sign);
  c.zero_f = as_float(c.zero);
  c.scale_f = as_float(c.scale);
  return c;
}

}  // namespace qdqfold::folds::walk
