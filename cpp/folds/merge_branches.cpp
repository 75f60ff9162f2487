// merge-branches: see merge_branches.h for the graph and the formula, merge_branches/steps.h for the steps.
#include "folds/merge_branches.h"

#include <algorithm>

#include "folds/common/values.h"
#include "folds/merge_branches/steps.h"

namespace qdqfold::folds {

using graph::Graph;
using merge::is_sum_node;

bool is_branch_sum_root(const Graph& g, int node) {
  if (!is_sum_node(g.nodes()[node]) || g.nodes()[node].outputs.empty()) return false;
  const std::string& out = g.nodes()[node].outputs[0];
  if (out.empty() || g.is_graph_output(out)) return true;
  const auto& uses = g.uses(out);
  return !(uses.size() == 1 && uses[0].slot >= 0 && is_sum_node(g.nodes()[uses[0].node]));
}

namespace {

Outcome plan_and_apply(FoldContext& ctx, const merge::Selection& selection) {
  QDQFOLD_TRY(plan, merge::plan_merge(ctx, selection));
  return merge::apply_merge(ctx, selection, plan);
}

// select / plan / apply on the tree under `root`.
MergeOutcome merge_tree(FoldContext& ctx, int root) {
  MergeOutcome result;
  result.sum = root;
  if (ctx.graph.nodes()[root].outputs.size() != 1) return result;
  std::optional<merge::Selection> selection = merge::select_branches(ctx.graph, root);
  if (!selection) return result;  // NotApplicable
  result.identity_batchnorms = selection->identity_batchnorms;  // they share the tree's outcome
  result.outcome = plan_and_apply(ctx, *selection);
  return result;
}

// The tree under `node`; where it stays, each sum inside it that is a tree of its own (Add(Add(conv1(x),
// conv2(x)), y): the inner Add merges although y is no branch).
void merge_tree_or_parts(FoldContext& ctx, int node, std::vector<MergeOutcome>& outcomes) {
  Graph& g = ctx.graph;
  std::vector<int> inner;
  for (const auto& v : g.nodes()[node].inputs) {
    const int p = v.empty() ? -1 : g.producer(v);
    if (p >= 0 && is_sum_node(g.nodes()[p]) && read_only_by(g, v, node)) inner.push_back(p);
  }
  MergeOutcome whole = merge_tree(ctx, node);
  if (whole.outcome.verdict == Verdict::Folded) {
    outcomes.push_back(std::move(whole));
    return;
  }
  std::vector<MergeOutcome> parts;
  for (int p : inner) merge_tree_or_parts(ctx, p, parts);
  const bool part_merged = std::any_of(parts.begin(), parts.end(),
                                       [](const MergeOutcome& m) { return m.outcome.verdict == Verdict::Folded; });
  if (part_merged) {
    for (auto& m : parts) outcomes.push_back(std::move(m));
  } else if (whole.outcome.verdict == Verdict::Kept) {
    outcomes.push_back(std::move(whole));
  }
}

}  // namespace

std::vector<MergeOutcome> merge_branches(FoldContext& ctx, int root) {
  std::vector<MergeOutcome> outcomes;
  if (is_branch_sum_root(ctx.graph, root)) merge_tree_or_parts(ctx, root, outcomes);
  return outcomes;
}

}  // namespace qdqfold::folds
