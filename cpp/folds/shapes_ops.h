// Proven shapes of the shape-computing and indexing ops (shapes.h's rules, for the ops that exporters put
// between a tensor and the Reshape that reads its shape: timm LeViT's `Shape -> Slice / Gather -> Concat ->
// Reshape`, `x.reshape_as(y)`, q/k/v Splits). Internal to shapes.cpp.
//
// Where an op's output rank is fixed by its inputs' ranks and lengths alone (Shape, Size, Gather, Slice, Split,
// Unsqueeze by its axes' count, ConstantOfShape by its input's length), the rank is proven even when the
// values are not; dims are given only where they follow from constants and proven dims, else -1.
#pragma once

#include <cstddef>
#include <optional>
#include <vector>

#include "folds/shapes.h"

namespace qdqfold::folds::shape_ops {

// True when compute() handles output `slot` of `n`.
bool computes(const graph::Node& n, size_t slot);

// The proven shape of output `slot` of `n`, given the proven shapes of its inputs (`in`, one per input,
// nullopt where unknown or absent), or nullopt.
std::optional<Dims> compute(graph::Graph& g, const graph::Node& n, size_t slot, const std::vector<std::optional<Dims>>& in);

// The rank a Reshape's output has when its shape input is not a constant: the length of that 1-D input,
// when proven (`shape` is its proven shape), every dim -1.
std::optional<Dims> reshape_by_length(const std::optional<Dims>& shape);

}  // namespace qdqfold::folds::shape_ops
