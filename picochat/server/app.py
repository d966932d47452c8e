"""The HTTP face of an Engine: the OpenAI API, /health, /metrics and /tokenize, and ``serve()``.

The engine loads on a background thread, so /health answers 503 (and the API 503 with
Retry-After) until it is ready. Handlers never block the event loop: tokenizing, submitting and
scraping run in the thread pool, and deltas arrive through ``async for delta in stream``. A client
that disconnects cancels its request, which frees its KV blocks. Client mistakes are 4xx with an
OpenAI error body; a 500 means a bug or an engine failure.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import AsyncIterator, Callable

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from picochat.engine.protocol import Delta, Engine, Prompt, Stream, now, share_gil_promptly
from picochat.errors import ConfigError, EngineClosedError, ModelLoadError, PicochatError, QueueFullError
from picochat.server.prom import ServerMetrics
from picochat.server.responses import DONE, ResponseShape, error_event
from picochat.server.schemas import (COMPLETIONS_DEFAULT_MAX_TOKENS, ApiError, ChatCompletionRequest,
                                     CompletionRequest, SamplingRequest, TokenizeRequest, parse_body)

log = logging.getLogger("uvicorn.error")  # so our lines share uvicorn's format
RETRY_AFTER_S = "1"


class EngineSlot:
    """The engine: loading on a background thread, then serving, then closed."""

    def __init__(self, factory: Callable[[], Engine], on_load_error: Callable[[], None] | None = None):
        self._factory = factory
        self._on_load_error = on_load_error
        self._lock = threading.Lock()
        self._closed = False
        self.engine: Engine | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        threading.Thread(target=self._load, name="picochat-load", daemon=True).start()

    def _load(self) -> None:
        try:
            engine = self._factory()
        except Exception as e:  # reported through /health and serve()
            if not isinstance(e, PicochatError):
                log.exception("loading the engine failed")
            self.error = e
            if self._on_load_error is not None:
                self._on_load_error()
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self.engine = engine
        if closed:
            engine.close()
        else:
            log.info("model loaded: %s", engine.info.model)

    def ready(self) -> Engine:
        if self.engine is not None:
            return self.engine
        if self.error is not None:
            raise ApiError(f"the model failed to load: {self.error}", 503, type="service_unavailable")
        raise ApiError("the model is still loading", 503, type="service_unavailable",
                       headers={"Retry-After": RETRY_AFTER_S})

    def close(self) -> None:
        with self._lock:
            self._closed = True
            engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()


def _api_error(e: PicochatError) -> ApiError:
    """Map the engine's one-line errors onto HTTP."""
    if isinstance(e, QueueFullError):
        return ApiError(str(e), 429, type="rate_limit_error", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(e, EngineClosedError):
        return ApiError(str(e), 503, type="service_unavailable")
    return ApiError(str(e))


async def _cancel_on_disconnect(request: Request, stream: Stream) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


async def _observed(stream: Stream, metrics: ServerMetrics) -> AsyncIterator[Delta]:
    """The stream's deltas; the finished request goes into the metrics with its first token and
    its end timed when they reached this event loop on their way to the client (the engine's
    times plus the loop's wake-up), which is closer to what the client measures."""
    first_served: float | None = None
    async for delta in stream:
        if first_served is None and delta.token_ids:
            first_served = now()
        if delta.finished and delta.timings is not None:
            served = delta.timings if first_served is None else replace(
                delta.timings, first_token=first_served, finished=now())
            metrics.observe(served)
        yield delta


_abandoned: set[asyncio.Task] = set()  # drains of cancelled streams (a reference keeps them alive)


async def _drain(deltas: AsyncIterator[Delta]) -> None:
    async for _ in deltas:
        pass


async def _deltas(request: Request, stream: Stream, metrics: ServerMetrics) -> AsyncIterator[Delta]:
    """The request's deltas; if the client goes away first, the request is cancelled (and its
    last delta still reaches the metrics)."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, stream))
    deltas = _observed(stream, metrics)
    finished = False
    try:
        async for delta in deltas:
            finished = delta.finished
            yield delta
    finally:
        watcher.cancel()
        if not finished:
            stream.cancel()
            task = asyncio.get_running_loop().create_task(_drain(_observed(stream, metrics)))
            _abandoned.add(task)
            task.add_done_callback(_abandoned.discard)


async def _sse(shape: ResponseShape, deltas: AsyncIterator[Delta], prompt_tokens: int,
               include_usage: bool) -> AsyncIterator[bytes]:
    if shape.chat:
        yield shape.role_chunk()
    completion_tokens = 0
    async for delta in deltas:  # to the end, so that _deltas cleans up now
        if delta.error is not None:
            yield error_event(delta.error)
            continue
        completion_tokens += len(delta.token_ids)
        if delta.text or delta.token_ids:
            yield shape.chunk(delta.text, delta.token_ids)
        if delta.finish_reason is not None:
            yield shape.chunk("", (), delta.finish_reason)
            if include_usage:
                yield shape.usage_chunk(prompt_tokens, completion_tokens)
    yield DONE


async def _collect(shape: ResponseShape, deltas: AsyncIterator[Delta], prompt_tokens: int) -> dict:
    texts: list[str] = []
    ids: list[int] = []
    last: Delta | None = None
    async for delta in deltas:  # to the end, so that _deltas cleans up now
        texts.append(delta.text)
        ids.extend(delta.token_ids)
        last = delta
    if last is None or last.finish_reason is None or last.error is not None:
        raise ApiError(last.error if last and last.error else "the request ended without a result", 500,
                       type="internal_error")
    return shape.full("".join(texts), ids, last.finish_reason, prompt_tokens)


class StampArrival:
    """ASGI middleware: ``request.state.arrival`` is the moment the request reached the server, so
    TTFT and queue time count the routing, parsing, templating and tokenizing that follow."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["arrival"] = now()
        await self.app(scope, receive, send)


def create_app(engine_factory: Callable[[], Engine], *, model_name: str, api_key: str | None = None,
               on_load_error: Callable[[], None] | None = None) -> FastAPI:
    """The server for the engine ``engine_factory()`` builds, listed as ``model_name``."""
    slot = EngineSlot(engine_factory, on_load_error)
    metrics = ServerMetrics(model_name, lambda: slot.engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        slot.start()
        yield
        await run_in_threadpool(slot.close)

    async def authorize(request: Request) -> None:  # async: no hop through the thread pool
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError("invalid API key", 401, type="authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.slot = slot
    api = APIRouter(dependencies=[Depends(authorize)])

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> Response:
        # ASCII-escaped: an error may quote a client's string, which need not be valid UTF-8
        return Response(json.dumps(e.body()), e.status, headers=e.headers, media_type="application/json")

    @app.exception_handler(PicochatError)
    async def engine_error(request: Request, e: PicochatError) -> Response:
        return await api_error(request, _api_error(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:
        return await api_error(request, ApiError(str(e.detail), e.status_code, type="invalid_request_error"))

    @app.get("/health")
    def health() -> JSONResponse:
        if slot.engine is not None:
            return JSONResponse({"status": "ok"})
        if slot.error is not None:
            return JSONResponse({"status": "error", "message": str(slot.error)}, 503)
        return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/metrics")
    def prometheus() -> Response:  # a sync handler: it runs in the thread pool
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models")
    def models() -> dict:
        info = slot.ready().info
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "picochat",
                "max_model_len": info.max_model_len,
                "picochat": {"model": info.model, "dtype": info.dtype, "quant": info.quant,
                             "device": info.device, "attention": info.attention, "spec": info.spec,
                             "max_num_seqs": info.max_num_seqs,
                             "max_num_batched_tokens": info.max_num_batched_tokens}}
        return {"object": "list", "data": [card]}

    @api.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        """vLLM's /tokenize, answering the count only: ``{"prompt": ...}`` or ``{"messages": [...]}``."""
        engine = slot.ready()
        body = parse_body(await request.body(), TokenizeRequest)
        count = await run_in_threadpool(engine.count_prompt_tokens, body.to_prompt())
        return {"count": count, "max_model_len": engine.info.max_model_len}

    async def generate(request: Request, parsed: SamplingRequest, prompt: Prompt, chat: bool,
                       arrival: float) -> Response:
        engine = slot.ready()
        if parsed.model is not None and parsed.model != model_name:
            raise ApiError(f"the model `{parsed.model}` does not exist; this server serves `{model_name}`",
                           param="model", type="model_not_found")
        prompt_tokens = await run_in_threadpool(engine.count_prompt_tokens, prompt)
        if prompt_tokens == 0:
            raise ApiError("the prompt is empty", param="prompt")
        default_max = None if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
        params = parsed.sampling_params(prompt_tokens, engine.info.max_model_len, default_max)
        stream = await run_in_threadpool(engine.submit, prompt, params, None, arrival)
        shape = ResponseShape.new(chat, model_name, parsed.return_token_ids)
        deltas = _deltas(request, stream, metrics)
        if parsed.stream:
            return StreamingResponse(_sse(shape, deltas, prompt_tokens, parsed.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _collect(shape, deltas, prompt_tokens))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        parsed = parse_body(await request.body(), ChatCompletionRequest)
        return await generate(request, parsed, parsed.prompt(), chat=True, arrival=request.state.arrival)

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        parsed = parse_body(await request.body(), CompletionRequest)
        return await generate(request, parsed, parsed.to_prompt(), chat=False, arrival=request.state.arrival)

    app.include_router(api)
    app.add_middleware(StampArrival)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket, or ConfigError naming the address (before any model loads)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(engine_factory: Callable[[], Engine], *, host: str, port: int, api_key: str | None,
          model_name: str) -> None:
    """Serve until Ctrl+C; then finish or cancel open requests and close the engine."""
    sock = bind(host, port)
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(engine_factory, model_name=model_name, api_key=api_key, on_load_error=stop)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", host)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    share_gil_promptly()
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if sock.family == socket.AF_INET6 else bound_host
    log.info("serving %s on http://%s:%d (Ctrl+C to stop)", model_name, shown, bound_port)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it handled, after shutting down
        pass
    finally:
        sock.close()
    error = app.state.slot.error
    if isinstance(error, PicochatError):
        raise error
    if error is not None:
        raise ModelLoadError(f"loading the model failed: {error}")
