"""verify's inputs (issue 13): real inputs from .npz / .npy files, integer inputs in a range that fits the
model, symbolic dimensions (batch 1, others 32, unknown names an error), models loaded by path with their
external data, and the JSON report's verdict fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from qdqfold.verify import SCHEMA_VERSION, VerifyError, verify

from helpers.samples import MODELS
from helpers.build import float_conv_bn

SEED_FLOAT = MODELS / "seed_prebn.onnx"


def symbolic_conv_bn() -> onnx.ModelProto:
    model = float_conv_bn(symbolic_batch=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    out = model.graph.output[0].type.tensor_type.shape.dim
    out[0].dim_param, out[2].dim_param, out[3].dim_param = "N", "H2", "W2"
    return model


def test_symbolic_spatial_dims_default_to_32_and_batch_to_1():
    model = symbolic_conv_bn()
    result = verify(model, model, count_units=False)
    assert result.input_shapes == {"x": [1, 3, 32, 32]}
    assert result.symbolic_dims == {"N": 1, "H": 32, "W": 32}
    assert result.outputs[0].shape == [1, 4, 30, 30]
    assert verify(model, model, dims={"H": 9}, count_units=False).input_shapes == {"x": [1, 3, 9, 32]}


def test_an_unknown_dim_name_is_an_error():
    model = symbolic_conv_bn()
    with pytest.raises(VerifyError, match=r"no symbolic dimension 'h'.*they have: H, N, W"):
        verify(model, model, dims={"h": 9}, count_units=False)


def test_npz_and_npy_inputs_one_set_per_file(tmp_path):
    model = float_conv_bn()
    folded = qdqfold_native.fold(model.SerializeToString())
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(2))
    np.savez(tmp_path / "a.npz", x=a)
    np.save(tmp_path / "b.npy", b)
    result = verify(model, folded, inputs=[tmp_path / "a.npz", tmp_path / "b.npy"], count_units=False)
    assert result.input_sets == 2 and "a.npz" in result.input_source and result.verdict == "exact"
    # The figures are those of these inputs: a model that differs only where x[0, 0, 0, 0] > 100 shows nothing.
    big = a.copy()
    big[0, 0, 0, 0] = 1e3
    np.save(tmp_path / "big.npy", big)
    one = verify(model, folded, inputs=[tmp_path / "big.npy"], count_units=False)
    assert one.input_shapes == {"x": [1, 3, 8, 8]} and one.input_sets == 1


def test_bad_input_files_are_errors(tmp_path):
    model = float_conv_bn()
    np.savez(tmp_path / "wrong.npz", y=np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(VerifyError, match="missing input.*x.*no model input named y"):
        verify(model, model, inputs=[tmp_path / "wrong.npz"], count_units=False)
    np.save(tmp_path / "ints.npy", np.zeros((1, 3, 8, 8), np.int64))
    with pytest.raises(VerifyError, match="int64, the model wants float32"):
        verify(model, model, inputs=[tmp_path / "ints.npy"], count_units=False)


def gather_model(vocab: int = 1000) -> onnx.ModelProto:
    """Token ids -> Gather(table) -> Transpose -> Conv1d -> BN: ids must span the table, not 0..2."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, 4)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((6, 4, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 6).astype(np.float32), "g"),
             numpy_helper.from_array(np.zeros(6, np.float32), "b"),
             numpy_helper.from_array(np.zeros(6, np.float32), "m"),
             numpy_helper.from_array(np.ones(6, np.float32), "v")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("Transpose", ["e"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Conv", ["t", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_integer_inputs_span_the_gather_table():
    import importlib

    v = importlib.import_module("qdqfold.verify")

    model = gather_model()
    session = v._session(model.SerializeToString())
    feeds = v.random_inputs(session, 0, dims={"L": 64}, index_limits=v._index_limits(model))
    ids = feeds["ids"]
    assert ids.shape == (1, 64) and ids.min() >= 0 and ids.max() < 1000 and ids.max() > 100
    folded = qdqfold_native.fold(model.SerializeToString())
    assert verify(model, folded, count_units=False).verdict == "exact"


def test_models_are_loaded_by_path_external_data_included(tmp_path):
    model = onnx.load(SEED_FLOAT)
    src = tmp_path / "ext.onnx"
    onnx.save_model(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
                    size_threshold=0)
    dst = tmp_path / "out" / "folded.onnx"
    dst.parent.mkdir()
    qdqfold_native.fold_file(str(src), str(dst))
    result = verify(src, dst, count_units=False)
    assert result.verdict == "exact" and result.certificates and result.certificates[0].passed
    assert os.listdir(tmp_path / "out") and result.levels["off"][0].floor_of_range is not None


def test_json_report_carries_the_verdict_and_a_schema_version(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    npz = tmp_path / "in.npz"
    np.savez(npz, **{"input": np.random.default_rng(0).standard_normal((1, 16, 32, 32)).astype(np.float32)})
    result = subprocess.run([sys.executable, "-m", "qdqfold", str(SEED_FLOAT), "-n", "--verify", "--json",
                             "--inputs", str(npz), "--ort-level", "off"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["verify"]
    assert data["schema_version"] == SCHEMA_VERSION and data["verdict"] == "exact"
    assert list(data["levels"]) == ["off"] and data["input_sets"] == 1 and str(npz) in data["input_source"]
    assert data["worst_fold"]["node"] == "/bn1/BatchNormalization" and data["worst_fold"]["ratio"] <= 1
    assert data["outputs"][0]["floor_of_range"] is not None and "snr_db" in data["outputs"][0]


def test_cli_unknown_dim_is_reported(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    path = tmp_path / "sym.onnx"
    onnx.save(symbolic_conv_bn(), path)
    result = subprocess.run([sys.executable, "-m", "qdqfold", str(path), "-n", "--verify", "--dim", "Q=3"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0 and "no symbolic dimension 'Q'" in result.stderr


def test_cli_unknown_dim_is_refused_before_anything_is_written(tmp_path):
    """A --dim the inputs lack is found before the fold, from the model's own inputs (not after the output was
    written, as it once was); a --dim they have folds and verifies."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    model = symbolic_conv_bn()
    # An initializer listed as a graph input with its own symbolic dim is not an input --dim can name.
    weight = next(i for i in model.graph.initializer)
    listed = helper.make_tensor_value_info(weight.name, TensorProto.FLOAT, ["K", *weight.dims[1:]])
    model.graph.input.append(listed)
    path, out = tmp_path / "sym.onnx", tmp_path / "out" / "sym.onnx"
    onnx.save(model, path)
    for dim in ("Q=3", "K=3"):
        result = subprocess.run([sys.executable, "-m", "qdqfold", str(path), "-o", str(out), "--verify", "--dim", dim],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 1, result.stderr
        assert f"{path}: cannot verify: the model's inputs have no symbolic dimension '{dim[0]}' (they have: H, N, W)" \
            in result.stderr
        assert not out.parent.exists(), "nothing is written when a flag of the run is wrong"
    result = subprocess.run([sys.executable, "-m", "qdqfold", str(path), "-o", str(out), "--verify", "--dim", "H=9",
                             "--ort-level", "off"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.exists()


def test_cli_several_input_files_and_one_level(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    rng = np.random.default_rng(1)
    files = []
    for k in range(2):
        files.append(tmp_path / f"in{k}.npy")
        np.save(files[-1], rng.standard_normal((1, 16, 32, 32)).astype(np.float32))
    result = subprocess.run([sys.executable, "-m", "qdqfold", "--inputs", str(files[0]), "--inputs", str(files[1]),
                             "--ort-level", "default", str(SEED_FLOAT), "-n", "--verify", "--json"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["verify"]
    assert data["input_sets"] == 2 and list(data["levels"]) == ["default"] and data["verdict"] == "exact"
    assert [c["node"] for c in data["certificates"]] == ["/bn1/BatchNormalization"]  # run with optimisations off

