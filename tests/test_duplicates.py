"""Near-duplicate groups: planted images in a fake-embedder store, chains, re-search, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeFactory
from PIL import Image
from typer.testing import CliRunner

from simsearch import duplicates as dup
from simsearch import library
from simsearch.cli import app
from simsearch.collection import Collection
from simsearch.commands import duplicates as dup_command
from simsearch.errors import InputError, StoreError
from simsearch.images import sha1_file
from simsearch.index import VectorIndex


def blocky(path: Path, seed: int, noise_seed: int | None = None) -> Path:
    """A 32x32 PNG of 4x4 random colour blocks; with `noise_seed`, a near-identical variant."""
    cells = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3)).astype(np.int16)
    pixels = np.kron(cells, np.ones((8, 8, 1), dtype=np.int16))
    if noise_seed is not None:
        pixels += np.random.default_rng(noise_seed).integers(-3, 4, size=pixels.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path, list[set[str]]]:
    """A store of a planted pair, a planted triple (one exact byte copy) and 8 distinct images."""
    root = tmp_path / "photos"
    pair = {blocky(root / "pair" / "a.png", 1), blocky(root / "pair" / "b.png", 1, 100)}
    triple_first = blocky(root / "triple" / "x.png", 2)
    copy = root / "triple" / "z-copy.png"
    copy.write_bytes(triple_first.read_bytes())
    triple = {triple_first, blocky(root / "triple" / "y.png", 2, 200), copy}
    for i in range(8):
        blocky(root / "single" / f"s{i}.png", 10 + i)
    store = tmp_path / "store"
    with Collection.open(store, write=True) as collection:
        summary = library.index_paths(collection, [root], embedder_factory=FakeFactory())
    assert summary.added == 13
    groups = [{str(p) for p in triple}, {str(p) for p in pair}]
    return root, store, groups


def test_planted_pairs_and_triples_are_found_exactly(planted):
    _, store, expected = planted
    with Collection.open(store, write=False) as collection:
        report = dup.find_duplicates(collection, threshold=0.2)
    assert [{m.path for m in g.members} for g in report.groups] == expected  # largest first
    assert [g.number for g in report.groups] == [1, 2]
    assert report.images == 13
    assert report.pairs == 3 + 1
    assert report.images_in_groups == 5
    triple = report.groups[0]
    assert triple.members[0].distance == 0.0
    # The byte copy shares its original's vector, so it comes next at distance 0.
    assert triple.members[1].distance == 0.0
    assert triple.members[2].distance > 0.0
    assert all(m.distance < 0.2 for m in triple.members)
    for member in triple.members:
        assert member.sha1 == sha1_file(member.path)
    assert triple.members[0].id == min(m.id for m in triple.members)


def test_block_size_and_k_do_not_change_the_groups(planted):
    _, store, _ = planted
    with Collection.open(store, write=False) as collection:
        reference = dup.find_duplicates(collection, threshold=0.2)
        for block_size, k in [(1, 1), (2, 1), (3, 2), (5, 50)]:
            report = dup.find_duplicates(collection, threshold=0.2, k=k, block_size=block_size)
            assert [g.to_dict() for g in report.groups] == [g.to_dict() for g in reference.groups]
            assert report.pairs == reference.pairs


def test_a_small_threshold_finds_only_identical_vectors(planted):
    _, store, _ = planted
    with Collection.open(store, write=False) as collection:
        report = dup.find_duplicates(collection, threshold=1e-6)
    assert [g.size for g in report.groups] == [2]
    assert {Path(m.path).name for m in report.groups[0].members} == {"x.png", "z-copy.png"}


def arc(n: int, step: float, dim: int = 8, offset: int = 0) -> np.ndarray:
    """Unit vectors on a great circle, `step` apart in chord length between neighbours."""
    angle = 2 * np.arcsin(step / 2)
    theta = np.arange(n) * angle
    vectors = np.zeros((n, dim))
    vectors[:, offset] = np.cos(theta)
    vectors[:, offset + 1] = np.sin(theta)
    return vectors.astype(np.float32)


def test_a_chain_is_one_group_though_its_ends_are_far_apart():
    chain = arc(6, 0.2)  # ends 1.0 apart
    others = arc(3, 1.0, offset=4)  # far from the chain and from each other
    vectors = np.concatenate([chain, others])
    ids = np.array([50, 10, 40, 20, 30, 60, 1, 2, 3])  # the chain's order is not the ids' order
    index = VectorIndex.build(8, ids, vectors)
    assert np.linalg.norm(chain[0] - chain[-1]) > 0.9
    pairs = dup.near_pairs(index, threshold=0.25, k=1, block_size=2)
    assert len(pairs.a) == 5
    assert (pairs.a < pairs.b).all()
    assert [g.tolist() for g in dup.components(pairs.a, pairs.b)] == [[10, 20, 30, 40, 50, 60]]


def test_components_join_transitively_and_keep_groups_apart():
    a = np.array([5, 7, 1, 9, 3, 100])
    b = np.array([7, 9, 3, 11, 2, 200])
    groups = dup.components(a, b)
    assert sorted(g.tolist() for g in groups) == [[1, 2, 3], [5, 7, 9, 11], [100, 200]]
    assert dup.components(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == []


def test_components_of_a_long_chain_in_any_order():
    rng = np.random.default_rng(0)
    nodes = rng.permutation(1000)
    a, b = nodes[:-1], nodes[1:]
    order = rng.permutation(len(a))
    groups = dup.components(a[order], b[order])
    assert len(groups) == 1 and groups[0].tolist() == list(range(1000))


def brute_force_pairs(vectors: np.ndarray, ids: np.ndarray, threshold: float) -> set:
    x = vectors.astype(np.float64)
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0))
    i, j = np.nonzero(np.triu(d < threshold, k=1))
    return {(min(ids[p], ids[q]), max(ids[p], ids[q])) for p, q in zip(i, j, strict=True)}


def test_queries_with_more_than_k_duplicates_are_searched_again():
    rng = np.random.default_rng(3)
    centre = rng.normal(size=16)
    cluster = centre + rng.normal(scale=0.02, size=(40, 16))  # 40 images, all close together
    spread = rng.normal(size=(60, 16))
    vectors = np.concatenate([cluster, spread])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.permutation(np.arange(1000, 1100))
    index = VectorIndex.build(16, ids, vectors.astype(np.float32))
    expected = brute_force_pairs(vectors, ids, 0.3)
    assert len(expected) >= 40 * 39 // 2

    pairs = dup.near_pairs(index, threshold=0.3, k=2, block_size=16)
    assert set(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True)) == expected
    assert pairs.researched >= 40
    assert pairs.max_k > 3
    groups = dup.components(pairs.a, pairs.b)
    assert sorted(ids[:40].tolist()) in [g.tolist() for g in groups]


def test_clustered_vectors_match_brute_force_for_every_block_size():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(12, 24))
    labels = rng.integers(0, 12, size=300)
    vectors = centres[labels] + rng.normal(scale=0.08, size=(300, 24))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(300) * 3 + 7
    index = VectorIndex.build(24, ids, vectors.astype(np.float32))
    expected = brute_force_pairs(vectors, ids, 0.25)
    assert expected
    for block_size, k in [(1, 1), (64, 4), (300, 10)]:
        pairs = dup.near_pairs(index, threshold=0.25, k=k, block_size=block_size)
        assert set(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True)) == expected


def test_progress_reports_every_image(planted):
    _, store, _ = planted

    class Recorder:
        def __init__(self) -> None:
            self.events: list[tuple[str, int]] = []

        def start(self, total: int, description: str) -> None:
            self.events.append(("start", total))

        def advance(self, n: int = 1) -> None:
            self.events.append(("advance", n))

        def close(self) -> None:
            self.events.append(("close", 0))

    recorder = Recorder()
    with Collection.open(store, write=False) as collection:
        dup.find_duplicates(collection, threshold=0.2, block_size=4, progress=recorder)
    assert recorder.events[0] == ("start", 13)
    assert [n for kind, n in recorder.events if kind == "advance"] == [4, 4, 4, 1]
    assert recorder.events[-1] == ("close", 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"threshold": 0.0}, "--threshold"), ({"threshold": 2.5}, "--threshold"), ({"k": 0}, "--k")],
)
def test_bad_options_are_refused(planted, options, message):
    _, store, _ = planted
    with (
        Collection.open(store, write=False) as collection,
        pytest.raises(InputError, match=message),
    ):
        dup.find_duplicates(collection, **options)


def test_empty_store_says_to_index_first(tmp_path):
    store = tmp_path / "store"
    Collection.open(store, write=True).close()
    with Collection.open(store, write=False) as collection, pytest.raises(StoreError) as caught:
        dup.find_duplicates(collection)
    assert "simsearch index" in str(caught.value)

    result = CliRunner().invoke(app, ["duplicates", "--store", str(store)])
    assert result.exit_code == 1
    assert "has no images yet" in result.output
    assert f"simsearch index DIR --store {store}" in result.output


def test_cli_table_and_summary(planted):
    _, store, expected = planted
    result = CliRunner().invoke(app, ["duplicates", "--store", str(store), "-t", "0.2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["group", "size", "distance", "sha1", "path"]
    assert lines[1].split()[:3] == ["1", "3", "0.0000"]
    assert lines[4].split()[:2] == ["2", "2"]
    assert lines[-1].startswith("2 groups, 5 images in groups, 4 pairs closer than 0.2 among 13")
    for path in set().union(*expected):
        assert path in result.stdout


def test_cli_json_shape(planted):
    _, store, expected = planted
    result = CliRunner().invoke(app, ["duplicates", "--store", str(store), "-t", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"summary", "groups"}
    summary = data["summary"]
    assert summary["groups"] == 2
    assert summary["images_in_groups"] == 5
    assert summary["pairs"] == 4
    assert summary["images"] == 13
    assert summary["threshold"] == 0.2
    assert [g["group"] for g in data["groups"]] == [1, 2]
    assert [g["size"] for g in data["groups"]] == [3, 2]
    assert [{m["path"] for m in g["images"]} for g in data["groups"]] == expected
    assert set(data["groups"][0]["images"][0]) == {"id", "path", "sha1", "distance"}


def test_cli_without_duplicates_prints_only_the_summary(tmp_path):
    root = tmp_path / "photos"
    for i in range(4):
        blocky(root / f"s{i}.png", 30 + i)
    store = tmp_path / "store"
    with Collection.open(store, write=True) as collection:
        library.index_paths(collection, [root], embedder_factory=FakeFactory())
    result = CliRunner().invoke(app, ["duplicates", "--store", str(store), "-t", "0.2"])
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()  # no table, only the summary
    assert line.startswith("0 groups, 0 images in groups, 0 pairs closer than 0.2 among 4 images")


def test_command_defaults_match_the_library():
    assert dup_command._DEFAULT_THRESHOLD == dup.DEFAULT_THRESHOLD
    assert dup_command._DEFAULT_K == dup.DEFAULT_K
    assert dup_command._DEFAULT_BLOCK == dup.DEFAULT_BLOCK
    result = CliRunner().invoke(app, ["duplicates", "--help"])
    assert result.exit_code == 0
    assert "Example: simsearch duplicates" in " ".join(result.output.split())
