"""HF config.json -> ModelSpec for the architectures the catalog covers (the published configs' own fields)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qanat.planner.hfconfig import model_from_config, read_config

LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
               "tie_word_embeddings": False, "hidden_act": "silu"}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
           "num_experts_per_tok": 2, "sliding_window": None, "max_position_embeddings": 32768}
QWEN3_MOE = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
             "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48,
             "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936, "sliding_window": None,
             "use_sliding_window": False, "tie_word_embeddings": False, "mlp_only_layers": []}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
               "moe_intermediate_size": 2048, "num_attention_heads": 128, "num_key_value_heads": 128,
               "num_hidden_layers": 61, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
               "first_k_dense_replace": 3, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
               "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 129280, "max_position_embeddings": 163840}
GEMMA2_9B = {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 256, "num_hidden_layers": 42, "vocab_size": 256000,
             "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}


def test_llama_dense_gqa() -> None:
    m = model_from_config(LLAMA_31_8B, "llama")
    assert m.params_total == pytest.approx(8.03e9, rel=0.002)  # Meta: 8.03 B
    assert m.kv_bytes_per_token(2) == 32 * 2 * 8 * 128 * 2  # 8 KV heads, not 32: grouped-query attention
    assert not m.is_moe and not m.sliding_window


def test_mixtral_moe() -> None:
    m = model_from_config(MIXTRAL, "mixtral")
    assert m.params_total == pytest.approx(46.7e9, rel=0.005)  # Mistral: 46.7 B total
    assert m.params_active == pytest.approx(12.9e9 - 0.13e9, rel=0.01)  # 12.9 B active, less the lookup table


def test_qwen3_moe_ignores_an_unused_window() -> None:
    m = model_from_config(QWEN3_MOE, "qwen3")
    assert (m.n_experts, m.n_experts_active, m.d_ff_expert, m.n_dense_layers) == (128, 8, 768, 0)
    assert m.sliding_window == 0
    assert m.params_total == pytest.approx(30.5e9, rel=0.01)


def test_deepseek_v3_mla_and_shared_experts() -> None:
    m = model_from_config(DEEPSEEK_V3, "deepseek")
    assert m.is_mla and m.n_dense_layers == 3 and m.n_shared_experts == 1
    assert m.params_total == pytest.approx(671e9, rel=0.005)
    assert m.params_active == pytest.approx(37e9, rel=0.03)
    assert m.kv_bytes_per_token(2) == 61 * (512 + 64) * 2  # the latent, not 128 heads of K and V


def test_gemma2_slides_on_half_the_layers(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(GEMMA2_9B))
    m = read_config(tmp_path / "config.json")
    assert (m.sliding_window, m.sliding_fraction) == (4096, 0.5)
    # Past the window, the sliding half of the layers stops growing.
    per_layer = 2 * 8 * 256 * 2
    assert m.kv_bytes(2, 8192) == pytest.approx(per_layer * (21 * 8192 + 21 * 4096))
    assert m.kv_bytes(2, 1000) == per_layer * 42 * 1000


def test_missing_shape_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        model_from_config({"model_type": "llama"})
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_config(tmp_path / "config.json")
