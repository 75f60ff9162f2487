"""Safe files, while and after folding: the input changing underneath, Ctrl-C, errors that name the right file,
deep nesting, fold(base_directory). Each bad file gets a one-line error naming it, with nothing written or left
behind. Builders: helpers/safe_files.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from helpers.onnxrt import assert_same_outputs
from helpers.safe_files import chain, cli, folds_correctly, one_line_error, save_external
from helpers.wire import nested_if_model


# --------------------------------------------------------------------------- the input changing underneath

_TRUNCATE_DURING_FOLD = """
import os, sys, threading, time
import qdqfold_native
src, dst, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
def truncate():
    time.sleep(delay)
    os.truncate(src, os.path.getsize(src) // 3)
threading.Thread(target=truncate).start()
try:
    qdqfold_native.fold_file(src, dst)
    print("folded")
except qdqfold_native.FoldError as e:
    print("FoldError:", e)
"""


def test_an_input_truncated_during_the_fold_is_an_error_not_a_signal(tmp_path):
    """A 150 MB model truncated at several moments of its fold: the process never dies of SIGBUS; each run
    either folded (the truncation came after) or says the input changed, leaving no file behind."""
    c = 6000
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((c, c, 1, 1), dtype=np.float32)
    inits = [numpy_helper.from_array(weight, "w")] + [
        numpy_helper.from_array(v.astype(np.float32), n) for n, v in
        (("g", rng.uniform(0.5, 2, c)), ("b", rng.standard_normal(c)), ("m", rng.standard_normal(c)),
         ("v", rng.uniform(0.5, 2, c)))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 1, 1])], inits)
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    assert len(data) > 100e6
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    outcomes = []
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.15):
        src = tmp_path / "m.onnx"
        src.write_bytes(data)
        done = subprocess.run([sys.executable, "-c", _TRUNCATE_DURING_FOLD, str(src), str(out_dir / "f.onnx"),
                               str(delay)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (delay, done.returncode, done.stderr)  # not killed by a signal
        outcome = done.stdout.strip()
        outcomes.append(outcome)
        if outcome != "folded":
            assert outcome.startswith("FoldError:"), outcome
            assert list(out_dir.iterdir()) == []  # no output, no temporary file
        else:
            (out_dir / "f.onnx").unlink()
    assert any("the input changed while it was being folded" in o for o in outcomes), outcomes


# -------------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_stops_a_batch_promptly(tmp_path):
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    zoo.mkdir()
    model = chain(17, layers=2, channels=512, size=2).SerializeToString()  # 19 MB each
    count = 24
    for k in range(count):
        (zoo / f"m{k:02}.onnx").write_bytes(model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    process = subprocess.Popen([sys.executable, "-m", "qdqfold", str(zoo), "-o", str(out), "--jobs", "2",
                                "--verify"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and any(out.glob("*.onnx"))):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # it did not stop: fail without leaving it running
            process.kill()
            process.communicate()
    written = sorted(out.glob("*.onnx"))
    details = (time.monotonic() - started, process.returncode, len(written), stdout[-2000:], stderr[-2000:])
    assert time.monotonic() - started < 30, details
    assert process.returncode == 130, details
    assert "not folded: interrupted" in stderr and stderr.rstrip().endswith("qdqfold: interrupted"), details
    assert 0 < len(written) < count, details
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # nothing partial
    for path in written:
        onnx.checker.check_model(onnx.load(path))


def test_an_interrupted_fold_file_leaves_no_file(tmp_path):
    """qdqfold_native.interrupt() stops a fold_file that is running (here: while it writes an 80 MB folded
    weight, 1 MB at a time) with FileError('<dst>: interrupted'), removing its temporary files; a fold started
    afterwards is not affected."""
    import threading

    model = chain(18, layers=1, channels=1500, size=3)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((1500, 1500, 3, 3), dtype=np.float32), "w0"))
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    out.mkdir()
    errors = []

    def fold():
        try:
            qdqfold_native.fold_file(tmp_path / "m.onnx", out / "f.onnx")
        except qdqfold_native.FileError as e:
            errors.append(str(e))

    thread = threading.Thread(target=fold)
    thread.start()
    while thread.is_alive() and not list(out.glob(".f.onnx.*.tmp")):  # the output is being written
        time.sleep(0.001)
    qdqfold_native.interrupt()
    thread.join()
    assert errors == [f"{out / 'f.onnx'}: interrupted"]
    assert list(out.iterdir()) == []
    qdqfold_native.fold_file(tmp_path / "m.onnx", out / "g.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["g.onnx"]


# -------------------------------------------------------------------------------- errors that name the file

_WRITE_LIMIT = """
import resource, signal, sys
from qdqfold.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.exit(main(sys.argv[2:]))
"""


def test_a_failure_writing_a_data_file_names_that_file(tmp_path):
    save_external(chain(19, layers=2, channels=64), tmp_path / "src" / "m.onnx", {"w0": "m.data", "w1": "m.data"})
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", _WRITE_LIMIT, "100000", str(tmp_path / "src" / "m.onnx"), "-o",
                           str(out / "m.onnx")], capture_output=True, text=True, env=env, timeout=120)
    line = one_line_error(done)
    assert line.startswith(f"qdqfold: error: {out / 'm.onnx.data'}: cannot write") and "not a valid" not in line
    assert list(out.iterdir()) == []


def test_an_output_ending_in_a_slash_is_a_directory(tmp_path):
    original = save_external(chain(21), tmp_path / "m.onnx", {"w0": "m.data"})
    result = cli(tmp_path / "m.onnx", "-o", f"{tmp_path / 'newdir'}/")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "newdir").iterdir()) == ["m.onnx", "m.onnx.data"]
    folds_correctly(original, tmp_path / "newdir" / "m.onnx")


def test_an_invalid_model_is_blamed_on_the_model(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08")
    line = one_line_error(cli(tmp_path / "bad.onnx", "-o", tmp_path / "out.onnx"))
    assert line.startswith(f"qdqfold: error: {tmp_path / 'bad.onnx'}: not a valid ONNX model")


# ------------------------------------------------------------------------------------------- deep nesting


def test_nesting_deeper_than_pythons_recursion_limit_is_a_clean_error(tmp_path):
    (tmp_path / "deep.onnx").write_bytes(nested_if_model(1000))
    for extra in (["-o", tmp_path / "out.onnx"], ["--dry-run"], ["--json"]):
        line = one_line_error(cli(tmp_path / "deep.onnx", *extra))
        assert "nested more than" in line and "RecursionError" not in line
    from qdqfold.graphinfo import read_model_info

    assert len(read_model_info(nested_if_model(5000)).nodes) == 5001  # the reader itself has no depth limit


# ------------------------------------------------------------------------------------- fold(base_directory)


def test_fold_in_memory_reads_external_data_under_the_same_rules(tmp_path):
    original = save_external(chain(22), tmp_path / "src" / "m.onnx", {"w0": "m.data", "w1": "m.data"})
    data = (tmp_path / "src" / "m.onnx").read_bytes()
    kept = qdqfold_native.fold_with_report(data)[1]
    assert [b["code"] for b in kept["batchnorms"]] != [b["code"] for b in
                                                       qdqfold_native.fold_with_report(data, base_directory=tmp_path / "src")[1]["batchnorms"]]
    folded = onnx.ModelProto()
    folded.ParseFromString(qdqfold_native.fold(data, base_directory=tmp_path / "src"))
    onnx.load_external_data_for_model(folded, str(tmp_path / "src"))
    assert_same_outputs(original, folded)
    (tmp_path / "src" / "m.data").rename(tmp_path / "m.data")
    (tmp_path / "src" / "m.data").symlink_to(tmp_path / "m.data")
    with pytest.raises(qdqfold_native.FileError, match="outside the model's directory"):
        qdqfold_native.fold(data, base_directory=tmp_path / "src")


def test_a_mapped_buffer_that_shrinks_during_fold_is_an_error_not_a_signal(tmp_path):
    """qdqfold_native.fold() on a caller's mmap (what a dry run and fold_model(path) hand it): the buffer is
    guarded too, so the file shrinking underneath gives a FileError (or, if it came too late, the fold)."""
    model = chain(23, layers=1, channels=2000, size=1)
    model.graph.node[0].attribute[0].CopyFrom(helper.make_attribute("pads", [0, 0, 0, 0]))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((2000, 2000, 3, 3), dtype=np.float32), "w0"))
    path = tmp_path / "m.onnx"
    data = model.SerializeToString()
    script = """
import mmap, os, sys, threading, time
import qdqfold_native
path, delay = sys.argv[1], float(sys.argv[2])
with open(path, "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
def shrink():
    time.sleep(delay)
    os.truncate(path, 1000)
threading.Thread(target=shrink).start()
try:
    qdqfold_native.fold(mapped)
    print("folded")
except qdqfold_native.FileError as e:
    print("FileError:", e)
"""
    outcomes = []
    for delay in (0.0, 0.01, 0.03, 0.06):
        path.write_bytes(data)
        done = subprocess.run([sys.executable, "-c", script, str(path), str(delay)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (delay, done.returncode, done.stderr)  # never SIGBUS
        outcomes.append(done.stdout.strip())
    assert all(o == "folded" or "the input changed while it was being folded" in o for o in outcomes), outcomes
    assert any("the input changed" in o for o in outcomes), outcomes
