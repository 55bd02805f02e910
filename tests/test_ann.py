"""Choosing the index (a pure function), the exact vectors, and approximate search against exact."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from simsearch import ann
from simsearch.ann import ExactVectors, IndexChoice, choose_index
from simsearch.index import VectorIndex

GIB = 2**30


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int) -> np.ndarray:
    """Unit vectors around centres of decaying spread, like embeddings of similar images."""
    spectrum = (1.0 + np.arange(dim)) ** -0.5
    centres = rng.standard_normal((clusters, dim)) * spectrum
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((n, dim)) * spectrum
    noise *= 0.6 / np.sqrt((spectrum**2).sum())
    x = (centres[rng.integers(0, clusters, n)] + noise).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_ids(xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    d2 = (xq.astype(np.float64) ** 2).sum(1)[:, None] - 2 * xq.astype(np.float64) @ xb.T
    return ids[np.argsort(d2, axis=1, kind="stable")[:, :k]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


# -- choose_index ------------------------------------------------------------------------------


def test_small_stores_get_exact_search() -> None:
    for n in (0, 1, 50_000, ann.FLAT_MAX_VECTORS - 1):
        choice = choose_index(n, 512, 8 * GIB)
        assert choice == IndexChoice(ann.FLAT, reason=choice.reason)
        assert not choice.approximate and choice.train_size == 0


def test_the_threshold_switches_to_opq_ivf_pq() -> None:
    choice = choose_index(ann.FLAT_MAX_VECTORS, 512, 8 * GIB)
    assert choice.approximate
    assert choice.factory == f"OPQ64_128,IVF{ann.nlist_for(ann.FLAT_MAX_VECTORS)},PQ64x4fs"
    million = choose_index(1_000_000, 512, 8 * GIB)
    assert million.factory == "OPQ64_128,IVF2048,PQ64x4fs"
    assert million.nprobe == 2048 // ann.NPROBE_DIVISOR
    assert million.rerank == ann.RERANK and million.target_recall == ann.TARGET_RECALL
    assert ann.MIN_TRAIN_SIZE <= million.train_size <= 1_000_000
    # 32-byte codes and ids: far under a quarter of the float32 vectors.
    assert ann.ivf_pq_bytes(1_000_000, 512, 2048, 64) < 1_000_000 * 512 * 4 / 40
    # Low dimensions are coded whole, one 4-bit code per dimension.
    assert choose_index(1_000_000, 64, 8 * GIB).factory == "IVF2048,PQ64x4fs"
    assert choose_index(1_000_000, 128, 8 * GIB).factory == "IVF2048,PQ128x4fs"


def test_nlist_is_a_power_of_two_near_four_root_n_and_trainable() -> None:
    for n in (10_000, 200_000, 1_000_000, 10**7, 10**9):
        nlist = ann.nlist_for(n)
        assert nlist & (nlist - 1) == 0
        assert ann.MIN_NLIST <= nlist <= ann.MAX_NLIST or nlist * ann.MIN_TRAIN_PER_LIST > n
        assert nlist * ann.MIN_TRAIN_PER_LIST <= n
        if ann.MIN_NLIST < nlist < ann.MAX_NLIST:
            assert math.sqrt(n) <= nlist <= 4 * math.sqrt(n)


def test_a_tight_budget_moves_a_small_store_to_an_approximate_index() -> None:
    n, dim = 100_000, 512
    assert not choose_index(n, dim, ann.flat_bytes(n, dim)).approximate
    tight = choose_index(n, dim, ann.flat_bytes(n, dim) - 1)
    assert tight.approximate and "IVF" in tight.factory
    # Too few vectors to train an inverted file: exact search whatever the budget.
    assert not choose_index(5_000, dim, 1).approximate
    # Over any budget, the smallest index is still chosen, and says so.
    assert "over the" in choose_index(10**7, dim, 1).reason


def test_pq_codes_fit_the_dimension() -> None:
    for dim in (512, 256, 130):  # reduced and rotated: one code per pair of dimensions
        assert ann.pq_subquantizers(dim) == ann.REDUCED_DIMS // 2
    for dim in (128, 100, 48, 8, 6):  # kept whole: one code per dimension
        assert ann.pq_subquantizers(dim) == dim
    assert ann.reduced_dims(1024) == 128 and ann.reduced_dims(48) == 48
    # An odd dimension has no 4-bit PQ code here: 8-bit scalar codes instead.
    assert ann.pq_subquantizers(101) == 0
    assert choose_index(10**6, 101, 8 * GIB).factory == "IVF2048,SQ8"


def test_new_indexes_are_euclidean_so_their_lists_can_be_pruned() -> None:
    import faiss

    factories = ("PCA16,IVF16,PQ16x4fs", "OPQ8_16,IVF16,PQ8x4fs", "IVF16,PQ32x4fs", "IVF16,Flat")
    for factory in factories:
        index = ann.new_ann(32, factory)
        assert index.metric_type == faiss.METRIC_L2
        assert ann.prunable_ivf(index) is not None
    rotated = ann.new_ann(32, "OPQ8_16,IVF16,PQ8x4fs")  # kept: the transform lives inside it
    rotation = faiss.downcast_VectorTransform(rotated.chain.at(0))
    assert isinstance(rotation, faiss.OPQMatrix) and rotation.niter == ann.OPQ_ITERATIONS
    assert ann.prunable_ivf(ann.new_ann(32, "HNSW8")) is None
    assert ann.prunable_ivf(ann.new_ann(32, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)) is None
    # Inside a refine, the pruned lists would bypass it; such an index is searched as a whole.
    assert ann.prunable_ivf(ann.new_ann(32, "IVF16,PQ8,Refine(Flat)")) is None
    rng = np.random.default_rng(18)
    xb = clustered(rng, 3_000, 32, clusters=30)
    for factory in ("IVF16,PQ16x4,Refine(Flat)", "PCA16,IVF16,PQ16x4,Refine(Flat)"):
        refined = VectorIndex.build(32, np.arange(3_000), xb, factory, target_recall=None)
        assert refined.search(xb[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
        assert "pruned" not in refined.description() and "within" not in refined.description()


def test_the_calibration_ladder_climbs_from_the_cheapest() -> None:
    Rung = ann.Rung
    ladder = ann.calibration_ladder(8, None, 3, 2048)
    # A quarter more lists costs less than twice the re-ranking, which costs less than twice
    # the lists; one fewer candidate per result is cheaper still.
    assert ladder[:4] == [Rung(8, None, 2), Rung(10, None, 2), Rung(8, None, 3), Rung(12, None, 2)]
    assert ladder.index(Rung(8, None, 6)) < ladder.index(Rung(16, None, 3))
    assert ladder.index(Rung(16, None, 3)) < ladder.index(Rung(10, None, 6))
    assert {rung.rerank for rung in ladder} == {2, 3, 4, 6, 12}
    probes = [rung.nprobe for rung in ladder if rung.rerank == 3]
    assert probes == sorted(probes) and max(probes) <= 8 * ann.MAX_EFFORT
    assert len(set(ladder)) == len(ladder) and all(rung.pruning is None for rung in ladder)
    # It stops at every list, and HNSW widens its beam instead.
    assert ann.calibration_ladder(4, None, 3, 6)[-1] == Rung(6, None, 12)
    beams = ann.calibration_ladder(None, 64, 2, None)
    assert beams[0] == Rung(None, 64, 1) and beams[-1].ef_search <= 64 * ann.MAX_EFFORT
    assert all(rung.nprobe is None for rung in beams)


def test_pruned_rungs_and_a_cost_from_the_data() -> None:
    Rung, Pruning = ann.Rung, ann.Pruning
    ladder = ann.calibration_ladder(8, None, 3, 2048, prune=True)
    pruned = [rung for rung in ladder if rung.pruning is not None]
    assert {rung.pruning.ratio for rung in pruned} == set(ann.PRUNE_RATIOS)
    assert {(rung.nprobe, rung.pruning.min_lists) for rung in pruned} == {
        (12, 4),
        (16, 4),
        (24, 4),
        (32, 4),
    }
    per_cap = len(ann.PRUNE_RATIOS) * len(ann.rerank_choices(3))
    assert len(pruned) == len(ann.PRUNE_CAPS) * per_cap
    # Capped by the lists there are.
    assert {rung.nprobe for rung in ann.calibration_ladder(8, None, 3, 20, prune=True)} <= set(
        range(1, 21)
    )
    # A cost orders the rungs, ties by fewer candidates.
    by_cost = ann.calibration_ladder(8, None, 3, 2048, prune=True, cost=lambda r: -r.nprobe)
    assert by_cost[0].nprobe == max(r.nprobe for r in ladder) and by_cost[-1].nprobe == 8
    # What a rung covers: as many lists or more, as many candidates or more.
    wide, narrow = Rung(32, None, 3, Pruning(2.0, 4)), Rung(32, None, 3, Pruning(1.5, 4))
    assert wide.covers(narrow) and not narrow.covers(wide)
    assert Rung(32, None, 3).covers(wide) and not wide.covers(Rung(32, None, 3))
    assert not Rung(16, None, 3).covers(wide) and not wide.covers(Rung(32, None, 4, narrow.pruning))
    assert Rung(16, None, 6).covers(Rung(10, None, 6)) and not Rung(16, None, 2).covers(
        Rung(10, None, 3)
    )


def test_pruning_keeps_the_lists_near_the_nearest() -> None:
    distances = np.array([[1.0, 1.2, 1.6, 3.0], [0.0, 0.5, 0.7, 0.9], [2.0, 2.1, 2.2, 2.3]])
    lists = np.array([[5, 6, 7, 8], [1, 2, 3, -1], [9, 10, 11, 12]])
    pruned = ann.prune_lists(distances, lists, ann.Pruning(1.5, 1))
    assert pruned.tolist() == [[5, 6, -1, -1], [1, -1, -1, -1], [9, 10, 11, 12]]
    # At least min_lists, even when the nearest centroid is the query itself.
    floor = ann.prune_lists(distances, lists, ann.Pruning(1.5, 3))
    assert floor.tolist() == [[5, 6, 7, -1], [1, 2, 3, -1], [9, 10, 11, 12]]


def test_pruned_search_and_its_cost_on_a_real_inverted_file() -> None:
    rng = np.random.default_rng(16)
    n, dim = 4_000, 32
    xb = clustered(rng, n + 100, dim, clusters=40)
    xb, xq = xb[:n], xb[n:]
    index = VectorIndex.build(
        dim, np.arange(n), xb, "PCA16,IVF32,PQ16x4fs", nprobe=8, target_recall=None
    )
    faiss_index = index._ann
    ivf = ann.prunable_ivf(faiss_index)
    assert ivf is not None and ivf.nprobe == 8
    plain = ann.search_candidates(faiss_index, xq, 20, None)
    # Every list within reach is kept: the same candidates as the fixed nprobe.
    everything = ann.search_candidates(faiss_index, xq, 20, ann.Pruning(1e9, 1))
    np.testing.assert_array_equal(everything, plain)
    # Only the nearest list: what nprobe 1 finds.
    ivf.nprobe = 1
    nearest = faiss_index.search(xq, 20)[1]
    ivf.nprobe = 8
    np.testing.assert_array_equal(
        ann.search_candidates(faiss_index, xq, 20, ann.Pruning(1.0, 1)), nearest
    )
    # The cost counts the codes of the lists searched, and candidates re-ranked.
    cost = ann.ProbeCost(faiss_index, xq, 16, k=10)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
    _, coarse = ivf.quantizer.search(ann.transformed(faiss_index, xq), 8)
    codes = sizes[coarse].sum(axis=1).mean()
    rerank = 30 * 4 * dim * ann.RERANK_SECONDS_PER_BYTE  # 3 x k candidates, k = 10
    coarse = 8 * ann.COARSE_SECONDS_PER_LIST
    per_code = ann.SCAN_SECONDS_PER_CODE + ivf.code_size * ann.SCAN_SECONDS_PER_BYTE
    expected = coarse + codes * per_code + rerank
    assert cost(ann.Rung(8, None, 3)) == pytest.approx(expected)
    assert cost(ann.Rung(8, None, 3, ann.Pruning(1.5, 1))) < cost(ann.Rung(8, None, 3))
    assert cost(ann.Rung(8, None, 3, ann.Pruning(1e9, 1))) == pytest.approx(expected)
    assert cost(ann.Rung(8, None, 6)) > cost(ann.Rung(8, None, 3)) > cost(ann.Rung(4, None, 3))


def test_a_factory_string_overrides_the_choice() -> None:
    assert ann.choice_for_factory(" flat ", 10**6).factory == ann.FLAT
    ivf = ann.choice_for_factory("IVF1024,SQ8", 10**6)
    assert ivf.factory == "IVF1024,SQ8" and ivf.nprobe == ann.nprobe_for(1024) == 8
    assert ivf.rerank == ann.RERANK and ivf.target_recall == ann.TARGET_RECALL
    assert ann.nprobe_for(4) == 4 and ann.nprobe_for(128) == ann.MIN_NPROBE
    assert ann.nprobe_for(4096) == 16
    assert ivf.train_size == max(ann.MIN_TRAIN_SIZE, ann.TRAIN_PER_LIST * 1024)
    hnsw = ann.choice_for_factory("HNSW32", 500)
    assert hnsw.ef_search == ann.HNSW_EF_SEARCH and hnsw.nprobe is None
    assert hnsw.train_size == 500
    assert ann.trainable("IVF1024,SQ8", 1024 * ann.MIN_TRAIN_PER_LIST)
    assert not ann.trainable("IVF1024,SQ8", 1024 * ann.MIN_TRAIN_PER_LIST - 1)
    assert ann.trainable("HNSW32", 1) and not ann.trainable("HNSW32", 0)


def test_memory_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ann.parse_bytes("2G") == 2 * GIB and ann.parse_bytes("512MiB") == 512 * 2**20
    assert ann.parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="write e.g. 4G"):
        ann.parse_bytes("lots")
    monkeypatch.setenv(ann.BUDGET_ENV, "3G")
    assert ann.default_memory_budget() == 3 * GIB
    monkeypatch.delenv(ann.BUDGET_ENV)
    assert ann.default_memory_budget() > 0
    with pytest.raises(ValueError):
        choose_index(-1, 512, GIB)


def test_training_sample_is_seeded() -> None:
    a = ann.sample_positions(10_000, 100, seed=3)
    assert a.tolist() == ann.sample_positions(10_000, 100, seed=3).tolist()
    assert len(set(a.tolist())) == 100 and (np.diff(a) > 0).all()
    assert ann.sample_positions(50, 100).tolist() == list(range(50))


# -- exact vectors -----------------------------------------------------------------------------


def test_exact_vectors_over_a_base_with_changes() -> None:
    rng = np.random.default_rng(1)
    base_ids = np.array([2, 5, 9, 14], dtype=np.int64)
    base = rng.standard_normal((4, 3)).astype(np.float32)
    store = ExactVectors(3, base_ids, base)
    added = rng.standard_normal((3, 3)).astype(np.float32)
    store.add(np.array([7, 1, 20]), added)
    assert len(store) == 7
    assert store.ids().tolist() == [1, 2, 5, 7, 9, 14, 20]
    np.testing.assert_array_equal(store.get(np.array([20, 5])), np.stack([added[2], base[1]]))
    assert store.remove(np.array([5, 7, 99])) == 2
    assert store.contains(np.array([5, 7, 1, 2])).tolist() == [False, False, True, True]
    store.add(np.array([5]), added[:1])  # back, with another vector
    np.testing.assert_array_equal(store.get(np.array([5])), added[:1])
    merged_ids = np.concatenate([ids for ids, _ in store.merged(chunk=2)])
    merged = np.concatenate([rows for _, rows in store.merged(chunk=2)])
    assert merged_ids.tolist() == store.ids().tolist() == [1, 2, 5, 9, 14, 20]
    np.testing.assert_array_equal(merged, store.get(merged_ids))
    with pytest.raises(KeyError, match="7"):
        store.get(np.array([7]))


# -- approximate against exact ------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["IVF64,PQ16x4fs", "IVF64,SQ8", "HNSW16"])
def test_approximate_index_recall_at_10_against_exact(factory: str) -> None:
    rng = np.random.default_rng(2)
    n, dim, k = 6000, 32, 10
    xb = clustered(rng, n + 200, dim, clusters=60)
    xb, xq = xb[:n], xb[n:]
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    choice = ann.choice_for_factory(factory, n)
    index = VectorIndex.build(
        dim, ids, xb, factory, train_size=choice.train_size, nprobe=8, ef_search=choice.ef_search
    )
    dist, found = index.search(xq, k)
    assert recall(found, exact_ids(xb, ids, xq, k)) >= 0.95
    # Distances are exact for whatever is returned, and stored vectors come back unchanged.
    rows = dict(zip(ids.tolist(), xb, strict=True))
    want = [
        [np.linalg.norm(q.astype(np.float64) - rows[int(i)]) for i in row]
        for q, row in zip(xq, found, strict=True)
    ]
    np.testing.assert_allclose(dist, want, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(index.reconstruct(ids[:50]), xb[:50])


def test_automatic_choice_at_a_small_forced_threshold(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The automatic kind end to end, scaled down: OPQ, inverted file, 4-bit codes, L2,
    calibrated, saved and served memory-mapped, changed."""
    monkeypatch.setattr(ann, "FLAT_MAX_VECTORS", 2_000)
    monkeypatch.setattr(ann, "MIN_NLIST", 16)
    monkeypatch.setattr(ann, "REDUCED_DIMS", 32)
    rng = np.random.default_rng(3)
    n, dim, k = 8_000, 64, 10
    xb = clustered(rng, n + 300, dim, clusters=80)
    xb, xq = xb[:n], xb[n:]
    ids = np.arange(n, dtype=np.int64) * 7
    choice = choose_index(n, dim, 8 * GIB)
    assert choice.factory == f"OPQ16_32,IVF{ann.nlist_for(n)},PQ16x4fs" and choice.train_size == n
    index = VectorIndex.build(
        dim,
        ids,
        xb,
        choice.factory,
        train_size=choice.train_size,
        nprobe=choice.nprobe,
        rerank=choice.rerank,
        target_recall=choice.target_recall,
    )
    assert "(L2; nprobe" in index.description() and "stored vectors" in index.description()
    dist, found = index.search(xq, k)
    assert recall(found, exact_ids(xb, ids, xq, k)) >= 0.95
    rows = dict(zip(ids.tolist(), xb, strict=True))
    want = [
        [np.linalg.norm(q.astype(np.float64) - rows[int(i)]) for i in r]
        for q, r in zip(xq, found, strict=True)
    ]
    np.testing.assert_allclose(dist, want, atol=1e-6, rtol=0)
    path = tmp_path / "auto.faiss"
    index.save(path)
    served = VectorIndex.load(path, mmap=True)
    assert served.description() == index.description()
    assert served.search_settings() == index.search_settings()
    np.testing.assert_array_equal(served.search(xq, k)[1], found)
    gone = found[:, 0]
    index.remove(gone)
    assert not np.isin(index.search(xq, k)[1], gone).any()


