"""Produces real exporter output for tools/real_exports.py: ResNet-18, MobileNetV2 and EfficientNet-B0
(torchvision, random weights and random trained-looking BN statistics), quantized and exported by the real tools
on the CPU, calibrated on random data, plus timm's LeViT-128S as a float export.

    python tools/make_real_exports.py /work/exports                  # every exporter that imports
    python tools/make_real_exports.py /work/exports --only ortq nncf_onnx
    python tools/make_real_exports.py /work/exports --only modelopt_int8 --models resnet18 mobilenet_v2

Run it in a virtual environment of its own that has the exporters (torch, torchvision, timm, nvidia-modelopt,
nncf, brevitas, aimet-onnx, onnxruntime): they are not the project's dependencies, and no test imports this
file. Each exporter runs on its own; one that fails (not installed, or cannot export on a CPU) is written to
DIR/errors.json with its error in one line, and DIR/versions.json records every package's version.

Files: DIR/<exporter>/<model>.onnx, e.g. DIR/modelopt_int8/resnet18.onnx.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import traceback
from pathlib import Path

import numpy as np
import torch

MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0")
SIZE = 224
CALIBRATION = 8  # random calibration batches of one image
OPSET = 17


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Trained-looking BN statistics (the default ones make every fold an identity): gamma in [0.5, 1.5] with
    every seventh channel negative, beta and mean around 0, var in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            c = m.num_features
            gamma = torch.rand(c, generator=g) + 0.5
            gamma[::7] *= -1
            with torch.no_grad():
                m.weight.copy_(gamma)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
    return model


def float_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "levit_128s":
        import timm

        model = timm.create_model("levit_128s", pretrained=False)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
    return randomise_bn(model).eval()


def example(seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def calibration(size: int = SIZE) -> list[torch.Tensor]:
    return [example(100 + i, size) for i in range(CALIBRATION)]


def torchscript_export(model: torch.nn.Module, path: Path, opset: int = OPSET, **kw) -> None:
    """torch.onnx.export with the TorchScript exporter (what the quantization tools' export paths use)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (example(),), str(path), input_names=["input"], output_names=["output"],
                      opset_version=opset, dynamo=False, **kw)


# ------------------------------------------------------------------------------------------------ exporters

