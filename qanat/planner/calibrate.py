"""Calibration: fit one chip's efficiency factors and power curve to a `qanat bench` result, and keep them
as a profile keyed by (chip, engine, precision) that later predictions use (and say so).

The fit minimises a robust (soft-L1) loss on the log errors of the predicted median TPOT and TTFT of every
unsaturated run (a run slowed by other work on a shared host should not drag the factors), with the same step and
queue model `qanat plan` predicts with, and of the step model against each run's measured decode-only steps
(`decode_steps`: a TPOT mixes decode steps with the prompt chunks riding in them, so TPOTs alone pin the cost of a
decode step against batch size loosely), over six factors: bandwidth, compute, prefill and decode attention
efficiency, a fixed time per step (per-layer and per-step costs are one constant for a fixed model) and a fixed
time per decoded sequence (logits, sampling: what batching a decode does not amortise). Power, when the result
carries energy, is a linear least-squares fit of watts on the step's memory and compute busy fractions.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qanat.planner.catalog import planner_home
from qanat.planner.chips import ChipSpec
from qanat.planner.efficiency import Efficiency
from qanat.planner.model import ModelSpec
from qanat.planner.serving import Engine, Traffic
from qanat.planner.simulate import REPLAYS, simulate_closed_loop
from qanat.planner.step import Deployment, StepLoad, StepModel

FITTED = ("mem", "compute", "attention", "decode_attention", "step_s", "token_s")
ROBUST_SCALE = 0.25  # log-error where the loss turns from quadratic to linear: runs hit by other load weigh less
MIN_TPOT_TOKENS = 8  # a TPOT over fewer output tokens (the prefill runs') is a few gaps of noise: not fitted
# Replays pooled per run inside the fit's loss (thousands of evaluations): fewer than a prediction's REPLAYS, enough
# that a run's TTFT median does not flip between modes with one draw of output lengths.
FIT_REPLAYS = 4
STEP_GROUPING = 0.1  # tokens received within this share of the median inter-token gap came from one step
MIN_DECODE_STEPS = 10  # decode-only steps a run needs for its median step time to be fitted
LOGNORMAL_Q10 = 1.2816  # a standard normal's 90th percentile: ln(q50 / q10) of a lognormal is this many sigmas
# A second start for the search: a host far from its datasheet (slow, overhead-heavy), where fits of
# contended CPUs land; the better of the two fits is kept.
_SLOW_START = {"mem": 0.3, "compute": 0.05, "attention": 0.05, "decode_attention": 0.01, "step_s": 0.05,
               "token_s": 0.01}
# Every factor is searched through its logarithm: positive, unbounded. Efficiencies above 1 are legitimate where the
# chip's reference figure is a floor (this-machine's bandwidth probe is one thread; a small model may sit in cache).


@dataclass(frozen=True)
class Observation:
    """One run of a bench result, as calibration needs it."""

    concurrency: int
    input_tokens: float  # mean prompt tokens the server counted
    output_tokens: float
    tpot_s: float | None
    ttft_s: float | None
    output_tps: float
    power_w: float | None  # mean watts over the run, as the target (or a local meter) reported
    label: str = ""
    cached_tokens: float = 0.0  # mean prompt tokens the server's prefix cache held (not computed)
    requests: int = 0  # requests the run sent (0: unknown; the prediction is then the analytic steady state)
    output_jitter: float = 0.0  # output lengths uniform in [1-j, 1+j] x output_tokens
    decode_step_s: float | None = None  # median time of the run's decode-only steps at full batch (`decode_steps`)
    decode_context: float = 0.0  # mean tokens each sequence of those steps attended to


def _steady_medians(run: dict[str, Any]) -> tuple[float | None, float | None]:
    """Median TTFT and TPOT (s) of a closed-loop run without its first wave: the first C requests start together
    and queue behind each other's prompts (the steady state the planner predicts has arrivals staggered by the
    requests that end). (None, None) when the run has too few requests to leave its first wave out."""
    requests = sorted((r for r in run.get("requests") or [] if r.get("ok")), key=lambda r: r["start_s"])
    steady = requests[int(run["load"]):]
    if len(steady) < max(4, int(run["load"])):
        return None, None
    ttfts = [r["ttft_s"] for r in steady if r.get("ttft_s") is not None]
    tpots = [r["tpot_s"] for r in steady if r.get("tpot_s")]
    return (statistics.median(ttfts) if ttfts else None), (statistics.median(tpots) if tpots else None)


def step_variation(result: dict[str, Any]) -> float:
    """How much step times spread on the benchmarked host (sigma of their logarithm), from the requests'
    inter-token gaps in the decode runs (requests of at least MIN_TPOT_TOKENS output tokens, at least 20 gaps). A
    run's gaps mix steps of different loads: decode-only steps make its lower part, steps carrying prompt chunks its
    upper tail; so each run's sigma is read from the lower half alone, as a lognormal's, ln(q50 / q10) / 1.2816, and
    the result's is the median over its runs (0 when none qualifies)."""
    sigmas = []
    for run in result["runs"]:
        gaps = sorted(b - a for r in run.get("requests") or []
                      if r.get("ok") and (r.get("output_tokens") or 0) >= MIN_TPOT_TOKENS
                      for a, b in itertools.pairwise(r.get("chunk_times_s") or []) if b > a)
        if len(gaps) >= 20:
            q10, q50 = gaps[len(gaps) // 10], gaps[len(gaps) // 2]
            sigmas.append(math.log(q50 / q10) / LOGNORMAL_Q10)
    return statistics.median(sigmas) if sigmas else 0.0


def decode_steps(run: dict[str, Any]) -> tuple[float, float] | None:
    """(median seconds, mean context in tokens) of a closed-loop run's decode-only steps at full batch: steps in
    which every one of the run's C requests received a token that was not its first. In a closed loop of C clients
    no other request exists then, so such a step carried exactly C decodes and no prompt; its time is the gap
    between the receipt of its tokens and of the previous step's. Tokens of one step leave the server together:
    receipt times within STEP_GROUPING of the run's median inter-token gap are one step (two tokens of one request
    in a group, or fewer than C, and the group is not counted). None: fewer than MIN_DECODE_STEPS such steps."""
    load = int(run["load"])
    tokens = sorted((r["start_s"] + t, i, k, r.get("prompt_tokens") or 0)
                    for i, r in enumerate(run.get("requests") or []) if r.get("ok")
                    for k, t in enumerate(r.get("chunk_times_s") or []))
    gaps = [b - a for r in run.get("requests") or [] if r.get("ok")
            for a, b in itertools.pairwise(r.get("chunk_times_s") or [])]
    if not gaps:
        return None
    tolerance = STEP_GROUPING * statistics.median(gaps)
    groups: list[list[tuple[float, int, int, int]]] = []
    for token in tokens:
        if groups and token[0] - groups[-1][-1][0] <= tolerance:
            groups[-1].append(token)
        else:
            groups.append([token])
    times, contexts = [], []
    for previous, group in itertools.pairwise(groups):
        if len(group) == load == len({i for _, i, _, _ in group}) and all(k > 0 for _, _, k, _ in group):
            times.append(group[0][0] - previous[0][0])
            contexts.append(sum(prompt + k for _, _, k, prompt in group) / load)
    if len(times) < MIN_DECODE_STEPS:
        return None
    return statistics.median(times), statistics.fmean(contexts)


def observations(result: dict[str, Any], steady: bool = True) -> list[Observation]:
    """Closed-loop runs of a schema-1 result; per-run workloads (`--sweep`) override the global one. `steady`:
    TTFT and TPOT are the medians of the requests after the first wave (False: of every request, as the
    benchmark's summary reports them)."""
    if result["config"]["mode"] != "closed":
        raise ValueError("calibration needs closed-loop runs (--concurrency or --sweep)")
    obs = []
    for run in result["runs"]:
        agg = run["aggregate"]
        if not agg["completed"]:
            continue
        workload = run.get("workload") or result["config"]["workload"]
        done = agg["completed"]
        prompt = agg["total_input_tokens"] / done if agg["total_input_tokens"] else workload["input_tokens"]
        output = agg["total_output_tokens"] / done if agg["total_output_tokens"] else workload["output_tokens"]
        power = run.get("power_w")
        if power is None and agg.get("energy_joules") and agg["duration_s"]:
            power = agg["energy_joules"] / agg["duration_s"]
        tpot_ms, ttft_ms = agg.get("median_tpot_ms"), agg.get("median_ttft_ms")
        tpot, ttft = tpot_ms / 1e3 if tpot_ms else None, ttft_ms / 1e3 if ttft_ms else None
        steady_ttft, steady_tpot = _steady_medians(run) if steady else (None, None)
        ttft, tpot = steady_ttft or ttft, steady_tpot or tpot
        cached = (agg.get("total_cached_tokens") or 0) / done
        step_s, step_context = decode_steps(run) or (None, 0.0)
        obs.append(Observation(int(run["load"]), prompt, output, tpot, ttft, agg["output_throughput"], power,
                               str(run.get("phase", "")), cached, int(done),
                               float(workload.get("output_jitter") or 0.0), step_s, step_context))
    if not obs:
        raise ValueError("the result has no completed runs")
    return obs


def _nelder_mead(f: Callable[[list[float]], float], x0: list[float], step: float = 0.5, iterations: int = 400,
                 tolerance: float = 1e-10) -> list[float]:
    """Derivative-free minimisation (Nelder & Mead 1965), enough for a handful of parameters."""
    n = len(x0)
    simplex = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    values = [f(p) for p in simplex]
    for _ in range(iterations):
        order = sorted(range(n + 1), key=lambda i: values[i])
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if abs(values[-1] - values[0]) < tolerance:
            break
        centroid = [sum(p[j] for p in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]

        def toward(t: float, centroid: list[float] = centroid, worst: list[float] = worst) -> list[float]:
            return [c + t * (w - c) for c, w in zip(centroid, worst, strict=True)]

        reflected = toward(-1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = toward(-2.0)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = toward(0.5)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:  # shrink toward the best point
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, p, strict=True)] for p in simplex[1:]]
                values = [values[0]] + [f(p) for p in simplex[1:]]
    return simplex[min(range(n + 1), key=lambda i: values[i])]


