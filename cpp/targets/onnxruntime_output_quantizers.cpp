// output-quantizer (target onnxruntime): a layer whose output reaches activation quantizers only through ops
// that commute with rounding gets those quantizers' Q -> DQ right after it.
//
//   before:  DQ(x), DQ(W) -> Conv -> y -> Relu / Clip / MaxPool / Reshape ... -> QuantizeLinear(s, z) -> ...
//   after:   DQ(x), DQ(W) -> Conv -> y' -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> y -> (the same chain)
//
// onnxruntime turns a Conv into QLinearConv only when its output goes to QuantizeLinear nodes alone
// (qdq_selectors.cc, NodeGroupSelector::CheckQDQNodes); a ModelOpt / pytorch_quantization export quantizes layer
// inputs only, so Conv -> Relu -> Q (zero point 0, which ReluQuantFusion leaves alone) never forms one.
//
// Why the downstream quantizer sees the same integers. Write Q(v) = sat(round(v / s) + z) (round half to
// even, sat to the integer type; s > 0) and D(q) = (q - z) * s. Two facts:
//   (1) Q(D(q)) = q for every q of the type. D(q) = fl(n * s) with n = q - z an integer, |n| <= 255 (8-bit) or
//       65535 (16-bit); fl(n * s) / s = n (1 + e), |e| <= 2 ulp (float32: 2^-23; with the reciprocal form
//       v * fl(1/s) one more ulp), so |n e| <= 65535 * 3 * 2^-24 < 0.02 and round gives n back. A float16 scale
//       (2^-11 per rounding) keeps this only for 8-bit types: 255 * 3 * 2^-11 < 0.4. Other combinations are
//       left alone (reason "quantizer-type").
//   (2) Q is nondecreasing (division by s > 0, round and sat all are), and a nondecreasing g commutes with max
//       and min: g(max(a, b)) = max(g(a), g(b)), g(min(a, b)) = min(g(a), g(b)).
// Per op f of the chain, Q(f(y)) = Q(f(D(Q(y)))) elementwise:
//   Relu     Q(max(y, 0)) = max(Q(y), Q(0)) = max(Q(y), z) by (2), for any zero point; the new form gives
//            max(Q(D(Q(y))), z) = max(Q(y), z) by (1). (ReluQuantFusion's zp = type-minimum condition is about
//            removing the Relu, not about this.)
//   Clip     min(max(y, lo), hi): Q of it is min(max(Q(y), Q(lo)), Q(hi)) by (2), and with D(Q(y)) for y the
//            same by (1). This holds for bounds off the quantizer's grid too: the float values between the new
//            DQ and the downstream Q differ from the original ones (a bound off the grid is no longer reached
//            exactly), but only the downstream Q reads them (checked: the chain has no other reader). Bounds
//            must be constants (or the opset < 11 attributes) and not NaN; lo > hi gives hi on both sides.
//   MaxPool  the max over a window: Q(max_i y_i) = max_i Q(y_i) by (2), and the same with D(Q(y_i)) by (1).
//            Padding is -inf on both sides, which never wins a window holding a real element; a window of
//            padding alone gives -inf on both sides (Q(-inf) = the type's minimum). The Indices output (which
//            element won, ties among equal DQ values would change it) must not be used.
//   Reshape / Flatten / Transpose / Squeeze / Unsqueeze / Identity / Cast float32 -> float32  move elements:
//            Q commutes with any permutation or copy of elements when s and z are one scalar each (checked:
//            per-tensor only; the Cast's input proven float32: declared, or made from one by ops that keep it).
// Composing: each op maps the D(Q(.)) form to the same Q integers, so the chain's end does too. Several readers
// of y (or of a value inside the chain) are fine when every path ends at a quantizer with the same s, z and
// type: the new Q -> DQ feeds them all. Not covered (left alone): NaN inputs (Q(NaN) is the runtime's choice),
// a per-channel downstream quantizer, a graph output or subgraph read anywhere on the way, and any other op.
#include <cmath>
#include <cstring>
#include <optional>
#include <variant>