def export_float(out: Path) -> None:
    """The float models, as the tools below take them: TorchScript export with training=PRESERVE (in eval mode
    the TorchScript exporter folds Conv+BN itself) and the dynamo exporter (torch's default)."""
    for name in MODELS:
        model = float_model(name)
        torchscript_export(model, out / "float_torchscript" / f"{name}.onnx",
                           training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
        dyn = out / "float_dynamo" / f"{name}.onnx"
        dyn.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(model, (example(),), str(dyn), input_names=["input"], output_names=["output"],
                          dynamo=True, external_data=False)


def export_levit(out: Path) -> None:
    """LeViT-128S three ways: TorchScript with PRESERVE (BN kept) with and without constant folding (without
    it the MatMul weights stay behind a Transpose), and the dynamo exporter."""
    model = float_model("levit_128s")
    torchscript_export(model, out / "levit_float_torchscript_cf" / "levit_128s.onnx",
                       training=torch.onnx.TrainingMode.PRESERVE)
    torchscript_export(model, out / "levit_float_torchscript" / "levit_128s.onnx",
                       training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    dyn = out / "levit_float_dynamo" / "levit_128s.onnx"
    dyn.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (example(),), str(dyn), input_names=["input"], output_names=["output"], dynamo=True,
                      external_data=False)


def export_ortq(out: Path) -> None:
    """onnxruntime's quantize_static on the float TorchScript export, QDQ format, no pre-processing; per channel
    and per tensor."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"input": x.numpy()} for x in calibration()])

        def get_next(self):
            return next(self.data, None)

    for name in MODELS:
        src = out / "float_torchscript" / f"{name}.onnx"
        for per_channel in (True, False):
            dst = out / ("ortq_pc" if per_channel else "ortq_pt") / f"{name}.onnx"
            dst.parent.mkdir(parents=True, exist_ok=True)
            quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _modelopt(out: Path, tag: str, config) -> None:
    import modelopt.torch.quantization as mtq

    for name in MODELS:
        model = float_model(name)
        data = calibration()

        def loop(m):
            for x in data:
                m(x)

        model = mtq.quantize(model, copy.deepcopy(config), loop)
        torchscript_export(model.eval(), out / tag / f"{name}.onnx")


def export_modelopt_int8(out: Path) -> None:
    import modelopt.torch.quantization as mtq

    _modelopt(out, "modelopt_int8", mtq.INT8_DEFAULT_CFG)


def export_modelopt_int4(out: Path) -> None:
    """INT4 weights per output channel (axis 0), activations not quantized: ModelOpt exports a 4-bit weight
    quantizer as float W -> trt::DequantizeLinear."""
    import modelopt.torch.quantization as mtq

    # INT8_DEFAULT_CFG (ModelOpt 0.47's list form, its exclusions included) with 4-bit weights per channel and
    # no input quantizers (W4A16).
    config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    for entry in config["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"] = {"num_bits": 4, "axis": 0}
        elif entry.get("quantizer_name") == "*input_quantizer":
            entry.pop("cfg", None)
            entry["enable"] = False
    _modelopt(out, "modelopt_int4", config)


def export_modelopt_fp8(out: Path) -> None:
    import modelopt.torch.quantization as mtq

    _modelopt(out, "modelopt_fp8", mtq.FP8_DEFAULT_CFG)


def export_nncf_torch(out: Path) -> None:
    """nncf.quantize on the torch model, exported twice: as it comes (OpenVINO's FakeQuantize ops) and with every
    quantizer set to export Q/DQ pairs (QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)."""
    import nncf
    from nncf.torch.quantization.layers import QuantizerExportMode

    for name in MODELS:
        model = float_model(name)
        ds = nncf.Dataset(calibration())
        q = nncf.quantize(model, ds, subset_size=CALIBRATION)
        torchscript_export(q.eval(), out / "nncf_torch" / f"{name}.onnx")
        for m in q.modules():
            if hasattr(m, "set_export_mode"):
                m.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
        torchscript_export(q.eval(), out / "nncf_torch_qdq" / f"{name}.onnx")


def export_nncf_onnx(out: Path) -> None:
    import nncf
    import onnx

    for name in MODELS:
        src = onnx.load(str(out / "float_torchscript" / f"{name}.onnx"))
        ds = nncf.Dataset([{"input": x.numpy()} for x in calibration()])
        q = nncf.quantize(src, ds, subset_size=CALIBRATION)
        dst = out / "nncf_onnx" / f"{name}.onnx"
        dst.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(q, str(dst))


def export_brevitas(out: Path) -> None:
    """Brevitas graph quantization of the torchvision model (BN kept: merge_bn=False), QCDQ export."""
    from brevitas.export import export_onnx_qcdq
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.graph.quantize import preprocess_for_quantize, quantize

    for name in MODELS:
        model = float_model(name)
        model = preprocess_for_quantize(model, trace_model=True, merge_bn=False)
        model = quantize(model)
        with torch.no_grad(), calibration_mode(model):
            for x in calibration():
                model(x)
        dst = out / "brevitas_qcdq" / f"{name}.onnx"
        dst.parent.mkdir(parents=True, exist_ok=True)
        # TorchScript path: the dynamo one refuses quantized biases ("QCDQ export with `dynamo=True` does not
        # support quantized bias").
        export_onnx_qcdq(model.eval(), args=example(), export_path=str(dst), opset_version=OPSET,
                         input_names=["input"], output_names=["output"], dynamo=False)


def export_aimet_onnx(out: Path) -> None:
    """aimet-onnx's QuantizationSimModel on the float export, BN not folded first, exported as QDQ."""
    import onnx
    from aimet_onnx.quantsim import QuantizationSimModel

    for name in MODELS:
        src = onnx.load(str(out / "float_torchscript" / f"{name}.onnx"))
        sim = QuantizationSimModel(src)
        data = calibration()

        def loop(session, _):
            for x in data:
                session.run(None, {"input": x.numpy()})

        sim.compute_encodings(loop, None)
        dst = out / "aimet_onnx" / f"{name}.onnx"
        dst.parent.mkdir(parents=True, exist_ok=True)
        qdq = sim.to_onnx_qdq()
        onnx.save(qdq, str(dst))


EXPORTERS = {
    "float": export_float, "levit": export_levit, "ortq": export_ortq,
    "modelopt_int8": export_modelopt_int8, "modelopt_int4": export_modelopt_int4,
    "modelopt_fp8": export_modelopt_fp8, "nncf_torch": export_nncf_torch, "nncf_onnx": export_nncf_onnx,
    "brevitas": export_brevitas, "aimet_onnx": export_aimet_onnx,
}

PACKAGES = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "modelopt", "nncf", "brevitas",
            "aimet_onnx", "aimet_torch")


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
        except Exception as e:  # noqa: BLE001
            found[name] = f"not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return found


def main() -> None:
    global MODELS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", nargs="+", choices=list(EXPORTERS))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="torchvision models (default: all)")
    args = parser.parse_args()
    MODELS = tuple(args.models or MODELS)
    args.out.mkdir(parents=True, exist_ok=True)
    errors_path = args.out / "errors.json"
    errors = json.loads(errors_path.read_text()) if errors_path.exists() else {}
    for tag in args.only or list(EXPORTERS):
        print(f"== {tag}", flush=True)
        try:
            EXPORTERS[tag](args.out)
            errors.pop(tag, None)
        except Exception as e:  # noqa: BLE001 (one line per exporter that cannot run here)
            traceback.print_exc()
            errors[tag] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            print(f"   failed: {errors[tag]}", flush=True)
    errors_path.write_text(json.dumps(errors, indent=2) + "\n")
    (args.out / "versions.json").write_text(json.dumps(versions(), indent=2) + "\n")


if __name__ == "__main__":
    np.random.seed(0)
    main()
