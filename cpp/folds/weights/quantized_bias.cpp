#include "folds/weights/quantized_bias.h"
#include "folds/layer_kinds.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "folds/edits.h"
#include "folds/common/values.h"
#include "folds/weights/float_weight.h"
#include "kernels/per_channel.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;
using graph::Use;
using wire::DataType;

namespace {

// s_x: the scale of the layer's input activation when a DequantizeLinear with one constant scale makes it.
std::optional<double> input_scale(Graph& g, const Node& layer) {
  const int p = layer.inputs.empty() ? -1 : g.producer(layer.inputs[0]);
  if (p < 0 || !is_dequantize(g.nodes()[p]) || g.nodes()[p].inputs.size() < 2) return std::nullopt;
  auto s = g.constant(g.nodes()[p].inputs[1]);
  if (!s) return std::nullopt;
  auto v = s->tensor.values();
  if (!v || v->size() != 1) return std::nullopt;
  return (*v)[0];
}

// The weight scale that applies to output channel o, when the scale is per tensor or per output channel.
std::optional<double> channel_scale(const QuantLayout& l, const std::vector<double>& scale, const WeightLayout& wl,
                                    int64_t o) {
  if (l.per_tensor()) return scale[0];
  if (l.block_size > 0 || l.axis != wl.out_axis) return std::nullopt;
  return scale[static_cast<size_t>(wl.p_is_output ? o : o % wl.Q)];
}

// How the other quantized layers of the graph carry their bias: int32 behind DequantizeLinear, float, or
// no evidence either way.
enum class BiasForm { Unknown, Float, Int32 };
BiasForm graph_bias_form(Graph& g, int except) {
  bool saw_float = false;
  for (size_t k = 0; k < g.nodes().size(); ++k) {
    const Node& n = g.nodes()[k];
    if (n.removed() || static_cast<int>(k) == except || !is_layer(n) || layer_kind(n)->bias_input < 0) continue;
    if (n.inputs.size() < 3 || n.inputs[2].empty() || n.inputs[1].empty()) continue;
    const int w = g.producer(n.inputs[1]);
    if (w < 0 || !is_dequantize(g.nodes()[w])) continue;
    const int b = g.producer(n.inputs[2]);
    if (b >= 0 && is_dequantize(g.nodes()[b])) return BiasForm::Int32;
    if (g.constant(n.inputs[2])) saw_float = true;
  }
  return saw_float ? BiasForm::Float : BiasForm::Unknown;
}

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
Expected<BiasPlan> plan_int32_for_half(const std::vector<double>& target, const WeightLayout& wl,
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

}  // namespace

Expected<BiasPlan> plan_bias(FoldContext& ctx, int layer, const WeightLayout& wl, const QuantizedWeight& w,
                                          const RescaledWeight& r, const BatchNormAffine& bn, double beta,
                                          bool raising_opset, const std::string& who) {
  Graph& g = ctx.graph;
  const Node& n = g.nodes()[layer];
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
  if (bp >= 0 && is_dequantize(g.nodes()[bp])) {
    // int32 bias behind DequantizeLinear.
    const Node& bd = g.nodes()[bp];
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
  const Node& n = g.nodes()[layer];
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
    const std::vector<std::string> in = g.nodes()[bd].inputs;
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
  dq.domain = g.nodes()[weight_dq].domain;
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

}  // namespace qdqfold::folds
