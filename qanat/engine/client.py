"""EngineClient: everything the serving layer (and later the router) may ask of an engine, and nothing more.

Implementations: `LocalEngine` (engine core + an executor: llama.cpp in a child process, or the fake) today;
a remote OpenAI-compatible upstream next. Nothing here knows llama.cpp.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from qanat.energy.accounting import EnergyTotals
from qanat.engine.sampling import SamplingParams

# -- prompts: what a caller hands in, and what `render` makes of it ------------------------------------


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[Mapping[str, Any], ...]  # OpenAI-style {"role", "content"}; content already plain text
    # Tool definitions for templates that render them natively (ModelCard.tool_call_format); messages may then
    # carry "tool_calls" and "tool_call_id" as Hugging Face templates expect them.
    tools: tuple[Mapping[str, Any], ...] | None = None


@dataclass(frozen=True)
class TextPrompt:
    text: str


@dataclass(frozen=True)
class TokenPrompt:
    token_ids: tuple[int, ...]
    # Output another replica already streamed for this prompt: recomputed as output (one decode step each, as
    # it was first computed, so a deterministic engine reaches bit-identical numbers) and never sent again.
    generated_ids: tuple[int, ...] = ()


Prompt = ChatPrompt | TextPrompt | TokenPrompt


@dataclass(frozen=True)
class RequestHints:
    """What a router may weigh besides the prompt; engines that serve alone ignore it."""

    session: str | None = None  # x-session-id, else the request's `user`: keeps a conversation on one replica
    user: str | None = None


# -- what comes back -------------------------------------------------------------------------------------


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-generation token, stop token id or stop string
    LENGTH = "length"  # max_tokens or the context is exhausted
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # failed while running; see Delta.error


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str  # the token's bytes decoded (U+FFFD where it cuts a character)
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class Logprobs:
    """The chosen token's log-probability and the `k` most likely alternatives (raw model distribution)."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # the request itself (a grammar that does not parse): InvalidRequestError
    FAILED = "failed"  # its forward pass failed: RequestFailedError
    UNAVAILABLE = "unavailable"  # the executor died or the engine stopped: EngineUnavailableError


@dataclass(frozen=True)
class RequestError:
    kind: ErrorKind
    message: str
    param: str | None = None


@dataclass(frozen=True)
class Delta:
    """What `generate` yields: new text and tokens since the previous delta."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: Logprobs | None = None  # for token_ids[-1], when the request asked for logprobs
    queue_time_s: float | None = None  # on the final delta
    energy_j: float | None = None  # on the final delta: the request's attributed energy
    error: RequestError | None = None  # on a final delta with finish_reason ERROR
    replica: str | None = None  # which replica produced it, when a router chose one


# -- what an engine says about itself --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    id: str  # the name clients send as "model"
    context_length: int  # tokens per request, prompt plus output
    owned_by: str
    chip: str  # where it runs, e.g. "cpu: AMD EPYC 9454 (2 threads)"
    energy_source: str  # measured:nvml | measured:rapl | estimated:cpu-time | ...
    has_chat_template: bool
    tool_call_format: str | None = None  # the chat template's native tool calls: "hermes", "llama3"; None: none


@dataclass(frozen=True)
class EngineHealth:
    ready: bool  # accepts and runs new requests now
    detail: str  # why not, or "ready"
    restarts: int = 0  # executor restarts since start
    executor_pid: int | None = None  # the executor's process, where it has one of its own


@dataclass(frozen=True)
class EngineLoad:
    """What a router weighs: outstanding work on this engine."""

    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV cells held by running requests


@dataclass(frozen=True)
class PromptCacheStats:
    """Counters since start; per tier of `tiers` (slot, then ram and disk when configured)."""

    tiers: tuple[str, ...]
    hit_tokens: dict[str, int]  # prompt tokens reused from the tier (their sum is the cached tokens)
    miss_tokens: dict[str, int]  # prompt tokens the tier was asked for and did not give
    held_bytes: dict[str, int]  # bytes the tier holds now (ram, disk)
    entries: dict[str, int]
    evictions: dict[str, int]
    restores: dict[str, int]
    restore_s: dict[str, float]
    restored_tokens: dict[str, int]
    saves: int
    save_s: float
    failed_restores: int


def merge_prompt_cache_stats(parts: Sequence[PromptCacheStats | None]) -> PromptCacheStats | None:
    """Several engines' prompt caches as one (a router's replicas): every counter and gauge summed per tier."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    tiers = tuple(dict.fromkeys(t for p in present for t in p.tiers))

    def total(field: str) -> dict[str, Any]:
        return {t: sum(getattr(p, field).get(t, 0) for p in present) for t in tiers
                if any(t in getattr(p, field) for p in present)}

    return PromptCacheStats(
        tiers=tiers, hit_tokens=total("hit_tokens"), miss_tokens=total("miss_tokens"), held_bytes=total("held_bytes"),
        entries=total("entries"), evictions=total("evictions"), restores=total("restores"),
        restore_s=total("restore_s"), restored_tokens=total("restored_tokens"), saves=sum(p.saves for p in present),
        save_s=sum(p.save_s for p in present), failed_restores=sum(p.failed_restores for p in present),
    )


@dataclass(frozen=True)
class EngineStats:
    """A metrics snapshot, read at scrape time."""

    load: EngineLoad
    prefix_cache_hit_tokens: int
    prompt_tokens: int
    energy: EnergyTotals
    executor_restarts: int
    steps: int
    step_s: float  # wall time of engine steps, executor included
    boundary_s: float  # of which: crossing the process boundary (0 in-process)
    prompt_cache: PromptCacheStats | None = None  # tiers beyond the slots, when configured
    spec_drafts: int = 0  # speculative decoding: verifications that carried drafted tokens
    spec_draft_tokens: int = 0  # drafted tokens verified
    spec_accepted_tokens: int = 0  # of which kept


class EngineClient(Protocol):
    @property
    def card(self) -> ModelCard: ...

    async def render(self, prompt: Prompt) -> Prompt:
        """Apply the chat template and tokenize where this engine can (off the event loop); else pass through.

        Raises InvalidRequestError (param "prompt") when the prompt cannot be rendered or does not fit."""
        ...

    def generate(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                 hints: RequestHints | None = None) -> AsyncIterator[Delta]:
        """Stream one request's deltas; leaving the iteration early aborts the request.

        Raises InvalidRequestError, QueueFullError, RequestFailedError or EngineUnavailableError."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...

    async def detokenize(self, token_ids: Sequence[int]) -> str: ...

    async def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str: ...

    def health(self) -> EngineHealth: ...

    def load(self) -> EngineLoad: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class RelayedStream:
    """An upstream's streamed answer passed through as it came: its SSE bytes, and which replica sends them."""

    replica: str
    chunks: AsyncGenerator[bytes, None]  # closed by whoever consumes it, which frees the replica


@runtime_checkable
class ByteRelay(Protocol):
    """An engine that can hand a request to an OpenAI-compatible upstream as it is and stream back the upstream's
    bytes untouched: no per-token parsing or formatting (a router over plain remote upstreams)."""

    def can_relay(self) -> bool:
        """Whether `relay` may be used now (every replica it could choose is a plain upstream)."""
        ...

    async def relay(self, path: str, body: dict[str, Any], prompt: Prompt, hints: RequestHints) -> RelayedStream:
        """Send `body` (an OpenAI request body, streamed) to `path` on a chosen replica; returns once its first
        bytes arrived, so that failures before them keep their status codes (and may be retried elsewhere).
        `prompt` is the body's prompt, for policies that route by it. The chunks raise if the upstream fails
        mid-stream."""
        ...
