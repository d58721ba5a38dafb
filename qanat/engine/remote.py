"""RemoteEngine: an OpenAI-compatible upstream (vLLM, SGLang, llama-server, NIM, Groq, another `qanat serve`) as
an EngineClient. Streams through one pooled httpx client; usage, finish reasons, logprobs and errors come back
in the engine's own types.

Errors: the upstream's 4xx answers travel up unchanged (`UpstreamError`, status and body as sent); 5xx,
refused or reset connections and timeouts are `UpstreamUnavailableError`, which a router counts as the
replica's failure. An upstream that is itself `qanat serve` is recognised by its /v1/models card; it renders
prompts to token ids (its /tokenize) and streams the ids it samples, so a router can continue a stream there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic_core import to_json

from qanat.energy.accounting import EnergyTotals
from qanat.engine.client import (
    ChatPrompt,
    Delta,
    EngineHealth,
    EngineLoad,
    EngineStats,
    FinishReason,
    Logprobs,
    ModelCard,
    Prompt,
    RequestHints,
    TextPrompt,
    TokenLogprob,
    TokenPrompt,
)
from qanat.engine.errors import EngineUnavailableError, InvalidRequestError
from qanat.engine.sampling import ConstraintKind, SamplingParams
from qanat.engine.upstream_http import UpstreamHTTP, UpstreamHTTPError, UpstreamStatus


class UpstreamError(Exception):
    """A 4xx from the upstream: the client's request is at fault there; answered as the upstream answered."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"upstream answered {status}: {body}")
        self.status = status
        self.body = body


class UpstreamUnavailableError(EngineUnavailableError):
    """5xx, a refused or reset connection, a timeout, a cut stream: the replica failed this request."""


@dataclass(frozen=True)
class RemoteSettings:
    base_url: str  # ends with /v1
    model: str  # the model's name on that server
    api_key: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0
    max_connections: int = 256


