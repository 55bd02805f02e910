"""Index, query, distance and remove through the library, with a fake embedder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import badfiles
import numpy as np
import pytest
from consistency import assert_consistent
from fakes import FakeFactory

from simsearch import library
from simsearch.collection import Collection
from simsearch.errors import InputError, ModelMismatchError, StoreError, StoreLockedError
from simsearch.images import sha1_file


def run_index(store_dir: Path, roots, factory, **kwargs) -> library.IndexSummary:
    with Collection.open(store_dir, write=True) as collection:
        return library.index_paths(collection, roots, embedder_factory=factory, **kwargs)


def run_query(store_dir: Path, queries, factory, k: int = 5) -> list[library.QueryResult]:
    with Collection.open(store_dir, write=False) as collection:
        return library.query(collection, queries, k=k, embedder_factory=factory)


def counts(summary: library.IndexSummary) -> tuple[int, ...]:
    s = summary
    return (s.added, s.updated, s.moved, s.unchanged, s.removed, s.failed)


def test_first_run_adds_everything_and_second_run_reads_nothing(photos, store_dir):
    factory = FakeFactory()
    first = run_index(store_dir, [photos], factory)
    assert counts(first) == (12, 0, 0, 0, 0, 0)
    assert len(factory.embedded) == 12
    assert first.model_id == factory.model_id

    again = FakeFactory()
    second = run_index(store_dir, [photos], again)
    assert counts(second) == (0, 0, 0, 12, 0, 0)
    assert again.loads == []  # the model is not even loaded
    assert_consistent(store_dir)


def test_changed_file_is_re_embedded_and_touched_file_is_not(photos, store_dir):
    run_index(store_dir, [photos], FakeFactory())
    changed = photos / "a" / "img01.jpg"
    badfiles.make_jpeg(changed, seed=99, color=(0, 0, 0))
    touched = photos / "a" / "img02.jpg"
    os.utime(touched, ns=(1_000_000_000, 1_000_000_000))

    factory = FakeFactory()
    summary = run_index(store_dir, [photos], factory)
    assert counts(summary) == (0, 1, 0, 11, 0, 0)
    assert factory.embedded == [str(changed)]
    assert_consistent(store_dir)
    # The touched file's new mtime was recorded: the next run does not hash it again.
    assert counts(run_index(store_dir, [photos], FakeFactory())) == (0, 0, 0, 12, 0, 0)


def test_moved_file_keeps_its_id_and_vector(photos, store_dir):
    run_index(store_dir, [photos], FakeFactory())
    old = photos / "a" / "img03.jpg"
    with Collection.open(store_dir, write=False) as c:
        before = c.find_image(path=str(old))
        vector = c.vectors([before.id])[before.id]
    new = photos / "b" / "renamed.jpg"
    shutil.move(old, new)

    factory = FakeFactory()
    summary = run_index(store_dir, [photos], factory)
    assert counts(summary) == (0, 0, 1, 11, 0, 0)
    assert factory.embedded == []
    with Collection.open(store_dir, write=False) as c:
        after = c.find_image(path=str(new))
        assert after.id == before.id
        assert c.find_image(path=str(old)) is None
        np.testing.assert_array_equal(c.vectors([after.id])[after.id], vector)
    assert_consistent(store_dir)


def test_deleted_file_leaves_the_index(photos, store_dir):
    run_index(store_dir, [photos], FakeFactory())
    gone = photos / "b" / "img07.jpg"
    with Collection.open(store_dir, write=False) as c:
        gone_id = c.find_image(path=str(gone)).id
    gone.unlink()
    summary = run_index(store_dir, [photos], FakeFactory())
    assert counts(summary) == (0, 0, 0, 11, 1, 0)
    ids = assert_consistent(store_dir)
    assert gone_id not in ids.tolist()


def test_copied_file_reuses_the_vector(photos, store_dir):
    run_index(store_dir, [photos], FakeFactory())
    shutil.copy(photos / "a" / "img00.jpg", photos / "copy.jpg")
    factory = FakeFactory()
    summary = run_index(store_dir, [photos], factory)
    assert counts(summary) == (1, 0, 0, 12, 0, 0)
    assert factory.embedded == []
    assert_consistent(store_dir)


def test_folders_outside_the_run_are_left_alone(photos, store_dir):
    run_index(store_dir, [photos / "a"], FakeFactory())
    run_index(store_dir, [photos / "b"], FakeFactory())
    summary = run_index(store_dir, [photos / "a"], FakeFactory())
    assert counts(summary) == (0, 0, 0, 6, 0, 0)
    with Collection.open(store_dir, write=False) as c:
        assert c.counts()["indexed"] == 12


def test_bad_files_are_skipped_recorded_and_counted(photos, store_dir):
    bad = photos / "bad"
    bad.mkdir()
    made = {
        badfiles.zero_byte(bad): "empty",
        badfiles.truncated_jpeg(bad): "truncated",
        badfiles.text_named_jpg(bad): "not an image",
        badfiles.huge_png(bad): "pixels",
        badfiles.broken_symlink(bad): "broken symbolic link",
        badfiles.fifo_named_jpg(bad): "not a regular file",
    }
    badfiles.non_utf8_name(bad)
    summary = run_index(store_dir, [photos], FakeFactory())
    assert (summary.added, summary.failed) == (12, 7)
    reasons = {f.path: f.reason for f in summary.failures}
    for path, words in made.items():
        assert words in reasons[path], (path, reasons[path])
    escaped = str(bad / "caf\\xe9.jpg")  # reported and stored under a printable name
    assert "UTF-8" in reasons[escaped]
    with Collection.open(store_dir, write=False) as c:
        stored = {row.path: row.error for row in c.failures()}
    assert set(stored) == set(made) | {escaped}
    assert_consistent(store_dir)
    # Failed files are checked again on the next run and still counted, without loading the
    # model and without rewriting their rows.
    again = FakeFactory()
    with Collection.open(store_dir, write=False) as c:
        generation = c.generation()
    second = run_index(store_dir, [photos], again)
    assert (second.failed, second.unchanged, again.loads) == (7, 12, [])
    assert {f.path: f.reason for f in second.failures} == reasons
    with Collection.open(store_dir, write=False) as c:
        assert c.generation() == generation


def test_unreadable_file_is_reported(photos, store_dir, monkeypatch):
    target = str(photos / "a" / "img00.jpg")
    real = library.sha1_file

    def refuse(path):
        if path == target:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(library, "sha1_file", refuse)
    summary = run_index(store_dir, [photos], FakeFactory())
    assert summary.failed == 1 and summary.added == 11
    assert "Permission denied" in summary.failures[0].reason


def test_file_that_turns_bad_loses_its_vector(photos, store_dir):
    run_index(store_dir, [photos], FakeFactory())
    victim = photos / "a" / "img04.jpg"
    victim.write_bytes(b"this is not an image any more")
    summary = run_index(store_dir, [photos], FakeFactory())
    assert (summary.failed, summary.unchanged) == (1, 11)
    ids = assert_consistent(store_dir)
    assert len(ids) == 11


def test_query_finds_the_image_itself_first_at_distance_zero(photos, store_dir):
    run_index(store_dir, [photos], FakeFactory())
    shutil.copy(photos / "a" / "img05.jpg", photos / "dup.jpg")
    run_index(store_dir, [photos], FakeFactory())
    path = photos / "a" / "img05.jpg"
    factory = FakeFactory()
    (result,) = run_query(store_dir, [str(path)], factory, k=3)
    assert factory.loads == []  # indexed and unchanged: its stored vector is used
    assert result.results[0].path == str(path)
    assert result.results[0].distance == 0.0
    assert result.results[1].path == str(photos / "dup.jpg")
    assert result.results[1].distance == 0.0
    assert [n.rank for n in result.results] == [1, 2, 3]
    assert result.results[2].distance > 0


def test_query_by_id_sha1_and_unindexed_file_share_one_model_load(photos, store_dir, tmp_path):
    run_index(store_dir, [photos], FakeFactory())
    path = photos / "b" / "img09.jpg"
    with Collection.open(store_dir, write=False) as c:
        row = c.find_image(path=str(path))
    outside = tmp_path / "outside"
    outside.mkdir()
    new1 = badfiles.make_jpeg(outside / "new1.jpg", seed=9, color=(20 * 9 % 256, 255 - 135, 90))
    new2 = badfiles.make_jpeg(outside / "new2.jpg", seed=500)
    factory = FakeFactory()
    results = run_query(store_dir, [str(row.id), row.sha1.upper(), new1, new2], factory, k=2)
    assert len(factory.loads) == 1
    assert [r.results[0].id for r in results[:2]] == [row.id, row.id]
    assert results[0].to_dict()["results"][0] == {
        "rank": 1,
        "id": row.id,
        "path": str(path),
        "sha1": row.sha1,
        "distance": 0.0,
    }
    assert len(results[3].results) == 2


def test_query_of_a_copy_outside_the_store_uses_the_stored_vector(photos, store_dir, tmp_path):
    run_index(store_dir, [photos], FakeFactory())
    copy = tmp_path / "elsewhere.jpg"
    shutil.copy(photos / "a" / "img02.jpg", copy)
    factory = FakeFactory()
    (result,) = run_query(store_dir, [str(copy)], factory, k=1)
    assert factory.loads == []
    assert result.results[0].path == str(photos / "a" / "img02.jpg")
    assert result.results[0].distance == 0.0


@pytest.mark.parametrize(
    "text, words",
    [
        ("no/such/file.jpg", "not an existing file"),
        ("987654", "no indexed image has id"),
        ("a" * 40, "no indexed image has SHA-1"),
    ],
)
def test_query_of_something_missing_is_a_clear_error(photos, store_dir, text, words):
    run_index(store_dir, [photos], FakeFactory())
    with pytest.raises(InputError, match=words):
        run_query(store_dir, [text], FakeFactory())


def test_query_of_a_bad_image_is_a_clear_error(photos, store_dir, tmp_path):
    run_index(store_dir, [photos], FakeFactory())
    bad = badfiles.text_named_jpg(tmp_path)
    with pytest.raises(InputError, match="cannot use the query image .*not an image"):
        run_query(store_dir, [bad], FakeFactory())


def test_query_of_an_empty_store_says_to_index_first(store_dir, tmp_path):
    with pytest.raises(StoreError, match="simsearch index"):
        run_query(store_dir, [badfiles.make_jpeg(tmp_path / "q.jpg")], FakeFactory())


def test_distance_uses_stored_vectors(photos, store_dir):
    run_index(store_dir, [photos], FakeFactory())
    a, b = str(photos / "a" / "img00.jpg"), str(photos / "b" / "img11.jpg")
    factory = FakeFactory()
    with Collection.open(store_dir, write=False) as c:
        result = library.distance(c, a, b, embedder_factory=factory)
        same = library.distance(c, a, a, embedder_factory=factory)
        va, vb = c.vectors([c.find_image(path=a).id, c.find_image(path=b).id]).values()
    assert factory.loads == []
    assert result.distance == pytest.approx(np.linalg.norm(va - vb), abs=1e-6)
    assert result.distance**2 == pytest.approx(2 - 2 * result.cosine, abs=1e-6)
    assert 0 < result.distance <= 2
    assert (same.distance, same.cosine) == (0.0, pytest.approx(1.0))


def test_another_model_is_refused_until_reindex(photos, store_dir):
    run_index(store_dir, [photos], FakeFactory())
    other = FakeFactory(model_id="fake-48-0002")
    with pytest.raises(ModelMismatchError, match="--reindex"):
        run_index(store_dir, [photos], other, model="other")
    summary = run_index(store_dir, [photos], other, model="other", reindex=True)
    assert counts(summary) == (0, 12, 0, 0, 0, 0)
    with Collection.open(store_dir, write=False) as c:
        assert c.model()[0] == "fake-48-0002"
    assert_consistent(store_dir)


def test_changed_weights_are_detected_at_query_time(photos, store_dir, tmp_path):
    run_index(store_dir, [photos], FakeFactory())
    query = badfiles.make_jpeg(tmp_path / "q.jpg", seed=1234)
    with pytest.raises(ModelMismatchError, match="re-index"):
        run_query(store_dir, [query], FakeFactory(model_id="fake-48-0009"))


def test_remove_paths_and_folders(photos, store_dir):
    run_index(store_dir, [photos], FakeFactory())
    with Collection.open(store_dir, write=True) as c:
        result = library.remove(c, [str(photos / "a"), str(photos / "b" / "img06.jpg"), "nope"])
    assert result.removed == 7
    assert result.not_found == ["nope"]
    ids = assert_consistent(store_dir)
    assert len(ids) == 5


def test_second_writer_is_refused_at_once(photos, store_dir):
    with Collection.open(store_dir, write=True):
        with pytest.raises(StoreLockedError, match="another simsearch process"):
            Collection.open(store_dir, write=True)
        # Readers are not blocked by a writer.
        with Collection.open(store_dir, write=False) as reader:
            assert reader.counts()["indexed"] == 0


def test_info_reports_counts_and_failures(photos, store_dir):
    badfiles.text_named_jpg(photos)
    run_index(store_dir, [photos], FakeFactory())
    with Collection.open(store_dir, write=False) as c:
        result = library.info(c)
    assert (result.indexed, result.failed, result.dim) == (12, 1, 48)
    assert result.index_vectors == 12
    assert result.index_bytes > 0 and result.database_bytes > 0
    assert result.failures[0].path.endswith("notes.jpg")


def test_sha1_recorded_matches_the_file(photos, store_dir):
    run_index(store_dir, [photos], FakeFactory())
    path = photos / "a" / "img00.jpg"
    with Collection.open(store_dir, write=False) as c:
        row = c.find_image(path=str(path))
    assert row.sha1 == sha1_file(path)
    assert (row.width, row.height, row.size) == (64, 48, path.stat().st_size)
