"""A deterministic fake model behind the real executor boundary: the engine loop, cancellation, stops, prefix
reuse, energy attribution and crash recovery are tested in milliseconds, without weights.

The fake keeps each sequence's tokens as its "KV cache", checks positions as llama.cpp does (a gap is an
error), and computes logits from the sequence's last tokens: so a wrong prefix reuse, a lost cache op or a
token fed to the wrong sequence changes what it generates. Each step costs a fixed, known energy.
"""

from __future__ import annotations

import hashlib
import mmap
import time
from dataclasses import dataclass, field, replace

import numpy as np

from qanat.engine.executors.base import (
    ExecChunk,
    ExecutorFacts,
    Refusal,
    SampledLogprobs,
    StepBatch,
    StepEnergy,
    StepResult,
)
from qanat.engine.executors.kv_tiers import KVTiers, TierSettings
from qanat.engine.sampling import SamplingParams

# Vocabulary: 4 special tokens, then one token per byte.
BOS, EOS, USER, ASSISTANT = 0, 1, 2, 3
BYTE_OFFSET = 4
N_VOCAB = BYTE_OFFSET + 256
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CONTEXT_WINDOW = 4  # the logits depend on this many last tokens of the sequence


class FakeTokenizer:
    n_vocab = N_VOCAB
    eog_ids = frozenset({EOS})

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return ([BOS] if add_special else []) + [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id - BYTE_OFFSET]) if token_id >= BYTE_OFFSET else b""

    def chat_template(self) -> tuple[str, str, str] | None:
        return CHAT_TEMPLATE, "", ""


def fake_logits(context: list[int]) -> np.ndarray:
    """logits: [N_VOCAB], a function of the sequence's last CONTEXT_WINDOW tokens. Greedy picks a lowercase
    letter or a space; end-of-generation never wins greedily, so lengths are set by max_tokens and stops."""
    digest = hashlib.blake2b(np.asarray(context[-CONTEXT_WINDOW:], dtype=np.int64).tobytes(), digest_size=8)
    rng = np.random.default_rng(int.from_bytes(digest.digest(), "little"))
    logits = rng.normal(0.0, 1.0, N_VOCAB)
    letters = [BYTE_OFFSET + c for c in b"abcdefghijklmnopqrstuvwxyz "]
    logits[letters] += 4.0
    logits[EOS] = -2.0
    return logits


@dataclass(frozen=True)
class FakeSpec:
    num_slots: int = 4
    context_length: int = 256
    batch_tokens: int = 64
    step_delay_s: float = 0.0  # wall time each step takes, to keep requests in flight in tests
    joules_per_step: float = 1.0  # each step's energy: this + joules_per_token per token
    joules_per_token: float = 0.01
    idle_joules_per_step: float = 0.5  # reported as idle before each step
    tiers: TierSettings = field(default_factory=TierSettings)  # the prompt cache beyond the slots
    identity: str = "fake-model"  # what its disk tier's files are checked against
    # As a draft model (chunks with a draft_len): it drafts its own greedy tokens, except that the draft for every
    # position divisible by draft_miss_every (when > 0) is wrong; draft_cost is what its facts report.
    draft_miss_every: int = 0
    draft_cost: float = 0.0

    def create(self) -> FakeExecutor:
        return FakeExecutor(self)


class _FakeSampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray) -> tuple[int, np.ndarray]:
        """(token, log-probabilities of the raw distribution)."""
        shifted = logits - logits.max()
        log_probs = shifted - np.log(np.exp(shifted).sum())
        biased = logits.copy()
        for token_id, bias in self.params.logit_bias:
            biased[token_id] += bias
        if self.params.ignore_eos:
            biased[EOS] = -np.inf
        if self.params.is_greedy:
            return int(np.argmax(biased)), log_probs
        scaled = (biased - biased.max()) / self.params.temperature
        probs = np.exp(scaled)
        return int(self.rng.choice(N_VOCAB, p=probs / probs.sum())), log_probs


