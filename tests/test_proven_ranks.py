"""Ranks proven through shape computations (issue 24: LeViT folds).

timm's LeViT exported by TorchScript feeds its MatMuls through `x.flatten(2)` (Reshape(x, Concat(Slice(Shape(x)),
[-1]))), `.reshape_as(y)` (Reshape(x, Shape(y))) and q/k/v Splits. Folds rest only on shapes the core proves
(tests/test_proven_shapes.py), and main proved none through these, so 33 of LeViT-128S's 52 BNs were kept as
`unknown-rank`. A Reshape's output rank is the length of its shape input, and Shape, Slice, Gather, Unsqueeze,
Concat of 1-D pieces give that length even where the values are dynamic. Where the length is not proven (the
shape comes from an input of unknown rank), the BN stays kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold
from helpers.onnxrt import run

REAL = Path(__file__).parent / "models" / "real"
CUT = REAL / "levit_torchscript_flatten_qkv_1bn.onnx"
RNG = np.random.default_rng(24)


def assert_exact(original, folded, report) -> None:
    """qdqfold's verification against onnxruntime on the original: exact, every fold certified."""
    result = qdqfold.verify(original, folded, report=report)
    assert result.verdict == "exact", result.failure_message()
    assert sorted(c.node for c in result.certificates) == sorted(b.node for b in report.folded)
    assert all(c.passed and c.ratio <= 1 for c in result.certificates)


def test_the_real_levit_flatten_chain_folds_exactly():
    # The stem's output -> Reshape(x, Concat(Slice(Shape(x), 0, 2), [-1])) -> Transpose -> MatMul -> Flatten -> BN:
    # main kept it (the MatMul output's rank was unknown).
    folded, report = qdqfold.fold_model(str(CUT), report=True)
    (entry,) = report.batchnorms
    assert entry.folded and entry.code == "matmul-reshape-bn", entry.describe()
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    assert_exact(str(CUT), folded, report)


def test_the_real_chain_from_an_input_of_unknown_rank_keeps_the_bn():
    # The same cut with its input declared without a shape: Shape(x) has any length, so the Reshape's rank
    # (and so whether Flatten keeps the features on axis 1) is not proven; it still runs.
    model = onnx.load(str(CUT))
    model.graph.input[0].type.tensor_type.ClearField("shape")
    data = model.SerializeToString()
    out, report = qdqfold.fold_bytes(data)
    (entry,) = report.batchnorms
    assert not entry.folded and entry.code == "unknown-rank", entry.describe()
    assert out == data
    feeds = {model.graph.input[0].name: RNG.standard_normal((1, 128, 14, 14)).astype(np.float32)}
    assert run(out, feeds)[0].shape == (1, 196, 256)


# ---- synthetic chains: x [2, 5, 8] -> <chain> -> MatMul(W [8, 6]) -> Flatten(axis=2) -> BN -> y

B, N, K, F = 2, 5, 8, 6


