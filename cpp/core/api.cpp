#include "api.h"

#include "../folds/fold.h"

namespace qdqfold {

Report run_folds(graph::Model& model, const Options& options) {
  Report report;
  const auto& rules = folds::fold_rules();
  for (graph::Graph* g : model.all_graphs()) {
    // Index loop: folds may append created nodes; those are never BatchNormalization nodes to fold.
    const size_t original = g->nodes.size();
    for (size_t i = 0; i < original; ++i) {
      if (g->nodes[i].removed || g->nodes[i].created || !g->nodes[i].is("BatchNormalization")) continue;
      BatchNormRecord record;
      record.graph = g->path;
      record.node = g->nodes[i].display_name(static_cast<int>(i));
      folds::FoldContext ctx{model, *g, options};
      folds::Outcome chosen;
      const char* direction = "";
      for (const auto& rule : rules) {
        const bool backward = std::string_view(rule.direction) == "backward";
        if ((backward && !options.fold_backward) || (!backward && !options.fold_forward)) continue;
        folds::Outcome o = rule.apply(ctx, static_cast<int>(i));
        if (o.verdict == folds::Verdict::Folded) {
          if (o.code.empty()) o.code = rule.name;
          chosen = std::move(o);
          direction = rule.direction;
          break;
        }
        if (o.verdict == folds::Verdict::Kept && chosen.verdict == folds::Verdict::NotApplicable) chosen = std::move(o);
      }
      if (chosen.verdict == folds::Verdict::NotApplicable) {
        chosen = rules.empty()
                     ? folds::Outcome::kept("not-implemented", "no fold is implemented yet")
                     : folds::Outcome::kept("no-foldable-layer",
                                            "neither the node that produces its input nor the nodes that read its "
                                            "output is a layer it can fold into");
      }
      record.folded = chosen.verdict == folds::Verdict::Folded;
      record.direction = record.folded ? direction : "";
      record.into = std::move(chosen.into);
      record.into_op = std::move(chosen.into_op);
      record.code = std::move(chosen.code);
      record.message = std::move(chosen.message);
      record.exact = chosen.exact;
      record.new_tensors = std::move(chosen.new_tensors);
      record.metrics = std::move(chosen.metrics);
      report.batchnorms.push_back(std::move(record));
    }
  }
  return report;
}

std::unique_ptr<FoldPlan> plan_fold(std::string_view model_bytes, const Options& options) {
  auto plan = std::make_unique<FoldPlan>();
  plan->model = graph::parse_model(model_bytes);
  plan->report = run_folds(*plan->model, options);
  plan->pieces = graph::write_model(*plan->model, plan->arena);
  return plan;
}

}  // namespace qdqfold
