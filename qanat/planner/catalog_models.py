"""Built-in model shapes, each from the model's published config.json (the source URL travels with it)."""

from __future__ import annotations

from qanat.planner.model import ModelSpec

_HF = "https://huggingface.co/{}/blob/main/config.json"


def _llama(name: str, repo: str, layers: int, d: int, heads: int, kv: int, ff: int, vocab: int, ctx: int,
           tied: bool = False, **extra: object) -> ModelSpec:
    return ModelSpec(name=name, n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=kv, d_ff=ff, vocab=vocab,
                     context_length=ctx, tied_embeddings=tied, source=_HF.format(repo), **extra)  # type: ignore[arg-type]


BUILTIN_MODELS: tuple[ModelSpec, ...] = (
    _llama("Llama-2-7B", "meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008, 32000, 4096),
    _llama("Llama-2-13B", "meta-llama/Llama-2-13b-hf", 40, 5120, 40, 40, 13824, 32000, 4096),
    _llama("Llama-2-70B", "meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 28672, 32000, 4096),
    _llama("Llama-3.1-8B", "meta-llama/Llama-3.1-8B", 32, 4096, 32, 8, 14336, 128256, 131072),
    _llama("Llama-3.1-70B", "meta-llama/Llama-3.1-70B", 80, 8192, 64, 8, 28672, 128256, 131072),
    _llama("Llama-3.1-405B", "meta-llama/Llama-3.1-405B", 126, 16384, 128, 8, 53248, 128256, 131072),
    _llama("Llama-3.2-3B", "meta-llama/Llama-3.2-3B", 28, 3072, 24, 8, 8192, 128256, 131072, tied=True),
    _llama("Llama-3.3-70B", "meta-llama/Llama-3.3-70B-Instruct", 80, 8192, 64, 8, 28672, 128256, 131072),
    # Nemotron (dense): NVIDIA's Llama-3.1-Nemotron-70B-Instruct keeps Llama-3.1-70B's shape.
    _llama("Nemotron-70B", "nvidia/Llama-3.1-Nemotron-70B-Instruct-HF", 80, 8192, 64, 8, 28672, 128256, 131072),
    _llama("Mistral-7B", "mistralai/Mistral-7B-v0.1", 32, 4096, 32, 8, 14336, 32000, 32768,
           sliding_window=4096, sliding_fraction=1.0),
    _llama("Mixtral-8x7B", "mistralai/Mixtral-8x7B-v0.1", 32, 4096, 32, 8, 14336, 32000, 32768,
           n_experts=8, n_experts_active=2, d_ff_expert=14336),
    _llama("Qwen3-8B", "Qwen/Qwen3-8B", 36, 4096, 32, 8, 12288, 151936, 40960, head_dim=128),
    _llama("Qwen3-32B", "Qwen/Qwen3-32B", 64, 5120, 64, 8, 25600, 151936, 40960, head_dim=128),
    _llama("Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B", 48, 2048, 32, 4, 6144, 151936, 40960, head_dim=128,
           n_experts=128, n_experts_active=8, d_ff_expert=768),
    _llama("Gemma-2-9B", "google/gemma-2-9b", 42, 3584, 16, 8, 14336, 256000, 8192, tied=True, head_dim=256,
           sliding_window=4096, sliding_fraction=0.5),
    _llama("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M", 30, 576, 9, 3, 1536, 49152, 8192, tied=True),
    _llama("SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-1.7B", 24, 2048, 32, 32, 8192, 49152, 8192, tied=True),
    ModelSpec(
        name="DeepSeek-V3", n_layers=61, d_model=7168, n_heads=128, n_kv_heads=128, d_ff=18432, vocab=129280,
        context_length=163840, n_experts=256, n_experts_active=8, d_ff_expert=2048, n_shared_experts=1,
        n_dense_layers=3, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, source=_HF.format("deepseek-ai/DeepSeek-V3"),
    ),
)
