"""OpenAI's response shapes, one class per endpoint: the only part of a request's path that differs between
/v1/chat/completions and /v1/completions (see `pipeline.py` for the steps they share)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from qanat.engine.client import Delta, FinishReason, Logprobs, TokenLogprob
from qanat.serving.tools import CallDelta, Piece, ToolCallParser


@dataclass(frozen=True)
class ChoiceDelta:
    """What one engine delta adds to a choice, as the client sees it."""

    content: str
    tool_calls: list[CallDelta]
    logprobs: Logprobs | None
    token_ids: tuple[int, ...]
    finish_reason: str | None


@dataclass
class Choice:
    """One choice's accumulated output; `tools` splits it into text and tool calls when the request has tools."""

    text: str = ""
    logprobs: list[Logprobs] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    last: Delta | None = None
    tools: ToolCallParser | None = None
    filtered: bool = False  # the output guardrails blocked the rest of this choice

    def add(self, delta: Delta) -> ChoiceDelta:
        piece = Piece(delta.text) if self.tools is None else self.tools.feed(delta.text)
        if self.tools is not None and delta.finish_reason is not None:
            piece = piece.then(self.tools.finish())
        self.text += piece.content
        if delta.logprobs is not None:
            self.logprobs.append(delta.logprobs)
        self.token_ids.extend(delta.token_ids)
        self.last = delta
        return ChoiceDelta(piece.content, piece.calls, delta.logprobs, delta.token_ids, self.finish_reason)

    def tool_calls(self) -> list[dict[str, Any]]:
        return self.tools.tool_calls() if self.tools is not None else []

    @property
    def finish_reason(self) -> str | None:
        if self.filtered:
            return "content_filter"
        if self.last is not None and self.last.finish_reason is FinishReason.STOP and self.tool_calls():
            return "tool_calls"
        return finish_reason(self.last)


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

    def delta_choices(self, index: int, update: ChoiceDelta, extras: Extras) -> list[dict[str, Any]]: ...


class ChatFormat:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    prompt_param = "messages"

    def choice(self, index: int, choice: Choice, extras: Extras) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        if calls := choice.tool_calls():
            message = {"role": "assistant", "content": choice.text or None, "tool_calls": calls}
        return {
            "index": index,
            "message": message,
            "logprobs": _chat_logprobs(choice.logprobs) if extras.logprobs else None,
            "finish_reason": choice.finish_reason,
            **({"token_ids": choice.token_ids} if extras.token_ids else {}),
        }

    def opening(self, index: int) -> list[dict[str, Any]]:
        return [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    def delta_choices(self, index: int, update: ChoiceDelta, extras: Extras) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        lp = _chat_logprobs([update.logprobs]) if extras.logprobs and update.logprobs is not None else None
        ids: dict[str, Any] = {"token_ids": list(update.token_ids)} if extras.token_ids else {}
        if update.content or (not update.tool_calls and (update.logprobs is not None or ids and update.token_ids)):
            entries.append({"index": index, "delta": {"content": update.content}, "logprobs": lp,
                            "finish_reason": None, **ids})
            lp, ids = None, {}
        for call in update.tool_calls:  # one chunk each: a call's id and name come before its arguments
            entries.append({"index": index, "delta": {"tool_calls": [call.as_openai()]}, "logprobs": lp,
                            "finish_reason": None, **ids})
            lp, ids = None, {}
        if update.finish_reason is not None:
            entries.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": update.finish_reason})
        return entries


class CompletionFormat:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"
    prompt_param = "prompt"

    def choice(self, index: int, choice: Choice, extras: Extras) -> dict[str, Any]:
        return {"index": index, "text": choice.text,
                "logprobs": _completion_logprobs(choice.logprobs) if extras.logprobs else None,
                "finish_reason": choice.finish_reason,
                **({"token_ids": choice.token_ids} if extras.token_ids else {})}

    def opening(self, index: int) -> list[dict[str, Any]]:
        return []

    def delta_choices(self, index: int, update: ChoiceDelta, extras: Extras) -> list[dict[str, Any]]:
        if not (update.content or update.finish_reason is not None or update.logprobs is not None
                or (extras.token_ids and update.token_ids)):
            return []
        lp = _completion_logprobs([update.logprobs]) if extras.logprobs and update.logprobs is not None else None
        entry = {"index": index, "text": update.content, "logprobs": lp, "finish_reason": update.finish_reason}
        return [{**entry, "token_ids": list(update.token_ids)} if extras.token_ids else entry]


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
