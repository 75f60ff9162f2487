"""A model over 2 GB (external data) folds through fold_file, and its tensors are checked with numpy.

The 2.4 GB weight is all zeros and stored as a hole in a sparse file, so the test writes little to disk; the
fold still reads and rescales every byte of it."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native

BIG = 24576  # Conv weight [BIG, BIG, 1, 1] float32: 2.4 GB, past protobuf's 2 GB limit for one message


def _external(name: str, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _bn_params(prefix: str, c: int, rng) -> list[TensorProto]:
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{n}") for n, v in
            (("gamma", rng.standard_normal(c)), ("beta", rng.standard_normal(c)),
             ("mean", rng.standard_normal(c)), ("var", rng.uniform(0.5, 2.0, c)))]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((BIG, 3, 1, 1)).astype(np.float32)
    big_offset = 1 << 20  # aligned, after w1
    big_length = BIG * BIG * 4
    with open(directory / "big.data", "wb") as f:
        f.write(w1.tobytes())
        f.truncate(big_offset + big_length)  # the zero weight is a hole: nothing written
    inits = [_external("w1", list(w1.shape), "big.data", 0, w1.nbytes),
             _external("w2", [BIG, BIG, 1, 1], "big.data", big_offset, big_length),
             *_bn_params("bn1", BIG, rng), *_bn_params("bn2", BIG, rng)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "bn1_gamma", "bn1_beta", "bn1_mean", "bn1_var"], ["b1"],
                              name="bn1"),
             helper.make_node("Conv", ["b1", "w2"], ["c2"], name="conv2"),
             helper.make_node("BatchNormalization", ["c2", "bn2_gamma", "bn2_beta", "bn2_mean", "bn2_var"], ["y"],
                              name="bn2")]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, BIG, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (directory / "big.onnx").write_bytes(model.SerializeToString())
    yield directory, w1, model
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def _remove_outputs(tmp_path):
    """The folded 2.4 GB weights are written out in full (not as holes): remove them after each test, or pytest's
    three kept temporary directories per run hold about 7 GB of them (a CI disk filled up that way)."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def _bn_affine(model: onnx.ModelProto, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer
         if t.name.startswith(prefix + "_")}
    a = p[f"{prefix}_gamma"] / np.sqrt(p[f"{prefix}_var"] + float(np.float32(1e-5)))  # epsilon is a float attribute
    return a, p[f"{prefix}_beta"] - p[f"{prefix}_mean"] * a


def test_model_over_2gb_folds_with_external_data(big_model, tmp_path):
    directory, w1, original = big_model
    out = tmp_path / "folded.onnx"
    report = qdqfold_native.fold_file(directory / "big.onnx", out)
    assert [b["folded"] for b in report["batchnorms"]] == [True, True]
    assert report["data_files"] == [str(tmp_path / "folded.onnx.data")]  # named after the output

    folded = onnx.load(out, load_external_data=False)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv"]
    inits = {t.name: t for t in folded.graph.initializer}
    conv1, conv2 = folded.graph.node
    data = np.memmap(tmp_path / "folded.onnx.data", dtype=np.uint8, mode="r")
    assert data.size == (directory / "big.data").stat().st_size  # same layout: same offsets, same size

    def external_array(name: str, shape) -> np.ndarray:
        entries = {e.key: e.value for e in inits[name].external_data}
        assert entries["location"] == "folded.onnx.data"
        offset, length = int(entries["offset"]), int(entries["length"])
        return data[offset:offset + length].view(np.float32).reshape(shape)

    a1, t1 = _bn_affine(original, "bn1")
    np.testing.assert_array_equal(external_array(conv1.input[1], w1.shape),
                                  (w1.astype(np.float64) * a1[:, None, None, None]).astype(np.float32))
    np.testing.assert_array_equal(numpy_helper.to_array(inits[conv1.input[2]]), t1.astype(np.float32))
    a2, t2 = _bn_affine(original, "bn2")
    big = external_array(conv2.input[1], (BIG, BIG, 1, 1))
    assert not big[:: BIG // 7].any() and not big[-1].any()  # zeros stay zeros (samples across the 2.4 GB)
    np.testing.assert_array_equal(numpy_helper.to_array(inits[conv2.input[2]]), t2.astype(np.float32))


def test_fold_model_of_a_path_over_2gb_returns_the_folded_proto(big_model, tmp_path, monkeypatch):
    """fold_model(path) cannot pass 2.4 GB through one serialized message: it folds through a temporary
    directory and loads the result, and the temporary directory is gone afterwards."""
    import tempfile

    import qdqfold

    directory, w1, original = big_model
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    folded, report = qdqfold.fold_model(directory / "big.onnx", report=True)
    assert [b.folded for b in report.batchnorms] == [True, True]
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv"]
    inits = {t.name: t for t in folded.graph.initializer}
    a1, t1 = _bn_affine(original, "bn1")
    np.testing.assert_array_equal(numpy_helper.to_array(inits[folded.graph.node[0].input[1]]),
                                  (w1.astype(np.float64) * a1[:, None, None, None]).astype(np.float32))
    big = inits[folded.graph.node[1].input[1]]
    assert big.data_location != TensorProto.EXTERNAL and len(big.raw_data) == BIG * BIG * 4
    assert list(scratch.iterdir()) == []
    with pytest.raises(qdqfold.FoldError, match="2 GB"):
        qdqfold.fold_model(folded)  # a ModelProto over 2 GB: what to do instead, not protobuf's message


def test_a_model_over_2gb_cannot_be_written_inline(big_model, tmp_path):
    directory, _, _ = big_model
    with pytest.raises(qdqfold_native.FileError, match="over protobuf's 2 GB limit; keep its data external"):
        qdqfold_native.fold_file(directory / "big.onnx", tmp_path / "inline.onnx", save_as_external_data=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(bool(__import__("os").environ.get("QDQFOLD_SANITIZED")), reason="12 GB of onnxruntime sessions")
def test_verify_a_model_over_2gb_from_the_command_line(big_model, tmp_path):
    """--verify loads both models by path (never one serialized message): the 2.4 GB model verifies exact with
    optimisations off; onnxruntime itself cannot build the original at its default level (its ConvBnFusion
    makes a 2.4 GB initializer it then refuses), and the output says so instead of failing."""
    import subprocess
    import sys

    directory, _, _ = big_model
    out = tmp_path / "out" / "big.onnx"
    done = subprocess.run([sys.executable, "-m", "qdqfold", str(directory / "big.onnx"), "-o", str(out), "--verify"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "verdict: EXACT" in done.stdout and "certificates: 2 folds checked" in done.stdout
    assert "not checked at level default: onnxruntime cannot build the original" in done.stdout
    assert out.exists() and (out.parent / "big.onnx.data").exists()
