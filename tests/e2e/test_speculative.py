"""`qanat serve --speculative ngram` against `--speculative off`, real model: the same greedy output (and the
same seeded samples), with stop strings, a JSON-schema grammar, penalties and logprobs, while drafts are
verified and kept. Prompt plus output stay under 256 tokens: there ggml's flash attention computes a pass of
several tokens exactly as one-token decodes (past 512 KV cells a lone decode takes a split-KV loop instead,
and greedy outputs may then part at near-ties, as they do between batched and lone decodes)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import ServerProcess

TEXT = ("Teh qanat carries watter from the mountins to the vilage. Evry family has a share of the flow, and "
        "the water master keeps the count of evry share.")
CODE = "def area(w, h):\n    result = w * h\n    return result\n"
PROMPTS = [
    f"Correct the spelling of this text and write it out again:\n{TEXT}",
    f"Repeat this text exactly:\n{TEXT}",
    f"Rename the variable result to total in this function and write the whole function:\n{CODE}",
    "Write the numbers from one to twenty in words, separated by commas.",
    "Tell me a short story about a fox.",
    "What is the capital of France?",
    "List three colours.",
    "Explain what a qanat is in two sentences.",
]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}},
          "required": ["name", "age", "city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[openai.OpenAI, openai.OpenAI, ServerProcess]]:
    off = ServerProcess("--ctx", "512", "--parallel", "2")
    on = ServerProcess("--ctx", "512", "--parallel", "2", "--speculative", "ngram")
    try:
        yield (openai.OpenAI(base_url=f"{off.base_url}/v1", api_key="x", max_retries=0, timeout=120),
               openai.OpenAI(base_url=f"{on.base_url}/v1", api_key="x", max_retries=0, timeout=120), on)
    finally:
        off.stop()
        on.stop()


def chat(client: openai.OpenAI, prompt: str, **kwargs: Any) -> tuple[str | None, str | None, int]:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], **kwargs)
    assert r.usage is not None
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens


def test_greedy_output_is_the_same_with_and_without_speculation(
        pair: tuple[openai.OpenAI, openai.OpenAI, ServerProcess]) -> None:
    off, on, server = pair
    for prompt in PROMPTS:
        assert chat(on, prompt, max_tokens=120, temperature=0) == chat(off, prompt, max_tokens=120, temperature=0)
    drafted = server.metric("qanat_spec_decode_num_draft_tokens_total")
    accepted = server.metric("qanat_spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and accepted > 0.5 * drafted  # the rewriting prompts repeat their input
    assert server.metric("qanat_spec_decode_draft_acceptance_rate") == pytest.approx(accepted / drafted)


def test_stop_strings_grammar_penalties_seeds_and_logprobs_keep_their_meaning(
        pair: tuple[openai.OpenAI, openai.OpenAI, ServerProcess]) -> None:
    off, on, _ = pair
    full, _, _ = chat(off, PROMPTS[1], max_tokens=80, temperature=0)
    assert full
    stop = full.split()[6]
    cases: list[tuple[str, dict[str, Any]]] = [
        (PROMPTS[1], {"stop": [stop]}),
        (PROMPTS[0], {"max_tokens": 17}),
        (PROMPTS[2], {"frequency_penalty": 0.5, "presence_penalty": 0.3}),
        (PROMPTS[1], {"temperature": 0.7, "seed": 11}),
        (PROMPTS[0], {"temperature": 1.0, "top_p": 0.9, "seed": 5}),
        (f"Give name, age and city of this person as JSON: {TEXT} Her name is Ana, she is 31 and lives in Yazd.",
         {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}),
    ]
    for prompt, extra in cases:
        kwargs = {"max_tokens": 80, "temperature": 0, **extra}
        got, want = chat(on, prompt, **kwargs), chat(off, prompt, **kwargs)
        assert got == want, extra
    assert json.loads(got[0] or "")["name"]  # the schema case came last

    def logprobs(client: openai.OpenAI) -> list[tuple[str, float]]:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[1]}],
                                           max_tokens=40, temperature=0, logprobs=True, top_logprobs=2)
        assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content is not None
        return [(t.token, t.logprob) for t in r.choices[0].logprobs.content]

    assert logprobs(on) == logprobs(off)


def test_a_request_opts_out_with_an_extra_field(pair: tuple[openai.OpenAI, openai.OpenAI, ServerProcess]) -> None:
    _, on, server = pair
    before = server.metric("qanat_spec_decode_num_draft_tokens_total")
    out = chat(on, PROMPTS[1], max_tokens=60, temperature=0, extra_body={"speculative": False})
    assert out[0] and server.metric("qanat_spec_decode_num_draft_tokens_total") == before
    chat(on, PROMPTS[1], max_tokens=60, temperature=0)
    assert server.metric("qanat_spec_decode_num_draft_tokens_total") > before
