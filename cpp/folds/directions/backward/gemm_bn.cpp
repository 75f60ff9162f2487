// gemm-bn: a BatchNormalization over the features of a 2-D [N, F] output (BatchNorm1d after Linear) folded
// backwards into the Gemm, MatMul or MatMul + Add that produces it.
//
//   Gemm:         x -> Gemm(B, C; alpha, beta) -> BN -> z      =>  x -> Gemm(B', C'; alpha, beta = 1) -> z
//   MatMul:       x -> MatMul(B) -> BN -> z                    =>  x -> Gemm(B', C' = t) -> z
//   MatMul + Add: x -> MatMul(B) -> Add(c) -> BN -> z          =>  x -> MatMul(B') -> Add(c') -> z
//
//   BN(y)[j] = a[j] * y[j] + t[j] for output feature j, and Gemm's y = alpha * A.B + beta * C, so
//   B'[., j] = a[j] * B[., j]   (B[j, .] when transB = 1; alpha stays where it was; transA does not matter:
//                                the output features are B's, whichever way A is read)
//   C'[i, j] = beta * a[j] * C[i, j] + t[j]   with beta then set to 1 (one rounding, no t / beta)
//   c'[i, j] = a[j] * c[i, j] + t[j]
// A C or c that broadcasts along the features (shape [], [1], [m, 1]) is widened to [N] or [m, N].
//
// BN normalizes axis 1, so this holds only when the output is 2-D: for a rank-3 MatMul output [N, L, F] axis 1
// is L, not the MatMul's feature axis, and the BN is kept. A MatMul without a bias becomes a Gemm (its input
// is 2-D, so Gemm computes the same product and carries the bias). A weight produced by DequantizeLinear is
// the QDQ fold's pattern: not applicable here.

#include "wire/fields.h"
#include "wire/writer.h"
#include "folds/directions/backward/backward.h"
#include "folds/expected.h"
#include "folds/common/values.h"
#include "folds/edits.h"

