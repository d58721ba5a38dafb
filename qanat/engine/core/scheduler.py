"""Scheduling policy: which tokens of which requests go into the next forward pass.

Pure bookkeeping, no llama.cpp: testable with hand-written sampled tokens.

The KV cache is split into `num_slots` sequences (llama.cpp seq ids) of `context_length` cells each.
Every step, each running request is granted tokens so that `num_computed_tokens` catches up with
`num_tokens`: decoding requests get one token, prefilling ones a chunk of their prompt from what is left
of the step's token budget, oldest first. A new request takes a free slot next to the running ones, so their
seq ids stay consecutive (llama.cpp's pass count depends on it). A slot keeps the KV of its last request when
that request ends, so a later prompt that starts the same way (a system prompt, a chat history) reuses it,
either in place or by copying it into the chosen slot: that is the prefix cache. Deterministic mode trades
batching of prompts and the prefix cache for results that do not depend on other traffic.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field, replace

from qanat.engine.client import FinishReason
from qanat.engine.core.prefix_cache import PrefixCache
from qanat.engine.core.request import Request, RequestState
from qanat.engine.core.speculation import Speculator
from qanat.engine.executors.base import CacheOp, KVSave

# A prefix copy moves a whole sequence's KV buffer; below this many shared tokens recomputing is cheaper.
MIN_PREFIX_COPY_TOKENS = 16
# A free slot about to be overwritten is saved to the prompt cache's RAM tier when it would lose at least this many
# tokens that no other slot or entry holds (a save costs ~20-30 µs per token here, prefill ~3.5 ms).
MIN_SAVE_TOKENS = 32


@dataclass
class Slot:
    seq_id: int
    token_ids: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds, from pos 0
    request: Request | None = None
    last_used: int = 0  # step counter, for least-recently-used eviction of a free slot's cached prefix
    exact_tokens: int = 0  # of token_ids, those computed as whole prompt chunks from position 0 (deterministic)


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    seq_id: int
    start_pos: int  # position of token_ids[0]; equals the request's num_computed_tokens
    token_ids: list[int]
    needs_logits: bool  # the chunk reaches the request's last token: sample its next one
    draft_ids: tuple[int, ...] = ()  # guessed tokens verified after token_ids (speculative decoding)
    draft_len: int = 0  # or: tokens the executor's draft model guesses and verifies after token_ids

    @property
    def num_tokens(self) -> int:
        """Tokens this chunk may put in the pass: its own, and the drafts verified after them."""
        return len(self.token_ids) + len(self.draft_ids) + self.draft_len


@dataclass(frozen=True)
class SchedulerPlan:
    cache_ops: list[CacheOp]  # applied in order, before the batch
    chunks: list[ScheduledChunk]
    admitted: list[Request]  # given a slot in this step: the executor prepares their samplers

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.cache_ops


@dataclass(frozen=True)
class StepOutput:
    request: Request
    new_token_id: int | None  # None when the step only advanced the prompt
    finished: bool


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Scheduler:
    def __init__(self, num_slots: int, context_length: int, max_batch_tokens: int, deterministic: bool = False,
                 prefix_cache: PrefixCache | None = None, speculator: Speculator | None = None) -> None:
        if max_batch_tokens < num_slots:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= num_slots ({num_slots})")
        self.num_slots = num_slots
        self.context_length = context_length
        self.max_batch_tokens = max_batch_tokens
        self.deterministic = deterministic
        self.speculator = speculator  # drafts tokens for decoding requests
        self.slots = [Slot(seq_id=i) for i in range(num_slots)]
        self._slot_by_seq_id = {slot.seq_id: slot for slot in self.slots}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._pending_ops: list[CacheOp] = []
        self._step = itertools.count(1)
        self._last_step_decoded = False  # deterministic mode alternates decode and prompt steps
        self.prefix_cache = prefix_cache or PrefixCache(tiers=())  # tiers beyond the slots (RAM, disk), if any

    # -- intake --------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; the engine has already checked its size and the queue's bound."""
        assert request.num_prompt_tokens + request.max_tokens <= self.context_length
        self.waiting.append(request)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request now (stop string, cancel, error) and free its slot at once."""
        if request.is_finished:
            return
        if request.state is RequestState.WAITING:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
            assert request.slot is not None
            slot = self._slot_by_seq_id[request.slot]
            slot.request = None
            if reason is FinishReason.ERROR:  # the sequence's KV may be half-written: drop it
                slot.token_ids = []
                self._pending_ops.append(CacheOp(slot.seq_id, keep=0))
        request.state = RequestState.FINISHED
        request.finish_reason = reason
        if self.speculator is not None:
            self.speculator.forget(request.request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending_ops)

    @property
    def num_free_slots(self) -> int:
        return sum(slot.request is None for slot in self.slots)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV cells held by running requests (cached prefixes of free slots not counted)."""
        used = sum(len(s.token_ids) for s in self.slots if s.request is not None)
        return used / (self.context_length * len(self.slots))

    # -- policy --------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerPlan:
        step = next(self._step)
        ops, self._pending_ops = self._pending_ops, []
        num_running = len(self.running)
        chunks = self._schedule_isolated(ops, step) if self.deterministic else self._schedule_mixed(ops, step)
        for chunk in chunks:
            self._slot_by_seq_id[chunk.seq_id].last_used = step
        return SchedulerPlan(cache_ops=ops, chunks=chunks, admitted=self.running[num_running:])

    def forget_cache(self) -> None:
        """The executor lost every sequence's KV (it restarted): no slot holds a prefix any more.

        Running requests must have been finished first."""
        assert not self.running, "finish the running requests before forgetting their KV"
        self._pending_ops = []
        for slot in self.slots:
            slot.token_ids = []
        self.prefix_cache.forget_ram()

    def restore_failed(self, plan: SchedulerPlan, seq_ids: list[int]) -> SchedulerPlan:
        """The executor could not load a stored prefix into these sequences (a disk file gone bad or evicted by
        another process): they are empty and their chunks did not run. Their requests start their prompts over."""
        failed = set(seq_ids)
        for chunk in plan.chunks:
            if chunk.seq_id in failed:
                chunk.request.num_computed_tokens = chunk.request.num_cached_tokens = 0
                chunk.request.cached_from = None
        for seq_id in failed:
            self._slot_by_seq_id[seq_id].token_ids = []
        return replace(plan, chunks=[c for c in plan.chunks if c.seq_id not in failed])

    def flush_ops(self) -> list[CacheOp]:
        """Save what the free slots hold and no tier does (before a shutdown, so that a disk tier keeps it)."""
        ops = []
        for slot in self.slots:
            save = self._save_before_overwrite(slot, 0) if slot.request is None else None
            if save is not None:
                ops.append(CacheOp(slot.seq_id, keep=len(slot.token_ids), save=save))
        return ops

    def _schedule_mixed(self, ops: list[CacheOp], step: int) -> list[ScheduledChunk]:
        """Decodes first, one token each, so running streams keep their pace; then prompt chunks, oldest first."""
        chunks: list[ScheduledChunk] = []
        budget = self.max_batch_tokens
        for request in self.running:
            if request.state is RequestState.DECODING:
                chunks.append(self._chunk(request, 1))
                budget -= 1
        for request in self.running:
            if request.state is RequestState.PREFILLING and budget > 0:
                n = min(request.num_tokens - request.num_computed_tokens, budget)
                chunks.append(self._chunk(request, n))
                budget -= n

        deferred: list[Request] = []
        while self.waiting and budget > 0 and self.num_free_slots > 0:
            request = self.waiting.popleft()
            op = self._admit(request, step)
            if op is None:
                deferred.append(request)
                continue
            ops.append(op)
            n = min(request.num_prompt_tokens - request.num_computed_tokens, budget)
            chunks.append(self._chunk(request, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        if self.speculator is not None:
            chunks = self._with_drafts(chunks, budget)
        return chunks

    def _with_drafts(self, chunks: list[ScheduledChunk], budget: int) -> list[ScheduledChunk]:
        """Drafted tokens for decoding requests, from what is left of the budget once every real token is in."""
        assert self.speculator is not None
        decoding = [c.request for c in chunks if c.request.state is RequestState.DECODING]
        batch_tokens = sum(len(c.token_ids) for c in chunks)
        if self.speculator.config.uses_draft_model:
            lengths = self.speculator.propose_lengths(decoding, batch_tokens, budget)
            return [replace(c, draft_len=lengths[c.request.request_id]) if c.request.request_id in lengths else c
                    for c in chunks]
        drafts = self.speculator.propose(decoding, batch_tokens, budget)
        return [replace(c, draft_ids=tuple(drafts[c.request.request_id])) if c.request.request_id in drafts else c
                for c in chunks]

    def _schedule_isolated(self, ops: list[CacheOp], step: int) -> list[ScheduledChunk]:
        """Deterministic mode: a step is every decode, or one prompt chunk alone; the two take turns.

        llama.cpp's kernels give a prompt token slightly different numbers depending on how many tokens share
        its pass, while decodes (attention without flash) measured bit-identical alone and batched. A prompt
        always cut the same way (`max_batch_tokens`, then the next), alone in its pass and never started from a
        cached prefix (see `_admit`), computes exactly what it computes with no other traffic.
        """
        decoding = [r for r in self.running if r.state is RequestState.DECODING]
        if not decoding or self._last_step_decoded:
            prompt = next((r for r in self.running if r.state is RequestState.PREFILLING), None)
            if prompt is None and self.waiting and self.num_free_slots > 0:
                prompt = self.waiting.popleft()
                op = self._admit(prompt, step)
                assert op is not None  # admission only waits to reuse a prefix, and this mode reuses none
                ops.append(op)
            if prompt is not None:
                self._last_step_decoded = False
                n = min(prompt.num_tokens - prompt.num_computed_tokens, self.max_batch_tokens)
                return [self._chunk(prompt, n)]
        self._last_step_decoded = bool(decoding)
        chunks = [self._chunk(r, 1) for r in decoding]
        if self.speculator is not None:  # only where the executor verifies exactly (build.py checks it)
            chunks = self._with_drafts(chunks, self.max_batch_tokens - len(chunks))
        return chunks

    def _chunk(self, request: Request, n: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request=request,
            seq_id=request.slot,  # type: ignore[arg-type]
            start_pos=start,
            token_ids=request.all_token_ids[start : start + n],
            needs_logits=start + n == request.num_tokens,
        )

    def _admit(self, request: Request, step: int) -> CacheOp | None:
        """Give `request` a free slot, reusing the longest computed prefix of its prompt found in any slot.

        Returns None (stay waiting) when a running request is still computing a prefix this prompt shares:
        waiting for it, then copying, beats computing the same tokens twice (n > 1, shared system prompts).
        """
        prompt = request.prompt_ids
        # At least one prompt token must run, to produce logits. Deterministic mode reuses nothing: a cached
        # prefix was computed in other chunks than a cold run of this prompt would use.
        max_reuse = 0 if self.deterministic else len(prompt) - 1

        def reusable(slot: Slot) -> int:
            return min(common_prefix_len(prompt, slot.token_ids), max_reuse)

        # The slot is chosen to keep running sequences at consecutive seq ids: llama.cpp runs a decode batch
        # as one pass per run of consecutive ids, and each extra pass costs about one single-sequence step
        # (4 decodes in slots 0-3: 38 ms; in slots 0, 4, 8, 12: 54 ms), every step of the request's life.
        # A prefix cached elsewhere is copied over for a few milliseconds, once. Among equally placed slots:
        # the longest reusable prefix in place, then the least recently used.
        free = [s for s in self.slots if s.request is None]
        dst = min(free, key=lambda s: (self._new_runs(s.seq_id), -reusable(s), s.last_used))
        keep = reusable(dst)
        src = max(self.slots, key=reusable)
        copy_from = None
        if src is not dst and reusable(src) >= keep + MIN_PREFIX_COPY_TOKENS:
            copy_from, keep = src.seq_id, reusable(src)
        # Beyond the slots: restoring an entry is a copy too (~5 µs per token here, prefill ~3.5 ms).
        tier_hit = self.prefix_cache.lookup(prompt, len(prompt) - 1) if self.prefix_cache.enabled else None
        if tier_hit is not None and tier_hit.num_tokens >= keep + MIN_PREFIX_COPY_TOKENS:
            copy_from, keep = None, tier_hit.num_tokens
        else:
            tier_hit = None

        for other in self.running:
            if other.state is RequestState.PREFILLING:
                pending = min(common_prefix_len(prompt, other.prompt_ids), max_reuse)
                if pending >= keep + MIN_PREFIX_COPY_TOKENS:
                    return None

        in_place = keep if copy_from is None and tier_hit is None else 0
        save = self._save_before_overwrite(dst, in_place)
        dst.request = request
        dst.token_ids = prompt[:keep]
        dst.exact_tokens = len(prompt)
        dst.last_used = step
        request.slot = dst.seq_id
        request.num_computed_tokens = keep
        request.num_cached_tokens = keep
        request.cached_from = tier_hit.tier if tier_hit is not None else "slot" if keep else None
        request.state = RequestState.PREFILLING
        request.scheduled_s = time.monotonic()
        self.running.append(request)
        return CacheOp(dst.seq_id, keep=keep, copy_from=copy_from, save=save,
                       restore_key=tier_hit.key if tier_hit is not None else None)

    def _save_before_overwrite(self, slot: Slot, kept_in_place: int) -> KVSave | None:
        """A save of what `slot` holds, when it is about to lose tokens that no other slot or entry holds."""
        tokens = slot.token_ids
        if not self.prefix_cache.enabled or len(tokens) - kept_in_place < MIN_SAVE_TOKENS:
            return None
        if any(s is not slot and common_prefix_len(tokens, s.token_ids) == len(tokens) for s in self.slots):
            return None
        if self.prefix_cache.holds(tokens):
            return None
        return self.prefix_cache.save(tokens, min(slot.exact_tokens, len(tokens)))

    def _new_runs(self, seq_id: int) -> int:
        """How the number of runs of consecutive running seq ids changes if `seq_id` starts running: -1..1."""
        def running(i: int) -> bool:
            slot = self._slot_by_seq_id.get(i)
            return slot is not None and slot.request is not None

        return 1 - running(seq_id - 1) - running(seq_id + 1)

    # -- results -------------------------------------------------------------------------------------

    def update(self, plan: SchedulerPlan, sampled: dict[str, int],
               stop_string_hits: frozenset[str] = frozenset()) -> list[StepOutput]:
        """Record what the step computed and sampled, and finish requests: every reason a request ends on its
        own is decided here (stop token, end of generation, a stop string its text reached, length)."""
        outputs: list[StepOutput] = []
        for chunk in plan.chunks:
            request = chunk.request
            if request.is_finished:  # ended during the step: the executor refused it, or its pass failed
                continue
            request.num_computed_tokens += len(chunk.token_ids)
            self._slot_by_seq_id[chunk.seq_id].token_ids.extend(chunk.token_ids)
            if not chunk.needs_logits:
                outputs.append(StepOutput(request, None, False))
                continue
            token = sampled[request.request_id]
            request.output_ids.append(token)
            request.state = RequestState.DECODING
            reason = self._finish_reason(request, token, request.request_id in stop_string_hits)
            if reason is not None:
                self.finish(request, reason)
            outputs.append(StepOutput(request, token, reason is not None))
        return outputs

    def append_verified(self, request: Request, token: int, hit_stop_string: bool) -> StepOutput:
        """One more token kept from a verified draft (after `update` took the step's first one): its predecessor
        was the accepted draft token, whose KV the step computed."""
        assert request.slot is not None and not request.is_finished
        request.num_computed_tokens += 1
        self._slot_by_seq_id[request.slot].token_ids.append(request.output_ids[-1])
        request.output_ids.append(token)
        reason = self._finish_reason(request, token, hit_stop_string)
        if reason is not None:
            self.finish(request, reason)
        return StepOutput(request, token, reason is not None)

    def record_verification(self, request_id: str, drafted: int, accepted: int) -> None:
        if self.speculator is not None:
            self.speculator.record(request_id, drafted, accepted)

    @staticmethod
    def _finish_reason(request: Request, token: int, hit_stop_string: bool) -> FinishReason | None:
        if token in request.params.stop_token_ids or hit_stop_string:
            return FinishReason.STOP
        if token in request.eog_ids and not request.params.ignore_eos:
            return FinishReason.STOP
        if len(request.output_ids) >= request.max_tokens:
            return FinishReason.LENGTH
        return None
