"""Calibration recovers known factors from a synthetic bench result, stores a profile, and plan uses it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qanat.bench.report import SCHEMA_VERSION
from qanat.bench.sweep import sweep_points
from qanat.cli import main
from qanat.models.locate import DEFAULT_MODEL_ID, default_model_path
from qanat.planner.calibrate import (
    MIN_DECODE_STEPS,
    Fit,
    Observation,
    decode_steps,
    find_profile,
    fit,
    observations,
    predict_run,
    save_profile,
    usable_runs,
)
from qanat.planner.chips import ChipSpec
from qanat.planner.efficiency import default_efficiency
from qanat.planner.gguf import model_from_gguf
from qanat.planner.model import ModelSpec
from qanat.planner.power import power_curve
from qanat.planner.precision import gguf_precision
from qanat.planner.predict import SIMULATED_OUTPUT_JITTER
from qanat.planner.serving import Engine, Traffic
from qanat.planner.simulate import simulate_closed_loop
from qanat.planner.step import Deployment, StepLoad, StepModel

# A fixed stand-in for this-machine, so the test does not depend on the host it runs on.
HOST = ChipSpec("test-host", "cpu-host", {"fp32": 300e9, "bf16": 300e9, "int8": 1.2e12}, 16e9, 20e9, 40.0, idle_w=5.0)
TRUE = {"mem": 0.42, "compute": 0.21, "attention": 0.09, "decode_attention": 0.01, "step_s": 0.012, "token_s": 0.004}
TRUE_POWER = {"idle_w": 6.0, "power_mem": 0.35, "power_compute": 0.55}


def _setup() -> tuple[ModelSpec, Deployment]:
    model = model_from_gguf(default_model_path())
    assert model.gguf is not None
    precision = gguf_precision(model.gguf.file_type, model.gguf.total_bytes * 8 / model.params_total)
    return model, Deployment(1, precision, 2.0)


def _lockstep_requests(steps: StepModel, batch: int, prompt: int, decodes: int) -> list[dict[str, Any]]:
    """`batch` requests that get their first tokens together and then decode in lockstep, each step taking the step
    model's time at its context: what `decode_steps` reads. Token times only (no output count: `step_variation`
    leaves them out, so the synthetic result's step spread stays 0)."""
    times = [0.1]
    for k in range(1, decodes + 1):
        times.append(times[-1] + steps.time(StepLoad(batch, prompt + k)).total_s)
    return [{"index": i, "ok": True, "start_s": 0.0, "prompt_tokens": prompt, "chunk_times_s": times}
            for i in range(batch)]


def synthetic_result(model: ModelSpec, deploy: Deployment, truth: dict[str, float]) -> dict[str, Any]:
    """A schema-1 `qanat bench --sweep` result whose medians, and decode runs' decode-only steps, are what the model
    predicts with `truth`."""
    base, _ = default_efficiency("cpu-host")
    eff = replace(base, layer_s=0.0, **truth, **TRUE_POWER)  # type: ignore[arg-type]
    curve = power_curve(HOST, eff)
    steps = StepModel(model, HOST, deploy, eff)
    runs = []
    for point in sweep_points((1, 4, 16), 512, 32):
        ob = Observation(point.concurrency, point.input_tokens, point.output_tokens, None, None, 0.0, None,
                         requests=point.num_requests)
        tpot, ttft, tps = predict_run(model, HOST, deploy, eff, ob)
        step = Engine(model, HOST, deploy, eff).closed_loop(point.concurrency, Traffic(point.input_tokens,
                                                            point.output_tokens), eff.max_batch).step
        duration = point.num_requests * point.output_tokens / tps
        runs.append({
            "load": point.concurrency, "phase": point.phase,
            "workload": {"input_tokens": point.input_tokens, "output_tokens": point.output_tokens},
            "aggregate": {"completed": point.num_requests, "failed": 0, "duration_s": duration,
                          "total_input_tokens": point.input_tokens * point.num_requests,
                          "total_output_tokens": point.output_tokens * point.num_requests,
                          "median_tpot_ms": tpot * 1e3, "median_ttft_ms": ttft * 1e3, "output_throughput": tps,
                          "energy_joules": curve.at(step) * duration},
            "requests": (_lockstep_requests(steps, point.concurrency, point.input_tokens, point.output_tokens - 1)
                         if point.phase != "prefill" else []),
        })
    config = {"mode": "closed", "model": DEFAULT_MODEL_ID, "workload": {"input_tokens": 0, "output_tokens": 0}}
    return {"schema_version": SCHEMA_VERSION, "runs": runs, "config": config}


