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
#include "folds/folds.h"
#include "folds/directions/forward/forward.h"

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
  Outcome out;
  out.verdict = Verdict::Folded;
  out.code = code(FoldName::GemmBn);
  for (int l : layers) out.into.push_back(g.nodes[l].display_name(l));
  out.into_op = op;
  out.message = "folded into " + op + " '" + out.into[0] + "': " + how;
  return out;
}

std::string base_name(const Node& n) { return n.name.empty() ? n.outputs[0] : n.name; }

// Gemm -> BN.
Outcome fold_into_gemm(FoldContext& ctx, int gemm, int bn) {
  Graph& g = ctx.graph;
  auto weight_or = read_float_weight(ctx, gemm, /*backward_fold=*/true);  // transA=1 too: B holds the outputs
  if (auto* o = std::get_if<Outcome>(&weight_or)) return *o;
  const FloatWeight& weight = std::get<FloatWeight>(weight_or);
  const Node& n = g.nodes[gemm];
  if (n.outputs.size() != 1 || n.inputs.size() < 2) return Outcome::kept(Reason::Malformed, "Gemm has an unexpected arity");
  if (auto blocked = layer_output_blocker(g, gemm, n.outputs[0], bn)) return *blocked;

  const std::string c_name = n.inputs.size() > 2 ? n.inputs[2] : "";
  std::optional<std::vector<int64_t>> c_dims;
  std::vector<double> c_values;
  if (!c_name.empty()) {
    auto v = constant_values(g, c_name);
    c_dims = constant_dims(g, c_name);
    if (!v || !c_dims) return Outcome::kept(Reason::NonConstantBias, "the Gemm's C '" + c_name + "' is not a constant");
    c_values = std::move(*v);
  }
  auto affine_or = read_batchnorm(ctx, bn);
  if (auto* o = std::get_if<Outcome>(&affine_or)) return *o;
  const BatchNormAffine& affine = std::get<BatchNormAffine>(affine_or);

  auto new_weight = rescale_weight(ctx, weight, affine.scale);
  if (auto* o = std::get_if<Outcome>(&new_weight)) return *o;
  const double beta = n.attr_float("beta", 1.0f);
  std::vector<double> c_factor(affine.scale);
  for (double& f : c_factor) f *= beta;
  auto bias_or = fold_bias(c_dims, c_values, c_factor, affine.shift, "the Gemm's C '" + c_name + "'");
  if (auto* o = std::get_if<Outcome>(&bias_or)) return *o;
  const FoldedBias& bias = std::get<FoldedBias>(bias_or);
  auto new_bias = store_or_keep(weight.tensor.data_type, bias.values, "C");
  if (auto* o = std::get_if<Outcome>(&new_bias)) return *o;

  Outcome out = folded(g, {gemm}, "Gemm", "B' = a * B per output column, C' = beta * a * C + t, beta = 1");
  const std::string base = base_name(n);
  const int32_t dtype = weight.tensor.data_type;
  const std::vector<int64_t> weight_dims = weight.tensor.dims;
  write_layer_input(ctx, gemm, 1, dtype, weight_dims, std::move(std::get<graph::LazyBytes>(new_weight)), base + "_B", out);
  write_layer_input(ctx, gemm, 2, dtype, bias.dims, std::get<std::string>(new_bias), base + "_C", out);
  if (beta != 1.0) g.set_float_attribute(gemm, "beta", 1.0f);
  take_over_batchnorm_output(g, gemm, 0, bn, affine);
  return out;
}

