// BN -> layer (fold forwards): the pieces every forward fold shares.
//
//   before:  x -> BN(a, t) -> [Identity | Dropout]* -> [Flatten | Reshape] -> layer(W, b)   (one or more layers)
//   after:   x ->              [Identity | Dropout]* -> [Flatten | Reshape] -> layer(W', b')
//
// With BN(x)[c] = a[c] * x[c] + t[c] and the layer's input channel c (feature f = c * HW + p after a Flatten):
//   W'[o, c, k] = W[o, c, k] * a[c],   b'[o] = b[o] + sum over c, k of W[o, c, k] * t[c]   (double)
// exact when every output position of the layer receives every kernel tap (no zero padding); otherwise the
// difference is a constant map, added by one Add (padding_correction.h).
//
// select (select_bn_forward) finds every layer that reads BN's output, seeing through inference-time
// identities; plan (plan_bn_forward) asks each layer's planner (bn_conv.cpp, bn_gemm.cpp) whether it can take
// BN exactly, and gathers their edits (ConvEdit, GemmEdit); apply edits only when every planner agreed: the
// layers' weights (apply_layer_edit), then the readers rewired to BN's input and BN removed.
#pragma once

#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "folds/common/values.h"
#include "folds/expected.h"
#include "folds/edits.h"
#include "folds/sources/batchnorm.h"
#include "folds/weights/float_weight.h"

namespace qdqfold::folds {

// One layer that reads BN's output, directly or through see-through nodes and at most one Flatten/Reshape.
struct ForwardReader {
  int layer = -1;
  int reshape = -1;                 // the Flatten or Reshape on the way (Gemm/MatMul readers), or -1
  std::vector<std::string> values;  // values on the way that have BN's output shape (BN's output first)
};

// select: every layer reading BN `bn`'s output (directly, through see-through nodes and at most one
// Flatten/Reshape), and the first thing that is not such a layer but sees BN's output, or nullopt when BN has
// no output to fold forwards or nothing of that kind reads it.
struct ForwardSighting {
  enum class Kind { None, GraphOutput, Quantizer, Other } kind = Kind::None;
  std::string value;      // GraphOutput: the graph output BN's output reaches
  bool direct = false;    // GraphOutput: BN's own output (no node on the way)
  int node = -1;          // Quantizer, Other: the reader
  int slot = 0;           // Other: the reader's input slot (< 0: a subgraph reads it)
  int dequantizer = -1;   // Quantizer: a DequantizeLinear after it, or -1
};
struct ForwardMatch {
  std::vector<ForwardReader> readers;
  ForwardSighting quantizer;  // an activation quantizer reads BN's output
  ForwardSighting other;      // something that is not a layer sees BN's output
};
std::optional<ForwardMatch> select_bn_forward(graph::Graph& g, int bn);

// The shape of `value` as the core proves it (shapes.h: from the graph inputs' declared shapes, completed by
// the `shapes` option for those inputs, through the ops it knows); never a value_info or output claim.
std::optional<std::vector<int64_t>> known_shape(const FoldContext& ctx, const std::string& value);

// The shape of BN's input (= output) from any value that carries it, preferring one with every dim known.
std::optional<std::vector<int64_t>> activation_shape(const FoldContext& ctx, int bn, const ForwardReader& reader);

// What a planner decided for one layer: the edits to make once every layer of the BN said yes (apply).
struct ConvEdit {  // bn_conv.cpp
  int32_t data_type = 0;
  std::vector<int64_t> weight_dims;
  int64_t out_channels = 0;
  std::string weight;                     // W' (raw bytes)
  std::optional<std::string> bias;        // b', when BN shifts
  std::optional<std::string> correction;  // the border correction, when a position misses taps
  std::vector<int64_t> correction_dims;
};
struct GemmEdit {  // bn_gemm.cpp
  int32_t data_type = 0;
  bool is_gemm = true;
  double beta = 1.0;
  std::vector<int64_t> weight_dims;
  std::string weight;               // B' (raw bytes)
  std::optional<std::string> bias;  // C' (Gemm) or d (MatMul: an Add after it), when BN shifts
  std::vector<int64_t> bias_dims;
};
struct LayerPlan {
  int layer = -1;
  FoldName fold_name = FoldName::BnConv;  // BnConv, BnConvtranspose, BnGemm or BnMatmul
  std::string note;       // appended to the report sentence (e.g. the correction's size), may be empty
  std::vector<std::pair<std::string, double>> metrics;
  std::variant<ConvEdit, GemmEdit> edit;
};

// The weight of a layer BN feeds, with the forward fold's own reasons for keeping BN: a quantized weight, a
// weight other nodes read too.
Expected<FloatWeight> read_forward_weight(FoldContext& ctx, int layer);

// The forward fold (registered in registry.cpp after the backward folds).
Outcome fold_bn_forward(FoldContext& ctx, int bn);

// Planners and their edits, one per layer family.
Expected<LayerPlan> plan_bn_conv(FoldContext& ctx, int bn, const BatchNormAffine& affine,
                                 const ForwardReader& reader);                        // bn_conv.cpp
Expected<LayerPlan> plan_bn_gemm(FoldContext& ctx, int bn, const BatchNormAffine& affine,
                                 const ForwardReader& reader);                        // bn_gemm.cpp
void apply_layer_edit(FoldContext& ctx, int layer, const ConvEdit& edit, Outcome& outcome);  // bn_conv.cpp
void apply_layer_edit(FoldContext& ctx, int layer, const GemmEdit& edit, Outcome& outcome);  // bn_gemm.cpp

}  // namespace qdqfold::folds