@pytest.fixture(scope="module")
def fitted() -> Fit:
    """One fit for the module (a fit takes seconds): from the class default, far from the truth."""
    model, deploy = _setup()
    return fit(model, HOST, deploy, default_efficiency("cpu-host")[0],
               observations(synthetic_result(model, deploy, TRUE)))


def test_fit_recovers_known_factors(fitted: Fit) -> None:
    model, deploy = _setup()
    result = synthetic_result(model, deploy, TRUE)
    e = fitted.efficiency
    assert e.mem == pytest.approx(TRUE["mem"], rel=0.03)
    assert e.compute == pytest.approx(TRUE["compute"], rel=0.03)
    assert e.step_s == pytest.approx(TRUE["step_s"], rel=0.03)
    assert e.token_s == pytest.approx(TRUE["token_s"], rel=0.03)
    assert e.attention == pytest.approx(TRUE["attention"], rel=0.05)
    assert e.decode_attention == pytest.approx(TRUE["decode_attention"], rel=0.05)
    assert e.idle_w == pytest.approx(TRUE_POWER["idle_w"], rel=0.05)
    assert e.power_mem == pytest.approx(TRUE_POWER["power_mem"], rel=0.05)
    assert e.power_compute == pytest.approx(TRUE_POWER["power_compute"], rel=0.05)
    assert e.power_floor == 0.0  # the fitted intercept is the whole floor
    assert fitted.residuals["tpot_s"]["median"] < 0.01
    assert fitted.step_residuals["median"] < 0.01
    assert fitted.step_residuals["n"] == sum(1 for r in result["runs"] if r["phase"] != "prefill")
    assert fitted.used_runs == len(result["runs"])


def test_decode_steps_are_the_full_batch_steps_without_a_prompt() -> None:
    """Three clients, 100-token prompts. Counted: the steps in which all three requests got a token that was not
    their first (30 ms each). Not counted: the 15 steps in which two decode while the third client is between
    requests (20 ms each: as many as the counted ones, so counting them would move the median) and the step that
    carries the third client's next prompt (200 ms, a first token in it)."""
    tokens: dict[int, list[float]] = {0: [], 1: [], 2: [], 3: []}
    counted_contexts: list[float] = []
    t = 0.1
    for r in (0, 1, 2):
        tokens[r].append(t)
    for _ in range(11):  # all three decode
        t += 0.03
        for r in (0, 1, 2):
            tokens[r].append(t)
        counted_contexts.append(sum(100 + len(tokens[r]) - 1 for r in (0, 1, 2)) / 3)
    for _ in range(15):  # request 2 has ended; its client's next request is not in yet
        t += 0.02
        for r in (0, 1):
            tokens[r].append(t)
    t += 0.2  # request 3's prompt rides in this step
    for r in (0, 1, 3):
        tokens[r].append(t)
    for _ in range(5):
        t += 0.03
        for r in (0, 1, 3):
            tokens[r].append(t)
        counted_contexts.append(sum(100 + len(tokens[r]) - 1 for r in (0, 1, 3)) / 3)
    # Receipt jitter within a step: half a millisecond per stream.
    requests = [{"index": r, "ok": True, "start_s": 0.0, "prompt_tokens": 100,
                 "chunk_times_s": [x + 0.0005 * (r % 3) for x in times]} for r, times in tokens.items()]
    measured = decode_steps({"load": 3, "requests": requests})
    assert measured is not None
    assert measured[0] == pytest.approx(0.03, abs=1e-3)
    assert measured[1] == pytest.approx(sum(counted_contexts) / len(counted_contexts))
    # Too few such steps: no measurement rather than the median of a handful.
    few = [{"index": r, "ok": True, "start_s": 0.0, "prompt_tokens": 100,
            "chunk_times_s": [0.1 + 0.03 * k for k in range(MIN_DECODE_STEPS)]} for r in range(3)]
    assert decode_steps({"load": 3, "requests": few}) is None


