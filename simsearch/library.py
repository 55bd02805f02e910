"""The operations users call: index folders, query by image, distance, remove, info.

The library receives an embedder factory rather than building models itself, so tests can pass
a fake; it raises SimsearchError subclasses and never prints.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from simsearch.collection import Changes, Collection, ImageRecord, KnownFile, Move
from simsearch.config import DEFAULT_MODEL, IndexSettings
from simsearch.errors import ImageError, InputError, ModelMismatchError
from simsearch.images import FileEntry, Skipped, decode_image, discover, sha1_file
from simsearch.progress import NoProgress, Progress
from simsearch.store import STATUS_FAILED, STATUS_INDEXED, Image

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

log = logging.getLogger(__name__)

SHA1_PATTERN = re.compile(r"^[0-9a-fA-F]{40}$")
MAX_IMAGE_ID = 2**63 - 1  # SQLite's and FAISS's 64-bit ids
WRITE_ROWS = 512  # rows per transaction while embedding
WRITE_SECONDS = 2.0  # ...or seconds between transactions
CHECKPOINT_SECONDS = 120.0  # save the index this often during long runs


class EmbedResultLike(Protocol):
    position: int
    path: str
    vector: np.ndarray | None
    width: int | None
    height: int | None
    error: str | None


class EmbedderLike(Protocol):
    """What the library needs from `simsearch.embedding.Embedder` (tests pass fakes)."""

    model_id: str
    dim: int
    spec: str

    def embed_files(
        self, paths: Sequence[str], *, batch_size: int = ..., workers: int | None = ...
    ) -> Iterator[list[EmbedResultLike]]: ...

    def embed_images(self, images: Sequence[PILImage], batch_size: int = ...) -> np.ndarray: ...


EmbedderFactory = Callable[[str], EmbedderLike]


@dataclass(frozen=True, slots=True)
class Failure:
    path: str
    reason: str


@dataclass(slots=True)
class IndexSummary:
    store: str
    model_id: str
    added: int = 0
    updated: int = 0
    moved: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"added {self.added}, updated {self.updated}, moved {self.moved}, "
            f"unchanged {self.unchanged}, removed {self.removed}, failed {self.failed} "
            f"({self.seconds:.1f} s, store {self.store})"
        )


def reindex_command(roots: Sequence[str], store: Path, model: str | None = None) -> str:
    folders = " ".join(roots) if roots else "DIR"
    model_part = f" --model {model}" if model else ""
    return f"simsearch index {folders} --store {store}{model_part} --reindex"


def _check_embedder(
    embedder: EmbedderLike, expected_id: str, collection: Collection, roots: Sequence[str]
) -> None:
    if embedder.model_id != expected_id:
        raise ModelMismatchError(
            f"the store {collection.root} holds vectors of model {expected_id}, but "
            f"{embedder.spec} now loads as {embedder.model_id} (its weights or simsearch changed); "
            f"re-index with `{reindex_command(roots, collection.root)}`"
        )


# -- index ---------------------------------------------------------------------------------
def index_paths(
    collection: Collection,
    roots: Sequence[str | os.PathLike[str]],
    *,
    embedder_factory: EmbedderFactory,
    model: str | None = None,
    reindex: bool = False,
    settings: IndexSettings | None = None,
    progress: Progress | None = None,
) -> IndexSummary:
    """Bring the store up to date with the image files under `roots` (recursive, incremental)."""
    started = time.monotonic()
    settings = settings or IndexSettings()
    progress = progress or NoProgress()
    root_paths = [os.path.abspath(os.fspath(r)) for r in roots]
    embedder = _prepare_model(collection, root_paths, embedder_factory, model, reindex)
    model_id, model_spec, _dim = collection.model() or (embedder.model_id, embedder.spec, 0)
    summary = IndexSummary(store=str(collection.root), model_id=model_id)

    known = collection.known_files(root_paths)
    entries: list[FileEntry] = []
    changes = Changes()
    seen: set[str] = set()
    for item in discover(root_paths, exclude=[collection.root]):
        seen.add(item.path)
        if isinstance(item, Skipped):
            _record_failure(summary, changes, item.path, item.reason, None, known=known)
        else:
            entries.append(item)

    to_check: list[tuple[FileEntry, KnownFile | None]] = []
    for entry in entries:
        row = known.get(entry.path)
        same_file = row is not None and (row.size, row.mtime_ns) == (entry.size, entry.mtime_ns)
        if same_file and row.status == STATUS_INDEXED and row.model_id == model_id:
            summary.unchanged += 1
        elif same_file and row.status == STATUS_FAILED:
            # Tried again (the limits or permissions may have changed), but decoded here
            # first so that files that still fail never load the model.
            try:
                decode_image(entry.path, max_pixels=settings.max_pixels)
            except ImageError as exc:
                _record_failure(summary, changes, entry.path, str(exc), entry, known=known)
            else:
                to_check.append((entry, row))
        else:
            to_check.append((entry, row))
    gone = {path: row for path, row in known.items() if path not in seen}

    # Hash what is new or changed: unchanged content, moves and copies keep their vectors.
    gone_by_sha1 = {
        row.sha1: row
        for row in gone.values()
        if row.sha1 and row.status == STATUS_INDEXED and row.model_id == model_id
    }
    hashed: list[tuple[FileEntry, KnownFile | None, str]] = []
    if to_check:
        progress.start(len(to_check), "hashing")
        for entry, row in to_check:
            try:
                hashed.append((entry, row, sha1_file(entry.path)))
            except OSError as exc:
                _record_failure(
                    summary,
                    changes,
                    entry.path,
                    f"cannot read the file: {exc.strerror or exc}",
                    entry,
                )
            progress.advance()
        progress.close()
    copies_of = collection.indexed_by_sha1(
        sha1 for _, row, sha1 in hashed if sha1 not in gone_by_sha1
    )

    to_embed: list[tuple[FileEntry, KnownFile | None, str]] = []
    copies: list[tuple[FileEntry, KnownFile | None, str, int]] = []
    for entry, row, sha1 in hashed:
        if (
            row is not None
            and row.status == STATUS_INDEXED
            and row.model_id == model_id
            and row.sha1 == sha1
        ):
            changes.moves.append(Move(row.id, entry.path, entry.size, entry.mtime_ns))
            summary.unchanged += 1
        elif sha1 in gone_by_sha1:
            old = gone_by_sha1.pop(sha1)
            del gone[old.path]
            if row is not None:  # a failed or stale row holds the new path: it goes
                changes.removals.append(row.id)
            changes.moves.append(Move(old.id, entry.path, entry.size, entry.mtime_ns))
            summary.moved += 1
        elif sha1 in copies_of:
            copies.append((entry, row, sha1, copies_of[sha1]))
        else:
            to_embed.append((entry, row, sha1))

    for row in gone.values():
        changes.removals.append(row.id)
    summary.removed = len(gone)

    if copies:
        vectors = collection.vectors([source for *_, source in copies])
        for entry, row, sha1, source in copies:
            changes.records.append(_record(entry, row, sha1, vectors[source], None, None))
            _count_new(summary, row)
    collection.apply(changes)  # moves, removals and copies first: a kill now loses nothing

    if to_embed:
        if embedder is None:
            embedder = embedder_factory(model_spec)
            _check_embedder(embedder, model_id, collection, root_paths)
        _embed(collection, embedder, to_embed, summary, settings, progress)
    collection.save_index()
    summary.failed = len(summary.failures)
    summary.seconds = time.monotonic() - started
    return summary


def _prepare_model(
    collection: Collection,
    roots: Sequence[str],
    factory: EmbedderFactory,
    model: str | None,
    reindex: bool,
) -> EmbedderLike | None:
    """Decide the run's model; load it now only when its id must be known up front."""
    current = collection.model()
    if current is not None and model is None and not reindex:
        return None  # the store's own model, loaded lazily if anything needs embedding
    if model is None:
        model = current[1] if current is not None else DEFAULT_MODEL
    embedder = factory(model)
    if current is not None and current[0] != embedder.model_id and not reindex:
        raise ModelMismatchError(
            f"the store {collection.root} holds vectors of model {current[0]} ({current[1]}); "
            f"{model} is {embedder.model_id}, and vectors of two models never mix. Re-index "
            f"everything with `{reindex_command(roots, collection.root, model)}`, "
            "or use another --store"
        )
    collection.set_model(embedder.model_id, embedder.spec, embedder.dim, replace=reindex)
    return embedder


