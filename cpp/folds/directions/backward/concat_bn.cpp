// concat-bn: a BatchNormalization after a channel Concat of convolutions (MixNet's mixed depthwise convs), folded
// slice by slice into every producer.
//
//   before:  x_i -> Conv_i(W_i, b_i) -> y_i [N, C_i, ...] -> Concat(axis=1) -> BN(a, t) -> z
//   after:   x_i -> Conv_i(W'_i, b'_i)                     -> Concat(axis=1) -> z
//
//   with off_i = C_0 + ... + C_(i-1):   W'_i[o] = a[off_i + o] * W_i[o],   b'_i[o] = a[off_i + o] * b_i[o] + t[off_i + o]
//
// Every Concat input must be a Conv / ConvTranspose with a float weight whose output only the Concat reads (once),
// and the output channels must add up to BN's; otherwise the BN is kept with the first reason found (nothing is
// edited until every producer can take its slice). Quantized producers are not folded through a Concat.
#include "folds/directions/backward/backward.h"
#include "folds/folds.h"
#include "folds/directions/forward/padding_correction.h"

namespace qdqfold::folds {

namespace {

using graph::Graph;
using graph::Node;

// What one producer takes, computed before any edit.
struct SlicePlan {
  int layer = -1;
  int32_t dtype = 0;
  std::vector<int64_t> weight_dims;
  int64_t channels = 0;
  graph::LazyBytes weight;
  std::string bias;
};

std::string describe(const Graph& g, int node) { return g.nodes[node].op_type + " '" + g.nodes[node].display_name(node) + "'"; }

}  // namespace

Outcome fold_concat_bn(FoldContext& ctx, int bn) {
  Graph& g = ctx.graph;
  const int concat = batchnorm_input_producer(g, bn);
  if (concat < 0 || !g.nodes[concat].is("Concat") || g.nodes[concat].outputs.size() != 1) return Outcome::not_applicable();
  const std::vector<std::string> inputs = g.nodes[concat].inputs;
  if (inputs.empty()) return Outcome::not_applicable();
  // The pattern is ours only when every input comes from a convolution.
  for (const auto& in : inputs) {
    const int p = g.producer(in);
    if (p < 0 || !(g.nodes[p].is("Conv") || g.nodes[p].is("ConvTranspose"))) return Outcome::not_applicable();
  }
  if (auto blocked = layer_output_blocker(g, concat, g.nodes[concat].outputs[0], bn)) return *blocked;

  auto affine_or = read_batchnorm(ctx, bn);
  if (auto* o = std::get_if<Outcome>(&affine_or)) return *o;
  const BatchNormAffine& affine = std::get<BatchNormAffine>(affine_or);

  std::vector<SlicePlan> plans;
  int64_t offset = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int layer = g.producer(inputs[i]);
    const std::string who = describe(g, layer);
    auto weight_or = read_float_weight(ctx, layer);
    if (auto* o = std::get_if<Outcome>(&weight_or)) {
      if (o->verdict == Verdict::NotApplicable)  // a quantized weight: the QDQ fold does not go through a Concat
        return Outcome::kept(Reason::ConcatQuantizedLayer, who + " feeds the Concat through a quantized weight; "
                                                      "BN folds through a Concat into float weights only");
      return *o;
    }
    const FloatWeight& weight = std::get<FloatWeight>(weight_or);
    const Node& conv = g.nodes[layer];
    if (conv.outputs.size() != 1) return Outcome::kept(Reason::Malformed, who + " has more than one output");
    if (auto blocked = layer_output_blocker(g, layer, conv.outputs[0], concat, static_cast<int>(i))) return *blocked;
    auto geometry = read_conv_geometry(conv, weight.tensor.dims);
    if (auto* o = std::get_if<Outcome>(&geometry)) return *o;
    if (i == 0) {
      const auto rank = static_cast<int64_t>(weight.tensor.dims.size());
      int64_t axis = g.nodes[concat].attr_int("axis", 1);
      if (axis < 0) axis += rank;
      if (axis != 1)
        return Outcome::kept(Reason::ChannelAxisMismatch, describe(g, concat) + " joins axis " +
                                                          std::to_string(g.nodes[concat].attr_int("axis", 1)) +
                                                          ", not the channels BN normalizes");
    }
    const int64_t channels = weight.layout.out_channels;
    if (offset + channels > static_cast<int64_t>(affine.scale.size())) break;  // reported below
    const std::vector<double> scale(affine.scale.begin() + offset, affine.scale.begin() + offset + channels);
    const std::vector<double> shift(affine.shift.begin() + offset, affine.shift.begin() + offset + channels);
    const std::string bias_name = conv.inputs.size() > 2 ? conv.inputs[2] : "";
    auto bias_or = read_bias(g, bias_name, channels, "bias");
    if (auto* o = std::get_if<Outcome>(&bias_or)) return *o;
    const auto& bias = std::get<std::vector<double>>(bias_or);
    auto new_weight = rescale_weight(ctx, weight, scale);
    if (auto* o = std::get_if<Outcome>(&new_weight)) return *o;
    std::vector<double> folded_bias(bias.size());
    for (size_t o = 0; o < bias.size(); ++o) folded_bias[o] = scale[o] * bias[o] + shift[o];
    auto new_bias = store_or_keep(weight.tensor.data_type, folded_bias, "bias");
    if (auto* o = std::get_if<Outcome>(&new_bias)) return *o;
    plans.push_back({layer, weight.tensor.data_type, weight.tensor.dims, channels,
                     std::move(std::get<graph::LazyBytes>(new_weight)), std::move(std::get<std::string>(new_bias))});
    offset += channels;
  }
  if (plans.size() != inputs.size() || offset != static_cast<int64_t>(affine.scale.size()))
    return Outcome::kept(Reason::ShapeMismatch, "the Concat's inputs have " + std::string(plans.size() != inputs.size()
                                                                                          ? "more"
                                                                                          : std::to_string(offset)) +
                                               " channels but the BN has " + std::to_string(affine.scale.size()));

  // Every producer can take its slice: edit.
  Outcome out;
  out.verdict = Verdict::Folded;
  out.code = code(FoldName::ConcatBn);
  out.into_op = g.nodes[plans[0].layer].op_type;
  for (auto& p : plans) {
    const Node& conv = g.nodes[p.layer];
    out.into.push_back(conv.display_name(p.layer));
    if (conv.op_type != out.into_op && out.into_op.find(conv.op_type) == std::string::npos) out.into_op += "," + conv.op_type;
    const std::string layer_name = conv.name.empty() ? conv.outputs[0] : conv.name;
    write_layer_input(ctx, p.layer, 1, p.dtype, p.weight_dims, std::move(p.weight), layer_name + "_W", out);
    write_layer_input(ctx, p.layer, 2, p.dtype, {p.channels}, p.bias, layer_name + "_B", out);
  }
  out.message = "folded slice by slice into the " + std::to_string(plans.size()) + " layers the Concat joins: "
                "W'_i = a[slice i] * W_i per output channel, b'_i = a * b_i + t";
  take_over_batchnorm_output(g, concat, 0, bn, affine);
  return out;
}

}  // namespace qdqfold::folds
