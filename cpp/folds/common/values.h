// Graph-level reads every layer of the folds shares: constants (values, dims), who reads a value, proven
// ranks, fresh tensor names and node names for messages. Below sources/, weights/ and directions/ (see
// tests/test_layering.py), so that each of them may use these without including another.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "graph/graph.h"

namespace qdqfold::folds {

// Values of a constant: an initializer, a Constant node, or DequantizeLinear of constant integers
// (onnxruntime's quantizer hands BN parameters and biases over that way). nullopt if not constant.
std::optional<std::vector<double>> constant_values(graph::Graph& g, const std::string& value);

// True when `value` is read exactly once, by node `reader`, and is not a graph output.
bool read_only_by(const graph::Graph& g, const std::string& value, int reader);

// True when use `u` reads only the shape of the value (Shape, Size): a fold changes no shape, so such a reader
// never blocks one; where the value it reads goes away (a backward fold hands the BN's output name to the
// layer), take_over_batchnorm_output points it at the value that replaces it, of the same shape.
bool reads_only_shape(const graph::Graph& g, const graph::Use& u);

// A name for a tensor a fold writes, derived from the one it replaces, unique in the model.
std::string new_tensor_name(graph::Model& model, const std::string& old_name, const char* suffix);

// Dims of a constant (initializer, Constant node, or DequantizeLinear of constant integers).
std::optional<std::vector<int64_t>> constant_dims(graph::Graph& g, const std::string& value);

// The rank of `value` when it is known: from shape information, or because its producer always makes
// rank-2 outputs (Flatten, Gemm); for an outer-scope value read in a subgraph, from the enclosing graph.
std::optional<size_t> known_rank(const graph::Graph& g, const std::string& value);

// "Conv '/c1/Conv'" for messages.
std::string describe_node(const graph::Graph& g, int node);

}  // namespace qdqfold::folds
