#include "folds/weights/quantized_weight.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <limits>

#include "kernels/numeric.h"
#include "kernels/per_channel.h"
#include "wire/fields.h"
#include "wire/writer.h"
#include "folds/sources/batchnorm.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;
using graph::Use;
using wire::DataType;

bool is_quantize(const Node& n) { return n.op_type == "QuantizeLinear" && (n.is("QuantizeLinear") || n.domain == "com.microsoft"); }
bool is_dequantize(const Node& n) {
  return n.op_type == "DequantizeLinear" &&
         (n.is("DequantizeLinear") || n.domain == "com.microsoft" || n.domain == "trt");
}

std::string int_attribute(const std::string& name, int64_t value) {
  std::string a;
  wire::put_bytes_field(a, wire::num(wire::AttributeField::Name), name);
  wire::put_varint_field(a, wire::num(wire::AttributeField::I), static_cast<uint64_t>(value));
  wire::put_varint_field(a, wire::num(wire::AttributeField::Type), static_cast<uint64_t>(wire::AttributeType::Int));
  return a;
}

// Sets an int attribute in the written node and in the parsed view, so that a later fold reading this node
// (a second BN folded into the same layer) sees the new value.
void set_int_attribute(Graph& g, int node, const std::string& name, int64_t value) {
  g.set_attribute(node, name, int_attribute(name, value));
  for (auto& a : g.nodes[node].attributes)
    if (a.name == name) {
      a.has_i = true;
      a.i = value;
      return;
    }
  graph::Attribute a;
  a.name = name;
  a.type = static_cast<int>(wire::AttributeType::Int);
  a.has_i = true;
  a.i = value;
  g.nodes[node].attributes.push_back(a);
}

// ---------------------------------------------------------------- QuantLayout

void QuantLayout::prepare(const std::vector<int64_t>& dims) {
  if (per_tensor()) return;
  inner_ = 1;
  for (size_t d = static_cast<size_t>(axis) + 1; d < dims.size(); ++d) inner_ *= dims[d];
  axis_dim_ = dims[axis];
  blocks_ = block_size > 0 ? (axis_dim_ + block_size - 1) / block_size : axis_dim_;
}

int64_t QuantLayout::scale_index(int64_t i) const {
  if (per_tensor()) return 0;
  const int64_t along = (i / inner_) % axis_dim_;
  if (block_size <= 0) return along;
  const int64_t outer = i / (inner_ * axis_dim_);
  return (outer * blocks_ + along / block_size) * inner_ + i % inner_;
}

int64_t QuantLayout::run_length() const {
  if (per_tensor()) return 0;
  if (block_size <= 0) return inner_;
  // Blocks along the last axis: block and row boundaries both fall on multiples of gcd(block_size, axis dim).
  return inner_ == 1 ? std::gcd(block_size, axis_dim_) : 1;
}

int QuantLayout::row_step(int64_t n) const {
  if (per_tensor()) return 0;
  if (block_size <= 0) {
    if (inner_ % n == 0) return 0;                 // k = (i / inner) % axis_dim: one value per row
    return inner_ == 1 && axis_dim_ == n ? 1 : -1;  // the last axis: k = j
  }
  // Blocks along an axis that spans whole rows: i % inner = (r % (inner / n)) * n + j.
  return inner_ % n == 0 ? 1 : -1;
}

int64_t QuantLayout::scale_count() const {
  int64_t n = 1;
  for (int64_t d : scale_dims) n *= d;
  return n;
}

// ---------------------------------------------------------------- reading

namespace {

std::string node_label(const Graph& g, int n) { return g.nodes[n].op_type + " '" + g.nodes[n].display_name(n) + "'"; }

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

}  // namespace

