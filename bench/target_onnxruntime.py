"""The onnxruntime deployment target (issue 22): integer kernels, latency and deviation, QAT export vs fold vs target.

For each model, every variant is made by qdqfold_native.fold from the QAT export:

- ``qat``: the export itself; ``folded``: the fold alone; ``target``: ``target="onnxruntime"``;
- ``target_sfw``: the target with ``store_float_weights=True`` (the layers left in float read float weights);
- ``requant``: the target with ``requantize_residuals=True`` (APPROXIMATE); ``requant_sfw``: both options;
- ``float``: the float twin (every Q -> DQ pair removed and every constant DequantizeLinear replaced by the float
  constant it computes, BN kept: onnxruntime fuses Conv + BN itself).

Per model it reports: the integer kernels (every QLinear* op, QGemm, MatMulIntegerToFloat, ...) and the
DequantizeLinear / QuantizeLinear / Clip / Relu nodes left in the model onnxruntime saves at its default level,
the report's predicted kernels, the latency of every variant at onnxruntime's default level, one thread, in
interleaved rounds (each round runs every variant; the figure is the median over rounds of each round's median)
as ratios within the run, and the deviation of each targeted variant against the QAT export with
optimisations off (qdqfold.verify.verify: exact within the rounding twin, or approximate with its figures).
It also runs the static saturation check (qdqfold.kernels) on every targeted variant and, with ``--qemu``,
runs the targeted variants at the default level on an emulated AVX2-only CPU (qemu-x86_64 -cpu EPYC-Rome) and
compares their outputs with this CPU's (bench/target_onnxruntime_cpu.py).

    python bench/target_onnxruntime.py                     # the generated ModelOpt-style MobileNetV2 (width 1, 224)
    python bench/target_onnxruntime.py model.onnx ...      # QAT exports of your own
    python bench/target_onnxruntime.py --rounds 7 --runs 20 --json out.json --qemu
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
from onnx import numpy_helper

import qdqfold_native

sys.path.insert(0, str(Path(__file__).resolve().parent))
from target_onnxruntime_cpu import machine, on_avx2_only, session_options  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Integer kernels onnxruntime forms on the CPU (any op whose name starts with QLinear counts too), and the float
# nodes worth watching beside them.
KERNELS = ("QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul")
WATCH = ("DequantizeLinear", "QuantizeLinear", "Clip", "Relu")
VARIANTS = {"folded": {}, "target": {"target": "onnxruntime"},
            "target_sfw": {"target": "onnxruntime", "store_float_weights": True},
            "requant": {"target": "onnxruntime", "requantize_residuals": True},
            "requant_sfw": {"target": "onnxruntime", "requantize_residuals": True, "store_float_weights": True}}
TARGETED = ("target", "target_sfw", "requant", "requant_sfw")
TIMED = ("qat", "float", "folded", "target", "target_sfw", "requant", "requant_sfw")


def session(data: bytes, saved: str | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(data, session_options(saved), providers=["CPUExecutionProvider"])


def optimized_ops(data: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """(integer kernels, watched float nodes) in the model onnxruntime saves at its default level."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        session(data, path)
        counts = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    integer = {k: v for k, v in sorted(counts.items()) if k.startswith("QLinear") or k in KERNELS}
    return integer, {k: counts[k] for k in WATCH if counts[k]}


