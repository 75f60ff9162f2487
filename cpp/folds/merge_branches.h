// merge-branches: parallel Conv branches summed over one input, merged into one Conv (structural
// re-parameterisation left undone: RepVGG, MobileOne, FastViT's RepMixer, ACNet). Opt-in (merge_branches),
// run after every BN fold, so the BN on each conv branch has already folded into its conv.
//
//   before:  x -+-> Conv(W1, b1) [3x3, pads 1] ----+
//               +-> Conv(W2, b2) [1x1, pads 0] ----+-> Add / Sum / Sub (a tree of them) -> y
//               +-> BatchNormalization(a, t) ------+   (or x itself: the plain identity)
//   after:   x ---> Conv(W, b) [3x3, pads 1] -> y
//
// With each branch i summed with sign s_i (+1, or -1 on the right of a Sub), the merged kernel of size
// K = the largest kernel per spatial dim is, in double and rounded once:
//   W[o, q, J] = sum over conv branches of s_i * W_i[o, q, J - off_i]    (zero outside W_i: padded, aligned)
//              + sum over identity branches of s_i * a_i[o] * [q == o mod C/g] * [J == centre]
//   b[o]       = sum over conv branches of s_i * b_i[o] + sum over identity branches of s_i * t_i[o]
// (plain x: a = 1, t = 0). Exact up to that rounding when every output position sees the same input
// positions through every branch: per spatial dim, the offset off_i = (PB - pb_i) / dilation is a whole
// number in [0, K - k_i] and the end pads agree likewise (pe_i + (K - k_i - off_i) * dilation = PE); strides,
// dilations, group and channel counts agree; an identity needs stride 1, C_out = C_in and a tap J with
// PB = J * dilation and PE = (K - 1 - J) * dilation (output position p reads x[p] there).
//
// select: the tree of Add/Sum/Sub under a root, its terms and the input x they share (select_branches);
// plan: every term a branch, every condition, the merged weight and bias (plan_merge); apply: the largest conv
// takes the merged weight and the root's output, the other convs, the identity BNs and the tree go
// (apply_merge); merge_branches/steps.h. Nothing is edited unless every condition holds; each one that fails
// is a kept reason. Where the whole tree stays, each sum inside it is tried as a tree of its own.
//
// Quantized weights (DequantizeLinear, int or QAT form) merge only with requantize_merged, approximately:
// W above from the dequantized branches, then s'[o] = max |W[o]| / q_max, q = round(W / s'), z = 0, written
// as the kept conv's weight on its own Q/DQ (axis 0); the report gives max |q * s' - W| / s' (<= 0.5).
#pragma once

#include <string>
#include <vector>

#include "folds/fold.h"

namespace qdqfold::folds {

struct MergeOutcome {
  // NotApplicable: not a sum of branches over a shared input (fewer than two of its terms read the same
  // tensor through a Conv, a BN or directly, or no Conv does). Kept: the reason. Folded: code "merge-branches".
  Outcome outcome;
  std::vector<int> identity_batchnorms;  // identity-branch BN nodes: removed when folded, kept otherwise
  int sum = -1;                          // the Add/Sum/Sub at the root of the merged (or kept) tree
};

// True when node `node` (Add, Sum or Sub) is the root of its tree: its output is not a term that another
// Add/Sum/Sub alone reads (that node's tree would contain it).
bool is_branch_sum_root(const graph::Graph& g, int node);

// Merges the branches summed under root `root` into one Conv, or says why not (nothing edited then). Where
// the whole tree stays, a sum inside it may still merge on its own: one outcome per tree merged, or the
// root's reason when none did; empty when no sum of branches is there.
std::vector<MergeOutcome> merge_branches(FoldContext& ctx, int root);

}  // namespace qdqfold::folds
