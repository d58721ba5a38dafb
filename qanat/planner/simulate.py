"""A closed loop of C clients against one engine, step by step: what `qanat bench` measures, predicted.

The analytic operating point (serving.py) treats prompts as a queue of deterministic jobs; an engine that
batches every waiting prompt into its next step (llama.cpp, qanat: decodes first, then prompt chunks from what
is left of the step's token budget, oldest first) does not queue them one by one, and in a closed loop a new
request arrives as another ends, at a step boundary, not at a random point of a step. Both change TTFT under
load by tens of percent (docs/planner.md, "Calibration on this machine"). This module runs that policy over the
same step model: each step's time is the roofline of what it carries (spread by the host's measured step-time
variation, when a calibration gives one), requests arrive when their client's previous one ends, output lengths
vary as the benchmark's do, and the first wave (C requests started together) is left out of the statistics as it
is from the measurement's. The statistics pool several replays: one replay's median TTFT is one draw of a
distribution that is often bimodal under load.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from dataclasses import dataclass, field

from qanat.planner.serving import Engine, Traffic
from qanat.planner.step import StepLoad


@dataclass
class _Request:
    client: int
    arrival: float
    prompt: int  # tokens to compute (after any cached prefix)
    output: int
    done_prompt: int = 0
    emitted: int = 0
    first_token: float | None = None
    times: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class SimulatedRun:
    ttft_s: float  # median over the requests after the first wave, pooled over the replays
    tpot_s: float  # median of each request's (last token - first token) / (tokens - 1), pooled likewise
    output_tps: float  # every request's output tokens over the run's duration, as `qanat bench` counts it; mean
    requests: int  # requests the medians are over (all replays)
    ttfts_s: tuple[float, ...] = field(default=(), repr=False)  # the pooled TTFTs the median is taken from, sorted


# Replays pooled per prediction. TTFT under load is often bimodal (a prompt rides in the step after it arrives, or,
# when the prompts pending with it exceed the step's token budget, in the one after), with near half the requests in
# each mode at some points; one replay of a benchmark-sized run then puts its median in either mode depending on the
# output lengths drawn. Pooling replays gives the median of the distribution instead of one draw of it.
REPLAYS = 16


def simulate_closed_loop(engine: Engine, traffic: Traffic, concurrency: int, *, batch_cap: int, chunk: int,
                         output_jitter: float = 0.0, requests: int | None = None, seed: int = 0,
                         turnaround_s: float = 1e-3, replays: int = REPLAYS) -> SimulatedRun:
    """Run `requests` (default 8 per client, at least 64) through the engine with `concurrency` clients that each
    send their next request the moment the last one ends; `replays` times, output lengths and step times (when
    `engine.eff.step_sigma` spreads them) drawn from seeds `seed`, `seed + 1`, ... (once when neither varies).
    TTFT and TPOT are medians over the pooled requests after each replay's first wave, as `qanat bench` takes them
    over one run's. `chunk`: tokens one step takes at most (decodes included, as llama.cpp's n_batch); `batch_cap`:
    sequences running at once; `turnaround_s`: from a request's last token leaving the engine to its client's next
    request reaching the scheduler (HTTP, chat template, tokenising): a request that arrives after the next step
    started waits for that step."""
    ttfts: list[float] = []
    tpots: list[float] = []
    rates: list[float] = []
    deterministic = output_jitter <= 0 and engine.eff.step_sigma <= 0  # then every replay is the same
    for k in range(1 if deterministic else max(1, replays)):
        steady, tps = _replay(engine, traffic, concurrency, batch_cap, chunk, output_jitter,
                              requests or max(64, 8 * concurrency), turnaround_s,
                              lengths=random.Random(seed + k), noise=random.Random(-1 - seed - k))
        ttfts += [r.first_token - r.arrival for r in steady if r.first_token is not None]
        tpots += [(r.times[-1] - r.times[0]) / (len(r.times) - 1) for r in steady if len(r.times) > 1]
        rates.append(tps)
    return SimulatedRun(statistics.median(ttfts), statistics.median(tpots) if tpots else 0.0,
                        statistics.fmean(rates), len(ttfts), tuple(sorted(ttfts)))


def _replay(engine: Engine, traffic: Traffic, concurrency: int, batch_cap: int, chunk: int, output_jitter: float,
            total: int, turnaround_s: float, *, lengths: random.Random,
            noise: random.Random) -> tuple[list[_Request], float]:
    """One benchmark run: (its requests after the first wave, output tokens/s over the run). Output lengths are
    drawn from `lengths`; each step's time is the model's times a lognormal factor of mean 1 and log-sigma
    `engine.eff.step_sigma`, drawn from `noise` (its own stream: the lengths stay those of the noiseless replay)."""
    sigma = engine.eff.step_sigma
    o = traffic.output_tokens
    p = traffic.computed_tokens
    context0 = traffic.input_tokens

    def output_length() -> int:
        if output_jitter <= 0:
            return o
        return max(1, round(o * lengths.uniform(1 - output_jitter, 1 + output_jitter)))

    now, sent = 0.0, 0
    waiting: deque[_Request] = deque()
    running: list[_Request] = []
    finished: list[_Request] = []
    for client in range(min(concurrency, total)):
        waiting.append(_Request(client, 0.0, p, output_length()))
        sent += 1
    while waiting or running:
        budget = max(1, chunk)
        decoders = [r for r in running if r.done_prompt >= r.prompt]
        budget -= len(decoders)
        prefills: list[tuple[_Request, int]] = []
        for r in running:
            if r.done_prompt < r.prompt and budget > 0:
                n = min(r.prompt - r.done_prompt, budget)
                prefills.append((r, n))
                budget -= n
        while waiting and budget > 0 and len(running) < batch_cap and waiting[0].arrival <= now:
            r = waiting.popleft()
            running.append(r)
            n = min(r.prompt, budget)
            prefills.append((r, n))
            budget -= n
        if not decoders and not prefills:  # idle until the next arrival
            now = max(now, waiting[0].arrival)
            continue
        prefill_tokens = sum(n for _, n in prefills)
        prefill_context = (sum(n * (context0 - p + r.done_prompt + n / 2) for r, n in prefills) / prefill_tokens
                           if prefill_tokens else 0.0)
        decode_context = (sum(context0 + r.emitted for r in decoders) / len(decoders)) if decoders else 0.0
        step_s = engine.step(StepLoad(len(decoders), decode_context, prefill_tokens, prefill_context)).total_s
        now += step_s * math.exp(noise.gauss(-sigma * sigma / 2, sigma)) if sigma > 0 else step_s
        for r in decoders:
            r.emitted += 1
            r.times.append(now)
        for r, n in prefills:
            r.done_prompt += n
            if r.done_prompt >= r.prompt:  # the prompt's last chunk: its first token comes with this step
                r.first_token = now
                r.emitted = 1
                r.times.append(now)
        for r in [r for r in running if r.emitted >= r.output]:
            running.remove(r)
            finished.append(r)
            if sent < total:
                waiting.append(_Request(r.client, now + turnaround_s, p, output_length()))
                sent += 1
    steady = sorted(finished, key=lambda r: r.arrival)[concurrency:] or finished
    tokens = sum(len(r.times) for r in finished)
    return steady, tokens / now if now > 0 else 0.0
