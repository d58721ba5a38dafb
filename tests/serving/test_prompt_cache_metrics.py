"""/metrics carries the prompt cache per tier, and usage.cached_tokens counts a RAM tier's tokens."""

from __future__ import annotations

from pathlib import Path

from qanat.build import build_fake_engine
from qanat.config import EngineConfig
from tests.serving.test_app import call


def chat(content: str) -> dict[str, object]:
    return {"model": "fake-model", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}


def test_cached_tokens_and_metrics_per_tier(tmp_path: Path) -> None:
    engine = build_fake_engine(EngineConfig(ctx=512, parallel=1, batch_tokens=256, cache_ram_mib=4,
                                            cache_dir=str(tmp_path)))
    try:
        question = "tell me about the khettara and the water shares " * 2
        first = call(engine, "POST", "/v1/chat/completions", json=chat(question)).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        call(engine, "POST", "/v1/chat/completions", json=chat("something else entirely, " * 4))  # takes the slot
        again = call(engine, "POST", "/v1/chat/completions", json=chat(question)).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == first["usage"]["prompt_tokens"] - 1
        text = call(engine, "GET", "/metrics").text
    finally:
        engine.shutdown()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("qanat_prompt_cache")}
    n = first["usage"]["prompt_tokens"] - 1  # type: ignore[index]
    assert samples['qanat_prompt_cache_hit_tokens_total{tier="ram"}'] == n
    assert samples['qanat_prompt_cache_restores_total{tier="ram"}'] == 1
    assert samples['qanat_prompt_cache_bytes{tier="ram"}'] > 0
    assert samples['qanat_prompt_cache_saves_total'] >= 1
    assert {'qanat_prompt_cache_miss_tokens_total{tier="slot"}', 'qanat_prompt_cache_evictions_total{tier="disk"}',
            'qanat_prompt_cache_restore_seconds_total{tier="ram"}'} <= samples.keys()
