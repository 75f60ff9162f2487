// The spatial attributes of a Conv / ConvTranspose (conv_geometry.h).
#include "folds/common/conv_geometry.h"
#include "folds/expected.h"

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

Expected<ConvGeometry> read_conv_geometry(const graph::Node& layer,
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

}  // namespace qdqfold::folds
