// merge-branches, select: the tree of sums, its terms and the input they share (steps.h).
#include "folds/merge_branches/steps.h"

#include "folds/common/values.h"

namespace qdqfold::folds::merge {

using graph::Graph;
using graph::Node;

namespace {

// The terms under `node` with their signs: a term made by another Add/Sum/Sub read only here is expanded.
void collect_terms(const Graph& g, int node, int sign, std::vector<int>& tree, std::vector<Term>& terms) {
  tree.push_back(node);
  const Node& n = g.nodes()[node];
  for (size_t s = 0; s < n.inputs.size(); ++s) {
    const std::string& v = n.inputs[s];
    const int term_sign = n.is("Sub") && s == 1 ? -sign : sign;
    const int p = v.empty() ? -1 : g.producer(v);
    if (p >= 0 && is_sum_node(g.nodes()[p]) && read_only_by(g, v, node)) collect_terms(g, p, term_sign, tree, terms);
    else terms.push_back({v, term_sign, node});
  }
}

}  // namespace

std::string branch_input(const Graph& g, const std::string& v) {
  const int p = v.empty() ? -1 : g.producer(v);
  if (p >= 0 && (g.nodes()[p].is("Conv") || g.nodes()[p].is("BatchNormalization")) && !g.nodes()[p].inputs.empty())
    return g.nodes()[p].inputs[0];
  return v;
}

std::string kernel_text(const std::vector<int64_t>& k) {
  std::string s;
  for (size_t d = 0; d < k.size(); ++d) s += (d ? "x" : "") + std::to_string(k[d]);
  return s;
}

std::optional<Selection> select_branches(const Graph& g, int root) {
  Selection set;
  collect_terms(g, root, 1, set.tree, set.terms);
  // x: the input of the first Conv term that at least one other term shares.
  for (const auto& t : set.terms) {
    const int p = t.value.empty() ? -1 : g.producer(t.value);
    if (p < 0 || !g.nodes()[p].is("Conv") || g.nodes()[p].inputs.empty()) continue;
    const std::string x = g.nodes()[p].inputs[0];
    int sharing = 0;
    for (const auto& u : set.terms) sharing += branch_input(g, u.value) == x;
    if (sharing >= 2) { set.x = x; break; }
  }
  if (set.x.empty()) return std::nullopt;
  for (const auto& t : set.terms) {
    const int p = t.value.empty() ? -1 : g.producer(t.value);
    if (p >= 0 && g.nodes()[p].is("BatchNormalization") && branch_input(g, t.value) == set.x &&
        read_only_by(g, t.value, t.reader))
      set.identity_batchnorms.push_back(p);
  }
  return set;
}

}  // namespace qdqfold::folds::merge
