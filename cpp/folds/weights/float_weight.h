// The float weight form: a layer's constant float weight (input 1), and how a per-channel factor enters it.
//
//   per output channel (backward folds):  W'[o, ...] = a[o] * W[o, ...]              rescale_weight
//   per input channel (forward folds):    W'[., c, ...] = W[., c, ...] * a[c]        scale_input_features
//                                         b'[o] = b[o] + sum over c, k of W[o, c, k] * t[c]   shift_through_weight
//   float bias:                           b'[o] = a[o] * b[o] + t[o]                 read_bias, store_or_keep
//   bias broadcast on a 2-D output:       c'[i, j] = factor[j] * c[i, j] + t[j]      fold_bias
//
// Each is rounded once to the weight's type and kept (Reason::Overflow) when a value does not fit. Where the
// output and input channels sit in the weight is layout.h's.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "folds/expected.h"
#include "folds/common/layout.h"

namespace qdqfold::folds {

// True when `value` comes out of a DequantizeLinear: a quantized weight, the QDQ folds' pattern.
bool produced_by_dequantize(const graph::Graph& g, const std::string& value);

// The constant float weight (input 1) of `layer` and where its channels are.
struct FloatWeight {
  graph::Tensor tensor;
  std::shared_ptr<std::string> storage;  // holds the element bytes when the tensor has no raw_data (stable
                                         // address: `bytes` survives moving the FloatWeight)
  std::string_view bytes;                // element bytes in raw_data layout
  WeightLayout layout;
};

// Reads `layer`'s weight. NotApplicable when a DequantizeLinear produces it (another fold's pattern); Kept
// with a reason when it is not a constant, not a float type we compute in, unreadable, or of a shape the
// layer does not fit. `backward_fold`: see weight_layout (a Gemm with transA=1 is accepted only then).
Expected<FloatWeight> read_float_weight(FoldContext& ctx, int layer, bool backward_fold = false);

// Values of the layer's bias `value` (empty name: no bias, all zeros), which must hold `count` values.
Expected<std::vector<double>> read_bias(graph::Graph& g, const std::string& value, int64_t count,
                                                     const char* what);

// W' = W * scale[output channel], rounded once to the weight's type; Kept when a value overflows the type.
// Checked now; the values are computed when the model is written, straight into the output (a weight is
// written once and never held twice).
Expected<graph::LazyBytes> rescale_weight(FoldContext& ctx, const FloatWeight& w,
                                                       const std::vector<double>& scale);

// `values` in `data_type`; Kept ("overflow") when one does not fit.
Expected<std::string> store_or_keep(int32_t data_type, const std::vector<double>& values, const char* what);

// A bias added to a 2-D [rows, features] output (Gemm's C, the Add after a MatMul), with the BN applied to it:
// dims and values after the fold.
struct FoldedBias {
  std::vector<int64_t> dims;
  std::vector<double> values;
};

// bias'[i, j] = factor[j] * bias[i, j] + t[j] for a bias of dims `dims` (rank <= 2, last dim 1 or F) that
// broadcasts against [rows, F]; one broadcasting along the features (shape [], [1], [m, 1]) is widened to [F]
// or [m, F]. An absent bias (`dims` nullopt) is zero. Kept ("shape-mismatch") when the dims do not broadcast.
Expected<FoldedBias> fold_bias(const std::optional<std::vector<int64_t>>& dims,
                                            const std::vector<double>& values, const std::vector<double>& factor,
                                            const std::vector<double>& shift, const std::string& what);

// The BN shift carried through the weight: tap_sums[o][r] = sum over (p, q) with output o of
// W[p, q, r] * t[channel of input(p, q)], where input feature f belongs to channel f / features_per_channel.
std::vector<std::vector<double>> shift_through_weight(const FloatWeight& w, const std::vector<double>& shift,
                                                      int64_t features_per_channel);

// W' = W * scale[channel of each input feature], rounded once; Kept when a value would overflow.
Expected<std::string> scale_input_features(const FloatWeight& w, const std::vector<double>& scale,
                                                        int64_t features_per_channel);

}  // namespace qdqfold::folds
