#include "folds/sources/batchnorm.h"

#include <cmath>
#include <limits>

#include "folds/sources/affine.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;

bool BatchNormAffine::zero_shift() const {
  for (double v : shift)
    if (v != 0.0) return false;
  return true;
}

namespace {

// Beyond this factor, a fold moves overflow to a place where it does something else. The original computes
// the layer's sums at their own size and multiplies by a once: a too large product is +-Inf. Folded, every
// weight carries a, so the partial sums grow a times larger and can overflow to +Inf and -Inf within one
// sum, which adds up to NaN (gamma 3e38: 50 of 50 outputs NaN where the original has +-Inf and no NaN). With
// |a| <= 2^32 that needs partial sums beyond FLT_MAX / 2^32 (~7.9e28) in the original, where its own output
// overflows too: far outside any model's range. Real BN factors stay below ~1e6 (gamma / sqrt(eps)).
constexpr double kLargestFactor = 4294967296.0;  // 2^32

std::optional<Outcome> factor_beyond_headroom(const Node& n, const BatchNormAffine& affine) {
  for (size_t i = 0; i < affine.scale.size(); ++i)
    if (!(std::fabs(affine.scale[i]) <= kLargestFactor)) {
      const std::string what = n.is("BatchNormalization") ? "factor gamma / sqrt(var + epsilon)" : "constant factor";
      return Outcome::kept(Reason::Overflow, "its " + what + " is " + std::to_string(affine.scale[i]) + " in channel " +
                                             std::to_string(i) + ", beyond 2^32: folded into the weights it would make "
                                             "the layer's sums overflow float32 to +Inf and -Inf (NaN) where the "
                                             "original's overflow gives +-Inf, so it is kept");
    }
  return std::nullopt;
}

Expected<BatchNormAffine> read_batchnorm_map(FoldContext& ctx, int bn);

}  // namespace

Expected<BatchNormAffine> read_batchnorm(FoldContext& ctx, int bn) {
  auto read = read_batchnorm_map(ctx, bn);
  if (auto* affine = std::get_if<BatchNormAffine>(&read))
    if (auto kept = factor_beyond_headroom(ctx.graph.nodes()[bn], *affine)) return std::move(*kept);
  return read;
}

namespace {

Expected<BatchNormAffine> read_batchnorm_map(FoldContext& ctx, int bn) {
  Graph& g = ctx.graph;
  const Node& n = g.nodes()[bn];
  // An elementwise Mul/Add/Sub/Div by a per-channel constant is the same map (affine.h).
  if (!n.is("BatchNormalization")) return read_elementwise_affine(ctx, bn);
  const int64_t version = g.opset("");
  if (n.outputs.size() > 1) {
    for (size_t k = 1; k < n.outputs.size(); ++k)
      if (!n.outputs[k].empty())
        return Outcome::kept(Reason::TrainingForm, "it has running-statistics outputs (training form), so it is not an "
                                              "inference BatchNormalization");
  }
  if (n.attr_int("training_mode", 0) != 0)
    return Outcome::kept(Reason::TrainingMode, "training_mode=1: it normalizes with batch statistics, not a fixed map");
  // Opset 1-6 have is_test, default 0: without is_test=1 the node normalizes with batch statistics.
  if (version < 7 && n.attr_int("is_test", 0) == 0)
    return Outcome::kept(Reason::TrainingMode, std::string(n.attr("is_test") ? "is_test=0" : "is_test is absent (default 0)") +
                                              " in opset " + std::to_string(version) +
                                              ": it normalizes with batch statistics (training form)");
  if (version < 9 && n.attr_int("spatial", 1) != 1)
    return Outcome::kept(Reason::NotPerChannel, "spatial=0: its statistics are per element, not per channel");
  if (n.inputs.size() < 5)
    return Outcome::kept(Reason::Malformed, "it has " + std::to_string(n.inputs.size()) + " inputs instead of 5");

  BatchNormAffine affine;
  static const char* names[] = {"scale", "B", "mean", "var"};
  std::vector<double> p[4];
  for (int k = 0; k < 4; ++k) {
    const std::string& v = n.inputs[k + 1];
    auto values = constant_values(g, v);
    if (!values)
      return Outcome::kept(Reason::NonConstantParameters,
                           std::string("its ") + names[k] + " input '" + v + "' is not a constant");
    p[k] = std::move(*values);
    affine.parameter_values.push_back(v);
  }
  const size_t c = p[0].size();
  for (int k = 1; k < 4; ++k)
    if (p[k].size() != c)
      return Outcome::kept(Reason::ShapeMismatch, std::string("its ") + names[k] + " has " + std::to_string(p[k].size()) +
                                                 " values but scale has " + std::to_string(c));
  if (c == 0) return Outcome::kept(Reason::ShapeMismatch, "its parameters are empty");
  const double eps = n.attr_float("epsilon", 1e-5f);
  // The largest finite value of the BN's type: where its own arithmetic (1 / sqrt(var + eps), the factor a, the
  // shift t) overflows, the original's output is Inf or NaN in that channel, and a fold never changes which
  // outputs are NaN or Inf (the rule non-positive-variance follows too).
  double type_max = std::numeric_limits<float>::max();
  if (auto ref = g.constant(n.inputs[1])) {
    if (ref->tensor.data_type == static_cast<int32_t>(wire::DataType::Float16)) type_max = 65504.0;
    if (ref->tensor.data_type == static_cast<int32_t>(wire::DataType::Double)) type_max = std::numeric_limits<double>::max();
  }
  affine.scale.resize(c);
  affine.shift.resize(c);
  for (size_t i = 0; i < c; ++i) {
    for (int k = 0; k < 4; ++k)
      if (!std::isfinite(p[k][i]))
        return Outcome::kept(Reason::NonFiniteParameters, std::string("its ") + names[k] + " holds NaN or Inf in channel " +
                                                          std::to_string(i));
    const double denom = p[3][i] + eps;
    if (!(denom > 0))
      return Outcome::kept(Reason::NonPositiveVariance, "var + epsilon <= 0 in channel " + std::to_string(i) +
                                                        ": the original output is NaN there, a fold would hide it");
    affine.scale[i] = p[0][i] / std::sqrt(denom);
    affine.shift[i] = p[1][i] - p[2][i] * affine.scale[i];
    const double inv = 1.0 / std::sqrt(denom);
    if (!(inv <= type_max && std::fabs(affine.scale[i]) <= type_max && std::fabs(p[2][i] * affine.scale[i]) <= type_max &&
          std::fabs(affine.shift[i]) <= type_max))
      return Outcome::kept(Reason::Overflow, "its factor gamma / sqrt(var + epsilon) or shift overflows its type in channel " +
                                           std::to_string(i) + ": the original output is Inf or NaN there, a fold "
                                           "would change that");
  }
  if (auto x = g.shape_of(n.inputs[0]); x && x->size() >= 2 && (*x)[1] >= 0 && (*x)[1] != static_cast<int64_t>(c))
    return Outcome::kept(Reason::ShapeMismatch, "its input has " + std::to_string((*x)[1]) + " channels but " +
                                               std::to_string(c) + " parameters");
  return affine;
}

}  // namespace

void remove_folded_batchnorm(Graph& g, int bn, const BatchNormAffine& affine) {
  const std::string bn_input = g.nodes()[bn].inputs[affine_data_slot(g, bn)];
  g.remove_node(bn);
  g.remove_value_info(bn_input);
  for (const auto& v : affine.parameter_values) g.drop_if_unused(v);
}

}  // namespace qdqfold::folds
