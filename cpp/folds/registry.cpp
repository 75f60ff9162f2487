// The folds the driver tries on each BatchNormalization, in order: backward folds (into the producer) before
// forward folds (into the readers). A new fold adds one file under directions/backward/ (or a planner under
// directions/forward/), its declaration in folds.h and one line here; its name goes into reasons.h.
#include "folds/fold.h"
#include "folds/folds.h"

namespace qdqfold::folds {

const std::vector<FoldRule>& fold_rules() {
  static const std::vector<FoldRule> rules = {
      // Quantized weights first: the float folds leave weights behind DequantizeLinear to it.
      {code(FoldName::QdqLayerBn), "backward", fold_qdq_layer_bn},
      {code(FoldName::ConvBn), "backward", fold_conv_bn},
      {code(FoldName::GemmBn), "backward", fold_gemm_bn},
      {code(FoldName::MatmulReshapeBn), "backward", fold_matmul_reshape_bn},
      {code(FoldName::ConcatBn), "backward", fold_concat_bn},
      // Forward folds last: a BN that can fold backwards does so first.
      {code(FoldName::BnLayers), "forward", fold_bn_forward},
  };
  return rules;
}

}  // namespace qdqfold::folds
