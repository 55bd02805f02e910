"""`simsearch serve`: an SMQTK-compatible nearest-neighbour service, a JSON API and a web page.

A thin adapter over the library (`simsearch.service.app.create_app` builds the FastAPI app);
FastAPI is imported only by the modules that need it, so importing this package stays cheap.
"""

from __future__ import annotations

from simsearch.errors import (
    ImageError,
    InputError,
    ModelMismatchError,
    SimsearchError,
    StoreError,
    StoreLockedError,
)


class ServiceError(SimsearchError):
    """A request the service refuses; `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def status_for(exc: SimsearchError) -> int:
    """The HTTP status that answers a library or service error."""
    if isinstance(exc, ServiceError):
        return exc.status
    if isinstance(exc, StoreLockedError):
        return 409
    if isinstance(exc, (StoreError, ModelMismatchError)):
        return 503  # the server's store or model, not the request, is the problem
    if isinstance(exc, ImageError):
        return 415
    if isinstance(exc, InputError):
        return 400
    return 400


RETRY_AFTER_SECONDS = 5


def headers_for(exc: SimsearchError) -> dict[str, str]:
    """Headers of an error response: a 503 (busy, or the store is being rebuilt) says when to
    retry."""
    return {"Retry-After": str(RETRY_AFTER_SECONDS)} if status_for(exc) == 503 else {}
