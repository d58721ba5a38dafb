"""The serving app in-process, through an ASGI client, on the fake engine: the pipeline's steps for both
endpoints, errors in OpenAI's shape, auth on every route but the probes, and a stream cut after its headers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from qanat.build import build_app, build_fake_engine
from qanat.config import EngineConfig, ServerConfig
from qanat.engine.executors.fake import FakeSpec
from qanat.engine.local import LocalEngine

MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def engine() -> Iterator[LocalEngine]:
    eng = build_fake_engine(EngineConfig(ctx=256, parallel=4, batch_tokens=64))
    yield eng
    eng.shutdown()


def call(engine: LocalEngine, method: str, path: str, config: ServerConfig | None = None,
         **kwargs: Any) -> httpx.Response:
    app = build_app(engine, config or ServerConfig())

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://qanat") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def events(response: httpx.Response) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", response.text
    return [json.loads(line) for line in lines[:-1]]


def test_chat_stream_equals_non_stream(engine: LocalEngine) -> None:
    whole = call(engine, "POST", "/v1/chat/completions", json=CHAT).json()
    chunks = events(call(engine, "POST", "/v1/chat/completions",
                         json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"] and len(text) == 6
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == whole["usage"]["completion_tokens"] == 6
    assert usage["energy_source"] == "estimated:fake" and usage["energy_joules"] > 0
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["object"] == "chat.completion.chunk"


def test_completions_many_prompts_n_and_logprobs(engine: LocalEngine) -> None:
    body = {"model": MODEL, "prompt": ["one", "two"], "n": 2, "max_tokens": 4, "seed": 5, "temperature": 1.0,
            "logprobs": 2}
    reply = call(engine, "POST", "/v1/completions", json=body).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert reply["usage"]["completion_tokens"] == 16 and reply["object"] == "text_completion"
    for choice in reply["choices"]:
        assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
        assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"])
    ids = call(engine, "POST", "/v1/completions", json={"model": MODEL, "prompt": [40, 41, 42], "max_tokens": 2})
    assert ids.status_code == 200 and ids.json()["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "temperature": 5}, 400, "temperature"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "w" * 400}]}, 400, "messages"),
        ("/v1/completions", {"model": MODEL, "prompt": "w" * 400}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "w", "echo": True}, 400, "echo"),
        ("/v1/completions", {"model": MODEL, "prompt": "w", "continue_token_ids": [5]}, 400, "continue_token_ids"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-9"}, 404, "model"),
    ],
)
def test_errors_name_the_parameter(engine: LocalEngine, path: str, body: dict[str, Any], status: int,
                                   param: str) -> None:
    r = call(engine, "POST", path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


def test_one_auth_dependency_on_every_route_but_the_probes(engine: LocalEngine) -> None:
    keyed = ServerConfig(api_keys=("k1",))
    for path in ("/v1/models", "/metrics", "/openapi.json", "/docs"):
        assert call(engine, "GET", path, keyed).status_code == 401
        assert call(engine, "GET", path, keyed, headers={"Authorization": "Bearer k1"}).status_code == 200
    assert call(engine, "POST", "/v1/chat/completions", keyed, json=CHAT).json()["error"]["code"] == "invalid_api_key"
    assert call(engine, "GET", "/health", keyed).status_code == 200
    ready = call(engine, "GET", "/ready", keyed)
    assert ready.status_code == 200 and ready.json()["models"] == [MODEL]


def test_models_card_and_metrics(engine: LocalEngine) -> None:
    card = call(engine, "GET", "/v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["context_length"] == 256 and card["chip"] == "fake"
    call(engine, "POST", "/v1/chat/completions", json=CHAT)
    metrics = call(engine, "GET", "/metrics").text
    assert "qanat_executor_restarts_total" in metrics and "qanat_engine_steps_total" in metrics


def test_stream_cut_by_executor_death_ends_with_an_error_event() -> None:
    engine = build_fake_engine(EngineConfig(ctx=256, parallel=2, batch_tokens=64),
                               FakeSpec(num_slots=2, step_delay_s=0.01), in_process=False)
    app = build_app(engine, ServerConfig())
    pid = engine.health().executor_pid
    assert pid is not None

    async def scenario() -> tuple[list[str], int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://qanat", timeout=30) as client:
            async def killer() -> None:
                while engine.stats().steps < 10:
                    await asyncio.sleep(0.01)
                os.kill(pid, signal.SIGKILL)

            kill = asyncio.create_task(killer())
            body = {**CHAT, "stream": True, "max_tokens": 200}
            r = await client.post("/v1/chat/completions", json=body)
            await kill
            after = await client.post("/v1/chat/completions", json=CHAT)
            return [line for line in r.text.split("\n\n") if line], after.status_code

    try:
        stream, status_after = asyncio.run(scenario())
        assert stream[-1] == "data: [DONE]"
        error = json.loads(stream[-2].removeprefix("data: "))["error"]
        assert error["code"] == "engine_unavailable" and "died" in error["message"]
        assert any('"content": "' in line for line in stream[1:-2])  # tokens were streamed before the cut
        assert status_after == 200  # the engine restarted its executor and serves again
    finally:
        engine.shutdown()