// MatMul with a rank >= 3 output -> an elementwise affine along its features (the last axis; layer scale):
// W' = a * W per output column, and the shift (if any) as an Add after the MatMul; no Gemm (its input is not 2-D).
Outcome fold_into_rank3_matmul(FoldContext& ctx, int matmul, int node, const FloatWeight& weight,
                               const BatchNormAffine& affine) {
  Graph& g = ctx.graph;
  auto new_weight = rescale_weight(ctx, weight, affine.scale);
  if (auto* o = std::get_if<Outcome>(&new_weight)) return *o;
  std::string shift_raw;
  if (!affine.zero_shift()) {
    auto raw = store_or_keep(weight.tensor.data_type, affine.shift, "bias");
    if (auto* o = std::get_if<Outcome>(&raw)) return *o;
    shift_raw = std::move(std::get<std::string>(raw));
  }
  Outcome out = folded(g, {matmul}, "MatMul", std::string("B' = a * B per output column (the features, its last axis)") +
                                                  (shift_raw.empty() ? "" : ", t added after it"));
  const Node& n = g.nodes[matmul];
  const std::string base = base_name(n);
  const int32_t dtype = weight.tensor.data_type;
  const std::vector<int64_t> weight_dims = weight.tensor.dims;
  const int64_t features = weight.layout.out_channels;
  write_layer_input(ctx, matmul, 1, dtype, weight_dims, std::move(std::get<graph::LazyBytes>(new_weight)), base + "_B", out);
  take_over_batchnorm_output(g, matmul, 0, node, affine);
  if (!shift_raw.empty()) add_constant_after(ctx, matmul, dtype, {features}, shift_raw, "_shift", out);
  return out;
}

// MatMul -> BN: the MatMul becomes a Gemm carrying the BN's shift as C.
Outcome fold_into_matmul(FoldContext& ctx, int matmul, int bn) {
  Graph& g = ctx.graph;
  auto weight_or = read_float_weight(ctx, matmul);
  if (auto* o = std::get_if<Outcome>(&weight_or)) return *o;
  const FloatWeight& weight = std::get<FloatWeight>(weight_or);
  const Node& n = g.nodes[matmul];
  if (n.outputs.size() != 1 || n.inputs.size() != 2) return Outcome::kept(Reason::Malformed, "MatMul has an unexpected arity");
  if (auto blocked = layer_output_blocker(g, matmul, n.outputs[0], bn)) return *blocked;
  const std::string bn_output = g.nodes[bn].outputs[0];
  auto affine_or = read_batchnorm(ctx, bn);
  if (auto* o = std::get_if<Outcome>(&affine_or)) return *o;
  const BatchNormAffine& affine = std::get<BatchNormAffine>(affine_or);
  if (affine.last_axis) return fold_into_rank3_matmul(ctx, matmul, bn, weight, affine);
  if (auto not_2d = require_2d_output(g, n.outputs[0], bn_output, n.inputs[0])) return *not_2d;
  auto new_weight = rescale_weight(ctx, weight, affine.scale);
  if (auto* o = std::get_if<Outcome>(&new_weight)) return *o;
  auto new_bias = store_or_keep(weight.tensor.data_type, affine.shift, "bias");
  if (auto* o = std::get_if<Outcome>(&new_bias)) return *o;

  Outcome out = folded(g, {matmul}, "Gemm", "the MatMul became a Gemm with B' = a * B per output column, C = t");
  const std::string base = base_name(n);
  const int32_t dtype = weight.tensor.data_type;
  const std::vector<int64_t> weight_dims = weight.tensor.dims;
  const int64_t features = weight.layout.out_channels;
  write_layer_input(ctx, matmul, 1, dtype, weight_dims, std::move(std::get<graph::LazyBytes>(new_weight)), base + "_B", out);
  g.set_op_type(matmul, "Gemm");
  write_layer_input(ctx, matmul, 2, dtype, {features}, std::get<std::string>(new_bias), base + "_C", out);
  // Before opset 7, Gemm broadcasts C only when told to.
  if (g.opset("") < 7) g.set_int_attribute(matmul, "broadcast", 1);
  take_over_batchnorm_output(g, matmul, 0, bn, affine);
  return out;
}

