"""The commands end to end with the real default model: Typer's runner and real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import badfiles
import pytest
from consistency import assert_consistent
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "images"
COMMANDS = [
    "index",
    "query",
    "distance",
    "info",
    "remove",
    "evaluate",
    "triplets fetch",
    "triplets import",
    "triplets sample",
    "train",
    "serve",
    "export imagecat",
    "duplicates",
]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(runner, command):
    result = invoke(runner, *command.split(), "--help")
    assert result.exit_code == 0
    assert "Example: simsearch " + command in " ".join(result.output.split())


@pytest.mark.parametrize("args", [["--help"], ["info", "--store", "STORE"]])
def test_help_and_info_start_without_importing_torch(tmp_path, args):
    args = [a.replace("STORE", str(tmp_path / "none")) for a in args]
    code = (
        "import sys\nfrom simsearch.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stderr.strip().splitlines()[-1] == "False", result.stderr


def test_index_takes_precision_and_compile_and_names_the_choices(runner, photos, tmp_path):
    store = str(tmp_path / "store")
    args = ["index", str(photos / "a"), "--store", store, "--device", "cpu"]
    result = invoke(runner, *args, "--precision", "fp32", "--compile", "off", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == 6
    bad = invoke(runner, *args[:2], "--store", store, "--reindex", "--compile", "sometimes")
    assert bad.exit_code != 0
    assert "unknown compile mode 'sometimes'; choose one of auto, on, off" in bad.stderr
    bad = invoke(runner, *args, "--reindex", "--precision", "fp16")
    assert bad.exit_code != 0
    assert "precision fp16 is not supported on cpu; use bf16 or fp32" in bad.stderr


def test_index_query_distance_info_remove(runner, photos, tmp_path):
    store = str(tmp_path / "store")
    badfiles.truncated_jpeg(photos)
    result = invoke(runner, "index", str(photos), "--store", store, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["added"], summary["failed"]) == (12, 1)
    assert summary["failures"][0]["path"].endswith("truncated.jpg")
    assert "truncated" in summary["failures"][0]["reason"]

    again = invoke(runner, "index", str(photos), "--store", store)
    assert again.exit_code == 0
    assert again.stdout.startswith("added 0, updated 0, moved 0, unchanged 12, removed 0, failed 1")
    assert "truncated.jpg" in again.stderr

    target = str(photos / "a" / "img03.jpg")
    result = invoke(
        runner,
        "query",
        target,
        str(photos / "b" / "img08.jpg"),
        "-k",
        "3",
        "--store",
        store,
        "--json",
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == [target, str(photos / "b" / "img08.jpg")]
    first = lines[0]["results"][0]
    assert set(first) == {"rank", "path", "sha1", "id", "distance"}
    assert (first["rank"], first["path"], first["distance"]) == (1, target, 0.0)
    assert [r["rank"] for r in lines[0]["results"]] == [1, 2, 3]

    table = invoke(runner, "query", first["sha1"], "-k", "2", "--store", store)
    assert table.exit_code == 0
    assert f"   1    0.0000  {first['sha1']}  {target}" in table.stdout

    result = invoke(runner, "distance", target, str(first["id"]), "--store", store, "--json")
    assert json.loads(result.stdout)["distance"] == 0.0
    result = invoke(runner, "distance", target, str(photos / "b" / "img11.jpg"), "--store", store)
    assert result.stdout.startswith("distance ") and "cosine" in result.stdout

    result = invoke(runner, "info", "--store", store, "--json")
    info = json.loads(result.stdout)
    assert (info["indexed"], info["failed"], info["dim"]) == (12, 1, 512)
    assert info["model_id"].startswith("deepranking-efficientnet_lite0-512-")

    result = invoke(runner, "remove", str(photos / "a"), "--store", store)
    assert result.stdout.strip() == "removed 6"
    assert len(assert_consistent(Path(store))) == 6


def test_store_from_the_environment(runner, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMSEARCH_STORE", str(tmp_path / "envstore"))
    assert invoke(runner, "index", str(photos / "a")).exit_code == 0
    assert (tmp_path / "envstore" / "simsearch.db").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["query", "missing.jpg"], "not an existing file"),
        (["query", "NOTES"], "cannot use the query image"),
        (["distance", "1", "99999"], "no indexed image has id 99999"),
        (["index", "no/such/folder"], "no such file or folder"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(runner, photos, tmp_path, args, words):
    store = str(tmp_path / "store")
    invoke(runner, "index", str(photos / "a"), "--store", store)
    notes = badfiles.text_named_jpg(tmp_path)
    args = [notes if a == "NOTES" else a for a in args]
    result = invoke(runner, *args, "--store", store)
    assert result.exit_code != 0
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("simsearch: error: ") and words in line


def test_query_before_any_index_says_what_to_run(runner, tmp_path):
    image = badfiles.make_jpeg(tmp_path / "q.jpg")
    result = invoke(runner, "query", image, "--store", str(tmp_path / "empty"))
    assert result.exit_code != 0
    assert "simsearch index" in result.stderr


def test_changing_the_model_asks_for_reindex_with_the_command(runner, photos, tmp_path):
    store = str(tmp_path / "store")
    invoke(runner, "index", str(photos / "a"), "--store", store)
    result = invoke(
        runner, "index", str(photos / "a"), "--store", store, "--model", "convnet-resnet50"
    )
    # Offline, the resnet50 weights cannot be fetched: the message says how to pass them.
    assert result.exit_code != 0
    assert "--backbone-weights" in result.stderr or "--reindex" in result.stderr


def test_real_subprocess_index_and_query(photos, tmp_path):
    store = str(tmp_path / "store")
    env = {**os.environ, "SIMSEARCH_STORE": store}
    index = subprocess.run(
        [sys.executable, "-m", "simsearch", "index", str(photos), "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert index.returncode == 0, index.stderr
    assert json.loads(index.stdout)["added"] == 12
    query = subprocess.run(
        [
            sys.executable,
            "-m",
            "simsearch",
            "query",
            str(photos / "a" / "img00.jpg"),
            "-k",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert query.returncode == 0, query.stderr
    (line,) = query.stdout.splitlines()
    assert json.loads(line)["results"][0]["distance"] == 0.0
    missing = subprocess.run(
        [sys.executable, "-m", "simsearch", "query", "nope.jpg"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1


def test_sample_near_duplicates_find_their_originals(runner, tmp_path):
    """The README's demo: each edited copy among the samples finds its original next to itself."""
    store = str(tmp_path / "store")
    assert invoke(runner, "index", str(SAMPLES), "--store", store).exit_code == 0
    pairs = {
        "coffee-small-recompressed.jpg": "coffee.jpg",
        "chelsea-crop.jpg": "chelsea.jpg",
        "rocket-flipped.jpg": "rocket.jpg",
        "astronaut-brighter.jpg": "astronaut.jpg",
        "ladybird-crop.jpg": "ladybird.jpg",
        "dandelions-grayscale.jpg": "dandelions.jpg",
    }
    result = invoke(
        runner,
        "query",
        *[str(SAMPLES / copy) for copy in pairs],
        "-k",
        "2",
        "--store",
        store,
        "--json",
    )
    for line, original in zip(result.stdout.splitlines(), pairs.values(), strict=True):
        results = json.loads(line)["results"]
        assert results[0]["distance"] == 0.0
        assert Path(results[1]["path"]).name == original, results


