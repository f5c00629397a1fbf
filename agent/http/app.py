"""The ASGI app (FastAPI): the OpenAI-compatible routes, /health and /metrics, and every error
in OpenAI's shape (unknown paths 404, wrong methods 405)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.http.door import HttpDoor
from agent.http.errors import ApiError, bad_request

OWNER = "vllm-deploy"
_STARTED = int(time.time())


def build_app(door: HttpDoor, *, max_body_bytes: int, healthy: Callable[[], bool],
              metrics: Callable[[], tuple[bytes, str]] | None,
              cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """``healthy()``: the model is loaded and the engine loop alive; ``metrics()``: the
    Prometheus exposition (body, content type), None without prometheus-client."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: "no such path", 405: "method not allowed"}.get(exc.status_code,
                                                                      str(exc.detail))
        err = ApiError(exc.status_code, message, "invalid_request_error",
                       {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
        return JSONResponse(err.body(), status_code=err.status, headers=exc.headers)

    def client(request: Request) -> str:
        address = request.client.host if request.client else "unknown"
        return door.client(request.headers.get("authorization"), address)

    def model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": _STARTED, "owned_by": OWNER}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        client(request)
        return {"object": "list", "data": [model_card(m) for m in door.models.all()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        client(request)
        door.models.resolve(model_id)  # 404 for an unknown one (a lookup, not a request)
        return model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        who = client(request)
        return respond(await door.chat(await body_of(request), who, request.is_disconnected))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        who = client(request)
        return respond(await door.completion(await body_of(request), who,
                                             request.is_disconnected))

    @app.get("/health")
    async def health() -> Response:
        ok = healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable"},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            raise ApiError(404, "metrics need the prometheus-client package",
                           "invalid_request_error", "not_found")
        body, content_type = metrics()
        return Response(body, media_type=content_type)

    async def body_of(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise too_large(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_large(size)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            door.refused()
            raise bad_request("the request body is not JSON") from None

    def too_large(size: int) -> ApiError:
        door.refused()
        return ApiError(413, f"the request is too large ({size} bytes; the limit is "
                        f"{max_body_bytes} bytes)", "invalid_request_error", "too_long")

    def respond(result: dict[str, Any] | AsyncIterator[str]) -> Any:
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app
