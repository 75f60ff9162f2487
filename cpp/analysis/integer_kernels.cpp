// The static saturation check (integer_kernels.h): the layers the kernel predictor (predict/) selects, their integer
// weights and activation range, bound the pair sums.
#include "integer_kernels.h"

#include "../predict/onnxruntime_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace qdqfold::analysis {

namespace {

constexpr int32_t kFloat = 1, kUint8 = 2, kInt8 = 3;
constexpr int64_t kInt16Max = 32767, kInt16Min = -32768;

const graph::Node* producer_op(graph::Graph& g, const std::string& value, std::string_view op) {
  const int p = g.producer(value);
  if (p < 0 || g.nodes()[p].removed() || !g.nodes()[p].is(op)) return nullptr;
  return &g.nodes()[p];
}

// The quantized side's type of a Q/DQ node: its zero point's type, uint8 without one; 0 when unknown.
int32_t zero_point_type(graph::Graph& g, const graph::Node& qdq) {
  if (qdq.inputs.size() < 3 || qdq.inputs[2].empty()) return kUint8;
  auto zp = g.constant(qdq.inputs[2]);
  return zp ? zp->tensor.data_type : 0;
}

std::optional<double> scalar(graph::Graph& g, const std::string& name) {
  auto c = g.constant(name);
  if (!c || c->tensor.count != 1) return std::nullopt;
  auto v = c->tensor.values();
  if (!v || v->empty()) return std::nullopt;
  return (*v)[0];
}

struct Integers {
  std::vector<int64_t> values;
  std::vector<int64_t> dims;
  int32_t type = 0;
};

// The integers a weight DequantizeLinear dequantizes: a constant int8/uint8 tensor, or QuantizeLinear of a
// constant float tensor computed as onnxruntime's constant folding does (float32 division, round half to
// even, plus the zero point, saturated).
std::optional<Integers> weight_integers(graph::Graph& g, const graph::Node& dq) {
  Integers out;
  if (auto c = g.constant(dq.inputs[0])) {
    const auto& t = c->tensor;
    if (t.data_type != kInt8 && t.data_type != kUint8) return std::nullopt;
    auto v = t.values();
    if (!v) return std::nullopt;
    out.values.assign(v->begin(), v->end());
    out.dims = t.dims;
    out.type = t.data_type;
    return out;
  }
  const graph::Node* q = producer_op(g, dq.inputs[0], "QuantizeLinear");
  if (!q || q->inputs.size() < 2) return std::nullopt;
  auto w = g.constant(q->inputs[0]);
  auto s = g.constant(q->inputs[1]);
  if (!w || !s || w->tensor.data_type != kFloat || w->tensor.dims.empty()) return std::nullopt;
  std::optional<graph::ConstRef> z;
  if (q->inputs.size() > 2 && !q->inputs[2].empty()) {
    z = g.constant(q->inputs[2]);
    if (!z) return std::nullopt;
  }
  const int32_t type = z ? z->tensor.data_type : kUint8;
  if (type != kInt8 && type != kUint8) return std::nullopt;
  auto wv = w->tensor.values();
  auto sv = s->tensor.values();
  std::optional<std::vector<double>> zv;
  if (z) zv = z->tensor.values();
  if (!wv || !sv || sv->empty() || (z && (!zv || zv->size() != sv->size()))) return std::nullopt;
  const auto& dims = w->tensor.dims;
  const int64_t rank = static_cast<int64_t>(dims.size());
  int64_t axis = q->attr_int("axis", 1);
  if (axis < 0) axis += rank;
  int64_t inner = 1, along = 1;
  if (sv->size() > 1) {
    if (axis < 0 || axis >= rank || dims[axis] != static_cast<int64_t>(sv->size())) return std::nullopt;
    along = dims[axis];
    for (int64_t d = axis + 1; d < rank; ++d) inner *= dims[d];
  }
  const double lo = type == kInt8 ? -128 : 0, hi = type == kInt8 ? 127 : 255;
  out.values.resize(wv->size());
  for (size_t i = 0; i < wv->size(); ++i) {
    const size_t k = sv->size() > 1 ? (i / inner) % along : 0;
    const float x = static_cast<float>((*wv)[i]) / static_cast<float>((*sv)[k]);
    const double r = std::nearbyint(static_cast<double>(x)) + (zv ? (*zv)[k] : 0.0);
    out.values[i] = static_cast<int64_t>(std::clamp(r, lo, hi));
  }
  out.dims = dims;
  out.type = type;
  return out;
}

// The activation bytes the kernel sees: the integers DQ `dq` reads (narrowed by an integer Clip right before it,
// or from the zero point up when a Relu feeds the QuantizeLinear that made them), shifted by 128 when an int8
// pair runs as uint8 (`kernel_type`).
std::optional<std::pair<int64_t, int64_t>> activation_bytes(graph::Graph& g, const graph::Node& dq,
                                                            int32_t kernel_type) {
  const int32_t t = zero_point_type(g, dq);
  if (t != kInt8 && t != kUint8) return std::nullopt;
  int64_t lo = t == kInt8 ? -128 : 0, hi = t == kInt8 ? 127 : 255;
  std::string integers = dq.inputs[0];
  if (const graph::Node* clip = producer_op(g, integers, "Clip")) {  // Q -> Clip(integers) -> DQ
    if (clip->inputs.size() > 1 && !clip->inputs[1].empty())
      if (auto v = scalar(g, clip->inputs[1])) lo = std::max<int64_t>(lo, static_cast<int64_t>(*v));
    if (clip->inputs.size() > 2 && !clip->inputs[2].empty())
      if (auto v = scalar(g, clip->inputs[2])) hi = std::min<int64_t>(hi, static_cast<int64_t>(*v));
    integers = clip->inputs[0];
  }
  if (const graph::Node* q = producer_op(g, integers, "QuantizeLinear")) {
    if (producer_op(g, q->inputs[0], "Relu") != nullptr) {
      const auto zp = q->inputs.size() > 2 && !q->inputs[2].empty() ? scalar(g, q->inputs[2]) : std::optional<double>(0.0);
      if (zp) lo = std::max<int64_t>(lo, static_cast<int64_t>(*zp));
    }
  }
  const int64_t shift = t == kInt8 && kernel_type == kUint8 ? 128 : 0;
  return std::make_pair(lo + shift, hi + shift);
}

// Pair-sum bounds over rows of `k` weights each (row r's element j at rows[r * k + j]).
void bound_pairs(const std::vector<int64_t>& rows, int64_t channels, int64_t k, int64_t a_lo, int64_t a_hi,
                 IntegerLayer& layer) {
  layer.pair_max = std::numeric_limits<int64_t>::min();
  layer.pair_min = std::numeric_limits<int64_t>::max();
  auto hi = [&](int64_t w) { return std::max(w * a_lo, w * a_hi); };
  auto lo = [&](int64_t w) { return std::min(w * a_lo, w * a_hi); };
  for (int64_t r = 0; r < channels; ++r) {
    const int64_t* w = rows.data() + r * k;
    bool bad = false;
    for (int64_t start = 0; start < 2; ++start)
      for (int64_t j = start; j < k; j += 2) {
        const int64_t w2 = j + 1 < k ? w[j + 1] : 0;
        const int64_t top = hi(w[j]) + hi(w2), bottom = lo(w[j]) + lo(w2);
        layer.pair_max = std::max(layer.pair_max, top);
        layer.pair_min = std::min(layer.pair_min, bottom);
        bad = bad || top > kInt16Max || bottom < kInt16Min;
      }
    layer.channels += bad ? 1 : 0;
  }
  if (channels == 0 || k == 0) layer.pair_max = layer.pair_min = 0;
}

// The weight as [output channels][K] in the kernel's reduction order; false when its shape is not a layer's.
bool reduction_rows(const graph::Node& node, const Integers& w, std::vector<int64_t>& rows, int64_t& channels,
                    int64_t& k) {
  const auto& d = w.dims;
  if (node.is("Conv")) {
    if (d.size() < 3) return false;
    const int64_t m = d[0], c = d[1];
    int64_t spatial = 1;
    for (size_t i = 2; i < d.size(); ++i) spatial *= d[i];
    channels = m;
    k = c * spatial;
    rows.resize(static_cast<size_t>(m * k));
    for (int64_t o = 0; o < m; ++o)
      for (int64_t ci = 0; ci < c; ++ci)
        for (int64_t p = 0; p < spatial; ++p) rows[o * k + p * c + ci] = w.values[(o * c + ci) * spatial + p];
    return true;
  }
  if (d.size() != 2) return false;
  const bool transposed = node.is("Gemm") && node.attr_int("transB", 0) != 0;
  channels = transposed ? d[0] : d[1];
  k = transposed ? d[1] : d[0];
  rows.resize(static_cast<size_t>(channels * k));
  for (int64_t n = 0; n < channels; ++n)
    for (int64_t j = 0; j < k; ++j) rows[n * k + j] = transposed ? w.values[n * k + j] : w.values[j * channels + n];
  return true;
}

}  // namespace

