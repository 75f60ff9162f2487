#include "folds/weights/float_weight.h"

#include <algorithm>

#include "folds/sources/batchnorm.h"
#include "kernels/per_channel.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;

bool produced_by_dequantize(const Graph& g, const std::string& value) {
  const int p = g.producer(value);
  return p >= 0 && g.nodes()[p].is("DequantizeLinear");
}

Expected<FloatWeight> read_float_weight(FoldContext& ctx, int layer, bool backward_fold) {
  Graph& g = ctx.graph;
  const Node& n = g.nodes()[layer];
  const std::string who = n.op_type + " '" + n.display_name(layer) + "'";
  if (n.inputs.size() < 2 || n.inputs[1].empty())
    return Outcome::kept(Reason::Malformed, who + " has no weight input");
  const std::string& name = n.inputs[1];
  if (produced_by_dequantize(g, name)) return Outcome::not_applicable();
  auto ref = g.constant(name);
  if (const int p = g.producer(name); !ref && p >= 0 && g.nodes()[p].domain == "trt") {
    // ModelOpt's FP8 export for TensorRT: trt::TRT_FP8QuantizeLinear -> trt::TRT_FP8DequantizeLinear (one
    // per-tensor scale, no axis). trt::DequantizeLinear of a float weight (INT4) is qdq_layer_bn's.
    const std::string op = "trt::" + g.nodes()[p].op_type;
    if (g.nodes()[p].op_type == "TRT_FP8DequantizeLinear")
      return Outcome::kept(Reason::TensorrtQuantizer,
                           "the weight '" + name + "' of " + who + " comes out of TensorRT's " + op +
                               ", which takes one per-tensor scale and has no axis: BN's per-channel factors cannot "
                               "go into it, and re-quantizing the FP8 weight would not be exact");
    return Outcome::kept(Reason::TensorrtQuantizer, "the weight '" + name + "' of " + who + " comes out of TensorRT's "
                                               "custom " + op + ", which qdqfold does not fold through; the "
                                               "standard QuantizeLinear / DequantizeLinear export folds");
  }
  if (!ref)
    return Outcome::kept(Reason::NonConstantWeight, "the weight '" + name + "' of " + who + " is not a constant");
  FloatWeight w;
  w.tensor = ref->tensor;
  if (!kernels::is_supported_float(w.tensor.data_type))
    return Outcome::kept(Reason::UnsupportedDtype, "the weight '" + name + "' of " + who + " is " +
                                                  graph::data_type_name(w.tensor.data_type) +
                                                  ", not float32, float16, bfloat16 or float64");
  std::string why;
  auto layout = weight_layout(n, w.tensor.dims, why, backward_fold);
  if (!layout) return Outcome::kept(Reason::UnsupportedLayer, who + ": " + why);
  w.layout = *layout;
  w.storage = std::make_shared<std::string>();
  auto bytes = w.tensor.bytes(*w.storage);
  if (!bytes)
    return Outcome::kept(Reason::UnreadableWeight, "the data of weight '" + name + "' of " + who +
                                                  " is not in the model file (external data) or cannot be decoded");
  w.bytes = *bytes;
  return w;
}

Expected<std::vector<double>> read_bias(Graph& g, const std::string& value, int64_t count,
                                                     const char* what) {
  if (value.empty()) return std::vector<double>(static_cast<size_t>(count), 0.0);
  auto values = constant_values(g, value);
  if (!values) return Outcome::kept(Reason::NonConstantBias, std::string("the ") + what + " '" + value + "' is not a constant");
  if (static_cast<int64_t>(values->size()) != count)
    return Outcome::kept(Reason::ShapeMismatch, std::string("the ") + what + " '" + value + "' has " +
                                               std::to_string(values->size()) + " values for " +
                                               std::to_string(count) + " output channels");
  return std::move(*values);
}

