// Every code a report can carry, in one table: the reasons a BN (or an elementwise affine node, or a branch
// sum) is kept, and the names of the folds that fold it. A fold writes Reason::X or FoldName::X, never a
// string; qdqfold_native.reasons() hands the table to Python (docs/reasons.md is made from it, tests/test_reasons.py
// checks the two agree and that every code the folds produce is here).
//
// Columns: the enumerator, the code as reported, its one-line meaning, and the option (keyword of
// qdqfold_native.fold / qdqfold.fold) and CLI flag that change the outcome, where one does ("" otherwise).
#pragma once

#include <string>
#include <vector>

// X(id, code, meaning, option, flag)
#define QDQFOLD_KEPT_REASONS(X)                                                                                     \
  X(ActivationQuantizer, "activation-quantizer",                                                                   \
    "an activation QuantizeLinear -> DequantizeLinear between the layer and the BN rounds the values in between",  \
    "drop_activation_quantizers", "--drop-activation-quantizers")                                                  \
  X(AutoPad, "auto-pad", "a branch pads with auto_pad, whose pads depend on the input size (merge_branches)", "",  \
    "")                                                                                                            \
  X(BiasOverflow, "bias-overflow", "the re-quantized int32 bias overflows int32", "", "")                          \
  X(BranchOutputShared, "branch-output-shared",                                                                    \
    "a branch's output is read by something other than the sum (merge_branches)", "", "")                          \
  X(ChannelAxisMismatch, "channel-axis-mismatch",                                                                  \
    "the per-channel axis is not the layer's output (or input) channel axis", "", "")                              \
  X(ChannelMismatch, "channel-mismatch", "the branches have different channel counts (merge_branches)", "", "")    \
  X(ClippedWeight, "clipped-weight", "the weight's Clip changes some of its integers, so mirroring them is not exact", \
    "", "")                                                                                                        \
  X(ConcatQuantizedLayer, "concat-quantized-layer", "a layer feeding the Concat has a quantized weight", "", "")   \
  X(CorrectionTooLarge, "correction-too-large", "the border correction map of a padded layer would be too large",  \
    "", "")                                                                                                        \
  X(DifferentInput, "different-input", "the summed branches do not read one input (merge_branches)", "", "")       \
  X(DilationMismatch, "dilation-mismatch", "the branches have different dilations (merge_branches)", "", "")       \
  X(DynamicShape, "dynamic-shape", "the border correction needs a static spatial size, which the core infers from the graph inputs' " \
    "declared shapes (value_info is a claim, not used)",          \
    "shapes", "")                                                                                                  \
  X(Float8Quantizer, "float8-quantizer", "a QuantizeLinear that makes float8 values, whose rounding is not mirrored", \
    "", "")                                                                                                        \
  X(GraphOutput, "graph-output", "the BN's output is a graph output, which must keep its values", "", "")          \
  X(GroupMismatch, "group-mismatch", "the branches have different group counts (merge_branches)", "", "")          \
  X(IdentityChannels, "identity-channels", "an identity branch does not match the convs' channels (merge_branches)", \
    "", "")                                                                                                        \
  X(IdentityMisaligned, "identity-misaligned",                                                                     \
    "an identity branch has no tap of the merged kernel at its centre (merge_branches)", "", "")                   \
  X(IdentityStride, "identity-stride", "an identity branch sits beside strided convs (merge_branches)", "", "")    \
  X(LayerOutputIsGraphOutput, "layer-output-is-graph-output",                                                      \
    "the layer's output is also a graph output, which must keep its values", "", "")                               \
  X(LayerOutputReadElsewhere, "layer-output-read-elsewhere",                                                       \
    "the layer's output is also read by another node, which must keep the unnormalized values", "", "")            \
  X(Malformed, "malformed", "a node has an unexpected arity or attribute", "", "")                                 \
  X(MalformedLayer, "malformed-layer", "a layer lacks its weight input or output, or has invalid geometry", "", "") \
  X(MalformedQuantization, "malformed-quantization", "a weight's Q/DQ chain is malformed", "", "")                  \
  X(MismatchedQdq, "mismatched-qdq", "the weight's QuantizeLinear and DequantizeLinear disagree", "", "")           \
  X(NegationOverflow, "negation-overflow",                                                                         \
    "a negative BN factor meets an integer whose negation does not fit the type", "allow_nonzero_zero_point",      \
    "--allow-nonzero-zero-point")                                                                                  \
  X(NoFoldableLayer, "no-foldable-layer", "neither the producer nor the readers is a layer it can fold into", "", "") \
  X(NonConstantBias, "non-constant-bias", "the layer's bias is not a constant", "freeze_initializer_inputs",        \
    "--freeze-initializer-inputs")                                                                                 \
  X(NonConstantParameters, "non-constant-parameters", "the BN's (or affine node's) parameters are not constants",  \
    "freeze_initializer_inputs", "--freeze-initializer-inputs")                                                    \
  X(NonConstantQuantizationParameters, "non-constant-quantization-parameters",                                     \
    "the weight's scale, zero point or Clip bounds are not constants", "freeze_initializer_inputs",                \
    "--freeze-initializer-inputs")                                                                                 \
  X(NonConstantWeight, "non-constant-weight", "the layer's weight is not a constant", "freeze_initializer_inputs",  \
    "--freeze-initializer-inputs")                                                                                 \
  X(NonFiniteParameters, "non-finite-parameters", "the BN's (or affine node's) parameters hold NaN or Inf", "", "")  \
  X(NonFiniteScale, "non-finite-scale", "the weight's quantization scale holds NaN, Inf or a negative value", "",   \
    "")                                                                                                            \
  X(NonPositiveVariance, "non-positive-variance", "var + epsilon <= 0 in a channel", "", "")                       \
  X(NotA2dInput, "not-2d", "a quantized MatMul's input is not known to be 2-D", "shapes", "")                     \
  X(NotABranch, "not-a-branch", "a term of the sum is not a conv, BN or identity branch (merge_branches)", "", "") \
  X(NotImplemented, "not-implemented", "no fold is implemented", "", "")                                           \
  X(NotPerChannel, "not-per-channel", "spatial=0: the BN's statistics are per element", "", "")                    \
  X(OpsetTooOld, "opset-too-old",                                                                                  \
    "a per-tensor scale must become per-channel, which needs DequantizeLinear's axis (opset >= 13)",                \
    "allow_opset_upgrade", "--allow-opset-upgrade")                                                                \
  X(OtherReader, "other-reader", "the BN's output is also read by something that is not a layer", "", "")          \
  X(Overflow, "overflow", "a folded value overflows its type, or BN's factor is beyond 2^32, where the folded " \
    "layer's sums would overflow (+Inf and -Inf: NaN) where the original's do not", "", "")                       \
  X(Padding, "padding", "BN -> padded layer with a nonzero shift: the border would change", "pad_correction",      \
    "--pad-correction")                                                                                            \
  X(PadsMisaligned, "pads-misaligned", "the branches' pads do not centre their kernels alike (merge_branches)", "",  \
    "")                                                                                                            \
  X(QuantizedBias, "quantized-bias", "the layer's bias comes through DequantizeLinear", "", "")                    \
  X(QuantizedMix, "quantized-mix", "quantized and float branches are summed (merge_branches)", "", "")             \
  X(QuantizedWeight, "quantized-weight", "the layer's weight comes through DequantizeLinear",                       \
    "requantize_merged", "--requantize-merged")                                                                    \
  X(QuantizedWeightAxis, "quantized-weight-axis",                                                                  \
    "a quantized branch's scale is not per output channel (merge_branches)", "", "")                               \
  X(QuantizedWeightType, "quantized-weight-type", "a quantized branch's weight type cannot be merged (merge_branches)", \
    "", "")                                                                                                        \
  X(QuantizerWouldBeLost, "quantizer-would-be-lost",                                                               \
    "dropping the activation quantizer would leave the layer without a quantizer after it", "", "")                \
  X(RankMismatch, "rank-mismatch", "the branches have kernels of different ranks (merge_branches)", "", "")         \
  X(RequantizeSnap, "requantize-snap", "the merged float weight does not quantize back to its integers", "", "")   \
  X(ReshapeMovesFeatures, "reshape-moves-features", "the Flatten / Reshape moves the features off axis 1", "", "")  \
  X(ScaleLayout, "scale-layout", "the weight's quantization scale cannot absorb the BN factors", "", "")           \
  X(ScaleOverflow, "scale-overflow", "the rescaled quantization scale overflows", "", "")                          \
  X(ShapeMismatch, "shape-mismatch", "shapes or channel counts do not fit together", "", "")                       \
  X(SharedBias, "shared-bias", "the layer's dequantized bias is also read elsewhere", "", "")                       \
  X(SharedWeight, "shared-weight", "the layer's weight is also read by another node", "", "")                      \
  X(SnapFailed, "snap-failed", "the rescaled float weight does not quantize back to its integers",                 \
    "materialize_quantized_weights", "--materialize-quantized-weights")                                            \
  X(StrideMismatch, "stride-mismatch", "the branches have different strides (merge_branches)", "", "")             \
  X(TensorrtQuantizer, "tensorrt-quantizer", "the weight comes through a TensorRT custom quantizer it cannot fold", \
    "", "")                                                                                                        \
  X(TrainingForm, "training-form", "the BN has running-statistics outputs (training form)", "", "")                \
  X(TrainingMode, "training-mode", "the BN normalizes with batch statistics (training_mode=1, is_test=0)", "", "") \
  X(TypeMismatch, "type-mismatch", "the branches' weights have different types (merge_branches)", "", "")          \
  X(UnevenTaps, "uneven-taps", "the layer does not give every output position every kernel tap", "", "")          \
  X(UnknownChannels, "unknown-channels", "the channel count of the affine node's input is unknown", "shapes", "")   \
  X(UnknownRank, "unknown-rank", "a rank the fold needs is unknown", "shapes", "")                                 \
  X(UnreadableWeight, "unreadable-weight", "the weight's data cannot be read or does not match its dims", "", "")  \
  X(UnsupportedAttributes, "unsupported-attributes", "the layer's attributes are not supported by the correction", \
    "", "")                                                                                                        \
  X(UnsupportedBias, "unsupported-bias", "the layer's bias has a form the fold does not handle", "", "")           \
  X(UnsupportedDtype, "unsupported-dtype", "the float weight's type is not one the fold computes in", "", "")      \
  X(UnsupportedLayer, "unsupported-layer", "the layer's op or attributes are not one qdqfold folds into", "", "")   \
  X(UnsupportedReshape, "unsupported-reshape", "the Flatten / Reshape before a Gemm/MatMul is not supported", "",   \
    "")                                                                                                            \
  X(UnsupportedWeightType, "unsupported-weight-type", "the quantized weight's type is not supported", "", "")      \
  X(ZeroFactor, "zero-factor", "a zero BN factor or scale: a QuantizeLinear would divide by zero",                 \
    "materialize_quantized_weights", "--materialize-quantized-weights")

