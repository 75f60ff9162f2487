"""Pattern 1 (tests/test_exporters_torch.py): constants behind Identity, as torch's TorchScript exporter writes
them. RNG is shared with the tests."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


RNG = np.random.default_rng(14)


def bn_inits(prefix, c, zero_mean=False):
    gamma = RNG.uniform(0.5, 1.5, c) * np.where(np.arange(c) % 3 == 1, -1, 1)
    mean = np.zeros(c) if zero_mean else RNG.standard_normal(c)
    return [nh.from_array(v.astype(np.float32), f"{prefix}.{n}") for n, v in
            (("weight", gamma), ("bias", RNG.standard_normal(c)), ("running_mean", mean),
             ("running_var", RNG.uniform(0.5, 2.0, c)))]


def vgg_like(shared_source_reader=False):
    """Two Conv -> BN -> Relu blocks in torch's naming; the second conv's zero bias, the second BN's zero mean and
    its gamma are Identity copies (one a chain of two) of the first block's equal tensors."""
    c = 4
    zero_bias = nh.from_array(np.zeros(c, np.float32), "onnx::Conv_101")
    bn1 = bn_inits("features.1", c, zero_mean=True)
    inits = [zero_bias, nh.from_array((RNG.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32), "onnx::Conv_100"),
             nh.from_array((RNG.standard_normal((c, c, 3, 3)) * 0.3).astype(np.float32), "onnx::Conv_103"), *bn1,
             nh.from_array(RNG.standard_normal(c).astype(np.float32), "features.4.bias"),
             nh.from_array(RNG.uniform(0.5, 2.0, c).astype(np.float32), "features.4.running_var")]
    nodes = [
        # torch puts the dedup Identity nodes first.
        h.make_node("Identity", ["onnx::Conv_101"], ["onnx::Conv_104"], name="Identity_0"),
        h.make_node("Identity", ["features.1.running_mean"], ["onnx::BN_mean_a"], name="Identity_1"),
        h.make_node("Identity", ["onnx::BN_mean_a"], ["onnx::BN_mean_b"], name="Identity_2"),
        h.make_node("Identity", ["features.1.weight"], ["onnx::BN_gamma"], name="Identity_3"),
        h.make_node("Conv", ["input", "onnx::Conv_100", "onnx::Conv_101"], ["/features.0/Conv_output_0"],
                    name="/features.0/Conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        h.make_node("BatchNormalization", ["/features.0/Conv_output_0", "features.1.weight", "features.1.bias",
                                           "features.1.running_mean", "features.1.running_var"],
                    ["/features.1/BatchNormalization_output_0"], name="/features.1/BatchNormalization", epsilon=1e-5),
        h.make_node("Relu", ["/features.1/BatchNormalization_output_0"], ["/features.2/Relu_output_0"],
                    name="/features.2/Relu"),
        h.make_node("Conv", ["/features.2/Relu_output_0", "onnx::Conv_103", "onnx::Conv_104"],
                    ["/features.3/Conv_output_0"], name="/features.3/Conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        h.make_node("BatchNormalization", ["/features.3/Conv_output_0", "onnx::BN_gamma", "features.4.bias",
                                           "onnx::BN_mean_b", "features.4.running_var"],
                    ["output"], name="/features.4/BatchNormalization", epsilon=1e-5),
    ]
    outputs = [h.make_tensor_value_info("output", T.FLOAT, [1, c, 6, 6])]
    if shared_source_reader:  # the zero bias is also read by a node nothing folds
        nodes.append(h.make_node("Neg", ["onnx::Conv_101"], ["extra"], name="extra_neg"))
        outputs.append(h.make_tensor_value_info("extra", T.FLOAT, [c]))
    graph = h.make_graph(nodes, "main_graph", [h.make_tensor_value_info("input", T.FLOAT, [1, 3, 6, 6])], outputs,
                         inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="pytorch")
    model.ir_version = 8
    return model
