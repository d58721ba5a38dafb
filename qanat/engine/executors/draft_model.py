"""A draft model for speculative decoding (`--speculative draft --draft-model PATH`): a second llama.cpp model and
context in the executor's process, next to the target, guessing each speculating request's next tokens greedily.

Its KV holds one sequence per target sequence (the same seq ids), kept in step with the target's lazily: this
module records every token the target's sequences are given (cache ops, chunks, kept drafts), and before
drafting for a sequence it feeds the draft context what it has not seen yet. After verification it removes the
draft KV past the accepted tokens. Whatever the target's cache ops drop (a trim, an emptied slot, a failed
restore) goes from the draft KV too; what they keep (a finished request's slot, held as a cached prefix) the
draft keeps as well, so the next request on that prefix neither re-feeds it nor computes it in other passes
than the target did (which, feeding a shared prefix afresh, turned 24 of 404 self-drafted tokens into
rejections at near-ties, against 4 when kept). The policy
(`engine/core/speculation.py`) decides how many tokens each request drafts; all requests drafting in a step are
batched together, one draft `llama_decode` per draft position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from qanat.engine.executors.base import CacheOp, ExecChunk
from qanat.engine.executors.llamacpp import ContextSettings, LlamaModel, TokenBatch, new_context, time_decode

log = logging.getLogger("qanat.executor")

# llama.cpp's common/speculative.cpp: vocabularies may differ in size by this much (added tokens), and token texts
# are compared from this id on (the first ids are special tokens some conversions name differently).
VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START_TOKEN_ID = 5


class DraftVocabError(ValueError):
    """The draft model cannot draft for the target: their vocabularies differ."""


def vocab_mismatch(target: LlamaModel, draft: LlamaModel) -> str | None:
    """Why `draft`'s tokens cannot stand for `target`'s, or None when they can (the checks of llama.cpp's
    `common_speculative_are_compatible`)."""
    t, d = target.vocab, draft.vocab
    if llama_cpp.llama_vocab_type(t) != llama_cpp.llama_vocab_type(d):
        return f"vocabulary types differ ({llama_cpp.llama_vocab_type(t)} vs {llama_cpp.llama_vocab_type(d)})"
    specials: list[tuple[str, Callable[[Any], int | bool]]] = [
        ("adds BOS", llama_cpp.llama_vocab_get_add_bos), ("adds EOS", llama_cpp.llama_vocab_get_add_eos),
        ("BOS id", llama_cpp.llama_vocab_bos), ("EOS id", llama_cpp.llama_vocab_eos),
    ]
    for name, get in specials:
        if get(t) != get(d):
            return f"special tokens differ: {name} {get(t)} vs {get(d)}"
    if abs(target.n_vocab - draft.n_vocab) > VOCAB_MAX_SIZE_DIFFERENCE:
        return (f"vocabulary sizes differ by more than {VOCAB_MAX_SIZE_DIFFERENCE} "
                f"({target.n_vocab} vs {draft.n_vocab})")
    for token_id in range(VOCAB_CHECK_START_TOKEN_ID, min(target.n_vocab, draft.n_vocab)):
        t_text, d_text = llama_cpp.llama_vocab_get_text(t, token_id), llama_cpp.llama_vocab_get_text(d, token_id)
        if t_text != d_text:
            return (f"token {token_id} differs ({t_text.decode(errors='replace')!r} vs "
                    f"{d_text.decode(errors='replace')!r})")
    return None


def check_vocab(target: LlamaModel, draft: LlamaModel, target_path: Path, draft_path: Path) -> None:
    reason = vocab_mismatch(target, draft)
    if reason is not None:
        raise DraftVocabError(f"the draft model {draft_path} cannot draft for the model {target_path}: {reason}")


def check_vocab_files(target_path: Path, draft_path: Path) -> None:
    """The same check on the two files' vocabularies alone (no weights): at start-up, before the executor loads."""
    target, draft = LlamaModel(target_path, vocab_only=True), LlamaModel(draft_path, vocab_only=True)
    try:
        check_vocab(target, draft, target_path, draft_path)
    finally:
        target.close()
        draft.close()


