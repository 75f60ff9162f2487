"""Type stubs for qdqfold's native core (see qdqfold_native.__doc__)."""

from typing import Any, Mapping, Sequence, TypedDict, Union
import mmap

__version__: str

BytesLike = Union[bytes, bytearray, memoryview, mmap.mmap]

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
    exact: bool
    new_tensors: list[str]
    metrics: dict[str, float]

class Report(TypedDict):
    batchnorms: list[BatchNormEntry]

def fold(
    model: BytesLike,
    *,
    fold_backward: bool = True,
    fold_forward: bool = True,
    pad_correction: bool = False,
    allow_opset_upgrade: bool = False,
    allow_nonzero_zero_point: bool = False,
    materialize_quantized_weights: bool = False,
    drop_activation_quantizers: bool = False,
    shapes: Mapping[str, Sequence[int | None]] = ...,
) -> bytes: ...
def fold_with_report(
    model: BytesLike,
    *,
    fold_backward: bool = True,
    fold_forward: bool = True,
    pad_correction: bool = False,
    allow_opset_upgrade: bool = False,
    allow_nonzero_zero_point: bool = False,
    materialize_quantized_weights: bool = False,
    drop_activation_quantizers: bool = False,
    shapes: Mapping[str, Sequence[int | None]] = ...,
) -> tuple[bytes, Report]: ...
def options() -> dict[str, Any]: ...
