"""Tool calling: a step of the serving pipeline (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`).

- validate (`plan_tools`): tool definitions, the choice, and the conversation's calls and results; a 400 names
  the field. The result is a ToolPlan, or None for a request without tools.
- render (`ToolPlan.apply`): through the model's own template when it speaks a known tool-call format
  (ModelCard.tool_call_format: "hermes" or "llama3"), else through the generic format below, which any
  template carries as plain messages.
- constrain (`ToolPlan.apply`): with tool_choice "required" or a named function, a grammar made of the
  format's literal text and the tools' JSON schemas (OutputConstraint.schemas), so that every call parses and
  its arguments match the schema.
- parse (`ToolCallParser`, one per choice): the output becomes text and tool calls. A constrained call streams
  as it is generated (id and name first, then argument fragments); under "auto", a call is held until it is
  complete and valid, then sent; one that does not parse or validate is returned as text.

The generic format (as llama-server's, for templates without tool support, the embedded SmolLM2's included):
- the system message lists the tools, one JSON object per line, and says to call them by answering
  {"tool_calls": [{"name": "<tool>", "arguments": {...}}]} and nothing else;
- an assistant's earlier calls are its message in that same form (after its text, if any);
- tool results come back as one user message per run of results, one line each:
  {"tool_response": {"name": "<tool>", "content": "<result>"}}.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from qanat.engine.client import ChatPrompt, ModelCard, Prompt
from qanat.engine.errors import InvalidRequestError
from qanat.engine.sampling import ConstraintKind, OutputConstraint, SamplingParams
from qanat.serving.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ToolDefinition

Mode = Literal["none", "auto", "required", "named"]
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


# -- formats ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    """How a model writes tool calls: `open` call `close`, joined by `separator`, inside `prefix` ... `suffix`;
    a call is {"name": ..., args_key: {...}}. `marker`, whitespace removed, is how calls begin."""

    name: str
    native: bool  # tools and tool messages go through the model's own template
    marker: str
    args_key: str = "arguments"
    prefix: str = ""
    suffix: str = ""
    open: str = ""
    close: str = ""
    separator: str = ""
    parallel: bool = True  # the format can hold several calls

    def grammar(self, max_calls: int | None) -> str:
        """GBNF root for 1 to max_calls calls (None: no limit); `tc-call` is one call object."""
        block = f"{_literal(self.open)} tc-call {_literal(self.close)}"
        more = f" ( {_literal(self.separator)} {block} )"
        repeat = "" if max_calls == 1 else more + ("*" if max_calls is None else f"{{0,{max_calls - 1}}}")
        return f"root ::= {_literal(self.prefix)} {block}{repeat} {_literal(self.suffix)}\n"

    def call_text(self, name: str, arguments: Any) -> str:
        body = json.dumps({"name": name, self.args_key: arguments}, ensure_ascii=False)
        return f"{self.open}{body}{self.close}"


GENERIC = Dialect("generic", native=False, marker='{"tool_calls":', prefix='{"tool_calls": [', suffix="]}",
                  separator=", ")
HERMES = Dialect("hermes", native=True, marker="<tool_call>", open="<tool_call>\n", close="\n</tool_call>",
                 separator="\n")
LLAMA3 = Dialect("llama3", native=True, marker='{"name":', args_key="parameters", parallel=False)
DIALECTS = {d.name: d for d in (HERMES, LLAMA3)}


def _literal(text: str) -> str:
    """A GBNF string literal ("" matches nothing, which GBNF allows)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# -- validate ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON schema for the arguments object
    validator: Draft202012Validator = field(compare=False)

    def definition(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


def uses_tools(body: ChatCompletionRequest | CompletionRequest) -> bool:
    """Whether the tools step has anything to do, or to refuse, for this request."""
    return isinstance(body, ChatCompletionRequest) and bool(
        body.tools or body.tool_choice not in (None, "none", "auto")
        or any(m.role == "tool" or m.tool_calls for m in body.messages))


def plan_tools(body: ChatCompletionRequest | CompletionRequest, card: ModelCard) -> ToolPlan | None:
    """The tools step's validation: None for requests that neither offer tools nor carry tool messages."""
    if not isinstance(body, ChatCompletionRequest) or not uses_tools(body):
        return None
    has_tool_messages = any(m.role == "tool" or m.tool_calls for m in body.messages)
    choice = body.tool_choice
    if not body.tools and not has_tool_messages:  # so tool_choice asks for a call
        raise InvalidRequestError("tool_choice needs tools: the request has none", param="tool_choice")
    tools = _validate_tools(body.tools or [])
    _check_messages(body.messages)
    mode: Mode
    named: str | None = None
    if choice is None:
        mode = "auto" if tools else "none"
    elif isinstance(choice, str):
        mode = choice
    else:
        mode, named = "named", choice.function.name
        if named not in tools:
            raise InvalidRequestError(f"tool_choice names the function {named!r}, which is not among the tools "
                                      f"({', '.join(tools) or 'none'})", param="tool_choice")
    if mode in ("required", "named") and not tools:
        raise InvalidRequestError(f"tool_choice {choice!r} needs tools: the request has none", param="tool_choice")
    dialect = DIALECTS.get(card.tool_call_format or "", GENERIC)
    parallel = body.parallel_tool_calls is not False and dialect.parallel
    # A named function is called once unless max_tool_calls says more; "required" has no limit by default, as
    # with OpenAI (a small model may then repeat calls until max_tokens: max_tool_calls bounds it).
    max_calls = 1 if not parallel else body.max_tool_calls or (1 if named is not None else None)
    return ToolPlan(tools, mode, named, max_calls, dialect)


def _validate_tools(definitions: list[ToolDefinition]) -> dict[str, Tool]:
    tools: dict[str, Tool] = {}
    for i, definition in enumerate(definitions):
        function = definition.function
        where = f"tools.{i}.function"
        if not _NAME.fullmatch(function.name):
            raise InvalidRequestError(f"{where}.name must be 1 to 64 letters, digits, '_' or '-', got "
                                      f"{function.name!r}", param=f"{where}.name")
        if function.name in tools:
            raise InvalidRequestError(f"{where}.name: two tools are named {function.name!r}", param=f"{where}.name")
        parameters = function.parameters if function.parameters is not None else _NO_ARGUMENTS
        if parameters.get("type", "object") != "object":
            raise InvalidRequestError(f"{where}.parameters must be a JSON schema of type 'object', got type "
                                      f"{parameters.get('type')!r}", param=f"{where}.parameters")
        try:
            Draft202012Validator.check_schema(parameters)
        except SchemaError as e:
            raise InvalidRequestError(f"{where}.parameters is not a valid JSON schema: {e.message}",
                                      param=f"{where}.parameters") from e
        tools[function.name] = Tool(function.name, function.description, parameters,
                                    Draft202012Validator(parameters))
    return tools


def _check_messages(messages: list[ChatMessage]) -> None:
    """Every tool result answers a call made before it; call ids are unique."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        for j, call in enumerate(message.tool_calls or []):
            if message.role != "assistant":
                raise InvalidRequestError(f"messages.{i}: only assistant messages carry tool_calls",
                                          param=f"messages.{i}.tool_calls")
            if call.id in called:
                raise InvalidRequestError(f"messages.{i}.tool_calls.{j}.id {call.id!r} is used twice",
                                          param=f"messages.{i}.tool_calls.{j}.id")
            called.add(call.id)
        if message.role == "tool":
            if message.tool_call_id is None:
                raise InvalidRequestError(f"messages.{i}: a tool message needs the tool_call_id it answers",
                                          param=f"messages.{i}.tool_call_id")
            if message.tool_call_id not in called:
                raise InvalidRequestError(f"messages.{i}.tool_call_id {message.tool_call_id!r} answers no tool call "
                                          f"of an earlier assistant message", param=f"messages.{i}.tool_call_id")


# -- render and constrain ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    tools: dict[str, Tool]
    mode: Mode
    named: str | None  # the function tool_choice names
    max_calls: int | None  # calls in one reply; 1 without parallel_tool_calls, None: no limit
    dialect: Dialect

    @property
    def parallel(self) -> bool:
        return self.max_calls != 1

    @property
    def offered(self) -> list[Tool]:
        """The tools the model is told about: none when tool_choice is "none"."""
        return [] if self.mode == "none" else list(self.tools.values())

    def apply(self, params: SamplingParams, prompts: list[Prompt]) -> tuple[SamplingParams, list[Prompt]]:
        constraint = self.constraint()
        if constraint is not None:
            if params.constraint is not None:
                raise InvalidRequestError(f"response_format cannot be combined with tool_choice {self.mode!r}: "
                                          f"both constrain the output", param="response_format")
            params = replace(params, constraint=constraint)
        return params, [self.render(p) if isinstance(p, ChatPrompt) else p for p in prompts]

    def constraint(self) -> OutputConstraint | None:
        """A call is forced ("required", a named function): grammar = the format's text around the tools'
        argument schemas. The call object is written with "name" first, so a stream can name the call early."""
        if self.mode not in ("required", "named"):
            return None
        callable_tools = [self.tools[self.named]] if self.named is not None else list(self.tools.values())
        rules = [self.dialect.grammar(self.max_calls),
                 "tc-call ::= " + " | ".join(f"tc-call-{i}" for i in range(len(callable_tools))) + "\n"]
        for i, tool in enumerate(callable_tools):
            head = f'{{"name": "{tool.name}", "{self.dialect.args_key}": '
            rules.append(f'tc-call-{i} ::= {_literal(head)} tc-args-{i} "}}"\n')
        schemas = tuple((f"tc-args-{i}", json.dumps(tool.parameters)) for i, tool in enumerate(callable_tools))
        return OutputConstraint(ConstraintKind.GRAMMAR, "".join(rules), schemas=schemas, param="tools")

    def render(self, prompt: ChatPrompt) -> ChatPrompt:
        if self.dialect.native:
            tools = tuple(t.definition() for t in self.offered) or None
            return ChatPrompt(tuple(_native_message(m) for m in prompt.messages), tools)
        return ChatPrompt(tuple(self._generic_messages(prompt.messages)))

    def _generic_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}
        out: list[dict[str, Any]] = []
        results_open = False  # the last message in `out` holds tool results: a run of them shares it
        for m in messages:
            if m["role"] == "tool":
                line = json.dumps({"tool_response": {"name": names[m["tool_call_id"]], "content": m["content"]}},
                                  ensure_ascii=False)
                if results_open:
                    out[-1]["content"] += "\n" + line
                else:
                    out.append({"role": "user", "content": line})
                results_open = True
                continue
            results_open = False
            if m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}
                         for c in m["tool_calls"]]
                text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
                out.append({"role": m["role"], "content": f"{m['content']}\n{text}" if m["content"] else text})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        if self.offered:
            instructions = self._generic_instructions()
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{instructions}"}
            else:
                out.insert(0, {"role": "system", "content": instructions})
        return out

    def _generic_instructions(self) -> str:
        listed = "\n".join(json.dumps(t.definition()["function"], ensure_ascii=False) for t in self.offered)
        how = {
            "auto": "If a tool helps, call it; otherwise answer in plain text.",
            "required": "You must call at least one tool.",
            "named": f"You must call the tool {self.named}.",
            "none": "",
        }[self.mode]
        several = "You may call several tools at once." if self.parallel else "Call one tool at a time."
        return (
            f"You can call these tools:\n{listed}\n\n"
            'To call tools, answer with this JSON and nothing else: '
            '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}\n'
            f'{several} Results come back as {{"tool_response": {{"name": ..., "content": ...}}}}. {how}'
        )

    def parser(self) -> ToolCallParser | None:
        if self.mode == "none":
            return None
        return ToolCallParser(self, constrained=self.constraint() is not None)


def _arguments(text: str) -> Any:
    """A call's arguments as the template expects them: an object where the JSON text parses."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _native_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Hugging Face templates take a call's arguments as an object (vLLM does the same conversion)."""
    out = dict(message)
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
            for c in message["tool_calls"]
        ]
    return out


# -- parse ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallDelta:
    """A piece of the index-th call as OpenAI streams it: id and name first, then argument fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def as_openai(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Piece:
    """What a stretch of output adds: text for `content`, and call pieces."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def then(self, other: Piece) -> Piece:
        return Piece(self.content + other.content, self.calls + other.calls)


@dataclass
class _Call:
    id: str
    name: str
    arguments: str = ""  # JSON text, as generated


# A call object's head, {"name": "...", "arguments": (or "parameters"), up to where its arguments object opens.
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


class ToolCallParser:
    """One choice's output -> text and tool calls, fed as it is generated.

    Constrained (a call is forced): the grammar fixes the layout, so calls are found by their heads and their
    arguments streamed as they grow. Auto: text streams until something that may open a call (the format's
    marker) appears; from there the output is held, and at the end parsed and validated: calls, or text."""

    def __init__(self, plan: ToolPlan, constrained: bool) -> None:
        self.plan = plan
        self.constrained = constrained
        self.calls: list[_Call] = []
        self.malformed = False  # auto: output that looked like a call but did not parse or validate
        self._buffer = ""
        self._sent = 0  # auto: buffer[:_sent] went out as content
        self._held: int | None = None  # auto: where the calls begin (held from here to the end)
        self._scan = 0  # constrained: where to look for the next call's head
        self._args_start: int | None = None  # constrained: where the open call's arguments begin

    @property
    def mode(self) -> Mode:
        return self.plan.mode

    def tool_calls(self) -> list[dict[str, Any]]:
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.calls]

    def feed(self, text: str) -> Piece:
        self._buffer += text
        if self.constrained:
            return Piece(calls=self._scan_calls())
        if self._held is not None:
            return Piece()
        start, confirmed = _find_marker(self._buffer, self._sent, self.plan.dialect.marker)
        content = self._buffer[self._sent:start]
        self._sent = start
        if confirmed:
            self._held = start
        return Piece(content)

    def finish(self) -> Piece:
        if self.constrained:
            # The grammar made them parse; a schema keyword it cannot express (a "pattern", a "format") or a
            # cut (max_tokens) may still leave one invalid: sent as generated, and counted.
            self.malformed = not all(self._valid(c) for c in self.calls)
            return Piece()
        held = self._buffer[self._sent:]
        self._sent = len(self._buffer)
        if self._held is None:
            return Piece(held)
        parsed = _parse_calls(held, self.plan.dialect)
        calls = self._validated(parsed[0]) if parsed is not None else None
        if parsed is None or calls is None:
            self.malformed = True
            return Piece(held)
        calls = calls[:self.plan.max_calls]
        pieces = []
        for name, arguments in calls:
            call = _Call(_call_id(), name, json.dumps(arguments, ensure_ascii=False))
            self.calls.append(call)
            index = len(self.calls) - 1
            pieces += [CallDelta(index, call.id, call.name), CallDelta(index, arguments=call.arguments)]
        return Piece(parsed[1], pieces)

    def _validated(self, calls: list[tuple[str, Any]]) -> list[tuple[str, Any]] | None:
        for name, arguments in calls:
            tool = self.plan.tools.get(name)
            if tool is None or not _is_valid(tool, arguments):
                return None
        return calls or None

    def _valid(self, call: _Call) -> bool:
        try:
            arguments = json.loads(call.arguments)
        except json.JSONDecodeError:
            return False
        return self._validated([(call.name, arguments)]) is not None

    def _scan_calls(self) -> list[CallDelta]:
        pieces: list[CallDelta] = []
        while True:
            if self._args_start is not None:
                call, index = self.calls[-1], len(self.calls) - 1
                end = _json_end(self._buffer, self._args_start)
                fragment = self._buffer[self._args_start + len(call.arguments):end]
                if fragment:
                    call.arguments += fragment
                    pieces.append(CallDelta(index, arguments=fragment))
                if end is None:
                    return pieces
                self._args_start, self._scan = None, end
            head = _CALL_HEAD.search(self._buffer, self._scan)
            if head is None:
                return pieces
            call = _Call(_call_id(), head.group(1))
            self.calls.append(call)
            pieces.append(CallDelta(len(self.calls) - 1, call.id, call.name))
            self._args_start = head.end()


def _is_valid(tool: Tool, arguments: Any) -> bool:
    try:
        return bool(tool.validator.is_valid(arguments))
    except Exception:  # a schema that checks but cannot be applied (a $ref to nowhere): the call is not valid
        return False


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _find_marker(text: str, since: int, marker: str) -> tuple[int, bool]:
    """Where calls may begin in text[since:]: (position, True) for a whole marker, (position, False) for the
    start of one cut by the end of the text (held back until more comes), (len(text), False) for none.
    Whitespace is ignored ('{ "tool_calls" :' counts): a false alarm only costs holding text a little longer."""
    position = text.find(marker[0], since)
    while position != -1:
        squashed = "".join(text[position:position + 4 * len(marker)].split())
        if squashed.startswith(marker):
            return position, True
        if marker.startswith(squashed):
            return position, False
        position = text.find(marker[0], position + 1)
    return len(text), False


def _json_end(text: str, start: int) -> int | None:
    """The end of the JSON object or array opening at text[start], or None while it is incomplete."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _parse_calls(text: str, dialect: Dialect) -> tuple[list[tuple[str, Any]], str] | None:
    """(calls as (name, arguments), the text after them), or None if `text` does not open with calls."""
    decoder = json.JSONDecoder()
    calls: list[Any]
    try:
        if dialect is GENERIC:
            value, end = decoder.raw_decode(text.lstrip())
            end += len(text) - len(text.lstrip())
            listed = value.get("tool_calls") if isinstance(value, dict) else None
            if not isinstance(listed, list):
                return None
            calls = listed
        else:
            calls, end = [], 0
            opener, closer = dialect.open.strip(), dialect.close.strip()
            while True:
                rest = text[end:].lstrip()
                if calls and (not opener or not rest.startswith(opener)):
                    break
                if not rest.startswith(opener):
                    return None
                body = rest[len(opener):].lstrip()
                value, used = decoder.raw_decode(body)
                end = len(text) - len(body) + used
                calls.append(value)
                if closer and text[end:].lstrip().startswith(closer):
                    end = len(text) - len(text[end:].lstrip()) + len(closer)
    except json.JSONDecodeError:
        return None
    parsed = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get(dialect.args_key, call.get("arguments", call.get("parameters", {})))
        if not isinstance(arguments, dict):
            return None
        parsed.append((call["name"], arguments))
    return parsed, text[end:].strip()
