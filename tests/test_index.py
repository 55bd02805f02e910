"""VectorIndex against exact brute-force search on seeded unit vectors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

import simsearch.index as index_module
from simsearch import _blas
from simsearch.errors import SimsearchError, StoreError
from simsearch.index import VectorIndex

DIM = 16


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    """Unit vectors scattered around the given centres, like embeddings of similar images."""
    x = centres[rng.integers(0, len(centres), n)] + 0.15 * rng.standard_normal((n, len(centres[0])))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(
    vecs: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth: float64 Euclidean distances, sorted by (float32 distance, id), padded."""
    dist = np.sqrt(((queries[:, None, :].astype(np.float64) - vecs[None, :, :]) ** 2).sum(-1))
    dist = dist.astype(np.float32)
    dist_out = np.full((len(queries), k), np.inf, dtype=np.float32)
    found_out = np.full((len(queries), k), -1, dtype=np.int64)
    for row in range(len(queries)):
        order = np.lexsort((ids, dist[row]))[:k]
        dist_out[row, : len(order)] = dist[row, order]
        found_out[row, : len(order)] = ids[order]
    return dist_out, found_out


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    ids = np.sort(rng.choice(100_000, size=400, replace=False)).astype(np.int64)
    rng.shuffle(ids)
    return ids, unit(rng, 400)


def test_flat_search_matches_brute_force(data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vecs = data
    queries = unit(np.random.default_rng(7), 25)
    index = VectorIndex.build(DIM, ids, vecs)
    dist, found = index.search(queries, 10)
    dist_true, found_true = exact(vecs, ids, queries, 10)
    assert dist.dtype == np.float32 and found.dtype == np.int64
    assert dist.shape == found.shape == (25, 10)
    np.testing.assert_array_equal(found, found_true)
    np.testing.assert_allclose(dist, dist_true, atol=1e-6, rtol=0)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_search_in_small_blocks_matches_brute_force(
    data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, vecs = data
    monkeypatch.setattr(index_module, "_RERANK_BLOCK_FLOATS", 1)  # one query per block
    queries = unit(np.random.default_rng(8), 7)
    dist, found = VectorIndex.build(DIM, ids, vecs).search(queries, 5)
    dist_true, found_true = exact(vecs, ids, queries, 5)
    np.testing.assert_array_equal(found, found_true)
    np.testing.assert_allclose(dist, dist_true, atol=1e-6, rtol=0)


def test_self_query_is_first_at_distance_exactly_zero(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    ids, vecs = data
    dist, found = VectorIndex.build(DIM, ids, vecs).search(vecs, 3)
    np.testing.assert_array_equal(found[:, 0], ids)
    assert (dist[:, 0] == 0.0).all()
    assert (dist[:, 1] > 0.0).all()


def test_equal_distances_are_ordered_by_id() -> None:
    rng = np.random.default_rng(3)
    vecs = unit(rng, 20)
    same = vecs[0]
    vecs[[5, 11]] = same  # ids 50, 3 and 20 below share one vector
    ids = np.arange(20, dtype=np.int64) * 10 + 100
    ids[[0, 5, 11]] = [50, 3, 20]
    index = VectorIndex.build(DIM, ids, vecs)

    dist, found = index.search(same[None, :], 4)
    assert found[0, :3].tolist() == [3, 20, 50]
    assert dist[0, :3].tolist() == [0.0, 0.0, 0.0]
    # A tie cut by k keeps the smallest ids.
    assert index.search(same[None, :], 2)[1][0].tolist() == [3, 20]
    # Ties away from zero distance too.
    q = unit(rng, 1)
    dist, found = index.search(q, 20)
    tied = np.flatnonzero(np.isin(found[0], [3, 20, 50]))
    assert found[0, tied].tolist() == [3, 20, 50]
    assert len(set(dist[0, tied].tolist())) == 1


def test_padding_when_k_exceeds_size() -> None:
    vecs = unit(np.random.default_rng(4), 3)
    index = VectorIndex.build(DIM, np.array([9, 4, 6]), vecs)
    dist, found = index.search(vecs[:2], 5)
    dist_true, found_true = exact(vecs, np.array([9, 4, 6]), vecs[:2], 5)
    np.testing.assert_array_equal(found, found_true)
    np.testing.assert_allclose(dist, dist_true, atol=1e-6, rtol=0)
    assert found[:, 0].tolist() == [9, 4]
    assert (found[:, 3:] == -1).all() and np.isinf(dist[:, 3:]).all()
    assert np.isfinite(dist[:, :3]).all()


def test_empty_index_and_empty_queries() -> None:
    index = VectorIndex(DIM)
    assert len(index) == 0 and index.ids().tolist() == []
    dist, found = index.search(unit(np.random.default_rng(5), 2), 3)
    assert (found == -1).all() and np.isinf(dist).all() and dist.shape == (2, 3)
    dist, found = VectorIndex.build(DIM, np.array([1]), unit(np.random.default_rng(5), 1)).search(
        np.empty((0, DIM), np.float32), 3
    )
    assert dist.shape == found.shape == (0, 3)


def test_search_rejects_bad_arguments(data: tuple[np.ndarray, np.ndarray]) -> None:
    index = VectorIndex.build(DIM, *data)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(data[1][:1], 0)
    with pytest.raises(ValueError, match=r"shape \(n, 16\).*reshape"):
        index.search(data[1][0], 3)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, DIM), np.nan), 3)


