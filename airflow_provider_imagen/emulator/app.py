"""The emulator's HTTP surface: reAPI's ``/api/v1`` routes plus the ``/_emulator`` control and media routes.

A thin FastAPI layer over :class:`EmulatorState`: it reads headers and bodies, applies the request-level
faults in the contract's order (5xx fault, auth, rate limit, then the route), turns :class:`ApiError` into the
contract's error envelope and adds ``response_delay`` with ``asyncio.sleep`` so slow answers never block other
requests. Handlers are async and cheap; only media downloads render, and they do it in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from airflow_provider_imagen.emulator.config import MARKER_WRONG_SIZE, EmulatorConfig
from airflow_provider_imagen.emulator.errors import (
    BAD_GATEWAY,
    INVALID_PARAMETER,
    SERVER_ERROR,
    ApiError,
    MediaError,
    error_body,
)
from airflow_provider_imagen.emulator.images import ImageCache
from airflow_provider_imagen.emulator.state import MEDIA_PREFIX, EmulatorState
from airflow_provider_imagen.emulator.validation import parse_json, parse_submission

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"

_HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>403 Forbidden</title></head>"
    "<body><h1>Access denied</h1><p>The CDN returned an HTML page instead of your image.</p></body></html>"
)

Handler = Callable[[str], Awaitable[Response]]


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)


async def _json_object(request: Request) -> dict[str, Any]:
    body = parse_json(await request.body())
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ApiError(400, INVALID_PARAMETER, "Request body must be a JSON object")
    return body


def create_app(
    config: EmulatorConfig | None = None,
    *,
    state: EmulatorState | None = None,
    public_base_url: str | None = None,
    image_cache_size: int = 4096,
) -> FastAPI:
    """Build the emulator's ASGI app.

    ``state`` defaults to a fresh :class:`EmulatorState` with ``config``. Media URLs start with
    ``public_base_url`` when given (the runner passes its real address), else with the URL the client used.
    The app keeps its state at ``app.state.emulator``.

    Images are rendered in the background from the moment a task is created, as the real API renders
    before it reports ``completed``; a download then only sends bytes, as from a CDN. (Rendering on
    download would put the emulator's own CPU time into every client's download time.)
    """
    if state is None:
        state = EmulatorState(config)
    elif config is not None:
        raise ValueError("pass either config or state, not both")
    images = ImageCache(maxsize=image_cache_size)
    renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emulator-render")
    app = FastAPI(
        title="reAPI emulator (imagen-4-0)",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.emulator = state
    app.state.public_base_url = public_base_url

    def base_url(request: Request) -> str:
        configured = app.state.public_base_url
        return (configured or str(request.base_url)).rstrip("/")

    async def api_call(request: Request, kind: str, handler: Handler) -> Response:
        state.record_request(kind)
        try:
            if state.roll_server_error():
                raise ApiError(500, SERVER_ERROR, "Internal server error")
            key = state.authenticate(request.headers.get("authorization"))
            state.check_rate_limit(key)
            response = await handler(key)
        except ApiError as exc:
            response = _error_response(exc)
        except Exception:
            logger.exception("Unexpected error in the reAPI emulator")
            response = _error_response(ApiError(500, SERVER_ERROR, "Internal server error"))
        state.record_response(response.status_code)
        delay = state.config.response_delay
        if delay > 0:
            await asyncio.sleep(delay)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith(API_PREFIX):
            body = error_body(exc.status_code * 100, str(exc.detail))
            return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
        return PlainTextResponse(str(exc.detail), status_code=exc.status_code, headers=exc.headers)

    # ------------------------------------------------------------------ reAPI

    @app.post(f"{API_PREFIX}/images/generations")
    async def submit(request: Request) -> Response:
        async def handle(key: str) -> Response:
            submission = parse_submission(await request.body(), request.headers.get("content-type"))
            result = state.submit(key, submission)
            task = result.task
            if not task.html and state.config.image_mode == "prompt":
                renderer.submit(images.get, task.prompt, task.size, state.config.image_scale, task.id)
            if result.answer_delay > 0:  # created and charged already: a late answer, not a slow server
                await asyncio.sleep(result.answer_delay)
            if result.ambiguous:
                raise ApiError(502, BAD_GATEWAY, "Bad gateway: the upstream did not answer in time")
            return JSONResponse(result.response)

        return await api_call(request, "submit", handle)

    @app.get(f"{API_PREFIX}/tasks/{{task_id}}")
    async def poll(request: Request, task_id: str) -> Response:
        async def handle(key: str) -> Response:
            return JSONResponse(state.poll(key, task_id, base_url(request)))

        return await api_call(request, "poll", handle)

    @app.get(f"{API_PREFIX}/balance")
    async def balance(request: Request) -> Response:
        async def handle(key: str) -> Response:
            return JSONResponse({"balance": state.balance(key)})

        return await api_call(request, "balance", handle)

    # ------------------------------------------------------------------ media

    @app.get(MEDIA_PREFIX + "{filename}")
    async def media(filename: str, expires: str | None = None, sig: str | None = None) -> Response:
        if not filename.endswith(".png"):
            return PlainTextResponse("Not found", status_code=404)
        try:
            ticket = state.open_media(filename[: -len(".png")], expires, sig)
        except MediaError as exc:
            return PlainTextResponse(exc.message, status_code=exc.status)
        if ticket.html:
            return HTMLResponse(_HTML_PAGE)
        if state.config.image_mode == "stock":
            # One drawing per ratio for every task: the wrong-size marker still picks another ratio's.
            prompt = "[[wrong_size]]" if MARKER_WRONG_SIZE in ticket.prompt else "Imagen 4 emulator"
            data = await run_in_threadpool(images.get, prompt, ticket.size, ticket.scale, "")
        else:
            data = await run_in_threadpool(
                images.get, ticket.prompt, ticket.size, ticket.scale, ticket.task_id
            )
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    # ------------------------------------------------------------------ control (no auth)

    @app.get("/_emulator/health")
    async def health() -> Response:
        return JSONResponse({"ok": True})

    @app.get("/_emulator/ledger")
    async def ledger() -> Response:
        return JSONResponse(state.ledger())

    @app.get("/_emulator/tasks")
    async def tasks() -> Response:
        return JSONResponse(state.tasks())

    @app.get("/_emulator/config")
    async def get_config() -> Response:
        return JSONResponse(state.config.to_dict())

    @app.post("/_emulator/config")
    async def set_config(request: Request) -> Response:
        try:
            fields = await _json_object(request)
            new = state.configure(fields)
        except ApiError as exc:
            return _error_response(exc)
        except (TypeError, ValueError) as exc:
            return _error_response(ApiError(400, INVALID_PARAMETER, str(exc)))
        return JSONResponse(new.to_dict())

    @app.post("/_emulator/reset")
    async def reset() -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    @app.post("/_emulator/balance")
    async def set_balance(request: Request) -> Response:
        try:
            body = await _json_object(request)
            key = body.get("key", state.config.api_keys[0])
            if not isinstance(key, str):
                raise ApiError(400, INVALID_PARAMETER, "key must be a string")
            state.set_balance(key, body.get("balance"))  # type: ignore[arg-type]
        except ApiError as exc:
            return _error_response(exc)
        except ValueError as exc:
            return _error_response(ApiError(400, INVALID_PARAMETER, str(exc)))
        return JSONResponse({"key": key, "balance": state.balance(key)})

    return app
