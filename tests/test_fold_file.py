"""File to file (qdqfold_native.fold_file): mapped input, atomic output, external data kept external."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from helpers.folding import FOLD_FILE_UNDER_SIZE_LIMIT
from helpers.onnxrt import assert_same_outputs
from helpers.samples import MODELS


def conv_bn_model(channels: int = 8, size: int = 64) -> onnx.ModelProto:
    """Conv (pad 1) -> BN -> Relu with weights large enough to be saved as external data."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)
    c = channels
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_file_matches_fold_on_bytes(tmp_path):
    source = MODELS / "unet_up.onnx"
    out = tmp_path / "out.onnx"
    report = qdqfold_native.fold_file(source, out)
    expected, expected_report = qdqfold_native.fold_with_report(source.read_bytes())
    assert out.read_bytes() == expected
    assert report.pop("data_files") == [] and report.pop("removed_files") == [] and report.pop("input_files") == []
    assert report == expected_report


def test_fold_file_errors_name_the_path(tmp_path):
    with pytest.raises(qdqfold_native.FileError, match="missing.onnx: the model file is missing"):
        qdqfold_native.fold_file(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    with pytest.raises(qdqfold_native.FileError, match="out.onnx: cannot write: the directory .*/no does not exist"):
        qdqfold_native.fold_file(MODELS / "seed_prebn.onnx", tmp_path / "no" / "out.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08")
    with pytest.raises(qdqfold_native.FoldError):
        qdqfold_native.fold_file(bad, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]  # no temporary file left behind


@pytest.mark.parametrize("beside_input", [False, True])
def test_external_data_is_folded_and_stays_external(tmp_path, beside_input):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    onnx.save(conv_bn_model(), src_dir / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=1024)
    out_dir = src_dir if beside_input else tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    report = qdqfold_native.fold_file(src_dir / "m.onnx", out_dir / "folded.onnx")
    assert [b["folded"] for b in report["batchnorms"]] == [True]

    folded = onnx.load(out_dir / "folded.onnx", load_external_data=False)
    weight = next(t for t in folded.graph.initializer if t.name.startswith("w"))
    assert weight.data_location == TensorProto.EXTERNAL
    location = {e.key: e.value for e in weight.external_data}["location"]
    assert location == "folded.onnx.data"  # named after the output, wherever it is
    assert report["data_files"] == [str(out_dir / "folded.onnx.data")]
    original_entries = {e.key: e.value for e in onnx.load(src_dir / "m.onnx", load_external_data=False)
                        .graph.initializer[0].external_data}
    assert {e.key: e.value for e in weight.external_data}["offset"] == original_entries["offset"]
    # The input's data file is untouched, and the folded model computes what the original did.
    assert (src_dir / "m.data").stat().st_size == os.path.getsize(out_dir / location)
    assert_same_outputs(conv_bn_model(), onnx.load(out_dir / "folded.onnx"))  # onnx.save made the other external


def test_missing_external_data_file_names_it(tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=1024)
    (tmp_path / "m.data").unlink()
    with pytest.raises(qdqfold_native.FileError, match="m.data: the external data file of tensor 'w' is missing"):
        qdqfold_native.fold_file(tmp_path / "m.onnx", tmp_path / "out.onnx")


def test_external_data_location_outside_the_model_directory_is_refused(tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=1024)
    loaded = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    for e in loaded.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../../etc/passwd"
    (tmp_path / "evil.onnx").write_bytes(loaded.SerializeToString())
    with pytest.raises(qdqfold_native.FoldError, match="not a path inside the model's directory"):
        qdqfold_native.fold_file(tmp_path / "evil.onnx", tmp_path / "out.onnx")


def test_external_data_shorter_than_declared(tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=1024)
    with open(tmp_path / "m.data", "r+b") as f:
        f.truncate(100)
    with pytest.raises(qdqfold_native.FoldError, match="runs past the end of the file"):
        qdqfold_native.fold_file(tmp_path / "m.onnx", tmp_path / "out.onnx")


def _layer_bn(op: str, weight: np.ndarray, x_shape: list[int], rng, **attrs) -> onnx.ModelProto:
    channels = weight.shape[1] * attrs.get("group", 1) if op == "ConvTranspose" else weight.shape[0]
    if op == "Gemm":
        channels = weight.shape[0] if attrs.get("transB") else weight.shape[1]
    inits = [numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "var")]
    nodes = [helper.make_node(op, ["x", "w"], ["c"], **attrs),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op, weight_shape, x_shape, attrs", [
    ("Gemm", (2600, 1024), [1, 1024], {"transB": 1}),            # 10.6 MB, per-row factors
    ("Gemm", (1024, 2600), [1, 1024], {}),                        # per-column factors: one factor per element
    ("Conv", (256, 64, 13, 13), [1, 256, 13, 13], {"group": 4}),  # 11 MB, grouped
    ("ConvTranspose", (512, 32, 13, 13), [1, 512, 2, 2], {"group": 4}),
])
def test_weights_larger_than_a_write_chunk_fold_identically_to_and_from_files(tmp_path, op, weight_shape, x_shape,
                                                                               attrs):
    """fold_file writes generated weights 8 MB at a time; the bytes must equal fold() on the whole buffer."""
    rng = np.random.default_rng(1)
    model = _layer_bn(op, rng.standard_normal(weight_shape).astype(np.float32), x_shape, rng, **attrs)
    data = model.SerializeToString()
    (tmp_path / "m.onnx").write_bytes(data)
    report = qdqfold_native.fold_file(tmp_path / "m.onnx", tmp_path / "out.onnx")
    assert [b["folded"] for b in report["batchnorms"]] == [True]
    assert (tmp_path / "out.onnx").read_bytes() == qdqfold_native.fold(data)
    assert_same_outputs(model, (tmp_path / "out.onnx").read_bytes())


