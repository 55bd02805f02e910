"""The FastAPI application: SMQTK routes, the JSON API, the web page, limits and error shapes."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from simsearch import __version__
from simsearch.errors import SimsearchError
from simsearch.service import headers_for, status_for
from simsearch.service.settings import ServiceSettings
from simsearch.service.state import ServiceState

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and headers around an uploaded file

DESCRIPTION = """Image similarity search over a simsearch store.

* **SMQTK-compatible** routes for ImageSpace: `GET /nn/n=<N>/<URI>`, `GET /nn/n=<N>/<I>:<J>/<URI>`,
  `POST /compute/<URI>`, `GET /count`; URI is `base64://<data>?content_type=<mime>`,
  `uuid://<sha1>`, `file://<path>` (inside the indexed folders) or `http(s)://...` (only with
  `--allow-remote-fetch`).
* **JSON API** under `/api`; changing the store needs `Authorization: Bearer <token>`.
* The web page is at `/`.
"""


def create_app(settings: ServiceSettings) -> FastAPI:
    """The app serving one store; tests pass a fake `embedder_factory` in the settings."""
    from simsearch.service import api, smqtk

    factory = settings.embedder_factory
    if factory is None:
        from simsearch.commands._common import embedder_factory

        factory = embedder_factory(None, None, settings.max_pixels)
    state = ServiceState(settings, factory)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.preload_model:
            try:
                await run_in_threadpool(state.preload)
            except SimsearchError as exc:  # a model that cannot load: refuse to start
                log.error("cannot load the store's model: %s", exc)
                raise
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="simsearch",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = state
    limit = settings.max_upload_bytes + MULTIPART_OVERHEAD
    app.add_middleware(BodyLimitMiddleware, max_bytes=limit)
    app.add_middleware(CollapseLeadingSlashesMiddleware)

    @app.exception_handler(SimsearchError)
    async def _simsearch_error(_request: Request, exc: SimsearchError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)}, status_code=status_for(exc), headers=headers_for(exc)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); the server log has the details"},
            status_code=500,
        )

    app.include_router(smqtk.router)
    app.include_router(api.router)

    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _mount_docs(app)
    return app


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the packaged swagger-ui-bundle, so the docs work offline."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # an install without the serve extra's bundle: use the CDN
        swagger_ui_path = None
    if swagger_ui_path is not None:
        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")
    assets = (
        {}
        if swagger_ui_path is None
        else {
            "swagger_js_url": "/docs-assets/swagger-ui-bundle.js",
            "swagger_css_url": "/docs-assets/swagger-ui.css",
            "swagger_favicon_url": "/docs-assets/favicon-32x32.png",
        }
    )

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title="simsearch API", **assets
        )


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line, e.g. 'query parameter k: ...'."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ())]
        where = loc[0] if loc else "request"
        name = ".".join(loc[1:])
        kind = {"query": "query parameter", "path": "path part", "body": "body field"}.get(
            where, where
        )
        label = f"{kind} {name}".strip() if name else kind
        parts.append(f"{label}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class BodyLimitMiddleware:
    """Refuse request bodies over the limit with 413, before or while they are read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return (
            f"the request body is larger than the limit of {self.max_bytes:,} bytes; send a "
            "smaller image (or start the server with a larger --max-upload-bytes)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    status = 413 if value.isdigit() else 400
                    detail = self._message() if value.isdigit() else "invalid Content-Length"
                    await _send_json(send, status, {"detail": detail})
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)


class CollapseLeadingSlashesMiddleware:
    """'//nn/...' as '/nn/...': a base URL configured with a trailing slash still works."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("//"):
            scope = dict(scope)
            scope["path"] = "/" + scope["path"].lstrip("/")
            raw = scope.get("raw_path")
            if raw:
                scope["raw_path"] = b"/" + raw.lstrip(b"/")
        await self.app(scope, receive, send)


async def _send_json(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
