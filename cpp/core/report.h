// What a fold run did to each BatchNormalization: folded (into what, which way, exactly or not) or kept
// (a stable reason code and a sentence naming what blocked it and which option, if any, would fold it).
// Every member of BatchNormRecord and Report is also a row of core/report_fields.h, which the binding's dict
// and tests/test_report_fields.py follow: add a member there too.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace qdqfold {

// One fold rule's look at a BN: every rule whose pattern matched it, in the order the driver tried them (the
// backward pass, the forward pass, merge_branches), with its verdict. The record's own code is the deciding
// one: the fold, or the first reason to keep it.
struct FoldAttempt {
  std::string rule;     // the rule, e.g. "conv-bn", "bn-layers" (the forward folds), "merge-branches"
  std::string verdict;  // "kept" or "folded"
  std::string code;     // the reason code, or the fold's name
  std::string message;
  std::string at;       // the node or value at fault where the rule names one, else empty (None)
  std::string option;   // the option (keyword) that changes this outcome, else empty (None)
};

struct BatchNormRecord {
  std::string graph;       // "main", "main/<node>:<attribute>" for subgraphs, "function:<domain>.<name>"
  std::string node;        // the BN node's name (or "BatchNormalization#<index>" when unnamed)
  std::string op_type = "BatchNormalization";  // or Mul / Add / Sub / Div: a per-channel affine (folds/affine.h)
  bool folded = false;
  std::string direction;   // "backward" (into its producer) or "forward" (into its readers); empty if kept
  std::vector<std::string> into;  // names of the layer node(s) that absorbed it
  std::string into_op;     // their op type
  std::string code;        // folded: the fold's name (e.g. "conv-bn"); kept: the reason code
  std::string message;     // one sentence for people
  bool exact = true;       // false only for folds an approximate option allowed
  // Exact except for a documented int32 bias rounding (the rounding an integer kernel applies anyway): the
  // output moves by at most the metric "bias_error_at_output" (Gemm beta and earlier folds into the same
  // layer included). Reported as exact: "bias-rounded".
  bool bias_rounded = false;
  std::vector<std::string> new_tensors;
  std::vector<std::pair<std::string, double>> metrics;  // e.g. largest bias rounding error
  std::vector<FoldAttempt> attempts;  // every rule that looked at it, in order (see FoldAttempt)
};

// Nodes by op type ("domain.Op" outside the default domain) in every graph, subgraphs and functions included.
struct OpTypeCounts {
  std::map<std::string, int64_t> before, after;  // before and after the folds
};

struct Report {
  std::vector<BatchNormRecord> batchnorms;
  // merge_branches: one entry per sum of parallel branches, in the same form (node: the Add/Sum/Sub at the
  // root; folded: merged, direction "merge", code "merge-branches"; kept: the reason). The identity BNs it
  // removes are also in `batchnorms`, folded with code "merge-branches".
  std::vector<BatchNormRecord> merges;
  // File to file (core/files.h): the external data files written beside the output, and the input's data
  // files an in-place fold removed because the new model no longer uses them. Empty for bytes in memory.
  std::vector<std::string> data_files;
  std::vector<std::string> removed_files;
  // The external data files the input model read (each once, as found): file to file, or in memory with a
  // base directory.
  std::vector<std::string> input_files;
  int64_t input_bytes = 0;  // the model and those files, as read
  OpTypeCounts op_types;
  // The deployment target (Options::target; empty without one), one entry per layer it looked at (node: the
  // layer; folded: given output quantizers, code "output-quantizer", into: the quantizers whose parameters it
  // took; kept: left as it was, with the reason), and the integer kernels onnxruntime is expected to form, by
  // kernel op, on the model as read and after the target (targets/onnxruntime_kernels.cpp).
  std::string target;
  std::vector<BatchNormRecord> target_layers;
  OpTypeCounts target_kernels;
};

}  // namespace qdqfold
