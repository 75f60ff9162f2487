"""qdqfold against a plain copy of the same model, in the same run: the floors of issue 7's targets.

For each cached bench model (build them first with bench.py; `vgg11-bn`, VGG-11-BN with torchvision's shapes,
is built here by vgg11_bn.py) in each --workdir (repeatable: one per file system, e.g. ext4 and tmpfs; the model
is copied from the first), taking turns across models and file systems, median of --repeat runs:

- `cp IN OUT`, `python -m qdqfold IN -o OUT -q` and `python -m qdqfold IN -o OUT` (the report printed, to a
  pipe), all as whole processes;
- `qdqfold_native.fold_file(IN, OUT)` timed around the call in this process;
- `qdqfold_native.fold(data)` against `bytearray(data)` (one fresh copy of the bytes) in this process.

Each output is deleted and `sync` run before the next run, so no run waits on another's writeback. It also
prints the cost of starting Python and of `python -m qdqfold --version`, the CLI's fixed cost. With
`--baseline DIR` (a copy of another version's python/ folder) that version's CLI takes its turn in every
round too, so a before/after comparison sees the same load. `--python` runs the CLIs with another interpreter
(e.g. a plain venv's, where an editable install's import hook would otherwise win over `--baseline`). Each
qdqfold package the CLIs import is compiled to bytecode first, as `pip install` leaves it (without it, a run
under PYTHONDONTWRITEBYTECODE compiles every module on every start: about 10 ms).

    python bench/versus_copy.py vgg-100mb vgg-qat-500mb [--workdir /tmp/qdqfold-bench] [--native-path build]
        [--baseline /tmp/old/python]
    python bench/versus_copy.py vgg11-bn --workdir /tmp/qdqfold-bench --workdir /dev/shm/qdqfold-bench --repeat 7
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import child_env, machine_info, qdqfold_paths


def timed(action, cpu: list[float] | None = None) -> float:
    """The wall time of `action`; its CPU time (user + system, this process's threads and its children's) is
    appended to `cpu`."""
    def used() -> float:
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    before = used()
    start = time.perf_counter()
    action()
    wall = time.perf_counter() - start
    if cpu is not None:
        cpu.append(used() - before)
    return wall


def file_system(path: Path) -> str:
    """The type of the file system holding `path` (the longest mount point of /proc/mounts above it)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            point = fields[1]
            if str(path.resolve()).startswith(point.rstrip("/") + "/") and len(point) > len(best):
                best, kind = point, fields[2]
    except (OSError, IndexError):
        pass
    return kind


def model_in(workdirs: list[Path], name: str) -> list[Path]:
    """The model `name` in every workdir: built (vgg11-bn only) or taken from the first, copied to the others."""
    paths = [w / f"{name}-s0.onnx" for w in workdirs]
    if not paths[0].exists():
        if name != "vgg11-bn":
            sys.exit(f"{paths[0]}: not built yet (python bench/bench.py builds it)")
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("vgg11_bn.py")), "-o", str(paths[0])], check=True)
    for p in paths[1:]:
        if not p.exists() or p.stat().st_size != paths[0].stat().st_size:
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths[0], p)
    return paths


