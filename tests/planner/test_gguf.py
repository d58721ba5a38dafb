"""GGUF header and tensor table: the embedded model's exact bytes, and a synthetic MoE file's categories."""

from __future__ import annotations

from pathlib import Path

import pytest

from qanat.models.locate import default_model_path
from qanat.planner.gguf import GgufError, model_from_gguf, read_gguf
from qanat.planner.precision import get_precision
from tests.planner.gguf_writer import write_gguf

# The embedded SmolLM2-135M-Instruct Q4_1 file: 272 tensors whose data fills the file after the header.
EMBEDDED_TENSOR_BYTES = 96_576_768


def test_embedded_model_exact_weight_bytes() -> None:
    path = default_model_path()
    g = read_gguf(path)
    assert g.version == 3
    assert len(g.tensors) == 272
    assert g.tensor_bytes == EMBEDDED_TENSOR_BYTES
    # Every byte after the header is tensor data: nothing double-counted, nothing missed.
    assert path.stat().st_size - g.data_offset == EMBEDDED_TENSOR_BYTES
    assert g.file_type == "Q4_1"
    types = {t.type_name for t in g.tensors}
    assert types == {"Q4_1", "F32", "Q8_0"}
    assert g.array_lengths["tokenizer.ggml.tokens"] == 49152


def test_embedded_model_shape_and_tied_head() -> None:
    m = model_from_gguf(default_model_path())
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff, m.vocab) == (30, 576, 9, 3, 1536, 49152)
    assert m.tied_embeddings  # no output.weight: the embedding is the head, read whole every step
    assert m.gguf is not None and m.gguf.total_bytes == EMBEDDED_TENSOR_BYTES
    assert m.gguf.embedding_bytes == 0 and m.gguf.expert_bytes == 0
    q41 = get_precision("Q4_1")
    assert m.total_weight_bytes(q41) == EMBEDDED_TENSOR_BYTES  # the file's bytes, not a bits-per-weight estimate
    assert m.params_total == 134_515_008  # SmolLM2-135M as Hugging Face counts it


def test_moe_file_splits_experts_embedding_and_dense(tmp_path: Path) -> None:
    meta = {"general.architecture": "qwen3moe", "general.file_type": 2, "qwen3moe.block_count": 1,
            "qwen3moe.embedding_length": 64, "qwen3moe.attention.head_count": 4,
            "qwen3moe.attention.head_count_kv": 2, "qwen3moe.feed_forward_length": 128,
            "qwen3moe.expert_count": 8, "qwen3moe.expert_used_count": 2,
            "qwen3moe.expert_feed_forward_length": 32, "qwen3moe.context_length": 512,
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(100)]}
    tensors = [("token_embd.weight", (64, 100), "F16"), ("output.weight", (64, 100), "Q8_0"),
               ("blk.0.attn_q.weight", (64, 64), "Q4_0"), ("blk.0.attn_norm.weight", (64,), "F32"),
               ("blk.0.ffn_gate_exps.weight", (64, 32, 8), "Q4_0"), ("blk.0.ffn_down_exps.weight", (32, 64, 8), "Q4_0")]
    path = tmp_path / "moe.gguf"
    data = write_gguf(path, meta, tensors)
    m = model_from_gguf(path)
    assert m.gguf is not None
    assert m.gguf.total_bytes == data == read_gguf(path).tensor_bytes
    assert m.gguf.embedding_bytes == 64 * 100 * 2  # separate lookup table (an output.weight exists)
    assert m.gguf.expert_bytes == 2 * (64 * 32 * 8 // 32 * 18)
    assert m.gguf.dense_bytes == 64 * 100 // 32 * 34 + 64 * 64 // 32 * 18 + 64 * 4
    assert (m.n_experts, m.n_experts_active, m.d_ff_expert, m.vocab, m.tied_embeddings) == (8, 2, 32, 100, False)
    assert m.gguf.file_type == "Q4_0"
    # One decode token reads the dense part, ~2 of 8 experts and one embedding row.
    p = get_precision("Q4_0")
    one = m.step_weight_bytes(p, 1)
    assert one == pytest.approx(m.gguf.dense_bytes + m.gguf.expert_bytes * 2 / 8 + m.gguf.embedding_bytes / 100)


def test_not_a_gguf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(GgufError, match="not a GGUF file"):
        read_gguf(bad)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\0\0\0")
    with pytest.raises(GgufError, match="ends inside"):
        read_gguf(short)
