"""`qanat bench --sweep`: the runs `qanat plan --calibrate` needs, as one result.json (schema version 1).

Three phases, each a closed-loop run per point: prefill (concurrency 1, prompts from 1/8 of the longest to
the longest, a few output tokens: TTFT is the prompt's cost), decode at short context (every concurrency:
TPOT and the decode-only step time against batch size; a ladder of batch sizes is what separates a step's fixed
cost from its cost per sequence) and decode at long context (three concurrencies: TPOT against KV traffic). Each run
keeps its own workload (`runs[i].workload`, `runs[i].phase`). Decode runs spread output lengths (--output-jitter,
0.5 by default) so the closed loop reaches the staggered steady state the planner predicts instead of running in
synchronised waves. Watts come from the target's reported energy
and, when the target is on this host, from this host's NVML or RAPL counter (`runs[i].power_w`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import urlparse

from qanat.bench.runner import BenchConfig, run_bench

PHASES = ("prefill", "decode-short", "decode-long")


@dataclass(frozen=True)
class SweepPoint:
    phase: str
    concurrency: int
    input_tokens: int
    output_tokens: int
    num_requests: int


def sweep_points(concurrencies: tuple[int, ...], max_input: int, output_tokens: int) -> list[SweepPoint]:
    """Prefill at 4 prompt lengths, decode at every concurrency (short context) and at 3 (long context)."""
    if max_input < 16 or output_tokens < 4 or not concurrencies:
        raise ValueError("--sweep needs --sweep-max-input >= 16, --output-tokens >= 4 and at least one concurrency")
    levels = sorted(set(concurrencies))
    points = [SweepPoint("prefill", 1, max(8, max_input // d), 4, 4) for d in (8, 4, 2, 1)]
    short = max(16, max_input // 16)
    # 4 x C requests: the first wave (all C arriving at once) is a quarter of the run, below its median.
    points += [SweepPoint("decode-short", c, short, output_tokens, max(4, 4 * c)) for c in levels]
    long_levels = sorted({levels[0], levels[len(levels) // 2], levels[-1]})
    points += [SweepPoint("decode-long", c, max_input // 2, output_tokens, max(4, 4 * c)) for c in long_levels]
    return points


def _local_meter(url: str) -> Any:
    """This host's hardware counter when the target runs here; the CPU-time estimate would meter the client."""
    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    from qanat.energy.meters import open_meter

    for kind in ("nvml", "rapl"):
        try:
            return open_meter(kind)
        except Exception:  # no driver, no counter, no permission: try the next, else none
            continue
    return None


def run_sweep(config: BenchConfig, max_input: int, show_progress: bool = True) -> dict[str, Any]:
    points = sweep_points(config.concurrency, max_input, config.workload.output_tokens)
    meter = _local_meter(config.url)
    merged: dict[str, Any] | None = None
    for i, point in enumerate(points):
        workload = replace(config.workload, input_tokens=point.input_tokens, output_tokens=point.output_tokens,
                           num_requests=point.num_requests, shared_prefix_tokens=0,
                           output_jitter=config.workload.output_jitter if point.phase != "prefill" else 0.0,
                           seed=config.workload.seed + 1000 * i)  # fresh prompts: no prefix-cache hits across runs
        start_j, start_s = (meter.read_joules(), time.monotonic()) if meter else (0.0, 0.0)
        result = run_bench(replace(config, concurrency=(point.concurrency,), rate=(), workload=workload),
                           show_progress=show_progress)
        run = result["runs"][0] | {"phase": point.phase, "workload": asdict(workload)}
        if meter is not None:
            run["power_w"] = (meter.read_joules() - start_j) / (time.monotonic() - start_s)
            run["power_source"] = meter.source
        if merged is None:
            merged = result
            merged["runs"] = []
            merged["prompts"] = []
            merged["config"]["sweep"] = {"max_input_tokens": max_input, "points": [asdict(p) for p in points]}
        merged["runs"].append(run)
    assert merged is not None
    merged["config"]["loads"] = [p.concurrency for p in points]
    return merged