// The read-only overflow check of W * scale, in slices of at most 64 MB whose pages are given back as it
// goes: a weight in a mapped file is never resident all at once.
static kernels::AffineResult check_rescale(const FoldHooks* hooks, int32_t dtype, std::string_view bytes,
                                           const kernels::ChannelAxis& axis, const std::vector<double>& scale) {
  const int64_t count = axis.element_count();
  char* const no_output = nullptr;  // check only
  if (count <= 0 || !hooks || !hooks->release_pages) return kernels::affine_channels(dtype, bytes, axis, scale.data(), nullptr, no_output);
  const size_t element = bytes.size() / static_cast<size_t>(count);
  const int64_t slice = std::max<int64_t>(1, static_cast<int64_t>((size_t(64) << 20) / std::max<size_t>(element, 1)));
  kernels::AffineResult total;
  total.ok = true;
  for (int64_t first = 0; first < count && total.ok; first += slice) {
    const int64_t last = std::min(count, first + slice);
    auto r = kernels::affine_channels(dtype, bytes, axis, scale.data(), nullptr, no_output, first, last);
    if (r.overflowed && total.overflowed == 0) total.first_overflow_channel = r.first_overflow_channel;
    total.overflowed += r.overflowed;
    total.ok = r.ok;
    hooks->release_pages(bytes.substr(static_cast<size_t>(first) * element, static_cast<size_t>(last - first) * element));
  }
  return total;
}

Expected<graph::LazyBytes> rescale_weight(FoldContext& ctx, const FloatWeight& w,
                                                       const std::vector<double>& scale) {
  const auto axis = w.layout.output_axis();
  if (axis.channel_count() != static_cast<int64_t>(scale.size()))
    return Outcome::kept(Reason::ShapeMismatch, "the BN has " + std::to_string(scale.size()) + " channels but the layer has " +
                                               std::to_string(axis.channel_count()) + " output channels");
  const int32_t dtype = w.tensor.data_type;
  // Deferred: the generator counts overflows as it writes (one pass over the weight instead of two).
  const auto deferred = ctx.deferred_checks();
  if (!deferred) {
    auto r = check_rescale(ctx.hooks, dtype, w.bytes, axis, scale);
    if (!r.ok) return Outcome::kept(Reason::UnreadableWeight, "the weight '" + w.tensor.name + "' does not match its dims");
    if (r.overflowed)
      return Outcome::kept(Reason::Overflow, std::to_string(r.overflowed) + " weight values of channel " +
                                           std::to_string(r.first_overflow_channel) + " and beyond would overflow " +
                                           graph::data_type_name(dtype) + " once scaled");
  } else if (w.bytes.size() != static_cast<size_t>(axis.element_count()) * graph::element_size(dtype)) {
    return Outcome::kept(Reason::UnreadableWeight, "the weight '" + w.tensor.name + "' does not match its dims");
  }
  // The source must outlive the fold (graph::PinnedBytes): the model's buffer and mapped external data do;
  // anything else (decoded typed data, a tensor another fold wrote and may replace again) is kept alive by it.
  const graph::PinnedBytes src = ctx.model.pin(w.bytes, w.storage);
  graph::LazyBytes data;
  data.size = src.size();
  data.fill = [src, dtype, axis, scale, deferred](char* dst) {
    auto r = kernels::affine_channels(dtype, src.view(), axis, scale.data(), nullptr, dst);
    if (deferred && r.overflowed) deferred->fail();
  };
  // Chunks are cut on element boundaries by the file writer's chunk size (a multiple of every element size).
  const size_t element = src.size() / static_cast<size_t>(std::max<int64_t>(axis.element_count(), 1));
  data.fill_range = [src, dtype, axis, scale, element, deferred](char* dst, size_t begin, size_t end) {
    auto r = kernels::affine_channels(dtype, src.view(), axis, scale.data(), nullptr, dst,
                                      static_cast<int64_t>(begin / element), static_cast<int64_t>(end / element));
    if (deferred && r.overflowed) deferred->fail();
  };
  return data;
}

