// The folds the driver tries on each BatchNormalization, in order, in one table: backward folds (into the
// producer) before forward folds (into the readers). A new fold is one file with its function
// (`Outcome fold_x(FoldContext&, int bn)`, select / plan / apply: fold.h), one row here, and its FoldName in
// reasons.h (docs/adding-a-pattern.md walks through one). The row declares the function too: no header.
//
//   qdq-layer-bn       directions/backward/qdq_layer_bn.cpp: Conv / ConvTranspose / Gemm / MatMul whose weight
//                      comes through DequantizeLinear -> BN, folded into the quantization scale
//   conv-bn            directions/backward/conv_bn.cpp: Conv / ConvTranspose (float weight) -> BN
//   gemm-bn            directions/backward/gemm_bn.cpp: Gemm, or MatMul with a constant 2-D weight [-> Add] -> BN
//   matmul-reshape-bn  directions/backward/matmul_reshape_bn.cpp: MatMul -> Flatten / Reshape -> BN (LeViT)
//   concat-bn          directions/backward/concat_bn.cpp: Convs -> Concat(axis=1) -> BN (MixNet)
//   bn-layers          directions/forward/forward.cpp (bn_conv.cpp, bn_gemm.cpp): BN -> [Identity/Dropout]
//                      -> [Flatten/Reshape] -> every layer that reads it
#include "folds/fold.h"

// X(FoldName of the rule, direction, the fold's function). Quantized weights first: the float folds leave
// weights behind DequantizeLinear to it. Forward folds last: a BN that can fold backwards does so first.
#define QDQFOLD_FOLDS(X)                                 \
  X(QdqLayerBn, "backward", fold_qdq_layer_bn)           \
  X(ConvBn, "backward", fold_conv_bn)                    \
  X(GemmBn, "backward", fold_gemm_bn)                    \
  X(MatmulReshapeBn, "backward", fold_matmul_reshape_bn) \
  X(ConcatBn, "backward", fold_concat_bn)                \
  X(BnLayers, "forward", fold_bn_forward)

namespace qdqfold::folds {

#define QDQFOLD_DECLARE(name, direction, function) Outcome function(FoldContext& ctx, int bn);
QDQFOLD_FOLDS(QDQFOLD_DECLARE)
#undef QDQFOLD_DECLARE

const std::vector<FoldRule>& fold_rules() {
  static const std::vector<FoldRule> rules = {
#define QDQFOLD_RULE(name, direction, function) {code(FoldName::name), direction, function},
      QDQFOLD_FOLDS(QDQFOLD_RULE)
#undef QDQFOLD_RULE
  };
  return rules;
}

}  // namespace qdqfold::folds
