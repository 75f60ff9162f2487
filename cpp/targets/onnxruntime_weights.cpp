// integer-weight (target onnxruntime): a constant float weight behind its own QuantizeLinear is stored as the
// integers that QuantizeLinear makes.
//
//   before:  W (float32) -> QuantizeLinear(s, z, axis) -> q -> DequantizeLinear(s, z, axis) -> layer
//   after:   q (int8 / uint8 / ...) -> DequantizeLinear(s, z, axis) -> layer
//
// q = clamp(round_half_even(fl32(W / s)) + z), computed by kernels::quantize_element exactly as onnxruntime's
// QuantizeLinear does (float32 division, then rounding), so the DequantizeLinear reads the same integers and the
// layer the same weight: exact, bit for bit. A quarter of the bytes; runtimes that want stored integers get them.
// The layers whose BN was folded got theirs from the fold (materialize_quantized_weights, which the target
// turns on). Left alone: a float16 / bfloat16 weight or scale (onnxruntime's float16 division is not modelled),
// a weight or a quantized value read elsewhere, blocked quantization, float8 outputs.
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "graph/tensor.h"
#include "kernels/quantized.h"
#include "targets/onnxruntime.h"

namespace qdqfold::targets {

using graph::Graph;
using graph::Node;
using wire::DataType;

namespace {

bool only_read_by(const Graph& g, const std::string& value, int node) {
  const auto& uses = g.uses(value);
  return !g.is_graph_output(value) && uses.size() == 1 && uses[0].node == node && uses[0].slot >= 0;
}

// A per-tensor (count 1) or per-axis (count = dims[axis]) parameter's layout over a tensor of `dims`: the
// number of channels along the axis and the elements within one, so element i is in channel (i / inner) %
// channels. None when the axis or the count does not fit the tensor.
std::optional<std::pair<int64_t, int64_t>> axis_layout(const std::vector<int64_t>& dims, int64_t axis, size_t count) {
  int64_t inner = 1, channels = 1;
  if (count > 1) {
    if (axis < 0) axis += static_cast<int64_t>(dims.size());
    if (axis < 0 || axis >= static_cast<int64_t>(dims.size()) || dims[axis] != static_cast<int64_t>(count))
      return std::nullopt;
    channels = dims[axis];
    for (size_t d = static_cast<size_t>(axis) + 1; d < dims.size(); ++d) inner *= dims[d];
  }
  return std::pair{channels, inner};
}

}  // namespace

// Stores layer `layer`'s weight as integers where that is exact; notes it in `record`.
void store_integer_weight(graph::Model& model, Graph& g, int layer, BatchNormRecord& record) {
  if (g.nodes()[layer].inputs.size() < 2) return;
  const int dq = g.producer(g.nodes()[layer].inputs[1]);
  if (dq < 0 || !g.nodes()[dq].is("DequantizeLinear") || g.nodes()[dq].inputs.size() < 2) return;
  const int q = g.producer(g.nodes()[dq].inputs[0]);
  if (q < 0 || !g.nodes()[q].is("QuantizeLinear") || g.nodes()[q].inputs.size() < 2) return;
  const Node& qn = g.nodes()[q];
  if (qn.attr_int("block_size", 0) != 0 || qn.outputs.size() != 1 || !only_read_by(g, qn.outputs[0], dq)) return;
  const std::string w_name = qn.inputs[0];
  auto w = g.constant(w_name);
  auto s = g.constant(qn.inputs[1]);
  const std::string z_name = qn.inputs.size() > 2 ? qn.inputs[2] : "";
  auto z = z_name.empty() ? std::nullopt : g.constant(z_name);
  const auto f32 = static_cast<int32_t>(DataType::Float);
  if (!w || !s || (!z_name.empty() && !z) || w->tensor.data_type != f32 || s->tensor.data_type != f32) return;
  if (!only_read_by(g, w_name, q)) return;
  const int32_t type = z ? z->tensor.data_type
                         : static_cast<int32_t>(qn.attr_int("output_dtype", static_cast<int64_t>(DataType::Uint8)));
  auto range = kernels::integer_range(type);
  if (!range || type == static_cast<int32_t>(DataType::Int32)) return;
  auto wv = w->tensor.values();
  auto sv = s->tensor.values();
  std::optional<std::vector<double>> zv = z ? z->tensor.values() : std::vector<double>{0.0};
  if (!wv || !sv || !zv || sv->size() != zv->size() || sv->empty()) return;
  const auto& dims = w->tensor.dims;
  const auto layout = axis_layout(dims, qn.attr_int("axis", 1), sv->size());
  if (!layout) return;
  const auto [channels, inner] = *layout;
  std::vector<int64_t> ints(wv->size());
  for (size_t i = 0; i < wv->size(); ++i) {
    const size_t c = channels > 1 ? static_cast<size_t>((static_cast<int64_t>(i) / inner) % channels) : 0;
    ints[i] = kernels::quantize_element(static_cast<float>((*wv)[i]), static_cast<float>((*sv)[c]),
                                        static_cast<int64_t>((*zv)[c]), *range);
  }
  const std::string name = model.fresh_name(w_name + "_quantized");
  g.add_tensor(name, graph::encode_tensor(name, type, dims, kernels::write_quantized(ints, type)));
  const std::string q_output = g.nodes()[q].outputs[0];
  g.set_input(dq, 0, name);
  g.remove_node(q);
  g.remove_value_info(q_output);
  g.drop_if_unused(w_name);
  record.new_tensors.push_back(name);
  record.metrics.emplace_back("weight_stored_as_integers", 1.0);
  record.message += "; its float weight behind QuantizeLinear stored as the " +
                    std::string(graph::data_type_name(type)) + " integers it quantizes to (exact)";
}

}  // namespace qdqfold::targets

