"""A model past protobuf's 2 GB limit, saved with external data, folded file to file.

Builds `big.onnx` + `big.data` (2.4 GB: a Conv whose [24576, 24576, 1, 1] float32 weight is written out as
real zero bytes, not a sparse hole, so no tool can skip it, after a small Conv -> BN with random weights),
then times, each in a fresh child process (--repeat runs, the tools taking turns, medians) with its peak RSS from os.wait4 (see bench.py):

- `cp -r` of the model folder (the floor: both files copied);
- qdqfold in-process: `qdqfold_native.fold_file` timed around the call;
- qdqfold CLI: the whole `python -m qdqfold big.onnx -o out/big.onnx` process.

Then checks the output: no BatchNormalization left, the data file the same size (offsets kept), and the
small Conv's folded weight equal to numpy's W * a.

    python bench/big_external.py [--workdir /tmp/qdqfold-bench] [--native-path /tmp/build --native-path python]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench import child_env, machine_info, qdqfold_paths, run_process

BIG = 24576  # [BIG, BIG, 1, 1] float32 = 2.4 GB
EPSILON = float(np.float32(1e-5))


def external(name: str, dims: list[int], offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "big.data"), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def bn(prefix: str, channels: int, rng) -> list[TensorProto]:
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{name}") for name, v in
            (("gamma", rng.standard_normal(channels)), ("beta", rng.standard_normal(channels)),
             ("mean", rng.standard_normal(channels)), ("var", rng.uniform(0.5, 2.0, channels)))]


def build(directory: Path) -> np.ndarray:
    """Writes the model and its data file; returns the small Conv's weight."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((BIG, 3, 1, 1)).astype(np.float32)
    big_offset, big_length = 1 << 20, BIG * BIG * 4
    if not (directory / "big.data").exists() or (directory / "big.data").stat().st_size != big_offset + big_length:
        zeros = bytes(64 << 20)
        with open(directory / "big.data", "wb") as f:
            f.write(w1.tobytes())
            f.write(bytes(big_offset - w1.nbytes))
            for start in range(0, big_length, len(zeros)):
                f.write(zeros[: min(len(zeros), big_length - start)])
    inits = [external("w1", list(w1.shape), 0, w1.nbytes), external("w2", [BIG, BIG, 1, 1], big_offset, big_length),
             *bn("bn1", BIG, rng), *bn("bn2", BIG, rng)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "bn1_gamma", "bn1_beta", "bn1_mean", "bn1_var"], ["b1"]),
             helper.make_node("Conv", ["b1", "w2"], ["c2"], name="conv2"),
             helper.make_node("BatchNormalization", ["c2", "bn2_gamma", "bn2_beta", "bn2_mean", "bn2_var"], ["y"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, BIG, 1, 1])], inits)
    (directory / "big.onnx").write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                         .SerializeToString())
    return w1


def check(source: Path, output: Path, w1: np.ndarray) -> str:
    original = onnx.load(source / "big.onnx", load_external_data=False)
    folded = onnx.load(output / "big.onnx", load_external_data=False)
    left = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    data = output / "big.onnx.data"  # the output's data file is named after it
    same_size = data.stat().st_size == (source / "big.data").stat().st_size
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in original.graph.initializer if t.name.startswith("bn1")}
    a = p["bn1_gamma"] / np.sqrt(p["bn1_var"] + EPSILON)
    weight = next(t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[1])
    offset = int({e.key: e.value for e in weight.external_data}["offset"])
    stored = np.fromfile(data, dtype=np.float32, count=w1.size, offset=offset).reshape(w1.shape)
    exact = np.array_equal(stored, (w1.astype(np.float64) * a[:, None, None, None]).astype(np.float32))
    return f"BN left {left}, data file same size {same_size}, folded conv1 weight == numpy W * a: {exact}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qdqfold-bench"))
    parser.add_argument("--native-path", type=Path, action="append")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; the median is shown (default 3)")
    args = parser.parse_args()
    source, log_dir = args.workdir / "big-external", args.workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    w1 = build(source)
    env = child_env(qdqfold_paths(args.native_path))
    size_gb = sum(f.stat().st_size for f in source.iterdir()) / 1e9
    print(machine_info())
    print(f"big-external: {size_gb:.2f} GB (model + external data), Conv -> BN twice; one run each, fresh process")
    in_process = ("import json, sys, time, qdqfold_native; t = time.perf_counter(); "
                  "qdqfold_native.fold_file(sys.argv[1], sys.argv[2]); "
                  "print(json.dumps({'seconds': time.perf_counter() - t}))")
    runs = {
        "cp -r": ["cp", "-r", str(source), "{out}"],
        "qdqfold (in-process)": [sys.executable, "-c", in_process, str(source / "big.onnx"), "{out}/big.onnx"],
        "qdqfold (CLI)": [sys.executable, "-m", "qdqfold", str(source / "big.onnx"), "-o", "{out}/big.onnx", "-q"],
    }
    for f in source.iterdir():  # into the page cache, so that no tool pays for the first read from disk
        with open(f, "rb") as stream:
            while stream.read(1 << 24):
                pass
    print(f"{'tool':22s} {'process s':>9s} {'call s':>7s} {'peak RSS MB':>11s}  output   (median of {args.repeat}, "
          f"the tools taking turns)")
    results: dict[str, list] = {label: [] for label in runs}
    verdicts: dict[str, str] = {}
    out = args.workdir / "big-external-out"
    for _ in range(args.repeat):
        for label, cmd in runs.items():
            shutil.rmtree(out, ignore_errors=True)
            if label != "cp -r":
                out.mkdir()
            proc = run_process([c.replace("{out}", str(out)) for c in cmd], env, 1800, log_dir / "big-external.log")
            if proc.status != "ok":
                verdicts[label] = f"{proc.status}: {proc.reason()}"
                continue
            lines = proc.log.read_text().splitlines()
            call = json.loads(lines[-1])["seconds"] if label == "qdqfold (in-process)" else None
            results[label].append((proc.wall, call, proc.maxrss_mb))
            if label != "cp -r":
                verdicts.setdefault(label, check(source, out, w1))
    for label, runs_of_tool in results.items():
        if not runs_of_tool:
            print(f"{label:22s} {verdicts.get(label, 'no run')}")
            continue
        wall = statistics.median(r[0] for r in runs_of_tool)
        calls = [r[1] for r in runs_of_tool if r[1] is not None]
        call_text = f"{statistics.median(calls):7.2f}" if calls else f"{'':7s}"
        peak = max(r[2] for r in runs_of_tool)
        print(f"{label:22s} {wall:9.2f} {call_text} {peak:11.0f}  {verdicts.get(label, '')}")
    shutil.rmtree(args.workdir / "big-external-out", ignore_errors=True)


if __name__ == "__main__":
    main()
