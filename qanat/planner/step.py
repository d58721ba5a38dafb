"""One engine step as a roofline per component: weights, KV reads, attention, tensor-parallel communication, and
fixed overheads. Each component takes max(memory time, compute time); components run one after the other.

A step carries `decode_seqs` sequences advancing one token each plus `prefill_tokens` prompt tokens (chunked
prefill: token accounting, not phases). Times are seconds; bytes and FLOPs are per replica, split over `tp` chips.
"""

from __future__ import annotations

from dataclasses import dataclass

from qanat.planner.chips import ChipSpec
from qanat.planner.efficiency import CPU_CLASSES, Efficiency
from qanat.planner.model import ModelSpec
from qanat.planner.precision import Precision

ACTIVATION_BYTES = 2  # tensor-parallel all-reduces move 16-bit activations


@dataclass(frozen=True)
class Deployment:
    """How one replica runs: chips in it (tensor parallel), weight precision, KV-cache bytes per element."""

    chips: int
    precision: Precision
    kv_bytes: float


@dataclass(frozen=True)
class StepLoad:
    decode_seqs: float
    decode_context: float  # mean tokens each decoding sequence attends to
    prefill_tokens: float = 0.0
    prefill_context: float = 0.0  # mean keys a prompt token attends to (about half the prompt, causal)


@dataclass(frozen=True)
class StepTime:
    weights_mem_s: float
    weights_compute_s: float
    kv_mem_s: float
    attention_s: float  # decode attention compute + prefill attention
    comm_s: float
    overhead_s: float

    @property
    def weights_s(self) -> float:
        return max(self.weights_mem_s, self.weights_compute_s)

    @property
    def kv_s(self) -> float:
        return self.kv_mem_s

    @property
    def total_s(self) -> float:
        return self.weights_s + self.kv_s + self.attention_s + self.comm_s + self.overhead_s

    @property
    def memory_busy(self) -> float:
        """Fraction of the step the memory system streams at its effective rate (for the power curve)."""
        return min(1.0, (self.weights_mem_s + self.kv_mem_s) / self.total_s) if self.total_s else 0.0

    @property
    def compute_busy(self) -> float:
        return min(1.0, (self.weights_compute_s + self.attention_s) / self.total_s) if self.total_s else 0.0

    @property
    def regime(self) -> str:
        memory = max(self.weights_mem_s - self.weights_compute_s, 0) + self.kv_mem_s
        compute = max(self.weights_compute_s - self.weights_mem_s, 0) + self.attention_s
        shared = min(self.weights_mem_s, self.weights_compute_s)  # overlapped: counts for whichever leads
        parts = {"memory-bound": memory + (shared if self.weights_mem_s >= self.weights_compute_s else 0),
                 "compute-bound": compute + (shared if self.weights_compute_s > self.weights_mem_s else 0),
                 "interconnect-bound": self.comm_s, "overhead-bound": self.overhead_s}
        return max(parts, key=lambda k: parts[k])


class StepModel:
    """The per-replica constants of a step (rates, bytes and FLOPs per token), computed once; `time` is then cheap."""

    def __init__(self, model: ModelSpec, chip: ChipSpec, deploy: Deployment, eff: Efficiency) -> None:
        tp, precision = deploy.chips, deploy.precision
        self.model, self.kv_elem_bytes = model, deploy.kv_bytes
        self.bandwidth = chip.memory_bw * eff.mem * tp
        self.weights_bw = self.bandwidth * (eff.quant_mem if precision.is_gguf else 1.0)
        self.precision = precision
        compute = precision.compute
        if precision.is_gguf and chip.chip_class not in CPU_CLASSES:
            compute = "bf16"  # llama.cpp on a GPU dequantises blocks into 16-bit matmuls; int8 dots are CPU-side
        flops, _ = chip.flops(compute)
        attn_flops, _ = chip.flops("bf16" if precision.compute in ("int8", "fp4") else precision.compute)
        self.linear_rate = flops * eff.compute * tp
        self.attention_rate = attn_flops * eff.attention * tp
        self.decode_attention_rate = attn_flops * eff.decode_attention_eff * tp
        self.linear_flops = model.linear_flops_per_token
        self.prefill_flops = model.prefill_flops_per_token
        self.overhead = eff.step_s + eff.layer_s * model.n_layers
        self.token_s = eff.token_s
        self.comm_per_token = self.comm_fixed = 0.0
        if tp > 1 and chip.interconnect_bw > 0:
            # Two all-reduces per layer (after attention, after the MLP), ring algorithm.
            self.comm_fixed = 2 * model.n_layers * eff.allreduce_s
            self.comm_per_token = (2 * model.n_layers * model.d_model * ACTIVATION_BYTES * 2 * (tp - 1) / tp
                                   / (chip.interconnect_bw * eff.link))

    def time(self, load: StepLoad) -> StepTime:
        model = self.model
        tokens = load.decode_seqs + load.prefill_tokens
        weights_mem = model.step_weight_bytes(self.precision, tokens) / self.weights_bw if tokens else 0.0
        flops = self.linear_flops * load.decode_seqs + self.prefill_flops * load.prefill_tokens
        weights_compute = flops / self.linear_rate
        kv_mem = load.decode_seqs * model.kv_bytes(self.kv_elem_bytes, load.decode_context) / self.bandwidth
        # Decode attention streams the cache (counted in kv_mem); its FLOPs only matter when they exceed that time.
        decode_attn = (load.decode_seqs * model.attention_flops_per_token(load.decode_context)
                       / self.decode_attention_rate)
        prefill_attn = (load.prefill_tokens * model.attention_flops_per_token(load.prefill_context)
                        / self.attention_rate if load.prefill_tokens else 0.0)
        attention = prefill_attn + max(0.0, decode_attn - kv_mem)
        comm = self.comm_fixed + self.comm_per_token * tokens if self.comm_fixed or self.comm_per_token else 0.0
        return StepTime(weights_mem, weights_compute, kv_mem, attention, comm,
                        self.overhead + self.token_s * load.decode_seqs)


def step_time(model: ModelSpec, chip: ChipSpec, deploy: Deployment, eff: Efficiency, load: StepLoad) -> StepTime:
    return StepModel(model, chip, deploy, eff).time(load)
