"""The multi-turn workload against the fake engine's app, in process: every turn re-sends the history with the
previous answer, so (with the prompt cache) each later turn finds the earlier one cached."""

from __future__ import annotations

import asyncio

import httpx

from qanat.bench.conversation import ConversationSpec, conversations_markdown, run_conversations, summarize_turns
from qanat.build import build_app, build_fake_engine
from qanat.config import EngineConfig, ServerConfig


def test_each_turn_resends_the_history_and_hits_the_cache() -> None:
    engine = build_fake_engine(EngineConfig(ctx=2048, parallel=2, batch_tokens=512, cache_ram_mib=8))
    app = build_app(engine, ServerConfig())
    spec = ConversationSpec(conversations=3, turns=3, opening_words=20, question_words=5, output_tokens=8)
    try:
        records, wall_s = asyncio.run(run_conversations("http://q/v1", "fake-model", spec, concurrency=2,
                                                        transport=httpx.ASGITransport(app=app)))
    finally:
        engine.shutdown()
    assert len(records) == 9 and all(r.ok for r in records)
    by_turn = {(r.conversation, r.turn): r for r in records}
    for c in range(3):
        for t in (2, 3):
            before, now = by_turn[(c, t - 1)], by_turn[(c, t)]
            assert now.prompt_tokens > before.prompt_tokens + before.output_tokens  # type: ignore[operator]
            # the whole previous turn is cached (its prompt, its answer), wherever it waited meanwhile
            assert now.cached_tokens >= before.prompt_tokens + before.output_tokens - 1  # type: ignore[operator]
    summary = summarize_turns(records, wall_s)
    assert [t["completed"] for t in summary["turns"]] == [3, 3, 3]
    assert summary["turns"][0]["cached_tokens_mean"] < 20  # only the template and "Conversation " in common
    assert "| 3 | 3 |" in conversations_markdown(summary)
