// qdq-layer-bn: a BatchNormalization folded backwards into a Conv / ConvTranspose / Gemm / MatMul whose weight
// comes through DequantizeLinear, without re-quantizing: the BN factor goes into the quantization scale.
//
//   int form:  q -> DQ(s, z) -> Conv(b) -> BN -> y      =>   q' -> DQ(s', z') -> Conv(b') -> y
//   MatMul + Add(constant c), either operand order:      =>   q' -> DQ(s', z') -> MatMul -> Add(c' = a * c + t)
//   QAT form:  W -> Q(s, z) -> DQ(s, z) -> Conv -> BN   =>   W' -> Q(s', z') -> DQ(s', z') -> Conv(b') -> y
//              (materialize_quantized_weights=True:         q' -> DQ(s', z') -> Conv(b') -> y)
//
//   BN(x)[o] = a[o] * x[o] + t[o]   and   DQ(q)[o] = (q[o] - z) * s, so a[o] * DQ(q)[o] = (q'[o] - z') * s' with
//   s' = s * |a[o]|  (a per-tensor scale becomes per-channel on the output-channel axis: axis needs opset >= 13)
//   q' = q, z' = z                 where a[o] >= 0
//   q' = c - q, z' = c - z         where a[o] < 0, c = 2z (zero point kept), else 0, else the complement
//                                  lo + hi (needs allow_nonzero_zero_point when z = 0); or keep the BN
//   W' = (q' - z') * s'            QAT form: W' lies on the new grid, so Q(W') = q' exactly (checked)
//   b'[o] = a[o] * b[o] + t[o] / beta   (beta: Gemm only). A float bias stays float. An int32 bias behind
//   DQ(s_b) is re-quantized with s_b' = s_x * s'_w (when s_b = s_x * s_w) or s_b * |a|: round(b' / s_b'),
//   whose error (at most half a step) is reported. A layer without bias gains one in the form the graph uses.
//
// Select (QdqLayerMatch: Direct, MatMulAdd or ActivationQuantizer), plan (QdqLayerPlan: the weight's rescale
// from weights/quantized_*, the bias from weights/quantized_bias, the opset decision), apply.
//
// Not exact, so not by default: Conv -> Q -> DQ -> BN (an activation quantizer between layer and BN, as
// onnxruntime's quantizer writes without pre-processing). drop_activation_quantizers=True removes that Q/DQ
// pair and folds; the report marks the fold approximate.
#include <algorithm>
#include "folds/layer_kinds.h"
#include <cmath>
#include <limits>
#include <unordered_set>

#include "kernels/per_channel.h"
#include "folds/directions/backward/backward.h"
#include "folds/expected.h"
#include "folds/weights/quantized_bias.h"
#include "folds/weights/quantized_weight.h"

