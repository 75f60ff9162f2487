"""Many models: directories (layout kept under -o DIR), failures listed at the end, --jobs, fold_many."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest

import qdqfold
import qdqfold.batch
from qdqfold.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

from helpers.onnxrt import assert_same_outputs
from helpers.samples import MODELS

LAYOUT = {
    "seed_prebn.onnx": "seed_prebn.onnx",
    "a/unet_up.onnx": "unet_up.onnx",
    "a/b/qat_seed_prebn.onnx": "qat_seed_prebn.onnx",
    "c/arcface_head.onnx": "arcface_head.onnx",
}


def qdqfold_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdqfold", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def zoo(tmp_path) -> Path:
    """A directory tree of sample models, plus a file that is not a model by name (ignored)."""
    root = tmp_path / "zoo"
    for relative, sample in LAYOUT.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MODELS / sample, root / relative)
    (root / "a" / "notes.txt").write_text("not a model")
    return root


def _relative_models(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*.onnx")}


def test_directory_keeps_its_layout_and_every_model_matches_its_original(zoo, tmp_path):
    out = tmp_path / "out"
    result = qdqfold_cli(zoo, "-o", out, "--no-progress")
    assert result.returncode == EXIT_OK, result.stderr
    assert _relative_models(out) == set(LAYOUT)
    for relative in LAYOUT:
        assert_same_outputs(onnx.load(zoo / relative), onnx.load(out / relative))
    assert f"{len(LAYOUT)} models: {len(LAYOUT)} folded, 0 failed" in result.stdout


def test_failures_are_listed_at_the_end_and_the_others_still_fold(zoo, tmp_path):
    (zoo / "a" / "broken.onnx").write_text("hello")
    (zoo / "c" / "truncated.onnx").write_bytes((MODELS / "seed_prebn.onnx").read_bytes()[:500])
    out = tmp_path / "out"
    result = qdqfold_cli(zoo, "-o", out, "--jobs", "2")
    assert result.returncode == EXIT_FAILED
    assert _relative_models(out) == set(LAYOUT)  # the good ones were all written
    tail = result.stderr.strip().splitlines()
    assert tail[0] == f"qdqfold: 2 of {len(LAYOUT) + 2} models failed:"
    assert len(tail) == 3 and "Traceback" not in result.stderr
    assert any(str(zoo / "a" / "broken.onnx") in line for line in tail[1:])
    assert any(str(zoo / "c" / "truncated.onnx") in line for line in tail[1:])


def test_files_and_directories_mix_and_json_lists_every_model(zoo, tmp_path):
    extra = tmp_path / "extra.onnx"
    shutil.copy(MODELS / "input_bn_net.onnx", extra)
    out = tmp_path / "out"
    result = qdqfold_cli(zoo, extra, tmp_path / "missing.onnx", "-o", out, "--json")
    assert result.returncode == EXIT_FAILED
    data = json.loads(result.stdout)
    assert data["totals"] == {"models": len(LAYOUT) + 2, "folded": len(LAYOUT) + 1, "failed": 1}
    assert {Path(m["output"]).relative_to(out).as_posix() for m in data["models"]} == set(LAYOUT) | {"extra.onnx"}
    assert data["failed"][0]["input"] == str(tmp_path / "missing.onnx")
    assert "no such file" in data["failed"][0]["error"]
    for m in data["models"]:
        original = onnx.load(m["input"])
        assert m["totals"]["batchnorms"] == sum(n.op_type == "BatchNormalization" for n in original.graph.node)


def test_jobs_give_the_same_bytes_as_one_job(zoo, tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    assert qdqfold_cli(zoo, "-o", one, "-q").returncode == 0
    assert qdqfold_cli(zoo, "-o", three, "-q", "--jobs", "3").returncode == 0
    for relative in LAYOUT:
        assert (one / relative).read_bytes() == (three / relative).read_bytes()


def test_jobs_run_models_at_the_same_time(zoo, tmp_path, monkeypatch):
    # Each fold waits at a barrier for a second one: this only gets through if two run concurrently.
    # (_fold_file is the one function every model file goes through.)
    barrier = threading.Barrier(2, timeout=20)
    real_fold = qdqfold.batch._fold_file
    calls = []

    def fold_in_pairs(*args, **kwargs):
        calls.append(args[0])
        barrier.wait()
        return real_fold(*args, **kwargs)

    monkeypatch.setattr(qdqfold.batch, "_fold_file", fold_in_pairs)
    assert main([str(zoo), "-o", str(tmp_path / "out"), "--jobs", "2", "-q"]) == EXIT_OK
    assert len(calls) == len(LAYOUT) and _relative_models(tmp_path / "out") == set(LAYOUT)
    # One job at a time cannot pass the barrier: the first model fails (and the run says so), proving the
    # check above measured concurrency.
    barrier.reset()
    barrier_one = threading.Barrier(2, timeout=1)
    monkeypatch.setattr(barrier, "wait", barrier_one.wait)
    assert main([str(zoo), "-o", str(tmp_path / "one"), "--jobs", "1", "-q"]) == EXIT_FAILED


def test_output_directory_inside_the_input_is_not_read_back(zoo):
    assert qdqfold_cli(zoo, "-o", zoo / "folded", "-q").returncode == 0
    result = qdqfold_cli(zoo, "-o", zoo / "folded", "--json")  # second run: the outputs are not inputs
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["totals"]["models"] == len(LAYOUT)


def test_two_inputs_for_one_output_is_a_usage_error(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        shutil.copy(MODELS / "seed_prebn.onnx", tmp_path / d / "m.onnx")
    result = qdqfold_cli(tmp_path / "x" / "m.onnx", tmp_path / "y" / "m.onnx", "-o", tmp_path / "out")
    assert result.returncode == EXIT_USAGE
    assert "would both be written" in result.stderr
    assert not (tmp_path / "out").exists()


def test_output_directory_that_cannot_be_made_is_one_line(zoo, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = qdqfold_cli(zoo, "-o", blocker / "sub")
    assert result.returncode == EXIT_FAILED
    assert str(blocker / "sub") in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_dry_run_and_in_place_on_a_directory(zoo, tmp_path):
    before = {r: (zoo / r).read_bytes() for r in LAYOUT}
    assert qdqfold_cli(zoo, "--dry-run", "-q").returncode == 0
    assert {r: (zoo / r).read_bytes() for r in LAYOUT} == before
    reference = tmp_path / "reference"
    assert qdqfold_cli(zoo, "-o", reference, "-q").returncode == 0
    assert qdqfold_cli(zoo, "--in-place", "-q").returncode == 0
    for r in LAYOUT:
        assert (zoo / r).read_bytes() == (reference / r).read_bytes()


def test_an_empty_directory_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = qdqfold_cli(tmp_path / "empty", "-o", tmp_path / "out")
    assert result.returncode == EXIT_FAILED and "no *.onnx model found" in result.stderr


# ------------------------------------------------------------------------------------------- fold_many

def test_fold_many_with_a_thread_executor(zoo, tmp_path):
    (zoo / "bad.onnx").write_bytes(b"\x08")
    out = tmp_path / "out"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = qdqfold.fold_many([zoo], out, executor=pool)
    by_input = {Path(r.input).relative_to(zoo).as_posix(): r for r in results}
    assert set(by_input) == set(LAYOUT) | {"bad.onnx"}
    assert not by_input["bad.onnx"].ok and "not a valid ONNX model" in by_input["bad.onnx"].error
    for relative in LAYOUT:
        r = by_input[relative]
        assert r.ok and r.written and Path(r.output) == out / relative
        model = onnx.load(zoo / relative)
        assert r.report.totals()["batchnorms"] == sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        assert r.ops_before == dict(__import__("collections").Counter(n.op_type for n in model.graph.node))
        assert_same_outputs(model, onnx.load(out / relative))


def test_fold_many_default_executor_dry_run_and_verification(zoo, tmp_path):
    results = qdqfold.fold_many(zoo, None, dry_run=True, verification=qdqfold.VerifySettings())
    assert len(results) == len(LAYOUT) and all(r.ok and not r.written and r.output is None for r in results)
    assert all(r.verification is not None and r.verification.passed for r in results)
    assert not any(p.name.endswith(".tmp") for p in zoo.rglob("*"))


def test_fold_many_passes_options_through(zoo, tmp_path):
    results = qdqfold.fold_many([zoo], tmp_path / "out", fold_backward=False, fold_forward=False)
    for r in results:  # nothing may fold with both directions off: every output is its input, byte for byte
        assert Path(r.output).read_bytes() == Path(r.input).read_bytes()
        assert r.report.totals()["folded"] == 0


def test_fold_many_on_a_local_dask_cluster(zoo, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        results = qdqfold.fold_many([zoo], tmp_path / "out", executor=client.get_executor())
    assert sorted(Path(r.output).relative_to(tmp_path / "out").as_posix() for r in results) == sorted(LAYOUT)
    assert all(r.ok for r in results)
    for relative in LAYOUT:
        assert_same_outputs(onnx.load(zoo / relative), onnx.load(tmp_path / "out" / relative))


def _on_a_terminal(*args) -> str:
    """Runs the CLI with stdout and stderr on a pseudo-terminal; returns all it wrote."""
    import os
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "qdqfold", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=600)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_only(zoo, tmp_path):
    assert f"/{len(LAYOUT)} [" in _on_a_terminal(zoo, "-o", tmp_path / "a")  # tqdm's "k/N [elapsed..."
    piped = qdqfold_cli(zoo, "-o", tmp_path / "b")
    assert piped.returncode == 0 and f"/{len(LAYOUT)} [" not in piped.stderr + piped.stdout
    assert f"/{len(LAYOUT)} [" not in _on_a_terminal(zoo, "-o", tmp_path / "c", "--no-progress")
