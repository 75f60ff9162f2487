// Where a layer's output and input channels live in its weight tensor. Every layer qdqfold folds into is
// viewed as a weight of shape [P, Q, R] (R = product of the kernel dims, 1 for Gemm/MatMul), with the
// output and input channel of element (p, q, r) given by:
//   Conv          W [M, C/g, k...]   p = output channel o, q = input channel within o's group
//   ConvTranspose W [C, M/g, k...]   p = input channel c,  q = output channel within c's group
//   Gemm transB=1 B [N, K]           p = output o, q = input k
//   Gemm transB=0 B [K, N], MatMul   p = input k,  q = output o
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "graph/graph.h"
#include "kernels/per_channel.h"

namespace qdqfold::folds {

struct WeightLayout {
  int64_t P = 0, Q = 0, R = 1;
  bool p_is_output = true;  // Conv, Gemm transB=1: p indexes output channels
  int64_t groups = 1;
  int64_t out_channels = 0, in_channels = 0;
  int out_axis = 0;   // the weight axis that holds (part of) the output channel: 0 or 1
  int in_axis = 1;

  // Output and input channel of weight element (p, q, *).
  int64_t output_of(int64_t p, int64_t q) const {
    if (p_is_output) return p;
    return groups == 1 ? q : (p / (P / groups)) * Q + q;
  }
  int64_t input_of(int64_t p, int64_t q) const {
    if (!p_is_output) return p;
    return groups == 1 ? q : (p / (P / groups)) * Q + q;
  }

  // The weight viewed for kernels/per_channel.h, channel = output channel or input channel of each element.
  kernels::ChannelAxis output_axis() const {
    if (p_is_output) return {1, 1, P, Q * R};
    return {groups, P / groups, Q, R};
  }
  kernels::ChannelAxis input_axis() const {
    if (!p_is_output) return {1, 1, P, Q * R};
    return {groups, P / groups, Q, R};
  }
};

// The layout of `layer`'s weight (input 1) with dims `weight_dims`, or nullopt with `why` set when the layer
// is not one qdqfold folds into (unsupported op or attributes, shapes that do not fit together).
// `backward_fold`: the caller folds a BN that reads the layer's output (layer -> BN). Such a fold only scales
// the weight's output channels, which are B's output axis whatever A's layout, so a Gemm with transA=1 is
// accepted. A forward fold (BN -> layer) reads A's features, which transA=1 puts on A's axis 0: refused.
std::optional<WeightLayout> weight_layout(const graph::Node& layer, const std::vector<int64_t>& weight_dims,
                                          std::string& why, bool backward_fold = false);

}  // namespace qdqfold::folds
