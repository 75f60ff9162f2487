// The rescale of a quantized weight (quantized_weight.h): which scale layout absorbs the factors, the
// mirror of the negated integers, and the read-only checks (negation fits, QAT weights snap back).
#include <algorithm>
#include <cmath>
#include <limits>

#include "folds/weights/quantized_walk.h"
#include "folds/expected.h"
#include "folds/weights/quantized_weight.h"
#include "kernels/numeric.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;
using graph::Use;
using wire::DataType;
using namespace walk;

namespace {

// negated (and any not). Depends on the layouts only, not on the weight's values.
struct Coverage {
  std::vector<double> factor;
  std::vector<char> negative, positive;
  std::vector<int64_t> first_channel;
  std::vector<char> negated_channel;  // per output channel: a < 0 and it holds elements
  std::string conflict;
};

Coverage cover(const QuantizedWeight& w, const WeightLayout& wl, const QuantLayout& layout, const std::vector<double>& a) {
  Coverage c;
  const auto n = static_cast<size_t>(layout.scale_count());
  c.factor.assign(n, -1.0);
  c.negative.assign(n, 0);
  c.positive.assign(n, 0);
  c.first_channel.assign(n, -1);
  c.negated_channel.assign(static_cast<size_t>(wl.out_channels), 0);
  for_each_channel_scale(w, wl, layout, [&](int64_t o, int64_t k) {
    const double f = std::fabs(a[o]);
    if (c.factor[k] < 0) {
      c.factor[k] = f;
      c.first_channel[k] = o;
    } else if (c.factor[k] != f) {
      c.conflict = "one scale value covers output channels " + std::to_string(c.first_channel[k]) + " and " +
                   std::to_string(o) + ", whose BN factors differ";
      return false;
    }
    (a[o] < 0 ? c.negative[k] : c.positive[k]) = 1;
    if (a[o] < 0) c.negated_channel[o] = 1;
    return true;
  });
  return c;
}

// The extreme integers q of the negated elements of each scale element k: read from the integers, or for the
// QAT form from the extreme float weights (QuantizeLinear is monotone in x for a fixed scale: increasing for
// s > 0, decreasing for s < 0; a NaN weight quantizes to the zero point). For float8 only whether negation
// changes any byte.
struct NegatedExtremes {
  std::vector<int64_t> min, max;
  bool float8_changes = false;
};

// The integers QuantizeLinear(s, z) makes of floats with extremes x: [lo, hi], empty (lo > hi) for none.
std::pair<int64_t, int64_t> quantized_extremes(const kernels::FloatExtremes& x, float s, int64_t z,
                                               kernels::IntegerRange range) {
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  if (x.any_number) {
    const int64_t q1 = kernels::quantize_element(x.min, s, z, range), q2 = kernels::quantize_element(x.max, s, z, range);
    lo = std::signbit(s) ? q2 : q1;
    hi = std::signbit(s) ? q1 : q2;
  }
  if (x.any_nan) {
    const int64_t q = range.contains(z) ? z : range.lo;
    lo = std::min(lo, q);
    hi = std::max(hi, q);
  }
  return {lo, hi};
}

NegatedExtremes negated_extremes(const QuantizedWeight& w, const WeightLayout& wl, const QuantLayout& layout,
                                 bool promoted, const std::vector<double>& a) {
  NegatedExtremes e;
  const auto n = static_cast<size_t>(layout.scale_count());
  e.min.assign(n, std::numeric_limits<int64_t>::max());
  e.max.assign(n, std::numeric_limits<int64_t>::min());
  auto merge = [&](int64_t k, std::pair<int64_t, int64_t> x) {
    e.min[k] = std::min(e.min[k], x.first);
    e.max[k] = std::max(e.max[k], x.second);
  };
  auto quantized = [&](const kernels::FloatExtremes& x, int64_t k) {
    const size_t old = promoted ? 0 : static_cast<size_t>(k);
    return quantized_extremes(x, static_cast<float>(w.scale[old]), w.zero[old], w.range);
  };
  if (auto v = row_view(wl, layout, w.int_type)) {
    // Column-wise extremes over each group of rows sharing their scale elements, merged for negated columns.
    const auto cols = static_cast<size_t>(v->n);
    std::vector<int64_t> lo(cols), hi(cols);
    std::vector<float> flo(cols), fhi(cols);
    std::vector<char> nan(cols);
    for_each_row_group(*v, layout, w.count / v->n, [&](int64_t r, int64_t rows, int64_t base) {
      if (w.qat()) {
        std::fill(flo.begin(), flo.end(), INFINITY);
        std::fill(fhi.begin(), fhi.end(), -INFINITY);
        std::fill(nan.begin(), nan.end(), 0);
        kernels::float_column_extremes(w.data.data(), w.float_type, r * v->n, rows, v->n, flo.data(), fhi.data(),
                                       nan.data());
      } else {
        std::fill(lo.begin(), lo.end(), std::numeric_limits<int64_t>::max());
        std::fill(hi.begin(), hi.end(), std::numeric_limits<int64_t>::min());
        kernels::integer_column_extremes(w.data.data(), w.int_type, r * v->n, rows, v->n, lo.data(), hi.data());
      }
      for (size_t j = 0; j < cols; ++j) {
        if (!(a[j] < 0)) continue;
        const int64_t k = base + v->step * static_cast<int64_t>(j);
        if (w.qat()) merge(k, quantized({flo[j], fhi[j], flo[j] <= fhi[j], nan[j] != 0}, k));
        else merge(k, {lo[j], hi[j]});
      }
      return true;
    });
    return e;
  }
  const bool fnuz = kernels::is_fnuz_float8(w.int_type);
  for_each_run(wl, layout, w.count, 0, w.count, [&](int64_t begin, int64_t len, int64_t o, int64_t k) {
    if (!(a[o] < 0) || len == 0) return true;
    if (w.float8()) {
      for (int64_t i = begin; i < begin + len && !e.float8_changes; ++i)
        e.float8_changes = !fnuz || (static_cast<uint8_t>(w.data[i]) & 0x7f) != 0;
    } else if (!w.qat()) {
      const auto x = kernels::integer_extremes(w.data.data(), w.int_type, begin, len);
      merge(k, {x.min, x.max});
    } else {
      kernels::FloatExtremes x;
      kernels::float_extremes(w.data.data(), w.float_type, begin, len, x);
      merge(k, quantized(x, k));
    }
    return true;
  });
  return e;
}

// For the message when a negation does not fit: the output channel of the first negated element (in element
// order) of scale element k whose integer is `value`.
int64_t channel_holding(const QuantizedWeight& w, const WeightLayout& wl, const QuantLayout& layout, bool promoted,
                        const std::vector<double>& a, int64_t k, int64_t value) {
  int64_t channel = -1;
  const size_t old = promoted ? 0 : static_cast<size_t>(k);
  for_each_run(wl, layout, w.count, 0, w.count, [&](int64_t begin, int64_t len, int64_t o, int64_t run_k) {
    if (run_k != k || !(a[o] < 0)) return true;
    for (int64_t i = begin; i < begin + len && channel < 0; ++i) {
      double q;
      if (w.qat())
        kernels::quantize_elements(w.data.data(), w.float_type, i, 1, static_cast<float>(w.scale[old]), w.zero[old],
                                   w.range, &q);
      if ((w.qat() ? static_cast<int64_t>(q) : kernels::integer_extremes(w.data.data(), w.int_type, i, 1).min) == value)
        channel = o;
    }
    return channel < 0;
  });
  return channel;
}


// QAT form kept: W' = (q' - z') * s' rounded to the weight's type must quantize back to q'. Whether it does
// depends on q' and the scale element only, so every integer of the type is tried per scale element when that
// is cheaper than the weight; only if one fails are the elements scanned (in order, naming the first that
// fails), since that integer may not occur.
std::optional<Outcome> check_snap(const QuantizedWeight& w, const WeightLayout& wl, const RescaledWeight& r,
                                  const std::vector<double>& a, const std::string& who) {
  auto snaps = [&](int64_t v, size_t k) {
    const double snapped = kernels::round_to_float_type(static_cast<double>(v - r.zero[k]) * r.scale[k], w.float_type);
    return kernels::quantize_element(static_cast<float>(snapped), static_cast<float>(r.scale[k]), r.zero[k], w.range) == v;
  };
  const size_t n = r.scale.size();
  // A float32 weight snaps for every integer when each s' is a normal float32 and (hi - lo) * s' is far from
  // overflowing: with m = q' - z' (|m| <= hi - lo <= 2^16), W' = fl(m s') and W' / s' in float32 is
  // m (1 + d1)(1 + d2) with |d| <= 2^-24, within |m| 2^-23 < 1/2 of m, so it rounds back to m.
  if (w.float_type == static_cast<int32_t>(wire::DataType::Float) && w.range.hi - w.range.lo <= (int64_t{1} << 16) &&
      std::all_of(r.scale.begin(), r.scale.end(), [&](double s) {
        return s >= std::numeric_limits<float>::min() &&
               s * static_cast<double>(w.range.hi - w.range.lo) < 0.5 * std::numeric_limits<float>::max();
      }))
    return std::nullopt;
  const int64_t values = w.range.hi - w.range.lo + 1;
  if (values <= w.count / static_cast<int64_t>(std::max<size_t>(n, 1))) {
    bool all = true;
    for (size_t k = 0; k < n && all; ++k)
      for (int64_t v = w.range.lo; v <= w.range.hi && all; ++v) all = snaps(v, k);
    if (all) return std::nullopt;
  }
  std::optional<Outcome> failed;
  auto fail_at = [&](int64_t i) {
    failed = Outcome::kept(Reason::SnapFailed, "the rescaled float weight of " + who + " does not quantize back to its "
                                          "integers in " + graph::data_type_name(w.float_type) + " (element " +
                                          std::to_string(i) + ")");
    return false;
  };
  if (auto v = row_view(wl, r.layout, w.int_type)) {
    const Rescale p = rescale_of(w, r);
    Columns cols;
    std::vector<double> q(static_cast<size_t>(v->n));
    for_each_row_piece(*v, r.layout, 0, w.count, [&](int64_t i, int64_t j0, int64_t j1, int64_t base) {
      if (cols.base != base) cols = columns(p, *v, base, w.int_type, true);
      kernels::quantize_elements(w.data.data(), w.float_type, i, j1 - j0, cols.old_scale.data() + j0,
                                 cols.old_zero.data() + j0, w.range, q.data());
      kernels::mirror_values(q.data(), j1 - j0, cols.add.data() + j0, cols.sign.data() + j0);
      for (int64_t j = j0; j < j1; ++j)
        if (!snaps(static_cast<int64_t>(q[j - j0]), static_cast<size_t>(base + v->step * j))) return fail_at(i + j - j0);
      return true;
    });
    return failed;
  }
  std::vector<double> q(1024);
  for_each_run(wl, r.layout, w.count, 0, w.count, [&](int64_t begin, int64_t len, int64_t o, int64_t k) {
    const size_t old = r.promoted ? 0 : static_cast<size_t>(k);
    for (int64_t done = 0; done < len; done += 1024) {
      const int64_t m = std::min<int64_t>(1024, len - done);
      kernels::quantize_elements(w.data.data(), w.float_type, begin + done, m, static_cast<float>(w.scale[old]),
                                 w.zero[old], w.range, q.data());
      for (int64_t j = 0; j < m; ++j) {
        const auto v = static_cast<int64_t>(q[j]);
        if (!snaps(a[o] < 0 ? r.mirror[k] - v : v, static_cast<size_t>(k))) return fail_at(begin + done + j);
      }
    }
    return true;
  });
  return failed;
}

}  // namespace