// float-weight (target onnxruntime, store_float_weights): a layer onnxruntime will run in float reads its weight
// as the float constant its DequantizeLinear computes, instead of running that DQ on every inference
// (onnxruntime's constant folding skips DequantizeLinear).
//
//   before:  q (int8 / uint8 / int16 / uint16 constant) -> DequantizeLinear(s, z, axis) -> W -> layer (float)
//   after:   W (float32 constant) -> layer
//
// W[i] = fl32(float(q[i] - z[c]) * s[c]): the int32 difference converted to float32 (exact: |q - z| < 2^24),
// times the float32 scale, one rounding: what onnxruntime's DequantizeLinear computes, bit for bit. Only a float32
// scale, no block_size, a DQ read by this layer alone.
namespace qdqfold::targets {

void store_float_weight(graph::Model& model, Graph& g, int layer, BatchNormRecord& record) {
  if (g.nodes()[layer].inputs.size() < 2) return;
  const std::string w_name = g.nodes()[layer].inputs[1];
  const int dq = g.producer(w_name);
  if (dq < 0 || !g.nodes()[dq].is("DequantizeLinear") || g.nodes()[dq].inputs.size() < 2) return;
  const Node& dn = g.nodes()[dq];
  if (dn.attr_int("block_size", 0) != 0 || dn.outputs.size() != 1 || !only_read_by(g, w_name, layer)) return;
  auto q = g.constant(dn.inputs[0]);
  auto s = g.constant(dn.inputs[1]);
  const std::string z_name = dn.inputs.size() > 2 ? dn.inputs[2] : "";
  auto z = z_name.empty() ? std::nullopt : g.constant(z_name);
  if (!q || !s || (!z_name.empty() && !z) || s->tensor.data_type != static_cast<int32_t>(DataType::Float)) return;
  const auto t = static_cast<DataType>(q->tensor.data_type);
  if (t != DataType::Int8 && t != DataType::Uint8 && t != DataType::Int16 && t != DataType::Uint16) return;
  auto qv = q->tensor.values();
  auto sv = s->tensor.values();
  std::optional<std::vector<double>> zv = z ? z->tensor.values() : std::vector<double>{0.0};
  if (!qv || !sv || !zv || sv->empty() || (zv->size() != sv->size() && zv->size() != 1)) return;
  const auto& dims = q->tensor.dims;
  const auto layout = axis_layout(dims, dn.attr_int("axis", 1), sv->size());
  if (!layout) return;
  const auto [channels, inner] = *layout;
  std::string raw(qv->size() * sizeof(float), '\0');
  for (size_t i = 0; i < qv->size(); ++i) {
    const size_t c = channels > 1 ? static_cast<size_t>((static_cast<int64_t>(i) / inner) % channels) : 0;
    const auto n = static_cast<int32_t>((*qv)[i]) - static_cast<int32_t>((*zv)[zv->size() > 1 ? c : 0]);
    const float v = static_cast<float>(n) * static_cast<float>((*sv)[c]);
    std::memcpy(raw.data() + i * sizeof(float), &v, sizeof(float));
  }
  const std::string name = model.fresh_name(w_name + "_float");
  g.add_tensor(name, graph::encode_tensor(name, static_cast<int32_t>(DataType::Float), dims, raw));
  const std::string q_name = dn.inputs[0];
  g.set_input(layer, 1, name);
  g.remove_node(dq);
  g.remove_value_info(w_name);
  g.drop_if_unused(q_name);
  record.new_tensors.push_back(name);
  record.metrics.emplace_back("weight_stored_as_float", 1.0);
  record.message += "; its weight stored as the float32 constant its DequantizeLinear computes (exact, "
                    "store_float_weights): the layer runs in float, and no DequantizeLinear runs per inference";
}

}  // namespace qdqfold::targets
