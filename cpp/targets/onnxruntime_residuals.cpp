// Residual Adds and Concats (target onnxruntime): the inputs of an Add / Concat get the Q -> DQ pairs that let
// onnxruntime form QLinearAdd / QLinearConcat (its QDQ selectors: every input from a DequantizeLinear, the output
// only to QuantizeLinear; the output side is onnxruntime_output_quantizers.cpp's, run after this).
//
//   before:  DQ(q; s, z) -> Relu / MaxPool / Reshape ... -> v -> Add <- u (a conv's float output)
//   exact:   ... -> v -> Q(s, z) -> DQ(s, z) -> v' -> Add            ("grid-input", always)
//   approx.: u -> Q(s', z') -> DQ(s', z') -> u' -> Add               ("requantized-residual", requantize_residuals)
//
// grid-input, exact. v is a DequantizeLinear's output carried through ops that keep it on that DQ's grid
// {D(q) = (q - z) s : q of the type}, so D(Q(v)) = v elementwise and the Add reads the same floats:
//   DQ itself    v = D(q), and Q(D(q)) = q by fact (1) of onnxruntime_output_quantizers.cpp (8-bit with a float32
//                or float16 scale, 16-bit with float32), so D(Q(v)) = D(q) = v.
//   Relu         max(D(q), 0) = D(max(q, z)): D(z) = fl(0 * s) = 0 and D is nondecreasing in q, so the max of
//                the two D values is D of the max. max(q, z) is of the type, so the result is on the grid.
//   MaxPool      max_i D(q_i) = D(max_i q_i) the same way; only with no padding and ceil_mode 0 (a window of
//                padding alone would give -inf, which is on no grid) and its Indices output unused.
//   Reshape / Flatten / Transpose / Squeeze / Unsqueeze / Identity / Cast float32 -> float32  copy elements,
//                each one D(q) of the grid, and the parameters are one scalar each (checked: per-tensor).
//   Clip is not taken: a bound off the grid puts values off it.
//
// The case that is NOT exact, kept unless requantize_residuals: an input u that is no DQ's grid value (a conv's
// float output, a Relu of a float value). Q(a + b) != Q(D(Q(a)) + D(Q(b))) in general even when a, b and the
// sum share one quantizer: s = 1, z = 0, a = b = 0.4 gives Q(0.8) = 1 but D(Q(0.4)) + D(Q(0.4)) = 0. So quantizing
// the Add's inputs is a new rounding, and the target does it only under the approximate option:
//   requantized-residual  u gets Q -> DQ with (in this order) the parameters of a per-tensor quantizer that
//       already reads u (ModelOpt's block input, which its next conv quantizes), else of the first quantizer
//       after the Add's output through ops that commute with rounding (the rounding the sum gets anyway), else
//       of another input's. Each such input moves by at most s' / 2 per element inside the quantizer's range
//       (and is clipped to it outside); the record's metric "new_rounding_step" is the largest s', and verify
//       measures how far the outputs move (python/qdqfold/target_report.py).
#include <cmath>
#include <deque>
#include <set>
#include <variant>

#include "graph/tensor.h"
#include "targets/onnxruntime.h"
#include "targets/onnxruntime_rewrite.h"