# -- re-ranking and calibration --------------------------------------------------------------


def test_locate_answers_alike_with_the_dense_table_and_the_binary_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(11)
    base_ids = np.sort(rng.choice(3_000, 1_000, replace=False)).astype(np.int64) + 100
    base = rng.standard_normal((1_000, 4)).astype(np.float32)
    asked = np.concatenate([base_ids[::3], [0, 99, 3_200, 10**12, -5], base_ids[1::7] + 1])
    answers = []
    for factor in (ann.TABLE_SPAN_FACTOR, 0):  # 0: every base is too sparse for a table
        monkeypatch.setattr(ann, "TABLE_SPAN_FACTOR", factor)
        monkeypatch.setattr(ann, "TABLE_MIN_SPAN", 0)
        store = ExactVectors(4, base_ids, base)
        store.remove(base_ids[:10])
        store.add(np.array([7_000, 1]), np.ones((2, 4), np.float32))
        answers.append(store.locate(np.concatenate([asked, [7_000, 1]])))
        assert (store._base_table() is None) == (factor == 0)
    np.testing.assert_array_equal(answers[0][0], answers[1][0])
    np.testing.assert_array_equal(answers[0][1], answers[1][1])
    where, index = answers[0]
    hits = where == 0
    np.testing.assert_array_equal(base_ids[index[hits]], np.concatenate([asked, [7_000, 1]])[hits])
    assert where[-2:].tolist() == [1, 1] and not hits[0]  # base_ids[0] was removed


