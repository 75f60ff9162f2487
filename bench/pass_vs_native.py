"""The onnx_ir pass (qdqfold.passes.FoldBatchNormalization) against the native fold on the same model.

For each generated model (bench/make_models.py) it times, in one process, with the runs taking turns and the
median of --repeat shown (seconds, page cache warm, the model already in memory):

* ``native``: ``qdqfold_native.fold(bytes)`` on the serialized model (one file, weights inline);
* ``pass (protobuf)``: the pass on ``ir.load(path)`` of that file (tensors backed by protobuf messages);
* ``pass (numpy)``: the pass on the same IR model with every initializer an ``ir.Tensor`` of a NumPy array
  (what a converter building the IR in memory holds);
* ``native ext``: ``qdqfold_native.fold(bytes, base_directory=)`` on the model saved with external data;
* ``pass (external)``: the pass on ``ir.load`` of that model (tensors mapped from the data file);
* ``hand-written``: serialize -> ``fold`` -> deserialize, the glue the pass replaces.

Ratios are to ``native`` (and ``pass (external)`` also to ``native ext``). Every pass output is checked
against the native output (same initializer bytes) before anything is timed.

Usage: ``python bench/pass_vs_native.py --kinds resnet-qat,vgg --sizes 240``
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_models  # noqa: E402

import onnx_ir as ir  # noqa: E402
import qdqfold_native  # noqa: E402
from qdqfold.passes import FoldBatchNormalization  # noqa: E402


def hand_written(model: ir.Model) -> ir.Model:
    data = ir.serde.serialize_model(model).SerializeToString()
    return ir.serde.deserialize_model(onnx.ModelProto.FromString(qdqfold_native.fold(data)))


def initializer_bytes(model: ir.Model) -> dict[str, bytes]:
    return {name: v.const_value.tobytes() for name, v in model.graph.initializers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="resnet-qat,vgg")
    parser.add_argument("--sizes", default="240", help="MB of initializers, comma-separated")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qdqfold-bench/pass"))
    args = parser.parse_args()

    rows = []
    for kind in args.kinds.split(","):
        for size in (float(s) for s in args.sizes.split(",")):
            name = f"{kind}-{size:g}mb"
            inline = args.workdir / f"{name}.onnx"
            external = args.workdir / "external" / f"{name}.onnx"
            if not inline.exists() or not external.exists():
                external.parent.mkdir(parents=True, exist_ok=True)
                proto = make_models.make_model(kind, size)
                onnx.save(proto, inline)
                onnx.save(proto, external, save_as_external_data=True, location=f"{name}.onnx.data",
                          size_threshold=1024)
                del proto
            data = inline.read_bytes()
            external_data = external.read_bytes()
            from_protobuf = ir.load(inline)
            from_numpy = ir.load(inline)
            for value in from_numpy.graph.initializers.values():
                value.const_value = ir.Tensor(value.const_value.numpy().copy(), name=value.name)
            from_file = ir.load(external)

            expected = initializer_bytes(ir.from_proto(onnx.load_from_string(qdqfold_native.fold(data))))
            for label, model in (("protobuf", from_protobuf), ("numpy", from_numpy), ("external", from_file)):
                got = initializer_bytes(FoldBatchNormalization()(model).model)
                assert got == expected, f"{name}: the pass on {label} tensors differs from the native fold"

            runs = {
                "native": lambda: qdqfold_native.fold(data),
                "pass (protobuf)": lambda: FoldBatchNormalization()(from_protobuf),
                "pass (numpy)": lambda: FoldBatchNormalization()(from_numpy),
                "native ext": lambda: qdqfold_native.fold(external_data, base_directory=external.parent),
                "pass (external)": lambda: FoldBatchNormalization()(from_file),
                "hand-written": lambda: hand_written(from_protobuf),
            }
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.repeat):
                for label, run in runs.items():  # taking turns, so drift hits every column alike
                    gc.collect()
                    start = time.perf_counter()
                    result = run()
                    times[label].append(time.perf_counter() - start)
                    del result
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((name, len(data) / 1e6, med))
            print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()), flush=True)

    print()
    print("| model | native `fold` | pass, protobuf tensors | pass, NumPy tensors | native `fold`, external data "
          "| pass, external data | hand-written serialize/fold/parse |")
    print("|---|---|---|---|---|---|---|")
    for name, mb, m in rows:
        n = m["native"]
        print(f"| {name} ({mb:.0f} MB) | {n:.3f} | {m['pass (protobuf)']:.3f} ({m['pass (protobuf)'] / n:.2f}x) "
              f"| {m['pass (numpy)']:.3f} ({m['pass (numpy)'] / n:.2f}x) | {m['native ext']:.3f} "
              f"| {m['pass (external)']:.3f} ({m['pass (external)'] / n:.2f}x; {m['pass (external)'] / m['native ext']:.2f}x) "
              f"| {m['hand-written']:.3f} ({m['hand-written'] / n:.2f}x) |")
    print(f"\nmedian of {args.repeat}, seconds; Python {sys.version.split()[0]}, onnx_ir {ir.__version__}, "
          f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
