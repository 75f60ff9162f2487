"""Safe files: a model never decides where qdqfold writes, a fold never pairs a model with another's data, and
every bad file gets a one-line error naming it, with nothing written or left behind.

Each test is one class of the issue "Safe files": writes chosen by the model, two models / one data file, one
file under two names, links and special files, the input changing underneath, Ctrl-C, errors that name the
right file, deep nesting. The models are small Conv -> BN chains whose weights live in external data files at
locations the test chooses; each fold is checked by running the output in onnxruntime against the original.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from helpers.onnxrt import assert_same_outputs
from helpers.wire import nested_if_model


def chain(seed: int, layers: int = 2, channels: int = 8, size: int = 6) -> onnx.ModelProto:
    """Conv -> BN -> Relu, `layers` times; weights w0, w1, ... differ with `seed`."""
    rng = np.random.default_rng(seed)
    c = channels
    inits, nodes, x = [], [], "x"
    for k in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), f"w{k}"))
        for name, value in (("g", rng.uniform(0.5, 2, c)), ("b", rng.standard_normal(c)), ("m", rng.standard_normal(c)),
                            ("v", rng.uniform(0.5, 2, c))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}{k}"))
        nodes += [helper.make_node("Conv", [x, f"w{k}"], [f"c{k}"], pads=[1, 1, 1, 1], name=f"conv{k}"),
                  helper.make_node("BatchNormalization", [f"c{k}", f"g{k}", f"b{k}", f"m{k}", f"v{k}"], [f"n{k}"],
                                   name=f"bn{k}"),
                  helper.make_node("Relu", [f"n{k}"], [f"r{k}"])]
        x = f"r{k}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_external(model: onnx.ModelProto, path: Path, locations: dict[str, str]) -> onnx.ModelProto:
    """Saves `model` at `path` with each initializer named in `locations` stored at that location (relative to
    path's directory; several tensors may share a file, appended in order). Returns the in-memory original."""
    original = onnx.ModelProto()
    original.CopyFrom(model)
    written: dict[Path, int] = {}
    for tensor in model.graph.initializer:
        if tensor.name not in locations:
            continue
        location = locations[tensor.name]
        file = (path.parent / location)
        key = file.resolve()
        file.parent.mkdir(parents=True, exist_ok=True)
        offset = written.get(key, 0)
        with open(file, "r+b" if key in written else "wb") as f:
            f.seek(offset)
            f.write(tensor.raw_data)
        written[key] = offset + len(tensor.raw_data)
        length = len(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=k, value=v)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return original


def cli(*args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    return subprocess.run([sys.executable, "-m", "qdqfold", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and "internal error" not in result.stderr, lines
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every regular file below `directory` with its bytes (links and special files by kind)."""
    files = {}
    for p in sorted(directory.rglob("*")):
        mode = os.lstat(p).st_mode
        key = str(p.relative_to(directory))
        files[key] = p.read_bytes() if stat.S_ISREG(mode) else stat.S_IFMT(mode).to_bytes(4, "little")
    return files


def folds_correctly(original: onnx.ModelProto, output: Path) -> None:
    folded = onnx.load(output)  # external data from beside the output: the pairing under test
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert_same_outputs(original, folded)


# ------------------------------------------------------------------------------- writes chosen by the model


def test_a_data_location_never_chooses_where_qdqfold_writes(tmp_path):
    """A download whose data sits at `.ssh/authorized_keys` and `notes.txt` (shipped inside it) must not
    replace the user's files of those names beside the output."""
    download, home = tmp_path / "dl", tmp_path / "home"
    original = save_external(chain(1), download / "m.onnx", {"w0": ".ssh/authorized_keys", "w1": "notes.txt"})
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA the user's key\n")
    (home / "notes.txt").write_text("the user's notes\n")
    before = snapshot(home)

    result = cli(download / "m.onnx", "-o", home / "m.folded.onnx")
    assert result.returncode == 0, result.stderr
    after = snapshot(home)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the user's changed
    assert sorted(set(after) - set(before)) == ["m.folded.onnx", "m.folded.onnx.2.data", "m.folded.onnx.data"]
    assert "m.folded.onnx.data" in result.stdout  # the CLI names the data files it wrote
    folds_correctly(original, home / "m.folded.onnx")


@pytest.mark.parametrize("data_name", ["weights.bin", "model.onnx.data"])
def test_two_models_whose_data_files_share_a_name_fold_in_one_batch(tmp_path, data_name):
    enc = save_external(chain(1), tmp_path / "a" / "enc.onnx", {"w0": data_name, "w1": data_name})
    dec = save_external(chain(2), tmp_path / "b" / "dec.onnx", {"w0": data_name, "w1": data_name})
    result = cli(tmp_path / "a" / "enc.onnx", tmp_path / "b" / "dec.onnx", "-o", tmp_path / "out", "--jobs", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dec.onnx", "dec.onnx.data", "enc.onnx",
                                                                    "enc.onnx.data"]
    folds_correctly(enc, tmp_path / "out" / "enc.onnx")
    folds_correctly(dec, tmp_path / "out" / "dec.onnx")


def test_two_models_that_would_share_an_output_name_are_refused(tmp_path):
    save_external(chain(1), tmp_path / "a" / "model.onnx", {"w0": "model.onnx.data"})
    save_external(chain(2), tmp_path / "b" / "model.onnx", {"w0": "model.onnx.data"})
    result = cli(tmp_path / "a", tmp_path / "b", "-o", tmp_path / "out")
    assert result.returncode == 2 and "would both be written" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_named_like_another_outputs_data_file_is_refused(tmp_path):
    from qdqfold.batch import plan_outputs

    for name in ("m.onnx", "m.onnx.data", "n.onnx", "n.onnx.2.data"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="gives its external data"):
        plan_outputs([tmp_path / "m.onnx", tmp_path / "m.onnx.data"], tmp_path / "out")
    with pytest.raises(ValueError, match="gives its external data"):
        plan_outputs([tmp_path / "n.onnx", tmp_path / "n.onnx.2.data"], tmp_path / "out")
    assert len(plan_outputs([tmp_path / "m.onnx", tmp_path / "n.onnx"], tmp_path / "out")) == 2


def test_two_runs_of_one_model_into_one_directory_keep_their_own_data(tmp_path):
    original = save_external(chain(3), tmp_path / "src" / "m.onnx", {"w0": "weights.bin", "w1": "weights.bin"})
    other = save_external(chain(4), tmp_path / "src2" / "m.onnx", {"w0": "weights.bin", "w1": "weights.bin"})
    assert cli(tmp_path / "src" / "m.onnx", "-o", tmp_path / "out" / "a.onnx").returncode == 0
    assert cli(tmp_path / "src2" / "m.onnx", "-o", tmp_path / "out" / "b.onnx").returncode == 0
    folds_correctly(original, tmp_path / "out" / "a.onnx")  # not overwritten by the second run's data
    folds_correctly(other, tmp_path / "out" / "b.onnx")


@pytest.mark.parametrize("location, output", [
    ("folded.onnx", "out/folded.onnx"),   # the input's data file has the output model's name
    ("weights/m.data", "elsewhere/m.onnx"),  # data in a subfolder (which onnx loads) folds to any directory
])
def test_data_file_names_of_the_input_never_constrain_the_output(tmp_path, location, output):
    original = save_external(chain(5), tmp_path / "src" / "m.onnx", {"w0": location, "w1": location})
    result = cli(tmp_path / "src" / "m.onnx", "-o", tmp_path / output)
    assert result.returncode == 0, result.stderr
    folds_correctly(original, tmp_path / output)


def test_files_the_fold_reads_are_never_replaced(tmp_path):
    """The input's data file carries the name the output's data file would get, or the output's own name."""
    src = tmp_path / "src"
    save_external(chain(6), src / "m.onnx", {"w0": "x.onnx.data", "w1": "w.bin"})
    before = snapshot(src)
    line = one_line_error(cli(src / "m.onnx", "-o", src / "x.onnx"))
    assert str(src / "x.onnx.data") in line and "never replaces a file the fold reads" in line
    line = one_line_error(cli(src / "m.onnx", "-o", src / "w.bin"))
    assert line.startswith(f"qdqfold: error: {src / 'w.bin'}:") and "never replaces" in line
    assert snapshot(src) == before


def test_an_existing_file_at_the_data_name_needs_force_unless_an_earlier_run_wrote_it(tmp_path):
    original = save_external(chain(7), tmp_path / "src" / "m.onnx", {"w0": "m.data", "w1": "m.data"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx.data").write_text("the user's file\n")
    line = one_line_error(cli(tmp_path / "src" / "m.onnx", "-o", out / "m.onnx"))
    assert str(out / "m.onnx.data") in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx.data"]
    assert (out / "m.onnx.data").read_text() == "the user's file\n"

    assert cli(tmp_path / "src" / "m.onnx", "-o", out / "m.onnx", "--force").returncode == 0
    folds_correctly(original, out / "m.onnx")
    # A second run into the same output replaces the data file the first one wrote, without --force.
    assert cli(tmp_path / "src" / "m.onnx", "-o", out / "m.onnx").returncode == 0
    folds_correctly(original, out / "m.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_an_earlier_outputs_extra_data_files_are_removed_when_replaced(tmp_path):
    two = save_external(chain(8), tmp_path / "a" / "m.onnx", {"w0": "one.bin", "w1": "two.bin"})
    one = save_external(chain(9), tmp_path / "b" / "m.onnx", {"w0": "one.bin", "w1": "one.bin"})
    out = tmp_path / "out" / "m.onnx"
    assert cli(tmp_path / "a" / "m.onnx", "-o", out).returncode == 0
    folds_correctly(two, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.2.data", "m.onnx.data"]
    assert cli(tmp_path / "b" / "m.onnx", "-o", out).returncode == 0
    folds_correctly(one, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_in_place_replaces_the_data_files_and_leaves_nothing_stale(tmp_path):
    original = save_external(chain(10), tmp_path / "m.onnx", {"w0": "weights/m.data", "w1": "weights/m.data"})
    for _ in range(3):  # every run leaves exactly the model and its data file
        result = cli(tmp_path / "m.onnx", "--in-place")
        assert result.returncode == 0, result.stderr
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == \
            ["m.onnx", "m.onnx.data"]
        folds_correctly(original, tmp_path / "m.onnx")
    assert "removed" not in result.stdout  # the last runs replaced m.onnx.data itself


# ---------------------------------------------------------------------------- one file under two names


def test_one_data_file_under_two_names_is_one_file(tmp_path):
    original = save_external(chain(11), tmp_path / "src" / "m.onnx", {"w0": "m.data", "w1": "./m.data"})
    report = qdqfold_native.fold_file(tmp_path / "src" / "m.onnx", tmp_path / "out.onnx")
    assert [b["folded"] for b in report["batchnorms"]] == [True, True]
    assert report["data_files"] == [str(tmp_path / "out.onnx.data")]
    folds_correctly(original, tmp_path / "out.onnx")


def test_a_link_inside_the_model_directory_is_the_file_it_names(tmp_path):
    src = tmp_path / "src"
    original = save_external(chain(12), src / "m.onnx", {"w0": "m.data", "w1": "sub/real.data"})
    (src / "link.data").symlink_to("sub/real.data")
    model = onnx.load(src / "m.onnx", load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.value == "sub/real.data":
                e.value = "link.data"
    (src / "m.onnx").write_bytes(model.SerializeToString())
    report = qdqfold_native.fold_file(src / "m.onnx", tmp_path / "out.onnx")
    assert all(b["folded"] for b in report["batchnorms"])
    folds_correctly(original, tmp_path / "out.onnx")


# ------------------------------------------------------------------------------- links and special files


@pytest.mark.parametrize("how", ["file-link", "directory-link"])
def test_a_link_out_of_the_model_directory_is_refused(tmp_path, how):
    outside = tmp_path / "outside"
    secret_model = save_external(chain(13), outside / "x.onnx", {"w0": "secret.bin", "w1": "secret.bin"})
    del secret_model
    src = tmp_path / "src"
    save_external(chain(13), src / "m.onnx", {"w0": "d/secret.bin", "w1": "d/secret.bin"})
    (src / "d" / "secret.bin").unlink()
    if how == "file-link":
        (src / "d" / "secret.bin").symlink_to(outside / "secret.bin")
    else:
        (src / "d").rmdir()
        (src / "d").symlink_to(outside)
    with pytest.raises(qdqfold_native.FileError, match="outside the model's directory"):
        qdqfold_native.fold_file(src / "m.onnx", tmp_path / "out.onnx")
    line = one_line_error(cli(src / "m.onnx", "-o", tmp_path / "out.onnx"))
    assert "outside the model's directory" in line
    line = one_line_error(cli(src / "m.onnx", "--dry-run"))
    assert "outside the model's directory" in line
    assert not list(tmp_path.glob("out.onnx*")) and not list(tmp_path.glob(".out.onnx*"))


def test_a_fifo_input_or_data_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.onnx")
    line = one_line_error(cli(tmp_path / "pipe.onnx", "-o", tmp_path / "out.onnx", timeout=60))
    assert str(tmp_path / "pipe.onnx") in line and "FIFO" in line
    with pytest.raises(qdqfold_native.FileError, match="FIFO"):
        qdqfold_native.fold_file(tmp_path / "pipe.onnx", tmp_path / "out.onnx")

    save_external(chain(14), tmp_path / "m.onnx", {"w0": "data.bin", "w1": "data.bin"})
    (tmp_path / "data.bin").unlink()
    os.mkfifo(tmp_path / "data.bin")
    for extra in (["-o", tmp_path / "out.onnx"], ["--dry-run"]):
        line = one_line_error(cli(tmp_path / "m.onnx", *extra, timeout=60))
        assert str(tmp_path / "data.bin") in line and "FIFO" in line
    assert not (tmp_path / "out.onnx").exists()


def test_an_output_that_is_not_a_regular_file_is_never_replaced(tmp_path):
    save_external(chain(15), tmp_path / "m.onnx", {"w0": "m.data"})
    os.mkfifo(tmp_path / "fifo.onnx")
    line = one_line_error(cli(tmp_path / "m.onnx", "-o", tmp_path / "fifo.onnx", timeout=60))
    assert "FIFO" in line and stat.S_ISFIFO(os.lstat(tmp_path / "fifo.onnx").st_mode)
    if os.path.exists("/dev/null"):
        line = one_line_error(cli(tmp_path / "m.onnx", "-o", "/dev/null"))
        assert "/dev/null" in line and "character device" in line
        assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(qdqfold_native.FileError, match="is a directory"):
        qdqfold_native.fold_file(tmp_path / "m.onnx", tmp_path / "dir.onnx")
    # A data file name taken by a directory, or a FIFO, is refused even with --force.
    (tmp_path / "out.onnx.data").mkdir()
    line = one_line_error(cli(tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--force"))
    assert line.startswith(f"qdqfold: error: {tmp_path / 'out.onnx.data'}: is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "fifo.onnx", "m.data", "m.onnx", "out.onnx.data"]


def test_external_data_outside_initializers_is_refused(tmp_path):
    """A Constant whose tensor is external would keep pointing at the input's file (or at whatever carries its
    name beside the output): refused, naming the node."""
    model = chain(16, layers=1)
    value = numpy_helper.from_array(np.ones(8, np.float32), "k")
    model.graph.node.append(helper.make_node("Constant", [], ["k"], value=value, name="const"))
    model.graph.output.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [8]))
    tensor = model.graph.node[-1].attribute[0].t
    (tmp_path / "k.bin").write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="k.bin")
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(qdqfold_native.FileError, match="const .*external data"):
        qdqfold_native.fold_file(tmp_path / "m.onnx", tmp_path / "out.onnx")


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
