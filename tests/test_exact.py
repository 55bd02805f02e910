"""The bf16 exact search returns exactly the float64 top k, which is FAISS IndexFlatIP's top k."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

import simsearch.exact as exact_module
from simsearch import _parallel
from simsearch.exact import ExactSearcher


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int = 20) -> np.ndarray:
    """Unit vectors around a few centres: many near neighbours within the bf16 error."""
    centres = unit(rng, clusters, dim)
    x = centres[rng.integers(0, clusters, n)] + 0.08 * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(
    xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """float64 Euclidean distances, sorted by (float32 distance, id), padded with (inf, -1)."""
    D = np.full((len(xq), k), np.inf, dtype=np.float32)
    I = np.full((len(xq), k), -1, dtype=np.int64)  # noqa: E741
    for row, q in enumerate(xq.astype(np.float64)):
        dist = np.sqrt(((xb.astype(np.float64) - q) ** 2).sum(axis=1)).astype(np.float32)
        order = np.lexsort((ids, dist))[:k]
        D[row, : len(order)], I[row, : len(order)] = dist[order], ids[order]
    return D, I


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several chunks and query blocks even for small inputs, so their merging is exercised."""
    monkeypatch.setattr(exact_module, "CHUNK", 2 * exact_module.GROUP)
    monkeypatch.setattr(exact_module, "QUERY_BLOCK", 16)


@pytest.mark.parametrize(
    ("n", "dim", "nq", "k"),
    [
        (1, 8, 3, 5),  # k > n: padded
        (63, 16, 5, 10),  # less than one group
        (700, 32, 40, 1),  # groups and chunks not whole
        (3000, 64, 37, 10),
        (3000, 64, 7, 50),
    ],
)
def test_matches_faiss_flat_and_brute_force(
    n: int, dim: int, nq: int, k: int, small_blocks: None
) -> None:
    rng = np.random.default_rng(n + dim + k)
    xb = clustered(rng, n, dim) if n > 100 else unit(rng, n, dim)
    xq = np.concatenate([clustered(rng, nq, dim), xb[:2]])  # two queries are stored vectors
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    dist, found = ExactSearcher(xb).search(xq, k, ids)
    want_dist, want_found = brute_force(xb, ids, xq, k)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(dist, want_dist)
    flat = faiss.IndexFlatIP(dim)
    flat.add(xb)
    _, positions = flat.search(xq, min(k, n))
    np.testing.assert_array_equal(found[:, : min(k, n)], ids[positions])
    stored = min(2, n)  # the last queries are stored vectors: at distance exactly 0
    assert (dist[-stored:, 0] == 0.0).all()


def test_ties_are_ordered_by_id_across_chunks(small_blocks: None) -> None:
    rng = np.random.default_rng(5)
    xb = unit(rng, 1000, 16)
    copies = rng.choice(1000, size=40, replace=False)  # spread over several chunks
    xb[copies] = xb[copies[0]]
    ids = rng.permutation(1000).astype(np.int64)
    dist, found = ExactSearcher(xb).search(xb[copies[:1]], 25, ids)
    assert found[0].tolist() == sorted(ids[copies].tolist())[:25]
    assert (dist[0] == 0.0).all()
    xq = np.concatenate([unit(rng, 9, 16), xb[copies[:1]] * 0.9 + xb[:1] * 0.1])
    got_dist, got_found = ExactSearcher(xb).search(xq, 45, ids)
    want_dist, want_found = brute_force(xb, ids, xq, 45)
    np.testing.assert_array_equal(got_found, want_found)
    np.testing.assert_array_equal(got_dist, want_dist)


def test_vectors_that_are_not_unit_length_are_still_exact(small_blocks: None) -> None:
    rng = np.random.default_rng(6)
    xb = clustered(rng, 900, 24) * rng.uniform(0.5, 2.0, (900, 1)).astype(np.float32)
    xq = clustered(rng, 20, 24) * 1.5
    ids = np.arange(900, dtype=np.int64) * 3
    dist, found = ExactSearcher(xb).search(xq, 10, ids)
    want_dist, want_found = brute_force(xb, ids, xq, 10)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(dist, want_dist)


