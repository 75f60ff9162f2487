// Reading a BatchNormalization node as the per-channel affine map y[c] = a[c] * x[c] + t[c]
// (a = gamma / sqrt(var + eps), t = beta - mean * a, computed in double), and the checks that make that
// reading valid for every BN version (opset 1-5 consumed_inputs, 6-8 spatial, 14/15 training_mode).
#pragma once

#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "folds/common/values.h"
#include "folds/expected.h"

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
Expected<BatchNormAffine> read_batchnorm(FoldContext& ctx, int bn);

// Removes BN node `bn` after its producer took over its output name (backward folds): drops the producer's
// old output from value_info and the BN's parameters where nothing else reads them. `bn` may also be an
// elementwise affine node (affine.h); every BN fold accepts one, reading it through read_batchnorm.
void remove_folded_batchnorm(graph::Graph& g, int bn, const BatchNormAffine& affine);

}  // namespace qdqfold::folds
