// Graph-level reads every layer of the folds shares (values.h).
#include "folds/common/values.h"

#include "folds/shapes.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;

namespace {

// Dequantizes constant integers: (q - z) * s, per tensor or along `axis`.
std::optional<std::vector<double>> dequantized_constant(Graph& g, const Node& dq) {
  if (dq.inputs.empty()) return std::nullopt;
  auto q = g.constant(dq.inputs[0]);
  auto s = dq.inputs.size() > 1 ? g.constant(dq.inputs[1]) : std::nullopt;
  if (!q || !s) return std::nullopt;
  std::optional<graph::ConstRef> z;
  if (dq.inputs.size() > 2 && !dq.inputs[2].empty()) {
    z = g.constant(dq.inputs[2]);
    if (!z) return std::nullopt;
  }
  if (dq.attr_int("block_size", 0) != 0) return std::nullopt;
  auto qv = q->tensor.values();
  auto sv = s->tensor.values();
  std::optional<std::vector<double>> zv = z ? z->tensor.values() : std::vector<double>(sv ? sv->size() : 0, 0.0);
  if (!qv || !sv || !zv || zv->size() != sv->size() || sv->empty()) return std::nullopt;
  const auto& dims = q->tensor.dims;
  std::vector<double> out(qv->size());
  if (sv->size() == 1) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = ((*qv)[i] - (*zv)[0]) * (*sv)[0];
    return out;
  }
  int64_t rank = static_cast<int64_t>(dims.size());
  int64_t axis = dq.attr_int("axis", 1);
  if (axis < 0) axis += rank;
  if (axis < 0 || axis >= rank || dims[axis] != static_cast<int64_t>(sv->size())) return std::nullopt;
  int64_t inner = 1;
  for (int64_t d = axis + 1; d < rank; ++d) inner *= dims[d];
  for (size_t i = 0; i < out.size(); ++i) {
    size_t c = (i / static_cast<size_t>(inner)) % sv->size();
    out[i] = ((*qv)[i] - (*zv)[c]) * (*sv)[c];
  }
  return out;
}

}  // namespace

std::optional<std::vector<double>> constant_values(Graph& g, const std::string& value) {
  if (auto c = g.constant(value)) return c->tensor.values();
  int p = g.producer(value);
  if (p >= 0 && g.nodes()[p].is("DequantizeLinear")) return dequantized_constant(g, g.nodes()[p]);
  return std::nullopt;
}

bool read_only_by(const Graph& g, const std::string& value, int reader) {
  if (g.is_graph_output(value)) return false;
  const auto& uses = g.uses(value);
  return uses.size() == 1 && uses[0].node == reader && uses[0].slot >= 0;
}

bool reads_only_shape(const Graph& g, const graph::Use& u) {
  if (u.slot != 0) return false;  // a subgraph's read (slot < 0) may be anything
  const Node& n = g.nodes()[u.node];
  return n.is("Shape") || n.is("Size");
}

std::string new_tensor_name(graph::Model& model, const std::string& old_name, const char* suffix) {
  return model.fresh_name(old_name + suffix);
}

std::optional<std::vector<int64_t>> constant_dims(Graph& g, const std::string& value) {
  if (auto c = g.constant(value)) return c->tensor.dims;
  const int p = g.producer(value);
  if (p >= 0 && g.nodes()[p].is("DequantizeLinear") && !g.nodes()[p].inputs.empty())
    if (auto q = g.constant(g.nodes()[p].inputs[0])) return q->tensor.dims;
  return std::nullopt;
}

std::optional<size_t> known_rank(const Graph& g, const std::string& value) {
  // Proven (folds/shapes.h: from the graph inputs through the ops the core knows, Flatten and Gemm among
  // them, outer-scope values in their own graph), never a value_info claim: a MatMul output claimed 2-D
  // but 3-D made gemm-bn write a Gemm that onnxruntime refuses.
  if (auto s = proven_shape(g, value)) return s->size();
  return std::nullopt;
}

std::string describe_node(const Graph& g, int node) {
  return g.nodes()[node].op_type + " '" + g.nodes()[node].display_name(node) + "'";
}

}  // namespace qdqfold::folds
