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



def test_deterministic_speculation_is_refused_where_llama_cpp_would_not_verify_exactly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The e2e refusal test runs only against a llama.cpp built with llamafile; the Makefile builds it without.
    from qanat.build import build_llamacpp_engine
    from qanat.engine.executors import llamacpp

    monkeypatch.setattr(llamacpp, "verification_is_exact", lambda: False)
    with pytest.raises(ConfigError, match="without llamafile"):
        build_llamacpp_engine(EngineConfig(deterministic=True, speculative="ngram"))
