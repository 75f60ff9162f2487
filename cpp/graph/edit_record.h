// The edit record of nodes and graphs, for the parser (which sizes it) and the writer (which applies it).
// Private to graph/: nothing outside this directory includes this header; folds edit through Graph's methods.
#pragma once

#include "graph.h"

namespace qdqfold::graph {

struct EditRecord {
  static Graph::GraphEdits& of(Graph& g) { return g.edits_; }
  static const Graph::GraphEdits& of(const Graph& g) { return g.edits_; }
  static const NodeEdits& of(const Node& n) { return n.edits_; }
};

}  // namespace qdqfold::graph