namespace qdqfold::targets {

using graph::Graph;
using graph::Node;
using namespace detail;

namespace {

bool standard(const Node& n) { return n.domain.empty() || n.domain == "ai.onnx"; }

// An op whose output is on its input's grid when its input is (see the header comment), reading input 0.
bool keeps_grid(Graph& g, const Node& n) {
  if (identity_cast(g, n)) return true;
  if (!standard(n) || n.outputs.empty() || n.inputs.empty()) return false;
  if (n.op_type == "Relu" || n.op_type == "Reshape" || n.op_type == "Flatten" || n.op_type == "Transpose" ||
      n.op_type == "Squeeze" || n.op_type == "Unsqueeze" || n.op_type == "Identity")
    return n.outputs.size() == 1;
  if (n.op_type != "MaxPool") return false;
  if (n.outputs.size() > 1 && !n.outputs[1].empty() && g.reader_count(n.outputs[1]) > 0) return false;
  for (int64_t p : n.attr_ints("pads"))
    if (p != 0) return false;
  std::string_view pad;
  if (const auto* a = n.attr("auto_pad")) pad = a->s;
  return n.attr_int("ceil_mode", 0) == 0 && (pad.empty() || pad == "NOTSET" || pad == "VALID");
}

// The DequantizeLinear on whose grid `value` is, with parameters the rewrite can copy; -1 when none.
int grid_source(Graph& g, const std::string& value, int depth = 0) {
  const int p = value.empty() || depth > 64 ? -1 : g.producer(value);
  if (p < 0) return -1;
  const Node& n = g.nodes()[p];
  if (n.is("DequantizeLinear") && standard(n))
    return std::holds_alternative<Quantizer>(read_quantizer(g, p)) ? p : -1;
  return keeps_grid(g, n) ? grid_source(g, n.inputs[0], depth + 1) : -1;
}

// A per-tensor quantizer the rewrite can copy that reads `value` (or, when `value` is an identity Cast's output,
// the Cast's input: ModelOpt's block input reaches the Add through one and its next conv's quantizer directly),
// else -1.
int reading_quantizer(Graph& g, const std::string& value) {
  for (const graph::Use& u : g.uses(value))
    if (u.slot == 0 && g.nodes()[u.node].is("QuantizeLinear") &&
        std::holds_alternative<Quantizer>(read_quantizer(g, u.node)))
      return u.node;
  const int p = value.empty() ? -1 : g.producer(value);
  if (p >= 0 && identity_cast(g, g.nodes()[p])) return reading_quantizer(g, g.nodes()[p].inputs[0]);
  return -1;
}

// The first such quantizer after `value` through ops that commute with rounding, breadth first; else -1.
int downstream_quantizer(Graph& g, const std::string& value) {
  std::deque<std::pair<std::string, int>> todo = {{value, 0}};
  std::set<std::string> seen;
  while (!todo.empty()) {
    auto [v, depth] = todo.front();
    todo.pop_front();
    if (depth > 64 || !seen.insert(v).second) continue;
    if (const int q = reading_quantizer(g, v); q >= 0) return q;
    for (const graph::Use& u : g.uses(v))
      if (u.slot == 0 && commutes(g, u.node)) todo.emplace_back(g.nodes()[u.node].outputs[0], depth + 1);
  }
  return -1;
}

// A constant, or a DequantizeLinear of constants only (a quantized bias): never a residual's operand.
bool constant_operand(Graph& g, const std::string& value) {
  if (value.empty()) return false;
  if (g.constant(value).has_value()) return true;
  const int p = g.producer(value);
  if (p < 0 || !g.nodes()[p].is("DequantizeLinear")) return false;
  for (const auto& in : g.nodes()[p].inputs)
    if (!in.empty() && !g.constant(in).has_value()) return false;
  return true;
}

double scale_of(const Quantizer& q) { return graph::float_element(q.scale_type, q.scale_raw, 0); }

}  // namespace

std::vector<BatchNormRecord> residual_inputs(graph::Model& model, Graph& g, bool requantize) {
  std::vector<BatchNormRecord> records;
  std::vector<int> sums;
  for (size_t i = 0; i < g.nodes().size(); ++i) {
    const Node& n = g.nodes()[i];
    if (!n.removed() && !n.created() && standard(n) && (n.op_type == "Add" || n.op_type == "Concat") &&
        n.outputs.size() == 1 && !n.outputs[0].empty())
      sums.push_back(static_cast<int>(i));
  }
  for (int node : sums) {
    const Node& n = g.nodes()[node];
    if (n.op_type == "Add" && n.inputs.size() != 2) continue;
    bool all_dequantized = true, constant = false;
    for (const auto& in : n.inputs) {
      all_dequantized = all_dequantized && dequantized(g, in);
      constant = constant || constant_operand(g, in);
    }
    // A constant operand (a bias Add after a MatMul, a shift) makes it no residual: not the target's business.
    if (all_dequantized || constant || n.inputs.empty()) continue;
    BatchNormRecord r;
    r.graph = g.path;
    r.node = n.display_name(node);
    r.op_type = n.op_type;
    // plan: per input, the parameters of its rounding and whether it is exact.
    struct Plan {
      size_t slot;
      Quantizer q;
      bool exact;
    };
    std::vector<Plan> plans;
    std::vector<size_t> open;  // float inputs on no grid
    for (size_t i = 0; i < n.inputs.size(); ++i) {
      if (n.inputs[i].empty() || dequantized(g, n.inputs[i])) continue;
      if (const int d = grid_source(g, n.inputs[i]); d >= 0)
        plans.push_back({i, std::get<Quantizer>(read_quantizer(g, d)), true});
      else
        open.push_back(i);
    }
    if (!open.empty() && !requantize) {
      const std::string v = n.inputs[open[0]];
      records.push_back(kept(r, "residual-float-input",
                             "left in float: input '" + v + "' is a float value on no quantizer's grid, so giving it "
                             "a quantizer is a new rounding (requantize_residuals=True does it, approximately)"));
      continue;
    }
    double step = 0;
    bool missing = false;
    std::vector<size_t> left;  // inputs with no quantizer of their own: another input's parameters
    for (size_t i : open) {
      int q = reading_quantizer(g, n.inputs[i]);
      if (q < 0) q = downstream_quantizer(g, n.outputs[0]);
      if (q < 0) {
        left.push_back(i);
        continue;
      }
      plans.push_back({i, std::get<Quantizer>(read_quantizer(g, q)), false});
      step = std::max(step, scale_of(plans.back().q));
    }
    for (size_t i : left) {
      if (plans.empty()) {
        missing = true;
        break;
      }
      plans.push_back({i, plans.front().q, false});
      step = std::max(step, scale_of(plans.back().q));
    }
    if (missing) {
      records.push_back(kept(r, "no-quantizer-parameters",
                             "left in float: no input is on a grid and no quantizer reads an input or follows the "
                             "output, so there are no parameters to quantize its inputs with"));
      continue;
    }
    // apply: input slot -> Q -> DQ -> a new name the node reads.
    const std::string base = n.display_name(node);
    bool exact = true;
    std::string parts;
    for (const Plan& p : plans) {
      const std::string v = g.nodes()[node].inputs[p.slot];
      const std::string out = model.fresh_name(v + "_requantized");
      // Private copies of the scale and zero point: a pair equal to the next conv's (same constants) would be
      // merged with it by onnxruntime's common subexpression elimination into one Q read by two DQs, which its
      // QDQS8ToU8Transformer then leaves int8 (measured: no QLinearAdd, and the convs around it stay float).
      add_rounding(model, g, p.q, v, out, base + "/input_quantizer" + std::to_string(p.slot), node, r.new_tensors,
                   true);
      g.set_input(node, static_cast<int>(p.slot), out);
      exact = exact && p.exact;
      r.into.push_back(p.q.node >= 0 ? g.nodes()[p.q.node].display_name(p.q.node) : "");
      parts += std::string(parts.empty() ? "" : "; ") + "input '" + v + "' " +
               (p.exact ? "is on the grid of " : "rounded with the parameters of ") + describe(g, p.q.node);
    }
    r.into_op = "QuantizeLinear";
    r.folded = true;
    r.exact = exact;
    r.code = exact ? "grid-input" : "requantized-residual";
    if (!exact) r.metrics.emplace_back("new_rounding_step", step);
    r.message = (exact ? "inputs quantized exactly (each already on that grid, so the same floats reach it): "
                       : "inputs quantized by requantize_residuals: APPROXIMATE, each rounded input moves by at most "
                         "half its step (largest step " + std::to_string(step) + ") inside the quantizer's range: ") +
                parts;
    records.push_back(std::move(r));
  }
  return records;
}

}  // namespace qdqfold::targets
