"""How to pick tokens: SamplingParams, the one table of their limits, and typed output constraints.

The OpenAI protocol models (`serving/protocol.py`) take their bounds from `LIMITS` too, so a value is refused
with the same words whichever layer sees it first.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from qanat.engine.errors import InvalidRequestError


@dataclass(frozen=True)
class Limit:
    lo: float
    hi: float
    lo_open: bool = False  # lo itself is refused

    def contains(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        return math.isfinite(value) and above and value <= self.hi

    def describe(self) -> str:
        lo = f"({self.lo:g}" if self.lo_open else f"[{self.lo:g}"
        return f"must be in {lo}, {self.hi:g}]"


LIMITS: dict[str, Limit] = {
    "temperature": Limit(0.0, 2.0),  # OpenAI's range; 0 = greedy
    "top_p": Limit(0.0, 1.0, lo_open=True),
    "top_k": Limit(0, 1_000_000),  # 0 disables it
    "min_p": Limit(0.0, 1.0),
    "repetition_penalty": Limit(0.0, 10.0, lo_open=True),
    "presence_penalty": Limit(-2.0, 2.0),
    "frequency_penalty": Limit(-2.0, 2.0),
    "logit_bias": Limit(-100.0, 100.0),
    "logprobs": Limit(0, 20),  # top alternatives per token, chat and completions alike (vLLM's max_logprobs)
    "n": Limit(1, 16),
    "stop": Limit(0, 16),  # number of stop strings
    "stop_token_ids": Limit(0, 64),  # number of stop token ids
}


class ConstraintKind(enum.Enum):
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # `spec` is a JSON schema, as JSON text
    GRAMMAR = "grammar"  # `spec` is a GBNF grammar whose root rule is "root"; it may use `schemas`' rules


@dataclass(frozen=True)
class OutputConstraint:
    """What the output must parse as. Each executor turns it into its own machinery (llama.cpp: a GBNF grammar)."""

    kind: ConstraintKind
    spec: str | None = None
    # GRAMMAR only: (rule name, JSON schema as JSON text) pairs, each compiled into a rule of that name that the
    # grammar can use: literal text around schema-checked JSON (tool calls) without the caller writing JSON GBNF.
    schemas: tuple[tuple[str, str], ...] = ()
    param: str | None = None  # the request field it came from, named when it is refused


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
    constraint: OutputConstraint | None = None
    # May drafted tokens be verified for it (when the server speculates)? Its output is the same either way.
    speculative: bool = True

    def __post_init__(self) -> None:
        refused = self._refusal()
        if refused is not None:
            param, why = refused
            raise InvalidRequestError(f"{param} {why}, got {getattr(self, param)!r}", param=param)

    def _refusal(self) -> tuple[str, str] | None:
        """The first field out of its range and why, or None. Messages are built only for a refusal: this runs
        for every request, the byte relay's included."""
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            if not LIMITS[name].contains(getattr(self, name)):
                return name, LIMITS[name].describe()
        if not (self.seed is None or 0 <= self.seed < 2**63):
            return "seed", "must be a non-negative integer"
        if not (self.max_tokens is None or self.max_tokens >= 1):
            return "max_tokens", "must be >= 1"
        if not all(isinstance(s, str) and s for s in self.stop):
            return "stop", "must be non-empty strings"
        if len(self.stop) > LIMITS["stop"].hi:
            return "stop", f"allows at most {LIMITS['stop'].hi:g} strings"
        if not all(t >= 0 for t in self.stop_token_ids):
            return "stop_token_ids", "must be token ids >= 0"
        if not all(LIMITS["logit_bias"].contains(b) for _, b in self.logit_bias):
            return "logit_bias", "values " + LIMITS["logit_bias"].describe()
        # A grammar must be free to end the output: banning end-of-generation would leave llama.cpp's grammar
        # with no allowed token, which aborts the whole process.
        if self.ignore_eos and self.constraint is not None:
            return "ignore_eos", ("cannot be combined with a grammar or response_format (the output ends where the "
                                  "grammar does)")
        if not (self.logprobs is None or LIMITS["logprobs"].contains(self.logprobs)):
            return "logprobs", LIMITS["logprobs"].describe()
        return None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
