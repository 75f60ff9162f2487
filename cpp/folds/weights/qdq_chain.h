// The weight forms behind DequantizeLinear, recognised by structure alone (selection: "is this a Q/DQ weight,
// and which nodes make it"); reading and checking them is quantized_read.cpp's.
//
//   int form:        q (int constant) ---------------------------> DequantizeLinear(s, z) -> layer
//   QAT form:        W (float) -> QuantizeLinear(s, z) -------------> DequantizeLinear(s, z) -> layer
//   with Clip:       q or QuantizeLinear(W) -> Clip(lo, hi) --------> DequantizeLinear      (Brevitas QCDQ)
//   TensorRT fused:  W (float) ------------------------------------> trt::DequantizeLinear(s) (quantizer and
//                                                                    dequantizer in one node; ModelOpt INT4)
//
// A new weight form (another exporter's custom Q/DQ, say) is recognised here and read in quantized_read.cpp.
#pragma once

#include <string>

#include "graph/graph.h"

namespace qdqfold::folds {

// True for QuantizeLinear / DequantizeLinear in the default domain or com.microsoft (DequantizeLinear: trt too).
bool is_quantize(const graph::Node& n);
bool is_dequantize(const graph::Node& n);

// The nodes of the chain ending in DequantizeLinear `dq`.
struct QdqChain {
  int dq = -1;
  int clip = -1;       // a Clip producing DQ's input, else -1
  std::string source;  // the value the chain starts from: the input of the Clip, or of the DQ ("" if none)
  int quantize = -1;   // a QuantizeLinear producing `source` (the QAT form when `source` is not a constant)
  bool fused = false;  // trt::DequantizeLinear: its own quantizer
};

// The chain ending in `dq`, or nullopt when `dq` is not a DequantizeLinear (not a quantized weight).
std::optional<QdqChain> select_qdq_chain(const graph::Graph& g, int dq);

}  // namespace qdqfold::folds
