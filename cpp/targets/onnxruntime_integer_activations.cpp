// integer-activation (target onnxruntime): a Relu or Clip between two quantizers of the same parameters runs on
// the integers.
//
//   before:  q -> DequantizeLinear(s, z) -> d -> Relu | Clip(lo, hi) -> c -> QuantizeLinear(s, z) -> q' -> ...
//   after:   q -> Clip(q, L, H) -> q' -> ...          L = Q(lo) (Relu: Q(0) = z), H = Q(hi) (no hi: the type's max)
//            (the QuantizeLinear node itself becomes the Clip, so it keeps its name and place)
//
// Why: at a symmetric zero point (ModelOpt's 0, z + 128 = 128 after uint8_activations) onnxruntime's
// ReluQuantFusion and ClipQuantFusion cannot drop the activation, so after output_quantizer every Relu / Relu6
// of a QAT export is DequantizeLinear -> Relu -> QuantizeLinear: three float passes over the tensor between two
// integer kernels (profiled on the generated MobileNetV2: 43% of the kernel time). An integer Clip (opset 12+,
// onnxruntime's CPU kernel takes uint8) is one pass; the DequantizeLinear after q' still feeds the next layer,
// so that layer's QLinearConv forms as before.
//
// Exact. Write Q(v) = sat(round(v / s) + z) and D(q) = (q - z) * s as in onnxruntime_output_quantizers.cpp; its
// facts (1) Q(D(q)) = q and (2) Q nondecreasing, so Q(min(max(v, lo), hi)) = min(max(Q(v), Q(lo)), Q(hi)).
// Then q' = Q(clip(D(q), lo, hi)) = min(max(Q(D(q)), Q(lo)), Q(hi)) = min(max(q, L), H), which is what Clip
// computes on the integer q (lo > hi: both sides give H, as max(q, L) >= L >= H). Relu is Clip(0, +inf):
// L = Q(0) = sat(z) = z, H = Q(+inf) = the type's maximum. The floats d and c are read by nothing else
// (checked), so nothing else sees them go. Q(lo) must be the integer onnxruntime's QuantizeLinear makes of lo:
// round(lo / s) half to even, as the ONNX spec and MLAS (division, then round-to-nearest-even) compute it; a bound
// whose quotient lies within 1e-3 of a tie (where a runtime dividing by the reciprocal could round the other way)
// is left alone. Only 8-bit uint8 with a float32 scale (the type onnxruntime's Clip kernel takes and the target
// writes; an int8 chain is left alone: onnxruntime forms no int8 kernels on x86-64 and converts a pair to
// uint8 only while a DequantizeLinear reads its QuantizeLinear directly, which this rewrite would stop).
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <variant>

#include "graph/tensor.h"
#include "targets/onnxruntime.h"
#include "targets/onnxruntime_rewrite.h"

