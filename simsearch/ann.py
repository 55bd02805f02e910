"""Approximate indexes: which one to build for a store, and the exact vectors that re-rank them.

`choose_index` is a pure function of the vector count, the dimension and a memory budget, as
autofaiss's is: exact (Flat) search while the store is small enough for it to be fast, then an
inverted file over 128 dimensions, rotated by OPQ for the code that follows, with a 4-bit code
per pair of them ("OPQ64_128,IVF{nlist},PQ64x4fs", scanned with SIMD), that proposes a few
candidates per result, re-ranked exactly. A FAISS factory string overrides the choice.

Which lists to search and how many candidates to re-rank depends on the data, so a built index
is calibrated (`calibration_ladder`, done by `VectorIndex.build`): each setting, a fixed number
of lists or those within a ratio of the query's nearest centroid (`Pruning`), is priced by the
codes its lists hold for a seeded sample of the stored vectors (`ProbeCost`), and the cheapest
whose recall@10 against exact search on that sample reaches the target is kept.

HNSW is not chosen automatically: its graph costs about as much memory as the vectors and takes
tens of minutes to build for a million vectors on a few cores, against a minute or two for the
inverted file; it remains available as an override ("HNSW32").

Approximate codes lose precision, so every approximate index keeps the exact float32 vectors
beside it (`ExactVectors`): candidates are re-scored from them, distances are exact, and
`reconstruct` returns the stored vectors unchanged. They are written into the same index file and
memory-mapped when it is loaded: the process holds only the codes, ids and an id table (about
52 MiB per million 512-d vectors), and the rows re-ranked are read through the operating
system's page cache, which keeps the file's pages while memory allows and drops them (clean,
reclaimable) when it does not.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
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
# Approximate indexes reduce the vectors to REDUCED_DIMS dimensions and code each pair of them in
# 4 bits (fast-scan PQ, 32 bytes per vector); candidates are re-ranked exactly from the stored
# vectors. 128 and not 64 directions: on real embeddings of the default model (4,600 photos) the
# 30 nearest in 64 principal directions hold 0.88 of the true 10 nearest, in 128 directions 0.95
# (on bin/bench-search's vectors 0.98 and 0.995). The reduction is OPQ's, which rotates the
# dimensions so that each pair holds a like share of the length, where PCA's first pairs hold
# most of it: on bin/bench-search (1,000,000 x 512, each calibrated to 0.96) OPQ64_128 with
# PQ64x4fs searched 1.05-1.12x as fast as PCA128 with one 4-bit code per direction (PQ128x4fs),
# recall@10 0.958-0.959 against 0.961, half the code memory. Vectors of 128 dimensions or fewer
# keep one code per dimension, unrotated.
REDUCED_DIMS = 128
# OPQ's rotation trains for this many iterations (FAISS: 50): on bin/bench-search's million the
# build took 66 s against 115 s, for 0.0011 less recall@10.
OPQ_ITERATIONS = 10
# Lists searched per query to start from (a 256th, at least 8) and candidates re-ranked per
# result (k * RERANK); `calibration_ladder` raises both until recall@10 on a sample of the
# stored vectors reaches TARGET_RECALL. bin/bench-search (1,000,000 x 512,
# PCA128,IVF2048,PQ128x4fs, 30 candidates): recall@10 0.945 / 0.957 / 0.969 at nprobe 10 / 12 /
# 16; 60 candidates add 0.004.
NPROBE_DIVISOR = 256
MIN_NPROBE = 8
RERANK = 3
# Candidates re-ranked are at least this many more than k, so that ties at the k-th can be settled.
MIN_EXTRA_CANDIDATES = 16
# How automatic indexes are built and searched; a store's automatic index made by an older
# method is rebuilt when the store next changes (1: fixed nprobe; 2: lists pruned per query,
# settings priced by the codes they scan).
SEARCH_METHOD = 2
# Recall@10 the calibration asks of its sample; 0.95 is promised, the rest covers the sample's
# error (about 0.003 with 1000 queries) and queries that are not stored vectors: on
# bin/bench-search's held-out queries pruned settings find up to 0.005 less than on the sample.
TARGET_RECALL = 0.96
CALIBRATION_QUERIES = 1000
CALIBRATION_K = 10
NPROBE_STEP = 1.25  # each rung of the ladder searches a quarter more lists
MAX_EFFORT = 16  # ... up to 16 times the starting nprobe / efSearch
# ... and re-ranks rerank - 1, rerank + 1, 2 or 4 times rerank x k candidates (`rerank_choices`)
RERANK_MULTIPLES = (2, 4)
RERANK_COST = 0.75  # cost of one more multiple of re-ranking, in multiples of the start nprobe
# Pruned probing (IVF, Euclidean): a query searches the lists whose centroid's squared distance
# is within `ratio` times its nearest centroid's, at least half the starting nprobe and at most
# one of PRUNE_CAPS times it. Queries near one centroid search few lists, queries between
# several more. bin/bench-search (PCA128,IVF2048,PQ128x4fs, 30 candidates): recall@10 0.970
# from 12.3 lists (ratio 1.5, at least 4, at most 32) and 18.2 ms of scan per 1000 queries,
# against 0.968 from 16 lists and 22.1 ms with a fixed nprobe; at most 16 lists within 1.6x,
# 0.964 in 35.6 ms per 1000 queries in all, against 0.957 in 37.4 ms at most 32 within 1.4x.
PRUNE_RATIOS = (1.2, 1.25, 1.3, 1.35, 1.4, 1.45, 1.5, 1.6, 1.7, 1.8, 2.0, 2.5, 3.0)
PRUNE_CAPS = (1.5, 2, 3, 4)
PRUNE_CAP = max(PRUNE_CAPS)
# Where the data tells what a rung costs (IVF: the codes its lists hold for the sample's
# queries), seconds per code and per byte scanned and per byte re-ranked; measured on
# bin/bench-search (1,000,000 x 512, 2 cores): 1.46 ns per 64-byte code scanned, 0.2 us per 2 KiB
# row re-ranked, and the coarse quantizer 0.12 us per list it is asked for (5.2 ms per 1000
# queries at 16, 7.0 at 32 of 2048 lists). A 32-byte code costs 0.63 of a 64-byte one, not half
# (1.22-1.38 against 2.01-2.16 ns, measured side by side): a part of the scan is per code.
SCAN_SECONDS_PER_CODE = 0.40e-9
SCAN_SECONDS_PER_BYTE = 0.0166e-9
RERANK_SECONDS_PER_BYTE = 0.1e-9
COARSE_SECONDS_PER_LIST = 0.12e-6
HNSW_EF_SEARCH = 64
# Training sample: enough for the coarse k-means (FAISS asks 39 per list) and the PQ codebooks.
TRAIN_PER_LIST = 64
MIN_TRAIN_SIZE = 65_536
TRAIN_SEED = 1234
# Fraction of the whole RAM an index may use when no budget is given.
DEFAULT_BUDGET_FRACTION = 0.5
BUDGET_ENV = "SIMSEARCH_INDEX_MEMORY"  # bytes, or with a K/M/G suffix
# Dense id -> row table for the base when its ids span at most this many times their count.
TABLE_SPAN_FACTOR = 4
TABLE_MIN_SPAN = 1 << 16


@dataclass(frozen=True, slots=True)
class Pruning:
    """Lists an IVF query searches: those whose centroid's squared distance is within ratio
    times the nearest centroid's, at least min_lists of them and at most nprobe."""

    ratio: float
    min_lists: int

    def covers(self, other: Pruning | None) -> bool:
        """Whether these lists include other's for every query (same nprobe or more)."""
        return other is not None and self.ratio >= other.ratio and self.min_lists >= other.min_lists


