"""Each regime, a model that does not fit, mixture-of-experts, the queue model and the power curve."""

from __future__ import annotations

import math

import pytest

from qanat.planner.catalog import Catalog
from qanat.planner.efficiency import default_efficiency
from qanat.planner.power import power_curve
from qanat.planner.precision import get_precision
from qanat.planner.predict import Prediction, Workload, min_chips_to_fit, predict
from qanat.planner.serving import Engine, Traffic
from qanat.planner.step import Deployment, StepLoad

CATALOG = Catalog()


def plan(model: str, chip: str, precision: str = "bf16", tp: int | None = None, kv: float = 2.0,
         max_batch: int | None = None, **workload: object) -> Prediction:
    m, c = CATALOG.model(model), CATALOG.chip(chip)
    eff, label = default_efficiency(c.chip_class)
    if max_batch is not None:
        from dataclasses import replace

        eff = replace(eff, max_batch=max_batch)
    w = Workload(**workload)  # type: ignore[arg-type]
    p = get_precision(precision)
    chips = tp or min_chips_to_fit(m, c, p, kv, w.input_tokens + w.output_tokens, eff)
    return predict(m, c, Deployment(chips, p, kv), eff, w, {"efficiency": label})


def test_memory_bound_decode_is_weights_over_bandwidth() -> None:
    pred = plan("Llama-3.1-8B", "H100-SXM", input_tokens=100, output_tokens=100, concurrency=1)
    assert pred.regime == "memory-bound"
    m, c = CATALOG.model("Llama-3.1-8B"), CATALOG.chip("H100-SXM")
    eff, _ = default_efficiency("gpu-hbm")
    weights_s = m.step_weight_bytes(get_precision("bf16"), 1) / (c.memory_bw * eff.mem)
    # One sequence: TPOT is the weight stream plus fixed per-step and per-layer costs (KV is small at 150 tokens).
    floor = weights_s + eff.step_s + eff.layer_s * m.n_layers
    assert floor < pred.tpot_s < floor * 1.05  # type: ignore[operator]


def test_compute_bound_when_prompts_dominate() -> None:
    pred = plan("Llama-3.1-8B", "H100-SXM", "fp8", kv=1.0, input_tokens=2048, output_tokens=16, concurrency=64)
    assert pred.regime == "compute-bound"


def test_overhead_bound_on_sram_dataflow_chips() -> None:
    pred = plan("Llama-3.1-8B", "Groq-LPU", "fp8", input_tokens=100, output_tokens=100, concurrency=1)
    assert pred.regime == "overhead-bound"
    assert pred.chips_per_replica == math.ceil((8.03e9 * 1.004 + 1) / (230e6 * 0.9)) or pred.chips_per_replica > 30
    assert pred.output_tps_per_user == pytest.approx(1 / (32 * 41.7e-6), rel=0.05)  # the per-layer hop chain


def test_interconnect_bound_over_pcie_tensor_parallelism() -> None:
    pred = plan("Llama-3.1-70B", "L40S", tp=8, input_tokens=4096, output_tokens=4, concurrency=8)
    assert pred.regime == "interconnect-bound"


def test_kv_capacity_bound_and_saturated_ttft_is_queue_wait() -> None:
    below = plan("Llama-3.3-70B", "H100-SXM", "fp8", tp=2, kv=1.0, input_tokens=5000, output_tokens=500,
                 concurrency=25)
    above = plan("Llama-3.3-70B", "H100-SXM", "fp8", tp=2, kv=1.0, input_tokens=5000, output_tokens=500,
                 concurrency=200)
    assert below.batch_cap_reason == "kv-capacity" and 25 < below.batch_cap < 200
    assert not below.saturated and below.queue_wait_s == 0
    assert above.saturated and above.regime == "kv-capacity-bound"
    assert above.queue_wait_s > 10 * below.ttft_s  # type: ignore[operator]
    assert above.ttft_s == pytest.approx(above.queue_wait_s + plan(  # type: ignore[operator]
        "Llama-3.3-70B", "H100-SXM", "fp8", tp=2, kv=1.0, input_tokens=5000, output_tokens=500,
        concurrency=above.batch_cap).ttft_s, rel=1e-6)
    # Past the cap, more requests add wait, not throughput.
    assert above.output_tps == pytest.approx(plan("Llama-3.3-70B", "H100-SXM", "fp8", tp=2, kv=1.0, input_tokens=5000,
                                                  output_tokens=500, concurrency=400).output_tps, rel=1e-6)


