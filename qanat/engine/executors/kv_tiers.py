"""The prompt cache's tiers beyond the slots, on the executor's side of the boundary: the bytes themselves.

RAM (warm): one anonymous mapping per entry, so an evicted entry's memory goes back to the system at once (a
heap allocation of a few MB could stay in the process after `free`), least recently used evicted first within
`ram_bytes`. Disk (cold, optional): one file per entry, written behind by a thread (a step never waits for a
disk), read back on a hit and promoted to RAM; a header names the model file, the llama.cpp build and the
context settings, and a state written under others is refused, never loaded. An unwritable or full directory
turns the disk tier off with a warning: a request never fails because of it.

Only keys, token ids and sizes cross to the engine core (`TierEvent`s in `KVCacheReport`); it keeps the index.
The executor provides the sequence operations (`SequenceKV`): llama.cpp's `llama_state_seq_*_data_ext`, or the
fake's token lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import queue
import struct
import threading
import time
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qanat.engine.executors.base import CacheOp, KVCacheReport, KVSave, TierEvent

log = logging.getLogger("qanat.executor")

MAGIC = b"QANATKV1"
FORMAT_VERSION = 1
MAX_PENDING_WRITE_BYTES = 64 << 20  # entries waiting for the disk writer (an evicted one is held until written)
MAX_WRITE_WAIT_S = 5.0  # how long a save waits for the writer to catch up before leaving its entry out of the disk
_HEADER_LEN = struct.Struct("<I")


class SequenceKV(Protocol):
    """What the tiers need from an executor's sequences."""

    def state_size(self, seq_id: int) -> int: ...

    def read_state(self, seq_id: int, dst: mmap.mmap) -> int:
        """Write the sequence's state into `dst` (at least `state_size` bytes); returns the bytes written, 0 on
        failure."""
        ...

    def write_state(self, seq_id: int, src: mmap.mmap, nbytes: int) -> bool:
        """Replace the sequence's KV by a state read from it; False when it cannot be loaded."""
        ...

    def copy(self, src_seq_id: int, dst_seq_id: int) -> None: ...

    def keep(self, seq_id: int, n_tokens: int) -> None:
        """Drop every cell from position `n_tokens` on."""
        ...


@dataclass(frozen=True)
class TierSettings:
    ram_bytes: int = 0
    disk_dir: str | None = None
    disk_bytes: int = 0

    @property
    def enabled(self) -> bool:
        return self.ram_bytes > 0 or self.disk_dir is not None


@dataclass
class _Entry:
    key: str
    token_ids: tuple[int, ...]
    exact_tokens: int
    buf: mmap.mmap
    nbytes: int


@dataclass
class _DiskEntry:
    path: Path
    file_bytes: int
    token_ids: tuple[int, ...]
    exact_tokens: int


@dataclass
class _Report:
    events: list[TierEvent] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    restore_s: dict[str, float] = field(default_factory=dict)
    restored_tokens: Counter[str] = field(default_factory=Counter)
    save_s: float = 0.0


def _alloc(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, max(nbytes, 1))


