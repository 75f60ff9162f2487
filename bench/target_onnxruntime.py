"""The onnxruntime deployment target (issue 22): integer kernels and latency, QAT export vs folded + target vs float.

For each model: onnxruntime's integer kernels (QLinearConv, ...) in the model it saves at its default level, for
the QAT export, the fold alone and the fold with --target onnxruntime, and the predicted counts from the report;
then the latency of the QAT export, the folded + targeted model and the float model (the QAT export with every
Q -> DQ pair removed, BN kept: onnxruntime fuses Conv + BN itself) at onnxruntime's default level, one thread,
in interleaved rounds (each round runs every model; the figure is the median over rounds of each round's median),
reported as ratios within the run.

    python bench/target_onnxruntime.py                     # the generated ModelOpt-style MobileNetV2 (width 1, 224)
    python bench/target_onnxruntime.py model.onnx ...      # QAT exports of your own
    python bench/target_onnxruntime.py --rounds 7 --runs 20 --json out.json

Outputs are not compared here: at the default level onnxruntime's integer kernels saturate on AVX2-only CPUs
(issue 21); tests/test_target_onnxruntime.py checks exactness with optimisations off.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import qdqfold_native

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "MatMulIntegerToFloat")


def session(data: bytes, saved: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if saved:
        so.optimized_model_filepath = saved
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def kernels(data: bytes) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        session(data, path)
        counts = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    return {k: counts[k] for k in KERNELS if counts[k]}


def float_twin(data: bytes) -> bytes:
    """The QAT export with every QuantizeLinear -> DequantizeLinear pair removed (the float network it trains)."""
    model = onnx.load_from_string(data)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    rename = {}
    drop = set()
    for n in g.node:
        if n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                rename[n.output[0]] = q.input[0]
                drop.update({id(n), id(q)})
    keep = [n for n in g.node if id(n) not in drop]
    for n in keep:
        for i, v in enumerate(n.input):
            while v in rename:
                v = rename[v]
            n.input[i] = v
    del g.node[:]
    g.node.extend(keep)
    return model.SerializeToString()


def feeds_for(sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {i.name: rng.standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in i.shape]).astype(np.float32)
            for i in sess.get_inputs()}


def latency(models: dict[str, bytes], rounds: int, runs: int) -> dict[str, float]:
    sessions = {name: session(data) for name, data in models.items()}
    feeds = feeds_for(next(iter(sessions.values())))
    for s in sessions.values():  # warm up
        for _ in range(3):
            s.run(None, feeds)
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, s in sessions.items():
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feeds)
                times.append(time.perf_counter() - t)
            per_round[name].append(statistics.median(times))
    return {name: statistics.median(v) for name, v in per_round.items()}


def bench(label: str, data: bytes, rounds: int, runs: int) -> dict:
    folded = qdqfold_native.fold(data)
    targeted, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    given = sum(e["folded"] for e in report["target_layers"])
    left = collections.Counter(e["code"] for e in report["target_layers"] if not e["folded"])
    result = {
        "model": label,
        "bytes": {"qat": len(data), "targeted": len(targeted)},
        "layers": {"given_output_quantizers": given, "left": dict(left)},
        "kernels": {"qat": kernels(data), "folded": kernels(folded), "targeted": kernels(targeted),
                    "predicted_before": {k: v for k, v in report["target_kernels"]["before"].items() if v},
                    "predicted_after": {k: v for k, v in report["target_kernels"]["after"].items() if v}},
    }
    # --requantize-residuals (approximate): the residual Adds' float inputs rounded too.
    requantized = qdqfold_native.fold(data, target="onnxruntime", requantize_residuals=True)
    result["kernels"]["requantized"] = kernels(requantized)
    # --store-float-weights (exact): the layers left in float read their weights as float constants.
    float_weights = qdqfold_native.fold(data, target="onnxruntime", store_float_weights=True)
    times = latency({"qat": data, "targeted": targeted, "float_weights": float_weights, "requantized": requantized,
                     "float": float_twin(data)}, rounds, runs)
    result["latency_ms"] = {k: round(v * 1e3, 3) for k, v in times.items()}
    result["ratios"] = {"qat / targeted": round(times["qat"] / times["targeted"], 3),
                        "float / targeted": round(times["float"] / times["targeted"], 3),
                        "float / requantized": round(times["float"] / times["requantized"], 3),
                        "float / float_weights": round(times["float"] / times["float_weights"], 3)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="QAT exports (default: the generated ModelOpt-style MobileNetV2)")
    parser.add_argument("--width", type=float, default=1.0, help="generated MobileNetV2's width (default 1)")
    parser.add_argument("--size", type=int, default=224, help="generated MobileNetV2's input side (default 224)")
    parser.add_argument("--resnet", action="store_true", help="also the generated ModelOpt-style ResNet-18 "
                        "(width 1, --size)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10, help="runs per model per round")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    inputs = [(p, Path(p).read_bytes()) for p in args.models]
    if not inputs:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers.exporters.modelopt_qat import mobilenet_v2_qat

        model = mobilenet_v2_qat(width=args.width, size=args.size, classes=1000)
        inputs = [(f"generated ModelOpt-style MobileNetV2 (width {args.width}, {args.size}x{args.size})",
                   model.SerializeToString())]
        if args.resnet:
            from helpers.exporters.modelopt_qat import resnet_qat

            inputs.append((f"generated ModelOpt-style ResNet-18 ({args.size}x{args.size})",
                           resnet_qat(width=1.0, size=args.size, classes=1000).SerializeToString()))
    print(f"onnxruntime {ort.__version__}, one thread, ORT_ENABLE_ALL, {args.rounds} rounds x {args.runs} runs")
    results = []
    for label, data in inputs:
        r = bench(label, data, args.rounds, args.runs)
        results.append(r)
        k = r["kernels"]
        print(f"\n{label}")
        print(f"  layers given output quantizers: {r['layers']['given_output_quantizers']}, left: {r['layers']['left']}")
        print(f"  integer kernels (onnxruntime): QAT {k['qat']} | folded {k['folded']} | targeted {k['targeted']}"
              f" | requantize_residuals {k['requantized']}")
        print(f"  predicted by the report:      before {k['predicted_before']} | after {k['predicted_after']}")
        print(f"  size: {r['bytes']['qat']} -> {r['bytes']['targeted']} bytes")
        print(f"  latency ms: {r['latency_ms']}; QAT / targeted {r['ratios']['qat / targeted']}x, "
              f"float / targeted {r['ratios']['float / targeted']}x, float / requantized "
              f"{r['ratios']['float / requantized']}x, float / (targeted + --store-float-weights) "
              f"{r['ratios']['float / float_weights']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
