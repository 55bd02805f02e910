"""Evaluation: metrics against hand-computed values, the data-set loaders, and the command end to
end with the real default model against a Deep Ranking checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import badfiles
import numpy as np
import pytest
import typer
from fakes import FakeEmbedder
from typer.testing import CliRunner

from simsearch import evaluation
from simsearch.commands.evaluate import evaluate as evaluate_command
from simsearch.errors import InputError
from simsearch.evaluation import (
    copy_detection_metrics,
    copy_ranks,
    load_classes,
    load_copies,
    load_triplets,
    retrieval_metrics,
    similarity_precision,
)
from simsearch.images import sha1_file

# -- metrics: tiny cases computed by hand ------------------------------------------------------


def on_circle(*degrees: float) -> np.ndarray:
    """Unit vectors at these angles: cosine order is the order of angular distance."""
    radians = np.radians(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_similarity_precision_counts_ties_as_failures():
    # wins: 0.1 < 0.2 yes; 0.5 < 0.4 no; 0.3 < 0.3 tie, a failure; 0.2 < 0.9 yes -> 2 / 4
    assert (
        similarity_precision(np.array([0.1, 0.5, 0.3, 0.2]), np.array([0.2, 0.4, 0.3, 0.9])) == 0.5
    )
    assert similarity_precision(np.array([np.nan]), np.array([1.0])) == 0.0
    with pytest.raises(InputError):
        similarity_precision(np.array([]), np.array([]))
    with pytest.raises(InputError):
        similarity_precision(np.array([1.0, 2.0]), np.array([1.0]))


# Five images at 0, 10, 25, 45 and 100 degrees with labels A A B B A. Rankings (angular distance):
#   q0 (A,   0): 1 A, 2 B, 3 B, 4 A  -> relevant at ranks 1, 4: AP = (1/1 + 2/4) / 2 = 0.75
#   q1 (A,  10): 0 A, 2 B, 3 B, 4 A  -> relevant at ranks 1, 4: AP = 0.75
#   q2 (B,  25): 1 A, 3 B, 0 A, 4 A  -> relevant at rank 2:     AP = 1/2
#   q3 (B,  45): 2 B, 1 A, 0 A, 4 A  -> relevant at rank 1:     AP = 1
#   q4 (A, 100): 3 B, 2 B, 1 A, 0 A  -> relevant at ranks 3, 4: AP = (1/3 + 2/4) / 2 = 5/12
# precision@1 = 3/5; recall@2 (a relevant item in the top 2) = 4/5; recall@3 = 5/5;
# mAP = (0.75 + 0.75 + 0.5 + 1 + 5/12) / 5 = 41/60.
ANGLES = (0, 10, 25, 45, 100)
LABELS = ["A", "A", "B", "B", "A"]
EXPECTED = {"precision@1": 0.6, "recall@1": 0.6, "recall@2": 0.8, "recall@3": 1.0, "mAP": 41 / 60}


def test_retrieval_metrics_by_hand():
    got = retrieval_metrics(on_circle(*ANGLES), LABELS, ks=(1, 2, 3))
    assert got == pytest.approx(EXPECTED)
    assert list(got) == ["precision@1", "recall@1", "recall@2", "recall@3", "mAP"]


def test_retrieval_metrics_normalise_and_accept_any_labels():
    scaled = on_circle(*ANGLES) * np.array([[3.0], [0.5], [7.0], [1.0], [2.0]])
    assert retrieval_metrics(scaled, [1, 1, 2, 2, 1], ks=(1, 2, 3)) == pytest.approx(EXPECTED)


def test_a_single_image_class_is_a_distractor_but_no_query():
    # At 210 degrees it is farther from every query than all the others: the rankings keep
    # their order with it appended, and it is not a query (it has nothing to find).
    vectors = on_circle(*ANGLES, 210)
    got = retrieval_metrics(vectors, [*LABELS, "C"], ks=(1, 2, 3))
    assert got == pytest.approx(EXPECTED)


def test_ties_are_broken_by_position():
    # Three equal vectors, labels A B A. q0: 1 B, 2 A -> AP 1/2, miss at 1. q2: 0 A, 1 B -> AP 1.
    # q1 (B) has nothing to find. precision@1 = 1/2, mAP = 3/4.
    got = retrieval_metrics(np.ones((3, 4)), ["A", "B", "A"], ks=(1,))
    assert got == pytest.approx({"precision@1": 0.5, "recall@1": 0.5, "mAP": 0.75})


def test_retrieval_metrics_in_blocks_equal_one_block(monkeypatch):
    rng = np.random.default_rng(0)
    vectors, labels = rng.normal(size=(50, 8)), rng.integers(0, 5, size=50)
    whole = retrieval_metrics(vectors, labels)
    monkeypatch.setattr(evaluation, "_BLOCK", 7)
    assert retrieval_metrics(vectors, labels) == pytest.approx(whole)


def test_retrieval_metrics_reject_bad_input():
    with pytest.raises(InputError, match="at least 2 images"):
        retrieval_metrics(on_circle(0, 10, 20), ["A", "B", "C"])
    with pytest.raises(InputError, match="one label per vector"):
        retrieval_metrics(on_circle(0, 10), ["A"])
    with pytest.raises(InputError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 1.0], [1.0, 0.0]]), ["A", "A"])
    with pytest.raises(InputError, match="at least 1"):
        retrieval_metrics(on_circle(0, 10), ["A", "A"], ks=(0,))


def test_copy_detection_by_hand():
    # Database at 0, 30, 60, 90 degrees.
    #   copy at  5 of item 0: nearest is 0                      -> rank 1
    #   copy at 50 of item 1 (30): 60 is nearer (10 vs 20)      -> rank 2
    #   copy at 80 of item 0 (0): 90, 60 and 30 are all nearer  -> rank 4
    # recall@1 = 1/3; mAP = mean of 1/rank = (1 + 1/2 + 1/4) / 3 = 7/12.
    db, queries, truth = on_circle(0, 30, 60, 90), on_circle(5, 50, 80), [0, 1, 0]
    assert copy_ranks(queries, truth, db).tolist() == [1, 2, 4]
    got = copy_detection_metrics(queries, truth, db)
    assert got == pytest.approx({"recall@1": 1 / 3, "mAP": 7 / 12})


def test_copy_detection_ties_go_to_the_earlier_database_item():
    db = np.ones((3, 2))  # three identical items: the original's rank is its position + 1
    assert copy_ranks(np.ones((3, 2)), [0, 1, 2], db).tolist() == [1, 2, 3]


def test_copy_detection_rejects_bad_input():
    with pytest.raises(InputError, match="outside the database"):
        copy_detection_metrics(on_circle(0), [4], on_circle(0, 10))
    with pytest.raises(InputError, match="one original per query"):
        copy_detection_metrics(on_circle(0, 5), [0], on_circle(0, 10))
    with pytest.raises(InputError, match="dimensions"):
        copy_detection_metrics(np.ones((1, 3)), [0], on_circle(0, 10))


# -- data sets --------------------------------------------------------------------------------

COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]


def make_tree(root: Path, classes: int = 3, per_class: int = 3, size=(96, 72)) -> Path:
    """Class sub-folders of JPEGs: each class one photo-like picture in its own colour, each
    image a different window of it (so a class is a real visual category)."""
    width, height = size
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        picture = badfiles.photo_like((width + 4 * per_class, height + 4 * per_class), COLORS[c], c)
        for i in range(per_class):
            window = picture.crop((4 * i, 3 * i, 4 * i + width, 3 * i + height))
            window.save(folder / f"img{i}.jpg", quality=85 - 5 * i)
    return root


def make_flat(root: Path) -> Path:
    root.mkdir(parents=True)
    for name, seed in (("n01_1.jpg", 1), ("n01_2.JPEG", 2), ("n02_1.jpg", 3), ("n02_2.jpg", 4)):
        badfiles.make_jpeg(root / name, seed=seed)
    return root


def test_load_classes_from_folders(tmp_path):
    data = load_classes(make_tree(tmp_path / "tree"))
    assert data.layout == "folders"
    assert data.labels == ["class0"] * 3 + ["class1"] * 3 + ["class2"] * 3
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in data.paths)
    assert load_classes(tmp_path / "tree", limit=4).labels == ["class0"] * 3 + ["class1"]


def test_load_classes_from_file_name_prefixes(tmp_path, caplog):
    root = make_flat(tmp_path / "flat")
    badfiles.make_jpeg(root / "noclass.jpg")
    data = load_classes(root)
    assert data.layout == "prefix"
    assert data.labels == ["n01", "n01", "n02", "n02"]
    assert "no CLASS_ prefix" in caplog.text


def test_load_classes_needs_two_classes_with_a_pair(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_classes(tmp_path / "missing")
    with pytest.raises(InputError, match="need at least 2 classes"):
        load_classes(make_tree(tmp_path / "one", classes=1))
    with pytest.raises(InputError, match="single image"):
        load_classes(make_tree(tmp_path / "singles", classes=2, per_class=1))


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_load_triplets_resolves_paths_from_the_csv_folder(tmp_path):
    make_tree(tmp_path / "tree")
    rows = [
        "query,positive,negative",
        "tree/class0/img0.jpg,tree/class0/img1.jpg,tree/class1/img0.jpg",
    ]
    rows.append(f"{tmp_path}/tree/class1/img0.jpg,tree/class1/img2.jpg,tree/class2/img0.jpg")
    data = load_triplets(write_csv(tmp_path / "t.csv", rows))
    assert len(data.triplets) == 2
    assert data.triplets[0][0] == str(tmp_path / "tree" / "class0" / "img0.jpg")
    assert data.triplets[1][0] == str(tmp_path / "tree" / "class1" / "img0.jpg")
    assert len(load_triplets(tmp_path / "t.csv", limit=1).triplets) == 1


def test_load_triplets_names_the_bad_line(tmp_path):
    make_tree(tmp_path / "tree")
    good = "tree/class0/img0.jpg,tree/class0/img1.jpg,tree/class1/img0.jpg"
    missing = write_csv(
        tmp_path / "m.csv", [good, "tree/class0/img0.jpg,tree/nope.jpg,tree/class1/img0.jpg"]
    )
    with pytest.raises(InputError, match=r"m.csv line 2: .*nope.jpg does not exist"):
        load_triplets(missing)
    with pytest.raises(InputError, match="line 1: expected 3 fields"):
        load_triplets(write_csv(tmp_path / "f.csv", ["a.jpg,b.jpg"]))
    with pytest.raises(InputError, match="holds no triplets"):
        load_triplets(write_csv(tmp_path / "e.csv", [""]))
    with pytest.raises(InputError, match="does not exist"):
        load_triplets(tmp_path / "absent.csv")
    with pytest.raises(InputError, match="without manifest.jsonl"):
        load_triplets(tmp_path / "tree")


def write_fetched(root: Path) -> Path:
    """The layout `simsearch triplets fetch` writes (the contract in simsearch.datasets): record 1
    lost its negative to a 404."""
    root.mkdir()
    lines = []
    for index in range(3):
        record = {"index": index, "line": 4 * index + 1, "text": f"search {index}"}
        for number, role in enumerate(("query", "positive", "negative")):
            url = f"http://example.com/{index}/{role}.jpg"
            if (index, role) == (1, "negative"):
                record[role] = {"url": url, "status": "HTTP 404", "file": None, "sha1": None}
                continue
            (root / str(index)).mkdir(exist_ok=True)
            file = badfiles.make_jpeg(root / str(index) / f"{role}.jpg", seed=10 * index + number)
            sha1 = sha1_file(file)
            record[role] = {"url": url, "status": "ok", "file": f"{index}/{role}.jpg", "sha1": sha1}
        lines.append(json.dumps(record))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_load_triplets_from_a_fetched_folder(tmp_path):
    root = write_fetched(tmp_path / "fetched")
    data = load_triplets(root)
    assert data.incomplete == 1
    assert data.triplets == [
        tuple(str(root / str(i) / f"{role}.jpg") for role in ("query", "positive", "negative"))
        for i in (0, 2)
    ]
    (root / "2" / "positive.jpg").unlink()
    with pytest.raises(InputError, match=r"record 2 \(line 9 of the triplet file\).*missing"):
        load_triplets(root)


def test_load_copies_splits_originals_and_distractors(tmp_path):
    tree = make_tree(tmp_path / "tree")
    extra = make_tree(tmp_path / "extra", classes=1, per_class=2)
    everything = load_copies(tree, extra)
    assert len(everything.originals) == 9 and len(everything.distractors) == 2
    split = load_copies(tree, extra, originals_count=4, seed=1)
    assert len(split.originals) == 4 and len(split.distractors) == 5 + 2
    assert not set(split.originals) & set(split.distractors)
    assert split == load_copies(tree, extra, originals_count=4, seed=1)  # deterministic
    limited = load_copies(tree, extra, originals_count=4, limit=3)
    assert (len(limited.originals), len(limited.distractors)) == (3, 3)
    same_folder = load_copies(tree, tree)  # a distractor folder overlapping the originals
    assert same_folder.distractors == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        load_copies(tmp_path / "empty")
    with pytest.raises(InputError, match="copies per image"):
        load_copies(tree, copies_per_image=0)


# -- the library entry, with a fast fake embedder ----------------------------------------------


class FakeWithImages(FakeEmbedder):
    """The tests' fake embedder, plus embedding of in-memory images (for the edited copies)."""

    def __init__(self, spec: str, model_id: str) -> None:
        super().__init__(spec, model_id)
        self.images_embedded = 0

    def embed_images(self, images, batch_size: int = 32) -> np.ndarray:
        self.images_embedded += len(images)
        out = []
        for image in images:
            grid = np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32).ravel()
            grid -= grid.mean()
            out.append(grid / max(float(np.linalg.norm(grid)), 1e-6))
        return np.stack(out)


