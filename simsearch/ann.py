"""Approximate indexes: which one to build for a store, and the exact vectors that re-rank them.

`choose_index` is a pure function of the vector count, the dimension and a memory budget, as
autofaiss's is: exact (Flat) search while the store is small enough for it to be fast, then an
inverted file with 4-bit product-quantisation codes ("IVF{nlist},PQ{m}x4fs", two dimensions per
code, scanned with SIMD) that proposes a few candidates per result, re-ranked exactly. A FAISS
factory string overrides the choice.

HNSW is not chosen automatically: its graph costs about as much memory as the vectors and takes
tens of minutes to build for a million vectors on a few cores, against a minute or two for the
inverted file; it remains available as an override ("HNSW32").

Approximate codes lose precision, so every approximate index keeps the exact float32 vectors
beside it (`ExactVectors`): candidates are re-scored from them, distances are exact, and
`reconstruct` returns the stored vectors unchanged. They are written into the same index file and
memory-mapped when it is loaded, so serving a million vectors does not read 2 GB into memory.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from dataclasses import dataclass

import numpy as np

from simsearch import _blas

_blas.configure()  # before FAISS loads its OpenBLAS

import faiss  # noqa: E402

log = logging.getLogger(__name__)

FLAT = "Flat"
# Below this many vectors exact search is fast enough (the bf16 scan of 200,000 512-d vectors
# takes about 1.5 ms per query on one core) and an index needs no training.
FLAT_MAX_VECTORS = 200_000
# IVF needs enough vectors per list to train; below this, Flat is used even when asked otherwise.
MIN_TRAIN_PER_LIST = 39
# Inverted lists: nlist ~ 2 sqrt(n) (FAISS suggests 1 to 16 sqrt(n)); fewer lists train faster.
NLIST_PER_SQRT_N = 2
MIN_NLIST, MAX_NLIST = 256, 65_536
# Lists searched per query (a 128th, at least 12) and candidates re-ranked per result (k *
# RERANK), from bin/bench-search's clustered vectors (1,000,000 x 512, IVF2048,PQ256x4fs):
# recall@10 is 0.947 / 0.968 / 0.979 / 0.992 with nprobe 8 / 12 / 16 / 32 (it barely moves
# between 60 and 100 candidates there; 64-d test vectors need 100: 0.85 with 40, 0.997 with 100).
NPROBE_DIVISOR = 128
MIN_NPROBE = 12
RERANK = 10
HNSW_EF_SEARCH = 64
# Training sample: enough for the coarse k-means (FAISS asks 39 per list) and the PQ codebooks.
TRAIN_PER_LIST = 64
MIN_TRAIN_SIZE = 65_536
TRAIN_SEED = 1234
# Fraction of the whole RAM an index may use when no budget is given.
DEFAULT_BUDGET_FRACTION = 0.5
BUDGET_ENV = "SIMSEARCH_INDEX_MEMORY"  # bytes, or with a K/M/G suffix
# Memory-mapped exact rows read between two drops of their mappings (at most 64 MiB mapped).
RELEASE_ROWS = 1024


@dataclass(frozen=True, slots=True)
class IndexChoice:
    """The index to build for a store, and how to search it."""

    factory: str  # FAISS factory string of the index, e.g. "Flat" or "IVF4096,PQ64x4fs"
    nprobe: int | None = None  # inverted lists searched per query (IVF)
    ef_search: int | None = None  # beam width of the graph search (HNSW)
    train_size: int = 0  # vectors sampled (seeded) to train it; 0: needs no training
    rerank: int = RERANK  # candidates re-scored exactly per result asked for (approximate only)
    reason: str = ""  # one line for logs

    @property
    def approximate(self) -> bool:
        return self.factory != FLAT


def flat_bytes(n_vectors: int, dim: int) -> int:
    """Memory of exact search: float32 vectors plus their bf16 copy."""
    return n_vectors * dim * (4 + 2)


def ivf_pq_bytes(n_vectors: int, dim: int, nlist: int, m: int) -> int:
    """Memory of an IVF-PQ (4-bit) index in RAM: codes, ids, centroids and lookup tables."""
    return n_vectors * (m // 2 + 8) + nlist * dim * 4 + 16 * dim * 4


def pq_subquantizers(dim: int) -> int:
    """Sub-vectors per 4-bit PQ code: two dimensions each where the dimension allows (256 for
    512-d), else the largest even divisor of the dimension; 0 when there is none (odd dim)."""
    for m in range(dim // 2, 1, -1):
        if dim % m == 0 and m % 2 == 0:
            return m
    return 0


def nlist_for(n_vectors: int) -> int:
    """Inverted lists for n vectors: a power of two near 4 sqrt(n), trainable from n vectors."""
    target = NLIST_PER_SQRT_N * math.sqrt(max(n_vectors, 1))
    nlist = 2 ** round(math.log2(max(target, 1)))
    nlist = min(max(nlist, MIN_NLIST), MAX_NLIST)
    while nlist > 1 and nlist * MIN_TRAIN_PER_LIST > n_vectors:
        nlist //= 2
    return nlist


def nprobe_for(nlist: int) -> int:
    """Lists searched per query: a 128th of them, at least 12 (all, for tiny inverted files)."""
    return min(nlist, max(MIN_NPROBE, nlist // NPROBE_DIVISOR))


def choose_index(n_vectors: int, dim: int, memory_budget_bytes: int) -> IndexChoice:
    """The index for n vectors of this dimension within a memory budget (pure; see the module)."""
    if n_vectors < 0 or dim < 1:
        raise ValueError(f"need n_vectors >= 0 and dim >= 1, got {n_vectors} and {dim}")
    flat = flat_bytes(n_vectors, dim)
    if n_vectors < FLAT_MAX_VECTORS and flat <= memory_budget_bytes:
        return IndexChoice(FLAT, reason=f"{n_vectors} vectors: exact search is fast enough")
    if n_vectors < MIN_TRAIN_PER_LIST * MIN_NLIST:
        return IndexChoice(FLAT, reason=f"{n_vectors} vectors: too few to train an inverted file")
    nlist = nlist_for(n_vectors)
    m = pq_subquantizers(dim)
    codes = f"PQ{m}x4fs" if m else "SQ8"
    needed = ivf_pq_bytes(n_vectors, dim, nlist, m) if m else n_vectors * (dim + 8)
    why = (
        f"{n_vectors} vectors: exact search holds {flat / 2**20:.0f} MiB; an inverted file "
        f"proposes candidates from {needed / 2**20:.0f} MiB and they are re-ranked exactly"
    )
    if needed > memory_budget_bytes:
        why += f" (over the {memory_budget_bytes / 2**20:.0f} MiB budget: the smallest index)"
    return IndexChoice(
        factory=f"IVF{nlist},{codes}",
        nprobe=nprobe_for(nlist),
        train_size=min(n_vectors, max(MIN_TRAIN_SIZE, TRAIN_PER_LIST * nlist)),
        reason=why,
    )


def choice_for_factory(factory: str, n_vectors: int) -> IndexChoice:
    """Search settings and training size for a factory string the user gave."""
    factory = factory.strip()
    if factory.upper() == FLAT.upper():
        return IndexChoice(FLAT, reason="asked for")
    nlist = _nlist_of(factory)
    nprobe = nprobe_for(nlist) if nlist else None
    train = min(n_vectors, max(MIN_TRAIN_SIZE, TRAIN_PER_LIST * (nlist or 0)))
    ef = HNSW_EF_SEARCH if "HNSW" in factory.upper() else None
    return IndexChoice(factory, nprobe=nprobe, ef_search=ef, train_size=train, reason="asked for")


def trainable(factory: str, n_vectors: int) -> bool:
    """Whether n vectors are enough to train the index (IVF wants 39 per list)."""
    nlist = _nlist_of(factory)
    return n_vectors >= MIN_TRAIN_PER_LIST * nlist if nlist else n_vectors > 0


def _nlist_of(factory: str) -> int:
    for part in factory.split(","):
        part = part.strip().upper()
        if part.startswith("IVF"):
            digits = ""
            for ch in part[3:]:
                if not ch.isdigit():
                    break
                digits += ch
            return int(digits) if digits else 0
    return 0


def default_memory_budget() -> int:
    """$SIMSEARCH_INDEX_MEMORY, else half of the machine's RAM."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if raw:
        return parse_bytes(raw)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return int(total * DEFAULT_BUDGET_FRACTION)


