// The rewrites onnxruntime runs before its QDQ selectors, as queries on the unchanged graph
// (onnxruntime_kernels.h lists them); used by onnxruntime_kernels.cpp only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../graph/graph.h"

namespace qdqfold::predict::rewrites {

bool is_q(const graph::Node& n);   // QuantizeLinear, onnx or com.microsoft domain
bool is_dq(const graph::Node& n);  // DequantizeLinear

// The node reading `value` through its only edge when `value` is no graph output, else -1.
int only_reader(graph::Graph& g, const std::string& value);

// The integer type of a Q / DQ node as written (its zero point's, a DQ's input constant's, output_dtype, uint8);
// 0 when unknown.
int32_t written_type(graph::Graph& g, int qdq);

// QDQS8ToU8Transformer: whether the int8 pair of Q `q` becomes uint8.
bool converted_to_uint8(graph::Graph& g, int q);
// The type a Q / DQ node has once the pairs were converted.
int32_t type_after(graph::Graph& g, int qdq);

// ReluQuantFusion / ClipQuantFusion: whether Level 1 removes Relu / Clip node `act`.
bool removed_before_q(graph::Graph& g, int act);
// IsClipMadeRedundantByQ: whether the selector takes Relu / Clip `act` into Q `q`'s unit.
bool redundant_by_q(graph::Graph& g, int act, int q);

// The QuantizeLinear nodes a node's single output reaches once Level 1 ran, as the selector sees them.
struct OutputUnit {
  std::vector<int> q;   // Q readers (a propagated Q: the one after the chain)
  bool propagated = false;  // the Q is a copy QDQPropagation makes right after the node
  int edges = 0;        // output edges
  bool graph_output = false;
  bool blocked = false;  // a Relu / Clip reader the Q does not make redundant: no unit at all
};
OutputUnit output_unit(graph::Graph& g, int node);

// The DequantizeLinear input `slot` of `reader` comes from, directly or forward through a propagating chain
// (`propagated` then true); -1 when none.
int input_dq(graph::Graph& g, int reader, int slot, bool& propagated);

// WeightBiasQuantization: whether node `node`'s constant float bias becomes int32 behind a DQ.
bool bias_quantized_by_onnxruntime(graph::Graph& g, int node, int input_dq, int weight_dq);

}  // namespace qdqfold::predict::rewrites