def _record(
    entry: FileEntry,
    row: KnownFile | None,
    sha1: str | None,
    vector: np.ndarray | None,
    width: int | None,
    height: int | None,
    error: str | None = None,
) -> ImageRecord:
    return ImageRecord(
        path=entry.path,
        sha1=sha1,
        size=entry.size,
        mtime_ns=entry.mtime_ns,
        width=width,
        height=height,
        vector=vector,
        error=error,
        id=row.id if row is not None else None,
    )


def _count_new(summary: IndexSummary, row: KnownFile | None) -> None:
    if row is not None and row.status == STATUS_INDEXED:
        summary.updated += 1
    else:
        summary.added += 1


def _record_failure(
    summary: IndexSummary,
    changes: Changes,
    path: str,
    reason: str,
    entry: FileEntry | None,
    sha1: str | None = None,
    known: dict[str, KnownFile] | None = None,
) -> None:
    """Count and report a failure; write it to the store unless it is already recorded."""
    summary.failures.append(Failure(path, reason))
    row = known.get(path) if known else None
    if row is not None and row.status == STATUS_FAILED and row.error == reason:
        return
    changes.records.append(
        ImageRecord(
            path=path,
            sha1=sha1,
            size=entry.size if entry else None,
            mtime_ns=entry.mtime_ns if entry else None,
            error=reason,
        )
    )


