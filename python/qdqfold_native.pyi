"""Type stubs for qdqfold's native core (see qdqfold_native.__doc__)."""

import mmap
import os
from typing import Any, Mapping, Sequence, TypedDict, Union

from typing_extensions import Unpack

__version__: str

BytesLike = Union[bytes, bytearray, memoryview, mmap.mmap]
PathLike = Union[str, os.PathLike[str]]

class FoldError(ValueError):
    """The input is not a valid ONNX model; the message names the problem and its byte offset."""

class BatchNormEntry(TypedDict):
    graph: str
    node: str
    folded: bool
    direction: str | None
    into: list[str]
    into_op: str | None
    code: str
    message: str
    exact: bool | str  # True, "bias-rounded" (exact but for a reported int32 bias rounding), or False
    new_tensors: list[str]
    metrics: dict[str, float]

class Report(TypedDict):
    batchnorms: list[BatchNormEntry]

class Options(TypedDict, total=False):
    """Keyword options of fold, fold_with_report and fold_file; options() gives the defaults."""

    fold_backward: bool  # True: fold BN into the layer that produces its input
    fold_forward: bool  # True: fold BN into the layer(s) that read its output, where exact
    pad_correction: bool  # False: BN -> padded conv with the exact border correction (one Add)
    allow_opset_upgrade: bool  # False: raise the opset to 13 where a per-tensor scale becomes per-channel
    allow_nonzero_zero_point: bool  # False: complement form for int8 -128 under a negative factor
    materialize_quantized_weights: bool  # False: QAT weights written as integers behind DequantizeLinear
    drop_activation_quantizers: bool  # False: APPROXIMATE, drop a Q/DQ pair between a layer and its BN
    merge_branches: bool  # False: merge parallel Conv/BN/identity branches summed over one input into one Conv
    requantize_merged: bool  # False: APPROXIMATE, merge quantized branches too, re-quantized per output channel
    shapes: Mapping[str, Sequence[int | None]]  # static shapes for pad_correction (value name -> dims)

def fold(model: BytesLike, **options: Unpack[Options]) -> bytes: ...
def fold_with_report(model: BytesLike, **options: Unpack[Options]) -> tuple[bytes, Report]: ...
def fold_file(src: PathLike, dst: PathLike, **options: Unpack[Options]) -> Report: ...
def options() -> dict[str, Any]: ...
