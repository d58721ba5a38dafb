"""The step-by-step closed loop: the no-load limit equals the step model, prompts batch into one step, arrivals
at a step boundary wait for the step in flight, the first wave is left out, cached prefixes are not computed,
replays pool their requests and step times spread as measured; and calibration reads steady-state medians, cached
tokens and the step-time spread from a bench result."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from dataclasses import replace
from typing import Any

import pytest

from qanat.planner.calibrate import observations, step_variation
from qanat.planner.chips import ChipSpec
from qanat.planner.efficiency import default_efficiency
from qanat.planner.model import ModelSpec
from qanat.planner.precision import get_precision
from qanat.planner.serving import Engine, Traffic
from qanat.planner.simulate import simulate_closed_loop
from qanat.planner.step import Deployment, StepLoad

HOST = ChipSpec("test-host", "cpu-host", {"fp32": 300e9, "bf16": 300e9, "int8": 1.2e12}, 16e9, 20e9, 40.0, idle_w=5.0)
MODEL = ModelSpec(name="tiny", n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, d_ff=1024, vocab=1000)


def _engine() -> Engine:
    eff, _ = default_efficiency("cpu-host")
    return Engine(MODEL, HOST, Deployment(1, get_precision("bf16"), 2.0), eff)


def test_one_client_sees_its_prefill_then_decode_steps() -> None:
    engine = _engine()
    sim = simulate_closed_loop(engine, Traffic(100, 10), 1, batch_cap=16, chunk=512, requests=8)
    prefill = engine.step(StepLoad(0, 0, 100, 50)).total_s
    assert sim.ttft_s == pytest.approx(prefill)  # an idle engine starts the prompt as it arrives
    decode = [engine.step(StepLoad(1, 100 + k)).total_s for k in range(1, 10)]
    assert sim.tpot_s == pytest.approx(sum(decode) / len(decode))
    assert sim.requests == 7  # the first wave (one request) is left out


def test_prompts_arriving_together_share_a_step() -> None:
    engine = _engine()
    # Four clients start together: their 4 x 100 prompt tokens fit one 512-token step, so all four first tokens
    # come with that step, not one after another as a serial queue would give them.
    sim = simulate_closed_loop(engine, Traffic(100, 1), 4, batch_cap=16, chunk=512, requests=4)
    together = engine.step(StepLoad(0, 0, 400, 50)).total_s
    assert sim.ttft_s == pytest.approx(together)
    assert sim.ttft_s < 4 * engine.step(StepLoad(0, 0, 100, 50)).total_s


def test_a_request_arriving_at_a_step_boundary_waits_for_the_step_in_flight() -> None:
    engine = _engine()
    traffic = Traffic(100, 20)
    busy = simulate_closed_loop(engine, traffic, 4, batch_cap=16, chunk=512, output_jitter=0.5, requests=64)
    prefill_alone = engine.step(StepLoad(3, 110, 100, 50)).total_s
    decode_step = engine.step(StepLoad(3, 110)).total_s
    assert busy.ttft_s >= prefill_alone + 0.5 * decode_step
    instant = simulate_closed_loop(engine, traffic, 4, batch_cap=16, chunk=512, output_jitter=0.5, requests=64,
                                   turnaround_s=0.0)  # arrives as the step ends: admitted to the next one
    assert instant.ttft_s < busy.ttft_s


def test_cached_prefix_is_not_computed() -> None:
    engine = _engine()
    cold = simulate_closed_loop(engine, Traffic(400, 8), 2, batch_cap=16, chunk=512, requests=16)
    warm = simulate_closed_loop(engine, Traffic(400, 8, cached_tokens=300), 2, batch_cap=16, chunk=512,
                                requests=16)
    assert warm.ttft_s < 0.5 * cold.ttft_s
    assert warm.output_tps > cold.output_tps


def test_engine_batch_cap_holds_requests_back() -> None:
    engine = _engine()
    capped = simulate_closed_loop(engine, Traffic(50, 20), 8, batch_cap=2, chunk=512, requests=64)
    free = simulate_closed_loop(engine, Traffic(50, 20), 8, batch_cap=16, chunk=512, requests=64)
    assert capped.ttft_s > 3 * free.ttft_s  # waiting for a slot
    assert capped.tpot_s < free.tpot_s  # but two sequences step faster than eight


def _run(load: int, ttfts: list[float], cached: int) -> dict[str, Any]:
    requests = [{"ok": True, "start_s": i * 0.01 if i < load else 1.0 + i, "ttft_s": t, "tpot_s": 0.05 + i * 1e-4}
                for i, t in enumerate(ttfts)]
    n = len(ttfts)
    return {"load": load, "phase": "decode", "workload": {"input_tokens": 64, "output_tokens": 16,
                                                         "output_jitter": 0.5},
            "aggregate": {"completed": n, "duration_s": 10.0, "total_input_tokens": 64 * n,
                          "total_output_tokens": 16 * n, "total_cached_tokens": cached * n,
                          "median_ttft_ms": 1e3 * sorted(ttfts)[n // 2], "median_tpot_ms": 60.0,
                          "output_throughput": 25.0},
            "requests": requests}


def test_observations_leave_the_first_wave_out_and_read_cached_tokens() -> None:
    first_wave, steady = [5.0, 6.0, 7.0, 8.0], [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    result = {"config": {"mode": "closed", "workload": {}}, "runs": [_run(4, first_wave + steady, 26)]}
    (ob,) = observations(result)
    assert ob.ttft_s == pytest.approx(0.55)  # the steady requests' median, not the run's (which the wave lifts)
    assert ob.tpot_s == pytest.approx(0.05 + 7.5e-4)
    assert ob.cached_tokens == 26 and ob.requests == 12 and ob.output_jitter == 0.5
    (whole,) = observations(result, steady=False)  # the benchmark's own summary: the wave included
    assert whole.ttft_s == pytest.approx(sorted(first_wave + steady)[6])
    few = {"config": {"mode": "closed", "workload": {}}, "runs": [_run(4, first_wave + steady[:2], 0)]}
    (ob,) = observations(few)
    assert ob.ttft_s == pytest.approx(sorted(first_wave + steady[:2])[3])  # too few to split: the run's median


def test_decode_attention_has_its_own_efficiency() -> None:
    # One query per sequence against its cache runs far below the batched prefill kernels on a CPU: a slower
    # decode attention lengthens decode steps at long contexts, and leaves prefill steps as they were.
    eff, _ = default_efficiency("cpu-host")
    slow = replace(eff, decode_attention=eff.attention / 50)
    deploy = Deployment(1, get_precision("bf16"), 2.0)
    fast_engine, slow_engine = Engine(MODEL, HOST, deploy, eff), Engine(MODEL, HOST, deploy, slow)
    assert eff.decode_attention_eff == eff.attention
    prefill = StepLoad(0, 0, 300, 150)
    assert slow_engine.step(prefill).total_s == fast_engine.step(prefill).total_s
    short, long_ = StepLoad(8, 50), StepLoad(8, 2000)
    growth_fast = fast_engine.step(long_).total_s - fast_engine.step(short).total_s
    growth_slow = slow_engine.step(long_).total_s - slow_engine.step(short).total_s
    assert growth_slow > 5 * growth_fast


def test_replays_pool_their_requests() -> None:
    engine = _engine()
    traffic = Traffic(300, 16)
    kwargs: dict[str, Any] = {"batch_cap": 16, "chunk": 512, "output_jitter": 0.5, "requests": 40}
    pooled = simulate_closed_loop(engine, traffic, 6, replays=4, seed=10, **kwargs)
    singles = [simulate_closed_loop(engine, traffic, 6, replays=1, seed=s, **kwargs) for s in range(10, 14)]
    ttfts = sorted(t for run in singles for t in run.ttfts_s)
    assert pooled.ttfts_s == tuple(ttfts)  # replay k is the one-replay run of seed + k
    assert pooled.requests == sum(run.requests for run in singles) == 4 * 34  # each leaves its first wave out
    assert pooled.ttft_s == pytest.approx(statistics.median(ttfts))
    assert pooled.output_tps == pytest.approx(statistics.fmean(run.output_tps for run in singles))


def test_one_replay_median_is_one_draw_of_a_bimodal_ttft() -> None:
    # Two 300-token prompts overflow a 512-token step, so a prompt rides in the step after it arrives or in the one
    # after: two modes, near half the requests in each. One replay's median lands in either, depending on the output
    # lengths drawn. Pooling 16 replays with deterministic steps still flips between the modes from one set of seeds
    # to the next (the share sits at one half); with the step times spread as a host spreads them, the modes blur
    # and the pooled median moves little.
    eff, _ = default_efficiency("cpu-host")
    deploy = Deployment(1, get_precision("bf16"), 2.0)
    kwargs: dict[str, Any] = {"batch_cap": 16, "chunk": 512, "output_jitter": 0.5, "requests": 40}

    def medians(sigma: float, replays: int) -> list[float]:
        engine = Engine(MODEL, HOST, deploy, replace(eff, step_sigma=sigma))
        return [simulate_closed_loop(engine, Traffic(300, 16), 6, replays=replays, seed=s, **kwargs).ttft_s
                for s in range(0, 800, 100)]

    singles, pooled, spread = medians(0.0, 1), medians(0.0, 16), medians(0.2, 16)
    assert max(singles) > 1.5 * min(singles)
    assert max(pooled) > 1.25 * min(pooled)
    assert max(spread) < 1.15 * min(spread)


def test_equal_output_lengths_and_steady_steps_replay_once() -> None:
    engine = _engine()
    sim = simulate_closed_loop(engine, Traffic(100, 10), 3, batch_cap=16, chunk=512, requests=12, replays=8)
    assert sim.requests == 9  # one replay: 12 requests less the first wave of 3


def test_step_time_spread_keeps_the_mean_and_spreads_ttft() -> None:
    eff, _ = default_efficiency("cpu-host")
    deploy = Deployment(1, get_precision("bf16"), 2.0)
    steady = Engine(MODEL, HOST, deploy, eff)
    noisy = Engine(MODEL, HOST, deploy, replace(eff, step_sigma=0.3))
    one = simulate_closed_loop(steady, Traffic(100, 10), 1, batch_cap=16, chunk=512, requests=400)
    spread = simulate_closed_loop(noisy, Traffic(100, 10), 1, batch_cap=16, chunk=512, requests=400, replays=4)
    assert one.ttfts_s[-1] - one.ttfts_s[0] < 1e-12 and len(set(spread.ttfts_s)) > 100
    assert spread.ttfts_s[0] < one.ttft_s < spread.ttfts_s[-1]
    # Lognormal factors of mean 1: the mean step keeps the model's time (within sampling error over 1,600 prompts).
    assert statistics.fmean(spread.ttfts_s) == pytest.approx(one.ttft_s, rel=0.03)
    assert spread.ttft_s < one.ttft_s  # and the median of a lognormal lies below its mean


def _gaps_run(gaps: list[list[float]], output_tokens: int) -> dict[str, Any]:
    requests = [{"ok": True, "output_tokens": output_tokens, "chunk_times_s": list(itertools.accumulate(g))}
                for g in gaps]
    return {"load": 1, "requests": requests}


def test_step_variation_reads_the_lower_half_of_the_gaps() -> None:
    rng = random.Random(3)
    sigma = 0.2
    decode = [[0.1 * math.exp(rng.gauss(0, sigma)) for _ in range(30)] for _ in range(40)]
    # Steps that carry prompt chunks: a tail of long gaps, a fifth of them, which the estimate must not read as spread.
    with_prompts = [[g * (12 if i % 5 == 0 else 1) for i, g in enumerate(request)] for request in decode]
    prefill_only = _gaps_run([[0.5, 0.5, 0.5]] * 40, 4)  # too few output tokens per request: left out
    result = {"runs": [_gaps_run(decode, 31), _gaps_run(with_prompts, 31), prefill_only]}
    assert step_variation(result) == pytest.approx(sigma, rel=0.15)
    assert step_variation({"runs": [prefill_only]}) == 0.0