@pytest.mark.parametrize("scale", [1.0, 0.3, 3.0])
def test_error_bound_holds_for_every_pair(scale: float) -> None:
    """The rigorous bound on a bf16 score's error, checked against float64 scores."""
    rng = np.random.default_rng(7)
    xb = np.concatenate([clustered(rng, 1500, 128), unit(rng, 500, 128)]) * scale
    xq = np.concatenate([clustered(rng, 30, 128), unit(rng, 30, 128), xb[:4]])
    searcher = ExactSearcher(xb.astype(np.float32))
    low, unit_ip, bound = searcher._quantise(xq.astype(np.float32))
    coarse = (low @ searcher._low[: len(xb)].T).float().double().numpy() * unit_ip[:, None]
    exact = xq.astype(np.float64) @ xb.astype(np.float64).T
    assert (np.abs(coarse - exact) <= bound[:, None]).all()
    assert bound.max() < 0.02 * scale**2 + 0.01  # and it is tight enough to be useful
    np.testing.assert_allclose(searcher.bound(xq), bound)


def test_empty_inputs() -> None:
    xb = unit(np.random.default_rng(8), 5, 8)
    dist, found = ExactSearcher(xb).search(np.empty((0, 8), np.float32), 3, np.arange(5))
    assert dist.shape == found.shape == (0, 3)
    empty = ExactSearcher(np.empty((0, 8), np.float32))
    dist, found = empty.search(xb[:2], 3, np.empty(0, np.int64))
    assert (found == -1).all() and np.isinf(dist).all()
    with pytest.raises(ValueError, match="float32"):
        ExactSearcher(xb.astype(np.float64))


def test_kernel_choice_follows_the_cpu_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(exact_module.cpu_supports_bf16(), bool)
    for forced, want in [("fp32", None), ("bf16", "bf16")]:
        monkeypatch.setattr(exact_module, "_choice", [])
        monkeypatch.setenv(exact_module.KERNEL_ENV, forced)
        assert exact_module.choose_kernel() == want
    monkeypatch.setattr(exact_module, "_choice", [])
    monkeypatch.delenv(exact_module.KERNEL_ENV)
    monkeypatch.setattr(exact_module, "cpu_supports_bf16", lambda: False)
    assert exact_module.choose_kernel() is None
    assert torch.get_num_threads() >= 1


# -- the projected searcher: a few principal directions and a bound on the rest -----------------


