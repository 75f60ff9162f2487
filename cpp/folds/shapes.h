// Shapes a fold may rest on: those the core proves itself, never a claim.
//
// A model's value_info and its graph outputs' types are claims: onnxruntime does not check them (it warns
// and runs), and an exporter or an earlier tool can leave them wrong. A fold whose exactness depends on a
// size (the border correction of pad_correction, the features per channel of BN -> Flatten -> Gemm, the
// rank MatMul contracts) reads it from here:
//
//   - a graph input of the main graph: the shape it declares (runtimes refuse feeds that do not match its
//     static dims and rank), its unknown dims completed by the caller's `shapes` option for that input;
//   - an initializer or Constant: its dims;
//   - a node output: computed from its inputs' proven shapes, for the ops listed in shapes.cpp
//     (elementwise, broadcasting binary ops, Conv / ConvTranspose, pooling, Concat, Transpose, Flatten,
//     Gemm, MatMul, Q/DQ, normalisations; Reshape: to a constant shape its dims, else the rank its 1-D shape
//     input's proven length gives; and in shapes_ops.h: Shape, Size, Gather, Slice, Split, Unsqueeze,
//     Squeeze, ConstantOfShape, which prove a rank from their inputs' ranks and lengths even where values
//     are dynamic); any other op gives nothing.
//
// Dims are -1 where unknown (a symbolic input dim, or one that cannot be computed); nullopt when even the
// rank is unknown.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "folds/fold.h"

namespace qdqfold::folds {

using Dims = std::vector<int64_t>;

// Proven shapes already computed, per graph and value; one per fold run (folds keep every value's shape).
struct ShapeProofs {
  std::map<std::pair<const graph::Graph*, std::string>, std::optional<Dims>> known;
};

// The proven shape of `value` in ctx.graph (or, for a name that graph does not define, in its enclosing
// graph), as described above.
std::optional<Dims> proven_shape(const FoldContext& ctx, const std::string& value);

// The same for helpers that are handed only a graph (known_rank): with the options and proofs of the fold
// run in progress on this thread (ShapeScope), else with the graph inputs' declared shapes alone.
std::optional<Dims> proven_shape(const graph::Graph& g, const std::string& value);

// Makes `options` and `proofs` those of proven_shape(graph, value) on this thread while it lives (run_folds).
class ShapeScope {
 public:
  ShapeScope(const Options& options, ShapeProofs& proofs);
  ~ShapeScope();
  ShapeScope(const ShapeScope&) = delete;
  ShapeScope& operator=(const ShapeScope&) = delete;

 private:
  const Options* previous_options_;
  ShapeProofs* previous_proofs_;
};

}  // namespace qdqfold::folds
