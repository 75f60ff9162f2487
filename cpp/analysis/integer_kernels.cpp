// The static saturation check (integer_kernels.h): select the layers onnxruntime fuses, read their integer
// weights and activation range, bound the pair sums.
#include "integer_kernels.h"

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

// The activation bytes the kernel sees: the type's range (int8 shifted by 128), from the zero point up when
// a Relu feeds the QuantizeLinear that made the activation.
std::optional<std::pair<int64_t, int64_t>> activation_bytes(graph::Graph& g, const graph::Node& dq) {
  const int32_t t = zero_point_type(g, dq);
  if (t != kInt8 && t != kUint8) return std::nullopt;
  int64_t lo = t == kInt8 ? -128 : 0, hi = t == kInt8 ? 127 : 255;
  if (const graph::Node* q = producer_op(g, dq.inputs[0], "QuantizeLinear")) {
    if (producer_op(g, q->inputs[0], "Relu") != nullptr) {
      const auto zp = q->inputs.size() > 2 && !q->inputs[2].empty() ? scalar(g, q->inputs[2]) : std::optional<double>(0.0);
      if (zp) lo = std::max<int64_t>(lo, static_cast<int64_t>(*zp));
    }
  }
  const int64_t shift = t == kInt8 ? 128 : 0;
  return std::make_pair(lo + shift, hi + shift);
}

// onnxruntime's ReluQuantFusion and ClipQuantFusion remove a Relu (or a Clip whose range holds the
// quantizer's) between a layer and its only reader QuantizeLinear when the quantizer's zero point is its type's
// minimum: then Q(Relu(y)) = Q(y) for every y, and the layer feeds the Q directly. The Relu / Clip node's index
// when `value` feeds such a node, else -1.
int activation_before_q(graph::Graph& g, const std::string& value) {
  const auto& uses = g.uses(value);
  if (uses.size() != 1 || uses[0].node < 0 || g.is_graph_output(value)) return -1;
  const int a = uses[0].node;
  const graph::Node& act = g.nodes()[a];
  if (!(act.is("Relu") || act.is("Clip")) || act.outputs.empty() || g.is_graph_output(act.outputs[0])) return -1;
  const auto& next = g.uses(act.outputs[0]);
  if (next.size() != 1 || next[0].node < 0 || !g.nodes()[next[0].node].is("QuantizeLinear")) return -1;
  const graph::Node& q = g.nodes()[next[0].node];
  const int32_t t = zero_point_type(g, q);
  const auto zp = q.inputs.size() > 2 && !q.inputs[2].empty() ? scalar(g, q.inputs[2]) : std::optional<double>(0.0);
  const auto scale = q.inputs.size() > 1 ? scalar(g, q.inputs[1]) : std::nullopt;
  if (!zp || !scale || (t != kInt8 && t != kUint8)) return -1;
  const double qmin = t == kInt8 ? -128 : 0, qmax = t == kInt8 ? 127 : 255;
  if (*zp != qmin) return -1;  // the quantizer's lowest value is 0: Relu's
  if (act.is("Clip")) {
    // Clip(lo, hi) is redundant when [lo, hi] holds the quantizer's range [0, (qmax - zp) * scale].
    const auto lo = act.inputs.size() > 1 && !act.inputs[1].empty() ? scalar(g, act.inputs[1]) : std::nullopt;
    const auto hi = act.inputs.size() > 2 && !act.inputs[2].empty() ? scalar(g, act.inputs[2]) : std::nullopt;
    if (!lo || *lo > 0 || (hi && *hi < (qmax - *zp) * *scale)) return -1;
  }
  return a;
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
    const graph::Node& node = g.nodes()[i];
    if (node.removed() || !(node.is("Conv") || node.is("MatMul") || node.is("Gemm")) || node.inputs.size() < 2 ||
        node.outputs.empty())
      continue;
    const graph::Node* dq_x = producer_op(g, node.inputs[0], "DequantizeLinear");
    const graph::Node* dq_w = producer_op(g, node.inputs[1], "DequantizeLinear");
    if (!dq_x || !dq_w || dq_x->inputs.empty() || dq_w->inputs.empty()) continue;
    std::string out = node.outputs[0];
    if (g.is_graph_output(out)) continue;
    if (const int act = activation_before_q(g, out); act >= 0) out = g.nodes()[act].outputs[0];
    const auto& uses = g.uses(out);
    bool to_q = !uses.empty();
    for (const auto& u : uses) to_q = to_q && u.node >= 0 && g.nodes()[u.node].is("QuantizeLinear");
    // (onnxruntime's Gemm selector would also take a float output, but measured on its CPU provider it forms
    // QGemm only before a QuantizeLinear: tests/test_integer_kernels.py compares the lists.)
    if (!to_q) continue;
    const int32_t a_type = zero_point_type(g, *dq_x);
    bool same_type = true;
    if (to_q)
      for (const auto& u : uses) same_type = same_type && zero_point_type(g, g.nodes()[u.node]) == a_type;
    if (!same_type) continue;
    auto integers = weight_integers(g, *dq_w);
    auto range = activation_bytes(g, *dq_x);
    if (!integers || !range) continue;
    std::vector<int64_t> rows;
    int64_t channels = 0, k = 0;
    if (!reduction_rows(node, *integers, rows, channels, k)) continue;
    IntegerLayer layer;
    layer.node = node.display_name(static_cast<int>(i));
    layer.op = node.op_type;
    layer.kernel = node.is("Conv") ? "QLinearConv" : node.is("MatMul") ? "QLinearMatMul" : "QGemm";
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
