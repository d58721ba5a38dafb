"""Turn the ML.ENERGY Leaderboard v3 LLM data (lm-arena-chat task) into rows of bench/planner/published.yaml.

    python bench/planner_import_mlenergy.py lm-arena-chat.json > rows.yaml

The input is `public/data/tasks/lm-arena-chat.json` of github.com/ml-energy/leaderboard (commit below). Each of
its configurations is one vLLM 0.11.1 run on H100 or B200 GPUs at a fixed `max_num_seqs`, more requests submitted
than it admits (`offline`: the running batch stays full, its measured average within 1 % of the cap), with GPU
energy measured over the run. We keep the models the planner's catalog has (same shapes; fine-tunes and revisions
of them), with tensor parallelism only (no expert or data parallelism, which the planner does not model).

Measured: joules per output token, average GPU power of the replica, output tokens/s. The leaderboard's median
inter-token latency is kept in the note only: it skips the steps that carry prompt chunks, so it is not the mean
time per output token the planner predicts (at large batches it is 20-40 % below batch / throughput).

Rows for Qwen3-8B are marked `tuning` (vLLM's per-sequence host cost and the accelerator power curve were set from
them); the others are held out.
"""

from __future__ import annotations

import json
import sys
from typing import Any

COMMIT = "0cd52dab897c5d91a45f4d413038f3b8b4251b0f"
SOURCE = f"https://github.com/ml-energy/leaderboard/blob/{COMMIT}/public/data/tasks/lm-arena-chat.json"
MODELS = {
    "meta-llama/Llama-3.1-8B-Instruct": "Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B-Instruct": "Llama-3.1-70B",
    "meta-llama/Llama-3.3-70B-Instruct": "Llama-3.3-70B",
    "meta-llama/Llama-3.1-405B-Instruct": "Llama-3.1-405B",
    "meta-llama/Llama-3.1-405B-Instruct-FP8": "Llama-3.1-405B",
    "Qwen/Qwen3-8B": "Qwen3-8B",
    "Qwen/Qwen3-32B": "Qwen3-32B",
    "Qwen/Qwen3-30B-A3B-Instruct-2507": "Qwen3-30B-A3B",
    "deepseek-ai/DeepSeek-V3.1": "DeepSeek-V3",
}
CHIPS = {"H100": "H100-SXM", "B200": "B200"}
TUNING = {"Qwen3-8B"}
# LM Arena chat prompts: the leaderboard publishes output lengths only. 256 tokens is our assumption for the mean
# prompt (single-turn chat questions); prefill is a few percent of these runs' work, so it matters little.
INPUT_TOKENS = 256


def rows(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in configs:
        model = MODELS.get(c["model_id"])
        if model is None or c["gpu_model"] not in CHIPS or c["data_parallel"] != 1 or c["expert_parallel"] != 1:
            continue
        precision = "fp8" if c["weight_precision"] == "fp8" else "bf16"
        tag = c["model_id"].split("/")[1].lower().replace("-instruct", "")
        out.append({
            "id": f"mlenergy-{tag}-{c['gpu_model'].lower()}-tp{c['tensor_parallel']}-bs{c['max_num_seqs']}",
            "source": SOURCE,
            "model": model,
            "chip": CHIPS[c["gpu_model"]],
            "precision": precision,
            "kv_dtype": "bf16",
            "tp": c["tensor_parallel"],
            "engine": "vllm",
            "max_batch": c["max_num_seqs"],
            "input_tokens": INPUT_TOKENS,
            "output_tokens": round(c["avg_output_len"]),
            "offline": True,
            "measured": {
                "joules_per_token": round(c["energy_per_token_joules"], 5),
                "power_w": round(c["avg_power_watts"], 1),
                "output_tps": round(c["output_throughput_tokens_per_sec"], 1),
            },
            "tuning": model in TUNING,
            "note": (f"ML.ENERGY v3, vLLM 0.11.1, {c['model_id']}, {c['num_gpus']} GPU, max_num_seqs "
                     f"{c['max_num_seqs']} (average batch {c['avg_batch_size']:.1f}); GPU power averaged over the "
                     f"run; median inter-token latency {c['median_itl_ms']:.1f} ms; prompt length assumed"),
        })
    return out


def main() -> None:
    import yaml

    with open(sys.argv[1]) as f:
        data = json.load(f)
    sys.stdout.write(yaml.safe_dump(rows(data["configurations"]), sort_keys=False, width=1000))


if __name__ == "__main__":
    main()
