// The forward fold's driver and the helpers its planners share; see forward.h for the graph and formula.
#include "folds/directions/forward/forward.h"
#include "folds/layer_kinds.h"
#include "folds/expected.h"

#include <cstring>

#include "kernels/numeric.h"
#include "kernels/per_channel.h"
#include "folds/sources/affine.h"
#include "folds/shapes.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;
using wire::DataType;

namespace {

// Dropout is the identity at inference unless it is told to train: opset < 7 through is_test (default 0,
// i.e. training), opset >= 12 through a training_mode input that is not a constant false.
bool is_inference_dropout(Graph& g, const Node& n) {
  if (!n.is("Dropout")) return false;
  const int64_t version = g.opset("");
  if (version < 7) return n.attr_int("is_test", 0) != 0;
  if (n.inputs.size() > 2 && !n.inputs[2].empty()) {  // a bool: every byte of a constant false is 0
    auto training = g.constant(n.inputs[2]);
    std::string storage;
    auto bytes = training ? training->tensor.bytes(storage) : std::nullopt;
    if (!bytes) return false;
    for (char b : *bytes)
      if (b != 0) return false;
  }
  return true;
}

bool is_see_through(Graph& g, const Node& n) { return n.is("Identity") || is_inference_dropout(g, n); }

void visit(Graph& g, const std::string& value, ForwardReader path, ForwardMatch& walk) {
  if (g.is_graph_output(value) && walk.other.kind == ForwardSighting::Kind::None) {
    walk.other.kind = ForwardSighting::Kind::GraphOutput;
    walk.other.value = value;
    walk.other.direct = path.values.empty() && path.reshape < 0;
  }
  if (path.reshape < 0) path.values.push_back(value);
  for (const auto& use : g.uses(value)) {
    const Node& n = g.nodes()[use.node];
    const bool first = use.slot == 0;
    if (reads_only_shape(g, use)) continue;  // the fold changes no shape; remove_forward_batchnorm rewires it
    if (first && is_see_through(g, n) && !n.outputs.empty() && !n.outputs[0].empty()) {
      visit(g, n.outputs[0], path, walk);
    } else if (first && path.reshape < 0 && (n.is("Flatten") || n.is("Reshape")) && !n.outputs.empty()) {
      ForwardReader next = path;
      next.reshape = use.node;
      visit(g, n.outputs[0], next, walk);
    } else if (first && is_layer(n) && (path.reshape < 0 || !is_spatial_layer(n))) {  // layer_kinds.h
      ForwardReader reader = path;
      reader.layer = use.node;
      walk.readers.push_back(std::move(reader));
    } else if (first && n.is("QuantizeLinear") && walk.quantizer.kind == ForwardSighting::Kind::None) {
      walk.quantizer.kind = ForwardSighting::Kind::Quantizer;
      walk.quantizer.node = use.node;
      if (!n.outputs.empty())
        for (const auto& u : g.uses(n.outputs[0]))
          if (g.nodes()[u.node].is("DequantizeLinear")) walk.quantizer.dequantizer = u.node;
    } else if (walk.other.kind == ForwardSighting::Kind::None) {
      walk.other.kind = ForwardSighting::Kind::Other;
      walk.other.node = use.node;
      walk.other.slot = use.slot;
    }
  }
}

// The reason a sighting of select keeps BN.
Outcome kept_for(const Graph& g, const ForwardSighting& s) {
  using Kind = ForwardSighting::Kind;
  if (s.kind == Kind::GraphOutput)
    return Outcome::kept(Reason::GraphOutput, s.direct ? "its output is a graph output, which must keep BN's values"
                                                       : "its output reaches graph output '" + s.value +
                                                             "' through identity nodes, which must keep BN's values").at_(s.value);
  const std::string at = g.nodes()[s.node].display_name(s.node);
  if (s.kind == Kind::Quantizer) {
    const std::string dq = s.dequantizer >= 0 ? ", dequantized by " + describe_node(g, s.dequantizer) : "";
    return Outcome::kept(
        Reason::ActivationQuantizer,
        "its output feeds the activation quantizer " + describe_node(g, s.node) + dq +
            ", which rounds BN's output: folding BN into the layer after it would change the quantized activations").at_(at);
  }
  return Outcome::kept(Reason::OtherReader, s.slot < 0 ? "its output is read inside a subgraph of " + describe_node(g, s.node)
                                                      : "its output is also read by " + describe_node(g, s.node) +
                                                            ", which is not a layer it can fold into").at_(at);
}

// Rewires every reader of BN's output to BN's input and removes BN with its parameters.
void remove_forward_batchnorm(Graph& g, int bn, const BatchNormAffine& affine) {
  const std::string input = g.nodes()[bn].inputs[affine_data_slot(g, bn)];
  const std::string output = g.nodes()[bn].outputs[0];
  const std::vector<graph::Use> uses = g.uses(output);  // a copy: set_input edits the list
  for (const auto& u : uses) g.set_input(u.node, u.slot, input);
  g.remove_node(bn);
  g.remove_value_info(output);
  for (const auto& v : affine.parameter_values) g.drop_if_unused(v);
}

}  // namespace

