"""The prompt cache through the engine core on the fake executor: what the scheduler saves and restores, and that a
restored prefix changes nothing in the output (the fake's logits depend on its per-sequence "KV", so a wrong
restore would show)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from qanat.build import build_fake_engine
from qanat.config import EngineConfig
from qanat.engine.core.prefix_cache import PrefixCache
from qanat.engine.core.request import Request
from qanat.engine.core.scheduler import MIN_SAVE_TOKENS, Scheduler
from qanat.engine.executors.base import KVCacheReport, TierEvent
from qanat.engine.local import LocalEngine
from qanat.engine.sampling import SamplingParams
from tests.helpers import collect, run, tokenize, tokens_of

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def config(**kw: object) -> EngineConfig:
    return EngineConfig(ctx=256, parallel=2, batch_tokens=64, max_waiting=8, **kw)  # type: ignore[arg-type]


@pytest.fixture()
def two_slots() -> Iterator[LocalEngine]:
    engine = build_fake_engine(config(cache_ram_mib=1))
    yield engine
    engine.shutdown()


def prompt(engine: LocalEngine, i: int) -> list[int]:
    return tokenize(engine, f"conversation {i}: " + "the water flows under the sand " * 3)


def fill(engine: LocalEngine, tag: str) -> None:
    async def go() -> None:
        await asyncio.gather(*(collect(engine, tokenize(engine, f"{tag} {k} " * 12), GREEDY) for k in range(2)))

    run(go())


def test_an_overwritten_slot_is_saved_and_restored_from_ram_with_the_same_output(two_slots: LocalEngine) -> None:
    ids = prompt(two_slots, 1)
    cold = run(collect(two_slots, ids, GREEDY))
    fill(two_slots, "filler")
    warm = run(collect(two_slots, ids, GREEDY))
    assert warm[-1].num_cached_tokens == len(ids) - 1
    assert tokens_of(warm) == tokens_of(cold)
    stats = two_slots.stats().prompt_cache
    assert stats is not None
    assert stats.saves >= 1 and stats.restores == {"ram": 1}
    assert stats.hit_tokens["ram"] == len(ids) - 1
    assert 0 < stats.held_bytes["ram"] <= 2**20

    # the next turn: prompt + answer + more hits the answer as well
    next_turn = ids + tokens_of(warm) + tokenize(two_slots, " and then?")[1:]
    fill(two_slots, "other")
    follow = run(collect(two_slots, next_turn, GREEDY))
    assert follow[-1].num_cached_tokens == len(ids) + len(tokens_of(warm)) - 1


def test_ram_stays_within_its_budget_under_distinct_prompts() -> None:
    engine = build_fake_engine(config(cache_ram_mib=1), )
    try:
        budget = 1 << 20
        tiers = engine.core.executor.tiers  # type: ignore[attr-defined]
        tiers.settings = type(tiers.settings)(ram_bytes=4000)  # a few 250-token entries (4 bytes a token here)

        async def many() -> None:
            for i in range(20):
                await asyncio.gather(*(collect(engine, tokenize(engine, f"{i} {k} " * 40), GREEDY) for k in range(2)))

        run(many())
        stats = engine.stats().prompt_cache
        assert stats is not None and stats.evictions["ram"] > 0
        assert stats.held_bytes["ram"] == tiers.ram_bytes <= 4000 < budget
    finally:
        engine.shutdown()


def test_disk_tier_outlives_the_engine_and_a_bad_file_is_recomputed(tmp_path: Path) -> None:
    first = build_fake_engine(config(cache_ram_mib=1, cache_dir=str(tmp_path)))
    ids = prompt(first, 2)
    try:
        cold = run(collect(first, ids, GREEDY))
    finally:
        first.shutdown()  # the free slots are written to disk on the way out
    assert list(tmp_path.glob("*.qkv"))

    second = build_fake_engine(config(cache_ram_mib=1, cache_dir=str(tmp_path)))
    try:
        warm = run(collect(second, ids, GREEDY))
        assert warm[-1].num_cached_tokens == len(ids) - 1 and tokens_of(warm) == tokens_of(cold)
        stats = second.stats().prompt_cache
        assert stats is not None and stats.restores == {"ram": 0, "disk": 1} and stats.restore_s["disk"] > 0
    finally:
        second.shutdown()

    third = build_fake_engine(config(cache_ram_mib=1, cache_dir=str(tmp_path)))
    try:
        for path in tmp_path.glob("*.qkv"):
            path.write_bytes(path.read_bytes()[:-3])  # truncated after it was indexed
        again = run(collect(third, ids, GREEDY))
        assert again[-1].num_cached_tokens == 0 and tokens_of(again) == tokens_of(cold)
        stats = third.stats().prompt_cache
        assert stats is not None and stats.failed_restores == 1
    finally:
        third.shutdown()


def test_scheduler_saves_a_free_slot_only_when_it_would_lose_what_nothing_else_holds() -> None:
    cache = PrefixCache(("ram",))
    sched = Scheduler(num_slots=1, context_length=512, max_batch_tokens=512, prefix_cache=cache)
    first = list(range(1, 101))

    def admit(rid: str, ids: list[int]) -> Request:
        request = Request(rid, ids, GREEDY, 2, eog_ids=frozenset({0}))
        sched.add(request)
        return request

    def finish_all() -> None:
        while sched.running or sched.waiting:
            plan = sched.schedule()
            sched.update(plan, {c.request.request_id: 7 for c in plan.chunks if c.needs_logits})

    admit("a", first)
    finish_all()
    admit("b", first[:90] + [500] * 10)  # keeps 90 in place, would lose 11 (< MIN_SAVE_TOKENS): no save
    assert sched.schedule().cache_ops[0].save is None and MIN_SAVE_TOKENS > 11
    finish_all()
    admit("c", list(range(1000, 1100)))  # loses everything: saved first
    op = sched.schedule().cache_ops[0]
    assert op.save is not None and op.save.token_ids == (*first[:90], *[500] * 10, 7) and op.keep == 0
    finish_all()
    cache.apply(KVCacheReport(events=[TierEvent(op.save.key, "ram", True, 400)]))
    request = admit("d", [*first[:90], *[500] * 10, 7, 8])  # the saved entry is a longer hit than the slot's 0
    op = sched.schedule().cache_ops[0]
    assert op.restore_key == sched.prefix_cache.lookup(request.prompt_ids, 101).key  # type: ignore[union-attr]
    assert op.keep == 101 and request.num_cached_tokens == 101 and request.cached_from == "ram"
    assert op.save is not None  # what "c" left is saved before the restore replaces it
