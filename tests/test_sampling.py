"""Triplet sampling: sampler invariants, the Google layout fix, the CSV format, the command."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import typer
from badfiles import make_jpeg, make_png, zero_byte
from typer.testing import CliRunner

from simsearch.commands.train import sample
from simsearch.errors import InputError
from simsearch.sampling import (
    ListSampler,
    OnlineSampler,
    Triplet,
    class_folders,
    google_layout_triplets,
    read_triplets_csv,
    sample_directory,
    sample_google_layout,
    sample_triplets,
    write_triplets_csv,
)

IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-200x5"


def fake_classes(sizes: dict[str, int]) -> dict[str, list[str]]:
    return {name: [f"/data/{name}/{i:02d}.jpg" for i in range(n)] for name, n in sizes.items()}


def label_of(classes: dict[str, list[str]]) -> dict[str, str]:
    return {path: name for name, paths in classes.items() for path in paths}


# ---------------------------------------------------------------------------------------------
# class folders


def test_class_folders_match_extensions_case_insensitively_and_skip_bad_files(tmp_path, caplog):
    (tmp_path / "cats").mkdir()
    make_jpeg(tmp_path / "cats" / "a.JPG")
    make_png(tmp_path / "cats" / "b.Png")
    (tmp_path / "dogs" / "deep").mkdir(parents=True)
    make_jpeg(tmp_path / "dogs" / "deep" / "c.jpeg")
    zero_byte(tmp_path / "dogs", "empty.jpg")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    make_jpeg(tmp_path / ".hidden" / "h.jpg")
    (tmp_path / "nothing").mkdir()
    make_jpeg(tmp_path / "loose.jpg")
    skipped: list[str] = []
    with caplog.at_level(logging.WARNING):
        classes = class_folders(tmp_path, skipped=skipped)
    assert classes == {
        "cats": [str(tmp_path / "cats" / "a.JPG"), str(tmp_path / "cats" / "b.Png")],
        "dogs": [str(tmp_path / "dogs" / "deep" / "c.jpeg")],
    }
    assert len(skipped) == 1 and "empty.jpg" in skipped[0] and "empty file" in skipped[0]
    assert "belong to no class folder" in caplog.text


def test_flat_layout_takes_the_class_from_the_name_prefix(tmp_path):
    for name in ("n01_a.jpg", "n01_b_c.JPEG", "n02_x.png", "solo.jpg"):
        make_jpeg(tmp_path / name)
    classes = class_folders(tmp_path, flat=True)
    assert {k: [Path(p).name for p in v] for k, v in classes.items()} == {
        "n01": ["n01_a.jpg", "n01_b_c.JPEG"],
        "n02": ["n02_x.png"],
        "solo": ["solo.jpg"],
    }


def test_a_flat_folder_read_as_class_folders_says_to_use_flat(tmp_path):
    make_jpeg(tmp_path / "n01_a.jpg")
    with pytest.raises(InputError, match="--flat"):
        class_folders(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        class_folders(tmp_path / "missing")


@pytest.mark.skipif(not IMAGENET.is_dir(), reason="../shared/data/imagenet-200x5 is not here")
def test_flat_layout_of_the_shared_imagenet_sample():
    classes = class_folders(IMAGENET, flat=True)
    assert len(classes) == 200
    assert Counter(len(v) for v in classes.values()) == {5: 200}
    assert all(Path(p).name.startswith(name + "_") for name, v in classes.items() for p in v)


# ---------------------------------------------------------------------------------------------
# offline sampler


def test_sample_triplets_invariants_and_exact_counts():
    classes = fake_classes({"a": 5, "b": 4, "c": 6})
    labels = label_of(classes)
    triplets = sample_triplets(classes, num_pos=3, num_neg=2, seed=7)
    assert len(triplets) == 15 * 3 * 2
    per_query = Counter(t.query for t in triplets)
    assert set(per_query) == set(labels) and set(per_query.values()) == {6}
    for t in triplets:
        assert t.query != t.positive
        assert labels[t.positive] == labels[t.query]
        assert labels[t.negative] != labels[t.query]
        assert not t.augmented
    for query in labels:  # distinct positives per query, distinct negatives per (query, positive)
        mine = [t for t in triplets if t.query == query]
        assert len({t.positive for t in mine}) == 3
        for positive in {t.positive for t in mine}:
            assert len({t.negative for t in mine if t.positive == positive}) == 2


def test_sample_triplets_is_deterministic_with_a_seed():
    classes = fake_classes({"a": 6, "b": 6, "c": 6})
    first = sample_triplets(classes, 2, 3, seed=1)
    assert sample_triplets(classes, 2, 3, seed=1) == first
    assert sample_triplets(dict(reversed(list(classes.items()))), 2, 3, seed=1) == first
    assert sample_triplets(classes, 2, 3, seed=2) != first


def test_small_classes_give_what_they_have_and_say_so(caplog):
    classes = fake_classes({"pair": 2, "single": 1, "big": 5})
    with caplog.at_level(logging.WARNING):
        triplets = sample_triplets(classes, num_pos=3, num_neg=2, seed=0)
    assert "class 'pair' has 2 image(s): each query gets 1 positive(s) instead of 3" in caplog.text
    per_query = Counter(t.query for t in triplets)
    assert all(per_query[q] == 1 * 2 for q in classes["pair"])
    assert all(q not in per_query for q in classes["single"])  # no positive exists
    assert all(per_query[q] == 3 * 2 for q in classes["big"])


def test_sample_triplets_rejects_bad_counts():
    with pytest.raises(InputError, match="positives"):
        sample_triplets(fake_classes({"a": 2, "b": 2}), 0, 1)
    with pytest.raises(InputError, match="seed"):
        sample_triplets(fake_classes({"a": 2, "b": 2}), 1, 1, seed=-1)


# ---------------------------------------------------------------------------------------------
# the Google layout


def write_layout(root: Path, records: list[tuple[str, dict, dict, dict]]) -> None:
    """records: (text, query, positive, negative), each role {"url", "file"?, "sha1"?}."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (text, *roles) in enumerate(records):
        record: dict = {"index": index, "line": 4 * index + 1, "text": text}
        for role, spec in zip(("query", "positive", "negative"), roles, strict=True):
            file = None
            if spec.get("file"):
                (root / str(index)).mkdir(exist_ok=True)
                make_jpeg(root / str(index) / f"{role}.jpg", seed=index)
                file = f"{index}/{role}.jpg"
            record[role] = {
                "url": spec["url"],
                "status": "ok" if file else "HTTP 404",
                "file": file,
                "sha1": spec.get("sha1", spec["url"] + "-sha") if file else None,
            }
        lines.append(json.dumps(record))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def img(url: str, ok: bool = True, **extra) -> dict:
    return {"url": url, "file": ok, **extra}


