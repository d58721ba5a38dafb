"""Does a pass of 1 + k tokens of one sequence compute the same logits as k + 1 one-token decodes? With flash
attention off (what `--deterministic` runs), over llama.cpp's C API, no engine. It decides whether speculation
could ever be bit-for-bit in deterministic mode with the llama.cpp build that is loaded.

    .venv/bin/python bench/verify_exactness.py [--ctx-tokens 300] [--drafts 8]

The build this project installs has llamafile's tinyBLAS, which takes every matrix product of n >= 2 columns
(attention on the F16 KV cache is two of them) while a one-token decode takes ggml's vec_dot: another order of
summation. To try a build without it (llama.cpp's sources as vendored in the llama-cpp-python sdist):

    cmake -B build-nolf -DGGML_NATIVE=ON -DGGML_LLAMAFILE=OFF && cmake --build build-nolf --target ggml-cpu
    # a folder with that libggml-cpu.so and the other libraries of a build of the same sources, then:
    LD_LIBRARY_PATH=DIR LLAMA_CPP_LIB_PATH=DIR .venv/bin/python bench/verify_exactness.py
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qanat.engine.executors.llamacpp import LlamaModel, TokenBatch  # noqa: E402
from qanat.models.locate import default_model_path  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ctx-tokens", type=int, default=300, help="tokens already in the sequence's KV (≤ 500)")
    parser.add_argument("--drafts", type=int, default=8, help="tokens in the pass")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print("llama.cpp:", llama_cpp.llama_print_system_info().decode().strip())
    model = LlamaModel(default_model_path())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 2048, 512, 512, 1
    params.n_threads = params.n_threads_batch = args.threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model.ptr, params)
    memory = llama_cpp.llama_get_memory(ctx)
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 20000) for _ in range(args.ctx_tokens)]
    drafts = [rng.randrange(1000, 20000) for _ in range(args.drafts)]
    batch = TokenBatch(512)

    def decode(tokens: list[int], start: int, all_logits: bool = True) -> list[np.ndarray]:
        batch.set(tokens, list(range(start, start + len(tokens))), [0] * len(tokens))
        for i in range(len(tokens)):
            batch.logits[i] = 1 if all_logits or i == len(tokens) - 1 else 0
        status = llama_cpp.llama_decode(ctx, batch.batch)
        assert status == 0, status
        rows = range(len(tokens)) if all_logits else [len(tokens) - 1]
        return [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), (model.n_vocab,)).copy() for i in rows]

    decode(prompt, 0, all_logits=False)
    alone = [decode([token], args.ctx_tokens + j)[0] for j, token in enumerate(drafts)]
    llama_cpp.llama_memory_seq_rm(memory, 0, args.ctx_tokens, -1)
    together = decode(drafts, args.ctx_tokens)
    differences = [float(np.abs(a - b).max()) for a, b in zip(alone, together, strict=True)]
    picks = sum(int(a.argmax()) != int(b.argmax()) for a, b in zip(alone, together, strict=True))
    print(f"largest logit difference per position: {', '.join(f'{d:.3g}' for d in differences)}")
    print(f"greedy picks that differ: {picks} of {len(drafts)}")
    print("bit-identical" if max(differences) == 0 else "NOT bit-identical")
    llama_cpp.llama_free(ctx)
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
