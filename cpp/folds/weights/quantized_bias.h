// The bias form of a layer with a quantized weight, and how BN's shift enters it (the qdq fold's bias):
//
//   float bias b:                  b' = a * b + t / beta                       (stays float)
//   int32 bias behind DQ(s_b, z):  b' = a * (q_b - z) * s_b + t / beta, re-quantized with zero point 0 on
//                                  s_b' = s_x * s'_w (onnxruntime's convention s_b = s_x * s_w kept) or s_b * |a|
//   no bias:                       t / beta, in the form the graph's other quantized layers use (int32 behind
//                                  DQ(s_x * s'_w) for the int form, float otherwise); int32 always for a
//                                  float16 / bfloat16 layer, whose float bias onnxruntime would re-quantize in
//                                  that type
//
// The rounding of an int32 bias is reported per output channel (note_bias_error), summed along a chain of
// folds into one layer.
#pragma once

#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "folds/expected.h"
#include "folds/sources/batchnorm.h"
#include "folds/weights/quantized_weight.h"

namespace qdqfold::folds {

// The folded bias, decided before anything is edited.
struct BiasPlan {
  enum Kind { None, Float, Int32Existing, Int32New } kind = None;
  std::string old;                   // the layer's bias input (empty: none)
  int32_t data_type = 0;             // Float: element type; Int32*: type of the bias scale
  std::vector<int64_t> dims;
  std::vector<double> values;        // Float: the new bias
  std::vector<int64_t> ints;         // Int32*: the new integers
  std::vector<double> scale;         // Int32*: one scale per output channel
  int bias_dq = -1;                  // Int32Existing: its DequantizeLinear
  bool zero_present = false;
  bool zero_nonzero = false;         // Int32Existing: the old zero point is not all 0 (the new one is)
  bool promote = false;              // Int32Existing: per-tensor scale becomes per-channel
  double max_error = 0;              // Int32*: largest |round(b'/s) * s - b'|
  std::vector<double> errors;        // Int32*: |round(b'/s) * s - b'| per output channel
};

// The folded bias of `layer` (weight `w` rescaled to `r`, layout `wl`) for BN `bn`, decided before anything is
// edited; Kept with a reason when it cannot be carried. `raising_opset`: the model goes to opset 13 (a
// per-tensor int32 bias scale may become per-channel).
Expected<BiasPlan> plan_bias(FoldContext& ctx, int layer, const WeightLayout& wl, const QuantizedWeight& w,
                                          const RescaledWeight& r, const BatchNormAffine& bn, double beta,
                                          bool raising_opset, const std::string& who);

// Writes the planned bias into input 2 of `layer` (a MatMul becomes a Gemm to carry it); a new int32 bias gets
// its DequantizeLinear in the domain of `weight_dq`.
void write_bias(FoldContext& ctx, int layer, int weight_dq, const BiasPlan& plan, Outcome& out);

// The int32 bias rounding as it reaches the layer's output: earlier folds' errors times |a|, plus this
// fold's bias error `own` times |beta|, per channel. Marks the fold bias-rounded when that is not 0.
void note_bias_error(FoldContext& ctx, int layer, const std::vector<double>& a, double beta,
                     const std::vector<double>& own, Outcome& out);

}  // namespace qdqfold::folds
