"""The scheduling policy alone: no model, hand-written sampled tokens, exact token grants."""

from __future__ import annotations

import pytest

from qanat.engine.client import FinishReason
from qanat.engine.core.request import Request, RequestState
from qanat.engine.core.scheduler import MIN_PREFIX_COPY_TOKENS, Scheduler
from qanat.engine.executors.base import CacheOp
from qanat.engine.sampling import SamplingParams

EOS = 0


def make_request(rid: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0), max_tokens, eog_ids=frozenset({EOS}))


def grants(plan) -> dict[str, tuple[int, int, bool]]:
    """request id -> (start position, number of tokens, samples this step)."""
    return {c.request.request_id: (c.start_pos, len(c.token_ids), c.needs_logits) for c in plan.chunks}


def run_step(sched: Scheduler, token: int = 7):
    plan = sched.schedule()
    sampled = {c.request.request_id: token for c in plan.chunks if c.needs_logits}
    return plan, sched.update(plan, sampled)


def test_chunked_prefill_keeps_decodes_running() -> None:
    sched = Scheduler(num_slots=4, context_length=1024, max_batch_tokens=64)
    short = make_request("short", list(range(1, 11)), max_tokens=10)
    sched.add(short)
    plan, _ = run_step(sched)
    assert grants(plan) == {"short": (0, 10, True)}

    long = make_request("long", list(range(100, 250)))  # 150 tokens, budget 64
    sched.add(long)
    plan, _ = run_step(sched)
    assert grants(plan) == {"short": (10, 1, True), "long": (0, 63, False)}
    plan, _ = run_step(sched)
    assert grants(plan) == {"short": (11, 1, True), "long": (63, 63, False)}
    plan, _ = run_step(sched)
    assert grants(plan) == {"short": (12, 1, True), "long": (126, 24, True)}
    plan, _ = run_step(sched)
    assert grants(plan) == {"short": (13, 1, True), "long": (150, 1, True)}
    assert long.num_computed_tokens == 151 and long.output_ids == [7, 7]


def test_budget_never_exceeded_and_prompt_tokens_in_order() -> None:
    sched = Scheduler(num_slots=3, context_length=4096, max_batch_tokens=50)
    prompts = {f"r{i}": list(range(i * 1000, i * 1000 + 70 + i)) for i in range(3)}
    for rid, prompt in prompts.items():
        sched.add(make_request(rid, prompt, max_tokens=3))
    seen: dict[str, list[int]] = {rid: [] for rid in prompts}
    while sched.has_work:
        plan, _ = run_step(sched)
        assert plan.num_tokens <= 50
        for c in plan.chunks:
            seen[c.request.request_id] += c.token_ids
    for rid, prompt in prompts.items():
        assert seen[rid] == prompt + [7, 7]  # the prompt, then each sampled token but the last


def test_admission_waits_for_a_free_slot() -> None:
    sched = Scheduler(num_slots=2, context_length=256, max_batch_tokens=64)
    reqs = [make_request(f"r{i}", [i + 1] * 5, max_tokens=2) for i in range(3)]
    for r in reqs:
        sched.add(r)
    plan, _ = run_step(sched)
    assert set(grants(plan)) == {"r0", "r1"}
    assert reqs[2].state is RequestState.WAITING and len(sched.waiting) == 1
    plan, outs = run_step(sched)  # r0, r1 reach max_tokens=2 and free their slots
    assert all(o.finished for o in outs) and reqs[0].finish_reason is FinishReason.LENGTH
    plan, _ = run_step(sched)
    assert grants(plan) == {"r2": (0, 5, True)}


def test_finish_and_cancel_free_the_slot_at_once() -> None:
    sched = Scheduler(num_slots=1, context_length=256, max_batch_tokens=64)
    first, second = make_request("a", [1, 2, 3], max_tokens=100), make_request("b", [4, 5, 6])
    sched.add(first)
    sched.add(second)
    run_step(sched)
    assert sched.num_free_slots == 0
    sched.finish(first, FinishReason.ABORT)
    assert sched.num_free_slots == 1 and first.finish_reason is FinishReason.ABORT
    plan, _ = run_step(sched)
    assert grants(plan) == {"b": (0, 3, True)}

    sched.finish(second, FinishReason.ABORT)
    waiting = make_request("c", [9, 9])
    sched.add(waiting)
    sched.finish(waiting, FinishReason.ABORT)  # cancelled while queued
    assert not sched.waiting and not sched.has_work


def test_eos_and_stop_token_ids_finish_unless_ignore_eos() -> None:
    sched = Scheduler(num_slots=3, context_length=256, max_batch_tokens=64)
    eos = make_request("eos", [1, 2])
    stop = Request("stop", [1, 2], SamplingParams(temperature=0, stop_token_ids=(7,)), 4)
    ignore = Request("ignore", [1, 2], SamplingParams(temperature=0, ignore_eos=True), 4,
                     eog_ids=frozenset({EOS}))
    for r in (eos, stop, ignore):
        sched.add(r)
    plan = sched.schedule()
    sched.update(plan, {"eos": EOS, "stop": 7, "ignore": EOS})
    assert eos.finish_reason is FinishReason.STOP and stop.finish_reason is FinishReason.STOP
    assert not ignore.is_finished