def test_add_rejects_ids_already_present_or_repeated() -> None:
    rng = np.random.default_rng(6)
    index = VectorIndex.build(DIM, np.array([1, 5, 9]), unit(rng, 3))
    with pytest.raises(ValueError, match=r"already in the index: \[5, 9\]"):
        index.add(np.array([5, 7, 9]), unit(rng, 3))
    with pytest.raises(ValueError, match=r"repeated within one call: \[8\]"):
        index.add(np.array([8, 2, 8]), unit(rng, 3))
    assert index.ids().tolist() == [1, 5, 9]  # nothing was added by the failed calls


def test_add_validates_and_converts_input() -> None:
    rng = np.random.default_rng(7)
    index = VectorIndex(DIM)
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        index.add(np.array([1]), unit(rng, 1, DIM + 1))
    with pytest.raises(ValueError, match="2 ids but 3 vectors"):
        index.add(np.array([1, 2]), unit(rng, 3))
    bad = unit(rng, 2)
    bad[1, 4] = np.inf
    with pytest.raises(ValueError, match=r"NaN or infinite.*rows \[1\]"):
        index.add(np.array([1, 2]), bad)
    with pytest.raises(ValueError, match="integers"):
        index.add(np.array([1.0, 2.5]), unit(rng, 2))
    with pytest.raises(ValueError, match="non-negative"):
        index.add(np.array([3, -1]), unit(rng, 2))
    assert len(index) == 0

    vecs = unit(rng, 2).astype(np.float64)  # float64 and int32 are converted
    index.add(np.array([12, 11], dtype=np.int32), vecs)
    np.testing.assert_array_equal(index.reconstruct([11, 12]), vecs[::-1].astype(np.float32))
    index.add(np.empty(0, np.int64), np.empty((0, DIM)))  # an empty batch is a no-op
    assert len(index) == 2


