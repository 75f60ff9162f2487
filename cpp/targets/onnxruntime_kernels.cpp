// The integer kernels onnxruntime's CPU provider is expected to form, predicted statically from its QDQ selector
// rules (onnxruntime/core/optimizer/qdq_transformer/selectors_actions/qdq_selectors.cc) and the transformers
// that run before them at the default level:
//
//   NodeGroupSelector::CheckQDQNodes  every input of the node comes from a DequantizeLinear, and when there are
//       output quantizers, every output edge goes to a QuantizeLinear and the node's output is not a graph output.
//       A DQ feeding several nodes is not a blocker: EnsureUniqueDQForNodeUnit gives each node its own copy.
//   Conv -> QLinearConv        Q required; activation type = output type; int8 activation needs int8 weight; a bias
//       DequantizeLinear must read int32, a constant float bias is turned into one (WeightBiasQuantization).
//   MatMul -> QLinearMatMul    with Q (activation type = output type); without Q -> MatMulIntegerToFloat.
//   Gemm -> QGemm              Q optional; int8 A needs int8 B; a bias must be int32 behind a DQ (a float bias
//       is left float, measured with onnxruntime 1.32) and beta 1.
//   Add / Mul -> QLinearAdd / QLinearMul  both inputs from DQ of one type, output Q of that type.
//   Concat -> QLinearConcat  every input from a DQ of one type, output Q of that type (measured with 1.32).
//   Redundant Relu / Clip (GetQDQSelection): a single Relu between the node and its single Q counts as part of the
//       unit when the Q's zero point is its type's minimum (Relu removed: ReluQuantFusion).
//   QDQPropagationTransformer: a per-tensor Q (constant scalar scale and zero point) after a chain of MaxPool /
//       Reshape / Transpose / Squeeze / Unsqueeze / Slice, each the only reader of its input, is copied back to the
//       node's output; a DQ before such a chain forward to the node's input.
//   QDQS8ToU8Transformer: on x86-64 (QDQIsInt8Allowed() is false off ARM) every int8 activation Q -> DQ pair
//       becomes uint8 before the selectors run, and an int8 activation that is not such a pair forms no kernel.
//       The prediction is x86-64's (measured there: an int8 input quantizer with a uint8 output quantizer forms
//       QLinearConv); on ARM the selectors see the int8 types as written.
// A prediction, not a measurement: tests/test_target_onnxruntime.py checks it against the count in the model
// onnxruntime saves (optimized_model_filepath, ORT_ENABLE_ALL).
#include <optional>

#include "graph/tensor.h"
#include "targets/onnxruntime.h"

