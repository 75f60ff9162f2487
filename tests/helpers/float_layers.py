"""Builders of the float fold tests (test_fold_float*.py): Conv / ConvTranspose -> BN and MatMul (+ Add) -> BN
models, and a BN kept by the backward folds."""

from __future__ import annotations

import numpy as np
from onnx import helper

from helpers import folding
from helpers.build import F32, bn_node, bn_params, make_model, vi, weight


def assert_kept(model, code, **options):
    """The single BN kept with `code` by the backward folds only (helpers.folding.assert_kept)."""
    options.setdefault("fold_forward", False)
    return folding.assert_kept(model, code, **options)


def conv_bn_model(rank=2, group=1, cin=4, cout=6, bias=True, transpose=False, dtype=np.float32, opset=17,
                  bn_attrs=None, spatial=5, elem=F32):
    k = [3] * rank
    x_shape = [2, cin] + [spatial] * rank
    if transpose:
        w_shape = [cin, cout // group] + k
        attrs = dict(group=group, strides=[2] * rank)
        op = "ConvTranspose"
    else:
        w_shape = [cout, cin // group] + k
        attrs = dict(group=group, pads=[1] * (2 * rank))
        op = "Conv"
    inits = [weight("W", w_shape, dtype=dtype)] + bn_params("bn", cout, dtype=dtype)
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(weight("B", [cout], dtype=dtype))
        conv_inputs.append("B")
    nodes = [helper.make_node(op, conv_inputs, ["y"], name="layer", **attrs),
             bn_node("y", "z", "bn", **(bn_attrs or {}))]
    z_shape = [2, cout] + [2 * spatial + 1 if transpose else spatial] * rank
    return make_model(nodes, [vi("x", x_shape, elem)], [vi("z", z_shape, elem)], inits, opset=opset)


def matmul_model(add_bias=None, bias_first=False, a_shape=(3, 5), n=8, dtype=np.float32, elem=F32, opset=17,
                 a_shape_known=True):
    k = a_shape[-1]
    inits = [weight("Bw", [k, n], dtype=dtype)] + bn_params("bn", a_shape[1] if len(a_shape) == 3 else n, dtype=dtype)
    nodes = [helper.make_node("MatMul", ["a", "Bw"], ["mm"], name="linear")]
    bn_in = "mm"
    if add_bias is not None:
        inits.append(weight("bias", list(add_bias), dtype=dtype))
        nodes.append(helper.make_node("Add", ["bias", "mm"] if bias_first else ["mm", "bias"], ["y"], name="add"))
        bn_in = "y"
    nodes.append(bn_node(bn_in, "z", "bn"))
    a_vi = vi("a", list(a_shape) if a_shape_known else None, elem)
    return make_model(nodes, [a_vi], [vi("z", None, elem)], inits, opset=opset)
