"""The command line: summary, report file, exit codes, atomic write and refusal to overwrite."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

import qdqfold_native
from qdqfold.cli import EXIT_STATUS_HELP, OPTION_FLAGS, build_parser
from qdqfold.verify import random_inputs

from helpers.onnxrt import run, session
from helpers.samples import MODELS, SAMPLE_MODELS

SEED = MODELS / "qat_seed_prebn.onnx"


def qdqfold(*args, cwd=None) -> subprocess.CompletedProcess:
    # This interpreter's import path, absolute, so the child finds the same qdqfold from any cwd.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    return subprocess.run([sys.executable, "-m", "qdqfold", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_folds_a_model_and_writes_the_report(tmp_path):
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    result = qdqfold(SEED, "-o", out, "--report-json", report)
    assert result.returncode == 0, result.stderr
    assert "BatchNormalization: 2 found" in result.stdout
    assert out.exists() and out.stat().st_size > 0
    data = json.loads(report.read_text())
    assert data["totals"]["batchnorms"] == 2
    assert {b["node"] for b in data["batchnorms"]} == {"/bn1/BatchNormalization", "/bn2/BatchNormalization"}


def test_quiet_prints_nothing(tmp_path):
    result = qdqfold(SEED, "-o", tmp_path / "out.onnx", "--quiet")
    assert result.returncode == 0 and result.stdout == ""


def test_refuses_to_overwrite_the_input_without_in_place(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(SEED.read_bytes())
    result = qdqfold(model, "-o", model)
    assert result.returncode == 2
    assert "--in-place" in result.stderr
    assert model.read_bytes() == SEED.read_bytes()
    result = qdqfold(model, "--in-place", "--quiet")
    assert result.returncode == 0, result.stderr


def _bad_input(directory: Path, kind: str) -> Path:
    if kind == "directory":
        return directory
    path = directory / f"{kind}.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello\n")
    return path  # "missing": never written


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "empty"),
    ("text", "not a valid ONNX"),
])
def test_bad_input_gives_one_line_and_exit_1(tmp_path, kind, message):
    out = tmp_path / "out.onnx"
    result = qdqfold(_bad_input(tmp_path, kind), "-o", out)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_failure_leaves_no_half_written_output(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous content")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(SEED.read_bytes()[:1000])
    result = qdqfold(truncated, "-o", out)
    assert result.returncode == 1
    assert out.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_missing_output_directories_are_created(tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.onnx"
    result = qdqfold(SEED, "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["out.onnx"]


def test_missing_output_is_a_usage_error():
    result = qdqfold(SEED)
    assert result.returncode == 2


def test_debug_shows_the_traceback(tmp_path):
    result = qdqfold(tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


# ------------------------------------------------------------------------------------- report, verify, CLI

SEED_FLOAT = MODELS / "seed_prebn.onnx"
README = Path(__file__).resolve().parent.parent / "README.md"


def _counts(path: Path) -> dict[str, int]:
    return dict(Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node))


def _json_run(*args) -> tuple[subprocess.CompletedProcess, dict]:
    result = qdqfold(*args, "--json")
    assert result.stdout.strip(), result.stderr
    return result, json.loads(result.stdout)


def test_summary_table_shows_op_counts_before_and_after(tmp_path):
    out = tmp_path / "out.onnx"
    result = qdqfold(SEED, "-o", out)
    assert result.returncode == 0, result.stderr
    before, after = _counts(SEED), _counts(out)
    for op in set(before) | set(after):
        row = re.search(rf"^\s+{op}\s+(\d+)\s+(\d+)\s*$", result.stdout, re.M)
        assert row, f"no row for {op} in\n{result.stdout}"
        assert (int(row[1]), int(row[2])) == (before.get(op, 0), after.get(op, 0))
    total = re.search(r"^\s+total nodes\s+(\d+)\s+(\d+)\s*$", result.stdout, re.M)
    assert (int(total[1]), int(total[2])) == (sum(before.values()), sum(after.values()))
    assert "\033[" not in result.stdout  # not a terminal: no colour


def test_json_report_content_matches_the_models(tmp_path):
    out = tmp_path / "out.onnx"
    report_file = tmp_path / "report.json"
    result, data = _json_run(SEED, "-o", out, "--report-json", report_file)
    assert result.returncode == 0
    saved = json.loads(report_file.read_text())
    saved.pop("seconds"), data.pop("seconds")
    assert saved == data  # --report-json and --json write the same document
    original, folded = onnx.load(SEED), onnx.load(out)
    assert data["input"] == str(SEED) and data["output"] == str(out) and data["written"] is True
    assert data["op_types"] == {"before": _counts(SEED), "after": _counts(out)}
    assert data["size"] == {"before": SEED.stat().st_size, "after": out.stat().st_size}
    bns = [n.name for n in original.graph.node if n.op_type == "BatchNormalization"]
    assert [b["node"] for b in data["batchnorms"]] == bns
    totals = data["totals"]
    assert totals["folded"] + totals["kept"] == totals["batchnorms"] == len(bns)
    left = {n.name for n in folded.graph.node if n.op_type == "BatchNormalization"}
    node_names = {n.name for n in original.graph.node}
    initializers = {t.name for t in folded.graph.initializer} | {o for n in folded.graph.node for o in n.output}
    for b in data["batchnorms"]:
        assert (b["node"] in left) != b["folded"]  # folded BNs are gone, kept ones are still there
        if b["folded"]:
            assert b["direction"] in ("backward", "forward") and set(b["into"]) <= node_names
            assert set(b["new_tensors"]) <= initializers
        else:
            assert b["code"] and b["message"]
    assert data["kept_by_reason"] == dict(Counter(b["code"] for b in data["batchnorms"] if not b["folded"]))


def test_dry_run_reports_without_writing(tmp_path):
    result, data = _json_run(SEED, "--dry-run")
    assert result.returncode == 0 and data["output"] is None and data["written"] is False
    assert data["totals"]["batchnorms"] == 2
    text = qdqfold(SEED, "--dry-run", cwd=tmp_path)
    assert "dry run, nothing written" in text.stdout and list(tmp_path.iterdir()) == []


def test_output_may_name_a_directory(tmp_path):
    assert qdqfold(SEED, "-o", tmp_path, "-q").returncode == 0
    assert (tmp_path / SEED.name).exists()


def test_explain_tells_one_batchnorms_story():
    model = onnx.load(SEED)
    bn = next(n for n in model.graph.node if n.name == "/bn2/BatchNormalization")
    producer = next(n for n in model.graph.node if bn.input[0] in n.output)
    result = qdqfold(SEED, "--explain", bn.name)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"BatchNormalization {bn.name}"
    assert f"{producer.op_type} {producer.name}" in result.stdout
    assert any(line.strip().startswith(("folded", "kept")) for line in lines)


def test_explain_an_unknown_node_is_a_usage_error():
    result = qdqfold(SEED, "--explain", "nope")
    assert result.returncode == 2
    assert "/bn1/BatchNormalization" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=lambda p: p.name)
def test_verify_figures_of_every_sample_model(tmp_path, path):
    out = tmp_path / "out.onnx"
    result, data = _json_run(path, "-o", out, "--verify", "--seed", "7")
    assert result.returncode == 0, result.stderr
    verification = data["verify"]
    assert verification["passed"] and verification["seed"] == 7
    # Recompute the largest difference ourselves from the written model on the same inputs (one thread, as
    # verify runs: more threads may sum in another order and move the last bits).
    # verify draws three input sets (seeds 7, 8, 9); max_abs is the largest over them.
    runs = [(_run_one_thread(path, feeds), _run_one_thread(out, feeds))
            for feeds in (random_inputs(session(onnx.load(path)), seed=s) for s in (7, 8, 9))]
    for k, figures in enumerate(verification["outputs"]):
        diff = max(float(np.abs(a[k].astype(np.float64) - e[k].astype(np.float64)).max()) for e, a in runs)
        assert figures["max_abs"] == pytest.approx(diff, rel=1e-9, abs=1e-30)
        if figures["step"] is not None:  # quantized graph: exact folds move no element by a step
            assert figures["moved"] == 0
    units = verification["quantized_units"]
    assert units["after"] >= units["before"]  # a fold never stops onnxruntime forming an integer kernel


def _run_one_thread(path: Path, feeds) -> list:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_verify_prints_figures_and_unit_counts(tmp_path):
    result = qdqfold(SEED, "-o", tmp_path / "o.onnx", "--verify")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+output\s+off\s+\S+\s+\S+\s+0/16384\s+0\s+\S+\s+\S+\s+exact\s*$", result.stdout, re.M)
    assert re.search(r"^\s+output\s+default\s+\S+\s+\S+\s+0/16384\s+0\s+\S+\s+\S+\s+exact\s*$", result.stdout, re.M)
    assert "verdict: EXACT" in result.stdout and "certificates: 1 folds" in result.stdout
    assert "quantized node units (ORT_ENABLE_ALL): before" in result.stdout  # counted at the default level verified


_PERTURBING_DRIVER = """
import sys
import onnx
from onnx import numpy_helper
import qdqfold_native

