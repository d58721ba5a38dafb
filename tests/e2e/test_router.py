"""`qanat serve --config` with the real model: two local replicas, and a remote `qanat serve` beside a local one,
through the official openai client; SIGKILL of a replica's executor mid-stream."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import openai

from tests.e2e.conftest import MODEL
from tests.e2e.server import ServerProcess

QUESTION = [{"role": "user", "content": "Explain how a qanat carries water, step by step."}]


def config(tmp_path: Path, replicas: str, policy: str = "round_robin") -> str:
    path = tmp_path / "qanat.yaml"
    path.write_text(f"models:\n  - name: smollm2\n    policy: {policy}\n    replicas:\n{replicas}")
    return str(path)


LOCAL = """\
      - name: {name}
        gguf: default
        parallel: 4
        ctx: 1024
        threads: 1
        deterministic: true
"""


def test_two_local_replicas_round_robin_and_failover_mid_stream(tmp_path: Path) -> None:
    path = config(tmp_path, LOCAL.format(name="local-a") + LOCAL.format(name="local-b"))
    srv = ServerProcess("--config", path)
    try:
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        models = httpx.get(f"{srv.base_url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["smollm2"]
        replicas = {r["name"]: r for r in models[0]["replicas"]}
        assert set(replicas) == {"local-a", "local-b"} and all(r["state"] == "ready" for r in replicas.values())

        served = []
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=QUESTION, max_tokens=8,
                                                                   temperature=0)
            served.append(raw.headers["x-qanat-replica"])
            assert raw.parse().usage.completion_tokens == 8  # type: ignore[union-attr]
        assert sorted(served) == ["local-a", "local-b"]

        # The whole answer, uninterrupted (deterministic replicas, greedy): what the interrupted stream must equal.
        whole = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=120, temperature=0,
                                               extra_body={"ignore_eos": True})
        expected = whole.choices[0].message.content

        stream = client.chat.completions.with_raw_response.create(
            model="smollm2", messages=QUESTION, max_tokens=120, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        first = stream.headers["x-qanat-replica"]
        pid = replicas[first]["executor_pid"]
        assert pid and pid != srv.proc.pid
        pieces: list[str] = []
        usage = None
        for i, chunk in enumerate(stream.parse()):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
            if i == 10:
                os.kill(pid, signal.SIGKILL)  # the replica serving this stream loses its executor
        assert "".join(pieces) == expected  # nothing lost, nothing repeated
        assert usage is not None and usage.completion_tokens == 120
        metrics = httpx.get(f"{srv.base_url}/metrics").text
        assert f'qanat_router_requests_total{{model="smollm2",outcome="failed",replica="{first}"}} 1.0' in metrics
        assert 'outcome="continued"' in metrics
        # The survivor takes the load while the other restarts its executor; both serve again after.
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(client.chat.completions.create(
            model="smollm2", messages=QUESTION, max_tokens=4).usage.completion_tokens)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == [4, 4, 4, 4]
    finally:
        srv.stop()


def test_a_remote_qanat_beside_a_local_replica(tmp_path: Path) -> None:
    upstream = ServerProcess("--ctx", "1024", "--parallel", "4")
    try:
        remote = f"""\
      - name: remote-q
        url: {upstream.base_url}/v1
        model: {MODEL}
"""
        srv = ServerProcess("--config", config(tmp_path, LOCAL.format(name="local-a") + remote))
        try:
            replicas = httpx.get(f"{srv.base_url}/v1/models").json()["data"][0]["replicas"]
            assert {r["name"]: (r["kind"], r["qanat"]) for r in replicas} == {
                "local-a": ("local", True), "remote-q": ("remote", True)}
            client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
            served = {}
            for _ in range(2):
                raw = client.chat.completions.with_raw_response.create(
                    model="smollm2", messages=[{"role": "user", "content": "Say hi."}], max_tokens=6, temperature=0)
                reply = raw.parse()
                served[raw.headers["x-qanat-replica"]] = reply.choices[0].message.content
                assert reply.usage is not None and reply.usage.completion_tokens == 6
            assert set(served) == {"local-a", "remote-q"}
            assert served["local-a"] == served["remote-q"]  # same model, same greedy answer, either way
            # A remote 4xx comes back as the upstream said it.
            bad = httpx.post(f"{srv.base_url}/v1/completions", timeout=60, json={
                "model": "smollm2", "prompt": "hi", "max_tokens": 2, "logit_bias": {"99999999": 1}})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
        finally:
            srv.stop()
    finally:
        upstream.stop()
