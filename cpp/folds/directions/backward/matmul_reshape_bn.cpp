// matmul-reshape-bn: a BatchNormalization over the features of a MatMul output seen through the Flatten or
// Reshape that makes it 2-D (timm LeViT's Linear -> BatchNorm1d on x.flatten(0, 1)), folded into the MatMul.
//
//   before:  x [.., N, K] -> MatMul(W [K, F]) [-> Add(c)] -> m [.., N, F] -> Flatten(axis = rank - 1) | Reshape([r, F]) -> BN -> z
//   after:   x             -> MatMul(W')      -> Add(t | c')                -> Flatten | Reshape                     -> z
//
//   BN(y)[j] = a[j] * y[j] + t[j] over feature j = the last axis of m (the reshape keeps it as axis 1), so
//   W'[., j] = a[j] * W[., j],   a bias Add's c'[j] = a[j] * c[j] + t[j], and without one the shift t becomes an
//   Add of t [F] after the MatMul (none when t = 0).
//
// The reshape must keep the feature axis: Flatten with axis = rank(m) - 1, or Reshape to a constant [r, F]
// (F explicit) of an input whose last axis is F; else the BN is kept ("reshape-moves-features"). The MatMul's
// output must be read only by the reshape and the reshape's only by the BN. A weight produced by
// DequantizeLinear is the QDQ fold's pattern: not applicable here.
#include "folds/directions/backward/backward.h"
#include "folds/folds.h"
#include "folds/directions/forward/forward.h"

