"""The exporter-made sample models in tests/models (see tests/models/README.md)."""

from __future__ import annotations

from pathlib import Path

MODELS = Path(__file__).parent.parent / "models"
SAMPLE_MODELS = sorted(MODELS.glob("*.onnx"))