def test_saturated_at_the_engine_batch_cap() -> None:
    pred = plan("Llama-3.1-8B", "H100-SXM", max_batch=8, input_tokens=200, output_tokens=100, concurrency=32)
    assert pred.batch_cap == 8 and pred.batch_cap_reason == "engine"
    assert pred.saturated and pred.regime == "saturated"
    assert any("saturated" in note for note in pred.notes)


def test_model_that_does_not_fit() -> None:
    pred = plan("Llama-3.1-405B", "L4", tp=1, concurrency=1)
    assert not pred.fits and pred.regime == "does-not-fit"
    assert pred.tpot_s is None and pred.output_tps is None
    assert any("GB usable" in note for note in pred.notes)
    # The default sizing finds how many it takes instead.
    assert plan("Llama-3.1-405B", "H100-SXM", "fp8", kv=1.0, concurrency=1).chips_per_replica == 8


def test_mixture_of_experts_reads_only_the_experts_it_routes_to() -> None:
    m = CATALOG.model("Mixtral-8x7B")
    bf16 = get_precision("bf16")
    dense, experts, _ = m.weight_bytes(bf16)
    one = m.step_weight_bytes(bf16, 1)
    assert one == pytest.approx(dense + experts * 2 / 8)  # top-2 of 8
    lookup_rows = m.weight_bytes(bf16)[2] * 256 / m.vocab
    assert m.step_weight_bytes(bf16, 256) == pytest.approx(dense + experts + lookup_rows, rel=1e-6)  # all experts
    single = plan("Mixtral-8x7B", "H100-SXM", tp=2, input_tokens=100, output_tokens=100, concurrency=1)
    dense70 = plan("Llama-2-70B", "H100-SXM", tp=2, input_tokens=100, output_tokens=100, concurrency=1)
    assert single.weights_gb == pytest.approx(m.params_total * 2 / 1e9, rel=0.01)  # all experts stay resident
    assert single.tpot_s < 0.5 * dense70.tpot_s  # type: ignore[operator]
    # DeepSeek-V3: 37 B active of 671 B, and MLA's small cache.
    ds = plan("DeepSeek-V3", "H200", "fp8", kv=1.0, input_tokens=1000, output_tokens=200, concurrency=1)
    assert ds.fits and ds.chips_per_replica == 8 and ds.kv_gb_per_sequence < 0.1


def test_open_loop_queue_grows_then_saturates() -> None:
    m, c = CATALOG.model("Llama-3.1-8B"), CATALOG.chip("H100-SXM")
    eff, _ = default_efficiency("gpu-hbm")
    engine = Engine(m, c, Deployment(1, get_precision("bf16"), 2.0), eff)
    traffic = Traffic(2000, 200)
    capacity = engine.running_point(eff.max_batch, traffic).request_rate
    light, heavy = engine.open_loop(0.1 * capacity, traffic, eff.max_batch), engine.open_loop(
        0.9 * capacity, traffic, eff.max_batch)
    assert light.request_rate == pytest.approx(0.1 * capacity, rel=0.01)
    assert heavy.request_rate == pytest.approx(0.9 * capacity, rel=0.01)
    assert light.ttft_s < heavy.ttft_s and light.tpot_s < heavy.tpot_s
    over = engine.open_loop(1.1 * capacity, traffic, eff.max_batch)
    assert over.saturated and math.isinf(over.ttft_s)


def test_slo_search_and_fleet_sizing() -> None:
    pred = plan("Llama-3.1-8B", "H100-SXM", input_tokens=1000, output_tokens=200, ttft_slo_s=0.5, tpot_slo_s=0.02,
                target_rps=50)
    assert pred.max_concurrency_slo is not None and 1 < pred.max_concurrency_slo < pred.batch_cap
    assert pred.tpot_s <= 0.02 and pred.ttft_s <= 0.5  # type: ignore[operator]
    worse = plan("Llama-3.1-8B", "H100-SXM", input_tokens=1000, output_tokens=200,
                 concurrency=pred.max_concurrency_slo + 8, ttft_slo_s=0.5, tpot_slo_s=0.02)
    assert worse.tpot_s > 0.02 or worse.ttft_s > 0.5  # type: ignore[operator]
    per_replica = pred.output_tps / 200  # type: ignore[operator]
    assert pred.replicas_needed == math.ceil(50 / per_replica - 1e-9)
    assert pred.usd_per_million_tokens == pytest.approx(2.99 / 3600 / pred.output_tps * 1e6)  # type: ignore[operator]


