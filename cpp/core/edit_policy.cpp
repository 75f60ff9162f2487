#include "edit_policy.h"

#include <string>

namespace qdqfold {

namespace {

class QdqAwareRemoval : public graph::RemovalPolicy {
 public:
  bool goes_with_last_reader(graph::Graph& g, int node, const std::string& value) const override {
    const graph::Node& n = g.nodes()[node];
    if (n.is_plain_identity()) return g.constant(value).has_value();
    if (!n.is("DequantizeLinear") || n.outputs.size() != 1 || !n.subgraphs.empty()) return false;
    for (const auto& in : n.inputs)
      if (!in.empty() && !g.constant(in)) return false;
    return true;
  }
};

const QdqAwareRemoval kQdqAwareRemoval;

}  // namespace

void set_edit_policy(graph::Model& model, const Options& options) {
  const bool initializers_are_inputs = model.ir_version < 4;
  model.policy.freeze_initializer_inputs = options.freeze_initializer_inputs || initializers_are_inputs;
  model.policy.initializers_are_inputs = initializers_are_inputs;
  model.policy.removal = &kQdqAwareRemoval;
}

}  // namespace qdqfold
