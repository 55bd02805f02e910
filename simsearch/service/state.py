"""The server's open store: one read-only Collection at a time, swapped safely on re-index.

Every request leases the current *snapshot* (a Collection with its index loaded) and checks the
store's generation. When `simsearch index` (or the API) has changed the store, the first request
to notice opens and loads a fresh Collection, then swaps it in under a lock; requests already
running, and those arriving while it loads, keep the old snapshot, which is closed when its last
lease ends. A query therefore always sees one complete index.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from simsearch import library
from simsearch._parallel import cores
from simsearch.collection import Collection
from simsearch.config import IndexSettings
from simsearch.errors import ImageError, SimsearchError, StoreError, StoreLockedError
from simsearch.library import EmbedderFactory, EmbedderLike
from simsearch.service import ServiceError
from simsearch.service.settings import ServiceSettings
from simsearch.service.uris import ImageBytes, IndexedRef
from simsearch.store import Image

log = logging.getLogger(__name__)


class CachedFactory:
    """One embedder per model spec for the server's life: the model is loaded once."""

    def __init__(self, factory: EmbedderFactory) -> None:
        self._factory = factory
        self._embedders: dict[str, EmbedderLike] = {}
        self._lock = threading.Lock()

    def __call__(self, spec: str) -> EmbedderLike:
        with self._lock:
            embedder = self._embedders.get(spec)
            if embedder is None:
                log.info("loading the model %s", spec)
                embedder = self._factory(spec)
                self._embedders[spec] = embedder
            return embedder

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._embedders)


@dataclass(eq=False)
class Snapshot:
    """A read-only Collection whose index is loaded, and the store generation it shows."""

    collection: Collection
    generation: int
    model: tuple[str, str, int] | None
    count: int
    refs: int = 0
    retired: bool = False
    _folders: list[str] | None = None
    _folders_lock: threading.Lock = field(default_factory=threading.Lock)

    def folders(self) -> list[str]:
        """The store's indexed folders, worked out once per snapshot when file:// needs them."""
        with self._folders_lock:
            if self._folders is None:
                self._folders = library.indexed_folders(self.collection)
            return self._folders

    def require_model(self) -> tuple[str, str, int]:
        if self.model is None:
            root = self.collection.root
            raise ServiceError(
                503,
                f"the store {root} has no images yet; index some with "
                f"`simsearch index DIR --store {root}`",
            )
        return self.model


@dataclass(frozen=True, slots=True)
class QueryVector:
    vector: np.ndarray
    image_id: int | None  # the query is this indexed image


