"""The command line's quick exit (qdqfold._start._exit_now): the process ends at once after a run only when
the interpreter's exit has nothing left to do but tear itself down, and never before its output is out."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading

import pytest

from helpers.samples import MODELS
from qdqfold import _start

SEED = MODELS / "qat_seed_prebn.onnx"


@pytest.fixture
def exits(monkeypatch):
    """The statuses os._exit was called with (it is not called for real)."""
    calls: list[int] = []
    monkeypatch.setattr(_start.os, "_exit", calls.append)
    return calls


def test_it_exits_at_once_when_nothing_is_left(exits, monkeypatch):
    monkeypatch.setattr(atexit, "_ncallbacks", lambda: 0)
    # threads an earlier test of this process left alive (a pool's idle workers) are not this test's subject
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(sys, "gettrace", lambda: None)  # a coverage tool or debugger running this test
    monkeypatch.setattr(sys, "getprofile", lambda: None)
    if hasattr(sys, "monitoring"):
        monkeypatch.setattr(sys.monitoring, "get_tool", lambda i: None)
    _start._exit_now(3)
    assert exits == [3]


def test_an_atexit_callback_keeps_the_normal_exit(exits, monkeypatch):
    def callback() -> None:
        pass

    monkeypatch.setattr(threading, "active_count", lambda: 1)

    atexit.register(callback)
    try:
        _start._exit_now(0)
    finally:
        atexit.unregister(callback)
    assert exits == []


def test_another_thread_keeps_the_normal_exit(exits, monkeypatch):
    monkeypatch.setattr(atexit, "_ncallbacks", lambda: 0)
    release = threading.Event()
    worker = threading.Thread(target=release.wait, args=(30,))
    worker.start()
    try:
        _start._exit_now(0)
    finally:
        release.set()
        worker.join()
    assert exits == []


def test_a_stream_that_cannot_be_flushed_keeps_the_normal_exit(exits, monkeypatch):
    class Broken:
        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(atexit, "_ncallbacks", lambda: 0)
    monkeypatch.setattr(sys, "stdout", Broken())
    _start._exit_now(0)
    assert exits == []


def test_the_model_on_standard_output_is_all_there(tmp_path):
    # -o -: the folded model goes through a pipe and the process ends right after; every byte arrives.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    piped = subprocess.run([sys.executable, "-m", "qdqfold", str(SEED), "-o", "-", "-q"], capture_output=True,
                           env=env, timeout=300)
    assert piped.returncode == 0, piped.stderr
    filed = subprocess.run([sys.executable, "-m", "qdqfold", str(SEED), "-o", str(tmp_path / "out.onnx"), "-q"],
                           capture_output=True, env=env, timeout=300)
    assert filed.returncode == 0, filed.stderr
    assert piped.stdout == (tmp_path / "out.onnx").read_bytes()


def test_a_tracer_keeps_the_normal_exit(exits, monkeypatch):
    monkeypatch.setattr(atexit, "_ncallbacks", lambda: 0)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(sys, "gettrace", lambda: (lambda *a: None))
    _start._exit_now(0)
    assert exits == []


def test_a_profiler_around_the_cli_still_writes_its_profile(tmp_path):
    # python -m cProfile -o P -m qdqfold ...: cProfile writes P after qdqfold's main returns.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    profile = tmp_path / "prof.out"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "qdqfold", str(SEED),
                           "-o", str(tmp_path / "out.onnx"), "-q"], capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.onnx").stat().st_size > 0
    assert profile.stat().st_size > 0


def test_the_json_report_on_a_pipe_is_all_there(tmp_path):
    # --json goes through print (text, not the binary buffer) and the process may end right after.
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-m", "qdqfold", str(SEED), "-o", str(tmp_path / "out.onnx"), "--json"],
                          capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["batchnorms"]
