// BN -> [Flatten | Reshape to 2-D] -> Gemm / MatMul (fold forwards):
//
//   before:  x [N, C, H, W] -> BatchNormalization(a, t) -> Flatten -> Gemm(B, C_bias; alpha, beta)   -> y
//   after:   x [N, C, H, W] ->                             Flatten -> Gemm(B', C'; alpha, beta' = 1) -> y
//            (MatMul(B) becomes MatMul(B') -> Add(d))
//
// Feature f of the flattened input belongs to channel c = f / HW, HW = K / C (K: the weight's input width):
//   B'[f, o] = B[f, o] * a[f / HW]
//   d[o]     = alpha * sum over f of B[f, o] * t[f / HW]                       (double, rounded once)
//   C'       = beta * C + d  (broadcast to [.., N]), and beta' = 1
// Exact: a Gemm has no padding. A BN read directly by a Gemm (2-D input) is the case HW = 1.

#include "folds/directions/forward/forward.h"
#include "folds/expected.h"
#include "folds/directions/forward/padding_correction.h"

#include "wire/fields.h"
#include "wire/writer.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;

namespace {

// How many input features of the layer belong to each BN channel (HW), or why the layout is not known.
Expected<int64_t> features_per_channel(FoldContext& ctx, int bn, const ForwardReader& reader,
                                                    int64_t channels, int64_t width) {
  Graph& g = ctx.graph;
  const std::string who = describe_node(g, reader.layer);
  const auto shape = activation_shape(ctx, bn, reader);
  if (width % channels != 0)
    return Outcome::kept(Reason::ShapeMismatch, who + " takes " + std::to_string(width) + " input features, not a multiple "
                                               "of BN's " + std::to_string(channels) + " channels");
  const int64_t hw = width / channels;
  std::optional<int64_t> known_hw;  // from the activation's shape, when every spatial dim is known
  if (shape && shape->size() >= 2) {
    int64_t p = 1;
    for (size_t d = 2; d < shape->size() && p > 0; ++d) p = (*shape)[d] < 0 ? -1 : p * (*shape)[d];
    if (p > 0) known_hw = p;
  }
  if (known_hw && *known_hw != hw)
    return Outcome::kept(Reason::ShapeMismatch, "BN's output has " + std::to_string(channels * *known_hw) +
                                               " features per sample but " + who + " takes " + std::to_string(width));
  if (reader.reshape < 0) {
    // Gemm reads a 2-D input by definition; a MatMul must be shown one.
    if (g.nodes()[reader.layer].is("MatMul") && (!shape || shape->size() != 2))
      return Outcome::kept(Reason::UnknownRank, who + " reads BN's output directly and its rank is not known to be 2 "
                                                 "(MatMul would contract its last axis, not the channels)");
    if (hw != 1)
      return Outcome::kept(Reason::ShapeMismatch, who + " takes " + std::to_string(width) + " features, BN has " +
                                                 std::to_string(channels) + " channels");
    return hw;
  }
  const Node& reshape = g.nodes()[reader.reshape];
  const std::string how = describe_node(g, reader.reshape);
  if (reshape.is("Flatten")) {
    int64_t axis = reshape.attr_int("axis", 1);
    if (axis < 0 && shape) axis += static_cast<int64_t>(shape->size());
    if (axis != 1)
      return Outcome::kept(Reason::UnsupportedReshape, how + " flattens from axis " +
                                                      std::to_string(reshape.attr_int("axis", 1)) + ", not 1");
    return hw;
  }
  // Reshape: the rows must stay the samples, [N, C*H*W].
  auto target = reshape.inputs.size() > 1 ? constant_values(g, reshape.inputs[1]) : std::nullopt;
  const bool allow_zero = reshape.attr_int("allowzero", 0) != 0;
  if (!target || target->size() != 2)
    return Outcome::kept(Reason::UnsupportedReshape, how + " does not reshape to a constant 2-D shape");
  const double rows = (*target)[0], cols = (*target)[1];
  if (rows == 0 && cols == -1 && !allow_zero) return hw;  // [0, -1]: keep the batch, flatten the rest
  if (shape && shape->size() >= 2 && (*shape)[0] > 0 && known_hw) {
    const int64_t batch = (*shape)[0], per_sample = channels * *known_hw;
    auto resolve = [&](double v, int64_t copied) { return v == 0 && !allow_zero ? static_cast<double>(copied) : v; };
    double r = resolve(rows, batch), c = resolve(cols, (*shape)[1]);
    if (r == -1 && c > 0) r = static_cast<double>(batch * per_sample) / c;
    if (c == -1 && r > 0) c = static_cast<double>(batch * per_sample) / r;
    if (r == static_cast<double>(batch) && c == static_cast<double>(per_sample)) return hw;
  }
  return Outcome::kept(Reason::UnsupportedReshape, how + " reshapes to [" + std::to_string(static_cast<int64_t>(rows)) +
                                                  ", " + std::to_string(static_cast<int64_t>(cols)) +
                                                  "], which is not known to keep one sample per row");
}

}  // namespace

