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
// Not exact, so not by default: Conv -> Q -> DQ -> BN (an activation quantizer between layer and BN, as
// onnxruntime's quantizer writes without pre-processing). drop_activation_quantizers=True removes that Q/DQ
// pair and folds; the report marks the fold approximate.
#include <cmath>
#include <limits>
#include <unordered_set>

#include "kernels/per_channel.h"
#include "folds/directions/backward/backward.h"
#include "folds/folds.h"
#include "folds/weights/quantized_weight.h"

namespace qdqfold::folds {

namespace {

using graph::Graph;
using graph::Node;
using graph::Use;
using wire::DataType;

std::string label(const Graph& g, int n) { return g.nodes[n].op_type + " '" + g.nodes[n].display_name(n) + "'"; }

bool is_layer(const Node& n) { return n.is("Conv") || n.is("ConvTranspose") || n.is("Gemm") || n.is("MatMul"); }

// s_x: the scale of the layer's input activation when a DequantizeLinear with one constant scale makes it.
std::optional<double> input_scale(Graph& g, const Node& layer) {
  const int p = layer.inputs.empty() ? -1 : g.producer(layer.inputs[0]);
  if (p < 0 || !is_dequantize(g.nodes[p]) || g.nodes[p].inputs.size() < 2) return std::nullopt;
  auto s = g.constant(g.nodes[p].inputs[1]);
  if (!s) return std::nullopt;
  auto v = s->tensor.values();
  if (!v || v->size() != 1) return std::nullopt;
  return (*v)[0];
}

// The rank of `value`, looking through the activation quantizers (elementwise) in front of it, in this graph
// or, for an outer-scope value read in a subgraph, in the enclosing graph that makes it.
std::optional<size_t> rank_through_quantizers(const Graph& graph, std::string value) {
  const Graph* g = &graph;
  for (int hops = 0; hops < 4; ++hops) {
    if (auto r = known_rank(*g, value)) return r;
    while (g->parent && !g->defines(value)) g = g->parent;
    const int p = g->producer(value);
    if (p < 0 || !(is_quantize(g->nodes[p]) || is_dequantize(g->nodes[p])) || g->nodes[p].inputs.empty()) break;
    value = g->nodes[p].inputs[0];
  }
  return std::nullopt;
}

// The weight scale that applies to output channel o, when the scale is per tensor or per output channel.
std::optional<double> channel_scale(const QuantLayout& l, const std::vector<double>& scale, const WeightLayout& wl,
                                    int64_t o) {
  if (l.per_tensor()) return scale[0];
  if (l.block_size > 0 || l.axis != wl.out_axis) return std::nullopt;
  return scale[static_cast<size_t>(wl.p_is_output ? o : o % wl.Q)];
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
    for (const Node& n : g->nodes)
      if (!n.removed() && (n.domain.empty() || n.domain == "ai.onnx") && !unchanged.count(n.op_type)) {
        why = "it uses " + n.op_type + ", whose definition changed by opset 13";
        return false;
      }
  return true;
}

// How the other quantized layers of the graph carry their bias: int32 behind DequantizeLinear, float, or
// no evidence either way.
enum class BiasForm { Unknown, Float, Int32 };
BiasForm graph_bias_form(Graph& g, int except) {
  bool saw_float = false;
  for (size_t k = 0; k < g.nodes.size(); ++k) {
    const Node& n = g.nodes[k];
    if (n.removed() || static_cast<int>(k) == except || !(n.is("Conv") || n.is("ConvTranspose") || n.is("Gemm"))) continue;
    if (n.inputs.size() < 3 || n.inputs[2].empty() || n.inputs[1].empty()) continue;
    const int w = g.producer(n.inputs[1]);
    if (w < 0 || !is_dequantize(g.nodes[w])) continue;
    const int b = g.producer(n.inputs[2]);
    if (b >= 0 && is_dequantize(g.nodes[b])) return BiasForm::Int32;
    if (g.constant(n.inputs[2])) saw_float = true;
  }
  return saw_float ? BiasForm::Float : BiasForm::Unknown;
}

// The folded bias, decided before anything is edited.
struct BiasPlan {
  enum Kind { None, Float, Int32Existing, Int32New } kind = None;
  std::string old;                   // the layer's bias input (empty: none)
  int32_t data_type = 0;             // Float: element type; Int32*: type of the bias scale
  std::vector<int64_t> dims;
  std::vector<double> values;        // Float: the new bias
  std::vector<int64_t> ints;         // Int32*: the new integers
  std::vector<double> scale;         // Int32*: one scale per output channel
  int bias_dq = -1;                  // Int32Existing: its DequantizeLinear
  bool zero_present = false;
  bool zero_nonzero = false;         // Int32Existing: the old zero point is not all 0 (the new one is)
  bool promote = false;              // Int32Existing: per-tensor scale becomes per-channel
  double max_error = 0;              // Int32*: largest |round(b'/s) * s - b'|
  std::vector<double> errors;        // Int32*: |round(b'/s) * s - b'| per output channel
};

// ints = round(target / scale) per channel; Kept on int32 overflow or a zero scale that cannot hold the bias.
std::optional<Outcome> requantize(const std::vector<double>& target, BiasPlan& plan, const std::string& who) {
  plan.ints.assign(target.size(), 0);
  plan.errors.assign(target.size(), 0.0);
  for (size_t o = 0; o < target.size(); ++o) {
    if (plan.scale[o] == 0) {
      if (target[o] != 0)
        return Outcome::kept(Reason::ZeroFactor, "the int32 bias of " + who + " would need a zero scale in channel " +
                                                std::to_string(o) + " for a nonzero value");
      continue;
    }
    const double n = std::nearbyint(target[o] / plan.scale[o]);
    if (!(std::fabs(n) <= static_cast<double>(std::numeric_limits<int32_t>::max())))
      return Outcome::kept(Reason::BiasOverflow, "the re-quantized int32 bias of " + who + " overflows int32 in channel " +
                                                std::to_string(o));
    plan.ints[o] = static_cast<int64_t>(n);
    plan.errors[o] = std::fabs(n * plan.scale[o] - target[o]);
    plan.max_error = std::max(plan.max_error, plan.errors[o]);
  }
  return std::nullopt;
}

// A float bias in `data_type` must hold every folded value; Kept ("overflow") otherwise.
std::optional<Outcome> check_float_bias(const BiasPlan& plan, const std::string& who) {
  if (plan.kind != BiasPlan::Float || kernels::store_values(plan.data_type, plan.values)) return std::nullopt;
  return Outcome::kept(Reason::Overflow, "the folded bias of " + who + " does not fit in " + graph::data_type_name(plan.data_type) +
                                       ": the BN's arithmetic overflows there");
}

// A float16 / bfloat16 layer fed by DequantizeLinear: onnxruntime's BiasQuantization (graph optimisations
// BASIC and above) turns a float bias into int32 with a Div and a Round in the bias's own type, which a
// float16 bias of a folded layer (b' = a b + t, on the step s_x * s_w * |a|) does not survive (float16 holds
// integers exactly only up to 2048 and overflows at 65504). The int32 form behind DequantizeLinear is left
// alone by every optimisation level, so such a layer gets its bias in that form.
std::variant<BiasPlan, Outcome> plan_int32_for_half(const std::vector<double>& target, const WeightLayout& wl,
                                                    const QuantizedWeight& w, const RescaledWeight& r, double s_x,
                                                    BiasPlan plan, const std::string& who) {
  const auto M = target.size();
  plan.scale.resize(M);
  for (size_t o = 0; o < M; ++o)
    plan.scale[o] = kernels::round_to_float_type(s_x * *channel_scale(r.layout, r.scale, wl, static_cast<int64_t>(o)),
                                                 w.scale_type);
  plan.kind = BiasPlan::Int32New;
  plan.data_type = w.scale_type;
  plan.dims = {static_cast<int64_t>(M)};
  if (auto kept = requantize(target, plan, who)) {
    kept->message += std::string(" (a ") + graph::data_type_name(w.scale_type) +
                     " layer's bias must be int32 behind DequantizeLinear: onnxruntime re-quantizes a float one in " +
                     graph::data_type_name(w.scale_type) + ")";
    return *kept;
  }
  return plan;
}

bool is_half(int32_t t) {
  return t == static_cast<int32_t>(DataType::Float16) || t == static_cast<int32_t>(DataType::Bfloat16);
}

std::variant<BiasPlan, Outcome> plan_bias(FoldContext& ctx, int layer, const WeightLayout& wl, const QuantizedWeight& w,
                                          const RescaledWeight& r, const BatchNormAffine& bn, double beta,
                                          bool raising_opset, const std::string& who) {
  Graph& g = ctx.graph;
  const Node& n = g.nodes[layer];
  const auto M = static_cast<size_t>(wl.out_channels);
  const std::vector<double>& a = bn.scale;
  BiasPlan plan;
  plan.old = n.inputs.size() > 2 && !n.is("MatMul") ? n.inputs[2] : "";
  const int32_t layer_type = w.qat() ? w.float_type : w.scale_type;
  const std::optional<double> s_x = input_scale(g, n);
  std::vector<double> target(M);
  // Where the int32 form applies to a float16 / bfloat16 layer (see plan_int32_for_half).
  bool half_int32 = s_x && w.axis_supported && is_half(layer_type) && is_half(w.scale_type);
  for (size_t o = 0; o < M && half_int32; ++o)
    half_int32 = channel_scale(r.layout, r.scale, wl, static_cast<int64_t>(o)).has_value();

  if (plan.old.empty()) {
    for (size_t o = 0; o < M; ++o) target[o] = bn.shift[o] / beta;
    bool all_zero = true;
    for (double v : target) all_zero = all_zero && v == 0;
    if (all_zero) return plan;
    if (half_int32) return plan_int32_for_half(target, wl, w, r, *s_x, plan, who);
    // int32 behind DequantizeLinear where the graph's quantized layers use that (or, with no evidence, for the
    // int form, as onnxruntime's quantizer writes it); float otherwise.
    const BiasForm form = graph_bias_form(g, layer);
    bool int32 = s_x && w.axis_supported && (form == BiasForm::Int32 || (form == BiasForm::Unknown && !w.qat()));
    if (int32) {
      plan.scale.resize(M);
      for (size_t o = 0; o < M && int32; ++o) {
        auto sw = channel_scale(r.layout, r.scale, wl, static_cast<int64_t>(o));
        int32 = sw.has_value();
        if (sw) plan.scale[o] = kernels::round_to_float_type(*s_x * *sw, w.scale_type);
      }
    }
    if (int32) {
      plan.kind = BiasPlan::Int32New;
      plan.data_type = w.scale_type;
      plan.dims = {static_cast<int64_t>(M)};
      if (!requantize(target, plan, who)) return plan;
      // Not representable as int32 (a zero scale or overflow): a float bias carries it exactly.
      plan.ints.clear();
      plan.max_error = 0;
    }
    plan.kind = BiasPlan::Float;
    plan.data_type = layer_type;
    plan.dims = {static_cast<int64_t>(M)};
    plan.values = target;
    if (auto kept = check_float_bias(plan, who)) return *kept;
    return plan;
  }

  const int bp = g.producer(plan.old);
  if (bp >= 0 && is_dequantize(g.nodes[bp])) {
    // int32 bias behind DequantizeLinear.
    const Node& bd = g.nodes[bp];
    if (!read_only_by(g, plan.old, layer))
      return Outcome::kept(Reason::SharedBias, "the dequantized bias '" + plan.old + "' of " + who + " is also read elsewhere");
    auto bi = bd.inputs.empty() ? std::nullopt : g.constant(bd.inputs[0]);
    auto bs = bd.inputs.size() > 1 ? g.constant(bd.inputs[1]) : std::nullopt;
    const bool has_zero = bd.inputs.size() > 2 && !bd.inputs[2].empty();
    auto bz = has_zero ? g.constant(bd.inputs[2]) : std::nullopt;
    if (!bi || !bs || (has_zero && !bz))
      return Outcome::kept(Reason::NonConstantBias, "the quantized bias of " + who + " is not made of constants");
    if (bi->tensor.data_type != static_cast<int32_t>(DataType::Int32) || bd.attr_int("block_size", 0) != 0)
      return Outcome::kept(Reason::UnsupportedBias, "the quantized bias of " + who + " is not an int32 tensor with a "
                                               "per-tensor or per-channel scale");
    auto iv = bi->tensor.values();
    auto sv = bs->tensor.values();
    auto zv = bz ? bz->tensor.values() : std::optional<std::vector<double>>(std::vector<double>(sv ? sv->size() : 0, 0.0));
    if (!iv || !sv || !zv || iv->size() != M || (sv->size() != 1 && sv->size() != M) || zv->size() != sv->size())
      return Outcome::kept(Reason::ShapeMismatch, "the quantized bias of " + who + " does not have one value per output channel");
    plan.kind = BiasPlan::Int32Existing;
    plan.bias_dq = bp;
    plan.zero_present = has_zero;
    for (double z : *zv) plan.zero_nonzero = plan.zero_nonzero || z != 0;
    plan.data_type = bs->tensor.data_type;
    plan.dims = {static_cast<int64_t>(M)};
    plan.promote = sv->size() == 1 && M > 1;
    const bool axis_ok = bd.domain == "com.microsoft" || g.opset("") >= 13 || raising_opset;
    if (plan.promote && !axis_ok)
      return Outcome::kept(Reason::OpsetTooOld, "the per-tensor scale of the int32 bias of " + who +
                                                " must become per-channel, which needs opset >= 13");
    auto sb = [&](size_t o) { return (*sv)[sv->size() == 1 ? 0 : o]; };
    auto zb = [&](size_t o) { return (*zv)[zv->size() == 1 ? 0 : o]; };
    // onnxruntime's convention s_b = s_x * s_w: keep it with the new weight scale.
    bool convention = s_x.has_value();
    for (size_t o = 0; o < M && convention; ++o) {
      auto sw = channel_scale(w.layout, w.scale, wl, static_cast<int64_t>(o));
      convention = sw && kernels::round_to_float_type(*s_x * *sw, plan.data_type) == sb(o) &&
                   channel_scale(r.layout, r.scale, wl, static_cast<int64_t>(o));
    }
    plan.scale.resize(M);
    for (size_t o = 0; o < M; ++o) {
      target[o] = a[o] * ((*iv)[o] - zb(o)) * sb(o) + bn.shift[o] / beta;
      plan.scale[o] = convention ? kernels::round_to_float_type(
                                       *s_x * *channel_scale(r.layout, r.scale, wl, static_cast<int64_t>(o)), plan.data_type)
                                 : kernels::round_to_float_type(sb(o) * std::fabs(a[o]), plan.data_type);
    }
    if (auto kept = requantize(target, plan, who)) return *kept;
    return plan;
  }

  auto ref = g.constant(plan.old);
  if (!ref) return Outcome::kept(Reason::NonConstantBias, "the bias '" + plan.old + "' of " + who + " is not a constant");
  auto values = ref->tensor.values();
  if (!values || !graph::is_float_type(ref->tensor.data_type))
    return Outcome::kept(Reason::UnsupportedBias, "the bias '" + plan.old + "' of " + who + " is not a readable float tensor");
  if (values->size() != M && values->size() != 1)
    return Outcome::kept(Reason::ShapeMismatch, "the bias '" + plan.old + "' of " + who + " has " +
                                               std::to_string(values->size()) + " values for " + std::to_string(M) +
                                               " output channels");
  plan.kind = BiasPlan::Float;
  plan.data_type = ref->tensor.data_type;
  plan.dims = values->size() == M ? ref->tensor.dims : std::vector<int64_t>{static_cast<int64_t>(M)};
  plan.values.resize(M);
  for (size_t o = 0; o < M; ++o)
    plan.values[o] = a[o] * (*values)[values->size() == 1 ? 0 : o] + bn.shift[o] / beta;
  if (half_int32 && is_half(plan.data_type) && read_only_by(g, plan.old, layer)) {
    BiasPlan p = plan;
    p.values.clear();
    return plan_int32_for_half(plan.values, wl, w, r, *s_x, std::move(p), who);
  }
  if (auto kept = check_float_bias(plan, who)) return *kept;
  return plan;
}

// Writes the planned bias into input 2 of `layer` (a MatMul becomes a Gemm to carry it).
void write_bias(FoldContext& ctx, int layer, int weight_dq, const BiasPlan& plan, Outcome& out) {
  Graph& g = ctx.graph;
  const Node& n = g.nodes[layer];
  const std::string base = (n.name.empty() ? n.outputs[0] : n.name) + "_bias";
  const auto M = static_cast<int64_t>(plan.dims.empty() ? 0 : plan.dims[0]);
  if (plan.kind == BiasPlan::None) return;
  if (n.is("MatMul")) g.set_op_type(layer, "Gemm");  // 2-D input (checked): Gemm computes the same and has C
  if (plan.kind == BiasPlan::Float) {
    auto raw = kernels::store_values(plan.data_type, plan.values);
    write_constant_for(ctx, {Use{layer, 2}}, plan.old, plan.data_type, plan.dims, raw ? *raw : std::string(), base, out);
    return;
  }
  const std::string ints = kernels::write_quantized(plan.ints, static_cast<int32_t>(DataType::Int32));
  auto scale_raw = kernels::store_values(plan.data_type, plan.scale);
  const std::string scale = scale_raw ? *scale_raw : std::string();
  const std::string zeros = kernels::write_quantized(std::vector<int64_t>(static_cast<size_t>(M), 0),
                                                     static_cast<int32_t>(DataType::Int32));
  const auto int32 = static_cast<int32_t>(DataType::Int32);
  if (plan.kind == BiasPlan::Int32Existing) {
    const int bd = plan.bias_dq;
    const std::vector<std::string> in = g.nodes[bd].inputs;
    write_constant_for(ctx, {Use{bd, 0}}, in[0], int32, plan.dims, ints, base + "_quantized", out);
    write_constant_for(ctx, {Use{bd, 1}}, in[1], plan.data_type, plan.dims, scale, base + "_scale", out);
    // The new integers are quantized with zero point 0: a nonzero old one must go too.
    if (plan.zero_present && (plan.promote || plan.zero_nonzero))
      write_constant_for(ctx, {Use{bd, 2}}, in[2], int32, plan.dims, zeros, base + "_zero_point", out);
    if (plan.promote) g.set_int_attribute(bd, "axis", 0);
    return;
  }
  // A new int32 bias: int32 initializer -> DequantizeLinear(s_x * s'_w, 0, axis 0) -> layer input 2.
  Node dq;
  dq.op_type = "DequantizeLinear";
  dq.domain = g.nodes[weight_dq].domain;
  dq.inputs = {write_constant_for(ctx, {}, "", int32, plan.dims, ints, base + "_quantized", out),
               write_constant_for(ctx, {}, "", plan.data_type, plan.dims, scale, base + "_scale", out),
               write_constant_for(ctx, {}, "", int32, plan.dims, zeros, base + "_zero_point", out)};
  const std::string value = ctx.model.fresh_name(base);
  dq.name = value + "_DequantizeLinear";
  dq.outputs = {value};
  g.set_int_attribute(g.add_node_before(std::move(dq), layer), "axis", 0);
  g.set_input(layer, 2, value);
  if (!plan.old.empty()) g.drop_if_unused(plan.old);  // a float16 bias replaced by the int32 form
}

// The int32 bias rounding as it reaches the layer's output: earlier folds' errors times |a|, plus this
// fold's bias error times |beta|, per channel. Marks the fold "bias-rounded" when that is not 0.
void note_bias_error(FoldContext& ctx, int layer, const std::vector<double>& a, double beta,
                     const std::vector<double>& own, Outcome& out) {
  std::vector<double> total(a.size(), 0.0);
  std::vector<double>* previous = nullptr;
  if (ctx.bias_errors) {
    auto it = ctx.bias_errors->find({&ctx.graph, layer});
    if (it != ctx.bias_errors->end() && it->second.size() == a.size()) previous = &it->second;
  }
  double worst = 0;
  for (size_t o = 0; o < a.size(); ++o) {
    total[o] = (previous ? std::fabs(a[o]) * (*previous)[o] : 0.0) + (own.empty() ? 0.0 : std::fabs(beta) * own[o]);
    worst = std::max(worst, total[o]);
  }
  if (ctx.bias_errors) (*ctx.bias_errors)[{&ctx.graph, layer}] = std::move(total);
  if (worst > 0 || !own.empty()) out.metrics.emplace_back("bias_error_at_output", worst);
  out.bias_rounded = worst > 0;
}

// drop_activation_quantizers: Kept ("quantizer-would-be-lost") unless every reader of BN `bn`'s output is a
// QuantizeLinear, which then quantizes the folded layer's output in the dropped quantizer's place.
std::optional<Outcome> quantizer_lost_by_dropping(Graph& g, int bn, const std::string& who,
                                                  const std::string& quantizer) {
  const std::string& out = g.nodes[bn].outputs[0];
  std::string reader = g.is_graph_output(out) ? "a graph output" : "";
  for (const auto& u : g.uses(out))
    if (reader.empty() && (u.slot != 0 || !is_quantize(g.nodes[u.node]))) reader = label(g, u.node);
  if (reader.empty() && !g.uses(out).empty()) return std::nullopt;
  if (reader.empty()) reader = "nothing";
  return Outcome::kept(Reason::QuantizerWouldBeLost,
                       "drop_activation_quantizers would drop " + quantizer + ", the only quantizer after " + who +
                           ": the BN's output feeds " + reader + ", not a QuantizeLinear, so the folded layer would "
                           "have no quantizer after it and a runtime could no longer run it as a quantized kernel");
}

}  // namespace

Outcome fold_qdq_layer_bn(FoldContext& ctx, int bn) {
  Graph& g = ctx.graph;
  const int producer = batchnorm_input_producer(g, bn);
  if (producer < 0) return Outcome::not_applicable();

  // Layer -> BN, or layer -> Q -> DQ -> BN (an activation quantizer between them).
  int layer = producer, act_q = -1, act_dq = -1;
  if (is_dequantize(g.nodes[producer])) {
    const Node& dqa = g.nodes[producer];
    const int qa = dqa.inputs.empty() ? -1 : g.producer(dqa.inputs[0]);
    if (qa < 0 || !is_quantize(g.nodes[qa]) || g.nodes[qa].inputs.empty()) return Outcome::not_applicable();
    layer = g.producer(g.nodes[qa].inputs[0]);
    if (layer < 0) return Outcome::not_applicable();
    act_q = qa;
    act_dq = producer;
  }
  // MatMul -> Add(constant bias) -> BN (either operand order): the MatMul's weight takes the factor, the Add's
  // bias becomes a * c + t, as in the float fold (gemm_bn).
  int add = -1, add_bias_slot = -1;
  if (act_q < 0 && g.nodes[producer].is("Add")) {
    const Node& an = g.nodes[producer];
    if (an.inputs.size() != 2 || an.outputs.size() != 1) return Outcome::not_applicable();
    for (int s = 0; s < 2 && add < 0; ++s) {
      const int p = g.producer(an.inputs[s]);
      if (p >= 0 && g.nodes[p].is("MatMul") && constant_dims(g, an.inputs[1 - s])) {
        add = producer;
        add_bias_slot = 1 - s;
        layer = p;
      }
    }
    if (add < 0) return Outcome::not_applicable();
  }
  const Node& ln = g.nodes[layer];
  if (!is_layer(ln) || ln.inputs.size() < 2 || ln.outputs.size() != 1) return Outcome::not_applicable();
  const int wdq = g.producer(ln.inputs[1]);
  const bool quantized_weight = wdq >= 0 && is_dequantize(g.nodes[wdq]);
  const std::string who = label(g, layer);
  if (act_q >= 0) {
    const std::string quantizer = label(g, act_q);
    if (!ctx.options.drop_activation_quantizers || !quantized_weight)
      return Outcome::kept(Reason::ActivationQuantizer,
                           "the activation quantizer " + quantizer + " (QuantizeLinear -> DequantizeLinear) between " +
                               who + " and the BN rounds the layer's output before normalization, so no exact fold "
                               "can cross it" +
                               (quantized_weight ? "; drop_activation_quantizers=True removes it and folds approximately"
                                                 : ""));
    if (auto blocked = layer_output_blocker(g, layer, ln.outputs[0], act_q)) return *blocked;
    if (!read_only_by(g, g.nodes[act_q].outputs[0], act_dq) || !read_only_by(g, g.nodes[act_dq].outputs[0], bn))
      return Outcome::kept(Reason::ActivationQuantizer,
                           "the activation quantizer " + quantizer + " between " + who +
                               " and the BN also feeds other nodes, so it cannot be dropped");
    // Dropping it must leave the layer with a quantizer after it (the BN's readers), or a runtime can no longer
    // run the layer as a quantized kernel (onnxruntime's QDQ selectors want Q right after the layer).
    if (auto lost = quantizer_lost_by_dropping(g, bn, who, quantizer)) return *lost;
  } else {
    if (!quantized_weight) return Outcome::not_applicable();  // the float folds' pattern
    if (add >= 0) {
      if (ln.inputs.size() != 2) return Outcome::kept(Reason::Malformed, who + " has an unexpected arity");
      if (auto blocked = layer_output_blocker(g, layer, ln.outputs[0], add, 1 - add_bias_slot)) return *blocked;
      if (auto blocked = layer_output_blocker(g, add, g.nodes[add].outputs[0], bn)) return *blocked;
    } else if (auto blocked = layer_output_blocker(g, layer, ln.outputs[0], bn)) {
      return *blocked;
    }
  }
  if (!read_only_by(g, ln.inputs[1], layer))
    return Outcome::kept(Reason::SharedWeight, "the dequantized weight '" + ln.inputs[1] + "' of " + who +
                                              " is also read by another node, which must keep its values");

  auto affine_or = read_batchnorm(ctx, bn);
  if (auto* o = std::get_if<Outcome>(&affine_or)) return *o;
  const BatchNormAffine& affine = std::get<BatchNormAffine>(affine_or);
  auto weight_or = read_quantized_weight(g, wdq, layer);
  if (auto* o = std::get_if<Outcome>(&weight_or)) return *o;
  QuantizedWeight& weight = std::get<QuantizedWeight>(weight_or);
  std::string why;
  auto wl = weight_layout(ln, weight.dims, why, /*backward_fold=*/true);
  if (!wl) return Outcome::kept(Reason::UnsupportedLayer, who + ": " + why);
  if (static_cast<int64_t>(affine.scale.size()) != wl->out_channels)
    return Outcome::kept(Reason::ShapeMismatch, "the BN has " + std::to_string(affine.scale.size()) + " channels but " + who +
                                               " has " + std::to_string(wl->out_channels) + " output channels");
  if (ln.is("MatMul") && rank_through_quantizers(g, ln.inputs[0]) != std::optional<size_t>(2))
    return Outcome::kept(Reason::NotA2dInput, "the input of " + who + " is not known to be 2-D, so BN's channel axis 1 may not "
                                   "be the MatMul's output features");
  const double beta = ln.is("Gemm") ? ln.attr_float("beta", 1.0f) : 1.0;
  if (beta == 0)
    return Outcome::kept(Reason::UnsupportedBias, who + " has beta=0, so it cannot carry the BN shift in its bias");

  // trt::DequantizeLinear takes a float weight: never materialized as integers.
  const bool materialize = weight.qat() && !weight.fused() && ctx.options.materialize_quantized_weights;
  auto rescaled_or = rescale_quantized_weight(weight, *wl, affine.scale, ctx.options, weight.qat() && !materialize, who,
                                         ctx.model.deferred_checks);
  bool raising_opset = false;
  if (auto* o = std::get_if<Outcome>(&rescaled_or); o && o->code == code(Reason::OpsetTooOld)) {
    std::string blocker;
    if (!ctx.options.allow_opset_upgrade) {
      o->message += "; allow_opset_upgrade=True raises the model's opset to 13 where that is safe";
      return *o;
    }
    if (!can_raise_opset_to_13(ctx.model, blocker)) {
      o->message += "; allow_opset_upgrade cannot raise it: " + blocker;
      return *o;
    }
    weight.axis_supported = true;  // once the model is at opset 13
    raising_opset = true;
    rescaled_or = rescale_quantized_weight(weight, *wl, affine.scale, ctx.options, weight.qat() && !materialize, who,
                                         ctx.model.deferred_checks);
  }
  if (auto* o = std::get_if<Outcome>(&rescaled_or)) return *o;
  const RescaledWeight& rescaled = std::get<RescaledWeight>(rescaled_or);
  if (weight.fused() && std::any_of(rescaled.zero.begin(), rescaled.zero.end(), [](int64_t z) { return z != 0; }))
    return Outcome::kept(Reason::TensorrtQuantizer, who + " is quantized by trt::DequantizeLinear, which has no zero point "
                                               "for the complement form");
  BiasPlan bias;  // kind None for MatMul + Add: the Add's bias carries the shift
  std::string add_bias_raw;
  FoldedBias add_bias;
  int32_t add_bias_type = 0;
  if (add >= 0) {
    const std::string& name = g.nodes[add].inputs[add_bias_slot];
    const std::string what = "the bias '" + name + "' of " + label(g, add);
    auto values = constant_values(g, name);
    auto dims = constant_dims(g, name);
    if (!values || !dims) return Outcome::kept(Reason::NonConstantBias, what + " is not a readable constant");
    // The Add's type is the MatMul's output type, the weight DequantizeLinear's (its scale's) type.
    auto ref = g.constant(name);
    add_bias_type = ref && graph::is_float_type(ref->tensor.data_type) ? ref->tensor.data_type : weight.scale_type;
    auto folded_or = fold_bias(dims, *values, affine.scale, affine.shift, what);
    if (auto* o = std::get_if<Outcome>(&folded_or)) return *o;
    add_bias = std::move(std::get<FoldedBias>(folded_or));
    auto raw_or = store_or_keep(add_bias_type, add_bias.values, "bias");
    if (auto* o = std::get_if<Outcome>(&raw_or)) return *o;
    add_bias_raw = std::move(std::get<std::string>(raw_or));
  } else {
    auto bias_or = plan_bias(ctx, layer, *wl, weight, rescaled, affine, beta, raising_opset, who);
    if (auto* o = std::get_if<Outcome>(&bias_or)) return *o;
    bias = std::move(std::get<BiasPlan>(bias_or));
  }

  // Every condition holds: edit.
  Outcome out;
  out.verdict = Verdict::Folded;
  out.code = code(FoldName::QdqLayerBn);
  out.into = {ln.display_name(layer)};
  if (add >= 0) out.into.push_back(g.nodes[add].display_name(add));
  out.into_op = ln.op_type;
  out.message = "folded into the quantized weight of " + who +
                (add >= 0 ? " and the bias of " + label(g, add) + " (c' = a * c + t)" : std::string()) +
                ": scale s' = s * |a|" +
                (rescaled.promoted ? " (per-tensor scale made per-channel)" : "") +
                (rescaled.negated_channels ? ", integers mirrored in " + std::to_string(rescaled.negated_channels) +
                                                 " channels with a < 0"
                                           : "") +
                (rescaled.complement ? " (complement form: nonzero zero point)" : "") +
                (weight.qat() ? (materialize ? ", weight materialized as integers" : ", float weight snapped to the grid")
                              : "") +
                (bias.kind == BiasPlan::Int32Existing || bias.kind == BiasPlan::Int32New ? ", int32 bias re-quantized"
                                                                                          : "");
  if (raising_opset) {
    ctx.model.raise_opset("", 13);
    out.message += "; the model's opset was raised to 13 for the per-channel axis";
  }
  const std::string layer_output = ln.outputs[0];  // nodes may move once edits add nodes
  const std::string layer_base = ln.name.empty() ? ln.outputs[0] : ln.name;
  write_quantized_weight(ctx, weight, *wl, rescaled, materialize, out);
  if (add >= 0) {
    note_bias_error(ctx, layer, affine.scale, 1.0, {}, out);
    write_layer_input(ctx, add, add_bias_slot, add_bias_type, add_bias.dims, add_bias_raw, layer_base + "_bias", out);
    take_over_batchnorm_output(g, add, 0, bn, affine);
    return out;
  }
  write_bias(ctx, layer, wdq, bias, out);
  if (bias.kind == BiasPlan::Int32Existing || bias.kind == BiasPlan::Int32New)
    out.metrics.emplace_back("bias_requantization_error", bias.max_error);
  note_bias_error(ctx, layer, affine.scale, beta, bias.errors, out);
  if (act_q >= 0) {
    // Drop the activation quantizer: the layer feeds the BN's readers directly.
    auto s = g.constant(g.nodes[act_q].inputs.size() > 1 ? g.nodes[act_q].inputs[1] : "");
    if (s)
      if (auto v = s->tensor.values(); v && !v->empty()) out.metrics.emplace_back("dropped_quantizer_scale", (*v)[0]);
    const std::vector<std::string> params = g.nodes[act_q].inputs;
    const std::vector<std::string> dq_params = g.nodes[act_dq].inputs;
    g.remove_value_info(g.nodes[act_q].outputs[0]);
    g.remove_value_info(layer_output);
    g.remove_node(act_dq);
    g.remove_node(act_q);
    for (size_t k = 1; k < params.size(); ++k) g.drop_if_unused(params[k]);
    for (size_t k = 1; k < dq_params.size(); ++k) g.drop_if_unused(dq_params[k]);
    out.exact = false;
    out.message += "; the activation quantizer between them was dropped (not exact)";
  }
  take_over_batchnorm_output(g, layer, 0, bn, affine);
  return out;
}

}  // namespace qdqfold::folds