class KVTiers:
    """Applies a step's cache ops (save, restore, copy, trim) and keeps the RAM and disk tiers. Executor thread."""

    def __init__(self, seqs: SequenceKV, settings: TierSettings, identity: dict[str, str | int]) -> None:
        self.seqs = seqs
        self.settings = settings
        self.ram: OrderedDict[str, _Entry] = OrderedDict()
        self.ram_bytes = 0
        self._lock = threading.Lock()  # the disk writer adds events and disk entries
        self._report = _Report()
        self.disk = DiskTier(Path(settings.disk_dir), settings.disk_bytes, identity, self._event) \
            if settings.disk_dir else None

    def _event(self, event: TierEvent) -> None:
        with self._lock:
            self._report.events.append(event)

    def apply(self, ops: list[CacheOp]) -> set[int]:
        """Run the cache ops in order; returns the seq ids whose restore failed (left empty)."""
        protected = {op.restore_key for op in ops if op.restore_key is not None}
        failed: set[int] = set()
        for op in ops:
            if op.save is not None:
                self._save(op.seq_id, op.save, protected)
            if op.restore_key is not None:
                if not self._restore(op.seq_id, op.restore_key, op.keep):
                    self.seqs.keep(op.seq_id, 0)
                    failed.add(op.seq_id)
                    continue
            elif op.copy_from is not None:
                self.seqs.copy(op.copy_from, op.seq_id)
            self.seqs.keep(op.seq_id, op.keep)
        with self._lock:
            self._report.failed += sorted(failed)
        return failed

    def entry_tokens(self, key: str) -> tuple[int, ...] | None:
        """The tokens a stored entry holds, from position 0 (None when no tier holds it any more)."""
        entry = self.ram.get(key)
        if entry is not None:
            return entry.token_ids
        disk = self.disk.entries.get(key) if self.disk is not None else None
        return disk.token_ids if disk is not None else None

    def take_report(self) -> KVCacheReport | None:
        """What happened since the last report (the disk writer's news included); None when nothing did."""
        with self._lock:
            r, self._report = self._report, _Report()
        if not (r.events or r.failed or r.restore_s or r.save_s):
            return None
        return KVCacheReport(r.events, r.failed, dict(r.restore_s), r.save_s, dict(r.restored_tokens))

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
        self.ram.clear()

    # -- save -------------------------------------------------------------------------------------------

    def _save(self, seq_id: int, save: KVSave, protected: set[str]) -> None:
        start_s = time.perf_counter()
        for key in save.replaces:
            if key not in protected and self._drop_ram(key):
                self._event(TierEvent(key, "ram", held=False, reason="replaced"))
            if self.disk is not None:
                self.disk.delete(key)
        size = self.seqs.state_size(seq_id)
        fits_ram = 0 < size <= self.settings.ram_bytes
        if not fits_ram and (self.disk is None or not self.disk.writable):
            self._event(TierEvent(save.key, "ram", held=False, reason="failed"))
            return
        if fits_ram:
            self._evict_ram(size, protected)
        buf = _alloc(size)
        nbytes = self.seqs.read_state(seq_id, buf)
        if nbytes <= 0:
            self._event(TierEvent(save.key, "ram", held=False, reason="failed"))
            return
        entry = _Entry(save.key, save.token_ids, save.exact_tokens, buf, nbytes)
        if fits_ram:
            self._drop_ram(save.key)
            self.ram[save.key] = entry
            self.ram_bytes += nbytes
            self._event(TierEvent(save.key, "ram", held=True, nbytes=nbytes))
        else:
            self._event(TierEvent(save.key, "ram", held=False, reason="failed"))
        if self.disk is not None:
            self.disk.write(entry)
        with self._lock:
            self._report.save_s += time.perf_counter() - start_s

    def _evict_ram(self, needed: int, protected: set[str]) -> None:
        for key in list(self.ram):
            if self.ram_bytes + needed <= self.settings.ram_bytes:
                return
            if key not in protected:
                self._drop_ram(key)
                self._event(TierEvent(key, "ram", held=False, reason="evicted"))

    def _drop_ram(self, key: str) -> bool:
        entry = self.ram.pop(key, None)
        if entry is None:
            return False
        self.ram_bytes -= entry.nbytes
        return True  # the mapping is unmapped when the last reference (a pending disk write) lets go

    # -- restore ----------------------------------------------------------------------------------------

    def _restore(self, seq_id: int, key: str, keep: int) -> bool:
        start_s = time.perf_counter()
        entry = self.ram.get(key)
        tier = "ram"
        if entry is None:
            tier = "disk"
            entry = self.disk.read(key) if self.disk is not None else None
            if entry is None:
                self._event(TierEvent(key, "disk", held=False, reason="failed"))
                self._event(TierEvent(key, "ram", held=False, reason="failed"))
                return False
        else:
            self.ram.move_to_end(key)
        self.seqs.keep(seq_id, 0)
        if len(entry.token_ids) < keep or not self.seqs.write_state(seq_id, entry.buf, entry.nbytes):
            log.warning("a cached prompt state (%s) could not be loaded; computing the prompt instead", key)
            self._drop_ram(key)
            self._event(TierEvent(key, tier, held=False, reason="failed"))
            return False
        if tier == "disk" and entry.nbytes <= self.settings.ram_bytes:  # promote: the next hit is a RAM hit
            self._evict_ram(entry.nbytes, {key})
            self.ram[key] = entry
            self.ram_bytes += entry.nbytes
            self._event(TierEvent(key, "ram", held=True, nbytes=entry.nbytes))
        with self._lock:
            self._report.restore_s[tier] = self._report.restore_s.get(tier, 0.0) + time.perf_counter() - start_s
            self._report.restored_tokens[tier] += keep
        return True


