"""The prompt cache beyond the slots with the real model: a prefix restored from RAM, from disk, from a file another
server process wrote, gives what the slot it came from would have given; a file from another build or setting is
refused; deterministic mode restores bit for bit."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from qanat.build import build_llamacpp_engine
from qanat.config import EngineConfig
from qanat.engine.local import LocalEngine as Engine
from qanat.engine.sampling import SamplingParams
from tests.e2e.server import ServerProcess
from tests.e2e.test_engine import assert_same_continuation, numbers
from tests.helpers import chat_ids, collect, run, tokenize, tokens_of

SYSTEM = ("You are a careful assistant for farmers in the oases of southern Morocco. You explain how the khettara "
          "carries water from the mountains, how shares of water are counted in hours, and how the council settles "
          "disputes between families. Answer in plain English, briefly.")
GREEDY = SamplingParams(temperature=0, max_tokens=32, logprobs=5)


@pytest.fixture(scope="module")
def two_slots() -> Iterator[Engine]:
    eng = build_llamacpp_engine(EngineConfig(ctx=1024, parallel=2, threads=2, flash_attn="off", cache_ram_mib=256))
    yield eng
    eng.shutdown()


def overwrite_slots(engine: Engine, n: int, tag: str) -> None:
    fillers = [chat_ids(engine, f"Count from {i} to {i + 40}, {tag}.") for i in range(n)]

    async def fill() -> None:
        await asyncio.gather(*(collect(engine, f, SamplingParams(temperature=0, max_tokens=8)) for f in fillers))

    run(fill())


def test_a_prefix_restored_from_ram_gives_what_its_slot_gave(two_slots: Engine) -> None:
    question = chat_ids(two_slots, "How are water shares counted?", SYSTEM)
    cold = run(collect(two_slots, question, GREEDY))
    assert cold[-1].num_cached_tokens == 0
    in_slot = run(collect(two_slots, question, GREEDY))  # the slot still holds it
    assert in_slot[-1].num_cached_tokens == len(question) - 1

    overwrite_slots(two_slots, 2, "ram test")  # both slots taken: the question's KV is saved to RAM first
    restored = run(collect(two_slots, question, GREEDY))
    stats = two_slots.stats().prompt_cache
    assert stats is not None and stats.restores["ram"] >= 1 and stats.hit_tokens["ram"] >= len(question) - 1
    assert restored[-1].num_cached_tokens == len(question) - 1
    # The same bytes of KV, the same last token computed alone: bit for bit what the slot gave.
    assert numbers(restored) == numbers(in_slot)
    assert_same_continuation(restored, cold)

    # The next turn of the conversation: history + the answer + a new question hits the saved answer too.
    answer = tokens_of(restored)
    next_turn = question + answer + tokenize(two_slots, "<|im_end|>\n<|im_start|>user\nAnd in summer?<|im_end|>\n"
                                                        "<|im_start|>assistant\n")[1:]
    overwrite_slots(two_slots, 2, "next turn")
    follow = run(collect(two_slots, next_turn, GREEDY))
    assert follow[-1].num_cached_tokens >= len(question) + len(answer) - 1


def test_deterministic_mode_restores_whole_chunks_bit_for_bit() -> None:
    eng = build_llamacpp_engine(EngineConfig(ctx=1024, parallel=2, threads=2, batch_tokens=32, deterministic=True,
                                             cache_ram_mib=256))
    try:
        prompt = chat_ids(eng, "How are water shares counted?", SYSTEM)
        assert len(prompt) > 64
        params = SamplingParams(temperature=0, max_tokens=24, logprobs=0)
        cold = run(collect(eng, prompt, params))
        overwrite_slots(eng, 2, "deterministic")
        restored = run(collect(eng, prompt, params))
        assert restored[-1].num_cached_tokens == (len(prompt) - 1) // 32 * 32 > 0  # whole chunks of --batch only
        assert numbers(restored) == numbers(cold)
    finally:
        eng.shutdown()


def chat(server: ServerProcess, messages: list[dict[str, str]]) -> tuple[list[int], int, list[float]]:
    """Greedy completion through HTTP: (token ids, cached prompt tokens, log-probabilities)."""
    body = {"model": "SmolLM2-135M-Instruct", "messages": messages, "max_tokens": 24, "temperature": 0,
            "logprobs": True, "return_token_ids": True}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    choice = data["choices"][0]
    logprobs = [t["logprob"] for t in choice["logprobs"]["content"]]
    ids = choice.get("token_ids") or []
    return ids, data["usage"]["prompt_tokens_details"]["cached_tokens"], logprobs


def fill_over_http(server: ServerProcess, tag: str) -> None:
    async def one(i: int) -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Count from {i} to {i + 40}, {tag}."}]}
            assert (await c.post(f"{server.base_url}/v1/chat/completions", json=body)).status_code == 200

    async def all_of_them() -> None:
        await asyncio.gather(*(one(i) for i in range(2)))

    asyncio.run(all_of_them())


def tamper(path: Path, key: str, value: str) -> None:
    """Rewrite a cache file's header as another build would have written it."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<I", raw[8:12])
    header = json.loads(raw[12:12 + length])
    header["identity"][key] = value
    head = json.dumps(header, sort_keys=True).encode()
    n_tokens = header["n_tokens"]
    tokens = raw[12 + length:12 + length + 4 * n_tokens]
    old_offset = 12 + length + 4 * n_tokens  # the state starts at the next 64-byte boundary
    state = raw[old_offset + (-old_offset % 64):]
    new_offset = 12 + len(head) + 4 * n_tokens
    path.write_bytes(raw[:8] + struct.pack("<I", len(head)) + head + tokens + b"\0" * (-new_offset % 64) + state)


