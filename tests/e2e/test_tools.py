"""Tool calling end to end: the embedded SmolLM2 (whose template has no tool support, so the generic format)
behind `qanat serve --deterministic`, through the official openai client and LangChain."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from jsonschema import Draft202012Validator
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from bench.tool_calls import CASES, TOOLS, ask, request
from tests.e2e.conftest import MODEL
from tests.e2e.server import ServerProcess

WEATHER, TIME = TOOLS["get_weather"], TOOLS["get_time"]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    # Deterministic: a stream and its unstreamed twin must then give the very same call, whatever runs beside.
    srv = ServerProcess("--ctx", "1024", "--parallel", "8", "--deterministic")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)


def tool_call_count(server: ServerProcess, choice: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    match = re.search(rf'^qanat_tool_calls_total{{tool_choice="{choice}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def valid(name: str, arguments: str) -> bool:
    return Draft202012Validator(TOOLS[name]["function"]["parameters"]).is_valid(json.loads(arguments))


@pytest.mark.timeout(1200)  # 40 requests, prompts prefilled alone (--deterministic): minutes on a shared 2-core box
def test_forced_calls_validate_streamed_and_not_and_streams_reassemble(client: openai.OpenAI,
                                                                        server: ServerProcess) -> None:
    """The 20 varied cases of bench/tool_calls.py, "required" and named in turn, each streamed and not."""
    before = tool_call_count(server, "required") + tool_call_count(server, "named")
    jobs = [(i, stream) for i in range(len(CASES)) for stream in (False, True)]

    def one(job: tuple[int, bool]) -> Any:
        i, stream = job
        # frequency_penalty: the 135M model otherwise repeats itself inside a free-text argument until max_tokens.
        return ask(client, MODEL, request(CASES[i], named=i % 2 == 1, seed=None, frequency_penalty=0.5), stream)

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, jobs))
    failed = []
    for (i, _), outcome in zip(jobs, outcomes, strict=True):
        prompt, target, others = CASES[i]
        assert len(outcome.calls) == 1  # parallel_tool_calls false
        assert outcome.calls[0][0] == target or (i % 2 == 0 and outcome.calls[0][0] in others), (prompt, outcome)
        if not outcome.validates({target} if i % 2 else {target, *others}):
            # The grammar holds every token to the schema, but a free-text argument may run on to max_tokens.
            assert outcome.finish_reason == "length", (prompt, outcome)
            failed.append(prompt)
    # Measured: 20 of 20 cases with the AVX-512 kernels; with the AMX kernels "Give me the latest NVDA quote."
    # draws a symbol that runs on in digits, in both the streamed and the plain call.
    assert len(set(failed)) <= 1, failed
    assert [a.calls for a in outcomes[0::2]] == [b.calls for b in outcomes[1::2]]
    assert tool_call_count(server, "required") + tool_call_count(server, "named") == before + 40


def test_each_tool_choice(client: openai.OpenAI) -> None:
    ask_weather = [{"role": "user", "content": "What's the weather in Rabat?"}]
    none = client.chat.completions.create(model=MODEL, messages=ask_weather, tools=[WEATHER], tool_choice="none",
                                          max_tokens=24, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    # "auto": the model may answer either way; whatever comes back as a call has been validated.
    auto = client.chat.completions.create(model=MODEL, messages=ask_weather, tools=[WEATHER, TIME],
                                          max_tokens=48, temperature=0)
    message = auto.choices[0].message
    assert message.content or message.tool_calls
    for call in message.tool_calls or []:
        assert valid(call.function.name, call.function.arguments)  # type: ignore[union-attr]
    assert (auto.choices[0].finish_reason == "tool_calls") == bool(message.tool_calls)
    named = client.chat.completions.create(model=MODEL, messages=ask_weather, tools=[WEATHER, TIME], temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = named.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_time"]  # type: ignore[union-attr]
    assert named.choices[0].finish_reason == "tool_calls" and named.choices[0].message.content is None


def test_parallel_calls_come_back_as_separate_calls(client: openai.OpenAI) -> None:
    both = [{"role": "user", "content": "What is the weather in Paris and the time in Tokyo?"}]
    two = client.chat.completions.create(model=MODEL, messages=both, tools=[WEATHER, TIME], tool_choice="required",
                                         temperature=0, max_tokens=128, extra_body={"max_tool_calls": 2})
    calls = two.choices[0].message.tool_calls or []
    assert len(calls) == 2 and len({c.id for c in calls}) == 2, calls
    assert {c.function.name for c in calls} == {"get_weather", "get_time"}  # type: ignore[union-attr]
    assert all(valid(c.function.name, c.function.arguments) for c in calls)  # type: ignore[union-attr]
    one = client.chat.completions.create(model=MODEL, messages=both, tools=[WEATHER, TIME], tool_choice="required",
                                         temperature=0, max_tokens=128, parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls or []) == 1


def test_agent_loop_with_the_openai_client(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What's the weather in Fes?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=64)
    call = (first.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "31 degrees celsius, clear sky"})
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=48)
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason in ("stop", "length")
    # A result for a call nobody made is refused, naming the field.
    messages[-1] = {**messages[-1], "tool_call_id": "call_unknown"}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=8)
    assert refused.value.body["param"] == "messages.2.tool_call_id"  # type: ignore[index]


def test_langchain_bind_tools_and_a_tool_round_trip(server: ServerProcess) -> None:
    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(model=MODEL, base_url=f"{server.base_url}/v1", api_key="unused", temperature=0,
                     max_completion_tokens=64, max_retries=0)
    agent = llm.bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("What's the weather in Agadir?")
    reply = agent.invoke([question])
    assert len(reply.tool_calls) == 1 and reply.tool_calls[0]["name"] == "get_weather"
    assert isinstance(reply.tool_calls[0]["args"]["city"], str)
    result = ToolMessage(get_weather.invoke(reply.tool_calls[0]["args"]), tool_call_id=reply.tool_calls[0]["id"])
    final = llm.bind_tools([get_weather]).invoke([question, reply, result])
    assert final.content or final.tool_calls  # the model's own choice under "auto"


def test_a_schema_the_grammar_cannot_express_is_a_400_naming_tools(client: openai.OpenAI) -> None:
    remote = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "https://example.com/schema.json"}}}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[remote],
                                       tool_choice="required", max_tokens=8)
    assert refused.value.body["param"] == "tools"  # type: ignore[index]
