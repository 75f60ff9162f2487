// The new weight's data (quantized_weight.h: rescaled_weight_data), produced when the output is written.
#include <algorithm>
#include <cstring>

#include "folds/weights/quantized_walk.h"
#include "folds/weights/quantized_weight.h"

namespace qdqfold::folds {

using namespace walk;

namespace {

// Everything the generator needs, owned: it runs when the output is written, after the fold has returned.
struct WeightGenerator {
  graph::PinnedBytes data;  // the integers or W: valid until the output is written
  int64_t count = 0;
  int32_t int_type = 0, float_type = 0;
  bool qat = false, as_integers = true, fnuz = false, float8 = false;
  WeightLayout wl;
  QuantLayout layout;
  kernels::IntegerRange range;
  Rescale p;
  std::shared_ptr<DeferredChecks> negation_check;  // see RescaledWeight::negation_check
  bool in_float32 = false;  // the QAT form kept with a float32 weight: kernels::requantize_float32

  size_t size() const {
    return as_integers ? *kernels::quantized_bytes(int_type, count) : static_cast<size_t>(count) * element_width();
  }
  size_t element_width() const { return as_integers ? kernels::quantized_width(int_type) : graph::element_size(float_type); }
  bool packed() const { return as_integers && kernels::quantized_width(int_type) == 0; }

  // Output bytes [begin, end) (whole elements: 4-bit data in whole bytes) into dst.
  void fill(char* dst, size_t begin, size_t end) const {
    int64_t first, last;
    if (packed()) {
      first = static_cast<int64_t>(begin) * 2;
      last = std::min<int64_t>(static_cast<int64_t>(end) * 2, count);
      std::memset(dst, 0, end - begin);  // nibbles are or-ed in; an odd count's padding nibble stays 0
    } else {
      first = static_cast<int64_t>(begin / element_width());
      last = static_cast<int64_t>(end / element_width());
    }
    if (auto v = row_view(wl, layout, int_type)) return fill_rows(*v, dst, first, last);
    std::vector<double> q(qat && !in_float32 ? 1024 : 0);
    for_each_run(wl, layout, count, first, last, [&](int64_t from, int64_t len, int64_t o, int64_t k) {
      const bool neg = p.negative[o];
      if (in_float32) {
        const auto add = static_cast<float>(neg ? p.mirror[k] : 0), sign = neg ? -1.0f : 1.0f;
        const bool lowest = kernels::requantize_float32(
            data.data(), from, len, static_cast<float>(p.old_scale[p.old(k)]), static_cast<float>(p.old_zero[p.old(k)]),
            add, sign, static_cast<float>(p.zero[k]), static_cast<float>(p.scale[k]), range, dst + (from - first) * 4);
        if (lowest && negation_check) negation_check->fail();
        return true;
      }
      if (!qat) {
        if (!neg) kernels::copy_integers(data.data(), dst, int_type, from, len, first);
        else if (float8) kernels::negate_float8_bytes(data.data(), dst, from, len, first, fnuz);
        else kernels::mirror_integers(data.data(), dst, int_type, from, len, first, p.mirror[k]);
        return true;
      }
      for (int64_t done = 0; done < len; done += 1024) {
        const int64_t m = std::min<int64_t>(1024, len - done);
        kernels::quantize_elements(data.data(), float_type, from + done, m, static_cast<float>(p.old_scale[p.old(k)]),
                                   p.old_zero[p.old(k)], range, q.data());
        if (neg) {
          if (negation_check && lowest_in(q.data(), m)) negation_check->fail();
          const auto c = static_cast<double>(p.mirror[k]);
          for (int64_t j = 0; j < m; ++j) q[j] = c - q[j];
        }
        store(q.data(), m, from + done - first, dst, static_cast<double>(p.zero[k]), p.scale[k]);
      }
      return true;
    });
  }