class FakeExecutor:
    def __init__(self, spec: FakeSpec) -> None:
        self.spec = spec
        self.facts = ExecutorFacts(
            context_length=spec.context_length, num_slots=spec.num_slots, batch_tokens=spec.batch_tokens,
            chip="fake", energy_source="estimated:fake", draft_cost=spec.draft_cost,
        )
        self.kv: dict[int, list[int]] = {i: [] for i in range(spec.num_slots)}
        self.samplers: dict[str, _FakeSampler] = {}
        self.steps = 0
        self.restarts = 0
        self.drafted_tokens = 0  # draft tokens it was asked to verify (tests check speculation happened)
        self.tiers = self._tiers()

    def _tiers(self) -> KVTiers:
        identity: dict[str, str | int] = {"model": self.spec.identity, "context_length": self.spec.context_length}
        return KVTiers(_FakeSequences(self.kv), self.spec.tiers, identity)

    def is_alive(self) -> bool:
        return True

    def restart(self) -> None:
        self.tiers.close()
        self.kv = {i: [] for i in range(self.spec.num_slots)}
        self.samplers.clear()
        self.restarts += 1
        self.tiers = self._tiers()

    def close(self) -> None:
        self.samplers.clear()
        self.tiers.close()

    def execute(self, batch: StepBatch) -> StepResult:
        start_s = time.perf_counter()
        self.steps += 1
        for request_id in batch.released:
            self.samplers.pop(request_id, None)
        refused: dict[str, Refusal] = {}
        for request_id, params in batch.new_requests:
            if params.constraint is not None:
                refused[request_id] = Refusal("the fake model has no grammar support",
                                              params.constraint.param or "response_format")
            else:
                self.samplers[request_id] = _FakeSampler(params)
        failed = self.tiers.apply(batch.cache_ops)
        chunks = [c for c in batch.chunks if c.request_id not in refused and c.seq_id not in failed]
        n_tokens = sum(len(c.token_ids) + len(c.draft_ids) + c.draft_len for c in chunks)
        if n_tokens > self.spec.batch_tokens:
            raise RuntimeError(f"batch has {n_tokens} tokens, more than {self.spec.batch_tokens}")
        sampled: dict[str, int] = {}
        logprobs: dict[str, SampledLogprobs] = {}
        extra: dict[str, list[int]] = {}
        extra_logprobs: dict[str, list[SampledLogprobs]] = {}
        drafted: dict[str, int] = {}
        for chunk in chunks:
            seq = self.kv[chunk.seq_id]
            if chunk.draft_len:
                chunk = replace(chunk, draft_ids=self._draft(seq[:chunk.start_pos] + chunk.token_ids, chunk.draft_len))
                drafted[chunk.request_id] = len(chunk.draft_ids)
            if chunk.start_pos != len(seq):  # llama.cpp refuses a gap in a sequence's positions the same way
                raise RuntimeError(f"seq {chunk.seq_id}: chunk starts at {chunk.start_pos}, KV holds {len(seq)}")
            if len(seq) + len(chunk.token_ids) + len(chunk.draft_ids) > self.spec.context_length:
                raise RuntimeError(f"seq {chunk.seq_id} outgrows its {self.spec.context_length} cells")
            seq.extend(chunk.token_ids)
            if chunk.needs_logits:
                kept, kept_logprobs = self._sample_and_verify(chunk, seq)
                sampled[chunk.request_id] = kept[0]
                if chunk.draft_ids:
                    extra[chunk.request_id] = kept[1:]
                if kept_logprobs:
                    logprobs[chunk.request_id] = kept_logprobs[0]
                    if chunk.draft_ids:
                        extra_logprobs[chunk.request_id] = kept_logprobs[1:]
        if self.spec.step_delay_s:
            time.sleep(self.spec.step_delay_s)
        spec = self.spec
        energy = StepEnergy(spec.idle_joules_per_step, spec.joules_per_step + spec.joules_per_token * n_tokens)
        return StepResult(sampled, logprobs, refused, energy, time.perf_counter() - start_s,
                          kv_cache=self.tiers.take_report(), extra_tokens=extra, extra_logprobs=extra_logprobs,
                          drafted=drafted)

    def _draft(self, tokens: list[int], n: int) -> tuple[int, ...]:
        """The fake as its own draft model: its greedy continuation of `tokens` (raw logits, no sampler)."""
        context = list(tokens)
        for _ in range(n):
            token = int(np.argmax(fake_logits(context)))
            if self.spec.draft_miss_every and len(context) % self.spec.draft_miss_every == 0:
                token = BYTE_OFFSET + (token - BYTE_OFFSET + 1) % 256  # another byte: rejected by greedy requests
            context.append(token)
        return tuple(context[len(tokens):])

    def _sample_and_verify(self, chunk: ExecChunk, seq: list[int]) -> tuple[list[int], list[SampledLogprobs]]:
        """Sample the next token; then, as llama.cpp's executor does, keep each draft token that equals what was
        sampled before it and sample again after it. The "KV" ends up holding the kept drafts only."""
        sampler = self.samplers[chunk.request_id]
        kept: list[int] = []
        kept_logprobs: list[SampledLogprobs] = []
        for offset in range(len(chunk.draft_ids) + 1):
            token, log_probs = sampler.sample(fake_logits(seq))
            kept.append(token)
            k = sampler.params.logprobs
            if k is not None:
                top = np.argsort(log_probs)[::-1][:k]
                kept_logprobs.append(SampledLogprobs(
                    token, float(log_probs[token]), tuple((int(t), float(log_probs[t])) for t in top)))
            if offset == len(chunk.draft_ids) or token != chunk.draft_ids[offset]:
                break
            seq.append(token)
        self.drafted_tokens += len(chunk.draft_ids)
        return kept, kept_logprobs



class _FakeSequences:
    """The fake's "KV" (token lists) as the tiers see sequences: a state is the tokens as int32."""

    def __init__(self, kv: dict[int, list[int]]) -> None:
        self.kv = kv

    def state_size(self, seq_id: int) -> int:
        return 4 * len(self.kv[seq_id])

    def read_state(self, seq_id: int, dst: mmap.mmap) -> int:
        data = np.asarray(self.kv[seq_id], dtype="<i4").tobytes()
        dst[:len(data)] = data
        return len(data)

    def write_state(self, seq_id: int, src: mmap.mmap, nbytes: int) -> bool:
        self.kv[seq_id][:] = np.frombuffer(src[:nbytes], dtype="<i4").tolist()
        return True

    def copy(self, src_seq_id: int, dst_seq_id: int) -> None:
        self.kv[dst_seq_id][:] = self.kv[src_seq_id]

    def keep(self, seq_id: int, n_tokens: int) -> None:
        del self.kv[seq_id][n_tokens:]
