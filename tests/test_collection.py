"""The store and its FAISS index stay consistent through crashes, corruption and readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from consistency import assert_consistent

from simsearch import ann
from simsearch.collection import Changes, Collection, ImageRecord, index_file_name
from simsearch.errors import InputError, ModelMismatchError
from simsearch.index import VectorIndex

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def record(i: int, **kw) -> ImageRecord:
    return ImageRecord(
        path=f"/photos/{i}.jpg",
        sha1=f"{i:040x}",
        size=100 + i,
        mtime_ns=i,
        width=10,
        height=10,
        vector=unit(i),
        **kw,
    )


def new_store(store_dir: Path, n: int = 10) -> None:
    with Collection.open(store_dir, write=True) as c:
        c.set_model("m-1", "spec", 8)
        c.apply(Changes(records=[record(i) for i in range(n)]))
        c.save_index()


def test_saved_index_is_named_after_its_generation(store_dir):
    new_store(store_dir)
    with Collection.open(store_dir, write=False) as c:
        generation = c.generation()
        assert [p.name for _, p in c.index_files()] == [index_file_name(generation)]
    assert len(assert_consistent(store_dir)) == 10


def test_changes_committed_without_saving_the_index_are_caught_up(store_dir):
    """What a kill after a committed batch leaves: a stale index file, fixed without a rebuild."""
    new_store(store_dir)
    with Collection.open(store_dir, write=True) as c:
        ids = c.index().ids()
        c.apply(Changes(records=[record(i) for i in range(10, 14)], removals=[int(ids[0])]))
        moved = record(1)
        moved.id, moved.vector = int(ids[1]), unit(777)
        c.apply(Changes(records=[moved]))
        # no save_index(): the process "dies" here
    with Collection.open(store_dir, write=False) as reader:
        files = reader.index_files()
        assert files[0][0] < reader.generation()  # only the stale file exists
        index = reader.index()
        assert len(index) == 13
        np.testing.assert_array_equal(index.reconstruct([int(ids[1])])[0], unit(777))
    assert_consistent(store_dir)
    with Collection.open(store_dir, write=True) as writer:
        writer.index()  # a writer saves the repaired index and prunes tombstones
        assert [g for g, _ in writer.index_files()] == [writer.generation()]


@pytest.mark.parametrize("damage", ["garbage", "truncate", "delete"])
def test_damaged_or_missing_index_file_is_rebuilt_from_stored_vectors(store_dir, damage):
    new_store(store_dir)
    with Collection.open(store_dir, write=False) as c:
        ((_, path),) = c.index_files()
    if damage == "garbage":
        path.write_bytes(b"not a faiss index at all")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.unlink()
    assert len(assert_consistent(store_dir)) == 10


def test_saving_an_unchanged_store_does_not_load_its_index(store_dir, monkeypatch):
    """An `index` run over an unchanged folder must not read a (possibly huge) index file."""
    new_store(store_dir)

    def no_load(*args, **kwargs):
        raise AssertionError("the index file was loaded")

    monkeypatch.setattr(VectorIndex, "load", classmethod(no_load))
    with Collection.open(store_dir, write=True) as c:
        before = c.index_files()
        c.save_index()
        assert c.index_files() == before


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_saving_an_unchanged_store_repairs_a_damaged_index_file(store_dir, damage):
    new_store(store_dir)
    with Collection.open(store_dir, write=False) as c:
        ((_, path),) = c.index_files()
    data = path.read_bytes()
    path.write_bytes(b"not a faiss index at all" if damage == "garbage" else data[:100])
    with Collection.open(store_dir, write=True) as c:
        c.save_index()
    assert path.read_bytes() == data  # rebuilt from the stored vectors, byte for byte
    assert len(assert_consistent(store_dir)) == 10


def test_index_file_from_a_later_generation_is_never_used(store_dir):
    new_store(store_dir)
    with Collection.open(store_dir, write=False) as c:
        ((generation, path),) = c.index_files()
    # A file claiming a generation the database has not reached (e.g. restored backup).
    path.rename(path.with_name(index_file_name(generation + 5)))
    with Collection.open(store_dir, write=True) as c:
        c.apply(Changes(removals=[1]))
    assert len(assert_consistent(store_dir)) == 9


def test_a_reader_opened_before_a_writer_commits_keeps_its_snapshot(store_dir):
    new_store(store_dir)
    with Collection.open(store_dir, write=False) as reader:
        before = reader.index()
        with Collection.open(store_dir, write=True) as writer:
            writer.apply(Changes(records=[record(i) for i in range(10, 20)]))
            writer.save_index()
        assert len(before) == 10
    with Collection.open(store_dir, write=False) as reader:
        assert len(reader.index()) == 20


def test_leftover_temporary_files_are_cleaned(store_dir):
    new_store(store_dir)
    leftover = store_dir / ".index-99.faiss.123.abcd.tmp"
    leftover.write_bytes(b"half a file")
    with Collection.open(store_dir, write=True) as c:
        c.apply(Changes(removals=[2]))
        c.save_index()
    assert not leftover.exists()


def test_set_model_refuses_to_mix_and_replace_drops_vectors(store_dir):
    new_store(store_dir)
    with Collection.open(store_dir, write=True) as c:
        with pytest.raises(ModelMismatchError):
            c.set_model("m-2", "other", 8)
        c.set_model("m-2", "other", 4, replace=True)
        assert c.counts() == {"indexed": 0, "failed": 0, "awaiting": 10}
        assert len(c.index()) == 0


# -- the automatic approximate index ---------------------------------------------------------------


@pytest.fixture
def small_threshold(monkeypatch):
    """Approximate indexes from 100 vectors on (normally 200,000), trainable from a few hundred."""
    monkeypatch.setattr(ann, "FLAT_MAX_VECTORS", 100)
    monkeypatch.setattr(ann, "MIN_NLIST", 4)


def test_crossing_the_threshold_switches_to_an_approximate_index(store_dir, small_threshold):
    new_store(store_dir, n=60)
    with Collection.open(store_dir, write=False) as c:
        assert not c.index().approximate
    with Collection.open(store_dir, write=True) as c:
        c.apply(Changes(records=[record(i) for i in range(60, 300)]))
        assert not c.index().approximate  # the switch happens when the index is saved
        c.save_index()
        assert c.index().factory == "IVF4,PQ8x4fs" and c.index().built_for == 300
        ((generation, path),) = c.index_files()
        assert generation == c.generation()
    with Collection.open(store_dir, write=False) as c:
        index = c.index()
        assert index.approximate and index.search_settings()["nprobe"] == 4  # all 4 lists
        found = index.search(np.stack([unit(i) for i in range(5)]), 1)[1][:, 0]
        assert found.tolist() == index.ids()[:5].tolist()  # each record finds itself
    assert len(assert_consistent(store_dir)) == 300


def test_an_automatic_index_of_an_older_method_is_rebuilt_when_the_store_changes(
    store_dir, small_threshold, monkeypatch
):
    new_store(store_dir, n=300)
    with Collection.open(store_dir, write=True) as c:
        c.save_index()
        assert c.index().approximate and c.index().method == ann.SEARCH_METHOD
    monkeypatch.setattr(ann, "SEARCH_METHOD", ann.SEARCH_METHOD + 1)
    with Collection.open(store_dir, write=False) as reader:  # an older file serves meanwhile
        assert reader.index().method == ann.SEARCH_METHOD - 1 and len(reader.index()) == 300
    with Collection.open(store_dir, write=True) as c:
        c.apply(Changes(records=[record(i) for i in range(300, 310)]))
        c.save_index()
    with Collection.open(store_dir, write=False) as reader:
        index = reader.index()
        assert index.method == ann.SEARCH_METHOD and index.built_for == 310


def test_approximate_index_is_caught_up_and_rebuilt(store_dir, small_threshold):
    new_store(store_dir, n=300)
    with Collection.open(store_dir, write=True) as c:
        ids = c.index().ids()
        c.apply(Changes(records=[record(i) for i in range(300, 320)], removals=[int(ids[0])]))
        moved = record(1)
        moved.id, moved.vector = int(ids[1]), unit(777)
        c.apply(Changes(records=[moved]))
        # no save_index(): the process "dies" here
    with Collection.open(store_dir, write=False) as reader:
        index = reader.index()
        assert index.approximate and len(index) == 319
        np.testing.assert_array_equal(index.reconstruct([int(ids[1])])[0], unit(777))
        assert index.search(unit(777)[None], 1)[1][0, 0] == int(ids[1])
    assert_consistent(store_dir)
    with Collection.open(store_dir, write=False) as c:
        ((_, path),) = c.index_files()
    path.write_bytes(path.read_bytes()[:-100])  # damaged: rebuilt, approximate again
    with Collection.open(store_dir, write=True) as c:
        assert c.index().approximate and len(c.index()) == 319
    assert len(assert_consistent(store_dir)) == 319


def test_index_factory_setting_overrides_the_automatic_choice(store_dir, small_threshold):
    new_store(store_dir, n=300)
    with Collection.open(store_dir, write=True, index_factory="HNSW16") as c:
        assert c.index_factory() == "HNSW16"
        c.save_index()
        assert c.index().factory == "HNSW16"
    with Collection.open(store_dir, write=False) as c:
        assert c.index().factory == "HNSW16"
    assert len(assert_consistent(store_dir)) == 300
    with Collection.open(store_dir, write=True, index_factory="Flat") as c:
        c.save_index()
        assert not c.index().approximate
    with Collection.open(store_dir, write=True, index_factory="auto") as c:
        assert c.index_factory() is None
        c.save_index()
        assert c.index().factory == "IVF4,PQ8x4fs"
    with pytest.raises(InputError, match="invalid FAISS factory string 'Bogus'"):
        Collection.open(store_dir, write=True, index_factory="Bogus")
    # An inverted file too large for the store waits for enough vectors, with exact search.
    with Collection.open(store_dir, write=True, index_factory="IVF4096,Flat") as c:
        c.save_index()
        assert not c.index().approximate
    assert len(assert_consistent(store_dir)) == 300


def test_a_store_that_shrinks_goes_back_to_exact_search(store_dir, small_threshold):
    new_store(store_dir, n=300)
    with Collection.open(store_dir, write=True) as c:
        assert c.index().approximate
        c.apply(Changes(removals=[int(i) for i in c.index().ids()[:260]]))
        c.save_index()
        assert not c.index().approximate and len(c.index()) == 40
    assert len(assert_consistent(store_dir)) == 40
