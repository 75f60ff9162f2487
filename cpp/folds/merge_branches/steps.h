// The steps of merge-branches (merge_branches.h has the graph and the formula), as every fold has them:
//   select  (select.cpp)  the tree of Add/Sum/Sub under a root, its terms and the input x they share;
//   plan    (plan.cpp, plan_weight.cpp)  every condition, cheapest first, then the merged weight and bias;
//   apply   (apply.cpp)   the kept conv takes the merged weight and the root's output; the rest goes.
// merge_branches.cpp runs them on each tree (and on the sums inside a tree that stays).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "folds/common/conv_geometry.h"
#include "folds/expected.h"
#include "folds/weights/quantized_weight.h"

namespace qdqfold::folds::merge {

inline bool is_sum_node(const graph::Node& n) { return !n.removed() && (n.is("Add") || n.is("Sum") || n.is("Sub")); }

// "3x3" for messages.
std::string kernel_text(const std::vector<int64_t>& k);

// ---------------------------------------------------------------- select

struct Term {
  std::string value;
  int sign = 1;
  int reader = -1;  // the tree node that reads it
};

// A tree of sums over a shared input: the pattern's nodes, nothing checked beyond that.
struct Selection {
  std::vector<int> tree;  // the Add/Sum/Sub nodes, root first
  std::string x;          // the input of the first Conv term that at least one other term shares
  std::vector<Term> terms;
  std::vector<int> identity_batchnorms;  // the BNs among the terms that read x, read only by the tree
};

// The tensor a term reads when it is a branch form (Conv or BN output: their input; anything else: itself).
std::string branch_input(const graph::Graph& g, const std::string& v);

// The selection under `root`, or nullopt when no two terms read one tensor through a Conv (not a sum of
// branches: not this fold's pattern).
std::optional<Selection> select_branches(const graph::Graph& g, int root);

// ---------------------------------------------------------------- plan

struct Branch {
  enum class Kind { Conv, BatchNorm, Identity } kind;
  std::string value;
  int sign = 1;
  int node = -1;  // the Conv or the BN (-1 for x itself)
};

struct ConvBranch {
  int node = -1;
  int sign = 1;
  std::vector<int64_t> dims;  // weight dims [M, C/g, k...]
  int32_t data_type = 0;      // the float type the conv computes in
  int64_t groups = 1;
  std::vector<double> values;  // the weight the conv sees (dequantized when quantized)
  std::optional<QuantizedWeight> quantized;
  ConvGeometry geometry;
  std::vector<double> bias;
  std::vector<int64_t> offset;  // per spatial dim: where the kernel starts in the merged kernel
};

struct IdentityBranch {
  int bn = -1;  // -1: x itself
  int sign = 1;
  std::vector<double> scale, shift;
  std::vector<std::string> parameters;
};

struct MergePlan {
  std::vector<Branch> branches;  // every term, classified
  std::vector<ConvBranch> convs;
  std::vector<IdentityBranch> identities;
  int primary = 0;  // index into convs: the conv that stays
  int32_t data_type = 0;
  std::vector<int64_t> kernel;       // K: the merged kernel, per spatial dim
  std::vector<int64_t> centre;       // the tap an identity branch lands on, per spatial dim
  std::vector<int64_t> weight_dims;  // [M, C/g, K...]
  std::vector<int64_t> pads_begin, pads_end, dilations;
  std::string weight_raw, bias_raw;
  // requantize_merged: the merged weight's integers and per-output-channel scale, and the largest distance
  // of the re-quantized weight from the merged one, in units of the new scale.
  std::vector<int64_t> ints;
  std::vector<double> new_scale;
  double max_change = 0;
};

// Every condition, then the merged weight and bias; Kept with the first condition that fails.
Expected<MergePlan> plan_merge(FoldContext& ctx, const Selection& selection);

// plan_weight.cpp: the merged weight and bias of an aligned plan (convs, identities, kernel, centre), stored
// in the kept conv's type, or (its weight quantized, requantize_merged) re-quantized per output channel.
std::optional<Outcome> plan_merged_weight(FoldContext& ctx, MergePlan& plan);

// ---------------------------------------------------------------- apply

// The edits, and the report entry's message and metrics.
Outcome apply_merge(FoldContext& ctx, const Selection& selection, MergePlan& plan);

}  // namespace qdqfold::folds::merge
