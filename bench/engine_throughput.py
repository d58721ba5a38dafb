"""Engine benchmark: aggregate generated tokens/s and TTFT at several concurrencies, in-process.

Targets, all on the same model, threads and token-id prompts (see workload.py):
  qanat     our engine (continuous batching) through `LocalEngine.generate`, its llama.cpp executor in a child
            process as `qanat serve` runs it; `--variants process,inprocess` adds the executor in the engine's
            own process, to measure what the process boundary costs; `fa-off` adds the served engine with
            `--flash-attn off`
  llama     `llama_cpp.Llama`, the same requests one after another (it serves one at a time), in a child process
  server    llama.cpp's C++ `llama-server` over HTTP, when --llama-server-url points at one

    .venv/bin/python bench/engine_throughput.py [--llama-server-url http://127.0.0.1:8081] [--rounds 3]
    .venv/bin/python bench/engine_throughput.py --concurrency 16 --variants process,inprocess --rounds 3

This machine drifts by ±15 % over minutes, so each row runs `--rounds` rounds with fresh prompts, qanat
and llama-server taking turns going first; the tables give medians and each round's ratio.
Prints Markdown tables for docs/benchmarks.md and writes bench/results/engine.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import distinct_prompts, shared_prefix_prompts  # noqa: E402
from qanat.bench.loadgen import RequestRecord, run_load  # noqa: E402
from qanat.bench.metrics import aggregate, percentile  # noqa: E402
from qanat.build import build_llamacpp_engine  # noqa: E402
from qanat.config import EngineConfig  # noqa: E402
from qanat.engine.client import TokenPrompt  # noqa: E402
from qanat.engine.executors.llamacpp import LlamaModel  # noqa: E402
from qanat.engine.sampling import SamplingParams  # noqa: E402
from qanat.models.locate import default_model_path  # noqa: E402

NEW_TOKENS = 128
THREADS = 2


def num_requests(concurrency: int) -> int:
    return min(max(2 * concurrency, 4), 32)


def summarize(records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    """The few figures these tables need, taken from `qanat bench`'s own aggregates."""
    agg = aggregate(records, wall_s)

    def seconds(ms: float | None) -> float | None:
        return None if ms is None else ms / 1000

    decode = [rate for r in records if r.ok and (rate := r.decode_tokens_per_s)]
    return {
        "requests": len(records),
        "errors": agg["failed"],
        "output_tokens": agg["total_output_tokens"],
        "tokens_per_s": agg["output_throughput"],
        "ttft_median_s": seconds(agg["median_ttft_ms"]),
        "ttft_p90_s": seconds(agg["p90_ttft_ms"]),
        "decode_tokens_per_s_median": percentile(decode, 50),
        "wall_s": wall_s,
    }