static Outcome opset_too_old(const std::string& who) {
  return Outcome::kept(Reason::OpsetTooOld, "the BN factors differ per channel, so the per-tensor scale of " + who +
                                                " must become per-channel, which needs DequantizeLinear's axis "
                                                "attribute (opset >= 13); the model's opset is older");
}

std::optional<Outcome> per_channel_scale_needs_axis(const QuantizedWeight& w, const WeightLayout& wl,
                                                    const std::vector<double>& a, const std::string& who) {
  if (w.axis_supported || !w.layout.per_tensor()) return std::nullopt;
  if (wl.P * wl.Q * wl.R != w.count || static_cast<int64_t>(a.size()) != wl.out_channels) return std::nullopt;
  if (cover(w, wl, w.layout, a).conflict.empty()) return std::nullopt;
  return opset_too_old(who);
}

Expected<RescaledWeight> rescale_quantized_weight(const QuantizedWeight& w, const WeightLayout& wl,
                                                               const std::vector<double>& a, const Options& options,
                                                               bool keep_quantizer, const std::string& who,
                                                               std::shared_ptr<DeferredChecks> deferred) {
  if (wl.P * wl.Q * wl.R != w.count || static_cast<int64_t>(a.size()) != wl.out_channels)
    return Outcome::kept(Reason::ShapeMismatch, "the BN has " + std::to_string(a.size()) + " channels but " + who + " has " +
                                               std::to_string(wl.out_channels) + " output channels");
  RescaledWeight r;
  // Keep the scale's layout when every scale value covers channels with one factor |a|; a per-tensor scale
  // otherwise becomes one scale per slice of the weight's output-channel axis.
  r.layout = w.layout;
  Coverage c = cover(w, wl, r.layout, a);
  if (!c.conflict.empty() && w.layout.per_tensor()) {
    if (!w.axis_supported) return opset_too_old(who);  // the planner asked per_channel_scale_needs_axis first
    r.layout.axis = wl.out_axis;
    r.layout.block_size = 0;
    r.layout.scale_dims = {w.dims[wl.out_axis]};
    r.layout.prepare(w.dims);
    r.promoted = true;
    c = cover(w, wl, r.layout, a);
  }
  if (!c.conflict.empty())
    return Outcome::kept(Reason::ScaleLayout, "the quantization scale of " + who + " cannot absorb the BN factors: " + c.conflict);
  // Only the negated elements' values matter for what follows: read them once (none when no factor is negative).
  const bool any_negative = std::any_of(c.negative.begin(), c.negative.end(), [](char v) { return v != 0; });
  const auto n = static_cast<size_t>(r.layout.scale_count());
  auto old_index = [&](size_t k) { return r.promoted ? size_t{0} : k; };
  // With a signed type and zero points of 0 the negation q' = -q is the first candidate below, and it fits
  // unless q is the type's lowest value. In the QAT form (whose integers are rewritten anyway, so
  // ints_changed does not matter) the generator can check that while it writes, instead of a read-only pass
  // quantizing the whole weight first.
  bool defer_negation = deferred && any_negative && w.qat() && !w.float8() && w.range.lo == -w.range.hi - 1;
  for (size_t k = 0; k < n && defer_negation; ++k) defer_negation = !c.negative[k] || w.zero[old_index(k)] == 0;
  const NegatedExtremes e =
      any_negative && !defer_negation ? negated_extremes(w, wl, r.layout, r.promoted, a) : NegatedExtremes{};
  if (defer_negation) r.negation_check = deferred;

  const int64_t complement_c = w.range.lo + w.range.hi;
  r.mirror.assign(n, 0);
  r.scale.resize(n);
  r.zero.resize(n);
  for (size_t k = 0; k < n; ++k) {
    const double s = w.scale[old_index(k)];
    const int64_t z = w.zero[old_index(k)];
    r.scale[k] = kernels::round_to_float_type(s * c.factor[k], w.scale_type);
    if (!std::isfinite(r.scale[k]))
      return Outcome::kept(Reason::ScaleOverflow, "the rescaled scale of " + who + " overflows in channel " +
                                                 std::to_string(c.first_channel[k]));
    if (keep_quantizer && r.scale[k] == 0)
      return Outcome::kept(Reason::ZeroFactor,
                           "the BN factor of channel " + std::to_string(c.first_channel[k]) + " is 0 (or the scale of " +
                               who + " underflows to 0): its QuantizeLinear would divide by a zero scale; "
                               "materialize_quantized_weights=True folds it with integer weights");
    r.zero[k] = z;
    if (!c.negative[k] || w.float8() || defer_negation) continue;  // deferred: mirror 0, zero point 0 (= z)
    auto fits = [&](int64_t m) {
      return w.range.contains(m - z) && w.range.contains(m - e.min[k]) && w.range.contains(m - e.max[k]);
    };
    std::vector<int64_t> candidates = {2 * z};                       // zero point unchanged (negation when z = 0)
    if (!c.positive[k]) {
      candidates.push_back(0);                                       // q' = -q, z' = -z
      if (options.allow_nonzero_zero_point || z != 0) candidates.push_back(complement_c);
    }
    bool found = false;
    for (int64_t m : candidates)
      if (fits(m)) {
        r.mirror[k] = m;
        r.zero[k] = m - z;
        r.complement = r.complement || (m == complement_c && m != 2 * z && m != 0);
        found = true;
        break;
      }
    if (!found) {
      const bool low = !w.range.contains(2 * z - e.min[k]);
      const int64_t value = low ? e.min[k] : e.max[k];
      const int64_t channel = channel_holding(w, wl, r.layout, r.promoted, a, static_cast<int64_t>(k), value);
      std::string msg = "channel " + std::to_string(channel) + " of " + who + " has a negative BN factor and holds the " +
                        graph::data_type_name(w.int_type) + " value " + std::to_string(value) +
                        ", whose negation does not fit the type" +
                        (w.clip >= 0 ? " range its Clip allows, [" + std::to_string(w.range.lo) + ", " +
                                           std::to_string(w.range.hi) + "] (a symmetric Clip range always fits)"
                                     : std::string());
      if (!options.allow_nonzero_zero_point && !c.positive[k])
        msg += "; allow_nonzero_zero_point=True folds it exactly with the complement "
               "form (q' = " +
               std::string(w.range.lo < 0 ? "-1 - q" : std::to_string(complement_c) + " - q") +
               "), at a cost: that channel's weight zero point becomes nonzero, which TensorRT rejects (it requires "
               "symmetric weights with zero point 0)";
      return Outcome::kept(Reason::NegationOverflow, msg);
    }
  }
  r.zero_changed = r.zero != w.zero || (r.promoted && w.has_zero);

  // q' = mirror - q leaves a negated element as it was only where q = mirror / 2: so the integers of scale
  // element k are unchanged exactly when all its negated ones equal mirror / 2.
  r.negative.assign(a.size(), 0);
  for (size_t o = 0; o < a.size(); ++o) r.negative[o] = a[o] < 0;
  r.negated_channels = static_cast<int>(std::count(c.negated_channel.begin(), c.negated_channel.end(), 1));
  if (w.float8()) {
    r.ints_changed = e.float8_changes;
  } else if (defer_negation) {
    r.ints_changed = true;
  } else {
    for (size_t k = 0; k < n && !r.ints_changed; ++k)
      r.ints_changed = c.negative[k] && !(e.min[k] == e.max[k] && 2 * e.min[k] == r.mirror[k]);
  }

  if (w.qat() && keep_quantizer)
    if (auto failed = check_snap(w, wl, r, a, who)) {
      // With the negation deferred, q' = -q of the lowest value fails here too: decide the negation first.
      if (defer_negation) return rescale_quantized_weight(w, wl, a, options, keep_quantizer, who, nullptr);
      return *failed;
    }
  return r;
}

}  // namespace qdqfold::folds
