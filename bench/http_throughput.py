"""HTTP benchmark: aggregate tokens/s and TTFT through OpenAI-compatible servers at several concurrencies.

Start each server yourself on the same model and threads, then point this at them, e.g.:

    .venv/bin/qanat serve --port 8000 --threads 2 --parallel 16 --ctx 1024
    llama-server -m MODEL.gguf --port 8081 -t 2 --parallel 16 -c 16384
    .venv/bin/python -m llama_cpp.server --model MODEL.gguf --port 8082 --n_threads 2 --n_ctx 1024 \
        --interrupt_requests False
    .venv/bin/python bench/http_throughput.py qanat=http://127.0.0.1:8000 llama-server=http://127.0.0.1:8081 \
        llama_cpp.server=http://127.0.0.1:8082

Every target gets the same prompts (distinct ~200-token ones, sent as text: llama_cpp.server takes no token
ids), 128 new tokens, greedy, end-of-generation tokens banned by logit_bias (llama_cpp.server has no ignore_eos).
Prints a Markdown table for docs/benchmarks.md and writes bench/results/http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine_throughput import NEW_TOKENS, fmt, num_requests, summarize  # noqa: E402
from bench.workload import distinct_prompts  # noqa: E402
from qanat.bench.loadgen import run_load  # noqa: E402
from qanat.engine.executors.llamacpp import LlamaModel  # noqa: E402
from qanat.models.locate import default_model_path  # noqa: E402


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("targets", nargs="+", help="NAME=BASE_URL")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--seed", type=int, default=1000, help="prompt seed: new prompts, no server's cache holds them")
    args = parser.parse_args()
    targets = dict(t.split("=", 1) for t in args.targets)
    model = LlamaModel(default_model_path(), vocab_only=True)
    no_eos = {str(t): -100 for t in model.eog_ids}
    rows: list[dict[str, Any]] = []
    for c in (int(x) for x in args.concurrency.split(",")):
        prompts = distinct_prompts(model, num_requests(c), seed=args.seed + c)
        row: dict[str, Any] = {"concurrency": c}
        for name, url in targets.items():
            model_id = served_model(url)
            bodies = [{"model": model_id, "prompt": model.detokenize(ids), "max_tokens": NEW_TOKENS, "temperature": 0,
                       "ignore_eos": True, "logit_bias": no_eos, "stream_options": {"include_usage": True}}
                      for ids in prompts]
            records, wall = asyncio.run(run_load(f"{url}/v1/completions", bodies, concurrency=c))
            row[name] = summarize(records, wall)
            print(json.dumps({"concurrency": c, "target": name, **row[name]}), file=sys.stderr, flush=True)
        rows.append(row)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "http.json").write_text(json.dumps(rows, indent=2))

    names = list(targets)
    print("| concurrency | " + " | ".join(f"{n} tok/s | {n} TTFT p50 (s)" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for row in rows:
        cells = [f"{fmt(row[n]['tokens_per_s'])} | {fmt(row[n]['ttft_median_s'], 2)}" for n in names]
        errors = sum(row[n]["errors"] for n in names)
        label = f"{row['concurrency']} (errors: {errors})" if errors else str(row["concurrency"])
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