// MatMul -> Add(constant bias) -> BN. Returns NotApplicable when the Add is not that pattern.
Outcome fold_into_matmul_add(FoldContext& ctx, int add, int bn) {
  Graph& g = ctx.graph;
  const Node& a = g.nodes[add];
  if (a.inputs.size() != 2 || a.outputs.size() != 1) return Outcome::not_applicable();
  int matmul = -1, bias_slot = -1;
  for (int s = 0; s < 2; ++s) {
    const int p = g.producer(a.inputs[s]);
    if (p >= 0 && g.nodes[p].is("MatMul") && constant_dims(g, a.inputs[1 - s])) {
      matmul = p;
      bias_slot = 1 - s;
      break;
    }
  }
  if (matmul < 0) return Outcome::not_applicable();

  auto weight_or = read_float_weight(ctx, matmul);
  if (auto* o = std::get_if<Outcome>(&weight_or)) return *o;
  const FloatWeight& weight = std::get<FloatWeight>(weight_or);
  const Node& m = g.nodes[matmul];
  if (m.outputs.size() != 1 || m.inputs.size() != 2) return Outcome::kept(Reason::Malformed, "MatMul has an unexpected arity");
  if (auto blocked = layer_output_blocker(g, matmul, m.outputs[0], add, 1 - bias_slot)) return *blocked;
  if (auto blocked = layer_output_blocker(g, add, a.outputs[0], bn)) return *blocked;
  auto affine_or = read_batchnorm(ctx, bn);
  if (auto* o = std::get_if<Outcome>(&affine_or)) return *o;
  const BatchNormAffine& affine = std::get<BatchNormAffine>(affine_or);
  if (!affine.last_axis)  // an affine along the last axis of a rank >= 3 output is on the features already
    if (auto not_2d = require_2d_output(g, a.outputs[0], g.nodes[bn].outputs[0], m.inputs[0])) return *not_2d;

  const std::string& bias_name = a.inputs[bias_slot];
  auto bias_values = constant_values(g, bias_name);
  auto bias_dims = constant_dims(g, bias_name);
  if (!bias_values || !bias_dims) return Outcome::kept(Reason::NonConstantBias, "the bias '" + bias_name + "' is not a constant");

  auto new_weight = rescale_weight(ctx, weight, affine.scale);
  if (auto* o = std::get_if<Outcome>(&new_weight)) return *o;
  auto bias_or = fold_bias(bias_dims, *bias_values, affine.scale, affine.shift, "the bias '" + bias_name + "'");
  if (auto* o = std::get_if<Outcome>(&bias_or)) return *o;
  const FoldedBias& bias = std::get<FoldedBias>(bias_or);
  auto new_bias = store_or_keep(weight.tensor.data_type, bias.values, "bias");
  if (auto* o = std::get_if<Outcome>(&new_bias)) return *o;

  Outcome out = folded(g, {matmul, add}, "MatMul", "B' = a * B per output column, and the Add's c' = a * c + t");
  const std::string base = base_name(m);
  const int32_t dtype = weight.tensor.data_type;
  const std::vector<int64_t> weight_dims = weight.tensor.dims;
  write_layer_input(ctx, matmul, 1, dtype, weight_dims, std::move(std::get<graph::LazyBytes>(new_weight)), base + "_B", out);
  write_layer_input(ctx, add, bias_slot, dtype, bias.dims, std::get<std::string>(new_bias), base + "_bias", out);
  take_over_batchnorm_output(g, add, 0, bn, affine);
  return out;
}

}  // namespace

Outcome fold_gemm_bn(FoldContext& ctx, int bn) {
  Graph& g = ctx.graph;
  const int layer = batchnorm_input_producer(g, bn);
  if (layer < 0) return Outcome::not_applicable();
  if (g.nodes[layer].is("Gemm")) return fold_into_gemm(ctx, layer, bn);
  if (g.nodes[layer].is("MatMul")) return fold_into_matmul(ctx, layer, bn);
  if (g.nodes[layer].is("Add")) return fold_into_matmul_add(ctx, layer, bn);
  return Outcome::not_applicable();
}

}  // namespace qdqfold::folds
