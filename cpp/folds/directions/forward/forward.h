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
// The fold finds every layer that reads BN's output (seeing through inference-time identities), asks the
// layer's planner (bn_conv.cpp, bn_gemm.cpp) whether it can take BN exactly, and only when every planner
// agrees edits anything: the layers' weights, then the readers rewired to BN's input and BN removed.
#pragma once

#include <functional>
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

// Every layer reading BN `bn`'s output, or the outcome when BN cannot fold forwards: NotApplicable when no
// layer reads it, Kept when one does but something else also sees BN's output (a graph output, a non-layer
// reader, a subgraph) or an activation quantizer stands between BN and the layer.
Expected<std::vector<ForwardReader>> forward_readers(FoldContext& ctx, int bn);

// The shape of `value` as the core proves it (shapes.h: from the graph inputs' declared shapes, completed by
// the `shapes` option for those inputs, through the ops it knows); never a value_info or output claim.
std::optional<std::vector<int64_t>> known_shape(const FoldContext& ctx, const std::string& value);

// The shape of BN's input (= output) from any value that carries it, preferring one with every dim known.
std::optional<std::vector<int64_t>> activation_shape(const FoldContext& ctx, int bn, const ForwardReader& reader);

// What a planner decided for one layer: the edits to make once every layer of the BN said yes.
struct LayerPlan {
  int layer = -1;
  FoldName fold_name = FoldName::BnConv;  // BnConv, BnConvtranspose, BnGemm or BnMatmul
  std::string note;       // appended to the report sentence (e.g. the correction's size), may be empty
  std::vector<std::pair<std::string, double>> metrics;
  std::function<void(FoldContext&, Outcome&)> apply;
};
using PlanOrKept = Expected<LayerPlan>;

// The weight of a layer BN feeds, with the forward fold's own reasons for keeping BN: a quantized weight, a
// weight other nodes read too.
Expected<FloatWeight> read_forward_weight(FoldContext& ctx, int layer);

// The forward fold (registered in registry.cpp after the backward folds).
Outcome fold_bn_forward(FoldContext& ctx, int bn);

// Planners, one per layer family.
PlanOrKept plan_bn_conv(FoldContext& ctx, int bn, const BatchNormAffine& affine, const ForwardReader& reader);  // bn_conv.cpp
PlanOrKept plan_bn_gemm(FoldContext& ctx, int bn, const BatchNormAffine& affine, const ForwardReader& reader);  // bn_gemm.cpp

}  // namespace qdqfold::folds
