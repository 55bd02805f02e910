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
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import torch

from simsearch._blas import cpu_supports_bf16

log = logging.getLogger(__name__)

KERNEL_ENV = "SIMSEARCH_EXACT_KERNEL"  # "bf16" or "fp32": force the choice (benchmarks, tests)
GROUP = 64  # stored vectors per group: a group's best score decides whether to look inside
CHUNK = 8_192  # stored vectors per matrix product (a multiple of GROUP)
QUERY_BLOCK = 256  # queries per matrix product
_BUILD_ROWS = 65_536  # rows converted at a time (bounds temporary memory)
_REFINE_ROWS = 16_384  # candidate rows scored at a time
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
        self._x = vectors
        self.n, self.dim = vectors.shape
        rows = -(-max(self.n, 1) // GROUP) * GROUP  # padded: every chunk is whole groups
        self._low = torch.zeros((rows, self.dim), dtype=torch.bfloat16)
        norms = np.ones(max(self.n, 1), dtype=np.float64)
        for start in range(0, self.n, _BUILD_ROWS):
            x = vectors[start : start + _BUILD_ROWS].astype(np.float64)
            norms[start : start + len(x)] = np.sqrt(np.einsum("ij,ij->i", x, x))
        self._norm2 = norms[: self.n] ** 2
        self._norm_min, self._norm_max = float(norms.min()), float(norms.max())
        self._scale = _SHORTER / self._norm_max if self._norm_max > 0 else 1.0
        scale32 = np.float32(self._scale)
        err_max = low_max = 0.0
        for start in range(0, self.n, _BUILD_ROWS):
            x = vectors[start : start + _BUILD_ROWS]
            # bf16 of a float32 product: its rounding is measured below against the exact one.
            low = torch.from_numpy(x * scale32).to(torch.bfloat16)
            self._low[start : start + len(x)] = low
            low64 = low.float().numpy().astype(np.float64)
            err = x.astype(np.float64) * self._scale - low64
            err_max = max(err_max, float(np.sqrt(np.einsum("ij,ij->i", err, err).max())))
            low_max = max(low_max, float(np.sqrt(np.einsum("ij,ij->i", low64, low64).max())))
        # Slack for the float64 arithmetic of these maxima themselves.
        self._err_max = err_max * (1 + 1e-9) + 1e-15
        self._low_max = low_max * (1 + 1e-9)

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
        for start in range(0, nq, QUERY_BLOCK):
            xq = np.ascontiguousarray(queries[start : start + QUERY_BLOCK], dtype=np.float32)
            stop = start + len(xq)
            D[start:stop], I[start:stop] = self._search_block(xq, k, ids)
        return D, I

    def bound(self, queries: np.ndarray) -> np.ndarray:
        """Per query, the largest possible error of a bf16 score, in inner-product terms."""
        return self._quantise(np.asarray(queries, dtype=np.float32))[2]

    # -- internals ---------------------------------------------------------------------------

    def _quantise(self, xq: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(bf16 queries, inner product per bf16-score unit, error bound) for a block."""
        q64 = xq.astype(np.float64)
        qn = np.sqrt(np.einsum("ij,ij->i", q64, q64))
        t = np.where(qn > 0, _SHORTER / np.where(qn > 0, qn, 1.0), 1.0)
        scaled = q64 * t[:, None]
        low = torch.from_numpy(scaled.astype(np.float32)).to(torch.bfloat16)
        low64 = low.to(torch.float64).numpy()
        f = scaled - low64
        fnorm = np.sqrt(np.einsum("ij,ij->i", f, f))
        lownorm = np.sqrt(np.einsum("ij,ij->i", low64, low64))
        bound = (
            qn * t * self._err_max
            + fnorm * self._low_max
            + 2 * self.dim * _U32 * lownorm * self._low_max
            + _HALF_ULP_BELOW_1
            + self.dim * 2.0**-126  # products flushed to zero as denormals
        )
        unit = 1.0 / (t * self._scale)
        return low, unit, bound * (1 + 1e-9) * unit

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
        order = np.lexsort((-cand_score, cand_q))
        cand_q, cand_pos, cand_score = cand_q[order], cand_pos[order], cand_score[order]
        rank = _ranks(cand_q, b)
        margin = _margin(qn2, self._norm_max)
        # Squared distances from float32 inner products, each within `slack` of the truth.
        slack = _f32_slack(qn2, self.dim, self._norm_max)
        d2 = np.full(len(cand_q), np.inf)
        # First the k best by bf16 score: the k-th of their distances bounds the k-th nearest.
        first = rank < k
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
        out = np.empty(len(rows), dtype=np.float64)
        q32 = q64.astype(np.float32)
        for start in range(0, len(rows), _REFINE_ROWS):
            r, p = rows[start : start + _REFINE_ROWS], pos[start : start + _REFINE_ROWS]
            dots = np.einsum("ij,ij->i", np.take(self._x, p, axis=0), q32[r])
            out[start : start + len(r)] = qn2[r] + self._norm2[p] - 2.0 * dots
        return out

    def _distances2_f64(self, q64: np.ndarray, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Squared Euclidean distances in float64 from differences (0.0 for identical vectors)."""
        diff = np.take(self._x, pos, axis=0).astype(np.float64)
        np.subtract(q64[rows], diff, out=diff)
        return np.einsum("ij,ij->i", diff, diff)


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


def _ranks(groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Position of each element within its run of equal values (the array is sorted by group)."""
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.arange(len(groups)) - np.repeat(starts, counts)


def _kth_smallest(values: np.ndarray, groups: np.ndarray, n_groups: int, k: int) -> np.ndarray:
    """Per group, the k-th smallest value (inf where a group has fewer than k)."""
    order = np.lexsort((values, groups))
    rank = _ranks(groups[order], n_groups)
    out = np.full(n_groups, np.inf)
    at = rank == k - 1
    out[groups[order][at]] = values[order][at]
    return out
