"""The operating point of one replica under load: steady-state step time, TPOT and TTFT (with queueing).

Token accounting in steady state: with requests completing at rate λ, each step carries λ·(O-1)·t decodes plus
λ·P·t prompt tokens (chunked prefill shares the step with decodes), so TPOT = t solves t = step(t). Prompts queue
for the engine's prefill capacity, utilisation ρ = λ·S (S: the step time a prompt adds): with Poisson arrivals
(open loop) the wait is M/D/1's ρ·S / (2(1-ρ)); a closed loop of C requests is far less bursty, and its wait comes
from mean-value analysis. TTFT = half a step (the step in flight) + the prompt's own chunks + the wait. Closed
loop: the λ with C = λ·(TTFT + (O-1)·TPOT). Past the engine's batch cap (or the KV cache's), requests wait for a
slot; Little's law gives that wait, TTFT is then mostly queue wait, and the point is flagged saturated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from qanat.planner.chips import ChipSpec
from qanat.planner.efficiency import Efficiency
from qanat.planner.model import ModelSpec
from qanat.planner.step import Deployment, StepLoad, StepModel, StepTime


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
    cached_tokens: int = 0  # prompt tokens a prefix cache already holds (a shared system prompt): not computed

    @property
    def computed_tokens(self) -> int:
        return max(1, self.input_tokens - self.cached_tokens)


def closed_queue_wait(n: float, service: float, delay: float) -> float:
    """Mean wait for prefill in a closed system of `n` requests, each needing `service` seconds of the engine's
    prefill capacity and then `delay` seconds elsewhere: mean-value analysis (the arrival theorem: an arriving
    request finds the queue of a system with one request fewer), with half a service left of the prompt in
    service because prefill times are deterministic, not exponential. Fractional `n` interpolates."""
    if service <= 0 or n <= 1:
        return 0.0
    queue = busy = 0.0
    waits = [0.0]
    for k in range(1, math.ceil(n) + 1):
        wait = (queue - busy) * service + busy * service / 2
        throughput = k / (wait + service + delay)
        queue, busy = throughput * (wait + service), throughput * service
        waits.append(wait)
    lo = math.floor(n)
    return waits[lo] + (n - lo) * (waits[min(lo + 1, len(waits) - 1)] - waits[lo])


class Engine:
    """One replica: model on `deploy.chips` chips with efficiency factors; answers step and load questions."""

    def __init__(self, model: ModelSpec, chip: ChipSpec, deploy: Deployment, eff: Efficiency) -> None:
        self.model, self.chip, self.deploy, self.eff = model, chip, deploy, eff
        self._steps = StepModel(model, chip, deploy, eff)

    def step(self, load: StepLoad) -> StepTime:
        return self._steps.time(load)

    def prefill_time(self, prompt: int, decodes: float, context: float, start: int = 0) -> tuple[float, float]:
        """(time until a prompt's last chunk ends, the part of it the prompt adds to the steps it rides in), for
        `prompt` tokens computed after `start` cached ones."""
        chunk = max(1, self.eff.chunk_tokens)
        total = extra = 0.0
        done = 0
        base = self.step(StepLoad(decodes, context)).total_s if decodes else 0.0
        while done < prompt:
            n = min(chunk, prompt - done)
            t = self.step(StepLoad(decodes, context, n, start + done + n / 2)).total_s
            total += t
            extra += t - base
            done += n
        return total, extra

    def _steady_step(self, rate: float, traffic: Traffic) -> StepTime | None:
        """The step when requests complete at `rate`: it carries rate·(O-1)·t decodes and rate·P·t prompt tokens
        (Little's law), so t = T(t). T is increasing and nearly linear in t: secant steps from T(0). None: the
        engine cannot keep up with that rate (T(t) > t for every t, or the prompt tokens a step must take exceed
        the chunk it may take: the prompt queue would grow without bound)."""
        p, o, cached = traffic.computed_tokens, traffic.output_tokens, traffic.input_tokens - traffic.computed_tokens
        context = traffic.input_tokens + o / 2

        def at(t: float) -> StepTime:
            return self.step(StepLoad(max(rate * (o - 1) * t, 1e-9), context, rate * p * t, cached + p / 2))

        t0, s0 = 0.0, at(0.0)
        t1 = s0.total_s
        s1 = at(t1)
        for _ in range(60):
            g0, g1 = s0.total_s - t0, s1.total_s - t1
            if abs(g1) <= 1e-9 * t1:
                return s1 if rate * p * t1 <= self.eff.chunk_tokens else None
            slope = (g1 - g0) / (t1 - t0) if t1 != t0 else -1.0
            if slope >= 0:  # T still outgrows t here (MoE: experts get touched fast, then T flattens): step out
                t_next = t1 * 2 + s1.total_s
                if t_next > 1e6:  # no fixed point: the engine cannot keep up with this rate
                    return None
            else:
                t_next = t1 - g1 / slope
            t0, s0, t1 = t1, s1, max(t_next, 1e-12)
            s1 = at(t1)
        return s1 if rate * p * t1 <= self.eff.chunk_tokens else None

    def _point(self, rate: float, traffic: Traffic, running: float | None = None) -> OperatingPoint | None:
        """Latencies at completion rate `rate`; None when the engine cannot sustain it."""
        step = self._steady_step(rate, traffic)
        if step is None:
            return None
        p, o = traffic.computed_tokens, traffic.output_tokens
        tpot = step.total_s
        decoding = rate * (o - 1) * tpot
        own, extra = self.prefill_time(p, decoding, traffic.input_tokens + o / 2, traffic.input_tokens - p)
        rho = rate * extra
        if rho >= 1:
            return None
        if running is None:  # open loop, Poisson arrivals: M/D/1
            wait = rho * extra / (2 * (1 - rho))
        else:  # closed loop: N requests cycle between the prefill queue and everything else
            wait = closed_queue_wait(running, extra, own - extra + (o - 0.5) * tpot)
        ttft = 0.5 * tpot + own + wait
        in_system = rate * (ttft + (o - 1) * tpot)
        return OperatingPoint(in_system, in_system, ttft, tpot, rate, o, step, 0.0, False)

    def running_point(self, running: float, traffic: Traffic) -> OperatingPoint:
        """Steady state with `running` requests in the engine (closed loop): the rate whose Little's-law population
        is `running`, found by false position (the population grows with the rate)."""
        o = traffic.output_tokens
        idle = self._point(1e-12, traffic)  # no load, no queue: the shortest a request can take
        assert idle is not None, "an idle engine always keeps up"
        lo, hi = 0.0, running / (idle.ttft_s + (o - 1) * idle.tpot_s)  # the rate cannot beat no contention
        f_lo, f_hi = -running, self._excess(hi, traffic, running)
        best = idle
        for i in range(80):
            if f_hi <= 0:  # only at the bound itself: take it
                return self._point(hi, traffic, running) or best
            rate = hi - f_hi * (hi - lo) / (f_hi - f_lo) if i % 3 != 2 else (lo + hi) / 2  # Illinois-ish
            point = self._point(rate, traffic, running)
            f = (point.concurrency - running) if point else running
            if point is not None:
                best = point
                if abs(f) <= 1e-6 * running:
                    break
            if f < 0:
                lo, f_lo = rate, f
            else:
                hi, f_hi = rate, f
            if hi - lo <= 1e-9 * hi:
                break
        return replace(best, concurrency=running, running=running)

    def _excess(self, rate: float, traffic: Traffic, running: float) -> float:
        point = self._point(rate, traffic, running)
        return (point.concurrency - running) if point else running

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
        """Poisson arrivals at `rate`: no search, the rate is given; saturated when the engine cannot sustain it or
        the requests it would hold exceed its batch cap."""
        point = self._point(rate, traffic)
        if point is None or point.running > batch_cap:
            full = self.running_point(batch_cap, traffic)
            return OperatingPoint(math.inf, batch_cap, math.inf, full.tpot_s, full.request_rate,
                                  traffic.output_tokens, full.step, math.inf, True)
        return point
