"""Shared fixtures and the test tiers.

Everything under tests/e2e/ needs the real model (marker `model`); `pytest -m "not model"` runs the rest, on the
fake executor, in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qanat.config import EngineConfig
from qanat.engine.local import LocalEngine

E2E = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E in Path(item.path).parents:
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def engine() -> Iterator[LocalEngine]:
    """One real engine over the embedded SmolLM2 model (llama.cpp in a child process) for the whole session."""
    from qanat.build import build_llamacpp_engine

    eng = build_llamacpp_engine(EngineConfig(ctx=1024, parallel=8, threads=2, max_waiting=64))
    yield eng
    eng.shutdown()
