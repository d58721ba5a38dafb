"""The operating point of one replica under load: steady-state step time, TPOT and TTFT (with queueing).

Token accounting in steady state: with N sequences decoding and requests arriving at rate λ, each step
carries N decodes plus λ·P·t_step prompt tokens (chunked prefill shares the step with decodes), so
TPOT = t_step. Prompts queue for the engine's prefill capacity like an M/D/1 queue: utilisation
ρ = λ·S (S: the step time a prompt adds), wait Wq = ρ·S / (2(1-ρ)); TTFT = half a step (the step in
flight) + the prompt's own chunks + Wq. Closed loop (concurrency C): λ = C / (TTFT + (O-1)·TPOT). Open loop
(rate λ): the C that gives that λ. Past the engine's batch cap (or the KV cache's), requests wait in a
queue whose wait Little's law gives: that TTFT is queue wait, and the point is flagged saturated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qanat.planner.chips import ChipSpec
from qanat.planner.efficiency import Efficiency
from qanat.planner.model import ModelSpec
from qanat.planner.step import Deployment, StepLoad, StepTime, step_time

_ITERATIONS = 200


@dataclass(frozen=True)
class OperatingPoint:
    concurrency: float  # requests in the system (running + queued)
    running: float  # requests holding a batch slot
    ttft_s: float
    tpot_s: float
    request_rate: float  # requests/s completed
    output_tokens: int
    step: StepTime
    queue_wait_s: float  # part of TTFT spent waiting for a slot (0 below saturation)
    saturated: bool

    @property
    def output_tps(self) -> float:
        return self.request_rate * self.output_tokens


@dataclass(frozen=True)
class Traffic:
    input_tokens: int
    output_tokens: int


class Engine:
    """One replica: model on `deploy.chips` chips with efficiency factors; answers step and load questions."""

    def __init__(self, model: ModelSpec, chip: ChipSpec, deploy: Deployment, eff: Efficiency) -> None:
        self.model, self.chip, self.deploy, self.eff = model, chip, deploy, eff

    def step(self, load: StepLoad) -> StepTime:
        return step_time(self.model, self.chip, self.deploy, self.eff, load)

    def prefill_time(self, prompt: int, decodes: float, context: float) -> tuple[float, float]:
        """(time until a prompt's last chunk ends, the part of it the prompt adds to the steps it rides in)."""
        chunk = max(1, self.eff.chunk_tokens)
        total = extra = 0.0
        done = 0
        base = self.step(StepLoad(decodes, context)).total_s if decodes else 0.0
        while done < prompt:
            n = min(chunk, prompt - done)
            t = self.step(StepLoad(decodes, context, n, done + n / 2)).total_s
            total += t
            extra += t - base
            done += n
        return total, extra

    def running_point(self, running: float, traffic: Traffic) -> OperatingPoint:
        """Steady state with `running` requests in the engine (each either prefilling or decoding)."""
        p, o = traffic.input_tokens, traffic.output_tokens
        context = p + o / 2
        tpot = self.step(StepLoad(max(running, 1e-9), context)).total_s
        ttft = self.prefill_time(p, 0, 0)[0]
        rate = 0.0
        for _ in range(_ITERATIONS):
            response = ttft + max(o - 1, 0) * tpot
            rate = running / response
            decoding = running * max(o - 1, 0) * tpot / response
            prefill_per_step = min(rate * p * tpot, self.eff.chunk_tokens)
            step = self.step(StepLoad(max(decoding, 1e-9), context, prefill_per_step, p / 2))
            own, extra = self.prefill_time(p, decoding, context)
            rho = min(rate * extra, 0.99)
            wait = rho * extra / (2 * (1 - rho))
            new_ttft = 0.5 * step.total_s + own + wait
            if abs(step.total_s - tpot) < 1e-9 * tpot and abs(new_ttft - ttft) < 1e-9 * max(ttft, 1e-12):
                break
            tpot = 0.5 * tpot + 0.5 * step.total_s  # damped: the two depend on each other
            ttft = 0.5 * ttft + 0.5 * new_ttft
        return OperatingPoint(running, running, ttft, tpot, rate, o, step, 0.0, False)

    def closed_loop(self, concurrency: float, traffic: Traffic, batch_cap: int) -> OperatingPoint:
        if concurrency <= batch_cap:
            return self.running_point(concurrency, traffic)
        full = self.running_point(batch_cap, traffic)
        # Little's law: C requests in the system at the cap's completion rate; the rest of R is queue wait.
        response = concurrency / full.request_rate
        busy = full.ttft_s + max(traffic.output_tokens - 1, 0) * full.tpot_s
        wait = response - busy
        return OperatingPoint(concurrency, batch_cap, full.ttft_s + wait, full.tpot_s, full.request_rate,
                              traffic.output_tokens, full.step, wait, True)

    def open_loop(self, rate: float, traffic: Traffic, batch_cap: int) -> OperatingPoint:
        full = self.running_point(batch_cap, traffic)
        if rate >= full.request_rate:
            return OperatingPoint(math.inf, batch_cap, math.inf, full.tpot_s, full.request_rate,
                                  traffic.output_tokens, full.step, math.inf, True)
        lo, hi = 1e-6, float(batch_cap)
        for _ in range(60):  # completion rate grows with the requests running: bisect for the one that matches
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.running_point(mid, traffic).request_rate < rate else (lo, mid)
        return self.running_point(hi, traffic)