@pytest.fixture
def google(tmp_path) -> Path:
    root = tmp_path / "google"
    write_layout(
        root,
        [
            ("cats", img("Q1"), img("A"), img("B")),
            ("cats", img("Q1"), img("B"), img("C")),  # B is also Q1's negative: not a positive
            ("dogs", img("Q2"), img("D"), img("E")),
            ("cats", img("Q1"), img("F", ok=False), img("G")),  # positive failed to download
            ("cats", img("Q3", ok=False), img("H"), img("I")),  # no query: skipped
            ("cats", img("Q1-mirror", sha1="Q1-sha"), img("J"), img("K")),  # same picture as Q1
        ],
    )
    return root


def names(google: Path, triplets: list[Triplet]) -> list[tuple[str, str, str]]:
    """Each path back to its URL through the manifest, to read the assertions."""
    by_file = {}
    for line in (google / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        for role in ("query", "positive", "negative"):
            if record[role]["file"]:
                by_file[str(google / record[role]["file"])] = record[role]["url"]
    return [(by_file[t.query], by_file[t.positive], by_file[t.negative]) for t in triplets]


def test_google_layout_triplets_are_the_complete_records(google):
    assert names(google, google_layout_triplets(google)) == [
        ("Q1", "A", "B"),
        ("Q1", "B", "C"),
        ("Q2", "D", "E"),
        ("Q1-mirror", "J", "K"),
    ]


def test_google_sampling_never_uses_a_negative_as_a_positive_of_its_query(google):
    triplets, summary = sample_directory(google, num_pos=5, num_neg=3, seed=0)
    got = names(google, triplets)
    assert summary.layout == "google" and summary.conflicts == 1
    negatives_of = {"Q1": {"B", "C", "G", "K"}, "Q2": {"E"}}
    for query, positive, negative in got:
        query = "Q1" if query == "Q1-mirror" else query
        assert positive not in negatives_of[query]
        assert positive != query and negative != query
    q1 = [t for t in got if t[0] in ("Q1", "Q1-mirror")]
    # One group for Q1 (grouped by SHA-1): positives A and J, each with its own negatives first.
    assert {p for _, p, _ in q1} == {"A", "J"}
    assert {q for q, _, _ in q1} == {"Q1"}
    for positive in ("A", "J"):  # 3 of the group's 4 own negatives, no top-up needed
        chosen = [n for _, p, n in q1 if p == positive]
        assert len(chosen) == 3 and set(chosen) < {"B", "C", "G", "K"}
    q2 = [t for t in got if t[0] == "Q2"]
    assert len(q2) == 3 and q2[0][1] == "D"
    own, topped = {n for *_, n in q2} & {"E"}, {n for *_, n in q2} - {"E"}
    assert own == {"E"} and len(topped) == 2 and not topped & {"Q2", "D"}
    assert any("no query image" in s for s in summary.skipped)
    assert summary.queries == 2 and summary.classes == 2
    assert sample_directory(google, num_pos=5, num_neg=3, seed=0)[0] == triplets


def test_google_training_triplets_use_every_positive_and_own_negative(google):
    got = names(google, sample_google_layout(google, None, None, seed=3))
    assert sorted(got) == sorted(
        [("Q1", p, n) for p in ("A", "J") for n in ("B", "C", "G", "K")] + [("Q2", "D", "E")]
    )


# ---------------------------------------------------------------------------------------------
# CSV


def test_csv_round_trip_with_paths_relative_to_the_csv(tmp_path):
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    paths = [make_jpeg(tmp_path / "data" / "imgs" / f"{i}.jpg", seed=i) for i in range(3)]
    triplets = [Triplet(*paths), Triplet(paths[1], paths[0], paths[2])]
    csv_path = tmp_path / "data" / "out" / "triplets.csv"
    assert write_triplets_csv(triplets, csv_path) == 2
    assert csv_path.read_text().splitlines()[0] == "../imgs/0.jpg,../imgs/1.jpg,../imgs/2.jpg"
    assert read_triplets_csv(csv_path) == triplets
    (tmp_path / "data").rename(tmp_path / "moved")  # the CSV and its images move together
    moved = read_triplets_csv(tmp_path / "moved" / "out" / "triplets.csv")
    assert moved[0].query == str(tmp_path / "moved" / "imgs" / "0.jpg")
    with pytest.raises(InputError, match="augmented"):
        write_triplets_csv([Triplet(paths[0], paths[0], paths[1], augmented=True)], csv_path)


def test_read_triplets_csv_names_the_bad_line(tmp_path):
    a, b, c = (make_jpeg(tmp_path / f"{n}.jpg") for n in "abc")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{a},{b},{c}\n\n{a},{b}\n")
    with pytest.raises(InputError, match=r"line 3: expected 3 paths"):
        read_triplets_csv(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text(f"{a},{b},{c}\nx.jpg,{b},{c}\n")
    with pytest.raises(InputError, match=r"line 2: the query image .*x.jpg does not exist"):
        read_triplets_csv(missing)
    blank = tmp_path / "blank.csv"
    blank.write_text("\n\n")
    with pytest.raises(InputError, match="no triplets"):
        read_triplets_csv(blank)
    with pytest.raises(InputError, match="does not exist"):
        read_triplets_csv(tmp_path / "nope.csv")
    prototype = tmp_path / "proto.csv"  # the prototype's files: paths relative to another folder
    prototype.write_text("a.jpg,b.jpg,c.jpg\n")
    assert read_triplets_csv(prototype, base=tmp_path) == [Triplet(a, b, c)]


# ---------------------------------------------------------------------------------------------
# online samplers


def test_online_sampler_invariants_ratio_and_epochs():
    classes = fake_classes({"a": 4, "b": 5, "c": 3, "solo": 1})
    labels = label_of(classes)
    sampler = OnlineSampler(classes, in_class_negative_ratio=0.4, augment_ratio=0.2, seed=5)
    triplets = sampler.next_batch(13 * 40)
    in_class = 0
    for t in triplets:
        if t.augmented:
            assert t.positive == t.query
        else:
            assert t.positive != t.query and labels[t.positive] == labels[t.query]
        if labels[t.negative] == labels[t.query]:
            in_class += 1
            assert t.augmented and t.negative != t.query  # in-class: the positive is a copy
    assert 0.3 < in_class / len(triplets) < 0.5  # 0.4 of the queries with a class mate
    for epoch in range(40):  # every image is a query exactly once per epoch
        queries = [t.query for t in triplets[13 * epoch : 13 * (epoch + 1)]]
        assert sorted(queries) == sorted(labels)
    assert all(t.augmented for t in triplets if labels[t.query] == "solo")


def test_online_sampler_resumes_the_same_stream():
    classes = fake_classes({"a": 4, "b": 5, "c": 3})
    first = OnlineSampler(classes, in_class_negative_ratio=0.3, augment_ratio=0.3, seed=9)
    head = first.next_batch(10)
    state = json.loads(json.dumps(first.state_dict()))
    tail = first.next_batch(25)
    again = OnlineSampler(classes, in_class_negative_ratio=0.3, augment_ratio=0.3, seed=9)
    again.load_state_dict(state)
    assert again.next_batch(25) == tail
    fresh = OnlineSampler(classes, in_class_negative_ratio=0.3, augment_ratio=0.3, seed=9)
    assert fresh.next_batch(35) == head + tail
    other = OnlineSampler(classes, in_class_negative_ratio=0.3, augment_ratio=0.3, seed=8)
    with pytest.raises(InputError, match="seed"):
        other.load_state_dict(state)
    assert other.next_batch(35) != head + tail


def test_hard_negatives_are_the_nearest_images_of_other_classes():
    """The paper's golden-feature mining: with ratio 1, every out-of-class negative is one of
    the query's k nearest other-class images by the reference features."""
    import numpy as np

    classes = fake_classes({"a": 4, "b": 4, "c": 4})
    sampler = OnlineSampler(classes, hard_negative_ratio=1.0, seed=2)
    labels = np.asarray(sampler.class_of)
    features = np.random.default_rng(0).normal(size=(12, 6))
    sampler.set_hard_negatives(features, k=3)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    for i, row in enumerate(sampler.hard_negatives):
        assert (labels[row] != labels[i]).all()
        sims = unit[i] @ unit.T
        others = [j for j in np.argsort(-sims) if labels[j] != labels[i]]
        assert row.tolist() == others[:3]  # nearest first
    nearest = {
        sampler.paths[i]: {sampler.paths[j] for j in row}
        for i, row in enumerate(sampler.hard_negatives)
    }
    for t in sampler.next_batch(60):
        assert t.negative in nearest[t.query]
    state = sampler.state_dict()
    assert state["hard_negative_ratio"] == 1.0
    older = {k: v for k, v in state.items() if k != "hard_negative_ratio"}
    plain = OnlineSampler(classes, seed=2)
    plain.load_state_dict({**older, "position": 0})  # states saved before this setting resume
    with pytest.raises(InputError, match="hard_negative_ratio"):
        plain.load_state_dict(state)


def test_online_sampler_needs_two_classes():
    with pytest.raises(InputError, match="at least 2 classes"):
        OnlineSampler(fake_classes({"a": 5}))
    with pytest.raises(InputError, match="from 0 to 1"):
        OnlineSampler(fake_classes({"a": 2, "b": 2}), in_class_negative_ratio=1.5)


def test_list_sampler_shuffles_each_epoch_and_augments_at_its_ratio():
    triplets = [Triplet(f"q{i}", f"p{i}", f"n{i}") for i in range(10)]
    sampler = ListSampler(triplets, augment_ratio=0.5, seed=1)
    stream = sampler.next_batch(200)
    plain = [t for t in stream if not t.augmented]
    assert all(t in triplets for t in plain)
    assert all(
        t.positive == t.query and t.negative[1:] == t.query[1:] for t in stream if t.augmented
    )
    assert 60 < len(plain) < 140
    epochs = [sorted(t.query for t in stream[i : i + 10]) for i in range(0, 200, 10)]
    assert all(e == sorted(t.query for t in triplets) for e in epochs)
    assert [t.query for t in stream[:10]] != [t.query for t in stream[10:20]]
    again = ListSampler(triplets, augment_ratio=0.5, seed=1)
    again.load_state_dict({**sampler.state_dict(), "position": 50})
    assert again.next_batch(150) == stream[50:]


# ---------------------------------------------------------------------------------------------
# the command


def sample_app() -> typer.Typer:
    app = typer.Typer()
    app.command("sample")(sample)
    app.command("unused")(lambda: None)  # two commands keep "sample" as a sub-command
    return app


def test_sample_command_writes_the_csv_and_a_summary(tmp_path):
    for c in range(3):
        (tmp_path / "in" / f"class{c}").mkdir(parents=True)
        for i in range(3):
            make_jpeg(tmp_path / "in" / f"class{c}" / f"{i}.JPG", seed=10 * c + i)
    runner = CliRunner()
    out = tmp_path / "triplets.csv"
    args = ["sample", "--input-dir", str(tmp_path / "in"), "--output", str(out)]
    result = runner.invoke(sample_app(), [*args, "--num-pos", "2", "--num-neg", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote 36 triplets to {out} (3 classes, 9 images, 9 queries)")
    assert len(read_triplets_csv(out)) == 36
    result = runner.invoke(sample_app(), [*args, "--num-pos", "5", "--num-neg", "1", "--json"])
    summary = json.loads(result.stdout)
    assert (summary["triplets"], summary["short"], summary["layout"]) == (18, 9, "folders")
    result = runner.invoke(sample_app(), [*args, "--num-pos", "1", "--num-neg", "1", "--flat"])
    assert result.exit_code == 2 and "simsearch: error: no images found" in result.output