def test_power_sits_between_idle_and_tdp_and_below_tdp_when_memory_bound() -> None:
    # ML.ENERGY: Llama-3.1-8B on one B200 under vLLM never passes 69 % of its TDP (639-691 W at batch 8-2048).
    m, c = CATALOG.model("Llama-3.1-8B"), CATALOG.chip("B200")
    eff, _ = default_efficiency("gpu-hbm", "vllm")
    engine = Engine(m, c, Deployment(1, get_precision("bf16"), 2.0), eff)
    curve = power_curve(c, eff)
    for batch in (8, 32, 128):
        watts = curve.at(engine.step(StepLoad(batch, 500)))
        assert c.idle_w < watts < 0.70 * c.tdp_w  # type: ignore[operator]
    # A serving chip never drops to idle: clocks stay up while it waits on the host.
    assert curve.watts(0, 0) == pytest.approx(c.idle_w + eff.power_floor * (c.tdp_w - c.idle_w))  # type: ignore[operator]
    assert curve.watts(0, 0) > c.idle_w  # type: ignore[operator]
    assert curve.watts(1, 1) == c.tdp_w  # capped at TDP
    assert curve.watts(0, 1) == c.tdp_w  # tensor cores at full rate alone reach the cap


def test_host_bound_steps_draw_less_than_gpu_bound_ones() -> None:
    # The per-sequence host cost (vLLM's scheduler and sampling) leaves the GPU waiting: the same batch draws less
    # power, and more joules per token, than on an engine without it.
    m, c = CATALOG.model("Llama-3.1-8B"), CATALOG.chip("H100-SXM")
    lean, _ = default_efficiency("gpu-hbm", "optimized")
    hosty, _ = default_efficiency("gpu-hbm", "vllm")
    assert hosty.token_s > lean.token_s == 0
    deploy = Deployment(1, get_precision("bf16"), 2.0)
    load = StepLoad(128, 500)
    step_lean, step_host = Engine(m, c, deploy, lean).step(load), Engine(m, c, deploy, hosty).step(load)
    assert step_host.total_s > step_lean.total_s
    assert power_curve(c, hosty).at(step_host) < power_curve(c, lean).at(step_lean)
    joules = [power_curve(c, e).at(s) * s.total_s / 128 for e, s in ((lean, step_lean), (hosty, step_host))]
    assert joules[1] > joules[0]


def test_error_bands_only_where_validated() -> None:
    validated = plan("Llama-3.1-8B", "H100-SXM", concurrency=4)
    assert set(validated.error_band) == {"output_tps", "tpot_s", "ttft_s", "joules_per_token"}
    unvalidated = plan("Llama-3.1-8B", "TPU-v6e", concurrency=4)
    assert unvalidated.error_band == {}
    assert any("no published measurement validates the tpu defaults" in n for n in unvalidated.notes)


@pytest.mark.parametrize(("model", "chip", "precision", "running", "prompt", "output"), [
    ("Llama-3.1-8B", "H100-SXM", "fp8", 64, 1000, 200),
    ("Qwen3-30B-A3B", "B200", "fp4", 2048, 128, 128),  # MoE: bytes per step rise fast, then flatten
    ("Llama-3.3-70B", "H100-SXM", "fp8", 50, 5000, 500),
])
def test_closed_loop_holds_the_requested_population(model: str, chip: str, precision: str, running: int,
                                                    prompt: int, output: int) -> None:
    from dataclasses import replace

    m, c = CATALOG.model(model), CATALOG.chip(chip)
    eff = replace(default_efficiency(c.chip_class)[0], max_batch=4096)
    tp = 2 if model == "Llama-3.3-70B" else 1
    engine = Engine(m, c, Deployment(tp, get_precision(precision), 1.0), eff)
    op = engine.running_point(running, Traffic(prompt, output))
    # Little's law, recomputed from the point's own figures: completion rate x time in system = population.
    assert op.request_rate * (op.ttft_s + (output - 1) * op.tpot_s) == pytest.approx(running, rel=1e-3)