real_fold_file = qdqfold_native.fold_file

def fold_file_then_perturb(src, dst, **options):
    report = real_fold_file(src, dst, **options)
    model = onnx.load(dst)
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 0.01
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, dst)
    return report

qdqfold_native.fold_file = fold_file_then_perturb
from qdqfold.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_exit_3_when_verification_passes_the_tolerance(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_PERTURBING_DRIVER)

    def drive(*args):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
        return subprocess.run([sys.executable, str(driver), *map(str, args)], capture_output=True, text=True,
                              timeout=300, env=env)

    out = tmp_path / "out.onnx"
    failed = drive(SEED_FLOAT, "-o", out, "--verify", "--quiet")
    assert failed.returncode == 3, failed.stderr
    assert failed.stdout == "" and "verification failed" in failed.stderr and "/bn1/BatchNormalization" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    # Whatever the tolerance: the fold's certificate (its layer on the original's activations) catches it.
    assert drive(SEED_FLOAT, "-o", out, "--verify", "--tolerance", "1", "-q").returncode == 3
    assert drive(SEED_FLOAT, "-o", out, "-q").returncode == 0  # no --verify, no check


def test_a_real_fold_verifies_exact_even_with_zero_tolerance(tmp_path):
    folded = qdqfold_native.fold(SEED_FLOAT.read_bytes())
    feeds = random_inputs(session(onnx.load(SEED_FLOAT)))
    diff = max(float(np.abs(a - e).max()) for a, e in zip(run(folded, feeds), run(onnx.load(SEED_FLOAT), feeds)))
    # Tolerance 0: a correct fold still verifies exact, its deviation is within the rounding twin's floor.
    assert diff > 0
    result = qdqfold(SEED_FLOAT, "-n", "--verify", "--tolerance", "0", "-q")
    assert result.returncode == 0, result.stderr


