// The core's entry point: parse a model, run every fold, and plan the output. The caller allocates
// `pieces.size()` bytes (for Python, the bytes object itself) and calls `pieces.write_to`.
#pragma once

#include <memory>
#include <string_view>

#include "../graph/graph.h"
#include "../wire/reader.h"
#include "../wire/writer.h"
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
Report run_folds(graph::Model& model, const Options& options);

// `defer_checks`: the optimistic first run (graph::Model::DeferredChecks). After writing `pieces`, the caller
// asks checks_failed(); when true, that output is wrong and must be thrown away and the model planned again
// with defer_checks = false, which checks everything before writing.
// `external` resolves external data (see core/files.h, external_data_in); without it external tensors are
// unreadable and their BNs are kept.
std::unique_ptr<FoldPlan> plan_fold(std::string_view model_bytes, const Options& options, bool defer_checks = false,
                                    graph::ExternalResolver* external = nullptr);

// True when a check deferred to the writing of `plan` failed (see plan_fold).
inline bool checks_failed(const graph::Model& model) {
  return model.deferred_checks && model.deferred_checks->failed.load(std::memory_order_relaxed);
}

}  // namespace qdqfold