def float_twin(data: bytes) -> bytes:
    """The float network the QAT export trains: every QuantizeLinear -> DequantizeLinear pair removed, and every
    DequantizeLinear of an initializer (stored integer weights: NNCF's ONNX backend, onnxruntime's quantizer)
    replaced by the float constant it computes."""
    model = onnx.load_from_string(data)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    rename, drop, new_inits = {}, set(), []
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        q = producer.get(n.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            rename[n.output[0]] = q.input[0]
            drop.update({id(n), id(q)})
        elif n.input[0] in inits and all(i in inits for i in n.input[1:] if i):
            x = numpy_helper.to_array(inits[n.input[0]]).astype(np.int64)
            s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            z = numpy_helper.to_array(inits[n.input[2]]).astype(np.int64) if len(n.input) > 2 and n.input[2] \
                else np.zeros_like(s, np.int64)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if s.ndim == 1 and x.ndim > 1:
                shape = [1] * x.ndim
                shape[axis % x.ndim] = -1
                s, z = s.reshape(shape), z.reshape(shape)
            new_inits.append(numpy_helper.from_array(((x - z).astype(np.float32) * s).astype(np.float32),
                                                     n.output[0]))
            drop.add(id(n))
    keep = [n for n in g.node if id(n) not in drop]
    for n in keep:
        for i, v in enumerate(n.input):
            while v in rename:
                v = rename[v]
            n.input[i] = v
    for o in g.output:  # a graph output behind a pair keeps its name
        v = o.name
        while v in rename:
            v = rename[v]
        if v != o.name:
            keep.append(onnx.helper.make_node("Identity", [v], [o.name]))
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    return model.SerializeToString()


def feeds_for(sess: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
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


def deviation(data: bytes, variant: bytes, report: dict) -> dict:
    """qdqfold.verify.verify of the variant against the QAT export, optimisations off: the verdict, and per the
    worst output its largest difference as a share of its range beside the rounding twin's (the floor)."""
    from qdqfold.verify import verify

    result = verify(data, variant, report=report, levels=("off",))
    worst = max(result.outputs, key=lambda o: o.of_range)
    return {"verdict": result.verdict, "outputs": sorted({o.verdict for o in result.outputs}),
            "of_range": worst.of_range, "floor_of_range": worst.floor_of_range,
            "max_abs": worst.max_abs, "moved": worst.moved, "elements": worst.elements, "snr_db": worst.snr_db,
            "certificates": len(result.certificates),
            "certificates_failed": sum(not c.passed for c in result.certificates)}


def same_as_fold(folded: bytes, variant: bytes, feeds: dict) -> bool:
    """The target's own claim: with optimisations (and prepacking) off the variant computes the fold alone's outputs,
    bit for bit."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    # Prepacking off: a Gemm with a constant float weight (--store-float-weights) is prepacked and accumulates in
    # another order than one whose weight a DequantizeLinear computes; the values it reads are the same.
    so.add_session_config_entry("session.disable_prepacking", "1")
    runs = [ort.InferenceSession(m, so, providers=["CPUExecutionProvider"]).run(None, feeds) for m in (folded, variant)]
    return all(np.array_equal(a, b) for a, b in zip(*runs))


def saturation(data: bytes) -> dict:
    """The static check (qdqfold.kernels): integer layers onnxruntime will run, and those that can saturate on an
    x86-64 CPU without VNNI."""
    from qdqfold import kernels

    layers = kernels.check_bytes(data)
    return {"integer_layers": len(layers), "can_saturate": sum(lay.can_saturate for lay in layers),
            "flagged": [lay.node for lay in layers if lay.can_saturate]}


def bench(label: str, data: bytes, rounds: int, runs: int, check: bool) -> tuple[dict, dict[str, bytes]]:
    models, reports = {"qat": data}, {}
    for name, options in VARIANTS.items():
        models[name], reports[name] = qdqfold_native.fold_with_report(data, **options)
    models["float"] = float_twin(data)
    report = reports["target"]
    left = collections.Counter(e["code"] for e in report.get("target_layers", []) if not e["folded"])
    result = {
        "model": label,
        "bytes": {k: len(models[k]) for k in ("qat", "target", "target_sfw")},
        "layers": {"given_output_quantizers": sum(e["folded"] for e in report.get("target_layers", [])),
                   "left": dict(left)},
        "kernels": {}, "float_nodes": {},
        "predicted": {k: {op: v for op, v in report.get("target_kernels", {}).get(k, {}).items() if v}
                      for k in ("before", "after")},
    }
    for name in ("qat", "folded", *TARGETED, "float"):
        result["kernels"][name], result["float_nodes"][name] = optimized_ops(models[name])
    times = latency({k: models[k] for k in TIMED}, rounds, runs)
    result["latency_ms"] = {k: round(v * 1e3, 3) for k, v in times.items()}
    result["qat / x"] = {k: round(times["qat"] / times[k], 3) for k in TIMED if k != "qat"}
    result["float / x"] = {k: round(times["float"] / times[k], 3) for k in TIMED if k != "float"}
    if check:
        result["deviation_off"] = {k: deviation(data, models[k], reports[k]) for k in TARGETED}
        feeds = feeds_for(session(data), 1)
        result["same_as_fold_off"] = {k: same_as_fold(models["folded"], models[k], feeds) for k in TARGETED}
        result["saturation"] = {k: saturation(models[k]) for k in TARGETED}
    return result, models


def _print(r: dict) -> None:
    print(f"\n{r['model']}")
    print(f"  layers given output quantizers: {r['layers']['given_output_quantizers']}, left: {r['layers']['left']}")
    for name, k in r["kernels"].items():
        print(f"  {name:12} kernels {k}  float nodes {r['float_nodes'][name]}")
    print(f"  predicted by the report: before {r['predicted']['before']} | after {r['predicted']['after']}")
    print(f"  bytes: {r['bytes']}")
    print(f"  latency ms: {r['latency_ms']}")
    print(f"  QAT / x: {r['qat / x']}")
    print(f"  float / x: {r['float / x']}")
    for name, d in r.get("deviation_off", {}).items():
        floor = "-" if d["floor_of_range"] is None else f"{d['floor_of_range']:.3g}"
        print(f"  {name:12} vs QAT (off): {d['verdict']} (outputs {d['outputs']}), bit for bit as the fold alone: "
              f"{r['same_as_fold_off'][name]}; worst output {d['of_range']:.3g} of range (max abs "
              f"{d['max_abs']:.3g}, floor {floor}), moved {d['moved']}/{d['elements']}, certificates "
              f"{d['certificates'] - d['certificates_failed']}/{d['certificates']}")
    for name, s in r.get("saturation", {}).items():
        print(f"  {name:12} static check: {s['integer_layers']} integer layers, {s['can_saturate']} can saturate "
              f"without VNNI")
    for name, q in r.get("avx2_only", {}).items():
        print(f"  {name:12} default level, AVX2-only (qemu) vs this CPU: {q}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="QAT exports (default: the generated ModelOpt-style MobileNetV2)")
    parser.add_argument("--width", type=float, default=1.0, help="generated MobileNetV2's width (default 1)")
    parser.add_argument("--size", type=int, default=224, help="generated MobileNetV2's input side (default 224)")
    parser.add_argument("--resnet", action="store_true", help="also the generated ModelOpt-style ResNet-18 "
                        "(width 1, --size)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10, help="runs per model per round")
    parser.add_argument("--no-check", action="store_true", help="skip the deviation and saturation checks")
    parser.add_argument("--qemu", nargs="?", const="qemu-x86_64", metavar="QEMU",
                        help="also run the targeted variants on an emulated AVX2-only CPU (qemu-x86_64 -cpu "
                        "EPYC-Rome) at the default level and compare outputs with this CPU's")
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
    host = machine()
    print(f"onnxruntime {ort.__version__}, one thread, ORT_ENABLE_ALL, {args.rounds} rounds x {args.runs} runs; "
          f"{host['model_name']}, flags {host['flags']}")
    results = []
    for label, data in inputs:
        r, models = bench(label, data, args.rounds, args.runs, not args.no_check)
        if args.qemu:
            r["avx2_only"] = on_avx2_only(args.qemu, {k: models[k] for k in TARGETED}, feeds_for(session(data)))
        results.append(r)
        _print(r)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": host, "onnxruntime": ort.__version__, "rounds": args.rounds,
                                               "runs": args.runs, "models": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
