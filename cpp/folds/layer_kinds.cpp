#include "folds/layer_kinds.h"

#include <algorithm>

namespace qdqfold::folds {

const std::vector<LayerKind>& layer_kinds() {
  static const std::vector<LayerKind> kinds = {
      {"Conv", 1, 2, "input 2 (B), one value per output channel", "0", true, true, true, true},
      {"ConvTranspose", 1, 2, "input 2 (B), one value per output channel",
       "1 within each group's block (weight [C_in, C_out / group, k...])", true, true, true, true},
      {"Gemm", 1, 2, "input 2 (C), scaled by beta", "0 when transB=1, else 1", false, true, true, true},
      {"MatMul", 1, -1, "an Add of a constant after it (or none)", "1, the last axis of its 2-D weight", false, true,
       true, true},
  };
  return kinds;
}

const LayerKind* layer_kind(const graph::Node& n) {
  for (const auto& k : layer_kinds())
    if (n.is(k.op)) return &k;
  return nullptr;
}

std::string join_op_types(const std::vector<std::string>& ops) {
  std::string out;
  auto add = [&](const std::string& op) {
    if (!out.empty()) out += ",";
    out += op;
  };
  for (const auto& k : layer_kinds())
    if (std::find(ops.begin(), ops.end(), k.op) != ops.end()) add(k.op);
  std::vector<std::string> others;  // not a layer kind (none today): after them, sorted
  for (const auto& op : ops)
    if (std::none_of(layer_kinds().begin(), layer_kinds().end(), [&](const LayerKind& k) { return op == k.op; }) &&
        std::find(others.begin(), others.end(), op) == others.end())
      others.push_back(op);
  std::sort(others.begin(), others.end());
  for (const auto& op : others) add(op);
  return out;
}

}  // namespace qdqfold::folds