  // The same a row piece at a time, with the parameters of the piece's columns.
  void fill_rows(const RowView& v, char* dst, int64_t first, int64_t last) const {
    constexpr int64_t kPiece = 4096;
    Columns cols;
    std::vector<double> q(qat && !in_float32 ? kPiece : 0);
    for_each_row_piece(v, layout, first, last, [&](int64_t i, int64_t j0, int64_t j1, int64_t base) {
      if (cols.base != base) cols = columns(p, v, base, int_type, qat);
      if (!qat) {
        kernels::mirror_integers(data.data(), dst, int_type, i, j1 - j0, first, cols.mirror, j0);
        return true;
      }
      if (in_float32) {
        const bool lowest = kernels::requantize_float32(
            data.data(), i, j1 - j0, cols.old_scale.data() + j0, cols.old_zero_f.data() + j0, cols.add_f.data() + j0,
            cols.sign_f.data() + j0, cols.zero_f.data() + j0, cols.scale_f.data() + j0, range, dst + (i - first) * 4);
        if (lowest && negation_check) negation_check->fail();
        return true;
      }
      for (int64_t j = j0; j < j1; j += kPiece) {
        const int64_t m = std::min(kPiece, j1 - j), e = i + (j - j0);
        kernels::quantize_elements(data.data(), float_type, e, m, cols.old_scale.data() + j, cols.old_zero.data() + j,
                                   range, q.data());
        if (negation_check && lowest_in(q.data(), m, cols.sign.data() + j)) negation_check->fail();
        kernels::mirror_values(q.data(), m, cols.add.data() + j, cols.sign.data() + j);
        store<const double*>(q.data(), m, e - first, dst, cols.zero.data() + j, cols.scale.data() + j);
      }
      return true;
    });
  }

  // Deferred negation check: does q[0, m) (only where sign[j] < 0, when given) hold the type's lowest value?
  bool lowest_in(const double* q, int64_t m, const double* sign = nullptr) const {
    const auto lowest = static_cast<double>(range.lo);
    int hits = 0;  // | rather than a branch: the loop vectorises
    for (int64_t j = 0; j < m; ++j) hits |= static_cast<int>(q[j] == lowest) & static_cast<int>(!sign || sign[j] < 0);
    return hits != 0;
  }

  // The integers q'[0, m) as output element `at` onwards: as they are, or dequantized with zero point and scale
  // (one for all, or one per element).
  template <class P>
  void store(const double* q, int64_t m, int64_t at, char* dst, P zero, P scale) const {
    if (as_integers) kernels::store_integers(q, m, int_type, dst, at);
    else kernels::store_dequantized(q, m, zero, scale, float_type, dst + at * static_cast<int64_t>(element_width()));
  }
};

}  // namespace

graph::LazyBytes rescaled_weight_data(const QuantizedWeight& w, const WeightLayout& wl, const RescaledWeight& r,
                                      bool as_integers) {
  auto gen = std::make_shared<WeightGenerator>();
  gen->data = w.data;
  gen->count = w.count;
  gen->int_type = w.int_type;
  gen->float_type = w.float_type;
  gen->qat = w.qat();
  gen->as_integers = as_integers;
  gen->float8 = w.float8();
  gen->fnuz = kernels::is_fnuz_float8(w.int_type);
  gen->wl = wl;
  gen->layout = r.layout;
  gen->range = w.range;
  gen->p = rescale_of(w, r);
  gen->negation_check = r.negation_check;
  gen->in_float32 = w.qat() && !as_integers && kernels::requantizes_in_float32(w.float_type, w.range, r.scale);
  graph::LazyBytes bytes;
  bytes.size = gen->size();
  bytes.fill = [gen](char* dst) { gen->fill(dst, 0, gen->size()); };
  bytes.fill_range = [gen](char* dst, size_t begin, size_t end) { gen->fill(dst, begin, end); };
  return bytes;
}
}  // namespace qdqfold::folds