def identity_fingerprint(identity: dict[str, str | int]) -> str:
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=8).hexdigest()


class DiskTier:
    """Entry files in one directory: `<hash of identity and key>.qkv`. Writes behind in a thread; reads inline."""

    def __init__(self, directory: Path, max_bytes: int, identity: dict[str, str | int],
                 on_event: _EventSink) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.identity: dict[str, str | int] = {"format": FORMAT_VERSION, **identity}
        self.fingerprint = identity_fingerprint(self.identity)
        self._on_event = on_event
        self._lock = threading.Lock()
        self.entries: OrderedDict[str, _DiskEntry] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.refused = 0
        self.writable = self._probe()
        self._pending_bytes = 0
        self._written = threading.Condition(self._lock)
        self._queue: queue.SimpleQueue[tuple[str, _Entry | str] | None] = queue.SimpleQueue()
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="qanat-kv-disk", daemon=True)
        self._writer.start()

    def path_for(self, key: str) -> Path:
        name = hashlib.blake2b(f"{self.fingerprint}:{key}".encode(), digest_size=16).hexdigest()
        return self.directory / f"{name}.qkv"

    def _probe(self) -> bool:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".probe-{os.getpid()}"
            probe.write_bytes(b"qanat")
            probe.unlink()
            return True
        except OSError as e:
            log.warning("prompt cache directory %s is not writable (%s): no disk tier", self.directory, e)
            return False

    def _scan(self) -> None:
        """Index what earlier processes left: entries with our identity, least recently used first."""
        try:
            files = sorted(self.directory.glob("*.qkv"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for path in files:
            try:
                header, tokens = _read_header(path)
            except (OSError, ValueError):
                continue
            if header.get("identity") != self.identity or path != self.path_for(str(header.get("key"))):
                self.refused += 1
                continue
            entry = _DiskEntry(path, path.stat().st_size, tokens, int(header["exact_tokens"]))
            self.entries[str(header["key"])] = entry
            self.bytes += entry.file_bytes
            self._on_event(TierEvent(str(header["key"]), "disk", held=True, nbytes=entry.file_bytes,
                                     token_ids=tokens, exact_tokens=entry.exact_tokens))
        if self.refused:
            log.warning("%d prompt cache files in %s were written by another model, llama.cpp build or context "
                        "setting: not loaded", self.refused, self.directory)
        log.info("prompt cache disk tier %s: %d entries, %.1f MiB", self.directory, len(self.entries),
                 self.bytes / 2**20)

    def write(self, entry: _Entry) -> None:
        if not self.writable or entry.key in self.entries:
            return
        with self._written:
            # Backpressure, bounded: memory held for the writer stays under the limit, and a disk that stalls
            # costs a step at most MAX_WRITE_WAIT_S once, then its entries stay in RAM only.
            room = self._written.wait_for(
                lambda: self._pending_bytes == 0 or self._pending_bytes + entry.nbytes <= MAX_PENDING_WRITE_BYTES,
                timeout=MAX_WRITE_WAIT_S)
            if not room:
                log.warning("prompt cache directory %s: the disk writer is behind; an entry stays in RAM only",
                            self.directory)
                return
            self._pending_bytes += entry.nbytes
        self._queue.put(("write", entry))

    def delete(self, key: str) -> None:
        self._queue.put(("delete", key))

    def read(self, key: str) -> _Entry | None:
        with self._lock:
            known = self.entries.get(key)
            if known is not None:
                self.entries.move_to_end(key)
        if known is None:
            return None
        try:
            header, tokens = _read_header(known.path)
            if header.get("identity") != self.identity or header.get("key") != key:
                raise ValueError("written by another model, build or setting")
            nbytes = int(header["state_bytes"])
            buf = _alloc(nbytes)
            with known.path.open("rb") as f:
                f.seek(int(header["state_offset"]))
                if f.readinto(buf) != nbytes:
                    raise ValueError("truncated")
            if zlib.crc32(buf) != header["state_crc32"]:
                raise ValueError("checksum mismatch")
            os.utime(known.path)  # least recently used across restarts too
        except (OSError, ValueError, KeyError) as e:
            log.warning("prompt cache file %s refused: %s", known.path, e)
            self._forget(key)
            return None
        return _Entry(key, tokens, int(header["exact_tokens"]), buf, nbytes)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=60)

    def _forget(self, key: str) -> _DiskEntry | None:
        with self._lock:
            entry = self.entries.pop(key, None)
            if entry is not None:
                self.bytes -= entry.file_bytes
        return entry

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, payload = item
            if isinstance(payload, str):
                entry = self._forget(payload)
                if entry is not None:
                    entry.path.unlink(missing_ok=True)
                    self._on_event(TierEvent(payload, "disk", held=False, reason="replaced"))
                continue
            try:
                if self.writable:
                    self._write(payload)
            finally:
                with self._written:
                    self._pending_bytes -= payload.nbytes
                    self._written.notify_all()

    def _write(self, entry: _Entry) -> None:
        path = self.path_for(entry.key)
        tokens = np.asarray(entry.token_ids, dtype="<i4").tobytes()
        header = {"identity": self.identity, "key": entry.key, "n_tokens": len(entry.token_ids),
                  "exact_tokens": entry.exact_tokens, "state_bytes": entry.nbytes,
                  "state_crc32": zlib.crc32(memoryview(entry.buf)[:entry.nbytes])}
        head = json.dumps(header, sort_keys=True).encode()
        offset = len(MAGIC) + _HEADER_LEN.size + len(head) + len(tokens)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                f.write(MAGIC + _HEADER_LEN.pack(len(head)) + head + tokens + b"\0" * _pad(offset))
                f.write(memoryview(entry.buf)[:entry.nbytes])
            os.replace(tmp, path)  # readers (another server on this directory) see whole files only
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.writable = False
            log.warning("prompt cache directory %s: cannot write (%s): disk tier off for writes", self.directory, e)
            return
        file_bytes = path.stat().st_size
        with self._lock:
            self.entries[entry.key] = _DiskEntry(path, file_bytes, entry.token_ids, entry.exact_tokens)
            self.bytes += file_bytes
        self._on_event(TierEvent(entry.key, "disk", held=True, nbytes=file_bytes, token_ids=entry.token_ids,
                                 exact_tokens=entry.exact_tokens))
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            with self._lock:
                key = next(iter(self.entries))
            old = self._forget(key)
            if old is not None:
                old.path.unlink(missing_ok=True)
                self._on_event(TierEvent(key, "disk", held=False, reason="evicted"))


class _EventSink(Protocol):
    def __call__(self, event: TierEvent, /) -> None: ...


def _pad(offset: int) -> int:
    """Zero bytes after the header so that the state starts on a 64-byte boundary (a single aligned read)."""
    return -offset % 64


def _read_header(path: Path) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The header (with `state_offset`, where the state's bytes start) and the token ids of an entry file."""
    with path.open("rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError("not a Qanat prompt cache file")
        (length,) = _HEADER_LEN.unpack(f.read(_HEADER_LEN.size))
        if length > 1 << 20:
            raise ValueError("header too large")
        header = json.loads(f.read(length))
        if not isinstance(header, dict) or header.get("identity", {}).get("format") != FORMAT_VERSION:
            raise ValueError("unknown format")
        n_tokens = int(header["n_tokens"])
        tokens = np.frombuffer(f.read(4 * n_tokens), dtype="<i4")
        if len(tokens) != n_tokens:
            raise ValueError("truncated")
        offset = f.tell()
    header["state_offset"] = offset + _pad(offset)
    return header, tuple(int(t) for t in tokens)