std::optional<ForwardMatch> select_bn_forward(Graph& g, int bn) {
  const Node& n = g.nodes()[bn];
  if (n.inputs.empty() || n.inputs[affine_data_slot(g, bn)].empty() || n.outputs.empty() || n.outputs[0].empty())
    return std::nullopt;
  ForwardMatch match;
  visit(g, n.outputs[0], ForwardReader{}, match);
  if (match.quantizer.kind == ForwardSighting::Kind::None && match.readers.empty()) return std::nullopt;
  return match;
}

std::optional<std::vector<int64_t>> known_shape(const FoldContext& ctx, const std::string& value) {
  return proven_shape(ctx, value);
}

std::optional<std::vector<int64_t>> activation_shape(const FoldContext& ctx, int bn, const ForwardReader& reader) {
  std::vector<std::string> candidates{ctx.graph.nodes()[bn].inputs[affine_data_slot(ctx.graph, bn)]};
  candidates.insert(candidates.end(), reader.values.begin(), reader.values.end());
  std::optional<std::vector<int64_t>> partial;
  for (const auto& v : candidates) {
    auto s = known_shape(ctx, v);
    if (!s) continue;
    bool complete = true;
    for (size_t d = 1; d < s->size(); ++d)
      if ((*s)[d] < 0) complete = false;
    if (complete) return s;
    if (!partial) partial = s;
  }
  return partial;
}

Expected<FloatWeight> read_forward_weight(FoldContext& ctx, int layer) {
  Graph& g = ctx.graph;
  const Node& n = g.nodes()[layer];
  if (n.inputs.size() < 2 || n.inputs[1].empty() || n.outputs.empty() || n.outputs[0].empty())
    return Outcome::kept(Reason::MalformedLayer, describe_node(g, layer) + " has no weight input or no output");
  const std::string& weight = n.inputs[1];
  if (produced_by_dequantize(g, weight))
    return Outcome::kept(Reason::QuantizedWeight, describe_node(g, layer) + " takes its weight through " +
                                                 describe_node(g, g.producer(weight)) +
                                                 ": a quantized weight cannot absorb BN's per-input-channel factor "
                                                 "without new integers (re-quantization), which is not exact");
  QDQFOLD_TRY(w, read_float_weight(ctx, layer));
  if (!read_only_by(g, weight, layer)) {
    std::string who = "another node";
    for (const auto& u : g.uses(weight))
      if (u.node != layer) who = describe_node(g, u.node);
    return Outcome::kept(Reason::SharedWeight, "the weight '" + weight + "' of " + describe_node(g, layer) +
                                              " is also read by " + who +
                                              ", which must keep it: folding BN would need a second copy");
  }
  return std::move(w);
}

