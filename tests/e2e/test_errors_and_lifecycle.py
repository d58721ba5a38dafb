"""Error statuses in OpenAI's shape, auth, disconnects, backpressure, SIGTERM draining, and a schemathesis run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import ServerProcess

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
        "ignore_eos": True, "temperature": 0}


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:  # type: ignore[type-arg]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "temperature": 5}, "temperature"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": 5000}, "max_tokens"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({**CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({**CHAT, "logit_bias": {"99999999": 1}}, "logit_bias"),
        ({**CHAT, "ignore_eos": True, "response_format": {"type": "json_object"}}, "ignore_eos"),
        ({"messages": CHAT["messages"]}, "model"),
        ({**CHAT, "messages": [{"role": "user", "content": "water " * 3000}]}, "messages"),
    ],
)
def test_invalid_requests_get_400_naming_the_parameter(server: ServerProcess, body: dict, param: str) -> None:  # type: ignore[type-arg]
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    error = assert_openai_error(r, 400, param)
    assert error["type"] == "invalid_request_error"


def test_too_long_prompt_error_names_the_numbers(server: ServerProcess) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "water " * 3000}]}
    message = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60).json()["error"]["message"]
    assert "1024" in message and "tokens" in message


def test_malformed_json_unknown_model_route_and_big_body(server: ServerProcess) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    assert_openai_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_openai_error(httpx.post(url, json={**CHAT, "model": "gpt-9"}), 404, "model")
    assert_openai_error(httpx.get(f"{server.base_url}/v1/nothing-here"), 404)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    assert_openai_error(httpx.post(url, json=big, timeout=60), 413)
    assert httpx.post(url, json=CHAT, timeout=60).status_code == 200  # and the server is still fine


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], top_p=7)


@pytest.fixture()
def keyed_server() -> Iterator[ServerProcess]:
    srv = ServerProcess("--ctx", "256", "--parallel", "2", "--api-key", "k-one", env={"QANAT_API_KEYS": "k-two,k-3"})
    yield srv
    srv.stop()


def test_api_keys(keyed_server: ServerProcess) -> None:
    url = f"{keyed_server.base_url}/v1/chat/completions"
    assert_openai_error(httpx.post(url, json=CHAT), 401)
    assert_openai_error(httpx.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}), 401)
    for key in ("k-one", "k-two", "k-3"):
        assert httpx.post(url, json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200
    assert httpx.get(f"{keyed_server.base_url}/health").status_code == 200  # stays open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key="nope", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key="k-two", max_retries=0)
    assert ok.models.list().data[0].id == MODEL


@pytest.fixture()
def one_slot_server() -> Iterator[ServerProcess]:
    srv = ServerProcess("--ctx", "512", "--parallel", "1", "--max-waiting", "1")
    yield srv
    srv.stop()


def test_disconnect_mid_stream_frees_the_slot_and_queue_full_is_429(one_slot_server: ServerProcess) -> None:
    url = f"{one_slot_server.base_url}/v1/chat/completions"
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json={**LONG, "stream": True}) as stream:
        lines = stream.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert one_slot_server.metric("qanat_num_requests_running") == 1
        # One request runs and one may wait: a third is refused with 429 and Retry-After.
        waiting = threading.Thread(target=lambda: httpx.post(url, json=CHAT, timeout=60))
        waiting.start()
        time.sleep(0.5)
        r = httpx.post(url, json=CHAT, timeout=60)
        assert_openai_error(r, 429)
        assert r.headers["retry-after"] == "1"
    # The client is gone: the slot frees at once, the queued request runs, nothing is left running.
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    deadline = time.monotonic() + 10
    while one_slot_server.metric("qanat_num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert one_slot_server.metric("qanat_num_requests_running") == 0
    start = time.monotonic()
    assert httpx.post(url, json=CHAT, timeout=60).status_code == 200
    assert time.monotonic() - start < 10  # not stuck behind the abandoned 400-token story


def test_disconnect_while_queued_cancels(one_slot_server: ServerProcess) -> None:
    url = f"{one_slot_server.base_url}/v1/chat/completions"
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json={**LONG, "stream": True}) as stream:
        next(stream.iter_lines())
        with pytest.raises(httpx.ReadTimeout):  # queued behind the stream; the client gives up
            httpx.post(url, json=LONG, timeout=1.0)
        time.sleep(0.5)
        assert one_slot_server.metric("qanat_num_requests_waiting") == 0


def test_sigterm_drains_in_flight_requests() -> None:
    srv = ServerProcess("--ctx", "512", "--parallel", "2", "--drain-timeout", "60")
    try:
        url = f"{srv.base_url}/v1/chat/completions"
        result: dict[str, httpx.Response] = {}
        body = {**LONG, "max_tokens": 450}  # several seconds of work, still running when SIGTERM lands
        worker = threading.Thread(target=lambda: result.update(r=httpx.post(url, json=body, timeout=120)))
        worker.start()
        time.sleep(1.0)
        srv.terminate()
        time.sleep(0.2)
        assert_openai_error(httpx.get(f"{srv.base_url}/ready"), 503)
        assert_openai_error(httpx.post(url, json=CHAT), 503)
        worker.join(timeout=120)
        response = result["r"]
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 450
        assert srv.proc.wait(timeout=30) == 0
    finally:
        srv.stop()
