"""qdqfold.passes.FoldBatchNormalization, the onnx_ir pass: the same folds as the native core, the input left
alone, options passed through, external data read where it lies (and read into memory with a native module
that cannot), and qdqfold plugged into onnxsim's custom_rewriter and before onnxslim."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold
import qdqfold_native
from helpers.onnxrt import assert_same_outputs
from helpers.samples import MODELS, SAMPLE_MODELS

ir = pytest.importorskip("onnx_ir")
passes = pytest.importorskip("qdqfold.passes")
FoldBatchNormalization = passes.FoldBatchNormalization


def to_proto(model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def initializers(model: onnx.ModelProto, base: Path | None = None) -> dict[str, np.ndarray]:
    if base is not None:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        onnx.load_external_data_for_model(model, str(base))
    return {t.name: nh.to_array(t) for t in model.graph.initializer}


def assert_same_initializers(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype and actual[name].shape == array.shape, name
        assert actual[name].tobytes() == array.tobytes(), name


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=lambda p: p.stem)
def test_pass_folds_what_the_native_core_folds(path):
    original = onnx.load(path)
    native_bytes, native_report = qdqfold_native.fold_with_report(path.read_bytes())
    native = onnx.load_from_string(native_bytes)

    fold = FoldBatchNormalization()
    result = fold(ir.load(path))
    folded = to_proto(result.model)

    assert [(b.node, b.folded, b.code) for b in fold.report.batchnorms] == \
        [(b["node"], b["folded"], b["code"]) for b in native_report["batchnorms"]]
    assert result.modified == any(b["folded"] for b in native_report["batchnorms"])
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in native.graph.node]
    assert_same_initializers(initializers(folded), initializers(native))
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(original, folded)


def test_the_input_model_is_not_changed_and_a_new_one_is_returned():
    model = ir.load(MODELS / "qat_arcface_head.onnx")
    before = to_proto(model).SerializeToString()
    tensors_before = {name: v.const_value for name, v in model.graph.initializers.items()}
    result = FoldBatchNormalization()(model)
    assert result.model is not model and result.modified
    assert to_proto(model).SerializeToString() == before
    assert {name: v.const_value for name, v in model.graph.initializers.items()} == tensors_before
    assert bn_count(to_proto(result.model)) == 0 < bn_count(to_proto(model))


def test_numpy_backed_tensors_fold_like_protobuf_backed_ones():
    path = MODELS / "qat_input_bn_net.onnx"
    model = ir.load(path)
    for value in model.graph.initializers.values():  # what a converter building the IR in memory holds
        value.const_value = ir.Tensor(value.const_value.numpy().copy(), name=value.name)
    result = FoldBatchNormalization()(model)
    native = onnx.load_from_string(qdqfold_native.fold(path.read_bytes()))
    assert_same_initializers(initializers(to_proto(result.model)), initializers(native))


def test_inline_initializers_of_the_result_are_views_of_one_buffer_not_copies():
    result = FoldBatchNormalization()(ir.load(MODELS / "unet_up.onnx"))
    arrays = [v.const_value.raw for v in result.model.graph.initializers.values()]
    assert arrays and all(isinstance(a, np.ndarray) and not a.flags.owndata for a in arrays)

    def owner(array):
        while isinstance(array, np.ndarray):
            array = array.base
        return array

    owners = {id(owner(a)): owner(a) for a in arrays}
    assert len(owners) == 1 and isinstance(next(iter(owners.values())), bytes)


@pytest.mark.parametrize("numpy_backed", [False, True])
def test_tensors_the_fold_leaves_are_the_input_models_own_objects(numpy_backed):
    """In-memory tensors go over as buffers beside the graph; those not folded come back as the same objects,
    the folded ones as views of the one buffer the core returned."""
    model = ir.load(MODELS / "qat_input_bn_net.onnx")
    if numpy_backed:
        for value in model.graph.initializers.values():
            value.const_value = ir.Tensor(value.const_value.numpy().copy(), name=value.name)
    before = {name: value.const_value for name, value in model.graph.initializers.items()}
    result = FoldBatchNormalization()(model)
    after = {name: value.const_value for name, value in result.model.graph.initializers.items()}
    same = {name for name, tensor in after.items() if tensor is before.get(name)}
    new = set(after) - same
    assert same and new  # the BN's own tensors stay in the input model only if it was kept
    assert all(isinstance(after[name].raw, np.ndarray) and not after[name].raw.flags.owndata for name in new)
    native = onnx.load_from_string(qdqfold_native.fold((MODELS / "qat_input_bn_net.onnx").read_bytes()))
    assert_same_initializers(initializers(to_proto(result.model)), initializers(native))


def test_without_tensors_in_memory_tensors_are_copied_into_the_model(monkeypatch):
    """A qdqfold_native from before tensors=: the pass writes in-memory tensors into the bytes it hands over."""
    monkeypatch.setattr(passes, "_native_tensors", False)
    real_fold = qdqfold_native.fold_with_report

    def old_fold_with_report(model, **options):
        if "tensors" in options:
            raise TypeError("unknown option 'tensors'")
        return real_fold(model, **options)

    monkeypatch.setattr(qdqfold_native, "fold_with_report", old_fold_with_report)
    result = FoldBatchNormalization()(ir.load(MODELS / "qat_input_bn_net.onnx"))
    native = onnx.load_from_string(qdqfold_native.fold((MODELS / "qat_input_bn_net.onnx").read_bytes()))
    assert_same_initializers(initializers(to_proto(result.model)), initializers(native))


def test_options_are_constructor_arguments_for_every_native_option():
    parameters = inspect.signature(FoldBatchNormalization).parameters
    assert set(parameters) == set(qdqfold_native.options()) | {"shapes"}
    for name, default in qdqfold_native.options().items():
        assert parameters[name].default == default, name
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert repr(FoldBatchNormalization(pad_correction=True)) == "FoldBatchNormalization(pad_correction=True)"


def test_options_reach_the_fold():
    model = ir.load(MODELS / "seed_prebn.onnx")
    off = FoldBatchNormalization(fold_backward=False, fold_forward=False)
    result = off(model)
    assert not result.modified and result.model is not model
    assert bn_count(to_proto(result.model)) == 2 and off.report.kept and not off.report.folded

    default, corrected = FoldBatchNormalization(), FoldBatchNormalization(pad_correction=True)
    plain = to_proto(default(ir.load(MODELS / "bn_conv_cases.onnx")).model)
    padded = to_proto(corrected(ir.load(MODELS / "bn_conv_cases.onnx")).model)
    assert {b.code for b in default.report.kept} >= {"padding"}
    assert bn_count(padded) < bn_count(plain)
    assert_same_outputs(onnx.load(MODELS / "bn_conv_cases.onnx"), padded)


def test_pad_correction_needs_no_shapes_from_onnx_or_the_ir(monkeypatch):
    """The spatial sizes the correction needs are inferred by the core from the graph input's declared shape;
    neither onnx shape inference nor the IR's value shapes (claims, like value_info) are needed."""
    import qdqfold.api

    monkeypatch.setattr(qdqfold.api, "inferred_shapes", lambda model: {})
    fold = FoldBatchNormalization(pad_correction=True)
    folded = to_proto(fold(ir.load(MODELS / "bn_conv_cases.onnx")).model)
    assert fold.report.folded and not any(b.code == "dynamic-shape" for b in fold.report.kept)
    assert_same_outputs(onnx.load(MODELS / "bn_conv_cases.onnx"), folded)


