"""POST /v1/moderations in OpenAI's shape, answered by Qanat's own detectors (qanat/guard/), offline.

Only categories Qanat really detects are reported (`pii`, `pii/phone`, ..., `prompt_injection`,
`blocked_topic`, `language`), so the official clients' `moderations.create` works and nobody reads a
"harassment: false" that was never checked. Each result also carries a `qanat` object: the language, the
script and the spans, in the input string's characters.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from qanat.engine.errors import InvalidRequestError
from qanat.guard.scan import Scanner
from qanat.guard.spans import CATEGORIES
from qanat.serving.state import app_state

router = APIRouter(prefix="/v1")
MODEL = "qanat-guard-1"
_DEFAULT_SCANNER = Scanner()  # without a policy: every detector, no language allow-list, no topics
_MAX_INPUTS = 256


class TextInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: StrictStr | None = None


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=_MAX_INPUTS)] | Annotated[
        list[TextInput], Field(min_length=1, max_length=_MAX_INPUTS)]
    model: StrictStr | None = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        texts = []
        for i, item in enumerate(self.input):
            if isinstance(item, str):
                texts.append(item)
                continue
            assert isinstance(item, TextInput)
            if item.type != "text" or item.text is None:
                raise InvalidRequestError(f"input[{i}]: only text is moderated here", param="input")
            texts.append(item.text)
        return texts


@router.post("/moderations")
async def moderations(body: ModerationRequest, request: Request) -> dict[str, Any]:
    state = app_state(request)
    scanner = state.guard.scanner if state.guard is not None else _DEFAULT_SCANNER
    results = []
    for text in body.texts():
        start = time.perf_counter()
        # Long texts in a worker thread, so one big input does not hold up every stream (about 1 ms per KB).
        result = scanner.scan(text) if len(text) <= 16_384 else await asyncio.to_thread(scanner.scan, text)
        state.metrics.guardrail_seconds("moderation", time.perf_counter() - start)
        categories = result.categories
        language = result.language
        results.append({
            "flagged": any(categories.values()),
            "categories": categories,
            "category_scores": {c: round(result.scores[c], 4) for c in CATEGORIES},
            "category_applied_input_types": {c: ["text"] for c in CATEGORIES},
            "qanat": {
                "language": language.language if language is not None else None,
                "language_score": round(language.score, 4) if language is not None else None,
                "script": language.script if language is not None else None,
                "script_shares": {k: round(v, 4) for k, v in language.script_shares.items()} if language else {},
                "spans": [{"category": s.category, "start": s.start, "end": s.end, "score": s.score, "rule": s.rule}
                          for s in result.spans],
            },
        })
    return {"id": f"modr-{uuid.uuid4().hex}", "model": body.model or MODEL, "results": results}
