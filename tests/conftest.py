"""Shared fixtures: one real engine over the embedded SmolLM2 model for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qanat.config import EngineConfig
from qanat.engine.engine import Engine


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    eng = Engine(EngineConfig(ctx=1024, parallel=8, threads=2, max_waiting=64))
    yield eng
    eng.shutdown()

