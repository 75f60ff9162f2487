#include "folds/edits.h"

#include "folds/common/values.h"

#include <cstring>
#include <memory>

namespace qdqfold::folds {

std::string write_constant_for(FoldContext& ctx, const std::vector<graph::Use>& readers, std::string old,
                               int32_t data_type, const std::vector<int64_t>& dims, const std::string& raw,
                               const std::string& base, Outcome& outcome, bool keep_constant_node) {
  auto written = ctx.graph.write_constant(readers, old, data_type, dims, raw, base, keep_constant_node);
  if (written.is_new) outcome.new_tensors.push_back(written.name);
  return written.name;
}

std::string write_constant_for(FoldContext& ctx, const std::vector<graph::Use>& readers, std::string old,
                               int32_t data_type, const std::vector<int64_t>& dims, graph::LazyBytes data,
                               const std::string& base, Outcome& outcome) {
  auto written = ctx.graph.write_constant(readers, old, data_type, dims, std::move(data), base);
  if (written.is_new) outcome.new_tensors.push_back(written.name);
  return written.name;
}

void write_layer_input(FoldContext& ctx, int layer, int slot, int32_t data_type, const std::vector<int64_t>& dims,
                       graph::LazyBytes data, const std::string& fallback_base, Outcome& outcome) {
  const auto& inputs = ctx.graph.nodes()[layer].inputs;
  const std::string old = slot < static_cast<int>(inputs.size()) ? inputs[slot] : "";
  write_constant_for(ctx, {graph::Use{layer, slot}}, old, data_type, dims, std::move(data), fallback_base, outcome);
}

void write_layer_input(FoldContext& ctx, int layer, int slot, int32_t data_type, const std::vector<int64_t>& dims,
                       const std::string& raw, const std::string& fallback_base, Outcome& outcome) {
  auto owned = std::make_shared<const std::string>(raw);
  graph::LazyBytes data;
  data.size = owned->size();
  data.fill = [owned](char* dst) { std::memcpy(dst, owned->data(), owned->size()); };
  write_layer_input(ctx, layer, slot, data_type, dims, std::move(data), fallback_base, outcome);
}

void add_constant_after(FoldContext& ctx, int layer, int32_t data_type, const std::vector<int64_t>& dims,
                        const std::string& raw, const char* suffix, Outcome& outcome) {
  graph::Graph& g = ctx.graph;
  const std::string output = g.nodes()[layer].outputs[0];
  const std::string base = g.nodes()[layer].display_name(layer);
  const std::string constant = new_tensor_name(ctx.model, base, suffix);
  const std::string renamed = ctx.model.fresh_name(output + "_before" + suffix);
  g.add_tensor(constant, graph::encode_tensor(constant, data_type, dims, raw));
  outcome.new_tensors.push_back(constant);
  g.set_output(layer, 0, renamed);
  graph::Node add;
  add.op_type = "Add";
  add.name = ctx.model.fresh_name(base + suffix);
  add.inputs = {renamed, constant};
  add.outputs = {output};
  g.add_node(std::move(add), layer + 1);
}

}  // namespace qdqfold::folds
