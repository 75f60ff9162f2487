"""Pattern 6 (tests/test_exporters_mixnet.py): BN after a channel Concat of depthwise convs (timm's MixedConv2d).
RNG is shared with the tests."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


RNG = np.random.default_rng(146)


SPLITS = [4, 2, 2]


C = sum(SPLITS)


def mixed_conv_bn(extra_reader=False, axis=1, bias=(False, True, False)):
    inits = [nh.from_array(np.array(SPLITS, np.int64), "split")]
    nodes = [h.make_node("Split", ["x", "split"], [f"/conv_dw/Split_output_{i}" for i in range(3)], name="/conv_dw/Split",
                         axis=1)]
    outs = []
    for i, (c, k) in enumerate(zip(SPLITS, [3, 5, 7])):
        w = nh.from_array((RNG.standard_normal((c, 1, k, k)) * 0.3).astype(np.float32), f"conv_dw.{i}.weight")
        inits.append(w)
        ins = [f"/conv_dw/Split_output_{i}", w.name]
        if bias[i]:
            inits.append(nh.from_array(RNG.standard_normal(c).astype(np.float32), f"conv_dw.{i}.bias"))
            ins.append(f"conv_dw.{i}.bias")
        nodes.append(h.make_node("Conv", ins, [f"/conv_dw/{i}/Conv_output_0"], name=f"/conv_dw/{i}/Conv", group=c,
                                 kernel_shape=[k, k], pads=[k // 2] * 4))
        outs.append(f"/conv_dw/{i}/Conv_output_0")
    nodes.append(h.make_node("Concat", outs, ["/conv_dw/Concat_output_0"], name="/conv_dw/Concat", axis=axis))
    gamma = RNG.uniform(0.5, 1.5, C) * np.where(np.arange(C) % 3 == 1, -1, 1)
    inits += [nh.from_array(v.astype(np.float32), f"bn2.{n}") for n, v in
              (("weight", gamma), ("bias", RNG.standard_normal(C)), ("running_mean", RNG.standard_normal(C)),
               ("running_var", RNG.uniform(0.5, 2, C)))]
    nodes.append(h.make_node("BatchNormalization", ["/conv_dw/Concat_output_0"] + [f"bn2.{n}" for n in
                             ("weight", "bias", "running_mean", "running_var")], ["/bn2/BatchNormalization_output_0"],
                             name="/bn2/BatchNormalization", epsilon=1e-5))
    nodes.append(h.make_node("Relu", ["/bn2/BatchNormalization_output_0"], ["y"], name="/bn2/act/Relu"))
    outputs = [h.make_tensor_value_info("y", T.FLOAT, [1, C, 7, 7])]
    if extra_reader:
        outputs.append(h.make_tensor_value_info("/conv_dw/1/Conv_output_0", T.FLOAT, [1, 2, 7, 7]))
    graph = h.make_graph(nodes, "main_graph", [h.make_tensor_value_info("x", T.FLOAT, [1, C, 7, 7])], outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], producer_name="pytorch")
    model.ir_version = 7
    return model
