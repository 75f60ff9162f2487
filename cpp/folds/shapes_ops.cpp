// Proven shapes of the shape-computing and indexing ops (shapes_ops.h). Each rule follows the ONNX operator's
// definition for the opset the graph imports; an input that breaks it (an axis out of range, repeated axes, a
// Squeeze of a dim that is not 1) gives nothing, never a guess.
#include "folds/shapes_ops.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "folds/common/values.h"

namespace qdqfold::folds::shape_ops {

namespace {

using graph::Graph;
using graph::Node;
using Maybe = std::optional<Dims>;

// Index-like values (Slice's starts / ends, Split's sizes, axes) beyond this are clamped to it: every dim is
// at most 2^40 (shapes.cpp), so clamping changes no result and keeps the arithmetic in range.
constexpr double kClamp = 4611686018427387904.0;  // 2^62
constexpr int64_t kLargestDim = int64_t{1} << 40;   // shapes.cpp's kMaxDim

// Values of a constant integer input, each clamped to [-2^62, 2^62]; nullopt when not a constant or a value is
// not an integer.
std::optional<std::vector<int64_t>> ints(Graph& g, const Node& n, size_t k) {
  if (k >= n.inputs.size() || n.inputs[k].empty()) return std::nullopt;
  auto values = constant_values(g, n.inputs[k]);
  if (!values) return std::nullopt;
  std::vector<int64_t> out;
  for (double v : *values) {
    if (!std::isfinite(v) || v != std::floor(v)) return std::nullopt;
    out.push_back(static_cast<int64_t>(std::clamp(v, -kClamp, kClamp)));
  }
  return out;
}

bool has_input(const Node& n, size_t k) { return k < n.inputs.size() && !n.inputs[k].empty(); }

// Axes normalised against `rank` (a negative axis counts from the end), each once; nullopt if one is out of
// range or repeated.
std::optional<std::vector<int64_t>> normalised_axes(std::vector<int64_t> axes, int64_t rank) {
  for (int64_t& a : axes) {
    if (a < 0) a += rank;
    if (a < 0 || a >= rank) return std::nullopt;
  }
  std::vector<int64_t> sorted = axes;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) return std::nullopt;
  return axes;
}

int64_t rank_of(const Maybe& x) { return static_cast<int64_t>(x->size()); }

// Shape (start / end from opset 15, clamped into [0, rank]): a 1-D tensor of that many dims.
Maybe shape(const Node& n, const Maybe& x) {
  if (!x) return std::nullopt;
  const int64_t r = rank_of(x);
  auto clamp = [&](int64_t v) { return std::clamp(v < 0 ? v + r : v, int64_t{0}, r); };
  const int64_t start = clamp(n.attr_int("start", 0)), end = clamp(n.attr_int("end", r));
  return Dims{std::max(int64_t{0}, end - start)};
}

// Gather: data's dims with the axis replaced by the indices' dims.
Maybe gather(const Node& n, const Maybe& data, const Maybe& indices) {
  if (!data || !indices || data->empty()) return std::nullopt;
  int64_t axis = n.attr_int("axis", 0);
  if (axis < 0) axis += rank_of(data);
  if (axis < 0 || axis >= rank_of(data)) return std::nullopt;
  Dims out(data->begin(), data->begin() + axis);
  out.insert(out.end(), indices->begin(), indices->end());
  out.insert(out.end(), data->begin() + axis + 1, data->end());
  return out;
}

// Unsqueeze: axes from input 1 (opset 13) or the attribute. Constant axes place the new 1s; axes whose count
// alone is proven (a 1-D input of known length) give the rank, every dim -1.
Maybe unsqueeze(Graph& g, const Node& n, const std::vector<Maybe>& in) {
  if (in.empty() || !in[0]) return std::nullopt;
  std::optional<std::vector<int64_t>> axes;
  if (g.opset() >= 13) {
    axes = ints(g, n, 1);
    if (!axes) {
      if (in.size() < 2 || !in[1] || in[1]->size() != 1 || (*in[1])[0] < 0) return std::nullopt;
      return Dims(static_cast<size_t>(rank_of(in[0]) + (*in[1])[0]), -1);
    }
  } else {
    if (!n.attr("axes")) return std::nullopt;
    axes = n.attr_ints("axes");
  }
  const int64_t rank = rank_of(in[0]) + static_cast<int64_t>(axes->size());
  auto normal = normalised_axes(*axes, rank);
  if (!normal) return std::nullopt;
  Dims out(static_cast<size_t>(rank), 1);
  std::vector<bool> is_new(static_cast<size_t>(rank), false);
  for (int64_t a : *normal) is_new[static_cast<size_t>(a)] = true;
  size_t from = 0;
  for (size_t k = 0; k < out.size(); ++k)
    if (!is_new[k]) out[k] = (*in[0])[from++];
  return out;
}

// Squeeze: constant axes (input 1 from opset 13, else the attribute), each a dim that may be 1; without axes,
// every dim must be known (the 1s go).
Maybe squeeze(Graph& g, const Node& n, const Maybe& x) {
  if (!x) return std::nullopt;
  std::optional<std::vector<int64_t>> axes;
  if (g.opset() >= 13 ? has_input(n, 1) : n.attr("axes") != nullptr) {
    axes = g.opset() >= 13 ? ints(g, n, 1) : std::optional(n.attr_ints("axes"));
    if (!axes) return std::nullopt;
  }
  Dims out;
  if (!axes) {
    for (int64_t d : *x) {
      if (d < 0) return std::nullopt;
      if (d != 1) out.push_back(d);
    }
    return out;
  }
  auto normal = normalised_axes(*axes, rank_of(x));
  if (!normal) return std::nullopt;
  std::vector<bool> drop(x->size(), false);
  for (int64_t a : *normal) {
    const int64_t d = (*x)[static_cast<size_t>(a)];
    if (d >= 0 && d != 1) return std::nullopt;  // not a valid Squeeze
    drop[static_cast<size_t>(a)] = true;
  }
  for (size_t k = 0; k < x->size(); ++k)
    if (!drop[k]) out.push_back((*x)[k]);
  return out;
}

// The length of a slice of a dim `d` (ONNX Slice: negative indices count from the end, then clamp; a negative
// step walks backwards).
int64_t slice_length(int64_t d, int64_t start, int64_t end, int64_t step) {
  if (d == 0) return 0;
  if (start < 0) start += d;
  if (end < 0) end += d;
  if (step > 0) {
    start = std::clamp(start, int64_t{0}, d);
    end = std::clamp(end, int64_t{0}, d);
    return end > start ? (end - start + step - 1) / step : 0;
  }
  start = std::clamp(start, int64_t{0}, d - 1);
  end = std::clamp(end, int64_t{-1}, d - 1);
  return start > end ? (start - end - step - 1) / -step : 0;
}

// Slice keeps the rank. The sliced axes' dims follow when starts, ends, axes and steps are constants and the
// dim is known; an axis whose slice is not known is -1, and all are when the axes are not known.
Maybe slice(Graph& g, const Node& n, const Maybe& x) {
  if (!x) return std::nullopt;
  const int64_t r = rank_of(x);
  std::optional<std::vector<int64_t>> starts, ends, axes, steps;
  if (g.opset() >= 10) {
    starts = ints(g, n, 1);
    ends = ints(g, n, 2);
    if (has_input(n, 3)) {
      axes = ints(g, n, 3);
      if (!axes) return Dims(x->size(), -1);
    }
    if (has_input(n, 4)) steps = ints(g, n, 4);
  } else {
    starts = n.attr_ints("starts");
    ends = n.attr_ints("ends");
    if (n.attr("axes")) axes = n.attr_ints("axes");
  }
  if (!axes) {  // the default: 0 .. as many as starts has
    if (!starts) return Dims(x->size(), -1);
    axes.emplace();
    for (size_t k = 0; k < starts->size(); ++k) axes->push_back(static_cast<int64_t>(k));
  }
  auto normal = normalised_axes(*axes, r);
  if (!normal) return std::nullopt;
  const bool sizes_known = starts && ends && starts->size() == normal->size() && ends->size() == normal->size() &&
                           (!has_input(n, 4) || (steps && steps->size() == normal->size()));
  Dims out = *x;
  for (size_t k = 0; k < normal->size(); ++k) {
    int64_t& d = out[static_cast<size_t>((*normal)[k])];
    const int64_t step = steps ? (*steps)[k] : 1;
    if (step == 0 && sizes_known) return std::nullopt;
    d = sizes_known && d >= 0 ? slice_length(d, (*starts)[k], (*ends)[k], step) : -1;
  }
  return out;
}

// Split: every output has the input's rank; the split axis's dim is output `slot`'s constant size, or the
// even share of a known dim.
Maybe split(Graph& g, const Node& n, size_t slot, const Maybe& x) {
  if (!x || x->empty()) return std::nullopt;
  int64_t axis = n.attr_int("axis", 0);
  if (axis < 0) axis += rank_of(x);
  if (axis < 0 || axis >= rank_of(x)) return std::nullopt;
  Dims out = *x;
  int64_t& d = out[static_cast<size_t>(axis)];
  const auto parts = static_cast<int64_t>(n.outputs.size());
  std::optional<std::vector<int64_t>> sizes;
  bool given = false;
  if (g.opset() >= 13) {
    given = has_input(n, 1);
    if (given) sizes = ints(g, n, 1);
  } else if (n.attr("split")) {
    given = true;
    sizes = n.attr_ints("split");
  }
  if (sizes && static_cast<int64_t>(sizes->size()) == parts) {
    int64_t total = 0;
    for (int64_t s : *sizes) {
      if (s < 0 || s > kLargestDim) return std::nullopt;  // not a valid Split (and the sum cannot overflow)
      total += s;
    }
    if (d >= 0 && total != d) return std::nullopt;  // not a valid Split
    d = (*sizes)[slot];
  } else if (!given && d >= 0 && parts > 0 && d % parts == 0) {
    d /= parts;  // even (opset 18's num_outputs too: ceil(d / n) each, the last the rest, all equal here)
  } else {
    d = -1;
  }
  return out;
}

// ConstantOfShape: the values of its 1-D input, or only their count.
Maybe constant_of_shape(Graph& g, const Node& n, const Maybe& shape) {
  if (auto values = ints(g, n, 0)) {
    for (int64_t v : *values)
      if (v < 0) return std::nullopt;
    return Dims(values->begin(), values->end());
  }
  return reshape_by_length(shape);
}

}  // namespace

