// The layers qdqfold folds into, in one table: which op types they are and where each keeps its weight, its
// weight's scale and zero point, its bias and its output channels. The folds ask it which nodes are layers
// (is_layer, layer_kind), qdqfold_native.layer_kinds() hands it to Python (verify reads its layer ops from it,
// so a layer kind added here is also one --verify checks), and the report's into_op joins op types with it.
#pragma once

#include <string>
#include <vector>

#include "graph/graph.h"

namespace qdqfold::folds {

struct LayerKind {
  const char* op;            // op type (default domain)
  int weight_input;          // the weight's input slot
  int bias_input;            // the bias's input slot, or -1 (MatMul: the bias is an Add of a constant after it)
  const char* bias;          // where the bias is, in words
  const char* output_axis;   // the weight's output-channel axis, in words
  bool spatial;              // a kernel over spatial positions (pads, strides, groups): Conv, ConvTranspose
  bool backward;             // a BN after it folds into it
  bool forward;              // a BN before it folds into it
  bool quantized;            // also with its weight through DequantizeLinear (qdq-layer-bn)
};

// A quantized weight's scale and zero point are inputs 1 and 2 of the DequantizeLinear (and QuantizeLinear)
// that feeds the weight input, for every layer kind.
inline constexpr int kWeightScaleInput = 1;
inline constexpr int kWeightZeroPointInput = 2;

// Every layer kind.
const std::vector<LayerKind>& layer_kinds();

// Node `n`'s kind, or null when it is not a layer.
const LayerKind* layer_kind(const graph::Node& n);
inline bool is_layer(const graph::Node& n) { return layer_kind(n) != nullptr; }
inline bool is_spatial_layer(const graph::Node& n) {
  const LayerKind* k = layer_kind(n);
  return k && k->spatial;
}

// The op types of `ops`, each once, in the table's order, joined by ",": the report's into_op ("Conv",
// "Conv,ConvTranspose"), the same whatever order the layers were met in.
std::string join_op_types(const std::vector<std::string>& ops);

}  // namespace qdqfold::folds
