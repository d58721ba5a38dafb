"""Start-up configuration: bad values are refused once, by name."""

from __future__ import annotations

import pytest

from qanat.config import ConfigError, EngineConfig


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"ctx": 16}, "--ctx"),
        ({"parallel": 0}, "--parallel"),
        ({"parallel": 16, "batch_tokens": 8}, "--batch"),
        ({"flash_attn": "maybe"}, "--flash-attn"),
        ({"deterministic": True, "flash_attn": "on"}, "--deterministic"),
    ],
)
def test_bad_engine_settings_are_named(kwargs: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        EngineConfig(**kwargs)  # type: ignore[arg-type]

