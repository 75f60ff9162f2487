// A layer's weight that reaches it through DequantizeLinear, in one of the two forms exporters write:
//
//   int form:  q (int initializer) -> DequantizeLinear(s, z) -> layer          (onnxruntime, ModelOpt --dq_only)
//   QAT form:  W (float) -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> layer   (pytorch_quantization, ModelOpt)
//
// read_quantized_weight() reads scale, zero point and their layout (per tensor, per axis, or blocked along an
// axis) and keeps the weight itself as a view of its raw data; rescale_quantized_weight() multiplies the
// dequantized weight by a factor per output channel without re-quantizing (s' = s * |a|, integers mirrored
// where a < 0), checking everything with read-only passes over that data; and write_quantized_weight() puts
// the result into the graph without touching tensors other nodes read. A new weight is generated straight
// into the output when it is written (graph::LazyBytes), one run of elements sharing an output channel and a
// scale element at a time, or, where the output channel is the last axis (MatMul, Gemm transB=0), one row at a
// time with per-column parameters; where no factor is negative the integers are not touched at all.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "kernels/quantized.h"
#include "folds/expected.h"
#include "folds/common/layout.h"
#include "folds/weights/qdq_chain.h"

namespace qdqfold::folds {

// Where a quantization scale or zero point belongs: per tensor (axis -1), per slice of `axis`, or per block
// of `block_size` consecutive elements along `axis`.
struct QuantLayout {
  int64_t axis = -1;
  int64_t block_size = 0;
  std::vector<int64_t> scale_dims;  // per axis: [C]; blocked: the weight's dims with the axis in blocks
  // The dims the model stores the scale and the zero point with where they differ from scale_dims: a shape
  // that broadcasts to them ([C, 1, 1, 1] for one value per slice of axis 0; a blocked scale with 1 on axes
  // it does not vary along). Empty: scale_dims. The write-back keeps them where the new values allow.
  std::vector<int64_t> stored_scale_dims, stored_zero_dims;

  bool per_tensor() const { return axis < 0; }
  // Index into the scale of element `i` of a tensor with `dims` (strides precomputed by `prepare`).
  int64_t scale_index(int64_t i) const;
  void prepare(const std::vector<int64_t>& dims);
  int64_t scale_count() const;
  // Aligned runs of this many elements share one scale element (0: the whole tensor). After `prepare`.
  int64_t run_length() const;
  // Viewed as rows of n elements: 0 or 1 when the scale element of element j of row r is
  // scale_index(r * n) + step * j (per tensor or per row: 0; per column, or blocked across rows: 1), else -1.
  int row_step(int64_t n) const;
  // The dims with which a parameter stored with `stored` dims broadcasts, axis by axis, to this layout's
  // values (axis and block_size set) for a weight of `weight_dims`: `stored` itself when it has the weight's
  // rank, a 1-D per-axis parameter placed on the axis. nullopt when it does not broadcast, axis by axis, to
  // one value per slice (per block) of the axis (other ranks are not read as broadcasts).
  std::optional<std::vector<int64_t>> broadcast_dims(const std::vector<int64_t>& stored,
                                                     const std::vector<int64_t>& weight_dims) const;
  // The full dims of the values, axis by axis: the weight's rank, the slices (blocks) of the axis on it, for a
  // blocked layout the weight's dims elsewhere, else 1.
  std::vector<int64_t> full_dims(const std::vector<int64_t>& weight_dims) const;

 private:
  int64_t inner_ = 1, axis_dim_ = 1, blocks_ = 1;
};

// `values` stored with dims `from` (broadcast_dims), repeated to the dims `to` it broadcasts to.
std::vector<double> broadcast_values(const std::vector<double>& values, const std::vector<int64_t>& from,
                                     const std::vector<int64_t>& to);
// The inverse where it exists: `values` of dims `to`, stored with dims `from`; nullopt when they vary along an
// axis that `from` broadcasts.
std::optional<std::vector<double>> unbroadcast_values(const std::vector<double>& values,
                                                      const std::vector<int64_t>& from,
                                                      const std::vector<int64_t>& to);

struct QuantizedWeight {
  int dq = -1;                 // the DequantizeLinear node
  int q = -1;                  // QAT form: the QuantizeLinear node, else -1
  int clip = -1;               // Brevitas QCDQ: a Clip of the integers before the DequantizeLinear, else -1;
                               // `range` is then the Clip's range (within the type's)
  int32_t int_type = 0;        // element type of the integers (float8 types: their bytes)
  kernels::IntegerRange range; // valid integers (unused for float8)
  std::vector<int64_t> dims;   // weight dims
  int64_t count = 0;           // elements
  graph::PinnedBytes data;     // raw_data of the integers (int form) or of W (QAT form): read, never copied
                               // where the model's buffer holds it, and valid until the output is written
  int32_t float_type = 0;      // QAT form: type of W
  int32_t scale_type = 0;
  std::vector<double> scale;
  bool has_zero = false;       // a zero-point input is present
  std::vector<int64_t> zero;   // one per scale element (zeros when absent)
  QuantLayout layout;
  bool axis_supported = false;  // the Q/DQ version has an `axis` attribute (opset >= 13 or com.microsoft)

