"""Command-line habits users bring from onnxsim and onnxslim: a positional output, '-' for standard input and
output, messages that name CLI flags, a JSON report with a schema, and a Dask cluster from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import qdqfold_native
from helpers.onnxrt import assert_same_outputs
from helpers.samples import MODELS

SEED = MODELS / "qat_seed_prebn.onnx"
FLOAT_SEED = MODELS / "seed_prebn.onnx"
ROOT = Path(__file__).resolve().parents[1]


def cli(*args, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    return subprocess.run([sys.executable, "-m", "qdqfold", *map(str, args)], input=stdin, capture_output=True,
                          timeout=timeout, env=env)


def test_a_second_positional_argument_is_the_output(tmp_path):
    done = cli(SEED, tmp_path / "out.onnx", "-q")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.onnx").read_bytes() == qdqfold_native.fold(SEED.read_bytes())
    # -o still works, and with it two positionals are two inputs again (which then need a directory)
    assert cli(SEED, "-o", tmp_path / "o2.onnx", "-q").returncode == 0
    done = cli(SEED, FLOAT_SEED, "-o", tmp_path / "o3.onnx")
    assert done.returncode == 2 and b"-o names a directory" in done.stderr
    # with --dry-run, two models are two inputs, and nothing is written
    done = cli(SEED, FLOAT_SEED, "--dry-run", "-q")
    assert done.returncode == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["o2.onnx", "out.onnx"]
    # the positional output is the input itself: the in-place rule still holds
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(SEED.read_bytes())
    done = cli(copy, copy)
    assert done.returncode == 2 and b"--in-place" in done.stderr and copy.read_bytes() == SEED.read_bytes()


def test_standard_input_and_output(tmp_path):
    data = SEED.read_bytes()
    expected = qdqfold_native.fold(data)
    done = cli("-", "-o", "-", stdin=data)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected
    assert b"BatchNormalization: 2 found, 1 folded" in done.stderr  # the report goes to standard error
    assert b"standard output" in done.stderr

    done = cli(SEED, "-o", "-")
    assert done.returncode == 0 and done.stdout == expected

    done = cli("-", tmp_path / "from-stdin.onnx", "-q", stdin=data)
    assert done.returncode == 0 and (tmp_path / "from-stdin.onnx").read_bytes() == expected

    done = cli("-", "-o", "-", "--verify", "-q", stdin=data)
    assert done.returncode == 0 and done.stdout == expected

    done = cli("-", "-o", "-", stdin=b"not a model")
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr.decode().strip().startswith("qdqfold: error: <stdin>: not a valid ONNX model")


def test_standard_output_refuses_what_it_cannot_carry(tmp_path):
    model = onnx.load(FLOAT_SEED)
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    done = cli(tmp_path / "ext.onnx", "-o", "-")
    assert done.returncode == 1 and done.stdout == b""
    assert b"external data" in done.stderr and b"-o FILE" in done.stderr
    for extra in (["--json"], ["--in-place"], ["--dry-run"]):
        assert cli(SEED, "-o", "-", *extra).returncode == 2
    assert cli("-", SEED, "-o", tmp_path / "d").returncode == 2  # '-' folds one model
    assert cli("-", "--in-place", stdin=SEED.read_bytes()).returncode == 2


def test_messages_name_cli_flags_in_the_cli_and_keywords_in_python(tmp_path):
    import qdqfold

    done = cli(FLOAT_SEED, "--dry-run", "--json")
    document = json.loads(done.stdout)
    kept = [b["message"] for b in document["batchnorms"] if not b["folded"]]
    assert kept and all("--pad-correction" in m and "pad_correction=True" not in m for m in kept)
    report = qdqfold.fold_model(onnx.load(FLOAT_SEED), report=True)[1]
    assert all("pad_correction=True" in b.message for b in report.kept)

    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx.data").write_text("mine")
    onnx.save(onnx.load(FLOAT_SEED), tmp_path / "m.onnx", save_as_external_data=True, location="m.bin",
              size_threshold=0)
    done = cli(tmp_path / "m.onnx", "-o", out / "m.onnx")
    assert done.returncode == 1 and b"--force" in done.stderr and b"force=True" not in done.stderr
    with pytest.raises(qdqfold_native.FileError, match="force=True"):
        qdqfold_native.fold_file(tmp_path / "m.onnx", out / "m.onnx")


def test_the_json_report_names_its_schema_and_the_schema_file_describes_it(tmp_path):
    schema = json.loads((ROOT / "docs" / "report.schema.json").read_text())
    single = json.loads(cli(SEED, "-o", tmp_path / "a.onnx", "--json").stdout)
    many = json.loads(cli(SEED, FLOAT_SEED, "-o", tmp_path / "dir", "--json").stdout)
    for document, kind in ((single, "model"), (many, "batch")):
        assert document["schema"] == schema["$id"] == "qdqfold.report/2"
        described = schema["$defs"][kind]
        assert set(described["required"]) <= set(document)
        assert set(document) <= set(described["properties"]), set(document) - set(described["properties"])
    entry = single["batchnorms"][0]
    assert set(entry) == set(schema["$defs"]["batchnorm"]["required"])
    for model in many["models"]:
        assert set(model) <= set(schema["$defs"]["model"]["properties"]) | {"schema"}


def test_size_counts_the_external_data_files(tmp_path):
    onnx.save(onnx.load(FLOAT_SEED), tmp_path / "m.onnx", save_as_external_data=True, location="m.bin",
              size_threshold=0)
    document = json.loads(cli(tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--json").stdout)
    before = (tmp_path / "m.onnx").stat().st_size + (tmp_path / "m.bin").stat().st_size
    after = (tmp_path / "out.onnx").stat().st_size + (tmp_path / "out.onnx.data").stat().st_size
    assert document["size"] == {"before": before, "after": after}
    assert document["data_files"] == [str(tmp_path / "out.onnx.data")]


def test_a_zoo_on_a_dask_cluster_from_the_command_line(tmp_path):
    distributed = pytest.importorskip("distributed")
    zoo = tmp_path / "zoo"
    (zoo / "sub").mkdir(parents=True)
    for k, source in enumerate([SEED, FLOAT_SEED, MODELS / "unet_up.onnx", MODELS / "arcface_head.onnx"]):
        (zoo / ("sub" if k % 2 else ".") / f"m{k}.onnx").write_bytes(source.read_bytes())
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        done = cli(zoo, "-o", tmp_path / "out", "--dask", cluster.scheduler_address, "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["totals"] == {"models": 4, "folded": 4, "failed": 0}
    for model in document["models"]:
        original = Path(model["input"])
        assert Path(model["output"]) == tmp_path / "out" / original.relative_to(zoo)
        assert_same_outputs(onnx.load(original), onnx.load(model["output"]))
    done = cli(zoo, "-o", tmp_path / "out2", "--dask", "tcp://127.0.0.1:9")  # nobody listens there
    assert done.returncode == 1 and b"cannot reach the Dask scheduler" in done.stderr


def _external_entries(path: Path) -> dict[str, dict[str, str]]:
    model = onnx.load(path, load_external_data=False)
    return {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def test_the_output_stores_its_weights_as_asked(tmp_path):
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    c = 384  # w0: 384 x 384 x 3 x 3 floats = 5.3 MB (aligned to 64 KB in the data file); BN params 1.5 KB each
    inits = [numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), "w1")] + [
        numpy_helper.from_array(v.astype(np.float32), n) for n, v in
        (("g", rng.uniform(0.5, 2, c)), ("b", rng.standard_normal(c)), ("m", rng.standard_normal(c)),
         ("v", rng.uniform(0.5, 2, c)), ("tiny", rng.standard_normal(4)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"]), helper.make_node("Conv", ["c1", "w0"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, 3, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "inline.onnx")

    assert cli(tmp_path / "inline.onnx", tmp_path / "ext.onnx", "--save-as-external-data", "-q").returncode == 0
    entries = _external_entries(tmp_path / "ext.onnx")
    assert {e["location"] for e in entries.values()} == {"ext.onnx.data"}
    assert {"w0", "w1"} <= set(entries) and "tiny" not in entries  # 1024-byte threshold: the 16-byte one stays
    assert any(name not in {t.name for t in model.graph.initializer} for name in entries)  # the new bias too
    big = [e for e in entries.values() if int(e["length"]) >= 1 << 20]
    assert big and all(int(e["offset"]) % 65536 == 0 for e in big)
    assert_same_outputs(model, onnx.load(tmp_path / "ext.onnx"))

    done = cli(tmp_path / "ext.onnx", tmp_path / "big-only.onnx", "--size-threshold", str(1 << 20), "--data-name",
               "weights.bin", "-q")
    assert done.returncode == 0, done.stderr
    entries = _external_entries(tmp_path / "big-only.onnx")
    assert {e["location"] for e in entries.values()} == {"weights.bin"} and list(entries) == ["w0"]  # w1: 0.6 MB
    assert not (tmp_path / "big-only.onnx.data").exists()
    assert_same_outputs(model, onnx.load(tmp_path / "big-only.onnx"))

    assert cli(tmp_path / "ext.onnx", tmp_path / "inline2.onnx", "--no-external-data", "-q").returncode == 0
    assert _external_entries(tmp_path / "inline2.onnx") == {}
    assert not list(tmp_path.glob("inline2.onnx.*"))
    assert_same_outputs(model, onnx.load(tmp_path / "inline2.onnx"))

    # in place, to inline: the old data file goes (nothing stale)
    done = cli(tmp_path / "ext.onnx", "--in-place", "--no-external-data")
    assert done.returncode == 0 and not (tmp_path / "ext.onnx.data").exists()
    assert b"removed" in done.stdout and _external_entries(tmp_path / "ext.onnx") == {}
    assert_same_outputs(model, onnx.load(tmp_path / "ext.onnx"))

    for bad in (["--data-name", "sub/x.bin"], ["--data-name", "out.onnx"]):
        done = cli(tmp_path / "inline.onnx", "-o", tmp_path / "out.onnx", *bad)
        assert done.returncode == 1 and b"plain file name" in done.stderr
    assert cli(tmp_path / "inline.onnx", "-o", tmp_path / "out.onnx", "--no-external-data", "--size-threshold",
               "5").returncode == 2
    assert cli(tmp_path / "inline.onnx", SEED, "-o", tmp_path / "d", "--data-name", "w.bin").returncode == 2
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "d").exists()  # refused before any mkdir