def _embed(
    collection: Collection,
    embedder: EmbedderLike,
    jobs: list[tuple[FileEntry, KnownFile | None, str]],
    summary: IndexSummary,
    settings: IndexSettings,
    progress: Progress,
) -> None:
    progress.start(len(jobs), "embedding")
    last_save = time.monotonic()
    try:
        batches = embedder.embed_files(
            [entry.path for entry, _, _ in jobs],
            batch_size=settings.batch_size,
            workers=settings.workers,
        )
        changes, last_write = Changes(), time.monotonic()
        for batch in batches:
            for result in batch:
                entry, row, sha1 = jobs[result.position]
                if result.vector is None:
                    _record_failure(
                        summary, changes, entry.path, result.error or "unknown error", entry, sha1
                    )
                    continue
                changes.records.append(
                    _record(entry, row, sha1, result.vector, result.width, result.height)
                )
                _count_new(summary, row)
            progress.advance(len(batch))
            now = time.monotonic()
            # Large transactions are cheaper per row; a kill loses at most WRITE_SECONDS of work.
            if len(changes.records) >= WRITE_ROWS or now - last_write > WRITE_SECONDS:
                collection.apply(changes)
                changes, last_write = Changes(), now
            if now - last_save > CHECKPOINT_SECONDS:
                collection.apply(changes)
                changes = Changes()
                collection.save_index()
                last_save = time.monotonic()
        collection.apply(changes)
    finally:
        progress.close()


# -- query and distance ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Neighbor:
    rank: int
    id: int
    path: str
    sha1: str | None
    distance: float


@dataclass(slots=True)
class QueryResult:
    query: str
    results: list[Neighbor]

    def to_dict(self) -> dict:
        return {"query": self.query, "results": [asdict(n) for n in self.results]}


@dataclass(slots=True)
class _Resolved:
    text: str
    vector: np.ndarray | None = None
    image_id: int | None = None  # the query is this indexed image
    path: str | None = None  # a file to embed


