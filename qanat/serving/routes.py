"""OpenAI-compatible routes. Each handler names its endpoint's format; the pipeline does the rest."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from qanat.serving.formats import ChatFormat, CompletionFormat
from qanat.serving.pipeline import handle
from qanat.serving.protocol import ChatCompletionRequest, CompletionRequest
from qanat.serving.state import app_state

router = APIRouter(prefix="/v1")
_CHAT = ChatFormat()
_COMPLETION = CompletionFormat()


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = app_state(request)
    card = state.engine.card
    return {"object": "list", "data": [{
        "id": card.id,
        "object": "model",
        "created": state.started_at,
        "owned_by": card.owned_by,
        "context_length": card.context_length,
        "max_model_len": card.context_length,  # vLLM's name for it, which some clients read
        "energy_source": card.energy_source,
        "chip": card.chip,
    }]}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await handle(body, _CHAT, request)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await handle(body, _COMPLETION, request)
