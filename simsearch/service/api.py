"""The JSON API: query by upload or by indexed image, distance, metadata, thumbnails, changes."""

from __future__ import annotations

import hmac
import os
from typing import Annotated

from fastapi import APIRouter, Depends, File, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from simsearch import library
from simsearch.service import ServiceError
from simsearch.service.state import QueryVector, ServiceState

router = APIRouter()

MAX_K = 1000
KParam = Annotated[int, Query(ge=1, le=MAX_K, description="How many neighbours to answer.")]
RefParam = Annotated[str, Query(alias="id", description="An indexed image's id or SHA-1.")]
THUMBNAIL_SIZE = 256
MAX_THUMBNAIL_SIZE = 512


# -- response and request shapes (they make the OpenAPI docs) -------------------------------
class Result(BaseModel):
    rank: int
    id: int
    sha1: str | None
    path: str
    distance: float = Field(description="Euclidean distance between unit vectors, 0 to 2.")
    thumbnail: str | None


class QueryResponse(BaseModel):
    query: str
    results: list[Result]


class DistanceResponse(BaseModel):
    a: str
    b: str
    distance: float
    cosine: float


class ImageResponse(BaseModel):
    id: int
    sha1: str | None
    path: str
    width: int | None
    height: int | None
    size: int | None
    mtime_ns: int | None
    model_id: str | None
    thumbnail: str | None


class AddImagesRequest(BaseModel):
    paths: list[str] = Field(
        min_length=1, description="Absolute paths of folders (recursive) or image files."
    )


class RemoveImagesRequest(BaseModel):
    paths: list[str] | None = Field(None, description="Files or folders to forget.")
    ids: list[int | str] | None = Field(None, description="Image ids or SHA-1s to forget.")


class RemoveResponse(BaseModel):
    removed: int
    not_found: list[str]


# -- helpers ---------------------------------------------------------------------------------
def _state(request: Request) -> ServiceState:
    return request.app.state.service


def thumbnail_url(sha1: str | None) -> str | None:
    return f"/thumbnails/{sha1}" if sha1 else None


def _response(result: library.QueryResult) -> QueryResponse:
    return QueryResponse(
        query=result.query,
        results=[
            Result(
                rank=n.rank,
                id=n.id,
                sha1=n.sha1,
                path=n.path,
                distance=n.distance,
                thumbnail=thumbnail_url(n.sha1),
            )
            for n in result.results
        ],
    )


def _query_indexed(state: ServiceState, ref: str, k: int) -> QueryResponse:
    with state.snapshot() as snap:
        row = state.indexed(snap, ref)
        vector = library.indexed_vector(snap.collection, row.id)
        if vector is None:
            raise ServiceError(404, f"the image {ref} is not in the loaded index yet")
        result = state.search(snap, QueryVector(vector, row.id), k, ref)
    return _response(result)


def require_token(
    request: Request,
    authorization: Annotated[
        str | None, Header(description="Bearer <token>, the token the server was started with.")
    ] = None,
) -> None:
    """Changing the store needs the server's token (compared in constant time)."""
    token = _state(request).settings.token
    if not token:
        raise ServiceError(
            403,
            "changing the store over HTTP is off; start the server with --token TOKEN "
            "(or SIMSEARCH_TOKEN) and send the header Authorization: Bearer TOKEN",
        )
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8"), token.encode("utf-8")
    ):
        raise HTTPException(
            401,
            "missing or wrong token; send the header Authorization: Bearer TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )


# -- health ----------------------------------------------------------------------------------
@router.get("/healthz", tags=["health"], summary="The process is up")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="A store with images is loaded (503 if not)")
def readyz(request: Request) -> JSONResponse:
    ready, details = _state(request).readiness()
    return JSONResponse(details, status_code=200 if ready else 503)


# -- queries ---------------------------------------------------------------------------------
@router.post("/api/query", tags=["query"], response_model=QueryResponse)
def query_upload(
    request: Request,
    file: Annotated[
        UploadFile, File(description="The query image (JPEG, PNG, GIF, BMP, WebP, TIFF).")
    ],
    k: KParam = 10,
) -> QueryResponse:
    """The k nearest indexed images of an uploaded image."""
    state = _state(request)
    limit = state.settings.max_upload_bytes
    data = file.file.read(limit + 1)
    name = file.filename or "upload"
    if len(data) > limit:
        raise ServiceError(
            413,
            f"{name} is larger than the limit of {limit:,} bytes; send a smaller image "
            "(or start the server with a larger --max-upload-bytes)",
        )
    with state.snapshot() as snap:
        query = state.embed(snap, data, name)
        result = state.search(snap, query, k, name)
    return _response(result)