def _resolve(
    collection: Collection, texts: Sequence[str], factory: EmbedderFactory
) -> list[_Resolved]:
    """Turn each query text (file, id or SHA-1) into a vector, embedding files in one batch."""
    model = collection.model()
    if model is None:
        collection.index()  # raises the "index some images first" error
    assert model is not None
    resolved: list[_Resolved] = []
    for text in texts:
        item = _Resolved(text)
        if os.path.isfile(text):
            path = os.path.abspath(text)
            row = collection.find_image(path=path)
            stat = os.stat(path)
            if row is not None and row.size == stat.st_size and row.mtime_ns == stat.st_mtime_ns:
                item.image_id = row.id
            else:
                try:
                    sha1 = sha1_file(path)
                except OSError as exc:
                    raise InputError(f"cannot read the query image {text}: {exc}") from exc
                row = collection.find_image(sha1=sha1)
                if row is not None:
                    item.image_id = row.id
                else:
                    item.path = path
        elif os.path.exists(text):
            raise InputError(f"{text} is not a file; give an image file, an image id or a SHA-1")
        elif text.isdigit():
            row = collection.find_image(image_id=int(text))
            if row is None:
                raise InputError(
                    f"no indexed image has id {text}; `simsearch info` shows the store"
                )
            item.image_id = row.id
        elif SHA1_PATTERN.match(text):
            row = collection.find_image(sha1=text)
            if row is None:
                raise InputError(f"no indexed image has SHA-1 {text}")
            item.image_id = row.id
        else:
            raise InputError(
                f"{text} is not an existing file, an indexed image id or a SHA-1; check the path"
            )
        resolved.append(item)

    indexed = [item for item in resolved if item.image_id is not None]
    if indexed:
        vectors = collection.index().reconstruct([item.image_id for item in indexed])
        for item, vector in zip(indexed, vectors, strict=True):
            item.vector = vector
    files = [item for item in resolved if item.path is not None]
    if files:
        embedder = factory(model[1])
        _check_embedder(embedder, model[0], collection, [])
        for batch in embedder.embed_files([item.path for item in files], workers=0):
            for result in batch:
                item = files[result.position]
                if result.vector is None:
                    raise InputError(f"cannot use the query image {item.text}: {result.error}")
                item.vector = result.vector
    return resolved


def query(
    collection: Collection,
    queries: Sequence[str],
    *,
    k: int = 10,
    embedder_factory: EmbedderFactory,
) -> list[QueryResult]:
    """The k nearest indexed images of each query (file, id or SHA-1), nearest first."""
    if k < 1:
        raise InputError(f"-k must be at least 1, got {k}")
    resolved = _resolve(collection, queries, embedder_factory)
    matrix = np.stack([item.vector for item in resolved])
    return _nearest(
        collection, matrix, k, [item.text for item in resolved], [i.image_id for i in resolved]
    )


def _nearest(
    collection: Collection,
    vectors: np.ndarray,
    k: int,
    texts: Sequence[str],
    image_ids: Sequence[int | None],
) -> list[QueryResult]:
    """One batched search; each query's own image comes first among equal distances."""
    distances, ids = collection.index().search(np.asarray(vectors, dtype=np.float32), k + 1)
    rows = collection.images(sorted({int(i) for i in ids.ravel() if i >= 0}))
    results = []
    for text, image_id, row_d, row_i in zip(texts, image_ids, distances, ids, strict=True):
        pairs = [
            (float(d), int(i))
            for d, i in zip(row_d, row_i, strict=True)
            if i >= 0 and int(i) in rows
        ]
        pairs.sort(key=lambda p: (p[0], p[1] != image_id, p[1]))
        neighbors = [
            Neighbor(rank, i, rows[i].path, rows[i].sha1, distance)
            for rank, (distance, i) in enumerate(pairs[:k], start=1)
        ]
        results.append(QueryResult(text, neighbors))
    return results


@dataclass(frozen=True, slots=True)
class DistanceResult:
    a: str
    b: str
    distance: float
    cosine: float

    def to_dict(self) -> dict:
        return asdict(self)


def distance(
    collection: Collection | None, a: str, b: str, *, embedder_factory: EmbedderFactory
) -> DistanceResult:
    """Euclidean distance (0..2) and cosine similarity between two unit embeddings.

    Indexed images use their stored vectors; without a store (or with an empty one) both must
    be image files, embedded with the default model, as the prototype's get_distance did.
    """
    if collection is None or collection.model() is None:
        va, vb = _embed_two_files(a, b, embedder_factory)
    else:
        first, second = _resolve(collection, [a, b], embedder_factory)
        va, vb = first.vector, second.vector
    return compare_vectors(a, b, va, vb)


