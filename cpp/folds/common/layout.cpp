#include "folds/common/layout.h"

namespace qdqfold::folds {

std::optional<WeightLayout> weight_layout(const graph::Node& layer, const std::vector<int64_t>& dims,
                                          std::string& why, bool backward_fold) {
  WeightLayout l;
  const auto rank = dims.size();
  auto kernel_size = [&] {
    int64_t r = 1;
    for (size_t d = 2; d < rank; ++d) r *= dims[d];
    return r;
  };
  if (layer.is("Conv") || layer.is("ConvTranspose")) {
    if (rank < 3) {
      why = "its weight has rank " + std::to_string(rank) + ", a convolution needs at least 3";
      return std::nullopt;
    }
    l.groups = layer.attr_int("group", 1);
    l.P = dims[0];
    l.Q = dims[1];
    l.R = kernel_size();
    if (l.groups < 1 || l.P % l.groups != 0) {
      why = "group=" + std::to_string(l.groups) + " does not divide the weight's first dimension " + std::to_string(l.P);
      return std::nullopt;
    }
    if (layer.is("Conv")) {
      l.p_is_output = true;
      l.out_channels = l.P;
      l.in_channels = l.Q * l.groups;
      l.out_axis = 0;
      l.in_axis = 1;
    } else {
      l.p_is_output = false;
      l.in_channels = l.P;
      l.out_channels = l.Q * l.groups;
      l.out_axis = 1;
      l.in_axis = 0;
    }
    return l;
  }
  if (layer.is("Gemm") || layer.is("MatMul")) {
    if (rank != 2) {
      why = "its weight has rank " + std::to_string(rank) + ", not 2";
      return std::nullopt;
    }
    const bool trans_b = layer.is("Gemm") && layer.attr_int("transB", 0) != 0;
    if (layer.is("Gemm") && layer.attr_int("transA", 0) != 0 && !backward_fold) {
      why = "transA=1: BN's channels would be A's axis 0, not its features";
      return std::nullopt;
    }
    l.P = dims[0];
    l.Q = dims[1];
    l.R = 1;
    l.p_is_output = trans_b;
    l.out_channels = trans_b ? l.P : l.Q;
    l.in_channels = trans_b ? l.Q : l.P;
    l.out_axis = trans_b ? 0 : 1;
    l.in_axis = trans_b ? 1 : 0;
    return l;
  }
  why = layer.op_type + " is not a layer qdqfold folds into";
  return std::nullopt;
}

}  // namespace qdqfold::folds
