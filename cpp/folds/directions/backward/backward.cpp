#include "folds/directions/backward/backward.h"
#include "folds/shapes.h"

#include <algorithm>
#include <cstring>

#include "kernels/per_channel.h"
#include "folds/sources/affine.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;

int batchnorm_input_producer(Graph& g, int bn) {
  const Node& n = g.nodes()[bn];
  if (n.inputs.empty() || n.outputs.empty() || n.outputs[0].empty()) return -1;
  return g.producer(n.inputs[affine_data_slot(g, bn)]);
}

std::optional<MatMulAdd> select_matmul_add(Graph& g, int add) {
  const Node& a = g.nodes()[add];
  if (!a.is("Add") || a.inputs.size() != 2 || a.outputs.size() != 1) return std::nullopt;
  for (int s = 0; s < 2; ++s) {
    const int p = g.producer(a.inputs[s]);
    if (p >= 0 && g.nodes()[p].is("MatMul") && constant_dims(g, a.inputs[1 - s]))
      return MatMulAdd{p, add, 1 - s};
  }
  return std::nullopt;
}

std::optional<Outcome> layer_output_blocker(Graph& g, int layer, const std::string& value, int reader, int slot) {
  if (slot < 0) slot = affine_data_slot(g, reader);
  const std::string who = g.nodes()[layer].op_type + " '" + g.nodes()[layer].display_name(layer) + "'";
  if (g.is_graph_output(value))
    return Outcome::kept(Reason::LayerOutputIsGraphOutput,
                         "the output of " + who + " is also a graph output, which must keep its values").at_(value);
  const auto& uses = g.uses(value);
  for (const auto& u : uses)
    if ((u.node != reader || u.slot != slot) && !reads_only_shape(g, u))
      return Outcome::kept(Reason::LayerOutputReadElsewhere,
                           "the output of " + who + " is also read by " + g.nodes()[u.node].op_type + " '" +
                               g.nodes()[u.node].display_name(u.node) + "', which must keep seeing the unnormalized values").at_(g.nodes()[u.node].display_name(u.node));
  return std::nullopt;
}

void take_over_batchnorm_output(Graph& g, int layer, int slot, int bn, const BatchNormAffine& affine) {
  const std::string bn_output = g.nodes()[bn].outputs[0];
  const std::string old_output = g.nodes()[layer].outputs[slot];
  remove_folded_batchnorm(g, bn, affine);
  g.set_output(layer, slot, bn_output);
  // The old value is gone: its shape readers (layer_output_blocker let them be) read the BN's output now, of
  // the same shape.
  const std::vector<graph::Use> uses = g.uses(old_output);  // a copy: set_input edits the list
  for (const auto& u : uses)
    if (reads_only_shape(g, u)) g.set_input(u.node, u.slot, bn_output);
}

}  // namespace qdqfold::folds
