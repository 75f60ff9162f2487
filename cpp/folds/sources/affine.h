// The elementwise affine source: Mul / Add / Sub / Div by a constant that broadcasts per channel, read as the
// same per-channel map y[c] = a[c] * x[c] + t[c] that a BatchNormalization is, so that every BN fold (backward
// into float or quantized weights, forward into the next layers) folds it unchanged.
//
//   torchvision FrozenBatchNorm2d:  Conv -> Mul(s [1,C,1,1]) -> Add(b [1,C,1,1])   a = s, t = 0;  a = 1, t = b
//   layer scale:                    Conv -> Mul(gamma [C,1,1])                       a = gamma, t = 0
//   branch sums:                    Conv -> Add(0)                                   a = 1, t = 0
//   Sub(x, c): a = 1, t = -c      Sub(c, x): a = -1, t = c      Div(x, c): a = 1 / c, t = 0   (in double)
//
// "Per channel" is BN's channel: axis 1 of the activation x. The constant (any float type, a scalar, [C, 1, 1],
// [1, C, 1, 1], or [C] / [1, C] on a 2-D Gemm/MatMul output) broadcasts against x without changing its shape:
// its rank is at most x's, and every dim is 1 but the one aligned with axis 1. One exception: after a MatMul with
// a constant 2-D weight whose output has rank >= 3 (transformer layer scale, x * gamma after a Linear), the
// features are the last axis, and a constant along it (or a scalar) is read with BatchNormAffine::last_axis set;
// only the MatMul folds take that. A shift right after a MatMul is its own bias (MatMul + Add), not a candidate.
// Such a node is folded exactly like a BN; the report names the fold after it ("conv-mul", "qdq-layer-add",
// "mul-conv", ...) and lists it with its op_type.
#pragma once

#include <optional>
#include <string>
#include <variant>

#include "folds/sources/batchnorm.h"
#include "folds/expected.h"

namespace qdqfold::folds {

// True when node `node` is Mul / Add / Sub / Div with exactly one constant float operand (Div: the divisor)
// whose values could broadcast per channel (at most one dim other than 1): the driver's cheap candidate test.
bool is_elementwise_affine(graph::Graph& g, int node);

// The input slot that carries the activation: 0 for BatchNormalization, the non-constant operand otherwise.
int affine_data_slot(graph::Graph& g, int node);

// The affine map of an elementwise node, or why it is not per channel: Kept with "channel-axis-mismatch" when
// the constant varies along another axis than 1, "unknown-rank" when x's rank is needed and unknown,
// "non-finite-parameters" for NaN/Inf (or a zero divisor).
Expected<BatchNormAffine> read_elementwise_affine(FoldContext& ctx, int node);

// The name of a BN fold applied to elementwise node `n`: the "bn" of `bn_fold_name` becomes the node's op
// ("conv-bn" -> "conv-mul", "bn-gemm" -> "add-gemm", "qdq-layer-bn" -> "qdq-layer-mul").
std::string affine_fold_name(const std::string& bn_fold_name, const graph::Node& n);

// True when a kept elementwise node is worth a line in the report: its activation comes from a layer with a
// constant (or dequantized) weight, so it has the shape of a fold the user may expect. An arbitrary Mul
// elsewhere (attention scaling, shape arithmetic) that folds nowhere is not reported.
bool affine_reported_when_kept(graph::Graph& g, int node);

}  // namespace qdqfold::folds