namespace qdqfold::folds {

namespace {

using graph::Graph;
using graph::Node;
using graph::Use;
using wire::DataType;

std::string label(const Graph& g, int n) { return g.nodes()[n].op_type + " '" + g.nodes()[n].display_name(n) + "'"; }


// The rank of `value`, looking through the activation quantizers (elementwise) in front of it, in this graph
// or, for an outer-scope value read in a subgraph, in the enclosing graph that makes it.
std::optional<size_t> rank_through_quantizers(const Graph& graph, std::string value) {
  const Graph* g = &graph;
  for (int hops = 0; hops < 4; ++hops) {
    if (auto r = known_rank(*g, value)) return r;
    while (g->parent && !g->defines(value)) g = g->parent;
    const int p = g->producer(value);
    if (p < 0 || !(is_quantize(g->nodes()[p]) || is_dequantize(g->nodes()[p])) || g->nodes()[p].inputs.empty()) break;
    value = g->nodes()[p].inputs[0];
  }
  return std::nullopt;
}

// allow_opset_upgrade: a per-tensor scale needs DequantizeLinear's `axis` (opset 13) to become per-channel.
// Raising the default-domain opset of a whole model is safe only when every op in it means at 13 what it
// meant before; these did not change between opset 10 and 13 beyond new types and optional inputs (Clip,
// Pad, Resize, Split, Squeeze, Unsqueeze, ReduceSum, Softmax and friends did, so a model with them stays).
bool can_raise_opset_to_13(graph::Model& m, std::string& why) {
  static const std::unordered_set<std::string> unchanged = {
      "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "PRelu",
      "Sigmoid", "Tanh", "HardSigmoid", "Elu", "Selu", "Softplus", "Softsign", "Exp", "Log", "Sqrt", "Abs", "Neg",
      "Pow", "Floor", "Ceil", "Erf", "Sign", "BatchNormalization", "InstanceNormalization", "QuantizeLinear",
      "DequantizeLinear", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
      "Concat", "Transpose", "Identity", "Constant", "Shape", "Size", "Gather", "Cast", "Sum", "Mean", "Max", "Min",
      "Equal", "Less", "Greater", "Where", "Not", "And", "Or", "Expand", "Tile", "ConstantOfShape", "MatMulInteger",
      "ConvInteger", "QLinearConv", "QLinearMatMul", "LRN"};
  if (m.ir_version < 7) {
    why = "its IR version " + std::to_string(m.ir_version) + " predates opset 13";
    return false;
  }
  if (!m.functions.empty()) {
    why = "it has model-local functions with their own opset imports";
    return false;
  }
  for (Graph* g : m.all_graphs())
    for (const Node& n : g->nodes())
      if (!n.removed() && (n.domain.empty() || n.domain == "ai.onnx") && !unchanged.count(n.op_type)) {
        why = "it uses " + n.op_type + ", whose definition changed by opset 13";
        return false;
      }
  return true;
}

// drop_activation_quantizers: Kept ("quantizer-would-be-lost") unless every reader of BN `bn`'s output is a
// QuantizeLinear, which then quantizes the folded layer's output in the dropped quantizer's place.
std::optional<Outcome> quantizer_lost_by_dropping(Graph& g, int bn, const std::string& who,
                                                  const std::string& quantizer) {
  const std::string& out = g.nodes()[bn].outputs[0];
  std::string reader = g.is_graph_output(out) ? "a graph output" : "";
  for (const auto& u : g.uses(out))
    if (reader.empty() && (u.slot != 0 || !is_quantize(g.nodes()[u.node]))) reader = label(g, u.node);
  if (reader.empty() && !g.uses(out).empty()) return std::nullopt;
  if (reader.empty()) reader = "nothing";
  return Outcome::kept(Reason::QuantizerWouldBeLost,
                       "drop_activation_quantizers would drop " + quantizer + ", the only quantizer after " + who +
                           ": the BN's output feeds " + reader + ", not a QuantizeLinear, so the folded layer would "
                           "have no quantizer after it and a runtime could no longer run it as a quantized kernel");
}

// ---------------------------------------------------------------- select: the pattern's nodes

// The nodes of the pattern. Selection decides only "mine or not": every reason to keep is the plan's.
struct QdqLayerMatch {
  enum class Shape {
    Direct,               // layer -> BN
    MatMulAdd,            // MatMul -> Add(constant c) -> BN (either operand order)
    ActivationQuantizer,  // layer -> QuantizeLinear -> DequantizeLinear -> BN
  };
  Shape shape = Shape::Direct;
  int bn = -1;
  int layer = -1;
  int weight_dq = -1;  // the DequantizeLinear of the layer's weight; -1 (float weight) only for
                       // ActivationQuantizer, whose plan keeps it
  int add = -1;        // MatMulAdd: the Add, and which of its inputs holds c
  int add_bias_slot = -1;
  int act_q = -1, act_dq = -1;  // ActivationQuantizer: the pair
};

std::optional<QdqLayerMatch> select_qdq_layer_bn(Graph& g, int bn) {
  const int producer = batchnorm_input_producer(g, bn);
  if (producer < 0) return std::nullopt;
  QdqLayerMatch m;
  m.bn = bn;
  m.layer = producer;
  const Node& p = g.nodes()[producer];
  if (is_dequantize(p)) {
    const int qa = p.inputs.empty() ? -1 : g.producer(p.inputs[0]);
    if (qa < 0 || !is_quantize(g.nodes()[qa]) || g.nodes()[qa].inputs.empty()) return std::nullopt;
    m.shape = QdqLayerMatch::Shape::ActivationQuantizer;
    m.layer = g.producer(g.nodes()[qa].inputs[0]);
    if (m.layer < 0) return std::nullopt;
    m.act_q = qa;
    m.act_dq = producer;
  } else if (p.is("Add")) {
    const auto ma = select_matmul_add(g, producer);
    if (!ma) return std::nullopt;
    m.shape = QdqLayerMatch::Shape::MatMulAdd;
    m.add = ma->add;
    m.add_bias_slot = ma->bias_slot;
    m.layer = ma->matmul;
  }
  const Node& ln = g.nodes()[m.layer];
  if (!is_layer(ln) || ln.inputs.size() < 2 || ln.outputs.size() != 1) return std::nullopt;
  const int wdq = g.producer(ln.inputs[1]);
  if (wdq >= 0 && is_dequantize(g.nodes()[wdq])) m.weight_dq = wdq;
  // A float weight is the float folds' pattern, unless an activation quantizer makes it this fold's to keep.
  if (m.weight_dq < 0 && m.shape != QdqLayerMatch::Shape::ActivationQuantizer) return std::nullopt;
  return m;
}

// ---------------------------------------------------------------- plan: every check, nothing edited

// Everything the edit needs, decided before it starts.
struct QdqLayerPlan {
  std::string who;  // "Conv 'name'" for messages
  BatchNormAffine affine;
  QuantizedWeight weight;
  WeightLayout layout;
  RescaledWeight rescaled;
  bool materialize = false;     // QAT form written as integers behind a lone DequantizeLinear
  bool raise_opset = false;     // allow_opset_upgrade: the model goes to opset 13 for the per-channel axis
  double beta = 1.0;            // Gemm's beta (the shift enters the bias as t / beta)
  BiasPlan bias;                // the layer's bias (kind None for MatMulAdd: the Add's bias carries the shift)
  struct AddBias {              // MatMulAdd: c' = a * c + t
    FoldedBias folded;
    std::string raw;
    int32_t data_type = 0;
  } add_bias;
};

// The layer's output may be handed on: the activation quantizer (dropped only with drop_activation_quantizers,
// and only when a quantizer stays after the layer), or the Add, or the BN reads it alone.
std::optional<Outcome> check_connections(FoldContext& ctx, const QdqLayerMatch& m, const std::string& who) {
  Graph& g = ctx.graph;
  const Node& ln = g.nodes()[m.layer];
  switch (m.shape) {
    case QdqLayerMatch::Shape::ActivationQuantizer: {
      const bool quantized_weight = m.weight_dq >= 0;
      const std::string quantizer = label(g, m.act_q);
      if (!ctx.options.drop_activation_quantizers || !quantized_weight)
        return Outcome::kept(Reason::ActivationQuantizer,
                             "the activation quantizer " + quantizer + " (QuantizeLinear -> DequantizeLinear) between " +
                                 who + " and the BN rounds the layer's output before normalization, so no exact fold "
                                 "can cross it" +
                                 (quantized_weight ? "; drop_activation_quantizers=True removes it and folds approximately"
                                                   : ""));
      QDQFOLD_CHECK(layer_output_blocker(g, m.layer, ln.outputs[0], m.act_q));
      if (!read_only_by(g, g.nodes()[m.act_q].outputs[0], m.act_dq) || !read_only_by(g, g.nodes()[m.act_dq].outputs[0], m.bn))
        return Outcome::kept(Reason::ActivationQuantizer, "the activation quantizer " + quantizer + " between " + who +
                                                              " and the BN also feeds other nodes, so it cannot be dropped");
      // Dropping it must leave the layer with a quantizer after it (the BN's readers), or a runtime can no
      // longer run the layer as a quantized kernel (onnxruntime's QDQ selectors want Q right after the layer).
      return quantizer_lost_by_dropping(g, m.bn, who, quantizer);
    }
    case QdqLayerMatch::Shape::MatMulAdd:
      if (ln.inputs.size() != 2) return Outcome::kept(Reason::Malformed, who + " has an unexpected arity");
      QDQFOLD_CHECK(layer_output_blocker(g, m.layer, ln.outputs[0], m.add, 1 - m.add_bias_slot));
      return layer_output_blocker(g, m.add, g.nodes()[m.add].outputs[0], m.bn);
    case QdqLayerMatch::Shape::Direct:
      return layer_output_blocker(g, m.layer, ln.outputs[0], m.bn);
  }
  return std::nullopt;
}

// A per-tensor scale that must become per-channel needs DequantizeLinear's axis (opset 13): keep the BN, or
// raise the model's opset where allow_opset_upgrade allows it and that is safe.
std::optional<Outcome> plan_opset(FoldContext& ctx, QdqLayerPlan& plan) {
  std::optional<Outcome> kept = per_channel_scale_needs_axis(plan.weight, plan.layout, plan.affine.scale, plan.who);
  if (!kept) return std::nullopt;
  std::string blocker;
  if (!ctx.options.allow_opset_upgrade) {
    kept->message += "; allow_opset_upgrade=True raises the model's opset to 13 where that is safe";
    return kept;
  }
  if (!can_raise_opset_to_13(ctx.model, blocker)) {
    kept->message += "; allow_opset_upgrade cannot raise it: " + blocker;
    return kept;
  }
  plan.weight.axis_supported = true;  // once the model is at opset 13
  plan.raise_opset = true;
  return std::nullopt;
}

// MatMul + Add: the Add's bias becomes a * c + t, in the Add's type.
Expected<QdqLayerPlan::AddBias> plan_add_bias(FoldContext& ctx, const QdqLayerMatch& m, const QdqLayerPlan& plan) {
  Graph& g = ctx.graph;
  const std::string& name = g.nodes()[m.add].inputs[m.add_bias_slot];
  const std::string what = "the bias '" + name + "' of " + label(g, m.add);
  auto values = constant_values(g, name);
  auto dims = constant_dims(g, name);
  if (!values || !dims) return Outcome::kept(Reason::NonConstantBias, what + " is not a readable constant");
  QdqLayerPlan::AddBias out;
  // The Add's type is the MatMul's output type, the weight DequantizeLinear's (its scale's) type.
  auto ref = g.constant(name);
  out.data_type = ref && graph::is_float_type(ref->tensor.data_type) ? ref->tensor.data_type : plan.weight.scale_type;
  QDQFOLD_TRY(folded, fold_bias(dims, *values, plan.affine.scale, plan.affine.shift, what));
  out.folded = std::move(folded);
  QDQFOLD_TRY(raw, store_or_keep(out.data_type, out.folded.values, "bias"));
  out.raw = std::move(raw);
  return out;
}

Expected<QdqLayerPlan> plan_qdq_layer_bn(FoldContext& ctx, const QdqLayerMatch& m) {
  Graph& g = ctx.graph;
  const Node& ln = g.nodes()[m.layer];
  QdqLayerPlan plan;
  plan.who = label(g, m.layer);
  const std::string& who = plan.who;
  QDQFOLD_CHECK(check_connections(ctx, m, who));
  if (!read_only_by(g, ln.inputs[1], m.layer))
    return Outcome::kept(Reason::SharedWeight, "the dequantized weight '" + ln.inputs[1] + "' of " + who +
                                                   " is also read by another node, which must keep its values");
  QDQFOLD_TRY(affine, read_batchnorm(ctx, m.bn));
  plan.affine = std::move(affine);
  QDQFOLD_TRY(weight, read_quantized_weight(g, m.weight_dq, m.layer));
  plan.weight = std::move(weight);
  std::string why;
  auto wl = weight_layout(ln, plan.weight.dims, why, /*backward_fold=*/true);
  if (!wl) return Outcome::kept(Reason::UnsupportedLayer, who + ": " + why);
  plan.layout = *wl;
  if (static_cast<int64_t>(plan.affine.scale.size()) != wl->out_channels)
    return Outcome::kept(Reason::ShapeMismatch, "the BN has " + std::to_string(plan.affine.scale.size()) +
                                                    " channels but " + who + " has " + std::to_string(wl->out_channels) +
                                                    " output channels");
  if (ln.is("MatMul") && rank_through_quantizers(g, ln.inputs[0]) != std::optional<size_t>(2))
    return Outcome::kept(Reason::NotA2dInput, "the input of " + who + " is not known to be 2-D, so BN's channel axis 1 "
                                                  "may not be the MatMul's output features");
  plan.beta = ln.is("Gemm") ? ln.attr_float("beta", 1.0f) : 1.0;
  if (plan.beta == 0)
    return Outcome::kept(Reason::UnsupportedBias, who + " has beta=0, so it cannot carry the BN shift in its bias");

  // trt::DequantizeLinear takes a float weight: never materialized as integers.
  plan.materialize = plan.weight.qat() && !plan.weight.fused() && ctx.options.materialize_quantized_weights;
  QDQFOLD_CHECK(plan_opset(ctx, plan));
  QDQFOLD_TRY(rescaled, rescale_quantized_weight(plan.weight, plan.layout, plan.affine.scale, ctx.options,
                                                 plan.weight.qat() && !plan.materialize, who, ctx.deferred_checks()));
  plan.rescaled = std::move(rescaled);
  const auto& zero = plan.rescaled.zero;
  if (plan.weight.fused() && std::any_of(zero.begin(), zero.end(), [](int64_t z) { return z != 0; }))
    return Outcome::kept(Reason::TensorrtQuantizer, who + " is quantized by trt::DequantizeLinear, which has no zero "
                                                          "point for the complement form");
  if (m.shape == QdqLayerMatch::Shape::MatMulAdd) {
    QDQFOLD_TRY(add_bias, plan_add_bias(ctx, m, plan));
    plan.add_bias = std::move(add_bias);
  } else {
    QDQFOLD_TRY(bias, plan_bias(ctx, m.layer, plan.layout, plan.weight, plan.rescaled, plan.affine, plan.beta,
                                plan.raise_opset, who));
    plan.bias = std::move(bias);
  }
  return plan;
}

// ---------------------------------------------------------------- apply: edits only

// The report sentence for a fold.
std::string describe_fold(const Graph& g, const QdqLayerMatch& m, const QdqLayerPlan& p) {
  return "folded into the quantized weight of " + p.who +
         (m.add >= 0 ? " and the bias of " + label(g, m.add) + " (c' = a * c + t)" : std::string()) +
         ": scale s' = s * |a|" + (p.rescaled.promoted ? " (per-tensor scale made per-channel)" : "") +
         (p.rescaled.negated_channels
              ? ", integers mirrored in " + std::to_string(p.rescaled.negated_channels) + " channels with a < 0"
              : "") +
         (p.rescaled.complement ? " (complement form: nonzero zero point)" : "") +
         (p.weight.qat() ? (p.materialize ? ", weight materialized as integers" : ", float weight snapped to the grid")
                         : "") +
         (p.bias.kind == BiasPlan::Int32Existing || p.bias.kind == BiasPlan::Int32New ? ", int32 bias re-quantized"
                                                                                      : "");
}

// drop_activation_quantizers: the layer feeds the BN's readers directly.
void drop_activation_quantizer(Graph& g, const QdqLayerMatch& m, const std::string& layer_output, Outcome& out) {
  auto s = g.constant(g.nodes()[m.act_q].inputs.size() > 1 ? g.nodes()[m.act_q].inputs[1] : "");
  if (s)
    if (auto v = s->tensor.values(); v && !v->empty()) out.metrics.emplace_back("dropped_quantizer_scale", (*v)[0]);
  const std::vector<std::string> params = g.nodes()[m.act_q].inputs;
  const std::vector<std::string> dq_params = g.nodes()[m.act_dq].inputs;
  g.remove_value_info(g.nodes()[m.act_q].outputs[0]);
  g.remove_value_info(layer_output);
  g.remove_node(m.act_dq);
  g.remove_node(m.act_q);
  for (size_t k = 1; k < params.size(); ++k) g.drop_if_unused(params[k]);
  for (size_t k = 1; k < dq_params.size(); ++k) g.drop_if_unused(dq_params[k]);
  out.exact = false;
  out.message += "; the activation quantizer between them was dropped (not exact)";
}

Outcome apply_qdq_layer_bn(FoldContext& ctx, const QdqLayerMatch& m, const QdqLayerPlan& plan) {
  Graph& g = ctx.graph;
  Outcome out = Outcome::folded(FoldName::QdqLayerBn);
  const Node& ln = g.nodes()[m.layer];
  out.into = {ln.display_name(m.layer)};
  if (m.add >= 0) out.into.push_back(g.nodes()[m.add].display_name(m.add));
  out.into_op = ln.op_type;
  out.message = describe_fold(g, m, plan);
  if (plan.raise_opset) {
    ctx.model.raise_opset("", 13);
    out.message += "; the model's opset was raised to 13 for the per-channel axis";
  }
  const std::string layer_output = ln.outputs[0];  // nodes may move once edits add nodes
  const std::string layer_base = ln.name.empty() ? ln.outputs[0] : ln.name;
  write_quantized_weight(ctx, plan.weight, plan.layout, plan.rescaled, plan.materialize, out);
  if (m.shape == QdqLayerMatch::Shape::MatMulAdd) {
    const auto& c = plan.add_bias;
    note_bias_error(ctx, m.layer, plan.affine.scale, 1.0, {}, out);
    write_layer_input(ctx, m.add, m.add_bias_slot, c.data_type, c.folded.dims, c.raw, layer_base + "_bias", out);
    take_over_batchnorm_output(g, m.add, 0, m.bn, plan.affine);
    return out;
  }
  write_bias(ctx, m.layer, m.weight_dq, plan.bias, out);
  if (plan.bias.kind == BiasPlan::Int32Existing || plan.bias.kind == BiasPlan::Int32New)
    out.metrics.emplace_back("bias_requantization_error", plan.bias.max_error);
  note_bias_error(ctx, m.layer, plan.affine.scale, plan.beta, plan.bias.errors, out);
  if (m.shape == QdqLayerMatch::Shape::ActivationQuantizer) drop_activation_quantizer(g, m, layer_output, out);
  take_over_batchnorm_output(g, m.layer, 0, m.bn, plan.affine);
  return out;
}

}  // namespace

Outcome fold_qdq_layer_bn(FoldContext& ctx, int bn) {
  const std::optional<QdqLayerMatch> match = select_qdq_layer_bn(ctx.graph, bn);
  if (!match) return Outcome::not_applicable();
  QDQFOLD_TRY(plan, plan_qdq_layer_bn(ctx, *match));
  return apply_qdq_layer_bn(ctx, *match, plan);
}

}  // namespace qdqfold::folds