def fake_factory(made: list[FakeWithImages]):
    def factory(spec: str) -> FakeWithImages:
        made.append(FakeWithImages(spec, f"fake-{spec}"))
        return made[-1]

    return factory


def test_evaluate_embeds_each_file_once_per_model_and_shows_the_same_copies(tmp_path):
    tree = make_tree(tmp_path / "tree")
    bad = badfiles.truncated_jpeg(tree / "class2")
    csv_path = write_csv(
        tmp_path / "t.csv",
        [
            "tree/class0/img0.jpg,tree/class0/img1.jpg,tree/class1/img0.jpg",
            "tree/class1/img1.jpg,tree/class1/img2.jpg,tree/class2/truncated.jpg",
        ],
    )
    made: list[FakeWithImages] = []
    report = evaluation.evaluate(
        ["m1", "m2"],
        embedder_factory=fake_factory(made),
        triplets=load_triplets(csv_path),
        classes=load_classes(tree),
        copies=load_copies(tree, copies_per_image=3, seed=5),
    )
    assert [e.spec for e in made] == ["m1", "m2"]
    for embedder in made:  # 10 files, shared by the three benchmarks, each embedded once
        assert sorted(embedder.files_embedded) == sorted(set(embedder.files_embedded))
        assert len(embedder.files_embedded) == 10
        assert embedder.images_embedded == 9 * 3
    first, second = report.models
    assert (first.model_id, second.model_id) == ("fake-m1", "fake-m2")
    # Same fake, same copies from the seed: the same figures.
    assert first.to_dict() | {"model": "", "model_id": "", "seconds": 0} == second.to_dict() | {
        "model": "",
        "model_id": "",
        "seconds": 0,
    }
    assert set(first.triplets) == {"similarity_precision"}
    assert first.triplets["similarity_precision"] in (0.0, 1.0)  # one usable triplet
    assert set(first.classes) == {"precision@1", "recall@5", "recall@10", "mAP"}
    assert set(first.copies) == {"recall@1", "mAP"}
    assert sum(v["copies"] for v in first.copies_by_edit.values()) == 27
    assert report.failed == {bad: report.failed[bad]}
    assert report.datasets["triplets"]["triplets"] == 1
    assert report.datasets["classes"] == {
        "source": str(tree),
        "layout": "folders",
        "images": 9,
        "classes": 3,
        "queries": 9,
    }
    assert report.datasets["copies"]["originals"] == 9
    assert report.datasets["copies"]["copies"] == 27
    assert json.loads(report.to_json())["failed"][0]["path"] == bad


