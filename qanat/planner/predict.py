"""One prediction per chip: does it fit, latency, throughput, SLO-limited concurrency, power, joules, price.

Every figure carries where it came from (datasheet, GGUF, catalog, default efficiency or calibration profile)
and an error band from the validation against published measurements (docs/planner.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qanat.planner.chips import ChipSpec
from qanat.planner.efficiency import Efficiency
from qanat.planner.model import ModelSpec
from qanat.planner.power import power_curve
from qanat.planner.precision import Precision
from qanat.planner.serving import Engine, OperatingPoint, Traffic
from qanat.planner.simulate import simulate_closed_loop
from qanat.planner.step import Deployment

# Validation error without calibration, |predicted - measured| / measured: (median, p90) over the held-out rows of
# bench/planner/published.yaml (all rows where fewer than 10 are held out), as bench/planner_validate.py prints
# them (docs/planner.md); tests/planner/test_validation.py keeps the two in step.
ERROR_BANDS: dict[str, tuple[float, float]] = {
    "output_tps": (0.12, 0.40), "tpot_s": (0.08, 0.36), "ttft_s": (0.09, 0.27), "joules_per_token": (0.18, 0.42),
}


# Output lengths of simulated closed loops vary this much around the mean (as `qanat bench --sweep` sends them): equal
# lengths make a closed loop run in synchronised waves, a benchmark artefact real traffic does not have.
SIMULATED_OUTPUT_JITTER = 0.5

# Chip classes with published measurements in that table; the others' defaults are judgment, so no band is claimed.
VALIDATED_CLASSES = frozenset({"gpu-hbm", "apple-soc", "cpu-edge", "sram-dataflow", "wafer-scale"})


@dataclass(frozen=True)
class Workload:
    input_tokens: int = 1000
    output_tokens: int = 200
    concurrency: int | None = None  # closed loop; None with rate None: the largest concurrency meeting the SLOs
    rate: float | None = None  # open loop, requests/s
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    target_rps: float | None = None  # load to size the fleet for (requests/s)
    fleet_chips: int | None = None  # chips available: replicas = fleet_chips // chips per replica

    def __post_init__(self) -> None:
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError("input and output tokens must be >= 1")
        if self.concurrency is not None and self.rate is not None:
            raise ValueError("give a concurrency (closed loop) or a request rate (open loop), not both")
        if (self.concurrency is not None and self.concurrency < 1) or (self.rate is not None and self.rate <= 0):
            raise ValueError("concurrency must be >= 1 and rate > 0")

    @property
    def traffic(self) -> Traffic:
        return Traffic(self.input_tokens, self.output_tokens)


@dataclass
class Prediction:
    chip: str
    model: str
    precision: str
    chips_per_replica: int
    fits: bool
    weights_gb: float
    kv_gb_per_sequence: float
    memory_gb: float  # usable per replica
    batch_cap: int  # sequences one replica runs at most (engine cap or KV capacity)
    batch_cap_reason: str  # "engine" or "kv-capacity"
    regime: str
    concurrency: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    output_tps: float | None = None
    output_tps_per_user: float | None = None
    output_tps_per_chip: float | None = None
    queue_wait_s: float | None = None
    saturated: bool = False
    max_concurrency_slo: int | None = None  # largest concurrency meeting the TTFT/TPOT targets (None: none does)
    power_w: float | None = None  # all chips of the replica
    joules_per_token: float | None = None
    usd_per_million_tokens: float | None = None
    replicas_needed: int | None = None
    chips_needed: int | None = None
    fleet_replicas: int | None = None
    fleet_output_tps: float | None = None  # all replicas of --chips at this point
    sources: dict[str, str] = field(default_factory=dict)
    error_band: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # latency-throughput points for plots

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["error_band"] = {k: {"median": v[0], "p90": v[1]} for k, v in self.error_band.items()}
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in out.items()}


WEIGHTS_SHARE = 0.75  # default sizing: weights take at most this share of usable memory; the rest is KV cache


def min_chips_to_fit(model: ModelSpec, chip: ChipSpec, precision: Precision, kv_bytes: float, context: int,
                     eff: Efficiency) -> int:
    """Default chips per replica. HBM/DRAM chips: the fewest (a power of two, for tensor parallelism) that leave a
    quarter of memory to the KV cache; SRAM chips (pipelined one by one):
    the fewest that hold weights + one sequence."""
    weights = model.total_weight_bytes(precision)
    per_chip = chip.memory_bytes * eff.mem_usable
    if chip.sram_is_memory:
        return max(1, math.ceil((weights + model.kv_bytes(kv_bytes, context)) / per_chip))
    chips = max(math.ceil(weights / (per_chip * WEIGHTS_SHARE)), 1)
    return int(2 ** math.ceil(math.log2(chips)))


def _capacity(model: ModelSpec, chip: ChipSpec, deploy: Deployment, eff: Efficiency, context: int,
              output_tokens: int) -> tuple[float, float, float, int, str]:
    weights = model.total_weight_bytes(deploy.precision)
    per_seq = model.kv_bytes(deploy.kv_bytes, context)
    if eff.kv_reserve == "mean":  # paged on demand: a running sequence holds its prompt and half its output
        per_seq = model.kv_bytes(deploy.kv_bytes, context - output_tokens / 2)
    usable = chip.memory_bytes * eff.mem_usable * deploy.chips
    kv_seqs = int((usable - weights) // per_seq) if usable > weights else 0
    if kv_seqs < eff.max_batch:
        return weights, per_seq, usable, kv_seqs, "kv-capacity"
    return weights, per_seq, usable, eff.max_batch, "engine"


def _meets(op: OperatingPoint, w: Workload) -> bool:
    ttft_ok = w.ttft_slo_s is None or op.ttft_s <= w.ttft_slo_s
    return ttft_ok and (w.tpot_slo_s is None or op.tpot_s <= w.tpot_slo_s) and not op.saturated


def max_concurrency(engine: Engine, w: Workload, cap: int) -> int | None:
    """Largest concurrency (1..cap) whose steady state meets the SLOs; latency grows with load, so bisect."""
    if not _meets(engine.closed_loop(1, w.traffic, cap), w):
        return None
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _meets(engine.closed_loop(mid, w.traffic, cap), w) else (lo, mid - 1)
    return lo


def latency_curve(engine: Engine, w: Workload, cap: int, chips: int) -> list[dict[str, float]]:
    points, c = [], 1
    while True:
        op = engine.closed_loop(c, w.traffic, cap)
        points.append({"concurrency": c, "tpot_ms": op.tpot_s * 1e3, "ttft_ms": op.ttft_s * 1e3,
                       "output_tps_per_chip": op.output_tps / chips})
        if c >= cap:
            return points
        c = min(cap, c * 2)


def predict(model: ModelSpec, chip: ChipSpec, deploy: Deployment, eff: Efficiency, w: Workload,
            sources: dict[str, str], calibrated: bool = False,
            error_band: dict[str, tuple[float, float]] | None = None, simulate: bool = False) -> Prediction:
    """`simulate`: a closed loop at a given concurrency is replayed step by step (simulate.py: the engine's
    batching of prompts, arrivals at step boundaries) instead of the analytic queue model; calibrated predictions
    use it, since the calibration was fitted with it."""
    context = w.input_tokens + w.output_tokens
    weights, per_seq, usable, cap, cap_reason = _capacity(model, chip, deploy, eff, context, w.output_tokens)
    pred = Prediction(
        chip=chip.name, model=model.name, precision=deploy.precision.name, chips_per_replica=deploy.chips,
        fits=cap >= 1, weights_gb=weights / 1e9, kv_gb_per_sequence=per_seq / 1e9, memory_gb=usable / 1e9,
        batch_cap=max(cap, 0), batch_cap_reason=cap_reason, regime="does-not-fit", sources=dict(sources),
        error_band=dict(error_band if error_band is not None else (
            {} if calibrated or chip.chip_class not in VALIDATED_CLASSES else ERROR_BANDS)),
    )
    if not calibrated and chip.chip_class not in VALIDATED_CLASSES:
        pred.notes.append(f"no published measurement validates the {chip.chip_class} defaults, so no error band: "
                          "calibrate (qanat bench --sweep, then qanat plan --calibrate)")
    if not pred.fits:
        pred.notes.append(f"needs {(weights + per_seq) / 1e9:.1f} GB for weights and one {context}-token sequence; "
                          f"{deploy.chips} x {chip.name} offer {usable / 1e9:.1f} GB usable")
        return pred
    engine = Engine(model, chip, deploy, eff)
    pred.max_concurrency_slo = max_concurrency(engine, w, cap)
    if w.rate is not None:
        op = engine.open_loop(w.rate, w.traffic, cap)
    else:
        concurrency = w.concurrency or pred.max_concurrency_slo or 1
        op = engine.closed_loop(concurrency, w.traffic, cap)
    pred.concurrency = op.concurrency
    pred.ttft_s, pred.tpot_s, pred.queue_wait_s, pred.saturated = op.ttft_s, op.tpot_s, op.queue_wait_s, op.saturated
    tps, tpot = op.output_tps, op.tpot_s
    if simulate and w.rate is None and w.concurrency is not None:
        sim = simulate_closed_loop(engine, w.traffic, w.concurrency, batch_cap=cap, chunk=eff.chunk_tokens,
                                   output_jitter=SIMULATED_OUTPUT_JITTER)
        pred.ttft_s, tpot, tps = sim.ttft_s, sim.tpot_s, sim.output_tps
        pred.sources["queue model"] = (f"closed loop replayed step by step ({sim.requests} requests pooled over "
                                       f"replays, output lengths +/-{SIMULATED_OUTPUT_JITTER:.0%}, step times "
                                       f"spread {eff.step_sigma:.2f} log-sigma)")
    pred.output_tps, pred.tpot_s = tps, tpot
    pred.output_tps_per_user = 1 / tpot
    pred.output_tps_per_chip = tps / deploy.chips
    pred.regime = (("kv-capacity-bound" if cap_reason == "kv-capacity" else "saturated")
                   if op.saturated else op.step.regime)
    curve = power_curve(chip, eff)
    pred.power_w = curve.at(op.step) * deploy.chips
    if tps > 0:
        pred.joules_per_token = pred.power_w / tps
        if chip.price_per_hour is not None:
            pred.usd_per_million_tokens = chip.price_per_hour * deploy.chips / 3600 / tps * 1e6
    if w.target_rps is not None:
        best = max_concurrency(engine, w, cap) if (w.ttft_slo_s or w.tpot_slo_s) else cap
        if best:
            rate = engine.closed_loop(best, w.traffic, cap).request_rate
            pred.replicas_needed = math.ceil(w.target_rps / rate)
            pred.chips_needed = pred.replicas_needed * deploy.chips
        else:
            pred.notes.append("no concurrency meets the latency targets: no fleet size does")
    if w.fleet_chips is not None:
        pred.fleet_replicas = w.fleet_chips // deploy.chips
        pred.fleet_output_tps = pred.fleet_replicas * tps
        if not pred.fleet_replicas:
            pred.notes.append(f"{w.fleet_chips} chips hold no replica of {deploy.chips}")
    if op.saturated:
        pred.notes.append(f"saturated: {op.concurrency:g} requests for {cap} slots ({cap_reason}); "
                          f"TTFT is mostly queue wait ({op.queue_wait_s:.2f} s)")
    pred.curve = latency_curve(engine, w, cap, deploy.chips)
    return pred
