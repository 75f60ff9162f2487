#include "folds/directions/forward/padding_correction.h"

#include <numeric>
#include <sstream>

namespace qdqfold::folds {

std::string dims_text(const std::vector<int64_t>& dims) {
  std::ostringstream s;
  s << "[";
  for (size_t k = 0; k < dims.size(); ++k) {
    s << (k ? ", " : "");
    if (dims[k] < 0) s << "?";
    else s << dims[k];
  }
  s << "]";
  return s.str();
}

namespace {

// Bounds on one spatial dimension (positions, positions x taps) for a correction map worth computing; they
// also keep the index arithmetic of sizes taken from a model's shape information far from overflow.
constexpr int64_t kMaxPositions = int64_t{1} << 26;
// Strides, dilations and pads beyond this are malformed (and would overflow (k - 1) * dilation).
constexpr int64_t kMaxAttribute = int64_t{1} << 31;

bool all_equal(const std::vector<int64_t>& v, int64_t x) {
  for (int64_t e : v)
    if (e != x) return false;
  return true;
}

// An ints attribute of length `n` (or absent: `fallback` n times) whose values are all >= `minimum`.
std::optional<std::vector<int64_t>> spatial_ints(const graph::Node& n, const char* name, size_t count,
                                                 int64_t fallback, int64_t minimum) {
  std::vector<int64_t> v = n.attr_ints(name);
  if (!n.attr(name)) v.assign(count, fallback);
  if (v.size() != count) return std::nullopt;
  for (int64_t e : v)
    if (e < minimum || e > kMaxAttribute) return std::nullopt;
  return v;
}

Outcome malformed(const graph::Node& layer, const std::string& what) {
  return Outcome::kept(Reason::MalformedLayer, layer.op_type + " '" + layer.name + "' has " + what);
}

}  // namespace

std::string ConvGeometry::describe() const {
  std::string s = auto_pad == "NOTSET" ? "pads=" + dims_text(pads_begin) + "+" + dims_text(pads_end) : "auto_pad=" + auto_pad;
  s += ", kernel " + dims_text(kernel);
  if (!all_equal(strides, 1)) s += ", strides=" + dims_text(strides);
  if (!all_equal(dilations, 1)) s += ", dilations=" + dims_text(dilations);
  if (!output_padding.empty() && !all_equal(output_padding, 0)) s += ", output_padding=" + dims_text(output_padding);
  if (!output_shape.empty()) s += ", output_shape=" + dims_text(output_shape);
  return s;
}

std::variant<ConvGeometry, Outcome> read_conv_geometry(const graph::Node& layer,
                                                      const std::vector<int64_t>& weight_dims) {
  ConvGeometry g;
  g.transposed = layer.is("ConvTranspose");
  if (weight_dims.size() < 3) return malformed(layer, "a weight of rank below 3");
  const size_t n = weight_dims.size() - 2;
  g.kernel.assign(weight_dims.begin() + 2, weight_dims.end());
  for (int64_t k : g.kernel)
    if (k < 1 || k > kMaxAttribute) return malformed(layer, "a kernel " + dims_text(g.kernel));
  if (layer.attr("kernel_shape") && layer.attr_ints("kernel_shape") != g.kernel)
    return malformed(layer, "kernel_shape=" + dims_text(layer.attr_ints("kernel_shape")) +
                                " but a weight with kernel " + dims_text(g.kernel));
  auto strides = spatial_ints(layer, "strides", n, 1, 1);
  auto dilations = spatial_ints(layer, "dilations", n, 1, 1);
  auto pads = spatial_ints(layer, "pads", 2 * n, 0, 0);
  if (!strides || !dilations || !pads)
    return malformed(layer, "strides, dilations or pads that do not fit a " + std::to_string(n) + "-D kernel");
  g.strides = *strides;
  g.dilations = *dilations;
  g.pads_begin.assign(pads->begin(), pads->begin() + n);
  g.pads_end.assign(pads->begin() + n, pads->end());
  g.auto_pad = layer.attr_string("auto_pad", "NOTSET");
  if (g.auto_pad.empty()) g.auto_pad = "NOTSET";
  if (g.auto_pad != "NOTSET" && g.auto_pad != "VALID" && g.auto_pad != "SAME_UPPER" && g.auto_pad != "SAME_LOWER")
    return malformed(layer, "auto_pad='" + g.auto_pad + "'");
  if (g.auto_pad != "NOTSET") {  // pads are computed, not read
    g.pads_begin.assign(n, 0);
    g.pads_end.assign(n, 0);
  }
  if (g.transposed) {
    auto output_padding = spatial_ints(layer, "output_padding", n, 0, 0);
    if (!output_padding) return malformed(layer, "an output_padding that does not fit a " + std::to_string(n) + "-D kernel");
    g.output_padding = *output_padding;
    g.output_shape = layer.attr_ints("output_shape");
    if (g.output_shape.size() == n + 2) g.output_shape.erase(g.output_shape.begin(), g.output_shape.begin() + 2);
    if (!g.output_shape.empty() && g.output_shape.size() != n)
      return malformed(layer, "output_shape=" + dims_text(layer.attr_ints("output_shape")));
  }
  return g;
}

bool every_position_gets_every_tap(const ConvGeometry& g) {
  if (!g.transposed) {
    if (g.auto_pad == "VALID") return true;
    if (g.auto_pad == "NOTSET") return all_equal(g.pads_begin, 0) && all_equal(g.pads_end, 0);
    // SAME pads at most effective_kernel - 1 in total.
    for (size_t d = 0; d < g.rank(); ++d)
      if (g.effective_kernel(d) != 1) return false;
    return true;
  }
  if (!g.output_shape.empty() || (g.auto_pad != "NOTSET" && g.auto_pad != "VALID")) return false;
  // Stride 1: output index i receives tap j from input i + pad_begin - j*dilation; every j lands inside the
  // input for every i exactly when the pads crop at least the kernel's reach on both sides.
  for (size_t d = 0; d < g.rank(); ++d) {
    const int64_t reach = g.effective_kernel(d) - 1;
    if (g.strides[d] != 1 || g.output_padding[d] != 0 || g.pads_begin[d] < reach || g.pads_end[d] < reach)
      return false;
  }
  return true;
}

std::optional<int64_t> output_extent(const ConvGeometry& g, size_t d, int64_t in) {
  if (in < 1 || in > kMaxPositions || d >= g.rank()) return std::nullopt;
  const int64_t s = g.strides[d], k_eff = g.effective_kernel(d);
  int64_t out = 0;
  if (!g.transposed) {
    if (g.auto_pad == "SAME_UPPER" || g.auto_pad == "SAME_LOWER") {
      out = (in + s - 1) / s;
    } else {
      const int64_t span = in + g.pads_begin[d] + g.pads_end[d] - k_eff;
      if (span < 0) return std::nullopt;
      out = span / s + 1;
    }
  } else if (!g.output_shape.empty()) {
    out = g.output_shape[d];
  } else if (g.auto_pad == "SAME_UPPER" || g.auto_pad == "SAME_LOWER") {
    out = in * s;
  } else {
    out = s * (in - 1) + g.output_padding[d] + k_eff - g.pads_begin[d] - g.pads_end[d];
  }
  if (out < 1) return std::nullopt;
  return out;
}

std::variant<TapMap, Outcome> tap_map(const ConvGeometry& g, const std::vector<int64_t>& input_dims,
                                      const std::string& layer_name) {
  TapMap map;
  const char* op = g.transposed ? "ConvTranspose" : "Conv";
  auto kept = [&](Reason code, const std::string& why) {
    return Outcome::kept(code, std::string(op) + " '" + layer_name + "' " + why);
  };
  if (input_dims.size() != g.rank()) return kept(Reason::ShapeMismatch, "has a kernel of another rank than its input");
  map.taps.resize(g.rank());
  for (size_t d = 0; d < g.rank(); ++d) {
    const int64_t in = input_dims[d], k = g.kernel[d], s = g.strides[d], dil = g.dilations[d];
    const int64_t k_eff = g.effective_kernel(d);
    if (in < 1) return kept(Reason::ShapeMismatch, "has an empty input");
    if (in > kMaxPositions || k_eff > kMaxPositions)
      return kept(Reason::CorrectionTooLarge, "has a spatial dimension too large for a correction map");
    int64_t begin = g.pads_begin[d], end = g.pads_end[d], out = 0;
    if (!g.transposed) {
      if (g.auto_pad == "SAME_UPPER" || g.auto_pad == "SAME_LOWER") {
        out = (in + s - 1) / s;
        const int64_t total = std::max<int64_t>(0, (out - 1) * s + k_eff - in);
        begin = g.auto_pad == "SAME_UPPER" ? total / 2 : total - total / 2;
        end = total - begin;
      } else {
        const int64_t span = in + begin + end - k_eff;
        if (span < 0) return kept(Reason::ShapeMismatch, "has a kernel larger than its padded input");
        out = span / s + 1;
      }
    } else {
      const int64_t full = s * (in - 1) + g.output_padding[d] + k_eff;
      const bool computed = !g.output_shape.empty() || g.auto_pad == "SAME_UPPER" || g.auto_pad == "SAME_LOWER";
      if (computed) {
        out = !g.output_shape.empty() ? g.output_shape[d] : in * s;
        const int64_t total = full - out;
        // Runtimes disagree on which side takes the odd pixel; an even total splits the same everywhere.
        if (total < 0 || total % 2 != 0)
          return kept(Reason::UnsupportedAttributes, "computes a total crop of " + std::to_string(total) + " in spatial "
                                                "dimension " + std::to_string(d) + ", which runtimes split differently");
        begin = end = total / 2;
      } else {
        out = full - begin - end;
      }
    }
    if (out < 1) return kept(Reason::ShapeMismatch, "has an empty output");
    if (in > kMaxPositions || out > kMaxPositions || out * k > kMaxPositions)
      return kept(Reason::CorrectionTooLarge, "has " + std::to_string(out) + " output positions in spatial dimension " +
                                              std::to_string(d) + ", too many for a correction map");
    map.output_dims.push_back(out);
    auto& taps = map.taps[d];
    taps.resize(static_cast<size_t>(out));
    for (int64_t i = 0; i < out; ++i) {
      for (int64_t j = 0; j < k; ++j) {
        if (!g.transposed) {
          const int64_t x = i * s + j * dil - begin;
          if (x >= 0 && x < in) taps[i].push_back(j);
        } else {
          const int64_t q = i + begin - j * dil;  // = input index * stride
          if (q >= 0 && q % s == 0 && q / s < in) taps[i].push_back(j);
        }
      }
      if (static_cast<int64_t>(taps[i].size()) != k) map.uniform = false;
    }
  }
  return map;
}

std::vector<double> border_correction(const TapMap& map, const std::vector<int64_t>& kernel,
                                      const std::vector<std::vector<double>>& tap_sums) {
  const size_t rank = map.output_dims.size();
  const int64_t positions = std::accumulate(map.output_dims.begin(), map.output_dims.end(), int64_t{1},
                                            std::multiplies<int64_t>());
  const size_t channels = tap_sums.size();
  std::vector<double> interior(channels, 0.0);
  for (size_t o = 0; o < channels; ++o)
    for (double v : tap_sums[o]) interior[o] += v;
  std::vector<double> out(channels * static_cast<size_t>(positions), 0.0);
  std::vector<int64_t> index(rank, 0);
  std::vector<int64_t> flat_taps;
  for (int64_t pos = 0; pos < positions; ++pos) {
    bool full = true;
    for (size_t d = 0; d < rank; ++d)
      if (static_cast<int64_t>(map.taps[d][index[d]].size()) != kernel[d]) full = false;
    if (!full) {
      // Row-major kernel indices of the taps this position receives: the product of the per-dim lists.
      flat_taps.assign(1, 0);
      for (size_t d = 0; d < rank; ++d) {
        std::vector<int64_t> next;
        for (int64_t base : flat_taps)
          for (int64_t j : map.taps[d][index[d]]) next.push_back(base * kernel[d] + j);
        flat_taps.swap(next);
      }
      for (size_t o = 0; o < channels; ++o) {
        double received = 0.0;
        for (int64_t j : flat_taps) received += tap_sums[o][static_cast<size_t>(j)];
        out[o * static_cast<size_t>(positions) + static_cast<size_t>(pos)] = received - interior[o];
      }
    }
    for (size_t d = rank; d-- > 0;) {  // next position, last dimension fastest
      if (++index[d] < map.output_dims[d]) break;
      index[d] = 0;
    }
  }
  return out;
}

}  // namespace qdqfold::folds
