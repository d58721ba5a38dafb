"""What moving one sequence's KV costs (llama_state_seq_get_data_ext / set_data_ext) against computing it (prefill),
per token, with the embedded model, 2 threads, in this process:

    flock /tmp/qanat-heavy.lock .venv/bin/python bench/kv_state_cost.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import distinct_prompts  # noqa: E402
from qanat.engine.executors.base import CacheOp, ExecChunk, KVSave, StepBatch  # noqa: E402
from qanat.engine.executors.kv_tiers import TierSettings  # noqa: E402
from qanat.engine.executors.llamacpp import ContextSettings, LlamaCppSpec, LlamaModel  # noqa: E402
from qanat.engine.sampling import SamplingParams  # noqa: E402
from qanat.models.locate import default_model_path  # noqa: E402

ROUNDS = 5


def main() -> int:
    path = default_model_path()
    spec = LlamaCppSpec(path, ContextSettings(num_slots=2, context_length=1024, batch_tokens=512, threads=2),
                        tiers=TierSettings(ram_bytes=1 << 30))
    executor = spec.create()
    vocab = LlamaModel(path, vocab_only=True)
    print("| prompt tokens | prefill ms | prefill ms/token | state MiB | save ms | restore ms | save µs/token | "
          "restore µs/token | prefill / restore |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for n in (64, 230, 900):
            ids = [t for p in distinct_prompts(vocab, 5, seed=n) for t in p][:n]
            prefill = []
            for r in range(ROUNDS):
                rid = f"r{n}-{r}"
                executor.execute(StepBatch([CacheOp(0, keep=0)], [], [(rid, SamplingParams(temperature=0))]))
                start = time.perf_counter()
                for s in range(0, n, 512):
                    chunk = ids[s:s + 512]
                    executor.execute(StepBatch([], [ExecChunk(rid, 0, s, chunk, s + len(chunk) == n)]))
                prefill.append(time.perf_counter() - start)
                executor.execute(StepBatch([], [], [], [rid]))
            # sequence 0 holds the prompt: save it, restore it into sequence 1 (then trimmed, as on a hit)
            saves, restores = [], []
            for r in range(ROUNDS):
                key = f"{n}-again-{r}"
                start = time.perf_counter()
                executor.tiers.apply([CacheOp(0, keep=n, save=KVSave(key, tuple(ids), n))])
                saves.append(time.perf_counter() - start)
                start = time.perf_counter()
                executor.tiers.apply([CacheOp(1, keep=n - 1, restore_key=key)])
                restores.append(time.perf_counter() - start)
            executor.tiers.take_report()
            nbytes = executor.tiers.ram[f"{n}-again-0"].nbytes
            p, sv, rs = statistics.median(prefill), statistics.median(saves), statistics.median(restores)
            print(f"| {n} | {1000 * p:.1f} | {1000 * p / n:.2f} | {nbytes / 2**20:.2f} | {1000 * sv:.2f} | "
                  f"{1000 * rs:.2f} | {1e6 * sv / n:.1f} | {1e6 * rs / n:.1f} | {p / rs:.0f}x |", flush=True)
    finally:
        executor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