def test_fold_model_path_to_path_goes_file_to_file(tmp_path):
    import qdqfold

    onnx.save(conv_bn_model(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=1024)
    (tmp_path / "out").mkdir()
    result, report = qdqfold.fold_model(tmp_path / "m.onnx", output=tmp_path / "out" / "f.onnx", report=True)
    assert result == tmp_path / "out" / "f.onnx"
    assert [b.folded for b in report.batchnorms] == [True]
    folded = onnx.load(result, load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in folded.graph.initializer)  # stayed external
    assert_same_outputs(conv_bn_model(), onnx.load(result))


@pytest.mark.parametrize("limit_mb", [0.0005, 2.5, 7.5])
def test_a_write_that_fails_midway_is_a_fold_error_and_leaves_no_file(tmp_path, limit_mb):
    """The output is written on a second thread (core/background_writer.h): a write failing there (here: the
    file-size limit, as a full disk would) must come back as a FoldError naming the output, the folding thread
    must stop, and no temporary file may stay. The limits fall before the 9 MB weight and inside it."""
    import subprocess
    import sys

    model = conv_bn_model(channels=512, size=4)  # a 512 x 512 x 3 x 3 float weight: 9.4 MB, 9 write chunks
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save(model, src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    limit = int(limit_mb * 1e6)
    done = subprocess.run([sys.executable, "-c", FOLD_FILE_UNDER_SIZE_LIMIT, str(src), str(out_dir / "folded.onnx"),
                           str(limit)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    assert "folded.onnx: cannot write" in done.stdout
    assert list(out_dir.iterdir()) == []


def _external_model(tmp_path, alias: bool):
    """conv_a -> bn_a -> conv_b -> bn_b -> conv_c (no BN) with every weight in one data file, laid out
    w_a | w_c | w_b so that unchanged bytes sit between and after folded ones. With `alias`, w_b's entry
    points at w_a's bytes (two initializers sharing external data, with different BN factors)."""
    rng = np.random.default_rng(5)
    c = 16
    weights = {n: rng.standard_normal((c, c, 3, 3)).astype(np.float32) for n in ["w_a", "w_c", "w_b"]}
    data = b"".join(w.tobytes() for w in weights.values()) + b"tail" * 100
    (tmp_path / "m.data").write_bytes(data)
    size = weights["w_a"].nbytes
    offsets = {"w_a": 0, "w_c": size, "w_b": 0 if alias else 2 * size}
    inits = []
    for name in ["w_a", "w_b", "w_c"]:
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[c, c, 3, 3], data_location=TensorProto.EXTERNAL)
        for k, v in {"location": "m.data", "offset": str(offsets[name]), "length": str(size)}.items():
            t.external_data.add(key=k, value=v)
        inits.append(t)
    nodes = []
    for layer, x, y in [("a", "x", "ya"), ("b", "ra", "yb")]:
        gamma = rng.uniform(0.5, 2, c) * np.where(rng.random(c) < 0.5, -1, 1)
        for n, v in zip(["g", "b", "m", "v"], [gamma, rng.standard_normal(c), rng.standard_normal(c),
                                               rng.uniform(0.5, 2, c)]):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{n}_{layer}"))
        nodes += [helper.make_node("Conv", [x, f"w_{layer}"], [f"c_{layer}"], pads=[1, 1, 1, 1], name=f"conv_{layer}"),
                  helper.make_node("BatchNormalization", [f"c_{layer}", f"g_{layer}", f"b_{layer}", f"m_{layer}",
                                                          f"v_{layer}"], [y], name=f"bn_{layer}"),
                  helper.make_node("Relu", [y], [f"r{layer}"])]
    nodes.append(helper.make_node("Conv", ["rb", "w_c"], ["out"], pads=[1, 1, 1, 1], name="conv_c"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 5, 5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    return data


@pytest.mark.parametrize("alias", [False, True])
def test_external_data_with_folded_tensors_between_unchanged_bytes(tmp_path, alias):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    original_data = _external_model(src, alias)
    report = qdqfold_native.fold_file(src / "m.onnx", out / "m.onnx")
    assert all(b["folded"] for b in report["batchnorms"]), report
    written = (out / "m.onnx.data").read_bytes()
    size = 16 * 16 * 9 * 4
    if alias:
        # w_a and w_b read the same bytes, so neither may overwrite them: both are appended, page-aligned,
        # and every original byte stays where it was.
        assert written[:len(original_data)] == original_data
        entries = {t.name: {e.key: e.value for e in t.external_data}
                   for t in onnx.load(out / "m.onnx", load_external_data=False).graph.initializer if t.external_data}
        for name in ["w_a", "w_b"]:
            offset = int(entries[name]["offset"])
            assert offset >= len(original_data) and offset % 4096 == 0
            assert int(entries[name]["length"]) == size
        assert int(entries["w_c"]["offset"]) == size
    else:
        assert len(written) == len(original_data), "folded tensors overwrite their own bytes in place"

    assert written[size:2 * size] == original_data[size:2 * size], "w_c is not folded: its bytes pass through"
    assert written[len(original_data) - 400:len(original_data)] == original_data[-400:]
    assert (src / "m.data").read_bytes() == original_data, "the input is never written"
    assert_same_outputs(onnx.load(src / "m.onnx"), onnx.load(out / "m.onnx"))
