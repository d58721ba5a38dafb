"""LocalEngine: the EngineClient of an engine core in this process (its executor may live in a child process).

Caller-side work happens here, off the event loop where it costs: chat templates and tokenization run in a
worker thread; sizes are checked against the context before a request is queued.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from qanat.config import RuntimeInfo
from qanat.engine.client import (
    ChatPrompt,
    Delta,
    EngineHealth,
    EngineLoad,
    EngineStats,
    ErrorKind,
    ModelCard,
    Prompt,
    RequestError,
    RequestHints,
    TokenPrompt,
)
from qanat.engine.core.detokenizer import IncrementalDetokenizer
from qanat.engine.core.loop import EngineCore, Stream
from qanat.engine.core.request import Request
from qanat.engine.errors import EngineUnavailableError, InvalidRequestError, RequestFailedError
from qanat.engine.executors.base import Tokenizer
from qanat.engine.sampling import SamplingParams
from qanat.models.chat_template import ChatTemplate, ChatTemplateError


class LocalEngine:
    def __init__(self, runtime: RuntimeInfo, tokenizer: Tokenizer, chat_template: ChatTemplate | None,
                 core: EngineCore) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.core = core
        self._card = ModelCard(
            id=runtime.model_id, context_length=runtime.context_length, owned_by="qanat", chip=runtime.chip,
            energy_source=runtime.energy_source, has_chat_template=chat_template is not None,
            tool_call_format=chat_template.tool_call_format if chat_template is not None else None,
        )

    @property
    def card(self) -> ModelCard:
        return self._card

    # -- rendering: synchronous versions for the worker thread and for in-process callers ------------------

    def render_chat(self, messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(
                f"model {self.runtime.model_id} has no chat template (tokenizer.chat_template): use /v1/completions"
            )
        return self.chat_template.render(messages, add_generation_prompt=True, tools=tools)

    def render_sync(self, prompt: Prompt) -> TokenPrompt:
        if isinstance(prompt, TokenPrompt):
            return prompt
        if isinstance(prompt, ChatPrompt):
            # The rendered template carries its own special tokens, as with transformers' apply_chat_template.
            try:
                text = self.render_chat(prompt.messages, prompt.tools)
            except ChatTemplateError as e:
                raise InvalidRequestError(str(e), param="prompt") from e
            return TokenPrompt(tuple(self.tokenizer.tokenize(text, add_special=False)))
        return TokenPrompt(tuple(self.tokenizer.tokenize(prompt.text, add_special=True)))

    # -- EngineClient ---------------------------------------------------------------------------------------

    async def render(self, prompt: Prompt) -> Prompt:
        if isinstance(prompt, TokenPrompt):
            return prompt
        return await asyncio.to_thread(self.render_sync, prompt)

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                       hints: RequestHints | None = None) -> AsyncIterator[Delta]:
        tokens = await self.render(prompt)
        assert isinstance(tokens, TokenPrompt)
        request = self.make_request(list(tokens.token_ids), params, request_id, list(tokens.generated_ids))
        stream = Stream(request, IncrementalDetokenizer(self.tokenizer.token_bytes, params.stop),
                        asyncio.get_running_loop(), asyncio.Queue())
        self.core.submit(stream)
        finished = False
        try:
            while not finished:
                delta = await stream.sink.get()
                finished = delta.finish_reason is not None
                if delta.error is not None:
                    raise _exception(delta.error)
                yield delta
        finally:
            if not finished:
                self.core.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return await asyncio.to_thread(self.tokenizer.tokenize, text, add_special)

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        return b"".join(self.tokenizer.token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")

    async def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return await asyncio.to_thread(self.render_chat, messages)

    def health(self) -> EngineHealth:
        return self.core.health()

    def load(self) -> EngineLoad:
        return self.core.load()

    def stats(self) -> EngineStats:
        return self.core.stats()

    def shutdown(self) -> None:
        self.core.shutdown()
        close = getattr(self.tokenizer, "close", None)
        if close is not None:
            close()

    # -- checks -----------------------------------------------------------------------------------------

    def make_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     replay_ids: list[int] | None = None) -> Request:
        """Validate sizes against the context and ids against the vocabulary; errors name the numbers.

        `replay_ids` (a continuation) count as output: max_tokens covers them."""
        n_prompt = len(prompt_ids)
        n_vocab = self.tokenizer.n_vocab
        context = self.runtime.context_length
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        replay_ids = replay_ids or []
        if any(not 0 <= t < n_vocab for t in (*prompt_ids, *replay_ids)):
            raise InvalidRequestError(f"prompt token ids must be in 0..{n_vocab - 1}", param="prompt")
        if params.max_tokens is not None and len(replay_ids) >= params.max_tokens:
            raise InvalidRequestError(f"max_tokens ({params.max_tokens}) leaves nothing to generate after the "
                                      f"{len(replay_ids)} tokens to continue from", param="max_tokens")
        for token_id, _ in params.logit_bias:
            if not 0 <= token_id < n_vocab:
                raise InvalidRequestError(
                    f"logit_bias token id {token_id} is outside the vocabulary (0..{n_vocab - 1})", param="logit_bias")
        if n_prompt >= context:
            raise InvalidRequestError(
                f"the prompt has {n_prompt} tokens, but the context holds {context} tokens per request "
                f"(prompt plus output); shorten the prompt or start the server with a larger --ctx",
                param="prompt",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else context - n_prompt
        if n_prompt + max_tokens > context:
            raise InvalidRequestError(
                f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) is {n_prompt + max_tokens} "
                f"tokens, more than the {context} tokens of context per request",
                param="max_tokens",
            )
        return Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=list(prompt_ids),
            params=params,
            max_tokens=max_tokens,
            eog_ids=self.tokenizer.eog_ids,
            replay_ids=replay_ids,
        )


def _exception(error: RequestError) -> Exception:
    if error.kind is ErrorKind.INVALID:
        return InvalidRequestError(error.message, error.param)
    if error.kind is ErrorKind.UNAVAILABLE:
        return EngineUnavailableError(error.message)
    return RequestFailedError(error.message)