def test_squared_distances_are_within_their_bound_and_inf_when_absent() -> None:
    rng = np.random.default_rng(12)
    dim = 96
    base = (rng.standard_normal((500, dim)) * rng.uniform(0.01, 10, (500, 1))).astype(np.float32)
    store = ExactVectors(dim, np.arange(500, dtype=np.int64), base)
    store.add(np.array([900]), base[:1] * 3)
    xq = (rng.standard_normal((40, dim))).astype(np.float32)
    xq[0] = base[7]  # distance 0 exactly
    cand = rng.integers(0, 500, (40, 25))
    cand[:, -1] = 900
    cand[:, -2] = 10_000  # absent
    cand[0, 0] = 7
    where, at = store.locate(cand.ravel())
    d2 = store.squared_distances(xq, where.reshape(cand.shape), at.reshape(cand.shape))
    rows = np.where(cand == 900, 0, np.minimum(cand, 499))
    exact = ((xq[:, None, :].astype(np.float64) - base[rows].astype(np.float64)) ** 2).sum(-1)
    exact[:, -1] = ((xq.astype(np.float64) - 3.0 * base[0].astype(np.float64)) ** 2).sum(-1)
    live = cand != 10_000
    assert np.isinf(d2[~live]).all() and d2[0, 0] == 0
    error = np.abs(d2[live] - exact[live])
    assert (error <= ann.squared_distance_error(dim) * exact[live] + 1e-30).all()


