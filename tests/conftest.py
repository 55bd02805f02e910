from __future__ import annotations

import os
from pathlib import Path

import pytest
from badfiles import make_jpeg
from fakes import FakeFactory

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "images"

# Tests never touch the user's real store.
os.environ.pop("SIMSEARCH_STORE", None)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of 12 small distinct JPEGs in two sub-folders."""
    root = tmp_path / "photos"
    for i in range(12):
        sub = root / ("a" if i < 6 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        make_jpeg(
            sub / f"img{i:02d}.jpg", size=(64, 48), seed=i, color=(20 * i % 256, 255 - 15 * i, 90)
        )
    return root


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def fake_factory() -> FakeFactory:
    return FakeFactory()


@pytest.fixture
def one_faiss_thread():
    """Training tiny indexes on one thread: OpenMP's many short parallel regions crawl on a
    busy machine, and one thread makes k-means reproducible."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
