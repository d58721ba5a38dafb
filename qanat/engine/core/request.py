"""One request's truth inside the engine core. The scheduler mutates it; the executor never sees it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from qanat.engine.client import FinishReason, RequestError
from qanat.engine.sampling import SamplingParams


class RequestState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against the context: params.max_tokens or what is left of it
    eog_ids: frozenset[int] = frozenset()  # tokens that end generation unless ignore_eos
    state: RequestState = RequestState.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (prompt and output)
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    cached_from: str | None = None  # the prompt cache tier they came from: slot, ram or disk
    slot: int | None = None  # llama.cpp sequence id while admitted
    finish_reason: FinishReason | None = None
    error: RequestError | None = None
    arrival_s: float = field(default_factory=time.monotonic)
    scheduled_s: float | None = None  # when it got a slot: queue time = scheduled_s - arrival_s
    energy_j: float = 0.0  # its share of the energy of every step it was in
    replay_ids: list[int] = field(default_factory=list)  # outputs to reproduce before sampling (a continuation)

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
    def is_replaying(self) -> bool:
        """Its next output is a replayed one, not a sampled one."""
        return len(self.output_ids) < len(self.replay_ids)

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED
