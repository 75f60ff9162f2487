#include "api.h"

#include "../folds/fold.h"

namespace qdqfold {

namespace {

// One BatchNormalization's way through the passes.
struct Pending {
  graph::Graph* graph;
  int node;
  BatchNormRecord record;
  folds::Outcome chosen;  // the fold, or the first reason to keep it that a rule gave
  const char* direction = "";
};

void finish(Pending& p, bool no_rules) {
  folds::Outcome& chosen = p.chosen;
  if (chosen.verdict == folds::Verdict::NotApplicable) {
    chosen = no_rules ? folds::Outcome::kept("not-implemented", "no fold is implemented yet")
                      : folds::Outcome::kept("no-foldable-layer",
                                             "neither the node that produces its input nor the nodes that read its "
                                             "output is a layer it can fold into");
  }
  BatchNormRecord& r = p.record;
  r.folded = chosen.verdict == folds::Verdict::Folded;
  r.direction = r.folded ? p.direction : "";
  r.into = std::move(chosen.into);
  r.into_op = std::move(chosen.into_op);
  r.code = std::move(chosen.code);
  r.message = std::move(chosen.message);
  r.exact = chosen.exact;
  r.new_tensors = std::move(chosen.new_tensors);
  r.metrics = std::move(chosen.metrics);
}

}  // namespace

// Two passes: every backward fold in the whole model first, then the forward folds. A forward fold may add
// nodes after a layer (the border correction of pad_correction); done first, it would hide that layer from a
// BN after it that can fold backwards.
Report run_folds(graph::Model& model, const Options& options) {
  const auto& rules = folds::fold_rules();
  std::vector<Pending> pending;
  for (graph::Graph* g : model.all_graphs())
    for (size_t i = 0; i < g->nodes.size(); ++i)
      if (!g->nodes[i].removed && !g->nodes[i].created && g->nodes[i].is("BatchNormalization")) {
        Pending p{g, static_cast<int>(i), {}, {}};
        p.record.graph = g->path;
        p.record.node = g->nodes[i].display_name(static_cast<int>(i));
        pending.push_back(std::move(p));
      }
  for (const char* pass : {"backward", "forward"}) {
    const bool backward = std::string_view(pass) == "backward";
    if ((backward && !options.fold_backward) || (!backward && !options.fold_forward)) continue;
    for (Pending& p : pending) {
      if (p.chosen.verdict == folds::Verdict::Folded) continue;
      folds::FoldContext ctx{model, *p.graph, options};
      for (const auto& rule : rules) {
        if (std::string_view(rule.direction) != pass) continue;
        folds::Outcome o = rule.apply(ctx, p.node);
        if (o.verdict == folds::Verdict::Folded) {
          if (o.code.empty()) o.code = rule.name;
          p.chosen = std::move(o);
          p.direction = rule.direction;
          break;
        }
        if (o.verdict == folds::Verdict::Kept && p.chosen.verdict == folds::Verdict::NotApplicable) p.chosen = std::move(o);
      }
      if (model.after_each_fold) model.after_each_fold();
    }
  }
  Report report;
  for (Pending& p : pending) {
    finish(p, rules.empty());
    report.batchnorms.push_back(std::move(p.record));
  }
  return report;
}

std::unique_ptr<FoldPlan> plan_fold(std::string_view model_bytes, const Options& options, bool defer_checks,
                                    graph::ExternalResolver* external) {
  auto plan = std::make_unique<FoldPlan>();
  plan->model = graph::parse_model(model_bytes, external);
  if (defer_checks) plan->model->deferred_checks = std::make_shared<graph::Model::DeferredChecks>();
  plan->report = run_folds(*plan->model, options);
  plan->pieces = graph::write_model(*plan->model, plan->arena);
  return plan;
}

}  // namespace qdqfold