def test_saturated_runs_are_left_out() -> None:
    model, deploy = _setup()
    obs = observations(synthetic_result(model, deploy, TRUE))
    usable, skipped = usable_runs(obs, 4)
    assert {o.concurrency for o in usable} == {1, 4}
    assert len(skipped) == sum(1 for o in obs if o.concurrency == 16)
    assert all("> max batch 4" in reason for reason in skipped)


def test_profile_round_trip_and_plan_says_calibrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("QANAT_PLANNER_HOME", str(tmp_path))
    model, deploy = _setup()
    result_path = tmp_path / "result.json"
    result_path.write_text(json.dumps(synthetic_result(model, deploy, TRUE)))
    catalog = tmp_path / "chips.yaml"
    catalog.write_text("chips:\n  - name: test-host\n    class: cpu-host\n    peak_tflops: {fp32: 0.3, bf16: 0.3, "
                       "int8: 1.2}\n    memory_gb: 16\n    memory_bandwidth_gbs: 20\n    tdp_w: 40\n    idle_w: 5\n")
    assert main(["plan", "--calibrate", str(result_path), "--chip", "test-host", "--catalog", str(catalog)]) == 0
    out = capsys.readouterr().out
    assert "calibrated test-host / qanat / Q4_1" in out
    profile = find_profile("test-host", "Q4_1")
    assert profile is not None and profile["efficiency"]["mem"] == pytest.approx(TRUE["mem"], rel=0.03)
    assert main(["plan", "--chip", "test-host", "--catalog", str(catalog), "--concurrency", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["sources"]["efficiency"].startswith("calibrated:qanat profile")
    assert set(plan["error_band"]) >= {"tpot_s", "ttft_s"}
    assert plan["error_band"]["tpot_s"]["median"] < 0.01  # the band is the fit's own residual now
    # The calibrated prediction is the true factors' closed loop, replayed step by step as plan does (output
    # lengths +/-50 %, first wave left out).
    synth = next(r for r in synthetic_result(model, deploy, TRUE)["runs"] if r["load"] == 16)
    prompt = synth["workload"]["input_tokens"]
    assert main(["plan", "--chip", "test-host", "--catalog", str(catalog), "--concurrency", "16", "--input-tokens",
                 str(prompt), "--output-tokens", "32", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert "replayed step by step" in again["sources"]["queue model"]
    truth = replace(default_efficiency("cpu-host")[0], layer_s=0.0, **TRUE, **TRUE_POWER)  # type: ignore[arg-type]
    expected = simulate_closed_loop(Engine(model, HOST, deploy, truth), Traffic(prompt, 32), 16,
                                    batch_cap=truth.max_batch, chunk=truth.chunk_tokens,
                                    output_jitter=SIMULATED_OUTPUT_JITTER)
    assert again["tpot_s"] == pytest.approx(expected.tpot_s, rel=0.02)
    assert again["ttft_s"] == pytest.approx(expected.ttft_s, rel=0.03)
    assert main(["plan", "--chip", "test-host", "--catalog", str(catalog), "--no-profile", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"]["efficiency"] == "default:cpu-host/llama.cpp"


def test_profiles_are_keyed_by_chip_engine_and_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         fitted: Fit) -> None:
    monkeypatch.setenv("QANAT_PLANNER_HOME", str(tmp_path))
    save_profile(HOST, "qanat", "Q4_1", "m", fitted, "r.json")
    assert find_profile("test-host", "Q4_1", "qanat") is not None
    assert find_profile("test-host", "Q4_1", "vllm") is None
    assert find_profile("test-host", "Q8_0") is None
    assert find_profile("other-host", "Q4_1") is None


def test_calibration_needs_closed_loop_runs() -> None:
    with pytest.raises(ValueError, match="closed-loop"):
        observations({"config": {"mode": "open"}, "runs": []})