Expected<std::string> store_or_keep(int32_t data_type, const std::vector<double>& values, const char* what) {
  auto raw = kernels::store_values(data_type, values);
  if (!raw)
    return Outcome::kept(Reason::Overflow, std::string("the folded ") + what + " does not fit in " +
                                         graph::data_type_name(data_type));
  return std::move(*raw);
}

Expected<FoldedBias> fold_bias(const std::optional<std::vector<int64_t>>& dims,
                                            const std::vector<double>& values, const std::vector<double>& factor,
                                            const std::vector<double>& shift, const std::string& what) {
  const auto features = static_cast<int64_t>(shift.size());
  FoldedBias out;
  if (!dims) {
    out.dims = {features};
    out.values = shift;
    return out;
  }
  const auto rank = dims->size();
  const int64_t last = rank == 0 ? 1 : dims->back();
  const int64_t rows = rank == 2 ? (*dims)[0] : 1;
  if (rank > 2 || (last != 1 && last != features) || static_cast<int64_t>(values.size()) != rows * last)
    return Outcome::kept(Reason::ShapeMismatch, what + " does not broadcast against the " + std::to_string(features) +
                                               " output features");
  out.dims = rank == 2 ? std::vector<int64_t>{rows, features} : std::vector<int64_t>{features};
  out.values.resize(static_cast<size_t>(rows * features));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < features; ++j)
      out.values[i * features + j] = factor[j] * values[i * last + (last == 1 ? 0 : j)] + shift[j];
  return out;
}

std::vector<std::vector<double>> shift_through_weight(const FloatWeight& w, const std::vector<double>& shift,
                                                      int64_t features_per_channel) {
  const WeightLayout& l = w.layout;
  std::vector<std::vector<double>> sums(static_cast<size_t>(l.out_channels),
                                        std::vector<double>(static_cast<size_t>(l.R), 0.0));
  for (int64_t p = 0; p < l.P; ++p)
    for (int64_t q = 0; q < l.Q; ++q) {
      const double t = shift[static_cast<size_t>(l.input_of(p, q) / features_per_channel)];
      if (t == 0.0) continue;
      auto& row = sums[static_cast<size_t>(l.output_of(p, q))];
      const size_t base = static_cast<size_t>((p * l.Q + q) * l.R);
      for (int64_t r = 0; r < l.R; ++r)
        row[static_cast<size_t>(r)] += graph::float_element(w.tensor.data_type, w.bytes, base + static_cast<size_t>(r)) * t;
    }
  return sums;
}

Expected<std::string> scale_input_features(const FloatWeight& w, const std::vector<double>& scale,
                                                        int64_t features_per_channel) {
  const WeightLayout& l = w.layout;
  kernels::ChannelAxis axis = l.input_axis();
  if (features_per_channel != 1) {  // Gemm/MatMul after a Flatten: feature f = c * HW + p (groups == 1)
    const int64_t channels = l.in_channels / features_per_channel;
    axis = l.p_is_output ? kernels::ChannelAxis{1, l.P, channels, features_per_channel}
                         : kernels::ChannelAxis{1, 1, channels, features_per_channel * l.Q};
  }
  // A read-only check pass first (it counts overflows), then the write.
  auto r = kernels::affine_channels(w.tensor.data_type, w.bytes, axis, scale.data(), nullptr, static_cast<char*>(nullptr));
  if (!r.ok) return Outcome::kept(Reason::UnreadableWeight, "the weight '" + w.tensor.name + "' does not match its dims");
  if (r.overflowed)
    return Outcome::kept(Reason::Overflow, std::to_string(r.overflowed) + " values of weight '" + w.tensor.name +
                                         "' would overflow " + graph::data_type_name(w.tensor.data_type) +
                                         " once scaled by BN's factor");
  std::string out;
  kernels::scale_channels(w.tensor.data_type, w.bytes, axis, scale, out);
  return out;
}

}  // namespace qdqfold::folds
