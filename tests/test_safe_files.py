"""Safe files: a model never decides where qdqfold writes, a fold never pairs a model with another's data, and
every bad file gets a one-line error naming it, with nothing written or left behind.

Each test is one class of the issue "Safe files": writes chosen by the model, two models / one data file, one
file under two names, links and special files, the input changing underneath, Ctrl-C, errors that name the
right file, deep nesting. The models are small Conv -> BN chains whose weights live in external data files at
locations the test chooses; each fold is checked by running the output in onnxruntime against the original.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from helpers.safe_files import chain, cli, folds_correctly, one_line_error, save_external, snapshot


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
