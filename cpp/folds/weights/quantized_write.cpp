// Writing a rescaled quantized weight into the graph (quantized_weight.h: write_quantized_weight).
#include <algorithm>

#include "folds/edits.h"
#include "folds/weights/qdq_chain.h"
#include "folds/weights/quantized_weight.h"
#include "folds/sources/batchnorm.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;
using graph::Use;
using wire::DataType;

namespace {

// A parameter's values in the dims the model stores it with (QuantLayout::stored_scale_dims / stored_zero_dims;
// a per-tensor scale made per-channel takes the broadcast shape when it was stored with the weight's rank),
// where the new values still broadcast from them; else in the layout's own dims.
std::pair<std::vector<int64_t>, std::vector<double>> stored_form(const QuantizedWeight& w, const RescaledWeight& r,
                                                                 const std::vector<int64_t>& stored,
                                                                 std::vector<double> values) {
  const QuantLayout& l = r.layout;
  std::vector<int64_t> want = stored;
  if (r.promoted) {
    want.clear();
    if (w.layout.scale_dims.size() == w.dims.size() && w.dims.size() >= 2) want = l.full_dims(w.dims);
  }
  if (want.empty() || l.per_tensor()) return {l.scale_dims, std::move(values)};
  auto from = l.broadcast_dims(want, w.dims);
  auto packed = from ? unbroadcast_values(values, *from, l.full_dims(w.dims)) : std::nullopt;
  if (!packed) return {l.scale_dims, std::move(values)};
  return {want, std::move(*packed)};
}

}  // namespace

void write_quantization_parameter(FoldContext& ctx, const std::vector<int>& nodes, int slot, int32_t data_type,
                                  const std::vector<int64_t>& dims, const std::string& raw, const std::string& base,
                                  Outcome& outcome, bool keep_constant_node) {
  Graph& g = ctx.graph;
  std::vector<std::pair<std::string, std::vector<Use>>> groups;
  for (int n : nodes) {
    const std::string name = slot < static_cast<int>(g.nodes()[n].inputs.size()) ? g.nodes()[n].inputs[slot] : "";
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& p) { return p.first == name; });
    if (it == groups.end()) groups.push_back({name, {Use{n, slot}}});
    else it->second.push_back(Use{n, slot});
  }
  for (const auto& [name, readers] : groups)
    write_constant_for(ctx, readers, name, data_type, dims, raw, base, outcome, keep_constant_node);
}

void write_quantized_weight(FoldContext& ctx, const QuantizedWeight& w, const WeightLayout& wl,
                            const RescaledWeight& r, bool materialize, Outcome& outcome) {
  Graph& g = ctx.graph;
  const Node& d = g.nodes()[w.dq];
  const std::string base = d.name.empty() ? d.outputs[0] : d.name;
  std::vector<int> qdq = {w.dq};
  if (w.qat() && materialize) {
    // int initializer -> DequantizeLinear: the QuantizeLinear goes, its float weight too if nothing else reads it.
    const std::vector<std::string> q_inputs = g.nodes()[w.q].inputs;
    const std::string q_output = g.nodes()[w.q].outputs[0];
    const std::string name = new_tensor_name(ctx.model, q_inputs[0], "_quantized");
    g.add_tensor_lazy(name, graph::encode_tensor_header(name, w.int_type, w.dims), rescaled_weight_data(w, wl, r, true));
    g.set_input(w.clip >= 0 ? w.clip : w.dq, 0, name);
    outcome.new_tensors.push_back(name);
    g.remove_node(w.q);
    g.remove_value_info(q_output);
    for (const auto& v : q_inputs) g.drop_if_unused(v);
  } else if (w.qat()) {
    if (w.q != w.dq) qdq.push_back(w.q);  // trt::DequantizeLinear is its own quantizer
    write_constant_for(ctx, {Use{w.q, 0}}, g.nodes()[w.q].inputs[0], w.float_type, w.dims,
                       rescaled_weight_data(w, wl, r, false), base + "_weight", outcome);
  } else if (r.ints_changed) {  // else the integers stay as they are: not read, not copied
    const int reader = w.clip >= 0 ? w.clip : w.dq;  // the Clip (Brevitas) reads the integers before the DQ
    write_constant_for(ctx, {Use{reader, 0}}, g.nodes()[reader].inputs[0], w.int_type, w.dims,
                       rescaled_weight_data(w, wl, r, true), base + "_weight", outcome);
  }
  const auto [scale_dims, scale] = stored_form(w, r, r.layout.stored_scale_dims, r.scale);
  auto scale_raw = kernels::store_values(w.scale_type, scale);
  write_quantization_parameter(ctx, qdq, 1, w.scale_type, scale_dims, scale_raw ? *scale_raw : std::string(), base + "_scale",
                  outcome);
  bool any_nonzero = std::any_of(r.zero.begin(), r.zero.end(), [](int64_t z) { return z != 0; });
  // The zero point keeps its stored shape while the scale keeps its own; it follows the scale's otherwise.
  const auto& old_scale_dims = w.layout.stored_scale_dims.empty() ? w.layout.scale_dims : w.layout.stored_scale_dims;
  const bool scale_kept_shape = scale_dims == old_scale_dims;
  const auto [zero_dims, zero] =
      stored_form(w, r, w.has_zero && scale_kept_shape ? r.layout.stored_zero_dims : scale_dims,
                  std::vector<double>(r.zero.begin(), r.zero.end()));
  // A zero point is rewritten when its values change, or its shape must follow the scale's.
  const auto& old_zero_dims = w.layout.stored_zero_dims.empty() ? w.layout.scale_dims : w.layout.stored_zero_dims;
  const bool reshaped = !r.layout.per_tensor() && zero_dims != old_zero_dims;
  if ((w.has_zero && (r.zero_changed || reshaped)) || (!w.has_zero && any_nonzero)) {
    write_quantization_parameter(ctx, qdq, 2, w.int_type, zero_dims,
                    kernels::write_quantized(std::vector<int64_t>(zero.begin(), zero.end()), w.int_type),
                    base + "_zero_point", outcome);
  }
  if (r.promoted)
    for (int n : qdq) g.set_int_attribute(n, "axis", r.layout.axis);
}

}  // namespace qdqfold::folds