"""Inputs: seeded random input sets shaped from the model's inputs, or input sets read from files."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, Mapping

from .result import VerifyError

if TYPE_CHECKING:
    import numpy as np
    import onnx

#: Symbolic dimensions: the first (batch) takes 1, the others (spatial sizes, sequence lengths) this, which a
#: 7x7 kernel with stride 2 survives.
DEFAULT_SPATIAL_SIZE = 32


_NUMPY_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(int64)": "int64",
    "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16", "tensor(bool)": "bool",
}


def check_dim_names(dims: Iterable[str], names: Iterable[str]) -> None:
    """A VerifyError when ``dims`` names a symbolic dimension that is not among the inputs' ``names``."""
    names = set(names)
    unknown = sorted(set(dims) - names)
    if unknown:
        have = ", ".join(sorted(names)) or "none"
        raise VerifyError(f"the model's inputs have no symbolic dimension {', '.join(map(repr, unknown))} "
                          f"(they have: {have})")


def symbolic_sizes(session, dims: Mapping[str, int] | None = None, symbolic_size: int | None = None) -> dict[str, int]:
    """The size every symbolic dimension of the inputs takes: ``dims[name]`` when given, else ``symbolic_size``
    when given, else 1 for a leading (batch) dimension and ``DEFAULT_SPATIAL_SIZE`` for the others. A ``dims``
    name the inputs do not have is an error."""
    dims = dict(dims or {})
    names: dict[str, int] = {}
    for i in session.get_inputs():
        for axis, d in enumerate(i.shape):
            if isinstance(d, str) and d not in names:
                names[d] = axis
    check_dim_names(dims, names)
    return {name: dims[name] if name in dims else symbolic_size if symbolic_size is not None
            else 1 if axis == 0 else DEFAULT_SPATIAL_SIZE for name, axis in names.items()}


def _index_limits(model: onnx.ModelProto | None) -> dict[str, int]:
    """Graph inputs used as Gather / GatherElements indices into a constant table: the table's size."""
    if model is None:
        return {}
    graph = model.graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    limits: dict[str, int] = {}
    inputs = {i.name for i in graph.input}
    for node in graph.node:
        if node.op_type in ("Gather", "GatherElements") and len(node.input) > 1 and node.input[1] in inputs:
            table = shapes.get(node.input[0])
            if table:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                size = table[axis % len(table)]
                limits[node.input[1]] = min(limits.get(node.input[1], size), size)
    return limits


def random_inputs(session, seed: int = 0, symbolic_size: int | None = None, dims: dict[str, int] | None = None,
                  index_limits: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs shaped from the session's inputs (symbolic dimensions: :func:`symbolic_sizes`).
    Floats are standard normal; integers used as Gather indices into a table span the table; other integers
    are small non-negative values (safe as indices), 8-bit integers span their whole range."""
    import numpy as np

    sizes = symbolic_sizes(session, dims, symbolic_size)
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else sizes.get(d, 1) if isinstance(d, str) else 1
                 for d in i.shape]
        if i.type not in _NUMPY_TYPES:
            raise VerifyError(f"cannot generate random values for input {i.name!r} of type {i.type}")
        dtype = np.dtype(_NUMPY_TYPES[i.type]).type
        if dtype == np.bool_:
            feeds[i.name] = rng.random(shape) > 0.5
        elif index_limits and i.name in index_limits and np.issubdtype(dtype, np.integer):
            feeds[i.name] = rng.integers(0, max(index_limits[i.name], 1), size=shape).astype(dtype)
        elif dtype in (np.int8, np.uint8):
            limits = np.iinfo(dtype)
            feeds[i.name] = rng.integers(limits.min, limits.max, size=shape, endpoint=True).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[i.name] = rng.integers(0, 3, size=shape).astype(dtype)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def load_inputs(paths: Iterable[str | os.PathLike], session) -> list[dict[str, np.ndarray]]:
    """Input sets from files: ``.npz`` keyed by input name, or ``.npy`` for a model with a single input; one set
    per file. Every input must be given, with the model's element type."""
    import numpy as np

    wanted = {i.name: i for i in session.get_inputs()}
    sets = []
    for path in paths:
        path = os.fspath(path)
        try:
            if path.endswith(".npy"):
                if len(wanted) != 1:
                    raise VerifyError(f"{path}: a .npy file gives one input, the model has {len(wanted)}: "
                                      f"use an .npz keyed by {', '.join(wanted)}")
                feeds = {next(iter(wanted)): np.load(path, allow_pickle=False)}
            else:
                with np.load(path, allow_pickle=False) as npz:
                    feeds = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as e:
            raise VerifyError(f"{path}: cannot read inputs: {e}") from e
        missing, extra = sorted(set(wanted) - set(feeds)), sorted(set(feeds) - set(wanted))
        if missing or extra:
            raise VerifyError(f"{path}: " + "; ".join(
                ([f"missing input(s) {', '.join(missing)}"] if missing else [])
                + ([f"no model input named {', '.join(extra)}"] if extra else [])))
        for name, value in feeds.items():
            dtype = np.dtype(_NUMPY_TYPES.get(wanted[name].type, "float32"))
            if value.dtype != dtype:
                if value.dtype.kind == dtype.kind == "f" or (value.dtype.kind in "iu" and dtype.kind in "iu"):
                    feeds[name] = value.astype(dtype)
                else:
                    raise VerifyError(f"{path}: input {name!r} is {value.dtype}, the model wants {dtype}")
        sets.append(feeds)
    return sets