def test_edited_copies_outside_the_store_find_their_original(runner, photos, tmp_path):
    store = str(tmp_path / "store")
    invoke(runner, "index", str(SAMPLES), "--store", store)
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("nuthatch.jpg", "forest-stream.jpg", "wall-clock.jpg"):
        with Image.open(SAMPLES / name) as im:
            small = im.resize((im.width // 2, im.height // 2))
            small.save(edited / name, quality=50)
    result = invoke(
        runner,
        "query",
        *sorted(str(p) for p in edited.iterdir()),
        "-k",
        "1",
        "--store",
        store,
        "--json",
    )
    for line in result.stdout.splitlines():
        obj = json.loads(line)
        assert Path(obj["results"][0]["path"]).name == Path(obj["query"]).name


def test_moved_folder_keeps_vectors_through_the_cli(runner, photos, tmp_path):
    store = str(tmp_path / "store")
    invoke(runner, "index", str(photos), "--store", store)
    shutil.move(photos / "a", photos / "renamed")
    result = invoke(runner, "index", str(photos), "--store", store, "--json")
    summary = json.loads(result.stdout)
    assert (summary["moved"], summary["unchanged"], summary["added"]) == (6, 6, 0)


def test_distance_between_two_files_needs_no_store(runner, photos, tmp_path):
    """The prototype's get_distance: two image files, embedded with the default model."""
    a, b = str(photos / "a" / "img00.jpg"), str(photos / "b" / "img11.jpg")
    nowhere = str(tmp_path / "no-store")
    same = invoke(runner, "distance", a, a, "--store", nowhere, "--json")
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["distance"] == pytest.approx(0.0, abs=1e-6)
    other = json.loads(invoke(runner, "distance", a, b, "--store", nowhere, "--json").stdout)
    assert 0 < other["distance"] <= 2
    assert other["distance"] ** 2 == pytest.approx(2 - 2 * other["cosine"], abs=1e-5)
    assert not (tmp_path / "no-store").exists()  # nothing was created
    result = invoke(runner, "distance", a, "42", "--store", nowhere)
    assert result.exit_code != 0 and "without an index only files" in result.stderr
