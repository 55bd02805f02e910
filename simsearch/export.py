"""Export a store's vectors as the folder ImageSpace's (ImageCat's) FAISS back end reads.

The folder, one row per distinct image content (SHA-1), rows in ascending image-id order:

- ``ids.json``: a JSON list of the SHA-1 hex strings, ``ids[i]`` names row ``i``. SHA-1 of the file
  bytes is how ImageSpace joins similarity results to its own records (``sha1sum_s_md``).
- ``vectors.npy``: float32 array of shape ``(count, dim)``, row ``i`` the unit vector of ``ids[i]``.
- ``index.faiss``: a plain ``faiss.IndexFlatIP`` over those rows in the same order (FAISS's own
  ``write_index`` format, no simsearch trailer), so FAISS row number ``i`` is ``ids[i]``.
  Inner product of unit vectors is the cosine similarity; simsearch's Euclidean distance is
  ``sqrt(2 - 2 * ip)``, so both rank neighbours identically.
- ``meta.json``: the format name and version, model id and spec, dim, count, metric and when.

No public specification of this folder was found (ImageSpace's repositories document only the
SMQTK service), so this layout is the one named in simsearch's issue, with the assumptions above
recorded in ``meta.json`` as well. Copies of one file share one vector, so they share one row.

The folder is written into a temporary sibling and renamed into place: a reader never sees half.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from simsearch import __version__
from simsearch.collection import VECTOR_DTYPE, Collection
from simsearch.errors import InputError, StoreError
from simsearch.fileio import fsync_directory
from simsearch.store import Embedding, Image

log = logging.getLogger(__name__)

FORMAT_NAME = "imagecat-faiss"
FORMAT_VERSION = 1
IDS_FILE = "ids.json"
VECTORS_FILE = "vectors.npy"
INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
FILES = (IDS_FILE, VECTORS_FILE, INDEX_FILE, META_FILE)
_CHUNK = 20_000


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What an export wrote, printed by the CLI as a line or as JSON."""

    directory: str
    count: int
    dim: int
    model_id: str
    duplicates: int  # indexed files whose content (SHA-1) already had a row

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        extra = f" ({self.duplicates} duplicate files share rows)" if self.duplicates else ""
        return (
            f"exported {self.count} vectors of {self.dim} dimensions ({self.model_id}) "
            f"to {self.directory}{extra}"
        )


def export_imagecat(
    collection: Collection, directory: Path, *, force: bool = False
) -> ExportSummary:
    """Write the store's vectors into `directory` in the ImageCat FAISS folder format."""
    model = collection.model()
    if model is None:
        raise StoreError(
            f"the store {collection.root} has no images yet; run `simsearch index DIR "
            f"--store {collection.root}` first"
        )
    model_id, model_spec, dim = model
    target = Path(directory).expanduser().absolute()
    _check_target(target, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        count, duplicates, generation = _write_rows(collection, tmp, dim)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model_id": model_id,
            "model_spec": model_spec,
            "dim": dim,
            "count": count,
            "dtype": "float32",
            "normalized": True,
            "metric": "inner_product",
            "index_type": "IndexFlatIP",
            "ids": "sha1 hex of each image file's bytes; ids[i] is row i of vectors.npy and "
            "of index.faiss",
            "euclidean_distance": "sqrt(2 - 2 * inner_product)",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {
                "store": str(collection.root),
                "generation": generation,
                "simsearch_version": __version__,
            },
        }
        _write_json(tmp / META_FILE, meta)
        fsync_directory(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d vectors to %s", count, target)
    return ExportSummary(str(target), count, dim, model_id, duplicates)


def _check_target(target: Path, *, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise InputError(f"{target} exists and is not a folder; choose another export folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise InputError(
            f"the export folder {target} is not empty; choose a new folder or pass --force "
            "to replace it"
        )


def _write_rows(collection: Collection, folder: Path, dim: int) -> tuple[int, int, int]:
    """Stream distinct-SHA-1 vectors into vectors.npy, ids.json and index.faiss in one snapshot."""
    from simsearch import _blas

    _blas.configure()  # before FAISS loads its OpenBLAS
    import faiss

    ids: list[str] = []
    seen: set[str] = set()
    duplicates = 0
    index = faiss.IndexFlatIP(dim)
    # One read transaction: the count, the rows and the generation agree while `index` runs.
    with collection.store.session() as session:
        generation = collection._generation(session)
        count = (
            session.scalar(
                select(func.count(func.distinct(Image.sha1)))
                .join(Embedding, Embedding.image_id == Image.id)
                .where(Image.sha1.is_not(None))
            )
            or 0
        )
        vectors = np.lib.format.open_memmap(
            folder / VECTORS_FILE, mode="w+", dtype=np.float32, shape=(count, dim)
        )
        query = (
            select(Image.sha1, Embedding.vector)
            .join(Embedding, Embedding.image_id == Image.id)
            .where(Image.sha1.is_not(None))
            .order_by(Image.id)
        )
        chunk: list[bytes] = []
        for sha1, blob in session.execute(query).yield_per(_CHUNK):
            if sha1 in seen:
                duplicates += 1
                continue
            seen.add(sha1)
            ids.append(sha1)
            chunk.append(blob)
            if len(chunk) == _CHUNK:
                _add_chunk(vectors, index, chunk, len(ids) - len(chunk), dim)
                chunk = []
        if chunk:
            _add_chunk(vectors, index, chunk, len(ids) - len(chunk), dim)
    if len(ids) != count:
        raise StoreError("internal: the store changed during the export; run it again")
    vectors.flush()
    del vectors
    _fsync_file(folder / VECTORS_FILE)
    _write_json(folder / IDS_FILE, ids)
    faiss.write_index(index, str(folder / INDEX_FILE))
    _fsync_file(folder / INDEX_FILE)
    return count, duplicates, generation


def _add_chunk(vectors: np.ndarray, index, blobs: list[bytes], start: int, dim: int) -> None:
    rows = np.frombuffer(b"".join(blobs), dtype=VECTOR_DTYPE).reshape(len(blobs), dim)
    rows = rows.astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    # Stored vectors are unit already; renormalising in float64 removes rounding drift.
    rows = np.ascontiguousarray(rows / np.maximum(norms, 1e-12), dtype=np.float32)
    vectors[start : start + len(blobs)] = rows
    index.add(rows)


def _write_json(path: Path, obj: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1 if isinstance(obj, dict) else None)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder over `target`; a replaced folder is removed only afterwards."""
    old: Path | None = None
    if target.is_dir():
        if any(target.iterdir()):
            old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
            os.rename(target, old)
        else:
            target.rmdir()
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
