"""`qanat bench --sweep`: the points it measures and how its runs merge into one schema-1 result."""

from __future__ import annotations

from typing import Any

import pytest

from qanat.bench import sweep
from qanat.bench.report import SCHEMA_VERSION, summary_markdown
from qanat.bench.runner import BenchConfig
from qanat.bench.workload import WorkloadSpec


def test_points_cover_prefill_and_two_decode_contexts() -> None:
    points = sweep.sweep_points((16, 1, 4), 1024, 64)
    prefill = [p for p in points if p.phase == "prefill"]
    assert [p.input_tokens for p in prefill] == [128, 256, 512, 1024] and {p.concurrency for p in prefill} == {1}
    short = [p for p in points if p.phase == "decode-short"]
    long = [p for p in points if p.phase == "decode-long"]
    assert [p.concurrency for p in short] == [1, 4, 16] and {p.input_tokens for p in short} == {64}
    assert [p.concurrency for p in long] == [1, 4, 16] and {p.input_tokens for p in long} == {512}
    assert all(p.num_requests >= 4 * p.concurrency for p in short + long)
    # The calibration procedure's ladder (docs/planner.md): decode at five batch sizes, long context at three.
    ladder = sweep.sweep_points((1, 2, 4, 8, 16), 384, 24)
    assert [p.concurrency for p in ladder if p.phase == "decode-short"] == [1, 2, 4, 8, 16]
    assert [p.concurrency for p in ladder if p.phase == "decode-long"] == [1, 4, 16]
    with pytest.raises(ValueError):
        sweep.sweep_points((), 1024, 64)


def test_runs_merge_with_their_own_workloads(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[BenchConfig] = []

    def fake_run_bench(config: BenchConfig, show_progress: bool = True) -> dict[str, Any]:
        seen.append(config)
        load = config.concurrency[0]
        aggregate = {"completed": 4, "failed": 0, "errors_by_kind": {}, "output_throughput": 10.0 * load}
        return {"schema_version": SCHEMA_VERSION, "prompts": [{"text": "x"}],
                "config": {"url": config.url, "model": "m", "endpoint": "chat", "mode": "closed", "loads": [load],
                           "workload": {"dataset": "synthetic", "input_tokens": config.workload.input_tokens,
                                        "output_tokens": config.workload.output_tokens, "shared_prefix_tokens": 0,
                                        "seed": config.workload.seed},
                           "prompt_lengths_exact": True},
                "environment": {"started_at": "now", "host": "h"},
                "runs": [{"load": load, "aggregate": aggregate, "requests": []}]}

    monkeypatch.setattr(sweep, "run_bench", fake_run_bench)
    config = BenchConfig(url="http://example.invalid/v1", concurrency=(1, 2),
                         workload=WorkloadSpec(output_tokens=8, output_jitter=0.5))
    result = sweep.run_sweep(config, 256, show_progress=False)
    points = sweep.sweep_points((1, 2), 256, 8)
    assert len(result["runs"]) == len(points) == len(seen)
    assert [r["phase"] for r in result["runs"]] == [p.phase for p in points]
    assert [r["workload"]["input_tokens"] for r in result["runs"]] == [p.input_tokens for p in points]
    assert len({c.workload.seed for c in seen}) == len(seen)  # fresh prompts per run: no prefix-cache reuse
    jitter = {(p.phase, c.workload.output_jitter) for p, c in zip(points, seen, strict=True)}
    assert jitter == {("prefill", 0.0), ("decode-short", 0.5), ("decode-long", 0.5)}
    assert result["config"]["loads"] == [p.concurrency for p in points] and result["config"]["sweep"]
    assert "power_w" not in result["runs"][0]  # not a loopback target: no local meter
    assert "decode-long 2 (128/8)" in summary_markdown(result)


def test_output_jitter_spreads_lengths_and_keeps_prompts() -> None:
    from qanat.bench.workload import build_prompts

    fixed = build_prompts(WorkloadSpec(num_requests=200, output_tokens=100), None)
    jittered = build_prompts(WorkloadSpec(num_requests=200, output_tokens=100, output_jitter=0.5), None)
    assert [p.text for p in fixed] == [p.text for p in jittered]
    assert all(p.output_tokens is None for p in fixed)
    lengths = [p.output_tokens or 0 for p in jittered]
    assert min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 50
    assert abs(sum(lengths) / len(lengths) - 100) < 6
    with pytest.raises(ValueError, match="output-jitter"):
        WorkloadSpec(output_jitter=1.0)