def _to_search(name: str, value: float) -> float:
    return math.log(max(value, 1e-5))


def _with_params(base: Efficiency, xs: Sequence[float]) -> Efficiency:
    """Unbounded search coordinates -> factors (no clamps: a clamp is a flat region Nelder-Mead stalls on)."""
    values = {name: math.exp(min(max(x, -30.0), 30.0)) for name, x in zip(FITTED, xs, strict=True)}
    return replace(base, layer_s=0.0, **values)  # type: ignore[arg-type]


def predict_run(model: ModelSpec, chip: ChipSpec, deploy: Deployment, eff: Efficiency,
                ob: Observation, replays: int = REPLAYS) -> tuple[float, float, float]:
    """(TPOT, TTFT, output tokens/s) the model predicts for one observed run."""
    engine = Engine(model, chip, deploy, eff)
    if ob.requests:  # the run as the benchmark ran it, `replays` times: clients, requests, output lengths, first wave
        sim = simulate_closed_loop(engine, _traffic(ob), ob.concurrency, batch_cap=eff.max_batch,
                                   chunk=eff.chunk_tokens, output_jitter=ob.output_jitter, requests=ob.requests,
                                   replays=replays)
        return sim.tpot_s, sim.ttft_s, sim.output_tps
    op = engine.closed_loop(ob.concurrency, _traffic(ob), eff.max_batch)
    return op.tpot_s, op.ttft_s, op.output_tps


