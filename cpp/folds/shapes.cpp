// Proven shapes (shapes.h): from graph inputs and constants through the ops below, never from value_info.
#include "folds/shapes.h"

#include <algorithm>
#include <functional>
#include <initializer_list>
#include <unordered_set>

#include "folds/common/conv_geometry.h"
#include "folds/common/values.h"
#include "folds/shapes_ops.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;

namespace {

using Maybe = std::optional<Dims>;
using Lookup = std::function<Maybe(const std::string&)>;

// Dims beyond this are taken as unknown, so that products of them cannot overflow.
constexpr int64_t kMaxDim = int64_t{1} << 40;

bool is_any(const Node& n, std::initializer_list<const char*> ops) {
  for (const char* op : ops)
    if (n.is(op)) return true;
  return false;
}

// Output 0 has input 0's shape (Dropout's mask too).
bool same_shape_op(const Node& n) {
  return is_any(n, {"Identity", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
                    "Selu", "Celu", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt",
                    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Clip", "Cast", "QuantizeLinear",
                    "DequantizeLinear", "BatchNormalization", "InstanceNormalization", "LRN", "LayerNormalization",
                    "Softmax", "LogSoftmax", "Dropout", "Shrink", "ThresholdedRelu"});
}

bool broadcast_op(const Node& n) {
  return is_any(n, {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where"});
}

bool other_op(const Node& n) {
  return is_any(n, {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                    "GlobalLpPool", "Concat", "Transpose", "Flatten", "Gemm", "MatMul", "Reshape"});
}

// True when shapes.cpp computes output `slot` of `n`.
bool computes(const Node& n, size_t slot) {
  if (n.is("Dropout")) return slot <= 1;
  if (shape_ops::computes(n, slot)) return true;
  return slot == 0 && (same_shape_op(n) || broadcast_op(n) || other_op(n));
}

Dims sane(Dims d) {
  for (int64_t& e : d)
    if (e < 0 || e > kMaxDim) e = -1;
  return d;
}

// Product of d[from, to), or -1 when a dim is unknown or it grows too large.
int64_t product(const Dims& d, size_t from, size_t to) {
  int64_t p = 1;
  for (size_t k = from; k < to; ++k) {
    if (d[k] < 0) return -1;
    p *= d[k];
    if (p > kMaxDim) return -1;
  }
  return p;
}

// Multidirectional (numpy) broadcasting; nullopt when a rank is unknown or known dims clash.
Maybe broadcast(const std::vector<Maybe>& shapes) {
  size_t rank = 0;
  for (const auto& s : shapes) {
    if (!s) return std::nullopt;
    rank = std::max(rank, s->size());
  }
  Dims out(rank, 1);
  for (size_t k = 0; k < rank; ++k) {
    int64_t known = 1;  // a dim other than 1 that some input has, else 1
    bool unknown = false;
    for (const auto& s : shapes) {
      if (s->size() + k < rank) continue;
      const int64_t d = (*s)[k + s->size() - rank];
      if (d < 0) unknown = true;
      else if (d != 1 && known != 1 && d != known) return std::nullopt;
      else if (d != 1) known = d;
    }
    out[k] = known != 1 ? known : unknown ? -1 : 1;
  }
  return out;
}

Maybe conv(const Node& n, const Maybe& x, const Maybe& w) {
  if (!x || !w || w->size() < 3 || x->size() != w->size()) return std::nullopt;
  for (int64_t d : *w)
    if (d < 0) return std::nullopt;
  auto geometry = read_conv_geometry(n, *w);
  const auto* g = std::get_if<ConvGeometry>(&geometry);
  if (!g) return std::nullopt;
  Dims out{(*x)[0], g->transposed ? (*w)[1] * n.attr_int("group", 1) : (*w)[0]};
  for (size_t d = 0; d < g->rank(); ++d) {
    const int64_t in = (*x)[d + 2];
    if (in < 0) {
      out.push_back(g->transposed && !g->output_shape.empty() ? g->output_shape[d] : -1);
      continue;
    }
    auto extent = output_extent(*g, d, in);
    if (!extent) return std::nullopt;
    out.push_back(*extent);
  }
  return out;
}

Maybe pool(const Node& n, const Maybe& x) {
  if (!x || x->size() < 3) return std::nullopt;
  const size_t rank = x->size() - 2;
  const Dims kernel = n.attr_ints("kernel_shape");
  if (kernel.size() != rank) return std::nullopt;
  auto ints = [&](const char* name, size_t count, int64_t fallback) {
    Dims v = n.attr_ints(name);
    if (!n.attr(name)) v.assign(count, fallback);
    return v;
  };
  const Dims strides = ints("strides", rank, 1), dilations = ints("dilations", rank, 1), pads = ints("pads", 2 * rank, 0);
  if (strides.size() != rank || dilations.size() != rank || pads.size() != 2 * rank) return std::nullopt;
  std::string auto_pad = n.attr_string("auto_pad", "NOTSET");
  if (auto_pad.empty()) auto_pad = "NOTSET";
  const bool ceil_mode = n.attr_int("ceil_mode", 0) != 0;
  Dims out{(*x)[0], (*x)[1]};
  for (size_t d = 0; d < rank; ++d) {
    const int64_t in = (*x)[d + 2], k = kernel[d], s = strides[d], dil = dilations[d];
    if (k < 1 || s < 1 || dil < 1 || k > kMaxDim || dil > kMaxDim || pads[d] < 0 || pads[d + rank] < 0) return std::nullopt;
    const int64_t k_eff = (k - 1) * dil + 1;
    if (in < 0) {
      out.push_back(-1);
    } else if (auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER") {
      out.push_back((in + s - 1) / s);
    } else if (auto_pad == "VALID" || auto_pad == "NOTSET") {
      const int64_t begin = auto_pad == "VALID" ? 0 : pads[d], end = auto_pad == "VALID" ? 0 : pads[d + rank];
      const int64_t span = in + begin + end - k_eff;
      if (span < 0) return std::nullopt;
      // ceil_mode: runtimes differ on a last window that starts in the end padding; only the even case is sure.
      if (ceil_mode && (span % s != 0 || end >= k_eff)) out.push_back(-1);
      else out.push_back(span / s + 1);
    } else {
      return std::nullopt;
    }
  }
  return out;
}

Maybe concat(const Node& n, const std::vector<Maybe>& ins) {
  if (ins.empty() || !ins[0]) return std::nullopt;
  const auto rank = static_cast<int64_t>(ins[0]->size());
  int64_t axis = n.attr_int("axis", 1);
  if (axis < 0) axis += rank;
  if (axis < 0 || axis >= rank) return std::nullopt;
  Dims out(static_cast<size_t>(rank), -1);
  int64_t total = 0;
  for (const auto& s : ins) {
    if (!s || static_cast<int64_t>(s->size()) != rank) return std::nullopt;
    for (int64_t k = 0; k < rank; ++k) {
      const int64_t d = (*s)[static_cast<size_t>(k)];
      if (k == axis) total = total < 0 || d < 0 ? -1 : total + d;
      else if (d >= 0 && out[static_cast<size_t>(k)] >= 0 && out[static_cast<size_t>(k)] != d) return std::nullopt;
      else if (d >= 0) out[static_cast<size_t>(k)] = d;
    }
  }
  out[static_cast<size_t>(axis)] = total;
  return out;
}

Maybe transpose(const Node& n, const Maybe& x) {
  if (!x) return std::nullopt;
  Dims perm = n.attr_ints("perm");
  if (!n.attr("perm"))
    for (size_t k = x->size(); k-- > 0;) perm.push_back(static_cast<int64_t>(k));
  if (perm.size() != x->size()) return std::nullopt;
  Dims out;
  std::vector<bool> seen(x->size(), false);
  for (int64_t p : perm) {
    if (p < 0 || p >= static_cast<int64_t>(x->size()) || seen[static_cast<size_t>(p)]) return std::nullopt;
    seen[static_cast<size_t>(p)] = true;
    out.push_back((*x)[static_cast<size_t>(p)]);
  }
  return out;
}

Maybe matmul(const Maybe& a, const Maybe& b) {
  if (!a || !b || a->empty() || b->empty()) return std::nullopt;
  Dims x = *a, y = *b;
  if (a->size() == 1) x.insert(x.begin(), 1);
  if (b->size() == 1) y.push_back(1);
  auto batch = broadcast({Dims(x.begin(), x.end() - 2), Dims(y.begin(), y.end() - 2)});
  if (!batch) return std::nullopt;
  const int64_t kx = x.back(), ky = y[y.size() - 2];
  if (kx >= 0 && ky >= 0 && kx != ky) return std::nullopt;
  Dims out = *batch;
  if (a->size() != 1) out.push_back(x[x.size() - 2]);
  if (b->size() != 1) out.push_back(y.back());
  return out;
}

// A constant target gives the dims it can (a 0 copies x's dim, a -1 is what x's size leaves); any other target
// gives the rank alone, the length of the 1-D shape input (`target_shape`, proven), which is the output's rank.
Maybe reshape(Graph& g, const Node& n, const Maybe& x, const Maybe& target_shape) {
  if (n.inputs.size() < 2) return std::nullopt;
  auto target = constant_values(g, n.inputs[1]);
  if (!target) return shape_ops::reshape_by_length(target_shape);
  const bool allow_zero = n.attr_int("allowzero", 0) != 0;
  Dims out;
  int inferred = -1;
  for (size_t k = 0; k < target->size(); ++k) {
    const double t = (*target)[k];
    if (t == -1 && inferred < 0) {
      inferred = static_cast<int>(k);
      out.push_back(-1);
    } else if (t == 0 && !allow_zero) {
      if (x && k >= x->size()) return std::nullopt;  // not a valid Reshape
      out.push_back(x ? (*x)[k] : -1);
    } else if (t >= 0 && t <= static_cast<double>(kMaxDim) && t == static_cast<double>(static_cast<int64_t>(t))) {
      out.push_back(static_cast<int64_t>(t));
    } else {
      return std::nullopt;
    }
  }
  if (inferred >= 0 && x) {
    const int64_t total = product(*x, 0, x->size());
    Dims rest = out;
    rest.erase(rest.begin() + inferred);
    const int64_t others = product(rest, 0, rest.size());
    if (total >= 0 && others > 0 && total % others == 0) out[static_cast<size_t>(inferred)] = total / others;
  }
  return out;
}

// The proven shape of output `slot` of `n`.
Maybe compute(Graph& g, const Node& n, size_t slot, const Lookup& in) {
  auto input = [&](size_t k) -> Maybe { return k < n.inputs.size() && !n.inputs[k].empty() ? in(n.inputs[k]) : std::nullopt; };
  if (shape_ops::computes(n, slot)) {
    std::vector<Maybe> shapes;
    for (size_t k = 0; k < n.inputs.size(); ++k) shapes.push_back(input(k));
    return shape_ops::compute(g, n, slot, shapes);
  }
  if (same_shape_op(n)) return input(0);
  if (broadcast_op(n)) {
    std::vector<Maybe> shapes;
    for (const auto& v : n.inputs)
      if (!v.empty()) shapes.push_back(in(v));
    return broadcast(shapes);
  }
  if (n.is("Conv") || n.is("ConvTranspose")) return conv(n, input(0), input(1));
  if (n.is("MaxPool") || n.is("AveragePool") || n.is("LpPool")) return pool(n, input(0));
  if (n.is("GlobalAveragePool") || n.is("GlobalMaxPool") || n.is("GlobalLpPool")) {
    auto x = input(0);
    if (!x || x->size() < 2) return std::nullopt;
    for (size_t k = 2; k < x->size(); ++k) (*x)[k] = 1;
    return x;
  }
  if (n.is("Concat")) {
    std::vector<Maybe> shapes;
    for (const auto& v : n.inputs) shapes.push_back(v.empty() ? std::nullopt : in(v));
    return concat(n, shapes);
  }
  if (n.is("Transpose")) return transpose(n, input(0));
  if (n.is("Flatten")) {
    auto x = input(0);
    if (!x) return std::nullopt;
    const auto rank = static_cast<int64_t>(x->size());
    int64_t axis = n.attr_int("axis", 1);
    if (axis < 0) axis += rank;
    if (axis < 0 || axis > rank) return std::nullopt;
    return Dims{product(*x, 0, static_cast<size_t>(axis)), product(*x, static_cast<size_t>(axis), x->size())};
  }
  if (n.is("Gemm")) {
    auto a = input(0), b = input(1);
    if (!a || !b || a->size() != 2 || b->size() != 2) return std::nullopt;
    return Dims{(*a)[n.attr_int("transA", 0) ? 1 : 0], (*b)[n.attr_int("transB", 0) ? 0 : 1]};
  }
  if (n.is("MatMul")) return matmul(input(0), input(1));
  if (n.is("Reshape")) return reshape(g, n, input(0), input(1));
  return std::nullopt;
}

class Prover {
 public:
  Prover(const Options& options, ShapeProofs& proofs) : options_(options), proofs_(proofs) {}

  Maybe get(Graph& g, const std::string& root) {
    auto key = [&](const std::string& v) { return std::make_pair(static_cast<const Graph*>(&g), v); };
    auto& known = proofs_.known;
    if (auto it = known.find(key(root)); it != known.end()) return it->second;
    // Depth first without recursion (chains of 100,000 nodes): a value is computed once its inputs are; an
    // input still unknown on the second visit (a cycle in a malformed graph) counts as unknown.
    std::vector<std::string> stack{root};
    std::unordered_set<std::string> visited;
    while (!stack.empty()) {
      const std::string v = stack.back();
      if (known.count(key(v))) {
        stack.pop_back();
        continue;
      }
      bool leaf = true;
      Maybe shape = leaf_shape(g, v, leaf);
      if (leaf) {
        known[key(v)] = sane_or_none(shape);
        stack.pop_back();
        continue;
      }
      const Node& n = g.nodes()[g.producer(v)];
      if (visited.insert(v).second) {
        bool ready = true;
        for (const auto& in : n.inputs)
          if (!in.empty() && !known.count(key(in))) {
            stack.push_back(in);
            ready = false;
          }
        if (!ready) continue;
      }
      auto lookup = [&](const std::string& in) -> Maybe {
        auto it = known.find(key(in));
        return it == known.end() ? std::nullopt : it->second;
      };
      const auto slot = static_cast<size_t>(std::find(n.outputs.begin(), n.outputs.end(), v) - n.outputs.begin());
      known[key(v)] = sane_or_none(compute(g, n, slot, lookup));
      stack.pop_back();
    }
    return known[key(root)];
  }

 private:
  static Maybe sane_or_none(const Maybe& s) { return s ? Maybe(sane(*s)) : std::nullopt; }

  // The shape of a value that needs no node's inputs (`leaf` stays true), or leaf = false.
  Maybe leaf_shape(Graph& g, const std::string& v, bool& leaf) {
    if (auto c = g.constant(v)) return c->tensor.dims;
    if (g.is_graph_input(v)) {
      if (g.kind != graph::GraphKind::Main) return std::nullopt;  // a body's inputs are set by its owner node
      auto declared = g.input_shape(v);
      auto given = options_.shapes.find(v);
      if (given == options_.shapes.end()) return declared;
      if (!declared) return given->second;
      if (declared->size() != given->second.size()) return declared;  // the declaration is what runtimes check
      for (size_t d = 0; d < declared->size(); ++d)
        if ((*declared)[d] < 0) (*declared)[d] = given->second[d];
      return declared;
    }
    if (!g.defines(v)) return g.parent ? get(*g.parent, v) : std::nullopt;
    const int p = g.producer(v);
    if (p < 0) return std::nullopt;
    const Node& n = g.nodes()[p];
    const auto slot = static_cast<size_t>(std::find(n.outputs.begin(), n.outputs.end(), v) - n.outputs.begin());
    if (!computes(n, slot)) return std::nullopt;
    leaf = false;
    return std::nullopt;
  }

  const Options& options_;
  ShapeProofs& proofs_;
};

thread_local const Options* scope_options = nullptr;
thread_local ShapeProofs* scope_proofs = nullptr;

}  // namespace

std::optional<Dims> proven_shape(const FoldContext& ctx, const std::string& value) {
  ShapeProofs local;
  Prover prover(ctx.options, ctx.shape_proofs ? *ctx.shape_proofs : local);
  return prover.get(ctx.graph, value);
}

std::optional<Dims> proven_shape(const graph::Graph& g, const std::string& value) {
  static const Options defaults;
  ShapeProofs local;
  Prover prover(scope_options ? *scope_options : defaults, scope_proofs ? *scope_proofs : local);
  // Graph::constant is not const (it may look through Identity chains); nothing here edits the graph.
  return prover.get(const_cast<graph::Graph&>(g), value);
}

ShapeScope::ShapeScope(const Options& options, ShapeProofs& proofs)
    : previous_options_(scope_options), previous_proofs_(scope_proofs) {
  scope_options = &options;
  scope_proofs = &proofs;
}

ShapeScope::~ShapeScope() {
  scope_options = previous_options_;
  scope_proofs = previous_proofs_;
}

}  // namespace qdqfold::folds
