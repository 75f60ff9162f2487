// The spatial attributes of a Conv or ConvTranspose, read and validated against its weight, and what they
// imply (output sizes, whether every position gets every tap). Shared by the backward folds, the forward
// folds' padding correction, proven shapes and the branch merge: folds/common, below all of them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "folds/expected.h"

namespace qdqfold::folds {

// Bounds on one spatial dimension (positions, positions x taps) for a correction map worth computing; they
// also keep the index arithmetic of sizes taken from a model's shape information far from overflow.
inline constexpr int64_t kMaxPositions = int64_t{1} << 26;

// "[1, 32, ?, ?]": dims for messages, "?" where unknown (negative).
std::string dims_text(const std::vector<int64_t>& dims);

// The spatial attributes of a Conv or ConvTranspose, read and validated against its weight.
struct ConvGeometry {
  bool transposed = false;
  std::vector<int64_t> kernel, strides, dilations, pads_begin, pads_end, output_padding, output_shape;
  std::string auto_pad = "NOTSET";  // NOTSET, VALID, SAME_UPPER or SAME_LOWER

  size_t rank() const { return kernel.size(); }
  int64_t effective_kernel(size_t d) const { return (kernel[d] - 1) * dilations[d] + 1; }
  std::string describe() const;  // "pads=[1, 1, 1, 1]" / "auto_pad=SAME_UPPER", strides, for messages
};

// The geometry of `layer` (Conv or ConvTranspose) whose weight has dims `weight_dims`, or Kept with the
// reason when an attribute is malformed or of a form qdqfold does not fold into.
Expected<ConvGeometry> read_conv_geometry(const graph::Node& layer,
                                                      const std::vector<int64_t>& weight_dims);

// True when every output position receives every kernel tap whatever the input size (a constant input
// gives a per-channel constant output): a Conv that does not pad; a ConvTranspose with stride 1 whose pads
// crop at least the kernel's reach on both sides.
bool every_position_gets_every_tap(const ConvGeometry& geometry);

// The output size of `geometry` in spatial dimension `d` for an input of size `in` (>= 1), as tap_map
// computes it, or nullopt when there is none (a kernel larger than the padded input, an empty output).
std::optional<int64_t> output_extent(const ConvGeometry& geometry, size_t d, int64_t in);

}  // namespace qdqfold::folds
