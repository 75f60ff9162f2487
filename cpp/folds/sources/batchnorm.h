// Reading a BatchNormalization node as the per-channel affine map y[c] = a[c] * x[c] + t[c]
// (a = gamma / sqrt(var + eps), t = beta - mean * a, computed in double), and the checks that make that
// reading valid for every BN version (opset 1-5 consumed_inputs, 6-8 spatial, 14/15 training_mode).
#pragma once

#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "folds/fold.h"

namespace qdqfold::folds {

struct BatchNormAffine {
  std::vector<double> scale;  // a
  std::vector<double> shift;  // t
  int32_t data_type = 1;      // element type of X / Y
  std::vector<std::string> parameter_values;  // names of scale, B, mean, var (to drop when unused)
  // An elementwise affine (affine.h) along the last axis of a MatMul's rank >= 3 output (transformer layer
  // scale): its channels are the MatMul's output features, not axis 1. Only the MatMul folds take it.
  bool last_axis = false;
  bool zero_shift() const;
};

// The affine map of BN node `bn` (or of an elementwise affine node: read_elementwise_affine), or the reason it cannot be folded at all (training form, non-constant or
// malformed parameters, var + eps <= 0, non-finite values).
std::variant<BatchNormAffine, Outcome> read_batchnorm(FoldContext& ctx, int bn);

// Values of a constant: an initializer, a Constant node, or DequantizeLinear of constant integers
// (onnxruntime's quantizer hands BN parameters and biases over that way). nullopt if not constant.
std::optional<std::vector<double>> constant_values(graph::Graph& g, const std::string& value);

// True when `value` is read exactly once, by node `reader`, and is not a graph output.
bool read_only_by(const graph::Graph& g, const std::string& value, int reader);

// True when use `u` reads only the shape of the value (Shape, Size): a fold changes no shape, so such a reader
// never blocks one; where the value it reads goes away (a backward fold hands the BN's output name to the
// layer), take_over_batchnorm_output points it at the value that replaces it, of the same shape.
bool reads_only_shape(const graph::Graph& g, const graph::Use& u);

// Removes BN node `bn` after its producer took over its output name (backward folds): drops the producer's
// old output from value_info and the BN's parameters where nothing else reads them. `bn` may also be an
// elementwise affine node (affine.h); every BN fold accepts one, reading it through read_batchnorm.
void remove_folded_batchnorm(graph::Graph& g, int bn, const BatchNormAffine& affine);

// A name for a tensor a fold writes, derived from the one it replaces, unique in the model.
std::string new_tensor_name(graph::Model& model, const std::string& old_name, const char* suffix);

}  // namespace qdqfold::folds
