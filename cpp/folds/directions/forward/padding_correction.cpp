#include "folds/directions/forward/padding_correction.h"

#include <numeric>

namespace qdqfold::folds {

Expected<TapMap> tap_map(const ConvGeometry& g, const std::vector<int64_t>& input_dims,
                                      const std::string& layer_name) {
  TapMap map;
  const char* op = g.transposed ? "ConvTranspose" : "Conv";
  auto kept = [&](Reason code, const std::string& why) {
    return Outcome::kept(code, std::string(op) + " '" + layer_name + "' " + why);
  };
  if (input_dims.size() != g.rank()) return kept(Reason::ShapeMismatch, "has a kernel of another rank than its input");
  map.taps.resize(g.rank());
  for (size_t d = 0; d < g.rank(); ++d) {
    const int64_t in = input_dims[d], k = g.kernel[d], s = g.strides[d], dil = g.dilations[d];
    const int64_t k_eff = g.effective_kernel(d);
    if (in < 1) return kept(Reason::ShapeMismatch, "has an empty input");
    if (in > kMaxPositions || k_eff > kMaxPositions)
      return kept(Reason::CorrectionTooLarge, "has a spatial dimension too large for a correction map");
    int64_t begin = g.pads_begin[d], end = g.pads_end[d], out = 0;
    if (!g.transposed) {
      if (g.auto_pad == "SAME_UPPER" || g.auto_pad == "SAME_LOWER") {
        out = (in + s - 1) / s;
        const int64_t total = std::max<int64_t>(0, (out - 1) * s + k_eff - in);
        begin = g.auto_pad == "SAME_UPPER" ? total / 2 : total - total / 2;
        end = total - begin;
      } else {
        const int64_t span = in + begin + end - k_eff;
        if (span < 0) return kept(Reason::ShapeMismatch, "has a kernel larger than its padded input");
        out = span / s + 1;
      }
    } else {
      const int64_t full = s * (in - 1) + g.output_padding[d] + k_eff;
      const bool computed = !g.output_shape.empty() || g.auto_pad == "SAME_UPPER" || g.auto_pad == "SAME_LOWER";
      if (computed) {
        out = !g.output_shape.empty() ? g.output_shape[d] : in * s;
        const int64_t total = full - out;
        // Runtimes disagree on which side takes the odd pixel; an even total splits the same everywhere.
        if (total < 0 || total % 2 != 0)
          return kept(Reason::UnsupportedAttributes, "computes a total crop of " + std::to_string(total) + " in spatial "
                                                "dimension " + std::to_string(d) + ", which runtimes split differently");
        begin = end = total / 2;
      } else {
        out = full - begin - end;
      }
    }
    if (out < 1) return kept(Reason::ShapeMismatch, "has an empty output");
    if (in > kMaxPositions || out > kMaxPositions || out * k > kMaxPositions)
      return kept(Reason::CorrectionTooLarge, "has " + std::to_string(out) + " output positions in spatial dimension " +
                                              std::to_string(d) + ", too many for a correction map");
    map.output_dims.push_back(out);
    auto& taps = map.taps[d];
    taps.resize(static_cast<size_t>(out));
    for (int64_t i = 0; i < out; ++i) {
      for (int64_t j = 0; j < k; ++j) {
        if (!g.transposed) {
          const int64_t x = i * s + j * dil - begin;
          if (x >= 0 && x < in) taps[i].push_back(j);
        } else {
          const int64_t q = i + begin - j * dil;  // = input index * stride
          if (q >= 0 && q % s == 0 && q / s < in) taps[i].push_back(j);
        }
      }
      if (static_cast<int64_t>(taps[i].size()) != k) map.uniform = false;
    }
  }
  return map;
}

std::vector<double> border_correction(const TapMap& map, const std::vector<int64_t>& kernel,
                                      const std::vector<std::vector<double>>& tap_sums) {
  const size_t rank = map.output_dims.size();
  const int64_t positions = std::accumulate(map.output_dims.begin(), map.output_dims.end(), int64_t{1},
                                            std::multiplies<int64_t>());
  const size_t channels = tap_sums.size();
  std::vector<double> interior(channels, 0.0);
  for (size_t o = 0; o < channels; ++o)
    for (double v : tap_sums[o]) interior[o] += v;
  std::vector<double> out(channels * static_cast<size_t>(positions), 0.0);
  std::vector<int64_t> index(rank, 0);
  std::vector<int64_t> flat_taps;
  for (int64_t pos = 0; pos < positions; ++pos) {
    bool full = true;
    for (size_t d = 0; d < rank; ++d)
      if (static_cast<int64_t>(map.taps[d][index[d]].size()) != kernel[d]) full = false;
    if (!full) {
      // Row-major kernel indices of the taps this position receives: the product of the per-dim lists.
      flat_taps.assign(1, 0);
      for (size_t d = 0; d < rank; ++d) {
        std::vector<int64_t> next;
        for (int64_t base : flat_taps)
          for (int64_t j : map.taps[d][index[d]]) next.push_back(base * kernel[d] + j);
        flat_taps.swap(next);
      }
      for (size_t o = 0; o < channels; ++o) {
        double received = 0.0;
        for (int64_t j : flat_taps) received += tap_sums[o][static_cast<size_t>(j)];
        out[o * static_cast<size_t>(positions) + static_cast<size_t>(pos)] = received - interior[o];
      }
    }
    for (size_t d = rank; d-- > 0;) {  // next position, last dimension fastest
      if (++index[d] < map.output_dims[d]) break;
      index[d] = 0;
    }
  }
  return out;
}

}  // namespace qdqfold::folds
