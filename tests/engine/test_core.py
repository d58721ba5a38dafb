"""The engine core on the fake executor: the loop, stops, cancellation, prefix reuse, energy books, refusals and
surviving the executor's death, with no weights. The fake checks positions against its own per-sequence "KV" and
computes logits from it, so a wrong cache op or a token fed to the wrong sequence changes the output."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from qanat.build import build_fake_engine
from qanat.config import EngineConfig
from qanat.engine.client import FinishReason, TokenPrompt
from qanat.engine.errors import EngineUnavailableError, InvalidRequestError, QueueFullError
from qanat.engine.executors.fake import EOS, FakeSpec
from qanat.engine.local import LocalEngine
from qanat.engine.sampling import ConstraintKind, OutputConstraint, SamplingParams
from tests.helpers import collect, collect_together, run, text_of, tokenize, tokens_of

GREEDY = SamplingParams(temperature=0, max_tokens=12)
CONFIG = EngineConfig(ctx=256, parallel=4, batch_tokens=64, max_waiting=8)


@pytest.fixture()
def fake() -> Iterator[LocalEngine]:
    engine = build_fake_engine(CONFIG)
    yield engine
    engine.shutdown()


def prompts(engine: LocalEngine, n: int, length: int = 30) -> list[list[int]]:
    return [tokenize(engine, "x" * length + f" prompt number {i}") for i in range(n)]


def test_batched_equals_alone_and_chunked_prefill_equals_whole(fake: LocalEngine) -> None:
    ids = prompts(fake, 6, length=100)  # 100+ tokens each, budget 64: every prompt is prefilled in chunks
    alone = [tokens_of(run(collect(fake, i, GREEDY))) for i in ids]
    assert [tokens_of(r) for r in collect_together(fake, [(i, GREEDY) for i in ids])] == alone
    assert all(len(t) == 12 for t in alone) and len({tuple(t) for t in alone}) == 6


def test_stop_string_stop_token_and_length(fake: LocalEngine) -> None:
    ids = tokenize(fake, "tell me something")
    full = run(collect(fake, ids, SamplingParams(temperature=0, max_tokens=20)))
    text = text_of(full)
    assert full[-1].finish_reason is FinishReason.LENGTH and full[-1].num_output_tokens == 20

    stop = text[5:8]
    cut = run(collect(fake, ids, SamplingParams(temperature=0, max_tokens=20, stop=(stop,))))
    assert text_of(cut) == text[: text.index(stop)] and cut[-1].finish_reason is FinishReason.STOP

    third = tokens_of(full)[2]
    by_id = run(collect(fake, ids, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=(third,))))
    assert by_id[-1].finish_reason is FinishReason.STOP and by_id[-1].num_output_tokens == 3
    assert text_of(by_id) == text[:2]  # the stop token ends the text without appearing in it

    ends = run(collect(fake, ids, SamplingParams(temperature=0, max_tokens=20, logit_bias=((EOS, 100.0),))))
    assert ends[-1].finish_reason is FinishReason.STOP and ends[-1].num_output_tokens == 1 and not text_of(ends)


def test_same_seed_same_text(fake: LocalEngine) -> None:
    ids = tokenize(fake, "sample me")

    def sample(seed: int) -> str:
        return text_of(run(collect(fake, ids, SamplingParams(temperature=1.0, seed=seed, max_tokens=30))))

    assert sample(3) == sample(3) != sample(4)


def test_prefix_reuse_in_place_and_by_copy_gives_the_same_output(fake: LocalEngine) -> None:
    system = tokenize(fake, "a long shared system prompt " * 3)
    question = system + tokenize(fake, "question one")[1:]
    cold = run(collect(fake, question, GREEDY))
    assert cold[-1].num_cached_tokens == 0
    warm = run(collect(fake, question, GREEDY))
    assert warm[-1].num_cached_tokens == len(question) - 1  # all but the last token, which yields the logits
    assert tokens_of(warm) == tokens_of(cold)

    other = system + tokenize(fake, "question two")[1:]

    async def crowd() -> list[list[int]]:  # occupy the warm slot, so `other` lands elsewhere and copies
        blocker = asyncio.create_task(collect(fake, question, SamplingParams(temperature=0, max_tokens=40)))
        await asyncio.sleep(0.01)
        result = await collect(fake, other, GREEDY)
        await blocker
        return [tokens_of(result), [result[-1].num_cached_tokens]]

    copied, (cached,) = run(crowd())
    assert cached >= len(system)
    fresh = build_fake_engine(CONFIG)
    try:
        assert copied == tokens_of(run(collect(fresh, other, GREEDY)))  # the same as a cold run
    finally:
        fresh.shutdown()


def test_energy_books_balance_and_follow_tokens(fake: LocalEngine) -> None:
    ids = prompts(fake, 5)

    async def all_of_them() -> list[float]:
        results = await asyncio.gather(*(collect(fake, i, GREEDY) for i in ids))
        return [r[-1].energy_j or 0.0 for r in results]

    charged = run(all_of_them())
    totals = fake.stats().energy
    spec = FakeSpec()
    assert totals.source == "estimated:fake"
    assert sum(charged) == pytest.approx(totals.attributed_j)
    assert totals.attributed_j + totals.idle_j == pytest.approx(totals.total_j)
    steps = fake.stats().steps
    assert totals.attributed_j == pytest.approx(steps * spec.joules_per_step + spec.joules_per_token * totals.tokens)
    assert totals.idle_j == pytest.approx(steps * spec.idle_joules_per_step)


def test_refused_request_is_invalid_and_others_go_on(fake: LocalEngine) -> None:
    ids = tokenize(fake, "give me json")
    json_only = SamplingParams(constraint=OutputConstraint(ConstraintKind.JSON_OBJECT))

    async def both() -> list[object]:
        return await asyncio.gather(collect(fake, ids, json_only), collect(fake, ids, GREEDY), return_exceptions=True)

    refused, served = run(both())
    assert isinstance(refused, InvalidRequestError) and refused.param == "response_format"
    assert isinstance(served, list) and served[-1].num_output_tokens == 12
    assert fake.load().num_running == 0


def test_size_checks_name_the_numbers(fake: LocalEngine) -> None:
    with pytest.raises(InvalidRequestError, match="300 tokens.*256") as info:
        run(collect(fake, [5] * 300, GREEDY))
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match=r"max_tokens \(250\)"):
        run(collect(fake, [5] * 10, SamplingParams(max_tokens=250)))
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        run(collect(fake, [5] * 10, SamplingParams(logit_bias=((99999, 1.0),))))


def test_cancel_frees_the_slot_for_the_queued_request() -> None:
    engine = build_fake_engine(EngineConfig(ctx=256, parallel=1, batch_tokens=64, max_waiting=1),
                               FakeSpec(num_slots=1, step_delay_s=0.005))
    try:
        ids = tokenize(engine, "long story")

        async def scenario() -> list[object]:
            first = engine.generate(TokenPrompt(tuple(ids)), SamplingParams(temperature=0, max_tokens=200))
            got = [await anext(first) for _ in range(3)]
            queued = asyncio.create_task(collect(engine, ids, SamplingParams(temperature=0, max_tokens=5)))
            await asyncio.sleep(0.05)
            assert not queued.done()
            with pytest.raises(QueueFullError):
                await collect(engine, ids, GREEDY)
            await first.aclose()  # type: ignore[attr-defined]
            return [got, await asyncio.wait_for(queued, timeout=5)]

        got, second = run(scenario())
        assert len(got) == 3 and second[-1].num_output_tokens == 5  # type: ignore[index, arg-type]
        assert engine.load().num_running == 0 and engine.load().num_waiting == 0
    finally:
        engine.shutdown()


def test_logprobs_carry_token_text(fake: LocalEngine) -> None:
    out = run(collect(fake, tokenize(fake, "hi"), SamplingParams(temperature=0, max_tokens=4, logprobs=3)))
    for d in out:
        lp = d.logprobs
        assert lp is not None and lp.chosen.token_id == d.token_ids[0] and lp.chosen.text == d.text
        assert [t.token_id for t in lp.top][0] == lp.chosen.token_id and len(lp.top) == 3


def test_executor_death_fails_running_requests_keeps_waiting_ones_and_restarts() -> None:
    """The fake in a child process, killed mid-step: the engine stays up and serves again."""
    spec = FakeSpec(num_slots=2, step_delay_s=0.01)
    engine = build_fake_engine(EngineConfig(ctx=256, parallel=2, batch_tokens=64), spec, in_process=False)
    try:
        ids = prompts(engine, 4)
        pid = engine.health().executor_pid
        assert pid is not None and pid != os.getpid()

        async def scenario() -> list[object]:
            long = SamplingParams(temperature=0, max_tokens=150)
            tasks = [asyncio.create_task(collect(engine, i, long)) for i in ids]  # 2 run, 2 wait
            while engine.load().num_running < 2 or engine.stats().steps < 5:
                await asyncio.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)

        before = time.monotonic()
        results = run(scenario())
        failed = [r for r in results if isinstance(r, EngineUnavailableError)]
        done = [r for r in results if isinstance(r, list)]
        assert len(failed) == 2 and len(done) == 2, results
        assert all(d[-1].num_output_tokens == 150 and (d[-1].energy_j or 0) > 0 for d in done)  # type: ignore[index]
        health = engine.health()
        assert health.ready and health.restarts == 1 and health.executor_pid not in (None, pid)
        assert time.monotonic() - before < 30
        assert run(collect(engine, ids[0], GREEDY))[-1].num_output_tokens == 12
        totals = engine.stats().energy
        assert totals.attributed_j + totals.idle_j == pytest.approx(totals.total_j) and totals.attributed_j > 0
    finally:
        engine.shutdown()


def test_a_continuation_replays_what_was_sent_and_streams_only_the_rest(fake: LocalEngine) -> None:
    ids = tokenize(fake, "continue me")
    full = run(collect(fake, ids, SamplingParams(temperature=0, max_tokens=30)))
    sent = tokens_of(full)[:11]

    rest = run(resume_with(fake, ids, sent, 30))
    assert tokens_of(rest) == tokens_of(full)[11:]  # type: ignore[arg-type]
    assert text_of(rest) == text_of(full)[11:]  # type: ignore[arg-type]
    assert rest[-1].num_output_tokens == 30 and rest[-1].num_prompt_tokens == len(ids)  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequestError, match="leaves nothing to generate") as info:
        run(resume_with(fake, ids, sent, 11))
    assert info.value.param == "max_tokens"


async def resume_with(engine: LocalEngine, ids: list[int], sent: list[int], max_tokens: int) -> list[object]:
    prompt = TokenPrompt(tuple(ids), generated_ids=tuple(sent))
    return [d async for d in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))]