@dataclass(frozen=True, slots=True)
class Rung:
    """One search setting the calibration may try."""

    nprobe: int | None  # lists searched per query (IVF), the most with pruning
    ef_search: int | None  # beam width (HNSW)
    rerank: int  # candidates re-ranked exactly per result asked for
    pruning: Pruning | None = None

    def covers(self, other: Rung) -> bool:
        """Whether this rung searches at least what other does: its recall is as high or more."""
        lists = self.pruning is None or self.pruning.covers(other.pruning)
        return (
            lists
            and self.rerank >= other.rerank
            and (self.nprobe or 0) >= (other.nprobe or 0)
            and (self.ef_search or 0) >= (other.ef_search or 0)
        )


@dataclass(frozen=True, slots=True)
class IndexChoice:
    """The index to build for a store, and how to search it."""

    factory: str  # FAISS factory string of the index, e.g. "Flat" or "IVF4096,PQ64x4fs"
    nprobe: int | None = None  # inverted lists searched per query (IVF)
    ef_search: int | None = None  # beam width of the graph search (HNSW)
    train_size: int = 0  # vectors sampled (seeded) to train it; 0: needs no training
    rerank: int = RERANK  # candidates re-scored exactly per result asked for (approximate only)
    target_recall: float | None = None  # calibrate search effort to this recall@10 (approximate)
    reason: str = ""  # one line for logs

    @property
    def approximate(self) -> bool:
        return self.factory != FLAT