def _traffic(ob: Observation) -> Traffic:
    prompt = max(1, round(ob.input_tokens))
    return Traffic(prompt, max(1, round(ob.output_tokens)), min(round(ob.cached_tokens), prompt - 1))


@dataclass(frozen=True)
class Fit:
    efficiency: Efficiency
    residuals: dict[str, dict[str, float]]  # metric -> {"median": APE, "p90": APE}
    used_runs: int
    skipped: list[str]
    step_residuals: dict[str, float] = field(default_factory=dict)  # the decode-only steps': {"median", "p90", "n"}


def _ape_summary(pairs: list[tuple[float, float]]) -> dict[str, float]:
    errors = sorted(abs(p - m) / m for p, m in pairs if m)
    if not errors:
        return {}
    p90 = errors[min(len(errors) - 1, math.ceil(0.9 * len(errors)) - 1)]
    return {"median": statistics.median(errors), "p90": p90, "n": float(len(errors))}


def usable_runs(obs: list[Observation], max_batch: int) -> tuple[list[Observation], list[str]]:
    """Runs the steady-state model can be fitted to, and why the others are left out (queueing for a slot)."""
    usable = [o for o in obs if o.concurrency <= max_batch and o.tpot_s]
    skipped = [f"concurrency {o.concurrency} > max batch {max_batch}" if o.concurrency > max_batch
               else f"concurrency {o.concurrency}: no TPOT measured" for o in obs if o not in usable]
    return usable, skipped


def predict_decode_step(steps: StepModel, eff: Efficiency, ob: Observation) -> float:
    """The median time the model gives a decode-only step of `ob`'s full batch: the step's time times the median
    of the replays' lognormal step factor (mean 1, log-sigma `eff.step_sigma`)."""
    return steps.time(StepLoad(ob.concurrency, ob.decode_context)).total_s * math.exp(-eff.step_sigma ** 2 / 2)


