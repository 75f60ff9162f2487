// Which layers onnxruntime will run as integer kernels, and whether their 16-bit pair sums can saturate on
// x86-64 CPUs without VNNI: a static check of a (folded) model, no runtime needed.
//
//   DQ(x) -> Conv(DQ(W), b) -> Q        onnxruntime (QDQ selectors) ->  QLinearConv
//   DQ(x) -> MatMul(DQ(W))  [-> Q]                                    ->  QLinearMatMul / MatMulIntegerToFloat
//   DQ(x) -> Gemm(DQ(W))   [-> Q]                                     ->  QGemm
//
// The layers are the ones cpp/predict/onnxruntime_kernels.h predicts (the target's kernel counts use the same
// predictor, so the two lists agree); its rules are written there once. A constant float weight behind Q -> DQ
// counts (onnxruntime folds the Q into integers). On x86-64 an int8 activation pair that onnxruntime converts runs
// as uint8 (zero point + 128), so the kernel multiplies activation bytes a in [0, 255].
//
// Without VNNI the u8s8 GEMM multiplies with vpmaddubsw, adding each pair of neighbouring products along the
// reduction into a saturating int16:
//
//   pair = a[k] w[k] + a[k+1] w[k+1]   clipped to [-32768, 32767]
//
// so two same-sign int8 weights with 255 (|w1| + |w2|) > 32767 can clip. VNNI (vpdpbusd) accumulates in
// int32, and session.x64quantprecision=1 promotes to int16 products; neither clips. Depthwise convolutions
// and uint8 weights use kernels that widen first. Reduction order: Conv kernel position major, input channel
// minor (QLinearConv's packed filter); MatMul/Gemm the rows of B. Both pairings (from element 0 and from 1)
// are checked, so an odd channel count cannot hide a pair. Python's qdqfold/kernels.py measures the same
// layers on the CPU it runs on (bench/saturation.py compares the two).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../graph/graph.h"

namespace qdqfold::analysis {

struct IntegerLayer {
  std::string node;        // the layer's display name (its name, or "<op>#<position>")
  std::string op;          // Conv / MatMul / Gemm
  std::string kernel;      // QLinearConv / QLinearMatMul / MatMulIntegerToFloat / QGemm
  std::string activation;  // "int8" or "uint8" (int8 runs as uint8 on x86-64)
  std::string weight;      // "int8" or "uint8"
  int64_t activation_lo = 0, activation_hi = 255;  // the activation bytes the kernel can see
  int64_t pair_max = 0, pair_min = 0;  // over every output channel and both pairings
  bool can_saturate = false;
  int64_t channels = 0;    // output channels with a pair outside int16
  std::string why_not;     // when it cannot saturate by construction: the kernel that runs instead
};

// The main graph's integer layers, in node order.
std::vector<IntegerLayer> integer_layers(graph::Model& model);

}  // namespace qdqfold::analysis