namespace {

struct ForwardPlan {
  BatchNormAffine affine;
  std::vector<LayerPlan> layers;  // one per reader, in the readers' order
};

// plan: what else sees BN's output, BN's affine map, then every layer's planner; Kept at the first that says
// no. NotApplicable for an affine along a MatMul's last axis (known only once read: the MatMul folds' own).
Expected<ForwardPlan> plan_bn_forward(FoldContext& ctx, int bn, const ForwardMatch& match) {
  Graph& g = ctx.graph;
  if (match.quantizer.kind != ForwardSighting::Kind::None) return kept_for(g, match.quantizer);
  if (match.other.kind != ForwardSighting::Kind::None) return kept_for(g, match.other);
  const auto& readers = match.readers;
  for (size_t i = 0; i < readers.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (readers[i].layer == readers[j].layer)
        return Outcome::kept(Reason::OtherReader, describe_node(g, readers[i].layer) + " reads its output twice");
  ForwardPlan plan;
  QDQFOLD_TRY(affine, read_batchnorm(ctx, bn));
  plan.affine = std::move(affine);
  if (plan.affine.last_axis) return Outcome::not_applicable();  // a MatMul's features, folded backwards only
  const std::string several =
      " (it has " + std::to_string(readers.size()) + " layer readers and folds only into all of them)";
  for (const auto& reader : readers) {
    auto one = is_spatial_layer(g.nodes()[reader.layer]) ? plan_bn_conv(ctx, bn, plan.affine, reader)
                                                        : plan_bn_gemm(ctx, bn, plan.affine, reader);
    if (readers.size() > 1) one = reworded(std::move(one), [&](const Outcome& o) {
      Outcome with = o;
      with.message += several;
      return with;
    });
    QDQFOLD_TRY(layer, std::move(one));
    plan.layers.push_back(std::move(layer));
  }
  return plan;
}

// apply: every layer's edit, the report entry, then the readers rewired to BN's input and BN removed.
Outcome apply_bn_forward(FoldContext& ctx, int bn, ForwardPlan& plan) {
  Graph& g = ctx.graph;
  Outcome done;
  done.verdict = Verdict::Folded;
  std::vector<std::string> notes, ops;
  for (auto& layer : plan.layers) {
    std::visit([&](const auto& edit) { apply_layer_edit(ctx, layer.layer, edit, done); }, layer.edit);
    done.into.push_back(g.nodes()[layer.layer].display_name(layer.layer));
    ops.push_back(g.nodes()[layer.layer].op_type);
    done.into_op = join_op_types(ops);  // each op once, in the table's order: not the readers' order
    if (done.code.empty()) done.code = code(layer.fold_name);
    else if (done.code != code(layer.fold_name)) done.code = code(FoldName::BnLayers);
    for (const auto& m : layer.metrics) {
      bool merged = false;
      for (auto& [k, v] : done.metrics)
        if (k == m.first) { v = k.rfind("max", 0) == 0 ? std::max(v, m.second) : v + m.second; merged = true; }
      if (!merged) done.metrics.push_back(m);
    }
    if (!layer.note.empty()) notes.push_back(describe_node(g, layer.layer) + ": " + layer.note);
  }
  remove_forward_batchnorm(g, bn, plan.affine);
  const size_t count = plan.layers.size();
  done.message = "folded forwards into " + std::to_string(count) + (count == 1 ? " layer" : " layers") +
                 ": input channels scaled by BN's factor" +
                 (plan.affine.zero_shift() ? "" : ", its shift carried through the weights into the bias");
  for (const auto& n : notes) done.message += "; " + n;
  return done;
}

}  // namespace

Outcome fold_bn_forward(FoldContext& ctx, int bn) {
  const std::optional<ForwardMatch> match = select_bn_forward(ctx.graph, bn);
  if (!match) return Outcome::not_applicable();
  QDQFOLD_TRY(plan, plan_bn_forward(ctx, bn, *match));
  return apply_bn_forward(ctx, bn, plan);
}

}  // namespace qdqfold::folds