def test_disk_tier_survives_a_restart_and_refuses_other_builds(tmp_path: Path) -> None:
    cache = tmp_path / "kv"
    args = ("--ctx", "1024", "--parallel", "2", "--flash-attn", "off", "--cache-dir", str(cache))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who settles disputes?"}]
    first = ServerProcess(*args)
    try:
        cold_ids, cached, cold_logprobs = chat(first, messages)
        assert cached == 0
        fill_over_http(first, "disk test")  # saved to RAM, written behind to disk
        warm_ids, cached_ram, warm_logprobs = chat(first, messages)
        assert cached_ram > 0
        # The hit computes the prompt's tail alone, in the last bits differently (ggml's AMX kernels take another
        # kernel for one row): greedy may part at a near-tie, but the first pick's log-probability stays within
        # a tolerance that wrong KV (another sequence's cells, shifted positions) would exceed by whole nats.
        assert abs(warm_logprobs[0] - cold_logprobs[0]) < 0.25
    finally:
        first.terminate()
        first.proc.wait(timeout=60)
        first.stop()
    files = list(cache.glob("*.qkv"))
    assert files

    second = ServerProcess(*args)  # another process: the files are all it has
    try:
        ids, cached_disk, logprobs = chat(second, messages)
        assert cached_disk == cached_ram
        assert ids == warm_ids and logprobs == warm_logprobs  # the same KV bytes: bit for bit
        metrics = httpx.get(f"{second.base_url}/metrics").text
        assert 'qanat_prompt_cache_restores_total{tier="disk"} 1.0' in metrics
    finally:
        second.stop()

    for path in cache.glob("*.qkv"):
        tamper(path, "llama_cpp", "0.0.1")  # as if another llama.cpp build had written them
    refusing = ServerProcess(*args)
    try:
        ids, cached, _ = chat(refusing, messages)
        assert cached == 0  # refused, never loaded: computed from scratch, as the first server did
        assert ids == cold_ids
    finally:
        log = refusing.stop()
    assert "written by another model, llama.cpp build or context setting" in log

    other_setting = ServerProcess("--ctx", "512", *args[2:])  # a different context: a different KV layout
    try:
        _, cached, _ = chat(other_setting, messages)
        assert cached == 0
    finally:
        other_setting.stop()


def test_an_unwritable_cache_dir_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    server = ServerProcess("--ctx", "512", "--parallel", "2", "--cache-dir", str(blocker / "kv"))
    try:
        _, cached, _ = chat(server, [{"role": "user", "content": "Say hi."}])
        assert cached == 0
    finally:
        log = server.stop()
    assert "not writable" in log