  bool qat() const { return q >= 0; }
  // trt::DequantizeLinear of a float weight: quantizer and dequantizer in one node (q == dq), no zero point.
  bool fused() const { return q >= 0 && q == dq; }
  bool float8() const { return kernels::is_float8(int_type); }
};

// Reads the weight DequantizeLinear node `dq` feeds to `layer`. NotApplicable when `dq` is not a
// DequantizeLinear; Kept with a reason when the pattern is a quantized weight that cannot be read (not
// constant, unsupported type, malformed scale, Q and DQ disagreeing, ...).
Expected<QuantizedWeight> read_quantized_weight(graph::Graph& g, int dq, int layer);

// The weight after multiplying output channel o by a[o].
struct RescaledWeight {
  std::vector<char> negative;       // per output channel: a < 0, integers mirrored there
  std::vector<int64_t> mirror;      // per scale element: q' = mirror - q in mirrored elements (not float8)
  std::vector<double> scale;        // already rounded to scale_type
  std::vector<int64_t> zero;
  QuantLayout layout;
  bool promoted = false;            // per-tensor scale became per-channel (new axis attribute)
  bool ints_changed = false, zero_changed = false;
  int negated_channels = 0;
  bool complement = false;          // the complement form was used somewhere (zero point became nonzero)
  // Set when the negation's range check was left to the generator (DeferredChecks, core/fold_hooks.h): it fails
  // this if a negated integer is the type's lowest value, whose negation does not fit.
  std::shared_ptr<DeferredChecks> negation_check;
};

// Kept ("opset-too-old") when the factors `a` differ between output channels that share the per-tensor scale
// of `w`, so the scale must become per-channel, and `w`'s DequantizeLinear has no `axis` (opset < 13). The
// planner asks this before rescaling and may raise the opset instead (allow_opset_upgrade; then it sets
// w.axis_supported). nullopt otherwise.
std::optional<Outcome> per_channel_scale_needs_axis(const QuantizedWeight& w, const WeightLayout& wl,
                                                    const std::vector<double>& a, const std::string& who);

// Rescales `w` by the factors `a` (one per output channel of `layer`, whose weight layout is `wl`).
// `keep_quantizer`: the QAT form stays Q -> DQ, so the new float weight must quantize to the new integers
// (checked here for every element that occurs; the weight itself is computed when written).
// `deferred` (FoldContext::deferred_checks(), may be null): in the QAT form with a signed type and zero points of
// 0, the read-only pass that finds whether a negated integer is the type's lowest value is skipped and the
// generator checks that as it writes.
Expected<RescaledWeight> rescale_quantized_weight(const QuantizedWeight& w, const WeightLayout& wl,
                                                               const std::vector<double>& a, const Options& options,
                                                               bool keep_quantizer, const std::string& who,
                                                               std::shared_ptr<DeferredChecks> deferred = {});

// Writes one quantization parameter (slot 1 scale, slot 2 zero point) for the Q/DQ nodes `nodes`, through
// write_constant_for (edits.h). Nodes that read different tensors for it (equal in value) get one new tensor
// each. `keep_constant_node`: a parameter held by a Constant node only they read is rewritten in that node.
void write_quantization_parameter(FoldContext& ctx, const std::vector<int>& nodes, int slot, int32_t data_type,
                                  const std::vector<int64_t>& dims, const std::string& raw, const std::string& base,
                                  Outcome& outcome, bool keep_constant_node = true);

// Writes `r` into the graph for weight `w`: new scale and zero point for this layer's Q/DQ only (a tensor
// that any other node reads is never edited), new integers or snapped float weight, axis attribute when the
// scale was promoted. `materialize`: the QAT form becomes int initializer -> DequantizeLinear (Q removed).
void write_quantized_weight(FoldContext& ctx, const QuantizedWeight& w, const WeightLayout& wl,
                            const RescaledWeight& r, bool materialize, Outcome& outcome);

// The new weight's raw data, produced when written: integers of w.int_type (`as_integers`: the int form, or
// the QAT form materialized) or W' = (q' - z') * s' in w.float_type (the QAT form kept).
graph::LazyBytes rescaled_weight_data(const QuantizedWeight& w, const WeightLayout& wl, const RescaledWeight& r,
                                      bool as_integers);

}  // namespace qdqfold::folds
