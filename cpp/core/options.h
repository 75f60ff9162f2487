// Switches of a fold run. Each one is a keyword argument of qdqfold_native.fold with the same name and
// default; option_switches() below lists them, and python/qdqfold_native.pyi documents them.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace qdqfold {

struct Options {
  // Fold BN into the layer that produces its input (Conv/ConvTranspose/Gemm/MatMul -> BN).
  bool fold_backward = true;
  // Fold BN into the layer(s) that read its output (BN -> Conv/ConvTranspose/Gemm/MatMul), where exact.
  bool fold_forward = true;
  // BN -> padded Conv: fold anyway and add the exact border correction as one constant Add.
  bool pad_correction = false;
  // A per-tensor quantization scale needs DequantizeLinear's `axis` (opset >= 13) to become per-channel:
  // allow raising the model's default-domain opset to 13 for that.
  bool allow_opset_upgrade = false;
  // Negative BN factor on an int8 channel holding -128: use the always-exact complement form
  // (q' = -1 - q, z' = -1 - z), which gives a nonzero zero point.
  bool allow_nonzero_zero_point = false;
  // Float W -> QuantizeLinear -> DequantizeLinear: write the folded weight as integers behind a lone
  // DequantizeLinear (ModelOpt's --dq_only form) instead of a float weight on the quantization grid.
  bool materialize_quantized_weights = false;
  // Conv -> Q -> DQ -> BN: drop that activation quantizer and fold anyway. Not exact; reported approximate.
  bool drop_activation_quantizers = false;
  // Read initializers that are also listed as graph inputs (overridable defaults; Brevitas exports with
  // keep_initializers_as_inputs=True) as constants, and drop the folded ones from the graph inputs. Always so
  // for IR version < 4, where every initializer had to be listed as an input.
  bool freeze_initializer_inputs = false;
  // Also fold Mul / Add / Sub / Div by a per-channel constant (FrozenBatchNorm2d, layer scale) like a BN.
  bool fold_affine = true;
  // Add/Sum/Sub of parallel Conv branches over one input (RepVGG, MobileOne, ACNet, RepMixer), with identity
  // branches x or BN(x): merge into one Conv, exactly (folds/merge_branches.h). Runs after the BN folds.
  bool merge_branches = false;
  // With merge_branches: merge branches with quantized weights too, re-quantizing the merged kernel
  // symmetrically per output channel. Not exact; reported approximate with the largest change.
  bool requantize_merged = false;
  // Static shapes of graph inputs (dims, -1 where unknown) that complete the inputs' declared shapes: the
  // caller fixes the size it will feed. The core infers every other value's shape itself from them
  // (folds/shapes.h); entries for other values are not used, nor is value_info (a claim runtimes do not
  // check). Keyword `shapes` ({name: [dims]}); not a switch, so options() does not list it.
  std::map<std::string, std::vector<int64_t>> shapes;
  // A deployment target run after the folds (targets/onnxruntime.h): "" (none) or "onnxruntime", which gives a
  // layer whose output reaches activation quantizers through ops that commute with rounding those quantizers'
  // Q -> DQ right after it, exactly. Keyword `target` (a str); not a switch, so options() does not list it.
  std::string target;
  // With target: also give a residual Add / Concat's float inputs (a conv's output, a block input) Q -> DQ
  // pairs, so the Add becomes QLinearAdd and the convs feeding it QLinearConv. A new rounding: not exact,
  // reported approximate per Add with its largest step (targets/onnxruntime_residuals.cpp).
  bool requantize_residuals = false;
  // With target: a layer the runtime will still run in float reads its weight as the float32 constant its
  // DequantizeLinear computes (bit for bit), so no DQ runs per inference (targets/onnxruntime_weights.cpp).
  bool store_float_weights = false;
};

// An option a caller named that does not exist, or a value or combination of options that is not taken (the
// Python binding raises it as TypeError).
class OptionError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Every switch of Options: its keyword, the member it sets. One table, so the binding, the error for an
// unknown keyword and qdqfold_native.options() agree. `shapes` is an option but not a switch.
struct OptionSwitch {
  const char* name;
  bool Options::*member;
};
const std::vector<OptionSwitch>& option_switches();

// The switch named `keyword`. Throws OptionError naming every option when there is none.
const OptionSwitch& option_switch(std::string_view keyword);

}  // namespace qdqfold
