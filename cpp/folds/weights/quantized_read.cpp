// Reading a quantized weight (quantized_weight.h): the Q/DQ chain's nodes (qdq_chain.h), its scale, zero point
// and their layout, the integer range (the type's, or a Clip's), and a pinned view of the integers or of the
// float weight. Every check is read-only; a reason to keep comes out as an Outcome.
#include <algorithm>
#include <cmath>
#include <limits>

#include "folds/sources/batchnorm.h"
#include "folds/expected.h"
#include "folds/weights/qdq_chain.h"
#include "folds/weights/quantized_weight.h"
#include "kernels/numeric.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;
using graph::Use;
using wire::DataType;

namespace {

std::string node_label(const Graph& g, int n) { return g.nodes()[n].op_type + " '" + g.nodes()[n].display_name(n) + "'"; }

Outcome malformed(const std::string& who, const std::string& why) {
  return Outcome::kept(Reason::MalformedQuantization, who + ": " + why);
}

// Values of optional input `slot` of node `n` (a constant), or nullopt when it is not a constant.
struct ConstInput {
  bool present = false;
  std::optional<graph::ConstRef> ref;
};
ConstInput const_input(Graph& g, const Node& n, size_t slot) {
  ConstInput c;
  if (slot >= n.inputs.size() || n.inputs[slot].empty()) return c;
  c.present = true;
  c.ref = g.constant(n.inputs[slot]);
  return c;
}

std::optional<std::vector<int64_t>> quantized_values(const graph::Tensor& t) {
  std::string storage;
  auto bytes = t.bytes(storage);
  if (!bytes) return std::nullopt;
  return kernels::read_quantized(*bytes, t.data_type, t.count);
}

bool same_constant(Graph& g, const std::string& a, const std::string& b) {
  if (a == b) return true;
  auto ra = g.constant(a), rb = g.constant(b);
  if (!ra || !rb || ra->tensor.data_type != rb->tensor.data_type || ra->tensor.dims != rb->tensor.dims) return false;
  auto va = ra->tensor.values(), vb = rb->tensor.values();
  if (va && vb) return *va == *vb;
  std::string sa, sb;
  auto ba = ra->tensor.bytes(sa), bb = rb->tensor.bytes(sb);
  return ba && bb && *ba == *bb;
}

// The integer range [lo, hi] of Clip node `clip` (opset >= 12 takes integer bounds as inputs; an absent bound is
// none), which must be read only by DequantizeLinear `dq`.
Expected<std::pair<int64_t, int64_t>> read_integer_clip(Graph& g, int clip, int dq,
                                                                            const std::string& who) {
  const Node& c = g.nodes()[clip];
  const std::string label = node_label(g, clip);
  if (c.inputs.empty() || c.outputs.size() != 1 || !read_only_by(g, c.outputs[0], dq))
    return Outcome::kept(Reason::SharedWeight, "the output of " + label + " (" + who + ") is also read by another node");
  std::pair<int64_t, int64_t> range{std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()};
  for (size_t k = 1; k < 3; ++k) {
    if (c.inputs.size() <= k || c.inputs[k].empty()) continue;
    auto v = constant_values(g, c.inputs[k]);
    if (!v || v->size() != 1)
      return Outcome::kept(Reason::NonConstantQuantizationParameters,
                           "the bound '" + c.inputs[k] + "' of " + label + " (" + who + ") is not a scalar constant");
    (k == 1 ? range.first : range.second) = static_cast<int64_t>(std::llround((*v)[0]));
  }
  return range;
}

// What the reading steps share.
struct Reading {
  Graph& g;
  const QdqChain& chain;
  const Node& d;  // the DequantizeLinear
  std::string who;
  bool ms_domain = false;  // com.microsoft or trt: axis and block_size at any opset
  int64_t opset = 0;
  ConstInput scale, zero;
  std::optional<std::pair<int64_t, int64_t>> clip_range;
  std::optional<graph::ConstRef> int_ref, float_ref;  // the integers (int form) or the float weight (QAT, fused)
};

// The scale and zero point: constants, a float scale type, finite values.
std::optional<Outcome> read_parameters(Reading& r, QuantizedWeight& w) {
  Graph& g = r.g;
  const Node& d = r.d;
  const int dq = r.chain.dq;
  r.scale = const_input(g, d, 1);
  r.zero = const_input(g, d, 2);
  if (!r.scale.ref || (r.zero.present && !r.zero.ref))
    return Outcome::kept(Reason::NonConstantQuantizationParameters,
                         "the scale or zero point of " + node_label(g, dq) + " (" + r.who + ") is not a constant");
  w.scale_type = r.scale.ref->tensor.data_type;
  if (!graph::is_float_type(w.scale_type) || w.scale_type == static_cast<int32_t>(DataType::Double))
    return malformed(r.who, std::string("its scale is ") + graph::data_type_name(w.scale_type));
  auto scale_values = r.scale.ref->tensor.values();
  if (!scale_values || scale_values->empty()) return malformed(r.who, "its scale cannot be read");
  w.scale = std::move(*scale_values);
  for (double s : w.scale)
    if (!std::isfinite(s))
      return Outcome::kept(Reason::NonFiniteScale, "the scale of " + r.who + " holds NaN or Inf");
  return std::nullopt;
}

// The chain's source: the Clip's range, then the int form (a constant), the QAT form (QuantizeLinear of a
// constant float weight, on the DQ's grid) or TensorRT's fused form; the integer type and the weight's dims.
std::optional<Outcome> read_source(Reading& r, QuantizedWeight& w) {
  Graph& g = r.g;
  const Node& d = r.d;
  const int dq = r.chain.dq;
  // Brevitas QCDQ: int W -> Clip(lo, hi) -> DQ, or W -> Q -> Clip -> DQ. The Clip saturates like a narrower
  // integer type, so its range takes the place of the type's (mirrored integers must stay inside it).
  const std::string& x = r.chain.source;
  if (r.chain.clip >= 0) {
    QDQFOLD_TRY(clip, read_integer_clip(g, r.chain.clip, dq, r.who));
    r.clip_range = clip;
    w.clip = r.chain.clip;
  }
  // The integers: a constant, or what QuantizeLinear makes of a constant float weight.
  r.int_ref = g.constant(x);
  if (r.chain.fused) {
    // float W -> trt::DequantizeLinear(s): TensorRT quantizes W to int4 (round half to even, saturating, no zero
    // point) and dequantizes it in one node, a QuantizeLinear -> DequantizeLinear pair fused: the QAT form with
    // the node as its own quantizer.
    if (!r.int_ref || !graph::is_float_type(r.int_ref->tensor.data_type) || w.clip >= 0 || d.inputs.size() > 2)
      return Outcome::kept(Reason::TensorrtQuantizer, "the input of " + node_label(g, dq) + " (" + r.who +
                                                     ") is not a constant float weight in the form ModelOpt writes");
    r.float_ref = std::move(r.int_ref);
    r.int_ref.reset();
    w.q = dq;
    w.float_type = r.float_ref->tensor.data_type;
    if (w.float_type != static_cast<int32_t>(DataType::Float) && w.float_type != static_cast<int32_t>(DataType::Float16) &&
        w.float_type != static_cast<int32_t>(DataType::Bfloat16))
      return Outcome::kept(Reason::UnsupportedWeightType, "the float weight of " + r.who + " is " +
                                                          graph::data_type_name(w.float_type));
    w.int_type = static_cast<int32_t>(DataType::Int4);
    w.dims = r.float_ref->tensor.dims;
  } else if (!r.int_ref) {
    const int qn = r.chain.quantize;
    if (qn < 0)
      return Outcome::kept(Reason::NonConstantWeight, "the input of " + node_label(g, dq) + " (" + r.who + ") is not a constant");
    const Node& q = g.nodes()[qn];
    if (q.inputs.size() < 2 || q.inputs[0].empty()) return malformed(r.who, node_label(g, qn) + " lacks its inputs");
    if (!read_only_by(g, x, w.clip >= 0 ? w.clip : dq))
      return Outcome::kept(Reason::SharedWeight, "the quantized weight '" + x + "' of " + r.who +
                                                " is also read by another node, which must keep its values");
    r.float_ref = g.constant(q.inputs[0]);
    if (!r.float_ref)
      return Outcome::kept(Reason::NonConstantWeight, "the float weight '" + q.inputs[0] + "' quantized by " +
                                                      node_label(g, qn) + " (" + r.who + ") is not a constant");
    // Q and DQ must describe the same grid.
    const std::string q_zero = q.inputs.size() > 2 ? q.inputs[2] : "", d_zero = d.inputs.size() > 2 ? d.inputs[2] : "";
    if (!same_constant(g, q.inputs[1], d.inputs[1]) || q_zero.empty() != d_zero.empty() ||
        (!q_zero.empty() && !same_constant(g, q_zero, d_zero)) ||
        q.attr_int("axis", 1) != d.attr_int("axis", 1) || q.attr_int("block_size", 0) != d.attr_int("block_size", 0))
      return Outcome::kept(Reason::MismatchedQdq, node_label(g, qn) + " and " + node_label(g, dq) +
                                                 " use different scales, zero points or axes for " + r.who);
    w.q = qn;
    w.float_type = r.float_ref->tensor.data_type;
    if (w.float_type != static_cast<int32_t>(DataType::Float) && w.float_type != static_cast<int32_t>(DataType::Float16) &&
        w.float_type != static_cast<int32_t>(DataType::Bfloat16))
      return Outcome::kept(Reason::UnsupportedWeightType, "the float weight of " + r.who + " is " +
                                                          graph::data_type_name(w.float_type));
    if (r.zero.ref) w.int_type = r.zero.ref->tensor.data_type;
    else w.int_type = static_cast<int32_t>(q.attr_int("output_dtype", static_cast<int64_t>(DataType::Uint8)));
    w.dims = r.float_ref->tensor.dims;
  } else {
    w.int_type = r.int_ref->tensor.data_type;
    w.dims = r.int_ref->tensor.dims;
  }
  return std::nullopt;
}

// The valid integers: the type's, narrowed by a Clip; the zero point of that type.
std::optional<Outcome> read_range(Reading& r, QuantizedWeight& w) {
  if (w.float8() && w.qat())
    return Outcome::kept(Reason::Float8Quantizer, "the QuantizeLinear of " + r.who + " makes float8 values, whose rounding "
                                             "qdqfold does not reproduce; the weight cannot be snapped to its grid");
  auto range = kernels::integer_range(w.int_type);
  if (!range && !w.float8())
    return Outcome::kept(Reason::UnsupportedWeightType, r.who + " is quantized to " + graph::data_type_name(w.int_type));
  if (range) w.range = *range;
  if (r.clip_range) {
    if (!range) return Outcome::kept(Reason::UnsupportedWeightType, r.who + " is clipped " + graph::data_type_name(w.int_type));
    w.range.lo = std::max(w.range.lo, r.clip_range->first);
    w.range.hi = std::min(w.range.hi, r.clip_range->second);
    if (w.range.lo > w.range.hi) return malformed(r.who, "its Clip range is empty");
  }
  if (r.zero.ref && r.zero.ref->tensor.data_type != w.int_type)
    return malformed(r.who, "its zero point type differs from the quantized type");
  return std::nullopt;
}

// The scale's layout (per tensor, per axis, blocked) against the weight's dims, and the zero point's values.
std::optional<Outcome> read_scale_layout(Reading& r, QuantizedWeight& w) {
  const Node& d = r.d;
  const auto rank = static_cast<int64_t>(w.dims.size());
  const auto& sdims = r.scale.ref->tensor.dims;
  w.layout.scale_dims = sdims;
  w.layout.block_size = d.attr_int("block_size", 0);
  if (w.layout.block_size < 0 || (d.attr("block_size") && !r.ms_domain && r.opset < 21))
    return malformed(r.who, "block_size=" + std::to_string(w.layout.block_size) + " is not valid at opset " +
                              std::to_string(r.opset));
  if (const graph::Attribute* axis = d.attr("axis"); axis && (axis->i < -rank || axis->i >= rank))
    return malformed(r.who, "its axis attribute " + std::to_string(axis->i) + " is out of range");
  if (w.scale.size() == 1 && w.layout.block_size == 0) {
    w.layout.axis = -1;
  } else {
    if (!w.axis_supported) return malformed(r.who, "a scale with several values needs DequantizeLinear opset >= 13");
    int64_t axis = d.attr_int("axis", 1);
    if (axis < 0) axis += rank;
    if (axis < 0 || axis >= rank) return malformed(r.who, "its quantization axis is out of range");
    w.layout.axis = axis;
    // The scale may be stored in any shape that broadcasts, axis by axis, to one value per slice (per block)
    // of the axis: ModelOpt's INT4 export writes [C, 1, 1, 1]. It is read in the layout's own dims and
    // written back in the stored ones (quantized_write.cpp).
    const std::vector<int64_t> full = w.layout.full_dims(w.dims);
    auto from = w.layout.broadcast_dims(sdims, w.dims);
    if (!from)
      return malformed(r.who, w.layout.block_size > 0
                                  ? "its blocked scale does not match the weight's dims and block_size"
                                  : "its per-axis scale does not broadcast to one value per slice of axis " +
                                        std::to_string(axis));
    w.layout.scale_dims = w.layout.block_size > 0 ? full : std::vector<int64_t>{w.dims[axis]};
    if (sdims != w.layout.scale_dims) w.layout.stored_scale_dims = sdims;
    w.scale = broadcast_values(w.scale, *from, full);
  }
  w.layout.prepare(w.dims);
  w.has_zero = r.zero.present;
  if (r.zero.ref) {
    auto z = quantized_values(r.zero.ref->tensor);
    const auto& zdims = r.zero.ref->tensor.dims;
    if (z && !w.layout.per_tensor() && zdims != w.layout.scale_dims) {  // a broadcast shape, as the scale's
      auto from = w.layout.broadcast_dims(zdims, w.dims);
      if (!from) return malformed(r.who, "its zero point does not match its scale");
      std::vector<double> as_double(z->begin(), z->end());
      as_double = broadcast_values(as_double, *from, w.layout.full_dims(w.dims));
      z->assign(as_double.begin(), as_double.end());
      w.layout.stored_zero_dims = zdims;
    }
    if (!z || z->size() != w.scale.size()) return malformed(r.who, "its zero point does not match its scale");
    w.zero = std::move(*z);
    if (w.float8())
      for (int64_t v : w.zero)
        if (v != 0) return malformed(r.who, "a float8 zero point must be 0");
  } else {
    w.zero.assign(w.scale.size(), 0);
  }
  return std::nullopt;
}

// The integers or the float weight: their raw data, checked for size and pinned for the generator that writes
// the new weight after the fold returned (graph::PinnedBytes): a view of the model's buffer or mapped data,
// never copied; data decoded here or produced by an earlier fold is kept alive with it.
std::optional<Outcome> read_data(Reading& r, QuantizedWeight& w) {
  Graph& g = r.g;
  w.count = 1;
  for (int64_t v : w.dims) w.count *= v;
  const graph::Tensor& t = r.int_ref ? r.int_ref->tensor : r.float_ref->tensor;
  auto storage = std::make_shared<std::string>();
  auto bytes = t.bytes(*storage);
  const auto need = r.int_ref ? kernels::quantized_bytes(w.int_type, w.count)
                            : std::optional<size_t>(static_cast<size_t>(w.count) * graph::element_size(w.float_type));
  if (!bytes || !need || bytes->size() < *need)
    return Outcome::kept(Reason::UnreadableWeight, r.int_ref ? "the integers of " + r.who + " cannot be read (external data?)"
                                                      : "the float weight of " + r.who + " cannot be read (external data?)");
  w.data = g.model->pin(bytes->substr(0, *need), storage);
  if (w.clip >= 0 && r.int_ref && !w.float8()) {
    // int W -> Clip: the fold mirrors the integers themselves, which equals mirroring the clipped ones only
    // where the Clip leaves them alone (Brevitas writes them inside its range).
    const auto e = kernels::integer_extremes(w.data.data(), w.int_type, 0, w.count);
    if (e.min < w.range.lo || e.max > w.range.hi)
      return Outcome::kept(Reason::ClippedWeight, "the integers of " + r.who + " reach " + std::to_string(e.min) + " .. " +
                                                 std::to_string(e.max) + ", beyond the range [" +
                                                 std::to_string(w.range.lo) + ", " + std::to_string(w.range.hi) +
                                                 "] of " + node_label(g, w.clip) + ", which changes them");
  }
  return std::nullopt;
}

}  // namespace

