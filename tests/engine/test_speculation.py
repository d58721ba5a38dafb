"""Speculative decoding without weights: prompt lookup, the draft-length policy, the scheduler's grants, and the
engine on the fake executor (which verifies drafts as llama.cpp's executor does and checks every position
against its per-sequence "KV", so a token accounted twice or a draft's KV left behind breaks the next step)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from qanat.build import build_fake_engine
from qanat.config import ConfigError, EngineConfig
from qanat.engine.client import FinishReason
from qanat.engine.core.request import Request, RequestState
from qanat.engine.core.scheduler import Scheduler
from qanat.engine.core.speculation import (
    MATCH_MAX,
    STEP_FIXED_COST_TOKENS,
    SpeculationConfig,
    Speculator,
    StepCostFit,
    SuffixIndex,
    bucket_of,
)
from qanat.engine.executors.base import PassCost
from qanat.engine.executors.fake import FakeExecutor, FakeSpec
from qanat.engine.local import LocalEngine
from qanat.engine.sampling import SamplingParams
from tests.helpers import collect, collect_together, run, text_of, tokenize, tokens_of

CONFIG = EngineConfig(ctx=512, parallel=4, batch_tokens=128, max_waiting=8)


def engine_with(mode: str, **kwargs: int) -> LocalEngine:
    return build_fake_engine(EngineConfig(ctx=512, parallel=4, batch_tokens=128, max_waiting=8, speculative=mode,
                                          **kwargs))


def draft_engine(draft_min: int = 4, draft_max: int = 4, miss_every: int = 0, cost: float = 0.0) -> LocalEngine:
    """`--speculative draft` on the fake executor, which drafts with itself (see FakeSpec.draft_miss_every)."""
    config = EngineConfig(ctx=512, parallel=4, batch_tokens=128, max_waiting=8, speculative="draft",
                          draft_model="default", draft_min=draft_min, draft_max=draft_max)
    return build_fake_engine(config, FakeSpec(num_slots=4, context_length=512, batch_tokens=128,
                                              draft_miss_every=miss_every, draft_cost=cost))


@pytest.fixture()
def engines() -> Iterator[tuple[LocalEngine, LocalEngine]]:
    off, on = engine_with("off"), engine_with("ngram")
    yield off, on
    off.shutdown()
    on.shutdown()


def executor(engine: LocalEngine) -> FakeExecutor:
    fake = engine.core.executor
    assert isinstance(fake, FakeExecutor)
    return fake


def repetitive_prompt(engine: LocalEngine, seed_text: str) -> list[int]:
    """A prompt whose greedy continuation it already contains: the fake's logits depend on the last 4 tokens, so
    after `P + G + P` (G = P's greedy output) the model says G again, and prompt lookup finds it."""
    prompt = tokenize(engine, seed_text)
    greedy = tokens_of(run(collect(engine, prompt, SamplingParams(temperature=0, max_tokens=60))))
    return prompt + greedy + prompt[1:]


# -- prompt lookup -----------------------------------------------------------------------------------------

def test_prompt_lookup_continues_the_longest_match_and_the_latest_of_equals() -> None:
    index = SuffixIndex(2)
    tokens = [1, 2, 3, 4, 9, 9, 2, 3, 5, 6, 7, 1, 2, 3]
    index.extend(tokens)
    # "1 2 3" matched 3 tokens back at the start, followed by 4 9 9; "2 3" alone would point at "5 6".
    assert index.draft(tokens, 3) == ([4, 9, 9], 3)
    assert index.draft(tokens, 11)[0] == [4, 9, 9, 2, 3, 5, 6, 7, 1, 2, 3]
    assert index.draft([*tokens, 42], 3) == ([], 0)  # "3 42" never occurred
    # Two equally long matches: the latest wins.
    equal = [7, 8, 1, 9, 8, 1, 5, 8, 1]
    index = SuffixIndex(2)
    index.extend(equal)
    assert index.draft(equal, 1) == ([5], 2)


def test_a_match_is_measured_up_to_match_max_and_a_loop_is_drafted_round_and_round() -> None:
    period = list(range(100, 140))  # longer than MATCH_MAX
    tokens = period * 2 + period[:5]
    index = SuffixIndex(2)
    index.extend(tokens)
    assert index.draft(tokens, 4) == (period[5:9], MATCH_MAX)
    loop = [5, 6, 7, 5, 6, 7, 5, 6]
    index = SuffixIndex(2)
    index.extend(loop)
    assert index.draft(loop, 7) == ([7, 5, 6, 7, 5, 6, 7], 5)  # past the end of the list, the loop goes on


def test_one_token_matches_only_from_ngram_min_1() -> None:
    tokens = [4, 5, 6, 9, 5]
    strict, loose = SuffixIndex(2), SuffixIndex(1)
    strict.extend(tokens)
    loose.extend(tokens)
    assert strict.draft(tokens, 2) == ([], 0)
    assert loose.draft(tokens, 2) == ([6, 9], 1)
    longer = SuffixIndex(3)  # --ngram-min 3: a two-token match is not enough
    longer.extend([1, 2, 3, 1, 2])
    assert longer.draft([1, 2, 3, 1, 2], 2) == ([], 0)


def test_prompt_lookup_grown_step_by_step_equals_built_at_once() -> None:
    tokens = [5, 6, 7, 5, 6, 8, 5, 6, 7, 9, 5, 6, 7]
    grown = SuffixIndex(2)
    for n in range(1, len(tokens) + 1):
        grown.extend(tokens[:n])
    whole = SuffixIndex(2)
    whole.extend(tokens)
    assert grown.draft(tokens, 4) == whole.draft(tokens, 4) == ([9, 5, 6, 7], 3)


# -- how many tokens to draft ------------------------------------------------------------------------------

def geometric(alpha: float, longest: int = 16) -> list[float]:
    """A draft's chances when each token is kept with chance α: α, α², …"""
    return [alpha ** j for j in range(1, longest + 1)]


def decoding_request(rid: str, tokens: list[int], max_tokens: int = 100) -> Request:
    request = Request(rid, tokens[:-1], SamplingParams(temperature=0), max_tokens)
    request.output_ids = tokens[-1:]
    request.state = RequestState.DECODING
    return request


def confident(speculator: Speculator, request: Request) -> None:
    """Eight drafts of 8 kept in full, for the n-gram length its next draft matches."""
    speculator.propose([request], 1, 1)
    for _ in range(8):
        speculator.record(request.request_id, 8, 8)


def test_a_lone_confident_stream_drafts_long_a_crowded_batch_hardly_and_a_doubtful_one_not_at_all() -> None:
    cycle = list(range(10, 30))
    speculator = Speculator(SpeculationConfig(mode="ngram", draft_max=16))
    lone = decoding_request("lone", cycle * 3)
    confident(speculator, lone)
    alone = speculator.propose([lone], 1, 100)["lone"]
    assert 8 <= len(alone) <= 16 and alone == (cycle * 2)[:len(alone)]
    # Drafts that keep failing: acceptance falls, drafts shrink, and the request stops drafting.
    lengths = []
    for _ in range(16):
        speculator.record("lone", 2, 0)
        lengths.append(len(speculator.propose([lone], 1, 100).get("lone", [])))
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > 1 and lengths[-1] == 0

    # 16 streams decoding: each token must be nearly sure to pay for itself, so drafts are shorter.
    crowd = [decoding_request(f"r{i}", [1000 * i + t for t in cycle] * 3) for i in range(16)]
    for r in crowd:
        confident(speculator, r)
    crowded = speculator.propose(crowd, 16, 100)
    assert max(len(d) for d in crowded.values()) < len(alone)
    assert sum(len(d) for d in crowded.values()) <= 100



def test_a_longer_match_is_trusted_further_and_the_server_learns_what_its_requests_keep() -> None:
    assert [bucket_of(m) for m in (1, 2, 3, 4, 5, 6, 9, 10, MATCH_MAX)] == [0, 1, 2, 3, 4, 4, 5, 6, 8]
    speculator = Speculator(SpeculationConfig(mode="ngram", draft_max=16))
    text = list(range(100, 140))
    # The same last two tokens; one request matched 2 tokens back, the other the whole text.
    short = decoding_request("short", [*text, 7, *text[10:12]])
    long = decoding_request("long", [*text, *text[:12]])
    drafts = speculator.propose([short], 1, 100), speculator.propose([long], 1, 100)
    assert 0 <= len(drafts[0].get("short", [])) < len(drafts[1]["long"])
    # A server whose requests' long matches were kept lets a new request draft longer from its first step.
    before = len(speculator.propose([decoding_request("new", [*text, *text[:12]])], 1, 100)["new"])
    for i in range(8):
        request = decoding_request(f"seen{i}", [*text, *text[:12]])
        speculator.propose([request], 1, 100)
        speculator.record(request.request_id, 16, 16)
        speculator.forget(request.request_id)
    after = len(speculator.propose([decoding_request("next", [*text, *text[:12]])], 1, 100)["next"])
    assert before < after


def test_after_rejections_a_request_pauses_then_tries_again_later_and_later() -> None:
    speculator = Speculator(SpeculationConfig(mode="ngram"))
    request = decoding_request("r", list(range(10, 30)) * 3)

    def steps_until_it_drafts() -> int:
        for step in range(1, 100):
            if speculator.propose([request], 1, 100):
                return step
        return 100

    assert steps_until_it_drafts() == 1  # the prior: a 32-token match is worth a try
    pauses = []
    for _ in range(3):
        speculator.record("r", 1, 0)
        pauses.append(steps_until_it_drafts())
    # One rejection after a long match is not enough to stop; the next ones are, for longer each time.
    assert pauses[0] == 1 and 5 < pauses[1] < pauses[2] < 100


def test_no_drafts_in_a_step_full_of_prompt_nor_past_max_tokens_nor_when_the_request_opts_out() -> None:
    cycle = list(range(10, 30))
    speculator = Speculator(SpeculationConfig(mode="ngram", draft_max=16))
    request = decoding_request("r", cycle * 3, max_tokens=4)
    confident(speculator, request)
    assert speculator.propose([request], 300, 200) == {}  # a 300-token step: drafts cost more than they bring
    drafts = speculator.propose([request], 1, 100)
    assert len(drafts["r"]) == 2  # 4 - 1 output - 1: every token a verification can yield fits max_tokens
    shy = Request("shy", cycle * 3, SamplingParams(temperature=0, speculative=False), 50)
    shy.output_ids, shy.state = [10], RequestState.DECODING
    assert speculator.propose([shy], 1, 100) == {}


def test_scheduler_grants_drafts_after_real_tokens_and_counts_kept_ones_as_computed() -> None:
    speculator = Speculator(SpeculationConfig(mode="ngram", draft_max=4))
    sched = Scheduler(num_slots=2, context_length=256, max_batch_tokens=64, speculator=speculator)
    cycle = list(range(10, 20))
    request = Request("r", cycle * 3, SamplingParams(temperature=0), 40)
    sched.add(request)
    plan = sched.schedule()
    assert [(c.start_pos, len(c.token_ids), c.draft_ids) for c in plan.chunks] == [(0, 30, ())]
    sched.update(plan, {"r": 10})  # the prompt's next token, as the cycle goes on
    confident(speculator, request)
    plan = sched.schedule()
    (chunk,) = plan.chunks
    assert (chunk.start_pos, chunk.token_ids, chunk.draft_ids) == (30, [10], (11, 12, 13, 14))
    assert plan.num_tokens == 5
    # Verification kept drafts 11 and 12 and sampled 99 after them: output 11, 12, 99.
    sched.update(plan, {"r": 11})
    for token in (12, 99):
        assert not sched.append_verified(request, token, False).finished
    assert request.output_ids == [10, 11, 12, 99]
    assert request.num_computed_tokens == request.num_tokens - 1 == 33
    assert sched.slots[request.slot or 0].token_ids == request.all_token_ids[:-1]


# -- the engine on the fake executor ---------------------------------------------------------------------

def test_greedy_output_is_the_same_with_and_without_speculation(engines: tuple[LocalEngine, LocalEngine]) -> None:
    off, on = engines
    prompts = [repetitive_prompt(off, f"copy this text number {i} please") for i in range(4)]
    prompts += [tokenize(off, f"an open question {i}") for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=48)
    assert [tokens_of(run(collect(on, p, params))) for p in prompts] == \
        [tokens_of(run(collect(off, p, params))) for p in prompts]
    stats = on.stats()
    assert executor(on).drafted_tokens > 0 and stats.spec_draft_tokens == executor(on).drafted_tokens
    assert stats.spec_accepted_tokens > 0.8 * stats.spec_draft_tokens  # the repeated outputs are found
    assert stats.steps < off.stats().steps  # several tokens per step
    assert off.stats().spec_draft_tokens == 0


def test_stop_strings_stop_tokens_max_tokens_and_logprobs_cut_where_they_would(
        engines: tuple[LocalEngine, LocalEngine]) -> None:
    off, on = engines
    prompt = repetitive_prompt(off, "the quick brown fox")
    full = text_of(run(collect(off, prompt, SamplingParams(temperature=0, max_tokens=60))))
    cases = [
        SamplingParams(temperature=0, max_tokens=60, stop=(full[20:23],)),
        SamplingParams(temperature=0, max_tokens=60, stop_token_ids=(tokens_of(run(collect(
            off, prompt, SamplingParams(temperature=0, max_tokens=60))))[17],)),
        SamplingParams(temperature=0, max_tokens=13),
        SamplingParams(temperature=0, max_tokens=30, logprobs=2),
    ]
    for params in cases:
        want, got = run(collect(off, prompt, params)), run(collect(on, prompt, params))
        assert tokens_of(got) == tokens_of(want) and text_of(got) == text_of(want)
        assert got[-1].finish_reason == want[-1].finish_reason
        assert got[-1].num_output_tokens == want[-1].num_output_tokens
        assert [d.logprobs for d in got if d.token_ids] == [d.logprobs for d in want if d.token_ids]
    assert run(collect(on, prompt, cases[0]))[-1].finish_reason is FinishReason.STOP
    assert on.stats().spec_accepted_tokens > 0


def test_seeded_sampling_draws_the_same_tokens_with_and_without_speculation(
        engines: tuple[LocalEngine, LocalEngine]) -> None:
    # Each position is sampled by the request's own sampler, one draw per output token, in order: the random
    # stream is consumed exactly as without drafts.
    off, on = engines
    prompt = repetitive_prompt(off, "sampled but repetitive")
    params = SamplingParams(temperature=0.3, seed=7, max_tokens=40)
    assert tokens_of(run(collect(on, prompt, params))) == tokens_of(run(collect(off, prompt, params)))


def test_concurrent_requests_with_speculation_match_their_solo_runs(engines: tuple[LocalEngine, LocalEngine]) -> None:
    off, on = engines
    prompts = [repetitive_prompt(off, f"doc {i} to be rewritten") for i in range(6)]  # 6 requests, 4 slots
    # Different lengths, so the batch thins out and the last ones draft (a full batch leaves little to gain).
    params = [SamplingParams(temperature=0, max_tokens=20 + 8 * i) for i in range(6)]
    alone = [tokens_of(run(collect(off, p, q))) for p, q in zip(prompts, params, strict=True)]
    together = collect_together(on, list(zip(prompts, params, strict=True)))
    assert [tokens_of(r) for r in together] == alone
    assert on.stats().spec_accepted_tokens > 0


def test_a_request_can_opt_out() -> None:
    on = engine_with("ngram")
    try:
        prompt = repetitive_prompt(on, "leave me alone")
        before = executor(on).drafted_tokens
        run(collect(on, prompt, SamplingParams(temperature=0, max_tokens=40, speculative=False)))
        assert executor(on).drafted_tokens == before
        run(collect(on, prompt, SamplingParams(temperature=0, max_tokens=40)))
        assert executor(on).drafted_tokens > before
    finally:
        on.shutdown()


def test_the_step_cost_fit_starts_from_the_load_time_measurement_and_follows_the_steps() -> None:
    assert StepCostFit(1.75).fixed_cost_tokens == 1.75  # nothing measured: F as configured, for good
    unmeasured = StepCostFit(1.75)
    unmeasured.observe(4, 0.05)
    assert unmeasured.fixed_cost_tokens == 1.75
    fit = StepCostFit(1.75, PassCost(0.010, 0.010, 0.020))  # measured at load: F = 1
    assert fit.fixed_cost_tokens == pytest.approx(1.0)
    for _ in range(50):
        fit.observe(1, 0.020)  # one size only: consistent with the prior, which keeps F
    assert fit.fixed_cost_tokens == pytest.approx(1.0, rel=0.05)
    for i in range(300):  # the engine's steps: 12 ms + 8 ms per token, ±5 % noise: F = 1.5
        n = 1 + i % 9
        fit.observe(n, (0.012 + 0.008 * n) * (1 + 0.05 * ((i * 7919) % 11 - 5) / 5))
    assert fit.fixed_cost_tokens == pytest.approx(1.5, rel=0.15)
    gpu = StepCostFit(1.75, PassCost(0.020, 0.0005, 0.0205))  # a chip whose pass is memory-bound: F = 40
    for i in range(300):
        gpu.observe(1 + i % 9, (0.020 + 0.0005 * (1 + i % 9)) * (1 + 0.05 * ((i * 7919) % 11 - 5) / 5))
    assert gpu.fixed_cost_tokens > 20


def test_stalls_and_noise_never_drive_f_to_nothing() -> None:
    fit = StepCostFit(1.75, PassCost(0.010, 0.010, 0.020))
    for i in range(400):  # one-token steps stalled ten times over now and then, drafted steps quick
        n = 1 if i % 2 else 6
        fit.observe(n, 0.2 if n == 1 and i % 10 == 1 else 0.010 + 0.012 * n)
    assert fit.fixed_cost_tokens >= StepCostFit.FLOOR
    for _ in range(400):  # then a long run of lone decodes only: F stays where the evidence left it
        fit.observe(1, 0.022)
    assert StepCostFit.FLOOR <= fit.fixed_cost_tokens < 5



def test_a_lone_tokens_step_below_the_line_is_learnt_apart_from_it() -> None:
    # ggml's AMX matmul, measured (bench/verify_cost.py): 12.6 ms for one token, 20.7 for two, 32.6 for eight.
    fit = StepCostFit(1.75, PassCost(0.0168, 0.00198, 0.0126))
    assert fit.fixed_cost_tokens == pytest.approx(8.5, rel=0.01)
    assert fit.one_token_tokens == pytest.approx(6.36, rel=0.01)
    for _ in range(300):  # the machine slows lone steps down: 16 ms, and drafted steps keep the line
        fit.observe(1, 0.016)
        fit.observe(5, 0.0168 + 0.00198 * 5)
    assert fit.fixed_cost_tokens == pytest.approx(8.5, rel=0.02)
    assert fit.one_token_tokens == pytest.approx(0.016 / 0.00198, rel=0.1)
    for _ in range(300):  # never above the line: a lone step costs at most what the line says
        fit.observe(1, 0.05)
    assert fit.one_token_tokens == pytest.approx(fit.fixed_cost_tokens + 1)


def test_a_lone_stream_weighs_the_first_draft_tokens_move_off_the_one_token_kernel() -> None:
    speculator = Speculator(SpeculationConfig(mode="ngram", pass_cost_s=PassCost(0.0168, 0.00198, 0.0126)))
    # A one-token draft kept half the time would pay on the line (1.5 / 10.5 > 1 / 9.5), not from 6.4 units.
    assert speculator.choose_lengths([("r", [0.5])], 1, 100) == {}
    # A long likely draft pays for the move: all of it is taken, though its first token alone would not pay.
    assert speculator.choose_lengths([("r", geometric(0.9)[:8])], 1, 100) == {"r": 8}
    assert speculator.choose_lengths([("r", geometric(0.9)[:1])], 1, 100) == {"r": 1}  # 1.9 / 10.5 > 1 / 6.4
    # Beside another decode the step has left the one-token kernel already: the half-kept token pays.
    assert speculator.choose_lengths([("a", [0.5]), ("b", [])], 2, 100) == {"a": 1}


def test_an_engine_learns_f_from_its_decode_steps() -> None:
    engine = engine_with("ngram")
    try:
        speculator = engine.core.scheduler.speculator
        assert speculator is not None
        observed: list[tuple[int, float]] = []
        real_observe = speculator.step_cost.observe
        speculator.step_cost.observe = lambda n, s: (observed.append((n, s)), real_observe(n, s))  # type: ignore[method-assign]
        prompt = repetitive_prompt(engine, "learn the cost of a step")
        run(collect(engine, prompt, SamplingParams(temperature=0, max_tokens=40)))
        assert observed and all(s > 0 for _, s in observed)
        assert max(n for n, _ in observed) > 1  # steps that verified drafts are observed too
    finally:
        engine.shutdown()


# -- a draft model's cost ---------------------------------------------------------------------------------

def lone_stream_best_length(alpha: float, draft_cost: float, longest: int) -> int:
    """The draft length that maximises a lone stream's useful tokens per unit of time, by brute force: a step
    with L drafts yields 1 + α + … + α^L tokens and costs F + 1 + L target tokens plus L draft passes of one
    token, r·(F + 1) each."""
    f = STEP_FIXED_COST_TOKENS

    def rate(length: int) -> float:
        return sum(alpha ** j for j in range(length + 1)) / (f + 1 + length + draft_cost * length * (f + 1))

    return max(range(longest + 1), key=rate)


@pytest.mark.parametrize("draft_cost", [0.0, 0.05, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95])
def test_a_lone_streams_draft_length_is_the_one_that_pays_best_given_the_drafts_cost(
        alpha: float, draft_cost: float) -> None:
    speculator = Speculator(SpeculationConfig(mode="draft", draft_max=16, draft_cost=draft_cost))
    chosen = speculator.choose_lengths([("r", geometric(alpha))], 1, 100).get("r", 0)
    assert chosen == lone_stream_best_length(alpha, draft_cost, 16)


def test_a_model_drafting_for_itself_never_pays_a_cheap_one_does_and_n_grams_are_the_zero_cost_case() -> None:
    request = decoding_request("r", list(range(10, 30)) * 3)
    costly = Speculator(SpeculationConfig(mode="draft", draft_cost=1.0))
    cheap = Speculator(SpeculationConfig(mode="draft", draft_cost=0.1))
    free = Speculator(SpeculationConfig(mode="draft", draft_cost=0.0))
    for speculator in (costly, cheap, free):
        speculator.propose_lengths([request], 1, 100)
        for _ in range(8):
            speculator.record("r", 8, 8)  # as sure as it gets: α = 0.99
    assert costly.propose_lengths([request], 1, 100) == {}
    assert 0 < cheap.propose_lengths([request], 1, 100)["r"] < free.propose_lengths([request], 1, 100)["r"]
    # With no cost, a draft model's lengths are the n-gram rule's, for the same acceptance.
    ngram = Speculator(SpeculationConfig(mode="ngram"))
    confident(ngram, request)
    assert len(ngram.propose([request], 1, 100)["r"]) == free.propose_lengths([request], 1, 100)["r"]


def test_a_draft_position_is_opened_when_the_requests_drafting_there_pay_for_it_together() -> None:
    # r = 0.3, two streams at α = 0.9: one first draft token alone would not pay for a new draft pass
    # (p = 0.9 < U·Δ / D = 2 · (1 + 0.3 · 2.75) / 3.75 ≈ 0.97), but both streams sharing that pass do.
    speculator = Speculator(SpeculationConfig(mode="draft", draft_cost=0.3))
    assert 0.9 < 2 * (1 + 0.3 * 2.75) / 3.75
    assert speculator.choose_lengths([("a", geometric(0.9)), ("b", geometric(0.9))], 2, 100) == {"a": 1, "b": 1}
    # A doubtful companion is left out, and then the confident stream's pass no longer pays either.
    assert speculator.choose_lengths([("a", geometric(0.9)), ("b", geometric(0.6))], 2, 100) == {}
    # Alone, with only its own decode in the step, the same stream drafts 2.
    assert speculator.choose_lengths([("a", geometric(0.9))], 1, 100) == {"a": 2}


def test_draft_min_forces_the_length_even_where_it_does_not_pay_within_max_tokens_and_the_budget() -> None:
    speculator = Speculator(SpeculationConfig(mode="draft", draft_cost=1.0, draft_min=4, draft_max=4))
    requests = [decoding_request(f"r{i}", [1, 2, 3], max_tokens=m) for i, m in enumerate((50, 3))]
    assert speculator.propose_lengths(requests, 2, 100) == {"r0": 4, "r1": 1}  # r1: 3 - 1 output - 1
    assert speculator.propose_lengths(requests, 2, 3) == {"r0": 3}  # the step's budget comes first
    shy = Request("shy", [1, 2], SamplingParams(temperature=0, speculative=False), 50)
    shy.output_ids, shy.state = [3], RequestState.DECODING
    assert speculator.propose_lengths([shy], 1, 100) == {}


def test_scheduler_grants_a_draft_length_in_draft_mode_and_counts_it_in_the_step() -> None:
    speculator = Speculator(SpeculationConfig(mode="draft", draft_min=3, draft_max=3))
    sched = Scheduler(num_slots=2, context_length=256, max_batch_tokens=64, speculator=speculator)
    request = Request("r", list(range(10, 40)), SamplingParams(temperature=0), 40)
    sched.add(request)
    sched.update(sched.schedule(), {"r": 7})
    plan = sched.schedule()
    (chunk,) = plan.chunks
    assert (chunk.token_ids, chunk.draft_ids, chunk.draft_len, plan.num_tokens) == ([7], (), 3, 4)


# -- the draft source on the fake executor ------------------------------------------------------------------

def test_draft_mode_greedy_output_equals_speculation_off_and_a_self_draft_is_always_kept() -> None:
    off, on = engine_with("off"), draft_engine()
    try:
        prompts = [tokenize(off, f"an open question {i}") for i in range(4)]
        params = SamplingParams(temperature=0, max_tokens=41)
        assert [tokens_of(run(collect(on, p, params))) for p in prompts] == \
            [tokens_of(run(collect(off, p, params))) for p in prompts]
        stats = on.stats()
        # Every decode step but the last ones (max_tokens leaves no room) drafts 4 tokens, all kept.
        assert stats.spec_draft_tokens == executor(on).drafted_tokens > 0
        assert stats.spec_accepted_tokens == stats.spec_draft_tokens
        assert stats.steps < off.stats().steps / 3
    finally:
        off.shutdown()
        on.shutdown()


def test_draft_mode_with_wrong_drafts_keeps_outputs_stops_and_logprobs_exact() -> None:
    off, on = engine_with("off"), draft_engine(miss_every=5)
    try:
        prompt = tokenize(off, "the quick brown fox")
        full = text_of(run(collect(off, prompt, SamplingParams(temperature=0, max_tokens=60))))
        cases = [
            SamplingParams(temperature=0, max_tokens=60),
            SamplingParams(temperature=0, max_tokens=60, stop=(full[20:23],)),
            SamplingParams(temperature=0, max_tokens=13),
            SamplingParams(temperature=0, max_tokens=30, logprobs=2),
            SamplingParams(temperature=0.8, max_tokens=40, seed=3),
        ]
        for params in cases:
            want, got = run(collect(off, prompt, params)), run(collect(on, prompt, params))
            assert tokens_of(got) == tokens_of(want) and text_of(got) == text_of(want)
            assert got[-1].finish_reason == want[-1].finish_reason
            assert [d.logprobs for d in got if d.token_ids] == [d.logprobs for d in want if d.token_ids]
        stats = on.stats()
        assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # every fifth position's draft is wrong
    finally:
        off.shutdown()
        on.shutdown()


def test_concurrent_draft_mode_requests_match_their_solo_runs() -> None:
    off, on = engine_with("off"), draft_engine(miss_every=7)
    try:
        prompts = [tokenize(off, f"doc {i} to be drafted") for i in range(6)]  # 6 requests, 4 slots
        params = [SamplingParams(temperature=0, max_tokens=20 + 8 * i) for i in range(6)]
        alone = [tokens_of(run(collect(off, p, q))) for p, q in zip(prompts, params, strict=True)]
        together = collect_together(on, list(zip(prompts, params, strict=True)))
        assert [tokens_of(r) for r in together] == alone
        assert on.stats().spec_accepted_tokens > 0
    finally:
        off.shutdown()
        on.shutdown()


def test_config_refuses_unknown_modes() -> None:
    with pytest.raises(ConfigError, match="--speculative must be one of"):
        EngineConfig(speculative="medusa")
    with pytest.raises(ConfigError, match="--draft-max"):
        EngineConfig(speculative="ngram", draft_max=0)


def test_deterministic_mode_verifies_drafts_in_its_decode_steps_and_keeps_its_outputs() -> None:
    # The fake executor verifies exactly, as llama.cpp without tinyBLAS does: deterministic mode may speculate.
    config = EngineConfig(ctx=512, parallel=4, batch_tokens=128, max_waiting=8, deterministic=True, flash_attn="off")
    off, on = build_fake_engine(config), build_fake_engine(replace(config, speculative="ngram"))
    try:
        prompts = [repetitive_prompt(off, f"deterministic {i}") for i in range(3)]
        params = SamplingParams(temperature=0, max_tokens=40)
        alone = [text_of(run(collect(off, p, params))) for p in prompts]
        assert [text_of(o) for o in collect_together(on, [(p, params) for p in prompts])] == alone
        assert on.stats().spec_accepted_tokens > 0
    finally:
        off.shutdown()
        on.shutdown()


def test_config_needs_a_draft_model_for_draft_mode_and_draft_mode_for_a_draft_model() -> None:
    with pytest.raises(ConfigError, match="--speculative draft needs --draft-model"):
        EngineConfig(speculative="draft")
    with pytest.raises(ConfigError, match="--draft-model small.gguf is only used with --speculative draft"):
        EngineConfig(speculative="ngram", draft_model="small.gguf")
    with pytest.raises(ConfigError, match="--draft-model small.gguf is only used"):
        EngineConfig(draft_model="small.gguf")
    with pytest.raises(ConfigError, match="--draft-min must be between 0 and --draft-max \\(4\\), got 5"):
        EngineConfig(speculative="draft", draft_model="default", draft_min=5, draft_max=4)
    assert EngineConfig(speculative="draft", draft_model="default", draft_min=4, draft_max=4).draft_min == 4