def i64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def chain_model(chain: str, x_shape=(B, N, K)) -> onnx.ModelProto:
    """x -> `chain` -> m [B, N, K] (or [B, 1, N, K] for the rank-4 chain) -> MatMul -> Flatten(2) -> BN."""
    mk = helper.make_node
    inits = [numpy_helper.from_array((RNG.standard_normal((K, F)) * 0.3).astype(np.float32), "W"),
             *[numpy_helper.from_array(v.astype(np.float32), f"bn_{n}") for n, v in
               (("scale", RNG.uniform(0.5, 1.5, F) * np.where(np.arange(F) % 3 == 1, -1, 1)),
                ("bias", RNG.standard_normal(F)), ("mean", RNG.standard_normal(F)), ("var", RNG.uniform(0.5, 2, F)))]]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape) if x_shape else None)]
    if chain == "gather-unsqueeze-concat":  # Reshape(x, [s[0], s[1], -1]) from Shape -> Gather -> Unsqueeze -> Concat
        inits += [i64("i0", 0), i64("i1", 1), i64("ax", [0]), i64("minus1", [-1])]
        nodes = [mk("Shape", ["x"], ["s"]), mk("Gather", ["s", "i0"], ["g0"], axis=0), mk("Gather", ["s", "i1"], ["g1"], axis=0),
                 mk("Unsqueeze", ["g0", "ax"], ["u0"]), mk("Unsqueeze", ["g1", "ax"], ["u1"]),
                 mk("Concat", ["u0", "u1", "minus1"], ["shape"], axis=0), mk("Reshape", ["x", "shape"], ["m"])]
    elif chain == "reshape-as":  # Reshape(Relu(x), Shape(x)), then a Transpose and back
        nodes = [mk("Relu", ["x"], ["r"]), mk("Shape", ["x"], ["s"]), mk("Reshape", ["r", "s"], ["t"]),
                 mk("Transpose", ["t"], ["tt"], perm=[1, 0, 2]), mk("Transpose", ["tt"], ["m"], perm=[1, 0, 2])]
    elif chain == "split-slice":  # Split in two along K, Concat back; a Slice with dynamic ends keeps the rank
        inits += [i64("half", [K // 2, K // 2]), i64("st", [0])]
        nodes = [mk("Split", ["x", "half"], ["a", "b"], axis=2), mk("Concat", ["b", "a"], ["c"], axis=2),
                 mk("Shape", ["x"], ["s"]), mk("Gather", ["s", "st"], ["e"], axis=0),
                 mk("Slice", ["c", "st", "e", "st"], ["m"])]
    elif chain == "unsqueeze-squeeze":  # [1, B, N, K] and back, constant axes; Size read beside it
        inits += [i64("ax", [0])]
        nodes = [mk("Unsqueeze", ["x", "ax"], ["u"]), mk("Squeeze", ["u", "ax"], ["m"]), mk("Size", ["u"], ["count"])]
    elif chain == "unsqueeze-rank4":  # m [B, 1, N, K]: Flatten(axis=2) is [B, N*F], BN's axis 1 is not F
        inits += [i64("ax", [1])]
        nodes = [mk("Unsqueeze", ["x", "ax"], ["m"])]
    elif chain == "shape-from-input":  # Reshape(x, shape) with `shape` a graph input of unknown length
        inputs.append(helper.make_tensor_value_info("shape", TensorProto.INT64, None))
        nodes = [mk("Reshape", ["x", "shape"], ["m"])]
    else:
        raise AssertionError(chain)
    nodes += [mk("MatMul", ["m", "W"], ["mm"]), mk("Flatten", ["mm"], ["flat"], axis=2),
              mk("BatchNormalization", ["flat", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"], name="bn")]
    y_shape = [B, N * F] if chain == "unsqueeze-rank4" else [B * N, F]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("chain", ["gather-unsqueeze-concat", "reshape-as", "split-slice", "unsqueeze-squeeze"])
def test_a_rank_proven_through_the_chain_folds_exactly(chain):
    model = chain_model(chain)
    folded, report = qdqfold.fold_bytes(model.SerializeToString())
    (entry,) = report.batchnorms
    assert entry.folded and entry.code == "matmul-reshape-bn", entry.describe()
    onnx.checker.check_model(onnx.load_from_string(folded), full_check=True)
    assert_exact(model, folded, report)


def test_a_proven_rank_of_4_is_not_taken_for_3():
    # Flatten(axis=2) of the rank-4 [B, 1, N, F] is [B, N*F]: the features are not axis 1, so the BN (over N*F
    # channels) is kept for that reason, not folded as if the rank were 3.
    model = chain_model("unsqueeze-rank4")
    for name, n in (("bn_scale", N * F), ("bn_bias", N * F), ("bn_mean", N * F), ("bn_var", N * F)):
        t = next(i for i in model.graph.initializer if i.name == name)
        t.CopyFrom(numpy_helper.from_array(RNG.uniform(0.5, 1.5, n).astype(np.float32), name))
    data = model.SerializeToString()
    out, report = qdqfold.fold_bytes(data, fold_forward=False)
    (entry,) = report.batchnorms
    assert not entry.folded and entry.code == "reshape-moves-features", entry.describe()
    assert out == data
    assert run(out, {"x": RNG.standard_normal((B, N, K)).astype(np.float32)})[0].shape == (B, N * F)


@pytest.mark.parametrize("x_shape", [(B, N, K), None])
def test_a_shape_of_unproven_length_keeps_the_bn(x_shape):
    # Reshape(x, shape) with `shape` fed at run time: any length, any rank. Kept, byte for byte, and it runs.
    data = chain_model("shape-from-input", x_shape).SerializeToString()
    out, report = qdqfold.fold_bytes(data)
    (entry,) = report.batchnorms
    assert not entry.folded and entry.code == "unknown-rank", entry.describe()
    assert out == data
    feeds = {"x": RNG.standard_normal((B, N, K)).astype(np.float32), "shape": np.array([B, N, K], np.int64)}
    assert run(out, feeds)[0].shape == (B * N, F)