Expected<LayerPlan> plan_bn_gemm(FoldContext& ctx, int bn, const BatchNormAffine& affine, const ForwardReader& reader) {
  Graph& g = ctx.graph;
  const int layer = reader.layer;
  const std::string who = describe_node(g, layer);
  QDQFOLD_TRY(w, read_forward_weight(ctx, layer));
  const auto channels = static_cast<int64_t>(affine.scale.size());
  QDQFOLD_TRY(hw, features_per_channel(ctx, bn, reader, channels, w.layout.in_channels));
  const bool is_gemm = g.nodes()[layer].is("Gemm");
  const int64_t outputs = w.layout.out_channels;
  const int32_t dtype = w.tensor.data_type;

  // Gemm's C: any shape that broadcasts to [rows, N]: [], [1], [N], [r, 1], [r, N].
  const std::string c_name = is_gemm && g.nodes()[layer].inputs.size() > 2 ? g.nodes()[layer].inputs[2] : "";
  const double alpha = is_gemm ? g.nodes()[layer].attr_float("alpha", 1.0f) : 1.0;
  const double beta = is_gemm ? g.nodes()[layer].attr_float("beta", 1.0f) : 1.0;
  std::vector<double> c_values;
  std::vector<int64_t> c_dims;
  if (!c_name.empty()) {
    if (produced_by_dequantize(g, c_name))
      return Outcome::kept(Reason::QuantizedBias, who + " takes its bias through " + describe_node(g, g.producer(c_name)));
    auto ref = g.constant(c_name);
    auto values = ref ? ref->tensor.values() : std::nullopt;
    if (!values) return Outcome::kept(Reason::NonConstantBias, "the bias '" + c_name + "' of " + who + " is not a constant");
    c_values = std::move(*values);
    c_dims = ref->tensor.dims;
    const int64_t last = c_dims.empty() ? 1 : c_dims.back();
    if (c_dims.size() > 2 || (last != 1 && last != outputs))
      return Outcome::kept(Reason::ShapeMismatch, "the bias '" + c_name + "' of " + who + " has shape " + dims_text(c_dims) +
                                                 ", which does not broadcast to " + std::to_string(outputs) + " outputs");
  }

  QDQFOLD_TRY(scaled, scale_input_features(w, affine.scale, hw));
  LayerPlan plan;
  plan.layer = layer;
  plan.fold_name = is_gemm ? FoldName::BnGemm : FoldName::BnMatmul;
  if (hw > 1) plan.note = "feature f of " + std::to_string(w.layout.in_channels) + " belongs to channel f / " + std::to_string(hw);
  GemmEdit edit;
  edit.data_type = dtype;
  edit.is_gemm = is_gemm;
  edit.beta = beta;
  edit.weight_dims = w.tensor.dims;
  edit.weight = std::move(scaled);
  edit.bias_dims = {outputs};
  std::optional<std::string>& bias_raw = edit.bias;
  std::vector<int64_t>& bias_dims = edit.bias_dims;
  if (!affine.zero_shift()) {
    const auto sums = shift_through_weight(w, affine.shift, hw);
    std::vector<double> bias;
    if (c_values.empty() || beta == 0.0) {
      for (int64_t o = 0; o < outputs; ++o) bias.push_back(alpha * sums[static_cast<size_t>(o)][0]);
    } else {
      const int64_t rows = c_dims.size() == 2 ? c_dims[0] : 1;
      const int64_t cols = c_dims.empty() ? 1 : c_dims.back();
      if (c_dims.size() == 2) bias_dims = {rows, outputs};
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < outputs; ++o)
          bias.push_back(beta * c_values[static_cast<size_t>(r * cols + (cols == 1 ? 0 : o))] +
                         alpha * sums[static_cast<size_t>(o)][0]);
    }
    QDQFOLD_TRY(stored, store_or_keep(dtype, bias, is_gemm ? "bias" : "shift"));
    bias_raw = std::move(stored);
  }
  plan.edit = std::move(edit);
  return plan;
}

void apply_layer_edit(FoldContext& ctx, int layer, const GemmEdit& edit, Outcome& outcome) {
  write_layer_input(ctx, layer, 1, edit.data_type, edit.weight_dims, edit.weight, "", outcome);
  if (!edit.bias) return;
  if (!edit.is_gemm) {
    add_constant_after(ctx, layer, edit.data_type, edit.bias_dims, *edit.bias, "_bn_shift", outcome);
    return;
  }
  write_layer_input(ctx, layer, 2, edit.data_type, edit.bias_dims, *edit.bias,
                    ctx.graph.nodes()[layer].display_name(layer) + "_bias", outcome);
  if (edit.beta != 1.0) ctx.graph.set_float_attribute(layer, "beta", 1.0f);
}

}  // namespace qdqfold::folds
