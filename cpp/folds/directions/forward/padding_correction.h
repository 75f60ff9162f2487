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

#include "folds/common/conv_geometry.h"
#include "folds/expected.h"

namespace qdqfold::folds {

// Per spatial dimension, the taps each output index receives.
struct TapMap {
  std::vector<int64_t> output_dims;                        // spatial output size
  std::vector<std::vector<std::vector<int64_t>>> taps;     // [dim][output index] -> kernel indices
  bool uniform = true;                                     // every position receives every tap
};

// The tap map of `geometry` over an input of spatial size `input_dims` (all known), or Kept with the reason
// (an output size below 1, an ambiguous split of an odd SAME / output_shape padding of a ConvTranspose).
Expected<TapMap> tap_map(const ConvGeometry& geometry, const std::vector<int64_t>& input_dims,
                                      const std::string& layer_name);

// The correction C = S - interior (see above) as a row-major [M, out...] map, from the per-output-channel
// tap sums T ([M][prod(kernel)], row-major kernel index).
std::vector<double> border_correction(const TapMap& map, const std::vector<int64_t>& kernel,
                                      const std::vector<std::vector<double>>& tap_sums);

}  // namespace qdqfold::folds
