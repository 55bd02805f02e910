"""SIGKILL a real `simsearch index` midway: the next run finishes and the store is consistent."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import badfiles
import pytest
from consistency import assert_consistent

pytestmark = pytest.mark.slow

# Enough photos for a run of several transactions (library.WRITE_ROWS rows or WRITE_SECONDS each).
N_PHOTOS = 1600


def vector_count(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("select count(*) from embeddings").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("kill_after", [0, 24])
def test_killed_index_run_is_finished_by_the_next_run(tmp_path, kill_after):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(N_PHOTOS):
        badfiles.make_jpeg(
            photos / f"p{i:04d}.jpg",
            size=(40, 30),
            seed=i,
            color=(i % 256, (7 * i) % 256, (13 * i) % 256),
        )
    store = tmp_path / "store"
    command = [
        sys.executable,
        "-m",
        "simsearch",
        "index",
        str(photos),
        "--store",
        str(store),
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--json",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = store / "simsearch.db"
    deadline = time.monotonic() + 120

    def ready() -> bool:
        return vector_count(db) >= kill_after if kill_after else db.exists()

    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = vector_count(db)
    assert done_before < N_PHOTOS, "the run finished before it could be killed"

    # Even before the next run, a reader sees a consistent store.
    if done_before:
        assert len(assert_consistent(store)) == done_before

    finish = subprocess.run(command, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    summary = json.loads(finish.stdout)
    assert summary["added"] + summary["unchanged"] == N_PHOTOS
    assert summary["failed"] == 0
    assert len(assert_consistent(store)) == N_PHOTOS
    assert [p.name for p in store.glob("*.faiss")] != []
    assert not list(store.glob(".*.tmp"))


def test_queries_keep_working_while_an_index_run_writes(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(N_PHOTOS):
        badfiles.make_jpeg(photos / f"p{i:04d}.jpg", size=(40, 30), seed=i)
    store = tmp_path / "store"
    base = [sys.executable, "-m", "simsearch"]
    first = subprocess.run(
        [*base, "index", str(photos / "p0000.jpg"), "--store", str(store)],
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr
    proc = subprocess.Popen(
        [*base, "index", str(photos), "--store", str(store), "--batch-size", "4", "--workers", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while vector_count(store / "simsearch.db") < 20:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        query = subprocess.run(
            [*base, "query", "1", "-k", "5", "--store", str(store), "--json"],
            capture_output=True,
            text=True,
        )
        writer = subprocess.run(
            [*base, "remove", str(photos), "--store", str(store)], capture_output=True, text=True
        )
        assert proc.poll() is None, "the index run ended before the concurrent calls"
    finally:
        proc.wait(timeout=120)
    assert query.returncode == 0, query.stderr
    results = json.loads(query.stdout)["results"]
    assert results[0]["id"] == 1 and results[0]["distance"] == 0.0
    assert len(results) == 5
    assert writer.returncode == 3 and "another simsearch process" in writer.stderr
    assert len(assert_consistent(store)) == N_PHOTOS
