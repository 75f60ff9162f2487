"""Re-parameterisable networks exported un-merged (issue 17): what the ordinary BN folds leave, what
merge_branches leaves, and onnxruntime's inference time for each, side by side.

The models are built with onnx.helper in the layout timm exports when reparameterize() was not called
(random weights, trained-looking BN statistics):
  repvgg_a0     RepVGG-A0: blocks Add(Conv3x3 -> BN, Conv1x1 -> BN[, BN(x)]) -> Relu, stages of 1, 2, 4, 14, 1
                blocks, widths 48, 48, 96, 192, 1280 (17 identity BNs of 61).
  mobileone_s0  MobileOne-S0: each block a depthwise 3x3 MobileOne block (4 conv branches, a 1x1 scale branch,
                identity BN at stride 1) then a pointwise one (4 branches, identity BN when widths agree);
                stages of 2, 8, 10, 1 blocks, widths 48, 128, 256, 1024.

    PYTHONPATH=build:python python bench/reparam.py [--runs 30] [--threads 1] [--size 224]

Columns: BN and Conv nodes in the original, after qdqfold's ordinary folds, and after --merge-branches;
the median time of one inference (batch 1) in onnxruntime (default optimisations: its own Conv+BN fusion
on) for the three models; the largest deviation of the merged model's output from the original's, in units
of the output's range.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native

F32 = TensorProto.FLOAT


class Builder:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def fresh(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def bn(self, x: str, c: int) -> str:
        p = self.fresh("bn")
        r = self.rng
        vals = [r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.1, r.standard_normal(c) * 0.1, r.uniform(0.5, 2.0, c)]
        names = [f"{p}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        self.inits += [numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(vals, names)]
        self.nodes.append(helper.make_node("BatchNormalization", [x, *names], [p + "_out"], name=p, epsilon=1e-5))
        return p + "_out"

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int, group: int = 1) -> str:
        p = self.fresh("conv")
        fan_in = cin // group * k * k
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        self.inits.append(numpy_helper.from_array(w, p + ".weight"))
        self.nodes.append(helper.make_node("Conv", [x, p + ".weight"], [p + "_out"], name=p, kernel_shape=[k, k],
                                           pads=[k // 2] * 4, strides=[stride, stride], group=group))
        return self.bn(p + "_out", cout)

    def add_relu(self, terms: list[str]) -> str:
        out = terms[0]
        for t in terms[1:]:
            p = self.fresh("add")
            self.nodes.append(helper.make_node("Add", [out, t], [p + "_out"], name=p))
            out = p + "_out"
        p = self.fresh("relu")
        self.nodes.append(helper.make_node("Relu", [out], [p + "_out"], name=p))
        return p + "_out"

    def head(self, x: str, c: int, classes: int = 1000) -> str:
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"))
        w = (self.rng.standard_normal((classes, c)) * 0.01).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, "head.fc.weight"),
                       numpy_helper.from_array(np.zeros(classes, np.float32), "head.fc.bias")]
        self.nodes.append(helper.make_node("Gemm", ["flat", "head.fc.weight", "head.fc.bias"], ["logits"], name="fc",
                                           transB=1))
        return "logits"

    def model(self, size: int, name: str) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, name, [helper.make_tensor_value_info("input", F32, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", F32, [1, 1000])], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m


def repvgg_a0(size: int) -> onnx.ModelProto:
    b = Builder(0)
    x, cin = "input", 3
    for blocks, width in zip([1, 2, 4, 14, 1], [48, 48, 96, 192, 1280]):
        for i in range(blocks):
            stride = 2 if i == 0 else 1
            terms = [b.conv_bn(x, cin, width, 3, stride), b.conv_bn(x, cin, width, 1, stride)]
            if stride == 1 and cin == width:
                terms.append(b.bn(x, cin))
            x, cin = b.add_relu(terms), width
    b.head(x, cin)
    return b.model(size, "repvgg_a0")


def mobileone_s0(size: int, branches: int = 4) -> onnx.ModelProto:
    b = Builder(1)

    def block(x: str, cin: int, cout: int, k: int, stride: int, group: int) -> str:
        terms = [b.conv_bn(x, cin, cout, k, stride, group) for _ in range(branches)]
        if k > 1:
            terms.append(b.conv_bn(x, cin, cout, 1, stride, group))  # the 1x1 scale branch
        if stride == 1 and cin == cout:
            terms.append(b.bn(x, cin))
        return b.add_relu(terms)

    x = block("input", 3, 48, 3, 2, 1)  # stem
    cin = 48
    for blocks, width in zip([2, 8, 10, 1], [48, 128, 256, 1024]):
        for i in range(blocks):
            stride = 2 if i == 0 else 1
            x = block(x, cin, cin, 3, stride, cin)  # depthwise
            x = block(x, cin, width, 1, 1, 1)  # pointwise
            cin = width
    b.head(x, cin)
    return b.model(size, "mobileone_s0")


def count(model: bytes | onnx.ModelProto, op: str) -> int:
    m = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
    return sum(n.op_type == op for n in m.graph.node)


def timed(model: bytes, feeds: dict, runs: int, threads: int) -> tuple[float, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    s = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    out = s.run(None, feeds)[0]
    for _ in range(3):
        s.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)}
    print(f"{'model':<14}{'BN orig/fold/merge':>20}{'Conv orig/fold/merge':>22}"
          f"{'ms orig/fold/merge':>24}{'merge/orig':>12}{'max dev':>10}")
    for name, make in [("repvgg_a0", repvgg_a0), ("mobileone_s0", mobileone_s0)]:
        original = make(args.size).SerializeToString()
        folded, _ = qdqfold_native.fold_with_report(original)
        merged, report = qdqfold_native.fold_with_report(original, merge_branches=True)
        assert all(m["folded"] for m in report.get("merges", [])), [m for m in report["merges"] if not m["folded"]]
        t0, y0 = timed(original, feeds, args.runs, args.threads)
        t1, _ = timed(folded, feeds, args.runs, args.threads)
        t2, y2 = timed(merged, feeds, args.runs, args.threads)
        dev = float(np.max(np.abs(y2.astype(np.float64) - y0))) / float(np.ptp(y0))
        bn = "/".join(str(count(m, "BatchNormalization")) for m in (original, folded, merged))
        conv = "/".join(str(count(m, "Conv")) for m in (original, folded, merged))
        ms = f"{t0:.1f}/{t1:.1f}/{t2:.1f}"
        print(f"{name:<14}{bn:>20}{conv:>22}{ms:>24}{t2 / t0:>12.2f}{dev:>10.1e}")


if __name__ == "__main__":
    main()