def low_rank(rng: np.random.Generator, n: int, dim: int, clusters: int = 30) -> np.ndarray:
    """Unit vectors whose length sits mostly in a few directions, as embeddings' does."""
    spectrum = (1.0 + np.arange(dim)) ** -1.0
    centres = rng.standard_normal((clusters, dim)) * spectrum
    noise = 0.5 * rng.standard_normal((n, dim)) * spectrum
    x = (centres[rng.integers(0, clusters, n)] + noise).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def projected_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks and query blocks, and never the fallback, so the projected path runs."""
    monkeypatch.setattr(exact_module, "PROJECTED_CHUNK", 2 * exact_module.GROUP)
    monkeypatch.setattr(exact_module, "PROJECTED_QUERY_BLOCK", 16)
    monkeypatch.setattr(exact_module, "_PAIR_BLOCK", 7)
    monkeypatch.setattr(exact_module, "_MAX_PASSING", 1.0)


@pytest.mark.parametrize(
    ("n", "dim", "dims", "nq", "k"),
    [
        (1, 8, 4, 3, 5),  # k > n: padded
        (100, 16, 4, 5, 10),  # fewer rows than the k-means order needs
        (1_000, 32, 8, 40, 1),
        (3_001, 64, 16, 37, 10),  # groups not whole
        (3_000, 64, 16, 7, 50),
    ],
)
def test_projected_matches_brute_force(
    n: int, dim: int, dims: int, nq: int, k: int, projected_small: None
) -> None:
    rng = np.random.default_rng(n + dim + k)
    xb = low_rank(rng, n, dim)
    xq = np.concatenate([low_rank(rng, nq, dim), xb[:2], unit(rng, 3, dim)])
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    searcher = exact_module.ProjectedSearcher(xb, dims=dims)
    dist, found = searcher.search(xq, k, ids)
    want_dist, want_found = brute_force(xb, ids, xq, k)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(dist, want_dist)
    assert searcher.fallbacks == 0
    assert (dist[nq : nq + min(2, n), 0] == 0.0).all()  # stored vectors find themselves


def test_projected_ties_and_lengths(projected_small: None) -> None:
    rng = np.random.default_rng(11)
    xb = low_rank(rng, 2_000, 48) * rng.uniform(0.5, 2.0, (2_000, 1)).astype(np.float32)
    copies = rng.choice(2_000, size=30, replace=False)
    xb[copies] = xb[copies[0]]  # 30 equal vectors, spread over the k-means order
    ids = rng.permutation(2_000).astype(np.int64)
    xq = np.concatenate([xb[copies[:1]], low_rank(rng, 20, 48) * 1.5])
    searcher = exact_module.ProjectedSearcher(xb, dims=12)
    dist, found = searcher.search(xq, 40, ids)
    want_dist, want_found = brute_force(xb, ids, xq, 40)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(dist, want_dist)
    assert found[0, :30].tolist() == sorted(ids[copies].tolist())


def test_projected_bound_holds_for_every_pair() -> None:
    """[V'q, r(q)].[V'x, r(x)] >= q.x, and its bf16 value is within the error bound of it."""
    rng = np.random.default_rng(12)
    xb = np.concatenate([low_rank(rng, 1_500, 128), unit(rng, 500, 128)])
    xq = np.concatenate([low_rank(rng, 30, 128), unit(rng, 30, 128), xb[:4]])
    searcher = exact_module.ProjectedSearcher(xb, dims=16)
    fq = searcher._features(xq.astype(np.float64))
    fx = searcher._features(xb.astype(np.float64))
    upper = fq @ fx.T
    exact = xq.astype(np.float64) @ xb.astype(np.float64).T
    assert (upper >= exact - 1e-12).all()
    low, unit_ip, bound = searcher._quantise(xq)
    rows = torch.from_numpy(np.argsort(searcher._order))  # the copy is in k-means order
    shifted = (low @ searcher._low[rows].T).float().double().numpy()
    assert (shifted > 0).all()  # one more than the bound: positive, so int16 order is bf16 order
    coarse = (shifted - 1.0) * unit_ip[:, None]
    assert (np.abs(coarse - upper) <= bound[:, None]).all()


def test_projected_falls_back_when_vectors_are_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Isotropic vectors: most groups pass, so the full-dimension scan answers (still exact)."""
    monkeypatch.setattr(exact_module, "PROJECTED_QUERY_BLOCK", 16)
    rng = np.random.default_rng(13)
    xb = unit(rng, 3_000, 64)
    xq = unit(rng, 40, 64)
    ids = np.arange(3_000, dtype=np.int64)
    searcher = exact_module.ProjectedSearcher(xb, dims=8)
    dist, found = searcher.search(xq, 10, ids)
    want_dist, want_found = brute_force(xb, ids, xq, 10)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(dist, want_dist)
    assert searcher.fallbacks == exact_module._FALLBACKS_TO_GIVE_UP  # then it stops trying
    assert searcher.nbytes > xb.nbytes // 2  # the full copy was made


def test_make_searcher_projects_many_long_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(14)
    monkeypatch.setattr(exact_module, "PROJECTED_MIN_VECTORS", 500)
    monkeypatch.setattr(exact_module, "PROJECTED_DIMS", 8)
    projected = exact_module.ProjectedSearcher
    assert type(exact_module.make_searcher(low_rank(rng, 600, 64))) is projected
    assert type(exact_module.make_searcher(low_rank(rng, 400, 64))) is ExactSearcher
    assert type(exact_module.make_searcher(low_rank(rng, 600, 16))) is ExactSearcher
    assert type(exact_module.make_searcher(unit(rng, 600, 64))) is ExactSearcher  # spread out
    axes, left = exact_module.principal_axes(low_rank(rng, 600, 64), 8)
    np.testing.assert_allclose(axes.T @ axes, np.eye(8), atol=1e-12)
    assert 0.0 < left < exact_module.PROJECTED_MAX_RESIDUAL


