// The deployment target's driver (targets/onnxruntime.h): after the folds, every layer of every graph is given
// its output quantizers where that is exact, and the report says what was done, what was left in float and why,
// and which integer kernels onnxruntime is expected to form before and after.
#include "targets/onnxruntime.h"

#include <map>

namespace qdqfold::targets {

bool is_known_target(const std::string& name) { return name.empty() || name == "onnxruntime"; }
const char* known_targets() { return "onnxruntime"; }

void run_target(graph::Model& model, const Options& options, std::map<std::string, int64_t> kernels_before,
                Report& report) {
  if (options.target.empty()) return;
  report.target = options.target;
  for (graph::Graph* g : model.all_graphs()) {
    // Functions are inlined by onnxruntime before its QDQ transformers; their bodies are left as they are.
    if (g->kind == graph::GraphKind::Function) continue;
    // The residuals' inputs first: a conv feeding an Add then reaches the Add's new input quantizer.
    std::map<std::string, size_t> residual;  // node -> its record's position
    for (auto& r : residual_inputs(model, *g, options.requantize_residuals)) {
      residual[r.node] = report.target_layers.size();
      report.target_layers.push_back(std::move(r));
    }
    std::vector<int> layers;
    std::vector<std::pair<int, size_t>> layer_records;  // layer node -> its record
    for (size_t i = 0; i < g->nodes().size(); ++i) {
      const graph::Node& n = g->nodes()[i];
      const bool sum = n.is("Add") || n.is("Concat");
      if (!n.removed() && !n.created() && (n.is("Conv") || n.is("Gemm") || n.is("MatMul") || sum))
        layers.push_back(static_cast<int>(i));
    }
    for (int layer : layers) {
      const bool sum = g->nodes()[layer].is("Add") || g->nodes()[layer].is("Concat");
      BatchNormRecord r = output_quantizer(model, *g, layer);
      // An Add / Concat whose inputs are not all quantized is reported by residual_inputs (or, with no
      // quantized input at all, is no residual of quantized layers): not listed twice.
      if (sum && r.code == "inputs-not-quantized") continue;
      if (auto it = residual.find(r.node); sum && it != residual.end()) {
        // One record per Add: its inputs' and its output's part.
        BatchNormRecord& inputs = report.target_layers[it->second];
        inputs.message += r.folded ? "; its " + r.message : "; its output: " + r.message;
        for (auto& t : r.new_tensors) inputs.new_tensors.push_back(t);
        continue;
      }
      report.target_layers.push_back(std::move(r));
      if (!sum) {
        store_integer_weight(model, *g, layer, report.target_layers.back());
        layer_records.emplace_back(layer, report.target_layers.size() - 1);
      }
    }
    // Once every rewrite is in: the layers onnxruntime will still run in float.
    if (options.store_float_weights)
      for (auto [layer, record] : layer_records)
        if (predicted_kernel(*g, layer).empty())
          store_float_weight(model, *g, layer, report.target_layers[record]);
  }
  // Last, so the pairs the target added are converted too; only where the target changed something (a model it
  // leaves alone stays byte for byte as it was).
  bool changed = false;
  for (const auto& r : report.target_layers) changed = changed || r.folded;
  // Then, on those uint8 pairs, the activations between equal quantizers run on the integers.
  for (graph::Graph* g : model.all_graphs())
    if (changed && g->kind != graph::GraphKind::Function) {
      uint8_activations(model, *g);
      integer_activations(model, *g, report.target_layers);
    }
  report.target_kernels.before = std::move(kernels_before);
  report.target_kernels.after = predict_onnxruntime_kernels(model);
}

}  // namespace qdqfold::targets
