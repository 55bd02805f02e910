"""`simsearch export imagecat`: the folder ImageSpace's FAISS back end reads (fake-model store)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from fakes import FakeFactory
from typer.testing import CliRunner

from simsearch import library
from simsearch.cli import app
from simsearch.collection import Collection
from simsearch.errors import InputError, StoreError
from simsearch.export import FILES, export_imagecat
from simsearch.images import sha1_file


@pytest.fixture
def indexed(photos: Path, store_dir: Path) -> Path:
    """The 12 photos plus a byte-identical copy of one, indexed with the fake model."""
    shutil.copy(photos / "a" / "img00.jpg", photos / "b" / "copy-of-img00.jpg")
    with Collection.open(store_dir, write=True) as collection:
        library.index_paths(collection, [str(photos)], embedder_factory=FakeFactory())
    return store_dir


def export(store_dir: Path, out: Path, **kwargs):
    with Collection.open(store_dir, write=False) as collection:
        return export_imagecat(collection, out, **kwargs)


def test_export_writes_ids_vectors_index_and_meta(indexed, photos, tmp_path):
    out = tmp_path / "imagecat"
    summary = export(indexed, out)

    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    ids = json.loads((out / "ids.json").read_text())
    vectors = np.load(out / "vectors.npy")
    meta = json.loads((out / "meta.json").read_text())
    # 13 files, one a copy: 12 distinct contents, one row each.
    assert summary.count == len(ids) == 12 and summary.duplicates == 1
    assert len(set(ids)) == len(ids)
    assert vectors.dtype == np.float32 and vectors.shape == (12, 48)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert meta["model_id"] == "fake-48-0001" and meta["model_spec"]
    assert (meta["dim"], meta["count"], meta["metric"]) == (48, 12, "inner_product")
    assert meta["format"] == "imagecat-faiss" and meta["created"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".imagecat")]


def test_ids_are_sha1s_of_the_files_and_rows_are_their_stored_vectors(indexed, photos, tmp_path):
    out = tmp_path / "imagecat"
    export(indexed, out)
    ids = json.loads((out / "ids.json").read_text())
    vectors = np.load(out / "vectors.npy")

    file_sha1s = {sha1_file(p) for p in photos.rglob("*.jpg")}
    assert set(ids) == file_sha1s
    with Collection.open(indexed, write=False) as collection:
        for row, sha1 in enumerate(ids):
            image = collection.find_image(sha1=sha1)
            stored = collection.vectors([image.id])[image.id]
            np.testing.assert_allclose(vectors[row], stored, atol=1e-6)


def test_faiss_index_rows_follow_the_vectors_order(indexed, tmp_path):
    out = tmp_path / "imagecat"
    export(indexed, out)
    vectors = np.load(out / "vectors.npy")
    index = faiss.read_index(str(out / "index.faiss"))

    assert isinstance(index, faiss.IndexFlatIP)
    assert (index.ntotal, index.d) == vectors.shape
    similarities, rows = index.search(vectors, 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(len(vectors)))
    np.testing.assert_allclose(similarities[:, 0], 1.0, atol=1e-5)
    # The full ranking equals exact search over vectors.npy.
    _, ranked = index.search(vectors, len(vectors))
    exact = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    np.testing.assert_array_equal(ranked, np.argsort(-exact, axis=1, kind="stable"))


def test_non_empty_folder_is_refused_unless_forced(indexed, tmp_path):
    out = tmp_path / "imagecat"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="--force"):
        export(indexed, out)
    assert (out / "keep.txt").read_text() == "mine"

    export(indexed, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".imagecat")]


def test_empty_existing_folder_and_new_parents_are_fine(indexed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(indexed, empty).count == 12
    assert export(indexed, tmp_path / "new" / "deeper").count == 12


def test_a_file_in_the_way_is_refused(indexed, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        export(indexed, target, force=True)


def test_a_store_without_images_names_the_fix(tmp_path):
    store = tmp_path / "store"
    Collection.open(store, write=True).close()
    with pytest.raises(StoreError, match="simsearch index"):
        export(store, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_prints_a_summary_or_json_and_fails_in_one_line(indexed, tmp_path):
    runner = CliRunner()
    out = tmp_path / "imagecat"
    args = ["export", "imagecat", str(out), "--store", str(indexed)]
    result = runner.invoke(app, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["count"] == 12

    again = runner.invoke(app, args, catch_exceptions=False)
    assert again.exit_code == 2
    assert "simsearch: error:" in again.stderr and "--force" in again.stderr

    forced = runner.invoke(app, [*args, "--force"], catch_exceptions=False)
    assert forced.exit_code == 0 and forced.stdout.startswith("exported 12 vectors")


def test_command_has_help_with_an_example():
    result = CliRunner().invoke(app, ["export", "imagecat", "--help"])
    assert result.exit_code == 0
    assert "Example: simsearch export imagecat" in " ".join(result.output.split())
