"""OpenAI's response shapes, one class per endpoint: the only part of a request's path that differs between
/v1/chat/completions and /v1/completions (see `pipeline.py` for the steps they share)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from qanat.engine.client import Delta, Logprobs, TokenLogprob


@dataclass
class Choice:
    """One choice's accumulated output."""

    text: str = ""
    logprobs: list[Logprobs] = field(default_factory=list)
    last: Delta | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        if delta.logprobs is not None:
            self.logprobs.append(delta.logprobs)
        self.last = delta


def finish_reason(delta: Delta | None) -> str | None:
    if delta is None or delta.finish_reason is None:
        return None
    return delta.finish_reason.value


class ResponseFormat(Protocol):
    object: str  # the response's "object"
    chunk_object: str  # a streamed chunk's "object"
    id_prefix: str
    prompt_param: str  # the body field that holds the prompt, for error messages

    def choice(self, index: int, choice: Choice, with_logprobs: bool) -> dict[str, Any]: ...

    def opening(self, index: int) -> list[dict[str, Any]]:
        """Choice entries sent before any token."""
        ...

    def delta_choices(self, index: int, delta: Delta, with_logprobs: bool) -> list[dict[str, Any]]: ...


class ChatFormat:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    prompt_param = "messages"

    def choice(self, index: int, choice: Choice, with_logprobs: bool) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": _chat_logprobs(choice.logprobs) if with_logprobs else None,
            "finish_reason": finish_reason(choice.last),
        }

    def opening(self, index: int) -> list[dict[str, Any]]:
        return [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    def delta_choices(self, index: int, delta: Delta, with_logprobs: bool) -> list[dict[str, Any]]:
        entries = []
        if delta.text or delta.logprobs is not None:
            lp = _chat_logprobs([delta.logprobs]) if with_logprobs and delta.logprobs is not None else None
            entries.append({"index": index, "delta": {"content": delta.text}, "logprobs": lp, "finish_reason": None})
        if delta.finish_reason is not None:
            entries.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason(delta)})
        return entries


class CompletionFormat:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"
    prompt_param = "prompt"

    def choice(self, index: int, choice: Choice, with_logprobs: bool) -> dict[str, Any]:
        return {"index": index, "text": choice.text,
                "logprobs": _completion_logprobs(choice.logprobs) if with_logprobs else None,
                "finish_reason": finish_reason(choice.last)}

    def opening(self, index: int) -> list[dict[str, Any]]:
        return []

    def delta_choices(self, index: int, delta: Delta, with_logprobs: bool) -> list[dict[str, Any]]:
        if not (delta.text or delta.finish_reason is not None or delta.logprobs is not None):
            return []
        lp = _completion_logprobs([delta.logprobs]) if with_logprobs and delta.logprobs is not None else None
        return [{"index": index, "text": delta.text, "logprobs": lp, "finish_reason": finish_reason(delta)}]


def _chat_logprobs(entries: list[Logprobs]) -> dict[str, Any]:
    def item(t: TokenLogprob) -> dict[str, Any]:
        return {"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes)}

    return {"content": [{**item(e.chosen), "top_logprobs": [item(t) for t in e.top]} for e in entries]}


def _completion_logprobs(entries: list[Logprobs]) -> dict[str, Any]:
    tokens = [e.chosen.text for e in entries]
    offsets, offset = [], 0
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.chosen.logprob for e in entries],
        "top_logprobs": [{t.text: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }
