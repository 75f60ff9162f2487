// merge-branches, plan: the merged weight and bias, in double and rounded once; re-quantized per output
// channel when the kept conv's weight is quantized (requantize_merged), approximately (steps.h).
#include <algorithm>
#include <cmath>

#include "folds/common/values.h"
#include "folds/merge_branches/steps.h"
#include "folds/weights/float_weight.h"
#include "kernels/numeric.h"
#include "kernels/quantized.h"

namespace qdqfold::folds::merge {

using graph::Graph;

namespace {

// W and b of merge_branches.h's formula, in double: [M, C/g, K...] and [M].
void merged_values(const MergePlan& plan, std::vector<double>& w, std::vector<double>& b) {
  const auto& K = plan.kernel;
  const size_t rank = K.size();
  const int64_t M = plan.convs[0].dims[0], Cg = plan.convs[0].dims[1];
  int64_t R = 1;
  for (int64_t k : K) R *= k;
  w.assign(static_cast<size_t>(M * Cg * R), 0.0);
  b.assign(static_cast<size_t>(M), 0.0);
  for (const auto& c : plan.convs) {
    const auto& k = c.geometry.kernel;
    int64_t r_small = 1;
    for (int64_t v : k) r_small *= v;
    // Merged-kernel linear index of each of this conv's taps.
    std::vector<int64_t> target(static_cast<size_t>(r_small));
    for (int64_t r = 0; r < r_small; ++r) {
      int64_t rest = r, t = 0, stride = 1;
      std::vector<int64_t> idx(rank);
      for (size_t d = rank; d-- > 0;) { idx[d] = rest % k[d]; rest /= k[d]; }
      for (size_t d = rank; d-- > 0;) { t += (idx[d] + c.offset[d]) * stride; stride *= K[d]; }
      target[r] = t;
    }
    for (int64_t oq = 0; oq < M * Cg; ++oq)
      for (int64_t r = 0; r < r_small; ++r)
        w[oq * R + target[r]] += c.sign * c.values[oq * r_small + r];
    for (int64_t o = 0; o < M; ++o) b[o] += c.sign * c.bias[o];
  }
  int64_t centre_index = 0;
  for (size_t d = 0; d < rank; ++d) centre_index = centre_index * K[d] + plan.centre[d];
  for (const auto& id : plan.identities)
    for (int64_t o = 0; o < M; ++o) {
      w[(o * Cg + o % Cg) * R + centre_index] += id.sign * (id.bn >= 0 ? id.scale[o] : 1.0);
      if (id.bn >= 0) b[o] += id.sign * id.shift[o];
    }
}

// requantize_merged: symmetric per output channel, s'[o] = max |W[o]| / q_max, q = round(W / s'), z = 0.
std::optional<Outcome> requantize(const Graph& g, MergePlan& plan, const std::vector<double>& w) {
  const ConvBranch& keep = plan.convs[plan.primary];
  const QuantizedWeight& pq = *keep.quantized;
  if (!pq.axis_supported || pq.layout.block_size > 0)
    return Outcome::kept(Reason::QuantizedWeightAxis, describe_node(g, keep.node) + "'s DequantizeLinear " +
                                                      (pq.layout.block_size > 0 ? "is blocked" : "has no axis (opset < 13)") +
                                                      ": the merged weight needs a scale per output channel");
  const int64_t M = plan.weight_dims[0];
  const int64_t qmax = pq.range.hi;
  int64_t per_channel = 1;  // C/g * prod(K)
  for (size_t d = 1; d < plan.weight_dims.size(); ++d) per_channel *= plan.weight_dims[d];
  plan.new_scale.assign(static_cast<size_t>(M), 1.0);
  plan.ints.assign(w.size(), 0);
  std::vector<double> snapped(w.size());
  for (int64_t o = 0; o < M; ++o) {
    double largest = 0;
    for (int64_t i = o * per_channel; i < (o + 1) * per_channel; ++i) largest = std::max(largest, std::abs(w[i]));
    double scale = largest > 0 ? kernels::round_to_float_type(largest / static_cast<double>(qmax), pq.scale_type) : 1.0;
    if (!(scale > 0) || !std::isfinite(scale))
      return Outcome::kept(Reason::Overflow, "the merged weight of output channel " + std::to_string(o) + " has no " +
                                           graph::data_type_name(pq.scale_type) + " scale");
    plan.new_scale[o] = scale;
    for (int64_t i = o * per_channel; i < (o + 1) * per_channel; ++i) {
      const int64_t q = std::clamp<int64_t>(static_cast<int64_t>(std::nearbyint(w[i] / scale)), -qmax, qmax);
      plan.ints[i] = q;
      snapped[i] = static_cast<double>(q) * scale;
      plan.max_change = std::max(plan.max_change, std::abs(snapped[i] - w[i]) / scale);
    }
  }
  if (pq.qat()) {  // W' on the new grid: the QuantizeLinear that stays gives back exactly these integers
    QDQFOLD_TRY(weight_raw, store_or_keep(pq.float_type, snapped, "merged weight"));
    plan.weight_raw = std::move(weight_raw);
    for (size_t i = 0; i < w.size(); ++i) {
      const double stored = graph::float_element(pq.float_type, plan.weight_raw, i);
      if (kernels::quantize_element(static_cast<float>(stored), static_cast<float>(plan.new_scale[i / per_channel]), 0,
                                    pq.range) != plan.ints[i])
        return Outcome::kept(Reason::RequantizeSnap, "the merged float weight does not quantize back to its integers");
    }
  } else {
    plan.weight_raw = kernels::write_quantized(plan.ints, pq.int_type);
  }
  return std::nullopt;
}

}  // namespace

std::optional<Outcome> plan_merged_weight(FoldContext& ctx, MergePlan& plan) {
  std::vector<double> w, b;
  merged_values(plan, w, b);
  const auto& K = plan.kernel;
  for (size_t i = 0; i < plan.convs.size(); ++i)
    if (plan.convs[i].geometry.kernel == K) { plan.primary = static_cast<int>(i); break; }
  plan.weight_dims = {plan.convs[0].dims[0], plan.convs[0].dims[1]};
  plan.weight_dims.insert(plan.weight_dims.end(), K.begin(), K.end());
  QDQFOLD_TRY(bias_raw, store_or_keep(plan.data_type, b, "merged bias"));
  plan.bias_raw = std::move(bias_raw);
  if (plan.convs[plan.primary].quantized) return requantize(ctx.graph, plan, w);
  QDQFOLD_TRY(weight_raw, store_or_keep(plan.data_type, w, "merged weight"));
  plan.weight_raw = std::move(weight_raw);
  return std::nullopt;
}

}  // namespace qdqfold::folds::merge
