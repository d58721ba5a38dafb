"""`qanat serve --speculative ngram` and `--speculative draft` (the embedded model drafting for itself) against
`--speculative off`, real model: the same greedy output (and the same seeded samples), with stop strings, a
JSON-schema grammar, penalties and logprobs, while drafts are verified and kept. With flash attention off (`auto`
on a CPU) and llama.cpp built without llamafile (the Makefile's build), a pass of several tokens of one sequence
computes exactly what one-token decodes do (bench/verify_exactness.py), so the outputs are equal at any length;
`--deterministic` makes them bit for bit whatever else runs (at the end)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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
    # The rewriting prompts repeat their input. Where a pass of several tokens is cheap (F ≈ 8 with ggml's AMX
    # kernels) the cost rule drafts on matches kept 30-40 % of the time too, so the rate is no higher.
    assert accepted > 30 and accepted > 0.25 * drafted
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


# -- a draft model: the embedded model drafting for itself ----------------------------------------------------

@pytest.fixture(scope="module")
def drafting() -> Iterator[tuple[openai.OpenAI, ServerProcess]]:
    """`--speculative draft --draft-model default`, the length forced to 4 (the cost rule alone would never let a
    model as costly as the target draft)."""
    server = ServerProcess("--ctx", "512", "--parallel", "2", "--speculative", "draft",
                           "--draft-model", "default", "--draft-min", "4", "--draft-max", "4")
    try:
        yield openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120), server
    finally:
        server.stop()


def spec_counts(server: ServerProcess) -> tuple[float, float]:
    return (server.metric("qanat_spec_decode_num_draft_tokens_total"),
            server.metric("qanat_spec_decode_num_accepted_tokens_total"))


def test_a_self_drafting_model_gives_the_same_greedy_output_and_every_draft_is_kept(
        pair: tuple[openai.OpenAI, openai.OpenAI, ServerProcess],
        drafting: tuple[openai.OpenAI, ServerProcess]) -> None:
    off, _, _ = pair
    on, server = drafting
    drafted_before, accepted_before = spec_counts(server)
    for prompt in PROMPTS:
        assert chat(on, prompt, max_tokens=120, temperature=0) == chat(off, prompt, max_tokens=120, temperature=0)
    drafted, accepted = spec_counts(server)
    drafted, accepted = drafted - drafted_before, accepted - accepted_before
    # 8 prompts, up to 120 tokens each, drafts of 4 (fewer near max_tokens): hundreds of drafted tokens.
    assert drafted > 200
    # Same weights, same kernels: each greedy draft is the target's own pick, except where the two contexts'
    # passes (the draft feeds a prompt and decodes one token at a time, the target verifies 1 + 4 tokens at once)
    # round a near-tie apart. Measured: 386 of 390 kept, the 4 lost in one verification whose first draft was the
    # target's second choice by 0.12 logits (33.32 vs 33.20).
    assert drafted - accepted <= 4
    assert server.metric("qanat_spec_decode_draft_acceptance_rate") == pytest.approx(
        spec_counts(server)[1] / spec_counts(server)[0])


def test_a_self_drafting_model_keeps_stop_strings_max_tokens_grammars_and_logprobs(
        pair: tuple[openai.OpenAI, openai.OpenAI, ServerProcess],
        drafting: tuple[openai.OpenAI, ServerProcess]) -> None:
    off, _, _ = pair
    on, server = drafting
    full, _, _ = chat(off, PROMPTS[1], max_tokens=80, temperature=0)
    assert full
    stop = full.split()[6]
    cases: list[tuple[str, dict[str, Any]]] = [
        (PROMPTS[1], {"stop": [stop]}),
        (PROMPTS[0], {"max_tokens": 17}),
        (PROMPTS[2], {"frequency_penalty": 0.5, "presence_penalty": 0.3}),
        (PROMPTS[1], {"temperature": 0.7, "seed": 11}),
        (f"Give name, age and city of this person as JSON: {TEXT} Her name is Ana, she is 31 and lives in Yazd.",
         {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}),
    ]
    for prompt, extra in cases:
        kwargs = {"max_tokens": 80, "temperature": 0, **extra}
        before = spec_counts(server)[0]
        got, want = chat(on, prompt, **kwargs), chat(off, prompt, **kwargs)
        assert got == want, extra
        assert spec_counts(server)[0] > before, extra  # drafts were verified for this request
    assert json.loads(got[0] or "")["name"]

    def logprobs(client: openai.OpenAI) -> list[tuple[str, float]]:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[1]}],
                                           max_tokens=40, temperature=0, logprobs=True, top_logprobs=2)
        assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content is not None
        return [(t.token, t.logprob) for t in r.choices[0].logprobs.content]

    assert logprobs(on) == logprobs(off)


def test_concurrent_self_drafted_requests_keep_their_drafts_in_step_with_the_target(
        drafting: tuple[openai.OpenAI, ServerProcess]) -> None:
    # Six requests on two slots: drafts batched across sequences, slots reused and prefixes copied or restored
    # while others draft. A draft KV out of step with its target sequence would draft garbage and be rejected.
    on, server = drafting
    drafted_before, accepted_before = spec_counts(server)
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda p: chat(on, p, max_tokens=60, temperature=0), PROMPTS[:6]))
    assert all(text for text, _, _ in outs)
    drafted, accepted = spec_counts(server)
    print(f"concurrent self-drafts: {accepted - accepted_before:.0f}/{drafted - drafted_before:.0f} kept")
    assert drafted - drafted_before > 100
    # Measured 184/187 and 196/203 kept: batched passes round a few more near-ties apart; a draft KV out of step
    # would keep next to nothing.
    assert accepted - accepted_before >= 0.9 * (drafted - drafted_before)


def test_the_cost_rule_never_lets_a_model_as_costly_as_the_target_draft(
        pair: tuple[openai.OpenAI, openai.OpenAI, ServerProcess]) -> None:
    off, _, _ = pair
    server = ServerProcess("--ctx", "512", "--parallel", "2", "--speculative", "draft",
                           "--draft-model", "default")
    try:
        on = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        for prompt in PROMPTS[:2]:
            assert chat(on, prompt, max_tokens=60, temperature=0) == chat(off, prompt, max_tokens=60, temperature=0)
        assert spec_counts(server) == (0, 0)
    finally:
        server.stop()


def test_a_draft_model_with_another_vocabulary_is_refused_at_start_up(tmp_path: Path) -> None:
    from qanat.models.locate import default_model_path

    # The embedded model with one token's text changed (same length, so the file's layout stays valid).
    data = default_model_path().read_bytes()
    token = struct.pack("<Q", 5) + b"hello"
    assert data.count(token) == 1
    bad = tmp_path / "other-vocab.gguf"
    bad.write_bytes(data.replace(token, struct.pack("<Q", 5) + b"qzxjv"))
    out = subprocess.run([sys.executable, "-m", "qanat.cli", "serve", "--port", "0", "--speculative", "draft",
                          "--draft-model", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"the draft model {bad} cannot draft for the model {default_model_path()}" in out.stderr
    assert "'hello' vs 'qzxjv'" in out.stderr


def test_an_ngram_engine_times_a_passs_fixed_cost_at_load_and_an_engine_without_speculation_does_not() -> None:
    from qanat.build import build_llamacpp_engine
    from qanat.config import EngineConfig

    on = build_llamacpp_engine(EngineConfig(ctx=256, parallel=1, speculative="ngram"))
    try:
        measured = on.core.executor.facts.pass_cost_s
        speculator = on.core.scheduler.speculator
        assert measured is not None and all(0 < seconds < 1 for seconds in measured)
        assert speculator is not None and speculator.step_cost.fixed_cost_tokens == pytest.approx(
            max(measured[0] / measured[1], 0.25))
    finally:
        on.shutdown()
    off = build_llamacpp_engine(EngineConfig(ctx=256, parallel=1))
    try:
        assert off.core.executor.facts.pass_cost_s is None and off.core.scheduler.speculator is None
    finally:
        off.shutdown()


# -- --deterministic: bit for bit, where llama.cpp verifies exactly -------------------------------------------

def _verification_is_exact() -> bool:
    from qanat.engine.executors.llamacpp import verification_is_exact

    return verification_is_exact()


LONG_TEXT = ("The qanat is an ancient sytem for bringing water from the mountians to the dry plains. Builders first "
             "dig a mother well on the slope of a hill untill they reach the water table. From there they cut a "
             "gently sloping tunel that carries the water for many kilometers to the fields and the vilages below. "
             "Each family in the vilage owns a share of the flow, and a water master keeps the count of evry share.")


@pytest.mark.skipif(_verification_is_exact(), reason="this llama.cpp verifies exactly: nothing to refuse")
def test_deterministic_speculation_is_refused_where_llama_cpp_has_tinyblas() -> None:
    with pytest.raises(RuntimeError, match="without llamafile"):
        ServerProcess("--ctx", "512", "--parallel", "2", "--deterministic", "--speculative", "ngram").stop()


@pytest.mark.skipif(not _verification_is_exact(), reason="needs llama.cpp built with -DGGML_LLAMAFILE=OFF")
def test_deterministic_speculation_is_bit_for_bit() -> None:
    off = ServerProcess("--ctx", "1024", "--parallel", "4", "--deterministic")
    on = ServerProcess("--ctx", "1024", "--parallel", "4", "--deterministic", "--speculative", "ngram")
    try:
        clients = [openai.OpenAI(base_url=f"{s.base_url}/v1", api_key="x", max_retries=0, timeout=300)
                   for s in (off, on)]
        # Past 256 KV cells, where the default mode's outputs may part; logprobs must match to the bit.
        for prompt in (f"Correct the spelling of this text and write it out again:\n{LONG_TEXT}",
                       f"Repeat this text exactly:\n{LONG_TEXT}", PROMPTS[2]):
            answers = [c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=160, temperature=0, logprobs=True) for c in clients]
            texts = [a.choices[0].message.content for a in answers]
            logprobs = [[t.logprob for t in a.choices[0].logprobs.content]  # type: ignore[union-attr]
                        for a in answers]
            assert texts[0] == texts[1] and logprobs[0] == logprobs[1]
        assert on.metric("qanat_spec_decode_num_accepted_tokens_total") > 0
    finally:
        off.stop()
        on.stop()