def _embed_two_files(a: str, b: str, factory: EmbedderFactory) -> tuple[np.ndarray, np.ndarray]:
    for text in (a, b):
        if not os.path.isfile(text):
            raise InputError(
                f"{text} is not an image file; without an index only files can be compared "
                "(index them first to compare ids or SHA-1s)"
            )
    vectors: list[np.ndarray] = []
    for batch in factory(DEFAULT_MODEL).embed_files([a, b], workers=0):
        for result in batch:
            if result.vector is None:
                raise InputError(f"cannot use the image {result.path}: {result.error}")
            vectors.append(result.vector)
    return vectors[0], vectors[1]


# -- remove and info -------------------------------------------------------------------------
@dataclass(slots=True)
class RemoveSummary:
    removed: int
    not_found: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def remove(collection: Collection, paths: Sequence[str]) -> RemoveSummary:
    """Forget the images at these paths (files, or folders and everything under them)."""
    changes = Changes()
    not_found = []
    for path in paths:
        rows = collection.known_files([os.path.abspath(path)])
        if not rows:
            not_found.append(path)
        changes.removals.extend(row.id for row in rows.values())
    changes.removals = sorted(set(changes.removals))
    if collection.model() is not None:
        collection.index()
    collection.apply(changes)
    collection.save_index()
    return RemoveSummary(len(changes.removals), not_found)


@dataclass(slots=True)
class StoreInfo:
    store: str
    model_id: str | None
    model_spec: str | None
    dim: int | None
    indexed: int
    failed: int
    awaiting: int
    generation: int
    index_type: str | None
    index_vectors: int | None
    database_bytes: int
    index_bytes: int
    failures: list[Failure]

    def to_dict(self) -> dict:
        return asdict(self)


def info(collection: Collection) -> StoreInfo:
    """Counts, model, index type and sizes of a store."""
    model = collection.model()
    counts = collection.counts()
    index_type = index_vectors = None
    if model is not None:
        index = collection.index()
        index_type, index_vectors = index.description(), len(index)
    files = collection.index_files()
    db_bytes = sum(
        p.stat().st_size for p in collection.root.glob(collection.store.db_path.name + "*")
    )
    return StoreInfo(
        store=str(collection.root),
        model_id=model[0] if model else None,
        model_spec=model[1] if model else None,
        dim=model[2] if model else None,
        indexed=counts["indexed"],
        failed=counts["failed"],
        awaiting=counts["awaiting"],
        generation=collection.generation(),
        index_type=index_type,
        index_vectors=index_vectors,
        database_bytes=db_bytes,
        index_bytes=files[0][1].stat().st_size if files else 0,
        failures=[Failure(row.path, row.error or "") for row in collection.failures()],
    )


# -- the HTTP service: queries by stored vector or by image bytes ------------------------------
# The service never hands user text to `query` or `distance` (which also accept file paths):
# it names indexed images by id or SHA-1, and reads any other image itself, within its limits.
def parse_image_ref(ref: str | int) -> tuple[int | None, str | None]:
    """(id, None) or (None, sha1) for an indexed image's id or SHA-1; InputError otherwise."""
    text = str(ref).strip()
    if SHA1_PATTERN.match(text):  # 40 digits are a SHA-1: no id is that large
        return None, text.lower()
    if text.isascii() and text.isdigit() and not isinstance(ref, bool):
        if len(text) > 19 or int(text) > MAX_IMAGE_ID:
            raise InputError(f"{text[:30]} is too large to be an image id")
        return int(text), None
    raise InputError(
        f"{text[:60]!r} is neither an image id (a whole number) nor a SHA-1 (40 hex digits)"
    )


def find_indexed(collection: Collection, ref: str | int) -> Image | None:
    """The indexed image that an id or SHA-1 names, or None when there is none."""
    image_id, sha1 = parse_image_ref(ref)
    return collection.find_image(image_id=image_id, sha1=sha1)