namespace qdqfold::folds {

namespace {

using graph::Graph;
using graph::Node;

// Kept unless `value` (the layer output the BN reads) is known to be 2-D.
std::optional<Outcome> require_2d_output(const Graph& g, const std::string& value, const std::string& bn_output,
                                         const std::string& matmul_input) {
  std::optional<size_t> rank = known_rank(g, value);
  if (!rank) rank = known_rank(g, bn_output);
  if (!rank) rank = known_rank(g, matmul_input);  // with a 2-D weight, MatMul keeps its input's rank
  if (!rank)
    return Outcome::kept(Reason::UnknownRank, "the rank of the MatMul output '" + value +
                                             "' is unknown, and BN folds into its features only when it is 2-D");
  if (*rank != 2)
    return Outcome::kept(Reason::ChannelAxisMismatch,
                         "the MatMul output '" + value + "' has rank " + std::to_string(*rank) +
                             ": BN normalizes its axis 1, not the MatMul's output features (the last axis)");
  return std::nullopt;
}

Outcome folded(const Graph& g, std::vector<int> layers, const std::string& op, const std::string& how) {
  Outcome out = Outcome::folded(FoldName::GemmBn);
  for (int l : layers) out.into.push_back(g.nodes()[l].display_name(l));
  out.into_op = op;
  out.message = "folded into " + op + " '" + out.into[0] + "': " + how;
  return out;
}

std::string base_name(const Node& n) { return n.name.empty() ? n.outputs[0] : n.name; }

// ---------------------------------------------------------------- select

struct GemmBnMatch {
  enum class Shape { Gemm, MatMul, MatMulAdd } shape = Shape::Gemm;
  int layer = -1;      // the Gemm or MatMul
  int add = -1;        // MatMulAdd: the Add, and its slot of c
  int bias_slot = -1;
};

std::optional<GemmBnMatch> select_gemm_bn(Graph& g, int bn) {
  const int producer = batchnorm_input_producer(g, bn);
  if (producer < 0) return std::nullopt;
  GemmBnMatch m;
  m.layer = producer;
  if (g.nodes()[producer].is("Gemm")) {
    m.shape = GemmBnMatch::Shape::Gemm;
  } else if (g.nodes()[producer].is("MatMul")) {
    m.shape = GemmBnMatch::Shape::MatMul;
  } else if (g.nodes()[producer].is("Add")) {
    const auto ma = select_matmul_add(g, producer);
    if (!ma) return std::nullopt;
    m.shape = GemmBnMatch::Shape::MatMulAdd;
    m.layer = ma->matmul;
    m.add = ma->add;
    m.bias_slot = ma->bias_slot;
  } else {
    return std::nullopt;
  }
  const auto& in = g.nodes()[m.layer].inputs;
  if (in.size() >= 2 && !in[1].empty() && produced_by_dequantize(g, in[1])) return std::nullopt;  // qdq-layer-bn's
  return m;
}

// ---------------------------------------------------------------- plan

struct GemmBnPlan {
  enum class Kind { Gemm, MatMulToGemm, Rank3MatMul, MatMulAdd } kind = Kind::Gemm;
  FloatWeight weight;
  BatchNormAffine affine;
  graph::LazyBytes new_weight;
  FoldedBias bias;        // C' (Gemm), c' (MatMulAdd)
  std::string bias_raw;   // C' / c' / C = t (MatMulToGemm) / the shift added after a rank >= 3 MatMul ("": none)
  double beta = 1.0;      // Gemm
};

// Gemm -> BN: B' = a * B per output column, C' = beta * a * C + t, beta = 1.
Expected<GemmBnPlan> plan_gemm(FoldContext& ctx, const GemmBnMatch& m, int bn, GemmBnPlan plan) {
  Graph& g = ctx.graph;
  const Node& n = g.nodes()[m.layer];
  if (n.outputs.size() != 1 || n.inputs.size() < 2) return Outcome::kept(Reason::Malformed, "Gemm has an unexpected arity");
  QDQFOLD_CHECK(layer_output_blocker(g, m.layer, n.outputs[0], bn));
  const std::string c_name = n.inputs.size() > 2 ? n.inputs[2] : "";
  std::optional<std::vector<int64_t>> c_dims;
  std::vector<double> c_values;
  if (!c_name.empty()) {
    auto v = constant_values(g, c_name);
    c_dims = constant_dims(g, c_name);
    if (!v || !c_dims) return Outcome::kept(Reason::NonConstantBias, "the Gemm's C '" + c_name + "' is not a constant");
    c_values = std::move(*v);
  }
  QDQFOLD_TRY(affine, read_batchnorm(ctx, bn));
  plan.affine = std::move(affine);
  QDQFOLD_TRY(new_weight, rescale_weight(ctx, plan.weight, plan.affine.scale));
  plan.new_weight = std::move(new_weight);
  plan.beta = n.attr_float("beta", 1.0f);
  std::vector<double> c_factor(plan.affine.scale);
  for (double& f : c_factor) f *= plan.beta;
  QDQFOLD_TRY(bias, fold_bias(c_dims, c_values, c_factor, plan.affine.shift, "the Gemm's C '" + c_name + "'"));
  plan.bias = std::move(bias);
  QDQFOLD_TRY(raw, store_or_keep(plan.weight.tensor.data_type, plan.bias.values, "C"));
  plan.bias_raw = std::move(raw);
  return plan;
}

// MatMul -> BN: the MatMul becomes a Gemm carrying the BN's shift as C; or, for an elementwise affine along
// the last axis of a rank >= 3 output (layer scale), W' = a * W per output column and the shift as an Add
// after the MatMul (no Gemm: its input is not 2-D).
Expected<GemmBnPlan> plan_matmul(FoldContext& ctx, const GemmBnMatch& m, int bn, GemmBnPlan plan) {
  Graph& g = ctx.graph;
  const Node& n = g.nodes()[m.layer];
  if (n.outputs.size() != 1 || n.inputs.size() != 2) return Outcome::kept(Reason::Malformed, "MatMul has an unexpected arity");
  QDQFOLD_CHECK(layer_output_blocker(g, m.layer, n.outputs[0], bn));
  const std::string bn_output = g.nodes()[bn].outputs[0];
  QDQFOLD_TRY(affine, read_batchnorm(ctx, bn));
  plan.affine = std::move(affine);
  if (plan.affine.last_axis) {
    plan.kind = GemmBnPlan::Kind::Rank3MatMul;
    QDQFOLD_TRY(new_weight, rescale_weight(ctx, plan.weight, plan.affine.scale));
    plan.new_weight = std::move(new_weight);
    if (!plan.affine.zero_shift()) {
      QDQFOLD_TRY(raw, store_or_keep(plan.weight.tensor.data_type, plan.affine.shift, "bias"));
      plan.bias_raw = std::move(raw);
    }
    return plan;
  }
  plan.kind = GemmBnPlan::Kind::MatMulToGemm;
  QDQFOLD_CHECK(require_2d_output(g, n.outputs[0], bn_output, n.inputs[0]));
  QDQFOLD_TRY(new_weight, rescale_weight(ctx, plan.weight, plan.affine.scale));
  plan.new_weight = std::move(new_weight);
  QDQFOLD_TRY(raw, store_or_keep(plan.weight.tensor.data_type, plan.affine.shift, "bias"));
  plan.bias_raw = std::move(raw);
  return plan;
}

// MatMul -> Add(constant c) -> BN: B' = a * B per output column, c' = a * c + t.
Expected<GemmBnPlan> plan_matmul_add(FoldContext& ctx, const GemmBnMatch& m, int bn, GemmBnPlan plan) {
  Graph& g = ctx.graph;
  const Node& a = g.nodes()[m.add];
  const Node& mm = g.nodes()[m.layer];
  plan.kind = GemmBnPlan::Kind::MatMulAdd;
  if (mm.outputs.size() != 1 || mm.inputs.size() != 2) return Outcome::kept(Reason::Malformed, "MatMul has an unexpected arity");
  QDQFOLD_CHECK(layer_output_blocker(g, m.layer, mm.outputs[0], m.add, 1 - m.bias_slot));
  QDQFOLD_CHECK(layer_output_blocker(g, m.add, a.outputs[0], bn));
  QDQFOLD_TRY(affine, read_batchnorm(ctx, bn));
  plan.affine = std::move(affine);
  if (!plan.affine.last_axis)  // an affine along the last axis of a rank >= 3 output is on the features already
    QDQFOLD_CHECK(require_2d_output(g, a.outputs[0], g.nodes()[bn].outputs[0], mm.inputs[0]));
  const std::string& bias_name = a.inputs[m.bias_slot];
  auto bias_values = constant_values(g, bias_name);
  auto bias_dims = constant_dims(g, bias_name);
  if (!bias_values || !bias_dims) return Outcome::kept(Reason::NonConstantBias, "the bias '" + bias_name + "' is not a constant");
  QDQFOLD_TRY(new_weight, rescale_weight(ctx, plan.weight, plan.affine.scale));
  plan.new_weight = std::move(new_weight);
  QDQFOLD_TRY(bias, fold_bias(bias_dims, *bias_values, plan.affine.scale, plan.affine.shift, "the bias '" + bias_name + "'"));
  plan.bias = std::move(bias);
  QDQFOLD_TRY(raw, store_or_keep(plan.weight.tensor.data_type, plan.bias.values, "bias"));
  plan.bias_raw = std::move(raw);
  return plan;
}

Expected<GemmBnPlan> plan_gemm_bn(FoldContext& ctx, const GemmBnMatch& m, int bn) {
  GemmBnPlan plan;
  // Gemm: transA=1 too, B holds the outputs.
  QDQFOLD_TRY(weight, read_float_weight(ctx, m.layer, /*backward_fold=*/m.shape == GemmBnMatch::Shape::Gemm));
  plan.weight = std::move(weight);
  switch (m.shape) {
    case GemmBnMatch::Shape::Gemm: return plan_gemm(ctx, m, bn, std::move(plan));
    case GemmBnMatch::Shape::MatMul: return plan_matmul(ctx, m, bn, std::move(plan));
    case GemmBnMatch::Shape::MatMulAdd: return plan_matmul_add(ctx, m, bn, std::move(plan));
  }
  return Outcome::not_applicable();
}

// ---------------------------------------------------------------- apply

Outcome apply_gemm_bn(FoldContext& ctx, const GemmBnMatch& m, int bn, GemmBnPlan& plan) {
  Graph& g = ctx.graph;
  const std::string base = base_name(g.nodes()[m.layer]);
  const int32_t dtype = plan.weight.tensor.data_type;
  const std::vector<int64_t> weight_dims = plan.weight.tensor.dims;
  const int64_t features = plan.weight.layout.out_channels;
  switch (plan.kind) {
    case GemmBnPlan::Kind::Gemm: {
      Outcome out = folded(g, {m.layer}, "Gemm", "B' = a * B per output column, C' = beta * a * C + t, beta = 1");
      write_layer_input(ctx, m.layer, 1, dtype, weight_dims, std::move(plan.new_weight), base + "_B", out);
      write_layer_input(ctx, m.layer, 2, dtype, plan.bias.dims, plan.bias_raw, base + "_C", out);
      if (plan.beta != 1.0) g.set_float_attribute(m.layer, "beta", 1.0f);
      take_over_batchnorm_output(g, m.layer, 0, bn, plan.affine);
      return out;
    }
    case GemmBnPlan::Kind::Rank3MatMul: {
      Outcome out = folded(g, {m.layer}, "MatMul", std::string("B' = a * B per output column (the features, its last axis)") +
                                                       (plan.bias_raw.empty() ? "" : ", t added after it"));
      write_layer_input(ctx, m.layer, 1, dtype, weight_dims, std::move(plan.new_weight), base + "_B", out);
      take_over_batchnorm_output(g, m.layer, 0, bn, plan.affine);
      if (!plan.bias_raw.empty()) add_constant_after(ctx, m.layer, dtype, {features}, plan.bias_raw, "_shift", out);
      return out;
    }
    case GemmBnPlan::Kind::MatMulToGemm: {
      Outcome out = folded(g, {m.layer}, "Gemm", "the MatMul became a Gemm with B' = a * B per output column, C = t");
      write_layer_input(ctx, m.layer, 1, dtype, weight_dims, std::move(plan.new_weight), base + "_B", out);
      g.set_op_type(m.layer, "Gemm");
      write_layer_input(ctx, m.layer, 2, dtype, {features}, plan.bias_raw, base + "_C", out);
      // Before opset 7, Gemm broadcasts C only when told to.
      if (g.opset("") < 7) g.set_int_attribute(m.layer, "broadcast", 1);
      take_over_batchnorm_output(g, m.layer, 0, bn, plan.affine);
      return out;
    }
    case GemmBnPlan::Kind::MatMulAdd: {
      Outcome out = folded(g, {m.layer, m.add}, "MatMul", "B' = a * B per output column, and the Add's c' = a * c + t");
      write_layer_input(ctx, m.layer, 1, dtype, weight_dims, std::move(plan.new_weight), base + "_B", out);
      write_layer_input(ctx, m.add, m.bias_slot, dtype, plan.bias.dims, plan.bias_raw, base + "_bias", out);
      take_over_batchnorm_output(g, m.add, 0, bn, plan.affine);
      return out;
    }
  }
  return Outcome::not_applicable();
}

}  // namespace

Outcome fold_gemm_bn(FoldContext& ctx, int bn) {
  const std::optional<GemmBnMatch> match = select_gemm_bn(ctx.graph, bn);
  if (!match) return Outcome::not_applicable();
  QDQFOLD_TRY(plan, plan_gemm_bn(ctx, *match, bn));
  return apply_gemm_bn(ctx, *match, bn, plan);
}

}  // namespace qdqfold::folds