class DraftModel:
    """The draft model, its context and what its sequences hold. Executor thread only."""

    def __init__(self, path: Path, target_path: Path, target: LlamaModel, settings: ContextSettings) -> None:
        self.model = LlamaModel(path)
        self.ctx: Any = None
        try:
            check_vocab(target, self.model, target_path, path)
            self.ctx = new_context(self.model, settings)
        except BaseException:
            self.close()
            raise
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.batch = TokenBatch(self.n_batch)
        self.n_vocab = min(target.n_vocab, self.model.n_vocab)  # a drafted id the target does not have: never
        self.probe_token = target.bos_id if target.bos_id >= 0 else 0
        # Per seq id: the target's tokens from position 0, as far as they are known (None: not known, e.g. a
        # prefix restored from a tier that no longer holds its entry; such a sequence drafts nothing until its
        # next request), and how many of them the draft's KV holds.
        self.known: dict[int, list[int] | None] = {i: [] for i in range(settings.num_slots)}
        self.fed: dict[int, int] = dict.fromkeys(range(settings.num_slots), 0)
        self._drafts: dict[int, tuple[int, ...]] = {}  # seq id -> drafts of this step, until settled

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        self.model.close()

    def measure_cost(self, target_ctx: Any) -> float:
        """A draft pass's time over a target pass's (one-token decodes, both contexts empty): r in the policy's
        cost rule. About the two models' weight bytes' ratio on a memory-bound chip; measured, since on a CPU
        whose cache holds a small model it is not."""
        target_s = time_decode(target_ctx, [self.probe_token])
        draft_s = time_decode(self.ctx, [self.probe_token])
        log.info("draft model %s: a one-token decode takes %.2f ms, the target's %.2f ms", self.model.path,
                 draft_s * 1e3, target_s * 1e3)
        return draft_s / target_s

    # -- following the target's sequences ----------------------------------------------------------------

    def apply(self, ops: list[CacheOp], failed: set[int],
              entry_tokens: Callable[[str], tuple[int, ...] | None]) -> None:
        """What the target's cache ops did to its sequences (after they ran): copies, restores, trims."""
        for op in ops:
            seq_id = op.seq_id
            if seq_id in failed:
                self.known[seq_id] = []
                self._trim(seq_id, 0)
                continue
            if op.restore_key is not None:
                tokens = entry_tokens(op.restore_key)
                self.known[seq_id] = list(tokens[:op.keep]) if tokens is not None else None
                self._trim(seq_id, 0)
            elif op.copy_from is not None:
                source = self.known[op.copy_from]
                self.known[seq_id] = source[:op.keep] if source is not None and len(source) >= op.keep else None
                # As the target does: across streams llama.cpp copies whole sequences; the tail is trimmed below.
                llama_cpp.llama_memory_seq_rm(self.memory, seq_id, 0, -1)
                llama_cpp.llama_memory_seq_cp(self.memory, op.copy_from, seq_id, -1, -1)
                self.fed[seq_id] = min(self.fed[op.copy_from], op.keep)
            known = self.known[seq_id]
            if known is not None and len(known) < op.keep:
                self.known[seq_id] = known = None
            if known is None and op.keep == 0:
                self.known[seq_id] = known = []
            if known is not None:
                del known[op.keep:]
            self._trim(seq_id, min(self.fed[seq_id], op.keep) if known is not None else 0)

    def observe(self, chunks: list[ExecChunk]) -> None:
        """The tokens the target's sequences are about to be given (their drafts not yet)."""
        for chunk in chunks:
            seq_id = chunk.seq_id
            known = self.known[seq_id]
            if known is None or len(known) < chunk.start_pos:
                self.known[seq_id] = None
                self._trim(seq_id, 0)
                continue
            del known[chunk.start_pos:]
            known += chunk.token_ids
            if self.fed[seq_id] > chunk.start_pos:
                self._trim(seq_id, chunk.start_pos)

    def settle(self, chunk: ExecChunk, accepted: int) -> None:
        """After verification: the accepted drafts are the target's tokens now; the draft KV past them goes."""
        drafts = self._drafts.pop(chunk.seq_id)
        known = self.known[chunk.seq_id]
        assert known is not None
        base = len(known)
        known += drafts[:accepted]
        # The draft's KV holds known + drafts[:-1] (the last draft was never fed): keep what was accepted.
        self._trim(chunk.seq_id, min(self.fed[chunk.seq_id], base + accepted))

    def _trim(self, seq_id: int, n_tokens: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, n_tokens, -1)
        self.fed[seq_id] = n_tokens

    # -- drafting ----------------------------------------------------------------------------------------------

    def draft(self, chunks: list[ExecChunk]) -> dict[str, tuple[int, ...]]:
        """Up to `draft_len` greedy tokens for each chunk, after its sequence's tokens: the unseen ones fed first
        (batched, split at n_batch), then one decode per draft position for every chunk still drafting."""
        chunks = sorted((c for c in chunks if self.known[c.seq_id] is not None), key=lambda c: c.seq_id)
        if not chunks:
            return {}
        try:
            return self._draft(chunks)
        except RuntimeError as e:  # no drafts this step; the draft KV of these sequences is rebuilt when needed
            log.warning("drafting failed: %s", e)
            for chunk in chunks:
                self._drafts.pop(chunk.seq_id, None)
                self._trim(chunk.seq_id, 0)
            return {}

    def _draft(self, chunks: list[ExecChunk]) -> dict[str, tuple[int, ...]]:
        pending: list[tuple[int, int, list[int]]] = []  # (seq id, first position, tokens the draft has not seen)
        for chunk in chunks:
            known = self.known[chunk.seq_id]
            assert known is not None
            start = min(self.fed[chunk.seq_id], len(known) - 1)  # at least the last token: its logits are needed
            self._trim(chunk.seq_id, start)
            pending.append((chunk.seq_id, start, known[start:]))
        guesses = self._feed(pending)  # seq id -> the first draft token
        drafts: dict[int, list[int]] = {seq_id: [token] for seq_id, token in guesses.items()}
        base = {seq_id: start + len(tokens) for seq_id, start, tokens in pending}  # the first draft's position
        self.fed.update(base)
        for depth in range(1, max(c.draft_len for c in chunks)):
            # Draft `depth` (from 0) goes in at its position; its logits give the next one.
            step = [(c.seq_id, base[c.seq_id] + depth - 1, drafts[c.seq_id][-1:])
                    for c in chunks if c.draft_len > depth]
            for seq_id, token in self._feed(step).items():
                drafts[seq_id].append(token)
                self.fed[seq_id] += 1
        self._drafts.update((seq_id, tuple(d)) for seq_id, d in drafts.items())
        return {c.request_id: tuple(drafts[c.seq_id]) for c in chunks}

    def _feed(self, pending: list[tuple[int, int, list[int]]]) -> dict[int, int]:
        """Decode each sequence's tokens from its position on, in as few passes as n_batch allows; the argmax
        of the logits after each sequence's last token."""
        guesses: dict[int, int] = {}
        flat = [(seq_id, start + i, token, i == len(tokens) - 1)
                for seq_id, start, tokens in pending for i, token in enumerate(tokens)]
        for offset in range(0, len(flat), self.n_batch):
            part = flat[offset:offset + self.n_batch]
            self.batch.set([t for _, _, t, _ in part], [p for _, p, _, _ in part], [s for s, _, _, _ in part])
            last = [(i, s) for i, (s, _, _, is_last) in enumerate(part) if is_last]
            for i, _ in last:
                self.batch.logits[i] = 1
            status = llama_cpp.llama_decode(self.ctx, self.batch.batch)
            if status != 0:
                raise RuntimeError(f"the draft model's llama_decode failed with status {status}")
            for i, seq_id in last:
                # logits: [n_vocab] of the draft model at batch index i
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), (self.model.n_vocab,))
                guesses[seq_id] = int(np.argmax(logits[:self.n_vocab]))
        return guesses
