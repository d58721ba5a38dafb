"""The engine: a background thread that steps the scheduler and executor, and an asyncio bridge to callers."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from qanat.config import EngineConfig
from qanat.energy.accounting import EnergyAccountant, EnergyTotals
from qanat.energy.meters import open_meter
from qanat.engine.detokenizer import IncrementalDetokenizer
from qanat.engine.llamacpp import ContextSettings, LlamaCppExecutor, LlamaModel, RequestSampler
from qanat.engine.scheduler import Scheduler, StepOutput
from qanat.engine.types import (
    Delta,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    Request,
    RequestFailedError,
    SampledLogprobs,
    SamplingParams,
)
from qanat.models.chat_template import ChatTemplate, ChatTemplateError
from qanat.models.locate import model_id_for, resolve_model_path

log = logging.getLogger("qanat.engine")


@dataclass
class _Stream:
    """Where one request's deltas go: an asyncio queue on the caller's event loop."""

    request: Request
    detokenizer: IncrementalDetokenizer
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue[Delta]


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_cache_hit_tokens: int
    prompt_tokens: int
    energy: EnergyTotals


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.model_id = model_id_for(self.model_path)
        self.model = LlamaModel(self.model_path)
        self.executor = LlamaCppExecutor(
            self.model,
            ContextSettings(
                config.parallel, config.ctx, config.batch_tokens, config.threads,
                # ggml's CPU flash attention picks its loop by shape (tiles for a prompt chunk, a split KV for a
                # lone sequence's decode past 512 cells): a token's numbers would depend on what shares its pass.
                flash_attn="off" if config.deterministic else config.flash_attn,
            ),
        )
        self.context_len = self.executor.slot_capacity
        self.scheduler = Scheduler(config.parallel, self.context_len, self.executor.n_batch, config.deterministic)
        self.chat_template = self._load_chat_template()
        self.energy = EnergyAccountant(open_meter(config.energy_meter, config.cpu_tdp_w))

        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._in_flight = 0  # admitted and not yet finished; guarded by _lock
        self._lock = threading.Lock()
        self._stopping = False
        self._prefix_hit_tokens = 0
        self._prompt_tokens = 0
        self._thread = threading.Thread(target=self._run, name="qanat-engine", daemon=True)
        self._thread.start()

    def _load_chat_template(self) -> ChatTemplate | None:
        source = self.model.metadata("tokenizer.chat_template")
        if source is None:
            return None
        return ChatTemplate(
            source,
            bos_token=self.model.token_text(self.model.bos_id) if self.model.bos_id >= 0 else "",
            eos_token=self.model.token_text(self.model.eos_id) if self.model.eos_id >= 0 else "",
        )

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.executor.close()
        self.model.close()

    # -- caller side (any thread, usually the event loop) ---------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=add_special)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(
                f"model {self.model_id} has no chat template (tokenizer.chat_template): use /v1/completions"
            )
        return self.chat_template.render(messages, add_generation_prompt)

    def chat_prompt_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        # The rendered template carries its own special tokens, as with transformers' apply_chat_template.
        return self.tokenize(self.render_chat(messages), add_special=False)

    def make_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> Request:
        """Validate sizes against the context; the error names the numbers."""
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if any(not 0 <= t < self.model.n_vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in 0..{self.model.n_vocab - 1}", param="prompt")
        if n_prompt >= self.context_len:
            raise InvalidRequestError(
                f"the prompt has {n_prompt} tokens, but the context holds {self.context_len} tokens per request "
                f"(prompt plus output); shorten the prompt or start the server with a larger --ctx",
                param="messages",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.context_len - n_prompt
        if n_prompt + max_tokens > self.context_len:
            raise InvalidRequestError(
                f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) is {n_prompt + max_tokens} "
                f"tokens, more than the {self.context_len} tokens of context per request",
                param="max_tokens",
            )
        return Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=list(prompt_ids),
            params=params,
            max_tokens=max_tokens,
            eog_ids=self.model.eog_ids,
        )

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Delta]:
        """Stream a request's deltas. Leaving the loop early (or being cancelled) aborts the request."""
        request = self.make_request(prompt_ids, params, request_id)
        sampler = RequestSampler(self.model, params, penalty_window=self.context_len)
        with self._lock:
            if self._stopping or self._in_flight >= self.config.parallel + self.config.max_waiting:
                sampler.close()
                raise QueueFullError(
                    f"the server is at capacity: {self._in_flight} requests in flight "
                    f"({self.config.parallel} running slots + {self.config.max_waiting} waiting)"
                )
            self._in_flight += 1
        stream = _Stream(
            request,
            IncrementalDetokenizer(self.model.token_bytes, params.stop),
            asyncio.get_running_loop(),
            asyncio.Queue(),
        )
        self._commands.put(("add", (stream, sampler)))
        self._wake.set()
        finished = False
        try:
            while not finished:
                delta = await stream.sink.get()
                finished = delta.finish_reason is not None
                if delta.finish_reason is FinishReason.ERROR:
                    raise RequestFailedError(delta.error or "the request failed")
                yield delta
        finally:
            if not finished:
                self._commands.put(("abort", request.request_id))
                self._wake.set()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.scheduler.kv_usage,
            prefix_cache_hit_tokens=self._prefix_hit_tokens,
            prompt_tokens=self._prompt_tokens,
            energy=self.energy.totals(),
        )

    # -- engine thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            if not self.scheduler.has_work and self._commands.empty():
                self._wake.wait()
                self._wake.clear()
                continue
            self.step()
        for stream in list(self._streams.values()):
            self._end(stream.request, FinishReason.ERROR, "the engine shut down")

    def step(self) -> None:
        self._apply_commands()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return
        self.energy.begin_step()
        try:
            result = self.executor.execute(plan)
        except Exception as e:  # a failed forward pass fails its requests only; the loop goes on
            log.exception("step failed")
            for chunk in plan.chunks:
                self._end(chunk.request, FinishReason.ERROR, f"the engine failed to run this request: {e}")
            return
        finally:
            shares = self.energy.end_step({c.request.request_id: len(c.token_ids) for c in plan.chunks})
        for chunk in plan.chunks:
            chunk.request.energy_j += shares.get(chunk.request.request_id, 0.0)
        outputs = self.scheduler.update(plan, result.sampled)
        self._publish(outputs, result.logprobs)

    def _apply_commands(self) -> None:
        while not self._commands.empty():
            kind, payload = self._commands.get()
            if kind == "add":
                stream, sampler = payload
                self._streams[stream.request.request_id] = stream
                self.executor.samplers[stream.request.request_id] = sampler
                self.scheduler.add(stream.request)
            else:
                stream = self._streams.get(payload)
                if stream is not None:
                    self._end(stream.request, FinishReason.ABORT)

    def _publish(self, outputs: list[StepOutput], logprobs: dict[str, SampledLogprobs]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta], Delta]]] = defaultdict(list)
        for out in outputs:
            if out.new_token_id is None:
                continue
            request = out.request
            stream = self._streams[request.request_id]
            if len(request.output_ids) == 1:
                self._prefix_hit_tokens += request.num_cached_tokens
                self._prompt_tokens += request.num_prompt_tokens
            # A stop token id ends the text without appearing in it, like a stop string.
            stopped_by_id = out.finished and out.new_token_id in request.params.stop_token_ids
            text = "" if stopped_by_id else stream.detokenizer.add(out.new_token_id)
            finished = out.finished
            if stream.detokenizer.stopped and not finished:
                self.scheduler.finish(request, FinishReason.STOP)
                finished = True
            if finished:
                text += stream.detokenizer.flush()
                self._release(request)
            delta = self._delta(request, text, (out.new_token_id,), logprobs.get(request.request_id))
            by_loop[stream.loop].append((stream.sink, delta))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _end(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        """Finish a request outside the normal path (abort, failure) and tell its caller."""
        stream = self._streams.get(request.request_id)
        self.scheduler.finish(request, reason)
        request.error = error
        self._release(request)
        if stream is not None and reason is not FinishReason.ABORT:
            stream.loop.call_soon_threadsafe(_deliver, [(stream.sink, self._delta(request, "", ()))])

    def _release(self, request: Request) -> None:
        self.executor.release(request.request_id)
        if self._streams.pop(request.request_id, None) is not None:
            with self._lock:
                self._in_flight -= 1

    @staticmethod
    def _delta(
        request: Request, text: str, token_ids: tuple[int, ...], logprobs: SampledLogprobs | None = None
    ) -> Delta:
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