def test_pass_manager_and_other_passes():
    common = pytest.importorskip("onnx_ir.passes.common")
    manager = ir.passes.PassManager([FoldBatchNormalization(), common.RemoveUnusedNodesPass()], steps=2)
    model = ir.load(MODELS / "arcface_head.onnx")
    result = manager(model)
    assert result.modified
    assert_same_outputs(onnx.load(MODELS / "arcface_head.onnx"), to_proto(result.model))
    assert bn_count(to_proto(result.model)) == 0


def test_onnxscript_optimizer_then_the_pass():
    optimizer = pytest.importorskip("onnxscript.optimizer")
    model = ir.load(MODELS / "qat_arcface_head.onnx")
    optimizer.optimize_ir(model)
    result = FoldBatchNormalization()(model)
    assert result.modified and bn_count(to_proto(result.model)) == 0
    assert_same_outputs(onnx.load(MODELS / "qat_arcface_head.onnx"), to_proto(result.model))


def test_tensors_numpy_cannot_view_and_subgraph_initializers_come_through():
    """A bfloat16 and an int4 initializer (parsed by onnx, not viewed) and a folded If branch."""
    rng = np.random.default_rng(1)
    cin, cout = 6, 5
    bn = {"gamma": np.array([1.2, -0.7, 0.9, -1.5, 0.6], np.float32),
          "beta": rng.standard_normal(cout).astype(np.float32),
          "mean": rng.standard_normal(cout).astype(np.float32),
          "var": rng.uniform(0.5, 2.0, cout).astype(np.float32)}
    then_g = h.make_graph(
        [h.make_node("Gemm", ["x", "w"], ["t_y"]),
         h.make_node("BatchNormalization", ["t_y", "gamma", "beta", "mean", "var"], ["t_out"])],
        "then", [], [h.make_tensor_value_info("t_out", T.FLOAT, None)],
        [nh.from_array(v, k) for k, v in bn.items()] + [nh.from_array(rng.standard_normal((cin, cout)).astype(np.float32), "w")])
    else_g = h.make_graph([h.make_node("Identity", ["b"], ["e_out"])], "else", [],
                          [h.make_tensor_value_info("e_out", T.FLOAT, None)])
    bf16 = h.make_tensor("bf16", T.BFLOAT16, [3], np.array([1.5, -2.0, 3.25], ml_dtypes.bfloat16).view(np.uint16).tolist())
    int4 = h.make_tensor("int4", T.INT4, [4], [1, -2, 7, -8])
    graph = h.make_graph(
        [h.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g),
         h.make_node("Cast", ["bf16"], ["bf16_out"], to=T.FLOAT), h.make_node("Cast", ["int4"], ["int4_out"], to=T.FLOAT)],
        "g", [h.make_tensor_value_info("cond", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, [3, cin])],
        [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("out", "bf16_out", "int4_out")],
        [nh.from_array(np.zeros((3, cout), np.float32), "b"), bf16, int4])
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    result = FoldBatchNormalization()(ir.from_proto(m))
    assert result.modified
    out = to_proto(result.model)
    then_out = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert "BatchNormalization" not in [n.op_type for n in then_out.node]
    assert_same_initializers(initializers(out), initializers(m))
    x = rng.standard_normal((3, cin)).astype(np.float32)
    for cond in (True, False):
        assert_same_outputs(m, out, feeds={"cond": np.array(cond), "x": x})


