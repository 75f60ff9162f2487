"""Child-process side of bench.py: every command here runs in a fresh interpreter.

    python tools.py run TOOL SRC DST RESULT.json     run one tool, file in -> file out
    python tools.py reference MODEL REF.npz RESULT.json
                                                     seeded input and onnxruntime outputs of MODEL
    python tools.py verify MODEL REF.npz RESULT.json BatchNormalization count and max |deviation|
    python tools.py probe MODULE DIST                print {"version", "file"} if MODULE imports

``run`` imports the tool first, then times only the work (read, transform, write), and writes
``{"seconds": ..., "extra": {...}}`` to RESULT.json; ``extra`` holds a tool's own side timings. Tools print what they like to stdout; bench.py
sends it to a log file.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

Runner = Callable[[str, str], dict]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


# -- tools: each factory imports its tool and returns run(src, dst) -> extra info ------------

def copy_tool() -> Runner:
    def run(src: str, dst: str) -> dict:
        _write(dst, _read(src))
        return {}
    return run


def qdqfold_tool() -> Runner:
    import qdqfold_native

    def run(src: str, dst: str) -> dict:
        # File -> file the way the CLI does it: the input mapped, the output written in one pass.
        _, seconds = _timed(lambda: qdqfold_native.fold_file(src, dst))
        # Not part of the file -> file time: fold() on bytes in memory against the floor for making a
        # new buffer of the model's size, one fresh copy of the bytes, for the fold()/copy ratio. Three
        # alternating pairs, medians: a single call of each is at the mercy of a noisy machine. Each result
        # is dropped before the next call, so the peak stays input + output.
        data = _read(src)
        fold_times, copy_times = [], []
        for _ in range(3):
            out, t = _timed(lambda: qdqfold_native.fold(data))
            del out
            fold_times.append(t)
            out, t = _timed(lambda: bytearray(data))
            del out
            copy_times.append(t)
        return {"seconds": seconds, "fold_s": statistics.median(fold_times), "copy_s": statistics.median(copy_times)}
    return run


def onnxruntime_tool() -> Runner:
    import onnxruntime as ort

    def run(src: str, dst: str) -> dict:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = dst
        ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
        return {}
    return run


def onnxslim_tool() -> Runner:
    import onnx
    import onnxslim

    def run(src: str, dst: str) -> dict:
        onnx.save(onnxslim.slim(src), dst)
        return {}
    return run


def onnxsim_tool() -> Runner:
    import onnx
    import onnxsim

    def run(src: str, dst: str) -> dict:
        model, _ = onnxsim.simplify(onnx.load(src))
        onnx.save(model, dst)
        return {}
    return run


def onnxoptimizer_tool() -> Runner:
    import onnx
    import onnxoptimizer

    def run(src: str, dst: str) -> dict:
        onnx.save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)
        return {}
    return run


def onnxscript_tool() -> Runner:
    import onnx_ir
    import onnxscript.optimizer

    def run(src: str, dst: str) -> dict:
        # onnxscript's own IR round trip (load -> optimize in place -> save) is its fast path.
        model = onnx_ir.load(src)
        onnxscript.optimizer.optimize(model)
        onnx_ir.save(model, dst)
        return {}
    return run


TOOLS: dict[str, Callable[[], Runner]] = {
    "copy": copy_tool,
    "qdqfold": qdqfold_tool,
    "onnxruntime": onnxruntime_tool,
    "onnxslim": onnxslim_tool,
    "onnxsim": onnxsim_tool,
    "onnxoptimizer": onnxoptimizer_tool,
    "onnxscript": onnxscript_tool,
}


# -- reference outputs and verification -----------------------------------------------------

def _run_unoptimized(model_path: str, feeds: dict) -> list:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _graph_stats(model_path: str) -> dict:
    import onnx

    def nodes(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                    yield from nodes(sub)

    graph = onnx.load(model_path, load_external_data=False).graph
    all_nodes = list(nodes(graph))
    initializers = {t.name for t in graph.initializer}
    inputs = [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in graph.input
              if i.name not in initializers]
    # Per-channel affines written as elementwise ops (FrozenBatchNorm2d's Mul/Add, layer scale): a
    # Mul/Add/Sub/Div of a layer's output by a constant (main graph).
    producers = {o: n.op_type for n in graph.node for o in n.output}
    constants = initializers | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    layers = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Mul", "Add", "Sub", "Div"}
    affine = sum(n.op_type in ("Mul", "Add", "Sub", "Div") and len(n.input) == 2 and
                 any(producers.get(x) in layers for x in n.input) and any(x in constants for x in n.input)
                 for n in graph.node)
    return {
        "nodes": len(all_nodes),
        "bn": sum(n.op_type == "BatchNormalization" for n in all_nodes),
        "affine": affine,
        "inputs": inputs,
    }


def reference(model_path: str, npz_path: str) -> dict:
    """Run MODEL unoptimized on a seeded random input; keep the input and outputs in NPZ."""
    import numpy as np

    stats = _graph_stats(model_path)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in stats["inputs"]}
    outputs = _run_unoptimized(model_path, feeds)
    np.savez(npz_path, **{f"in:{k}": v for k, v in feeds.items()},
             **{f"out:{i}": v for i, v in enumerate(outputs)})
    return {"nodes": stats["nodes"], "bn": stats["bn"], "affine": stats["affine"]}


def verify(model_path: str, npz_path: str) -> dict:
    """BatchNormalization nodes left in MODEL and its max |output - reference output|."""
    import numpy as np

    ref = np.load(npz_path)
    feeds = {k[3:]: ref[k] for k in ref.files if k.startswith("in:")}
    expected = [ref[f"out:{i}"] for i in range(sum(k.startswith("out:") for k in ref.files))]
    outputs = _run_unoptimized(model_path, feeds)
    if len(outputs) != len(expected):
        raise RuntimeError(f"{len(outputs)} outputs, expected {len(expected)}")
    deviation = max(float(np.max(np.abs(o.astype(np.float64) - e))) for o, e in zip(outputs, expected))
    stats = _graph_stats(model_path)
    return {"bn_left": stats["bn"], "affine_left": stats["affine"], "max_dev": deviation}


def probe(module: str, dist: str) -> dict:
    import importlib
    import importlib.metadata

    mod = importlib.import_module(module)
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(mod, "__version__", "?")
    return {"version": version, "file": getattr(mod, "__file__", None)}


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "run":
        name, src, dst, result = args
        run = TOOLS[name]()
        extra, seconds = _timed(lambda: run(src, dst))
        # A tool that also times something besides its work reports its own work time.
        out = {"seconds": extra.pop("seconds", seconds), "extra": extra}
    elif command in ("reference", "verify"):
        model, npz, result = args
        out = (reference if command == "reference" else verify)(model, npz)
    elif command == "probe":
        print(json.dumps(probe(*args)))
        return
    else:
        raise SystemExit(f"unknown command {command!r}")
    Path(result).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
