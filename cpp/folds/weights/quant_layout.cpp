// QuantLayout (quantized_weight.h): where a quantization scale element belongs, as index arithmetic.
#include "folds/weights/quantized_weight.h"

#include <numeric>
#include <optional>

namespace qdqfold::folds {

void QuantLayout::prepare(const std::vector<int64_t>& dims) {
  if (per_tensor()) return;
  inner_ = 1;
  for (size_t d = static_cast<size_t>(axis) + 1; d < dims.size(); ++d) inner_ *= dims[d];
  axis_dim_ = dims[axis];
  blocks_ = block_size > 0 ? (axis_dim_ + block_size - 1) / block_size : axis_dim_;
}

int64_t QuantLayout::scale_index(int64_t i) const {
  if (per_tensor()) return 0;
  const int64_t along = (i / inner_) % axis_dim_;
  if (block_size <= 0) return along;
  const int64_t outer = i / (inner_ * axis_dim_);
  return (outer * blocks_ + along / block_size) * inner_ + i % inner_;
}

int64_t QuantLayout::run_length() const {
  if (per_tensor()) return 0;
  if (block_size <= 0) return inner_;
  // Blocks along the last axis: block and row boundaries both fall on multiples of gcd(block_size, axis dim).
  return inner_ == 1 ? std::gcd(block_size, axis_dim_) : 1;
}

int QuantLayout::row_step(int64_t n) const {
  if (per_tensor()) return 0;
  if (block_size <= 0) {
    if (inner_ % n == 0) return 0;                 // k = (i / inner) % axis_dim: one value per row
    return inner_ == 1 && axis_dim_ == n ? 1 : -1;  // the last axis: k = j
  }
  // Blocks along an axis that spans whole rows: i % inner = (r % (inner / n)) * n + j.
  return inner_ % n == 0 ? 1 : -1;
}

int64_t QuantLayout::scale_count() const {
  int64_t n = 1;
  for (int64_t d : scale_dims) n *= d;
  return n;
}

std::vector<int64_t> QuantLayout::full_dims(const std::vector<int64_t>& weight_dims) const {
  std::vector<int64_t> full(weight_dims.size(), 1);
  for (size_t k = 0; k < weight_dims.size(); ++k)
    if (static_cast<int64_t>(k) == axis)
      full[k] = block_size > 0 ? (weight_dims[k] + block_size - 1) / block_size : weight_dims[k];
    else if (block_size > 0)
      full[k] = weight_dims[k];
  return full;
}

std::optional<std::vector<int64_t>> QuantLayout::broadcast_dims(const std::vector<int64_t>& stored,
                                                                const std::vector<int64_t>& weight_dims) const {
  if (per_tensor()) return std::nullopt;
  const std::vector<int64_t> full = full_dims(weight_dims);
  const size_t rank = full.size();
  // ONNX's per-axis form (1-D), or the weight's rank (a blocked scale has it in ONNX too).
  const bool per_axis_1d = stored.size() == 1 && block_size <= 0;
  if (!per_axis_1d && stored.size() != rank) return std::nullopt;
  std::vector<int64_t> padded = stored;
  if (per_axis_1d) {
    padded.assign(rank, 1);
    padded[static_cast<size_t>(axis)] = stored[0];
  }
  for (size_t k = 0; k < rank; ++k)
    if (padded[k] != full[k] && (padded[k] != 1 || static_cast<int64_t>(k) == axis)) return std::nullopt;
  return padded;
}

namespace {
// The index into values of dims `from` of the element at row-major index i of dims `to`.
int64_t source_index(int64_t i, const std::vector<int64_t>& from, const std::vector<int64_t>& to) {
  int64_t src = 0, stride = 1;
  for (size_t k = to.size(); k-- > 0;) {
    const int64_t at = i % to[k];
    i /= to[k];
    if (from[k] != 1) src += at * stride;
    stride *= from[k];
  }
  return src;
}
int64_t element_count(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}
}  // namespace

std::vector<double> broadcast_values(const std::vector<double>& values, const std::vector<int64_t>& from,
                                     const std::vector<int64_t>& to) {
  if (from == to) return values;
  std::vector<double> out(static_cast<size_t>(element_count(to)));
  for (size_t i = 0; i < out.size(); ++i) out[i] = values[static_cast<size_t>(source_index(static_cast<int64_t>(i), from, to))];
  return out;
}

std::optional<std::vector<double>> unbroadcast_values(const std::vector<double>& values,
                                                      const std::vector<int64_t>& from,
                                                      const std::vector<int64_t>& to) {
  if (from == to) return values;
  std::vector<double> out(static_cast<size_t>(element_count(from)));
  std::vector<char> seen(out.size(), 0);
  for (size_t i = 0; i < values.size(); ++i) {
    const auto k = static_cast<size_t>(source_index(static_cast<int64_t>(i), from, to));
    if (!seen[k]) { out[k] = values[i]; seen[k] = 1; }
    else if (out[k] != values[i]) return std::nullopt;
  }
  return out;
}

}  // namespace qdqfold::folds
