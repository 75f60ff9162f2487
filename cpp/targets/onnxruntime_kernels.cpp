// The target's kernel counts (targets/onnxruntime.h): the one predictor of onnxruntime's integer kernels,
// cpp/predict/onnxruntime_kernels.h, which the saturation check (cpp/analysis/integer_kernels.cpp) also uses.
// A prediction, not a measurement: tests/test_kernel_predictor.py and tests/test_target_onnxruntime.py check it
// against the count in the model onnxruntime saves (optimized_model_filepath, ORT_ENABLE_ALL).
#include "predict/onnxruntime_kernels.h"
#include "targets/onnxruntime.h"

namespace qdqfold::targets {

std::string predicted_kernel(graph::Graph& g, int node) { return predict::select_kernel(g, node).op; }

std::map<std::string, int64_t> predict_onnxruntime_kernels(graph::Model& model) {
  return predict::count_kernels(model);
}

}  // namespace qdqfold::targets