namespace qdqfold::targets {

using graph::Graph;
using graph::Node;
using wire::DataType;
using namespace detail;

namespace {

// One Relu / Clip found between equal quantizers (select), with the integer bounds it becomes (plan).
struct Chain {
  int dq = -1, act = -1, q = -1;
  int lo = 0, hi = 255;
};

// The float bound of Clip input `slot` (1: min, 2: max), or the opset < 11 attribute, or `otherwise`.
std::optional<double> clip_bound(Graph& g, const Node& n, size_t slot, double otherwise) {
  if (n.inputs.size() > slot && !n.inputs[slot].empty()) {
    auto ref = g.constant(n.inputs[slot]);
    if (!ref || ref->tensor.count != 1 || ref->tensor.data_type != static_cast<int32_t>(DataType::Float))
      return std::nullopt;
    auto v = ref->tensor.values();
    if (!v || v->size() != 1 || std::isnan((*v)[0])) return std::nullopt;
    return (*v)[0];
  }
  if (const auto* at = n.attr(slot == 1 ? "min" : "max")) {
    if (std::isnan(at->f)) return std::nullopt;
    return at->f;
  }
  return otherwise;
}

// Q(bound) for a uint8 quantizer (s, z), or nullopt when the quotient is too near a tie to be sure of it.
std::optional<int> quantized_bound(double bound, float s, int z) {
  if (std::isinf(bound)) return bound < 0 ? 0 : 255;
  const float quotient = static_cast<float>(bound) / s;  // float32, as the runtime divides
  if (std::fabs(quotient) > 1e6f) return quotient < 0 ? 0 : 255;
  const double frac = std::fabs(static_cast<double>(quotient) - std::floor(static_cast<double>(quotient)));
  if (std::fabs(frac - 0.5) < 1e-3) return std::nullopt;
  const long r = std::lrint(quotient) + z;  // round half to even under the default rounding mode
  return static_cast<int>(r < 0 ? 0 : r > 255 ? 255 : r);
}

// select + plan: the chain through activation node `act`, or nullopt.
std::optional<Chain> select(Graph& g, int act) {
  const Node& a = g.nodes()[act];
  if (!a.domain.empty() && a.domain != "ai.onnx") return std::nullopt;
  if (!(a.is("Relu") || a.is("Clip")) || a.inputs.empty() || a.outputs.size() != 1) return std::nullopt;
  const std::string& d = a.inputs[0];
  const int dq = g.producer(d);
  if (dq < 0 || !g.nodes()[dq].is("DequantizeLinear") || g.is_graph_output(d) || g.reader_count(d) != 1)
    return std::nullopt;
  const std::string& c = a.outputs[0];
  const auto& uses = g.uses(c);
  if (g.is_graph_output(c) || g.reader_count(c) != 1 || uses.size() != 1 || uses[0].slot != 0) return std::nullopt;
  const int q = uses[0].node;
  // The QuantizeLinear becomes the Clip: no attribute of its may remain (axis, saturate, ...).
  if (!g.nodes()[q].is("QuantizeLinear") || g.nodes()[q].outputs.size() != 1 || g.nodes()[q].inputs.size() != 3 ||
      !g.nodes()[q].attributes.empty())
    return std::nullopt;
  auto from = read_quantizer(g, dq);
  auto to = read_quantizer(g, q);
  if (!std::holds_alternative<Quantizer>(from) || !std::holds_alternative<Quantizer>(to)) return std::nullopt;
  const Quantizer& p = std::get<Quantizer>(from);
  if (!p.same_as(std::get<Quantizer>(to)) || p.zero.empty() || p.output_dtype || !p.domain.empty() ||
      p.zero_type != static_cast<int32_t>(DataType::Uint8) || p.scale_type != static_cast<int32_t>(DataType::Float))
    return std::nullopt;
  const float s = static_cast<float>(graph::float_element(p.scale_type, p.scale_raw, 0));
  const int z = static_cast<unsigned char>(p.zero_raw[0]);
  Chain chain{dq, act, q};
  if (a.is("Relu")) {
    chain.lo = z;
    chain.hi = 255;
    return chain;
  }
  const double inf = std::numeric_limits<double>::infinity();
  // Clip-6's attribute defaults are the float range's ends, which round to the type's ends.
  auto lo = clip_bound(g, a, 1, -inf), hi = clip_bound(g, a, 2, inf);
  if (!lo || !hi) return std::nullopt;
  auto L = quantized_bound(*lo, s, z), H = quantized_bound(*hi, s, z);
  if (!L || !H) return std::nullopt;
  chain.lo = *L;
  chain.hi = *H;
  return chain;
}

std::string uint8_scalar(graph::Model& model, Graph& g, const std::string& base, int value,
                         std::vector<std::string>& new_tensors) {
  const std::string name = model.fresh_name(base);
  g.add_tensor(name, graph::encode_tensor(name, static_cast<int32_t>(DataType::Uint8), {},
                                          std::string(1, static_cast<char>(static_cast<unsigned char>(value)))));
  new_tensors.push_back(name);
  return name;
}

// apply: the QuantizeLinear becomes the integer Clip, reading q (it stays where it is: after q's producer, which
// comes before the DequantizeLinear, and before every reader of its output, so the graph stays sorted even when
// the QuantizeLinear is one an earlier rewrite added); the DequantizeLinear and the activation go.
void apply(graph::Model& model, Graph& g, const Chain& c, std::vector<std::string>& new_tensors) {
  // Copies: the edits below change the nodes' inputs.
  const std::vector<std::string> dq_in = g.nodes()[c.dq].inputs, act_in = g.nodes()[c.act].inputs,
                                 q_in = g.nodes()[c.q].inputs;
  const std::string d = g.nodes()[c.dq].outputs[0], a = g.nodes()[c.act].outputs[0];
  const std::string base = g.nodes()[c.act].display_name(c.act) + "/integer";
  g.set_op_type(c.q, "Clip");
  g.set_input(c.q, 0, dq_in[0]);
  g.set_input(c.q, 1, uint8_scalar(model, g, base + "_min", c.lo, new_tensors));
  g.set_input(c.q, 2, uint8_scalar(model, g, base + "_max", c.hi, new_tensors));
  g.remove_node(c.act);
  g.remove_node(c.dq);
  g.remove_value_info(d);
  g.remove_value_info(a);
  for (const auto* inputs : {&dq_in, &act_in, &q_in})
    for (size_t i = 1; i < inputs->size(); ++i) g.drop_if_unused((*inputs)[i]);
}

}  // namespace

int integer_activations(graph::Model& model, Graph& g, std::vector<BatchNormRecord>& records) {
  if (g.opset() < 12) return 0;  // Clip takes integer tensors from opset 12
  int changed = 0;
  for (size_t i = 0; i < g.nodes().size(); ++i) {
    if (g.nodes()[i].removed()) continue;
    auto chain = select(g, static_cast<int>(i));
    if (!chain) continue;
    // The layer whose record tells of it: the producer of the DequantizeLinear's quantizer's input.
    const int q0 = g.producer(g.nodes()[chain->dq].inputs[0]);
    const int layer = q0 >= 0 && g.nodes()[q0].is("QuantizeLinear") ? g.producer(g.nodes()[q0].inputs[0]) : -1;
    const std::string act = describe(g, chain->act);
    BatchNormRecord* record = nullptr;
    if (layer >= 0)
      for (auto& r : records)
        if (r.graph == g.path && r.node == g.nodes()[layer].display_name(layer) && r.folded) record = &r;
    if (!record) {
      BatchNormRecord r;
      r.graph = g.path;
      r.node = g.nodes()[chain->act].display_name(chain->act);
      r.op_type = g.nodes()[chain->act].op_type;
      r.direction = "";
      r.folded = true;
      r.exact = true;
      r.code = "integer-activation";
      r.message = "runs on the integers between two quantizers of the same parameters";
      records.push_back(std::move(r));
      record = &records.back();
    } else {
      record->message += "; its " + act + " runs on the integers";
    }
    record->message += " (Clip to [" + std::to_string(chain->lo) + ", " + std::to_string(chain->hi) + "])";
    record->metrics.emplace_back("activation_on_integers", 1.0);
    apply(model, g, *chain, record->new_tensors);
    ++changed;
  }
  return changed;
}

}  // namespace qdqfold::targets