// The integer range [lo, hi] of Clip node `clip` (opset >= 12 takes integer bounds as inputs; an absent bound is
// none), which must be read only by DequantizeLinear `dq`.
static std::variant<std::pair<int64_t, int64_t>, Outcome> read_integer_clip(Graph& g, int clip, int dq,
                                                                            const std::string& who) {
  const Node& c = g.nodes[clip];
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

std::variant<QuantizedWeight, Outcome> read_quantized_weight(Graph& g, int dq, int layer) {
  const Node& d = g.nodes[dq];
  if (!is_dequantize(d)) return Outcome::not_applicable();
  const std::string who = "the weight of " + node_label(g, layer);
  if (d.inputs.size() < 2 || d.inputs[0].empty() || d.inputs[1].empty())
    return malformed(who, node_label(g, dq) + " lacks its input or scale");
  QuantizedWeight w;
  w.dq = dq;
  // trt::DequantizeLinear (ModelOpt's INT4 export for TensorRT) has axis and block_size like com.microsoft's.
  const bool ms_domain = d.domain == "com.microsoft" || d.domain == "trt";
  const int64_t opset = g.opset(d.domain == "com.microsoft" ? "com.microsoft" : "");
  w.axis_supported = ms_domain || opset >= 13;

  // Scale and zero point.
  ConstInput scale = const_input(g, d, 1), zero = const_input(g, d, 2);
  if (!scale.ref || (zero.present && !zero.ref))
    return Outcome::kept(Reason::NonConstantQuantizationParameters,
                         "the scale or zero point of " + node_label(g, dq) + " (" + who + ") is not a constant");
  w.scale_type = scale.ref->tensor.data_type;
  if (!graph::is_float_type(w.scale_type) || w.scale_type == static_cast<int32_t>(DataType::Double))
    return malformed(who, std::string("its scale is ") + graph::data_type_name(w.scale_type));
  auto scale_values = scale.ref->tensor.values();
  if (!scale_values || scale_values->empty()) return malformed(who, "its scale cannot be read");
  w.scale = std::move(*scale_values);
  for (double s : w.scale)
    if (!std::isfinite(s))
      return Outcome::kept(Reason::NonFiniteScale, "the scale of " + who + " holds NaN or Inf");

  // Brevitas QCDQ: int W -> Clip(lo, hi) -> DQ, or W -> Q -> Clip -> DQ. The Clip saturates like a narrower
  // integer type, so its range takes the place of the type's (mirrored integers must stay inside it).
  std::string x = d.inputs[0];
  std::optional<std::pair<int64_t, int64_t>> clip_range;
  if (const int c = g.producer(x); c >= 0 && g.nodes[c].is("Clip")) {
    auto clip = read_integer_clip(g, c, dq, who);
    if (auto* o = std::get_if<Outcome>(&clip)) return *o;
    clip_range = std::get<std::pair<int64_t, int64_t>>(clip);
    w.clip = c;
    x = g.nodes[c].inputs[0];
  }
  // The integers: a constant, or what QuantizeLinear makes of a constant float weight.
  std::optional<graph::ConstRef> int_ref = g.constant(x);
  std::optional<graph::ConstRef> float_ref;
  if (d.domain == "trt") {
    // float W -> trt::DequantizeLinear(s): TensorRT quantizes W to int4 (round half to even, saturating, no zero
    // point) and dequantizes it in one node, a QuantizeLinear -> DequantizeLinear pair fused: the QAT form with
    // the node as its own quantizer.
    if (!int_ref || !graph::is_float_type(int_ref->tensor.data_type) || w.clip >= 0 || d.inputs.size() > 2)
      return Outcome::kept(Reason::TensorrtQuantizer, "the input of " + node_label(g, dq) + " (" + who +
                                                     ") is not a constant float weight in the form ModelOpt writes");
    float_ref = std::move(int_ref);
    int_ref.reset();
    w.q = dq;
    w.float_type = float_ref->tensor.data_type;
    if (w.float_type != static_cast<int32_t>(DataType::Float) && w.float_type != static_cast<int32_t>(DataType::Float16) &&
        w.float_type != static_cast<int32_t>(DataType::Bfloat16))
      return Outcome::kept(Reason::UnsupportedWeightType, "the float weight of " + who + " is " +
                                                          graph::data_type_name(w.float_type));
    w.int_type = static_cast<int32_t>(DataType::Int4);
    w.dims = float_ref->tensor.dims;
  } else if (!int_ref) {
    const int qn = g.producer(x);
    if (qn < 0 || !is_quantize(g.nodes[qn]))
      return Outcome::kept(Reason::NonConstantWeight, "the input of " + node_label(g, dq) + " (" + who + ") is not a constant");
    const Node& q = g.nodes[qn];
    if (q.inputs.size() < 2 || q.inputs[0].empty()) return malformed(who, node_label(g, qn) + " lacks its inputs");
    if (!read_only_by(g, x, w.clip >= 0 ? w.clip : dq))
      return Outcome::kept(Reason::SharedWeight, "the quantized weight '" + x + "' of " + who +
                                                " is also read by another node, which must keep its values");
    float_ref = g.constant(q.inputs[0]);
    if (!float_ref)
      return Outcome::kept(Reason::NonConstantWeight, "the float weight '" + q.inputs[0] + "' quantized by " +
                                                      node_label(g, qn) + " (" + who + ") is not a constant");
    // Q and DQ must describe the same grid.
    const std::string q_zero = q.inputs.size() > 2 ? q.inputs[2] : "", d_zero = d.inputs.size() > 2 ? d.inputs[2] : "";
    if (!same_constant(g, q.inputs[1], d.inputs[1]) || q_zero.empty() != d_zero.empty() ||
        (!q_zero.empty() && !same_constant(g, q_zero, d_zero)) ||
        q.attr_int("axis", 1) != d.attr_int("axis", 1) || q.attr_int("block_size", 0) != d.attr_int("block_size", 0))
      return Outcome::kept(Reason::MismatchedQdq, node_label(g, qn) + " and " + node_label(g, dq) +
                                                 " use different scales, zero points or axes for " + who);
    w.q = qn;
    w.float_type = float_ref->tensor.data_type;
    if (w.float_type != static_cast<int32_t>(DataType::Float) && w.float_type != static_cast<int32_t>(DataType::Float16) &&
        w.float_type != static_cast<int32_t>(DataType::Bfloat16))
      return Outcome::kept(Reason::UnsupportedWeightType, "the float weight of " + who + " is " +
                                                          graph::data_type_name(w.float_type));
    if (zero.ref) w.int_type = zero.ref->tensor.data_type;
    else w.int_type = static_cast<int32_t>(q.attr_int("output_dtype", static_cast<int64_t>(DataType::Uint8)));
    w.dims = float_ref->tensor.dims;
  } else {
    w.int_type = int_ref->tensor.data_type;
    w.dims = int_ref->tensor.dims;
  }
  if (w.float8() && w.qat())
    return Outcome::kept(Reason::Float8Quantizer, "the QuantizeLinear of " + who + " makes float8 values, whose rounding "
                                             "qdqfold does not reproduce; the weight cannot be snapped to its grid");
  auto range = kernels::integer_range(w.int_type);
  if (!range && !w.float8())
    return Outcome::kept(Reason::UnsupportedWeightType, who + " is quantized to " + graph::data_type_name(w.int_type));
  if (range) w.range = *range;
  if (clip_range) {
    if (!range) return Outcome::kept(Reason::UnsupportedWeightType, who + " is clipped " + graph::data_type_name(w.int_type));
    w.range.lo = std::max(w.range.lo, clip_range->first);
    w.range.hi = std::min(w.range.hi, clip_range->second);
    if (w.range.lo > w.range.hi) return malformed(who, "its Clip range is empty");
  }
  if (zero.ref && zero.ref->tensor.data_type != w.int_type)
    return malformed(who, "its zero point type differs from the quantized type");

  // Layout of the scale.
  const auto rank = static_cast<int64_t>(w.dims.size());
  const auto& sdims = scale.ref->tensor.dims;
  w.layout.scale_dims = sdims;
  w.layout.block_size = d.attr_int("block_size", 0);
  if (w.layout.block_size < 0 || (d.attr("block_size") && !ms_domain && opset < 21))
    return malformed(who, "block_size=" + std::to_string(w.layout.block_size) + " is not valid at opset " +
                              std::to_string(opset));
  if (const graph::Attribute* axis = d.attr("axis"); axis && (axis->i < -rank || axis->i >= rank))
    return malformed(who, "its axis attribute " + std::to_string(axis->i) + " is out of range");
  if (w.scale.size() == 1 && w.layout.block_size == 0) {
    w.layout.axis = -1;
  } else {
    if (!w.axis_supported) return malformed(who, "a scale with several values needs DequantizeLinear opset >= 13");
    int64_t axis = d.attr_int("axis", 1);
    if (axis < 0) axis += rank;
    if (axis < 0 || axis >= rank) return malformed(who, "its quantization axis is out of range");
    w.layout.axis = axis;
    if (w.layout.block_size > 0) {
      bool ok = static_cast<int64_t>(sdims.size()) == rank;
      for (int64_t k = 0; ok && k < rank; ++k)
        ok = sdims[k] == (k == axis ? (w.dims[k] + w.layout.block_size - 1) / w.layout.block_size : w.dims[k]);
      if (!ok) return malformed(who, "its blocked scale does not match the weight's dims and block_size");
    } else if (sdims.size() != 1 || sdims[0] != w.dims[axis]) {
      return malformed(who, "its per-axis scale does not have one value per slice of axis " + std::to_string(axis));
    }
  }
  w.layout.prepare(w.dims);
  w.has_zero = zero.present;
  if (zero.ref) {
    auto z = quantized_values(zero.ref->tensor);
    if (!z || z->size() != w.scale.size()) return malformed(who, "its zero point does not match its scale");
    w.zero = std::move(*z);
    if (w.float8())
      for (int64_t v : w.zero)
        if (v != 0) return malformed(who, "a float8 zero point must be 0");
  } else {
    w.zero.assign(w.scale.size(), 0);
  }

  // The integers or the float weight: a view of their raw data (checked for size, never copied). Data that is
  // not in the model's buffer (decoded typed data, a tensor an earlier fold produced) is kept by `owner`.
  w.count = 1;
  for (int64_t v : w.dims) w.count *= v;
  const graph::Tensor& t = int_ref ? int_ref->tensor : float_ref->tensor;
  auto storage = std::make_shared<std::string>();
  auto bytes = t.bytes(*storage);
  const auto need = int_ref ? kernels::quantized_bytes(w.int_type, w.count)
                            : std::optional<size_t>(static_cast<size_t>(w.count) * graph::element_size(w.float_type));
  if (!bytes || !need || bytes->size() < *need)
    return Outcome::kept(Reason::UnreadableWeight, int_ref ? "the integers of " + who + " cannot be read (external data?)"
                                                      : "the float weight of " + who + " cannot be read (external data?)");
  w.data = bytes->substr(0, *need);
  if (!g.model->outlives_writing(w.data)) {  // decoded or produced by an earlier fold: the generator keeps it
    w.owner = storage->data() == w.data.data() ? storage : std::make_shared<std::string>(w.data);
    w.data = std::string_view(w.owner->data(), *need);
  }
  if (w.clip >= 0 && int_ref && !w.float8()) {
    // int W -> Clip: the fold mirrors the integers themselves, which equals mirroring the clipped ones only
    // where the Clip leaves them alone (Brevitas writes them inside its range).
    const auto e = kernels::integer_extremes(w.data.data(), w.int_type, 0, w.count);
    if (e.min < w.range.lo || e.max > w.range.hi)
      return Outcome::kept(Reason::ClippedWeight, "the integers of " + who + " reach " + std::to_string(e.min) + " .. " +
                                                 std::to_string(e.max) + ", beyond the range [" +
                                                 std::to_string(w.range.lo) + ", " + std::to_string(w.range.hi) +
                                                 "] of " + node_label(g, w.clip) + ", which changes them");
  }
  return w;
}

// ---------------------------------------------------------------- rescaling

namespace {

// Walks elements [first, last) of the weight in order, as runs that share one output channel o and one scale
// element k: f(begin, length, o, k), which returns false to stop. The output channel depends on i / R (Conv,
// Gemm transB=1: on i / (Q * R)) and the scale element is constant on aligned runs of layout.run_length(),
// so aligned runs of their gcd share both (a whole input-channel block for a per-channel Conv).
template <class F>
void for_each_run(const WeightLayout& wl, const QuantLayout& layout, int64_t count, int64_t first, int64_t last, F&& f) {
  const int64_t QR = wl.Q * wl.R;
  const int64_t by_channel = wl.p_is_output ? QR : wl.R;
  const int64_t by_scale = layout.per_tensor() ? count : layout.run_length();
  const int64_t L = std::max<int64_t>(std::gcd(by_channel, by_scale), 1);
  for (int64_t i = first - first % L; i < last; i += L) {
    const int64_t from = std::max(i, first), to = std::min(i + L, last);
    if (!f(from, to - from, wl.output_of(i / QR, (i / wl.R) % wl.Q), layout.scale_index(i))) return;
  }
}

// Weights whose output channel is the last axis (MatMul [K, N], Gemm transB=0, 1x1 ConvTranspose): element
// i = r * n + j belongs to output channel j and, for the scale layouts met there (QuantLayout::row_step), to
// scale element base(r) + step * j. for_each_run would see runs of one element; these weights are walked a
// row at a time with per-column parameters instead. (Float8 weights keep the run walk.)
struct RowView {
  int64_t n = 0;  // row length: the output channels
  int64_t step = 0;
};

std::optional<RowView> row_view(const WeightLayout& wl, const QuantLayout& layout, int32_t int_type) {
  if (wl.p_is_output || wl.R != 1 || wl.groups != 1 || wl.Q <= 0 || kernels::is_float8(int_type)) return std::nullopt;
  const int step = layout.row_step(wl.Q);
  if (step < 0) return std::nullopt;
  return RowView{wl.Q, step};
}

// Rows [0, rows) in groups of consecutive rows with one scale base: f(first_row, rows, base), false to stop.
template <class F>
void for_each_row_group(const RowView& v, const QuantLayout& layout, int64_t rows, F&& f) {
  for (int64_t r = 0; r < rows;) {
    const int64_t base = layout.scale_index(r * v.n);
    int64_t end = r + 1;
    while (end < rows && layout.scale_index(end * v.n) == base) ++end;
    if (!f(r, end - r, base)) return;
    r = end;
  }
}

// Elements [first, last) as pieces of rows (a piece is partial where [first, last) cuts a row):
// f(i, j0, j1, base) for columns [j0, j1) of the row whose column j0 is element i; false to stop.
template <class F>
void for_each_row_piece(const RowView& v, const QuantLayout& layout, int64_t first, int64_t last, F&& f) {
  for (int64_t r = first / v.n; r * v.n < last; ++r) {
    const int64_t row = r * v.n, i0 = std::max(first, row), i1 = std::min(last, row + v.n);
    if (!f(i0, i0 - row, i1 - row, layout.scale_index(row))) return;
  }
}

// f(o, k) with the output channel and scale element of every element in element order (a row view visits one
// row of each group of rows with the same pairs); f returns false to stop.
template <class F>
void for_each_channel_scale(const QuantizedWeight& w, const WeightLayout& wl, const QuantLayout& layout, F&& f) {
  if (auto v = row_view(wl, layout, w.int_type)) {
    for_each_row_group(*v, layout, w.count / v->n, [&](int64_t, int64_t, int64_t base) {
      for (int64_t j = 0; j < v->n; ++j)
        if (!f(j, base + v->step * j)) return false;
      return true;
    });
    return;
  }
  for_each_run(wl, layout, w.count, 0, w.count, [&](int64_t, int64_t, int64_t o, int64_t k) { return f(o, k); });
}

// What the output channels covered by each scale element need: one factor |a|, and whether any of them is
// negated (and any not). Depends on the layouts only, not on the weight's values.
struct Coverage {
  std::vector<double> factor;
  std::vector<char> negative, positive;
  std::vector<int64_t> first_channel;
  std::vector<char> negated_channel;  // per output channel: a < 0 and it holds elements
  std::string conflict;
};

Coverage cover(const QuantizedWeight& w, const WeightLayout& wl, const QuantLayout& layout, const std::vector<double>& a) {
  Coverage c;
  const auto n = static_cast<size_t>(layout.scale_count());
  c.factor.assign(n, -1.0);
  c.negative.assign(n, 0);
  c.positive.assign(n, 0);
  c.first_channel.assign(n, -1);
  c.negated_channel.assign(static_cast<size_t>(wl.out_channels), 0);
  for_each_channel_scale(w, wl, layout, [&](int64_t o, int64_t k) {
    const double f = std::fabs(a[o]);
    if (c.factor[k] < 0) {
      c.factor[k] = f;
      c.first_channel[k] = o;
    } else if (c.factor[k] != f) {
      c.conflict = "one scale value covers output channels " + std::to_string(c.first_channel[k]) + " and " +
                   std::to_string(o) + ", whose BN factors differ";
      return false;
    }
    (a[o] < 0 ? c.negative[k] : c.positive[k]) = 1;
    if (a[o] < 0) c.negated_channel[o] = 1;
    return true;
  });
  return c;
}

// The extreme integers q of the negated elements of each scale element k: read from the integers, or for the
// QAT form from the extreme float weights (QuantizeLinear is monotone in x for a fixed scale: increasing for
// s > 0, decreasing for s < 0; a NaN weight quantizes to the zero point). For float8 only whether negation
// changes any byte.
struct NegatedExtremes {
  std::vector<int64_t> min, max;
  bool float8_changes = false;
};

// The integers QuantizeLinear(s, z) makes of floats with extremes x: [lo, hi], empty (lo > hi) for none.
std::pair<int64_t, int64_t> quantized_extremes(const kernels::FloatExtremes& x, float s, int64_t z,
                                               kernels::IntegerRange range) {
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  if (x.any_number) {
    const int64_t q1 = kernels::quantize_element(x.min, s, z, range), q2 = kernels::quantize_element(x.max, s, z, range);
    lo = std::signbit(s) ? q2 : q1;
    hi = std::signbit(s) ? q1 : q2;
  }
  if (x.any_nan) {
    const int64_t q = range.contains(z) ? z : range.lo;
    lo = std::min(lo, q);
    hi = std::max(hi, q);
  }
  return {lo, hi};
}

NegatedExtremes negated_extremes(const QuantizedWeight& w, const WeightLayout& wl, const QuantLayout& layout,
                                 bool promoted, const std::vector<double>& a) {
  NegatedExtremes e;
  const auto n = static_cast<size_t>(layout.scale_count());
  e.min.assign(n, std::numeric_limits<int64_t>::max());
  e.max.assign(n, std::numeric_limits<int64_t>::min());
  auto merge = [&](int64_t k, std::pair<int64_t, int64_t> x) {
    e.min[k] = std::min(e.min[k], x.first);
    e.max[k] = std::max(e.max[k], x.second);
  };
  auto quantized = [&](const kernels::FloatExtremes& x, int64_t k) {
    const size_t old = promoted ? 0 : static_cast<size_t>(k);
    return quantized_extremes(x, static_cast<float>(w.scale[old]), w.zero[old], w.range);
  };
  if (auto v = row_view(wl, layout, w.int_type)) {
    // Column-wise extremes over each group of rows sharing their scale elements, merged for negated columns.
    const auto cols = static_cast<size_t>(v->n);
    std::vector<int64_t> lo(cols), hi(cols);
    std::vector<float> flo(cols), fhi(cols);
    std::vector<char> nan(cols);
    for_each_row_group(*v, layout, w.count / v->n, [&](int64_t r, int64_t rows, int64_t base) {
      if (w.qat()) {
        std::fill(flo.begin(), flo.end(), INFINITY);
        std::fill(fhi.begin(), fhi.end(), -INFINITY);
        std::fill(nan.begin(), nan.end(), 0);
        kernels::float_column_extremes(w.data.data(), w.float_type, r * v->n, rows, v->n, flo.data(), fhi.data(),
                                       nan.data());
      } else {
        std::fill(lo.begin(), lo.end(), std::numeric_limits<int64_t>::max());
        std::fill(hi.begin(), hi.end(), std::numeric_limits<int64_t>::min());
        kernels::integer_column_extremes(w.data.data(), w.int_type, r * v->n, rows, v->n, lo.data(), hi.data());
      }
      for (size_t j = 0; j < cols; ++j) {
        if (!(a[j] < 0)) continue;
        const int64_t k = base + v->step * static_cast<int64_t>(j);
        if (w.qat()) merge(k, quantized({flo[j], fhi[j], flo[j] <= fhi[j], nan[j] != 0}, k));
        else merge(k, {lo[j], hi[j]});
      }
      return true;
    });
    return e;
  }
  const bool fnuz = kernels::is_fnuz_float8(w.int_type);
  for_each_run(wl, layout, w.count, 0, w.count, [&](int64_t begin, int64_t len, int64_t o, int64_t k) {
    if (!(a[o] < 0) || len == 0) return true;
    if (w.float8()) {
      for (int64_t i = begin; i < begin + len && !e.float8_changes; ++i)
        e.float8_changes = !fnuz || (static_cast<uint8_t>(w.data[i]) & 0x7f) != 0;
    } else if (!w.qat()) {
      const auto x = kernels::integer_extremes(w.data.data(), w.int_type, begin, len);
      merge(k, {x.min, x.max});
    } else {
      kernels::FloatExtremes x;
      kernels::float_extremes(w.data.data(), w.float_type, begin, len, x);
      merge(k, quantized(x, k));
    }
    return true;
  });
  return e;
}

// For the message when a negation does not fit: the output channel of the first negated element (in element
// order) of scale element k whose integer is `value`.
int64_t channel_holding(const QuantizedWeight& w, const WeightLayout& wl, const QuantLayout& layout, bool promoted,
                        const std::vector<double>& a, int64_t k, int64_t value) {
  int64_t channel = -1;
  const size_t old = promoted ? 0 : static_cast<size_t>(k);
  for_each_run(wl, layout, w.count, 0, w.count, [&](int64_t begin, int64_t len, int64_t o, int64_t run_k) {
    if (run_k != k || !(a[o] < 0)) return true;
    for (int64_t i = begin; i < begin + len && channel < 0; ++i) {
      double q;
      if (w.qat())
        kernels::quantize_elements(w.data.data(), w.float_type, i, 1, static_cast<float>(w.scale[old]), w.zero[old],
                                   w.range, &q);
      if ((w.qat() ? static_cast<int64_t>(q) : kernels::integer_extremes(w.data.data(), w.int_type, i, 1).min) == value)
        channel = o;
    }
    return channel < 0;
  });
  return channel;
}

// The rescale per scale element (old scale and zero point: one when the scale was promoted), and per column
// for a row view.
struct Rescale {
  bool promoted = false;
  std::vector<char> negative;  // per output channel
  std::vector<int64_t> mirror, old_zero, zero;
  std::vector<double> old_scale, scale;

  size_t old(int64_t k) const { return promoted ? 0 : static_cast<size_t>(k); }
};

Rescale rescale_of(const QuantizedWeight& w, const RescaledWeight& r) {
  return Rescale{r.promoted, r.negative, r.mirror, w.zero, r.zero, w.scale, r.scale};
}

// The parameters of columns 0..n of the rows with scale base `base`: for the int form the integer mirror, for
// the QAT form the old quantizer, the mirror q' = add + sign * q and the new scale and zero point.
struct Columns {
  int64_t base = -1;
  kernels::MirrorColumns mirror;
  std::vector<float> old_scale;
  std::vector<double> old_zero, add, sign, zero, scale;
  std::vector<float> old_zero_f, add_f, sign_f, zero_f, scale_f;  // the same as float32 (requantize_float32)
};

Columns columns(const Rescale& p, const RowView& v, int64_t base, int32_t int_type, bool qat) {
  Columns c;
  c.base = base;
  const auto n = static_cast<size_t>(v.n);
  std::vector<int64_t> mirror(n);
  for (size_t j = 0; j < n; ++j) mirror[j] = p.mirror[static_cast<size_t>(base + v.step * static_cast<int64_t>(j))];
  if (!qat) {
    c.mirror = kernels::mirror_columns(int_type, mirror, p.negative);
    return c;
  }
  c.old_scale.resize(n);
  c.old_zero.resize(n);
  c.add.resize(n);
  c.sign.resize(n);
  c.zero.resize(n);
  c.scale.resize(n);
  for (size_t j = 0; j < n; ++j) {
    const int64_t k = base + v.step * static_cast<int64_t>(j);
    c.old_scale[j] = static_cast<float>(p.old_scale[p.old(k)]);
    c.old_zero[j] = static_cast<double>(p.old_zero[p.old(k)]);
    c.add[j] = p.negative[j] ? static_cast<double>(mirror[j]) : 0.0;
    c.sign[j] = p.negative[j] ? -1.0 : 1.0;
    c.zero[j] = static_cast<double>(p.zero[static_cast<size_t>(k)]);
    c.scale[j] = p.scale[static_cast<size_t>(k)];
  }
  auto as_float = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  c.old_zero_f = as_float(c.old_zero);
  c.add_f = as_float(c.add);
  c.sign_f = as_float(c.sign);
  c.zero_f = as_float(c.zero);
  c.scale_f = as_float(c.scale);
  return c;
}

// QAT form kept: W' = (q' - z') * s' rounded to the weight's type must quantize back to q'. Whether it does
// depends on q' and the scale element only, so every integer of the type is tried per scale element when that
// is cheaper than the weight; only if one fails are the elements scanned (in order, naming the first that
// fails), since that integer may not occur.
std::optional<Outcome> check_snap(const QuantizedWeight& w, const WeightLayout& wl, const RescaledWeight& r,
                                  const std::vector<double>& a, const std::string& who) {
  auto snaps = [&](int64_t v, size_t k) {
    const double snapped = kernels::round_to_float_type(static_cast<double>(v - r.zero[k]) * r.scale[k], w.float_type);
    return kernels::quantize_element(static_cast<float>(snapped), static_cast<float>(r.scale[k]), r.zero[k], w.range) == v;
  };
  const size_t n = r.scale.size();
  // A float32 weight snaps for every integer when each s' is a normal float32 and (hi - lo) * s' is far from
  // overflowing: with m = q' - z' (|m| <= hi - lo <= 2^16), W' = fl(m s') and W' / s' in float32 is
  // m (1 + d1)(1 + d2) with |d| <= 2^-24, within |m| 2^-23 < 1/2 of m, so it rounds back to m.
  if (w.float_type == static_cast<int32_t>(wire::DataType::Float) && w.range.hi - w.range.lo <= (int64_t{1} << 16) &&
      std::all_of(r.scale.begin(), r.scale.end(), [&](double s) {
        return s >= std::numeric_limits<float>::min() &&
               s * static_cast<double>(w.range.hi - w.range.lo) < 0.5 * std::numeric_limits<float>::max();
      }))
    return std::nullopt;
  const int64_t values = w.range.hi - w.range.lo + 1;
  if (values <= w.count / static_cast<int64_t>(std::max<size_t>(n, 1))) {
    bool all = true;
    for (size_t k = 0; k < n && all; ++k)
      for (int64_t v = w.range.lo; v <= w.range.hi && all; ++v) all = snaps(v, k);
    if (all) return std::nullopt;
  }
  std::optional<Outcome> failed;
  auto fail_at = [&](int64_t i) {
    failed = Outcome::kept(Reason::SnapFailed, "the rescaled float weight of " + who + " does not quantize back to its "
                                          "integers in " + graph::data_type_name(w.float_type) + " (element " +
                                          std::to_string(i) + ")");
    return false;
  };
  if (auto v = row_view(wl, r.layout, w.int_type)) {
    const Rescale p = rescale_of(w, r);
    Columns cols;
    std::vector<double> q(static_cast<size_t>(v->n));
    for_each_row_piece(*v, r.layout, 0, w.count, [&](int64_t i, int64_t j0, int64_t j1, int64_t base) {
      if (cols.base != base) cols = columns(p, *v, base, w.int_type, true);
      kernels::quantize_elements(w.data.data(), w.float_type, i, j1 - j0, cols.old_scale.data() + j0,
                                 cols.old_zero.data() + j0, w.range, q.data());
      kernels::mirror_values(q.data(), j1 - j0, cols.add.data() + j0, cols.sign.data() + j0);
      for (int64_t j = j0; j < j1; ++j)
        if (!snaps(static_cast<int64_t>(q[j - j0]), static_cast<size_t>(base + v->step * j))) return fail_at(i + j - j0);
      return true;
    });
    return failed;
  }
  std::vector<double> q(1024);
  for_each_run(wl, r.layout, w.count, 0, w.count, [&](int64_t begin, int64_t len, int64_t o, int64_t k) {
    const size_t old = r.promoted ? 0 : static_cast<size_t>(k);
    for (int64_t done = 0; done < len; done += 1024) {
      const int64_t m = std::min<int64_t>(1024, len - done);
      kernels::quantize_elements(w.data.data(), w.float_type, begin + done, m, static_cast<float>(w.scale[old]),
                                 w.zero[old], w.range, q.data());
      for (int64_t j = 0; j < m; ++j) {
        const auto v = static_cast<int64_t>(q[j]);
        if (!snaps(a[o] < 0 ? r.mirror[k] - v : v, static_cast<size_t>(k))) return fail_at(begin + done + j);
      }
    }
    return true;
  });
  return failed;
}

}  // namespace

std::variant<RescaledWeight, Outcome> rescale_quantized_weight(const QuantizedWeight& w, const WeightLayout& wl,
                                                               const std::vector<double>& a, const Options& options,
                                                               bool keep_quantizer, const std::string& who,
                                                               std::shared_ptr<graph::Model::DeferredChecks> deferred) {
  if (wl.P * wl.Q * wl.R != w.count || static_cast<int64_t>(a.size()) != wl.out_channels)
    return Outcome::kept(Reason::ShapeMismatch, "the BN has " + std::to_string(a.size()) + " channels but " + who + " has " +
                                               std::to_string(wl.out_channels) + " output channels");
  RescaledWeight r;
  // Keep the scale's layout when every scale value covers channels with one factor |a|; a per-tensor scale
  // otherwise becomes one scale per slice of the weight's output-channel axis.
  r.layout = w.layout;
  Coverage c = cover(w, wl, r.layout, a);
  if (!c.conflict.empty() && w.layout.per_tensor()) {
    if (!w.axis_supported)
      return Outcome::kept(Reason::OpsetTooOld,
                           "the BN factors differ per channel, so the per-tensor scale of " + who +
                               " must become per-channel, which needs DequantizeLinear's axis attribute (opset >= 13); "
                               "the model's opset is older");
    r.layout.axis = wl.out_axis;
    r.layout.block_size = 0;
    r.layout.scale_dims = {w.dims[wl.out_axis]};
    r.layout.prepare(w.dims);
    r.promoted = true;
    c = cover(w, wl, r.layout, a);
  }
  if (!c.conflict.empty())
    return Outcome::kept(Reason::ScaleLayout, "the quantization scale of " + who + " cannot absorb the BN factors: " + c.conflict);
  // Only the negated elements' values matter for what follows: read them once (none when no factor is negative).
  const bool any_negative = std::any_of(c.negative.begin(), c.negative.end(), [](char v) { return v != 0; });
  const auto n = static_cast<size_t>(r.layout.scale_count());
  auto old_index = [&](size_t k) { return r.promoted ? size_t{0} : k; };
  // With a signed type and zero points of 0 the negation q' = -q is the first candidate below, and it fits
  // unless q is the type's lowest value. In the QAT form (whose integers are rewritten anyway, so
  // ints_changed does not matter) the generator can check that while it writes, instead of a read-only pass
  // quantizing the whole weight first.
  bool defer_negation = deferred && any_negative && w.qat() && !w.float8() && w.range.lo == -w.range.hi - 1;
  for (size_t k = 0; k < n && defer_negation; ++k) defer_negation = !c.negative[k] || w.zero[old_index(k)] == 0;
  const NegatedExtremes e =
      any_negative && !defer_negation ? negated_extremes(w, wl, r.layout, r.promoted, a) : NegatedExtremes{};
  if (defer_negation) r.negation_check = deferred;

  const int64_t complement_c = w.range.lo + w.range.hi;
  r.mirror.assign(n, 0);
  r.scale.resize(n);
  r.zero.resize(n);
  for (size_t k = 0; k < n; ++k) {
    const double s = w.scale[old_index(k)];
    const int64_t z = w.zero[old_index(k)];
    r.scale[k] = kernels::round_to_float_type(s * c.factor[k], w.scale_type);
    if (!std::isfinite(r.scale[k]))
      return Outcome::kept(Reason::ScaleOverflow, "the rescaled scale of " + who + " overflows in channel " +
                                                 std::to_string(c.first_channel[k]));
    if (keep_quantizer && r.scale[k] == 0)
      return Outcome::kept(Reason::ZeroFactor,
                           "the BN factor of channel " + std::to_string(c.first_channel[k]) + " is 0 (or the scale of " +
                               who + " underflows to 0): its QuantizeLinear would divide by a zero scale; "
                               "materialize_quantized_weights=True folds it with integer weights");
    r.zero[k] = z;
    if (!c.negative[k] || w.float8() || defer_negation) continue;  // deferred: mirror 0, zero point 0 (= z)
    auto fits = [&](int64_t m) {
      return w.range.contains(m - z) && w.range.contains(m - e.min[k]) && w.range.contains(m - e.max[k]);
    };
    std::vector<int64_t> candidates = {2 * z};                       // zero point unchanged (negation when z = 0)
    if (!c.positive[k]) {
      candidates.push_back(0);                                       // q' = -q, z' = -z
      if (options.allow_nonzero_zero_point || z != 0) candidates.push_back(complement_c);
    }
    bool found = false;
    for (int64_t m : candidates)
      if (fits(m)) {
        r.mirror[k] = m;
        r.zero[k] = m - z;
        r.complement = r.complement || (m == complement_c && m != 2 * z && m != 0);
        found = true;
        break;
      }
    if (!found) {
      const bool low = !w.range.contains(2 * z - e.min[k]);
      const int64_t value = low ? e.min[k] : e.max[k];
      const int64_t channel = channel_holding(w, wl, r.layout, r.promoted, a, static_cast<int64_t>(k), value);
      std::string msg = "channel " + std::to_string(channel) + " of " + who + " has a negative BN factor and holds the " +
                        graph::data_type_name(w.int_type) + " value " + std::to_string(value) +
                        ", whose negation does not fit the type" +
                        (w.clip >= 0 ? " range its Clip allows, [" + std::to_string(w.range.lo) + ", " +
                                           std::to_string(w.range.hi) + "] (a symmetric Clip range always fits)"
                                     : std::string());
      if (!options.allow_nonzero_zero_point && !c.positive[k])
        msg += "; allow_nonzero_zero_point=True folds it exactly with the complement "
               "form (q' = " +
               std::string(w.range.lo < 0 ? "-1 - q" : std::to_string(complement_c) + " - q") +
               "), at a cost: that channel's weight zero point becomes nonzero, which TensorRT rejects (it requires "
               "symmetric weights with zero point 0)";
      return Outcome::kept(Reason::NegationOverflow, msg);
    }
  }
  r.zero_changed = r.zero != w.zero || (r.promoted && w.has_zero);

  // q' = mirror - q leaves a negated element as it was only where q = mirror / 2: so the integers of scale
  // element k are unchanged exactly when all its negated ones equal mirror / 2.
  r.negative.assign(a.size(), 0);
  for (size_t o = 0; o < a.size(); ++o) r.negative[o] = a[o] < 0;
  r.negated_channels = static_cast<int>(std::count(c.negated_channel.begin(), c.negated_channel.end(), 1));
  if (w.float8()) {
    r.ints_changed = e.float8_changes;
  } else if (defer_negation) {
    r.ints_changed = true;
  } else {
    for (size_t k = 0; k < n && !r.ints_changed; ++k)
      r.ints_changed = c.negative[k] && !(e.min[k] == e.max[k] && 2 * e.min[k] == r.mirror[k]);
  }

  if (w.qat() && keep_quantizer)
    if (auto failed = check_snap(w, wl, r, a, who)) {
      // With the negation deferred, q' = -q of the lowest value fails here too: decide the negation first.
      if (defer_negation) return rescale_quantized_weight(w, wl, a, options, keep_quantizer, who, nullptr);
      return *failed;
    }
  return r;
}

// ---------------------------------------------------------------- the new weight

namespace {

// Everything the generator needs, owned: it runs when the output is written, after the fold has returned.
struct WeightGenerator {
  std::shared_ptr<const std::string> owner;
  std::string_view data;  // the integers or W (a view of the model's buffer, or of *owner)
  int64_t count = 0;
  int32_t int_type = 0, float_type = 0;
  bool qat = false, as_integers = true, fnuz = false, float8 = false;
  WeightLayout wl;
  QuantLayout layout;
  kernels::IntegerRange range;
  Rescale p;
  std::shared_ptr<graph::Model::DeferredChecks> negation_check;  // see RescaledWeight::negation_check
  bool in_float32 = false;  // the QAT form kept with a float32 weight: kernels::requantize_float32

  size_t size() const {
    return as_integers ? *kernels::quantized_bytes(int_type, count) : static_cast<size_t>(count) * element_width();
  }
  size_t element_width() const { return as_integers ? kernels::quantized_width(int_type) : graph::element_size(float_type); }
  bool packed() const { return as_integers && kernels::quantized_width(int_type) == 0; }

  // Output bytes [begin, end) (whole elements: 4-bit data in whole bytes) into dst.
  void fill(char* dst, size_t begin, size_t end) const {
    int64_t first, last;
    if (packed()) {
      first = static_cast<int64_t>(begin) * 2;
      last = std::min<int64_t>(static_cast<int64_t>(end) * 2, count);
      std::memset(dst, 0, end - begin);  // nibbles are or-ed in; an odd count's padding nibble stays 0
    } else {
      first = static_cast<int64_t>(begin / element_width());
      last = static_cast<int64_t>(end / element_width());
    }
    if (auto v = row_view(wl, layout, int_type)) return fill_rows(*v, dst, first, last);
    std::vector<double> q(qat && !in_float32 ? 1024 : 0);
    for_each_run(wl, layout, count, first, last, [&](int64_t from, int64_t len, int64_t o, int64_t k) {
      const bool neg = p.negative[o];
      if (in_float32) {
        const auto add = static_cast<float>(neg ? p.mirror[k] : 0), sign = neg ? -1.0f : 1.0f;
        const bool lowest = kernels::requantize_float32(
            data.data(), from, len, static_cast<float>(p.old_scale[p.old(k)]), static_cast<float>(p.old_zero[p.old(k)]),
            add, sign, static_cast<float>(p.zero[k]), static_cast<float>(p.scale[k]), range, dst + (from - first) * 4);
        if (lowest && negation_check) negation_check->fail();
        return true;
      }
      if (!qat) {
        if (!neg) kernels::copy_integers(data.data(), dst, int_type, from, len, first);
        else if (float8) kernels::negate_float8_bytes(data.data(), dst, from, len, first, fnuz);
        else kernels::mirror_integers(data.data(), dst, int_type, from, len, first, p.mirror[k]);
        return true;
      }
      for (int64_t done = 0; done < len; done += 1024) {
        const int64_t m = std::min<int64_t>(1024, len - done);
        kernels::quantize_elements(data.data(), float_type, from + done, m, static_cast<float>(p.old_scale[p.old(k)]),
                                   p.old_zero[p.old(k)], range, q.data());
        if (neg) {
          if (negation_check && lowest_in(q.data(), m)) negation_check->fail();
          const auto c = static_cast<double>(p.mirror[k]);
          for (int64_t j = 0; j < m; ++j) q[j] = c - q[j];
        }
        store(q.data(), m, from + done - first, dst, static_cast<double>(p.zero[k]), p.scale[k]);
      }
      return true;
    });
  }

  // The same a row piece at a time, with the parameters of the piece's columns.
  void fill_rows(const RowView& v, char* dst, int64_t first, int64_t last) const {
    constexpr int64_t kPiece = 4096;
    Columns cols;
    std::vector<double> q(qat && !in_float32 ? kPiece : 0);
    for_each_row_piece(v, layout, first, last, [&](int64_t i, int64_t j0, int64_t j1, int64_t base) {
      if (cols.base != base) cols = columns(p, v, base, int_type, qat);
      if (!qat) {
        kernels::mirror_integers(data.data(), dst, int_type, i, j1 - j0, first, cols.mirror, j0);
        return true;
      }
      if (in_float32) {
        const bool lowest = kernels::requantize_float32(
            data.data(), i, j1 - j0, cols.old_scale.data() + j0, cols.old_zero_f.data() + j0, cols.add_f.data() + j0,
            cols.sign_f.data() + j0, cols.zero_f.data() + j0, cols.scale_f.data() + j0, range, dst + (i - first) * 4);
        if (lowest && negation_check) negation_check->fail();
        return true;
      }
      for (int64_t j = j0; j < j1; j += kPiece) {
        const int64_t m = std::min(kPiece, j1 - j), e = i + (j - j0);
        kernels::quantize_elements(data.data(), float_type, e, m, cols.old_scale.data() + j, cols.old_zero.data() + j,
                                   range, q.data());
        if (negation_check && lowest_in(q.data(), m, cols.sign.data() + j)) negation_check->fail();
        kernels::mirror_values(q.data(), m, cols.add.data() + j, cols.sign.data() + j);
        store<const double*>(q.data(), m, e - first, dst, cols.zero.data() + j, cols.scale.data() + j);
      }
      return true;
    });
  }

  // Deferred negation check: does q[0, m) (only where sign[j] < 0, when given) hold the type's lowest value?
  bool lowest_in(const double* q, int64_t m, const double* sign = nullptr) const {
    const auto lowest = static_cast<double>(range.lo);
    int hits = 0;  // | rather than a branch: the loop vectorises
    for (int64_t j = 0; j < m; ++j) hits |= static_cast<int>(q[j] == lowest) & static_cast<int>(!sign || sign[j] < 0);
    return hits != 0;
  }

  // The integers q'[0, m) as output element `at` onwards: as they are, or dequantized with zero point and scale
  // (one for all, or one per element).
  template <class P>
  void store(const double* q, int64_t m, int64_t at, char* dst, P zero, P scale) const {
    if (as_integers) kernels::store_integers(q, m, int_type, dst, at);
    else kernels::store_dequantized(q, m, zero, scale, float_type, dst + at * static_cast<int64_t>(element_width()));
  }
};

}  // namespace

graph::LazyBytes rescaled_weight_data(const QuantizedWeight& w, const WeightLayout& wl, const RescaledWeight& r,
                                      bool as_integers) {
  auto gen = std::make_shared<WeightGenerator>();
  gen->owner = w.owner;
  gen->data = w.data;
  gen->count = w.count;
  gen->int_type = w.int_type;
  gen->float_type = w.float_type;
  gen->qat = w.qat();
  gen->as_integers = as_integers;
  gen->float8 = w.float8();
  gen->fnuz = kernels::is_fnuz_float8(w.int_type);
  gen->wl = wl;
  gen->layout = r.layout;
  gen->range = w.range;
  gen->p = rescale_of(w, r);
  gen->negation_check = r.negation_check;
  gen->in_float32 = w.qat() && !as_integers && kernels::requantizes_in_float32(w.float_type, w.range, r.scale);
  graph::LazyBytes bytes;
  bytes.size = gen->size();
  bytes.fill = [gen](char* dst) { gen->fill(dst, 0, gen->size()); };
  bytes.fill_range = [gen](char* dst, size_t begin, size_t end) { gen->fill(dst, begin, end); };
  return bytes;
}

// ---------------------------------------------------------------- writing

namespace {

// The initializer write_constant_for replaces in place (when the given readers are all that read `old` and it
// is an initializer of this graph): its index, else -1.
int replaceable_initializer(Graph& g, const std::vector<Use>& readers, const std::string& old,
                            std::optional<graph::ConstRef>& ref) {
  if (old.empty()) return -1;
  ref = g.constant(old);
  const auto& uses = g.uses(old);
  bool only_ours = !g.is_graph_output(old) && uses.size() == readers.size();
  for (const Use& u : uses)
    only_ours = only_ours && std::any_of(readers.begin(), readers.end(),
                                         [&](const Use& r) { return r.node == u.node && r.slot == u.slot; });
  return ref && ref->graph == &g && ref->initializer >= 0 && only_ours ? ref->initializer : -1;
}

// Otherwise: a new tensor (made by `add`) under a fresh name, the readers rewired to it.
std::string rewire_to_new(FoldContext& ctx, const std::vector<Use>& readers, const std::string& old,
                          const std::string& base, Outcome& outcome, const std::function<void(const std::string&)>& add) {
  Graph& g = ctx.graph;
  const std::string name = new_tensor_name(ctx.model, old.empty() ? base : old, "_bnfolded");
  add(name);
  for (const Use& u : readers) g.set_input(u.node, u.slot, name);
  outcome.new_tensors.push_back(name);
  if (!old.empty()) g.drop_if_unused(old);
  return name;
}

}  // namespace

std::string write_constant_for(FoldContext& ctx, const std::vector<Use>& readers, std::string old,
                               int32_t data_type, const std::vector<int64_t>& dims, const std::string& raw,
                               const std::string& base, Outcome& outcome) {
  Graph& g = ctx.graph;
  std::optional<graph::ConstRef> ref;
  if (int k = replaceable_initializer(g, readers, old, ref); k >= 0) {
    if (ref->tensor.dims != dims) g.remove_value_info(old);
    g.replace_initializer(k, graph::reencode_tensor(ref->tensor, data_type, dims, raw));
    return old;
  }
  return rewire_to_new(ctx, readers, old, base, outcome, [&](const std::string& name) {
    g.add_tensor(name, graph::encode_tensor(name, data_type, dims, raw));
  });
}

std::string write_constant_for(FoldContext& ctx, const std::vector<Use>& readers, std::string old,
                               int32_t data_type, const std::vector<int64_t>& dims, graph::LazyBytes data,
                               const std::string& base, Outcome& outcome) {
  Graph& g = ctx.graph;
  std::optional<graph::ConstRef> ref;
  if (int k = replaceable_initializer(g, readers, old, ref); k >= 0) {
    if (ref->tensor.dims != dims) g.remove_value_info(old);
    g.replace_initializer_lazy(k, graph::reencode_tensor_header(ref->tensor, data_type, dims), std::move(data));
    return old;
  }
  return rewire_to_new(ctx, readers, old, base, outcome, [&](const std::string& name) {
    g.add_tensor_lazy(name, graph::encode_tensor_header(name, data_type, dims), std::move(data));
  });
}

namespace {

// Writes one quantization parameter (slot 1 scale, slot 2 zero point) for the given Q/DQ nodes. Nodes that
// read different tensors for it (equal in value) get one new tensor each.
void write_parameter(FoldContext& ctx, const std::vector<int>& nodes, int slot, int32_t data_type,
                     const std::vector<int64_t>& dims, const std::string& raw, const std::string& base,
                     Outcome& outcome) {
  Graph& g = ctx.graph;
  std::vector<std::pair<std::string, std::vector<Use>>> groups;
  for (int n : nodes) {
    const std::string name = slot < static_cast<int>(g.nodes[n].inputs.size()) ? g.nodes[n].inputs[slot] : "";
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& p) { return p.first == name; });
    if (it == groups.end()) groups.push_back({name, {Use{n, slot}}});
    else it->second.push_back(Use{n, slot});
  }
  for (const auto& [name, readers] : groups) write_constant_for(ctx, readers, name, data_type, dims, raw, base, outcome);
}

}  // namespace

