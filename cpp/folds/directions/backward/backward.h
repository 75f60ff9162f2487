// Pieces every backward fold (layer -> BatchNormalization, folded into the layer) needs: may the layer give
// its output to the BN, reading the layer's float weight and bias, writing their new values without touching
// a tensor anyone else reads, and handing the BN's output name to the layer.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "folds/edits.h"
#include "folds/sources/batchnorm.h"
#include "folds/weights/layout.h"

namespace qdqfold::folds {

// The node that produces BN `bn`'s input, or -1 when there is none or the BN has no output to hand over:
// every backward fold starts here, and -1 means the fold does not apply. For an elementwise affine node
// (affine.h), the producer of its activation operand.
int batchnorm_input_producer(graph::Graph& g, int bn);

// A Linear with its bias as MatMul -> Add(constant c), either operand order: the MatMul and the Add's slot of c.
struct MatMulAdd {
  int matmul = -1;
  int add = -1;
  int bias_slot = -1;
};
// Node `add` as that pattern (an Add with two inputs and one output, one input made by a MatMul and the other a
// constant; the first such operand order), or nullopt.
std::optional<MatMulAdd> select_matmul_add(const graph::Graph& g, int add);

// A Kept outcome when `layer`'s output `value` cannot be handed on: it is a graph output, or something other
// than input `slot` of node `reader` (the BN, or the Add after a MatMul) also reads it. nullopt when that
// input is its only reader. The default slot is the reader's activation input (affine_data_slot).
std::optional<Outcome> layer_output_blocker(graph::Graph& g, int layer, const std::string& value, int reader,
                                            int slot = -1);

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
std::variant<FloatWeight, Outcome> read_float_weight(FoldContext& ctx, int layer, bool backward_fold = false);

// Dims of a constant (initializer, Constant node, or DequantizeLinear of constant integers).
std::optional<std::vector<int64_t>> constant_dims(graph::Graph& g, const std::string& value);

// Values of the layer's bias `value` (empty name: no bias, all zeros), which must hold `count` values.
std::variant<std::vector<double>, Outcome> read_bias(graph::Graph& g, const std::string& value, int64_t count,
                                                     const char* what);

// W' = W * scale[output channel], rounded once to the weight's type; Kept when a value overflows the type.
// Checked now; the values are computed when the model is written, straight into the output (a weight is
// written once and never held twice).
std::variant<graph::LazyBytes, Outcome> rescale_weight(FoldContext& ctx, const FloatWeight& w,
                                                       const std::vector<double>& scale);

// `values` in `data_type`; Kept ("overflow") when one does not fit.
std::variant<std::string, Outcome> store_or_keep(int32_t data_type, const std::vector<double>& values, const char* what);

// The last step of a backward fold: BN `bn` is removed and output `slot` of `layer` takes over the BN's
// output name (so graph outputs and value_info keep their names).
void take_over_batchnorm_output(graph::Graph& g, int layer, int slot, int bn, const BatchNormAffine& affine);

// A bias added to a 2-D [rows, features] output (Gemm's C, the Add after a MatMul), with the BN applied to it:
// dims and values after the fold.
struct FoldedBias {
  std::vector<int64_t> dims;
  std::vector<double> values;
};

// bias'[i, j] = factor[j] * bias[i, j] + t[j] for a bias of dims `dims` (rank <= 2, last dim 1 or F) that
// broadcasts against [rows, F]; one broadcasting along the features (shape [], [1], [m, 1]) is widened to [F]
// or [m, F]. An absent bias (`dims` nullopt) is zero. Kept ("shape-mismatch") when the dims do not broadcast.
std::variant<FoldedBias, Outcome> fold_bias(const std::optional<std::vector<int64_t>>& dims,
                                            const std::vector<double>& values, const std::vector<double>& factor,
                                            const std::vector<double>& shift, const std::string& what);

// The rank of `value` when it is known: from shape information, or because its producer always makes
// rank-2 outputs (Flatten, Gemm); for an outer-scope value read in a subgraph, from the enclosing graph.
std::optional<size_t> known_rank(const graph::Graph& g, const std::string& value);

}  // namespace qdqfold::folds
