"""The prompt cache's index (core side) and its tiers (executor side, on the fake's sequences): exact answers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from qanat.engine.core.prefix_cache import BLOCK_TOKENS, PrefixCache, entry_key
from qanat.engine.executors.base import CacheOp, KVCacheReport, KVSave, TierEvent
from qanat.engine.executors.fake import _FakeSequences
from qanat.engine.executors.kv_tiers import KVTiers, TierSettings

IDENTITY: dict[str, str | int] = {"model": "fake", "context_length": 256}


def held(cache: PrefixCache, save: KVSave, nbytes: int = 100) -> None:
    cache.apply(KVCacheReport(events=[TierEvent(save.key, "ram", True, nbytes)]))


# -- the index ------------------------------------------------------------------------------------------------


def test_lookup_finds_the_longest_prefix_to_the_token_and_caps_it() -> None:
    cache = PrefixCache(("ram",))
    a = list(range(100))
    b = list(range(50)) + [999] * 50
    held(cache, cache.save(a, exact_tokens=80))
    held(cache, cache.save(b, exact_tokens=80))
    prompt = list(range(70)) + [5] * 10
    hit = cache.lookup(prompt, max_tokens=len(prompt) - 1)
    assert hit is not None and hit.key == entry_key(a) and hit.num_tokens == 70 and hit.tier == "ram"
    assert cache.lookup(prompt, max_tokens=40).num_tokens == 40  # type: ignore[union-attr]
    assert cache.lookup([7] * 100, 99) is None
    assert cache.lookup(list(range(BLOCK_TOKENS - 1)), 100) is None  # less than a block: never worth a restore


def test_deterministic_lookup_keeps_whole_chunks_of_prompt_only() -> None:
    cache = PrefixCache(("ram",), block_multiple=32)
    a = list(range(120))
    held(cache, cache.save(a, exact_tokens=70))  # 70 prompt tokens, then 50 decoded ones
    hit = cache.lookup(a + [1], 120)
    assert hit is not None and hit.num_tokens == 64  # min(120, 70) cut to a multiple of 32


def test_a_longer_save_replaces_the_entries_it_contains_and_holds_says_so() -> None:
    cache = PrefixCache(("ram",))
    turn1 = list(range(60))
    held(cache, cache.save(turn1, 60))
    assert cache.holds(turn1) and cache.holds(turn1[:40]) and not cache.holds(turn1 + [1])
    turn2 = turn1 + list(range(500, 540))
    save = cache.save(turn2, 100)
    assert save.replaces == (entry_key(turn1),)
    assert list(cache.entries) == [entry_key(turn2)] and cache.holds(turn1)


def test_events_move_entries_between_tiers_and_count_evictions() -> None:
    cache = PrefixCache(("ram", "disk"))
    a = list(range(64))
    save = cache.save(a, 64)
    key = save.key
    cache.apply(KVCacheReport(events=[TierEvent(key, "ram", True, 1000), TierEvent(key, "disk", True, 1100)]))
    assert cache.entries[key].tier_bytes == {"ram": 1000, "disk": 1100}
    cache.apply(KVCacheReport(events=[TierEvent(key, "ram", False, reason="evicted")]))
    hit = cache.lookup(a + [1], 64)
    assert hit is not None and hit.tier == "disk"
    cache.apply(KVCacheReport(events=[TierEvent(key, "disk", False, reason="evicted")]))
    assert cache.entries == {} and cache.lookup(a + [1], 64) is None
    # a file another process left: its tokens come with the event
    found = tuple(range(300, 340))
    cache.apply(KVCacheReport(events=[TierEvent("k", "disk", True, 5, token_ids=found, exact_tokens=40)]))
    assert cache.lookup([*found, 1], 40).key == "k"  # type: ignore[union-attr]
    stats = cache.stats()
    assert stats.evictions == {"ram": 1, "disk": 1} and stats.held_bytes == {"ram": 0, "disk": 5}


def test_tiers_are_counted_in_order_each_for_what_the_faster_missed() -> None:
    cache = PrefixCache(("ram", "disk"))
    cache.record_admission(100, "ram", 80)
    cache.record_admission(100, "slot", 30)
    cache.record_admission(100, None, 0)
    stats = cache.stats()
    assert stats.hit_tokens == {"slot": 30, "ram": 80, "disk": 0}
    assert stats.miss_tokens == {"slot": 270, "ram": 190, "disk": 190}
    assert stats.restores == {"ram": 1, "disk": 0}


# -- the tiers, on the fake's sequences ---------------------------------------------------------------------


def tiers(tmp_path: Path | None = None, ram_bytes: int = 1000, identity: dict[str, str | int] = IDENTITY,
          disk_bytes: int = 10_000) -> tuple[KVTiers, dict[int, list[int]]]:
    kv: dict[int, list[int]] = {0: [], 1: []}
    settings = TierSettings(ram_bytes, str(tmp_path) if tmp_path else None, disk_bytes)
    return KVTiers(_FakeSequences(kv), settings, identity), kv


def save_op(seq_id: int, tokens: list[int], keep: int = 0) -> CacheOp:
    return CacheOp(seq_id, keep=keep, save=KVSave(entry_key(tokens), tuple(tokens), len(tokens)))


def test_ram_is_bounded_least_recently_used_first_and_restores_trim() -> None:
    store, kv = tiers(ram_bytes=1000)  # a 100-token state is 400 bytes here: two fit
    entries = [list(range(i * 1000, i * 1000 + 100)) for i in range(3)]
    for tokens in entries[:2]:
        kv[0][:] = tokens
        assert store.apply([save_op(0, tokens)]) == set()
    assert store.apply([CacheOp(1, keep=60, restore_key=entry_key(entries[0]))]) == set()  # touches entry 0
    assert kv[1] == entries[0][:60]
    kv[0][:] = entries[2]
    store.apply([save_op(0, entries[2])])
    assert set(store.ram) == {entry_key(entries[0]), entry_key(entries[2])} and store.ram_bytes == 800
    report = store.take_report()
    assert report is not None
    assert TierEvent(entry_key(entries[1]), "ram", False, reason="evicted") in report.events
    assert report.restored_tokens == {"ram": 60}
    # a key it does not hold: the sequence is left empty and the failure reported
    kv[1][:] = [1, 2, 3]
    assert store.apply([CacheOp(1, keep=50, restore_key="unknown")]) == {1}
    assert kv[1] == [] and store.take_report().failed_restores == [1]  # type: ignore[union-attr]


def test_disk_entries_survive_a_new_process_and_other_identities_are_refused(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    store, kv = tiers(tmp_path)
    tokens = list(range(100, 180))
    kv[0][:] = tokens
    store.apply([save_op(0, tokens)])
    store.close()  # waits for the writer
    files = list(tmp_path.glob("*.qkv"))
    assert len(files) == 1

    again, kv2 = tiers(tmp_path, ram_bytes=0)
    report = again.take_report()
    assert report is not None
    assert [(e.key, e.tier, e.held, e.token_ids) for e in report.events] == [
        (entry_key(tokens), "disk", True, tuple(tokens))]
    assert again.apply([CacheOp(1, keep=79, restore_key=entry_key(tokens))]) == set()
    assert kv2[1] == tokens[:79]
    again.close()

    with caplog.at_level(logging.WARNING, logger="qanat.executor"):
        other, _ = tiers(tmp_path, identity={**IDENTITY, "model": "another"})
    assert other.take_report() is None and "written by another model" in caplog.text
    other.close()

    # a file whose bytes changed under the same name: refused at restore, the request computes instead
    raw = bytearray(files[0].read_bytes())
    raw[-1] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    third, kv3 = tiers(tmp_path)
    assert third.apply([CacheOp(0, keep=10, restore_key=entry_key(tokens))]) == {0}
    assert kv3[0] == []
    third.close()


def test_disk_tier_is_bounded_and_a_header_names_model_and_setting(tmp_path: Path) -> None:
    store, kv = tiers(tmp_path, ram_bytes=0, disk_bytes=4000)  # a 200-token file is 1.8 kB here: two fit
    for i in range(4):
        tokens = list(range(i * 1000, i * 1000 + 200))
        kv[0][:] = tokens
        store.apply([save_op(0, tokens)])
    store.close()
    files = list(tmp_path.glob("*.qkv"))
    assert len(files) == 2 and sum(f.stat().st_size for f in files) <= 4000
    assert {f.name for f in files} == {store.disk.path_for(entry_key(list(range(i * 1000, i * 1000 + 200)))).name
                                       for i in (2, 3)}  # type: ignore[union-attr]
    raw = files[0].read_bytes()
    length = int.from_bytes(raw[8:12], "little")
    assert json.loads(raw[12:12 + length])["identity"] == {"format": 1, **IDENTITY}


def test_an_unwritable_directory_means_no_disk_tier_and_a_warning(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="qanat.executor"):
        store, kv = tiers(blocker / "kv")
    assert "not writable" in caplog.text
    tokens = list(range(50))
    kv[0][:] = tokens
    store.apply([save_op(0, tokens)])  # RAM still works
    assert entry_key(tokens) in store.ram
    store.close()


def test_a_routers_replicas_caches_add_up() -> None:
    from qanat.engine.client import merge_prompt_cache_stats

    a, b = PrefixCache(("ram",)), PrefixCache(("ram", "disk"))
    a.record_admission(10, "ram", 9)
    b.record_admission(20, "disk", 16)
    merged = merge_prompt_cache_stats([a.stats(), None, b.stats()])
    assert merged is not None and merged.tiers == ("slot", "ram", "disk")
    assert merged.hit_tokens == {"slot": 0, "ram": 9, "disk": 16}
    assert merged.miss_tokens == {"slot": 30, "ram": 21, "disk": 4}
    assert merge_prompt_cache_stats([None]) is None


def test_a_burst_of_saves_beyond_the_writers_backlog_still_reaches_the_disk(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import qanat.engine.executors.kv_tiers as kv_tiers

    monkeypatch.setattr(kv_tiers, "MAX_PENDING_WRITE_BYTES", 500)  # about one 100-token state waiting at a time
    store, kv = tiers(tmp_path, ram_bytes=0, disk_bytes=1 << 20)
    for i in range(10):  # the free slots saved at shutdown all at once
        tokens = list(range(i * 1000, i * 1000 + 100))
        kv[0][:] = tokens
        store.apply([save_op(0, tokens)])
    store.close()
    assert len(list(tmp_path.glob("*.qkv"))) == 10
