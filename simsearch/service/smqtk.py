"""SMQTK's nearest-neighbour service routes, answered the way ImageSpace reads them.

ImageSpace sends `GET <base>/nn/n=<N>/base64://<standard base64>?content_type=<mime>` with the
base64 straight in the path ('/' and '+' unescaped), so the routes take the rest of the path as
the URI. Neighbour ids are the SHA-1 hex of each image file's bytes. As in SMQTK, the paged form
`/nn/n=<N>/<I>:<J>/<URI>` finds N neighbours and answers the slice [I:J] of them.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from simsearch.errors import SimsearchError
from simsearch.service import ServiceError, headers_for, status_for
from simsearch.service.state import ServiceState
from simsearch.service.uris import resolve_uri

router = APIRouter(tags=["SMQTK (ImageSpace)"])

DEFAULT_N = 10  # SMQTK's default for /nn/<URI>
MAX_N = 10_000
_N_PART = re.compile(r"^n=(\d{1,9})$")
_PAGE_PART = re.compile(r"^(\d{1,9}):(\d{1,9})$")


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def _full_uri(uri: str, request: Request) -> str:
    """An http(s) URI gets back the query string that the HTTP request split off it."""
    query = request.url.query
    if query and uri.lower().startswith(("http://", "https://")):
        return f"{uri}?{query}"
    return uri


def parse_nn_path(spec: str) -> tuple[int, int, int, str]:
    """(n, start, end, uri) from 'n=<N>/<I>:<J>/<URI>', 'n=<N>/<URI>' or '<URI>'."""
    n, start, end, uri = DEFAULT_N, 0, None, spec
    head, sep, rest = spec.partition("/")
    if head.startswith("n="):
        match = _N_PART.match(head)
        if not match or not sep:
            raise ServiceError(400, f"expected /nn/n=<N>/<URI> with N a whole number, got {head!r}")
        n, uri = int(match.group(1)), rest
        page, sep, rest = uri.partition("/")
        page_match = _PAGE_PART.match(page)
        if page_match and sep:
            start, end, uri = int(page_match.group(1)), int(page_match.group(2)), rest
    if n < 1 or n > MAX_N:
        raise ServiceError(400, f"n must be between 1 and {MAX_N}, got {n}")
    if end is None:
        end = n
    if start > end:
        raise ServiceError(400, f"the page {start}:{end} is empty: I must not exceed J")
    if not uri:
        raise ServiceError(
            400, "no URI after /nn/; append base64://..., uuid://<sha1> or file://..."
        )
    return n, start, min(end, n), uri


def _failure(exc: SimsearchError, uri: str, **empty: object) -> JSONResponse:
    body = {"success": False, "message": str(exc), **empty, "reference_uri": uri}
    return JSONResponse(body, status_code=status_for(exc), headers=headers_for(exc))


@router.get(
    "/nn/{spec:path}",
    summary="Nearest neighbours of an image (SMQTK)",
    response_description='{"success", "message", "neighbors": [sha1], "distances", '
    '"reference_uri"}',
)
def nearest_neighbors(
    request: Request,
    spec: Annotated[
        str,
        Path(
            description="n=<N>/<URI> or n=<N>/<I>:<J>/<URI>; URI base64://DATA (standard or "
            "URL-safe, padding optional), uuid://SHA1, file:///PATH or http(s)://...",
        ),
    ],
    content_type: str | None = None,
) -> JSONResponse:
    """The N nearest indexed images of the URI's image, by ascending distance."""
    uri = spec
    try:
        n, start, end, uri = parse_nn_path(spec)
        uri = _full_uri(uri, request)
        state = _state(request)
        with state.snapshot() as snap:
            source = resolve_uri(
                uri, content_type=content_type, settings=state.settings, folders=snap.folders
            )
            query = state.vector_of(snap, source)
            result = state.search(snap, query, n, uri)
    except SimsearchError as exc:
        return _failure(exc, uri, neighbors=[], distances=[])
    page = result.results[start:end]
    return JSONResponse(
        {
            "success": True,
            "message": f"descriptor computed; {len(page)} of {len(result.results)} neighbours",
            "neighbors": [neighbor.sha1 for neighbor in page],
            "distances": [neighbor.distance for neighbor in page],
            "reference_uri": uri,
        }
    )


@router.post(
    "/compute/{uri:path}",
    summary="The descriptor (embedding) of an image (SMQTK)",
    response_description='{"success", "message", "descriptor": [floats], "reference_uri"}',
)
def compute(request: Request, uri: str, content_type: str | None = None) -> JSONResponse:
    """The image's unit embedding vector, as the store's model computes it."""
    uri = _full_uri(uri, request)
    try:
        state = _state(request)
        with state.snapshot() as snap:
            source = resolve_uri(
                uri, content_type=content_type, settings=state.settings, folders=snap.folders
            )
            query = state.vector_of(snap, source)
    except SimsearchError as exc:
        return _failure(exc, uri, descriptor=None)
    return JSONResponse(
        {
            "success": True,
            "message": "descriptor generated",
            "descriptor": [float(x) for x in query.vector],
            "reference_uri": uri,
        }
    )


@router.get("/count", summary="Number of indexed images (SMQTK)")
def count(request: Request) -> dict:
    """How many images the loaded index holds."""
    try:
        with _state(request).snapshot() as snap:
            return {"count": snap.count}
    except ServiceError:
        return {"count": 0}  # no store yet: nothing indexed