def parse_bytes(text: str) -> int:
    """'2G', '512M', '1000000' -> bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = float(number) * factor
    except ValueError:
        raise ValueError(f"{text!r} is not a size; write e.g. 4G or 512M") from None
    if value <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    return int(value)


def sample_positions(n: int, size: int, seed: int = TRAIN_SEED) -> np.ndarray:
    """A seeded, sorted sample of row positions (all rows when size >= n)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


# -- the FAISS side --------------------------------------------------------------------------


def new_ann(dim: int, factory: str) -> faiss.Index:
    """An inner-product index for the factory that stores our int64 ids.

    IVF indexes keep ids in their lists; anything else gets an IndexIDMap (no reverse map: the
    exact vectors answer lookups by id).
    """
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if faiss.try_extract_index_ivf(index) is None:
        index = faiss.IndexIDMap(index)
    return index


def set_search_params(index: faiss.Index, nprobe: int | None, ef_search: int | None) -> None:
    """Apply nprobe / efSearch to whichever part of the index has them."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe:
        ivf.nprobe = int(min(nprobe, ivf.nlist))
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if hasattr(inner, "hnsw") and ef_search:
        inner.hnsw.efSearch = int(ef_search)


def search_params(index: faiss.Index) -> dict[str, int]:
    """The search settings in effect, for saving and `description`."""
    out: dict[str, int] = {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        out["nlist"], out["nprobe"] = int(ivf.nlist), int(ivf.nprobe)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if hasattr(inner, "hnsw"):
        out["efSearch"] = int(inner.hnsw.efSearch)
    return out


# -- exact vectors ---------------------------------------------------------------------------


class ExactVectors:
    """Exact float32 vectors by int64 id: a sorted base (often memory-mapped) plus changes.

    The base is never written to: removals mark it, additions go to a growable buffer kept
    sorted by id, and `merged` streams both in id order for the next save.
    """

    def __init__(
        self,
        dim: int,
        base_ids: np.ndarray | None = None,
        base: np.ndarray | None = None,
    ) -> None:
        self.dim = dim
        self._base_ids = np.empty(0, np.int64) if base_ids is None else base_ids
        self._base = np.empty((0, dim), np.float32) if base is None else base
        self._base_alive = np.ones(len(self._base_ids), dtype=bool)
        self._base_removed = 0
        self._rows = np.empty((0, dim), dtype=np.float32)  # added rows (capacity grows)
        self._row_count = 0
        self._sorted_ids = np.empty(0, np.int64)  # ids of live added rows, ascending
        self._sorted_slots = np.empty(0, np.int64)  # their rows in _rows
        self._rows_read = 0  # memory-mapped rows read since the mappings were last dropped

    def __len__(self) -> int:
        return len(self._base_ids) - self._base_removed + len(self._sorted_ids)

    @property
    def memory_mapped(self) -> bool:
        return isinstance(self._base, np.memmap)

    def base_is_sorted(self) -> bool:
        """Whether the base's ids strictly increase (a file that says so is intact there)."""
        return bool((np.diff(self._base_ids) > 0).all())

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """A boolean per id: is it present?"""
        return self.locate(ids)[0] >= 0

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(where, index): where 0 = base row, 1 = added row, -1 = absent."""
        where = np.full(len(ids), -1, dtype=np.int8)
        index = np.zeros(len(ids), dtype=np.int64)
        if len(self._base_ids):
            at = np.searchsorted(self._base_ids, ids)
            at_c = np.minimum(at, len(self._base_ids) - 1)
            hit = (self._base_ids[at_c] == ids) & self._base_alive[at_c]
            where[hit], index[hit] = 0, at_c[hit]
        if len(self._sorted_ids):
            at = np.searchsorted(self._sorted_ids, ids)
            at_c = np.minimum(at, len(self._sorted_ids) - 1)
            hit = self._sorted_ids[at_c] == ids
            where[hit], index[hit] = 1, self._sorted_slots[at_c[hit]]
        return where, index

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ids that are present (check with `contains` first), as (n, dim) float32."""
        where, index = self.locate(ids)
        if (where < 0).any():
            raise KeyError(f"ids not present: {ids[where < 0][:10].tolist()}")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        base = where == 0
        if base.any():
            out[base] = self._base[index[base]]
        if (~base).any():
            out[~base] = self._rows[index[~base]]
        return out

    def rows(self, where: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Rows for `locate`'s answer; absent ones (where -1) come back as arbitrary rows."""
        base, added = where == 0, where == 1
        if not added.any() and len(self._base):  # the usual cases: one gather, no masks
            return np.asarray(np.take(self._base, np.where(base, index, 0), axis=0))
        if not base.any() and self._row_count:
            return np.take(self._rows, np.where(added, index, 0), axis=0)
        out = np.zeros((len(where), self.dim), dtype=np.float32)
        out[base] = self._base[index[base]]
        out[added] = self._rows[index[added]]
        return out

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add rows under ids that are not present (the caller checks)."""
        n = len(ids)
        if n == 0:
            return
        need = self._row_count + n
        if need > len(self._rows):
            grown = np.empty((max(need, 2 * len(self._rows), 1024), self.dim), dtype=np.float32)
            grown[: self._row_count] = self._rows[: self._row_count]
            self._rows = grown
        slots = np.arange(self._row_count, need)
        self._rows[self._row_count : need] = vectors
        self._row_count = need
        order = np.argsort(ids, kind="stable")
        at = np.searchsorted(self._sorted_ids, ids[order])
        self._sorted_ids = np.insert(self._sorted_ids, at, ids[order])
        self._sorted_slots = np.insert(self._sorted_slots, at, slots[order])

    def remove(self, ids: np.ndarray) -> int:
        """Remove present ids; returns how many were present."""
        where, index = self.locate(ids)
        base = index[where == 0]
        self._base_alive[base] = False
        self._base_removed += len(base)
        added = ids[where == 1]
        if len(added):
            at = np.searchsorted(self._sorted_ids, added)
            self._sorted_ids = np.delete(self._sorted_ids, at)
            self._sorted_slots = np.delete(self._sorted_slots, at)
        return int((where >= 0).sum())

    def ids(self) -> np.ndarray:
        """Every id, ascending."""
        return np.union1d(self._base_ids[self._base_alive], self._sorted_ids)

    def merged(self, chunk: int = 65_536):
        """(ids, vectors) chunks of every present vector in ascending id order."""
        base_ids = self._base_ids[self._base_alive]
        base_pos = np.flatnonzero(self._base_alive)
        all_ids = np.concatenate([base_ids, self._sorted_ids])
        source = np.concatenate(
            [np.zeros(len(base_ids), np.int8), np.ones(len(self._sorted_ids), np.int8)]
        )
        index = np.concatenate([base_pos, self._sorted_slots])
        order = np.argsort(all_ids, kind="stable")
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            out = np.empty((len(part), self.dim), dtype=np.float32)
            base = source[part] == 0
            if base.any():
                out[base] = self._base[index[part][base]]
            if (~base).any():
                out[~base] = self._rows[index[part][~base]]
            yield all_ids[part], out

    def release(self, rows_read: int) -> None:
        """Unmap the memory-mapped rows read so far, every RELEASE_ROWS rows (the pages stay in
        the OS page cache).

        Re-ranking reads a few rows per query, but the kernel maps 64 KiB around each row it
        faults in; dropping those mappings now and then keeps the process's resident memory to
        the index itself instead of growing to the whole file.
        """
        self._rows_read += rows_read
        if self._rows_read < RELEASE_ROWS:
            return
        self._rows_read = 0
        mapping = getattr(self._base, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise"):
            try:
                mapping.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError, AttributeError):  # no MADV_DONTNEED here: harmless
                pass

    def nbytes_in_memory(self) -> int:
        """Bytes held in RAM (a memory-mapped base counts as none)."""
        base = 0 if self.memory_mapped else self._base.nbytes
        return int(base + self._rows.nbytes + self._base_ids.nbytes + self._sorted_ids.nbytes * 2)