namespace qdqfold::targets {

using graph::Graph;
using graph::Node;
using wire::DataType;

namespace {

bool propagates(const Node& n) {
  return (n.domain.empty() || n.domain == "ai.onnx") &&
         (n.op_type == "MaxPool" || n.op_type == "Reshape" || n.op_type == "Transpose" || n.op_type == "Squeeze" ||
          n.op_type == "Unsqueeze" || n.op_type == "Slice");
}

bool only_reader(const Graph& g, const std::string& value, int node) {
  const auto& uses = g.uses(value);
  return !g.is_graph_output(value) && uses.size() == 1 && uses[0].node == node && uses[0].slot >= 0;
}

// The integer type a Q / DQ node's integer side has (its zero point's, its output_dtype, or uint8), 0 unknown.
int32_t integer_type(Graph& g, int qdq) {
  const Node& n = g.nodes()[qdq];
  if (n.inputs.size() > 2 && !n.inputs[2].empty()) {
    if (auto ref = g.constant(n.inputs[2])) return ref->tensor.data_type;
    return 0;
  }
  if (n.is("DequantizeLinear") && !n.inputs.empty()) {
    if (auto ref = g.constant(n.inputs[0])) return ref->tensor.data_type;
    const int p = g.producer(n.inputs[0]);
    return p >= 0 && g.nodes()[p].is("QuantizeLinear") ? integer_type(g, p) : 0;
  }
  const int64_t dtype = n.attr_int("output_dtype", 0);
  return dtype ? static_cast<int32_t>(dtype) : static_cast<int32_t>(DataType::Uint8);
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

// The activation type a Q or DQ node has once onnxruntime converted int8 activation pairs to uint8 (x86-64).
int32_t activation_type(Graph& g, int qdq) {
  const int32_t t = integer_type(g, qdq);
  if (t != static_cast<int32_t>(DataType::Int8)) return t;
  const Node& n = g.nodes()[qdq];
  const bool pair = n.is("QuantizeLinear") || (!n.inputs.empty() && g.producer(n.inputs[0]) >= 0 &&
                                                g.nodes()[g.producer(n.inputs[0])].is("QuantizeLinear"));
  return pair ? static_cast<int32_t>(DataType::Uint8) : t;
}

// The DequantizeLinear an input comes from (directly, or forward through a propagating chain), else -1.
int input_dq(Graph& g, const std::string& value, int reader) {
  int p = value.empty() ? -1 : g.producer(value);
  if (p < 0) return -1;
  if (g.nodes()[p].is("DequantizeLinear")) return p;
  std::string v = value;
  int r = reader;
  while (p >= 0 && propagates(g.nodes()[p]) && only_reader(g, v, r) && !g.nodes()[p].inputs.empty()) {
    r = p;
    v = g.nodes()[p].inputs[0];
    p = g.producer(v);
    if (p >= 0 && g.nodes()[p].is("DequantizeLinear"))
      return scalar_parameters(g, p) && g.uses(v).size() == 1 ? p : -1;
  }
  return -1;
}

// The output quantizers of `node`: every reader a Q (returns their integer type), or through a redundant
// Relu or a propagating chain to one Q. 0: none (readers exist but are not all quantizers, or a graph output);
// -1: no reader at all.
int32_t output_q(Graph& g, int node) {
  const std::string& y = g.nodes()[node].outputs[0];
  if (g.is_graph_output(y)) return 0;
  const auto& uses = g.uses(y);
  if (uses.empty()) return -1;
  int32_t type = -2;
  for (const auto& u : uses) {
    if (u.slot != 0 || !g.nodes()[u.node].is("QuantizeLinear")) { type = 0; break; }
    const int32_t t = activation_type(g, u.node);
    if (type != -2 && type != t) return 0;
    type = t;
  }
  if (type != 0) return type;
  if (uses.size() != 1 || uses[0].slot != 0) return 0;
  int next = uses[0].node;
  // A Relu the Q makes redundant (zero point at the type's minimum).
  if (g.nodes()[next].is("Relu") && g.nodes()[next].outputs.size() == 1) {
    const std::string& r = g.nodes()[next].outputs[0];
    const auto& ru = g.uses(r);
    if (g.is_graph_output(r) || ru.size() != 1 || !g.nodes()[ru[0].node].is("QuantizeLinear")) return 0;
    const int q = ru[0].node;
    const Node& qn = g.nodes()[q];
    const int32_t t = integer_type(g, q);
    double zp = 0;
    if (qn.inputs.size() > 2 && !qn.inputs[2].empty()) {
      auto ref = g.constant(qn.inputs[2]);
      auto v = ref ? ref->tensor.values() : std::nullopt;
      if (!v || v->size() != 1) return 0;
      zp = (*v)[0];
    }
    const bool at_minimum = (t == static_cast<int32_t>(DataType::Int8) && zp == -128) ||
                            (t == static_cast<int32_t>(DataType::Uint8) && zp == 0);
    return at_minimum ? activation_type(g, q) : 0;
  }
  // Q propagated backwards over a chain of single-reader ops.
  while (propagates(g.nodes()[next]) && !g.nodes()[next].outputs.empty()) {
    const std::string& v = g.nodes()[next].outputs[0];
    const auto& vu = g.uses(v);
    if (g.is_graph_output(v) || vu.size() != 1 || vu[0].slot != 0) return 0;
    next = vu[0].node;
    if (g.nodes()[next].is("QuantizeLinear")) return scalar_parameters(g, next) ? activation_type(g, next) : 0;
  }
  return 0;
}

// The kernel op `node` becomes, or "" when it stays float.
std::string kernel(Graph& g, int node) {
  const Node& n = g.nodes()[node];
  if (!(n.domain.empty() || n.domain == "ai.onnx") || n.outputs.size() != 1 || n.outputs[0].empty()) return "";
  const bool conv = n.op_type == "Conv", gemm = n.op_type == "Gemm", matmul = n.op_type == "MatMul";
  const bool binary = n.op_type == "Add" || n.op_type == "Mul";
  if (n.op_type == "Concat") {  // every input from a DQ of one type, output Q of that type
    int32_t type = 0;
    for (const auto& in : n.inputs) {
      const int dq = input_dq(g, in, node);
      const int32_t t = dq < 0 ? 0 : activation_type(g, dq);
      if (t == 0 || t == static_cast<int32_t>(DataType::Int8) || (type != 0 && t != type)) return "";
      type = t;
    }
    return !n.inputs.empty() && output_q(g, node) == type ? "QLinearConcat" : "";
  }
  if (!(conv || gemm || matmul || binary) || n.inputs.size() < 2) return "";
  const int a = input_dq(g, n.inputs[0], node), b = input_dq(g, n.inputs[1], node);
  if (a < 0 || b < 0) return "";
  // The weight keeps its type (a constant, not an activation pair); a binary op's inputs are activations.
  const int32_t ta = activation_type(g, a), tb = binary ? activation_type(g, b) : integer_type(g, b);
  const auto int8 = static_cast<int32_t>(DataType::Int8);
  if (ta == 0 || tb == 0 || ta == int8) return "";  // an int8 activation left as int8: not taken on x86-64
  const int32_t ty = output_q(g, node);
  const bool quantized_out = ty > 0;
  if (quantized_out && ty != ta) return "";
  if (binary) return quantized_out && ta == tb ? "QLinear" + n.op_type : "";
  // Without output quantizers MatMul and Gemm still form a kernel (float output), unless some reader is a Q.
  bool q_reader = false;
  for (const auto& u : g.uses(n.outputs[0])) q_reader = q_reader || g.nodes()[u.node].is("QuantizeLinear");
  const bool float_out = !quantized_out && !q_reader;
  if (matmul) return quantized_out ? "QLinearMatMul" : float_out ? "MatMulIntegerToFloat" : "";
  const bool has_bias = n.inputs.size() > 2 && !n.inputs[2].empty();
  if (has_bias) {
    const int bias = g.producer(n.inputs[2]);
    const bool int32_dq = bias >= 0 && g.nodes()[bias].is("DequantizeLinear") &&
                          integer_type(g, bias) == static_cast<int32_t>(DataType::Int32);
    const bool float_constant = conv && g.constant(n.inputs[2]).has_value();
    if (!int32_dq && !float_constant) return "";
  }
  if (conv) return quantized_out ? "QLinearConv" : "";
  if (has_bias && n.attr_float("beta", 1.0f) != 1.0f) return "";
  return quantized_out || float_out ? "QGemm" : "";
}

}  // namespace

std::string predicted_kernel(Graph& g, int node) { return kernel(g, node); }

std::map<std::string, int64_t> predict_onnxruntime_kernels(graph::Model& model) {
  std::map<std::string, int64_t> counts = {{"QLinearConv", 0}, {"QLinearMatMul", 0}, {"MatMulIntegerToFloat", 0},
                                           {"QGemm", 0},       {"QLinearAdd", 0},    {"QLinearMul", 0},
                                           {"QLinearConcat", 0}};
  // onnxruntime's graph transformers run on the main graph's nodes (and subgraphs); functions are inlined
  // first, which this prediction does not model.
  for (Graph* g : model.all_graphs()) {
    if (g->kind == graph::GraphKind::Function) continue;
    for (size_t i = 0; i < g->nodes().size(); ++i) {
      if (g->nodes()[i].removed()) continue;
      const std::string k = kernel(*g, static_cast<int>(i));
      if (!k.empty()) ++counts[k];
    }
  }
  return counts;
}

}  // namespace qdqfold::targets
