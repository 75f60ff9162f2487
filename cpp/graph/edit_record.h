// The edit record of nodes and graphs, for the parser (which sizes it) and the writer (which applies it).
// Private to graph/: nothing outside this directory includes this header; folds edit through Graph's methods.
#pragma once

#include "graph.h"

namespace qdqfold::graph {

struct EditRecord {
  static Graph::GraphEdits& of(Graph& g) { return g.edits_; }
  static const Graph::GraphEdits& of(const Graph& g) { return g.edits_; }
  static const NodeEdits& of(const Node& n) { return n.edits_; }
  // The contents, writable: for the parser, which fills them (folds edit through Graph's methods).
  static std::vector<Node>& nodes(Graph& g) { return g.nodes_; }
  static std::vector<Tensor>& initializers(Graph& g) { return g.initializers_; }
  static std::vector<ValueInfo>& value_info(Graph& g) { return g.value_info_; }
  static std::vector<Graph::FieldRef>& fields(Graph& g) { return g.fields_; }
};

}  // namespace qdqfold::graph