namespace qdqfold::folds {

namespace {

using graph::Graph;
using graph::Node;

// Kept unless `reshape` maps the MatMul output [.., F] to [rows, F] with F its axis 1.
std::optional<Outcome> require_feature_axis_kept(Graph& g, int reshape, const std::string& matmul_output,
                                                 const std::string& matmul_input, int64_t features) {
  const Node& r = g.nodes[reshape];
  const std::string who = describe_node(g, reshape);
  std::optional<size_t> rank = known_rank(g, matmul_output);
  if (!rank) rank = known_rank(g, matmul_input);  // with a 2-D weight, MatMul keeps its input's rank
  if (r.is("Flatten")) {
    if (!rank)
      return Outcome::kept(Reason::UnknownRank, "the rank of the MatMul output '" + matmul_output + "' is unknown, so it "
                                           "is not known whether " + who + " keeps its features on axis 1");
    int64_t axis = r.attr_int("axis", 1);
    if (axis < 0) axis += static_cast<int64_t>(*rank);
    if (axis != static_cast<int64_t>(*rank) - 1)
      return Outcome::kept(Reason::ReshapeMovesFeatures, who + " (axis " + std::to_string(r.attr_int("axis", 1)) +
                                                         ") does not keep the MatMul's features on axis 1");
    return std::nullopt;
  }
  if (r.inputs.size() < 2) return Outcome::kept(Reason::Malformed, who + " has no shape input");
  auto shape = constant_values(g, r.inputs[1]);
  if (!shape)
    return Outcome::kept(Reason::ReshapeMovesFeatures, "the shape of " + who + " is not a constant, so it is not "
                                                   "known to keep the MatMul's features on axis 1");
  if (shape->size() != 2 || (*shape)[1] != static_cast<double>(features) || (*shape)[0] == 0)
    return Outcome::kept(Reason::ReshapeMovesFeatures, who + " does not reshape to [rows, " + std::to_string(features) +
                                                   "], so BN's axis 1 is not the MatMul's features");
  return std::nullopt;
}

}  // namespace

Outcome fold_matmul_reshape_bn(FoldContext& ctx, int bn) {
  Graph& g = ctx.graph;
  const int reshape = batchnorm_input_producer(g, bn);
  if (reshape < 0 || !(g.nodes[reshape].is("Flatten") || g.nodes[reshape].is("Reshape"))) return Outcome::not_applicable();
  if (g.nodes[reshape].inputs.empty() || g.nodes[reshape].outputs.size() != 1) return Outcome::not_applicable();
  int matmul = g.producer(g.nodes[reshape].inputs[0]);
  // Linear with a bias: MatMul -> Add(constant c) -> reshape.
  int add = -1, bias_slot = -1;
  if (matmul >= 0 && g.nodes[matmul].is("Add") && g.nodes[matmul].inputs.size() == 2 && g.nodes[matmul].outputs.size() == 1) {
    for (int s = 0; s < 2 && add < 0; ++s) {
      const int p = g.producer(g.nodes[matmul].inputs[s]);
      if (p >= 0 && g.nodes[p].is("MatMul") && constant_dims(g, g.nodes[matmul].inputs[1 - s])) {
        add = matmul;
        bias_slot = 1 - s;
        matmul = p;
      }
    }
  }
  if (matmul < 0 || !g.nodes[matmul].is("MatMul")) return Outcome::not_applicable();

  auto weight_or = read_float_weight(ctx, matmul);
  if (auto* o = std::get_if<Outcome>(&weight_or)) return *o;
  const FloatWeight& weight = std::get<FloatWeight>(weight_or);
  const Node& m = g.nodes[matmul];
  if (m.outputs.size() != 1 || m.inputs.size() != 2) return Outcome::kept(Reason::Malformed, "MatMul has an unexpected arity");
  const std::string feature_map = add >= 0 ? g.nodes[add].outputs[0] : m.outputs[0];  // what the reshape reads
  if (add >= 0) {
    if (auto blocked = layer_output_blocker(g, matmul, m.outputs[0], add, 1 - bias_slot)) return *blocked;
    if (auto blocked = layer_output_blocker(g, add, feature_map, reshape, 0)) return *blocked;
  } else if (auto blocked = layer_output_blocker(g, matmul, m.outputs[0], reshape, 0)) {
    return *blocked;
  }
  if (auto blocked = layer_output_blocker(g, reshape, g.nodes[reshape].outputs[0], bn)) return *blocked;
  const int64_t features = weight.layout.out_channels;
  if (auto moved = require_feature_axis_kept(g, reshape, feature_map, m.inputs[0], features)) return *moved;

  auto affine_or = read_batchnorm(ctx, bn);
  if (auto* o = std::get_if<Outcome>(&affine_or)) return *o;
  const BatchNormAffine& affine = std::get<BatchNormAffine>(affine_or);
  if (static_cast<int64_t>(affine.scale.size()) != features)
    return Outcome::kept(Reason::ShapeMismatch, "the BN has " + std::to_string(affine.scale.size()) + " channels but the "
                                           "MatMul has " + std::to_string(features) + " output features");
  auto new_weight = rescale_weight(ctx, weight, affine.scale);
  if (auto* o = std::get_if<Outcome>(&new_weight)) return *o;
  FoldedBias bias;
  std::string bias_raw;
  int32_t bias_type = weight.tensor.data_type;
  if (add >= 0) {  // the bias Add takes a * c + t
    const std::string& name = g.nodes[add].inputs[bias_slot];
    auto values = constant_values(g, name);
    auto dims = constant_dims(g, name);
    if (!values || !dims) return Outcome::kept(Reason::NonConstantBias, "the bias '" + name + "' is not a constant");
    if (auto ref = g.constant(name); ref && graph::is_float_type(ref->tensor.data_type)) bias_type = ref->tensor.data_type;
    auto folded_or = fold_bias(dims, *values, affine.scale, affine.shift, "the bias '" + name + "'");
    if (auto* o = std::get_if<Outcome>(&folded_or)) return *o;
    bias = std::move(std::get<FoldedBias>(folded_or));
    auto raw = store_or_keep(bias_type, bias.values, "bias");
    if (auto* o = std::get_if<Outcome>(&raw)) return *o;
    bias_raw = std::move(std::get<std::string>(raw));
  }
  std::string shift_raw;
  if (add < 0 && !affine.zero_shift()) {
    auto raw = store_or_keep(weight.tensor.data_type, affine.shift, "bias");
    if (auto* o = std::get_if<Outcome>(&raw)) return *o;
    shift_raw = std::move(std::get<std::string>(raw));
  }

  // Every condition holds: edit.
  Outcome out;
  out.verdict = Verdict::Folded;
  out.code = code(FoldName::MatmulReshapeBn);
  out.into = {m.display_name(matmul)};
  if (add >= 0) out.into.push_back(g.nodes[add].display_name(add));
  out.into_op = "MatMul";
  out.message = "folded into MatMul '" + out.into[0] + "' through " + describe_node(g, reshape) +
                ": W' = a * W per output column" +
                (add >= 0 ? ", the bias c' = a * c + t" : shift_raw.empty() ? "" : ", t added after the MatMul");
  const std::string base = m.name.empty() ? m.outputs[0] : m.name;
  const int32_t dtype = weight.tensor.data_type;
  const std::vector<int64_t> weight_dims = weight.tensor.dims;
  write_layer_input(ctx, matmul, 1, dtype, weight_dims, std::move(std::get<graph::LazyBytes>(new_weight)), base + "_B", out);
  if (add >= 0) write_layer_input(ctx, add, bias_slot, bias_type, bias.dims, bias_raw, base + "_bias", out);
  if (!shift_raw.empty()) add_constant_after(ctx, matmul, dtype, {features}, shift_raw, "_bn_shift", out);
  take_over_batchnorm_output(g, reshape, 0, bn, affine);
  return out;
}

}  // namespace qdqfold::folds
