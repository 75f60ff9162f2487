// merge-branches, apply: the report entry, then the edits; nothing here can fail (steps.h).
#include "folds/common/values.h"
#include "folds/edits.h"
#include "folds/layer_kinds.h"
#include "folds/merge_branches/steps.h"
#include "folds/weights/float_weight.h"
#include "kernels/quantized.h"

namespace qdqfold::folds::merge {

using graph::Graph;
using graph::Node;

namespace {

// The kept conv's quantized weight becomes the merged one: its integers (or, QAT form, its float weight on the
// new grid), a scale per output channel and zero points of 0, for its own Q/DQ only; axis 0.
void write_requantized(FoldContext& ctx, const QuantizedWeight& w, const MergePlan& plan, const std::string& base,
                       Outcome& out) {
  Graph& g = ctx.graph;
  const int64_t M = plan.weight_dims[0];
  if (w.qat())
    write_constant_for(ctx, {graph::Use{w.q, 0}}, g.nodes()[w.q].inputs[0], w.float_type, plan.weight_dims,
                       plan.weight_raw, base + "_W", out);
  else
    write_constant_for(ctx, {graph::Use{w.dq, 0}}, g.nodes()[w.dq].inputs[0], w.int_type, plan.weight_dims,
                       plan.weight_raw, base + "_Wq", out);
  // Positive finite values of this type (plan_merged_weight rounded them to it): they fit.
  const std::string scale = std::get<std::string>(store_or_keep(w.scale_type, plan.new_scale, "scale"));
  const std::string zero = kernels::write_quantized(std::vector<int64_t>(static_cast<size_t>(M), 0), w.int_type);
  for (int slot : {kWeightScaleInput, kWeightZeroPointInput}) {
    std::vector<int> readers;  // the Q/DQ nodes that read a parameter in this slot
    for (int n : {w.dq, w.q})
      if (n >= 0 && static_cast<int>(g.nodes()[n].inputs.size()) > slot && !g.nodes()[n].inputs[slot].empty())
        readers.push_back(n);
    const bool is_scale = slot == kWeightScaleInput;
    write_quantization_parameter(ctx, readers, slot, is_scale ? w.scale_type : w.int_type, {M}, is_scale ? scale : zero,
                                 base + (is_scale ? "_scale" : "_zero_point"), out, /*keep_constant_node=*/false);
  }
  for (int n : {w.dq, w.q})
    if (n >= 0) g.set_int_attribute(n, "axis", 0);
}

// "merged 3 branches summed by Add 'add' into Conv 'c3' (3x3): ..." and the metrics, read before any edit.
void describe_merge(const Graph& g, const Selection& set, const MergePlan& plan, Outcome& out) {
  const int layer = plan.convs[plan.primary].node;
  out.into = {g.nodes()[layer].display_name(layer)};
  out.into_op = "Conv";
  const std::string K = kernel_text(plan.kernel);
  std::string parts;
  for (const auto& c : plan.convs) {
    parts += std::string(parts.empty() ? "" : ", ") + (c.sign < 0 ? "minus " : "") + describe_node(g, c.node) + " (" +
             kernel_text(c.geometry.kernel) + (c.geometry.kernel == plan.convs[plan.primary].geometry.kernel &&
                                                       kernel_text(c.geometry.kernel) == K
                                                   ? ")"
                                                   : ", zero-padded to " + K + ")");
  }
  for (const auto& id : plan.identities)
    parts += std::string(", ") + (id.sign < 0 ? "minus " : "") +
             (id.bn >= 0 ? "identity " + describe_node(g, id.bn) + " (removed: its factor on the centre tap, its shift in the bias)"
                         : "identity '" + set.x + "' (a centre tap of 1)");
  out.message = "merged " + std::to_string(plan.branches.size()) + " branches summed by " +
                describe_node(g, set.tree[0]) + " into " + describe_node(g, layer) + " (" + K + "): " + parts;
  out.metrics = {{"branches", static_cast<double>(plan.branches.size())},
                 {"convs_removed", static_cast<double>(plan.convs.size() - 1)},
                 {"batchnorms_removed", static_cast<double>(set.identity_batchnorms.size())}};
  if (plan.convs[plan.primary].quantized) {
    out.exact = false;
    out.message += "; the merged weight re-quantized per output channel (requantize_merged): APPROXIMATE, each "
                   "weight moved by at most " + std::to_string(plan.max_change) + " of its new scale";
    out.metrics.push_back({"max_requantization_change", plan.max_change});
  }
}

// The kept conv's weight, bias and (when the kernel grew) kernel_shape, pads and dilations.
void write_kept_conv(FoldContext& ctx, const MergePlan& plan, Outcome& out) {
  Graph& g = ctx.graph;
  const ConvBranch& keep = plan.convs[plan.primary];
  const int layer = keep.node;
  const std::string layer_name = g.nodes()[layer].name.empty() ? g.nodes()[layer].outputs[0] : g.nodes()[layer].name;
  if (keep.quantized) write_requantized(ctx, *keep.quantized, plan, layer_name, out);
  else write_layer_input(ctx, layer, 1, plan.data_type, plan.weight_dims, plan.weight_raw, layer_name + "_W", out);
  write_layer_input(ctx, layer, 2, plan.data_type, {plan.weight_dims[0]}, plan.bias_raw, layer_name + "_B", out);
  if (keep.geometry.kernel == plan.kernel) return;
  if (g.nodes()[layer].attr("kernel_shape")) g.set_ints_attribute(layer, "kernel_shape", plan.kernel);
  std::vector<int64_t> pads = plan.pads_begin;
  pads.insert(pads.end(), plan.pads_end.begin(), plan.pads_end.end());
  g.set_ints_attribute(layer, "pads", pads);
  if (keep.geometry.dilations != plan.dilations) g.set_ints_attribute(layer, "dilations", plan.dilations);
}

}  // namespace

Outcome apply_merge(FoldContext& ctx, const Selection& set, MergePlan& plan) {
  Graph& g = ctx.graph;
  Outcome out = Outcome::folded(FoldName::MergeBranches);
  describe_merge(g, set, plan, out);
  write_kept_conv(ctx, plan, out);
  // The tree, the other convs and the identity BNs go; the kept conv takes the root's output name.
  const int layer = plan.convs[plan.primary].node;
  const std::string root_output = g.nodes()[set.tree[0]].outputs[0];
  std::vector<std::string> dropped_values, dropped_tensors;
  for (int n : set.tree) {
    for (const auto& o : g.nodes()[n].outputs) dropped_values.push_back(o);
    g.remove_node(n);
  }
  for (size_t i = 0; i < plan.convs.size(); ++i) {
    const Node& c = g.nodes()[plan.convs[i].node];
    dropped_values.push_back(c.outputs[0]);
    if (static_cast<int>(i) == plan.primary) continue;
    for (size_t s = 1; s < c.inputs.size(); ++s) dropped_tensors.push_back(c.inputs[s]);
    g.remove_node(plan.convs[i].node);
    if (const auto& q = plan.convs[i].quantized)  // its weight's DequantizeLinear (and QuantizeLinear)
      for (int n : {q->dq, q->q})
        if (n >= 0 && g.reader_count(g.nodes()[n].outputs[0]) == 0 && !g.is_graph_output(g.nodes()[n].outputs[0])) {
          dropped_values.push_back(g.nodes()[n].outputs[0]);
          dropped_tensors.insert(dropped_tensors.end(), g.nodes()[n].inputs.begin(), g.nodes()[n].inputs.end());
          g.remove_node(n);
        }
  }
  for (const auto& id : plan.identities)
    if (id.bn >= 0) {
      dropped_values.push_back(g.nodes()[id.bn].outputs[0]);
      dropped_tensors.insert(dropped_tensors.end(), id.parameters.begin(), id.parameters.end());
      g.remove_node(id.bn);
    }
  g.set_output(layer, 0, root_output);
  for (const auto& v : dropped_values)
    if (v != root_output) g.remove_value_info(v);
  for (const auto& t : dropped_tensors)
    if (!t.empty()) g.drop_if_unused(t);
  return out;
}

}  // namespace qdqfold::folds::merge