def test_pruned_lists_are_saved_served_and_refused_where_they_cannot_be(tmp_path: Path) -> None:
    import faiss

    rng = np.random.default_rng(17)
    n, dim = 4_000, 32
    xb = clustered(rng, n + 50, dim, clusters=40)
    xb, xq = xb[:n], xb[n:]
    ids = np.arange(n, dtype=np.int64) * 3
    pruning = ann.Pruning(1.5, 2)
    index = VectorIndex.build(
        dim, ids, xb, "IVF32,PQ32x4fs", nprobe=8, pruning=pruning, target_recall=None
    )
    settings = index.search_settings()
    assert settings == {"nlist": 32, "nprobe": 8, "rerank": 3, "prune_ratio": 1.5, "min_lists": 2}
    assert "lists within 1.5x the nearest's squared distance, at least 2" in index.description()
    index.save(tmp_path / "pruned.faiss")
    served = VectorIndex.load(tmp_path / "pruned.faiss", mmap=True)
    assert served.search_settings() == settings
    for a, b in zip(served.search(xq, 10), index.search(xq, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    # Pruned, it finds what the index's own pruned candidates hold, re-ranked exactly.
    cand = ann.search_candidates(index._ann, xq, 30, pruning)
    d2 = ((xq[:, None, :].astype(np.float64) - xb[cand // 3].astype(np.float64)) ** 2).sum(-1)
    best = np.take_along_axis(cand, np.argsort(d2, axis=1, kind="stable")[:, :10], axis=1)
    assert recall(served.search(xq, 10)[1], best) == 1.0
    with pytest.raises(ValueError, match="leave pruning out"):
        VectorIndex(dim, "HNSW8", pruning=pruning)
    with pytest.raises(ValueError, match="leave pruning out"):
        VectorIndex(dim, "IVF32,PQ32x4fs,Refine(Flat)", pruning=pruning)
    assert faiss.METRIC_L2 == served._ann.metric_type


def test_approximate_ties_are_ordered_by_id_with_exact_distances() -> None:
    rng = np.random.default_rng(13)
    dim = 32
    xb = clustered(rng, 3_000, dim, clusters=30)
    xb[100:106] = xb[50]  # the same vector under seven ids
    ids = rng.permutation(10**6)[:3_000].astype(np.int64)
    index = VectorIndex.build(dim, ids, xb, "IVF16,PQ32x4fs", nprobe=16, target_recall=None)
    dist, found = index.search(xb[50:51], 9)
    twins = np.sort(ids[[50, 100, 101, 102, 103, 104, 105]])
    assert found[0, :7].tolist() == twins.tolist()
    assert dist[0, :7].tolist() == [0.0] * 7 and dist[0, 7] > 0


def test_calibration_searches_more_until_the_target(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(14)
    n, dim, k = 6_000, 32, 10
    xb = clustered(rng, n + 200, dim, clusters=60)
    xb, xq = xb[:n], xb[n:]
    ids = np.arange(n, dtype=np.int64)
    as_given = VectorIndex.build(dim, ids, xb, "IVF64,PQ32x4fs", nprobe=1, target_recall=None)
    assert as_given.search_settings()["nprobe"] == 1 and "recall" not in as_given.description()
    low = recall(as_given.search(xq, k)[1], exact_ids(xb, ids, xq, k))
    calibrated = VectorIndex.build(dim, ids, xb, "IVF64,PQ32x4fs", nprobe=1, target_recall=0.97)
    settings = calibrated.search_settings()
    assert settings["nprobe"] > 1
    assert "recall@10 0.9" in calibrated.description()
    high = recall(calibrated.search(xq, k)[1], exact_ids(xb, ids, xq, k))
    assert low < 0.95 <= high
    # A target no setting reaches: the most thorough rung is kept, and the log says so.
    with caplog.at_level("WARNING", logger="simsearch.index"):
        stubborn = VectorIndex.build(dim, ids, xb, "IVF64,PQ32x4fs", nprobe=1, target_recall=1.01)
    ladder = ann.calibration_ladder(1, None, ann.RERANK, 64)
    most = {"nlist": 64, "nprobe": max(r.nprobe for r in ladder), "rerank": 4 * ann.RERANK}
    assert stubborn.search_settings() == most
    assert "index-factory Flat" in caplog.text


def test_an_index_file_made_with_either_metric_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import faiss

    rng = np.random.default_rng(15)
    xb = clustered(rng, 3_000, 32, clusters=30)
    ids = np.arange(3_000, dtype=np.int64)
    # As files were made before every index was Euclidean: a PCA factory with inner products.
    new_ann = ann.new_ann
    monkeypatch.setattr(ann, "new_ann", lambda d, f: new_ann(d, f, faiss.METRIC_INNER_PRODUCT))
    legacy = VectorIndex.build(32, ids, xb, "PCA16,IVF16,PQ16x4fs", target_recall=None)
    legacy.save(tmp_path / "legacy.faiss")
    monkeypatch.undo()
    loaded = VectorIndex.load(tmp_path / "legacy.faiss", mmap=True)
    assert "(inner product;" in loaded.description()
    np.testing.assert_array_equal(loaded.search(xb[:20], 5)[1], legacy.search(xb[:20], 5)[1])
