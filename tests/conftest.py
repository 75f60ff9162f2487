"""Fixtures and pytest hooks only; the shared helpers live in tests/helpers/ (see its __init__.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.samples import SAMPLE_MODELS


@pytest.fixture(params=SAMPLE_MODELS, ids=lambda p: p.name)
def sample_model_path(request) -> Path:
    return request.param
