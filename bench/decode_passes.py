"""Decode-step cost by batch order and slot placement, over llama.cpp's C API (no engine, no scheduler).

With a KV stream per sequence (kv_unified=false) llama.cpp runs one pass per run of consecutive seq ids, in
batch order: this measures what that costs, and what a cross-stream prefix copy costs.

    .venv/bin/python bench/decode_passes.py
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qanat.engine.executors.llamacpp import LlamaModel  # noqa: E402
from qanat.models.locate import default_model_path  # noqa: E402

SLOTS = 16
PROMPT_TOKENS = 200
LAYOUTS = {
    "16 decodes, sorted": list(range(16)),
    "16 decodes, reversed": list(range(15, -1, -1)),
    "16 decodes, evens then odds": list(range(0, 16, 2)) + list(range(1, 16, 2)),
    "4 decodes, slots 0-3": [0, 1, 2, 3],
    "4 decodes, slots 0, 4, 8, 12": [0, 4, 8, 12],
    "8 decodes, slots 0-7": list(range(8)),
    "8 decodes, even slots": list(range(0, 16, 2)),
    "1 decode": [5],
}


def main() -> int:
    model = LlamaModel(default_model_path())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = SLOTS * 1024, 512, 512, SLOTS
    params.n_threads = params.n_threads_batch = 2
    params.kv_unified = False
    ctx = llama_cpp.llama_init_from_model(model.ptr, params)
    memory = llama_cpp.llama_get_memory(ctx)
    rng = random.Random(0)
    pos = dict.fromkeys(range(SLOTS), 0)

    def decode(seq_ids: list[int], n_each: int = 1) -> float:
        batch = llama_cpp.llama_batch_init(len(seq_ids) * n_each, 0, 1)
        i = 0
        for seq in seq_ids:
            for _ in range(n_each):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = rng.randrange(1000, 20000), pos[seq], 1
                batch.seq_id[i][0], batch.logits[i] = seq, n_each == 1
                pos[seq] += 1
                i += 1
        batch.n_tokens = i
        start = time.perf_counter()
        status = llama_cpp.llama_decode(ctx, batch)
        elapsed = time.perf_counter() - start
        llama_cpp.llama_batch_free(batch)
        assert status == 0, status
        return elapsed

    for seq in range(SLOTS):
        decode([seq], PROMPT_TOKENS)
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(10):  # interleaved, so the machine's drift hits every layout alike
        for name, seq_ids in LAYOUTS.items():
            times[name].append(decode(seq_ids))
    print("| batch | median ms per step |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {1e3 * statistics.median(values):.1f} |")

    copied, plain = [], []
    for _ in range(8):
        llama_cpp.llama_memory_seq_cp(memory, 3, 14, -1, -1)
        llama_cpp.llama_memory_seq_rm(memory, 14, 150, -1)
        pos[14] = 150
        copied.append(decode([14]))
        llama_cpp.llama_memory_seq_rm(memory, 14, 150, -1)
        pos[14] = 150
        plain.append(decode([14]))
    print(f"| 1 decode right after a cross-stream seq_cp | {1e3 * statistics.median(copied):.1f} "
          f"(without: {1e3 * statistics.median(plain):.1f}) |")
    llama_cpp.llama_free(ctx)
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
