"""A Hugging Face `config.json` (Llama, Mistral, Mixtral, Qwen2/3, Qwen3-MoE, Gemma-2, DeepSeek-V3...) -> ModelSpec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qanat.planner.model import ModelSpec


def _first(config: dict[str, Any], *keys: str, default: Any = 0) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def model_from_config(config: dict[str, Any], name: str = "config.json") -> ModelSpec:
    text = config.get("text_config") or config  # multimodal wrappers keep the language model apart
    d_model = _first(text, "hidden_size", "n_embd", "d_model")
    n_heads = _first(text, "num_attention_heads", "n_head")
    n_layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    if not (d_model and n_heads and n_layers):
        raise ValueError(f"{name}: needs hidden_size, num_attention_heads and num_hidden_layers")
    n_experts = int(_first(text, "n_routed_experts", "num_local_experts", "num_experts"))
    model_type = str(text.get("model_type", ""))
    window = int(_first(text, "sliding_window") or 0)
    if window and text.get("use_sliding_window") is False:
        window = 0  # Qwen2/3 configs name a window they do not use
    # Gemma-2 alternates local (sliding) and global layers; Mistral-v0.1 slides on every layer.
    sliding_fraction = 0.5 if model_type.startswith("gemma2") or model_type.startswith("gemma3") else 1.0
    first_k_dense = int(_first(text, "first_k_dense_replace"))
    if n_experts and not first_k_dense and text.get("mlp_only_layers"):
        first_k_dense = len(text["mlp_only_layers"])
    return ModelSpec(
        name=str(config.get("_name_or_path") or name),
        n_layers=int(n_layers), d_model=int(d_model), n_heads=int(n_heads),
        n_kv_heads=int(_first(text, "num_key_value_heads", default=n_heads)),
        d_ff=int(_first(text, "intermediate_size", "ffn_dim", "n_inner", default=4 * d_model)),
        vocab=int(_first(text, "vocab_size")),
        head_dim=int(_first(text, "head_dim") or 0) if not text.get("kv_lora_rank") else 0,
        tied_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        context_length=int(_first(text, "max_position_embeddings", default=4096)),
        n_experts=n_experts,
        n_experts_active=int(_first(text, "num_experts_per_tok", "num_experts_per_token")) if n_experts else 0,
        d_ff_expert=int(_first(text, "moe_intermediate_size", "intermediate_size")) if n_experts else 0,
        n_shared_experts=int(_first(text, "n_shared_experts")) if n_experts else 0,
        n_dense_layers=first_k_dense,
        sliding_window=window, sliding_fraction=sliding_fraction if window else 0.0,
        kv_lora_rank=int(_first(text, "kv_lora_rank")), q_lora_rank=int(_first(text, "q_lora_rank")),
        qk_rope_head_dim=int(_first(text, "qk_rope_head_dim")), qk_nope_head_dim=int(_first(text, "qk_nope_head_dim")),
        v_head_dim=int(_first(text, "v_head_dim")),
        gated_mlp=str(text.get("hidden_act", text.get("hidden_activation", "silu"))) not in ("relu2", "gelu_new"),
        source=f"config.json:{name}",
    )


def read_config(path: Path | str) -> ModelSpec:
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return model_from_config(config, path.parent.name or path.name)
