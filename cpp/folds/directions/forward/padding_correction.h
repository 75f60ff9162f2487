// Which kernel taps of a Conv / ConvTranspose reach each output position, and the constant map a BN shift
// turns into when it is folded into a layer that does not give every position every tap.
//
//   before:  x -> BN(a, t) -> Conv(W, b, pads)              -> y
//   after:   x -> Conv(W * a, b') -> Add(C)                  -> y
//
// A constant input t (BN's shift, broadcast over H x W) gives the layer output
//   S[o, pos] = sum over taps j that reach pos of T[o, j],   T[o, j] = sum over c of W[o, c, j] * t[c]
// (input channel c within o's group). Positions that receive every tap get the interior constant
// sum_j T[o, j], which goes into the bias b'; the correction C = S - interior is zero there and nonzero only
// where the layer reads zero padding (Conv borders) or where strides/crops leave taps out (ConvTranspose).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "folds/fold.h"

namespace qdqfold::folds {

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
std::variant<ConvGeometry, Outcome> read_conv_geometry(const graph::Node& layer,
                                                      const std::vector<int64_t>& weight_dims);

// True when every output position receives every kernel tap whatever the input size (a constant input
// gives a per-channel constant output): a Conv that does not pad; a ConvTranspose with stride 1 whose pads
// crop at least the kernel's reach on both sides.
bool every_position_gets_every_tap(const ConvGeometry& geometry);

// The output size of `geometry` in spatial dimension `d` for an input of size `in` (>= 1), as tap_map
// computes it, or nullopt when there is none (a kernel larger than the padded input, an empty output).
std::optional<int64_t> output_extent(const ConvGeometry& geometry, size_t d, int64_t in);

// Per spatial dimension, the taps each output index receives.
struct TapMap {
  std::vector<int64_t> output_dims;                        // spatial output size
  std::vector<std::vector<std::vector<int64_t>>> taps;     // [dim][output index] -> kernel indices
  bool uniform = true;                                     // every position receives every tap
};

// The tap map of `geometry` over an input of spatial size `input_dims` (all known), or Kept with the reason
// (an output size below 1, an ambiguous split of an odd SAME / output_shape padding of a ConvTranspose).
std::variant<TapMap, Outcome> tap_map(const ConvGeometry& geometry, const std::vector<int64_t>& input_dims,
                                      const std::string& layer_name);

// The correction C = S - interior (see above) as a row-major [M, out...] map, from the per-output-channel
// tap sums T ([M][prod(kernel)], row-major kernel index).
std::vector<double> border_correction(const TapMap& map, const std::vector<int64_t>& kernel,
                                      const std::vector<std::vector<double>>& tap_sums);

}  // namespace qdqfold::folds
