// The elementwise affine source; see affine.h for the patterns and the map each op gives.
#include "folds/sources/affine.h"
#include "folds/expected.h"
#include "folds/layer_kinds.h"

#include <algorithm>
#include <cmath>

#include "folds/common/values.h"
#include "folds/common/layout.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;

namespace {

bool is_elementwise_op(const Node& n) { return n.is("Mul") || n.is("Add") || n.is("Sub") || n.is("Div"); }

// The slot of the constant operand, or -1 when the node is not one constant and one activation (Div: only the
// divisor may be the constant; c / x is not affine).
int constant_slot(Graph& g, const Node& n) {
  if (!is_elementwise_op(n) || n.inputs.size() != 2 || n.outputs.size() != 1 || n.outputs[0].empty() ||
      n.inputs[0].empty() || n.inputs[1].empty())
    return -1;
  const bool c0 = g.constant(n.inputs[0]).has_value(), c1 = g.constant(n.inputs[1]).has_value();
  if (c0 == c1) return -1;
  if (n.is("Div") && !c1) return -1;
  return c0 ? 0 : 1;
}

// Dims of a layer's weight: a constant, DequantizeLinear of constant integers, or of QuantizeLinear of a
// constant float weight (the QAT form).
std::optional<std::vector<int64_t>> weight_dims(Graph& g, const std::string& w) {
  if (auto dims = constant_dims(g, w)) return dims;
  const int dq = g.producer(w);
  if (dq < 0 || !g.nodes()[dq].is("DequantizeLinear") || g.nodes()[dq].inputs.empty()) return std::nullopt;
  const int q = g.producer(g.nodes()[dq].inputs[0]);
  if (q < 0 || !g.nodes()[q].is("QuantizeLinear") || g.nodes()[q].inputs.empty()) return std::nullopt;
  return constant_dims(g, g.nodes()[q].inputs[0]);
}

// The layer whose output channels `x` carries, when its producer is one (for a scalar constant's channel count).
std::optional<int64_t> producer_channels(Graph& g, const std::string& x) {
  const int p = g.producer(x);
  if (p < 0 || g.nodes()[p].inputs.size() < 2) return std::nullopt;
  auto dims = weight_dims(g, g.nodes()[p].inputs[1]);
  if (!dims) return std::nullopt;
  std::string why;
  auto layout = weight_layout(g.nodes()[p], *dims, why, /*backward_fold=*/true);
  if (!layout) return std::nullopt;
  return layout->out_channels;
}

// True when `x` comes out of a MatMul with a constant 2-D weight, directly or through the Add of its bias.
bool from_matmul(Graph& g, const std::string& x) {
  int p = g.producer(x);
  if (p >= 0 && g.nodes()[p].is("Add") && g.nodes()[p].inputs.size() == 2) {
    for (const auto& in : g.nodes()[p].inputs)
      if (const int q = g.producer(in); q >= 0 && g.nodes()[q].is("MatMul")) p = q;
  }
  if (p < 0 || !g.nodes()[p].is("MatMul") || g.nodes()[p].inputs.size() != 2) return false;
  auto dims = weight_dims(g, g.nodes()[p].inputs[1]);
  return dims && dims->size() == 2;
}

// The rank of the activation `x`: from shape information, or from the layer that produces it.
std::optional<size_t> activation_rank(Graph& g, const std::string& x, int depth = 0) {
  if (auto r = known_rank(g, x)) return r;
  const int p = g.producer(x);
  if (p < 0) return std::nullopt;
  const Node& n = g.nodes()[p];
  if ((n.is("Conv") || n.is("ConvTranspose")) && n.inputs.size() > 1)
    if (auto dims = weight_dims(g, n.inputs[1]); dims && dims->size() >= 3) return dims->size();
  if (n.is("MatMul") && n.inputs.size() == 2)
    if (auto dims = weight_dims(g, n.inputs[1]); dims && dims->size() == 2) return known_rank(g, n.inputs[0]);
  // The Add of a MatMul's bias (or another elementwise node with one constant operand): the wider of the two.
  if (is_elementwise_op(n) && n.inputs.size() == 2 && depth < 8) {
    for (int s = 0; s < 2; ++s)
      if (auto c = constant_dims(g, n.inputs[1 - s]))
        if (auto r = activation_rank(g, n.inputs[s], depth + 1)) return std::max(*r, c->size());
  }
  return std::nullopt;
}

}  // namespace

