// uint8 activations (target onnxruntime): an int8 activation quantizer pair is rewritten as the uint8 pair that
// computes the same floats, the rewrite onnxruntime's QDQS8ToU8Transformer makes itself on x86-64, but for every
// pair: onnxruntime's converts a QuantizeLinear only when a single DequantizeLinear reads it, and an int8
// activation left int8 forms no integer kernel there (QDQIsInt8Allowed() is false off ARM). Where a value feeds a
// conv and a residual Add, the quantizers end up shared (its CSE merges equal ones, its cleanup removes DQ -> Q
// pairs), so without this the convs around the Add stay float (measured on the generated MobileNetV2).
//
//   before:  v -> QuantizeLinear(s, z: int8) -> q -> DequantizeLinear(s, z) (one or more) -> ...
//   after:   v -> QuantizeLinear(s, z + 128: uint8) -> q + 128 -> DequantizeLinear(s, z + 128) -> ...
//
// Exact. Q_int8(v) = clamp(round(v / s) + z, -128, 127); Q_uint8(v) = clamp(round(v / s) + z + 128, 0, 255)
// = Q_int8(v) + 128 (the same integer shifted, the clamp bounds shifted with it; round(v / s) is the same float
// computation). DQ: ((q + 128) - (z + 128)) * s = (q - z) * s, the same integer difference times the same scale,
// so the same float, bit for bit. Only per-tensor pairs with a constant int8 zero point (no output_dtype or
// saturate attribute) whose QuantizeLinear is read by DequantizeLinear nodes with its own scale and zero point.
#include "graph/tensor.h"
#include "targets/onnxruntime.h"

namespace qdqfold::targets {

using graph::Graph;
using graph::Node;
using wire::DataType;

int uint8_activations(graph::Model& model, Graph& g) {
  int changed = 0;
  for (size_t i = 0; i < g.nodes().size(); ++i) {
    const Node& q = g.nodes()[i];
    if (q.removed() || !q.is("QuantizeLinear") || q.inputs.size() != 3 || q.outputs.size() != 1 ||
        q.attr("output_dtype") || q.attr("saturate") || q.attr("axis") || g.is_graph_output(q.outputs[0]))
      continue;
    auto z = g.constant(q.inputs[2]);
    auto s = g.constant(q.inputs[1]);
    if (!z || !s || z->tensor.count != 1 || s->tensor.count != 1 ||
        z->tensor.data_type != static_cast<int32_t>(DataType::Int8))
      continue;
    const auto& uses = g.uses(q.outputs[0]);
    bool pairs = !uses.empty();
    for (const auto& u : uses) {
      const Node& dq = g.nodes()[u.node];
      pairs = pairs && u.slot == 0 && dq.is("DequantizeLinear") && dq.inputs.size() == 3 &&
              dq.inputs[1] == q.inputs[1] && dq.inputs[2] == q.inputs[2] && !dq.attr("axis");
    }
    if (!pairs) continue;
    auto zv = z->tensor.values();
    if (!zv || zv->size() != 1) continue;
    const auto shifted = static_cast<uint8_t>(static_cast<int>((*zv)[0]) + 128);
    const std::string name = model.fresh_name(q.inputs[2] + "_uint8");
    g.add_tensor(name, graph::encode_tensor(name, static_cast<int32_t>(DataType::Uint8), z->tensor.dims,
                                            std::string(1, static_cast<char>(shifted))));
    const std::string old = q.inputs[2];
    const auto readers = uses;  // a copy: the edits below change the index
    g.set_input(static_cast<int>(i), 2, name);
    for (const auto& u : readers) g.set_input(u.node, 2, name);
    g.remove_value_info(q.outputs[0]);  // its element type changes
    g.drop_if_unused(old);
    ++changed;
  }
  return changed;
}

}  // namespace qdqfold::targets
