#include "api.h"

#include "../folds/sources/affine.h"
#include "../folds/fold.h"
#include "../folds/merge_branches.h"
#include "../folds/shapes.h"
#include "edit_policy.h"
#include "report_fields.h"
#include "../targets/onnxruntime.h"

namespace qdqfold {

namespace {

// One BatchNormalization's (or elementwise affine node's) way through the passes.
struct Pending {
  graph::Graph* graph;
  int node;
  BatchNormRecord record;
  folds::Outcome chosen;  // the fold, or the first reason to keep it that a rule gave
  const char* direction = "";
  bool affine = false;    // Mul / Add / Sub / Div by a per-channel constant (folds/sources/affine.h)
  std::vector<FoldAttempt> attempts;  // every rule's kept or folded outcome, in order
};

// The option (keyword) that changes the outcome of reason `code`, or "" (reasons.h).
std::string option_for(const std::string& code) {
  for (const auto& e : folds::reason_table())
    if (e.code == code && std::string_view(e.kind) == "kept") return e.option;
  return "";
}

// Rule `rule`'s outcome `o` (kept or folded) as an attempt.
void note_attempt(Pending& p, const std::string& rule, const folds::Outcome& o) {
  if (o.verdict == folds::Verdict::NotApplicable) return;
  const bool folded = o.verdict == folds::Verdict::Folded;
  p.attempts.push_back(FoldAttempt{rule, folded ? "folded" : "kept", o.code, o.message, o.at,
                                   folded ? std::string() : option_for(o.code)});
}

void finish(Pending& p, bool no_rules) {
  folds::Outcome& chosen = p.chosen;
  if (chosen.verdict == folds::Verdict::NotApplicable) {
    chosen = no_rules ? folds::Outcome::kept(folds::Reason::NotImplemented, "no fold is implemented yet")
                      : folds::Outcome::kept(folds::Reason::NoFoldableLayer,
                                             "neither the node that produces its input nor the nodes that read its "
                                             "output is a layer it can fold into");
  }
  BatchNormRecord& r = p.record;
  r.folded = chosen.verdict == folds::Verdict::Folded;
  r.direction = r.folded ? p.direction : "";
  r.attempts = std::move(p.attempts);
  // Every field an Outcome carries (report_fields.h, `from` Outcome).
#define QDQFOLD_FROM_Driver(member)
#define QDQFOLD_FROM_Outcome(member) r.member = std::move(chosen.member);
#define QDQFOLD_FROM(member, kind, from) QDQFOLD_FROM_##from(member)
  QDQFOLD_RECORD_FIELDS(QDQFOLD_FROM)
#undef QDQFOLD_FROM
#undef QDQFOLD_FROM_Outcome
#undef QDQFOLD_FROM_Driver
}

// An Outcome is its verdict, the node at fault (shown in the record's attempts) and the record fields it
// carries: a member added to folds::Outcome must be a row of QDQFOLD_RECORD_FIELDS too, or the report would not
// show it.
#define QDQFOLD_COUNT_Driver 0
#define QDQFOLD_COUNT_Outcome 1
#define QDQFOLD_COUNT(member, kind, from) +QDQFOLD_COUNT_##from
static_assert(std::is_aggregate_v<folds::Outcome> &&
                  member_count<folds::Outcome>() == 2 QDQFOLD_RECORD_FIELDS(QDQFOLD_COUNT),
              "a folds::Outcome member is missing from QDQFOLD_RECORD_FIELDS (core/report_fields.h)");
#undef QDQFOLD_COUNT
#undef QDQFOLD_COUNT_Outcome
#undef QDQFOLD_COUNT_Driver

// One merge outcome into the report: its own entry in `merges`; the identity BNs it removed are recorded as
// folded by it, those it kept get its reason.
void record_merge(graph::Graph* g, folds::MergeOutcome& m, std::vector<Pending>& pending, Report& report) {
  const std::string name = g->nodes()[m.sum].display_name(m.sum);
  const bool merged = m.outcome.verdict == folds::Verdict::Folded;
  for (int bn : m.identity_batchnorms)
    for (Pending& p : pending)
      if (p.graph == g && p.node == bn && p.chosen.verdict != folds::Verdict::Folded) {
        note_attempt(p, folds::code(folds::FoldName::MergeBranches), m.outcome);
        p.chosen = m.outcome;
        p.chosen.metrics.clear();
        p.chosen.new_tensors.clear();
        p.direction = "merge";
        if (merged) p.chosen.message = "removed by merging the branches of " + name + ": " + m.outcome.message;
      }
  Pending entry{g, m.sum, {}, std::move(m.outcome), merged ? "merge" : ""};
  entry.record.graph = g->path;
  entry.record.node = name;
  entry.record.op_type = g->nodes()[m.sum].op_type;  // Add, Sum or Sub
  note_attempt(entry, folds::code(folds::FoldName::MergeBranches), entry.chosen);
  finish(entry, false);
  report.merges.push_back(std::move(entry.record));
}

// After the BN folds: every sum of parallel branches merged into one Conv where exact (merge_branches.h).
void merge_branch_sums(graph::Model& model, const Options& options, const FoldHooks& hooks,
                       std::vector<Pending>& pending, Report& report) {
  for (graph::Graph* g : model.all_graphs())
    for (size_t i = 0; i < g->nodes().size(); ++i) {
      if (g->nodes()[i].removed() || g->nodes()[i].created()) continue;
      folds::FoldContext ctx{model, *g, options, nullptr, nullptr, &hooks};
      auto outcomes = folds::merge_branches(ctx, static_cast<int>(i));
      if (outcomes.empty()) continue;  // not a sum of branches: nothing was read
      for (folds::MergeOutcome& m : outcomes) record_merge(g, m, pending, report);
      if (hooks.after_each_fold) hooks.after_each_fold();
    }
}

}  // namespace

// Two passes: every backward fold in the whole model first, then the forward folds. A forward fold may add
// nodes after a layer (the border correction of pad_correction); done first, it would hide that layer from a
// BN after it that can fold backwards.
// Nodes by op type over every graph of the model (those a fold removed left out).
static std::map<std::string, int64_t> op_types(graph::Model& model) {
  std::map<std::string, int64_t> counts;
  for (graph::Graph* g : model.all_graphs())
    for (const auto& n : g->nodes())
      if (!n.removed()) ++counts[n.domain.empty() || n.domain == "ai.onnx" ? n.op_type : n.domain + "." + n.op_type];
  return counts;
}

static Report run_folds_with(graph::Model& model, const Options& options, const FoldHooks& hooks);

// The onnxruntime target stores quantized weights as integers: folded ones through the folds' own
// materialization (materialize_quantized_weights), the others in the target (targets/onnxruntime_weights.cpp).
Report run_folds(graph::Model& model, const Options& options, const FoldHooks& hooks) {
  if (options.target.empty() || options.materialize_quantized_weights) return run_folds_with(model, options, hooks);
  Options with_integers = options;
  with_integers.materialize_quantized_weights = true;
  return run_folds_with(model, with_integers, hooks);
}

static Report run_folds_with(graph::Model& model, const Options& options, const FoldHooks& hooks) {
  auto before = op_types(model);
  std::map<std::string, int64_t> kernels_before;
  if (!options.target.empty()) kernels_before = targets::predict_onnxruntime_kernels(model);
  const auto& rules = folds::fold_rules();
  set_edit_policy(model, options);
  const size_t overridable = model.policy.freeze_initializer_inputs ? 0 : model.graph->overridable_initializer_count();
  std::vector<Pending> pending;
  folds::BiasErrors bias_errors;
  folds::ShapeProofs shape_proofs;
  folds::ShapeScope shape_scope(options, shape_proofs);  // for known_rank, which is handed only a graph
  for (graph::Graph* g : model.all_graphs())
    for (size_t i = 0; i < g->nodes().size(); ++i)
      if (!g->nodes()[i].removed() && !g->nodes()[i].created() &&
          (g->nodes()[i].is("BatchNormalization") ||
           (options.fold_affine && folds::is_elementwise_affine(*g, static_cast<int>(i))))) {
        Pending p{g, static_cast<int>(i), {}, {}};
        p.affine = !g->nodes()[i].is("BatchNormalization");
        p.record.graph = g->path;
        p.record.node = g->nodes()[i].display_name(static_cast<int>(i));
        p.record.op_type = g->nodes()[i].op_type;
        pending.push_back(std::move(p));
      }
  for (const char* pass : {"backward", "forward"}) {
    const bool backward = std::string_view(pass) == "backward";
    if ((backward && !options.fold_backward) || (!backward && !options.fold_forward)) continue;
    // Forward folds go readers first: in `Mul -> Add -> Conv` the Add folds into the Conv, then the Mul does.
    for (size_t k = 0; k < pending.size(); ++k) {
      Pending& p = pending[backward ? k : pending.size() - 1 - k];
      if (p.chosen.verdict == folds::Verdict::Folded) continue;
      // An elementwise node an earlier fold removed or changed is no longer a candidate.
      if (p.affine && (p.graph->nodes()[p.node].removed() || !folds::is_elementwise_affine(*p.graph, p.node))) continue;
      folds::FoldContext ctx{model, *p.graph, options, &bias_errors, &shape_proofs, &hooks};
      for (const auto& rule : rules) {
        if (std::string_view(rule.direction) != pass) continue;
        folds::Outcome o = rule.apply(ctx, p.node);
        if (o.verdict == folds::Verdict::Folded) {
          if (o.code.empty()) o.code = rule.name;
          if (p.affine) o.code = folds::affine_fold_name(o.code, p.graph->nodes()[p.node]);
          note_attempt(p, rule.name, o);
          p.chosen = std::move(o);
          p.direction = rule.direction;
          break;
        }
        note_attempt(p, rule.name, o);
        if (o.verdict == folds::Verdict::Kept && p.chosen.verdict == folds::Verdict::NotApplicable) p.chosen = std::move(o);
      }
      if (hooks.after_each_fold) hooks.after_each_fold();
    }
  }
  Report report;
  if (options.merge_branches) merge_branch_sums(model, options, hooks, pending, report);
  for (Pending& p : pending) {
    // An elementwise node is reported when folded, or kept where it follows a layer with a constant weight.
    if (p.affine && p.chosen.verdict != folds::Verdict::Folded &&
        (p.chosen.verdict == folds::Verdict::NotApplicable || p.graph->nodes()[p.node].removed() ||
         !folds::affine_reported_when_kept(*p.graph, p.node)))
      continue;
    finish(p, rules.empty());
    if (!p.record.folded && overridable > 0 && folds::changed_by_freezing_inputs(p.record.code))
      p.record.message += "; " + std::to_string(overridable) + " initializers of this model are also listed as graph "
                          "inputs (overridable at run time, so not constants): freeze_initializer_inputs=True "
                          "reads them as constants";
    report.batchnorms.push_back(std::move(p.record));
  }
  targets::run_target(model, options, std::move(kernels_before), report);
  report.op_types.before = std::move(before);
  report.op_types.after = op_types(model);
  return report;
}

std::unique_ptr<FoldPlan> plan_fold(std::string_view model_bytes, const Options& options,
                                    std::shared_ptr<DeferredChecks> deferred_checks,
                                    graph::ExternalResolver* external) {
  auto plan = std::make_unique<FoldPlan>();
  plan->model = graph::parse_model(model_bytes, external);
  FoldHooks hooks;
  hooks.deferred_checks = std::move(deferred_checks);
  plan->report = run_folds(*plan->model, options, hooks);
  plan->pieces = graph::write_model(*plan->model, plan->arena);
  return plan;
}

}  // namespace qdqfold