#include "graph/tensor.h"
#include "targets/onnxruntime.h"
#include "targets/onnxruntime_rewrite.h"

namespace qdqfold::targets {

using graph::Graph;
using graph::Node;
using wire::DataType;

namespace {
constexpr const char* kGiven = "output-quantizer";
}  // namespace

namespace detail {

struct Walk {
  std::vector<Quantizer> quantizers;
  std::string blocker;  // empty: every path ends at a quantizer; else the sentence of the first blocker
  std::string code;
};

BatchNormRecord kept(BatchNormRecord r, const char* code, std::string message) {
  r.folded = false;
  r.code = code;
  r.message = std::move(message);
  return r;
}

std::string describe(const Graph& g, int node) {
  return g.nodes()[node].op_type + " '" + g.nodes()[node].display_name(node) + "'";
}

// A scalar constant's type and element bytes, or nullopt.
std::optional<std::pair<int32_t, std::string>> scalar_constant(Graph& g, const std::string& name) {
  if (name.empty()) return std::nullopt;
  auto ref = g.constant(name);
  if (!ref || ref->tensor.count != 1) return std::nullopt;
  std::string storage;
  auto bytes = ref->tensor.bytes(storage);
  if (!bytes) return std::nullopt;
  return std::make_pair(ref->tensor.data_type, std::string(*bytes));
}

bool exactly_reversible(int32_t quantized, int32_t scale) {
  const auto t = static_cast<DataType>(quantized);
  const bool eight = t == DataType::Int8 || t == DataType::Uint8 || t == DataType::Int4 || t == DataType::Uint4;
  const bool sixteen = t == DataType::Int16 || t == DataType::Uint16;
  if (scale == static_cast<int32_t>(DataType::Float)) return eight || sixteen;
  if (scale == static_cast<int32_t>(DataType::Float16)) return eight;
  return false;
}

// The quantizer's parameters, or a sentence saying why the rewrite leaves it alone.
std::variant<Quantizer, std::string> read_quantizer(Graph& g, int q) {
  const Node& n = g.nodes()[q];
  Quantizer out;
  out.node = q;
  out.domain = n.domain;
  out.output_dtype = n.attr_int("output_dtype", 0);
  out.saturate = n.attr_int("saturate", 1);
  if (n.inputs.size() < 2) return describe(g, q) + " has no scale";
  // QuantizeLinear's precision (opset 23) sets the type it divides in; a quantizer inserted without it would
  // round differently. DequantizeLinear's output_dtype is the float type it computes, not a quantized type.
  if (n.attr("precision")) return describe(g, q) + " has a precision attribute, which the rewrite does not copy";
  if (n.is("DequantizeLinear") && n.attr("output_dtype"))
    return describe(g, q) + " has an output_dtype attribute, which the rewrite does not copy";
  if (n.is("DequantizeLinear") && (n.inputs.size() < 3 || n.inputs[2].empty()))
    return describe(g, q) + " has no zero point";
  out.scale = n.inputs[1];
  out.zero = n.inputs.size() > 2 ? n.inputs[2] : "";
  auto scale = scalar_constant(g, out.scale);
  if (!scale) return describe(g, q) + " is not per-tensor with a constant scale";
  out.scale_type = scale->first;
  out.scale_raw = scale->second;
  const double s = graph::float_element(out.scale_type, out.scale_raw, 0);
  if (!(s > 0) || !std::isfinite(s)) return describe(g, q) + " has a scale that is not positive and finite";
  out.zero_type = static_cast<int32_t>(out.output_dtype ? out.output_dtype : static_cast<int64_t>(DataType::Uint8));
  if (!out.zero.empty()) {
    auto zero = scalar_constant(g, out.zero);
    if (!zero) return describe(g, q) + " is not per-tensor with a constant zero point";
    out.zero_type = zero->first;
    out.zero_raw = zero->second;
  }
  if (!exactly_reversible(out.zero_type, out.scale_type))
    return describe(g, q) + " quantizes to " + graph::data_type_name(out.zero_type) + " with a " +
           graph::data_type_name(out.scale_type) + " scale, for which Q(DQ(q)) = q is not guaranteed";
  return out;
}

// A Clip whose bounds are constants (or the opset < 11 attributes), none of them NaN.
bool constant_clip(Graph& g, const Node& n) {
  for (size_t i = 1; i < n.inputs.size() && i < 3; ++i) {
    if (n.inputs[i].empty()) continue;
    auto ref = g.constant(n.inputs[i]);
    if (!ref || ref->tensor.count != 1) return false;
    auto v = ref->tensor.values();
    if (!v || std::isnan((*v)[0])) return false;
  }
  for (const char* a : {"min", "max"})
    if (const auto* at = n.attr(a); at && std::isnan(at->f)) return false;
  return true;
}

// True when `value` is float32: declared so, or made by an op whose output type is its input 0's (or a float32
// DequantizeLinear / Cast) from such a value.
bool float32_value(Graph& g, const std::string& value, int depth) {
  if (auto t = g.declared_type(value)) return *t == static_cast<int32_t>(DataType::Float);
  const int p = value.empty() || depth > 64 ? -1 : g.producer(value);
  if (p < 0) return false;
  const Node& n = g.nodes()[p];
  if (!n.domain.empty() && n.domain != "ai.onnx") return false;
  if (n.is("Cast")) return n.attr_int("to", 0) == static_cast<int64_t>(DataType::Float);
  if (n.is("DequantizeLinear")) {
    if (n.attr("output_dtype") || n.inputs.size() < 2) return false;
    auto scale = g.constant(n.inputs[1]);
    return scale && scale->tensor.data_type == static_cast<int32_t>(DataType::Float);
  }
  static const char* const same_type[] = {"Conv", "BatchNormalization", "Relu", "Clip", "MaxPool", "AveragePool",
                                          "GlobalAveragePool", "Add", "Sub", "Mul", "Div", "Gemm", "MatMul",
                                          "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                                          "Concat", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu"};
  for (const char* op : same_type)
    if (n.op_type == op) return !n.inputs.empty() && float32_value(g, n.inputs[0], depth + 1);
  return false;
}

// A Cast to float32 of a float32 value: it copies every element (ModelOpt reads a block's input through one
// before the residual Add, `input_quantizer/Cast`).
bool identity_cast(Graph& g, const Node& n) {
  return n.is("Cast") && (n.domain.empty() || n.domain == "ai.onnx") && n.inputs.size() == 1 &&
         n.outputs.size() == 1 && n.attr_int("to", 0) == static_cast<int64_t>(DataType::Float) &&
         float32_value(g, n.inputs[0], 0);
}

// True for an op through which the rewrite stays exact (see the header comment), reading its input 0.
bool commutes(Graph& g, int node) {
  const Node& n = g.nodes()[node];
  if (identity_cast(g, n)) return true;
  if (!n.domain.empty() && n.domain != "ai.onnx") return false;
  if (n.op_type == "Relu" || n.op_type == "Reshape" || n.op_type == "Flatten" || n.op_type == "Transpose" ||
      n.op_type == "Squeeze" || n.op_type == "Unsqueeze" || n.op_type == "Identity")
    return n.outputs.size() == 1;
  if (n.op_type == "MaxPool")  // its Indices output would show which of equal values won
    return !n.outputs.empty() && (n.outputs.size() < 2 || n.outputs[1].empty() || g.reader_count(n.outputs[1]) == 0);
  if (n.op_type == "Clip") return n.outputs.size() == 1 && constant_clip(g, n);
  return false;
}

// Every path from `value` to the quantizers that end it, or the first thing that blocks one.
void walk(Graph& g, const std::string& value, Walk& w, int depth) {
  if (!w.blocker.empty()) return;
  if (depth > 64) {
    w.code = "chain-too-long";
    w.blocker = "more than 64 ops between the layer and its quantizers";
    return;
  }
  if (g.is_graph_output(value)) {
    w.code = "graph-output";
    w.blocker = "'" + value + "' is a graph output, which must keep its float values";
    return;
  }
  const auto uses = g.uses(value);  // a copy: the walk only reads
  if (uses.empty()) {
    w.code = "no-quantizer";
    w.blocker = "'" + value + "' is read by nothing";
    return;
  }
  for (const graph::Use& u : uses) {
    if (u.slot < 0) {
      w.code = "subgraph-read";
      w.blocker = "'" + value + "' is read inside a subgraph of " + describe(g, u.node);
      return;
    }
    const Node& n = g.nodes()[u.node];
    if (n.is("QuantizeLinear") && u.slot == 0) {
      auto q = read_quantizer(g, u.node);
      if (auto* why = std::get_if<std::string>(&q)) {
        w.code = "quantizer-form";
        w.blocker = *why;
        return;
      }
      Quantizer& quantizer = std::get<Quantizer>(q);
      if (!w.quantizers.empty() && !w.quantizers[0].same_as(quantizer)) {
        w.code = "different-quantizers";
        w.blocker = "it reaches " + describe(g, w.quantizers[0].node) + " and " + describe(g, u.node) +
                    ", which quantize with different parameters";
        return;
      }
      w.quantizers.push_back(std::move(quantizer));
      continue;
    }
    if (u.slot == 0 && commutes(g, u.node)) {
      walk(g, n.outputs[0], w, depth + 1);
      if (!w.blocker.empty()) return;
      continue;
    }
    w.code = "not-commuting";
    w.blocker = "'" + value + "' is read by " + describe(g, u.node) +
                (n.is("Add") || n.is("Sub") || n.is("Mul") || n.is("Concat")
                     ? ", which has no quantizers on its inputs and output"
                     : ", which does not commute with rounding") +
                (n.is("Clip") ? " (its bounds are not constants)" : "") +
                (n.is("MaxPool") ? " (its Indices output is used)" : "");
    return;
  }
}

bool dequantized(const Graph& g, const std::string& value) {
  const int p = value.empty() ? -1 : g.producer(value);
  return p >= 0 && g.nodes()[p].is("DequantizeLinear");
}

// The constant under `name` as a name this graph can read where the new nodes go: the name itself when it is
// an initializer (here or outside), else a copy (a Constant node may come after the layer).
std::string readable(graph::Model& model, Graph& g, const std::string& name, int32_t type, const std::string& raw,
                     std::vector<std::string>& new_tensors, bool copy_always = false) {
  if (name.empty()) return name;
  auto ref = g.constant(name);
  if (!copy_always && ref && ref->initializer >= 0 && !ref->through_identity) return name;
  const std::string copy = model.fresh_name(name + "_target");
  g.add_tensor(copy, graph::encode_tensor(copy, type, {}, raw));
  new_tensors.push_back(copy);
  return copy;
}

// The Q -> DQ pair with q's parameters from `in` to `out`, placed before node `before`.
void add_rounding(graph::Model& model, Graph& g, const Quantizer& q, const std::string& in, const std::string& out,
                  const std::string& base, int before, std::vector<std::string>& new_tensors, bool private_constants) {
  const std::string scale = readable(model, g, q.scale, q.scale_type, q.scale_raw, new_tensors, private_constants);
  const std::string zero = readable(model, g, q.zero, q.zero_type, q.zero_raw, new_tensors, private_constants);
  const std::string quantized = model.fresh_name(out + "_quantized");
  Node qn, dqn;
  qn.op_type = "QuantizeLinear";
  dqn.op_type = "DequantizeLinear";
  qn.domain = dqn.domain = q.domain;
  qn.name = model.fresh_name(base + "/QuantizeLinear");
  dqn.name = model.fresh_name(base + "/DequantizeLinear");
  qn.inputs = {in, scale};
  dqn.inputs = {quantized, scale};
  if (!zero.empty()) {
    qn.inputs.push_back(zero);
    dqn.inputs.push_back(zero);
  }
  qn.outputs = {quantized};
  dqn.outputs = {out};
  const int qi = g.add_node(std::move(qn), before);
  g.add_node(std::move(dqn), before);
  if (q.node >= 0) {
    const Node& leaf = g.nodes()[q.node];
    if (leaf.attr("output_dtype")) g.set_int_attribute(qi, "output_dtype", q.output_dtype);
    if (leaf.attr("saturate")) g.set_int_attribute(qi, "saturate", q.saturate);
  } else if (q.output_dtype) {
    g.set_int_attribute(qi, "output_dtype", q.output_dtype);
  }
}

}  // namespace detail

using namespace detail;

BatchNormRecord output_quantizer(graph::Model& model, Graph& g, int layer) {
  const Node& n = g.nodes()[layer];
  BatchNormRecord r;
  r.graph = g.path;
  r.node = n.display_name(layer);
  r.op_type = n.op_type;
  r.direction = "";
  // select: a layer with dequantized activation and weight.
  if (n.inputs.size() < 2 || n.outputs.size() != 1 || n.outputs[0].empty())
    return kept(r, "malformed-layer", "the layer lacks an input or its output");
  // A layer: its activation and weight; an Add / Mul / Concat (a residual the target gave its input
  // quantizers, onnxruntime_residuals.cpp): every input.
  const bool layer_op = n.is("Conv") || n.is("Gemm") || n.is("MatMul");
  for (size_t i = 0; i < (layer_op ? 2 : n.inputs.size()); ++i)
    if (!dequantized(g, n.inputs[i]))
      return kept(r, "inputs-not-quantized",
                  layer_op ? "its activation or weight does not come from a DequantizeLinear, so no integer kernel "
                             "can take it"
                           : "an input does not come from a DequantizeLinear, so no integer kernel can take it");
  const std::string y = n.outputs[0];
  // Already in the shape the selectors want: every reader a QuantizeLinear.
  const auto& uses = g.uses(y);
  bool all_quantizers = !uses.empty() && !g.is_graph_output(y);
  for (const auto& u : uses) all_quantizers = all_quantizers && u.slot == 0 && g.nodes()[u.node].is("QuantizeLinear");
  // Several quantizers read it: onnxruntime's CSE makes them one only when they read the same constants (a
  // kernel has one output quantizer); otherwise one new pair goes before them all (the walk below).
  for (const auto& u : uses)
    all_quantizers = all_quantizers && g.nodes()[u.node].inputs == g.nodes()[uses[0].node].inputs &&
                     g.nodes()[u.node].attributes.size() == g.nodes()[uses[0].node].attributes.size();
  if (all_quantizers) return kept(r, "already-quantized", "its output goes only to QuantizeLinear already");
  // plan: every path to its quantizers.
  Walk w;
  walk(g, y, w, 0);
  if (!w.blocker.empty()) return kept(r, w.code.c_str(), "left in float: " + w.blocker);
  // apply: y' -> Q -> DQ -> y, with the first quantizer's parameters (they all agree).
  const Quantizer& q = w.quantizers[0];
  for (const auto& leaf : w.quantizers) r.into.push_back(g.nodes()[leaf.node].display_name(leaf.node));
  r.into_op = "QuantizeLinear";
  const std::string base = n.display_name(layer);  // before any edit: `n` is a reference into g.nodes()
  const std::string renamed = model.fresh_name(y + "_unquantized");
  g.set_output(layer, 0, renamed);
  add_rounding(model, g, q, renamed, y, base + "/output_quantizer", layer + 1, r.new_tensors);
  r.folded = true;
  r.code = kGiven;
  r.exact = true;
  r.message = "output quantized with the parameters of " + std::string(w.quantizers.size() == 1 ? "" : "each of ") +
              describe(g, q.node) + (w.quantizers.size() > 1 ? " (and " + std::to_string(w.quantizers.size() - 1) +
                                                                    " more with the same parameters)" : "") +
              ", which it reaches through ops that commute with rounding: the same integers reach it";
  return r;
}

}  // namespace qdqfold::targets
