#include "folds/weights/qdq_chain.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;

bool is_quantize(const Node& n) { return n.op_type == "QuantizeLinear" && (n.is("QuantizeLinear") || n.domain == "com.microsoft"); }
bool is_dequantize(const Node& n) {
  return n.op_type == "DequantizeLinear" &&
         (n.is("DequantizeLinear") || n.domain == "com.microsoft" || n.domain == "trt");
}

std::optional<QdqChain> select_qdq_chain(const Graph& g, int dq) {
  if (dq < 0 || !is_dequantize(g.nodes()[dq])) return std::nullopt;
  const Node& d = g.nodes()[dq];
  QdqChain c;
  c.dq = dq;
  c.fused = d.domain == "trt";
  c.source = d.inputs.empty() ? "" : d.inputs[0];
  if (const int p = c.source.empty() ? -1 : g.producer(c.source); p >= 0 && g.nodes()[p].is("Clip")) {
    c.clip = p;
    c.source = g.nodes()[p].inputs.empty() ? "" : g.nodes()[p].inputs[0];
  }
  if (const int p = c.source.empty() ? -1 : g.producer(c.source); p >= 0 && is_quantize(g.nodes()[p])) c.quantize = p;
  return c;
}

}  // namespace qdqfold::folds