// The folds, by the name a report gives them. X(id, code, meaning). An elementwise affine node folded by one
// of the BN folds is reported under that name with "bn" replaced by its op (affine_fold_name): those names
// are listed by reason_table() too.
#define QDQFOLD_FOLD_NAMES(X)                                                                                      \
  X(ConvBn, "conv-bn", "BN folded backwards into the Conv / ConvTranspose with a float weight")                     \
  X(GemmBn, "gemm-bn", "BN folded backwards into the Gemm, MatMul or MatMul + Add with a float weight")             \
  X(MatmulReshapeBn, "matmul-reshape-bn", "BN after MatMul -> Flatten / Reshape folded backwards into the MatMul")   \
  X(ConcatBn, "concat-bn", "BN after Concat folded backwards, slice by slice, into every producing Conv")            \
  X(QdqLayerBn, "qdq-layer-bn", "BN folded backwards into the quantization scale of a layer's Q/DQ weight")         \
  X(BnConv, "bn-conv", "BN folded forwards into the Conv that reads it")                                            \
  X(BnConvtranspose, "bn-convtranspose", "BN folded forwards into the ConvTranspose that reads it")                 \
  X(BnGemm, "bn-gemm", "BN folded forwards into the Gemm that reads it")                                            \
  X(BnMatmul, "bn-matmul", "BN folded forwards into the MatMul that reads it")                                      \
  X(BnLayers, "bn-layers", "BN folded forwards into several layers of different kinds that read it")                \
  X(MergeBranches, "merge-branches", "parallel branches summed over one input merged into one Conv (merge_branches)")