def test_evaluate_needs_a_model_and_data(tmp_path):
    with pytest.raises(InputError, match="give at least one --model"):
        evaluation.evaluate([], embedder_factory=fake_factory([]), classes=None)
    with pytest.raises(InputError, match="nothing to evaluate on"):
        evaluation.evaluate(["m"], embedder_factory=fake_factory([]))


# -- the command end to end -------------------------------------------------------------------


def command_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(evaluate_command)

    @app.callback()
    def main() -> None:
        """A one-command app, as cli.py registers it."""

    return app


def run(*args: str):
    return CliRunner().invoke(command_app(), ["evaluate", *args], catch_exceptions=False)


def test_help_has_an_example():
    result = run("--help")
    assert result.exit_code == 0
    assert "Example: simsearch evaluate" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda tmp: ["--classes", str(tmp / "nowhere")],
            "classes folder .*nowhere does not exist",
        ),
        (
            lambda tmp: ["--classes", str(make_tree(tmp / "one", classes=1))],
            "need at least 2 classes",
        ),
        (
            lambda tmp: [
                "--triplets",
                str(write_csv(tmp / "t.csv", ["a.jpg,b.jpg,c.jpg"])),
            ],
            r"t.csv line 1: .*a.jpg does not exist",
        ),
        (lambda tmp: [], "nothing to evaluate on"),
        (lambda tmp: ["--distractors", str(tmp)], "need --copies"),
    ],
)
def test_bad_inputs_give_one_line(tmp_path, make, message):
    import re

    result = run("--model", "convnet-efficientnet_lite0", *make(tmp_path))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simsearch: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def deepranking_checkpoint(tmp_path_factory) -> Path:
    from simsearch.model import ModelConfig, build_model, save_checkpoint

    config = ModelConfig.for_backbone("efficientnet_lite0", "deepranking", embedding_dim=64)
    path = tmp_path_factory.mktemp("ckpt") / "deepranking.safetensors"
    save_checkpoint(build_model(config, pretrained=True), path)
    return path


