"""Near-duplicate groups over a whole store, without an N x N distance matrix.

Every stored vector is a query, in blocks: reconstruct a block of vectors, search their k nearest
neighbours, keep the pairs closer than the threshold. A query whose k-th neighbour is still under
the threshold is searched again with a larger k until its last neighbour is not, so no pair is
cut off by k. Groups are the connected components of the pairs (union-find), so a chain
a ~ b ~ c is one group even when a and c are far apart. Memory is bounded by the block size
(block x k results at a time) plus the pairs found; the search itself is the index's, exact or
approximate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from simsearch.errors import InputError
from simsearch.progress import NoProgress, Progress

if TYPE_CHECKING:
    from simsearch.collection import Collection

log = logging.getLogger(__name__)

# Calibrated with bin/calibrate-duplicates on the default model (deepranking-efficientnet_lite0):
# see the docstring of `simsearch duplicates` for the figures.
DEFAULT_THRESHOLD = 0.475
DEFAULT_K = 10  # neighbours per query in the first search (the query itself comes on top)
DEFAULT_BLOCK = 4096  # queries per search call
_RESEARCH_GROWTH = 4  # k grows by this factor for queries whose k-th neighbour is under T
_MAX_RESULTS = 1 << 22  # rows x k of one re-search call: bounds its memory
_COMPACT_CODES = 1 << 22  # pair codes gathered before duplicates among them are dropped
_LOOKUP_CHUNK = 500  # ids per SQL query for paths
_VECTOR_CHUNK = 65_536  # ids per reconstruct call when measuring distances in groups


class SearchableIndex(Protocol):
    """What duplicate search needs from `simsearch.index.VectorIndex` (tests may pass others)."""

    def __len__(self) -> int: ...
    def ids(self) -> np.ndarray: ...
    def reconstruct(self, ids: np.ndarray) -> np.ndarray: ...
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(slots=True)
class NearPairs:
    """Every pair of ids (a < b) closer than the threshold, and how the search went."""

    a: np.ndarray  # int64 ids
    b: np.ndarray  # int64 ids, a < b
    images: int  # vectors searched
    researched: int  # queries searched again with a larger k
    max_k: int  # the largest k any query needed


@dataclass(frozen=True, slots=True)
class Member:
    id: int
    path: str
    sha1: str | None
    distance: float  # to the group's first image (its lowest id)


@dataclass(slots=True)
class DuplicateGroup:
    number: int
    members: list[Member]

    @property
    def size(self) -> int:
        return len(self.members)

    def to_dict(self) -> dict:
        return {
            "group": self.number,
            "size": self.size,
            "images": [asdict(m) for m in self.members],
        }


@dataclass(slots=True)
class DuplicateReport:
    threshold: float
    k: int
    images: int
    pairs: int
    researched: int
    max_k: int
    seconds: float
    groups: list[DuplicateGroup] = field(default_factory=list)

    @property
    def images_in_groups(self) -> int:
        return sum(g.size for g in self.groups)

    def summary(self) -> dict:
        return {
            "threshold": self.threshold,
            "k": self.k,
            "images": self.images,
            "groups": len(self.groups),
            "images_in_groups": self.images_in_groups,
            "pairs": self.pairs,
            "researched": self.researched,
            "max_k": self.max_k,
            "seconds": round(self.seconds, 3),
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "groups": [g.to_dict() for g in self.groups]}

    def line(self) -> str:
        return (
            f"{len(self.groups)} groups, {self.images_in_groups} images in groups, "
            f"{self.pairs} pairs closer than {self.threshold:g} among {self.images} images "
            f"({self.seconds:.1f} s)"
        )


def _check_options(threshold: float, k: int, block_size: int) -> None:
    if not 0.0 < threshold <= 2.0:
        raise InputError(
            f"--threshold must be a Euclidean distance between unit vectors, above 0 and at "
            f"most 2, got {threshold:g}"
        )
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    if block_size < 1:
        raise InputError(f"--block-size must be at least 1, got {block_size}")


def near_pairs(
    index: SearchableIndex,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    k: int = DEFAULT_K,
    block_size: int = DEFAULT_BLOCK,
    progress: Progress | None = None,
) -> NearPairs:
    """Every pair of stored vectors closer than `threshold`, by k-NN search in blocks."""
    _check_options(threshold, k, block_size)
    progress = progress or NoProgress()
    ids = np.asarray(index.ids(), dtype=np.int64)
    n = len(ids)
    codes: list[np.ndarray] = []
    gathered = 0
    researched = 0
    first_k = min(n, k + 1)  # +1: the query itself is its own nearest neighbour
    max_k = first_k
    progress.start(n, "duplicates")
    try:
        for start in range(0, n, block_size):
            query_ids = ids[start : start + block_size]
            queries = index.reconstruct(query_ids)
            distances, found = index.search(queries, first_k)
            block_codes = [_pair_codes(ids, query_ids, distances, found, threshold)]
            pending = _cut_off(distances, found, threshold) if first_k < n else None
            wider = first_k
            while pending is not None and pending.any():
                rows = np.flatnonzero(pending)
                researched += len(rows) if wider == first_k else 0
                wider = min(n, wider * _RESEARCH_GROWTH)
                max_k = max(max_k, wider)
                pending = np.zeros(len(query_ids), dtype=bool)
                step = max(1, _MAX_RESULTS // wider)
                for at in range(0, len(rows), step):
                    sub = rows[at : at + step]
                    d_sub, f_sub = index.search(queries[sub], wider)
                    block_codes.append(_pair_codes(ids, query_ids[sub], d_sub, f_sub, threshold))
                    if wider < n:
                        pending[sub[_cut_off(d_sub, f_sub, threshold)]] = True
            merged = np.unique(np.concatenate(block_codes))
            codes.append(merged)
            gathered += len(merged)
            if gathered > _COMPACT_CODES and len(codes) > 1:
                codes = [np.unique(np.concatenate(codes))]
                gathered = len(codes[0])
            progress.advance(len(query_ids))
    finally:
        progress.close()
    unique = np.unique(np.concatenate(codes)) if codes else np.empty(0, dtype=np.int64)
    if len(unique) == 0:
        empty = np.empty(0, dtype=np.int64)
        return NearPairs(empty, empty, n, researched, max_k)
    return NearPairs(ids[unique // n], ids[unique % n], n, researched, max_k)


def _cut_off(distances: np.ndarray, found: np.ndarray, threshold: float) -> np.ndarray:
    """Rows whose last neighbour is still under the threshold: more may lie beyond k."""
    return (distances[:, -1] < threshold) & (found[:, -1] >= 0)


def _pair_codes(
    ids: np.ndarray,
    query_ids: np.ndarray,
    distances: np.ndarray,
    found: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """Pairs under the threshold as lo_position * n + hi_position (one int64 per pair)."""
    keep = (distances < threshold) & (found >= 0) & (found != query_ids[:, None])
    if not keep.any():
        return np.empty(0, dtype=np.int64)
    rows, cols = np.nonzero(keep)
    a = np.searchsorted(ids, query_ids[rows])
    b = np.searchsorted(ids, found[rows, cols])
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return lo.astype(np.int64) * len(ids) + hi.astype(np.int64)


def components(a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Connected components of the pairs (a[i], b[i]), each a sorted id array, by union-find.

    Vectorised union-find: every round hooks each pair's larger root under the smaller one,
    then compresses the paths fully; rounds repeat until every pair shares a root.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if len(a) == 0:
        return []
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    u, v = inverse[: len(a)], inverse[len(a) :]
    parent = np.arange(len(nodes))
    while True:
        ru, rv = parent[u], parent[v]
        differ = ru != rv
        if not differ.any():
            break
        lo = np.minimum(ru[differ], rv[differ])
        hi = np.maximum(ru[differ], rv[differ])
        np.minimum.at(parent, hi, lo)  # hi is a root: it hangs under the smallest lo offered
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    order = np.argsort(parent, kind="stable")
    roots = parent[order]
    cuts = np.flatnonzero(np.diff(roots)) + 1
    return [nodes[group] for group in np.split(order, cuts)]


def find_duplicates(
    collection: Collection,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    k: int = DEFAULT_K,
    block_size: int = DEFAULT_BLOCK,
    progress: Progress | None = None,
) -> DuplicateReport:
    """Groups of near-duplicate images in the store, largest first."""
    _check_options(threshold, k, block_size)
    started = time.monotonic()
    index = collection.index()  # raises the "index some images first" error on an empty store
    pairs = near_pairs(index, threshold=threshold, k=k, block_size=block_size, progress=progress)
    groups = components(pairs.a, pairs.b)
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    distances = _distances_to_first(index, groups)
    rows = _rows(collection, np.concatenate(groups) if groups else np.empty(0, dtype=np.int64))
    report = DuplicateReport(
        threshold=threshold,
        k=k,
        images=pairs.images,
        pairs=len(pairs.a),
        researched=pairs.researched,
        max_k=pairs.max_k,
        seconds=0.0,
    )
    for group_ids, group_distances in zip(groups, distances, strict=True):
        members = [
            Member(int(i), rows[int(i)][0], rows[int(i)][1], float(d))
            for i, d in zip(group_ids, group_distances, strict=True)
            if int(i) in rows
        ]
        if len(members) < len(group_ids):
            log.warning(
                "%d image(s) of a group have no row in the store; left out",
                len(group_ids) - len(members),
            )
        if len(members) < 2:
            continue
        first, rest = members[0], sorted(members[1:], key=lambda m: (m.distance, m.id))
        report.groups.append(DuplicateGroup(len(report.groups) + 1, [first, *rest]))
    report.seconds = time.monotonic() - started
    return report


def _distances_to_first(index: SearchableIndex, groups: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each member's Euclidean distance to its group's first (lowest) id, in float64."""
    out: list[np.ndarray] = []
    start = 0
    while start < len(groups):
        stop, count = start, 0
        while stop < len(groups) and (count == 0 or count + len(groups[stop]) <= _VECTOR_CHUNK):
            count += len(groups[stop])
            stop += 1
        chunk = groups[start:stop]
        vectors = index.reconstruct(np.concatenate(chunk)).astype(np.float64)
        offset = 0
        for group in chunk:
            block = vectors[offset : offset + len(group)]
            out.append(np.sqrt(np.maximum(((block - block[0]) ** 2).sum(axis=1), 0.0)))
            offset += len(group)
        start = stop
    return out


def _rows(collection: Collection, ids: np.ndarray) -> dict[int, tuple[str, str | None]]:
    """(path, SHA-1) of each image id."""
    out: dict[int, tuple[str, str | None]] = {}
    wanted = [int(i) for i in ids]
    for start in range(0, len(wanted), _LOOKUP_CHUNK):
        images = collection.images(wanted[start : start + _LOOKUP_CHUNK])
        out.update({image_id: (row.path, row.sha1) for image_id, row in images.items()})
    return out
