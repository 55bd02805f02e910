"""Exact k nearest neighbours at the speed of the CPU's bf16 matrix units.

Every stored vector is scored against the queries in bf16 with torch (oneDNN: AMX or AVX512-BF16
instructions, two to sixteen times the float32 rate per cycle). A rigorous bound on the error of
those scores says which vectors could still be among the true k nearest; only those are scored
again from the float32 vectors, and the last few in float64. The answer is exactly the float64 top k
(ties ordered by id) that `VectorIndex` promises, not an approximation.

The bound, for a query q and a stored vector x, both scaled by s and t so that their bf16 copies
x' = bf16(s x) and q' = bf16(t q) are shorter than 1 (so every product is under 1 in size):

    t s q.x - bf16(acc(q'.x')) = t q.(s x - x') + (t q - q').x'      input rounding
                                 + q'.x' - acc(q'.x')                float32 accumulation
                                 + acc - bf16(acc)                   output rounding

so ``|error| <= |t q| max|s x - x'| + |t q - q'| max|x'| + 2 d 2^-24 |q'| max|x'| + 2^-9``
(Cauchy-Schwarz; products of bf16 numbers are exact in float32; a value under 1 in size rounds to
bf16 within 2^-9). Verified numerically by the tests.

A stored vector is skipped when its bf16 score is below the k-th best bf16 score so far minus
twice that bound (widened for vectors that are not exactly unit length and for float32 ties), so
it cannot beat the k-th exact result. torch is imported at module level: import this module only
when searching.

`ProjectedSearcher` does the same work in a fraction of the dimensions where the vectors allow:
an upper bound of every score from a few principal directions plus a bound on the rest, one
narrow bf16 product, and only the vectors whose bound reaches a proven threshold scored exactly
(4.3-4.8x the full-dimension scan on bin/bench-search's million clustered vectors). `make_searcher`
picks it where it pays, and it falls back to the full scan by itself where it does not.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from simsearch import _parallel
from simsearch._blas import cpu_supports_bf16

log = logging.getLogger(__name__)

KERNEL_ENV = "SIMSEARCH_EXACT_KERNEL"  # "bf16" or "fp32": force the choice (benchmarks, tests)
GROUP = 64  # stored vectors per group: a group's best score decides whether to look inside
CHUNK = 8_192  # stored vectors per matrix product (a multiple of GROUP)
QUERY_BLOCK = 256  # queries per matrix product
_BUILD_ROWS = 65_536  # rows converted at a time (bounds temporary memory)
PROJECTED_DIMS = 64  # principal directions scored by the projected searcher
PROJECTED_MIN_VECTORS = 150_000  # below this the full-dimension scan is as fast (measured)
PROJECTED_CHUNK = 4_096  # rows per matrix product (its scores stay in the CPU's caches)
PROJECTED_GROUP = 32  # rows per group of the projected scan (GROUP is a multiple of it)
PROJECTED_QUERY_BLOCK = 1_024  # queries per block (group bounds: 2 bytes per group and query)
_SCORE_BYTES = 64 << 20  # at most this much memory for one block's group bounds
_AXES_SAMPLE = 32_768  # vectors the principal axes are computed from
PROJECTED_MAX_RESIDUAL = 0.3  # share of the squared length outside them above which it won't pay
_ROWS_PER_LIST = 250  # k-means lists for the row order: about this many rows each
_MAX_LISTS = 4_096
_KMEANS_ITERATIONS = 4  # enough for an order: more costs build time, not speed
_KMEANS_SAMPLE = 40  # training rows per list (FAISS asks for 39)
_SEED_GROUPS = 16  # a query's best groups whose rows give its first k distances
_SEED_ROWS = 4  # times k rows of them scored in float32
_PAIR_BLOCK = 8_192  # (group, query) pairs looked into at a time
_MAX_PASSING = 0.02  # more passing groups than this share: the full scan is faster
_FALLBACKS_TO_GIVE_UP = 2  # after this many fallbacks every block uses the full scan
_REFINE_ROWS = 8_192  # candidate rows scored at a time (one task of the thread pool)
_DOT_WIDTH = 64  # candidates per line of `_dots_f32` (a query with more takes several lines)
_KTH_TABLE_FACTOR, _KTH_TABLE_MIN = 4, 64  # `_kth_smallest`'s table: 4x the mean group + 64
_U32 = 2.0**-24  # float32 unit roundoff
_HALF_ULP_BELOW_1 = 2.0**-9  # bf16 rounding error of any value smaller than 1 in size
_SHORTER = 0.99 / (1 + 2.0**-7)  # scale so that bf16 copies stay shorter than 0.99

_choice_lock = threading.Lock()
_choice: list[str | None] = []


def choose_kernel() -> str | None:
    """Return "bf16" where the CPU has native bf16, else None (FAISS's float32 search is faster)."""
    with _choice_lock:
        if not _choice:
            forced = os.environ.get(KERNEL_ENV, "").strip().lower()
            if forced in ("bf16", "fp32"):
                _choice.append("bf16" if forced == "bf16" else None)
            else:
                _choice.append("bf16" if cpu_supports_bf16() else None)
            log.debug("exact search kernel: %s", _choice[0] or "FAISS float32")
        return _choice[0]


class ExactSearcher:
    """The k nearest of a fixed float32 matrix by exact Euclidean distance, fast.

    Holds a bf16 copy of ``vectors`` (half their size) and a reference to them for the exact
    scores; make a new one when the vectors change. Safe to share between threads.
    """

    def __init__(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise ValueError("vectors must be a (n, dim) float32 array")
        self._x = np.ascontiguousarray(vectors)  # read in place by FAISS (a copy only if strided)
        self.n, self.dim = vectors.shape
        norms = np.ones(max(self.n, 1), dtype=np.float64)
        for start in range(0, self.n, _BUILD_ROWS):
            x = vectors[start : start + _BUILD_ROWS].astype(np.float64)
            norms[start : start + len(x)] = np.sqrt(np.einsum("ij,ij->i", x, x))
        self._norm2 = norms[: self.n] ** 2
        self._norm_min, self._norm_max = float(norms.min()), float(norms.max())
        self._prepare()
        # The bf16 copy of each stored vector's features, scaled below 1 in length.
        feature_max = self._norm_max * (1 + 1e-9) + 1e-6  # features are no longer than that
        self._scale = _SHORTER / feature_max
        rows = -(-max(self.n, 1) // GROUP) * GROUP  # padded: every chunk is whole groups
        self._low = torch.zeros((rows, self.width), dtype=torch.bfloat16)
        err_max = low_max = 0.0
        for start in range(0, self.n, _BUILD_ROWS):
            features = self._features(vectors[start : start + _BUILD_ROWS].astype(np.float64))
            scaled = features * self._scale
            low = torch.from_numpy(scaled.astype(np.float32)).to(torch.bfloat16)
            self._low[start : start + len(features)] = low
            low64 = low.double().numpy()
            err = scaled - low64
            err_max = max(err_max, float(np.sqrt(np.einsum("ij,ij->i", err, err).max())))
            low_max = max(low_max, float(np.sqrt(np.einsum("ij,ij->i", low64, low64).max())))
        # Slack for the float64 arithmetic of these maxima themselves.
        self._err_max = err_max * (1 + 1e-9) + 1e-15
        self._low_max = low_max * (1 + 1e-9)
        self._arrange()

    # -- what the bf16 copy holds: here the vectors themselves ----------------------------------

    _SHIFT = 0  # 1: a column of ones on both sides adds 1 to every bf16 score (none here)

    @property
    def width(self) -> int:
        """Feature columns of the bf16 copy (a column of ones comes on top where _SHIFT is 1)."""
        return self.dim

    def _prepare(self) -> None:
        """Set-up before the bf16 copy is made (nothing for the full-dimension scan)."""

    def _features(self, x64: np.ndarray) -> np.ndarray:
        """Rows whose bf16 inner product with a query's features approximates q.x."""
        return x64

    def _arrange(self) -> None:
        """Reorder the bf16 copy after it is made (nothing for the full-dimension scan)."""

    @property
    def nbytes(self) -> int:
        """Memory held besides the float32 vectors (the bf16 copy and the norms)."""
        return int(self._low.numel() * 2 + self._norm2.nbytes)

    def search(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distances float32 (nq, k), ids int64 (nq, k)), nearest first, ties by id, padded."""
        nq = len(queries)
        D = np.full((nq, k), np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)  # noqa: E741 - FAISS's name for result ids
        if nq == 0 or self.n == 0:
            return D, I
        block = self._query_block()
        for start in range(0, nq, block):
            xq = np.ascontiguousarray(queries[start : start + block], dtype=np.float32)
            stop = start + len(xq)
            D[start:stop], I[start:stop] = self._search_block(xq, k, ids)
        return D, I

    def bound(self, queries: np.ndarray) -> np.ndarray:
        """Per query, the largest possible error of a bf16 score, in inner-product terms."""
        return self._quantise(np.asarray(queries, dtype=np.float32))[2]

    # -- internals ---------------------------------------------------------------------------

    def _quantise(self, xq: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(bf16 query features, inner product per bf16-score unit, error bound) for a block."""
        q64 = self._features(xq.astype(np.float64))
        qn = np.sqrt(np.einsum("ij,ij->i", q64, q64))
        t = np.where(qn > 0, _SHORTER / np.where(qn > 0, qn, 1.0), 1.0)
        scaled = q64 * t[:, None]
        low = torch.from_numpy(scaled.astype(np.float32)).to(torch.bfloat16)
        low64 = low.to(torch.float64).numpy()
        f = scaled - low64
        fnorm = np.sqrt(np.einsum("ij,ij->i", f, f))
        lownorm = np.sqrt(np.einsum("ij,ij->i", low64, low64))
        # With a column of ones on both sides every score is 1 more (exactly: 1 is a bf16
        # number): the accumulation adds one term of size 1, the output is under 2 in size.
        ones = self._SHIFT
        bound = (
            qn * t * self._err_max
            + fnorm * self._low_max
            + 2
            * (self.width + ones)
            * _U32
            * np.sqrt(lownorm**2 + ones)
            * np.sqrt(self._low_max**2 + ones)
            + (2 * _HALF_ULP_BELOW_1 if ones else _HALF_ULP_BELOW_1)
            + (self.width + ones) * 2.0**-126  # products flushed to zero as denormals
        )
        if ones:
            low = torch.cat([low, torch.ones((len(low), 1), dtype=torch.bfloat16)], dim=1)
        unit = 1.0 / (t * self._scale)
        return low, unit, bound * (1 + 1e-9) * unit

    def _query_block(self) -> int:
        """Queries searched together (one matrix product per chunk of stored vectors)."""
        return QUERY_BLOCK

    def _search_block(
        self, xq: np.ndarray, k: int, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        low, unit, bound = self._quantise(xq)
        q64 = xq.astype(np.float64)
        qn2 = np.einsum("ij,ij->i", q64, q64)
        margin = _margin(qn2, self._norm_max)
        # How far under the k-th best bf16 score a competitor can be, in bf16-score units:
        # both errors, the spread of stored norms (for the Euclidean ranking) and the tie margin.
        spread = (self._norm_max**2 - self._norm_min**2) / 2
        slack = _f32_slack(qn2, self.dim, self._norm_max)
        window = (2 * bound + spread + margin / 2 + slack) / unit * (1 + 1e-6)
        cand_q, cand_pos, cand_score = self._scan(low, torch.from_numpy(window), k)
        return self._refine(q64, qn2, k, ids, cand_q, cand_pos, cand_score * unit[cand_q], bound)

    def _scan(
        self, low: torch.Tensor, window: torch.Tensor, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (query row, position, bf16 score) that could be among a query's k nearest."""
        b = len(low)
        best: torch.Tensor | None = None  # the k best group maxima so far, per query
        tau = torch.full((b,), float("-inf"), dtype=torch.float64)
        found_q, found_pos, found_score = [], [], []
        rows = len(self._low)
        for start in range(0, rows, CHUNK):
            stop = min(rows, start + CHUNK)
            scores = (low @ self._low[start:stop].T).float()  # bf16 values, exact in float32
            if stop > self.n:  # padding never competes
                scores[:, max(0, self.n - start) :] = float("-inf")
            groups = scores.view(b, -1, GROUP)
            gmax = groups.amax(dim=2)
            merged = gmax if best is None else torch.cat([best, gmax], dim=1)
            best = merged.topk(k, dim=1).values if merged.shape[1] >= k else merged
            if best.shape[1] == k:  # sorted: the k-th best is last
                tau = torch.maximum(tau, best[:, k - 1].to(torch.float64) - window)
            threshold = _round_down(tau)
            qq, gg = torch.nonzero(gmax >= threshold[:, None], as_tuple=True)
            if len(qq) == 0:
                continue
            values = groups[qq, gg]  # (pairs, GROUP)
            pi, pj = torch.nonzero(values >= threshold[qq, None], as_tuple=True)
            found_q.append(qq[pi])
            found_pos.append(start + gg[pi] * GROUP + pj)
            found_score.append(values[pi, pj])
        if not found_q:  # only when every score is NaN, which validated input rules out
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, np.empty(0, dtype=np.float64)
        cand_q = torch.cat(found_q)
        cand_score = torch.cat(found_score)
        keep = cand_score >= _round_down(tau)[cand_q]
        return (
            cand_q[keep].numpy(),
            torch.cat(found_pos)[keep].numpy(),
            cand_score[keep].to(torch.float64).numpy(),
        )

    def _refine(
        self,
        q64: np.ndarray,
        qn2: np.ndarray,
        k: int,
        ids: np.ndarray,
        cand_q: np.ndarray,
        cand_pos: np.ndarray,
        cand_score: np.ndarray,
        bound: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score candidates, best bf16 score first, until no unscored one can compete."""
        b = len(q64)
        # By query (a radix sort of small integers); within a query, in the order found.
        keys = cand_q.astype(np.int16) if b <= np.iinfo(np.int16).max else cand_q
        order = np.argsort(keys, kind="stable")
        cand_q, cand_pos, cand_score = cand_q[order], cand_pos[order], cand_score[order]
        margin = _margin(qn2, self._norm_max)
        # Squared distances from float32 inner products, each within `slack` of the truth.
        slack = _f32_slack(qn2, self.dim, self._norm_max)
        d2 = np.full(len(cand_q), np.inf)
        # First the k best by bf16 score (more on ties): the k-th of their distances bounds the
        # k-th nearest.
        first = cand_score >= -_kth_smallest(-cand_score, cand_q, b, k)[cand_q]
        d2[first] = self._distances2_f32(q64, qn2, cand_q[first], cand_pos[first])
        dk2 = _kth_smallest(d2[first] + slack[cand_q[first]], cand_q[first], b, k)
        # A vector whose bf16 score is under theta is farther than that (with the tie margin).
        theta = (qn2 + self._norm_min**2 - dk2 - margin) / 2 - bound
        more = ~first & (cand_score >= theta[cand_q])
        d2[more] = self._distances2_f32(q64, qn2, cand_q[more], cand_pos[more])
        scored = np.flatnonzero(first | more)
        # Then exactly, in float64, those whose float32 distance leaves them in contention.
        upper = d2[scored] + slack[cand_q[scored]]
        dk2 = _kth_smallest(upper, cand_q[scored], b, k)
        close = scored[d2[scored] - slack[cand_q[scored]] <= (dk2 + margin)[cand_q[scored]]]
        sq, spos = cand_q[close], cand_pos[close]
        dist = np.sqrt(self._distances2_f64(q64, sq, spos)).astype(np.float32)
        sid = ids[spos]
        final = np.lexsort((sid, dist, sq))
        sq, dist, sid = sq[final], dist[final], sid[final]
        r = _ranks(sq, b)
        top = r < k
        D = np.full((b, k), np.inf, dtype=np.float32)
        I = np.full((b, k), -1, dtype=np.int64)  # noqa: E741
        D[sq[top], r[top]] = dist[top]
        I[sq[top], r[top]] = sid[top]
        return D, I

    def _distances2_f32(
        self, q64: np.ndarray, qn2: np.ndarray, rows: np.ndarray, pos: np.ndarray
    ) -> np.ndarray:
        """|q|^2 + |x|^2 - 2 q.x with q.x in float32 (within 2 d 2^-24 |q| |x| of the truth)."""
        dots = _dots_f32(self._x, q64.astype(np.float32), rows, pos)
        return qn2[rows] + self._norm2[pos] - 2.0 * dots

    def _distances2_f64(self, q64: np.ndarray, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Squared Euclidean distances in float64 from differences (0.0 for identical vectors)."""
        out = np.empty(len(rows), dtype=np.float64)

        def part(start: int) -> None:
            p = pos[start : start + _REFINE_ROWS]
            diff = np.take(self._x, p, axis=0).astype(np.float64)
            np.subtract(q64[rows[start : start + _REFINE_ROWS]], diff, out=diff)
            out[start : start + len(p)] = np.einsum("ij,ij->i", diff, diff)

        _parallel.each(part, range(0, len(rows), _REFINE_ROWS))
        return out


class ProjectedSearcher(ExactSearcher):
    """Exact search that scores every stored vector in a few dimensions, not all of them.

    Embeddings hold most of their length in a few directions. With V the first ``m`` principal
    axes of the stored vectors and r(x) = |x - V V'x| what is left over, Cauchy-Schwarz gives

        q.x = (V'q).(V'x) + (q - VV'q).(x - VV'x) <= [V'q, r(q)] . [V'x, r(x)]

    so one bf16 matrix product of m + 1 columns bounds every score from above (the error bound
    of `ExactSearcher` covers its rounding). Rows are kept in k-means order, so the vectors near a
    query sit in a few groups of `PROJECTED_GROUP` rows; a group's largest bound decides whether to
    look inside. The k-th best float32 distance among the rows of a query's best groups says how
    high a bound must reach to matter; the few rows that reach it are scored exactly as
    `ExactSearcher` does, so the answer is the same. Where the vectors are not concentrated in a
    few directions too many groups pass, and the block falls back to the full-dimension scan
    (made once, when first needed).
    """

    def __init__(
        self, vectors: np.ndarray, dims: int | None = None, axes: np.ndarray | None = None
    ) -> None:
        dims = PROJECTED_DIMS if dims is None else dims
        self._m = max(1, min(dims, vectors.shape[1] - 1)) if vectors.ndim == 2 else 1
        self._given_axes = axes
        self._full: ExactSearcher | None = None
        self._full_lock = threading.Lock()
        self.fallbacks = 0  # query blocks that needed the full-dimension scan
        super().__init__(vectors)

    @property
    def width(self) -> int:
        return self._m + 1

    @property
    def nbytes(self) -> int:
        full = self._full.nbytes if self._full is not None else 0
        return super().nbytes + self._order.nbytes + full

    def _prepare(self) -> None:
        if self._given_axes is not None and self._given_axes.shape == (self.dim, self._m):
            self._axes = self._given_axes
        else:
            self._axes = principal_axes(self._x, self._m)[0]

    def _features(self, x64: np.ndarray) -> np.ndarray:
        """[V'x, r(x)], r rounded up: |x|^2 - |V'x|^2 loses nothing the 1e-12 does not cover."""
        head = x64 @ self._axes
        rest = np.einsum("ij,ij->i", x64, x64) - np.einsum("ij,ij->i", head, head)
        return np.concatenate([head, np.sqrt(np.maximum(rest, 0.0) + 1e-12)[:, None]], axis=1)

    # Every bf16 score is 1 more than the bound it stands for, so it is positive, and positive
    # bf16 numbers order as their bits do: group maxima are taken over int16, several times
    # faster than over bf16.
    _SHIFT = 1

    def _arrange(self) -> None:
        """Rows in k-means order, then the column of ones (zeros for padding: never larger)."""
        self._order_rows()
        ones = torch.zeros((len(self._low), 1), dtype=torch.bfloat16)
        ones[: self.n] = 1.0
        self._low = torch.cat([self._low, ones], dim=1)

    def _order_rows(self) -> None:
        """Rows in k-means order (over the bf16 features; only speed depends on the order)."""
        self._order = np.arange(self.n, dtype=np.int64)
        if self.n < 2 * GROUP:
            return
        import faiss

        lists = int(min(_MAX_LISTS, max(2, self.n // _ROWS_PER_LIST)))
        rng = np.random.default_rng(1)
        take = min(self.n, lists * _KMEANS_SAMPLE)
        sample = self._low[np.sort(rng.choice(self.n, size=take, replace=False))]
        kmeans = faiss.Kmeans(self.width, lists, niter=_KMEANS_ITERATIONS, seed=1)
        kmeans.train(np.ascontiguousarray(sample.float().numpy()))
        assign = np.empty(self.n, dtype=np.int64)
        for start in range(0, self.n, _BUILD_ROWS):
            block = self._low[start : min(self.n, start + _BUILD_ROWS)].float().numpy()
            assign[start : start + len(block)] = kmeans.index.search(block, 1)[1][:, 0]
        self._order = np.argsort(assign, kind="stable")
        order = torch.from_numpy(self._order)
        self._low[: self.n] = self._low[order]

    def _query_block(self) -> int:
        groups = len(self._low) // PROJECTED_GROUP  # one int16 maximum per group and query
        return max(16, min(PROJECTED_QUERY_BLOCK, _SCORE_BYTES // (2 * max(groups, 1))))

    def _search_block(
        self, xq: np.ndarray, k: int, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        found = None
        if self.fallbacks < _FALLBACKS_TO_GIVE_UP:
            found = self._try_block(xq, k, ids)
        return found if found is not None else self._full_searcher().search(xq, k, ids)

    def _full_searcher(self) -> ExactSearcher:
        with self._full_lock:
            if self._full is None:
                log.info("the vectors are spread over many directions: full-dimension bf16 scan")
                self._full = ExactSearcher(self._x)
            return self._full

    def _try_block(
        self, xq: np.ndarray, k: int, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The block's answer, or None when too many groups pass (the full scan is faster)."""
        low, unit, bound = self._quantise(xq)
        q64 = xq.astype(np.float64)
        qn2 = np.einsum("ij,ij->i", q64, q64)
        best = self._group_bounds(low)
        threshold = self._threshold(low, q64, qn2, k, best, unit, bound)
        found = self._candidates(low, best, threshold)
        if found is None:
            self.fallbacks += 1
            return None
        cand_q, cand_pos, cand_score = found
        return self._refine(q64, qn2, k, ids, cand_q, cand_pos, cand_score * unit[cand_q], bound)

    def _group_bounds(self, low: torch.Tensor) -> torch.Tensor:
        """(groups, queries) bf16: each group's largest bf16 bound, one product per chunk.

        Groups of `PROJECTED_GROUP` rows: smaller than the full scan's, as fewer rows are then
        read again for each group that passes.
        """
        rows, size = len(self._low), PROJECTED_GROUP
        best = torch.empty((rows // size, len(low)), dtype=torch.int16)
        scores = torch.empty((min(rows, PROJECTED_CHUNK), len(low)), dtype=torch.bfloat16)
        keys = scores.view(torch.int16)  # the same bits: positive bf16 numbers order as int16
        for start in range(0, rows, PROJECTED_CHUNK):
            stop = min(rows, start + PROJECTED_CHUNK)
            torch.mm(self._low[start:stop], low.T, out=scores[: stop - start])
            into = best[start // size : stop // size]
            torch.amax(keys[: stop - start].view(-1, size, len(low)), dim=1, out=into)
        return best.view(torch.bfloat16)

    def _threshold(
        self,
        low: torch.Tensor,
        q64: np.ndarray,
        qn2: np.ndarray,
        k: int,
        best: torch.Tensor,
        unit: np.ndarray,
        bound: np.ndarray,
    ) -> torch.Tensor:
        """Per query, the bf16 bound a row must reach to be among the k nearest (float32).

        The rows of the query's best groups with the highest bounds are scored in float32; their
        k-th distance (plus float32 slack) is at least the true k-th, so a row can only compete
        if its inner product reaches what that distance needs, and so its bound too.
        """
        b = len(low)
        per = GROUP // PROJECTED_GROUP
        pairs = best.view(torch.int16).view(-1, per, b).amax(dim=1)  # per GROUP rows (as keys)
        groups = pairs.shape[0]
        top = pairs.T.contiguous().topk(min(_SEED_GROUPS, groups), dim=1).indices  # (b, groups)
        pos = (top[:, :, None] * GROUP + torch.arange(GROUP)).reshape(b, -1)
        columns = self._low.shape[1]
        rows_of = self._low.view(groups, GROUP * columns)  # a group's rows: one contiguous run
        scores = torch.empty(pos.shape, dtype=torch.float32)
        chosen = top.reshape(-1)
        per_query = top.shape[1]
        step = max(1, _PAIR_BLOCK * PROJECTED_GROUP // (GROUP * per_query))  # as _candidates
        with _row_buffer() as buffer:
            for start in range(0, b, step):
                stop = min(b, start + step)
                picked = chosen[start * per_query : stop * per_query]
                members = buffer.gather(rows_of, picked).view(stop - start, -1, columns)
                scores[start:stop] = torch.bmm(members, low[start:stop, :, None]).squeeze(2)
        scores[pos >= self.n] = float("-inf")
        pick = scores.topk(min(_SEED_ROWS * k, pos.shape[1]), dim=1).indices
        seed = torch.gather(pos, 1, pick).numpy()
        rows = np.repeat(np.arange(b), seed.shape[1])
        seed = seed.ravel()
        keep = seed < self.n
        rows, seed = rows[keep], self._order[seed[keep]]
        slack = _f32_slack(qn2, self.dim, self._norm_max)
        d2 = self._distances2_f32(q64, qn2, rows, seed)
        dk2 = _kth_smallest(d2 + slack[rows], rows, b, k)
        margin = _margin(qn2, self._norm_max)
        need = (qn2 + self._norm_min**2 - dk2 - margin) / 2  # -inf with fewer than k seeds
        threshold = (need - bound * (1 + 1e-6)) / unit + self._SHIFT
        threshold = threshold - 1e-9 * np.abs(threshold)
        # Every score is positive: a threshold under 0 lets everything pass, as 0 does.
        return _round_down(torch.from_numpy(np.maximum(threshold, 0.0)))

    def _candidates(
        self, low: torch.Tensor, best: torch.Tensor, threshold: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(query row, position, bf16 bound) of every row whose bound reaches the threshold.

        None when so many groups pass that the full-dimension scan is the faster way.
        """
        keys = _bf16_round_down(threshold).view(torch.int16)
        gg, qq = torch.nonzero(best.view(torch.int16) >= keys[None, :], as_tuple=True)
        if len(gg) > _MAX_PASSING * best.numel():
            return None
        columns = self._low.shape[1]
        rows_of = self._low.view(-1, PROJECTED_GROUP * columns)  # a group's rows, contiguous
        found_q, found_pos, found_score = [], [], []
        with _row_buffer() as buffer:
            for start in range(0, len(gg), _PAIR_BLOCK):
                g, q = gg[start : start + _PAIR_BLOCK], qq[start : start + _PAIR_BLOCK]
                members = buffer.gather(rows_of, g).view(len(g), PROJECTED_GROUP, columns)
                query = low.index_select(0, q)[:, :, None]
                scores = torch.bmm(members, query).squeeze(2).float()
                pi, pj = torch.nonzero(scores >= threshold[q][:, None], as_tuple=True)
                found_q.append(q[pi])
                found_pos.append(g[pi] * PROJECTED_GROUP + pj)
                found_score.append(scores[pi, pj])
        if not found_q:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, np.empty(0, dtype=np.float64)
        cand_q = torch.cat(found_q).numpy()
        cand_pos = torch.cat(found_pos).numpy()
        cand_score = torch.cat(found_score).to(torch.float64).numpy()
        keep = cand_pos < self.n  # padding rows
        return cand_q[keep], self._order[cand_pos[keep]], cand_score[keep] - self._SHIFT


def principal_axes(vectors: np.ndarray, dims: int) -> tuple[np.ndarray, float]:
    """(the first `dims` principal axes (dim, dims) float64, share of length left outside them).

    From the second moments of a seeded sample; any orthonormal axes keep the search exact,
    good ones only make it faster.
    """
    n, dim = vectors.shape
    rng = np.random.default_rng(0)
    take = min(n, _AXES_SAMPLE)
    if take == 0:
        return np.eye(dim)[:, :dims], 0.0
    sample = vectors[np.sort(rng.choice(n, size=take, replace=False))].astype(np.float64)
    values, axes = np.linalg.eigh(sample.T @ sample)
    values, axes = values[::-1], axes[:, ::-1]
    total = float(values.sum())
    left = float(values[dims:].sum()) / total if total > 0 else 0.0
    return np.ascontiguousarray(axes[:, :dims]), left


def make_searcher(vectors: np.ndarray) -> ExactSearcher:
    """The projected searcher where it pays (many vectors, most of their length in a few
    directions), else the full-dimension one."""
    n, dim = vectors.shape
    if n >= PROJECTED_MIN_VECTORS and dim >= 4 * PROJECTED_DIMS:
        axes, left = principal_axes(vectors, PROJECTED_DIMS)
        if left <= PROJECTED_MAX_RESIDUAL:
            return ProjectedSearcher(vectors, PROJECTED_DIMS, axes)
        log.debug("%.0f%% of the length outside %d directions: full scan", 100 * left, dim)
    return ExactSearcher(vectors)


class _RowBuffer:
    """Memory that gathers of group rows reuse: gathering into memory already touched is 10x
    faster than into a new tensor, whose fresh pages fault one by one (measured: 8 against
    120 ms for 89,000 groups of 32 rows of 66 bf16 values). It grows to the largest gather."""

    def __init__(self) -> None:
        self._data: torch.Tensor | None = None

    def gather(self, rows: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """rows[which], valid until the next gather into this buffer."""
        n, width = len(which), rows.shape[1]
        data = self._data
        if data is None or data.dtype != rows.dtype or data.numel() < n * width:
            data = self._data = torch.empty(n * width, dtype=rows.dtype)
        return torch.index_select(rows, 0, which, out=data[: n * width].view(n, width))


_spare_lock = threading.Lock()
_spares: list[_RowBuffer] = []


@contextmanager
def _row_buffer() -> Iterator[_RowBuffer]:
    """A buffer for one search's gathers, then kept for the next search. At most one per core is
    kept (about 35 MB each at most), however many threads a server searches from."""
    with _spare_lock:
        buffer = _spares.pop() if _spares else _RowBuffer()
    try:
        yield buffer
    finally:
        with _spare_lock:
            if len(_spares) < _parallel.cores():
                _spares.append(buffer)


def _dots_f32(x: np.ndarray, q32: np.ndarray, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """float32 inner products q32[rows[i]] . x[pos[i]] (float32 in any order of summation).

    FAISS reads each row of x where it lies, on all threads (3x faster than gathering copies
    for numpy). Its kernel takes a rectangle of ids per query: each run of equal query rows is
    cut into lines of _DOT_WIDTH ids (the last padded with -1), one line per FAISS "query".
    """
    import faiss

    n = len(rows)
    if n == 0:
        return np.empty(0, dtype=np.float32)
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = rows[1:] != rows[:-1]
    starts = np.flatnonzero(new_run)
    cell = (np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))) % _DOT_WIDTH
    head = cell == 0
    line = np.cumsum(head) - 1
    ids = np.full((int(line[-1]) + 1, _DOT_WIDTH), -1, dtype=np.int64)
    ids[line, cell] = pos
    xq = np.ascontiguousarray(q32[rows[head]], dtype=np.float32)
    out = np.empty(ids.shape, dtype=np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(out),
        faiss.swig_ptr(xq),
        faiss.swig_ptr(x),
        faiss.swig_ptr(ids),
        x.shape[1],
        len(ids),
        _DOT_WIDTH,
    )
    return out[line, cell]


def _f32_slack(qn2: np.ndarray, dim: int, norm_max: float) -> np.ndarray:
    """How far a squared distance from a float32 inner product can be from the truth."""
    return 2.0 * 1.01 * dim * _U32 * np.sqrt(qn2) * norm_max + 1e-12


def _margin(qn2: np.ndarray, norm_max: float) -> np.ndarray:
    """A gap in squared distance that float32 rounding of the distances cannot close."""
    return 1e-6 * (np.sqrt(qn2) + norm_max) ** 2


def _round_down(tau: torch.Tensor) -> torch.Tensor:
    """tau in float32, never above it, and above the padding's -inf: nothing at tau is missed."""
    tau = tau.clamp(min=float(torch.finfo(torch.float32).min))
    low = tau.to(torch.float32)
    above = low.to(torch.float64) > tau
    if bool(above.any()):
        low = torch.where(above, torch.nextafter(low, torch.full_like(low, float("-inf"))), low)
    return low


def _bf16_round_down(tau: torch.Tensor) -> torch.Tensor:
    """float32 thresholds in bf16, never above them: nothing at or above them is missed."""
    low = tau.to(torch.bfloat16)
    above = low.float() > tau
    if bool(above.any()):
        down = torch.full_like(low, float("-inf"))
        low = torch.where(above, torch.nextafter(low, down), low)
    return low


def _ranks(groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Position of each element within its run of equal values (the array is sorted by group)."""
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.arange(len(groups)) - np.repeat(starts, counts)


def _kth_smallest(values: np.ndarray, groups: np.ndarray, n_groups: int, k: int) -> np.ndarray:
    """Per group, the k-th smallest value (inf where a group has fewer than k); groups ascending.

    Groups up to a few times the mean size go into a table padded with inf, partitioned row by
    row (10x faster than sorting everything); the few larger ones are sorted.
    """
    out = np.full(n_groups, np.inf)
    if len(values) == 0 or k < 1:
        return out
    counts = np.bincount(groups, minlength=n_groups)
    width = max(k, _KTH_TABLE_FACTOR * len(values) // max(n_groups, 1) + _KTH_TABLE_MIN)
    small = counts <= width
    in_table = small[groups]
    g, v = groups[in_table], values[in_table]
    widest = int(counts[small].max()) if small.any() else 0
    if widest >= k:
        table = np.full((n_groups, widest), np.inf)
        table[g, _ranks(g, n_groups)] = v
        out[small] = np.partition(table, k - 1, axis=1)[small, k - 1]
    if not in_table.all():
        g, v = groups[~in_table], values[~in_table]
        order = np.lexsort((v, g))
        g, v = g[order], v[order]
        at = _ranks(g, n_groups) == k - 1
        out[g[at]] = v[at]
    return out
