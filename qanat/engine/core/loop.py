"""The engine core: a background thread that steps scheduler and executor, and hands deltas to callers' loops.

It also survives its executor: when the executor's process dies, the requests it was running end with an
UNAVAILABLE error, the cached prefixes are forgotten, a new executor starts, and the waiting requests go on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from qanat.energy.accounting import EnergyAccountant
from qanat.engine.client import (
    Delta,
    EngineHealth,
    EngineLoad,
    EngineStats,
    ErrorKind,
    FinishReason,
    Logprobs,
    RequestError,
    TokenLogprob,
)
from qanat.engine.core.detokenizer import IncrementalDetokenizer
from qanat.engine.core.request import Request
from qanat.engine.core.scheduler import Scheduler, SchedulerPlan, StepOutput
from qanat.engine.errors import EngineUnavailableError, QueueFullError
from qanat.engine.executors.base import (
    ExecChunk,
    Executor,
    ExecutorDiedError,
    ExecutorStartError,
    SampledLogprobs,
    StepBatch,
    StepResult,
    Tokenizer,
)

log = logging.getLogger("qanat.engine")

RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 4.0, 8.0)  # one try per entry, after waiting that long
LIVENESS_CHECK_S = 1.0  # how often an idle engine checks that its executor is still there


@dataclass
class Stream:
    """Where one request's deltas go: an asyncio queue on the caller's event loop."""

    request: Request
    detokenizer: IncrementalDetokenizer
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue[Delta]


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor, tokenizer: Tokenizer, energy: EnergyAccountant,
                 max_in_flight: int) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.tokenizer = tokenizer
        self.energy = energy
        self.max_in_flight = max_in_flight

        self._commands: queue.SimpleQueue[tuple[str, Stream | str]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, Stream] = {}  # engine thread only
        self._released: list[str] = []  # finished since the last step; the executor drops their samplers
        self._in_flight = 0  # submitted and not yet finished; guarded by _lock
        self._lock = threading.Lock()
        self._stopping = False
        self._unavailable: str | None = "starting"  # why the engine cannot run requests now, or None
        self._prefix_hit_tokens = 0
        self._prompt_tokens = 0
        self._steps = 0
        self._step_s = 0.0
        self._thread = threading.Thread(target=self._run, name="qanat-engine", daemon=True)
        self._thread.start()

    # -- caller side (any thread) ---------------------------------------------------------------------

    def submit(self, stream: Stream) -> None:
        with self._lock:
            if self._stopping:
                raise EngineUnavailableError("the engine is shutting down")
            if self._in_flight >= self.max_in_flight:
                raise QueueFullError(
                    f"the server is at capacity: {self._in_flight} requests in flight "
                    f"({self.scheduler.num_slots} running slots + {self.max_in_flight - self.scheduler.num_slots} "
                    f"waiting)"
                )
            self._in_flight += 1
        self._commands.put(("add", stream))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def health(self) -> EngineHealth:
        reason = self._unavailable
        return EngineHealth(ready=reason is None, detail=reason or "ready", restarts=self.executor.restarts,
                            executor_pid=getattr(self.executor, "pid", None))

    def load(self) -> EngineLoad:
        return EngineLoad(len(self.scheduler.running), len(self.scheduler.waiting), self.scheduler.kv_usage)

    def stats(self) -> EngineStats:
        return EngineStats(
            load=self.load(), prefix_cache_hit_tokens=self._prefix_hit_tokens, prompt_tokens=self._prompt_tokens,
            energy=self.energy.totals(), executor_restarts=self.executor.restarts, steps=self._steps,
            step_s=self._step_s, boundary_s=getattr(self.executor, "boundary_s", 0.0),
            prompt_cache=self.scheduler.prefix_cache.stats() if self.scheduler.prefix_cache.enabled else None,
            **self._speculation_stats(),
        )

    def _speculation_stats(self) -> dict[str, int]:
        speculator = self.scheduler.speculator
        if speculator is None:
            return {}
        stats = speculator.stats
        return {"spec_drafts": stats.drafts, "spec_draft_tokens": stats.draft_tokens,
                "spec_accepted_tokens": stats.accepted_tokens}

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._flush_slots()
        self.executor.close()

    # -- engine thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        self._sync_tiers()
        self._unavailable = None
        while not self._stopping:
            if not self.scheduler.has_work and self._commands.empty():
                self._wake.wait(LIVENESS_CHECK_S)
                self._wake.clear()
                if not self.executor.is_alive() and not self._stopping:
                    self._recover(ExecutorDiedError("the executor process died while idle"))
                continue
            self.step()
        for stream in list(self._streams.values()):
            self._end(stream.request, FinishReason.ERROR,
                      RequestError(ErrorKind.UNAVAILABLE, "the engine shut down before the request finished"))

    def step(self) -> None:
        self._apply_commands()
        step_start_s = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return
        start_s = time.perf_counter()
        try:
            result = self.executor.execute(self._batch(plan))
        except ExecutorDiedError as e:
            self._recover(e)
            return
        except Exception as e:  # a failed forward pass fails its requests only; the loop goes on
            log.exception("step failed")
            for chunk in plan.chunks:
                self._end(chunk.request, FinishReason.ERROR,
                          RequestError(ErrorKind.FAILED, f"the engine failed to run this request: {e}"))
            return
        finally:
            self._steps += 1
            self._step_s += time.perf_counter() - start_s
        if result.kv_cache is not None:
            self.scheduler.prefix_cache.apply(result.kv_cache)
            if result.kv_cache.failed_restores:
                plan = self.scheduler.restore_failed(plan, result.kv_cache.failed_restores)
        self._book_energy(plan, result)
        for request_id, refusal in result.refused.items():
            self._end(self._streams[request_id].request, FinishReason.ERROR,
                      RequestError(ErrorKind.INVALID, refusal.message, refusal.param))
        sampled = self._replay(result.sampled)
        texts, stop_hits = self._detokenize(sampled)
        outputs = self.scheduler.update(plan, sampled, stop_hits)
        self._publish(outputs, texts, result.logprobs)
        if any(c.draft_ids or c.draft_len for c in plan.chunks):
            self._publish_verified(plan, result)
        speculator = self.scheduler.speculator
        if speculator is not None and not plan.cache_ops and all(
                len(c.token_ids) == 1 and not c.draft_len for c in plan.chunks):  # decodes and n-gram drafts
            speculator.step_cost.observe(plan.num_tokens, time.perf_counter() - step_start_s)

    def _publish_verified(self, plan: SchedulerPlan, result: StepResult) -> None:
        """Tokens kept from verified drafts, past each request's first: one round per position, as if each had
        its own step, so stop strings, stop tokens and max_tokens cut exactly where they would without drafts."""
        extra = result.extra_tokens
        for chunk in plan.chunks:
            request_id = chunk.request.request_id
            drafted = len(chunk.draft_ids) or result.drafted.get(request_id, 0)
            if drafted and request_id in result.sampled:
                self.scheduler.record_verification(request_id, drafted, len(extra.get(request_id, ())))
        for i in range(max(map(len, extra.values()), default=0)):
            tokens = {rid: kept[i] for rid, kept in extra.items() if i < len(kept) and rid in self._streams}
            if not tokens:
                return
            texts, stop_hits = self._detokenize(tokens)
            outputs = [self.scheduler.append_verified(self._streams[rid].request, token, rid in stop_hits)
                       for rid, token in tokens.items()]
            logprobs = {rid: result.extra_logprobs[rid][i] for rid in tokens if rid in result.extra_logprobs}
            self._publish(outputs, texts, logprobs)

    def _batch(self, plan: SchedulerPlan) -> StepBatch:
        """What crosses to the executor: ids and positions, never the Request objects."""
        released, self._released = self._released, []
        return StepBatch(
            cache_ops=plan.cache_ops,
            chunks=[ExecChunk(c.request.request_id, c.seq_id, c.start_pos, c.token_ids, c.needs_logits, c.draft_ids,
                              c.draft_len) for c in plan.chunks],
            new_requests=[(r.request_id, r.params) for r in plan.admitted],
            released=released,
        )

    def _book_energy(self, plan: SchedulerPlan, result: StepResult) -> None:
        drafted = result.drafted
        tokens = {c.request.request_id: len(c.token_ids) + len(c.draft_ids) + drafted.get(c.request.request_id, 0)
                  for c in plan.chunks if c.request.request_id not in result.refused}
        shares = self.energy.record(result.energy.idle_j, result.energy.busy_j, tokens)
        for chunk in plan.chunks:
            chunk.request.energy_j += shares.get(chunk.request.request_id, 0.0)

    def _replay(self, sampled: dict[str, int]) -> dict[str, int]:
        """A continuation's already-sent outputs take the place of what was sampled, one per step: the KV, the
        detokenizer's held-back bytes and stop-string state end up as they were on the replica that died."""
        replayed = dict(sampled)
        for request_id in sampled:
            request = self._streams[request_id].request
            if request.is_replaying:
                replayed[request_id] = request.replay_ids[len(request.output_ids)]
        return replayed

    def _detokenize(self, sampled: dict[str, int]) -> tuple[dict[str, str], frozenset[str]]:
        """Each sampled token's text, and which requests' text now reaches a stop string."""
        texts: dict[str, str] = {}
        stop_hits: set[str] = set()
        for request_id, token in sampled.items():
            stream = self._streams[request_id]
            if token in stream.request.params.stop_token_ids:  # ends the text without appearing in it
                texts[request_id] = ""
                continue
            texts[request_id] = stream.detokenizer.add(token)
            if stream.detokenizer.stopped:
                stop_hits.add(request_id)
        return texts, frozenset(stop_hits)

    def _apply_commands(self) -> None:
        while not self._commands.empty():
            kind, payload = self._commands.get()
            if isinstance(payload, Stream):
                self._streams[payload.request.request_id] = payload
                self.scheduler.add(payload.request)
            elif (stream := self._streams.get(payload)) is not None:
                self._end(stream.request, FinishReason.ABORT)

    def _recover(self, error: Exception) -> None:
        """The executor died: fail what it was running, forget its KV, start a new one. Waiting requests stay."""
        log.error("%s; restarting it", error)
        self._unavailable = f"restarting the executor: {error}"
        lost = RequestError(ErrorKind.UNAVAILABLE, f"{error} while running this request; retry it")
        for request in list(self.scheduler.running):
            self._end(request, FinishReason.ERROR, lost)
        self.scheduler.forget_cache()
        self._released = []
        for delay_s in RESTART_BACKOFF_S:
            time.sleep(delay_s)
            if self._stopping:
                return
            try:
                self.executor.restart()
            except ExecutorStartError as e:
                log.error("executor restart failed: %s", e)
                continue
            self._sync_tiers()
            self._unavailable = None
            log.info("executor restarted (%d restarts so far)", self.executor.restarts)
            return
        self._unavailable = "the executor could not be restarted"
        with self._lock:
            self._stopping = True  # no executor: new requests are refused, the waiting ones fail below

    def _sync_tiers(self) -> None:
        """An empty step, so that a new executor's report (what its disk tier holds) is known before admitting."""
        if "disk" not in self.scheduler.prefix_cache.tiers:
            return
        try:
            result = self.executor.execute(StepBatch(cache_ops=[], chunks=[]))
        except Exception as e:  # a dead executor is found by the next step or liveness check
            log.warning("could not read the prompt cache's tiers: %s", e)
            return
        self.energy.record(result.energy.idle_j, result.energy.busy_j, {})
        if result.kv_cache is not None:
            self.scheduler.prefix_cache.apply(result.kv_cache)

    def _flush_slots(self) -> None:
        """Before shutting down: the free slots' KV to the tiers (a disk tier keeps it for the next start)."""
        if "disk" not in self.scheduler.prefix_cache.tiers or self.scheduler.running or not self.executor.is_alive():
            return
        ops = self.scheduler.flush_ops()
        if ops:
            try:
                self.executor.execute(StepBatch(cache_ops=ops, chunks=[]))
            except Exception as e:
                log.warning("could not save the slots' prompt cache before shutting down: %s", e)

    def _publish(self, outputs: list[StepOutput], texts: dict[str, str], logprobs: dict[str, SampledLogprobs]
                 ) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta], Delta]]] = defaultdict(list)
        for out in outputs:
            if out.new_token_id is None:
                continue
            request = out.request
            stream = self._streams[request.request_id]
            if len(request.output_ids) == 1:
                self._prefix_hit_tokens += request.num_cached_tokens
                self._prompt_tokens += request.num_prompt_tokens
                self.scheduler.prefix_cache.record_admission(request.num_prompt_tokens, request.cached_from,
                                                             request.num_cached_tokens)
            text = texts[request.request_id]
            if out.finished:
                text += stream.detokenizer.flush()
                self._release(request)
            if len(request.output_ids) <= len(request.replay_ids) and not out.finished:
                continue  # the client has this token already
            sampled = logprobs.get(request.request_id)
            delta = self._delta(request, text, (out.new_token_id,), self._logprobs(sampled) if sampled else None)
            by_loop[stream.loop].append((stream.sink, delta))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _logprobs(self, sampled: SampledLogprobs) -> Logprobs:
        def entry(token_id: int, logprob: float) -> TokenLogprob:
            raw = self.tokenizer.token_bytes(token_id)
            return TokenLogprob(token_id, raw.decode("utf-8", errors="replace"), raw, logprob)

        return Logprobs(entry(sampled.token_id, sampled.logprob), tuple(entry(t, lp) for t, lp in sampled.top))

    def _end(self, request: Request, reason: FinishReason, error: RequestError | None = None) -> None:
        """Finish a request outside the normal path (abort, failure) and tell its caller."""
        stream = self._streams.get(request.request_id)
        self.scheduler.finish(request, reason)
        request.error = error
        self._release(request)
        if stream is not None and reason is not FinishReason.ABORT:
            stream.loop.call_soon_threadsafe(_deliver, [(stream.sink, self._delta(request, "", ()))])

    def _release(self, request: Request) -> None:
        if request.slot is not None:  # it reached the executor, which holds its sampler
            self._released.append(request.request_id)
        if self._streams.pop(request.request_id, None) is not None:
            with self._lock:
                self._in_flight -= 1

    @staticmethod
    def _delta(request: Request, text: str, token_ids: tuple[int, ...], logprobs: Logprobs | None = None) -> Delta:
        final = request.is_finished
        return Delta(
            request_id=request.request_id,
            text=text,
            token_ids=token_ids,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=len(request.output_ids),
            finish_reason=request.finish_reason if final else None,
            logprobs=logprobs,
            queue_time_s=(request.scheduled_s or time.monotonic()) - request.arrival_s if final else None,
            energy_j=request.energy_j if final else None,
            error=request.error,
        )


def _deliver(items: list[tuple[asyncio.Queue[Delta], Delta]]) -> None:
    for sink, delta in items:
        sink.put_nowait(delta)
