"""The FastAPI app: OpenAI-compatible routes, API-key check, errors, metrics.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (+ /v1/models/{id}),
GET /health, GET /metrics.  Every error, including FastAPI's own (bad JSON, bad fields,
unknown route), is answered in the OpenAI error schema, and counted once in /metrics by the
status actually sent (the app's outermost layer watches every response).

Request bodies are read up to `max_request_bytes` (FastAPI's max_body_size: a larger one is a
413 as soon as that is known, from its Content-Length or while it streams in), then parsed,
validated, templated and tokenized off the event loop (see `OpenAIServing.prepare_chat_body`),
so /health and the streams of other clients never wait for a big request.

A client that goes away stops its generation: streams are cancelled by Starlette when the
connection drops, and non-streaming handlers watch for the disconnect themselves; either
way the engine request is aborted and its cache blocks and conv slot are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
from starlette.requests import ClientDisconnect

from ..engine.async_engine import EngineDeadError
from .errors import APIError, engine_unavailable, error_body, validation_error
from .http import OVER_CAPACITY
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
_TEXT_REQUEST_BYTES = 4 * 1024 * 1024
PROBE_PATHS = ("/health", "/metrics")  # still served on connections beyond the connection cap

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429)}
_STREAM_DOC = {"text/event-stream": {"schema": {"type": "string"}}}


def default_max_request_bytes(image_bytes: int | None) -> int:
    """The default body cap: 4 MiB (a full 128k-token context is about 0.5 MB of text), or, for a
    model that takes images, enough for one image of `image_bytes` as a base64 data: URL + 1 MiB."""
    if image_bytes is None:
        return _TEXT_REQUEST_BYTES
    return max(_TEXT_REQUEST_BYTES, 4 * -(-image_bytes // 3) + 1024 * 1024)


class _ClientGone(Exception):
    """The client disconnected (or was disconnected) before its request body arrived."""


async def read_body(request: Request) -> bytes:
    """The request body (JSON only). Its size is capped by FastAPI's max_body_size (a 413, from the
    Content-Length before anything is read, or once the bytes read pass the cap)."""
    content_type = request.headers.get("content-type")
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        if not (media == "application/json" or media.startswith("application/") and media.endswith("+json")):
            raise APIError(415, f"The request body must be JSON (Content-Type: application/json), got {content_type!r}",
                           code="unsupported_media_type")
    try:
        return await request.body()
    except ClientDisconnect:
        raise _ClientGone from None
    except StarletteHTTPException as e:  # FastAPI's body-size limit, raised from the body's stream
        if e.status_code == 413:
            raise _too_large_error(request.app.state.max_request_bytes) from None
        raise


class _ServerApp(FastAPI):
    """FastAPI plus the outermost layer of the app:
    - every error response is counted once in /metrics, by the status sent, wherever it came from
      (handlers, middleware, FastAPI itself);
    - FastAPI's body-size limit answers a plain-text 413 (Starlette's RequestBodyLimitMiddleware
      replaces any response to a request whose Content-Length is over the cap): it is rewritten
      here into the OpenAI error schema, naming the limit, and the connection closed (the rest of
      the body is not read);
    - connections beyond the server's connection cap (flagged by the protocol, see http.py) get
      a 503, except health probes."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        metrics: ServerMetrics = self.state.metrics
        too_large = False

        async def outer_send(message) -> None:
            nonlocal too_large
            if message["type"] == "http.response.start":
                status = message["status"]
                # 499: the client went away first (counted as an aborted request, not an error sent).
                if status >= 400 and status != 499:
                    metrics.error(status)
                if status == 413 and not _is_json(message.get("headers", ())):
                    too_large = True
                    response = _too_large(self.state.max_request_bytes)
                    message = {**message, "headers": response.raw_headers}
                    await send(message)
                    await send({"type": "http.response.body", "body": response.body, "more_body": False})
                    return
            elif too_large:
                return  # the plain-text body was replaced
            await send(message)

        limit = (scope.get("state") or {}).get(OVER_CAPACITY)
        if limit is not None and scope["path"] not in PROBE_PATHS:
            error = APIError(503, f"The server has reached its limit of {limit} open connections; retry later",
                             code="too_many_connections", headers={"Retry-After": "1", "Connection": "close"})
            await error.response()(scope, receive, outer_send)
            return
        await super().__call__(scope, receive, outer_send)


