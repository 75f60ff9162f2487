// The core's entry point: parse a model, run every fold, and plan the output. The caller allocates
// `pieces.size()` bytes (for Python, the bytes object itself) and calls `pieces.write_to`.
#pragma once

#include <memory>
#include <string_view>

#include "../graph/graph.h"
#include "../wire/reader.h"
#include "../wire/writer.h"
#include "fold_hooks.h"
#include "options.h"
#include "report.h"

namespace qdqfold {

// Raised for input that is not a valid ONNX model; the message names the problem and where it was found.
using FoldError = wire::WireError;

struct FoldPlan {
  std::unique_ptr<graph::Model> model;  // views into the input: the input must outlive the plan
  wire::Arena arena;
  wire::Pieces pieces;
  Report report;
};

// Tries every fold on every BatchNormalization of the model (subgraphs and functions included), in order.
// `hooks`: what the caller lends the folds (fold_hooks.h); none for a plain fold in memory.
Report run_folds(graph::Model& model, const Options& options, const FoldHooks& hooks = {});

// `deferred_checks`: given (non-null) for the optimistic first run of the two-run protocol
// (core/deferred_checks.h, run_with_deferred_checks), which alone decides it; null checks everything first.
// `external` resolves external data (see core/files.h, external_data_in); without it external tensors are
// unreadable and their BNs are kept.
std::unique_ptr<FoldPlan> plan_fold(std::string_view model_bytes, const Options& options,
                                    std::shared_ptr<DeferredChecks> deferred_checks = nullptr,
                                    graph::ExternalResolver* external = nullptr);

}  // namespace qdqfold