def indexed_vector(collection: Collection, image_id: int) -> np.ndarray | None:
    """The vector of an indexed image from the collection's loaded index (None if not in it)."""
    try:
        return collection.index().reconstruct([image_id])[0]
    except KeyError:  # indexed after this collection's index was loaded
        return None


def query_vector(
    collection: Collection,
    vector: np.ndarray,
    *,
    k: int,
    text: str,
    image_id: int | None = None,
) -> QueryResult:
    """The k nearest indexed images of one vector, nearest first (the query image first on ties)."""
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    k = min(k, len(collection.index()))
    if k == 0:
        return QueryResult(text, [])
    return _nearest(collection, np.reshape(vector, (1, -1)), k, [text], [image_id])[0]


@dataclass(frozen=True, slots=True)
class BytesVector:
    """The query vector of an image given as bytes, and the indexed image it is, if any."""

    vector: np.ndarray
    sha1: str
    image_id: int | None


def embed_bytes(
    collection: Collection,
    data: bytes,
    *,
    embedder_factory: EmbedderFactory,
    max_pixels: int,
) -> BytesVector:
    """A vector for image bytes: an indexed copy's stored vector, else the store's model's.

    Raises ImageError (with the reason) for bytes that are not a usable image.
    """
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    row = collection.find_image(sha1=sha1)
    if row is not None:
        vector = indexed_vector(collection, row.id)
        if vector is not None:
            return BytesVector(vector, sha1, row.id)
    model = collection.model()
    if model is None:
        collection.index()  # raises the "index some images first" error
    assert model is not None
    embedder = embedder_factory(model[1])
    _check_embedder(embedder, model[0], collection, [])
    decoded = decode_image(
        data, max_pixels=max_pixels, min_size=getattr(embedder, "input_size", None)
    )
    return BytesVector(np.asarray(embedder.embed_images([decoded.image])[0]), sha1, None)


def compare_vectors(a: str, b: str, va: np.ndarray, vb: np.ndarray) -> DistanceResult:
    """Euclidean distance (0..2) and cosine similarity of two unit vectors."""
    va, vb = va.astype(np.float64), vb.astype(np.float64)
    return DistanceResult(a, b, float(np.linalg.norm(va - vb)), float(np.dot(va, vb)))


def indexed_folders(collection: Collection) -> list[str]:
    """The outermost folders (symlinks resolved) that hold indexed images, sorted."""
    folders = {
        os.path.realpath(os.path.dirname(row.path))
        for row in collection.known_files([os.sep]).values()
        if row.status == STATUS_INDEXED
    }
    outermost: list[str] = []
    for folder in sorted(folders):
        if not any(_is_within(folder, kept) for kept in outermost):
            outermost.append(folder)
    return outermost


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def remove_images(collection: Collection, refs: Sequence[str | int]) -> RemoveSummary:
    """Forget indexed images named by id or SHA-1 (every copy of a SHA-1); files stay."""
    ids: set[int] = set()
    not_found: list[str] = []
    sha1s: set[str] = set()
    for ref in refs:
        image_id, sha1 = parse_image_ref(ref)
        row = collection.find_image(image_id=image_id, sha1=sha1)
        if row is None:
            not_found.append(str(ref))
            continue
        ids.add(row.id)
        if sha1 is not None:
            sha1s.add(sha1)
    if collection.model() is not None:
        collection.index()
    removed = 0
    while ids:
        collection.apply(Changes(removals=sorted(ids)))
        removed += len(ids)
        # find_image gives one copy of a SHA-1 at a time: repeat until none is left.
        ids = {row.id for s in sha1s if (row := collection.find_image(sha1=s)) is not None}
    collection.save_index()
    return RemoveSummary(removed, not_found)


def thumbnail(path: str, size: int, *, max_pixels: int, quality: int = 85) -> bytes:
    """A JPEG of at most size x size pixels of an image file (ImageError if it cannot be read)."""
    from PIL import Image as PILImage

    decoded = decode_image(path, max_pixels=max_pixels, min_size=size)
    image = decoded.image
    image.thumbnail((size, size), PILImage.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
