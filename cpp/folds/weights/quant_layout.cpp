// QuantLayout (quantized_weight.h): where a quantization scale element belongs, as index arithmetic.
#include "folds/weights/quantized_weight.h"

#include <numeric>

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
}  // namespace qdqfold::folds