class RemoteEngine:
    def __init__(self, settings: RemoteSettings, client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._client = client or httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=settings.max_connections,
                                max_keepalive_connections=settings.max_connections),
        )
        self._card = ModelCard(id=settings.model, context_length=0, owned_by="remote",
                               chip=f"remote: {settings.base_url}", energy_source="unknown", has_chat_template=True)
        self.is_qanat = False
        self._in_flight = 0
        self._energy_j = 0.0
        self._tokens = 0
        self._relay: UpstreamHTTP | None = None  # the byte relay's client (see _relay_client)
        self._relay_loop: asyncio.AbstractEventLoop | None = None

    async def connect(self) -> None:
        """Read the upstream's card (context length, whether it is Qanat); raises UpstreamUnavailableError."""
        response = await self._request("GET", "/models")
        cards = response.json().get("data", [])
        card = next((c for c in cards if c.get("id") == self.settings.model), None)
        if card is None:
            raise UpstreamUnavailableError(
                f"{self.settings.base_url} does not serve {self.settings.model!r} (it lists "
                f"{[c.get('id') for c in cards]})")
        self.is_qanat = card.get("owned_by") == "qanat"
        self._card = ModelCard(
            id=self.settings.model, context_length=int(card.get("context_length") or card.get("max_model_len") or 0),
            owned_by=str(card.get("owned_by", "remote")),
            chip=str(card.get("chip", f"remote: {self.settings.base_url}")),
            energy_source=str(card.get("energy_source", "unknown")), has_chat_template=True,
        )

    @property
    def card(self) -> ModelCard:
        return self._card

    async def render(self, prompt: Prompt) -> Prompt:
        """Qanat upstreams tokenize (so a stream can be continued elsewhere); others get the prompt as it is."""
        if not self.is_qanat or isinstance(prompt, TokenPrompt):
            return prompt
        body: dict[str, Any] = {"model": self.settings.model}
        if isinstance(prompt, ChatPrompt):
            body["messages"] = list(prompt.messages)
        else:
            body["prompt"] = prompt.text
        response = await self._request("POST", "/tokenize", json=body)
        return TokenPrompt(tuple(response.json()["tokens"]))

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                       hints: RequestHints | None = None) -> AsyncIterator[Delta]:
        chat = isinstance(prompt, ChatPrompt)
        body = self._body(prompt, params, hints)
        self._in_flight += 1
        try:
            async with self._client.stream("POST", "/chat/completions" if chat else "/completions",
                                           json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _status_error(response.status_code, response.text)
                async for delta in self._deltas(response, chat, request_id or "", params):
                    yield delta
        except httpx.HTTPError as e:
            raise UpstreamUnavailableError(f"{self.settings.base_url}: {type(e).__name__}: {e}") from e
        finally:
            self._in_flight -= 1

    async def relay(self, path: str, body: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        """The upstream's streamed answer to `body` ("/chat/completions" or "/completions"), byte for byte.

        Raises before the first bytes as `generate` does; mid-stream, UpstreamUnavailableError when the
        connection breaks or the stream ends without its `data: [DONE]` (only its tail is looked at)."""
        self._in_flight += 1
        try:
            tail = b""
            async for data in self._relay_client().post_stream(path, to_json({**body, "model": self.settings.model})):
                tail = (tail + data)[-32:]
                yield data
            if _SSE_DONE not in tail:
                raise UpstreamUnavailableError(f"{self.settings.base_url}: the stream ended before [DONE]")
        except UpstreamStatus as e:
            raise _status_error(e.status, e.body.decode("utf-8", "replace")) from None
        except UpstreamHTTPError as e:
            raise UpstreamUnavailableError(f"{self.settings.base_url}: {e}") from e
        finally:
            self._in_flight -= 1

    def _relay_client(self) -> UpstreamHTTP:
        """The relay's own client (upstream_http.py: a fraction of a general client's CPU per request). One per
        event loop: its connections belong to the loop that made them."""
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay_loop is not loop:
            headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
            self._relay = UpstreamHTTP(self.settings.base_url, headers, self.settings.max_connections,
                                       self.settings.connect_timeout_s, self.settings.read_timeout_s)
            self._relay_loop = loop
        return self._relay

    async def _deltas(self, response: httpx.Response, chat: bool, request_id: str, params: SamplingParams
                      ) -> AsyncIterator[Delta]:
        finished: Delta | None = None
        n_out = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            payload = json.loads(data)
            if "error" in payload:
                raise UpstreamUnavailableError(f"{self.settings.base_url}: {payload['error'].get('message')}")
            if payload.get("usage") and finished is not None:
                finished = self._with_usage(finished, payload["usage"])
            for choice in payload.get("choices", []):
                delta = self._delta(choice, chat, request_id, params)
                n_out += len(delta.token_ids) or (1 if delta.text or delta.logprobs else 0)
                if delta.finish_reason is not None:
                    finished = Delta(**{**delta.__dict__, "num_output_tokens": n_out})
                elif delta.text or delta.token_ids or delta.logprobs:
                    yield delta
        if finished is None:
            raise UpstreamUnavailableError(f"{self.settings.base_url}: the stream ended before its last token")
        if finished.energy_j:
            self._energy_j += finished.energy_j
            self._tokens += finished.num_prompt_tokens + finished.num_output_tokens
        yield finished

    def _delta(self, choice: dict[str, Any], chat: bool, request_id: str, params: SamplingParams) -> Delta:
        text = (choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or ""
        reason = choice.get("finish_reason")
        return Delta(
            request_id=request_id, text=text, token_ids=tuple(choice.get("token_ids") or ()),
            num_prompt_tokens=0, num_cached_tokens=0, num_output_tokens=0,
            finish_reason=_FINISH.get(reason, FinishReason.STOP) if reason else None,
            logprobs=_logprobs(choice.get("logprobs"), chat) if params.logprobs is not None else None,
        )

    @staticmethod
    def _with_usage(delta: Delta, usage: dict[str, Any]) -> Delta:
        details = usage.get("prompt_tokens_details") or {}
        return Delta(**{
            **delta.__dict__, "num_prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "num_output_tokens": int(usage.get("completion_tokens") or delta.num_output_tokens),
            "num_cached_tokens": int(details.get("cached_tokens") or 0),
            "energy_j": usage.get("energy_joules"),
        })

    def _body(self, prompt: Prompt, params: SamplingParams, hints: RequestHints | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.settings.model, "stream": True,
                                "stream_options": {"include_usage": True}}
        if isinstance(prompt, ChatPrompt):
            body["messages"] = list(prompt.messages)
        elif isinstance(prompt, TextPrompt):
            body["prompt"] = prompt.text
        else:
            body["prompt"] = list(prompt.token_ids)
            if prompt.generated_ids:
                body["continue_token_ids"] = list(prompt.generated_ids)  # Qanat's extension
        if self.is_qanat:
            body["return_token_ids"] = True
        defaults = SamplingParams()
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "max_tokens"):
            value = getattr(params, name)
            if value != getattr(defaults, name) or name in ("temperature", "max_tokens"):
                body[name] = value
        if params.stop:
            body["stop"] = list(params.stop)
        if params.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in params.logit_bias}
        if params.logprobs is not None:
            if isinstance(prompt, ChatPrompt):
                body.update(logprobs=True, top_logprobs=params.logprobs)
            else:
                body["logprobs"] = params.logprobs
        # Extensions (vLLM's and llama.cpp's names), sent only when set: strict upstreams refuse unknown fields.
        for name, default in (("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0), ("ignore_eos", False)):
            if getattr(params, name) != default:
                body[name] = getattr(params, name)
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if not params.speculative and self.is_qanat:
            body["speculative"] = False
        if params.constraint is not None:
            body["response_format"] = _response_format(params)
        if hints is not None and hints.user is not None:
            body["user"] = hints.user
        return body

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise UpstreamUnavailableError(f"{self.settings.base_url}: {type(e).__name__}: {e}") from e
        if response.status_code != 200:
            raise _status_error(response.status_code, response.text)
        return response

    async def probe(self, health_url: str) -> bool:
        """One active health check; True when the upstream answers 200."""
        try:
            return (await self._client.get(health_url, timeout=self.settings.connect_timeout_s)).status_code == 200
        except httpx.HTTPError:
            return False

    async def abort(self, request_id: str) -> None:
        """Leaving `generate`'s stream closes the connection, which cancels the request upstream."""

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        prompt = await self.render(TextPrompt(text))
        if not isinstance(prompt, TokenPrompt):
            raise InvalidRequestError(f"{self.settings.base_url} does not tokenize", param="prompt")
        return list(prompt.token_ids)

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        raise InvalidRequestError(f"{self.settings.base_url} does not detokenize", param="tokens")

    async def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        raise InvalidRequestError(f"{self.settings.base_url} renders its own chat template", param="messages")

    def health(self) -> EngineHealth:
        return EngineHealth(ready=True, detail="remote")

    def load(self) -> EngineLoad:
        return EngineLoad(num_running=self._in_flight, num_waiting=0, kv_usage=0.0)

    def stats(self) -> EngineStats:
        energy = EnergyTotals(self._card.energy_source, self._energy_j, self._energy_j, 0.0, self._tokens)
        return EngineStats(load=self.load(), prefix_cache_hit_tokens=0, prompt_tokens=0, energy=energy,
                           executor_restarts=0, steps=0, step_s=0.0, boundary_s=0.0)

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._relay is not None and self._relay_loop is asyncio.get_running_loop():
            self._relay.close()

    def shutdown(self) -> None:
        """The pooled client is closed by `aclose` on the event loop that used it."""


_SSE_DONE = b"data: [DONE]"  # how an OpenAI stream ends

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "tool_calls": FinishReason.STOP,
           "content_filter": FinishReason.STOP}


def _status_error(status: int, text: str) -> Exception:
    try:
        body = json.loads(text)
    except ValueError:
        body = {"error": {"message": text[:500], "type": "upstream_error", "param": None, "code": None}}
    if 400 <= status < 500:
        return UpstreamError(status, body)
    message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    return UpstreamUnavailableError(f"upstream answered {status}: {message or body}")


def _response_format(params: SamplingParams) -> dict[str, Any]:
    constraint = params.constraint
    assert constraint is not None
    if constraint.kind is ConstraintKind.JSON_OBJECT:
        return {"type": "json_object"}
    if constraint.kind is ConstraintKind.JSON_SCHEMA:
        schema = json.loads(constraint.spec or "{}")
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    raise InvalidRequestError("a GBNF grammar cannot be sent to a remote OpenAI-compatible server",
                              param=constraint.param or "grammar")  # "tools" for a forced tool call


def _logprobs(raw: dict[str, Any] | None, chat: bool) -> Logprobs | None:
    """The last token's log-probabilities from an OpenAI logprobs object (chat or legacy completions)."""
    if not raw:
        return None
    if chat:
        content = raw.get("content") or []
        if not content:
            return None
        last = content[-1]

        def entry(item: dict[str, Any]) -> TokenLogprob:
            return TokenLogprob(-1, item["token"], bytes(item.get("bytes") or item["token"].encode()), item["logprob"])

        return Logprobs(entry(last), tuple(entry(t) for t in last.get("top_logprobs") or ()))
    tokens, values = raw.get("tokens") or [], raw.get("token_logprobs") or []
    if not tokens:
        return None
    tops = (raw.get("top_logprobs") or [{}])[-1] or {}
    chosen = TokenLogprob(-1, tokens[-1], tokens[-1].encode(), values[-1])
    return Logprobs(chosen, tuple(TokenLogprob(-1, t, t.encode(), lp) for t, lp in tops.items()))

