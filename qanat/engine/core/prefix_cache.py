"""The prompt cache beyond the slots: which computed prefixes the RAM and disk tiers hold, found by prefix.

The bytes live with the executor (`executors/kv_tiers.py`), possibly in another process; this side keeps only
what each entry holds (its token ids) and where (`ram`, `disk`), as the executor's `TierEvent`s report it, and
decides what to save and what to restore. The slots themselves are the hot tier, searched by the scheduler.

Lookup is by the longest cached prefix, not only a whole prompt: every entry's tokens are cut into blocks of
`BLOCK_TOKENS`, each block named by a hash chained over the blocks before it (vLLM's block hashes), and the
index maps each chain hash to the entries that hold that block at that place. A prompt walks its own chain
until a hash is missing: the entries at the deepest hash share its longest block-aligned prefix, and an exact
comparison of their tokens extends it to the token (and makes a hash collision harmless).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from qanat.engine.client import PromptCacheStats
from qanat.engine.executors.base import KVCacheReport, KVSave

BLOCK_TOKENS = 16
TIERS = ("slot", "ram", "disk")  # fastest first


def entry_key(token_ids: list[int] | tuple[int, ...]) -> str:
    """An entry's name in every tier: stable across processes (the disk tier's files outlive this one)."""
    return hashlib.blake2b(np.asarray(token_ids, dtype=np.int32).tobytes(), digest_size=16).hexdigest()


def _chain(token_ids: list[int] | tuple[int, ...], n_blocks: int) -> list[int]:
    hashes, h = [], 0
    for i in range(n_blocks):
        h = hash((h, tuple(token_ids[i * BLOCK_TOKENS:(i + 1) * BLOCK_TOKENS])))
        hashes.append(h)
    return hashes


@dataclass
class CachedEntry:
    key: str
    token_ids: np.ndarray  # int32, what restoring it puts in a sequence, from position 0
    exact_tokens: int  # of which computed as whole prompt chunks from position 0 (deterministic mode)
    chain: list[int]  # its block hashes
    tier_bytes: dict[str, int] = field(default_factory=dict)  # tier -> bytes it takes there
    pending: bool = False  # a save was sent, the executor has not answered yet

    @property
    def tier(self) -> str:
        """The fastest tier that holds it (a pending save counts as RAM: its restore would follow the save)."""
        return "ram" if "ram" in self.tier_bytes or self.pending else "disk"


@dataclass(frozen=True)
class TierHit:
    key: str
    tier: str
    num_tokens: int  # restore the entry, keep this many tokens


class PrefixCache:
    """The index of the tiers beyond the slots, and the policy of what goes there. Engine thread only."""

    def __init__(self, tiers: tuple[str, ...] = ("ram",), block_multiple: int = 1) -> None:
        self.tiers = ("slot", *tiers)
        # Deterministic mode restores only whole chunks of this many tokens (a chunk computed alone from the same
        # start gives the same bits); 1 otherwise.
        self.block_multiple = block_multiple
        self.entries: dict[str, CachedEntry] = {}
        self._by_hash: dict[int, set[str]] = {}
        self._hits: Counter[str] = Counter()
        self._misses: Counter[str] = Counter()
        self._evictions: Counter[str] = Counter()
        self._restores: Counter[str] = Counter()
        self._restored_tokens: Counter[str] = Counter()
        self._restore_s: dict[str, float] = {}
        self._saves = 0
        self._save_s = 0.0
        self._failed_restores = 0

    @property
    def enabled(self) -> bool:
        return len(self.tiers) > 1

    # -- lookup ---------------------------------------------------------------------------------------

    def lookup(self, prompt: list[int], max_tokens: int) -> TierHit | None:
        """The entry sharing the longest prefix with `prompt`, and how many of its tokens to keep (<= max_tokens)."""
        if not self.entries or max_tokens < BLOCK_TOKENS:
            return None
        candidates: set[str] = set()
        h = 0
        for i in range(len(prompt) // BLOCK_TOKENS):
            h = hash((h, tuple(prompt[i * BLOCK_TOKENS:(i + 1) * BLOCK_TOKENS])))
            keys = self._by_hash.get(h)
            if not keys:
                break
            candidates = keys
        best: TierHit | None = None
        ids = np.asarray(prompt, dtype=np.int32)
        for key in candidates:
            entry = self.entries[key]
            n = _common_prefix(ids, entry.token_ids)
            if self.block_multiple > 1:
                n = min(n, entry.exact_tokens) // self.block_multiple * self.block_multiple
            n = min(n, max_tokens)
            hit = TierHit(key, entry.tier, n)
            if best is None or (n, hit.tier == "ram") > (best.num_tokens, best.tier == "ram"):
                best = hit
        return best if best is not None and best.num_tokens > 0 else None

    def holds(self, token_ids: list[int]) -> bool:
        """Some entry holds all of `token_ids` (as its tokens or a prefix of them): saving them adds nothing."""
        n_blocks = len(token_ids) // BLOCK_TOKENS
        if n_blocks == 0:
            return False
        keys = self._by_hash.get(_chain(token_ids, n_blocks)[-1], set())
        ids = np.asarray(token_ids, dtype=np.int32)
        return any(_common_prefix(ids, self.entries[k].token_ids) == len(ids) for k in keys)

    # -- saves ------------------------------------------------------------------------------------------

    def save(self, token_ids: list[int], exact_tokens: int) -> KVSave:
        """Record a save about to be sent; entries it holds a superset of are replaced by it."""
        key = entry_key(token_ids)
        ids = np.asarray(token_ids, dtype=np.int32)
        # An entry contained in this one shares its chain up to its own last full block.
        candidates = set().union(*(self._by_hash.get(h, ()) for h in _chain(token_ids, len(token_ids) // BLOCK_TOKENS)))
        replaces = tuple(k for k in sorted(candidates) if (e := self.entries[k]) and len(e.token_ids) <= len(ids)
                         and _common_prefix(ids, e.token_ids) == len(e.token_ids) and e.exact_tokens <= exact_tokens)
        for k in replaces:
            self._remove(k)
        if key not in self.entries:
            self._add(key, ids, exact_tokens)
        self.entries[key].pending = True
        self._saves += 1
        return KVSave(key, tuple(token_ids), exact_tokens, replaces)

    # -- what the executor reports ----------------------------------------------------------------------

    def apply(self, report: KVCacheReport) -> None:
        for event in report.events:
            entry = self.entries.get(event.key)
            if event.held:
                if entry is None:
                    if event.token_ids is None:
                        continue  # replaced here since: the executor drops it when it gets the replacing save
                    entry = self._add(event.key, np.asarray(event.token_ids, dtype=np.int32), event.exact_tokens)
                entry.tier_bytes[event.tier] = event.nbytes
                entry.pending = False
                continue
            if event.reason == "evicted":
                self._evictions[event.tier] += 1
            if entry is None:
                continue
            entry.tier_bytes.pop(event.tier, None)
            if event.tier == "ram":
                entry.pending = False
            if not entry.tier_bytes and not entry.pending:
                self._remove(event.key)
        self._save_s += report.save_s
        self._failed_restores += len(report.failed_restores)
        for tier, seconds in report.restore_s.items():
            self._restore_s[tier] = self._restore_s.get(tier, 0.0) + seconds
        for tier, n in report.restored_tokens.items():
            self._restored_tokens[tier] += n

    def forget_ram(self) -> None:
        """The executor restarted: its RAM tier went with it (the disk tier is reported again by the new one)."""
        for key in list(self.entries):
            self._remove(key)

    # -- accounting -------------------------------------------------------------------------------------

    def record_admission(self, num_prompt_tokens: int, tier: str | None, num_cached: int) -> None:
        """Tiers are asked in order, each for what the faster ones did not give (as vLLM counts its local and
        external caches): the serving tier hits `num_cached` tokens; a tier before it missed all of them."""
        if tier is not None:
            self._restores[tier] += tier != "slot"
        wanted = num_prompt_tokens
        for t in self.tiers:
            hit = num_cached if t == tier else 0
            self._hits[t] += hit
            self._misses[t] += wanted - hit
            wanted -= hit

    def stats(self) -> PromptCacheStats:
        held: Counter[str] = Counter()
        entries: Counter[str] = Counter()
        for entry in self.entries.values():
            for tier, nbytes in entry.tier_bytes.items():
                held[tier] += nbytes
                entries[tier] += 1
        beyond = self.tiers[1:]
        return PromptCacheStats(
            tiers=self.tiers, hit_tokens={t: self._hits[t] for t in self.tiers},
            miss_tokens={t: self._misses[t] for t in self.tiers}, held_bytes={t: held[t] for t in beyond},
            entries={t: entries[t] for t in beyond}, evictions={t: self._evictions[t] for t in beyond},
            restores={t: self._restores[t] for t in beyond}, restore_s={t: self._restore_s.get(t, 0.0) for t in beyond},
            restored_tokens={t: self._restored_tokens[t] for t in beyond}, saves=self._saves, save_s=self._save_s,
            failed_restores=self._failed_restores,
        )

    # -- the index ----------------------------------------------------------------------------------------

    def _add(self, key: str, token_ids: np.ndarray, exact_tokens: int) -> CachedEntry:
        entry = CachedEntry(key, token_ids, exact_tokens, _chain(token_ids.tolist(), len(token_ids) // BLOCK_TOKENS))
        self.entries[key] = entry
        for h in entry.chain:
            self._by_hash.setdefault(h, set()).add(key)
        return entry

    def _remove(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        for h in entry.chain:
            keys = self._by_hash.get(h)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_hash[h]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n
