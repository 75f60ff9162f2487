// conv-bn: a BatchNormalization folded backwards into the Conv or ConvTranspose that produces its input.
//
//   before:  x -> Conv(W, b) -> y -> BatchNormalization(gamma, beta, mean, var) -> z
//   after:   x -> Conv(W', b') -> z
//
//   BN(y)[o] = a[o] * y[o] + t[o],  a = gamma / sqrt(var + eps),  t = beta - mean * a   (in double)
//   W'[o, ...] = a[o] * W[o, ...]   b'[o] = a[o] * b[o] + t[o]   (b = 0 when the Conv has no bias)
//
// Output channel o of the weight: Conv W [M, C/g, k...] on axis 0; ConvTranspose W [C, M/g, k...] on axis 1
// of each group's block of C/g rows, o = group * (M/g) + j (WeightLayout::output_axis). Any rank, any group.
// A weight produced by DequantizeLinear is the QDQ fold's pattern (qdq_*.cpp): not applicable here.
#include "folds/directions/backward/backward.h"
#include "folds/layer_kinds.h"
#include "folds/expected.h"
#include "folds/common/conv_geometry.h"

namespace qdqfold::folds {

namespace {

// select: a Conv / ConvTranspose produces the BN's input, and its weight is not behind DequantizeLinear.
std::optional<int> select_conv_bn(graph::Graph& g, int bn) {
  const int layer = batchnorm_input_producer(g, bn);
  if (layer < 0 || !is_spatial_layer(g.nodes()[layer])) return std::nullopt;
  const auto& in = g.nodes()[layer].inputs;
  if (in.size() >= 2 && !in[1].empty() && produced_by_dequantize(g, in[1])) return std::nullopt;  // qdq-layer-bn's
  return layer;
}

struct ConvBnPlan {
  FloatWeight weight;
  BatchNormAffine affine;
  graph::LazyBytes new_weight;
  std::string new_bias;
};

// plan: every reason to keep the BN, checked before anything is edited.
Expected<ConvBnPlan> plan_conv_bn(FoldContext& ctx, int layer, int bn) {
  graph::Graph& g = ctx.graph;
  ConvBnPlan plan;
  QDQFOLD_TRY(weight, read_float_weight(ctx, layer));
  plan.weight = std::move(weight);
  const graph::Node& conv = g.nodes()[layer];
  if (conv.outputs.size() != 1) return Outcome::kept(Reason::Malformed, conv.op_type + " has more than one output");
  QDQFOLD_CHECK(layer_output_blocker(g, layer, conv.outputs[0], bn));
  // A layer no runtime accepts (strides 0, pads of the wrong length, ...) is not folded into.
  QDQFOLD_TRY(geometry, read_conv_geometry(conv, plan.weight.tensor.dims));
  (void)geometry;
  const std::string bias_name = conv.inputs.size() > 2 ? conv.inputs[2] : "";
  QDQFOLD_TRY(bias, read_bias(g, bias_name, plan.weight.layout.out_channels, "bias"));
  QDQFOLD_TRY(affine, read_batchnorm(ctx, bn));
  plan.affine = std::move(affine);
  QDQFOLD_TRY(new_weight, rescale_weight(ctx, plan.weight, plan.affine.scale));
  plan.new_weight = std::move(new_weight);
  std::vector<double> folded_bias(bias.size());
  for (size_t o = 0; o < bias.size(); ++o) folded_bias[o] = plan.affine.scale[o] * bias[o] + plan.affine.shift[o];
  QDQFOLD_TRY(new_bias, store_or_keep(plan.weight.tensor.data_type, folded_bias, "bias"));
  plan.new_bias = std::move(new_bias);
  return plan;
}

// apply: edits only.
Outcome apply_conv_bn(FoldContext& ctx, int layer, int bn, ConvBnPlan& plan) {
  graph::Graph& g = ctx.graph;
  const graph::Node& conv = g.nodes()[layer];
  Outcome out = Outcome::folded(FoldName::ConvBn);
  out.into = {conv.display_name(layer)};
  out.into_op = conv.op_type;
  out.message = "folded into " + conv.op_type + " '" + out.into[0] + "': W' = a * W per output channel, b' = a * b + t";
  const std::string layer_name = conv.name.empty() ? conv.outputs[0] : conv.name;
  const int32_t dtype = plan.weight.tensor.data_type;
  write_layer_input(ctx, layer, 1, dtype, plan.weight.tensor.dims, std::move(plan.new_weight), layer_name + "_W", out);
  write_layer_input(ctx, layer, 2, dtype, {plan.weight.layout.out_channels}, plan.new_bias, layer_name + "_B", out);
  take_over_batchnorm_output(g, layer, 0, bn, plan.affine);
  return out;
}

}  // namespace

Outcome fold_conv_bn(FoldContext& ctx, int bn) {
  const std::optional<int> layer = select_conv_bn(ctx.graph, bn);
  if (!layer) return Outcome::not_applicable();
  QDQFOLD_TRY(plan, plan_conv_bn(ctx, *layer, bn));
  return apply_conv_bn(ctx, *layer, bn, plan);
}

}  // namespace qdqfold::folds