bool is_elementwise_affine(Graph& g, int node) {
  const Node& n = g.nodes()[node];
  const int slot = constant_slot(g, n);
  if (slot < 0) return false;
  auto c = g.constant(n.inputs[slot]);
  if (!c || !graph::is_float_type(c->tensor.data_type)) return false;
  int non_one = 0;
  for (int64_t d : c->tensor.dims) non_one += d != 1;
  return non_one <= 1;
}

int affine_data_slot(Graph& g, int node) {
  const Node& n = g.nodes()[node];
  if (n.is("BatchNormalization")) return 0;
  const int slot = constant_slot(g, n);
  return slot < 0 ? 0 : 1 - slot;
}

Expected<BatchNormAffine> read_elementwise_affine(FoldContext& ctx, int node) {
  Graph& g = ctx.graph;
  const Node& n = g.nodes()[node];
  const int cslot = constant_slot(g, n);
  if (cslot < 0) return Outcome::not_applicable();
  const std::string& x = n.inputs[1 - cslot];
  const std::string& cname = n.inputs[cslot];
  // A shift after a MatMul is the plain linear layer's own bias, not something to fold.
  if ((n.is("Add") || (n.is("Sub") && cslot == 1)) && g.producer(x) >= 0 && g.nodes()[g.producer(x)].is("MatMul"))
    return Outcome::not_applicable();
  auto c = g.constant(cname);
  auto values = c ? c->tensor.values() : std::nullopt;
  if (!c || !values || !graph::is_float_type(c->tensor.data_type))
    return Outcome::kept(Reason::NonConstantParameters, "its operand '" + cname + "' is not a readable float constant");
  const std::vector<int64_t>& dims = c->tensor.dims;
  int varying = -1;
  for (size_t k = 0; k < dims.size(); ++k)
    if (dims[k] != 1) {
      if (varying >= 0)
        return Outcome::kept(Reason::ChannelAxisMismatch, "its constant '" + cname + "' varies along more than one axis");
      varying = static_cast<int>(k);
    }

  // The constant must not widen x (rank at most x's) and may vary only along x's axis 1.
  const auto rank = activation_rank(g, x);
  if (rank && dims.size() > *rank)
    return Outcome::kept(Reason::ChannelAxisMismatch, "its constant '" + cname + "' has a higher rank than the activation");
  if (!rank && (varying >= 0 || dims.size() > 1))
    return Outcome::kept(Reason::UnknownRank, "the rank of its input '" + x + "' is unknown, so it is not known which "
                                         "axis its constant '" + cname + "' runs along");
  int64_t channels = -1;
  // A MatMul's rank >= 3 output [.., N, F] (transformer layer scale after Linear): the features are the last
  // axis, which a constant [F] (or a scalar) follows.
  const bool last_axis = rank && *rank >= 3 && from_matmul(g, x) &&
                         (varying < 0 || static_cast<int64_t>(*rank) - static_cast<int64_t>(dims.size()) + varying ==
                                             static_cast<int64_t>(*rank) - 1);
  if (last_axis) {
    auto mm = g.producer(x);
    if (g.nodes()[mm].is("Add"))
      for (const auto& in : g.nodes()[mm].inputs)
        if (const int q = g.producer(in); q >= 0 && g.nodes()[q].is("MatMul")) mm = q;
    const auto features = producer_channels(g, g.nodes()[mm].outputs[0]);
    channels = varying >= 0 ? dims[varying] : features.value_or(-1);
    if (channels <= 0 || values->size() != (varying >= 0 ? static_cast<size_t>(channels) : 1))
      return Outcome::kept(Reason::ShapeMismatch, "its constant '" + cname + "' does not match the MatMul's features");
  } else if (varying >= 0) {
    const auto axis = static_cast<int64_t>(*rank) - static_cast<int64_t>(dims.size()) + varying;
    if (axis != 1)
      return Outcome::kept(Reason::ChannelAxisMismatch,
                           "its constant '" + cname + "' runs along axis " + std::to_string(axis) + " of the rank-" +
                               std::to_string(*rank) + " activation, not along the channels (axis 1)");
    channels = dims[varying];
    if (channels <= 0 || values->size() != static_cast<size_t>(channels))
      return Outcome::kept(Reason::ShapeMismatch, "its constant '" + cname + "' holds " + std::to_string(values->size()) +
                                                 " values for " + std::to_string(channels) + " channels");
  } else if (!last_axis) {
    if (values->size() != 1)
      return Outcome::kept(Reason::ShapeMismatch, "its constant '" + cname + "' holds " + std::to_string(values->size()) +
                                                 " values for its dims");
    if (auto s = g.shape_of(x); s && s->size() >= 2 && (*s)[1] > 0) channels = (*s)[1];
    else if (auto s2 = g.shape_of(n.outputs[0]); s2 && s2->size() >= 2 && (*s2)[1] > 0) channels = (*s2)[1];
    else if (auto p = producer_channels(g, x)) channels = *p;
    if (channels <= 0)
      return Outcome::kept(Reason::UnknownChannels, "the channel count of its input '" + x + "' is unknown");
  }
  if (auto s = g.shape_of(x); !last_axis && s && s->size() >= 2 && (*s)[1] >= 0 && (*s)[1] != channels)
    return Outcome::kept(Reason::ShapeMismatch, "its input has " + std::to_string((*s)[1]) + " channels but its constant " +
                                               std::to_string(channels));

  BatchNormAffine affine;
  affine.last_axis = last_axis;
  affine.data_type = c->tensor.data_type;
  affine.parameter_values = {cname};
  affine.scale.assign(static_cast<size_t>(channels), 1.0);
  affine.shift.assign(static_cast<size_t>(channels), 0.0);
  for (size_t i = 0; i < affine.scale.size(); ++i) {
    const double v = (*values)[values->size() == 1 ? 0 : i];
    if (!std::isfinite(v) || (n.is("Div") && v == 0.0))
      return Outcome::kept(Reason::NonFiniteParameters, "its constant '" + cname + "' holds " +
                                                        (std::isfinite(v) ? "a zero divisor" : "NaN or Inf") +
                                                        " in channel " + std::to_string(i));
    if (n.is("Mul")) affine.scale[i] = v;
    else if (n.is("Div")) affine.scale[i] = 1.0 / v;
    else if (n.is("Add")) affine.shift[i] = v;
    else if (cslot == 1) affine.shift[i] = -v;  // x - c
    else {                                      // c - x
      affine.scale[i] = -1.0;
      affine.shift[i] = v;
    }
  }
  return affine;
}

std::string affine_fold_name(const std::string& bn_fold_name, const Node& n) {
  return affine_variant_name(bn_fold_name, n.op_type);
}

bool affine_reported_when_kept(Graph& g, int node) {
  const Node& n = g.nodes()[node];
  int p = g.producer(n.inputs[affine_data_slot(g, node)]);
  // Through an activation quantizer (layer -> Q -> DQ -> Mul): the layer's, kept for that quantizer.
  if (p >= 0 && g.nodes()[p].op_type == "DequantizeLinear" && !g.nodes()[p].inputs.empty()) {
    const int q = g.producer(g.nodes()[p].inputs[0]);
    p = q >= 0 && g.nodes()[q].op_type == "QuantizeLinear" && !g.nodes()[q].inputs.empty() ? g.producer(g.nodes()[q].inputs[0])
                                                                                       : -1;
  }
  if (p < 0) return false;
  const Node& layer = g.nodes()[p];
  if (!is_layer(layer)) return false;
  if (layer.is("MatMul") && n.is("Add")) return false;  // MatMul + Add(bias) is the plain linear layer
  return layer.inputs.size() > 1 && weight_dims(g, layer.inputs[1]).has_value();
}

}  // namespace qdqfold::folds
