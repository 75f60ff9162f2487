"""Throughput of a model zoo folded from the command line: threads (--jobs 1, 2) against a Dask cluster of one
and of two worker processes (--dask ADDRESS), on the same generated zoo, in one run.

    python bench/dask_zoo.py [--models 32] [--size-mb 20] [--kind vgg-qat] [--verify]

Each configuration folds the whole zoo into a fresh directory with ``qdqfold ZOO -o OUT`` (a whole process,
as a user runs it; the cluster is started before the clock starts) and prints models per second. The outputs
are checked: every model folded, no failure. Needs ``pip install "qdqfold[dask]"``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_models import make_model  # noqa: E402


def run(zoo: Path, out: Path, extra: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qdqfold", str(zoo), "-o", str(out), "-q", *extra],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"qdqfold {' '.join(extra)} failed: {done.stderr.strip()}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=32)
    parser.add_argument("--size-mb", type=float, default=20)
    parser.add_argument("--kind", default="vgg-qat")
    parser.add_argument("--verify", action="store_true", help="--verify every model too")
    args = parser.parse_args()
    from distributed import LocalCluster

    with tempfile.TemporaryDirectory(prefix="qdqfold-dask-bench-") as scratch:
        zoo, out = Path(scratch) / "zoo", Path(scratch) / "out"
        zoo.mkdir()
        data = make_model(args.kind, args.size_mb, seed=0).SerializeToString()
        for k in range(args.models):
            (zoo / f"m{k:03}.onnx").write_bytes(data)
        extra = ["--verify"] if args.verify else []
        print(f"{args.models} x {args.kind} {len(data) / 1e6:.0f} MB{' with --verify' if args.verify else ''}")
        rows = []
        for jobs in (1, 2):
            rows.append((f"threads --jobs {jobs}", run(zoo, out, [f"--jobs={jobs}", *extra])))
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster:
                rows.append((f"dask, {workers} worker process{'es' if workers > 1 else ''}",
                             run(zoo, out, ["--dask", cluster.scheduler_address, *extra])))
        print(f"{'configuration':32} {'seconds':>8} {'models/s':>9}")
        for name, seconds in rows:
            print(f"{name:32} {seconds:8.2f} {args.models / seconds:9.2f}")


if __name__ == "__main__":
    main()
