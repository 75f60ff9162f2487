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
#include "folds/folds.h"
#include "folds/directions/forward/padding_correction.h"

namespace qdqfold::folds {

Outcome fold_conv_bn(FoldContext& ctx, int bn) {
  graph::Graph& g = ctx.graph;
  const int layer = batchnorm_input_producer(g, bn);
  if (layer < 0 || !(g.nodes[layer].is("Conv") || g.nodes[layer].is("ConvTranspose"))) return Outcome::not_applicable();

  auto weight_or = read_float_weight(ctx, layer);
  if (auto* o = std::get_if<Outcome>(&weight_or)) return *o;
  const FloatWeight& weight = std::get<FloatWeight>(weight_or);
  const graph::Node& conv = g.nodes[layer];
  if (conv.outputs.size() != 1) return Outcome::kept(Reason::Malformed, conv.op_type + " has more than one output");
  if (auto blocked = layer_output_blocker(g, layer, conv.outputs[0], bn)) return *blocked;
  // A layer no runtime accepts (strides 0, pads of the wrong length, ...) is not folded into.
  auto geometry = read_conv_geometry(conv, weight.tensor.dims);
  if (auto* o = std::get_if<Outcome>(&geometry)) return *o;

  const std::string bias_name = conv.inputs.size() > 2 ? conv.inputs[2] : "";
  auto bias_or = read_bias(g, bias_name, weight.layout.out_channels, "bias");
  if (auto* o = std::get_if<Outcome>(&bias_or)) return *o;
  const auto& bias = std::get<std::vector<double>>(bias_or);

  auto affine_or = read_batchnorm(ctx, bn);
  if (auto* o = std::get_if<Outcome>(&affine_or)) return *o;
  const BatchNormAffine& affine = std::get<BatchNormAffine>(affine_or);

  auto new_weight = rescale_weight(ctx, weight, affine.scale);
  if (auto* o = std::get_if<Outcome>(&new_weight)) return *o;
  std::vector<double> folded_bias(bias.size());
  for (size_t o = 0; o < bias.size(); ++o) folded_bias[o] = affine.scale[o] * bias[o] + affine.shift[o];
  auto new_bias = store_or_keep(weight.tensor.data_type, folded_bias, "bias");
  if (auto* o = std::get_if<Outcome>(&new_bias)) return *o;

  // Every condition holds: edit.
  Outcome out;
  out.verdict = Verdict::Folded;
  out.code = code(FoldName::ConvBn);
  out.into = {conv.display_name(layer)};
  out.into_op = conv.op_type;
  out.message = "folded into " + conv.op_type + " '" + out.into[0] + "': W' = a * W per output channel, b' = a * b + t";
  const std::string layer_name = conv.name.empty() ? conv.outputs[0] : conv.name;
  const int32_t dtype = weight.tensor.data_type;
  const std::vector<int64_t> weight_dims = weight.tensor.dims;
  write_layer_input(ctx, layer, 1, dtype, weight_dims, std::move(std::get<graph::LazyBytes>(new_weight)), layer_name + "_W", out);
  write_layer_input(ctx, layer, 2, dtype, {weight.layout.out_channels}, std::get<std::string>(new_bias),
                    layer_name + "_B", out);
  take_over_batchnorm_output(g, layer, 0, bn, affine);
  return out;
}

}  // namespace qdqfold::folds
