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

// Dequantizes constant integers: (q - z) * s, per tensor or along `axis`.
static std::optional<std::vector<double>> dequantized_constant(Graph& g, const Node& dq) {
  if (dq.inputs.empty()) return std::nullopt;
  auto q = g.constant(dq.inputs[0]);
  auto s = dq.inputs.size() > 1 ? g.constant(dq.inputs[1]) : std::nullopt;
  if (!q || !s) return std::nullopt;
  std::optional<graph::ConstRef> z;
  if (dq.inputs.size() > 2 && !dq.inputs[2].empty()) {
    z = g.constant(dq.inputs[2]);
    if (!z) return std::nullopt;
  }
  if (dq.attr_int("block_size", 0) != 0) return std::nullopt;
  auto qv = q->tensor.values();
  auto sv = s->tensor.values();
  std::optional<std::vector<double>> zv = z ? z->tensor.values() : std::vector<double>(sv ? sv->size() : 0, 0.0);
  if (!qv || !sv || !zv || zv->size() != sv->size() || sv->empty()) return std::nullopt;
  const auto& dims = q->tensor.dims;
  std::vector<double> out(qv->size());
  if (sv->size() == 1) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = ((*qv)[i] - (*zv)[0]) * (*sv)[0];
    return out;
  }
  int64_t rank = static_cast<int64_t>(dims.size());
  int64_t axis = dq.attr_int("axis", 1);
  if (axis < 0) axis += rank;
  if (axis < 0 || axis >= rank || dims[axis] != static_cast<int64_t>(sv->size())) return std::nullopt;
  int64_t inner = 1;
  for (int64_t d = axis + 1; d < rank; ++d) inner *= dims[d];
  for (size_t i = 0; i < out.size(); ++i) {
    size_t c = (i / static_cast<size_t>(inner)) % sv->size();
    out[i] = ((*qv)[i] - (*zv)[c]) * (*sv)[c];
  }
  return out;
}

std::optional<std::vector<double>> constant_values(Graph& g, const std::string& value) {
  if (auto c = g.constant(value)) return c->tensor.values();
  int p = g.producer(value);
  if (p >= 0 && g.nodes()[p].is("DequantizeLinear")) return dequantized_constant(g, g.nodes()[p]);
  return std::nullopt;
}

bool read_only_by(const Graph& g, const std::string& value, int reader) {
  if (g.is_graph_output(value)) return false;
  const auto& uses = g.uses(value);
  return uses.size() == 1 && uses[0].node == reader && uses[0].slot >= 0;
}

bool reads_only_shape(const Graph& g, const graph::Use& u) {
  if (u.slot != 0) return false;  // a subgraph's read (slot < 0) may be anything
  const Node& n = g.nodes()[u.node];
  return n.is("Shape") || n.is("Size");
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

std::variant<BatchNormAffine, Outcome> read_batchnorm_map(FoldContext& ctx, int bn);

}  // namespace

std::variant<BatchNormAffine, Outcome> read_batchnorm(FoldContext& ctx, int bn) {
  auto read = read_batchnorm_map(ctx, bn);
  if (auto* affine = std::get_if<BatchNormAffine>(&read))
    if (auto kept = factor_beyond_headroom(ctx.graph.nodes()[bn], *affine)) return std::move(*kept);
  return read;
}

namespace {

std::variant<BatchNormAffine, Outcome> read_batchnorm_map(FoldContext& ctx, int bn) {
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

std::string new_tensor_name(graph::Model& model, const std::string& old_name, const char* suffix) {
  return model.fresh_name(old_name + suffix);
}

}  // namespace qdqfold::folds
