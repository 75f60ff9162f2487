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
#include "folds/layer_kinds.h"
#include "folds/expected.h"
#include "folds/common/conv_geometry.h"

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

std::string describe(const Graph& g, int node) { return g.nodes()[node].op_type + " '" + g.nodes()[node].display_name(node) + "'"; }

// ---------------------------------------------------------------- select

// The Concat the BN reads, when every one of its inputs comes out of a convolution.
std::optional<int> select_concat_bn(Graph& g, int bn) {
  const int concat = batchnorm_input_producer(g, bn);
  if (concat < 0 || !g.nodes()[concat].is("Concat") || g.nodes()[concat].outputs.size() != 1) return std::nullopt;
  const std::vector<std::string>& inputs = g.nodes()[concat].inputs;
  if (inputs.empty()) return std::nullopt;
  for (const auto& in : inputs) {
    const int p = g.producer(in);
    if (p < 0 || !is_spatial_layer(g.nodes()[p])) return std::nullopt;
  }
  return concat;
}

// ---------------------------------------------------------------- plan

struct ConcatBnPlan {
  BatchNormAffine affine;
  std::vector<SlicePlan> slices;
};

// Slice `i` (input i of the Concat, channels [offset, offset + C_i) of the BN), or nullopt when the BN has
// fewer channels left than the producer makes (reported by the caller).
Expected<std::optional<SlicePlan>> plan_slice(FoldContext& ctx, int concat, size_t i, int64_t offset,
                                              const BatchNormAffine& affine) {
  Graph& g = ctx.graph;
  const int layer = g.producer(g.nodes()[concat].inputs[i]);
  const std::string who = describe(g, layer);
  // NotApplicable: a quantized weight, and the QDQ fold does not go through a Concat.
  QDQFOLD_TRY(weight, if_not_applicable(read_float_weight(ctx, layer), [&] {
                return Outcome::kept(Reason::ConcatQuantizedLayer, who + " feeds the Concat through a quantized "
                                                                   "weight; BN folds through a Concat into float weights only");
              }));
  const Node& conv = g.nodes()[layer];
  if (conv.outputs.size() != 1) return Outcome::kept(Reason::Malformed, who + " has more than one output");
  QDQFOLD_CHECK(layer_output_blocker(g, layer, conv.outputs[0], concat, static_cast<int>(i)));
  QDQFOLD_TRY(geometry, read_conv_geometry(conv, weight.tensor.dims));
  (void)geometry;
  if (i == 0) {
    const auto rank = static_cast<int64_t>(weight.tensor.dims.size());
    int64_t axis = g.nodes()[concat].attr_int("axis", 1);
    if (axis < 0) axis += rank;
    if (axis != 1)
      return Outcome::kept(Reason::ChannelAxisMismatch, describe(g, concat) + " joins axis " +
                                                            std::to_string(g.nodes()[concat].attr_int("axis", 1)) +
                                                            ", not the channels BN normalizes");
  }
  const int64_t channels = weight.layout.out_channels;
  if (offset + channels > static_cast<int64_t>(affine.scale.size())) return std::optional<SlicePlan>();
  const std::vector<double> scale(affine.scale.begin() + offset, affine.scale.begin() + offset + channels);
  const std::vector<double> shift(affine.shift.begin() + offset, affine.shift.begin() + offset + channels);
  const std::string bias_name = conv.inputs.size() > 2 ? conv.inputs[2] : "";
  QDQFOLD_TRY(bias, read_bias(g, bias_name, channels, "bias"));
  QDQFOLD_TRY(new_weight, rescale_weight(ctx, weight, scale));
  std::vector<double> folded_bias(bias.size());
  for (size_t o = 0; o < bias.size(); ++o) folded_bias[o] = scale[o] * bias[o] + shift[o];
  QDQFOLD_TRY(new_bias, store_or_keep(weight.tensor.data_type, folded_bias, "bias"));
  return std::optional<SlicePlan>(
      SlicePlan{layer, weight.tensor.data_type, weight.tensor.dims, channels, std::move(new_weight), std::move(new_bias)});
}

Expected<ConcatBnPlan> plan_concat_bn(FoldContext& ctx, int concat, int bn) {
  Graph& g = ctx.graph;
  QDQFOLD_CHECK(layer_output_blocker(g, concat, g.nodes()[concat].outputs[0], bn));
  ConcatBnPlan plan;
  QDQFOLD_TRY(affine, read_batchnorm(ctx, bn));
  plan.affine = std::move(affine);
  const size_t inputs = g.nodes()[concat].inputs.size();
  int64_t offset = 0;
  for (size_t i = 0; i < inputs; ++i) {
    QDQFOLD_TRY(slice, plan_slice(ctx, concat, i, offset, plan.affine));
    if (!slice) break;  // more channels than the BN has: reported below
    offset += slice->channels;
    plan.slices.push_back(std::move(*slice));
  }
  if (plan.slices.size() != inputs || offset != static_cast<int64_t>(plan.affine.scale.size()))
    return Outcome::kept(Reason::ShapeMismatch, "the Concat's inputs have " +
                                                    std::string(plan.slices.size() != inputs ? "more" : std::to_string(offset)) +
                                                    " channels but the BN has " + std::to_string(plan.affine.scale.size()));
  return plan;
}

// ---------------------------------------------------------------- apply

Outcome apply_concat_bn(FoldContext& ctx, int concat, int bn, ConcatBnPlan& plan) {
  Graph& g = ctx.graph;
  Outcome out = Outcome::folded(FoldName::ConcatBn);
  std::vector<std::string> ops;
  for (const auto& p : plan.slices) ops.push_back(g.nodes()[p.layer].op_type);
  out.into_op = join_op_types(ops);  // each op once, in the table's order
  for (auto& p : plan.slices) {
    const Node& conv = g.nodes()[p.layer];
    out.into.push_back(conv.display_name(p.layer));
    const std::string layer_name = conv.name.empty() ? conv.outputs[0] : conv.name;
    write_layer_input(ctx, p.layer, 1, p.dtype, p.weight_dims, std::move(p.weight), layer_name + "_W", out);
    write_layer_input(ctx, p.layer, 2, p.dtype, {p.channels}, p.bias, layer_name + "_B", out);
  }
  out.message = "folded slice by slice into the " + std::to_string(plan.slices.size()) + " layers the Concat joins: "
                "W'_i = a[slice i] * W_i per output channel, b'_i = a * b_i + t";
  take_over_batchnorm_output(g, concat, 0, bn, plan.affine);
  return out;
}

}  // namespace

Outcome fold_concat_bn(FoldContext& ctx, int bn) {
  const std::optional<int> concat = select_concat_bn(ctx.graph, bn);
  if (!concat) return Outcome::not_applicable();
  QDQFOLD_TRY(plan, plan_concat_bn(ctx, *concat, bn));
  return apply_concat_bn(ctx, *concat, bn, plan);
}

}  // namespace qdqfold::folds
