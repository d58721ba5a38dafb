"""OpenAI protocol: request bodies (validated by pydantic) and their translation to engine types.

Numeric bounds come from `qanat.engine.sampling.LIMITS`, the one table the engine checks too.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from qanat.engine.client import ChatPrompt, Prompt, TextPrompt, TokenPrompt
from qanat.engine.errors import InvalidRequestError
from qanat.engine.sampling import LIMITS, ConstraintKind, OutputConstraint, SamplingParams


def _bounded(name: str) -> Any:
    """pydantic Field bounds for a parameter, from LIMITS."""
    limit = LIMITS[name]
    if limit.lo_open:
        return Field(gt=limit.lo, le=limit.hi)
    return Field(ge=limit.lo, le=limit.hi)


def _int_bounded(name: str) -> Any:
    limit = LIMITS[name]
    return Field(ge=int(limit.lo), le=int(limit.hi))


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(BaseModel):
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call an assistant made earlier in the conversation."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: StrictStr | None = None  # tool: the call this message answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_dict(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for "system"; templates only know the latter.
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(BaseModel):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: StrictStr = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _CommonRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: StrictStr
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, _bounded("temperature")] | None = None
    top_p: Annotated[float, _bounded("top_p")] | None = None
    n: Annotated[int, _int_bounded("n")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=int(LIMITS["stop"].hi))] | None = None
    presence_penalty: Annotated[float, _bounded("presence_penalty")] = 0.0
    frequency_penalty: Annotated[float, _bounded("frequency_penalty")] = 0.0
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    logit_bias: dict[StrictStr, Annotated[float, _bounded("logit_bias")]] | None = None
    user: StrictStr | None = None
    # Extensions, as in vLLM and llama.cpp's server.
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, _bounded("min_p")] | None = None
    repetition_penalty: Annotated[float, _bounded("repetition_penalty")] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False  # vLLM's extension: each choice carries the ids it sampled
    speculative: bool = True  # Qanat's extension: false keeps this request out of speculative decoding
    stop_token_ids: Annotated[
        list[Annotated[int, Field(ge=0)]], Field(max_length=int(LIMITS["stop_token_ids"].hi))
    ] | None = None

    def _sampling(self, max_tokens: int | None, logprobs: int | None,
                  constraint: OutputConstraint | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias: list[tuple[int, float]] = []
        for key, value in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
            bias.append((int(key), value))
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=tuple(s for s in stop if s),
            ignore_eos=self.ignore_eos,
            speculative=self.speculative,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logit_bias=tuple(bias),
            logprobs=logprobs,
            constraint=constraint,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_CommonRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, _int_bounded("logprobs")] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Extension (the name of OpenAI's Responses API field): at most this many calls in one reply. A forced call's
    # grammar ends there, so a small model cannot add calls until max_tokens.
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None

    def sampling_params(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(self.max_completion_tokens or self.max_tokens, logprobs, self._constraint())

    def _constraint(self) -> OutputConstraint | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return OutputConstraint(ConstraintKind.JSON_OBJECT)
        if fmt.json_schema is None:
            raise InvalidRequestError("response_format json_schema needs a 'json_schema' object",
                                      param="response_format")
        return OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(fmt.json_schema.schema_))

    def prompts(self) -> list[Prompt]:
        return [ChatPrompt(tuple(m.as_dict() for m in self.messages))]


class CompletionRequest(_CommonRequest):
    prompt: StrictStr | Annotated[list[StrictInt], Field(min_length=1)] | Annotated[
        list[StrictStr], Field(min_length=1, max_length=64)
    ]
    logprobs: Annotated[int, _int_bounded("logprobs")] | None = None
    echo: bool = False
    # Qanat's extension, for a router continuing a stream another replica started: the ids already streamed for
    # this (token id) prompt, recomputed as output and not sent again.
    continue_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions

    def sampling_params(self) -> SamplingParams:
        if self.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        return self._sampling(self.max_tokens, self.logprobs, None)

    def prompts(self) -> list[Prompt]:
        prompt = self.prompt
        if self.continue_token_ids is not None:
            if isinstance(prompt, str) or not isinstance(prompt[0], int):
                raise InvalidRequestError("continue_token_ids needs a prompt of token ids", param="continue_token_ids")
            return [TokenPrompt(tuple(prompt), tuple(self.continue_token_ids))]  # type: ignore[arg-type]
        if isinstance(prompt, str):
            return [TextPrompt(prompt)]
        if isinstance(prompt[0], int):
            return [TokenPrompt(tuple(prompt))]  # type: ignore[arg-type]
        return [TextPrompt(str(p)) for p in prompt]


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a text prompt, or chat messages rendered with the model's template."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None

    def prompt_of(self) -> Prompt:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("give exactly one of 'prompt' or 'messages'", param="prompt")
        if self.messages is not None:
            return ChatCompletionRequest(model=self.model, messages=self.messages).prompts()[0]
        return TextPrompt(self.prompt or "")
