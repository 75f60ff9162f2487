"""What the command line imports: a plain fold loads neither verification nor its libraries, nor the report's
records, so the CLI costs little more than Python's own start-up on top of the fold (issue 15: the CLI at the
copy floor). Counted in sys.modules of a fresh process; nothing here is timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers.samples import MODELS

SEED = MODELS / "qat_seed_prebn.onnx"

#: Never imported by a fold without --verify (or --dry-run / --pad-correction, which read shapes with onnx).
HEAVY = ("onnxruntime", "onnx", "numpy", "qdqfold.verify")
#: Not imported by a quiet file -> file fold: the results and the report's dataclasses, the rendering, and
#: what only other runs need (a thread pool, temporary directories, JSON, tracebacks, tqdm).
NOT_FOR_A_QUIET_FOLD = (*HEAVY, "qdqfold.batch", "qdqfold.report", "qdqfold.render", "qdqfold.graphinfo",
                        "dataclasses", "inspect", "concurrent.futures", "tempfile", "json", "traceback", "tqdm")

_DRIVER = """
import atexit, runpy, sys
atexit.register(lambda: None)  # keeps the interpreter's own exit (see qdqfold._start._exit_now): modules listed
sys.argv = ["qdqfold", *sys.argv[1:]]
try:
    runpy.run_module("qdqfold", run_name="__main__", alter_sys=True)  # as python -m qdqfold runs it
except SystemExit as e:
    status = e.code
modules = sorted(sys.modules)
import json
print(json.dumps({"status": status, "modules": modules}), file=sys.stderr)
"""


def _run_cli(*args) -> tuple[int, set[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", _DRIVER, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)
    last = done.stderr.strip().splitlines()[-1]
    outcome = json.loads(last)
    return outcome["status"], set(outcome["modules"])


def test_a_quiet_file_fold_imports_little(tmp_path):
    status, modules = _run_cli(SEED, "-o", tmp_path / "out.onnx", "-q")
    assert status == 0
    assert (tmp_path / "out.onnx").exists()
    assert sorted(m for m in NOT_FOR_A_QUIET_FOLD if m in modules) == []


def test_a_reported_fold_loads_no_verification(tmp_path):
    # With the summary printed (and a JSON report written) the report and the rendering load, verification not.
    status, modules = _run_cli(SEED, tmp_path / "out.onnx", "--report-json", tmp_path / "r.json")
    assert status == 0
    assert sorted(m for m in HEAVY if m in modules) == []
    assert {"qdqfold.report", "qdqfold.render"} <= modules


def test_a_reported_fold_loads_no_json_nor_shutil(tmp_path):
    # The summary as `qdqfold M -o O` prints it: no JSON module (only --json / --report-json need it), no shutil
    # (the terminal's width is read from os; shutil loads the compression modules).
    status, modules = _run_cli(SEED, "-o", tmp_path / "out.onnx")
    assert status == 0
    assert "qdqfold.render" in modules
    assert sorted(m for m in ("json", "shutil", "bz2", "lzma") if m in modules) == []


def test_a_zoo_fold_loads_no_verification(tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name in ("a.onnx", "b.onnx"):
        (zoo / name).write_bytes(SEED.read_bytes())
    status, modules = _run_cli(zoo, "-o", tmp_path / "out", "-q")
    assert status == 0
    assert sorted(m for m in HEAVY if m in modules) == []


def test_importing_the_package_and_the_cli_loads_nothing_heavy():
    code = "import sys; import qdqfold, qdqfold.cli; print(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    modules = set(done.stdout.split())
    assert sorted(m for m in NOT_FOR_A_QUIET_FOLD if m in modules) == []


def test_the_lazy_package_names_are_the_same_objects():
    import qdqfold
    import qdqfold.api
    import qdqfold.batch
    import qdqfold.report
    import qdqfold.verify
    import qdqfold_native

    assert qdqfold.verify is qdqfold.verify.__globals__["verify"]  # the function, not its module
    assert callable(qdqfold.verify) and qdqfold.verify.__module__ == "qdqfold.verify"
    assert qdqfold.fold_model is qdqfold.api.fold_model and qdqfold.OPTIONS is qdqfold.api.OPTIONS
    assert qdqfold.ModelResult is qdqfold.batch.ModelResult and qdqfold.FoldReport is qdqfold.report.FoldReport
    assert qdqfold.FoldError is qdqfold_native.FoldError
    namespace: dict = {}
    exec("from qdqfold import *", namespace)
    assert set(qdqfold.__all__) <= set(namespace)
