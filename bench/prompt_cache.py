"""Prompt cache beyond the slots (issue 15), Qanat vs llama-server, one run, same settings (2 threads, 16 slots,
1024 tokens of context per slot). Starts and stops every server itself, one at a time:

    flock /tmp/qanat-heavy.lock .venv/bin/python bench/prompt_cache.py --llama-server PATH/llama-server

- repeat: 32 streamed prompts (~230 tokens, distinct), 64 new tokens, concurrency 16, then the same 32 again (a
  conversation's next turn re-sends its context): aggregate output tokens/s and TTFT per round.
- turns: 16 conversations x 4 turns at concurrency 16 (`qanat bench --turns`): TTFT per turn.
- disk: Qanat with --cache-dir: the repeat workload's first round, a restart (SIGTERM), the second round.
- memory: Qanat with --cache-ram 32 under 64 distinct prompts: the executor process's peak resident memory.
Prints Markdown for docs/benchmarks.md and writes bench/results/prompt_cache.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine_throughput import summarize  # noqa: E402
from bench.servers import Server  # noqa: E402
from bench.workload import SENTENCES  # noqa: E402
from qanat.bench.conversation import ConversationSpec, run_conversations, summarize_turns  # noqa: E402
from qanat.bench.loadgen import run_load  # noqa: E402
from qanat.engine.executors.llamacpp import LlamaModel  # noqa: E402
from qanat.models.locate import default_model_path  # noqa: E402

THREADS, SLOTS, CTX = 2, 16, 1024
PROMPT_TOKENS, NEW_TOKENS, N_PROMPTS = 230, 64, 32


def qanat(*extra: str) -> Server:
    return Server("qanat", [sys.executable, "-m", "qanat.cli", "serve", "--threads", str(THREADS), "--parallel",
                            str(SLOTS), "--ctx", str(CTX), "--no-webui", *extra])


def llama_server(binary: str) -> Server:
    # -nr: no weight repacking (ggml's AMX path crashed on this project's Sapphire Rapids machines); --cache-ram is
    # left at its default (8192 MiB).
    return Server("llama-server", [binary, "-m", str(default_model_path()), "-t", str(THREADS), "-np", str(SLOTS),
                                   "-c", str(SLOTS * CTX), "-nr"])


def prompt_texts(model: LlamaModel, n: int, seed: int) -> list[str]:
    """`n` distinct prompts of PROMPT_TOKENS tokens (BOS included) once the server tokenizes them."""
    texts = []
    for i in range(n):
        rng = random.Random(seed * 100_003 + i)
        ids = model.tokenize(f"Request {i}. " + " ".join(rng.choice(SENTENCES) for _ in range(60)), False)
        texts.append(model.detokenize(ids[:PROMPT_TOKENS - 1]))
    return texts


def round_of(server: Server, texts: list[str]) -> dict[str, Any]:
    bodies = [{"model": server.model, "prompt": t, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
               "stream_options": {"include_usage": True}} for t in texts]
    records, wall = asyncio.run(run_load(f"{server.url}/v1/completions", bodies, concurrency=SLOTS))
    out = summarize(records, wall)
    records.sort(key=lambda r: r.index)
    cached = [r.cached_tokens for r in records if r.cached_tokens is not None]
    out["cached_tokens_mean"] = sum(cached) / len(cached) if cached else None
    out["cached_tokens"] = cached
    out["prompt_tokens"] = [r.prompt_tokens for r in records]
    out["ttft_s"] = [r.ttft_s for r in records]
    if server.name == "qanat":
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text.splitlines()
        out["metrics"] = [m for m in metrics if m.startswith("qanat_prompt_cache") and "_created" not in m]
    return out


def turns_of(server: Server) -> dict[str, Any]:
    records, wall = asyncio.run(run_conversations(f"{server.url}/v1", server.model, ConversationSpec(), SLOTS))
    return summarize_turns(records, wall)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory_of(texts: list[str], cache_ram_mib: int) -> dict[str, Any]:
    server = qanat("--cache-ram", str(cache_ram_mib))
    try:
        pid = httpx.get(f"{server.url}/ready", timeout=5).json()["executor_pid"]
        start = rss_mib(pid)
        peak = [start]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(rss_mib(pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        bodies = [{"model": server.model, "prompt": t, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
                  for t in texts]
        asyncio.run(run_load(f"{server.url}/v1/completions", bodies, concurrency=SLOTS))
        done.set()
        sampler.join()
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
        held = [line for line in metrics.splitlines() if line.startswith(("qanat_prompt_cache_bytes",
                                                                          "qanat_prompt_cache_evictions_total"))]
        return {"cache_ram_mib": cache_ram_mib, "rss_after_start_mib": start, "rss_peak_mib": max(peak),
                "rss_end_mib": rss_mib(pid), "metrics": held}
    finally:
        server.stop()


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md, from a results file."""
    lines: list[str] = []

    def s(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    if "repeat" in results:
        rep = results["repeat"]
        lines += ["| server | 1st round tok/s (TTFT p50 s) | 2nd round tok/s (TTFT p50 s) | 2nd round cached tokens |",
                  "|---|---|---|---|"]
        for name, (cold, warm) in rep.items():
            lines.append(f"| {name} | {cold['tokens_per_s']:.1f} ({s(cold['ttft_median_s'])}) | "
                         f"{warm['tokens_per_s']:.1f} ({s(warm['ttft_median_s'])}) | {s(warm['cached_tokens_mean'])} |")
        if {"qanat", "llama-server"} <= rep.keys():
            q, ls = rep["qanat"], rep["llama-server"]
            lines.append(f"\nqanat / llama-server: 1st round {q[0]['tokens_per_s'] / ls[0]['tokens_per_s']:.2f}x, "
                         f"2nd round {q[1]['tokens_per_s'] / ls[1]['tokens_per_s']:.2f}x\n")
    if "turns" in results:
        turns = results["turns"]
        names = list(turns)
        lines += ["| turn | " + " | ".join(f"{n} TTFT p50 s (cached tokens)" for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for i, row in enumerate(turns[names[0]]["turns"]):
            cells = [f"{s(turns[n]['turns'][i]['ttft_p50_s'])} ({s(turns[n]['turns'][i]['cached_tokens_mean'])})"
                     for n in names]
            lines.append(f"| {row['turn']} | " + " | ".join(cells) + " |")
        lines.append("| turns 2-4 | " + " | ".join(s(turns[n]["ttft_p50_later_turns_s"]) for n in names) + " |")
        lines.append("| output tok/s | " + " | ".join(f"{turns[n]['output_tokens_per_s']:.1f}" for n in names) + " |")
    if "disk" in results:
        d = results["disk"]
        lines += ["", "| qanat --cache-dir | tok/s | TTFT p50 s | cached tokens |", "|---|---|---|---|",
                  f"| cold round | {d['cold']['tokens_per_s']:.1f} | {s(d['cold']['ttft_median_s'])} | "
                  f"{s(d['cold']['cached_tokens_mean'])} |",
                  f"| same round after a restart | {d['after_restart']['tokens_per_s']:.1f} | "
                  f"{s(d['after_restart']['ttft_median_s'])} | {s(d['after_restart']['cached_tokens_mean'])} |"]
    if "memory" in results:
        m = results["memory"]
        lines += ["", f"memory (--cache-ram {m['cache_ram_mib']}): executor RSS {m['rss_after_start_mib']:.0f} MiB "
                  f"after start, peak {m['rss_peak_mib']:.0f}, end {m['rss_end_mib']:.0f}; {m['metrics']}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", help="print the tables of a results file and exit")
    parser.add_argument("--llama-server", default="/tmp/lls/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/"
                                                   "llama-server")
    parser.add_argument("--workloads", default="repeat,turns,disk,memory")
    parser.add_argument("--targets", default="qanat,llama-server")
    parser.add_argument("--seed", type=int, default=15000)
    parser.add_argument("--out", default="bench/results/prompt_cache.json")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())), end="")
        return 0
    workloads = args.workloads.split(",")
    model = LlamaModel(default_model_path(), vocab_only=True)
    texts = prompt_texts(model, N_PROMPTS, args.seed)
    results: dict[str, Any] = {"settings": {"threads": THREADS, "slots": SLOTS, "ctx_per_slot": CTX,
                                            "prompts": N_PROMPTS, "prompt_tokens": PROMPT_TOKENS,
                                            "new_tokens": NEW_TOKENS}}
    targets = [("qanat", lambda: qanat()), ("llama-server", lambda: llama_server(args.llama_server))]
    for name, start in targets:
        if not {"repeat", "turns"} & set(workloads) or name not in args.targets.split(","):
            continue
        server = start()
        try:
            if "repeat" in workloads:
                results.setdefault("repeat", {})[name] = [round_of(server, texts), round_of(server, texts)]
                print(name, "repeat", json.dumps(results["repeat"][name]), flush=True)
            if "turns" in workloads:
                results.setdefault("turns", {})[name] = turns_of(server)
                print(name, "turns", json.dumps(results["turns"][name]), flush=True)
        finally:
            server.stop()
    if "disk" in workloads:
        cache_dir = tempfile.mkdtemp(prefix="qanat-kv-")
        disk_texts = [t + " (disk)" for t in texts]  # prompts no earlier run saw
        first = qanat("--cache-dir", cache_dir)
        try:
            cold = round_of(first, disk_texts)
        finally:
            first.stop(graceful=True)  # SIGTERM: the free slots are written to disk too
        second = qanat("--cache-dir", cache_dir)
        try:
            warm = round_of(second, disk_texts)
        finally:
            second.stop()
        results["disk"] = {"cold": cold, "after_restart": warm,
                           "files_mib": sum(p.stat().st_size for p in Path(cache_dir).glob("*.qkv")) / 2**20}
        print("disk", json.dumps(results["disk"]), flush=True)
    if "memory" in workloads:
        many = prompt_texts(model, 64, args.seed + 1)
        results["memory"] = memory_of(many, 32)
        print("memory", json.dumps(results["memory"]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(markdown(results), end="")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
