"""The FAISS index: unit vectors keyed by the images' database ids, searched by Euclidean distance.

FAISS ranks candidates by inner product (equivalent to Euclidean ranking for unit vectors); the
distances we return are recomputed exactly in float64 from the stored vectors, so an image queried
against itself is at distance 0.0, not at sqrt(2 - 2 * 0.99999994).

Files are written atomically and end with a short trailer (magic + payload length) so a truncated
or foreign file is refused before FAISS parses it: FAISS's memory-mapped reader can crash the
process on a truncated file instead of raising.

Removal: flat-code inner indexes (Flat, SQ8, PQ, ...) delete in place. Other inner indexes (HNSW,
IVF, pre-transforms) cannot delete consistently under an id map, so ``remove`` rebuilds the inner
index from the remaining reconstructed vectors; that costs a full re-add (minutes for millions of
HNSW vectors), so prefer Flat or IVF for stores with frequent deletions.

Distances are exact for Flat; for lossy codes (SQ8, PQ) they are exact to the decoded vectors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import struct
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.factory_tools import reverse_index_factory

from simsearch.errors import SimsearchError, StoreError
from simsearch.fileio import fsync_directory

logger = logging.getLogger(__name__)

# Trailer appended after the FAISS payload: magic, then the payload length in bytes.
_TRAILER = struct.Struct("<8sQ")
_MAGIC = b"SIMSIDX1"
# Extra candidates asked of FAISS beyond k, so equal distances at the k-th place are ordered by id.
_TIE_MARGIN = 16
# Search-time defaults for approximate indexes, favouring recall (they are saved in the file).
_HNSW_EF_SEARCH = 64
_IVF_NPROBE_DIVISOR = 8
# Floats per block of the exact re-ranking, to bound memory for many queries of high dimension.
_RERANK_BLOCK_FLOATS = 1 << 22
# Norm deviation above which vectors are reported as not unit length.
_UNIT_TOLERANCE = 1e-3


class VectorIndex:
    """Unit vectors keyed by image id; distances are Euclidean between unit vectors (0..2)."""

    def __init__(self, dim: int, factory: str = "Flat") -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self._index = _new_index(int(dim), factory)
        self._read_only = False
        self._source: Path | None = None

    @classmethod
    def build(
        cls, dim: int, ids: np.ndarray, vectors: np.ndarray, factory: str = "Flat"
    ) -> VectorIndex:
        """Create an index holding ``vectors``; an index that needs training is trained on them."""
        built = cls(dim, factory)
        xb_ids, xb = built._check_new(ids, vectors)
        if not built._index.is_trained:
            if len(xb_ids) == 0:
                raise ValueError(
                    f"index '{factory}' needs training vectors; build it from at least one vector "
                    "or use factory='Flat'"
                )
            try:
                built._index.train(xb)
            except RuntimeError as exc:
                raise ValueError(
                    f"could not train index '{factory}' on {len(xb_ids)} vectors "
                    f"({_faiss_reason(exc)}); use fewer clusters or factory='Flat'"
                ) from exc
            logger.debug("trained %s on %d vectors", built.description(), len(xb_ids))
        built._add_checked(xb_ids, xb)
        return built

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return f"VectorIndex({self.description()}, dim={self.dim}, n={len(self)})"

    def description(self) -> str:
        """Human-readable kind, e.g. ``"IDMap2,Flat (inner product)"``, for logs and ``info``."""
        inner = faiss.downcast_index(self._index.index)
        try:
            name = reverse_index_factory(inner)
        except Exception:  # reverse_index_factory knows only common types
            name = type(inner).__name__
        return f"IDMap2,{name} (inner product)"

    def ids(self) -> np.ndarray:
        """Every id once, ascending, as int64."""
        return np.sort(self._id_map())

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under new ids; an id already present is refused rather than duplicated."""
        self._check_writable("add vectors to")
        xb_ids, xb = self._check_new(ids, vectors)
        if not self._index.is_trained:
            raise ValueError(
                f"index {self.description()} needs training before vectors are added; "
                "create it with VectorIndex.build(dim, ids, vectors, factory)"
            )
        self._add_checked(xb_ids, xb)

    def remove(self, ids: np.ndarray | Sequence[int]) -> int:
        """Remove ids and return how many were present; unknown ids are ignored."""
        self._check_writable("remove vectors from")
        wanted = np.unique(_as_ids(ids))
        current = self._id_map()
        present = wanted[np.isin(wanted, current)]
        if len(present) == 0:
            return 0
        inner = faiss.downcast_index(self._index.index)
        if isinstance(inner, faiss.IndexFlatCodes):
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(present)))
        else:
            # HNSW cannot delete, and IVF keeps its internal numbering on delete, which an id map
            # over it does not expect: re-add what remains instead.
            keep = current[~np.isin(current, present)]
            kept = self._reconstruct_known(keep)
            self._index.reset()
            if len(keep):
                self._index.add_with_ids(kept, keep)
            self._index.construct_rev_map()  # reset() leaves the reverse map stale
            removed = len(present)
            logger.info("rebuilt %s after removing %d ids", self.description(), removed)
        return removed

    def reconstruct(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The stored vectors of ``ids`` as (n, dim) float32; KeyError if an id is absent."""
        xb_ids = _as_ids(ids)
        missing = xb_ids[~np.isin(xb_ids, self._id_map())]
        if len(missing):
            raise KeyError(f"ids not in the index: {_preview(missing)}")
        return self._reconstruct_known(xb_ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest ids per query with exact Euclidean distances, ties ordered by id.

        Returns (distances float32 (n, k), ids int64 (n, k)); rows with fewer than k results are
        padded with id -1 and distance inf.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        xq = _as_vectors(queries, self.dim, "queries")
        n = xq.shape[0]
        D_out = np.full((n, k), np.inf, dtype=np.float32)
        I_out = np.full((n, k), -1, dtype=np.int64)
        ntotal = len(self)
        if n == 0 or ntotal == 0:
            return D_out, I_out
        fetch = min(ntotal, k + _TIE_MARGIN)
        _, cand = self._index.search(xq, fetch)
        block = max(1, _RERANK_BLOCK_FLOATS // (fetch * self.dim))
        for start in range(0, n, block):
            stop = min(n, start + block)
            D_blk, I_blk = self._rerank(xq[start:stop], cand[start:stop])
            width = min(k, fetch)
            D_out[start:stop, :width] = D_blk[:, :width]
            I_out[start:stop, :width] = I_blk[:, :width]
        return D_out, I_out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index atomically: a crash leaves the old file or the new one, never half."""
        _write_atomic(self._index, Path(path))
        logger.debug("saved %s with %d vectors to %s", self.description(), len(self), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = False) -> VectorIndex:
        """Read an index saved by ``save``; with ``mmap`` the vectors stay on disk, read-only.

        Raises StoreError for a missing, truncated or foreign file: the index is derived data and
        is rebuilt from the stored vectors.
        """
        path = Path(path)
        index = _read(path, mmap=mmap)
        loaded = cls.__new__(cls)
        loaded._index = index
        loaded._read_only = mmap
        loaded._source = path
        logger.debug("loaded %s with %d vectors from %s", loaded.description(), len(loaded), path)
        return loaded

    # -- internals --------------------------------------------------------------------------

    def _id_map(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def _check_writable(self, action: str) -> None:
        if self._read_only:
            raise SimsearchError(
                f"cannot {action} the index loaded read-only from {self._source} (mmap=True); "
                "load it with mmap=False to change it"
            )

    def _check_new(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xb_ids = _as_ids(ids)
        xb = _as_vectors(vectors, self.dim, "vectors")
        if xb.shape[0] != len(xb_ids):
            raise ValueError(
                f"got {len(xb_ids)} ids but {xb.shape[0]} vectors; pass one id per vector row"
            )
        uniq, counts = np.unique(xb_ids, return_counts=True)
        if len(uniq) != len(xb_ids):
            raise ValueError(f"ids repeated within one call: {_preview(uniq[counts > 1])}")
        present = xb_ids[np.isin(xb_ids, self._id_map())]
        if len(present):
            raise ValueError(
                f"ids already in the index: {_preview(present)}; remove them first to replace "
                "their vectors"
            )
        norms = np.linalg.norm(xb, axis=1)
        off = np.abs(norms - 1.0) > _UNIT_TOLERANCE
        if off.any():
            logger.warning(
                "%d of %d vectors are not unit length (e.g. id %d has norm %.4g); "
                "nearest-neighbour ranking assumes L2-normalised vectors",
                int(off.sum()),
                len(xb),
                int(xb_ids[off][0]),
                float(norms[off][0]),
            )
        return xb_ids, xb

    def _add_checked(self, xb_ids: np.ndarray, xb: np.ndarray) -> None:
        if len(xb_ids):
            self._index.add_with_ids(xb, xb_ids)

    def _reconstruct_known(self, xb_ids: np.ndarray) -> np.ndarray:
        if len(xb_ids) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(self._index.reconstruct_batch(xb_ids), dtype=np.float32)

    def _rerank(self, xq: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact float64 distances of FAISS's candidates, sorted by (float32 distance, id)."""
        valid = cand >= 0
        I = np.where(valid, cand, -1)  # noqa: E741 - FAISS's name for result ids
        D = np.full(I.shape, np.inf, dtype=np.float32)
        if valid.any():
            uniq = np.unique(I[valid])
            xb = self._reconstruct_known(uniq).astype(np.float64)
            rows, cols = np.nonzero(valid)
            diff = xq[rows].astype(np.float64) - xb[np.searchsorted(uniq, I[rows, cols])]
            D[rows, cols] = np.sqrt(np.maximum(np.einsum("ij,ij->i", diff, diff), 0.0))
        # Ties are judged on the float32 distances the caller sees; padding (inf, -1) sorts last.
        order = np.lexsort((np.where(valid, I, np.iinfo(np.int64).max), D), axis=-1)
        return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def _new_index(dim: int, factory: str) -> faiss.IndexIDMap2:
    """IndexIDMap2 over ``factory`` with the inner-product metric and recall-friendly defaults."""
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(f"factory must be a FAISS factory string such as 'Flat', got {factory!r}")
    factory = factory.strip()
    if factory.upper().startswith("IDMAP"):
        raise ValueError(
            f"factory {factory!r} includes an id map; give only the inner index, e.g. 'Flat' or "
            "'HNSW32' (the id map is added here)"
        )
    try:
        index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(
            f"invalid FAISS factory string {factory!r} ({_faiss_reason(exc)}); "
            "use e.g. 'Flat', 'HNSW32' or 'IVF256,SQ8'"
        ) from exc
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()  # lets reconstruct() find vectors by position
        ivf.nprobe = max(1, int(ivf.nlist) // _IVF_NPROBE_DIVISOR)
    inner = faiss.downcast_index(index.index)
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = max(int(inner.hnsw.efSearch), _HNSW_EF_SEARCH)
    return index


def _write_atomic(index: faiss.Index, path: Path) -> None:
    """FAISS payload plus trailer into a temp file beside ``path``, fsynced, renamed over it."""
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        # O_EXCL: never clobber another writer's temp file; mode 0o666 lets the umask apply.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        faiss.write_index(index, str(tmp))
        size = tmp.stat().st_size
        with open(tmp, "ab") as f:
            f.write(_TRAILER.pack(_MAGIC, size))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(directory)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, (OSError, RuntimeError)):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StoreError(
                f"could not write index file {path} ({_faiss_reason(reason)}); check free disk "
                f"space and write permission in {directory}"
            ) from exc
        raise


def _read(path: Path, *, mmap: bool) -> faiss.IndexIDMap2:
    def unusable(reason: object) -> StoreError:
        return StoreError(
            f"index file {path} is corrupt or unreadable ({reason}); it is rebuilt from the "
            "stored vectors on the next run"
        )

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size >= _TRAILER.size:
                f.seek(size - _TRAILER.size)
                magic, payload = _TRAILER.unpack(f.read(_TRAILER.size))
            else:
                magic, payload = b"", -1
    except FileNotFoundError:
        raise StoreError(
            f"index file {path} does not exist; it is rebuilt from the stored vectors on the "
            "next run"
        ) from None
    except OSError as exc:
        raise unusable(exc.strerror or exc) from exc
    if magic != _MAGIC:
        raise unusable("truncated, or not an index written by simsearch")
    if payload != size - _TRAILER.size:
        raise unusable(f"truncated: {size - _TRAILER.size} bytes of index data, expected {payload}")
    flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
    try:
        index = faiss.read_index(str(path), flags)
    except (RuntimeError, MemoryError) as exc:
        raise unusable(_faiss_reason(exc)) from exc
    if not isinstance(index, faiss.IndexIDMap2):
        raise unusable(f"holds {type(index).__name__}, not an IndexIDMap2")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise unusable("its metric is not inner product")
    try:
        index.check_consistency()
    except RuntimeError as exc:
        raise unusable(f"inconsistent id map: {_faiss_reason(exc)}") from exc
    return index


def _as_ids(ids: np.ndarray | Sequence[int]) -> np.ndarray:
    """Validate ids as a 1-D int64 array of non-negative integers."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers (image primary keys), got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise ValueError("ids must fit in int64")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    if out.min() < 0:
        raise ValueError(
            f"ids must be non-negative (-1 marks padding in results): {_preview(out[out < 0])}"
        )
    return out


def _as_vectors(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    """Validate a (n, dim) array of finite numbers and return it as contiguous float32."""
    arr = np.asarray(vectors)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(
            f"{what} must have shape (n, {dim}), got {arr.shape}; reshape a single vector with "
            ".reshape(1, -1)"
        )
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise ValueError(f"{what} contain NaN or infinite values (rows {_preview(rows)})")
    return out


def _preview(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return f"[{shown}{more}]"


def _faiss_reason(exc: object) -> str:
    """The useful tail of a FAISS C++ error ("Error in <signature> at <file>:<line>: <reason>")."""
    lines = str(exc).strip().splitlines()
    text = lines[-1] if lines else type(exc).__name__
    match = re.search(r"\.(?:cpp|h):\d+: (.*)$", text)
    if match:
        text = match.group(1)
    text = text.removeprefix("Error: ")
    return text if len(text) <= 200 else text[:197] + "..."
