// The contract between the fold driver and the folds. A fold looks at one BatchNormalization node and either
// does not apply (the pattern is not its own), keeps the BN for a stated reason (the pattern is its own but
// a condition fails), or folds it. Every fold is written in three steps (as onnxruntime's QDQ selectors and
// actions are):
//   select  the pattern's nodes, as a match struct naming them, or nullopt: "not my pattern" (NotApplicable);
//   plan    every check, cheapest first, and every value the edit needs, or Kept with a Reason (reasons.h);
//   apply   the edits, which cannot fail for a reason the plan could have seen.
// Nothing is edited before apply, so "kept" never leaves a half-edited graph. expected.h has the helper that
// chains the steps.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/fold_hooks.h"
#include "core/options.h"
#include "core/report.h"
#include "graph/graph.h"
#include "folds/reasons.h"

namespace qdqfold::folds {

// Per layer (graph, node index): the largest error per output channel that int32 bias roundings of earlier
// folds into it left at its output, so a chain (Conv -> BN -> BN) reports the sum as it reaches the output.
using BiasErrors = std::map<std::pair<const graph::Graph*, int>, std::vector<double>>;

struct ShapeProofs;  // shapes.h

struct FoldContext {
  graph::Model& model;
  graph::Graph& graph;
  const Options& options;
  BiasErrors* bias_errors = nullptr;  // one per fold run (run_folds); null: chains are not tracked
  ShapeProofs* shape_proofs = nullptr;  // one per fold run (run_folds); null: proven shapes are not kept
  const FoldHooks* hooks = nullptr;     // what the caller lends (core/fold_hooks.h); null: none

  // The deferred checks of this run (core/deferred_checks.h), or null: check first.
  std::shared_ptr<DeferredChecks> deferred_checks() const { return hooks ? hooks->deferred_checks : nullptr; }
};

enum class Verdict { NotApplicable, Kept, Folded };

struct Outcome {
  Verdict verdict = Verdict::NotApplicable;
  std::string code;     // reason code (kept) or fold name (folded), from reasons.h
  std::string message;
  std::vector<std::string> into;
  std::string into_op;
  bool exact = true;
  bool bias_rounded = false;  // exact but for a reported int32 bias rounding (see BatchNormRecord)
  std::vector<std::string> new_tensors;
  std::vector<std::pair<std::string, double>> metrics;
  // The node or value at fault (a kept outcome), where the step names one: shown in the report's attempts.
  std::string at;

  static Outcome not_applicable() { return {}; }
  // This outcome with the node or value at fault.
  Outcome&& at_(std::string what) && {
    at = std::move(what);
    return std::move(*this);
  }
  static Outcome kept(Reason reason, std::string message) {
    Outcome o;
    o.verdict = Verdict::Kept;
    o.code = folds::code(reason);
    o.message = std::move(message);
    return o;
  }
  // Kept for the reason `from` (a Kept outcome of another step) gave, with a new message.
  static Outcome kept_as(const Outcome& from, std::string message) {
    Outcome o;
    o.verdict = Verdict::Kept;
    o.code = from.code;
    o.message = std::move(message);
    return o;
  }
  // Folded under `name`; the fold fills in the rest.
  static Outcome folded(FoldName name) {
    Outcome o;
    o.verdict = Verdict::Folded;
    o.code = folds::code(name);
    return o;
  }
};

using FoldFunction = Outcome (*)(FoldContext&, int bn_node);

struct FoldRule {
  const char* name;       // e.g. "conv-bn"
  const char* direction;  // "backward" or "forward"
  FoldFunction apply;
};

// Every fold, in the order the driver tries them (folds/registry.cpp).
const std::vector<FoldRule>& fold_rules();

}  // namespace qdqfold::folds