namespace qdqfold::folds {

enum class Reason {
#define QDQFOLD_ENUM(id, ...) id,
  QDQFOLD_KEPT_REASONS(QDQFOLD_ENUM)
#undef QDQFOLD_ENUM
};

enum class FoldName {
#define QDQFOLD_ENUM(id, ...) id,
  QDQFOLD_FOLD_NAMES(QDQFOLD_ENUM)
#undef QDQFOLD_ENUM
};

// The code as reported.
const char* code(Reason reason);
const char* code(FoldName name);

struct ReasonEntry {
  std::string code;
  const char* kind;  // "kept" or "fold"
  std::string meaning;
  const char* option;  // keyword that changes the outcome, or ""
  const char* flag;    // CLI flag for it, or ""
};

// Every code: the kept reasons, then the fold names (with the elementwise affine variants of the BN folds).
const std::vector<ReasonEntry>& reason_table();

// The name of BN fold `bn_fold_name` applied to an elementwise affine node of op `op_type`: every "bn" token
// becomes the lower-case op ("conv-bn" -> "conv-mul", "bn-gemm" -> "add-gemm", "qdq-layer-bn" -> "qdq-layer-sub").
std::string affine_variant_name(const std::string& bn_fold_name, const std::string& op_type);

// True when `code` is a reason that the freeze_initializer_inputs option may change (a value is not a
// constant, possibly because it is an overridable initializer).
bool changed_by_freezing_inputs(const std::string& code);

}  // namespace qdqfold::folds
