"""How a router picks a replica: pure policy over what it knows of each (no I/O), testable with exact choices.

- `round_robin`: in turn.
- `least_load`: fewest outstanding requests, then fewest outstanding tokens (prompt + max_tokens).
- `prefix`: the replica whose cache most likely holds the prompt's prefix, by chained hashes of the prompt's
  blocks sent to each replica recently (vLLM's block hashes; SGLang's router keeps a radix tree of text to
  the same end). When replicas are unbalanced, or nothing matches well, least load decides.
- `session`: one conversation (x-session-id, else `user`) sticks to one replica: rendezvous hashing, so a
  replica leaving moves only its own sessions.
- `energy`: the lowest measured joules per token among replicas that are not saturated; a replica not yet
  measured is tried first, so every replica gets measured.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from qanat.engine.client import ChatPrompt, Prompt, TextPrompt

BLOCK_CHARS = 64  # prompt text per hashed block
BLOCK_TOKENS = 16  # token ids per hashed block
MAX_BLOCKS_PER_REPLICA = 200_000  # least recently sent blocks are forgotten beyond this
PREFIX_MIN_MATCH = 0.5  # a replica must hold at least this share of the prompt's blocks to win on prefix
UNBALANCED_ABS = 4  # outstanding requests apart, and ...
UNBALANCED_REL = 1.5  # ... this many times as many: then load decides, not cache


@dataclass
class ReplicaView:
    """What the router knows of one replica right now."""

    name: str
    capacity: int  # requests it runs at once (slots); remote: a configured guess
    outstanding: int = 0  # requests sent and not finished
    outstanding_tokens: int = 0
    joules: float = 0.0  # measured energy of finished requests, and their tokens
    tokens: int = 0
    prefix_blocks: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    @property
    def joules_per_token(self) -> float | None:
        return self.joules / self.tokens if self.tokens else None

    @property
    def saturated(self) -> bool:
        return self.outstanding >= self.capacity


@dataclass(frozen=True)
class RouteRequest:
    prompt: Prompt
    max_tokens: int
    session: str | None = None


class Policy(Protocol):
    def choose(self, replicas: Sequence[ReplicaView], request: RouteRequest) -> ReplicaView:
        """Pick one of `replicas` (never empty: all healthy and not excluded)."""
        ...


def least_loaded(replicas: Sequence[ReplicaView]) -> ReplicaView:
    return min(replicas, key=lambda r: (r.outstanding, r.outstanding_tokens, r.name))


class RoundRobin:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, replicas: Sequence[ReplicaView], request: RouteRequest) -> ReplicaView:
        return replicas[next(self._turn) % len(replicas)]


class LeastLoad:
    def choose(self, replicas: Sequence[ReplicaView], request: RouteRequest) -> ReplicaView:
        return least_loaded(replicas)


def prompt_blocks(prompt: Prompt) -> list[bytes]:
    """Chained block hashes of a prompt: block i's hash covers blocks 0..i, so equal hashes mean equal prefixes."""
    if isinstance(prompt, ChatPrompt):
        text = "".join(f"\x1e{m.get('role')}\x1f{m.get('content')}" for m in prompt.messages)
        units = [text[i:i + BLOCK_CHARS].encode() for i in range(0, len(text), BLOCK_CHARS)]
    elif isinstance(prompt, TextPrompt):
        units = [prompt.text[i:i + BLOCK_CHARS].encode() for i in range(0, len(prompt.text), BLOCK_CHARS)]
    else:
        ids = prompt.token_ids
        units = [b",".join(str(t).encode() for t in ids[i:i + BLOCK_TOKENS]) for i in range(0, len(ids), BLOCK_TOKENS)]
    hashes, previous = [], b""
    for unit in units:
        previous = hashlib.blake2b(previous + unit, digest_size=16).digest()
        hashes.append(previous)
    return hashes


class PrefixAware:
    def choose(self, replicas: Sequence[ReplicaView], request: RouteRequest) -> ReplicaView:
        blocks = prompt_blocks(request.prompt)
        loads = [r.outstanding for r in replicas]
        unbalanced = max(loads) - min(loads) > UNBALANCED_ABS and max(loads) > UNBALANCED_REL * min(loads)
        chosen = least_loaded(replicas)
        if not unbalanced and blocks:
            matched = {r.name: self._matched(r, blocks) for r in replicas}
            best = max(replicas, key=lambda r: (matched[r.name], -r.outstanding, r.name))
            if matched[best.name] >= PREFIX_MIN_MATCH * len(blocks):
                chosen = best
        self._remember(chosen, blocks)
        return chosen

    @staticmethod
    def _matched(replica: ReplicaView, blocks: list[bytes]) -> int:
        n = 0
        for block in blocks:
            if block not in replica.prefix_blocks:
                break
            n += 1
        return n

    @staticmethod
    def _remember(replica: ReplicaView, blocks: list[bytes]) -> None:
        cache = replica.prefix_blocks
        for block in blocks:
            cache[block] = None
            cache.move_to_end(block)
        while len(cache) > MAX_BLOCKS_PER_REPLICA:
            cache.popitem(last=False)


class SessionAffinity:
    def choose(self, replicas: Sequence[ReplicaView], request: RouteRequest) -> ReplicaView:
        if request.session is None:
            return least_loaded(replicas)

        def score(replica: ReplicaView) -> bytes:
            return hashlib.blake2b(f"{request.session}\x00{replica.name}".encode(), digest_size=8).digest()

        return max(replicas, key=score)


class LowestEnergy:
    def choose(self, replicas: Sequence[ReplicaView], request: RouteRequest) -> ReplicaView:
        open_ = [r for r in replicas if not r.saturated] or list(replicas)
        unmeasured = [r for r in open_ if r.joules_per_token is None]
        if unmeasured:
            return least_loaded(unmeasured)
        return min(open_, key=lambda r: (r.joules_per_token or 0.0, r.outstanding, r.name))


def make_policy(name: str) -> Policy:
    policies: dict[str, type[Policy]] = {
        "round_robin": RoundRobin, "least_load": LeastLoad, "prefix": PrefixAware, "session": SessionAffinity,
        "energy": LowestEnergy,
    }
    return policies[name]()
