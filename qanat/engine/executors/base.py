"""The executor boundary: what the engine core sends down each step and gets back. Nothing but plain data
crosses it (token ids in, sampled ids out), so an executor can live in another process (`process.py`).

Implementations: `llamacpp.py` (the real model) and `fake.py` (a deterministic fake model, no weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from qanat.energy.meters import EnergyMeter
from qanat.engine.sampling import SamplingParams


class ExecutorDiedError(RuntimeError):
    """The executor's process is gone: every sequence's KV went with it."""


class ExecutorStartError(RuntimeError):
    """An executor could not be built or rebuilt (bad model file, out of memory, not restartable)."""


@dataclass(frozen=True)
class KVSave:
    """Store a sequence's KV beyond the slots (the prompt cache's RAM tier, and its disk tier when there is one)."""

    key: str  # names the entry in every tier (and its file on disk): a hash of `token_ids`
    token_ids: tuple[int, ...]  # what the sequence holds, from position 0
    exact_tokens: int  # of which computed as whole prompt chunks (deterministic mode may restore only those)
    replaces: tuple[str, ...] = ()  # entries this one holds a superset of: dropped once it is stored


@dataclass(frozen=True)
class CacheOp:
    """Prepare a sequence before the batch: optionally save what it holds (`save`), then load a stored entry
    (`restore_key`) or copy another sequence's KV (`copy_from`), then keep `keep` tokens."""

    seq_id: int
    keep: int
    copy_from: int | None = None
    save: KVSave | None = None
    restore_key: str | None = None


@dataclass(frozen=True)
class ExecChunk:
    request_id: str
    seq_id: int
    start_pos: int  # position of token_ids[0]
    token_ids: list[int]
    needs_logits: bool  # sample this request's next token from the chunk's last position
    # Speculative decoding: guessed next tokens, run after token_ids in the same pass (logits at every position)
    # and kept while they equal what the request's sampler picks (see engine/core/speculation.py).
    draft_ids: tuple[int, ...] = ()
    # Or, with a draft model in the executor: draft this many tokens with it (greedily), then verify them the same way.
    draft_len: int = 0


@dataclass(frozen=True)
class StepBatch:
    cache_ops: list[CacheOp]  # applied in order, before the batch
    chunks: list[ExecChunk]
    new_requests: list[tuple[str, SamplingParams]] = field(default_factory=list)  # build their samplers first
    released: list[str] = field(default_factory=list)  # finished since the last step: drop their samplers

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) + len(c.draft_ids) + c.draft_len for c in self.chunks)


@dataclass(frozen=True)
class SampledLogprobs:
    """The chosen token's log-probability and the `k` most likely alternatives, as ids."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class StepEnergy:
    """Meter readings around one step: what passed since the previous step (idle) and during this one."""

    idle_j: float = 0.0
    busy_j: float = 0.0


@dataclass(frozen=True)
class Refusal:
    message: str
    param: str | None = None


@dataclass(frozen=True)
class TierEvent:
    """A change in what a prompt-cache tier beyond the slots holds, reported up with a step's result."""

    key: str
    tier: str  # "ram" | "disk"
    held: bool  # the tier holds the entry now (stored, promoted, found on disk), or no longer does (evicted)
    nbytes: int = 0
    token_ids: tuple[int, ...] | None = None  # an entry the core has not seen: found on disk at start
    exact_tokens: int = 0
    reason: str = ""  # when no longer held: evicted (least recently used), replaced, failed


@dataclass(frozen=True)
class KVCacheReport:
    """What the tiers beyond the slots did during one step."""

    events: list[TierEvent] = field(default_factory=list)
    failed_restores: list[int] = field(default_factory=list)  # seq ids left empty: their chunks were not run
    restore_s: dict[str, float] = field(default_factory=dict)  # tier -> seconds spent restoring entries
    save_s: float = 0.0
    restored_tokens: dict[str, int] = field(default_factory=dict)  # tier -> tokens restored


@dataclass(frozen=True)
class StepResult:
    sampled: dict[str, int]  # request_id -> next token
    logprobs: dict[str, SampledLogprobs]  # only for requests that asked
    refused: dict[str, Refusal] = field(default_factory=dict)  # new requests it cannot run (their chunks skipped)
    energy: StepEnergy = StepEnergy()
    compute_s: float = 0.0  # wall time inside execute, as the executor measured it
    kv_cache: KVCacheReport | None = None  # None when the executor keeps no tiers beyond its slots
    # For chunks with drafts: the tokens kept after sampled[id], in order (each accepted draft's successor), and
    # their logprobs (if asked). len(extra_tokens[id]) drafts were accepted; the rest's KV is already removed.
    extra_tokens: dict[str, list[int]] = field(default_factory=dict)
    extra_logprobs: dict[str, list[SampledLogprobs]] = field(default_factory=dict)
    # For chunks with a draft_len: how many tokens the draft model drafted (fewer when it could not draft, e.g.
    # for a sequence whose tokens it does not know). Chunks with draft_ids drafted len(draft_ids).
    drafted: dict[str, int] = field(default_factory=dict)


class PassCost(NamedTuple):
    """A pass of n >= 2 tokens takes about fixed_s + per_token_s·n seconds (F in speculation's cost rule is their
    ratio); a lone token's pass one_token_s, which may lie below that line: a CPU's matmul can switch kernels past
    one row (ggml's AMX tiles: a 2-token pass costs 1.6 one-token passes here, each further token 0.2)."""

    fixed_s: float
    per_token_s: float
    one_token_s: float


@dataclass(frozen=True)
class ExecutorFacts:
    """What the executor learnt when it started: sizes it actually allocated, where it runs, its meter."""

    context_length: int  # KV cells per sequence: tokens per request, prompt plus output
    num_slots: int
    batch_tokens: int  # the most tokens one step may carry
    chip: str
    energy_source: str
    # A draft model's pass over the target's (a one-token decode each, timed at load); 0.0 when there is none.
    draft_cost: float = 0.0
    # What a pass costs, timed at load when speculation is on; None when not measured.
    pass_cost_s: PassCost | None = None


class Executor(Protocol):
    facts: ExecutorFacts
    restarts: int

    def execute(self, batch: StepBatch) -> StepResult:
        """Run one step. Raises ExecutorDiedError when the executor is gone, anything else when the step failed."""
        ...

    def is_alive(self) -> bool: ...

    def restart(self) -> None:
        """A fresh executor with empty KV; raises ExecutorStartError if none can be had."""
        ...

    def close(self) -> None: ...


class ExecutorSpec(Protocol):
    """A picklable recipe for an executor, so a child process can build its own."""

    def create(self) -> Executor: ...


class Tokenizer(Protocol):
    """The model's vocabulary, on the caller's side of the boundary. Thread-safe."""

    n_vocab: int
    eog_ids: frozenset[int]

    def tokenize(self, text: str, add_special: bool) -> list[int]: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def chat_template(self) -> tuple[str, str, str] | None:
        """(jinja source, bos text, eos text), or None when the model has no chat template."""
        ...


class StepMeter:
    """Reads an energy meter around each step, for `StepResult.energy`."""

    def __init__(self, meter: EnergyMeter) -> None:
        self.meter = meter
        self._last_j = meter.read_joules()

    def begin(self) -> float:
        now = self.meter.read_joules()
        idle_j, self._last_j = now - self._last_j, now
        return idle_j

    def end(self, idle_j: float) -> StepEnergy:
        now = self.meter.read_joules()
        busy_j, self._last_j = now - self._last_j, now
        return StepEnergy(idle_j, busy_j)
