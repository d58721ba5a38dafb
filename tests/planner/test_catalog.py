"""Built-in catalogs (every entry sourced), user YAML additions, and name resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from qanat.planner.catalog import Catalog
from qanat.planner.chips import BUILTIN_CHIPS, CHIP_CLASSES, this_machine
from qanat.planner.efficiency import CLASS_DEFAULTS

REQUIRED_CHIPS = {"H100-SXM", "H200", "B200", "A100-80GB", "L4", "L40S", "MI300X", "TPU-v5e", "TPU-v6e", "Trainium2",
                  "Inferentia2", "Maia-100", "Groq-LPU", "Cerebras-WSE-3", "EPYC-9654", "M2-Ultra", "RaspberryPi-5"}
REQUIRED_MODELS = {"Llama-2-70B", "Llama-3.1-8B", "Llama-3.1-70B", "Llama-3.1-405B", "Llama-3.3-70B", "Mistral-7B",
                   "Mixtral-8x7B", "Qwen3-8B", "Qwen3-32B", "Qwen3-30B-A3B", "DeepSeek-V3", "Nemotron-70B",
                   "Gemma-2-9B", "SmolLM2-135M", "SmolLM2-1.7B"}


def test_catalogs_cover_the_required_entries_with_sources() -> None:
    catalog = Catalog([])
    assert {c.name for c in catalog.chips.values()} >= REQUIRED_CHIPS
    assert {m.name for m in catalog.models.values()} >= REQUIRED_MODELS
    for chip in BUILTIN_CHIPS:
        assert chip.sources, chip.name
        assert chip.chip_class in CLASS_DEFAULTS
    for model in catalog.models.values():
        assert model.source.startswith("https://huggingface.co/"), model.name
    assert set(CLASS_DEFAULTS) == set(CHIP_CLASSES)


def test_lookup_by_alias_and_unknown_names() -> None:
    catalog = Catalog([])
    assert catalog.chip("h100").name == "H100-SXM"
    assert catalog.chip("trillium").name == "TPU-v6e"
    assert catalog.model("llama-3.1-405b").name == "Llama-3.1-405B"
    with pytest.raises(ValueError, match="unknown chip"):
        catalog.chip("pdp-11")
    with pytest.raises(ValueError, match="unknown model"):
        catalog.model("no-such-model")


def test_this_machine_is_read_from_the_host() -> None:
    chip = this_machine(threads=2)
    assert chip.chip_class == "cpu-host"
    assert chip.memory_bw > 1e8 and chip.memory_bytes > 1e8
    assert chip.peak_flops["fp32"] > 1e9
    assert any("cpuinfo" in s for s in chip.sources)


def test_user_yaml_adds_a_chip_and_models(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 1024, "num_attention_heads": 8, "num_hidden_layers": 4, '
                                          '"num_key_value_heads": 2, "intermediate_size": 4096, "vocab_size": 1000}')
    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text("""
chips:
  - name: my-npu
    class: asic-hbm
    peak_tflops: {bf16: 400, int8: 800}
    memory_gb: 64
    memory_bandwidth_gbs: 2000
    tdp_w: 350
    price_per_hour: 1.5
    sources: ["https://example.com/my-npu.pdf"]
models:
  - name: tiny-from-config
    config: config.json
  - name: tiny-inline
    n_layers: 2
    d_model: 256
    n_heads: 4
    n_kv_heads: 4
    d_ff: 1024
    vocab: 500
""")
    catalog = Catalog([yaml_path])
    npu = catalog.chip("my-npu")
    assert npu.peak_flops["bf16"] == 400e12 and npu.memory_bw == 2000e9 and npu.price_per_hour == 1.5
    assert npu.sources == ("https://example.com/my-npu.pdf",)
    assert catalog.model("tiny-from-config").n_kv_heads == 2
    assert catalog.model("tiny-inline").d_model == 256
    assert "H100-SXM" in {c.name for c in catalog.chips.values()}  # additions, not replacements


def test_bad_yaml_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("chips:\n  - name: x\n    class: quantum\n    peak_tflops: {bf16: 1}\n    memory_gb: 1\n"
                   "    memory_bandwidth_gbs: 1\n    tdp_w: 1\n")
    with pytest.raises(ValueError, match="class must be one of"):
        Catalog([bad])
    bad.write_text("gpus: []\n")
    with pytest.raises(ValueError, match="top-level keys"):
        Catalog([bad])
    bad.write_text("models:\n  - name: m\n    layers: 3\n")
    with pytest.raises(ValueError, match="unknown fields layers"):
        Catalog([bad])
