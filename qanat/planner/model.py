"""A model's shape, and what serving it costs per token: weight bytes, KV-cache bytes, FLOPs.

One `ModelSpec` comes from a GGUF file (exact weight bytes per tensor), an HF `config.json`, or the
built-in catalog. Grouped-query attention, sliding windows, mixture-of-experts (routed and shared
experts, leading dense layers) and DeepSeek's multi-head latent attention (MLA) are taken into account.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

from qanat.planner.precision import Precision


@dataclass(frozen=True)
class GgufWeights:
    """Exact bytes from a GGUF tensor table, split by how a decode step reads them."""

    dense_bytes: int  # read once per step: attention, dense MLPs, norms, output head
    expert_bytes: int  # all routed experts together (a step reads the experts its tokens pick)
    embedding_bytes: int  # token_embd when separate from the output head: a step reads only its rows
    total_bytes: int
    file_type: str  # e.g. Q4_1, as the file declares it


@dataclass(frozen=True)
class ModelSpec:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int  # dense MLP width (gated: three matrices)
    vocab: int
    head_dim: int = 0  # 0: d_model // n_heads
    tied_embeddings: bool = False
    context_length: int = 4096
    # Mixture of experts: `n_dense_layers` leading layers have a dense MLP of width d_ff.
    n_experts: int = 0
    n_experts_active: int = 0
    d_ff_expert: int = 0
    n_shared_experts: int = 0
    n_dense_layers: int = 0
    # Sliding-window attention on a fraction of the layers (Mistral-7B-v0.1: all; Gemma-2: every other one).
    sliding_window: int = 0
    sliding_fraction: float = 0.0
    # Multi-head latent attention (DeepSeek-V2/V3): the cache holds one compressed vector per token and layer.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    gated_mlp: bool = True
    source: str = "catalog"
    gguf: GgufWeights | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if min(self.n_layers, self.d_model, self.n_heads, self.n_kv_heads, self.vocab) < 1:
            raise ValueError(f"model {self.name!r}: layers, width, heads and vocabulary must be positive")
        if self.n_experts and not 0 < self.n_experts_active <= self.n_experts:
            raise ValueError(f"model {self.name!r}: experts used per token must be in 1..{self.n_experts}")

    # ---- shape -------------------------------------------------------------------------------------
    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers if self.is_moe else 0

    def with_context(self, context_length: int) -> ModelSpec:
        return replace(self, context_length=context_length)

    # ---- parameters ----------------------------------------------------------------------------------
    def _attention_params(self) -> int:
        d, h = self.d_model, self.n_heads
        if self.is_mla:
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = d * self.q_lora_rank + self.q_lora_rank * h * qk_head if self.q_lora_rank else d * h * qk_head
            kv_down = d * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_up = self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv_down + kv_up + h * self.v_head_dim * d
        return d * h * self.hd * 2 + d * self.n_kv_heads * self.hd * 2  # q, o; k, v

    def _mlp_params(self, width: int) -> int:
        return (3 if self.gated_mlp else 2) * self.d_model * width

    def param_counts(self) -> tuple[int, int, int]:
        """(dense parameters a step reads whole, all routed-expert parameters, embedding-lookup parameters)."""
        return self._param_counts

    @cached_property
    def _param_counts(self) -> tuple[int, int, int]:
        attention = self._attention_params() * self.n_layers
        dense_mlp = self._mlp_params(self.d_ff) * (self.n_dense_layers if self.is_moe else self.n_layers)
        shared = self._mlp_params(self.d_ff_expert) * self.n_shared_experts * self.n_moe_layers
        router = self.d_model * self.n_experts * self.n_moe_layers
        experts = self._mlp_params(self.d_ff_expert) * self.n_experts * self.n_moe_layers
        norms = 2 * self.d_model * self.n_layers + self.d_model  # two per layer, one final
        embedding = self.vocab * self.d_model
        output_head = embedding  # tied or not, the head is a full vocab x d matmul every step
        dense = attention + dense_mlp + shared + router + norms + output_head
        return dense, experts, 0 if self.tied_embeddings else embedding

    @property
    def params_total(self) -> int:
        dense, experts, lookup = self.param_counts()
        return dense + experts + lookup

    @cached_property
    def params_active(self) -> int:
        """Parameters one token multiplies by (the lookup table is read, not multiplied)."""
        dense, experts, _ = self.param_counts()
        active = experts * self.n_experts_active // self.n_experts if self.is_moe else 0
        return dense + active

    # ---- bytes -----------------------------------------------------------------------------------------
    def weight_bytes(self, precision: Precision) -> tuple[float, float, float]:
        """(dense, all experts, lookup-only embedding) bytes at `precision`; exact when read from a GGUF."""
        if self.gguf is not None and precision.is_gguf and precision.name == self.gguf.file_type:
            return float(self.gguf.dense_bytes), float(self.gguf.expert_bytes), float(self.gguf.embedding_bytes)
        dense, experts, lookup = self.param_counts()
        bpw = precision.bytes_per_weight
        return dense * bpw, experts * bpw, lookup * bpw

    def total_weight_bytes(self, precision: Precision) -> float:
        return sum(self.weight_bytes(precision))

    def experts_touched(self, tokens: float) -> float:
        """Expected distinct routed experts per MoE layer when `tokens` tokens each pick k of E (uniform routing)."""
        if not self.is_moe or tokens <= 0:
            return 0.0
        e, k = self.n_experts, self.n_experts_active
        return float(e * (1 - (1 - k / e) ** tokens))

    def step_weight_bytes(self, precision: Precision, tokens: float) -> float:
        """Weight bytes one forward pass over `tokens` tokens streams from memory."""
        dense, experts, lookup = self.weight_bytes(precision)
        read = dense + (lookup * min(1.0, tokens / self.vocab) if lookup else 0.0)
        if self.is_moe:
            read += experts * self.experts_touched(tokens) / self.n_experts
        return read

    def kv_elements_per_token_layer(self) -> int:
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim  # one latent + the shared rope key
        return 2 * self.n_kv_heads * self.hd

    def kv_bytes_per_token(self, kv_bytes: float, context: float | None = None) -> float:
        """KV-cache bytes one sequence of `context` tokens holds, per token of it (sliding layers cap at the window)."""
        per_layer = self.kv_elements_per_token_layer() * kv_bytes
        if not self.sliding_window or context is None or context <= self.sliding_window:
            return per_layer * self.n_layers
        sliding = self.n_layers * self.sliding_fraction
        return per_layer * (self.n_layers - sliding + sliding * self.sliding_window / context)

    def kv_bytes(self, kv_bytes: float, context: float) -> float:
        """KV-cache bytes for one sequence holding `context` tokens."""
        return self.kv_bytes_per_token(kv_bytes, context) * context

    # ---- FLOPs -----------------------------------------------------------------------------------------
    @cached_property
    def linear_flops_per_token(self) -> float:
        return 2.0 * self.params_active

    @cached_property
    def prefill_flops_per_token(self) -> float:
        """A prompt token skips the output head: only a prompt's last token needs logits."""
        return 2.0 * (self.params_active - self.vocab * self.d_model)

    def attention_flops_per_token(self, context: float) -> float:
        """QK^T and AV for one query token attending to `context` keys, all layers."""
        if self.is_mla:  # absorbed MLA: scores and values both run in the latent width
            width = self.n_heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        else:
            width = 2 * self.n_heads * self.hd
        full = self.n_layers * (1 - self.sliding_fraction) if self.sliding_window else self.n_layers
        sliding = self.n_layers - full
        span = min(context, self.sliding_window) if self.sliding_window else context
        return 2.0 * width * (full * context + sliding * span)
