// merge-branches: see merge_branches.h for the graph and the formula.
#include "folds/merge_branches.h"

#include "folds/expected.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <variant>

#include "kernels/numeric.h"
#include "folds/directions/backward/backward.h"
#include "folds/directions/forward/forward.h"
#include "folds/directions/forward/padding_correction.h"
#include "folds/weights/quantized_weight.h"

namespace qdqfold::folds {

using graph::Graph;
using graph::Node;
using wire::DataType;

namespace {

bool is_sum_node(const Node& n) { return !n.removed() && (n.is("Add") || n.is("Sum") || n.is("Sub")); }

// ---------------------------------------------------------------- select

struct Term {
  std::string value;
  int sign = 1;
  int reader = -1;  // the tree node that reads it
};

struct Branch {
  enum class Kind { Conv, BatchNorm, Identity } kind;
  std::string value;
  int sign = 1;
  int node = -1;  // the Conv or the BN (-1 for x itself)
};

struct BranchSet {
  std::vector<int> tree;  // the Add/Sum/Sub nodes, root first
  std::string x;
  std::vector<Branch> branches;
};

// The terms under `node` with their signs: a term made by another Add/Sum/Sub read only here is expanded.
void collect_terms(const Graph& g, int node, int sign, std::vector<int>& tree, std::vector<Term>& terms) {
  tree.push_back(node);
  const Node& n = g.nodes()[node];
  for (size_t s = 0; s < n.inputs.size(); ++s) {
    const std::string& v = n.inputs[s];
    const int term_sign = n.is("Sub") && s == 1 ? -sign : sign;
    const int p = v.empty() ? -1 : g.producer(v);
    if (p >= 0 && is_sum_node(g.nodes()[p]) && read_only_by(g, v, node)) collect_terms(g, p, term_sign, tree, terms);
    else terms.push_back({v, term_sign, node});
  }
}

// The tensor a term reads when it is a branch form (Conv or BN output: their input; anything else: itself).
std::string branch_input(const Graph& g, const std::string& v) {
  const int p = v.empty() ? -1 : g.producer(v);
  if (p >= 0 && (g.nodes()[p].is("Conv") || g.nodes()[p].is("BatchNormalization")) && !g.nodes()[p].inputs.empty())
    return g.nodes()[p].inputs[0];
  return v;
}

// `identity_bns`: the BNs among the terms that read x, filled as soon as x is known (a kept sum names them too).
std::variant<BranchSet, Outcome> find_branches(const Graph& g, int root, std::vector<int>& identity_bns) {
  BranchSet set;
  std::vector<Term> terms;
  collect_terms(g, root, 1, set.tree, terms);
  // x: the input of the first Conv term that at least one other term shares.
  for (const auto& t : terms) {
    const int p = t.value.empty() ? -1 : g.producer(t.value);
    if (p < 0 || !g.nodes()[p].is("Conv") || g.nodes()[p].inputs.empty()) continue;
    const std::string x = g.nodes()[p].inputs[0];
    int sharing = 0;
    for (const auto& u : terms) sharing += branch_input(g, u.value) == x;
    if (sharing >= 2) { set.x = x; break; }
  }
  if (set.x.empty()) return Outcome::not_applicable();
  for (const auto& t : terms) {
    const int p = t.value.empty() ? -1 : g.producer(t.value);
    if (p >= 0 && g.nodes()[p].is("BatchNormalization") && branch_input(g, t.value) == set.x &&
        read_only_by(g, t.value, t.reader))
      identity_bns.push_back(p);
  }
  for (const auto& t : terms) {
    Branch b{Branch::Kind::Identity, t.value, t.sign, -1};
    if (t.value != set.x) {
      const int p = t.value.empty() ? -1 : g.producer(t.value);
      if (p < 0 || !(g.nodes()[p].is("Conv") || g.nodes()[p].is("BatchNormalization")))
        return Outcome::kept(Reason::NotABranch, "term '" + t.value + "' of the sum is " +
                                                 (p < 0 ? std::string("not made by a node (a constant or an input)")
                                                        : "made by " + describe_node(g, p)) +
                                                 ", not by a Conv or a BatchNormalization reading '" + set.x + "'");
      if (branch_input(g, t.value) != set.x)
        return Outcome::kept(Reason::DifferentInput, describe_node(g, p) + " reads '" + branch_input(g, t.value) +
                                                    "', not '" + set.x + "' that the other branches read");
      if (!read_only_by(g, t.value, t.reader))
        return Outcome::kept(Reason::BranchOutputShared, "the output '" + t.value + "' of " + describe_node(g, p) +
                                                         " is also read elsewhere (or is a graph output), which "
                                                         "needs that branch on its own");
      b.kind = g.nodes()[p].is("Conv") ? Branch::Kind::Conv : Branch::Kind::BatchNorm;
      b.node = p;
    }
    set.branches.push_back(b);
  }
  return set;
}

// ---------------------------------------------------------------- plan


struct ConvBranch {
  int node = -1;
  int sign = 1;
  std::vector<int64_t> dims;  // weight dims [M, C/g, k...]
  int32_t data_type = 0;      // the float type the conv computes in
  int64_t groups = 1;
  std::vector<double> values;  // the weight the conv sees (dequantized when quantized)
  std::optional<QuantizedWeight> quantized;
  ConvGeometry geometry;
  std::vector<double> bias;
  std::vector<int64_t> offset;  // per spatial dim: where the kernel starts in the merged kernel
};

struct IdentityBranch {
  int bn = -1;  // -1: x itself
  int sign = 1;
  std::vector<double> scale, shift;
  std::vector<std::string> parameters;
};

struct MergePlan {
  std::vector<ConvBranch> convs;
  std::vector<IdentityBranch> identities;
  int primary = 0;  // index into convs: the conv that stays
  int32_t data_type = 0;
  std::vector<int64_t> weight_dims;  // [M, C/g, K...]
  std::vector<int64_t> pads_begin, pads_end, dilations;
  std::string weight_raw, bias_raw;
  // requantize_merged: the merged weight's integers and per-output-channel scale, and the largest distance
  // of the re-quantized weight from the merged one, in units of the new scale.
  std::vector<int64_t> ints;
  std::vector<double> new_scale;
  double max_change = 0;
};

// The weight a quantized conv sees: (q - z) * s, q = QuantizeLinear(W) in the QAT form. nullopt for types
// the merge does not re-quantize (float8, packed 4-bit).
std::optional<std::vector<double>> dequantized_values(QuantizedWeight& w) {
  if (w.float8() || graph::is_packed_4bit(w.int_type)) return std::nullopt;
  w.layout.prepare(w.dims);
  std::vector<double> out(static_cast<size_t>(w.count));
  std::optional<std::vector<int64_t>> ints;
  if (!w.qat()) {
    ints = kernels::read_quantized(w.data.view(), w.int_type, w.count);
    if (!ints) return std::nullopt;
  }
  for (int64_t i = 0; i < w.count; ++i) {
    const int64_t k = w.layout.scale_index(i);
    const double s = w.scale[k];
    const int64_t z = w.zero[k];
    const int64_t q = w.qat() ? kernels::quantize_element(static_cast<float>(graph::float_element(w.float_type, w.data.view(), i)),
                                                          static_cast<float>(s), z, w.range)
                              : (*ints)[i];
    out[i] = static_cast<double>(q - z) * s;
  }
  return out;
}

// Reads conv `node`'s weight: float, or (requantize_merged) quantized.
std::variant<ConvBranch, Outcome> read_branch_weight(FoldContext& ctx, int node) {
  Graph& g = ctx.graph;
  ConvBranch c;
  c.node = node;
  auto w = read_float_weight(ctx, node);
  if (auto* fw = std::get_if<FloatWeight>(&w)) {
    c.dims = fw->tensor.dims;
    c.data_type = fw->tensor.data_type;
    c.groups = fw->layout.groups;
    c.values.resize(static_cast<size_t>(fw->tensor.count));
    for (int64_t i = 0; i < fw->tensor.count; ++i) c.values[i] = graph::float_element(c.data_type, fw->bytes, i);
    return c;
  }
  Outcome& o = std::get<Outcome>(w);
  if (o.verdict != Verdict::NotApplicable) return Outcome::kept_as(o, describe_node(g, node) + ": " + o.message);
  if (!ctx.options.requantize_merged)
    return Outcome::kept(Reason::QuantizedWeight,
                         describe_node(g, node) + " has a quantized weight (DequantizeLinear): the merged kernel "
                         "needs new integers on a new grid, which no exact merge gives (requantize_merged=True "
                         "re-quantizes, approximately)");
  const std::string& weight = g.nodes()[node].inputs[1];
  auto qw = read_quantized_weight(g, g.producer(weight), node);
  if (auto* qo = std::get_if<Outcome>(&qw)) {
    if (qo->verdict == Verdict::NotApplicable) return Outcome::kept(Reason::NonConstantWeight, describe_node(g, node) + " has no constant weight");
    return Outcome::kept_as(*qo, describe_node(g, node) + ": " + qo->message);
  }
  QuantizedWeight& q = std::get<QuantizedWeight>(qw);
  std::string why;
  auto layout = weight_layout(g.nodes()[node], q.dims, why);
  if (!layout) return Outcome::kept(Reason::Malformed, describe_node(g, node) + ": " + why);
  auto values = dequantized_values(q);
  if (!values || q.range.lo >= 0 || q.range.hi > 32767)
    return Outcome::kept(Reason::QuantizedWeightType, describe_node(g, node) + " has a weight of " +
                                                      graph::data_type_name(q.int_type) +
                                                      ": the merge re-quantizes to int8 or int16 only");
  c.dims = q.dims;
  c.data_type = q.qat() ? q.float_type : q.scale_type;
  c.groups = layout->groups;
  c.values = std::move(*values);
  c.quantized = std::move(q);
  return c;
}

std::string kernel_text(const std::vector<int64_t>& k) {
  std::string s;
  for (size_t d = 0; d < k.size(); ++d) s += (d ? "x" : "") + std::to_string(k[d]);
  return s;
}

std::variant<MergePlan, Outcome> plan_merge(FoldContext& ctx, const BranchSet& set) {
  Graph& g = ctx.graph;
  MergePlan plan;
  for (const auto& b : set.branches) {
    if (b.kind == Branch::Kind::Conv) {
      const Node& conv = g.nodes()[b.node];
      if (conv.outputs.size() != 1) return Outcome::kept(Reason::Malformed, describe_node(g, b.node) + " has more than one output");
      QDQFOLD_TRY(w, read_branch_weight(ctx, b.node));
      ConvBranch c = std::move(w);
      c.sign = b.sign;
      QDQFOLD_TRY(geometry, read_conv_geometry(conv, c.dims));
      c.geometry = geometry;
      if (c.geometry.auto_pad == "SAME_UPPER" || c.geometry.auto_pad == "SAME_LOWER")
        return Outcome::kept(Reason::AutoPad, describe_node(g, b.node) + " pads with auto_pad=" + c.geometry.auto_pad +
                                             ", whose pads depend on the input size");
      const std::string bias_name = conv.inputs.size() > 2 ? conv.inputs[2] : "";
      if (!bias_name.empty() && produced_by_dequantize(g, bias_name))
        return Outcome::kept(Reason::QuantizedBias, describe_node(g, b.node) + " has a quantized bias, whose scale is the "
                                                                          "input's times the weight's");
      QDQFOLD_TRY(bias, read_bias(g, bias_name, c.dims[0], "bias"));
      c.bias = bias;
      plan.convs.push_back(std::move(c));
    } else {
      IdentityBranch id;
      id.bn = b.node;
      id.sign = b.sign;
      if (b.node >= 0) {
        QDQFOLD_TRY(a, read_batchnorm(ctx, b.node));
        id.scale = a.scale;
        id.shift = a.shift;
        id.parameters = a.parameter_values;
      }
      plan.identities.push_back(std::move(id));
    }
  }

  // Every conv must see x the same way.
  const ConvBranch& first = plan.convs[0];
  const auto& d0 = first.dims;
  const size_t rank = first.geometry.rank();
  const int64_t groups = first.groups;
  plan.data_type = first.data_type;
  std::vector<int64_t> K(rank, 0);
  for (const auto& c : plan.convs) {
    const std::string who = describe_node(g, c.node);
    const auto& d = c.dims;
    if (c.quantized.has_value() != first.quantized.has_value())
      return Outcome::kept(Reason::QuantizedMix, who + " and " + describe_node(g, first.node) +
                                                " differ in having a quantized weight");
    if (c.data_type != plan.data_type)
      return Outcome::kept(Reason::TypeMismatch, who + " has a weight of another type than " + describe_node(g, first.node));
    if (c.geometry.rank() != rank) return Outcome::kept(Reason::RankMismatch, who + " has a kernel of another rank");
    if (c.groups != groups)
      return Outcome::kept(Reason::GroupMismatch, who + " has group=" + std::to_string(c.groups) + ", " +
                                                 describe_node(g, first.node) + " group=" + std::to_string(groups));
    if (d[0] != d0[0] || d[1] != d0[1])
      return Outcome::kept(Reason::ChannelMismatch, who + " has a weight of " + std::to_string(d[0]) + "x" +
                                                   std::to_string(d[1]) + " channels, " + describe_node(g, first.node) +
                                                   " " + std::to_string(d0[0]) + "x" + std::to_string(d0[1]));
    if (c.geometry.strides != first.geometry.strides)
      return Outcome::kept(Reason::StrideMismatch, who + " has other strides than " + describe_node(g, first.node));
    for (size_t d2 = 0; d2 < rank; ++d2) K[d2] = std::max(K[d2], c.geometry.kernel[d2]);
  }
  // Target pads and dilation per dim: those of a conv with the largest kernel in that dim (a dilation means
  // nothing for a kernel of size 1: there it may differ); then each conv's offset.
  plan.pads_begin.assign(rank, 0);
  plan.pads_end.assign(rank, 0);
  plan.dilations.assign(rank, 1);
  for (size_t d = 0; d < rank; ++d)
    for (const auto& c : plan.convs)
      if (c.geometry.kernel[d] == K[d]) {
        plan.pads_begin[d] = c.geometry.pads_begin[d];
        plan.pads_end[d] = c.geometry.pads_end[d];
        plan.dilations[d] = c.geometry.dilations[d];
        break;
      }
  for (const auto& c : plan.convs)
    for (size_t d = 0; d < rank; ++d)
      if (c.geometry.kernel[d] > 1 && c.geometry.dilations[d] != plan.dilations[d])
        return Outcome::kept(Reason::DilationMismatch, describe_node(g, c.node) + " has dilation " +
                                                      std::to_string(c.geometry.dilations[d]) + " in spatial dim " +
                                                      std::to_string(d) + ", the merged kernel " +
                                                      std::to_string(plan.dilations[d]));
  for (auto& c : plan.convs) {
    c.offset.assign(rank, 0);
    for (size_t d = 0; d < rank; ++d) {
      const int64_t dil = plan.dilations[d];
      const int64_t shift = plan.pads_begin[d] - c.geometry.pads_begin[d];
      const int64_t spare = K[d] - c.geometry.kernel[d];
      const bool aligned = shift % dil == 0 && shift / dil >= 0 && shift / dil <= spare &&
                           c.geometry.pads_end[d] + (spare - shift / dil) * dil == plan.pads_end[d];
      if (!aligned)
        return Outcome::kept(Reason::PadsMisaligned,
                             describe_node(g, c.node) + " (" + kernel_text(c.geometry.kernel) + ", " +
                                 c.geometry.describe() + ") does not see the same input positions as a " +
                                 kernel_text(K) + " kernel with pads begin " + kernel_text(plan.pads_begin) +
                                 ", end " + kernel_text(plan.pads_end) + " in spatial dim " + std::to_string(d) +
                                 ": its pads must be smaller by exactly the kernel's half-difference");
      c.offset[d] = shift / dil;
    }
  }
  const int64_t M = d0[0], Cg = d0[1];
  std::vector<int64_t> centre(rank, 0);
  if (!plan.identities.empty()) {
    const std::string who = plan.identities[0].bn >= 0 ? describe_node(g, plan.identities[0].bn) : "'" + set.x + "'";
    for (int64_t s : first.geometry.strides)
      if (s != 1) return Outcome::kept(Reason::IdentityStride, "the identity branch " + who + " sits beside convs with stride " + kernel_text(first.geometry.strides));
    if (M != Cg * groups)
      return Outcome::kept(Reason::IdentityChannels, "the identity branch " + who + " has " + std::to_string(Cg * groups) +
                                                    " channels, the convs " + std::to_string(M) + " outputs");
    for (size_t d = 0; d < rank; ++d) {
      const int64_t dil = plan.dilations[d];
      const int64_t j = plan.pads_begin[d] / dil;
      if (plan.pads_begin[d] % dil != 0 || j >= K[d] || plan.pads_end[d] != (K[d] - 1 - j) * dil)
        return Outcome::kept(Reason::IdentityMisaligned, "the identity branch " + who + " has no tap of the merged " +
                                                        kernel_text(K) + " kernel that reads x at the output position "
                                                        "(pads begin " + kernel_text(plan.pads_begin) + ", end " +
                                                        kernel_text(plan.pads_end) + ")");
      centre[d] = j;
    }
    for (const auto& id : plan.identities)
      if (id.bn >= 0 && static_cast<int64_t>(id.scale.size()) != M)
        return Outcome::kept(Reason::IdentityChannels, describe_node(g, id.bn) + " has " + std::to_string(id.scale.size()) +
                                                      " channels, the convs " + std::to_string(M) + " outputs");
  }

  // The merged weight and bias, in double, rounded once.
  int64_t R = 1;
  for (int64_t k : K) R *= k;
  std::vector<double> w(static_cast<size_t>(M * Cg * R), 0.0), b(static_cast<size_t>(M), 0.0);
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
  for (size_t d = 0; d < rank; ++d) centre_index = centre_index * K[d] + centre[d];
  for (const auto& id : plan.identities)
    for (int64_t o = 0; o < M; ++o) {
      w[(o * Cg + o % Cg) * R + centre_index] += id.sign * (id.bn >= 0 ? id.scale[o] : 1.0);
      if (id.bn >= 0) b[o] += id.sign * id.shift[o];
    }
  for (size_t i = 0; i < plan.convs.size(); ++i)
    if (plan.convs[i].geometry.kernel == K) { plan.primary = static_cast<int>(i); break; }
  plan.weight_dims = {M, Cg};
  plan.weight_dims.insert(plan.weight_dims.end(), K.begin(), K.end());
  QDQFOLD_TRY(bias_raw, store_or_keep(plan.data_type, b, "merged bias"));
  plan.bias_raw = std::move(bias_raw);
  const ConvBranch& keep = plan.convs[plan.primary];
  if (!keep.quantized) {
    QDQFOLD_TRY(weight_raw, store_or_keep(plan.data_type, w, "merged weight"));
    plan.weight_raw = std::move(weight_raw);
    return plan;
  }

  // requantize_merged: symmetric per output channel, s'[o] = max |W[o]| / q_max, q = round(W / s'), z = 0.
  const QuantizedWeight& pq = *keep.quantized;
  if (!pq.axis_supported || pq.layout.block_size > 0)
    return Outcome::kept(Reason::QuantizedWeightAxis, describe_node(g, keep.node) + "'s DequantizeLinear " +
                                                      (pq.layout.block_size > 0 ? "is blocked" : "has no axis (opset < 13)") +
                                                      ": the merged weight needs a scale per output channel");
  const int64_t qmax = pq.range.hi;
  const int64_t per_channel = Cg * R;
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
  return plan;
}

// ---------------------------------------------------------------- apply

// The kept conv's quantized weight becomes the merged one: its integers (or, QAT form, its float weight on the
// new grid), a scale per output channel and zero points of 0, for its own Q/DQ only; axis 0.
void write_requantized(FoldContext& ctx, const QuantizedWeight& w, const MergePlan& plan, const std::string& base,
                       Outcome& out) {
  Graph& g = ctx.graph;
  const int64_t M = plan.weight_dims[0];
  if (w.qat())
    write_constant_for(ctx, {graph::Use{w.q, 0}}, g.nodes()[w.q].inputs[0], w.float_type, plan.weight_dims,
                       plan.weight_raw, base + "_W", out);
  else
    write_constant_for(ctx, {graph::Use{w.dq, 0}}, g.nodes()[w.dq].inputs[0], w.int_type, plan.weight_dims,
                       plan.weight_raw, base + "_Wq", out);
  auto scale_raw = store_or_keep(w.scale_type, plan.new_scale, "scale");
  const std::string scale = std::get<std::string>(scale_raw);  // positive finite values of this type: fits
  const std::string zero = kernels::write_quantized(std::vector<int64_t>(static_cast<size_t>(M), 0), w.int_type);
  for (int slot : {1, 2}) {
    std::vector<std::pair<std::string, std::vector<graph::Use>>> by_name;
    for (int n : {w.dq, w.q}) {
      if (n < 0 || static_cast<int>(g.nodes()[n].inputs.size()) <= slot || g.nodes()[n].inputs[slot].empty()) continue;
      const std::string& name = g.nodes()[n].inputs[slot];
      auto it = std::find_if(by_name.begin(), by_name.end(), [&](const auto& e) { return e.first == name; });
      if (it == by_name.end()) by_name.push_back({name, {graph::Use{n, slot}}});
      else it->second.push_back(graph::Use{n, slot});
    }
    for (const auto& [name, readers] : by_name)
      write_constant_for(ctx, readers, name, slot == 1 ? w.scale_type : w.int_type, {M}, slot == 1 ? scale : zero,
                         base + (slot == 1 ? "_scale" : "_zero_point"), out);
  }
  for (int n : {w.dq, w.q})
    if (n >= 0) g.set_int_attribute(n, "axis", 0);
}

void apply_merge(FoldContext& ctx, const BranchSet& set, MergePlan& plan, Outcome& out) {
  Graph& g = ctx.graph;
  const ConvBranch& keep = plan.convs[plan.primary];
  const int layer = keep.node;
  const std::string root_output = g.nodes()[set.tree[0]].outputs[0];
  const std::string layer_name = g.nodes()[layer].name.empty() ? g.nodes()[layer].outputs[0] : g.nodes()[layer].name;
  if (keep.quantized) write_requantized(ctx, *keep.quantized, plan, layer_name, out);
  else write_layer_input(ctx, layer, 1, plan.data_type, plan.weight_dims, plan.weight_raw, layer_name + "_W", out);
  write_layer_input(ctx, layer, 2, plan.data_type, {plan.weight_dims[0]}, plan.bias_raw, layer_name + "_B", out);
  const std::vector<int64_t> K(plan.weight_dims.begin() + 2, plan.weight_dims.end());
  if (keep.geometry.kernel != K) {
    if (g.nodes()[layer].attr("kernel_shape")) g.set_ints_attribute(layer, "kernel_shape", K);
    std::vector<int64_t> pads = plan.pads_begin;
    pads.insert(pads.end(), plan.pads_end.begin(), plan.pads_end.end());
    g.set_ints_attribute(layer, "pads", pads);
    if (keep.geometry.dilations != plan.dilations)
      g.set_ints_attribute(layer, "dilations", plan.dilations);
  }
  // The tree, the other convs and the identity BNs go; the kept conv takes the root's output name.
  std::vector<std::string> dropped_values, dropped_tensors;
  for (int n : set.tree) {
    for (const auto& o : g.nodes()[n].outputs) dropped_values.push_back(o);
    g.remove_node(n);
  }
  for (size_t i = 0; i < plan.convs.size(); ++i) {
    const Node& c = g.nodes()[plan.convs[i].node];
    dropped_values.push_back(c.outputs[0]);
    if (static_cast<int>(i) == plan.primary) continue;
    for (size_t s = 1; s < c.inputs.size(); ++s) dropped_tensors.push_back(c.inputs[s]);
    g.remove_node(plan.convs[i].node);
    if (const auto& q = plan.convs[i].quantized)  // its weight's DequantizeLinear (and QuantizeLinear)
      for (int n : {q->dq, q->q})
        if (n >= 0 && g.reader_count(g.nodes()[n].outputs[0]) == 0 && !g.is_graph_output(g.nodes()[n].outputs[0])) {
          dropped_values.push_back(g.nodes()[n].outputs[0]);
          dropped_tensors.insert(dropped_tensors.end(), g.nodes()[n].inputs.begin(), g.nodes()[n].inputs.end());
          g.remove_node(n);
        }
  }
  for (const auto& id : plan.identities)
    if (id.bn >= 0) {
      dropped_values.push_back(g.nodes()[id.bn].outputs[0]);
      dropped_tensors.insert(dropped_tensors.end(), id.parameters.begin(), id.parameters.end());
      g.remove_node(id.bn);
    }
  g.set_output(layer, 0, root_output);
  for (const auto& v : dropped_values)
    if (v != root_output) g.remove_value_info(v);
  for (const auto& t : dropped_tensors)
    if (!t.empty()) g.drop_if_unused(t);
}

}  // namespace

bool is_branch_sum_root(const Graph& g, int node) {
  if (!is_sum_node(g.nodes()[node]) || g.nodes()[node].outputs.empty()) return false;
  const std::string& out = g.nodes()[node].outputs[0];
  if (out.empty() || g.is_graph_output(out)) return true;
  const auto& uses = g.uses(out);
  return !(uses.size() == 1 && uses[0].slot >= 0 && is_sum_node(g.nodes()[uses[0].node]));
}

namespace {

MergeOutcome merge_tree(FoldContext& ctx, int root) {
  Graph& g = ctx.graph;
  MergeOutcome result;
  result.sum = root;
  if (g.nodes()[root].outputs.size() != 1) return result;
  auto found = find_branches(g, root, result.identity_batchnorms);
  if (auto* o = std::get_if<Outcome>(&found)) {
    result.outcome = std::move(*o);
    return result;
  }
  const BranchSet set = std::move(std::get<BranchSet>(found));
  auto planned = plan_merge(ctx, set);
  if (auto* o = std::get_if<Outcome>(&planned)) {
    result.outcome = std::move(*o);
    return result;
  }
  MergePlan plan = std::move(std::get<MergePlan>(planned));

  // Every condition holds: edit.
  Outcome& out = result.outcome;
  out.verdict = Verdict::Folded;
  out.code = code(FoldName::MergeBranches);
  const int layer = plan.convs[plan.primary].node;
  out.into = {g.nodes()[layer].display_name(layer)};
  out.into_op = "Conv";
  const std::string K = kernel_text(std::vector<int64_t>(plan.weight_dims.begin() + 2, plan.weight_dims.end()));
  std::string parts;
  for (const auto& c : plan.convs) {
    parts += std::string(parts.empty() ? "" : ", ") + (c.sign < 0 ? "minus " : "") + describe_node(g, c.node) + " (" +
             kernel_text(c.geometry.kernel) + (c.geometry.kernel == plan.convs[plan.primary].geometry.kernel &&
                                                       kernel_text(c.geometry.kernel) == K
                                                   ? ")"
                                                   : ", zero-padded to " + K + ")");
  }
  for (const auto& id : plan.identities)
    parts += std::string(", ") + (id.sign < 0 ? "minus " : "") +
             (id.bn >= 0 ? "identity " + describe_node(g, id.bn) + " (removed: its factor on the centre tap, its shift in the bias)"
                         : "identity '" + set.x + "' (a centre tap of 1)");
  out.message = "merged " + std::to_string(set.branches.size()) + " branches summed by " +
                describe_node(g, set.tree[0]) + " into " + describe_node(g, layer) + " (" + K + "): " + parts;
  out.metrics = {{"branches", static_cast<double>(set.branches.size())},
                 {"convs_removed", static_cast<double>(plan.convs.size() - 1)},
                 {"batchnorms_removed", static_cast<double>(result.identity_batchnorms.size())}};
  if (plan.convs[plan.primary].quantized) {
    out.exact = false;
    out.message += "; the merged weight re-quantized per output channel (requantize_merged): APPROXIMATE, each "
                   "weight moved by at most " + std::to_string(plan.max_change) + " of its new scale";
    out.metrics.push_back({"max_requantization_change", plan.max_change});
  }
  apply_merge(ctx, set, plan, out);
  return result;
}

// The tree under `node`; where it stays, each sum inside it that is a tree of its own (Add(Add(conv1(x),
// conv2(x)), y): the inner Add merges although y is no branch).
void merge_tree_or_parts(FoldContext& ctx, int node, std::vector<MergeOutcome>& outcomes) {
  Graph& g = ctx.graph;
  std::vector<int> inner;
  for (const auto& v : g.nodes()[node].inputs) {
    const int p = v.empty() ? -1 : g.producer(v);
    if (p >= 0 && is_sum_node(g.nodes()[p]) && read_only_by(g, v, node)) inner.push_back(p);
  }
  MergeOutcome whole = merge_tree(ctx, node);
  if (whole.outcome.verdict == Verdict::Folded) {
    outcomes.push_back(std::move(whole));
    return;
  }
  std::vector<MergeOutcome> parts;
  for (int p : inner) merge_tree_or_parts(ctx, p, parts);
  const bool part_merged = std::any_of(parts.begin(), parts.end(),
                                       [](const MergeOutcome& m) { return m.outcome.verdict == Verdict::Folded; });
  if (part_merged) {
    for (auto& m : parts) outcomes.push_back(std::move(m));
  } else if (whole.outcome.verdict == Verdict::Kept) {
    outcomes.push_back(std::move(whole));
  }
}

}  // namespace

std::vector<MergeOutcome> merge_branches(FoldContext& ctx, int root) {
  std::vector<MergeOutcome> outcomes;
  if (is_branch_sum_root(ctx.graph, root)) merge_tree_or_parts(ctx, root, outcomes);
  return outcomes;
}

}  // namespace qdqfold::folds
