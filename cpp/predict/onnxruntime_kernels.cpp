// onnxruntime's QDQ selectors (qdq_selectors.cc) on the graph as its earlier rewrites leave it (ort_rewrites.h);
// the rules are listed in onnxruntime_kernels.h.
#include "onnxruntime_kernels.h"

#include <vector>

#include "../graph/tensor.h"
#include "ort_rewrites.h"

namespace qdqfold::predict {

using graph::Graph;
using graph::Node;
using wire::DataType;
namespace rw = rewrites;

namespace {

constexpr auto kInt8 = static_cast<int32_t>(DataType::Int8), kUint8 = static_cast<int32_t>(DataType::Uint8);
constexpr auto kInt32 = static_cast<int32_t>(DataType::Int32);

bool eight_bit(int32_t t) { return t == kInt8 || t == kUint8; }

// The type the kernel reads from DQ `dq`: a DQ copied forward over a propagating chain sits in a new pair of its
// own (one reader each), which QDQS8ToU8 converts.
int32_t input_type(Graph& g, int dq, bool propagated) {
  const int32_t t = rw::written_type(g, dq);
  if (propagated) {
    const Node& d = g.nodes()[dq];
    return t == kInt8 && d.inputs.size() == 3 && !d.inputs[2].empty() ? kUint8 : t;
  }
  return rw::type_after(g, dq);
}

int32_t output_type(Graph& g, const rw::OutputUnit& out) {
  const int32_t t = rw::written_type(g, out.q[0]);
  if (out.propagated) return t == kInt8 ? kUint8 : t;
  return rw::type_after(g, out.q[0]);
}

}  // namespace

Kernel select_kernel(Graph& g, int node) {
  Kernel k;
  const Node& n = g.nodes()[node];
  if (n.removed() || !(n.domain.empty() || n.domain == "ai.onnx") || n.outputs.size() != 1 || n.outputs[0].empty())
    return k;
  const bool conv = n.op_type == "Conv", gemm = n.op_type == "Gemm", matmul = n.op_type == "MatMul";
  const bool binary = n.op_type == "Add" || n.op_type == "Mul", concat = n.op_type == "Concat";
  if (!(conv || gemm || matmul || binary || concat) || n.inputs.empty()) return k;
  // Every actual input from a DQ (NumActualValues == the DQs found), each with the type the kernel reads.
  std::vector<int> dqs(n.inputs.size(), -1);
  std::vector<int32_t> types(n.inputs.size(), 0);
  for (size_t i = 0; i < n.inputs.size(); ++i) {
    if (n.inputs[i].empty()) continue;
    bool propagated = false;
    dqs[i] = rw::input_dq(g, node, static_cast<int>(i), propagated);
    if (dqs[i] >= 0) types[i] = input_type(g, dqs[i], propagated);
  }
  const rw::OutputUnit out = rw::output_unit(g, node);
  if (out.blocked) return k;
  // CheckQDQNodes' output part: the one output goes to exactly one Q and is no graph output.
  const bool has_q = !out.q.empty();
  const bool q_unit = out.q.size() == 1 && out.edges == 1 && !out.graph_output;
  const int32_t ty = has_q ? output_type(g, out) : 0;
  if (concat || binary) {
    if (binary && n.inputs.size() != 2) return k;
    for (size_t i = 0; i < n.inputs.size(); ++i)
      if (n.inputs[i].empty() || dqs[i] < 0 || types[i] != types[0] || !eight_bit(types[i])) return k;
    if (!q_unit || ty != types[0]) return k;
    k.op = concat ? "QLinearConcat" : "QLinear" + n.op_type;
    return k;
  }
  if (n.inputs.size() < 2 || dqs[0] < 0 || dqs[1] < 0) return k;
  const int32_t ta = types[0], tb = rw::written_type(g, dqs[1]);  // a weight keeps its type
  if (!eight_bit(ta) || !eight_bit(tb)) return k;  // 16- and 4-bit types are not formed on the CPU provider
  k.input_dq = dqs[0];
  k.weight_dq = dqs[1];
  k.input_type = ta;
  k.weight_type = tb;
  std::string op;
  if (matmul) {
    // x86-64: no int8 activation (int8_allowed is false off ARM); without a Q -> MatMulIntegerToFloat.
    if (n.inputs.size() != 2 || ta == kInt8) return k;
    if (has_q) op = q_unit && ta == ty ? "QLinearMatMul" : "";
    else op = "MatMulIntegerToFloat";
  } else {
    if (n.inputs.size() > 2 && !n.inputs[2].empty()) {
      const bool int32_dq = dqs[2] >= 0 && rw::written_type(g, dqs[2]) == kInt32;
      if (!int32_dq && !rw::bias_quantized_by_onnxruntime(g, node, dqs[0], dqs[1])) return k;
      if (gemm && n.attr_float("beta", 1.0f) != 1.0f) return k;
    }
    if (conv) op = q_unit && ta == ty && ta != kInt8 ? "QLinearConv" : "";
    else if (ta == kInt8 && tb != kInt8) op = "";  // Gemm: int8 A needs int8 B
    else op = !has_q || (q_unit && ta == ty) ? "QGemm" : "";
  }
  if (op.empty()) return Kernel{};
  k.op = op;
  return k;
}

std::map<std::string, int64_t> count_kernels(graph::Model& model) {
  std::map<std::string, int64_t> counts = {{"QLinearConv", 0}, {"QLinearMatMul", 0}, {"MatMulIntegerToFloat", 0},
                                           {"QGemm", 0},       {"QLinearAdd", 0},    {"QLinearMul", 0},
                                           {"QLinearConcat", 0}};
  // onnxruntime's graph transformers run on the main graph's nodes (and subgraphs); functions are inlined
  // first, which this prediction does not model.
  for (Graph* g : model.all_graphs()) {
    if (g->kind == graph::GraphKind::Function) continue;
    for (size_t i = 0; i < g->nodes().size(); ++i) {
      const std::string op = select_kernel(*g, static_cast<int>(i)).op;
      if (!op.empty()) ++counts[op];
    }
  }
  return counts;
}

}  // namespace qdqfold::predict