def test_compares_two_real_models_in_one_run(tmp_path, deepranking_checkpoint):
    tree = make_tree(tmp_path / "tree", size=(128, 96))
    csv_path = write_csv(
        tmp_path / "t.csv",
        [
            "tree/class0/img0.jpg,tree/class0/img1.jpg,tree/class1/img0.jpg",
            "tree/class1/img1.jpg,tree/class1/img2.jpg,tree/class2/img0.jpg",
            "tree/class2/img1.jpg,tree/class2/img2.jpg,tree/class0/img2.jpg",
        ],
    )
    args = [
        "--model",
        "convnet-efficientnet_lite0",
        "--model",
        str(deepranking_checkpoint),
        "--triplets",
        str(csv_path),
        "--classes",
        str(tree),
        "--copies",
        str(tree),
        "--originals",
        "4",
        "--copies-per-image",
        "2",
        "--workers",
        "0",
    ]
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    models = report["models"]
    assert [m["model"] for m in models] == [
        "convnet-efficientnet_lite0",
        str(deepranking_checkpoint),
    ]
    assert models[0]["model_id"].startswith("convnet-efficientnet_lite0-1280-")
    assert models[1]["model_id"].startswith("deepranking-efficientnet_lite0-64-")
    for m in models:
        for group in ("triplets", "classes", "copies"):
            assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in m[group].values())
        assert sum(v["copies"] for v in m["copies_by_edit"].values()) == 8
    # Each class is windows of one picture: ImageNet features group them.
    assert models[0]["classes"]["precision@1"] >= 0.75
    assert models[0]["triplets"]["similarity_precision"] >= 2 / 3
    assert report["datasets"]["copies"] == {
        "originals": 4,
        "distractors": 5,
        "database": 9,
        "copies": 8,
        "copies_per_image": 2,
        "seed": 0,
    }

    table = run(*args, "--details", "--limit", "6")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["metric", "convnet-efficientnet_lite0", "deepranking.safetensors"]
    rows = {line.rsplit(None, 2)[0]: line.rsplit(None, 2)[1:] for line in lines[1:] if line}
    for metric in ("triplets similarity_precision", "classes precision@1", "classes mAP"):
        assert len(rows[metric]) == 2 and all(0 <= float(v) <= 1 for v in rows[metric])
    assert any(label.startswith("copies recall@1 ") for label in rows)