def compile_package(python: str, env: dict) -> None:
    """The qdqfold package that `python` imports in `env`, compiled to bytecode (as pip install leaves it)."""
    where = subprocess.run([python, "-c", "import os, qdqfold; print(os.path.dirname(qdqfold.__file__))"],
                           check=True, env=env, capture_output=True, text=True).stdout.strip()
    subprocess.run([python, "-m", "compileall", "-q", where], check=True, env=env, stdout=subprocess.DEVNULL)
    print(f"CLI: {python} -m qdqfold from {where} (compiled)")


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="cached bench models by name, e.g. vgg-qat-500mb (seed 0)")
    parser.add_argument("--workdir", type=Path, action="append",
                        help="where the models are and the outputs go (repeatable: one per file system); "
                             "default /tmp/qdqfold-bench")
    parser.add_argument("--native-path", type=Path, action="append")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that runs the CLIs (default: this one)")
    parser.add_argument("--baseline", type=Path, action="append",
                        help="another version's qdqfold package folder, put first on its CLI's PYTHONPATH; its "
                             "CLI takes its turn after this one's in every round (repeatable)")
    args = parser.parse_args()
    env = child_env(qdqfold_paths(args.native_path))
    base_env = child_env([*args.baseline, *qdqfold_paths(args.native_path)]) if args.baseline else None
    sys.path[:0] = env.get("PYTHONPATH", "").split(os.pathsep)
    import qdqfold_native

    python = args.python
    for e in [env, base_env] if base_env is not None else [env]:
        compile_package(python, e)

    workdirs = args.workdir or [Path("/tmp/qdqfold-bench")]

    def fresh_output(dst: Path) -> None:
        dst.unlink(missing_ok=True)
        os.sync()

    print(machine_info())
    print(f"qdqfold_native: {qdqfold_native.__file__}; medians of {args.repeat}, taking turns; load average {load()}")
    print(f"{'model':12s} {'fs':6s} {'cp s':>7s} {'CLI s':>7s} {'CLI/cp':>7s} {'fold_file s':>11s} {'/cp':>6s} "
          f"{'fold() s':>9s} {'copy s':>7s} {'fold/copy':>9s} {'report s':>8s} {'/cp':>6s}"
          + (f" {'base CLI s':>10s} {'/cp':>6s}" if base_env else ""))
    runs = []  # (model name, workdir, source, output)
    for name in args.models:
        for workdir, src in zip(workdirs, model_in(workdirs, name)):
            out_dir = workdir / "versus-copy"
            out_dir.mkdir(parents=True, exist_ok=True)
            runs.append((name, workdir, src, out_dir / "out.onnx"))
    keys = ("cp", "cli", "report", "fold_file", "fold", "copy", "base")
    times = {run: {k: [] for k in keys} for run in runs}
    cpus = {run: {k: [] for k in keys} for run in runs}
    for _ in range(args.repeat):
        for run in runs:
            name, workdir, src, dst = run
            t, c = times[run], cpus[run]
            fresh_output(dst)
            t["cp"].append(timed(lambda: subprocess.run(["cp", str(src), str(dst)], check=True), c["cp"]))
            fresh_output(dst)
            t["cli"].append(timed(lambda: subprocess.run(
                [python, "-m", "qdqfold", str(src), "-o", str(dst), "-q"], check=True, env=env), c["cli"]))
            fresh_output(dst)
            t["report"].append(timed(lambda: subprocess.run(
                [python, "-m", "qdqfold", str(src), "-o", str(dst)], check=True, env=env, stdout=subprocess.PIPE),
                c["report"]))
            if base_env is not None:
                fresh_output(dst)
                t["base"].append(timed(lambda: subprocess.run(
                    [python, "-m", "qdqfold", str(src), "-o", str(dst), "-q"], check=True, env=base_env), c["base"]))
            fresh_output(dst)
            t["fold_file"].append(timed(lambda: qdqfold_native.fold_file(str(src), str(dst)), c["fold_file"]))
            fresh_output(dst)
            if workdir == workdirs[0]:  # bytes in memory: once per model
                data = src.read_bytes()
                t["fold"].append(timed(lambda: qdqfold_native.fold(data)))
                t["copy"].append(timed(lambda: bytearray(data)))
                del data
    for run in runs:
        name, workdir, src, dst = run
        m = {k: statistics.median(v) for k, v in times[run].items() if v}
        in_memory = (f"{m['fold']:9.3f} {m['copy']:7.3f} {m['fold'] / m['copy']:8.2f}x" if "fold" in m
                     else f"{'':9s} {'':7s} {'':9s}")
        print(f"{name:12s} {file_system(workdir):6s} {m['cp']:7.3f} {m['cli']:7.3f} {m['cli'] / m['cp']:6.2f}x "
              f"{m['fold_file']:11.3f} {m['fold_file'] / m['cp']:5.2f}x {in_memory} "
              f"{m['report']:8.3f} {m['report'] / m['cp']:5.2f}x"
              + (f" {m['base']:10.3f} {m['base'] / m['cp']:5.2f}x" if base_env else ""))
        dst.unlink(missing_ok=True)
    print("CPU time, user + system (medians): what each takes where no other job waits for a core")
    for run in runs:
        name, workdir, src, dst = run
        m = {k: statistics.median(v) for k, v in cpus[run].items() if v}
        print(f"{name:12s} {file_system(workdir):6s} cp {m['cp']:.3f} s; CLI {m['cli']:.3f} s "
              f"({m['cli'] / m['cp']:.2f}x); CLI with the report {m['report']:.3f} s ({m['report'] / m['cp']:.2f}x); "
              f"fold_file {m['fold_file']:.3f} s ({m['fold_file'] / m['cp']:.2f}x)"
              + (f"; base CLI {m['base']:.3f} s ({m['base'] / m['cp']:.2f}x)" if base_env else ""))
    print(f"load average after the rounds: {load()}")
    python_start = statistics.median(timed(lambda: subprocess.run([python, "-c", "pass"], check=True))
                                     for _ in range(args.repeat))
    cli_start = statistics.median(timed(lambda: subprocess.run([python, "-m", "qdqfold", "--version"],
                                                               check=True, env=env, stdout=subprocess.DEVNULL))
                                  for _ in range(args.repeat))
    print(f"fixed costs: python -c pass {python_start:.3f} s; python -m qdqfold --version {cli_start:.3f} s")
    if base_env is not None:
        base_start = statistics.median(timed(lambda: subprocess.run(
            [python, "-m", "qdqfold", "--version"], check=True, env=base_env, stdout=subprocess.DEVNULL))
            for _ in range(args.repeat))
        print(f"baseline: python -m qdqfold --version {base_start:.3f} s")


if __name__ == "__main__":
    main()