std::vector<IntegerLayer> integer_layers(graph::Model& model) {
  std::vector<IntegerLayer> found;
  graph::Graph& g = *model.graph;
  for (size_t i = 0; i < g.nodes().size(); ++i) {
    // The layers onnxruntime runs as integer GEMMs, from the one predictor the target's counts use too.
    const predict::Kernel kernel = predict::select_kernel(g, static_cast<int>(i));
    if (kernel.op.empty() || kernel.input_dq < 0 || kernel.weight_dq < 0) continue;
    const graph::Node& node = g.nodes()[i];
    const graph::Node* dq_x = &g.nodes()[kernel.input_dq];
    const graph::Node* dq_w = &g.nodes()[kernel.weight_dq];
    const int32_t a_type = zero_point_type(g, *dq_x);
    auto integers = weight_integers(g, *dq_w);
    auto range = activation_bytes(g, *dq_x, kernel.input_type);
    if (!integers || !range) continue;
    std::vector<int64_t> rows;
    int64_t channels = 0, k = 0;
    if (!reduction_rows(node, *integers, rows, channels, k)) continue;
    IntegerLayer layer;
    layer.node = node.display_name(static_cast<int>(i));
    layer.op = node.op_type;
    layer.kernel = kernel.op;
    layer.activation = a_type == kInt8 ? "int8" : "uint8";
    layer.weight = integers->type == kInt8 ? "int8" : "uint8";
    layer.activation_lo = range->first;
    layer.activation_hi = range->second;
    const int64_t group = node.attr_int("group", 1);
    if (integers->type == kUint8) {
      layer.why_not = "uint8 weights run in a kernel that widens to 16 bits first";
    } else if (node.is("Conv") && group > 1 && integers->dims[1] == 1 && integers->dims[0] == group) {
      layer.why_not = "depthwise: onnxruntime's depthwise kernel widens to 16 bits first";
    }
    bound_pairs(rows, channels, k, layer.activation_lo, layer.activation_hi, layer);
    if (!layer.why_not.empty()) layer.channels = 0;
    layer.can_saturate = layer.why_not.empty() && layer.channels > 0;
    found.push_back(std::move(layer));
  }
  return found;
}

}  // namespace qdqfold::analysis
