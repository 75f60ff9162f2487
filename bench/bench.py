"""Benchmark qdqfold against other ONNX BatchNormalization folders, file in -> file out.

For every model (built by make_models.py and cached in --workdir) and every tool, each run is a
fresh child process. Its peak RSS is the ru_maxrss that os.wait4() returns for exactly that child
(no other process is counted, and nothing the parent does leaks into it). Runs go one at a time.
After the last run of a tool its output is checked in yet another child: BatchNormalization nodes
left, and the max |output deviation| from the original model, both run by onnxruntime with graph
optimizations disabled on the same seeded random input. Models are built in a child as well.
See README.md for the method and the columns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from make_models import KINDS

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
TOOLS_SCRIPT = BENCH_DIR / "tools.py"
MAKE_MODELS_SCRIPT = BENCH_DIR / "make_models.py"
SMALL_MODEL_BYTES = 200e6  # below this, --repeat defaults to 3, else to 1
PROBE_TIMEOUT = 300


@dataclass(frozen=True)
class Tool:
    key: str  # name for --tools
    label: str  # row label
    module: str | None  # imported by the availability probe; None: always available
    dist: str | None  # distribution whose version is shown
    cli: bool = False  # True: time the whole `python -m MODULE SRC -o DST` process

    def command(self, src: Path, dst: Path, result: Path) -> list[str]:
        if self.cli:
            return [sys.executable, "-m", self.module, str(src), "-o", str(dst)]
        return [sys.executable, str(TOOLS_SCRIPT), "run", self.key, str(src), str(dst), str(result)]


TOOLS = (
    Tool("copy", "copy", None, None),
    Tool("qdqfold", "qdqfold (in-process)", "qdqfold_native", "qdqfold"),
    Tool("qdqfold-cli", "qdqfold (CLI)", "qdqfold", "qdqfold", cli=True),
    Tool("onnxruntime", "onnxruntime basic", "onnxruntime", "onnxruntime"),
    Tool("onnxslim", "onnxslim", "onnxslim", "onnxslim"),
    Tool("onnxsim", "onnxsim", "onnxsim", "onnxsim"),
    Tool("onnxoptimizer", "onnxoptimizer", "onnxoptimizer", "onnxoptimizer"),
    Tool("onnxscript", "onnxscript optimizer", "onnxscript.optimizer", "onnxscript"),
)
REFERENCE_TOOL = "qdqfold"  # the "x qdqfold" column divides by this tool's time


# -- child processes ------------------------------------------------------------------------

@dataclass
class ProcResult:
    status: str  # "ok", "failed" or "timeout"
    returncode: int  # negative: killed by that signal
    wall: float  # seconds, whole process
    maxrss_mb: float  # peak resident set size of the child, MiB
    log: Path

    def reason(self) -> str:
        """Why the child failed: timeout, signal, or the last line it printed."""
        if self.status == "timeout":
            return f"killed after {self.wall:.0f} s (--timeout)"
        lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1][:80] if lines else ""
        if self.returncode < 0:
            return f"killed by signal {-self.returncode}" + (f": {last}" if last else "")
        return last or f"exit code {self.returncode}"


def run_process(cmd: list[str], env: dict, timeout: float, log: Path) -> ProcResult:
    """Run cmd to completion; wall time and peak RSS of exactly that child (os.wait4)."""
    os.sync()  # earlier runs' output is on disk first: no run waits on another's writeback
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, wait_status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(wait_status)  # reaped here, not by Popen
    status = "timeout" if timed_out.is_set() else "ok" if proc.returncode == 0 else "failed"
    # ru_maxrss is in KiB on Linux
    return ProcResult(status, proc.returncode, wall, usage.ru_maxrss / 1024, log)


class Runner:
    """Runs the children of one benchmark session with a common environment and log folder."""

    def __init__(self, env: dict, timeout: float, log_dir: Path):
        self.env, self.timeout, self.log_dir = env, timeout, log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    def run(self, cmd: list[str], log_name: str) -> ProcResult:
        return run_process(cmd, self.env, self.timeout, self.log_dir / f"{log_name}.log")

    def run_json(self, args: list[str], log_name: str) -> dict:
        """Run a tools.py command that writes a JSON result; raise if it does not succeed."""
        result = self.log_dir / f"{log_name}.json"
        proc = self.run([sys.executable, str(TOOLS_SCRIPT), *args, str(result)], log_name)
        if proc.status != "ok":
            raise RuntimeError(f"{log_name}: {proc.status}: {proc.reason()}")
        return json.loads(result.read_text())


def probe_tool(tool: Tool, env: dict) -> dict | None:
    """{"version", "file"} when the tool imports in a fresh interpreter, else None."""
    if tool.module is None:
        return {"version": "", "file": None}
    try:
        proc = subprocess.run([sys.executable, str(TOOLS_SCRIPT), "probe", tool.module, tool.dist],
                              env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


# -- qdqfold from the source tree -----------------------------------------------------------

def child_env(extra_paths: list[Path]) -> dict:
    env = dict(os.environ)
    paths = [str(p) for p in extra_paths] + [p for p in [env.get("PYTHONPATH")] if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def find_native_paths() -> list[Path]:
    """Folders in the repo that hold a built qdqfold_native*.so and the qdqfold package."""
    built = [*REPO_DIR.glob("build*/**/qdqfold_native*.so"),
             *(REPO_DIR / "python").glob("qdqfold_native*.so")]
    paths = [max(built, key=lambda so: so.stat().st_mtime).parent] if built else []  # newest
    if (REPO_DIR / "python" / "qdqfold" / "__init__.py").exists():
        paths.append(REPO_DIR / "python")
    return paths


def qdqfold_paths(requested: list[Path] | None) -> list[Path]:
    """--native-path as given; without it, the source tree when qdqfold is not installed."""
    if requested is not None:
        return requested
    installed = all(probe_tool(t, child_env([])) for t in TOOLS if t.key.startswith("qdqfold"))
    return [] if installed else find_native_paths()


# -- models ---------------------------------------------------------------------------------

@dataclass
class Model:
    name: str
    path: Path
    reference: Path  # .npz with the seeded input and the original outputs
    nodes: int
    bn: int

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 1e6


def prepare_model(kind: str, size_mb: float, seed: int, workdir: Path, runner: Runner,
                  rebuild: bool) -> Model:
    """Build (or reuse) the model file and its reference outputs."""
    name = f"{kind}-{size_mb:g}mb-s{seed}"
    path = workdir / f"{name}.onnx"
    reference = workdir / f"{name}.ref.npz"
    stats_file = workdir / f"{name}.ref.json"
    if rebuild or not path.exists():
        tmp = path.with_suffix(".tmp.onnx")
        proc = runner.run([sys.executable, str(MAKE_MODELS_SCRIPT), kind, f"{size_mb:g}",
                           "-o", str(tmp), "--seed", str(seed)], f"{name}.make")
        if proc.status != "ok":
            raise RuntimeError(f"building {name}: {proc.status}: {proc.reason()}")
        tmp.replace(path)
        stats_file.unlink(missing_ok=True)
    if not stats_file.exists():
        stats = runner.run_json(["reference", str(path), str(reference)], f"{name}.reference")
        stats_file.write_text(json.dumps(stats))
    stats = json.loads(stats_file.read_text())
    return Model(name, path, reference, stats["nodes"], stats["bn"])


# -- measuring ------------------------------------------------------------------------------

@dataclass
class Measurement:
    status: str  # "ok", "n/a", "failed", "timeout"
    seconds: float | None = None  # median work time (CLI: whole process)
    process_seconds: float | None = None  # median whole-process wall time
    rss_mb: float | None = None  # max peak RSS over the runs
    bn_left: int | None = None
    max_dev: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)  # medians of the tool's extra timings


def _median_extra(extras: list[dict]) -> dict:
    return {k: statistics.median(e[k] for e in extras) for k in extras[0]} if extras else {}


def measure(tool: Tool, model: Model, runner: Runner, repeat: int, out_dir: Path,
            keep_outputs: bool) -> Measurement:
    name = f"{model.name}.{tool.key}"
    dst = out_dir / f"{name}.onnx"
    result = runner.log_dir / f"{name}.json"
    procs, seconds, extras = [], [], []
    for i in range(repeat):
        progress(f"  {tool.label}: run {i + 1}/{repeat}")
        dst.unlink(missing_ok=True)  # never verify a stale output
        proc = runner.run(tool.command(model.path, dst, result), name)
        if proc.status != "ok":
            dst.unlink(missing_ok=True)
            return Measurement(proc.status, note=proc.reason())
        procs.append(proc)
        if tool.cli:
            seconds.append(proc.wall)
        else:
            timing = json.loads(result.read_text())
            seconds.append(timing["seconds"])
            extras.append(timing["extra"])
    m = Measurement("ok", statistics.median(seconds), statistics.median(p.wall for p in procs),
                    max(p.maxrss_mb for p in procs), extra=_median_extra(extras))
    try:
        check = runner.run_json(["verify", str(dst), str(model.reference)], f"{name}.verify")
        m.bn_left, m.max_dev = check["bn_left"], check["max_dev"]
    except RuntimeError as err:
        m.note = f"output check failed: {str(err)[-60:]}"
    if not keep_outputs:
        dst.unlink(missing_ok=True)
    return m


def qdqfold_note(m: Measurement) -> str:
    fold, copy = m.extra.get("fold_s"), m.extra.get("copy_s")
    if fold is None or not copy:
        return ""
    return f"fold() {fold:.3f} s = {fold / copy:.2f}x bytes copy ({copy:.3f} s)"


# -- report ---------------------------------------------------------------------------------

HEADERS = ("tool", "time s", "process s", "x qdqfold", "peak RSS MB", "BN left", "max |dev|", "note")


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table_rows(results: list[tuple[Tool, Measurement]]) -> list[list[str]]:
    ref = next((m for t, m in results if t.key == REFERENCE_TOOL and m.status == "ok"), None)
    rows = []
    for tool, m in results:
        ratio = m.seconds / ref.seconds if ref and m.seconds is not None else None
        time_cell = _fmt(m.seconds, ".3f") if m.status == "ok" else m.status
        note = m.note or (qdqfold_note(m) if tool.key == "qdqfold" else "")
        rows.append([tool.label, time_cell, _fmt(m.process_seconds, ".3f"), _fmt(ratio, ".2f"),
                     _fmt(m.rss_mb, ".0f"), _fmt(m.bn_left, "d"), _fmt(m.max_dev, ".3g"), note])
    return rows


def format_table(headers, rows, markdown: bool) -> str:
    if markdown:
        lines = [headers, ["---"] * len(headers), *rows]
        return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
                         for cells in lines)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):  # first and last columns left-aligned, numbers right-aligned
        padded = [c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def model_title(model: Model, repeat: int) -> str:
    return (f"{model.name}: {model.size_mb:.1f} MB, {model.nodes} nodes, "
            f"{model.bn} BatchNormalization, median of {repeat} run(s)")


def machine_info() -> str:
    def first(path: str, key: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"

    mem_kib = first("/proc/meminfo", "MemTotal").split()[0]
    mem = f"{int(mem_kib) / 2**20:.1f} GiB" if mem_kib.isdigit() else "?"
    return (f"machine: {first('/proc/cpuinfo', 'model name')}, {os.cpu_count()} cores, {mem} RAM; "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}")


def tools_info(available: dict[str, dict | None]) -> str:
    parts = []
    for tool in TOOLS:
        info = available[tool.key]
        if tool.module is not None:
            parts.append(f"{tool.label} {info['version'] if info else 'n/a'}")
    return "tools: " + ", ".join(parts)


def progress(message: str) -> None:
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


# -- command line ---------------------------------------------------------------------------

def csv_list(choices):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda s: [float(x) for x in s.split(",")], default=[10, 100],
                   help="model sizes in MB, comma separated (default 10,100)")
    p.add_argument("--kinds", type=csv_list(KINDS), default=["vgg", "resnet", "vgg-qat", "vgg-int"],
                   help=f"comma separated, from {','.join(KINDS)} (default vgg,resnet,vgg-qat,vgg-int)")
    p.add_argument("--tools", type=csv_list([t.key for t in TOOLS]), default=[t.key for t in TOOLS],
                   help=f"comma separated, from {','.join(t.key for t in TOOLS)} (default all)")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs per tool, median reported (default 3 below 200 MB, else 1)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per child process (600)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qdqfold-bench"),
                   help="model cache, outputs and logs (default /tmp/qdqfold-bench)")
    p.add_argument("--native-path", type=Path, action="append", default=None,
                   help="folder to put on the children's PYTHONPATH (repeatable), e.g. the build "
                        "folder of qdqfold_native; default: the repo's build/ and python/ folders "
                        "when qdqfold is not installed")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights (0)")
    p.add_argument("--rebuild", action="store_true", help="rebuild cached models")
    p.add_argument("--keep-outputs", action="store_true", help="keep the tools' output models")
    p.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    return p.parse_args(argv)


def bench_model(kind: str, size: float, args: argparse.Namespace, runner: Runner,
                available: dict[str, dict | None]) -> tuple[str, list[list[str]]]:
    """Title and table rows for one model."""
    progress(f"{kind} {size:g} MB: preparing model")
    model = prepare_model(kind, size, args.seed, args.workdir, runner, args.rebuild)
    repeat = args.repeat or (3 if model.path.stat().st_size < SMALL_MODEL_BYTES else 1)
    out_dir = args.workdir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [(t, measure(t, model, runner, repeat, out_dir, args.keep_outputs)
                if available[t.key] else Measurement("n/a", note="not importable"))
               for t in TOOLS if t.key in args.tools]
    return model_title(model, repeat), table_rows(results)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = child_env(qdqfold_paths(args.native_path))
    available = {t.key: probe_tool(t, env) for t in TOOLS}
    runner = Runner(env, args.timeout, args.workdir / "logs")

    print(machine_info())
    print(tools_info(available))
    native = available["qdqfold"]
    print(f"qdqfold_native: {native['file'] if native else 'not importable'}")
    tables = []
    for size in args.sizes:
        for kind in args.kinds:
            try:
                title, rows = bench_model(kind, size, args, runner, available)
            except RuntimeError as err:  # the model could not be built or run
                print(f"\n{kind} {size:g} MB: skipped: {err}", flush=True)
                continue
            tables.append((title, rows))
            print(f"\n{title}\n{format_table(HEADERS, rows, markdown=False)}", flush=True)
    if args.markdown:
        for title, rows in tables:
            print(f"\n**{title}**\n\n{format_table(HEADERS, rows, markdown=True)}")

if __name__ == "__main__":
    main()
