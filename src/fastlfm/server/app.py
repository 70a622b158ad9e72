"""The FastAPI app: OpenAI-compatible routes, API-key check, errors, metrics.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (+ /v1/models/{id}),
GET /health, GET /metrics.  Every error, including FastAPI's own (bad JSON, bad fields,
unknown route), is answered in the OpenAI error schema.

A client that goes away stops its generation: streams are cancelled by Starlette when the
connection drops, and non-streaming handlers watch for the disconnect themselves; either
way the engine request is aborted and its cache blocks and conv slot are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import APIError, error_body, validation_error
from .images import DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_IMAGE_BYTES, ImagePolicy
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from .serving import OpenAIServing

logger = logging.getLogger("fastlfm.server")

DEFAULT_MAX_QUEUE_LEN = 1024

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429)}
_STREAM_DOC = {"text/event-stream": {"schema": {"type": "string"}}}


def create_app(
    engine,
    served_model_name: str | list[str],
    api_key: str | None = None,
    *,
    max_queue_len: int = DEFAULT_MAX_QUEUE_LEN,
    max_concurrent: int | None = None,
    model_path: str | None = None,
    shutdown_engine: bool = False,
    allow_remote_images: bool = False,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    image_fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
) -> FastAPI:
    """An OpenAI-compatible app over an `AsyncLLMEngine`.

    `served_model_name`: the name(s) clients must send as `model`. `api_key`: when set,
    /v1 routes need `Authorization: Bearer <api_key>`. Capacity: at most `max_concurrent`
    (default: the engine's max_num_seqs) generations run, and `max_queue_len` more wait;
    beyond that requests get 429. `shutdown_engine`: shut the engine down with the app.
    Images (LFM2-VL): base64 data: URLs always; http(s) URLs only with `allow_remote_images`,
    fetched within `image_fetch_timeout` seconds; either kind at most `max_image_bytes`.
    """
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"served_model_name must be a non-empty name or list of names, got {served_model_name!r}")
    if max_queue_len < 0:
        raise ValueError(f"max_queue_len must be >= 0, got {max_queue_len}")
    if max_concurrent is None:
        inner = getattr(engine, "engine", None)
        max_concurrent = int(getattr(inner, "max_num_seqs", None) or getattr(engine, "max_num_seqs", 256))
    metrics = ServerMetrics(engine.stats, names[0])
    if max_image_bytes < 1 or image_fetch_timeout <= 0:
        raise ValueError(f"max_image_bytes and image_fetch_timeout must be positive, got {max_image_bytes} and "
                         f"{image_fetch_timeout}")
    serving = OpenAIServing(engine, names, metrics, max_pending=max_concurrent + max_queue_len,
                            image_policy=ImagePolicy(allow_remote_images, max_image_bytes, image_fetch_timeout))
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engine:
            await engine.shutdown()

    app = FastAPI(title="fastlfm OpenAI-compatible server", version=_version(), lifespan=lifespan)
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.engine = engine
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.error(exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.error(400)
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        metrics.error(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        metrics.error(500)
        return JSONResponse(error_body(500, f"Internal server error: {type(exc).__name__}"), status_code=500)

    # ------------------------------------------------------------------ routes
    @app.get("/health", summary="Liveness: 200 when the server is up")
    async def health() -> dict:
        return {}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=started, root=model_path or name, max_model_len=serving.max_model_len)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[card(n) for n in names])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        return card(serving.check_model(model_id))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**_ERRORS, 200: {"content": _STREAM_DOC}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        prep = await serving.prepare_chat_async(body)
        if body.stream:
            stream, release = serving.start_stream(prep, chat=True)
            return SSEResponse(stream, on_close=release)
        return await _unless_disconnected(request, serving.chat_response(prep))

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={**_ERRORS, 200: {"content": _STREAM_DOC}})
    async def completions(body: CompletionRequest, request: Request):
        prep = serving.prepare_completion(body)
        if body.stream:
            stream, release = serving.start_stream(prep, chat=False)
            return SSEResponse(stream, on_close=release)
        return await _unless_disconnected(request, serving.completion_response(prep))

    return app


class SSEResponse(StreamingResponse):
    """Server-sent events whose stream is always closed and whose capacity is always
    released, however the response ends (done, client gone, send failed)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # aborts the engine requests if cut short
            self._on_close()


async def _unless_disconnected(request: Request, work) -> Any:
    """Run `work` but cancel it (aborting its engine requests) if the client disconnects."""
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    return task.result()


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1 routes (health and metrics stay open)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            auth = Headers(scope=scope).get("authorization")
            scheme, _, token = (auth or "").partition(" ")
            if auth is None:
                error = APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
            elif scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self._key):
                error = APIError(401, "Incorrect API key provided", code="invalid_api_key")
            else:
                error = None
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _version() -> str:
    try:
        from .. import __version__
    except ImportError:  # pragma: no cover
        return "0"
    return __version__