def _is_json(headers) -> bool:
    return any(k.lower() == b"content-type" and b"json" in v.lower() for k, v in headers)


def _too_large_error(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes "
                         "(fastlfm serve --max-request-bytes)", code="request_too_large",
                    headers={"Connection": "close"})  # the rest of the body is not read


def _too_large(limit: int) -> Response:
    return _too_large_error(limit).response()


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
    max_request_bytes: int | None = None,
) -> FastAPI:
    """An OpenAI-compatible app over an `AsyncLLMEngine`.

    `served_model_name`: the name(s) clients must send as `model`. `api_key`: when set,
    /v1 routes need `Authorization: Bearer <api_key>`. Capacity: at most `max_concurrent`
    (default: the engine's max_num_seqs) generations run, and `max_queue_len` more wait;
    beyond that requests get 429. `shutdown_engine`: shut the engine down with the app.
    Images (LFM2-VL): base64 data: URLs always; http(s) URLs only with `allow_remote_images`,
    fetched within `image_fetch_timeout` seconds; either kind at most `max_image_bytes`.
    Request bodies: at most `max_request_bytes` (default: `default_max_request_bytes`).
    Serve it with `fastlfm.server.http.make_server` for the connection-level limits.
    """
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"served_model_name must be a non-empty name or list of names, got {served_model_name!r}")
    if max_queue_len < 0:
        raise ValueError(f"max_queue_len must be >= 0, got {max_queue_len}")
    if max_concurrent is None:
        max_concurrent = int(engine.max_num_seqs)
    metrics = ServerMetrics(engine.stats, names[0])
    if max_image_bytes < 1 or image_fetch_timeout <= 0:
        raise ValueError(f"max_image_bytes and image_fetch_timeout must be positive, got {max_image_bytes} and "
                         f"{image_fetch_timeout}")
    serving = OpenAIServing(engine, names, metrics, max_pending=max_concurrent + max_queue_len,
                            image_policy=ImagePolicy(allow_remote_images, max_image_bytes, image_fetch_timeout))
    if max_request_bytes is None:
        max_request_bytes = default_max_request_bytes(max_image_bytes if serving.processor is not None else None)
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            serving.close()
            if shutdown_engine:
                await engine.shutdown()

    app = _ServerApp(title="fastlfm OpenAI-compatible server", version=_version(), lifespan=lifespan,
                     max_body_size=max_request_bytes)
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.max_request_bytes = max_request_bytes
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    # ------------------------------------------------------------------ errors
    # (counted in /metrics by _ServerApp, from the status of the response sent)
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, exc: _ClientGone):
        return Response(status_code=499)  # nobody is listening

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        elif exc.status_code == 413:  # FastAPI's max_body_size
            return _too_large(max_request_bytes)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError):
        return engine_unavailable(exc).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"Internal server error: {type(exc).__name__}"), status_code=500)

    # ------------------------------------------------------------------ routes
    @app.get("/health", summary="Liveness: 200 when the server is up, 503 when its engine is gone")
    async def health() -> Response:
        if engine.error is not None:
            return engine_unavailable(engine.error).response()
        return Response("{}", media_type="application/json")

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

    # The bodies are read and parsed by the handlers (size cap, off the event loop); their
    # schemas are documented through openapi_extra and added to the components by _openapi.
    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**_ERRORS, 200: {"content": _STREAM_DOC}}, openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        prep = await serving.prepare_chat_body(await read_body(request))
        if prep.stream:
            stream, release = serving.start_stream(prep, chat=True)
            return SSEResponse(stream, on_close=release)
        return await _unless_disconnected(request, serving.chat_response(prep))

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={**_ERRORS, 200: {"content": _STREAM_DOC}}, openapi_extra=_json_body(CompletionRequest))
    async def completions(request: Request):
        prep = await serving.prepare_completion_body(await read_body(request))
        if prep.stream:
            stream, release = serving.start_stream(prep, chat=False)
            return SSEResponse(stream, on_close=release)
        return await _unless_disconnected(request, serving.completion_response(prep))

    app.openapi = functools.partial(_openapi, app, (ChatCompletionRequest, CompletionRequest))
    return app


def _json_body(model: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _openapi(app: FastAPI, request_models: tuple[type, ...]) -> dict:
    """FastAPI's schema plus the request bodies' schemas (the routes read their bodies themselves)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in request_models:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in body.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = body
    return app.openapi_schema


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