def fit(model: ModelSpec, chip: ChipSpec, deploy: Deployment, base: Efficiency, obs: list[Observation]) -> Fit:
    usable, skipped = usable_runs(obs, base.max_batch)
    if len(usable) < 2:
        raise ValueError("calibration needs at least two unsaturated runs with a measured TPOT")

    def robust(log_error: float) -> float:  # pseudo-Huber (soft L1): quadratic near 0, linear past ROBUST_SCALE
        return 2 * ROBUST_SCALE**2 * (math.sqrt(1 + (log_error / ROBUST_SCALE) ** 2) - 1)

    def loss(logs: list[float]) -> float:
        eff = _with_params(base, logs)
        steps = StepModel(model, chip, deploy, eff)
        total = 0.0
        for ob in usable:
            tpot, ttft, _ = predict_run(model, chip, deploy, eff, ob, FIT_REPLAYS)
            if ob.output_tokens >= MIN_TPOT_TOKENS:
                total += robust(math.log(tpot / ob.tpot_s))  # type: ignore[operator]
            if ob.ttft_s:
                total += robust(math.log(ttft / ob.ttft_s))
            if ob.decode_step_s:
                total += robust(math.log(predict_decode_step(steps, eff, ob) / ob.decode_step_s))
        return total

    results = []
    first = {name: getattr(base, name) for name in FITTED} | {"decode_attention": base.decode_attention_eff}
    for start in (first, _SLOW_START):
        best = [_to_search(name, start[name]) for name in FITTED]
        value = loss(best)
        for step in (1.0, 0.5, 0.25, 0.1, 0.05):  # restarts: Nelder-Mead stalls in narrow valleys
            candidate = _nelder_mead(loss, best, step=step)
            candidate_value = loss(candidate)
            if candidate_value < value:
                best, value = candidate, candidate_value
        results.append((value, best))
    eff = _with_params(base, min(results)[1])
    eff = _fit_power(model, chip, deploy, eff, usable)
    predicted = [(ob, predict_run(model, chip, deploy, eff, ob)) for ob in usable]
    residuals = {
        "tpot_s": _ape_summary([(p[0], o.tpot_s) for o, p in predicted
                                if o.tpot_s and o.output_tokens >= MIN_TPOT_TOKENS]),
        "ttft_s": _ape_summary([(p[1], o.ttft_s) for o, p in predicted if o.ttft_s]),
        "output_tps": _ape_summary([(p[2], o.output_tps) for o, p in predicted]),
    }
    steps = StepModel(model, chip, deploy, eff)
    step_residuals = _ape_summary([(predict_decode_step(steps, eff, o), o.decode_step_s) for o in usable
                                   if o.decode_step_s])
    return Fit(eff, {k: v for k, v in residuals.items() if v}, len(usable), skipped, step_residuals)


def _fit_power(model: ModelSpec, chip: ChipSpec, deploy: Deployment, eff: Efficiency,
               obs: list[Observation]) -> Efficiency:
    import numpy as np

    rows, watts = [], []
    for ob in obs:
        if ob.power_w is None:
            continue
        engine = Engine(model, chip, deploy, eff)
        op = engine.closed_loop(ob.concurrency, _traffic(ob), eff.max_batch)
        rows.append([1.0, op.step.memory_busy, op.step.compute_busy])
        watts.append(ob.power_w / deploy.chips)
    if len(rows) < 3:
        return eff
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(watts), rcond=None)
    idle = max(0.0, float(coef[0]))
    span = max(chip.tdp_w - idle, 1e-9)
    # The intercept is the measured draw with nothing busy: it replaces idle and the class's serving floor both.
    return replace(eff, idle_w=idle, power_mem=max(0.0, float(coef[1])) / span,
                   power_compute=max(0.0, float(coef[2])) / span, power_floor=0.0)


# ---- profiles ---------------------------------------------------------------------------------------------
def profiles_dir() -> Path:
    return planner_home() / "profiles"


def profile_key(chip: str, engine: str, precision: str) -> str:
    return "__".join(part.replace("/", "-").replace(" ", "-") for part in (chip, engine, precision))


def save_profile(chip: ChipSpec, engine: str, precision: str, model: str, fitted: Fit, source: str) -> Path:
    """The factors are relative to the chip's figures, so those are kept too (a probed host differs run to run)."""
    path = profiles_dir() / f"{profile_key(chip.name, engine, precision)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "chip": chip.name, "engine": engine, "precision": precision, "model": model, "source": source,
        "chip_figures": {"memory_bw": chip.memory_bw, "peak_flops": chip.peak_flops, "tdp_w": chip.tdp_w},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "runs": fitted.used_runs,
        "efficiency": fitted.efficiency.to_dict(), "residuals": fitted.residuals,
    }, indent=2))
    return path


def find_profile(chip: str, precision: str, engine: str | None = None) -> dict[str, Any] | None:
    """The profile for this chip and precision (and engine, when given); the newest when several match."""
    root = profiles_dir()
    if not root.is_dir():
        return None
    found = []
    for path in root.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("chip") == chip and str(data.get("precision", "")).upper() == precision.upper() and (
                engine is None or data.get("engine") == engine):
            found.append((data.get("created", ""), path, data))
    if not found:
        return None
    _, path, data = max(found, key=lambda item: item[0])
    data["path"] = str(path)
    return dict(data)
