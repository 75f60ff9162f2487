// BN -> Conv / ConvTranspose (fold forwards), any rank, any group:
//
//   before:  x -> BatchNormalization(a, t) -> Conv(W, b)              -> y
//   after:   x ->                             Conv(W', b') [-> Add(C)] -> y
//
//   W'[o, c, k] = W[o, c, k] * a[c]        (c: input channel, through o's group; ConvTranspose: W[c, o, k])
//   b'[o]       = b[o] + sum over c, k of W[o, c, k] * t[c]                   (double, rounded once)
//
// Exact when every output position receives every kernel tap: a Conv without zero padding, a stride-1
// ConvTranspose whose pads crop the kernel's reach, or t == 0. Otherwise BN's shift becomes a map that
// differs from the interior constant at the borders (padding_correction.h); with pad_correction it is
// added by one Add of a constant [1, M, out...] tensor, else BN is kept ("padding" / "uneven-taps").
#include <cmath>

#include "folds/directions/forward/forward.h"
#include "folds/expected.h"
#include "folds/directions/forward/padding_correction.h"

namespace qdqfold::folds {

using graph::Graph;

namespace {

// Correction maps beyond this many elements are not worth a constant in the model.
constexpr int64_t kMaxCorrectionElements = int64_t{1} << 26;

// Spatial dims of the layer's input when every one is known.
std::optional<std::vector<int64_t>> spatial_input(const std::optional<std::vector<int64_t>>& shape, size_t rank) {
  if (!shape || shape->size() != rank + 2) return std::nullopt;
  std::vector<int64_t> spatial(shape->begin() + 2, shape->end());
  for (int64_t d : spatial)
    if (d < 1) return std::nullopt;
  return spatial;
}

}  // namespace

Expected<LayerPlan> plan_bn_conv(FoldContext& ctx, int bn, const BatchNormAffine& affine, const ForwardReader& reader) {
  Graph& g = ctx.graph;
  const int layer = reader.layer;
  const std::string who = describe_node(g, layer);
  QDQFOLD_TRY(w, read_forward_weight(ctx, layer));
  const auto channels = static_cast<int64_t>(affine.scale.size());
  if (w.layout.in_channels != channels)
    return Outcome::kept(Reason::ShapeMismatch, who + " has " + std::to_string(w.layout.in_channels) +
                                               " input channels but BN has " + std::to_string(channels));
  QDQFOLD_TRY(geo, read_conv_geometry(g.nodes()[layer], w.tensor.dims));
  const std::string bias_name = g.nodes()[layer].inputs.size() > 2 ? g.nodes()[layer].inputs[2] : "";
  if (!bias_name.empty() && produced_by_dequantize(g, bias_name))
    return Outcome::kept(Reason::QuantizedBias, who + " takes its bias through " + describe_node(g, g.producer(bias_name)));
  QDQFOLD_TRY(bias_values, read_bias(g, bias_name, w.layout.out_channels, "bias"));

  // Does BN's shift reach every output position as the same constant?
  const bool shifted = !affine.zero_shift();
  std::optional<TapMap> map;
  bool uniform = !shifted || every_position_gets_every_tap(geo);
  const auto shape = activation_shape(ctx, bn, reader);
  const auto spatial = spatial_input(shape, geo.rank());
  if (!uniform && spatial) {
    QDQFOLD_TRY(m, tap_map(geo, *spatial, g.nodes()[layer].display_name(layer)));
    map = std::move(m);
    uniform = map->uniform;  // e.g. end pads that no window reaches
  }
  if (!uniform && !ctx.options.pad_correction) {
    if (geo.transposed)
      return Outcome::kept(Reason::UnevenTaps, who + " (" + geo.describe() + ") does not give every output position "
                                           "every kernel tap, so BN's shift would become a position-dependent map, "
                                           "not a bias; the option pad_correction=True folds it exactly with one "
                                           "constant correction Add").at_(g.nodes()[layer].display_name(layer));
    return Outcome::kept(Reason::Padding, who + " pads its input (" + geo.describe() + ") and BN's shift is nonzero: "
                                    "after folding, the padded zeros would act as BN's shift t instead of 0; "
                                    "the option pad_correction=True folds it exactly with one constant "
                                    "border-correction Add").at_(g.nodes()[layer].display_name(layer));
  }
  if (!uniform && !map)
    return Outcome::kept(Reason::DynamicShape, "pad_correction needs the static spatial size of the input of " + who +
                                              " to build its correction map, and the size it can infer from the graph "
                                              "inputs' declared shapes is " +
                                              (shape ? dims_text(*shape) : std::string("unknown")) +
                                              " (value_info is a claim, not checked by runtimes, so not used)").at_(g.nodes()[layer].display_name(layer));

  // The numbers.
  const int32_t dtype = w.tensor.data_type;
  QDQFOLD_TRY(scaled, scale_input_features(w, affine.scale, 1));
  LayerPlan plan;
  plan.layer = layer;
  plan.fold_name = geo.transposed ? FoldName::BnConvtranspose : FoldName::BnConv;
  ConvEdit edit;
  edit.data_type = dtype;
  edit.weight_dims = w.tensor.dims;
  edit.out_channels = w.layout.out_channels;
  edit.weight = std::move(scaled);
  std::optional<std::string>& bias_raw = edit.bias;
  std::optional<std::string>& correction_raw = edit.correction;
  std::vector<int64_t>& correction_dims = edit.correction_dims;
  if (shifted) {
    const auto sums = shift_through_weight(w, affine.shift, 1);
    std::vector<double> bias = bias_values;
    for (size_t o = 0; o < bias.size(); ++o)
      for (double v : sums[o]) bias[o] += v;
    QDQFOLD_TRY(stored, store_or_keep(dtype, bias, "bias"));
    bias_raw = std::move(stored);
    if (!uniform) {
      correction_dims = {1, w.layout.out_channels};
      int64_t elements = w.layout.out_channels;
      for (int64_t d : map->output_dims) {
        correction_dims.push_back(d);
        elements *= d;
      }
      if (elements > kMaxCorrectionElements)
        return Outcome::kept(Reason::CorrectionTooLarge, "the border correction of " + who + " would be a constant of " +
                                                         std::to_string(elements) + " elements");
      const auto correction = border_correction(*map, geo.kernel, sums);
      double largest = 0.0;
      for (double v : correction) largest = std::max(largest, std::fabs(v));
      QDQFOLD_TRY(c, store_or_keep(dtype, correction, "border correction"));
      correction_raw = std::move(c);
      plan.metrics = {{"max_abs_correction", largest}, {"correction_elements", static_cast<double>(elements)}};
      plan.note = "border correction added as a constant " + dims_text(correction_dims) + " (max |C| = " +
                  std::to_string(largest) + ")";
    }
  }
  plan.edit = std::move(edit);
  return plan;
}

void apply_layer_edit(FoldContext& ctx, int layer, const ConvEdit& edit, Outcome& outcome) {
  write_layer_input(ctx, layer, 1, edit.data_type, edit.weight_dims, edit.weight, "", outcome);
  if (edit.bias)
    write_layer_input(ctx, layer, 2, edit.data_type, {edit.out_channels}, *edit.bias,
                      ctx.graph.nodes()[layer].display_name(layer) + "_bias", outcome);
  if (edit.correction)
    add_constant_after(ctx, layer, edit.data_type, edit.correction_dims, *edit.correction, "_bn_border_correction",
                       outcome);
}

}  // namespace qdqfold::folds