def bench_qanat(prompts: list[list[int]], concurrency: int, parallel: int, variant: str) -> dict[str, Any]:
    """One closed-loop run on a fresh engine. Call it through `in_child`: each run gets a clean process."""
    config = EngineConfig(ctx=1024, parallel=parallel, threads=THREADS,
                          flash_attn="off" if variant == "qanat_fa-off" else "auto")
    engine = build_llamacpp_engine(config, in_process=variant == "qanat_inprocess")
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    async def one(ids: list[int]) -> RequestRecord:
        record = RequestRecord()
        start = time.perf_counter()
        async for delta in engine.generate(TokenPrompt(tuple(ids)), params):
            if record.ttft_s is None:
                record.ttft_s = time.perf_counter() - start
            record.output_tokens = delta.num_output_tokens
        record.e2e_s = time.perf_counter() - start
        record.ok = True
        return record

    async def closed_loop() -> tuple[list[RequestRecord], float]:
        pending = list(prompts)
        records: list[RequestRecord] = []

        async def worker() -> None:
            while pending:
                records.append(await one(pending.pop(0)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records, time.perf_counter() - start

    try:
        records, wall = asyncio.run(closed_loop())
        stats = engine.stats()
    finally:
        engine.shutdown()
    result = summarize(records, wall)
    result["steps"] = stats.steps
    result["step_ms"] = 1000 * stats.step_s / stats.steps if stats.steps else None
    # Round-trip time of a step not spent inside the child's execute: pickling, the pipe, wake-ups.
    result["boundary_us_per_step"] = 1e6 * stats.boundary_s / stats.steps if stats.steps else None
    result["boundary_share_of_step"] = stats.boundary_s / stats.step_s if stats.step_s else None
    return result


def bench_llama_sequential(prompts: list[list[int]]) -> dict[str, Any]:
    """`llama_cpp.Llama`, one request after another. Call it through `in_child`, never in qanat's process."""
    llm = llama_cpp.Llama(str(default_model_path()), n_ctx=1024, n_threads=THREADS, n_batch=512, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog = {t: -float("inf") for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    records = []
    start_all = time.perf_counter()
    for ids in prompts:
        record = RequestRecord()
        start = time.perf_counter()
        for chunk in llm.create_completion(ids, max_tokens=NEW_TOKENS, temperature=0, stream=True, logit_bias=eog):
            if record.ttft_s is None:
                record.ttft_s = time.perf_counter() - start
            if chunk["choices"][0]["finish_reason"] is None:  # one chunk per token, then a closing one
                record.output_tokens += 1
        record.e2e_s = time.perf_counter() - start
        record.ok = True
        records.append(record)
    return summarize(records, time.perf_counter() - start_all)


def in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run a llama.cpp baseline in a fresh process. A second llama.cpp context driven from another thread of
    the engine's process gives libgomp more OpenMP threads than cores, so it throttles its spin-waits, and
    every qanat step after that ran slower (single stream: 159 -> 97-105 tok/s, measured)."""
    # ProcessPoolExecutor's worker is not a daemon, so it may start qanat's executor process of its own.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_llama_server(url: str, prompts: list[list[int]], concurrency: int) -> dict[str, Any]:
    bodies = [{"prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
               "cache_prompt": True, "stream_options": {"include_usage": True}} for ids in prompts]
    records, wall = asyncio.run(run_load(f"{url}/v1/completions", bodies, concurrency=concurrency))
    return summarize(records, wall)


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r[key] is not None]
    return percentile(values, 50) if values else None


def speedup(faster: list[dict[str, Any]], slower: list[dict[str, Any]]) -> tuple[float, list[float]]:
    """Tokens/s of one target over another's: the ratio of their medians, and each round's own ratio."""
    rounds = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(faster, slower, strict=True)]
    return median_of(faster, "tokens_per_s") / median_of(slower, "tokens_per_s"), rounds  # type: ignore[operator]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-server-url", default=None)
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variants", default="process",
                        help="qanat engines to run: process (as served), inprocess (no boundary), fa-off (as served, "
                             "flash attention off); the first is the one compared with llama-server")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000,
                        help="prompt seed; the default changes per run, so no server has these prompts cached")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    variants = [f"qanat_{v}" for v in args.variants.split(",")]
    vocab = LlamaModel(default_model_path(), vocab_only=True)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "llama_cpp_python": llama_cpp.__version__,
                               "seed": args.seed, "runs": []}
    for workload, make in (("distinct", distinct_prompts), ("shared-prefix", shared_prefix_prompts)):
        for c in concurrencies:
            row: dict[str, Any] = {"workload": workload, "concurrency": c, "llama_server": []}
            row.update({v: [] for v in variants})
            for r in range(args.rounds):
                prompts = make(vocab, num_requests(c), seed=args.seed + 1000 * r + c)
                turns = variants + (["llama_server"] if args.llama_server_url else [])
                for name in turns if r % 2 == 0 else reversed(turns):
                    row[name].append(
                        bench_llama_server(args.llama_server_url, prompts, c) if name == "llama_server"
                        else in_child(bench_qanat, prompts, c, args.parallel, name))
                if c == 1 and r == 0:
                    row["llama_sequential"] = in_child(bench_llama_sequential, prompts)
            results["runs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "engine.json").write_text(json.dumps(results, indent=2))

    print("| workload | concurrency | qanat tok/s | llama-server tok/s | ratio | ratio per round | "
          "qanat TTFT p50 (s) | llama-server TTFT p50 (s) | process boundary share of a qanat step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results["runs"]:
        q, s = row[variants[0]], row["llama_server"]
        q_tps, s_tps = median_of(q, "tokens_per_s"), median_of(s, "tokens_per_s") if s else None
        ratio, ratios = speedup(q, s) if s else (None, [])
        per_round = " / ".join(fmt(r, 2) for r in ratios)
        print(f"| {row['workload']} | {row['concurrency']} | {fmt(q_tps)} | {fmt(s_tps)} | {fmt(ratio, 2)} | "
              f"{per_round or '—'} | {fmt(median_of(q, 'ttft_median_s'), 2)} | "
              f"{fmt(median_of(s, 'ttft_median_s') if s else None, 2)} | "
              f"{fmt(100 * (median_of(q, 'boundary_share_of_step') or 0), 2)} % |")
    if "qanat_inprocess" in variants and "qanat_process" in variants:
        print()
        print("| workload | concurrency | executor in a child process tok/s | in-process tok/s | ratio | "
              "ratio per round | boundary µs per step | step ms |")
        print("|---|---|---|---|---|---|---|---|")
        for row in results["runs"]:
            p, i = row["qanat_process"], row["qanat_inprocess"]
            ratio, ratios = speedup(p, i)
            print(f"| {row['workload']} | {row['concurrency']} | {fmt(median_of(p, 'tokens_per_s'))} | "
                  f"{fmt(median_of(i, 'tokens_per_s'))} | {fmt(ratio, 3)} | "
                  f"{' / '.join(fmt(r, 3) for r in ratios)} | {fmt(median_of(p, 'boundary_us_per_step'), 0)} | "
                  f"{fmt(median_of(p, 'step_ms'), 1)} |")
    for other in variants[1:]:
        if other == "qanat_inprocess":
            continue
        print()
        print(f"| workload | concurrency | {variants[0]} tok/s | {other} tok/s | ratio | ratio per round | "
              f"TTFT p50 (s) | {other} TTFT p50 (s) |")
        print("|---|---|---|---|---|---|---|---|")
        for row in results["runs"]:
            a, b = row[variants[0]], row[other]
            ratio, ratios = speedup(b, a)
            print(f"| {row['workload']} | {row['concurrency']} | {fmt(median_of(a, 'tokens_per_s'))} | "
                  f"{fmt(median_of(b, 'tokens_per_s'))} | {fmt(ratio, 3)} | "
                  f"{' / '.join(fmt(r, 3) for r in ratios)} | {fmt(median_of(a, 'ttft_median_s'), 2)} | "
                  f"{fmt(median_of(b, 'ttft_median_s'), 2)} |")
    print()
    print("| single stream (concurrency 1, first round) | qanat | llama_cpp.Llama, one after another | ratio |")
    print("|---|---|---|---|")
    for row in results["runs"]:
        if "llama_sequential" in row:
            q, a = row[variants[0]][0], row["llama_sequential"]
            print(f"| {row['workload']}: decode tok/s | {fmt(q['decode_tokens_per_s_median'])} | "
                  f"{fmt(a['decode_tokens_per_s_median'])} | "
                  f"{fmt(q['decode_tokens_per_s_median'] / a['decode_tokens_per_s_median'], 2)} |")
            print(f"| {row['workload']}: aggregate tok/s | {fmt(q['tokens_per_s'])} | {fmt(a['tokens_per_s'])} | "
                  f"{fmt(q['tokens_per_s'] / a['tokens_per_s'], 2)} |")
    vocab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