def flat_bytes(n_vectors: int, dim: int) -> int:
    """Memory of exact search: float32 vectors plus their bf16 copy."""
    return n_vectors * dim * (4 + 2)


def ivf_pq_bytes(n_vectors: int, dim: int, nlist: int, m: int) -> int:
    """Memory of an (OPQ,) IVF-PQ (4-bit) index in RAM: codes, ids, centroids, lookup tables and
    the rotation, with m sub-quantizers over the reduced dimensions."""
    reduced = reduced_dims(dim)
    rotation = dim * reduced * 4 if reduced < dim else 0
    return n_vectors * (m // 2 + 8) + nlist * reduced * 4 + 16 * reduced * 4 + rotation


def reduced_dims(dim: int) -> int:
    """Dimensions the approximate index works in: REDUCED_DIMS principal directions, or all."""
    return min(dim, REDUCED_DIMS)


def pq_subquantizers(dim: int) -> int:
    """Sub-quantizers of a 4-bit PQ code: one per pair of reduced (rotated) dimensions, or per
    dimension where nothing is reduced; 0 for an odd dimension (no PQ code fits it: 8-bit scalar
    codes instead)."""
    reduced = reduced_dims(dim)
    if reduced % 2:
        return 0
    return reduced // 2 if reduced < dim else reduced


def nlist_for(n_vectors: int) -> int:
    """Inverted lists for n vectors: a power of two near 4 sqrt(n), trainable from n vectors."""
    target = NLIST_PER_SQRT_N * math.sqrt(max(n_vectors, 1))
    nlist = 2 ** round(math.log2(max(target, 1)))
    nlist = min(max(nlist, MIN_NLIST), MAX_NLIST)
    while nlist > 1 and nlist * MIN_TRAIN_PER_LIST > n_vectors:
        nlist //= 2
    return nlist


def nprobe_for(nlist: int) -> int:
    """Lists searched per query to start calibrating from: a 256th, at least 8 (all, for tiny
    inverted files)."""
    return min(nlist, max(MIN_NPROBE, nlist // NPROBE_DIVISOR))


def approximate_factory(dim: int, nlist: int) -> str:
    """The automatic approximate index: OPQ (when it reduces), IVF, 4-bit PQ or 8-bit SQ codes."""
    reduced = reduced_dims(dim)
    m = pq_subquantizers(dim)
    codes = f"PQ{m}x4fs" if m else "SQ8"
    rotation = f"OPQ{m}_{reduced}," if reduced < dim else ""  # REDUCED_DIMS is even: m > 0
    return f"{rotation}IVF{nlist},{codes}"


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
    needed = ivf_pq_bytes(n_vectors, dim, nlist, m) if m else n_vectors * (dim + 8)
    why = (
        f"{n_vectors} vectors: exact search holds {flat / 2**20:.0f} MiB; an inverted file "
        f"proposes candidates from {needed / 2**20:.0f} MiB and they are re-ranked exactly"
    )
    if needed > memory_budget_bytes:
        why += f" (over the {memory_budget_bytes / 2**20:.0f} MiB budget: the smallest index)"
    return IndexChoice(
        factory=approximate_factory(dim, nlist),
        nprobe=nprobe_for(nlist),
        train_size=min(n_vectors, max(MIN_TRAIN_SIZE, TRAIN_PER_LIST * nlist)),
        target_recall=TARGET_RECALL,
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
    return IndexChoice(
        factory,
        nprobe=nprobe,
        ef_search=ef,
        train_size=train,
        target_recall=TARGET_RECALL,
        reason="asked for",
    )


def candidates(k: int, rerank: int, n_vectors: int) -> int:
    """Candidates an approximate search of k re-ranks: k x rerank, at least k + 16, at most all."""
    return min(n_vectors, max(k * rerank, k + MIN_EXTRA_CANDIDATES))


def rerank_choices(rerank: int) -> list[int]:
    """Candidates per result the calibration tries: one fewer, as given, one more, 2x, 4x."""
    return sorted({max(1, rerank - 1), rerank, rerank + 1, *(rerank * m for m in RERANK_MULTIPLES)})


def calibration_ladder(
    nprobe: int | None,
    ef_search: int | None,
    rerank: int,
    nlist: int | None,
    *,
    prune: bool = False,
    cost: Callable[[Rung], float] | None = None,
) -> list[Rung]:
    """Search settings from the given ones upwards, cheapest first.

    Lists searched (or the HNSW beam) grow NPROBE_STEP at a time up to MAX_EFFORT times the
    start (and every list); candidates re-ranked are `rerank_choices`. With ``prune`` (an IVF
    searched by Euclidean distance) there are also pruned rungs: up to PRUNE_CAPS times the
    start nprobe, at least half of it, within each of PRUNE_RATIOS (`Pruning`).

    ``cost`` estimates a rung's time from the data (`VectorIndex.calibrate` counts the codes its
    lists hold); without it, a rung costs its effort (multiples of the start nprobe / efSearch)
    plus RERANK_COST per extra multiple of re-ranking (measured on bin/bench-search at a
    million vectors: 30 more candidates per query cost 7-8 ms per 1000 queries, 4 more lists
    5 ms), so data whose reduced codes rank poorly gets more exact re-scoring, and other data
    more lists.
    """
    efforts = [1.0]
    while efforts[-1] * NPROBE_STEP <= MAX_EFFORT:
        efforts.append(efforts[-1] * NPROBE_STEP)
    rungs: set[Rung] = set()
    for effort in efforts:
        probe = None if nprobe is None else max(1, round(nprobe * effort))
        if probe is not None and nlist:
            probe = min(probe, nlist)
        ef = None if ef_search is None else max(1, round(ef_search * effort))
        rungs.update(Rung(probe, ef, r) for r in rerank_choices(rerank))
    if prune and nprobe:
        for multiple in PRUNE_CAPS:
            cap = max(1, round(nprobe * multiple))
            cap = min(cap, nlist) if nlist else cap
            floor = min(cap, max(1, nprobe // 2))
            for ratio in PRUNE_RATIOS:
                pruning = Pruning(ratio, floor)
                rungs.update(Rung(cap, None, r, pruning) for r in rerank_choices(rerank))

    def effort_cost(rung: Rung) -> float:
        effort = rung.nprobe / nprobe if nprobe and rung.nprobe else 1.0
        if ef_search and rung.ef_search:
            effort = rung.ef_search / ef_search
        return effort + RERANK_COST * (rung.rerank / rerank - 1)

    estimate = cost or effort_cost

    def key(rung: Rung) -> tuple[float, int, float, int, int]:
        ratio = rung.pruning.ratio if rung.pruning else math.inf
        return (estimate(rung), rung.rerank, ratio, rung.nprobe or 0, rung.ef_search or 0)

    return sorted(rungs, key=key)


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


def new_ann(dim: int, factory: str, metric: int = faiss.METRIC_L2) -> faiss.Index:
    """An index for the factory that stores our int64 ids, searched by Euclidean distance.

    Euclidean, the distance candidates are re-ranked by: an inverted file can then prune its
    lists by it (`Pruning`), and FAISS's PCA centres the vectors, which changes inner-product
    order but not Euclidean order. (Files made before used inner product for factories without
    a transform, the same order for unit vectors; they still load and serve, unpruned.)
    IVF indexes (alone or behind transforms) keep ids in their lists; anything else, a refined
    IVF too, gets an IndexIDMap (no reverse map: the exact vectors answer lookups by id). OPQ
    rotations train for OPQ_ITERATIONS.
    """
    index = faiss.index_factory(dim, factory, metric)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = OPQ_ITERATIONS
    inner = (
        faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    )
    if not isinstance(inner, faiss.IndexIVF):
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


def prunable_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The inverted file of an index whose lists can be pruned per query: an IVF searched by
    Euclidean distance, alone or behind transforms (not inside a refine or other wrapper)."""
    inner = (
        faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    )
    if not isinstance(inner, faiss.IndexIVF) or inner.metric_type != faiss.METRIC_L2:
        return None
    return inner


def transformed(index: faiss.Index, xq: np.ndarray) -> np.ndarray:
    """Queries as the index's inverted file sees them (after its PCA or other transforms)."""
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            xq = index.chain.at(i).apply(xq)
    return np.ascontiguousarray(xq, dtype=np.float32)


def prune_lists(distances: np.ndarray, lists: np.ndarray, pruning: Pruning) -> np.ndarray:
    """The coarse quantizer's lists per query (nearest first) with those pruned set to -1."""
    nearest = np.maximum(distances[:, :1], 0)
    cut = distances > pruning.ratio * nearest
    cut[:, : pruning.min_lists] = False
    return np.where(cut, -1, lists)


def search_candidates(
    index: faiss.Index, xq: np.ndarray, k: int, pruning: Pruning | None
) -> np.ndarray:
    """The index's k candidates per query (-1 padded); with pruning, from the lists it keeps."""
    ivf = prunable_ivf(index) if pruning is not None else None
    if ivf is None:
        return index.search(xq, k)[1]
    xt = transformed(index, xq)
    distances, lists = ivf.quantizer.search(xt, ivf.nprobe)
    return ivf.search_preassigned(xt, k, prune_lists(distances, lists, pruning), distances)[1]


class ProbeCost:
    """What each search setting of an IVF costs on given queries: the codes its lists hold.

    Deterministic (no timing), so the calibration's choice does not depend on the machine's
    load; converted to seconds with COARSE_SECONDS_PER_LIST, SCAN_SECONDS_PER_CODE and
    SCAN_SECONDS_PER_BYTE, and RERANK_SECONDS_PER_BYTE. For an IVF alone or behind transforms
    (`prunable_ivf`).
    """

    def __init__(self, index: faiss.Index, xq: np.ndarray, max_nprobe: int, k: int) -> None:
        ivf = prunable_ivf(index)
        if ivf is None:
            raise ValueError("ProbeCost prices an IVF searched by Euclidean distance")
        self._code_size = int(ivf.code_size)
        self._row_bytes = 4 * int(index.d)
        self._k = k
        self._n_vectors = int(index.ntotal)
        sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.float64)
        self._sizes = np.append(sizes, 0.0)  # list -1 (pruned, or none left) holds nothing
        nprobe = min(int(max_nprobe), int(ivf.nlist))
        self._distances, self._lists = ivf.quantizer.search(transformed(index, xq), nprobe)

    def __call__(self, rung: Rung) -> float:
        """Seconds per query: asking the coarse quantizer for the rung's nprobe lists, scanning
        those it keeps and re-ranking its candidates."""
        lists = self._lists[:, : rung.nprobe or self._lists.shape[1]]
        if rung.pruning is not None:
            lists = prune_lists(self._distances[:, : lists.shape[1]], lists, rung.pruning)
        codes = float(self._sizes[lists].sum(axis=1).mean())
        scan = codes * (SCAN_SECONDS_PER_CODE + self._code_size * SCAN_SECONDS_PER_BYTE)
        fetch = candidates(self._k, rung.rerank, self._n_vectors)
        rerank = fetch * self._row_bytes * RERANK_SECONDS_PER_BYTE
        coarse = lists.shape[1] * COARSE_SECONDS_PER_LIST
        return coarse + scan + rerank


def squared_distance_error(dim: int) -> float:
    """Relative error bound of a float32 squared distance summed over dim squared differences.

    Each difference is rounded once (relative u = 2^-24), its square once, and recursive
    summation of d positive terms adds at most (d - 1) u in any order (Higham, ch. 4): within
    gamma_(d+2) = (d + 2) u / (1 - (d + 2) u); one percent more covers the denominator.
    """
    return 1.01 * (dim + 2) * 2.0**-24


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
        self._table: np.ndarray | None = None  # see _base_table

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
            table = self._base_table()
            if table is None:
                at_c = np.minimum(np.searchsorted(self._base_ids, ids), len(self._base_ids) - 1)
                hit = (self._base_ids[at_c] == ids) & self._base_alive[at_c]
            else:  # removed rows are -1 there too
                offset = ids - self._base_ids[0]
                inside = (offset >= 0) & (offset < len(table))
                at = table[np.where(inside, offset, 0)]
                hit = inside & (at >= 0)
                at_c = np.where(hit, at, 0)
            where[hit], index[hit] = 0, at_c[hit]
        if len(self._sorted_ids):
            at = np.searchsorted(self._sorted_ids, ids)
            at_c = np.minimum(at, len(self._sorted_ids) - 1)
            hit = self._sorted_ids[at_c] == ids
            where[hit], index[hit] = 1, self._sorted_slots[at_c[hit]]
        return where, index

    def _base_table(self) -> np.ndarray | None:
        """Base row by (id - first id), -1 for gaps and removed rows, when the ids are dense
        enough for it.

        Re-ranking looks up every candidate; a table answers with one read where a binary
        search over a million ids takes twenty (4x faster on the benchmark's re-ranking). Ids
        are SQLite row ids, dense unless many images were removed; sparse ids keep the search.
        """
        if self._table is None:
            span = int(self._base_ids[-1] - self._base_ids[0]) + 1
            if span > TABLE_SPAN_FACTOR * len(self._base_ids) + TABLE_MIN_SPAN:
                self._table = np.empty(0, np.int32)  # too sparse: remembered as empty
            else:
                table = np.full(span, -1, dtype=np.int32)
                table[self._base_ids - self._base_ids[0]] = np.where(
                    self._base_alive, np.arange(len(self._base_ids), dtype=np.int32), -1
                )
                self._table = table
        return self._table if len(self._table) else None

    def squared_distances(
        self, queries: np.ndarray, where: np.ndarray, index: np.ndarray
    ) -> np.ndarray:
        """Float32 squared distances from each query to its row of `locate`'s answer.

        where and index are (b, width); absent rows (where -1) give inf. FAISS reads each row
        in place (the memory-mapped file, no gathered copy) on all its threads, and sums the
        squared differences, so the result is within (dim + 2) 2^-24 of the exact value,
        relative (see `squared_distance_error`).
        """
        b, width = where.shape
        xq = np.ascontiguousarray(queries, dtype=np.float32)
        out = np.full((b, width), np.inf, dtype=np.float32)
        for source, rows in ((0, self._base), (1, self._rows[: self._row_count])):
            mine = where == source
            if not mine.any():
                continue
            positions = np.ascontiguousarray(np.where(mine, index, -1), dtype=np.int64)
            part = np.empty((b, width), dtype=np.float32)
            faiss.fvec_L2sqr_by_idx(
                faiss.swig_ptr(part),
                faiss.swig_ptr(xq),
                faiss.swig_ptr(np.ascontiguousarray(rows)),
                faiss.swig_ptr(positions),
                self.dim,
                b,
                width,
            )
            np.minimum(out, part, out=out)
        return out

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
        if self._table is not None and len(self._table):
            self._table[self._base_ids[base] - self._base_ids[0]] = -1
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

    def nbytes_in_memory(self) -> int:
        """Bytes held in RAM (a memory-mapped base counts as none)."""
        base = 0 if self.memory_mapped else self._base.nbytes
        table = 0 if self._table is None else self._table.nbytes
        return int(
            base + self._rows.nbytes + self._base_ids.nbytes + self._sorted_ids.nbytes * 2 + table
        )
