// The backward direction (layer -> BatchNormalization, folded into the layer): the steps every backward fold
// shares. Selection starts at the BN's producer (batchnorm_input_producer, select_matmul_add); the plan asks
// whether the layer may hand its output to the BN (layer_output_blocker); apply hands the BN's output name to
// the layer (take_over_batchnorm_output). The weight forms are weights/'s: float_weight.h (read_float_weight,
// rescale_weight, the float bias forms) and quantized_weight.h.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "folds/common/values.h"
#include "folds/edits.h"
#include "folds/sources/batchnorm.h"
#include "folds/weights/float_weight.h"
#include "folds/common/layout.h"

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
std::optional<MatMulAdd> select_matmul_add(graph::Graph& g, int add);

// A Kept outcome when `layer`'s output `value` cannot be handed on: it is a graph output, or something other
// than input `slot` of node `reader` (the BN, or the Add after a MatMul) also reads it; readers of its shape
// only (Shape, Size: reads_only_shape) do not count. nullopt when that
// input is its only reader. The default slot is the reader's activation input (affine_data_slot).
std::optional<Outcome> layer_output_blocker(graph::Graph& g, int layer, const std::string& value, int reader,
                                            int slot = -1);

// The last step of a backward fold: BN `bn` is removed and output `slot` of `layer` takes over the BN's
// output name (so graph outputs and value_info keep their names).
void take_over_batchnorm_output(graph::Graph& g, int layer, int slot, int bn, const BatchNormAffine& affine);

}  // namespace qdqfold::folds
