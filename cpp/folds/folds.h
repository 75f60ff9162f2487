// Declarations of the fold functions that folds/registry.cpp lists. One fold per file; each file opens with
// the graph before and after and the formula. Keep this list additive: one block per file.
#pragma once

#include "folds/fold.h"

namespace qdqfold::folds {

// conv_bn.cpp: Conv / ConvTranspose (float weight) -> BatchNormalization, folded into the layer.
Outcome fold_conv_bn(FoldContext& ctx, int bn);

// gemm_bn.cpp: Gemm, or MatMul with a constant 2-D weight (optionally followed by Add of a constant bias)
// -> BatchNormalization over the 2-D output's features, folded into the layer.
Outcome fold_gemm_bn(FoldContext& ctx, int bn);

// concat_bn.cpp: Conv / ConvTranspose (float weights) -> Concat(axis=1) -> BatchNormalization (MixNet's mixed
// depthwise convs), folded slice by slice into every producer.
Outcome fold_concat_bn(FoldContext& ctx, int bn);

// matmul_reshape_bn.cpp: MatMul with a constant 2-D weight -> Flatten / Reshape keeping the features on axis 1
// -> BatchNormalization (LeViT's Linear -> BatchNorm1d on x.flatten(0, 1)), folded into the MatMul.
Outcome fold_matmul_reshape_bn(FoldContext& ctx, int bn);

// qdq_layer_bn.cpp: Conv / ConvTranspose / Gemm / MatMul whose weight comes through DequantizeLinear (int
// weight, or float weight -> QuantizeLinear) -> BatchNormalization, folded into the quantization scale.
Outcome fold_qdq_layer_bn(FoldContext& ctx, int bn);

// forward.cpp (with bn_conv.cpp, bn_gemm.cpp): BatchNormalization -> [Identity/Dropout] -> [Flatten/Reshape]
// -> Conv / ConvTranspose / Gemm / MatMul, folded into every layer that reads it.
Outcome fold_bn_forward(FoldContext& ctx, int bn);

}  // namespace qdqfold::folds
