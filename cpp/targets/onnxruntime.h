// The onnxruntime deployment target (Options::target == "onnxruntime"): a stage after the folds that rewrites the
// model into the shape onnxruntime's QDQ transformers turn into integer kernels, without changing what it
// computes. The parts, one file each:
//
//   onnxruntime_output_quantizers.cpp  a layer (Conv / Gemm / MatMul with dequantized inputs) whose output
//       reaches activation quantizers only through ops that commute with rounding gets those quantizers'
//       Q -> DQ right after it (exact: the same integers reach the downstream quantizers; the proof is there);
//   onnxruntime_residuals.cpp  an Add / Concat's inputs given Q -> DQ pairs: exactly where an input is already on
//       a DequantizeLinear's grid, by a new rounding only under requantize_residuals (approximate, reported);
//   onnxruntime_integer_activations.cpp  DQ -> Relu / Clip -> Q between equal quantizers as an integer Clip;
//   onnxruntime_uint8.cpp  int8 activation pairs as the equal uint8 pairs;
//   onnxruntime_weights.cpp  a float weight behind QuantizeLinear stored as its integers (exact);
//   onnxruntime_kernels.cpp  the integer kernels onnxruntime is expected to form, by op, predicted from its
//       selector rules (qdq_selectors.cc) on the graph before the folds and after the target;
//   target.cpp  the driver: runs the stage on every graph and fills Report::target*.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/options.h"
#include "core/report.h"
#include "graph/graph.h"

namespace qdqfold::targets {

// The target names Options::target takes ("" for none).
bool is_known_target(const std::string& name);
const char* known_targets();  // for messages: "onnxruntime"

// One layer's outcome: given output quantizers (folded = true, code "output-quantizer"), or left in float
// (folded = false) with a reason code and sentence.
BatchNormRecord output_quantizer(graph::Model& model, graph::Graph& g, int layer);

// The Add / Concat nodes of `g` whose inputs are not all dequantized: each input given a Q -> DQ pair where
// that is exact (on a grid already) or, with `requantize`, by a new rounding; one record per node looked at.
std::vector<BatchNormRecord> residual_inputs(graph::Model& model, graph::Graph& g, bool requantize);

// Every int8 activation Q -> DQ pair of `g` rewritten as the uint8 pair that computes the same floats
// (onnxruntime_uint8.cpp); returns how many quantizers.
int uint8_activations(graph::Model& model, graph::Graph& g);

// Every uint8 DequantizeLinear -> Relu / Clip -> QuantizeLinear chain of `g` whose two quantizers agree, as one
// integer Clip on the quantized tensor (onnxruntime_integer_activations.cpp; exact). Each is told in the record
// of the layer that feeds it (metric "activation_on_integers"), else in a record of its own
// ("integer-activation"). Returns how many.
int integer_activations(graph::Model& model, graph::Graph& g, std::vector<BatchNormRecord>& records);

// A constant float32 weight behind its own QuantizeLinear stored as the integers it quantizes to (exact);
// noted in `record` (new_tensors, metric "weight_stored_as_integers", message).
void store_integer_weight(graph::Model& model, graph::Graph& g, int layer, BatchNormRecord& record);

// store_float_weights: a layer left in float reads its weight as the float32 constant its DequantizeLinear
// computes, bit for bit (metric "weight_stored_as_float").
void store_float_weight(graph::Model& model, graph::Graph& g, int layer, BatchNormRecord& record);

// The kernel op onnxruntime is expected to make of node `node` ("" when it stays float).
std::string predicted_kernel(graph::Graph& g, int node);

// The integer kernels onnxruntime's CPU provider is expected to form at its default level, by kernel op type
// (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm, QLinearAdd, QLinearMul, QLinearConcat;
// each listed, 0 included).
std::map<std::string, int64_t> predict_onnxruntime_kernels(graph::Model& model);

// After the folds: runs the target on `model` and fills report.target, target_layers and target_kernels
// (`kernels_before`: the prediction on the model as read).
void run_target(graph::Model& model, const Options& options, std::map<std::string, int64_t> kernels_before,
                Report& report);

}  // namespace qdqfold::targets
