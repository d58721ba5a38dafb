"""Tool calling without weights: the tools step's checks (400s naming the field), its prompts (generic and
native), its grammar, and the parser that turns output into text and OpenAI's tool_calls, streamed or not.
Grammar-constrained generation itself runs on the real model (tests/e2e/test_tools.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qanat.build import assemble, build_fake_engine
from qanat.config import EngineConfig
from qanat.engine.client import Delta, FinishReason, ModelCard
from qanat.engine.executors.fake import FakeSpec, FakeTokenizer
from qanat.engine.local import LocalEngine
from qanat.serving.formats import ChatFormat, Choice, Extras
from qanat.serving.protocol import ChatCompletionRequest
from qanat.serving.tools import GENERIC, HERMES, LLAMA3, ToolCallParser, ToolPlan, plan_tools
from tests.models.test_chat_template import HERMES as HERMES_TEMPLATE
from tests.serving.test_app import call, events

MODEL = "fake-model"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CARD = ModelCard("m", 256, "qanat", "fake", "estimated:fake", True)


@pytest.fixture(scope="module")
def engine() -> Iterator[LocalEngine]:
    eng = build_fake_engine(EngineConfig(ctx=2048, parallel=2, batch_tokens=512), FakeSpec(2, 2048, 512))
    yield eng
    eng.shutdown()


def plan(card: ModelCard = CARD, **body: Any) -> ToolPlan:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, "tools": [WEATHER, TIME], **body})
    result = plan_tools(request, card)
    assert result is not None
    return result


def chat(**body: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0, **body}


# -- validate -------------------------------------------------------------------------------------------------

BAD_TOOL = {"type": "function", "function": {"name": "has space"}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(tools=[BAD_TOOL]), "tools.0.function.name"),
        (chat(tools=[WEATHER, WEATHER]), "tools.1.function.name"),
        (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
         "tools.0.function.parameters"),
        (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                     "required": "city"}}}]),
         "tools.0.function.parameters"),
        (chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools.0.type"),
        (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice"),
        (chat(tool_choice="required"), "tool_choice"),
        (chat(tools=[WEATHER], tool_choice="always"), "tool_choice"),
        (chat(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
         "response_format"),
        (chat(tools=[WEATHER], messages=[*ASK, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]),
         "messages.1.tool_call_id"),
        (chat(messages=[*ASK, {"role": "tool", "content": "sunny"}]), "messages.1.tool_call_id"),
        (chat(messages=[*ASK, {"role": "user", "content": "x", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]),
         "messages.1.tool_calls"),
        # Valid, but the fake model has no grammars: the forced call's constraint reaches it and is refused.
        (chat(tools=[WEATHER], tool_choice="required"), "tools"),
    ],
)
def test_bad_tool_requests_get_a_400_naming_the_field(engine: LocalEngine, body: dict[str, Any], param: str) -> None:
    r = call(engine, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] is not None and r.json()["error"]["param"].startswith(param), r.text


def test_tool_choice_none_and_auto_answer_in_text(engine: LocalEngine) -> None:
    for choice in ("none", "auto"):
        reply = call(engine, "POST", "/v1/chat/completions", json=chat(tools=[WEATHER], tool_choice=choice)).json()
        message = reply["choices"][0]["message"]
        assert "tool_calls" not in message and len(message["content"]) == 8, reply
        assert reply["choices"][0]["finish_reason"] == "length"
    without = call(engine, "POST", "/v1/chat/completions", json=chat()).json()
    with_tools = call(engine, "POST", "/v1/chat/completions", json=chat(tools=[WEATHER])).json()
    none = call(engine, "POST", "/v1/chat/completions", json=chat(tools=[WEATHER], tool_choice="none")).json()
    # The fake template has no tool support: "auto" lists the tools in a system message (generic format); "none"
    # does not offer them.
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 100
    assert none["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]


# -- render ---------------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Paris"}'}}]},
    # Results in another order than the calls, as an agent running them concurrently sends them.
    {"role": "tool", "tool_call_id": "call_b", "content": "14:00"},
    {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
]


def test_generic_format_round_trip_for_a_template_without_tool_support(engine: LocalEngine) -> None:
    tools = plan(messages=HISTORY)
    assert tools.dialect is GENERIC
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY})
    rendered = tools.render(request.prompts()[0])  # type: ignore[arg-type]
    messages = list(rendered.messages)
    assert rendered.tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call these tools:\n")
    assert '{"name": "get_time", "parameters":' in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {"tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"city": "Paris"}}]}
    assert [json.loads(line) for line in messages[3]["content"].split("\n")] == [
        {"tool_response": {"name": "get_time", "content": "14:00"}},
        {"tool_response": {"name": "get_weather", "content": "sunny"}}]
    # And the whole conversation is served.
    reply = call(engine, "POST", "/v1/chat/completions", json=chat(messages=HISTORY, tools=[WEATHER, TIME]))
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def test_native_template_gets_tools_and_tool_messages() -> None:
    class HermesTokenizer(FakeTokenizer):
        def chat_template(self) -> tuple[str, str, str] | None:
            return HERMES_TEMPLATE, "", "<|im_end|>"

    config = EngineConfig(ctx=2048, parallel=2, batch_tokens=512)
    engine = assemble(config, MODEL, Path("fake"), HermesTokenizer(), FakeSpec(2, 2048, 512).create())
    try:
        assert engine.card.tool_call_format == "hermes"
        tools = plan(engine.card, messages=HISTORY)
        assert tools.dialect is HERMES
        request = ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY})
        prompt = tools.render(request.prompts()[0])  # type: ignore[arg-type]
        text = bytes(t - 4 for t in engine.render_sync(prompt).token_ids).decode()
        assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
        assert '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>' in text
        assert "<tool_response>\n14:00\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
        reply = call(engine, "POST", "/v1/chat/completions", json=chat(messages=HISTORY, tools=[WEATHER, TIME]))
        assert reply.status_code == 200, reply.text
    finally:
        engine.shutdown()


# -- constrain ------------------------------------------------------------------------------------------------


def test_forced_calls_are_constrained_by_a_grammar_over_the_tools_schemas() -> None:
    assert plan().constraint() is None and plan(tool_choice="none").parser() is None
    required = plan(tool_choice="required").constraint()
    assert required is not None and required.param == "tools"
    assert required.spec is not None and required.spec.startswith(
        'root ::= "{\\"tool_calls\\": [" "" tc-call "" ( ", " "" tc-call "" )* "]}"\n')
    assert 'tc-call-1 ::= "{\\"name\\": \\"get_time\\", \\"arguments\\": " tc-args-1 "}"' in required.spec
    assert [json.loads(s) for _, s in required.schemas] == [WEATHER["function"]["parameters"],  # type: ignore[index]
                                                            TIME["function"]["parameters"]]  # type: ignore[index]
    named = plan(tool_choice={"type": "function", "function": {"name": "get_time"}}).constraint()
    assert named is not None and named.spec is not None and "get_weather" not in named.spec
    assert "( " not in named.spec.split("\n")[0]  # a named function: one call
    two = plan(tool_choice="required", max_tool_calls=2).constraint()
    assert two is not None and two.spec is not None and ")*" not in two.spec and "{0,1}" in two.spec
    single = plan(tool_choice="required", parallel_tool_calls=False).constraint()
    assert single is not None and single.spec is not None and "( " not in single.spec.split("\n")[0]
    hermes = plan(ModelCard("m", 256, "q", "c", "e", True, "hermes"), tool_choice="required").constraint()
    assert hermes is not None and hermes.spec is not None
    assert '"<tool_call>\\n" tc-call "\\n</tool_call>"' in hermes.spec


# -- parse ----------------------------------------------------------------------------------------------------

CALLS = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Par\\"is}", "unit": "c"}}, '
         '{"name": "get_time", "arguments": {}}]}')


def feed_all(parser: ToolCallParser, text: str, size: int) -> tuple[str, list[Any]]:
    content, pieces = "", []
    for i in range(0, len(text), size):
        piece = parser.feed(text[i:i + size])
        content += piece.content
        pieces += piece.calls
    last = parser.finish()
    return content + last.content, pieces + last.calls


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_constrained_calls_stream_as_generated_and_reassemble(size: int) -> None:
    parser = plan(tool_choice="required").parser()
    assert parser is not None and parser.constrained
    content, pieces = feed_all(parser, CALLS, size)
    assert content == "" and not parser.malformed
    calls = parser.tool_calls()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": 'Par"is}', "unit": "c"}), ("get_time", {})]
    for index, whole in enumerate(calls):
        mine = [p for p in pieces if p.index == index]
        assert mine[0].id == whole["id"] and mine[0].name == whole["function"]["name"] and mine[0].arguments == ""
        assert all(p.id is None for p in mine[1:])
        assert "".join(p.arguments for p in mine) == whole["function"]["arguments"]


def test_auto_streams_text_holds_what_may_be_a_call_and_validates_it() -> None:
    parser = plan().parser()
    assert parser is not None and not parser.constrained
    assert parser.feed("Let me check. {").content == "Let me check. "  # "{" may open a call: held
    assert parser.feed('"a": 1}').content == '{"a": 1}'  # it did not
    assert parser.feed(' {"tool_').content == " "
    assert parser.feed('calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}').content == ""
    last = parser.finish()
    assert last.content == "" and [(p.index, p.name, p.arguments) for p in last.calls] == [
        (0, "get_weather", ""), (0, None, '{"city": "Oslo"}')]


@pytest.mark.parametrize(
    "output",
    [
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": 5}}]}',  # fails the schema
        '{"tool_calls": [{"name": "delete_all", "arguments": {}}]}',  # no such tool
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}',  # cut
        '{"tool_calls": "get_weather"}',
    ],
)
def test_auto_turns_a_malformed_call_into_text(output: str) -> None:
    parser = plan().parser()
    assert parser is not None
    content, pieces = feed_all(parser, output, 4)
    assert content == output and pieces == [] and parser.malformed and parser.tool_calls() == []


def test_a_schema_that_cannot_be_applied_makes_the_call_text_not_a_500() -> None:
    broken = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, "tools": [broken]})
    tools = plan_tools(request, CARD)
    assert tools is not None and (parser := tools.parser()) is not None
    output = '{"tool_calls": [{"name": "f", "arguments": {"x": 1}}]}'
    assert feed_all(parser, output, 8) == (output, []) and parser.malformed


def test_native_formats_are_parsed_with_the_text_around_them() -> None:
    hermes = plan(ModelCard("m", 256, "q", "c", "e", True, "hermes")).parser()
    assert hermes is not None and hermes.plan.dialect is HERMES
    output = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rabat"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {"city": "Rabat"}}\n</tool_call>')
    content, _ = feed_all(hermes, output, 5)
    assert content == "Checking.\n" and [c["function"]["name"] for c in hermes.tool_calls()] == ["get_weather",
                                                                                                "get_time"]
    llama = plan(ModelCard("m", 256, "q", "c", "e", True, "llama3")).parser()
    assert llama is not None and llama.plan.dialect is LLAMA3 and not llama.plan.parallel
    content, _ = feed_all(llama, '{"name": "get_time", "parameters": {"city": "Fes"}}', 3)
    assert content == "" and json.loads(llama.tool_calls()[0]["function"]["arguments"]) == {"city": "Fes"}


def test_chat_format_streams_calls_as_openai_and_the_reply_matches() -> None:
    fmt, parser = ChatFormat(), plan(tool_choice="required").parser()
    choice = Choice(tools=parser)
    entries = []
    for i in range(0, len(CALLS), 9):
        text = CALLS[i:i + 9]
        done = i + 9 >= len(CALLS)
        delta = Delta("r", text, (1,), 5, 0, i // 9 + 1, FinishReason.STOP if done else None)
        entries += fmt.delta_choices(0, choice.add(delta), Extras())
    assert entries[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    deltas = [e["delta"] for e in entries[:-1]]
    assert all(set(d) == {"tool_calls"} for d in deltas)
    first = deltas[0]["tool_calls"][0]
    assert first["type"] == "function" and first["function"] == {"name": "get_weather", "arguments": ""}
    reply = fmt.choice(0, choice, Extras())
    assert reply["finish_reason"] == "tool_calls" and reply["message"]["content"] is None
    streamed: dict[int, str] = {}
    for d in deltas:
        part = d["tool_calls"][0]
        streamed[part["index"]] = streamed.get(part["index"], "") + part["function"]["arguments"]
    assert [c["function"]["arguments"] for c in reply["message"]["tool_calls"]] == [streamed[0], streamed[1]]


def test_stream_of_an_auto_request_on_a_model_that_answers_in_text(engine: LocalEngine) -> None:
    chunks = events(call(engine, "POST", "/v1/chat/completions", json=chat(tools=[WEATHER], stream=True)))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text) == 8 and not any("tool_calls" in c["choices"][0]["delta"] for c in chunks if c["choices"])
