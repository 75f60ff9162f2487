// The policies the graph index leaves to the folds' driver (graph::Model::EditPolicy), decided in one place
// from the options and the model, for run_folds (api.cpp):
//   - freeze_initializer_inputs: the option, and always under IR version < 4, where every initializer had to
//     be listed as a graph input (so being one says nothing about being meant to be overridden);
//   - initializers_are_inputs: IR version < 4, so an initializer a fold adds is listed as an input too, and a
//     replaced one stays listed;
//   - Q/DQ-aware removal: a DequantizeLinear of constants, and an Identity of a constant (torch's shared
//     initializers), go with the last reader of their output, their inputs after them if nothing else reads
//     them.
// The opset a fold may raise a model to is that fold's decision (qdq_layer_bn.cpp, can_raise_opset_to_13);
// the index only rewrites the opset_import entry (Model::raise_opset).
#pragma once

#include "../graph/graph.h"
#include "options.h"

namespace qdqfold {

// Sets `model.policy` for a run of the folds under `options`.
void set_edit_policy(graph::Model& model, const Options& options);

}  // namespace qdqfold
