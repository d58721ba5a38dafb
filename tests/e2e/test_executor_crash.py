"""SIGKILL the llama.cpp executor process under 8 streamed requests: the server stays up and serves again."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx

from tests.e2e.conftest import MODEL
from tests.e2e.server import ServerProcess

STREAM = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story about water."}],
          "max_tokens": 300, "ignore_eos": True, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}}


def read_stream(url: str, outcome: list[str]) -> None:
    """Records how the stream ended: "complete", "error:<code>", or what went wrong."""
    try:
        with httpx.stream("POST", url, json=STREAM, timeout=60) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        if events[-1] != "[DONE]":
            outcome.append("cut without [DONE]")
        elif "error" in (last := json.loads(events[-2])):
            outcome.append(f"error:{last['error']['code']}")
        elif last["usage"]["completion_tokens"] == 300:
            outcome.append("complete")
        else:
            outcome.append(f"short: {last['usage']}")
    except Exception as e:
        outcome.append(f"{type(e).__name__}: {e}")


def test_sigkill_of_the_executor_mid_stream() -> None:
    srv = ServerProcess("--ctx", "1024", "--parallel", "8")
    try:
        url = f"{srv.base_url}/v1/chat/completions"
        ready = httpx.get(f"{srv.base_url}/ready").json()
        pid = ready["executor_pid"]
        assert pid and pid != srv.proc.pid
        outcomes: list[list[str]] = [[] for _ in range(8)]
        threads = [threading.Thread(target=read_stream, args=(url, o)) for o in outcomes]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while srv.metric("qanat_num_requests_running") < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # every stream has tokens out
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()

        statuses = set()
        while time.monotonic() - killed_at < 30:
            status = httpx.get(f"{srv.base_url}/ready").status_code
            statuses.add(status)
            if status == 200 and 503 in statuses:
                break
            time.sleep(0.02)
        assert statuses == {503, 200}, statuses  # not ready while a new executor starts, then ready again

        r = httpx.post(url, json={**STREAM, "stream": False, "max_tokens": 8}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        assert r.json()["usage"]["energy_joules"] > 0  # the new executor's meter feeds the same books
        assert time.monotonic() - killed_at < 30
        for t in threads:
            t.join(timeout=60)
        assert all(len(o) == 1 for o in outcomes)  # none hangs
        assert all(o[0] in ("complete", "error:engine_unavailable") for o in outcomes), outcomes
        assert any(o[0] == "error:engine_unavailable" for o in outcomes)
        new_pid = httpx.get(f"{srv.base_url}/ready").json()["executor_pid"]
        assert new_pid != pid and srv.metric("qanat_executor_restarts_total") == 1
        assert srv.proc.poll() is None
    finally:
        srv.stop()

