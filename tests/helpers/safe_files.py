"""Builders and checks of the safe-files tests (test_safe_files*.py, test_file_promises.py): Conv -> BN chains
with external data at chosen locations, the CLI as a process, one-line errors, directory snapshots."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers.onnxrt import assert_same_outputs


def chain(seed: int, layers: int = 2, channels: int = 8, size: int = 6) -> onnx.ModelProto:
    """Conv -> BN -> Relu, `layers` times; weights w0, w1, ... differ with `seed`."""
    rng = np.random.default_rng(seed)
    c = channels
    inits, nodes, x = [], [], "x"
    for k in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), f"w{k}"))
        for name, value in (("g", rng.uniform(0.5, 2, c)), ("b", rng.standard_normal(c)), ("m", rng.standard_normal(c)),
                            ("v", rng.uniform(0.5, 2, c))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}{k}"))
        nodes += [helper.make_node("Conv", [x, f"w{k}"], [f"c{k}"], pads=[1, 1, 1, 1], name=f"conv{k}"),
                  helper.make_node("BatchNormalization", [f"c{k}", f"g{k}", f"b{k}", f"m{k}", f"v{k}"], [f"n{k}"],
                                   name=f"bn{k}"),
                  helper.make_node("Relu", [f"n{k}"], [f"r{k}"])]
        x = f"r{k}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_external(model: onnx.ModelProto, path: Path, locations: dict[str, str]) -> onnx.ModelProto:
    """Saves `model` at `path` with each initializer named in `locations` stored at that location (relative to
    path's directory; several tensors may share a file, appended in order). Returns the in-memory original."""
    original = onnx.ModelProto()
    original.CopyFrom(model)
    written: dict[Path, int] = {}
    for tensor in model.graph.initializer:
        if tensor.name not in locations:
            continue
        location = locations[tensor.name]
        file = (path.parent / location)
        key = file.resolve()
        file.parent.mkdir(parents=True, exist_ok=True)
        offset = written.get(key, 0)
        with open(file, "r+b" if key in written else "wb") as f:
            f.seek(offset)
            f.write(tensor.raw_data)
        written[key] = offset + len(tensor.raw_data)
        length = len(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=k, value=v)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return original


def cli(*args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    return subprocess.run([sys.executable, "-m", "qdqfold", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and "internal error" not in result.stderr, lines
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every regular file below `directory` with its bytes (links and special files by kind)."""
    files = {}
    for p in sorted(directory.rglob("*")):
        mode = os.lstat(p).st_mode
        key = str(p.relative_to(directory))
        files[key] = p.read_bytes() if stat.S_ISREG(mode) else stat.S_IFMT(mode).to_bytes(4, "little")
    return files


def folds_correctly(original: onnx.ModelProto, output: Path) -> None:
    folded = onnx.load(output)  # external data from beside the output: the pairing under test
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert_same_outputs(original, folded)
