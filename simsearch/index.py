"""The vector index: unit vectors keyed by the images' database ids, searched by Euclidean distance.

Two kinds, chosen by the FAISS factory string:

* **Flat** (the default): every vector in an ``IDMap2,Flat``; search is exact. Large searches
  run as a bf16 matrix product with a rigorous error bound and exact re-scoring
  (`simsearch.exact`: bf16 units do 2 (AVX512-BF16) to 16 (AMX) times the float32 work per
  cycle), over the few principal directions that hold most of the vectors' length plus a bound
  on the rest where that pays (`exact.make_searcher`); small ones go to FAISS, with the same
  guarantee checked from FAISS's float32 error bound.
* **Approximate** (any other factory, e.g. ``IVF4096,PQ64x4fs`` or ``HNSW32``): the FAISS index
  proposes ``k * rerank`` candidates per query, re-scored exactly from an exact copy of the
  vectors kept beside it (`simsearch.ann.ExactVectors`). Removal is lazy: removed ids leave the
  exact copy at once and the FAISS index when it is compacted (re-added from the exact copy,
  keeping its training) once stale entries pass a fifth of it.

Either way the distances returned are recomputed exactly in float64 from the stored vectors, so
an image queried against itself is at distance 0.0, ties are ordered by id, and `reconstruct`
returns the stored vectors unchanged.

Files are written atomically and end with a trailer (magic + lengths) so a truncated or foreign
file is refused before FAISS parses it: FAISS's memory-mapped reader can crash the process on a
truncated file instead of raising. An approximate index's file holds the FAISS index, then the
exact vectors (sorted by id) and a JSON header; loading maps the exact vectors from the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from simsearch import _blas

_blas.configure()  # before FAISS loads its OpenBLAS

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from faiss.contrib.factory_tools import reverse_index_factory  # noqa: E402

from simsearch import _parallel, ann  # noqa: E402
from simsearch.errors import SimsearchError, StoreError  # noqa: E402
from simsearch.fileio import fsync_directory  # noqa: E402

logger = logging.getLogger(__name__)

# Trailer of a Flat index file: magic, then the FAISS payload length in bytes.
_TRAILER = struct.Struct("<8sQ")
_MAGIC = b"SIMSIDX1"
# Trailer of an approximate index file: magic, FAISS payload length, JSON header offset, length.
_ANN_TRAILER = struct.Struct("<8sQQQ")
_ANN_MAGIC = b"SIMSANN1"
_ANN_FORMAT = 1
_ALIGN = 64
# FAISS flat search fetches k + ann.MIN_EXTRA_CANDIDATES, then this many times more if the
# check fails.
_FETCH_GROWTH = 4
# Floats per block of the exact re-ranking, to bound memory for many queries of high dimension.
_RERANK_BLOCK_FLOATS = 1 << 22
# Approximate search re-ranks queries in blocks whose candidate rows (float32) fit in this many
# floats (4 MiB): the float64 pass then re-reads rows still in cache (2x faster than 1000 at once).
_RERANK_CACHE_FLOATS = 1 << 20
# Norm deviation above which vectors are reported as not unit length.
_UNIT_TOLERANCE = 1e-3
# Exact search goes to the bf16 scan from this many vectors once the bf16 copy pays for itself:
# it exists, or this many queries ran since the vectors changed. Measured (512-d, 2 cores):
# 256 queries at 20,000 vectors 5,200 q/s FAISS against 10,000 bf16; one query 3.5 ms either
# way (1.2 against 1.9 ms at 5,000); making the copy takes 0.08 s at 20,000 and 5 s at 10^6.
EXACT_MIN_VECTORS = 20_000
EXACT_MIN_QUERIES = 32
EXACT_MAX_K = 1024  # larger k goes to FAISS: the bf16 scan's bookkeeping is sized for small k
# The approximate index is compacted when its stale entries pass this share (and count).
_STALE_FRACTION = 0.2
_STALE_MIN = 1_000
# Squared distances within this relative gap of the k-th may round to the same float32
# distance (2^-22, with room); they are re-scored in float64 so that ties are ordered by id.
_TIE_RELATIVE = 2.0**-20
_U32 = 2.0**-24
# Metrics an approximate index file may use: candidates are re-ranked exactly, so either serves
# (files made before every index was Euclidean used inner product; their lists are not pruned).
_ANN_METRICS = (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2)


class VectorIndex:
    """Unit vectors keyed by image id; distances are Euclidean between unit vectors (0..2)."""

    def __init__(
        self,
        dim: int,
        factory: str = ann.FLAT,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int | None = None,
        pruning: ann.Pruning | None = None,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        dim = int(dim)
        self._init_state(_check_factory(factory), read_only=False, source=None)
        self._rerank_factor = int(rerank or ann.RERANK)
        if self._factory == ann.FLAT:
            self._flat = faiss.index_factory(dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
        else:
            try:
                self._ann = ann.new_ann(dim, self._factory)
            except RuntimeError as exc:
                raise ValueError(
                    f"invalid FAISS factory string {self._factory!r} ({_faiss_reason(exc)}); "
                    "use e.g. 'Flat', 'HNSW32' or 'IVF1024,PQ64x4fs'"
                ) from exc
            defaults = ann.choice_for_factory(self._factory, 0)
            ann.set_search_params(
                self._ann, nprobe or defaults.nprobe, ef_search or defaults.ef_search
            )
            if pruning is not None and ann.prunable_ivf(self._ann) is None:
                raise ValueError(
                    f"index '{self._factory}' has no inverted lists searched by Euclidean "
                    "distance to prune; leave pruning out"
                )
            self._pruning = pruning
            self._vectors = ann.ExactVectors(dim)

    @classmethod
    def build(
        cls,
        dim: int,
        ids: np.ndarray,
        vectors: np.ndarray,
        factory: str = ann.FLAT,
        *,
        train_size: int | None = None,
        seed: int = ann.TRAIN_SEED,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int | None = None,
        pruning: ann.Pruning | None = None,
        target_recall: float | None = ann.TARGET_RECALL,
    ) -> VectorIndex:
        """Create an index holding ``vectors``; one that needs training is trained on a seeded
        sample of them (``train_size`` rows, default all). An approximate index then takes the
        cheapest search setting (`calibrate`: nprobe / ef_search / rerank from the given ones
        upwards, lists pruned or not) that finds ``target_recall`` of the exact 10 nearest
        neighbours of a sample of the vectors (None: as given)."""
        built = cls(
            dim, factory, nprobe=nprobe, ef_search=ef_search, rerank=rerank, pruning=pruning
        )
        xb_ids, xb = built._check_new(ids, vectors)
        if not built.is_trained:
            if len(xb_ids) == 0:
                raise ValueError(
                    f"index '{factory}' needs training vectors; build it from at least one vector "
                    "or use factory='Flat'"
                )
            rows = ann.sample_positions(len(xb), train_size or len(xb), seed)
            built.train(xb[rows] if len(rows) < len(xb) else xb)
        built._add_checked(xb_ids, xb)
        if built.approximate:
            built._built_for = len(xb_ids)
            if target_recall is not None:
                built.calibrate(xb_ids, xb, target_recall, seed=seed)
        return built

    def calibrate(
        self, ids: np.ndarray, vectors: np.ndarray, target: float, *, seed: int = ann.TRAIN_SEED
    ) -> float | None:
        """Set the cheapest search setting of `ann.calibration_ladder` whose recall@10 reaches
        target on a seeded sample of these (stored) vectors used as queries; returns the recall
        measured there (None: nothing to calibrate).

        The exact neighbours come from FAISS's brute force over ``vectors`` (a few seconds per
        million); each query's own id is left out on both sides. An inverted file's rungs are
        priced by the codes their lists hold for these queries (`ann.ProbeCost`), so the
        choice is deterministic; a rung that searches no more than one that failed is skipped.
        When no rung reaches the target, the last (most thorough) is kept and a warning says
        what to do.
        """
        k = ann.CALIBRATION_K
        if self._ann is None or len(ids) <= k + 1:
            return None
        xb = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = ann.sample_positions(len(xb), ann.CALIBRATION_QUERIES, seed + 1)
        xq, own = xb[rows], ids[rows]
        _, truth_rows = faiss.knn(xq, xb, k + 1, metric=faiss.METRIC_L2)
        truth = _without_own(ids[truth_rows], own, k)
        params = ann.search_params(self._ann)
        nprobe, nlist = params.get("nprobe"), params.get("nlist")
        prunable = nprobe is not None and ann.prunable_ivf(self._ann) is not None
        cost = None
        if prunable:
            cost = ann.ProbeCost(self._ann, xq, nprobe * max(ann.MAX_EFFORT, ann.PRUNE_CAP), k)
        ladder = ann.calibration_ladder(
            nprobe, params.get("efSearch"), self._rerank_factor, nlist, prune=prunable, cost=cost
        )
        recall, failed = 0.0, []
        for rung in ladder:
            if any(done.covers(rung) for done in failed):
                continue
            self._apply(rung)
            found = _without_own(self._search_approximate(xq, k + 1)[1], own, k)
            hits = [len(set(f) & set(t)) for f, t in zip(found, truth, strict=True)]
            recall = float(np.sum(hits)) / truth.size
            if recall >= target:
                break
            failed.append(rung)
        else:
            logger.warning(
                "%s finds %.3f of the 10 nearest neighbours at its most thorough setting "
                "(target %.2f); for exact results use --index-factory Flat",
                self._factory,
                recall,
                target,
            )
        self._calibration = {"queries": len(rows), "recall": round(recall, 4), "target": target}
        logger.info("calibrated %s on %d stored vectors", self.description(), len(rows))
        return recall

    def _apply(self, rung: ann.Rung) -> None:
        ann.set_search_params(self._ann, rung.nprobe, rung.ef_search)
        self._rerank_factor = rung.rerank
        self._pruning = rung.pruning if ann.prunable_ivf(self._ann) is not None else None

    def train(self, vectors: np.ndarray) -> None:
        """Train an approximate index (k-means, codebooks) on a sample of the vectors to come."""
        self._check_writable("train")
        if self._ann is None or self._ann.is_trained:
            return
        xt = _as_vectors(vectors, self.dim, "training vectors")
        try:
            self._ann.train(xt)
        except RuntimeError as exc:
            raise ValueError(
                f"could not train index '{self._factory}' on {len(xt)} vectors "
                f"({_faiss_reason(exc)}); use fewer clusters or factory='Flat'"
            ) from exc
        logger.debug("trained %s on %d vectors", self.description(), len(xt))

    # -- what it is ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int((self._flat if self._flat is not None else self._ann).d)

    @property
    def factory(self) -> str:
        """The FAISS factory string it was made from ("Flat" for exact search)."""
        return self._factory

    @property
    def approximate(self) -> bool:
        return self._flat is None

    @property
    def is_trained(self) -> bool:
        return self._flat is not None or bool(self._ann.is_trained)

    @property
    def method(self) -> int:
        """`ann.SEARCH_METHOD` of the simsearch that built it (1: files from before it existed)."""
        return self._method

    @property
    def built_for(self) -> int:
        """Vectors an approximate index held when `build` made it (0: Flat, or unknown)."""
        return self._built_for

    def __len__(self) -> int:
        if self._flat is not None:
            return int(self._flat.ntotal)
        return len(self._vectors)

    def __repr__(self) -> str:
        return f"VectorIndex({self.description()}, dim={self.dim}, n={len(self)})"

    def description(self) -> str:
        """Human-readable kind, e.g. ``"IDMap2,Flat (inner product)"``, for logs and ``info``."""
        if self._flat is not None:
            return "IDMap2,Flat (inner product)"
        params = ann.search_params(self._ann)
        settings = [f"{key} {value}" for key, value in params.items() if key != "nlist"]
        if self._pruning is not None:
            settings[0] = (
                f"nprobe at most {params['nprobe']}: lists within {self._pruning.ratio:g}x the "
                f"nearest's squared distance, at least {self._pruning.min_lists}"
            )
        settings.append(
            f"re-ranks {self._rerank_factor} x k exactly, at least k + {ann.MIN_EXTRA_CANDIDATES}"
        )
        if self._calibration:
            settings.append(
                f"recall@10 {self._calibration['recall']:.3f} on "
                f"{self._calibration['queries']} stored vectors"
            )
        metric = "inner product" if self._ann.metric_type == faiss.METRIC_INNER_PRODUCT else "L2"
        return f"{_factory_name(self._ann, self._factory)} ({metric}; {', '.join(settings)})"

    def search_settings(self) -> dict[str, float]:
        """nprobe / efSearch / rerank in effect, and prune_ratio / min_lists when the lists are
        pruned (empty for Flat)."""
        if self._flat is not None:
            return {}
        settings: dict[str, float] = {**ann.search_params(self._ann), "rerank": self._rerank_factor}
        if self._pruning is not None:
            settings["prune_ratio"] = self._pruning.ratio
            settings["min_lists"] = self._pruning.min_lists
        return settings

    def memory_bytes(self) -> int:
        """Bytes this index holds in RAM besides memory-mapped files (an estimate)."""
        if self._flat is not None:
            exact = self._exact_cache[1].nbytes if self._exact_cache is not None else 0
            mapped = self._read_only
            return (0 if mapped else len(self) * self.dim * 4) + len(self) * 16 + exact
        return _faiss_size(self._ann) + self._vectors.nbytes_in_memory()

    def ids(self) -> np.ndarray:
        """Every id once, ascending, as int64."""
        if self._flat is not None:
            return np.sort(self._id_map())
        return self._vectors.ids()

    # -- changing it --------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under new ids; an id already present is refused rather than duplicated."""
        self._check_writable("add vectors to")
        xb_ids, xb = self._check_new(ids, vectors)
        if not self.is_trained:
            raise ValueError(
                f"index {self.description()} needs training before vectors are added; "
                "create it with VectorIndex.build(dim, ids, vectors, factory)"
            )
        self._add_checked(xb_ids, xb)

    def remove(self, ids: np.ndarray | Sequence[int]) -> int:
        """Remove ids and return how many were present; unknown ids are ignored."""
        self._check_writable("remove vectors from")
        wanted = np.unique(_as_ids(ids))
        if len(wanted) == 0:
            return 0
        if self._flat is not None:
            present = wanted[np.isin(wanted, self._id_map())]
            if len(present) == 0:
                return 0
            removed = int(self._flat.remove_ids(faiss.IDSelectorBatch(present)))
        else:
            removed = self._vectors.remove(wanted)
            stale = int(self._ann.ntotal) - len(self._vectors)
            if stale > max(_STALE_MIN, _STALE_FRACTION * int(self._ann.ntotal)):
                self.compact()
        if removed:
            self._changed()
        return removed

    def compact(self) -> None:
        """Rebuild an approximate index's FAISS part from its exact vectors (drops stale ones)."""
        self._check_writable("compact")
        if self._ann is None:
            return
        stale = int(self._ann.ntotal) - len(self._vectors)
        self._ann.reset()
        for chunk_ids, chunk in self._vectors.merged():
            self._ann.add_with_ids(chunk, chunk_ids)
        logger.info("compacted %s: dropped %d stale entries", self.description(), stale)

    def reconstruct(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The stored vectors of ``ids`` as (n, dim) float32; KeyError if an id is absent."""
        xb_ids = _as_ids(ids)
        if self._flat is not None:
            missing = xb_ids[~np.isin(xb_ids, self._id_map())]
            if len(missing):
                raise KeyError(f"ids not in the index: {_preview(missing)}")
            return self._reconstruct_flat(xb_ids)
        present = self._vectors.contains(xb_ids)
        if not present.all():
            raise KeyError(f"ids not in the index: {_preview(xb_ids[~present])}")
        return self._vectors.get(xb_ids)

    # -- searching ----------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest ids per query with exact Euclidean distances, ties ordered by id.

        Returns (distances float32 (n, k), ids int64 (n, k)); rows with fewer than k results are
        padded with id -1 and distance inf. Flat search returns exactly the k nearest;
        approximate search returns the exact distances of the nearest among its candidates.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        xq = _as_vectors(queries, self.dim, "queries")
        n = xq.shape[0]
        if n == 0 or len(self) == 0:
            return (
                np.full((n, k), np.inf, dtype=np.float32),
                np.full((n, k), -1, dtype=np.int64),
            )
        if self._flat is None:
            return self._search_approximate(xq, k)
        searcher = self._exact_searcher(len(xq), k)
        if searcher is not None:
            exact, positions_to_ids = searcher
            return exact.search(xq, k, positions_to_ids)
        return self._search_flat_faiss(xq, k)

    # -- saving and loading -------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index atomically: a crash leaves the old file or the new one, never half."""
        path = Path(path)
        if self._flat is not None:
            _write_atomic(path, lambda tmp: _write_flat(self._flat, tmp))
        else:
            layout: dict[str, int] = {}
            _write_atomic(path, lambda tmp: layout.update(self._write_approximate(tmp)))
            # The file now holds exactly these vectors: map them instead of keeping them in RAM.
            self._vectors = _map_vectors(path, layout["n"], self.dim, layout)
        logger.debug("saved %s with %d vectors to %s", self.description(), len(self), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = False) -> VectorIndex:
        """Read an index saved by ``save``; with ``mmap`` the vectors stay on disk, read-only.

        An approximate index's exact vectors are always memory-mapped (changes are kept in
        memory until the next save). Raises StoreError for a missing, truncated or foreign file:
        the index is derived data and is rebuilt from the stored vectors.
        """
        path = Path(path)
        kind, size = _file_kind(path)
        loaded = cls.__new__(cls)
        loaded._init_state(ann.FLAT, read_only=mmap, source=path)
        if kind == "flat":
            loaded._flat = _read_flat(path, size, mmap=mmap)
        else:
            loaded._read_approximate(path, size, mmap=mmap)
        logger.debug("loaded %s with %d vectors from %s", loaded.description(), len(loaded), path)
        return loaded

    # -- internals ----------------------------------------------------------------------------

    def _init_state(self, factory: str, *, read_only: bool, source: Path | None) -> None:
        self._factory = factory
        self._read_only = read_only
        self._source = source
        self._flat: faiss.IndexIDMap2 | None = None
        self._ann: faiss.Index | None = None
        self._vectors: ann.ExactVectors | None = None
        self._rerank_factor = ann.RERANK
        self._pruning: ann.Pruning | None = None
        self._method = ann.SEARCH_METHOD
        self._built_for = 0
        self._calibration: dict[str, float] = {}
        self._state_lock = threading.Lock()
        self._version = 0
        self._queries_since_change = 0
        self._exact_cache: tuple[int, object, np.ndarray] | None = None
        self._norm_cache: tuple[int, float, float] | None = None

    def _changed(self) -> None:
        with self._state_lock:
            self._version += 1
            self._queries_since_change = 0
            self._exact_cache = None
            self._norm_cache = None

    def _id_map(self) -> np.ndarray:
        return faiss.vector_to_array(self._flat.id_map).astype(np.int64, copy=False)

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
        if self._flat is not None:
            present = xb_ids[np.isin(xb_ids, self._id_map())]
        else:
            present = xb_ids[self._vectors.contains(xb_ids)]
        if len(present):
            raise ValueError(
                f"ids already in the index: {_preview(np.sort(present))}; remove them first to "
                "replace their vectors"
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
        if not len(xb_ids):
            return
        if self._flat is not None:
            self._flat.add_with_ids(xb, xb_ids)
        else:
            self._vectors.add(xb_ids, xb)
            self._ann.add_with_ids(xb, xb_ids)
        self._changed()

    def _reconstruct_flat(self, xb_ids: np.ndarray) -> np.ndarray:
        if len(xb_ids) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(self._flat.reconstruct_batch(xb_ids), dtype=np.float32)

    def _flat_view(self) -> np.ndarray:
        """The Flat index's vectors in insertion order, without a copy (valid until a change)."""
        inner = faiss.downcast_index(self._flat.index)
        n = int(inner.ntotal)
        if n == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return faiss.rev_swig_ptr(inner.get_xb(), n * self.dim).reshape(n, self.dim)

    def _norm_range(self) -> tuple[float, float]:
        """(smallest, largest) norm of the stored vectors, cached until they change."""
        with self._state_lock:
            cached = self._norm_cache
            version = self._version
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        view = self._flat_view()
        lo, hi = np.inf, 0.0
        for start in range(0, len(view), 65_536):
            x = view[start : start + 65_536].astype(np.float64)
            sq = np.einsum("ij,ij->i", x, x)
            lo, hi = min(lo, float(np.sqrt(sq.min()))), max(hi, float(np.sqrt(sq.max())))
        if not len(view):
            lo, hi = 1.0, 1.0
        with self._state_lock:
            if self._version == version:
                self._norm_cache = (version, lo, hi)
        return lo, hi

    def _exact_searcher(self, n_queries: int, k: int):
        """The bf16 exact searcher when it applies and pays for itself, else None (FAISS)."""
        if len(self) < EXACT_MIN_VECTORS or k > EXACT_MAX_K:
            return None
        with self._state_lock:
            self._queries_since_change += n_queries
            cached = self._exact_cache
            version = self._version
            worth = self._queries_since_change >= EXACT_MIN_QUERIES
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        if not worth:
            return None
        from simsearch import exact  # torch: only when a large exact search runs

        if exact.choose_kernel() is None:
            return None
        with self._state_lock:  # one thread builds; others wait for it
            cached = self._exact_cache
            if cached is not None and cached[0] == self._version:
                return cached[1], cached[2]
            searcher = exact.make_searcher(self._flat_view())
            self._exact_cache = (self._version, searcher, self._id_map().copy())
            logger.debug("built the bf16 copy of %d vectors for exact search", len(self))
            return searcher, self._exact_cache[2]

    def _search_flat_faiss(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's float32 scan, fetching more candidates until they provably hold the k nearest.

        A vector FAISS did not return scored at most the last one it returned, so its inner
        product is at most that plus FAISS's float32 error (d 2^-24 |q| |x|); when even that
        leaves it farther than the k-th exact distance (with a tie margin), the answer is exact.
        """
        n = len(self)
        nq = len(xq)
        D_out = np.full((nq, k), np.inf, dtype=np.float32)
        I_out = np.full((nq, k), -1, dtype=np.int64)
        norm_min, norm_max = self._norm_range()
        q64 = xq.astype(np.float64)
        qn2 = np.einsum("ij,ij->i", q64, q64)
        err = 1.01 * self.dim * _U32 * np.sqrt(qn2) * norm_max + 1e-12
        margin = 1e-6 * (np.sqrt(qn2) + norm_max) ** 2
        rows = np.arange(nq)
        fetch = min(n, k + ann.MIN_EXTRA_CANDIDATES)
        while len(rows):
            scores, cand = self._flat.search(xq[rows], fetch)
            D_blk, I_blk, d2_blk = self._rerank(xq[rows], cand, self._reconstruct_flat)
            width = min(k, fetch)
            if fetch >= n:
                done = np.ones(len(rows), dtype=bool)
            else:
                kth = d2_blk[:, width - 1]
                floor = qn2[rows] + norm_min**2 - 2 * (scores[:, -1].astype(np.float64) + err[rows])
                done = floor > kth + margin[rows]
            D_out[rows[done], :width] = D_blk[done, :width]
            I_out[rows[done], :width] = I_blk[done, :width]
            rows = rows[~done]
            fetch = min(n, fetch * _FETCH_GROWTH)
        return D_out, I_out

    def _search_approximate(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the FAISS index, re-ranked exactly from the exact vectors.

        Candidates are scored in float32 where they lie (FAISS); only those whose float32
        distance leaves them in contention for the k nearest (within its error bound) are scored
        again in float64, which gives the distances returned and their order. Blocks of queries
        are re-ranked on all cores, one block per core (numpy releases the GIL while it works).
        """
        fetch = ann.candidates(k, self._rerank_factor, int(self._ann.ntotal))
        cand = ann.search_candidates(self._ann, xq, fetch, self._pruning)
        D_out = np.full((len(xq), k), np.inf, dtype=np.float32)
        I_out = np.full((len(xq), k), -1, dtype=np.int64)
        block = max(1, _RERANK_CACHE_FLOATS // (fetch * self.dim))

        def rerank(start: int) -> None:
            stop = min(len(xq), start + block)
            D_out[start:stop], I_out[start:stop] = self._rerank_candidates(
                xq[start:stop], cand[start:stop], k
            )

        _parallel.each(rerank, range(0, len(xq), block))
        return D_out, I_out

    def _rerank_candidates(
        self, xq: np.ndarray, cand: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        b, width = cand.shape
        cand = np.sort(cand, axis=1)  # ascending ids: a stable sort by distance orders ties by id
        # Stale entries (removed, or replaced by a newer vector under the same id) and repeats.
        keep = cand >= 0
        keep[:, 1:] &= cand[:, 1:] != cand[:, :-1]
        where = np.full(cand.shape, -1, dtype=np.int8)
        at = np.zeros(cand.shape, dtype=np.int64)
        where[keep], at[keep] = self._vectors.locate(cand[keep])
        d2 = self._vectors.squared_distances(xq, where, at)  # inf where absent
        # In contention: a float32 distance whose lower bound is within the k-th's upper bound.
        # Ties: distances equal in float32 are ordered by id; squared distances whose roots
        # round alike differ by under 2^-22 relative, so those go to float64 as well.
        err = ann.squared_distance_error(self.dim)
        kk = min(k, width) - 1
        kth = np.partition(d2, kk, axis=1)[:, kk]
        close = d2 <= (kth * ((1 + err) * (1 + _TIE_RELATIVE) / (1 - err)))[:, None]
        qi, ci = np.nonzero(close)
        rows = self._vectors.rows(where[qi, ci], at[qi, ci]).astype(np.float64)
        rows -= xq[qi]  # exact: float32 inputs, subtracted in float64
        dist = np.full((b, width), np.inf, dtype=np.float32)
        dist[qi, ci] = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        D = np.take_along_axis(dist, order, axis=1)
        I = np.where(D < np.inf, np.take_along_axis(cand, order, axis=1), -1)  # noqa: E741
        if k > width:
            D = np.pad(D, ((0, 0), (0, k - width)), constant_values=np.inf)
            I = np.pad(I, ((0, 0), (0, k - width)), constant_values=-1)  # noqa: E741
        return D, I

    def _rerank(
        self, xq: np.ndarray, cand: np.ndarray, lookup: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact float64 distances of candidates, sorted by (float32 distance, id).

        Returns (distances float32, ids, squared distances float64), padded with (inf, -1).
        """
        D = np.full(cand.shape, np.inf, dtype=np.float32)
        I = np.full(cand.shape, -1, dtype=np.int64)  # noqa: E741 - FAISS's name for result ids
        D2 = np.full(cand.shape, np.inf)
        width = max(1, cand.shape[1])
        block = max(1, _RERANK_BLOCK_FLOATS // (width * self.dim))
        for start in range(0, len(xq), block):
            stop = min(len(xq), start + block)
            sub = cand[start:stop]
            valid = sub >= 0
            d2 = np.full(sub.shape, np.inf)
            if valid.any():
                uniq = np.unique(sub[valid])
                xb = lookup(uniq).astype(np.float64)
                rows, cols = np.nonzero(valid)
                diff = xq[start:stop][rows].astype(np.float64)
                diff -= xb[np.searchsorted(uniq, sub[rows, cols])]
                d2[rows, cols] = np.einsum("ij,ij->i", diff, diff)
            dist = np.sqrt(d2).astype(np.float32)
            # Ties are judged on the float32 distances the caller sees; padding sorts last.
            order = np.lexsort((np.where(valid, sub, np.iinfo(np.int64).max), dist), axis=-1)
            D[start:stop] = np.take_along_axis(dist, order, axis=1)
            I[start:stop] = np.where(
                np.take_along_axis(valid, order, axis=1), np.take_along_axis(sub, order, axis=1), -1
            )
            D2[start:stop] = np.take_along_axis(d2, order, axis=1)
        return D, I, D2

    def _write_approximate(self, tmp: Path) -> dict[str, int]:
        """FAISS payload, exact vectors sorted by id, JSON header, trailer; returns the layout."""
        faiss.write_index(self._ann, str(tmp))
        n = len(self._vectors)
        with open(tmp, "r+b") as f:
            f.seek(0, os.SEEK_END)
            payload = f.tell()
            ids_offset = _aligned(payload)
            vectors_offset = _aligned(ids_offset + 8 * n)
            f.write(b"\0" * (ids_offset - payload))
            f.write(np.ascontiguousarray(self._vectors.ids(), dtype="<i8").tobytes())
            f.write(b"\0" * (vectors_offset - f.tell()))
            for _, chunk in self._vectors.merged():
                f.write(np.ascontiguousarray(chunk, dtype="<f4").tobytes())
            meta_offset = f.tell()
            meta = json.dumps(
                {
                    "format": _ANN_FORMAT,
                    "factory": self._factory,
                    "dim": self.dim,
                    "n": n,
                    "ids_offset": ids_offset,
                    "vectors_offset": vectors_offset,
                    "rerank": self._rerank_factor,
                    "built_for": self._built_for,
                    "method": self._method,
                    "calibration": self._calibration,
                    "search": ann.search_params(self._ann),
                    "pruning": None
                    if self._pruning is None
                    else {"ratio": self._pruning.ratio, "min_lists": self._pruning.min_lists},
                }
            ).encode()
            f.write(meta)
            f.write(_ANN_TRAILER.pack(_ANN_MAGIC, payload, meta_offset, len(meta)))
            f.flush()
            os.fsync(f.fileno())
        return {"n": n, "ids_offset": ids_offset, "vectors_offset": vectors_offset}

    def _read_approximate(self, path: Path, size: int, *, mmap: bool) -> None:
        def unusable(reason: object) -> StoreError:
            return _unusable(path, reason)

        try:
            with open(path, "rb") as f:
                f.seek(size - _ANN_TRAILER.size)
                _, payload, meta_offset, meta_len = _ANN_TRAILER.unpack(f.read(_ANN_TRAILER.size))
                if meta_offset + meta_len + _ANN_TRAILER.size != size:
                    raise unusable("truncated: its header is not where the trailer says")
                f.seek(meta_offset)
                meta = json.loads(f.read(meta_len).decode())
        except OSError as exc:
            raise unusable(exc.strerror or exc) from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise unusable(f"unreadable header ({exc})") from exc
        try:
            n, dim = int(meta["n"]), int(meta["dim"])
            ids_offset, vectors_offset = int(meta["ids_offset"]), int(meta["vectors_offset"])
            factory = str(meta["factory"])
        except (KeyError, TypeError, ValueError) as exc:
            raise unusable(f"incomplete header ({exc})") from exc
        if meta.get("format") != _ANN_FORMAT:
            raise unusable(f"format {meta.get('format')!r}, expected {_ANN_FORMAT}")
        if not (
            payload <= ids_offset
            and ids_offset + 8 * n <= vectors_offset
            and vectors_offset + 4 * n * dim <= meta_offset
        ):
            raise unusable("truncated: its sections overlap")
        flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except (RuntimeError, MemoryError) as exc:
            raise unusable(_faiss_reason(exc)) from exc
        if index.d != dim or index.metric_type not in _ANN_METRICS:
            raise unusable("its FAISS index does not match its header")
        layout = {"ids_offset": ids_offset, "vectors_offset": vectors_offset}
        vectors = _map_vectors(path, n, dim, layout)
        if not vectors.base_is_sorted():
            raise unusable("its ids are not sorted")
        self._factory = factory
        self._ann = index
        self._vectors = vectors
        self._rerank_factor = int(meta.get("rerank") or ann.RERANK)
        self._built_for = int(meta.get("built_for") or 0)
        self._method = int(meta.get("method") or 1)
        self._calibration = dict(meta.get("calibration") or {})
        search = meta.get("search") or {}
        ann.set_search_params(index, search.get("nprobe"), search.get("efSearch"))
        pruning = meta.get("pruning")
        if pruning and ann.prunable_ivf(index) is not None:
            try:
                self._pruning = ann.Pruning(float(pruning["ratio"]), int(pruning["min_lists"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise unusable(f"incomplete header ({exc})") from exc


def _without_own(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """The first k ids of each row other than the row's own id (a query that is stored)."""
    keep = found != own[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")  # kept ids first, in their order
    return np.take_along_axis(found, order, axis=1)[:, :k]


def _map_vectors(path: Path, n: int, dim: int, layout: dict[str, int]) -> ann.ExactVectors:
    """The exact vectors of an approximate index file, memory-mapped read-only."""
    if not n:
        return ann.ExactVectors(dim)
    ids = np.memmap(path, dtype="<i8", mode="r", offset=layout["ids_offset"], shape=(n,))
    rows = np.memmap(path, dtype="<f4", mode="r", offset=layout["vectors_offset"], shape=(n, dim))
    return ann.ExactVectors(dim, ids, rows)


def _check_factory(factory: str) -> str:
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(f"factory must be a FAISS factory string such as 'Flat', got {factory!r}")
    factory = factory.strip()
    if factory.upper().startswith("IDMAP"):
        raise ValueError(
            f"factory {factory!r} includes an id map; give only the inner index, e.g. 'Flat' or "
            "'HNSW32' (the id map is added here)"
        )
    if factory.upper() == ann.FLAT.upper():
        return ann.FLAT
    return factory


def _factory_name(index: faiss.Index, factory: str) -> str:
    inner = index.index if isinstance(index, faiss.IndexIDMap) else index
    try:
        return reverse_index_factory(faiss.downcast_index(inner))
    except Exception:  # reverse_index_factory knows only common types
        return factory


def _faiss_size(index: faiss.Index) -> int:
    """Serialized size of a FAISS index: close to what it holds in memory."""
    try:
        return int(faiss.serialize_index(index).nbytes)
    except (RuntimeError, MemoryError):
        return 0


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _write_flat(index: faiss.Index, tmp: Path) -> None:
    faiss.write_index(index, str(tmp))
    size = tmp.stat().st_size
    with open(tmp, "ab") as f:
        f.write(_TRAILER.pack(_MAGIC, size))
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a temp file beside ``path`` (it fsyncs), then rename it over ``path``."""
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        # O_EXCL: never clobber another writer's temp file; mode 0o666 lets the umask apply.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(tmp)
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


def _unusable(path: Path, reason: object) -> StoreError:
    return StoreError(
        f"index file {path} is corrupt or unreadable ({reason}); it is rebuilt from the "
        "stored vectors on the next run"
    )


def check_file(path: str | os.PathLike[str]) -> None:
    """Raise StoreError unless `path` ends with a whole simsearch index (reads only its trailer)."""
    _file_kind(Path(path))


def _file_kind(path: Path) -> tuple[str, int]:
    """("flat" | "approximate", file size) from the trailer; StoreError when neither fits."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            tail_len = min(size, _ANN_TRAILER.size)
            f.seek(size - tail_len)
            tail = f.read(tail_len)
    except FileNotFoundError:
        raise StoreError(
            f"index file {path} does not exist; it is rebuilt from the stored vectors on the "
            "next run"
        ) from None
    except OSError as exc:
        raise _unusable(path, exc.strerror or exc) from exc
    if len(tail) >= _ANN_TRAILER.size and tail[: len(_ANN_MAGIC)] == _ANN_MAGIC:
        return "approximate", size
    if len(tail) >= _TRAILER.size:
        magic, payload = _TRAILER.unpack(tail[-_TRAILER.size :])
        if magic == _MAGIC:
            if payload != size - _TRAILER.size:
                raise _unusable(
                    path,
                    f"truncated: {size - _TRAILER.size} bytes of index data, expected {payload}",
                )
            return "flat", size
    raise _unusable(path, "truncated, or not an index written by simsearch")


def _read_flat(path: Path, size: int, *, mmap: bool) -> faiss.IndexIDMap2:
    flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
    try:
        index = faiss.read_index(str(path), flags)
    except (RuntimeError, MemoryError) as exc:
        raise _unusable(path, _faiss_reason(exc)) from exc
    if not isinstance(index, faiss.IndexIDMap2):
        raise _unusable(path, f"holds {type(index).__name__}, not an IndexIDMap2")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise _unusable(path, "its metric is not inner product")
    if not isinstance(faiss.downcast_index(index.index), faiss.IndexFlat):
        raise _unusable(path, "its inner index is not Flat")
    try:
        index.check_consistency()
    except RuntimeError as exc:
        raise _unusable(path, f"inconsistent id map: {_faiss_reason(exc)}") from exc
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
