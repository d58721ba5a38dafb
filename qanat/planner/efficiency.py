"""Efficiency factors: how far below its datasheet a chip runs, per chip class and engine family.

A roofline alone overestimates throughput by 1.4-1.9x; these factors are what separates the datasheet from
a serving engine. Defaults are per chip class (and, where it matters, engine family); a calibration profile
(calibrate.py) replaces them for one chip, engine and precision, and every prediction names which it used.

The defaults were set from a few published measurements marked `tuning` in bench/planner/published.yaml
(docs/planner.md reports the error on the other rows separately, so the figures are not graded on their own
training data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# optimized: TensorRT-LLM, NIM, JetStream, vendor stacks (KV reserved for a request's full length up front);
# vllm: vLLM, SGLang (KV pages on demand, preempting when full); llama.cpp: llama.cpp, qanat, Ollama.
ENGINES = ("optimized", "vllm", "llama.cpp")


@dataclass(frozen=True)
class Efficiency:
    mem: float  # fraction of peak memory bandwidth when streaming weights and KV
    compute: float  # fraction of peak dense FLOPS in large matmuls
    attention: float  # fraction of peak FLOPS in attention
    layer_s: float  # fixed seconds per layer per step (kernel launches and syncs; a pipeline hop on dataflow chips)
    step_s: float  # fixed seconds per step (scheduling, sampling, host work)
    allreduce_s: float  # latency of one tensor-parallel all-reduce
    link: float  # fraction of interconnect bandwidth reached
    quant_mem: float  # extra bandwidth factor for GGUF block quants (dequantising while streaming)
    idle_frac: float  # idle power as a share of TDP when the chip lists no idle figure
    power_mem: float  # share of (TDP - idle) drawn at full memory streaming
    power_compute: float  # share of (TDP - idle) drawn at full compute
    max_batch: int  # running sequences the engine keeps at most
    chunk_tokens: int  # prompt tokens one step takes at most (chunked prefill)
    mem_usable: float  # share of memory for weights + KV (the rest: activations, runtime, fragmentation)
    idle_w: float | None = None  # measured idle watts (a calibration); None: the chip's figure or idle_frac
    kv_reserve: str = "max"  # KV held per running sequence: "max" (prompt + all output) or "mean" (+ half the output)
    token_s: float = 0.0  # fixed seconds per decoded sequence per step (logits, sampling, host bookkeeping)
    power_floor: float = 0.0  # share of (TDP - idle) drawn whenever the chip serves, even while it waits on the host
    # Fraction of peak FLOPS in decode attention (one query per sequence against its cache: vector work, far
    # below the batched prefill kernels on CPUs); 0: the same as `attention`.
    decode_attention: float = 0.0
    # Spread of step times around the model's (sigma of their logarithm): other work on the host, the serving
    # process's own Python between steps. Replays (simulate.py) draw each step's time with it; 0: deterministic.
    step_sigma: float = 0.0

    @property
    def decode_attention_eff(self) -> float:
        return self.decode_attention or self.attention

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Efficiency) -> Efficiency:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown efficiency fields: {', '.join(sorted(unknown))}")
        return replace(base, **data)


_GPU = Efficiency(mem=0.80, compute=0.48, attention=0.30, layer_s=40e-6, step_s=0.3e-3, allreduce_s=10e-6, link=0.70,
                  quant_mem=1.0, idle_frac=0.10, power_mem=0.55, power_compute=0.75, max_batch=256,
                  chunk_tokens=8192, mem_usable=0.90)

# Accelerator power (set from ML.ENERGY's Qwen3-8B runs on H100 and B200, the `tuning` rows of the table): a
# serving chip draws a fifth of its dynamic range even while it waits on the host (clocks up, kernels queued),
# streaming HBM at full rate adds half, and tensor cores at full rate alone reach the power cap (dense GEMMs
# throttle at TDP: H100s serving an 8B model at batch 256 draw 690 of 700 W).
_ACCEL_POWER = {"power_mem": 0.5, "power_compute": 1.2, "power_floor": 0.2}
_GPU_HBM = replace(_GPU, **_ACCEL_POWER)  # type: ignore[arg-type]

CLASS_DEFAULTS: dict[str, Efficiency] = {
    "gpu-hbm": _GPU_HBM,
    "gpu-gddr": replace(_GPU_HBM, mem=0.85, idle_frac=0.15),
    "tpu": replace(_GPU_HBM, mem=0.75, compute=0.45, layer_s=30e-6, step_s=1e-3, allreduce_s=15e-6, idle_frac=0.25),
    "neuron": replace(_GPU_HBM, mem=0.60, compute=0.40, layer_s=50e-6, step_s=1e-3, allreduce_s=20e-6,
                      idle_frac=0.25),
    "asic-hbm": replace(_GPU_HBM, mem=0.70, compute=0.45, idle_frac=0.20),
    # Weights in SRAM spread over many chips: a token's latency is a chain of per-layer hops, not a memory read.
    "sram-dataflow": replace(_GPU, mem=0.50, compute=0.50, layer_s=41.7e-6, step_s=0.0, allreduce_s=0.0,
                             idle_frac=0.30, max_batch=64),
    "wafer-scale": replace(_GPU, mem=0.50, compute=0.40, layer_s=20e-6, step_s=0.0, allreduce_s=0.0, idle_frac=0.30,
                           max_batch=64),
    "cpu-server": replace(_GPU, mem=0.65, compute=0.50, attention=0.30, layer_s=100e-6, step_s=1e-3, quant_mem=0.90,
                          idle_frac=0.30, max_batch=16, chunk_tokens=512, mem_usable=0.85),
    "cpu-edge": replace(_GPU, mem=0.66, compute=0.50, attention=0.30, layer_s=0.9e-3, step_s=1e-3, quant_mem=1.0,
                        idle_frac=0.25, max_batch=4, chunk_tokens=512, mem_usable=0.80),
    "apple-soc": replace(_GPU, mem=0.87, compute=0.62, attention=0.35, layer_s=150e-6, step_s=0.5e-3, quant_mem=0.90,
                         idle_frac=0.04, max_batch=16, chunk_tokens=512, mem_usable=0.75),
    "cpu-host": replace(_GPU, mem=0.50, compute=0.30, attention=0.20, layer_s=100e-6, step_s=2e-3, quant_mem=0.90,
                        idle_frac=0.30, max_batch=16, chunk_tokens=512, mem_usable=0.80),
}

# llama.cpp on a GPU (single stream, no CUDA graphs in the measurements we have): the per-layer cost dominates.
ENGINE_ADJUST: dict[tuple[str, str], dict[str, float | str]] = {
    ("gpu-hbm", "llama.cpp"): {"layer_s": 160e-6, "compute": 0.30, "quant_mem": 0.90, "max_batch": 16,
                               "chunk_tokens": 512},
    ("gpu-gddr", "llama.cpp"): {"layer_s": 160e-6, "compute": 0.30, "quant_mem": 0.90, "max_batch": 16,
                                "chunk_tokens": 512},
}

# vLLM (0.11, synchronous scheduling) spends host time per running sequence and step (scheduling, input
# preparation, sampling, detokenising) while the GPU waits: ~50 us, from ML.ENERGY's Qwen3-8B runs (the step time
# the roofline leaves unexplained, per sequence, at batch 8-128 on H100 and B200).
for _cls in ("gpu-hbm", "gpu-gddr", "tpu", "neuron", "asic-hbm"):
    ENGINE_ADJUST[(_cls, "vllm")] = {"kv_reserve": "mean", "token_s": 50e-6}

# Engines that run on CPUs and Apple chips: only llama.cpp is modelled there.
NATIVE_ENGINE = {"cpu-server": "llama.cpp", "cpu-edge": "llama.cpp", "apple-soc": "llama.cpp", "cpu-host": "llama.cpp"}


def default_engine(chip_class: str) -> str:
    return NATIVE_ENGINE.get(chip_class, "optimized")


def default_efficiency(chip_class: str, engine: str | None = None) -> tuple[Efficiency, str]:
    """The class default for `engine` (None: the class's usual engine), and a label saying so."""
    engine = engine or default_engine(chip_class)
    if engine not in ENGINES:
        raise ValueError(f"engine family must be one of {', '.join(ENGINES)}, got {engine!r}")
    eff = CLASS_DEFAULTS[chip_class]
    adjust = ENGINE_ADJUST.get((chip_class, engine))
    if adjust:
        eff = replace(eff, **adjust)  # type: ignore[arg-type]
    return eff, f"default:{chip_class}/{engine}"


CPU_CLASSES = ("cpu-server", "cpu-edge", "cpu-host")
