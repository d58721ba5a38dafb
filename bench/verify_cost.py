"""What verifying k drafted tokens costs on this machine: one llama_decode of 1+k tokens of one sequence,
logits at every position, against a plain one-token decode; plus the per-step work around it (reading
logits, argmax, a llama.cpp greedy sampler, KV trimming). Over llama.cpp's C API, no engine.

    flock /tmp/qanat-heavy.lock .venv/bin/python bench/verify_cost.py [--threads 2] [--ctx-tokens 300]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qanat.engine.executors.llamacpp import LlamaModel  # noqa: E402
from qanat.models.locate import default_model_path  # noqa: E402

SIZES = (1, 2, 3, 4, 6, 8, 12, 16)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx-tokens", type=int, default=300, help="tokens already in the sequence's KV")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--flash-attn", default="auto", choices=["auto", "on", "off"])
    args = parser.parse_args()
    model = LlamaModel(default_model_path())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 2048, 512, 512, 1
    params.n_threads = params.n_threads_batch = args.threads
    params.flash_attn_type = {"auto": -1, "on": 1, "off": 0}[args.flash_attn]
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model.ptr, params)
    memory = llama_cpp.llama_get_memory(ctx)
    rng = random.Random(0)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(start: int, n: int, all_logits: bool) -> float:
        for i in range(n):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = rng.randrange(1000, 20000), start + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, all_logits or i == n - 1
        batch.n_tokens = n
        t0 = time.perf_counter()
        status = llama_cpp.llama_decode(ctx, batch)
        elapsed = time.perf_counter() - t0
        assert status == 0, status
        return elapsed

    decode(0, args.ctx_tokens, False)
    base = args.ctx_tokens
    times: dict[int, list[float]] = {n: [] for n in SIZES}
    last_only: dict[int, list[float]] = {n: [] for n in SIZES}
    for _ in range(args.repeats):  # interleaved so drift hits every size alike
        for n in SIZES:
            times[n].append(decode(base, n, True))
            llama_cpp.llama_memory_seq_rm(memory, 0, base, -1)
            last_only[n].append(decode(base, n, False))
            llama_cpp.llama_memory_seq_rm(memory, 0, base, -1)
    one = statistics.median(times[1])
    print(f"threads={args.threads}, {args.ctx_tokens} tokens in KV, flash_attn={args.flash_attn}\n")
    print("| tokens in the pass (1 + k drafted) | median ms, logits at all | × one-token decode "
          "| break-even accepted drafts per pass | median ms, logits at the last only |")
    print("|---|---|---|---|---|")
    for n in SIZES:
        t = statistics.median(times[n])
        last = statistics.median(last_only[n])
        print(f"| {n} | {1e3 * t:.2f} | {t / one:.2f} | {t / one - 1:.2f} | {1e3 * last:.2f} |")

    # Per-step work around a decode, for one sequence.
    decode(base, 8, True)
    n_vocab = model.n_vocab
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    k = 200

    def timed(fn: object) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            fn()  # type: ignore[operator]
        return (time.perf_counter() - t0) / k * 1e6

    def read_argmax() -> None:
        int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, 3), (n_vocab,))))

    def sampler() -> None:
        llama_cpp.llama_sampler_sample(chain, ctx, 3)

    def trim() -> None:
        llama_cpp.llama_memory_seq_rm(memory, 0, base + 8, -1)

    print("\n| per-step work | µs |\n|---|---|")
    print(f"| logits row → numpy argmax | {timed(read_argmax):.0f} |")
    print(f"| llama_sampler_sample (greedy chain) | {timed(sampler):.0f} |")
    print(f"| llama_memory_seq_rm (nothing to remove) | {timed(trim):.0f} |")
    llama_cpp.llama_sampler_free(chain)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
