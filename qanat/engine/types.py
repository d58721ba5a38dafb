"""The data that flows through the engine: SamplingParams and Request in, Delta out."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request the engine refuses before it runs. `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later."""


class RequestFailedError(RuntimeError):
    """A request failed while running (the engine keeps serving the others)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None = a fresh random seed per request
    max_tokens: int | None = None  # None = up to the request's context
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None = no logprobs; k = the chosen token's and the top k
    grammar: str | None = None  # GBNF, root rule "root"

    def __post_init__(self) -> None:
        def check(ok: bool, param: str, why: str) -> None:
            if not ok:
                raise InvalidRequestError(f"{param} {why}, got {getattr(self, param)!r}", param=param)

        check(math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature",
              "must be between 0 and 100")
        check(math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(0 <= self.top_k <= 1_000_000, "top_k", "must be >= 0 (0 disables it)")
        check(math.isfinite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        check(math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
              "repetition_penalty", "must be in (0, 10]")
        check(math.isfinite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
              "presence_penalty", "must be in [-2, 2]")
        check(math.isfinite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
              "frequency_penalty", "must be in [-2, 2]")
        check(self.seed is None or 0 <= self.seed < 2**63, "seed", "must be a non-negative integer")
        check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        check(len(self.stop) <= 16, "stop", "allows at most 16 strings")
        check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0")
        check(all(math.isfinite(b) for _, b in self.logit_bias), "logit_bias", "values must be finite numbers")
        # A grammar must be free to end the output: banning end-of-generation would leave llama.cpp's grammar
        # with no allowed token, which aborts the whole process.
        check(not (self.ignore_eos and self.grammar is not None), "ignore_eos",
              "cannot be combined with a grammar or response_format (the output ends where the grammar does)")
        check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be between 0 and 20")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


class RequestState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-generation token, stop token id or stop string
    LENGTH = "length"  # max_tokens or the context is exhausted
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # failed while running; see Request.error


@dataclass
class Request:
    """One request's truth. The scheduler mutates it; the executor reads it."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against the context: params.max_tokens or what is left of it
    eog_ids: frozenset[int] = frozenset()  # tokens that end generation unless ignore_eos
    state: RequestState = RequestState.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (prompt and output)
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    slot: int | None = None  # llama.cpp sequence id while admitted
    finish_reason: FinishReason | None = None
    error: str | None = None
    arrival_s: float = field(default_factory=time.monotonic)
    scheduled_s: float | None = None  # when it got a slot: queue time = scheduled_s - arrival_s
    energy_j: float = 0.0  # its share of the energy of every step it was in

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED


@dataclass(frozen=True)
class SampledLogprobs:
    """The chosen token's log-probability and the `k` most likely alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Delta:
    """What a caller of `Engine.generate` receives: new text and tokens since the previous delta."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: SampledLogprobs | None = None  # for token_ids[-1], when the request asked for logprobs
    queue_time_s: float | None = None  # on the final delta
    energy_j: float | None = None  # on the final delta: the request's attributed energy
    error: str | None = None
