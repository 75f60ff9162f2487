// The folds' side of graph edits: a constant written through the graph's one rule (graph::Graph::write_constant)
// and, when that made a new tensor, its name listed in the fold's report entry.
#pragma once

#include <string>
#include <vector>

#include "folds/fold.h"

namespace qdqfold::folds {

// Makes the inputs `readers` read a constant (graph::Graph::write_constant: `old` replaced in place when only
// they read it (a Constant node's value too with `keep_constant_node`), else a new tensor named from `old` or `base`). Returns the name now read.
std::string write_constant_for(FoldContext& ctx, const std::vector<graph::Use>& readers, std::string old,
                               int32_t data_type, const std::vector<int64_t>& dims, const std::string& raw,
                               const std::string& base, Outcome& outcome,
                               bool keep_constant_node = false);
// The same with data produced when the output is written.
std::string write_constant_for(FoldContext& ctx, const std::vector<graph::Use>& readers, std::string old,
                               int32_t data_type, const std::vector<int64_t>& dims, graph::LazyBytes data,
                               const std::string& base, Outcome& outcome);

// Input `slot` of `layer` (what it reads there, or a new tensor named from `fallback_base` when the slot is
// empty), written as above.
void write_layer_input(FoldContext& ctx, int layer, int slot, int32_t data_type, const std::vector<int64_t>& dims,
                       graph::LazyBytes data, const std::string& fallback_base, Outcome& outcome);
// The same from bytes computed now (they are handed to the writer as data produced when written).
void write_layer_input(FoldContext& ctx, int layer, int slot, int32_t data_type, const std::vector<int64_t>& dims,
                       const std::string& raw, const std::string& fallback_base, Outcome& outcome);

// Adds a constant after `layer`: its output 0 is renamed, and Add(renamed, constant) produces the old name
// (graph outputs, value_info and readers keep theirs). The constant is a new tensor named after the layer.
void add_constant_after(FoldContext& ctx, int layer, int32_t data_type, const std::vector<int64_t>& dims,
                        const std::string& raw, const char* suffix, Outcome& outcome);

}  // namespace qdqfold::folds
