// merge-branches, plan: every term a branch, every branch read, every conv seeing x the same way (steps.h).
#include <algorithm>

#include "folds/common/values.h"
#include "folds/merge_branches/steps.h"
#include "folds/sources/batchnorm.h"
#include "folds/weights/float_weight.h"
#include "kernels/quantized.h"

namespace qdqfold::folds::merge {

using graph::Graph;
using graph::Node;

namespace {

// Each term as a branch: x itself, or a Conv or BN reading x whose output only the tree reads.
Expected<std::vector<Branch>> classify_terms(const Graph& g, const Selection& set) {
  std::vector<Branch> branches;
  for (const auto& t : set.terms) {
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
    branches.push_back(b);
  }
  return branches;
}

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

// Conv `node`'s weight, quantized (requantize_merged only).
Expected<ConvBranch> read_quantized_branch(FoldContext& ctx, int node) {
  Graph& g = ctx.graph;
  const std::string who = describe_node(g, node);
  if (!ctx.options.requantize_merged)
    return Outcome::kept(Reason::QuantizedWeight,
                         who + " has a quantized weight (DequantizeLinear): the merged kernel "
                         "needs new integers on a new grid, which no exact merge gives (requantize_merged=True "
                         "re-quantizes, approximately)");
  const std::string& weight = g.nodes()[node].inputs[1];
  auto read = reworded(read_quantized_weight(g, g.producer(weight), node),
                       [&](const Outcome& o) { return Outcome::kept_as(o, who + ": " + o.message); });
  QDQFOLD_TRY(q, if_not_applicable(std::move(read), [&] {
                return Outcome::kept(Reason::NonConstantWeight, who + " has no constant weight");
              }));
  std::string why;
  auto layout = weight_layout(g.nodes()[node], q.dims, why);
  if (!layout) return Outcome::kept(Reason::Malformed, who + ": " + why);
  auto values = dequantized_values(q);
  if (!values || q.range.lo >= 0 || q.range.hi > 32767)
    return Outcome::kept(Reason::QuantizedWeightType, who + " has a weight of " + graph::data_type_name(q.int_type) +
                                                      ": the merge re-quantizes to int8 or int16 only");
  ConvBranch c;
  c.node = node;
  c.dims = q.dims;
  c.data_type = q.qat() ? q.float_type : q.scale_type;
  c.groups = layout->groups;
  c.values = std::move(*values);
  c.quantized = std::move(q);
  return c;
}

// Reads conv `node`'s weight: float, or (requantize_merged) quantized.
Expected<ConvBranch> read_branch_weight(FoldContext& ctx, int node) {
  auto read = reworded(read_float_weight(ctx, node), [&](const Outcome& o) {
    return Outcome::kept_as(o, describe_node(ctx.graph, node) + ": " + o.message);
  });
  QDQFOLD_TRY(float_weight, optional_step(std::move(read)));
  if (!float_weight) return read_quantized_branch(ctx, node);  // behind DequantizeLinear
  const FloatWeight& fw = *float_weight;
  ConvBranch c;
  c.node = node;
  c.dims = fw.tensor.dims;
  c.data_type = fw.tensor.data_type;
  c.groups = fw.layout.groups;
  c.values.resize(static_cast<size_t>(fw.tensor.count));
  for (int64_t i = 0; i < fw.tensor.count; ++i) c.values[i] = graph::float_element(c.data_type, fw.bytes, i);
  return c;
}

Expected<ConvBranch> read_conv_branch(FoldContext& ctx, const Branch& b) {
  Graph& g = ctx.graph;
  const Node& conv = g.nodes()[b.node];
  if (conv.outputs.size() != 1) return Outcome::kept(Reason::Malformed, describe_node(g, b.node) + " has more than one output");
  QDQFOLD_TRY(c, read_branch_weight(ctx, b.node));
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
  return std::move(c);
}

// Every branch read, in the terms' order.
std::optional<Outcome> read_branches(FoldContext& ctx, MergePlan& plan) {
  for (const auto& b : plan.branches) {
    if (b.kind == Branch::Kind::Conv) {
      QDQFOLD_TRY(c, read_conv_branch(ctx, b));
      plan.convs.push_back(std::move(c));
      continue;
    }
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
  return std::nullopt;
}

// Every conv like the first (weight form and type, rank, group, channels, strides); the merged kernel K.
std::optional<Outcome> check_convs_agree(const Graph& g, MergePlan& plan) {
  const ConvBranch& first = plan.convs[0];
  const auto& d0 = first.dims;
  const size_t rank = first.geometry.rank();
  plan.data_type = first.data_type;
  plan.kernel.assign(rank, 0);
  for (const auto& c : plan.convs) {
    const std::string who = describe_node(g, c.node);
    const auto& d = c.dims;
    if (c.quantized.has_value() != first.quantized.has_value())
      return Outcome::kept(Reason::QuantizedMix, who + " and " + describe_node(g, first.node) +
                                                " differ in having a quantized weight");
    if (c.data_type != plan.data_type)
      return Outcome::kept(Reason::TypeMismatch, who + " has a weight of another type than " + describe_node(g, first.node));
    if (c.geometry.rank() != rank) return Outcome::kept(Reason::RankMismatch, who + " has a kernel of another rank");
    if (c.groups != first.groups)
      return Outcome::kept(Reason::GroupMismatch, who + " has group=" + std::to_string(c.groups) + ", " +
                                                 describe_node(g, first.node) + " group=" + std::to_string(first.groups));
    if (d[0] != d0[0] || d[1] != d0[1])
      return Outcome::kept(Reason::ChannelMismatch, who + " has a weight of " + std::to_string(d[0]) + "x" +
                                                   std::to_string(d[1]) + " channels, " + describe_node(g, first.node) +
                                                   " " + std::to_string(d0[0]) + "x" + std::to_string(d0[1]));
    if (c.geometry.strides != first.geometry.strides)
      return Outcome::kept(Reason::StrideMismatch, who + " has other strides than " + describe_node(g, first.node));
    for (size_t d2 = 0; d2 < rank; ++d2) plan.kernel[d2] = std::max(plan.kernel[d2], c.geometry.kernel[d2]);
  }
  return std::nullopt;
}

// Target pads and dilation per dim: those of a conv with the largest kernel in that dim (a dilation means
// nothing for a kernel of size 1: there it may differ); then each conv's offset in the merged kernel.
std::optional<Outcome> align_convs(const Graph& g, MergePlan& plan) {
  const auto& K = plan.kernel;
  const size_t rank = K.size();
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
  return std::nullopt;
}

// An identity branch reads x at the output position: stride 1, as many channels as outputs, and a tap of the
// merged kernel (the centre) that reads x there.
std::optional<Outcome> check_identities(const Graph& g, const Selection& set, MergePlan& plan) {
  const auto& K = plan.kernel;
  const size_t rank = K.size();
  plan.centre.assign(rank, 0);
  if (plan.identities.empty()) return std::nullopt;
  const ConvBranch& first = plan.convs[0];
  const int64_t M = first.dims[0], Cg = first.dims[1], groups = first.groups;
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
    plan.centre[d] = j;
  }
  for (const auto& id : plan.identities)
    if (id.bn >= 0 && static_cast<int64_t>(id.scale.size()) != M)
      return Outcome::kept(Reason::IdentityChannels, describe_node(g, id.bn) + " has " + std::to_string(id.scale.size()) +
                                                    " channels, the convs " + std::to_string(M) + " outputs");
  return std::nullopt;
}

}  // namespace

Expected<MergePlan> plan_merge(FoldContext& ctx, const Selection& set) {
  Graph& g = ctx.graph;
  MergePlan plan;
  QDQFOLD_TRY(branches, classify_terms(g, set));
  plan.branches = std::move(branches);
  QDQFOLD_CHECK(read_branches(ctx, plan));
  QDQFOLD_CHECK(check_convs_agree(g, plan));
  QDQFOLD_CHECK(align_convs(g, plan));
  QDQFOLD_CHECK(check_identities(g, set, plan));
  QDQFOLD_CHECK(plan_merged_weight(ctx, plan));
  return plan;
}

}  // namespace qdqfold::folds::merge