void write_quantized_weight(FoldContext& ctx, const QuantizedWeight& w, const WeightLayout& wl,
                            const RescaledWeight& r, bool materialize, Outcome& outcome) {
  Graph& g = ctx.graph;
  const Node& d = g.nodes[w.dq];
  const std::string base = d.name.empty() ? d.outputs[0] : d.name;
  std::vector<int> qdq = {w.dq};
  if (w.qat() && materialize) {
    // int initializer -> DequantizeLinear: the QuantizeLinear goes, its float weight too if nothing else reads it.
    const std::vector<std::string> q_inputs = g.nodes[w.q].inputs;
    const std::string q_output = g.nodes[w.q].outputs[0];
    const std::string name = new_tensor_name(ctx.model, q_inputs[0], "_quantized");
    g.add_tensor_lazy(name, graph::encode_tensor_header(name, w.int_type, w.dims), rescaled_weight_data(w, wl, r, true));
    g.set_input(w.clip >= 0 ? w.clip : w.dq, 0, name);
    outcome.new_tensors.push_back(name);
    g.remove_node(w.q);
    g.remove_value_info(q_output);
    for (const auto& v : q_inputs) g.drop_if_unused(v);
  } else if (w.qat()) {
    if (w.q != w.dq) qdq.push_back(w.q);  // trt::DequantizeLinear is its own quantizer
    write_constant_for(ctx, {Use{w.q, 0}}, g.nodes[w.q].inputs[0], w.float_type, w.dims,
                       rescaled_weight_data(w, wl, r, false), base + "_weight", outcome);
  } else if (r.ints_changed) {  // else the integers stay as they are: not read, not copied
    const int reader = w.clip >= 0 ? w.clip : w.dq;  // the Clip (Brevitas) reads the integers before the DQ
    write_constant_for(ctx, {Use{reader, 0}}, g.nodes[reader].inputs[0], w.int_type, w.dims,
                       rescaled_weight_data(w, wl, r, true), base + "_weight", outcome);
  }
  const std::vector<int64_t>& pdims = r.layout.scale_dims;
  auto scale_raw = kernels::store_values(w.scale_type, r.scale);
  write_parameter(ctx, qdq, 1, w.scale_type, pdims, scale_raw ? *scale_raw : std::string(), base + "_scale", outcome);
  bool any_nonzero = std::any_of(r.zero.begin(), r.zero.end(), [](int64_t z) { return z != 0; });
  if ((w.has_zero && r.zero_changed) || (!w.has_zero && any_nonzero))
    write_parameter(ctx, qdq, 2, w.int_type, pdims, kernels::write_quantized(r.zero, w.int_type), base + "_zero_point",
                    outcome);
  if (r.promoted)
    for (int n : qdq) set_int_attribute(g, n, "axis", r.layout.axis);
}

}  // namespace qdqfold::folds
