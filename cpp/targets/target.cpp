// The deployment target's driver (targets/onnxruntime.h): after the folds, every layer of every graph is given
// its output quantizers where that is exact, and the report says what was done, what was left in float and why,
// and which integer kernels onnxruntime is expected to form before and after.
#include "targets/onnxruntime.h"

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
    std::vector<int> layers;
    for (size_t i = 0; i < g->nodes().size(); ++i) {
      const graph::Node& n = g->nodes()[i];
      if (!n.removed() && !n.created() && (n.is("Conv") || n.is("Gemm") || n.is("MatMul")))
        layers.push_back(static_cast<int>(i));
    }
    for (int layer : layers) {
      report.target_layers.push_back(output_quantizer(model, *g, layer));
      store_integer_weight(model, *g, layer, report.target_layers.back());
    }
  }
  report.target_kernels.before = std::move(kernels_before);
  report.target_kernels.after = predict_onnxruntime_kernels(model);
}

}  // namespace qdqfold::targets