class ServiceState:
    """The store as the server sees it: snapshots, the cached model, thumbnails."""

    def __init__(self, settings: ServiceSettings, factory: EmbedderFactory) -> None:
        self.settings = settings
        self.root = settings.store
        self.factory = CachedFactory(factory)
        self._current: Snapshot | None = None
        self._refs_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._thumbnails: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._thumbnails_lock = threading.Lock()
        self._embed_slots_total = settings.max_concurrent_embeddings or cores()
        self._embed_slots = threading.BoundedSemaphore(self._embed_slots_total)
        self.reloads = 0  # snapshots opened after the first (for tests and logs)

    # -- snapshots -------------------------------------------------------------------------
    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """The newest complete snapshot, leased for one request."""
        snap = self._lease()
        try:
            yield snap
        finally:
            self._release(snap)

    def _lease(self) -> Snapshot:
        with self._refs_lock:
            snap = self._current
            if snap is not None:
                snap.refs += 1
        if snap is None:
            return self._open_first()
        try:
            generation: int | None = snap.collection.generation()
        except Exception as exc:  # the database went away or is being replaced
            log.warning("cannot read the store's generation: %s", exc)
            generation = None
        if generation == snap.generation:
            return snap
        if not self._reload_lock.acquire(blocking=False):
            return snap  # another request is loading the new index: keep using this one
        try:
            if self._current is snap:
                self._swap(self._open())
        except Exception as exc:
            log.warning("keeping the loaded index; reloading the store failed: %s", exc)
        finally:
            self._reload_lock.release()
        with self._refs_lock:
            fresh = self._current
            assert fresh is not None
            fresh.refs += 1
        self._release(snap)
        return fresh

    def _open_first(self) -> Snapshot:
        with self._reload_lock:
            if self._current is None:
                try:
                    self._swap(self._open())
                except StoreError as exc:
                    raise ServiceError(503, str(exc)) from None
                except Exception as exc:  # a store being created or upgraded right now
                    log.warning("cannot open the store %s: %s", self.root, exc)
                    raise ServiceError(
                        503, f"cannot open the store {self.root} yet ({exc}); try again shortly"
                    ) from None
        with self._refs_lock:
            snap = self._current
            assert snap is not None
            snap.refs += 1
            return snap

    def _open(self) -> Snapshot:
        collection = Collection.open(self.root, write=False)
        try:
            generation = collection.generation()  # read first: the index is at least this new
            model = collection.model()
            count = len(collection.index()) if model is not None else 0
        except BaseException:
            collection.close()
            raise
        log.info("loaded the store %s: generation %d, %d images", self.root, generation, count)
        return Snapshot(collection, generation, model, count)

    def _swap(self, fresh: Snapshot) -> None:
        with self._refs_lock:
            old, self._current = self._current, fresh
            if old is None:
                return
            self.reloads += 1
            old.retired = True
            close_now = old.refs == 0
        if close_now:
            old.collection.close()

    def _release(self, snap: Snapshot) -> None:
        with self._refs_lock:
            snap.refs -= 1
            close_now = snap.retired and snap.refs == 0
        if close_now:
            snap.collection.close()

    def close(self) -> None:
        with self._refs_lock:
            snap, self._current = self._current, None
            if snap is not None:
                snap.retired = True
                close_now = snap.refs == 0
            else:
                close_now = False
        if snap is not None and close_now:
            snap.collection.close()

    def readiness(self) -> tuple[bool, dict]:
        """(ready, details) for /readyz: a store with images and its index loaded."""
        try:
            with self.snapshot() as snap:
                model = snap.model
                details = {
                    "ready": model is not None,
                    "indexed": snap.count,
                    "model": model[0] if model else None,
                    "store": str(self.root),
                    "generation": snap.generation,
                    "models_loaded": self.factory.loaded(),
                }
                if model is None:
                    snap.require_model()
                return True, details
        except ServiceError as exc:
            return False, {"ready": False, "detail": str(exc), "store": str(self.root)}

    def preload(self) -> None:
        """Load the store's model and run it once now, so the first query does not wait."""
        try:
            with self.snapshot() as snap:
                if snap.model is None:
                    return
                embedder = self.factory(snap.model[1])
        except ServiceError as exc:  # no store or no images yet: /readyz and queries say so
            log.warning("%s", exc)
            return
        embed_images = getattr(embedder, "embed_images", None)
        if embed_images is not None:  # the first inference is slow (kernels, allocations)
            from PIL import Image as PILImage

            embed_images([PILImage.new("RGB", (256, 256), (128, 128, 128))])

    # -- queries ---------------------------------------------------------------------------
    def indexed(self, snap: Snapshot, ref: str | int) -> Image:
        """The indexed image an id or SHA-1 names: 400 if malformed, 404 if unknown."""
        snap.require_model()
        try:
            row = library.find_indexed(snap.collection, ref)
        except SimsearchError as exc:
            raise ServiceError(400, str(exc)) from None
        if row is None:
            raise ServiceError(
                404, f"no indexed image has the id or SHA-1 {str(ref)[:60]}; check it"
            )
        return row

    def vector_of(self, snap: Snapshot, source: ImageBytes | IndexedRef) -> QueryVector:
        """The query vector of an indexed image or of image bytes."""
        if isinstance(source, IndexedRef):
            row = self.indexed(snap, source.sha1)
            vector = library.indexed_vector(snap.collection, row.id)
            if vector is None:
                raise ServiceError(404, f"the image {source.sha1} is not in the loaded index yet")
            return QueryVector(vector, row.id)
        return self.embed(snap, source.data, source.label)

    def embed(self, snap: Snapshot, data: bytes, label: str) -> QueryVector:
        """Embed image bytes with the store's model (415 if not an image, 413 if too big)."""
        snap.require_model()
        if len(data) > self.settings.max_upload_bytes:
            raise ServiceError(
                413,
                f"{label} is larger than the limit of {self.settings.max_upload_bytes:,} bytes",
            )
        check_pixels(data, self.settings.max_pixels, label)
        with self._embedding_slot():
            try:
                result = library.embed_bytes(
                    snap.collection,
                    data,
                    embedder_factory=self.factory,
                    max_pixels=self.settings.max_pixels,
                )
            except ImageError as exc:
                raise ServiceError(
                    415,
                    f"{label} is not a usable image: {exc}; send a JPEG, PNG, GIF, BMP, "
                    "WebP or TIFF file",
                ) from None
        return QueryVector(result.vector, result.image_id)

    @contextmanager
    def _embedding_slot(self) -> Iterator[None]:
        """One of the max_concurrent_embeddings slots, waited for up to embed_wait seconds."""
        if not self._embed_slots.acquire(timeout=self.settings.embed_wait):
            raise ServiceError(
                503,
                f"the server is busy: {self._embed_slots_total} images are being embedded and "
                f"none finished within {self.settings.embed_wait:g} s; retry later, or start "
                "the server with a higher --max-concurrent-embeddings if it has the memory",
            )
        try:
            yield
        finally:
            self._embed_slots.release()

    def search(self, snap: Snapshot, query: QueryVector, k: int, text: str) -> library.QueryResult:
        snap.require_model()
        return library.query_vector(
            snap.collection, query.vector, k=k, text=text, image_id=query.image_id
        )

    # -- thumbnails ------------------------------------------------------------------------
    def thumbnail(self, snap: Snapshot, sha1: str, size: int) -> bytes:
        """A JPEG thumbnail of an indexed image, cached; 404 for anything not indexed."""
        row = self.indexed(snap, sha1)
        try:
            st = os.stat(row.path)
        except OSError:
            raise ServiceError(
                404, f"the indexed file {row.path} is gone; run `simsearch index` again"
            ) from None
        if st.st_size != row.size or st.st_mtime_ns != row.mtime_ns:
            raise ServiceError(
                404,
                f"the file {row.path} changed since it was indexed; run `simsearch index` again",
            )
        key = (row.path, st.st_mtime_ns, size)
        with self._thumbnails_lock:
            cached = self._thumbnails.get(key)
            if cached is not None:
                self._thumbnails.move_to_end(key)
                return cached
        try:
            data = library.thumbnail(row.path, size, max_pixels=self.settings.max_pixels)
        except ImageError as exc:
            raise ServiceError(404, f"cannot read the indexed file {row.path}: {exc}") from None
        with self._thumbnails_lock:
            self._thumbnails[key] = data
            while len(self._thumbnails) > self.settings.thumbnail_cache_size:
                self._thumbnails.popitem(last=False)
        return data

    # -- changing the store ------------------------------------------------------------------
    @contextmanager
    def writer(self) -> Iterator[Collection]:
        """The store opened for writing (409 while `simsearch index` or another writer runs)."""
        try:
            collection = Collection.open(self.root, write=True)
        except StoreLockedError as exc:
            raise ServiceError(409, str(exc)) from None
        try:
            yield collection
        finally:
            collection.close()

    def add_paths(self, paths: Sequence[str]) -> library.IndexSummary:
        settings = IndexSettings(workers=0, max_pixels=self.settings.max_pixels)
        with self.writer() as collection:
            return library.index_paths(
                collection, paths, embedder_factory=self.factory, settings=settings
            )

    def remove_paths(self, paths: Sequence[str]) -> library.RemoveSummary:
        with self.writer() as collection:
            return library.remove(collection, paths)

    def remove_refs(self, refs: Sequence[str | int]) -> library.RemoveSummary:
        with self.writer() as collection:
            return library.remove_images(collection, refs)


_HEADER_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")  # as images.py decodes


def check_pixels(data: bytes, max_pixels: int, label: str) -> None:
    """413 for an image whose header announces more pixels than the limit (nothing decoded)."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data), formats=_HEADER_FORMATS) as img:
            width, height = img.size
    except PILImage.DecompressionBombError:
        width = height = None
    except Exception:  # not an image: decoding says why, with a 415
        return
    if width is None or height is None or width * height > max_pixels:
        size = f"{width} x {height} = {width * height:,} pixels" if width and height else "huge"
        raise ServiceError(
            413,
            f"{label} is {size}, above the limit of {max_pixels:,} pixels; send a smaller "
            "image (or start the server with a larger --max-pixels)",
        )