def test_add_warns_about_vectors_that_are_not_unit_length(
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = VectorIndex(DIM)
    with caplog.at_level(logging.WARNING, logger="simsearch.index"):
        index.add(np.array([4]), 3 * unit(np.random.default_rng(8), 1))
    assert "not unit length (e.g. id 4 has norm 3" in caplog.text
    assert len(index) == 1


@pytest.mark.parametrize("factory", ["Flat", "SQ8", "HNSW32", "IVF4,Flat"])
def test_remove_then_search_never_returns_removed_ids(factory: str) -> None:
    rng = np.random.default_rng(9)
    ids = np.arange(300, dtype=np.int64) * 2 + 1
    vecs = unit(rng, 300)
    index = VectorIndex.build(DIM, ids, vecs, factory)
    gone = ids[::3]
    assert index.remove([*gone.tolist(), 10_000, 2]) == len(gone)  # 10000 and 2 are unknown
    assert index.remove(gone) == 0
    kept = ids[~np.isin(ids, gone)]
    assert len(index) == len(kept)
    np.testing.assert_array_equal(index.ids(), np.sort(kept))

    dist, found = index.search(vecs, 20)
    assert not np.isin(found, gone).any()
    # Vectors come back exactly, whatever the codes (approximate indexes keep exact copies).
    np.testing.assert_array_equal(index.reconstruct(kept), vecs[~np.isin(ids, gone)])
    with pytest.raises(KeyError, match=str(gone[0])):
        index.reconstruct(gone[:1])
    # Removed ids can be added again.
    index.add(gone[:2], vecs[:2])
    assert index.search(vecs[:1], 1)[1][0, 0] == gone[0]


def test_remove_everything_and_ids_after_add() -> None:
    rng = np.random.default_rng(10)
    index = VectorIndex(DIM, "HNSW32")
    index.add(np.array([30, 10]), unit(rng, 2))
    index.add(np.array([20]), unit(rng, 1))
    assert index.ids().tolist() == [10, 20, 30]
    assert index.ids().dtype == np.int64
    assert index.remove(np.array([10, 20, 30])) == 3
    assert len(index) == 0 and index.ids().tolist() == []
    assert (index.search(unit(rng, 1), 2)[1] == -1).all()


def test_reconstruct_returns_stored_vectors_in_requested_order(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    ids, vecs = data
    index = VectorIndex.build(DIM, ids, vecs)
    out = index.reconstruct(ids[[5, 0, 5]])
    assert out.dtype == np.float32 and out.shape == (3, DIM)
    np.testing.assert_array_equal(out, vecs[[5, 0, 5]])
    assert index.reconstruct([]).shape == (0, DIM)
    missing = max(ids) + 1
    with pytest.raises(KeyError, match=f"ids not in the index: \\[{missing}\\]"):
        index.reconstruct([ids[0], missing])


def test_description_and_dim() -> None:
    assert VectorIndex(DIM).description() == "IDMap2,Flat (inner product)"
    assert VectorIndex(DIM, " flat ").factory == "Flat"
    hnsw = VectorIndex(DIM, "HNSW32")
    assert hnsw.description() == "HNSW32 (L2; efSearch 64, re-ranks 3 x k exactly, at least k + 16)"
    assert hnsw.approximate and not VectorIndex(DIM).approximate
    ivf = VectorIndex(DIM, "IVF64,PQ8x4fs", nprobe=5, rerank=7)
    assert (
        ivf.description() == "IVF64,PQ8x4fs (L2; nprobe 5, re-ranks 7 x k exactly, at least k + 16)"
    )
    assert ivf.search_settings() == {"nlist": 64, "nprobe": 5, "rerank": 7}
    assert VectorIndex(8).dim == 8 and VectorIndex(8, "HNSW8").dim == 8


def test_bad_factories_and_training_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid FAISS factory string 'Bogus7'"):
        VectorIndex(DIM, "Bogus7")
    with pytest.raises(ValueError, match="give only the inner index"):
        VectorIndex(DIM, "IDMap2,Flat")
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        VectorIndex(0)
    rng = np.random.default_rng(11)
    with pytest.raises(ValueError, match="could not train index 'IVF64,Flat' on 10 vectors"):
        VectorIndex.build(DIM, np.arange(10), unit(rng, 10), "IVF64,Flat")
    with pytest.raises(ValueError, match="needs training"):
        VectorIndex(DIM, "IVF4,Flat").add(np.array([1]), unit(rng, 1))


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF4,Flat", "IVF8,PQ4x4fs"])
def test_save_load_roundtrip(tmp_path: Path, factory: str) -> None:
    rng = np.random.default_rng(12)
    ids = rng.choice(10**9, size=200, replace=False).astype(np.int64)
    vecs, queries = unit(rng, 200), unit(rng, 10)
    index = VectorIndex.build(DIM, ids, vecs, factory)
    path = tmp_path / "vectors.faiss"
    index.save(path)
    loaded = VectorIndex.load(str(path))
    assert loaded.description() == index.description()
    assert loaded.dim == DIM and len(loaded) == 200
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    for got, want in zip(loaded.search(queries, 10), index.search(queries, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    loaded.add(np.array([10**9 + 1]), unit(rng, 1))  # a normal load can be changed
    assert len(loaded) == 201
    assert sorted(os.listdir(tmp_path)) == ["vectors.faiss"]


def test_save_replaces_an_existing_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    path = tmp_path / "vectors.faiss"
    VectorIndex.build(DIM, np.array([1, 2]), unit(rng, 2)).save(path)
    VectorIndex.build(DIM, np.array([3]), unit(rng, 1)).save(path)
    assert VectorIndex.load(path).ids().tolist() == [3]
    assert sorted(os.listdir(tmp_path)) == ["vectors.faiss"]


def test_failed_save_keeps_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(14)
    path = tmp_path / "vectors.faiss"
    VectorIndex.build(DIM, np.array([1, 2]), unit(rng, 2)).save(path)
    before = path.read_bytes()
    real_write = faiss.write_index

    def write_half_then_fail(index: faiss.Index, filename: str) -> None:
        real_write(index, filename)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise RuntimeError("Error in write_index at io.cpp:1: No space left on device")

    monkeypatch.setattr(faiss, "write_index", write_half_then_fail)
    bigger = VectorIndex.build(DIM, np.arange(50), unit(rng, 50))
    with pytest.raises(StoreError, match=r"could not write index file .*No space left on device"):
        bigger.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["vectors.faiss"]
    assert VectorIndex.load(path).ids().tolist() == [1, 2]


def test_save_into_missing_directory_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="check free disk space and write permission"):
        VectorIndex(DIM).save(tmp_path / "absent" / "vectors.faiss")


@pytest.mark.parametrize("mmap", [False, True])
def test_load_of_missing_truncated_or_foreign_file_raises_store_error(
    tmp_path: Path, mmap: bool
) -> None:
    rng = np.random.default_rng(15)
    good = tmp_path / "good.faiss"
    VectorIndex.build(DIM, np.arange(100), unit(rng, 100)).save(good)
    data = good.read_bytes()

    with pytest.raises(StoreError, match=r"absent\.faiss does not exist; it is rebuilt"):
        VectorIndex.load(tmp_path / "absent.faiss", mmap=mmap)

    plain = tmp_path / "plain.faiss"  # a FAISS file, but not written by save()
    faiss.write_index(faiss.IndexFlatIP(DIM), str(plain))
    flat = tmp_path / "flat.faiss"  # written like save() does, but not an id map
    index_module._write_atomic(
        flat, lambda tmp: index_module._write_flat(faiss.IndexFlatIP(DIM), tmp)
    )
    cases = {
        plain: "not an index written by simsearch",
        flat: "holds IndexFlatIP, not an IndexIDMap2",
    }
    for name, content in {
        "empty": b"",
        "header": data[:30],
        "half": data[: len(data) // 2],
        "no_trailer": data[:-16],
        "one_byte_short": data[:-1],
        "garbage": bytes(rng.integers(0, 256, 5000, dtype=np.uint8)),
        "text": b"not an index\n" * 100,
    }.items():
        path = tmp_path / f"{name}.faiss"
        path.write_bytes(content)
        cases[path] = ""
    for path, detail in cases.items():
        with pytest.raises(StoreError) as info:
            VectorIndex.load(path, mmap=mmap)
        message = str(info.value)
        assert f"index file {path} is corrupt or unreadable" in message
        assert "it is rebuilt from the stored vectors on the next run" in message
        assert detail in message


def test_mmap_load_searches_like_memory_and_is_read_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(16)
    ids, vecs, queries = np.arange(500) * 7, unit(rng, 500), unit(rng, 12)
    index = VectorIndex.build(DIM, ids, vecs)
    path = tmp_path / "vectors.faiss"
    index.save(path)
    mapped = VectorIndex.load(path, mmap=True)
    for got, want in zip(mapped.search(queries, 10), index.search(queries, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mapped.reconstruct(ids[:3]), vecs[:3])
    with pytest.raises(SimsearchError, match="read-only.*load it with mmap=False"):
        mapped.add(np.array([1]), unit(rng, 1))
    with pytest.raises(SimsearchError, match="read-only"):
        mapped.remove([0])
    assert len(mapped) == 500

    # Replacing the file under a mapped index leaves the mapping valid.
    VectorIndex.build(DIM, np.array([1]), unit(rng, 1)).save(path)
    np.testing.assert_array_equal(mapped.search(queries, 10)[1], index.search(queries, 10)[1])
    mapped.save(tmp_path / "copy.faiss")
    np.testing.assert_array_equal(VectorIndex.load(tmp_path / "copy.faiss").ids(), ids)


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,Flat"])
def test_approximate_index_recall_against_exact(factory: str) -> None:
    rng = np.random.default_rng(17)
    n, dim, k = 3000, 32, 10
    centres = unit(rng, 20, dim)
    vecs, queries = clustered(rng, n, centres), clustered(rng, 100, centres)
    ids = rng.permutation(n).astype(np.int64) + 1000
    dist, found = VectorIndex.build(dim, ids, vecs, factory).search(queries, k)
    _, found_true = exact(vecs, ids, queries, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, found_true, strict=True)])
    assert recall >= 0.9, f"{factory} recall@{k} = {recall:.3f}"
    # Distances of whatever was returned are exact, not FAISS's float32 approximations.
    rows = {int(i): vecs[j] for j, i in enumerate(ids)}
    for q, dist_row, found_row in zip(queries, dist, found, strict=True):
        want = [np.linalg.norm(q.astype(np.float64) - rows[int(i)]) for i in found_row]
        np.testing.assert_allclose(dist_row, want, atol=1e-6, rtol=0)


# -- exact search: FAISS's scan checked, and the bf16 scan ----------------------------------------


def test_flat_search_fetches_more_when_ties_exceed_what_faiss_returned() -> None:
    """60 copies of one vector: the k smallest ids among them, wherever FAISS's heap put them."""
    rng = np.random.default_rng(20)
    vecs = unit(rng, 500)
    copies = rng.choice(500, size=60, replace=False)
    vecs[copies] = vecs[copies[0]]
    ids = rng.permutation(5000)[:500].astype(np.int64)
    index = VectorIndex.build(DIM, ids, vecs)
    dist, found = index.search(vecs[copies[:1]], 5)
    assert found[0].tolist() == sorted(ids[copies].tolist())[:5]
    assert (dist[0] == 0.0).all()


@pytest.fixture
def bf16_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every flat search to the bf16 scan (it normally starts at 20,000 vectors)."""
    import simsearch.exact as exact_module

    monkeypatch.setattr(index_module, "EXACT_MIN_VECTORS", 1)
    monkeypatch.setattr(index_module, "EXACT_MIN_QUERIES", 1)
    monkeypatch.setattr(exact_module, "_choice", ["bf16"])


def test_bf16_exact_search_through_the_index(bf16_always: None, tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    centres = unit(rng, 8)
    vecs = clustered(rng, 2000, centres)
    ids = rng.permutation(10**6)[:2000].astype(np.int64)
    queries = np.concatenate([clustered(rng, 30, centres), vecs[:3]])
    index = VectorIndex.build(DIM, ids, vecs)
    for k in (1, 10, 64):
        dist, found = index.search(queries, k)
        dist_true, found_true = exact(vecs, ids, queries, k)
        np.testing.assert_array_equal(found, found_true)
        np.testing.assert_array_equal(dist, dist_true)
    assert index._exact_cache is not None
    # A change drops the bf16 copy: the next search sees the new vectors.
    index.add(np.array([10**6 + 1]), queries[:1])
    assert index._exact_cache is None
    assert index.search(queries[:1], 1)[1][0, 0] == 10**6 + 1
    index.remove([10**6 + 1])
    np.testing.assert_array_equal(index.search(queries, 10)[1], exact(vecs, ids, queries, 10)[1])
    # Memory-mapped (read-only) indexes are searched the same way.
    path = tmp_path / "vectors.faiss"
    index.save(path)
    mapped = VectorIndex.load(path, mmap=True)
    np.testing.assert_array_equal(mapped.search(queries, 10)[1], exact(vecs, ids, queries, 10)[1])


def test_bf16_copy_is_made_only_when_it_pays_for_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    import simsearch.exact as exact_module

    monkeypatch.setattr(index_module, "EXACT_MIN_VECTORS", 100)
    monkeypatch.setattr(exact_module, "_choice", ["bf16"])
    rng = np.random.default_rng(22)
    vecs = unit(rng, 300)
    index = VectorIndex.build(DIM, np.arange(300), vecs)
    index.search(vecs[:1], 5)  # one query: FAISS
    assert index._exact_cache is None
    index.search(vecs[:64], 5)  # enough queries since the last change: the bf16 copy
    assert index._exact_cache is not None
    index.search(vecs[:1], 5000)  # a k too large for the bf16 scan is still answered
    small = VectorIndex.build(DIM, np.arange(50), vecs[:50])
    small.search(vecs[:64], 5)  # too few vectors to bother
    assert small._exact_cache is None


# -- approximate indexes: lazy removal, files ------------------------------------------------------


def test_approximate_removal_is_lazy_then_compacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "_STALE_MIN", 10)
    rng = np.random.default_rng(23)
    ids = np.arange(400, dtype=np.int64)
    vecs = unit(rng, 400)
    index = VectorIndex.build(DIM, ids, vecs, "IVF4,SQ8", nprobe=4)
    assert index.remove(ids[:50]) == 50  # 50 stale of 400: under a fifth, kept
    assert index._ann.ntotal == 400 and len(index) == 350
    assert not np.isin(index.search(vecs[:60], 10)[1], ids[:50]).any()
    replaced = unit(rng, 1)
    index.remove([60])
    index.add(np.array([60]), replaced)  # a new vector under an old id: never the old one
    dist, found = index.search(replaced, 1)
    assert found[0, 0] == 60 and dist[0, 0] == 0.0
    assert index.remove(ids[100:200]) == 100  # now over a fifth: compacted
    assert index._ann.ntotal == len(index) == 250
    np.testing.assert_array_equal(index.reconstruct([60]), replaced)


def test_approximate_file_roundtrip_is_memory_mapped(tmp_path: Path) -> None:
    rng = np.random.default_rng(24)
    ids = rng.permutation(10**6)[:3000].astype(np.int64)
    vecs, queries = unit(rng, 3000), unit(rng, 20)
    index = VectorIndex.build(DIM, ids, vecs, "IVF16,PQ4x4fs", nprobe=16, rerank=40)
    index.remove(ids[:10])
    index.add(np.array([10**6 + 3]), queries[:1])
    path = tmp_path / "ann.faiss"
    index.save(path)
    for mmap in (False, True):
        loaded = VectorIndex.load(path, mmap=mmap)
        assert loaded.description() == index.description() and loaded.built_for == 3000
        assert loaded._vectors.memory_mapped
        np.testing.assert_array_equal(loaded.ids(), index.ids())
        for got, want in zip(loaded.search(queries, 10), index.search(queries, 10), strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(loaded.reconstruct(ids[10:20]), vecs[10:20])
    with pytest.raises(SimsearchError, match="read-only"):
        loaded.remove(ids[20:21])
    writable = VectorIndex.load(path)
    writable.remove(ids[20:30])  # changes stay in memory over the mapped file
    writable.add(ids[:2], vecs[:2])
    writable.save(path)  # replacing the file it maps
    again = VectorIndex.load(path)
    assert len(again) == 3000 - 10 + 1 - 10 + 2
    np.testing.assert_array_equal(again.reconstruct(ids[:2]), vecs[:2])
    assert sorted(os.listdir(tmp_path)) == ["ann.faiss"]


def test_damaged_approximate_file_raises_store_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(25)
    path = tmp_path / "ann.faiss"
    VectorIndex.build(DIM, np.arange(500), unit(rng, 500), "IVF4,SQ8").save(path)
    data = path.read_bytes()
    for cut in (1, 33, len(data) // 3, len(data) - 3000, len(data) - 40):
        path.write_bytes(data[:cut])
        with pytest.raises(StoreError, match="corrupt or unreadable"):
            VectorIndex.load(path)
    path.write_bytes(data[:-40] + b"x" * 8 + data[-32:])  # a damaged header
    with pytest.raises(StoreError, match="corrupt or unreadable"):
        VectorIndex.load(path)
    trailer = index_module._ANN_TRAILER
    _, _, meta_offset, meta_len = trailer.unpack(data[-trailer.size :])
    at = json.loads(data[meta_offset : meta_offset + meta_len])["ids_offset"]
    swapped = data[:at] + data[at + 8 : at + 16] + data[at : at + 8] + data[at + 16 :]
    path.write_bytes(swapped)  # ids out of order
    with pytest.raises(StoreError, match="ids are not sorted"):
        VectorIndex.load(path)


# -- OpenBLAS core type ----------------------------------------------------------------------------

SKYLAKEX = "fpu avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16"


def test_openblas_core_type_for_avx512_cpus() -> None:
    assert _blas.openblas_coretype(SKYLAKEX.split(), {}) == "SkylakeX"
    assert _blas.openblas_coretype(SKYLAKEX.replace("avx512vl", "").split(), {}) is None
    assert _blas.openblas_coretype(["avx2", "fma"], {}) is None
    # The user's setting wins, even an empty one.
    assert _blas.openblas_coretype(SKYLAKEX.split(), {"OPENBLAS_CORETYPE": "Haswell"}) is None
    assert _blas.openblas_coretype(SKYLAKEX.split(), {"OPENBLAS_CORETYPE": ""}) is None


def test_openmp_threads_spin_less_unless_the_user_chose() -> None:
    assert _blas.openmp_spin({}) == _blas.SPIN_COUNT
    assert _blas.openmp_spin({"GOMP_SPINCOUNT": "INFINITY"}) is None
    assert _blas.openmp_spin({"OMP_WAIT_POLICY": "active"}) is None
    assert os.environ.get("GOMP_SPINCOUNT")  # set when simsearch was imported, or by the user


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    cpuinfo = f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {SKYLAKEX}\n\n"
    assert _blas.cpu_flags(cpuinfo) >= {"avx512f", "avx512vl"}
    assert _blas.cpu_flags("Features\t: fp asimd sve\n") == {"fp", "asimd", "sve"}
    assert _blas.cpu_flags("nothing here") == frozenset()
    assert "OPENBLAS_CORETYPE" in _blas.describe()