def _external_copy(tmp_path: Path, name: str) -> Path:
    """The sample saved with every initializer of 64 bytes or more in one external data file."""
    model = onnx.load(MODELS / name)
    target = tmp_path / "m" / name
    target.parent.mkdir()
    onnx.save(model, target, save_as_external_data=True, all_tensors_to_one_file=True,
              location=name + ".data", size_threshold=64)
    return target


@pytest.mark.skipif(not passes.native_reads_external_data(), reason="qdqfold_native without base_directory")
def test_external_data_is_read_where_it_lies_and_unfolded_tensors_stay_external(tmp_path):
    path = _external_copy(tmp_path, "qat_input_bn_net.onnx")
    data_file = path.with_name(path.name + ".data")
    data_before = data_file.read_bytes()
    model = ir.load(path)
    external_before = {n: v.const_value for n, v in model.graph.initializers.items()
                       if isinstance(v.const_value, ir.ExternalTensor)}
    assert len(external_before) > 5

    fold = FoldBatchNormalization()
    result = fold(model)
    assert result.modified and len(fold.report.folded) == 3  # the three Conv -> BN folds, through QDQ weights
    after = dict(result.model.graph.initializers.items())
    kept = {n for n, v in after.items() if v.const_value is external_before.get(n)}
    inline = {n for n, v in after.items() if not isinstance(v.const_value, ir.ExternalTensor)}
    assert kept and inline and kept.isdisjoint(inline)
    assert kept | inline == set(after)  # every external tensor left is the input's own object, never read
    assert data_file.read_bytes() == data_before

    native = onnx.load_from_string(qdqfold_native.fold(path.read_bytes(), base_directory=path.parent))
    out = to_proto(result.model)
    assert_same_initializers(initializers(out, path.parent), initializers(native, path.parent))
    original = onnx.load(path)
    saved = tmp_path / "folded.onnx"
    ir.save(result.model, saved, external_data="folded.onnx.data")  # the IR copies external tensors over
    assert_same_outputs(original, onnx.load(saved))


