// onnxruntime's rewrites before its QDQ selectors, as queries (ort_rewrites.h; the rules in onnxruntime_kernels.h).
#include "ort_rewrites.h"

#include <cfloat>
#include <cmath>
#include <limits>
#include <optional>

#include "../graph/tensor.h"

namespace qdqfold::predict::rewrites {

using graph::Graph;
using graph::Node;
using wire::DataType;

namespace {

constexpr int32_t kFloat = 1;
constexpr auto kInt8 = static_cast<int32_t>(DataType::Int8), kUint8 = static_cast<int32_t>(DataType::Uint8);

bool onnx_or_ms(const Node& n) { return n.domain.empty() || n.domain == "ai.onnx" || n.domain == "com.microsoft"; }

bool propagates(const Node& n) {
  return n.is("MaxPool") || n.is("Reshape") || n.is("Transpose") || n.is("Squeeze") || n.is("Unsqueeze") ||
         n.is("Slice");
}

bool scalar_parameters(Graph& g, int qdq) {
  const Node& n = g.nodes()[qdq];
  for (size_t i = 1; i < n.inputs.size() && i < 3; ++i) {
    if (n.inputs[i].empty()) continue;
    auto ref = g.constant(n.inputs[i]);
    if (!ref || ref->tensor.count != 1) return false;
  }
  return n.inputs.size() >= 2;
}

// A constant's first value when it holds one element (and, with `rank0`, has no dims).
std::optional<double> scalar(Graph& g, const std::string& name, bool rank0 = false) {
  if (name.empty()) return std::nullopt;
  auto c = g.constant(name);
  if (!c || c->tensor.count != 1 || (rank0 && !c->tensor.dims.empty())) return std::nullopt;
  auto v = c->tensor.values();
  if (!v || v->empty()) return std::nullopt;
  return (*v)[0];
}

int32_t constant_type(Graph& g, const std::string& name) {
  auto c = g.constant(name);
  return c ? c->tensor.data_type : 0;
}

// optimizer_utils::GetClipConstantMinMax: constant bounds (inputs from opset 11, attributes before), the float
// range's ends where absent.
std::optional<std::pair<float, float>> clip_bounds(Graph& g, const Node& clip) {
  float lo = std::numeric_limits<float>::lowest(), hi = std::numeric_limits<float>::max();
  if (clip.inputs.size() > 1) {
    for (size_t i = 1; i < clip.inputs.size() && i < 3; ++i) {
      if (clip.inputs[i].empty()) continue;
      auto c = g.constant(clip.inputs[i]);
      auto v = c ? c->tensor.values() : std::nullopt;
      if (!v || v->empty()) return std::nullopt;
      (i == 1 ? lo : hi) = static_cast<float>((*v)[0]);
    }
    return std::make_pair(lo, hi);
  }
  return std::make_pair(clip.attr_float("min", lo), clip.attr_float("max", hi));
}

// static_cast<int32_t>(double) as x86-64 computes it (cvttsd2si): INT32_MIN when out of range.
int32_t x86_int32(double v) {
  if (!(v >= -2147483648.0 && v <= 2147483647.0)) return std::numeric_limits<int32_t>::min();
  return static_cast<int32_t>(v);
}
int32_t wrapping_add(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}

// The Q `value` reaches: its only reader, or through a chain of propagating single-reader ops to a scalar Q
// (QDQPropagation copies that Q back: `propagated`); -1 otherwise.
int next_q(Graph& g, const std::string& value, bool& propagated) {
  propagated = false;
  int r = only_reader(g, value);
  if (r < 0) return -1;
  if (is_q(g.nodes()[r])) return r;
  while (propagates(g.nodes()[r]) && !g.nodes()[r].outputs.empty()) {
    const std::string& v = g.nodes()[r].outputs[0];
    r = only_reader(g, v);
    if (r < 0 || g.uses(v)[0].slot != 0) return -1;
    if (is_q(g.nodes()[r])) {
      propagated = true;
      return scalar_parameters(g, r) ? r : -1;
    }
  }
  return -1;
}

}  // namespace

bool is_q(const Node& n) { return n.op_type == "QuantizeLinear" && onnx_or_ms(n) && !n.removed(); }
bool is_dq(const Node& n) { return n.op_type == "DequantizeLinear" && onnx_or_ms(n) && !n.removed(); }

int only_reader(Graph& g, const std::string& value) {
  if (value.empty() || g.is_graph_output(value)) return -1;
  const auto& uses = g.uses(value);
  if (uses.size() != 1 || uses[0].node < 0 || g.nodes()[uses[0].node].removed()) return -1;
  return uses[0].node;
}

int32_t written_type(Graph& g, int qdq) {
  const Node& n = g.nodes()[qdq];
  if (n.inputs.size() > 2 && !n.inputs[2].empty()) return constant_type(g, n.inputs[2]);
  if (is_dq(n) && !n.inputs.empty()) {
    if (auto ref = g.constant(n.inputs[0])) return ref->tensor.data_type;
    const int p = g.producer(n.inputs[0]);
    return p >= 0 && is_q(g.nodes()[p]) ? written_type(g, p) : 0;
  }
  const int64_t dtype = n.attr_int("output_dtype", 0);
  return dtype ? static_cast<int32_t>(dtype) : kUint8;
}

bool converted_to_uint8(Graph& g, int q) {
  const Node& qn = g.nodes()[q];
  if (qn.inputs.size() != 3 || qn.inputs[2].empty() || qn.outputs.empty()) return false;
  const int d = only_reader(g, qn.outputs[0]);  // one edge, no graph output
  if (d < 0 || !is_dq(g.nodes()[d])) return false;
  const Node& dn = g.nodes()[d];
  if (dn.inputs.size() != 3 || dn.inputs[2].empty() || dn.outputs.empty()) return false;
  // EnsureUniqueDQForNodeUnit runs first: a DQ read twice (or read and a graph output) is copied, and the Q then
  // has two readers.
  const auto& readers = g.uses(dn.outputs[0]);
  if (readers.size() > 1 || (readers.size() == 1 && g.is_graph_output(dn.outputs[0]))) return false;
  const auto zq = scalar(g, qn.inputs[2]), zd = scalar(g, dn.inputs[2]);
  return zq && zd && *zq == *zd && constant_type(g, qn.inputs[2]) == kInt8 && constant_type(g, dn.inputs[2]) == kInt8;
}

int32_t type_after(Graph& g, int qdq) {
  const int32_t t = written_type(g, qdq);
  if (t != kInt8) return t;
  const Node& n = g.nodes()[qdq];
  if (is_q(n)) return converted_to_uint8(g, qdq) ? kUint8 : kInt8;
  const int p = n.inputs.empty() ? -1 : g.producer(n.inputs[0]);
  return p >= 0 && is_q(g.nodes()[p]) && converted_to_uint8(g, p) ? kUint8 : kInt8;
}

bool removed_before_q(Graph& g, int act) {
  const Node& a = g.nodes()[act];
  if (!(a.is("Relu") || a.is("Clip")) || a.outputs.size() != 1 || a.removed()) return false;
  bool propagated = false;
  const int q = next_q(g, a.outputs[0], propagated);
  if (q < 0 || !g.nodes()[q].is("QuantizeLinear")) return false;
  const Node& qn = g.nodes()[q];
  if (qn.inputs.size() != 3 || qn.inputs[2].empty()) return false;
  const int32_t t = constant_type(g, qn.inputs[2]);
  if (a.is("Relu")) {  // relu_quantizelinear.cc: any one-element zero point but int8 != -128 and uint8 != 0
    const auto z = scalar(g, qn.inputs[2]);
    return z && !(t == kInt8 && *z != -128) && !(t == kUint8 && *z != 0);
  }
  // clip_quantizelinear.cc, in float as there.
  const auto bounds = clip_bounds(g, a);
  const auto s = scalar(g, qn.inputs[1], true), z = scalar(g, qn.inputs[2], true);
  if (!bounds || !s || !z || constant_type(g, qn.inputs[1]) != kFloat || (t != kInt8 && t != kUint8)) return false;
  const float scale = static_cast<float>(*s);
  const int zp = static_cast<int>(*z);
  const float lower = scale * static_cast<float>((t == kInt8 ? -128 : 0) - zp);
  const float upper = scale * static_cast<float>((t == kInt8 ? 127 : 255) - zp);
  constexpr float eps = FLT_EPSILON;
  return !(eps < bounds->first - lower || eps < upper - bounds->second);
}

bool redundant_by_q(Graph& g, int act, int q) {
  const Node& a = g.nodes()[act];
  const Node& qn = g.nodes()[q];
  const auto s = qn.inputs.size() > 1 ? scalar(g, qn.inputs[1], true) : std::nullopt;
  if (!s) return false;
  int32_t t = 0, zp = 0;
  if (qn.inputs.size() < 3 || qn.inputs[2].empty()) {
    const int64_t dtype = qn.attr_int("output_dtype", 0);
    t = dtype ? static_cast<int32_t>(dtype) : kUint8;
  } else {
    const auto z = scalar(g, qn.inputs[2], true);
    if (!z) return false;
    t = constant_type(g, qn.inputs[2]);
    zp = static_cast<int32_t>(*z);
  }
  int32_t lo = 0, hi = 0;
  switch (static_cast<DataType>(t)) {
    case DataType::Int8: lo = -128, hi = 127; break;
    case DataType::Uint8: lo = 0, hi = 255; break;
    case DataType::Int16: lo = -32768, hi = 32767; break;
    case DataType::Uint16: lo = 0, hi = 65535; break;
    default: return false;
  }
  if (a.op_type == "Relu") return zp == lo;
  if (a.op_type != "Clip") return false;
  const auto bounds = clip_bounds(g, a);
  if (!bounds) return false;
  const float scale = static_cast<float>(*s);
  const int32_t qmin = wrapping_add(x86_int32(std::rint(bounds->first / scale)), zp);
  const int32_t qmax = wrapping_add(x86_int32(std::rint(bounds->second / scale)), zp);
  return qmin <= lo && qmax >= hi;
}

OutputUnit output_unit(Graph& g, int node) {
  OutputUnit u;
  const Node& n = g.nodes()[node];
  const std::string& y = n.outputs[0];
  u.graph_output = g.is_graph_output(y);
  const auto& uses = g.uses(y);
  u.edges = static_cast<int>(uses.size());
  if (uses.size() == 1 && uses[0].node >= 0) {
    const int r = uses[0].node;
    const Node& rn = g.nodes()[r];
    const bool act = (rn.op_type == "Relu" || rn.op_type == "Clip") && rn.outputs.size() == 1;
    // Level 1 removes the Relu / Clip; the selector then takes one it makes redundant itself, and forms
    // nothing when a Relu / Clip with one reader (no graph output) is left.
    if (act && (removed_before_q(g, r) ||
                (!g.is_graph_output(rn.outputs[0]) && g.uses(rn.outputs[0]).size() == 1))) {
      const int q = next_q(g, rn.outputs[0], u.propagated);
      if (q < 0 || (!removed_before_q(g, r) && !redundant_by_q(g, r, q))) {
        u.blocked = true;
        return u;
      }
      u.q = {q};
      return u;
    }
    bool propagated = false;
    if (const int q = next_q(g, y, propagated); q >= 0 && propagated) {
      u.q = {q};
      u.propagated = true;
      return u;
    }
  }
  for (const auto& use : uses)
    if (use.node >= 0 && is_q(g.nodes()[use.node])) u.q.push_back(use.node);
  return u;
}

int input_dq(Graph& g, int reader, int slot, bool& propagated) {
  propagated = false;
  std::string v = g.nodes()[reader].inputs[slot];
  int p = v.empty() ? -1 : g.producer(v);
  if (p < 0 || g.nodes()[p].removed()) return -1;
  if (is_dq(g.nodes()[p])) return p;
  int r = reader;
  while (propagates(g.nodes()[p]) && only_reader(g, v) == r && !g.nodes()[p].inputs.empty()) {
    r = p;
    v = g.nodes()[p].inputs[0];
    p = g.producer(v);
    if (p < 0) return -1;
    if (is_dq(g.nodes()[p])) {
      propagated = true;
      return scalar_parameters(g, p) && g.uses(v).size() == 1 ? p : -1;
    }
  }
  return -1;
}

bool bias_quantized_by_onnxruntime(Graph& g, int node, int input_dq, int weight_dq) {
  const Node& n = g.nodes()[node];
  if (!(n.is("Conv") || n.is("Gemm")) || n.inputs.size() < 3 || input_dq < 0 || weight_dq < 0) return false;
  if (!scalar(g, g.nodes()[input_dq].inputs.size() > 1 ? g.nodes()[input_dq].inputs[1] : "")) return false;
  // The output reaches a Q with no branch, through Relu / Clip only (graph outputs are not consumers there).
  std::string v = n.outputs[0];
  for (;;) {
    const auto& uses = g.uses(v);
    if (uses.size() != 1 || uses[0].node < 0) return false;
    const Node& c = g.nodes()[uses[0].node];
    bool propagated = false;
    if (is_q(c) || (!g.is_graph_output(v) && next_q(g, v, propagated) >= 0)) break;
    if (!(c.op_type == "Relu" || c.op_type == "Clip") || c.outputs.size() != 1) return false;
    v = c.outputs[0];
  }
  auto bias = g.constant(n.inputs[2]);
  if (!bias || bias->tensor.data_type != kFloat || bias->tensor.dims.size() != 1) return false;
  const Node& w = g.nodes()[weight_dq];
  if (w.inputs.size() < 2) return false;
  auto ws = g.constant(w.inputs[1]);
  if (!ws) return false;
  if (ws->tensor.count == 1 && ws->tensor.dims.size() <= 1) return true;  // per tensor
  if (ws->tensor.dims.size() != 1 || ws->tensor.dims[0] != bias->tensor.dims[0] || w.attr_int("block_size", 0) != 0)
    return false;
  int64_t axis = w.attr_int("axis", 1);
  if (axis < 0) {
    auto wt = g.constant(w.inputs[0]);
    if (!wt) return false;
    axis += static_cast<int64_t>(wt->tensor.dims.size());
  }
  const int64_t expected = n.is("Gemm") ? (n.attr_int("transB", 0) == 0 ? 1 : 0) : 0;
  return axis == expected;
}

}  // namespace qdqfold::predict::rewrites
