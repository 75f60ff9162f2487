"""qdqfold against a plain copy of the same model, in the same run: the floors of issue 7's targets.

For each cached bench model (build them first with bench.py), taking turns, median of --repeat runs:

- `cp IN OUT` and `python -m qdqfold IN -o OUT -q`, both as whole processes;
- `qdqfold_native.fold_file(IN, OUT)` timed around the call in this process;
- `qdqfold_native.fold(data)` against `bytearray(data)` (one fresh copy of the bytes) in this process.

Each output is deleted and `sync` run before the next run, so no run waits on another's writeback. It also
prints the cost of starting Python and of `python -m qdqfold --version`, the CLI's fixed cost. With
`--baseline DIR` (a copy of another version's python/ folder) that version's CLI takes its turn in every
round too, so a before/after comparison sees the same load.

    python bench/versus_copy.py vgg-100mb vgg-qat-500mb [--workdir /tmp/qdqfold-bench] [--native-path build]
        [--baseline /tmp/old/python]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import child_env, machine_info, qdqfold_paths


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="cached bench models by name, e.g. vgg-qat-500mb (seed 0)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qdqfold-bench"))
    parser.add_argument("--native-path", type=Path, action="append")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", type=Path, action="append",
                        help="another version's qdqfold package folder, put first on its CLI's PYTHONPATH; its "
                             "CLI takes its turn after this one's in every round (repeatable)")
    args = parser.parse_args()
    env = child_env(qdqfold_paths(args.native_path))
    base_env = child_env([*args.baseline, *qdqfold_paths(args.native_path)]) if args.baseline else None
    sys.path[:0] = env.get("PYTHONPATH", "").split(os.pathsep)
    import qdqfold_native

    out_dir = args.workdir / "versus-copy"
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "out.onnx"

    def fresh_output() -> None:
        dst.unlink(missing_ok=True)
        os.sync()

    print(machine_info())
    print(f"qdqfold_native: {qdqfold_native.__file__}; medians of {args.repeat}, taking turns")
    print(f"{'model':16s} {'cp s':>7s} {'CLI s':>7s} {'CLI/cp':>7s} {'fold_file s':>11s} {'/cp':>6s} "
          f"{'fold() s':>9s} {'copy s':>7s} {'fold/copy':>9s}" + (f" {'base CLI s':>10s} {'/cp':>6s}" if base_env else ""))
    for name in args.models:
        src = args.workdir / f"{name}-s0.onnx"
        if not src.exists():
            sys.exit(f"{src}: not built yet (python bench/bench.py builds it)")
        times: dict[str, list[float]] = {k: [] for k in ("cp", "cli", "fold_file", "fold", "copy", "base")}
        data = src.read_bytes()
        for _ in range(args.repeat):
            fresh_output()
            times["cp"].append(timed(lambda: subprocess.run(["cp", str(src), str(dst)], check=True)))
            fresh_output()
            times["cli"].append(timed(lambda: subprocess.run(
                [sys.executable, "-m", "qdqfold", str(src), "-o", str(dst), "-q"], check=True, env=env)))
            if base_env is not None:
                fresh_output()
                times["base"].append(timed(lambda: subprocess.run(
                    [sys.executable, "-m", "qdqfold", str(src), "-o", str(dst), "-q"], check=True, env=base_env)))
            fresh_output()
            times["fold_file"].append(timed(lambda: qdqfold_native.fold_file(str(src), str(dst))))
            fresh_output()
            times["fold"].append(timed(lambda: qdqfold_native.fold(data)))
            times["copy"].append(timed(lambda: bytearray(data)))
        m = {k: statistics.median(v) for k, v in times.items() if v}
        print(f"{name:16s} {m['cp']:7.3f} {m['cli']:7.3f} {m['cli'] / m['cp']:6.2f}x {m['fold_file']:11.3f} "
              f"{m['fold_file'] / m['cp']:5.2f}x {m['fold']:9.3f} {m['copy']:7.3f} {m['fold'] / m['copy']:8.2f}x"
              + (f" {m['base']:10.3f} {m['base'] / m['cp']:5.2f}x" if base_env else ""))
    dst.unlink(missing_ok=True)
    python_start = statistics.median(timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))
                                     for _ in range(args.repeat))
    cli_start = statistics.median(timed(lambda: subprocess.run([sys.executable, "-m", "qdqfold", "--version"],
                                                               check=True, env=env, stdout=subprocess.DEVNULL))
                                  for _ in range(args.repeat))
    print(f"fixed costs: python -c pass {python_start:.3f} s; python -m qdqfold --version {cli_start:.3f} s")
    if base_env is not None:
        base_start = statistics.median(timed(lambda: subprocess.run(
            [sys.executable, "-m", "qdqfold", "--version"], check=True, env=base_env, stdout=subprocess.DEVNULL))
            for _ in range(args.repeat))
        print(f"baseline: python -m qdqfold --version {base_start:.3f} s")


if __name__ == "__main__":
    main()
