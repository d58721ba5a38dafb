"""The OpenAI API through the official `openai` client, against a real server and the real model."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai

from tests.e2e.conftest import MODEL
from tests.e2e.server import ServerProcess

QUESTION = [{"role": "user", "content": "What is the capital of Morocco?"}]


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["context_length"] == 1024


def test_chat_non_stream_and_stream_agree_with_usage(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in {"stop", "length"}
    assert full.usage.completion_tokens <= 24 and full.usage.prompt_tokens > 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_completions_stream_and_non_stream(client: openai.OpenAI) -> None:
    prompt = "The three largest cities of Morocco are"
    full = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 20
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text


def test_max_completion_tokens_and_stop(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_completion_tokens=3)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    whole = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12)
    assert " 6" in whole.choices[0].text
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12,
                                    stop=[" 6", "zzz"])
    assert cut.choices[0].text == whole.choices[0].text.split(" 6")[0]
    assert cut.choices[0].finish_reason == "stop"
    by_id = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12,
                                      extra_body={"stop_token_ids": [28]})  # 28 is "," in SmolLM2's vocabulary
    assert by_id.choices[0].finish_reason == "stop" and by_id.usage.completion_tokens < 12
    assert by_id.choices[0].text == whole.choices[0].text.split(",")[0]  # the stop token itself is not emitted


def test_n_choices_share_the_prompt(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, temperature=1.0, seed=3, max_tokens=16)
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.message.content for c in out.choices)
    assert out.choices[0].message.content != out.choices[1].message.content  # seed, seed + 1
    single = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16)
    assert out.usage.prompt_tokens == single.usage.prompt_tokens  # counted once, as OpenAI does
    assert out.usage.prompt_tokens_details.cached_tokens > 0


def test_seed_reproducibility() -> None:
    # Bit for bit in --deterministic: by default the repeat is a prefix-cache hit whose last prompt token is
    # computed alone, in the last bits differently, which can move a draw now and then (as in llama-server).
    server = ServerProcess("--ctx", "512", "--parallel", "2", "--deterministic")
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

        def sample(seed: int) -> str:
            out = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=1.0, seed=seed,
                                                 max_tokens=24)
            return out.choices[0].message.content

        assert sample(11) == sample(11)
        assert sample(11) != sample(12)
    finally:
        server.stop()


def test_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=5,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the most likely token
    comp = client.completions.create(model=MODEL, prompt="Rabat is the capital of", temperature=0, max_tokens=4,
                                     logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == comp.choices[0].text


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population_millions": {"type": "number"}},
        "required": ["city", "population_millions"],
        "additionalProperties": False,
    }
    out = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": "Give the largest city of Morocco and its population as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    data = json.loads(out.choices[0].message.content)
    jsonschema.validate(data, schema)
    person = [{"role": "user", "content": 'Reply with a JSON object with keys "name" and "age" for one person.'}]
    free = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=200, messages=person,
                                          response_format={"type": "json_object"})
    assert free.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(free.choices[0].message.content), dict)


def test_text_parts_and_system_messages(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "What color is the sky?"}]},
    ])
    assert out.choices[0].message.content


def test_64_concurrent_streams_complete_with_correct_text(client: openai.OpenAI) -> None:
    def count_from(k: int) -> str:
        stream = client.completions.create(model=MODEL, prompt=f"{k}, {k + 1}, {k + 2}, {k + 3},", temperature=0,
                                           max_tokens=12, stream=True)
        return "".join(c.choices[0].text for c in stream)

    starts = [10 * k + 100 for k in range(64)]
    with ThreadPoolExecutor(64) as pool:
        texts = list(pool.map(count_from, starts))
    for k, text in zip(starts, texts, strict=True):
        assert text.startswith(f" {k + 4}, {k + 5}"), (k, text)  # each stream got its own sequence


def test_metrics_and_health(server: ServerProcess, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.base_url}/ready").status_code == 200
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("qanat_requests_total", "qanat_time_to_first_token_seconds_bucket",
                 "qanat_inter_token_latency_seconds", "qanat_e2e_request_latency_seconds",
                 "qanat_request_queue_time_seconds", "qanat_prompt_tokens_total", "qanat_generation_tokens_total",
                 "qanat_num_requests_running", "qanat_num_requests_waiting", "qanat_kv_cache_usage_ratio",
                 "qanat_prefix_cache_hit_tokens_total"):
        assert name in text, name
    assert 'qanat_requests_total{route="/v1/chat/completions",status="200"}' in text


def test_openapi_document_is_served(server: ServerProcess) -> None:
    doc = httpx.get(f"{server.base_url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(doc["paths"])


def test_energy_in_usage_streamed_and_not(server: ServerProcess, client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)
    usage = full.usage.model_extra
    assert usage["energy_joules"] > 0 and usage["co2_grams"] > 0
    # No power counter is readable on these machines: the figure must say it is an estimate.
    assert usage["energy_source"] == "estimated:cpu-time"
    assert usage["co2_grams"] == usage["energy_joules"] / 3.6e6 * 481.0  # the default grid: world average

    chunks = list(client.completions.create(model=MODEL, prompt="Water is", max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    final = chunks[-1].usage.model_extra
    assert final["energy_joules"] > 0 and final["energy_source"] == "estimated:cpu-time"

    assert client.models.list().data[0].model_extra["energy_source"] == "estimated:cpu-time"
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'qanat_energy_joules_total{kind="requests",source="estimated:cpu-time"}' in metrics
    assert 'qanat_tokens_per_joule{source="estimated:cpu-time"}' in metrics
