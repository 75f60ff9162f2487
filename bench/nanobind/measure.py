"""nanobind (stable ABI) against pybind11 for qdqfold_native: reproduces the table in README.md.

Builds (or reuses) one pybind11 module (the main CMakeLists.txt) and one nanobind module (this folder's
CMakeLists.txt) for each interpreter given, plus a stable-ABI (abi3) nanobind module for interpreters >= 3.12,
then measures them taking turns, in child processes, and prints medians and nanobind/pybind11 ratios:

    python bench/nanobind/measure.py                                  # this interpreter
    python bench/nanobind/measure.py --python python3.11 --python /path/to/python3.13 --repeat 7

The child processes use only the standard library and the module under test, so an interpreter without numpy
or onnx will do. The models are made once with this interpreter (bench/make_models.py needs onnx).
Existing build folders are reused (--rebuild to start again); --build-dir NAME=DIR points a variant at a
folder built elsewhere (NAME as in the table: py3.11-pybind11, py3.13-nanobind-abi3, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# The option sets of tools/fold_corpus.py (only the standard library at import): the outputs must agree byte
# for byte under each.
sys.path.insert(0, str(ROOT / "tools"))
from fold_corpus import OPTION_SETS  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# The child side: run with the variant's interpreter and PYTHONPATH=<its build folder>; prints one JSON line.

def _load(build: str):
    """The qdqfold_native*.so in `build`, loaded under its own name: several builds of the module (pybind11 and
    nanobind) live side by side in one process, so their calls can take turns round by round."""
    import importlib.machinery
    import importlib.util

    so = sorted(Path(build).glob("qdqfold_native*.so"))[0]
    loader = importlib.machinery.ExtensionFileLoader("qdqfold_native", str(so))
    spec = importlib.util.spec_from_file_location("qdqfold_native", str(so), loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _round(fn, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def worker(task: str, args: dict) -> dict:
    if task == "calls":
        # Every module in one process; each workload runs `rounds` rounds, the modules taking turns within each
        # round, so that a burst of load on the machine falls on all of them alike. Seconds per call, per round.
        modules = [_load(b) for b in args["builds"]]
        tiny = Path(args["tiny"]).read_bytes()
        many = Path(args["many"]).read_bytes()
        r50 = Path(args["r50"]).read_bytes()
        bad = b"\xff\xff"

        def raise_fold_error(q):
            try:
                q.fold(bad)
            except q.FoldError:
                pass

        n = args["scale"]
        workloads = {  # name: (call, calls per round, rounds)
            "options": (lambda q: q.options(), 20000 * n, 9),
            "fold_error": (raise_fold_error, 5000 * n, 9),
            "fold_tiny": (lambda q: q.fold(tiny), 500 * n, 9),
            "fold_tiny_mv": (lambda q: q.fold(memoryview(tiny)), 500 * n, 9),
            "fold_tiny_report": (lambda q: q.fold_with_report(tiny), 500 * n, 9),
            "fold_many": (lambda q: q.fold(many), 5 * n, 9),
            "report_many": (lambda q: q.fold_with_report(many), 5 * n, 9),
            "fold_r50": (lambda q: q.fold(r50), 1, 5),
            "report_r50": (lambda q: q.fold_with_report(r50), 1, 5),
        }
        out = [{} for _ in modules]
        for name, (call, number, rounds) in workloads.items():
            for q in modules:  # warm-up
                call(q)
            for r in range(rounds):
                order = list(enumerate(modules))
                if r % 2:
                    order.reverse()
                for i, q in order:
                    out[i].setdefault(name, []).append(_round(lambda: call(q), number))
        return {"per_module": out}

    import qdqfold_native as q

    if task == "fold_file":
        t0 = time.perf_counter()
        report = q.fold_file(args["src"], args["dst"])
        seconds = time.perf_counter() - t0
        digest = hashlib.sha256(Path(args["dst"]).read_bytes()).hexdigest()
        os.unlink(args["dst"])
        return {"fold_file": seconds, "sha256": digest, "bns": len(report["batchnorms"])}
    if task == "outputs":
        hashes = {}
        for model in args["models"]:
            data = Path(model).read_bytes()
            for name, options in OPTION_SETS.items():
                try:
                    out, report = q.fold_with_report(data, **options)
                    plain = q.fold(memoryview(data), **options)
                    assert plain == out, "fold and fold_with_report differ"
                    text = json.dumps(report, sort_keys=True)
                    hashes[f"{Path(model).name}/{name}"] = [hashlib.sha256(out).hexdigest(),
                                                            hashlib.sha256(text.encode()).hexdigest()]
                except q.FoldError as e:
                    hashes[f"{Path(model).name}/{name}"] = ["FoldError", str(e)]
        return {"hashes": hashes, "version": q.__version__, "options": q.options()}
    raise SystemExit(f"unknown task {task}")


# ---------------------------------------------------------------------------------------------------------
# The parent side.

class Variant:
    def __init__(self, python: str, pyver: str, binding: str, build: Path):
        self.python, self.pyver, self.binding, self.build = python, pyver, binding, build
        self.name = f"py{pyver}-{binding}"

    def module(self) -> Path:
        found = sorted(p for p in self.build.glob("qdqfold_native*.so"))
        if not found:
            raise SystemExit(f"{self.name}: no qdqfold_native*.so in {self.build}")
        return found[0]

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.build)
        env.pop("PYTHONSTARTUP", None)
        return env

    def child(self, task: str, args: dict) -> dict:
        cmd = [self.python, str(Path(__file__).resolve()), "--worker", task, json.dumps(args)]
        res = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, cwd=tempfile.gettempdir())
        if res.returncode != 0:
            raise SystemExit(f"{self.name} {task} failed:\n{res.stderr}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys;print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def cmake_dir(module: str) -> str:
    flag = "--cmakedir" if module == "pybind11" else "--cmake_dir"
    return subprocess.run([sys.executable, "-m", module, flag], capture_output=True, text=True,
                          check=True).stdout.strip()


def build(variant: Variant, cxxflags: str, rebuild: bool) -> None:
    if variant.build.exists() and not rebuild and list(variant.build.glob("qdqfold_native*.so")):
        return
    source = ROOT if variant.binding == "pybind11" else HERE
    target = "qdqfold_native" if variant.binding == "pybind11" else "qdqfold_native_nb"
    cmd = ["cmake", "-S", str(source), "-B", str(variant.build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
           f"-DPython_EXECUTABLE={variant.python}", f"-Dpybind11_DIR={cmake_dir('pybind11')}"]
    if variant.binding != "pybind11":
        cmd.append(f"-Dnanobind_DIR={cmake_dir('nanobind')}")
    if variant.binding == "nanobind-abi3":
        cmd.append("-DQDQFOLD_NB_STABLE_ABI=ON")
    if cxxflags:
        cmd.append(f"-DCMAKE_CXX_FLAGS={cxxflags}")
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["ninja", "-j2", "-C", str(variant.build), target], check=True, stdout=subprocess.DEVNULL)


def compile_commands(variant: Variant) -> tuple[str, list[str], str]:
    """The binding translation unit's compile command, those of nanobind's own runtime library, and the
    module's link command (for pybind11 it includes the binding's code generation: -flto)."""
    target = "qdqfold_native" if variant.binding == "pybind11" else "qdqfold_native_nb"
    res = subprocess.run(["ninja", "-C", str(variant.build), "-t", "commands", target],
                         capture_output=True, text=True, check=True)
    lines = [ln for ln in res.stdout.splitlines() if " -c " in ln]
    tu = [ln for ln in lines if re.search(r"(bindings/module|module_nb)\.cpp", ln)]
    runtime = [ln for ln in lines if "/nanobind/src/" in ln and ln not in tu]
    link = [ln for ln in res.stdout.splitlines() if " -shared " in ln and "qdqfold_native" in ln]
    return tu[0], runtime, link[-1]


def timed_shell(command: str, cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(command, shell=True, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def stripped_size(so: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / so.name
        subprocess.run(["strip", "--strip-unneeded", "-o", str(out), str(so)], check=True)
        return out.stat().st_size


def import_time_us(variant: Variant) -> float:
    """-X importtime's cumulative microseconds for qdqfold_native, in a fresh process."""
    res = subprocess.run([variant.python, "-X", "importtime", "-c", "import qdqfold_native"],
                         env=variant.env(), capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    for line in res.stderr.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == "qdqfold_native":
            return float(parts[1])
    raise SystemExit(f"{variant.name}: no import line for qdqfold_native:\n{res.stderr}")


def make_many_bn(path: Path, blocks: int = 1000) -> None:
    """A chain of `blocks` Conv(1x1, 4 channels) -> BN on a 1x4x4x4 input: a report with `blocks` entries for
    a fold that costs little, so the report's dict construction is a visible part of the call."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for i in range(blocks):
        w = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), f"w{i}")
        stats = [numpy_helper.from_array(a.astype(np.float32), f"{n}{i}") for n, a in
                 (("g", rng.uniform(0.5, 1.5, 4)), ("b", rng.standard_normal(4)), ("m", rng.standard_normal(4)),
                  ("v", rng.uniform(0.5, 2, 4)))]
        inits += [w, *stats]
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}"] + [s.name for s in stats], [f"y{i}"],
                                      name=f"bn{i}"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "many_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))


def wheel_counts() -> dict:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["cibuildwheel"]
    versions = [re.match(r"cp3(\d+)-", b).group(1) for b in config["build"]]
    # manylinux + musllinux x (x86_64, aarch64) built natively on each runner, macOS arm64 + x86_64, Windows AMD64
    platforms = 2 * 2 + 2 + 1
    per_version = len(versions)
    abi3 = sum(int(v) < 12 for v in versions) + (1 if any(int(v) >= 12 for v in versions) else 0)
    return {"versions": [f"3.{v}" for v in versions], "platforms": platforms,
            "pybind11": per_version * platforms, "nanobind-abi3": abi3 * platforms,
            "per_platform": (per_version, abi3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", help="an interpreter to build and measure for (repeatable)")
    parser.add_argument("--workdir", default="/tmp/qdqfold-nanobind", type=Path)
    parser.add_argument("--build-dir", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--cxxflags", default="", help="extra CMAKE_CXX_FLAGS (an interpreter unpacked off its prefix)")
    parser.add_argument("--repeat", type=int, default=5, help="turns per measurement (medians are shown)")
    parser.add_argument("--build-repeat", type=int, default=3, help="turns for the compile times")
    parser.add_argument("--scale", type=int, default=1, help="multiplies the call counts of the per-call loops")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--skip", default="", help="comma list of: build-time,fold-file,outputs")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    parser.add_argument("--from-json", type=Path, action="append",
                        help="print the table of an earlier run's --json, measure nothing; repeatable: a later "
                             "file's rows replace an earlier one's (e.g. the compile rows of a second run)")
    args = parser.parse_args()
    if args.from_json:
        saved: dict = {}
        for path in args.from_json:
            run = json.loads(path.read_text())
            variants = [Variant(*meta) for meta in run.pop("_variants")]
            repeat, build_repeat = run.pop("_repeat")
            args.repeat = repeat or args.repeat
            args.build_repeat = build_repeat if any("build_tu" in r for r in run.values()) else args.build_repeat
            for name, rows in run.items():
                saved.setdefault(name, {}).update(rows)
        for v in variants:
            v.build = Path(v.build)
        print_table(variants, saved, wheel_counts(), args)
        return
    skip = set(filter(None, args.skip.split(",")))
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    overrides = dict(item.split("=", 1) for item in args.build_dir)

    variants: list[Variant] = []
    for python in args.python or [sys.executable]:
        pyver = python_version(python)
        kinds = ["pybind11", "nanobind"] + (["nanobind-abi3"] if tuple(map(int, pyver.split("."))) >= (3, 12) else [])
        for kind in kinds:
            name = f"py{pyver}-{kind}"
            v = Variant(python, pyver, kind, Path(overrides.get(name, work / f"build-{name}")))
            build(v, args.cxxflags, args.rebuild)
            variants.append(v)

    # Models: the examples' tiny QAT model, a ResNet-QAT of 50 MB (20 BNs), a 1000-BN chain, a 200 MB VGG-QAT.
    tiny = ROOT / "examples" / "qat_seed_prebn.onnx"
    r50, many, big = work / "resnet-qat-50.onnx", work / "many-bn-1000.onnx", work / "vgg-qat-200.onnx"
    make_models = [sys.executable, str(ROOT / "bench" / "make_models.py")]
    if not r50.exists():
        subprocess.run(make_models + ["resnet-qat", "50", "-o", str(r50)], check=True)
    if not big.exists() and "fold-file" not in skip:
        subprocess.run(make_models + ["vgg-qat", "200", "-o", str(big)], check=True)
    if not many.exists():
        make_many_bn(many)

    samples: dict[str, dict[str, list[float]]] = {v.name: {} for v in variants}

    def add(v: Variant, key: str, value: float) -> None:
        samples[v.name].setdefault(key, []).append(value)

    # Static figures.
    for v in variants:
        add(v, "size", stripped_size(v.module()) / 1024)

    # Outputs first: nothing is timed unless every variant folds every sample model alike.
    if "outputs" not in skip:
        models = sorted(str(p) for p in (ROOT / "tests" / "models").glob("*.onnx"))
        models += sorted(str(p) for p in (ROOT / "examples").glob("*.onnx")) + [str(r50), str(many)]
        results = {v.name: v.child("outputs", {"models": models}) for v in variants}
        first = results[variants[0].name]
        for name, res in results.items():
            if res != first:
                diff = [k for k in first["hashes"] if first["hashes"][k] != res["hashes"].get(k)]
                raise SystemExit(f"{name} differs from {variants[0].name}: {diff[:10]} {res['version']}")
        print(f"outputs: {len(first['hashes'])} (model, option set) folds, bytes and report identical "
              f"across {len(variants)} variants", file=sys.stderr)

    for turn in range(args.repeat):
        print(f"turn {turn + 1}/{args.repeat}", file=sys.stderr)
        for _ in range(10):
            for v in variants:
                add(v, "import", import_time_us(v))
        for pyver in dict.fromkeys(v.pyver for v in variants):
            group = [v for v in variants if v.pyver == pyver]
            res = group[0].child("calls", {"builds": [str(v.build) for v in group], "tiny": str(tiny),
                                           "many": str(many), "r50": str(r50), "scale": args.scale})
            for v, per_module in zip(group, res["per_module"]):
                for key, rounds in per_module.items():
                    # Per turn, the fastest round (timeit's rule: load on the machine only ever adds time).
                    add(v, key, min(rounds))
        if "fold-file" not in skip:
            if turn == 0:  # the page cache holds the input from here on, for every variant alike
                variants[0].child("fold_file", {"src": str(big), "dst": str(work / "out-warm-up.onnx")})
            for v in (variants if turn % 2 == 0 else variants[::-1]):
                res = v.child("fold_file", {"src": str(big), "dst": str(work / f"out-{v.name}.onnx")})
                add(v, "fold_file", res["fold_file"])
                samples[v.name]["fold_file_sha256"] = [res["sha256"]]

    if "build-time" not in skip:
        commands = {v.name: compile_commands(v) for v in variants}
        for turn in range(args.build_repeat):
            print(f"build turn {turn + 1}/{args.build_repeat}", file=sys.stderr)
            for v in variants:
                tu, runtime, link = commands[v.name]
                add(v, "build_tu", timed_shell(tu, v.build))
                add(v, "build_link", timed_shell(link, v.build))
                add(v, "build_runtime", sum(timed_shell(c, v.build) for c in runtime) if runtime else 0.0)

    if "fold-file" not in skip:
        digests = {samples[v.name]["fold_file_sha256"][0] for v in variants}
        if len(digests) != 1:
            raise SystemExit(f"fold_file outputs differ: {digests}")

    if args.json:
        saved = dict(samples, _variants=[[v.python, v.pyver, v.binding, str(v.build)] for v in variants],
                     _repeat=[args.repeat, args.build_repeat])
        args.json.write_text(json.dumps(saved, indent=1))
    print_table(variants, samples, wheel_counts(), args)


ROWS = [  # key, label, unit, scale
    ("size", "extension, stripped", "KiB", 1),
    ("import", "import qdqfold_native (-X importtime, cumulative)", "µs", 1),
    ("options", "`options()` call (pure binding: 11-entry dict)", "µs/call", 1e6),
    ("fold_error", "`fold(b'\\xff\\xff')` raising FoldError (exception translation)", "µs/call", 1e6),
    ("fold_tiny", "`fold()` tiny model (examples/qat_seed_prebn.onnx, 22 KB, bytes)", "µs/call", 1e6),
    ("fold_tiny_mv", "`fold()` tiny model, memoryview", "µs/call", 1e6),
    ("fold_tiny_report", "`fold_with_report()` tiny model", "µs/call", 1e6),
    ("fold_many", "`fold()` 1000-BN chain (1000 Conv->BN, 1x1, 4 ch)", "ms/call", 1e3),
    ("report_many", "`fold_with_report()` 1000-BN chain", "ms/call", 1e3),
    ("fold_r50", "`fold()` resnet-qat 50 MB (20 BNs)", "ms/call", 1e3),
    ("report_r50", "`fold_with_report()` resnet-qat 50 MB", "ms/call", 1e3),
    ("fold_file", "`fold_file()` vgg-qat 200 MB, file to file", "s", 1),
    ("build_tu", "compile the binding TU (module.cpp -O3 -flto / module_nb.cpp -Os)", "s", 1),
    ("build_link", "link the module (pybind11: with the binding's LTO code generation)", "s", 1),
    ("build_runtime", "compile nanobind's runtime library (NB_STATIC, once per build)", "s", 1),
]


def paired_ratio(a: list | None, b: list | None) -> str:
    """The median of the per-turn ratios a[i] / b[i] (the two were taken in the same turn), with the quartiles
    in brackets: how far the machine's noise moves the ratio."""
    if not a or not b or not all(b) or isinstance(a[0], str):
        return "-"
    r = [x / y for x, y in zip(a, b)]
    if len(r) < 4:
        return f"{statistics.median(r):.2f}"
    q = statistics.quantiles(r, n=4)
    return f"{statistics.median(r):.2f} [{q[0]:.2f}-{q[2]:.2f}]"


def print_table(variants: list[Variant], samples: dict, wheels: dict, args) -> None:
    for v in variants:
        s = samples[v.name]
    med = {v.name: {k: statistics.median(x) for k, x in samples[v.name].items()
                    if x and not isinstance(x[0], str)} for v in variants}
    pyvers = sorted({v.pyver for v in variants}, key=lambda s: tuple(map(int, s.split("."))))
    header = ["measure", "unit"]
    for pv in pyvers:
        for v in variants:
            if v.pyver == pv:
                header.append(f"{v.binding} {pv}")
        for v in variants:
            if v.pyver == pv and v.binding != "pybind11":
                header.append(f"{v.binding}/pybind11 {pv}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, label, unit, scale in ROWS:
        if not any(key in med[v.name] for v in variants):
            continue
        row = [label, unit]
        for pv in pyvers:
            ref = next(v for v in variants if v.pyver == pv and v.binding == "pybind11")
            for v in variants:
                if v.pyver == pv:
                    x = med[v.name].get(key)
                    row.append("-" if x is None else f"{x * scale:.3g}" if x * scale < 100 else f"{x * scale:.0f}")
            for v in variants:
                if v.pyver == pv and v.binding != "pybind11":
                    row.append(paired_ratio(samples[v.name].get(key), samples[ref.name].get(key)))
        print("| " + " | ".join(row) + " |")
    a, b = wheels["per_platform"]
    print(f"| wheels, CPython {wheels['versions'][0]}-{wheels['versions'][-1]} x {wheels['platforms']} platforms "
          f"| wheels | pybind11: {wheels['pybind11']} ({a}/platform) | nanobind abi3 for 3.12+: "
          f"{wheels['nanobind-abi3']} ({b}/platform) | {wheels['nanobind-abi3'] / wheels['pybind11']:.2f} |")
    print(f"\nMedians of {args.repeat} turns. Import: 10 processes per variant per turn. Per-call loops: all "
          f"variants of one Python loaded in one process, taking turns round by round; per turn the fastest of "
          f"5-9 rounds. Ratios: the median of the per-turn ratios (the two taken in the same turn), "
          f"[first-third quartile] where there are 4 or more. fold_file: one call per variant per turn, the order reversed every other "
          f"turn. Compile times: {args.build_repeat} turns, one compile per variant per turn, taking turns.")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], json.loads(sys.argv[3]))))
    else:
        main()
