"""OpenAI-compatible routes. Each handler names its endpoint's format; the pipeline does the rest."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from qanat.engine.client import TokenPrompt
from qanat.engine.errors import InvalidRequestError
from qanat.router.router import ModelRouter
from qanat.serving.formats import ChatFormat, CompletionFormat
from qanat.serving.pipeline import admit_model, handle
from qanat.serving.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from qanat.serving.state import app_state

router = APIRouter(prefix="/v1")
_CHAT = ChatFormat()
_COMPLETION = CompletionFormat()


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = app_state(request)
    data = []
    for engine in state.models:
        card = engine.card
        entry: dict[str, Any] = {
            "id": card.id,
            "object": "model",
            "created": state.started_at,
            # "qanat" tells a router in front of this server that it is a Qanat engine (token ids in and out).
            "owned_by": "qanat",
            "context_length": card.context_length,
            "max_model_len": card.context_length,  # vLLM's name for it, which some clients read
            "energy_source": card.energy_source,
            "chip": card.chip,
        }
        if isinstance(engine, ModelRouter):
            entry["replicas"] = engine.replica_states()
        data.append(entry)
    return {"object": "list", "data": data}


@router.post("/tokenize", include_in_schema=True)
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """vLLM's /tokenize: a prompt or chat messages as this model's token ids."""
    engine = admit_model(app_state(request), body.model)
    rendered = await engine.render(body.prompt_of())
    if not isinstance(rendered, TokenPrompt):
        raise InvalidRequestError(f"model {body.model} is served by an engine that does not tokenize", param="model")
    return {"tokens": list(rendered.token_ids), "count": len(rendered.token_ids),
            "max_model_len": engine.card.context_length}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await handle(body, _CHAT, request)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await handle(body, _COMPLETION, request)