def test_prefix_reuse_in_place_after_finish() -> None:
    sched = Scheduler(num_slots=2, context_length=512, max_batch_tokens=256)
    system = list(range(1, 101))
    first = make_request("a", system + [500, 501], max_tokens=1)
    sched.add(first)
    run_step(sched)
    assert first.is_finished
    second = make_request("b", system + [600, 601, 602])
    sched.add(second)
    plan = sched.schedule()
    assert plan.cache_ops == [CacheOp(seq_id=0, keep=100, copy_from=None)]
    assert grants(plan) == {"b": (100, 3, True)}
    assert second.num_cached_tokens == 100


def test_prefix_copied_from_a_running_request() -> None:
    sched = Scheduler(num_slots=2, context_length=512, max_batch_tokens=256)
    system = list(range(1, 101))
    first = make_request("a", system + [500], max_tokens=50)
    sched.add(first)
    run_step(sched)
    second = make_request("b", system + [600, 601])
    sched.add(second)
    plan = sched.schedule()
    assert CacheOp(seq_id=1, keep=100, copy_from=0) in plan.cache_ops
    assert grants(plan)["b"] == (100, 2, True)


def test_new_requests_keep_running_seq_ids_consecutive() -> None:
    # llama.cpp runs one pass per run of consecutive seq ids: a hole left by a finished request is filled first.
    sched = Scheduler(num_slots=8, context_length=512, max_batch_tokens=256)
    x, y, z = (make_request(r, [i, i + 1], max_tokens=50) for r, i in (("x", 10), ("y", 20), ("z", 30)))
    for r in (x, y, z):
        sched.add(r)
    run_step(sched)
    assert [x.slot, y.slot, z.slot] == [0, 1, 2]
    sched.finish(y, FinishReason.STOP)
    w = make_request("w", [40, 41], max_tokens=50)
    sched.add(w)
    run_step(sched)
    assert w.slot == 1


def test_prefix_cached_away_from_the_running_block_is_copied_next_to_it() -> None:
    sched = Scheduler(num_slots=8, context_length=512, max_batch_tokens=256)
    system = list(range(1, 101))
    for rid, first in (("x", 500), ("y", 600)):
        sched.add(make_request(rid, [first, first + 1], max_tokens=50))
    run_step(sched)  # x and y run in slots 0 and 1
    sched.slots[5].token_ids = list(system)  # left there by an earlier request
    b = make_request("b", system + [700, 701])
    sched.add(b)
    plan = sched.schedule()
    assert CacheOp(seq_id=2, keep=100, copy_from=5) in plan.cache_ops
    assert grants(plan)["b"] == (100, 2, True)


def test_identical_prompts_wait_for_the_first_to_compute_the_prefix() -> None:
    sched = Scheduler(num_slots=3, context_length=512, max_batch_tokens=512)
    prompt = list(range(1, 201))
    reqs = [make_request(f"n{i}", prompt) for i in range(3)]
    for r in reqs:
        sched.add(r)
    plan, _ = run_step(sched)
    assert grants(plan) == {"n0": (0, 200, True)}  # the others wait one step, then copy
    plan, _ = run_step(sched)
    assert grants(plan) == {"n0": (200, 1, True), "n1": (199, 1, True), "n2": (199, 1, True)}
    assert [r.num_cached_tokens for r in reqs] == [0, 199, 199]
    assert {op.copy_from for op in plan.cache_ops} == {0}


def test_short_shared_prefix_is_recomputed_not_copied() -> None:
    sched = Scheduler(num_slots=2, context_length=512, max_batch_tokens=512)
    shared = list(range(1, MIN_PREFIX_COPY_TOKENS))  # one token short of worth copying
    a = make_request("a", shared + [900], max_tokens=50)
    sched.add(a)
    run_step(sched)
    b = make_request("b", shared + [901])
    sched.add(b)
    plan = sched.schedule()
    assert CacheOp(seq_id=1, keep=0, copy_from=None) in plan.cache_ops
    assert grants(plan)["b"] == (0, MIN_PREFIX_COPY_TOKENS, True)


def test_deterministic_mode_runs_prompt_chunks_alone_and_reuses_no_prefix() -> None:
    sched = Scheduler(num_slots=4, context_length=1024, max_batch_tokens=64, deterministic=True)
    system = list(range(1, 21))
    a = make_request("a", system, max_tokens=20)
    sched.add(a)
    assert grants(run_step(sched)[0]) == {"a": (0, 20, True)}
    b = make_request("b", system + list(range(100, 230)), max_tokens=20)  # 150 tokens, a's 20 first
    c = make_request("c", list(range(300, 310)), max_tokens=20)
    sched.add(b)
    sched.add(c)
    steps = [grants(run_step(sched)[0]) for _ in range(8)]
    # Decodes and prompt chunks take turns; a prompt chunk is alone in its step, cut at multiples of the budget.
    assert steps == [
        {"a": (20, 1, True)},
        {"b": (0, 64, False)},
        {"a": (21, 1, True)},
        {"b": (64, 64, False)},
        {"a": (22, 1, True)},
        {"b": (128, 22, True)},
        {"a": (23, 1, True), "b": (150, 1, True)},
        {"c": (0, 10, True)},
    ]
    assert b.num_cached_tokens == 0  # the mixed policy would have copied a's 20 tokens


def test_failed_request_drops_its_kv() -> None:
    sched = Scheduler(num_slots=1, context_length=256, max_batch_tokens=64)
    r = make_request("a", [1, 2, 3], max_tokens=10)
    sched.add(r)
    run_step(sched)
    sched.finish(r, FinishReason.ERROR)
    assert sched.slots[0].token_ids == []
    assert sched.schedule().cache_ops == [CacheOp(seq_id=0, keep=0)]


def test_budget_smaller_than_slots_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Scheduler(num_slots=8, context_length=256, max_batch_tokens=4)