@router.get("/api/query", tags=["query"], response_model=QueryResponse)
def query_indexed(
    request: Request,
    ref: RefParam,
    k: KParam = 10,
) -> QueryResponse:
    """The k nearest indexed images of an indexed image (itself first)."""
    return _query_indexed(_state(request), ref, k)


@router.get("/api/similar", tags=["query"], response_model=QueryResponse)
def similar(
    request: Request,
    ref: RefParam,
    n: KParam = 10,
) -> QueryResponse:
    """The n nearest indexed images of an indexed image (itself first): the page's click."""
    return _query_indexed(_state(request), ref, n)


@router.get("/api/distance", tags=["query"], response_model=DistanceResponse)
def distance(
    request: Request,
    a: Annotated[str, Query(description="An indexed image's id or SHA-1.")],
    b: Annotated[str, Query(description="An indexed image's id or SHA-1.")],
) -> DistanceResponse:
    """Euclidean distance (0 to 2) and cosine similarity of two indexed images."""
    state = _state(request)
    with state.snapshot() as snap:
        vectors = []
        for ref in (a, b):
            row = state.indexed(snap, ref)
            vector = library.indexed_vector(snap.collection, row.id)
            if vector is None:
                raise ServiceError(404, f"the image {ref} is not in the loaded index yet")
            vectors.append(vector)
    result = library.compare_vectors(a, b, vectors[0], vectors[1])
    return DistanceResponse(**result.to_dict())


@router.get("/api/images/{ref}", tags=["images"], response_model=ImageResponse)
def image(request: Request, ref: str) -> ImageResponse:
    """An indexed image's metadata, by id or SHA-1."""
    state = _state(request)
    with state.snapshot() as snap:
        row = state.indexed(snap, ref)
    return ImageResponse(
        id=row.id,
        sha1=row.sha1,
        path=row.path,
        width=row.width,
        height=row.height,
        size=row.size,
        mtime_ns=row.mtime_ns,
        model_id=row.model_id,
        thumbnail=thumbnail_url(row.sha1),
    )


@router.get(
    "/thumbnails/{sha1}",
    tags=["images"],
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail."}},
)
def thumbnail(
    request: Request,
    sha1: str,
    size: Annotated[
        int, Query(ge=16, le=MAX_THUMBNAIL_SIZE, description="Longest side in pixels.")
    ] = THUMBNAIL_SIZE,
) -> Response:
    """A JPEG thumbnail of an indexed image (404 for anything that is not indexed)."""
    state = _state(request)
    if not library.SHA1_PATTERN.match(sha1):
        raise ServiceError(404, "thumbnails are named by an indexed image's SHA-1")
    with state.snapshot() as snap:
        data = state.thumbnail(snap, sha1, size)
    return Response(
        data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
    )


# -- changing the store (token) ------------------------------------------------------------------
@router.post("/api/images", tags=["changes"], dependencies=[Depends(require_token)])
def add_images(request: Request, body: AddImagesRequest) -> dict:
    """Index files or folders on the server (like `simsearch index`); needs the token."""
    for path in body.paths:
        if not os.path.isabs(path):
            raise ServiceError(400, f"{path!r} is not an absolute path; give the full path")
    return _state(request).add_paths(body.paths).to_dict()


@router.post(
    "/api/images/remove",
    tags=["changes"],
    response_model=RemoveResponse,
    dependencies=[Depends(require_token)],
)
def remove_images(request: Request, body: RemoveImagesRequest) -> RemoveResponse:
    """Forget images by path (files or folders) or by id/SHA-1; the files stay; needs the token."""
    if (body.paths is None) == (body.ids is None):
        raise ServiceError(400, 'send either {"paths": [...]} or {"ids": [...]}, not both')
    state = _state(request)
    if body.paths is not None:
        for path in body.paths:
            if not os.path.isabs(path):
                raise ServiceError(400, f"{path!r} is not an absolute path; give the full path")
        summary = state.remove_paths(body.paths)
    else:
        summary = state.remove_refs(body.ids or [])
    return RemoveResponse(removed=summary.removed, not_found=summary.not_found)