def _external_data_model(directory: Path) -> Path:
    model = onnx.load(SEED_FLOAT)
    path = directory / "ext.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
                    size_threshold=0)
    return path


def test_external_data_model_folds_and_verifies(tmp_path):
    source = _external_data_model(tmp_path)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    result = qdqfold(source, "-o", out, "--verify", "-q")
    assert result.returncode == 0, result.stderr
    folded = onnx.load(out)  # loads its external data from beside it
    feeds = random_inputs(session(onnx.load(source)))
    for e, a in zip(run(onnx.load(source), feeds), run(folded, feeds)):
        span = float(e.max() - e.min())
        assert float(np.abs(a - e).max()) <= 1e-5 * span


@pytest.mark.parametrize("extra", [[], ["--dry-run"]], ids=["write", "dry-run"])
def test_missing_external_data_is_one_line_naming_the_file(tmp_path, extra):
    source = _external_data_model(tmp_path)
    (tmp_path / "ext.data").unlink()
    out = tmp_path / "out.onnx"
    result = qdqfold(source, *(extra or ["-o", out]))
    assert result.returncode == 1
    assert str(tmp_path / "ext.data") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_input_errors_name_the_path(tmp_path, kind):
    bad = _bad_input(tmp_path, kind)
    result = qdqfold(bad, "-o", tmp_path / "out.onnx", "--verify")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and str(bad) in result.stderr


def test_output_under_a_file_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    out = blocker / "out.onnx"
    result = qdqfold(SEED, "-o", out)
    assert result.returncode == 1 and str(out) in result.stderr and "cannot write" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_colour_only_on_a_terminal_and_never_with_no_color(tmp_path):
    assert "\033[" in qdqfold(SEED, "-n", "--color", "always").stdout
    assert "\033[" not in qdqfold(SEED, "-n").stdout

    def on_terminal(env):
        leader, follower = pty.openpty()
        with open(os.devnull, "rb") as stdin:
            proc = subprocess.Popen([sys.executable, "-m", "qdqfold", str(SEED), "-n"], stdin=stdin,
                                    stdout=follower, stderr=follower, env=env)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=300)
        os.close(leader)
        return b"".join(chunks).decode()

    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["TERM"] = "xterm"
    assert "\033[" in on_terminal(env)
    assert "\033[" not in on_terminal({**env, "NO_COLOR": "1"})


def test_every_native_option_has_a_flag():
    native = qdqfold_native.options()
    missing = sorted(set(native) - set(OPTION_FLAGS))
    assert not missing, f"add these native options to OPTION_FLAGS in python/qdqfold/arguments.py: {missing}"
    assert not set(OPTION_FLAGS) - set(native), "OPTION_FLAGS lists options the native module does not have"
    help_text = build_parser().format_help()
    for name, (flag, _) in OPTION_FLAGS.items():
        assert flag in help_text
        args = build_parser().parse_args([str(SEED), flag])
        assert getattr(args, name) is (not native[name])  # the flag turns the default around


def test_exit_statuses_are_documented_in_help_and_readme():
    help_codes = set(re.findall(r"^  (\d)  ", EXIT_STATUS_HELP, re.M))
    assert help_codes == {"0", "1", "2", "3", "4"}
    assert "exit status" in qdqfold("--help").stdout
    readme_codes = set(re.findall(r"^\| (\d) \|", README.read_text(), re.M))
    assert readme_codes == help_codes


def test_folding_a_file_loads_neither_onnx_nor_numpy(tmp_path):
    # Startup is part of the cost of a file -> file fold (about 0.2 s for these two): only --verify, --dry-run
    # and pad_correction's shape inference need them.
    code = ("import sys; from qdqfold.cli import main; status = main(sys.argv[1:]); "
            "loaded = sorted(m for m in ('onnx', 'numpy', 'onnxruntime') if m in sys.modules); "
            "print(status, loaded)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", code, str(SEED), "-o", str(tmp_path / "o.onnx"), "-q"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.stdout.strip() == "0 []", result.stderr


def test_version_names_the_release_and_the_native_module():
    done = qdqfold("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"qdqfold {qdqfold_native.__version__} (qdqfold_native at ")
    assert qdqfold_native.__file__ in done.stdout
