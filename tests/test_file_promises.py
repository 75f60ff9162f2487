"""The file promises on every way in (issue 23): a model from standard input with external data, the modes of
what qdqfold writes, path errors that stay one line, in-place over a tree with links out of it, Ctrl-C at any
moment, a Dask batch whose workers never answer, and BNs kept because the weights are not there.

Each fold of these small Conv -> BN chains is compared with the fold of the same model from its file (byte for
byte), which tests/test_safe_files.py checks against onnxruntime running the original.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest

import qdqfold
import qdqfold_native
from qdqfold import cli, many
from helpers.safe_files import chain, save_external


def run_cli(*args, stdin: bytes | None = None, umask: int | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdqfold", *map(str, args)], input=stdin, capture_output=True,
                          timeout=timeout, cwd=cwd,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, done.stderr.decode()
    assert lines[0].startswith("qdqfold: error: ") and "internal error" not in lines[0] and "Traceback" not in lines[0]
    return lines[0]


def external_model(directory: Path, seed: int = 1, name: str = "m.onnx", data: str = "m.data") -> Path:
    path = directory / name
    model = chain(seed)
    save_external(model, path, {t.name: data for t in model.graph.initializer if t.name.startswith("w")})
    return path


def locations(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


# --------------------------------------------------------------------------------- 1. standard input


def test_standard_input_with_external_data_needs_a_directory(tmp_path):
    model = external_model(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    # The trap of the issue: out/ holds another model's m.data, which an output naming m.data would compute with.
    external_model(tmp_path / "other", seed=7)
    (out / "m.data").write_bytes((tmp_path / "other" / "m.data").read_bytes())
    done = run_cli("-", "-o", out / "o.onnx", stdin=model.read_bytes())
    assert done.returncode == 1
    line = one_error_line(done)
    assert "<stdin>" in line and "m.data" in line and "--base-dir" in line
    assert sorted(p.name for p in out.iterdir()) == ["m.data"]  # nothing written
    # A dry run and standard output are refused alike; --base-dir with a model file is a usage error.
    assert run_cli("-", "-n", stdin=model.read_bytes()).returncode == 1
    assert run_cli("-", "-o", "-", "--base-dir", model.parent, stdin=model.read_bytes()).returncode == 1
    assert run_cli(model, "-o", out / "x.onnx", "--base-dir", model.parent).returncode == 2


def test_standard_input_reads_external_data_from_base_dir(tmp_path):
    model = external_model(tmp_path / "in")
    from_file, from_stdin = tmp_path / "a", tmp_path / "b"
    assert run_cli(model, "-o", from_file / "o.onnx", "-q").returncode == 0
    from_stdin.mkdir()
    done = run_cli("-", "-o", from_stdin / "o.onnx", "--base-dir", model.parent, stdin=model.read_bytes())
    assert done.returncode == 0, done.stderr.decode()
    # The same files as the fold of the model file: the output names only the data file qdqfold wrote.
    assert sorted(p.name for p in from_stdin.iterdir()) == ["o.onnx", "o.onnx.data"]
    for name in ("o.onnx", "o.onnx.data"):
        assert (from_stdin / name).read_bytes() == (from_file / name).read_bytes()
    assert locations(from_stdin / "o.onnx") == {"o.onnx.data"}
    # A dry run from standard input reads them too, and folds what the file fold folds.
    done = run_cli("-", "--json", "--base-dir", model.parent, stdin=model.read_bytes())
    assert done.returncode == 0 and '"folded": true' in done.stdout.decode()


def test_a_model_in_memory_reads_external_data_from_base_directory(tmp_path):
    model = tmp_path / "m.onnx"
    proto = chain(1)
    last = proto.graph.output[0].name
    proto.graph.initializer.append(onnx.numpy_helper.from_array(
        onnx.numpy_helper.to_array(proto.graph.initializer[0])[:, :1, :1, :1].reshape(1, 8, 1, 1).copy(), "extra"))
    proto.graph.node.append(onnx.helper.make_node("Add", [last, "extra"], ["y"]))
    proto.graph.output[0].name = "y"
    save_external(proto, model, {t.name: "m.data" for t in proto.graph.initializer if t.name[0] in "we"})
    unloaded = onnx.load(str(model), load_external_data=False)
    folded, report = qdqfold.fold_model(unloaded, base_directory=tmp_path, report=True)
    expected = qdqfold.fold_model(model)
    assert report.folded and folded.SerializeToString() == expected.SerializeToString()
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in folded.graph.initializer)


# --------------------------------------------------------------------------------- 2. modes


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_keep_an_existing_mode_and_new_ones_get_the_umask(tmp_path):
    source = tmp_path / "m.onnx"
    source.write_bytes(chain(3).SerializeToString())
    source.chmod(0o640)
    assert run_cli(source, "--in-place", "-q", umask=0o022).returncode == 0
    assert mode(source) == 0o640
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"old")
    existing.chmod(0o600)
    assert run_cli(source, "-o", existing, "-q", umask=0o022).returncode == 0
    assert mode(existing) == 0o600 and existing.read_bytes() != b"old"
    # New outputs: 0666 & ~umask, whatever the input's mode, from a file or from standard input.
    source.chmod(0o600)
    for umask, expected in ((0o027, 0o640), (0o002, 0o664)):
        new_file, new_stdin = tmp_path / f"f{umask:o}.onnx", tmp_path / f"s{umask:o}.onnx"
        assert run_cli(source, "-o", new_file, "-q", umask=umask).returncode == 0
        assert run_cli("-", "-o", new_stdin, "-q", stdin=source.read_bytes(), umask=umask).returncode == 0
        assert (mode(new_file), mode(new_stdin)) == (expected, expected)


@pytest.mark.skipif(os.name != "posix", reason="owners: POSIX")
def test_an_existing_output_keeps_its_owner_and_extended_attributes(tmp_path):
    """The owner and group on every POSIX backend (where permitted: root may give the file away, as the owner
    of an existing output would have it); the extended attributes on the Linux one, the only one with an API
    for them (the plain-POSIX backend, which CI also tests, has none)."""
    source = tmp_path / "m.onnx"
    source.write_bytes(chain(3).SerializeToString())
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"old")
    xattrs = qdqfold_native.file_backend == "linux" and hasattr(os, "setxattr")
    if xattrs:
        try:
            os.setxattr(existing, "user.qdqfold-test", b"kept")
        except OSError:
            xattrs = False  # this file system has no user extended attributes
    owner = None
    if os.geteuid() == 0:
        owner = (12345, 12346)
        os.chown(existing, *owner)
    if not xattrs and owner is None:
        pytest.skip("neither extended attributes nor another owner to keep here")
    assert run_cli(source, "-o", existing, "-q").returncode == 0
    assert existing.read_bytes() != b"old"
    if xattrs:
        assert os.getxattr(existing, "user.qdqfold-test") == b"kept"
    if owner is not None:
        assert (existing.stat().st_uid, existing.stat().st_gid) == owner


def test_data_files_follow_their_model_file(tmp_path):
    model = external_model(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli(model, "-o", out / "new.onnx", "-q", umask=0o027).returncode == 0
    assert mode(out / "new.onnx") == mode(out / "new.onnx.data") == 0o640
    (out / "kept.onnx").write_bytes(b"")
    (out / "kept.onnx").chmod(0o600)
    assert run_cli(model, "-o", out / "kept.onnx", "-q", umask=0o022).returncode == 0
    assert mode(out / "kept.onnx") == mode(out / "kept.onnx.data") == 0o600
    # In place: the model and its data file keep the model's mode.
    model.chmod(0o640)
    assert run_cli(model, "--in-place", "-q", umask=0o022).returncode == 0
    assert mode(model) == 0o640 and all(mode(model.parent / name) == 0o640 for name in locations(model))


# --------------------------------------------------------------------------------- 3. paths, links, interrupts


def test_long_paths_and_odd_names_give_one_line(tmp_path):
    source = tmp_path / "m.onnx"
    source.write_bytes(chain(3).SerializeToString())
    too_long_name = "x" * 4300  # over NAME_MAX and PATH_MAX
    deep = "d/" * 2100 + "x.onnx"  # over PATH_MAX, every name short
    for output in (too_long_name, deep, "y" * 300 + ".onnx"):
        done = run_cli(source, "-o", output, cwd=tmp_path)
        assert done.returncode == 1
        assert "too long" in one_error_line(done)
    done = run_cli(source, "-o", "z" * 300 + "/", cwd=tmp_path)  # -o DIR/ with a name over NAME_MAX
    assert done.returncode == 1 and "too long" in one_error_line(done)
    done = run_cli("x" * 300 + ".onnx", "-o", "o.onnx", cwd=tmp_path)
    assert done.returncode == 1 and "too long" in one_error_line(done)
    # A newline in a path prints as \n; the message stays one line.
    odd = tmp_path / "new\nline.onnx"
    done = run_cli(odd, "-o", tmp_path / "o.onnx")
    assert done.returncode == 1 and "new\\nline.onnx" in one_error_line(done)
    # The report's lines too: a model written to such a path is named on one line.
    done = run_cli(source, "-o", tmp_path / "we\nird.onnx")
    assert done.returncode == 0 and "we\\nird.onnx" in done.stdout.decode()
    assert not [line for line in done.stdout.decode().splitlines() if line.startswith("ird.onnx")]
    odd.mkdir()
    done = run_cli(odd, "-o", tmp_path / "o2.onnx")
    assert done.returncode == 1 and "new\\nline.onnx" in one_error_line(done)
    with pytest.raises(qdqfold_native.FileError) as raised:
        qdqfold_native.fold_file(tmp_path / "no\nsuch.onnx", tmp_path / "o3.onnx")
    assert "\n" not in str(raised.value) and "no\\nsuch.onnx" in str(raised.value)
    with pytest.raises(qdqfold_native.FileError, match="too long"):
        qdqfold.fold_model(tmp_path / ("x" * 300 + ".onnx"))
    (result,) = qdqfold.fold_many([tmp_path / ("x" * 300 + ".onnx")], tmp_path / "many")
    assert "too long" in result.error and "\n" not in result.error


def test_in_place_over_a_tree_never_writes_outside_it(tmp_path):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(chain(4).SerializeToString())
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "inside.onnx").write_bytes(chain(5).SerializeToString())
    (zoo / "link.onnx").symlink_to(outside)
    (zoo / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # not followed by the search
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "deep.onnx").write_bytes(chain(6).SerializeToString())
    before = {p: p.read_bytes() for p in (outside, tmp_path / "elsewhere" / "deep.onnx")}
    inside = (zoo / "inside.onnx").read_bytes()
    done = run_cli(zoo, "--in-place")
    assert done.returncode == 1  # the link is a failure of that model, listed: the others are folded
    assert all(p.read_bytes() == data for p, data in before.items())
    assert (zoo / "inside.onnx").read_bytes() == qdqfold_native.fold(inside)
    assert (zoo / "link.onnx").is_symlink()
    failures = [line for line in done.stderr.decode().splitlines() if "link.onnx" in line]
    assert failures and all("outside" in line for line in failures)
    # The Python API keeps the same rule.
    results = qdqfold.fold_many(zoo, None, in_place=True)
    assert [Path(r.input).name for r in results if not r.ok] == ["link.onnx"]
    assert outside.read_bytes() == before[outside]


INTERRUPT_DURING_IMPORT = """
import importlib.abc, importlib.metadata, os, signal, sys

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.argv = ["qdqfold", {model!r}, "-o", {output!r}]
sys.meta_path.insert(0, CtrlC())
(entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "qdqfold"]
sys.exit(entry.load()())
"""


@pytest.mark.parametrize("module", ["argparse", "qdqfold_native", "qdqfold.paths"])
def test_ctrl_c_while_starting_exits_130_without_a_traceback(tmp_path, module):
    """The installed ``qdqfold`` command, with Ctrl-C arriving while it imports (the first tens of ms of a
    run): one line, exit status 130, nothing written."""
    source = tmp_path / "m.onnx"
    source.write_bytes(chain(3).SerializeToString())
    script = INTERRUPT_DURING_IMPORT.format(module=module, model=str(source), output=str(tmp_path / "o.onnx"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    assert done.returncode == 130 and done.stderr.decode().strip() == "qdqfold: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="needs Python's own Ctrl-C handler")
def test_a_ctrl_c_that_a_library_swallows_still_exits_130(tmp_path, monkeypatch, capsys):
    """A zoo with --jobs 2: Ctrl-C arrives while the main thread runs code that catches KeyboardInterrupt (as
    some libraries do). The run was once lost that way (exit 0); the exit status is still 130."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for k in range(3):
        (zoo / f"m{k}.onnx").write_bytes(chain(k).SerializeToString())
    words = many.in_cli_words

    def swallowing(result):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return words(result)

    monkeypatch.setattr(many, "in_cli_words", swallowing)
    assert cli.main([str(zoo), "-o", str(tmp_path / "out"), "--jobs", "2", "-q"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*.tmp")]


class _NeverDone(concurrent.futures.Executor):
    """A Dask client's executor whose workers keep dying: no future ever finishes."""

    def __init__(self):
        self.futures = []

    def submit(self, fn, *args, **kwargs):
        future = concurrent.futures.Future()
        self.futures.append(future)
        return future

    def shutdown(self, wait=True, **kwargs):
        pass


def test_a_dask_batch_gives_up_on_models_that_never_finish(tmp_path, monkeypatch, capsys):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for k in range(2):
        (zoo / f"m{k}.onnx").write_bytes(chain(k).SerializeToString())
    executor = _NeverDone()

    class Client:
        def get_executor(self):
            return executor

        def close(self):
            pass

    monkeypatch.setattr(many, "dask_client", lambda address: Client())
    status = cli.main([str(zoo), "-o", str(tmp_path / "out"), "--dask", "tcp://nowhere:8786", "--dask-timeout",
                       "0.5", "-q", "--no-progress"])
    assert status == 1
    err = capsys.readouterr().err
    assert "m0.onnx" in err and "m1.onnx" in err and "gave up" in err
    assert len(executor.futures) == 2 and all(f.cancelled() for f in executor.futures)


# --------------------------------------------------------------------------------- 4. weights not there


def test_a_kept_bn_whose_weights_are_not_there_is_a_warning(tmp_path):
    model = external_model(tmp_path)
    unloaded = onnx.load(str(model), load_external_data=False)
    with pytest.warns(qdqfold.MissingWeightsWarning, match="base_directory=") as caught:
        folded = qdqfold.fold_model(unloaded)
    assert issubclass(qdqfold.MissingWeightsWarning, UserWarning)
    assert caught[0].filename == __file__  # points at the caller
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 2
    with pytest.warns(qdqfold.MissingWeightsWarning):
        qdqfold.fold_model(unloaded.SerializeToString())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qdqfold.fold_model(unloaded, base_directory=tmp_path)  # the weights are there: no warning
        qdqfold.fold_model(onnx.load(str(model)))
