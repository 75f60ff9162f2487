// The pieces of the onnxruntime target's rewrite that its parts share (targets/onnxruntime.h): an activation
// quantizer's parameters, the ops that commute with rounding, and the one way a Q -> DQ pair is added. Defined in
// onnxruntime_output_quantizers.cpp, where the arithmetic that makes them exact is written out.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "core/report.h"
#include "graph/graph.h"

namespace qdqfold::targets::detail {

// One activation quantizer's parameters, as far as the rewrite needs them.
struct Quantizer {
  int node = -1;  // the QuantizeLinear (or DequantizeLinear) they were read from; -1 for none
  std::string scale, zero;  // input names ("" when the zero point is absent)
  int32_t scale_type = 0, zero_type = 0;
  std::string scale_raw, zero_raw;  // the constants' element bytes
  int64_t output_dtype = 0, saturate = 1;
  std::string domain;
  bool same_as(const Quantizer& o) const {
    return scale_type == o.scale_type && zero_type == o.zero_type && scale_raw == o.scale_raw &&
           zero_raw == o.zero_raw && output_dtype == o.output_dtype && saturate == o.saturate && domain == o.domain;
  }
};

BatchNormRecord kept(BatchNormRecord r, const char* code, std::string message);
std::string describe(const graph::Graph& g, int node);
// The parameters of per-tensor QuantizeLinear `q` with constant scale and zero point for which Q(DQ(q)) = q
// holds (fact (1)), or a sentence saying why not. A DequantizeLinear is read the same way (its zero point must
// be given: its integer type is the zero point's).
std::variant<Quantizer, std::string> read_quantizer(graph::Graph& g, int q);
// True for an op through which the rewrite stays exact, reading its input 0.
bool commutes(graph::Graph& g, int node);
// A Cast to float32 whose input is float32 (an identity).
bool identity_cast(graph::Graph& g, const graph::Node& n);
bool dequantized(const graph::Graph& g, const std::string& value);
// Q(s, z) -> DQ(s, z) from `in` to `out` (new nodes, placed before node `before`), with q's parameters; with
// `private_constants`, read from new copies of the scale and zero point.
void add_rounding(graph::Model& model, graph::Graph& g, const Quantizer& q, const std::string& in,
                  const std::string& out, const std::string& base, int before, std::vector<std::string>& new_tensors,
                  bool private_constants = false);

}  // namespace qdqfold::targets::detail
