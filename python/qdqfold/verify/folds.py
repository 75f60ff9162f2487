"""What the core's fold report says each fold did (the entries verify nudges and certifies), and tensor values."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


def _array(tensor, folder: str | None):
    """A tensor's values, read from its external data file (in ``folder``) when it has one."""
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor, base_dir=folder or "")


def _all_folded(report: Any) -> list[dict[str, Any]]:
    if report is None:
        return []
    entries = report["batchnorms"] if isinstance(report, dict) else [asdict(b) for b in report.batchnorms]
    return [e for e in entries if e["folded"]]


def _folded_entries(report: Any) -> list[dict[str, Any]]:
    """The folded BNs of a report (FoldReport or the native dict), main graph only, as dicts."""
    if report is None:
        return []
    entries = report["batchnorms"] if isinstance(report, dict) else [asdict(b) for b in report.batchnorms]
    return [e for e in entries if e["folded"] and e["graph"] == "main"]
