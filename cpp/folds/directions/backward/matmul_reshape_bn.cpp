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
#include "folds/expected.h"
#include "folds/common/values.h"
#include "folds/edits.h"

namespace qdqfold::folds {

namespace {

using graph::Graph;
using graph::Node;

// Kept unless `reshape` maps the MatMul output [.., F] to [rows, F] with F its axis 1.
std::optional<Outcome> require_feature_axis_kept(Graph& g, int reshape, const std::string& matmul_output,
                                                 const std::string& matmul_input, int64_t features) {
  const Node& r = g.nodes()[reshape];
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

// ---------------------------------------------------------------- select

struct MatmulReshapeMatch {
  int reshape = -1;  // the Flatten / Reshape the BN reads
  int matmul = -1;
  int add = -1;      // Linear with a bias: MatMul -> Add(constant c) -> reshape, and the Add's slot of c
  int bias_slot = -1;
};

std::optional<MatmulReshapeMatch> select_matmul_reshape_bn(Graph& g, int bn) {
  MatmulReshapeMatch m;
  m.reshape = batchnorm_input_producer(g, bn);
  if (m.reshape < 0 || !(g.nodes()[m.reshape].is("Flatten") || g.nodes()[m.reshape].is("Reshape"))) return std::nullopt;
  if (g.nodes()[m.reshape].inputs.empty() || g.nodes()[m.reshape].outputs.size() != 1) return std::nullopt;
  m.matmul = g.producer(g.nodes()[m.reshape].inputs[0]);
  if (m.matmul >= 0)
    if (const auto ma = select_matmul_add(g, m.matmul)) {
      m.add = ma->add;
      m.bias_slot = ma->bias_slot;
      m.matmul = ma->matmul;
    }
  if (m.matmul < 0 || !g.nodes()[m.matmul].is("MatMul")) return std::nullopt;
  const auto& in = g.nodes()[m.matmul].inputs;
  if (in.size() >= 2 && !in[1].empty() && produced_by_dequantize(g, in[1])) return std::nullopt;  // qdq-layer-bn's
  return m;
}

// ---------------------------------------------------------------- plan

struct MatmulReshapePlan {
  FloatWeight weight;
  BatchNormAffine affine;
  graph::LazyBytes new_weight;
  FoldedBias bias;         // with an Add: c' = a * c + t
  std::string bias_raw;
  int32_t bias_type = 0;
  std::string shift_raw;   // without: t, added after the MatMul ("" when t = 0)
};

Expected<MatmulReshapePlan> plan_matmul_reshape_bn(FoldContext& ctx, const MatmulReshapeMatch& mt, int bn) {
  Graph& g = ctx.graph;
  MatmulReshapePlan plan;
  QDQFOLD_TRY(weight, read_float_weight(ctx, mt.matmul));
  plan.weight = std::move(weight);
  const Node& m = g.nodes()[mt.matmul];
  if (m.outputs.size() != 1 || m.inputs.size() != 2) return Outcome::kept(Reason::Malformed, "MatMul has an unexpected arity");
  const std::string feature_map = mt.add >= 0 ? g.nodes()[mt.add].outputs[0] : m.outputs[0];  // what the reshape reads
  if (mt.add >= 0) {
    QDQFOLD_CHECK(layer_output_blocker(g, mt.matmul, m.outputs[0], mt.add, 1 - mt.bias_slot));
    QDQFOLD_CHECK(layer_output_blocker(g, mt.add, feature_map, mt.reshape, 0));
  } else {
    QDQFOLD_CHECK(layer_output_blocker(g, mt.matmul, m.outputs[0], mt.reshape, 0));
  }
  QDQFOLD_CHECK(layer_output_blocker(g, mt.reshape, g.nodes()[mt.reshape].outputs[0], bn));
  const int64_t features = plan.weight.layout.out_channels;
  QDQFOLD_CHECK(require_feature_axis_kept(g, mt.reshape, feature_map, m.inputs[0], features));
  QDQFOLD_TRY(affine, read_batchnorm(ctx, bn));
  plan.affine = std::move(affine);
  if (static_cast<int64_t>(plan.affine.scale.size()) != features)
    return Outcome::kept(Reason::ShapeMismatch, "the BN has " + std::to_string(plan.affine.scale.size()) +
                                                    " channels but the MatMul has " + std::to_string(features) +
                                                    " output features");
  QDQFOLD_TRY(new_weight, rescale_weight(ctx, plan.weight, plan.affine.scale));
  plan.new_weight = std::move(new_weight);
  plan.bias_type = plan.weight.tensor.data_type;
  if (mt.add >= 0) {  // the bias Add takes a * c + t
    const std::string& name = g.nodes()[mt.add].inputs[mt.bias_slot];
    auto values = constant_values(g, name);
    auto dims = constant_dims(g, name);
    if (!values || !dims) return Outcome::kept(Reason::NonConstantBias, "the bias '" + name + "' is not a constant");
    if (auto ref = g.constant(name); ref && graph::is_float_type(ref->tensor.data_type)) plan.bias_type = ref->tensor.data_type;
    QDQFOLD_TRY(folded, fold_bias(dims, *values, plan.affine.scale, plan.affine.shift, "the bias '" + name + "'"));
    plan.bias = std::move(folded);
    QDQFOLD_TRY(raw, store_or_keep(plan.bias_type, plan.bias.values, "bias"));
    plan.bias_raw = std::move(raw);
  } else if (!plan.affine.zero_shift()) {
    QDQFOLD_TRY(raw, store_or_keep(plan.weight.tensor.data_type, plan.affine.shift, "bias"));
    plan.shift_raw = std::move(raw);
  }
  return plan;
}

// ---------------------------------------------------------------- apply

Outcome apply_matmul_reshape_bn(FoldContext& ctx, const MatmulReshapeMatch& mt, int bn, MatmulReshapePlan& plan) {
  Graph& g = ctx.graph;
  const Node& m = g.nodes()[mt.matmul];
  Outcome out = Outcome::folded(FoldName::MatmulReshapeBn);
  out.into = {m.display_name(mt.matmul)};
  if (mt.add >= 0) out.into.push_back(g.nodes()[mt.add].display_name(mt.add));
  out.into_op = "MatMul";
  out.message = "folded into MatMul '" + out.into[0] + "' through " + describe_node(g, mt.reshape) +
                ": W' = a * W per output column" +
                (mt.add >= 0 ? ", the bias c' = a * c + t" : plan.shift_raw.empty() ? "" : ", t added after the MatMul");
  const std::string base = m.name.empty() ? m.outputs[0] : m.name;
  const int32_t dtype = plan.weight.tensor.data_type;
  const int64_t features = plan.weight.layout.out_channels;
  write_layer_input(ctx, mt.matmul, 1, dtype, plan.weight.tensor.dims, std::move(plan.new_weight), base + "_B", out);
  if (mt.add >= 0) write_layer_input(ctx, mt.add, mt.bias_slot, plan.bias_type, plan.bias.dims, plan.bias_raw, base + "_bias", out);
  if (!plan.shift_raw.empty()) add_constant_after(ctx, mt.matmul, dtype, {features}, plan.shift_raw, "_bn_shift", out);
  take_over_batchnorm_output(g, mt.reshape, 0, bn, plan.affine);
  return out;
}

}  // namespace

Outcome fold_matmul_reshape_bn(FoldContext& ctx, int bn) {
  const std::optional<MatmulReshapeMatch> match = select_matmul_reshape_bn(ctx.graph, bn);
  if (!match) return Outcome::not_applicable();
  QDQFOLD_TRY(plan, plan_matmul_reshape_bn(ctx, *match, bn));
  return apply_matmul_reshape_bn(ctx, *match, bn, plan);
}

}  // namespace qdqfold::folds
