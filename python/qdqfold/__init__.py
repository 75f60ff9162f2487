"""qdqfold: fold BatchNormalization into ONNX layers, quantized (QDQ) weights included, exactly.

The work is done by the native module ``qdqfold_native``; this package adds a model-level API
(:func:`fold_model`, :func:`fold_many`), a report (:class:`FoldReport`), verification against onnxruntime
(:func:`verify`) and the ``qdqfold`` command line.

The names below are loaded on first use (PEP 562): ``import qdqfold`` (and so ``python -m qdqfold``) does not
import verification, the report's dataclasses or the batch machinery until something asks for them;
``from qdqfold import verify`` and ``qdqfold.fold_model`` work as always.
"""

from __future__ import annotations

import importlib
import sys
import types

from ._version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read the name as True)
if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from typing import Any

    from qdqfold_native import FoldError

    from .api import OPTIONS, fold_bytes, fold_model
    from .batch import ModelResult, VerifySettings, fold_many
    from .files import MissingWeightsWarning
    from .report import BatchNormEntry, FoldReport
    from .verify import VerifyError, VerifyResult, verify

__all__ = [
    "BatchNormEntry",
    "FoldError",
    "FoldReport",
    "MissingWeightsWarning",
    "ModelResult",
    "OPTIONS",
    "VerifyError",
    "VerifyResult",
    "VerifySettings",
    "__version__",
    "fold_bytes",
    "fold_many",
    "fold_model",
    "verify",
]

#: Where each public name lives.
_HOMES = {
    "FoldError": "qdqfold_native", "MissingWeightsWarning": ".files",
    "OPTIONS": ".api", "fold_bytes": ".api", "fold_model": ".api",
    "ModelResult": ".batch", "VerifySettings": ".batch", "fold_many": ".batch",
    "BatchNormEntry": ".report", "FoldReport": ".report",
    "VerifyError": ".verify", "VerifyResult": ".verify", "verify": ".verify",
}

#: Submodules reachable as attributes after ``import qdqfold`` (as they were when this file imported them).
_SUBMODULES = frozenset({"api", "batch", "cli", "graphinfo", "passes", "paths", "render", "report", "trt_compat",
                         "verify"})


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home, __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


class _Package(types.ModuleType):
    """The package's module type. Python binds a submodule to its package's attribute of the same name once it
    is imported; ``qdqfold.verify`` names the function :func:`verify`, not its module (as when this file
    imported it eagerly), whenever the module qdqfold.verify is first imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "verify" and isinstance(value, types.ModuleType):
            value = value.verify
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
