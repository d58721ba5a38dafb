"""The page's routes: `/` and its assets under `/ui/`, public (a browser cannot send a bearer key when it
navigates, and they hold no data), with a strict Content-Security-Policy. Every figure and reply the page shows
comes from the API with the key the page asks for."""

from __future__ import annotations

import hashlib
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from qanat.serving.errors import error_response

# The page's own files only: no inline script or style, no other origin, not framed.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}  # revalidate each load (ETag), so an upgraded server's page is never stale


class _Asset:
    def __init__(self, body: bytes, media_type: str) -> None:
        self.body = body
        self.media_type = media_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'

    def response(self, request: Request) -> Response:
        headers = {**_HEADERS, "ETag": self.etag}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def load_assets() -> dict[str, _Asset]:
    """Every file of static/, read once: the page is a few tens of KB and a fixed set of names (no paths from
    the request ever reach the file system)."""
    static = files("qanat.webui") / "static"
    return {f.name: _Asset(f.read_bytes(), _MEDIA_TYPES[f.name[f.name.rfind("."):]])
            for f in static.iterdir() if f.name[f.name.rfind("."):] in _MEDIA_TYPES}


def page_router(auth_required: bool) -> APIRouter:
    assets = load_assets()
    page = APIRouter(include_in_schema=False)

    @page.get("/")
    async def index(request: Request) -> Response:
        return assets["index.html"].response(request)

    @page.get("/ui/auth")
    async def auth() -> JSONResponse:
        """Whether the API wants a key, so the page asks before its first call instead of after a 401. Says
        no more than any 401 does."""
        return JSONResponse({"required": auth_required}, headers=_HEADERS)

    @page.get("/ui/{name}")
    async def asset(name: str, request: Request) -> Response:
        found = assets.get(name)
        if found is None or name == "index.html":
            return error_response(404, f"no such file: /ui/{name}", "invalid_request_error", code="not_found")
        return found.response(request)

    return page
