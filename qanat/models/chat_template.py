"""Chat templates: the GGUF's `tokenizer.chat_template`, rendered as Hugging Face's apply_chat_template does,
`tools` included; and which tool-call format, if any, a template speaks natively."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    pass


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' override: jinja2's own sorts keys and escapes <, >, & for HTML, which would change how
    # tool schemas read to the model.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A compiled chat template. Same jinja2 settings as transformers: sandboxed, trim/lstrip blocks."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template does not compile: {e}") from e
        self.bos_token = bos_token
        self.eos_token = eos_token

        self.tool_call_format = self._probe_tool_call_format(source)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                tools=list(tools) if tools is not None else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError) as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from e

    def _probe_tool_call_format(self, source: str) -> str | None:
        """"hermes" (`<tool_call>{"name", "arguments"}</tool_call>`: Qwen, Hermes, SmolLM3) or "llama3"
        (`{"name", "parameters"}`) when the template renders a tool list, an assistant's call and a tool's result
        (probed, as llama-server does); None for templates without tool support, which get the generic format."""
        user: dict[str, Any] = {"role": "user", "content": "qanat-probe-question"}
        call: dict[str, Any] = {"id": "call_probe", "type": "function",
                "function": {"name": "qanat_probe_tool", "arguments": {"qanat_probe_arg": "qanat-probe-value"}}}
        turn = [user, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_probe", "name": "qanat_probe_tool",
                 "content": "qanat-probe-result"}]
        try:
            listed = self.render([user], tools=[PROBE_TOOL])
            history = self.render(turn, tools=[PROBE_TOOL])
        except ChatTemplateError:
            return None
        if "qanat_probe_tool" not in listed or not {"qanat-probe-value", "qanat-probe-result"} <= _words(history):
            return None
        if "<tool_call>" in history:
            return "hermes"
        if re.search(r'\{"name":\s*"qanat_probe_tool",\s*"parameters":', history):
            return "llama3"
        return None


def _words(text: str) -> set[str]:
    return set(re.findall(r"[\w-]+", text))


PROBE_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "qanat_probe_tool", "description": "probe",
    "parameters": {"type": "object", "properties": {"qanat_probe_arg": {"type": "string"}}},
}}
