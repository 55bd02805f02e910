"""`simsearch serve`: the HTTP service (SMQTK routes for ImageSpace, a JSON API, a web page)."""

from __future__ import annotations

import ipaddress
import logging
from typing import Annotated, Any

import typer

from simsearch.commands._common import (
    DeviceOption,
    MaxPixelsOption,
    StoreOption,
    WeightsOption,
    embedder_factory,
    fail,
)
from simsearch.config import max_pixels_from_env, resolve_store_dir
from simsearch.errors import SimsearchError
from simsearch.service.settings import (
    DEFAULT_HOST,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_PORT,
    TOKEN_ENV,
    ServiceSettings,
)

log = logging.getLogger(__name__)

# The request line carries ImageSpace's base64 image: allow it, plus room for the rest.
_REQUEST_LINE_SLACK = 64 * 1024


def serve(
    store: StoreOption = None,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to listen on. 0.0.0.0 exposes the server to the network."
        ),
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = DEFAULT_PORT,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=TOKEN_ENV,
            help="Secret that adding or removing images over HTTP needs "
            "(Authorization: Bearer TOKEN). Without it those endpoints are off.",
            show_default=False,
        ),
    ] = None,
    allow_remote_fetch: Annotated[
        bool,
        typer.Option(
            "--allow-remote-fetch",
            help="Let http(s):// URIs be fetched (public addresses only, with a timeout and "
            "the upload size limit).",
        ),
    ] = False,
    max_upload_bytes: Annotated[
        int,
        typer.Option(
            "--max-upload-bytes",
            min=1,
            help="Largest query image accepted (upload, base64 data, file or fetch).",
        ),
    ] = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: MaxPixelsOption = None,
    max_concurrent_embeddings: Annotated[
        int,
        typer.Option(
            "--max-concurrent-embeddings",
            min=0,
            help="Query images embedded at once; more wait (up to 30 s, then 503). "
            "0: one per core. Each holds a decoded image and the network's activations.",
        ),
    ] = 0,
    device: DeviceOption = None,
    backbone_weights: WeightsOption = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="uvicorn's log level (info, warning, ...).")
    ] = "info",
) -> None:
    """Serve a store over HTTP: ImageSpace's SMQTK calls (/nn, /compute, /count), a JSON API
    under /api (docs at /docs) and a search page at /. The index is reloaded by itself when
    `simsearch index` changes the store.

    Example: simsearch serve --store ~/pictures.simsearch --port 8000
    """
    try:
        import uvicorn

        from simsearch.service.app import create_app
    except ImportError as exc:
        typer.echo(
            f"simsearch: error: the server needs its extra packages ({exc.name} is missing); "
            "install them with `pip install 'simsearch[serve]'`",
            err=True,
        )
        raise typer.Exit(1) from None

    try:
        pixels = max_pixels or max_pixels_from_env()
        settings = ServiceSettings(
            store=resolve_store_dir(store),
            token=token or None,
            allow_remote_fetch=allow_remote_fetch,
            max_upload_bytes=max_upload_bytes,
            max_pixels=pixels,
            max_concurrent_embeddings=max_concurrent_embeddings,
            embedder_factory=embedder_factory(device, backbone_weights, pixels),
        )
        app = create_app(settings)
        typer.echo(f"simsearch: loading the model of {settings.store}", err=True)
        app.state.service.preload()  # before the port opens: a model that cannot load stops here
    except SimsearchError as exc:
        raise fail(exc) from None
    if not _is_loopback(host):
        typer.echo(
            f"simsearch: warning: listening on {host}, reachable from other machines"
            + ("" if token else "; adding and removing images stays off without --token"),
            err=True,
        )
    typer.echo(f"simsearch: serving {settings.store} on http://{_url_host(host)}:{port}/", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(max_upload_bytes))


def uvicorn_options(max_upload_bytes: int) -> dict[str, Any]:
    """uvicorn settings for ImageSpace's requests, whose request line carries the image."""
    return {
        # h11 refuses request lines over 16 KiB by default; base64 URIs of photos are longer.
        "h11_max_incomplete_event_size": max_upload_bytes * 4 // 3 + _REQUEST_LINE_SLACK,
        "server_header": False,
    }


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
