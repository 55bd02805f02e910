"""The store and its FAISS index stay consistent through crashes, corruption and readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from consistency import assert_consistent

from simsearch.collection import Changes, Collection, ImageRecord, index_file_name
from simsearch.errors import ModelMismatchError


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