Expected<QuantizedWeight> read_quantized_weight(Graph& g, int dq, int layer) {
  const std::optional<QdqChain> chain = select_qdq_chain(g, dq);
  if (!chain) return Outcome::not_applicable();
  const Node& d = g.nodes()[dq];
  Reading r{g, *chain, d, "the weight of " + node_label(g, layer), false, 0, {}, {}, std::nullopt, std::nullopt,
            std::nullopt};
  if (d.inputs.size() < 2 || d.inputs[0].empty() || d.inputs[1].empty())
    return malformed(r.who, node_label(g, dq) + " lacks its input or scale");
  QuantizedWeight w;
  w.dq = dq;
  // trt::DequantizeLinear (ModelOpt's INT4 export for TensorRT) has axis and block_size like com.microsoft's.
  r.ms_domain = d.domain == "com.microsoft" || d.domain == "trt";
  r.opset = g.opset(d.domain == "com.microsoft" ? "com.microsoft" : "");
  w.axis_supported = r.ms_domain || r.opset >= 13;
  // A reason to keep names the DequantizeLinear at fault (the report's attempts), unless a step named another.
  for (auto step : {read_parameters, read_source, read_range, read_scale_layout, read_data})
    if (std::optional<Outcome> kept = step(r, w)) {
      if (kept->at.empty()) kept->at = d.display_name(dq);
      return std::move(*kept);
    }
  return w;
}

}  // namespace qdqfold::folds
