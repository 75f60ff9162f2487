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

std::string describe_node(const Graph& g, int node) {
  return g.nodes()[node].op_type + " '" + g.nodes()[node].display_name(node) + "'";
}

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

struct Walk {
  std::vector<ForwardReader> layers;
  std::optional<Outcome> quantizer;  // an activation quantizer reads BN's output
  std::optional<Outcome> other;      // something that is not a layer sees BN's output
};

void visit(Graph& g, const std::string& value, ForwardReader path, Walk& walk) {
  if (g.is_graph_output(value) && !walk.other)
    walk.other = Outcome::kept(Reason::GraphOutput, path.values.empty() && path.reshape < 0
                                                   ? "its output is a graph output, which must keep BN's values"
                                                   : "its output reaches graph output '" + value +
                                                         "' through identity nodes, which must keep BN's values").at_(value);
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
      walk.layers.push_back(std::move(reader));
    } else if (first && n.is("QuantizeLinear") && !walk.quantizer) {
      std::string dq;
      if (!n.outputs.empty())
        for (const auto& u : g.uses(n.outputs[0]))
          if (g.nodes()[u.node].is("DequantizeLinear")) dq = ", dequantized by " + describe_node(g, u.node);
      walk.quantizer = Outcome::kept(
          Reason::ActivationQuantizer,
          "its output feeds the activation quantizer " + describe_node(g, use.node) + dq +
              ", which rounds BN's output: folding BN into the layer after it would change the quantized activations").at_(n.display_name(use.node));
    } else if (!walk.other) {
      walk.other = Outcome::kept(
          Reason::OtherReader, use.slot < 0 ? "its output is read inside a subgraph of " + describe_node(g, use.node)
                                       : "its output is also read by " + describe_node(g, use.node) +
                                             ", which is not a layer it can fold into").at_(n.display_name(use.node));
    }
  }
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

std::variant<std::vector<ForwardReader>, Outcome> forward_readers(FoldContext& ctx, int bn) {
  Graph& g = ctx.graph;
  const Node& n = g.nodes()[bn];
  if (n.inputs.empty() || n.inputs[affine_data_slot(g, bn)].empty() || n.outputs.empty() || n.outputs[0].empty())
    return Outcome::not_applicable();
  Walk walk;
  visit(g, n.outputs[0], ForwardReader{}, walk);
  if (walk.quantizer) return *walk.quantizer;
  if (walk.layers.empty()) return Outcome::not_applicable();
  if (walk.other) return *walk.other;
  for (size_t i = 0; i < walk.layers.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (walk.layers[i].layer == walk.layers[j].layer)
        return Outcome::kept(Reason::OtherReader, describe_node(g, walk.layers[i].layer) + " reads its output twice");
  return walk.layers;
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

std::variant<FloatWeight, Outcome> read_forward_weight(FoldContext& ctx, int layer) {
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
  auto w = read_float_weight(ctx, layer);
  if (std::holds_alternative<Outcome>(w)) return w;
  if (!read_only_by(g, weight, layer)) {
    std::string who = "another node";
    for (const auto& u : g.uses(weight))
      if (u.node != layer) who = describe_node(g, u.node);
    return Outcome::kept(Reason::SharedWeight, "the weight '" + weight + "' of " + describe_node(g, layer) +
                                              " is also read by " + who +
                                              ", which must keep it: folding BN would need a second copy");
  }
  return w;
}

void add_constant_after(FoldContext& ctx, int layer, int32_t data_type, const std::vector<int64_t>& dims,
                        const std::string& raw, const char* suffix, Outcome& outcome) {
  Graph& g = ctx.graph;
  const std::string output = g.nodes()[layer].outputs[0];
  const std::string base = g.nodes()[layer].display_name(layer);
  const std::string constant = new_tensor_name(ctx.model, base, suffix);
  const std::string renamed = ctx.model.fresh_name(output + "_before" + suffix);
  g.add_tensor(constant, graph::encode_tensor(constant, data_type, dims, raw));
  outcome.new_tensors.push_back(constant);
  g.set_output(layer, 0, renamed);
  Node add;
  add.op_type = "Add";
  add.name = ctx.model.fresh_name(base + suffix);
  add.inputs = {renamed, constant};
  add.outputs = {output};
  g.add_node(std::move(add), layer + 1);
}

Outcome fold_bn_forward(FoldContext& ctx, int bn) {
  Graph& g = ctx.graph;
  QDQFOLD_TRY(readers, forward_readers(ctx, bn));
  QDQFOLD_TRY(affine, read_batchnorm(ctx, bn));
  if (affine.last_axis) return Outcome::not_applicable();  // a MatMul's features, folded backwards only

  std::vector<LayerPlan> plans;
  for (const auto& reader : readers) {
    const Node& layer = g.nodes()[reader.layer];
    PlanOrKept plan = is_spatial_layer(layer) ? plan_bn_conv(ctx, bn, affine, reader)
                                              : plan_bn_gemm(ctx, bn, affine, reader);
    if (auto* o = std::get_if<Outcome>(&plan)) {
      if (o->verdict == Verdict::Kept && readers.size() > 1)
        o->message += " (it has " + std::to_string(readers.size()) + " layer readers and folds only into all of them)";
      return std::move(*o);
    }
    plans.push_back(std::move(std::get<LayerPlan>(plan)));
  }

  // Every layer can take BN exactly: edit.
  Outcome done;
  done.verdict = Verdict::Folded;
  std::vector<std::string> notes, ops;
  for (auto& plan : plans) {
    plan.apply(ctx, done);
    done.into.push_back(g.nodes()[plan.layer].display_name(plan.layer));
    ops.push_back(g.nodes()[plan.layer].op_type);
    done.into_op = join_op_types(ops);  // each op once, in the table's order: not the readers' order
    if (done.code.empty()) done.code = code(plan.fold_name);
    else if (done.code != code(plan.fold_name)) done.code = code(FoldName::BnLayers);
    for (const auto& m : plan.metrics) {
      bool merged = false;
      for (auto& [k, v] : done.metrics)
        if (k == m.first) { v = k.rfind("max", 0) == 0 ? std::max(v, m.second) : v + m.second; merged = true; }
      if (!merged) done.metrics.push_back(m);
    }
    if (!plan.note.empty()) notes.push_back(describe_node(g, plan.layer) + ": " + plan.note);
  }
  remove_forward_batchnorm(g, bn, affine);
  done.message = "folded forwards into " + std::to_string(plans.size()) + (plans.size() == 1 ? " layer" : " layers") +
                 ": input channels scaled by BN's factor" +
                 (affine.zero_shift() ? "" : ", its shift carried through the weights into the bias");
  for (const auto& n : notes) done.message += "; " + n;
  return done;
}

}  // namespace qdqfold::folds