def test_projected_scores_few_rows_exactly(projected_small: None) -> None:
    """The threshold is tight: on low-rank vectors a small share of rows reaches it, and
    every true neighbour does."""
    rng = np.random.default_rng(15)
    xb = low_rank(rng, 4_000, 64, clusters=40)
    xq = low_rank(rng, 50, 64, clusters=40)
    searcher = exact_module.ProjectedSearcher(xb, dims=16)
    low, unit_ip, bound = searcher._quantise(xq)
    q64 = xq.astype(np.float64)
    qn2 = np.einsum("ij,ij->i", q64, q64)
    best = searcher._group_bounds(low)
    threshold = searcher._threshold(low, q64, qn2, 10, best, unit_ip, bound)
    found = searcher._candidates(low, best, threshold)
    assert found is not None
    cand_q, cand_pos, cand_score = found
    assert len(cand_q) < 0.1 * len(xb) * len(xq)
    _, want = brute_force(xb, np.arange(len(xb), dtype=np.int64), xq, 10)
    pairs = set(zip(cand_q.tolist(), cand_pos.tolist(), strict=True))
    assert all((q, int(p)) in pairs for q in range(len(xq)) for p in want[q])
    upper = np.einsum(  # each score is its row's bound on q.x, within the bf16 error
        "ij,ij->i",
        searcher._features(q64)[cand_q],
        searcher._features(xb[cand_pos].astype(np.float64)),
    )
    assert (np.abs(cand_score * unit_ip[cand_q] - upper) <= bound[cand_q]).all()


def test_kth_smallest_per_group_in_the_table_and_by_sorting() -> None:
    rng = np.random.default_rng(21)
    # Uneven groups: most small, one far above the table's width (sorted instead), one empty.
    counts = np.array([5, 40, 0, 3, 2_000, 12, 9])
    groups = np.repeat(np.arange(len(counts)), counts)
    values = rng.standard_normal(len(groups))
    values[groups == 5] = 1.5  # ties
    for k in (1, 3, 10):
        expected = np.full(len(counts), np.inf)
        for g, c in enumerate(counts):
            if c >= k:
                expected[g] = np.sort(values[groups == g])[k - 1]
        got = exact_module._kth_smallest(values, groups, len(counts), k)
        np.testing.assert_array_equal(got, expected)
    empty = exact_module._kth_smallest(np.empty(0), np.empty(0, np.int64), 3, 2)
    assert np.isinf(empty).all()


def test_float32_dots_read_in_place_are_within_their_bound() -> None:
    rng = np.random.default_rng(22)
    x = unit(rng, 500, 48)
    q = unit(rng, 30, 48)
    # Runs of one query longer than a FAISS line, single rows, and a query met twice.
    rows = np.concatenate([np.full(150, 3), [0], np.full(64, 7), [3, 3], np.arange(30)])
    pos = rng.integers(0, len(x), len(rows))
    dots = exact_module._dots_f32(x, q, rows, pos)
    truth = np.einsum("ij,ij->i", q[rows].astype(np.float64), x[pos].astype(np.float64))
    assert dots.dtype == np.float32 and dots.shape == rows.shape
    assert np.abs(dots - truth).max() <= 2 * 48 * 2.0**-24
    assert len(exact_module._dots_f32(x, q, rows[:0], pos[:0])) == 0


def test_gathered_rows_are_right_when_the_buffer_is_reused() -> None:
    table = torch.arange(40 * 6, dtype=torch.float32).view(40, 6).to(torch.bfloat16)
    with exact_module._row_buffer() as buffer:
        first = buffer.gather(table, torch.tensor([3, 1, 3]))
        torch.testing.assert_close(first, table[[3, 1, 3]])
        kept = first.clone()
        second = buffer.gather(table, torch.tensor([39, 0]))
        torch.testing.assert_close(second, table[[39, 0]])
        torch.testing.assert_close(kept, table[[3, 1, 3]])
        wider = torch.ones((4, 3000), dtype=torch.bfloat16)
        torch.testing.assert_close(buffer.gather(wider, torch.tensor([2])), wider[[2]])
    # Buffers are kept for later searches, at most one per core whatever the threads.
    held = [exact_module._row_buffer() for _ in range(_parallel.cores() + 3)]
    for context in held:
        context.__enter__()
    for context in held:
        context.__exit__(None, None, None)
    assert len(exact_module._spares) == _parallel.cores()
