"""Type stubs for qdqfold's native core (see qdqfold_native.__doc__)."""

import mmap
import os
import sys
from typing import Any, Literal, Mapping, Sequence, TypedDict, Union

if sys.version_info >= (3, 11):
    from typing import NotRequired, Unpack
else:  # a dependency of qdqfold on these Pythons (pyproject.toml)
    from typing_extensions import NotRequired, Unpack

__version__: str
file_backend: str  # "linux", "posix" (POSIX.1-2008 only) or "windows": cpp/platform/backend.h

BytesLike = Union[bytes, bytearray, memoryview, mmap.mmap]
PathLike = Union[str, os.PathLike[str]]

class FoldError(ValueError):
    """The input is not a valid ONNX model; the message names the problem and its byte offset."""

class FileError(FoldError):
    """A file that cannot be read, written or replaced, or that changed while it was read; the message starts
    with the path at fault."""

# The report's TypedDicts follow report_fields() (cpp/core/report_fields.h); tests/test_report_fields.py checks
# that they agree: a key the table gives a dict only when not empty is NotRequired here.

class FoldAttempt(TypedDict):
    rule: str  # the fold rule that looked at the BN ("conv-bn", "bn-layers", "merge-branches", ...)
    verdict: Literal["kept", "folded"]
    code: str  # the reason code, or the fold's name
    message: str
    at: str | None  # the node or value at fault, where the rule names one
    option: str | None  # the option (keyword) that changes this outcome

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
    op_type: str  # "BatchNormalization", or Mul / Add / Sub / Div by a per-channel constant folded like one
    attempts: list[FoldAttempt]  # every rule that looked at it, in order; `code` is the deciding one

class OpTypes(TypedDict):
    before: dict[str, int]  # nodes by op type ("domain.Op" outside the default domain), every graph
    after: dict[str, int]

class _Folded(TypedDict):
    batchnorms: list[BatchNormEntry]
    merges: NotRequired[list[BatchNormEntry]]  # merge_branches: one entry per sum of parallel branches
    op_types: OpTypes
    input_bytes: int  # the model and the external data files it read
    target: NotRequired[str]  # target=...: its name
    target_layers: NotRequired[list[BatchNormEntry]]  # per layer: given output quantizers, or why not
    target_kernels: NotRequired[OpTypes]  # integer kernels onnxruntime is expected to form, by op

class Report(_Folded):
    """What fold_with_report returns."""

    input_files: NotRequired[list[str]]  # the external data files read under base_directory, each once

class FileReport(_Folded):
    """What fold_file returns."""

    input_files: list[str]  # the input's external data files, each once
    data_files: list[str]  # external data files written beside dst (named after it)
    removed_files: list[str]  # the input's data files no longer used (in place), stale ones of an earlier output

class ReportField(TypedDict):
    type: str  # its Python type, as annotated above
    fold_with_report: str  # "always", "non-empty" (only when not empty) or "never"
    fold_file: str

class ReportFields(TypedDict):
    batchnorm: dict[str, str]  # each key of a BatchNormEntry -> its Python type, in the order of the dict
    report: dict[str, ReportField]  # each key of a Report / FileReport, in the order of the dict

class LayerKind(TypedDict):
    op: str
    weight_input: int
    weight_scale_input: int  # of the DequantizeLinear (and QuantizeLinear) feeding the weight
    weight_zero_point_input: int
    bias_input: int | None  # None: the bias is an Add of a constant after it (MatMul)
    bias: str
    output_axis: str
    spatial: bool
    backward: bool
    forward: bool
    quantized: bool

class ReasonEntry(TypedDict):
    code: str
    kind: Literal["kept", "fold"]
    meaning: str
    option: str
    flag: str

class Options(TypedDict, total=False):
    """Keyword options of fold, fold_with_report and fold_file; options() gives the defaults."""

    fold_backward: bool  # True: fold BN into the layer that produces its input
    fold_forward: bool  # True: fold BN into the layer(s) that read its output, where exact
    fold_affine: bool  # True: fold Mul/Add/Sub/Div by a per-channel constant (FrozenBatchNorm2d) like a BN
    freeze_initializer_inputs: bool  # False: initializers listed as graph inputs are constants (always for IR < 4)
    pad_correction: bool  # False: BN -> padded conv with the exact border correction (one Add)
    allow_opset_upgrade: bool  # False: raise the opset to 13 where a per-tensor scale becomes per-channel
    allow_nonzero_zero_point: bool  # False: complement form for int8 -128 under a negative factor
    materialize_quantized_weights: bool  # False: QAT weights written as integers behind DequantizeLinear
    drop_activation_quantizers: bool  # False: APPROXIMATE, drop a Q/DQ pair between a layer and its BN
    merge_branches: bool  # False: merge parallel Conv/BN/identity branches summed over one input into one Conv
    requantize_merged: bool  # False: APPROXIMATE, merge quantized branches too, re-quantized per output channel
    requantize_residuals: bool  # False: APPROXIMATE, with target: quantize residual Adds' float inputs (QLinearAdd)
    store_float_weights: bool  # False: with target, float layers read their DQ'd weight as a float constant (exact)
    shapes: Mapping[str, Sequence[int | None]]  # static shapes for pad_correction (value name -> dims)
    target: Literal["onnxruntime"] | None  # None: after folding, rewrite for that runtime's integer kernels

# base_directory: the directory external-data locations are relative to (reads confined to it); without it,
# BNs whose weights are external are kept. tensors: external-data locations whose bytes are the given buffers
# (read in place); other locations go to base_directory.
def fold(
    model: BytesLike,
    *,
    base_directory: PathLike | None = None,
    tensors: dict[str, BytesLike] | None = None,
    **options: Unpack[Options],
) -> bytes: ...
def fold_with_report(
    model: BytesLike,
    *,
    base_directory: PathLike | None = None,
    tensors: dict[str, BytesLike] | None = None,
    **options: Unpack[Options],
) -> tuple[bytes, Report]: ...
# dst None: a dry run (read and fold under the same rules, write nothing). save_as_external_data: None keeps the
# input's layout, False writes every tensor inline, True (implied by size_threshold or data_name) puts every
# initializer of at least size_threshold bytes in one data file (data_name, or dst's name + ".data").
def fold_file(
    src: PathLike,
    dst: PathLike | None,
    *,
    force: bool = False,
    save_as_external_data: bool | None = None,
    size_threshold: int = 1024,
    data_name: str | None = None,
    base_directory: PathLike | None = None,  # where external data resolves instead of src's directory
    model_label: str | None = None,  # how messages name src (a spooled stream: '<stdin>')
    **options: Unpack[Options],
) -> FileReport: ...
def interrupt() -> None: ...
def options() -> dict[str, Any]: ...
def report_fields() -> ReportFields: ...
def reasons() -> list[ReasonEntry]: ...

class IntegerLayer(TypedDict):
    node: str
    op: str
    kernel: str
    activation: str
    weight: str
    activation_range: tuple[int, int]
    pair_max: int
    pair_min: int
    can_saturate: bool
    channels: int
    why_not: str | None

def integer_kernels(model: BytesLike, *, base_directory: PathLike | None = None) -> list[IntegerLayer]: ...
def layer_kinds() -> list[LayerKind]: ...
