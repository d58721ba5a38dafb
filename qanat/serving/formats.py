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
    token_ids: list[int] = field(default_factory=list)
    last: Delta | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        if delta.logprobs is not None:
            self.logprobs.append(delta.logprobs)
        self.token_ids.extend(delta.token_ids)
        self.last = delta


@dataclass(frozen=True)
class Extras:
    """What the request asked for besides text."""

    logprobs: bool = False
    token_ids: bool = False  # `return_token_ids` (vLLM's extension): the sampled ids, e.g. for a router


def finish_reason(delta: Delta | None) -> str | None:
    if delta is None or delta.finish_reason is None:
        return None
    return delta.finish_reason.value


class ResponseFormat(Protocol):
    object: str  # the response's "object"
    chunk_object: str  # a streamed chunk's "object"
    id_prefix: str
    prompt_param: str  # the body field that holds the prompt, for error messages

    def choice(self, index: int, choice: Choice, extras: Extras) -> dict[str, Any]: ...

    def opening(self, index: int) -> list[dict[str, Any]]:
        """Choice entries sent before any token."""
        ...

    def delta_choices(self, index: int, delta: Delta, extras: Extras) -> list[dict[str, Any]]: ...


class ChatFormat:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    prompt_param = "messages"

    def choice(self, index: int, choice: Choice, extras: Extras) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": _chat_logprobs(choice.logprobs) if extras.logprobs else None,
            "finish_reason": finish_reason(choice.last),
            **({"token_ids": choice.token_ids} if extras.token_ids else {}),
        }

    def opening(self, index: int) -> list[dict[str, Any]]:
        return [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    def delta_choices(self, index: int, delta: Delta, extras: Extras) -> list[dict[str, Any]]:
        entries = []
        if delta.text or delta.logprobs is not None or (extras.token_ids and delta.token_ids):
            lp = _chat_logprobs([delta.logprobs]) if extras.logprobs and delta.logprobs is not None else None
            entry = {"index": index, "delta": {"content": delta.text}, "logprobs": lp, "finish_reason": None}
            entries.append({**entry, "token_ids": list(delta.token_ids)} if extras.token_ids else entry)
        if delta.finish_reason is not None:
            entries.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason(delta)})
        return entries


class CompletionFormat:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"
    prompt_param = "prompt"

    def choice(self, index: int, choice: Choice, extras: Extras) -> dict[str, Any]:
        return {"index": index, "text": choice.text,
                "logprobs": _completion_logprobs(choice.logprobs) if extras.logprobs else None,
                "finish_reason": finish_reason(choice.last),
                **({"token_ids": choice.token_ids} if extras.token_ids else {})}

    def opening(self, index: int) -> list[dict[str, Any]]:
        return []

    def delta_choices(self, index: int, delta: Delta, extras: Extras) -> list[dict[str, Any]]:
        if not (delta.text or delta.finish_reason is not None or delta.logprobs is not None
                or (extras.token_ids and delta.token_ids)):
            return []
        lp = _completion_logprobs([delta.logprobs]) if extras.logprobs and delta.logprobs is not None else None
        entry = {"index": index, "text": delta.text, "logprobs": lp, "finish_reason": finish_reason(delta)}
        return [{**entry, "token_ids": list(delta.token_ids)} if extras.token_ids else entry]


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
