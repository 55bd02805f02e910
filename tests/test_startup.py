"""Start-up cost: the light commands run in a fresh interpreter without ever importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import FakeFactory

from simsearch import library
from simsearch.collection import Collection

HEAVY = ("torch", "torchvision", "timm")

# Runs the Typer app in-process in a fresh interpreter; a finder records the stack of the first
# import of a heavy module, so a failure names the import chain to fix.
PROBE = """
import importlib.abc, json, sys, traceback
HEAVY = {heavy!r}
first = {{}}

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in HEAVY and name not in first:
            first[name] = "".join(traceback.format_stack(limit=25)[:-1])
        return None

sys.meta_path.insert(0, Watch())
from typer.testing import CliRunner
from simsearch.cli import app
result = CliRunner().invoke(app, {args!r})
print(json.dumps({{
    "exit_code": result.exit_code,
    "output": result.output,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY),
    "first_import": first,
}}))
"""


def run_probe(args: list[str]) -> dict:
    code = PROBE.format(heavy=HEAVY, args=args)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A small store built with the fake embedder (vectors, an index file, a failed file)."""
    root = tmp_path_factory.mktemp("startup")
    photos = root / "photos"
    photos.mkdir()
    from badfiles import make_jpeg

    for i in range(5):
        make_jpeg(photos / f"p{i}.jpg", seed=i, color=(40 * i, 100, 200 - 30 * i))
    (photos / "broken.jpg").write_bytes(b"not an image")
    store_dir = root / "store"
    with Collection.open(store_dir, write=True) as collection:
        summary = library.index_paths(collection, [photos], embedder_factory=FakeFactory())
    assert (summary.added, summary.failed) == (5, 1)
    return store_dir


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--help"], "Usage"),
        (["duplicates", "--help"], "Example: simsearch duplicates"),
        (["index", "--help"], "Example: simsearch index"),
        (["query", "--help"], "Example: simsearch query"),
        (["info", "--store", "STORE"], "indexed images:      5"),
        (["info", "--store", "STORE", "--json"], '"indexed": 5'),
    ],
)
def test_light_commands_never_import_torch(store, args, expected):
    args = [str(store) if a == "STORE" else a for a in args]
    probe = run_probe(args)
    assert probe["exit_code"] == 0, probe["output"]
    assert expected in " ".join(probe["output"].split()) or expected in probe["output"]
    assert probe["loaded"] == [], (
        f"`simsearch {' '.join(args)}` imported {probe['loaded']}; first import:\n"
        + "\n".join(f"{name}:\n{stack}" for name, stack in probe["first_import"].items())
    )
