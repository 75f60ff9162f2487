"""The command line: summary, report file, exit codes, atomic write and refusal to overwrite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODELS

SEED = MODELS / "qat_seed_prebn.onnx"


def qdqfold(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdqfold", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


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


def test_unwritable_output_directory(tmp_path):
    result = qdqfold(SEED, "-o", tmp_path / "no" / "such" / "dir" / "out.onnx")
    assert result.returncode == 1
    assert "cannot write" in result.stderr


def test_missing_output_is_a_usage_error():
    result = qdqfold(SEED)
    assert result.returncode == 2


def test_debug_shows_the_traceback(tmp_path):
    result = qdqfold(tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
