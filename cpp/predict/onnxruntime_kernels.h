// One predictor of the integer kernels onnxruntime's CPU provider forms from a QDQ graph (ORT_ENABLE_ALL, x86-64),
// read statically from the rules of its graph transformers. Two callers use it, so their lists agree:
//
//   analysis/integer_kernels.cpp   the static saturation check examines the Conv / MatMul / Gemm it selects;
//   targets/onnxruntime_kernels.cpp  the deployment target's report["target_kernels"] before / after.
//
// The layer (tests/test_layering.py): `predict` sits below the sibling rows targets | analysis and above folds;
// it reads the graph only (graph/, wire/), edits nothing and needs none of the folds.
//
// What onnxruntime does, in its order, and where each rule is modelled (onnxruntime/core/optimizer/...):
//
//   Level 1, rewrites (ort_rewrites.cpp):
//     EnsureUniqueDQForNodeUnit   a DequantizeLinear read by several nodes (or also a graph output) is copied, one
//         per reader: its QuantizeLinear then has several readers.
//     ReluQuantFusion             Relu -> Q removed when the Relu has one reader, is no graph output, and Q's
//         explicit zero point is -128 (int8) / 0 (uint8).
//     ClipQuantFusion             Clip -> Q removed when the Clip's constant [min, max] holds Q's range
//         [s (qmin - z), s (qmax - z)] within float epsilon (constant scalar scale and zero point).
//     QDQPropagationTransformer   a scalar Q after MaxPool / Reshape / Transpose / Squeeze / Unsqueeze / Slice is
//         copied back to the node's output; a DQ before such a chain forward to the next node's input.
//     WeightBiasQuantization      a constant rank-1 float bias of Conv / Gemm becomes int32 behind a DQ when input
//         0 is a per-tensor DQ, the output reaches one Q (through Relu / Clip only, no branch) and the weight DQ
//         is per tensor or per channel on the output axis.
//   Level 2:
//     QDQS8ToU8Transformer (x86-64)  an int8 Q -> DQ pair becomes uint8 when the Q has one reader, that DQ, is no
//         graph output, and both have explicit equal scalar int8 zero points. Weights (DQ of a constant) keep
//         their type.
//     QDQSelectorActionTransformer (qdq_selectors.cc)  a node becomes a kernel when every input comes from a DQ
//         and its one output goes to exactly one Q and is no graph output (Q optional for MatMul / Gemm); a single
//         Relu / Clip reader with one reader of its own must be made redundant by that Q (IsClipMadeRedundantByQ,
//         rounded, not the Level 1 epsilon rule), else nothing forms. Types: Conv / MatMul need a uint8 input on
//         x86-64 (int8 is not allowed there), input type = output type; Gemm int8 A needs int8 B; Add / Mul /
//         Concat one type throughout; a bias DQ reads int32; Gemm's beta is 1.
//   An integer op between Q and DQ (Q -> Clip(uint8) -> DQ) is just a node on an integer tensor: the Q's reader
//   is no DQ (so an int8 pair there is not converted), and the DQ after it is an ordinary DQ.
//
// A prediction, not a measurement: tests/test_kernel_predictor.py checks it against the kernels in the model
// onnxruntime saves (optimized_model_filepath) on a family of graphs, one per rule. Not modelled: a float weight
// without a DQ (WeightBiasQuantization quantizes it, per tensor, itself), functions (inlined by onnxruntime first),
// ARM (int8 allowed, no S8 -> U8 conversion), 16-bit and 4-bit types (not formed on the CPU provider).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "../graph/graph.h"

namespace qdqfold::predict {

// What onnxruntime makes of one node.
struct Kernel {
  // QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm, QLinearAdd, QLinearMul, QLinearConcat; "" stays float.
  std::string op;
  int input_dq = -1;   // Conv / MatMul / Gemm: the DequantizeLinear of input 0 (before any propagation chain)
  int weight_dq = -1;  // and of input 1
  int32_t input_type = 0;   // element type the kernel reads for input 0 (after QDQS8ToU8: uint8 for a converted pair)
  int32_t weight_type = 0;  // and for input 1 (weights keep theirs)
};

// Node `node` of `g`.
Kernel select_kernel(graph::Graph& g, int node);

// Every kernel op, counted over the model's graphs (functions excepted), each listed, 0 included.
std::map<std::string, int64_t> count_kernels(graph::Model& model);

}  // namespace qdqfold::predict