bool computes(const Node& n, size_t slot) {
  if (n.is("Split")) return slot < n.outputs.size();
  return slot == 0 && (n.is("Shape") || n.is("Size") || n.is("Gather") || n.is("Unsqueeze") || n.is("Squeeze") ||
                       n.is("Slice") || n.is("ConstantOfShape"));
}

std::optional<Dims> compute(Graph& g, const Node& n, size_t slot, const std::vector<Maybe>& in) {
  auto input = [&](size_t k) -> Maybe { return k < in.size() ? in[k] : std::nullopt; };
  if (n.is("Shape")) return shape(n, input(0));
  if (n.is("Size")) return Dims{};
  if (n.is("Gather")) return gather(n, input(0), input(1));
  if (n.is("Unsqueeze")) return unsqueeze(g, n, in);
  if (n.is("Squeeze")) return squeeze(g, n, input(0));
  if (n.is("Slice")) return slice(g, n, input(0));
  if (n.is("Split")) return split(g, n, slot, input(0));
  if (n.is("ConstantOfShape")) return constant_of_shape(g, n, input(0));
  return std::nullopt;
}

std::optional<Dims> reshape_by_length(const std::optional<Dims>& shape) {
  if (!shape || shape->size() != 1 || (*shape)[0] < 0) return std::nullopt;
  return Dims(static_cast<size_t>((*shape)[0]), -1);
}

}  // namespace qdqfold::folds::shape_ops