def test_without_base_directory_external_tensors_are_read_into_memory(tmp_path, monkeypatch):
    """A qdqfold_native from before base_directory: the pass loads external tensors, and still folds."""
    monkeypatch.setattr(passes, "_native_base_directory", False)
    monkeypatch.setattr(passes, "_native_tensors", False)
    assert not passes.native_reads_external_data()
    real_fold = qdqfold_native.fold_with_report

    def old_fold_with_report(model, **options):
        if "base_directory" in options or "tensors" in options:
            raise TypeError(f"unknown option '{next(iter(options))}'")
        return real_fold(model, **options)

    monkeypatch.setattr(qdqfold_native, "fold_with_report", old_fold_with_report)
    path = _external_copy(tmp_path, "qat_input_bn_net.onnx")
    fold = FoldBatchNormalization()
    result = fold(ir.load(path))
    assert result.modified and len(fold.report.folded) == 3
    after = result.model.graph.initializers.values()
    assert not any(isinstance(v.const_value, ir.ExternalTensor) for v in after)
    native = onnx.load_from_string(qdqfold_native.fold(onnx.load(MODELS / "qat_input_bn_net.onnx").SerializeToString()))
    assert_same_initializers(initializers(to_proto(result.model)), initializers(native))


@pytest.mark.parametrize("cache, detect, keyword", [("_native_base_directory", "native_reads_external_data",
                                                     "base_directory"),
                                                    ("_native_tensors", "native_takes_tensors", "tensors")])
def test_feature_detection_tells_a_native_module_without_the_keyword(monkeypatch, cache, detect, keyword):
    monkeypatch.setattr(passes, cache, None)

    def old_fold(model, **options):
        raise TypeError(f"unknown option '{next(iter(options))}'")

    monkeypatch.setattr(qdqfold_native, "fold", old_fold)
    assert getattr(passes, detect)() is False
    monkeypatch.setattr(passes, cache, None)

    def new_fold(model, **options):
        assert set(options) == {keyword}
        raise qdqfold.FoldError("the input is empty (0 bytes), not an ONNX model")

    monkeypatch.setattr(qdqfold_native, "fold", new_fold)
    assert getattr(passes, detect)() is True


# -- other tools -----------------------------------------------------------------------------------------


def qdqfold_rewriter(model: onnx.ModelProto):
    """docs/toolchains.md, "onnxsim": qdqfold as onnxsim's custom_rewriter."""
    folded, report = qdqfold.fold_model(model, report=True)
    return folded if report.folded else False


@pytest.mark.parametrize("name", ["qat_arcface_head.onnx", "qat_input_bn_net.onnx"])
def test_onnxsim_custom_rewriter(name):
    onnxsim = pytest.importorskip("onnxsim")
    if "custom_rewriter" not in inspect.signature(onnxsim.simplify).parameters:
        pytest.skip("this onnxsim has no custom_rewriter")
    model = onnx.load(MODELS / name)
    alone, _ = onnxsim.simplify(model)
    with_qdqfold, ok = onnxsim.simplify(model, custom_rewriter=qdqfold_rewriter)
    assert ok
    assert bn_count(with_qdqfold) < bn_count(alone) == bn_count(model)  # onnxsim folds no BN behind QDQ weights
    assert_same_outputs(model, with_qdqfold)


@pytest.mark.parametrize("name", ["qat_arcface_head.onnx", "arcface_head.onnx"])
def test_qdqfold_before_onnxslim(name):
    onnxslim = pytest.importorskip("onnxslim")
    model = onnx.load(MODELS / name)
    alone = onnxslim.slim(model)
    combined = onnxslim.slim(qdqfold.fold_model(model))  # docs/toolchains.md, "onnxslim"
    assert bn_count(combined) == 0 < bn_count(alone)
    assert_same_outputs(model, combined)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.uint16,
                                   np.int32, np.int64, np.uint32, np.uint64, np.bool_])
def test_numpy_tensors_are_handed_over_without_a_copy(dtype):
    """A NumPy-backed tensor goes to the core as a view of its array (int8's dtype.str is '|i1': once missed)."""
    array = np.zeros((4, 3), dtype)
    raw = passes._raw_bytes(ir.Tensor(array))
    assert isinstance(raw, memoryview) and np.shares_memory(np.frombuffer(raw, np.uint8), array)
