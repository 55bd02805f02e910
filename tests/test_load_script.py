"""bin/load-test: its figures, and short runs against a real server (in-process, or its own)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import badfiles
import pytest
from fakes import FakeFactory
from liveserver import live_server

from simsearch import library
from simsearch.collection import Collection

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bin" / "load-test"
SAMPLES = REPO / "samples" / "images"


def load_script():
    loader = importlib.machinery.SourceFileLoader("load_test", str(SCRIPT))
    spec = importlib.util.spec_from_loader("load_test", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = module  # dataclasses look their module up while decorating
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


def test_percentiles_are_nearest_rank(script):
    values = [float(v) for v in range(1, 101)]
    assert script.percentile(values, 50) == 50
    assert script.percentile(values, 95) == 95
    assert script.percentile(values, 99) == 99
    assert script.percentile(values, 100) == 100
    assert script.percentile([7.0], 99) == 7
    assert math.isnan(script.percentile([], 50))


def test_mix_parsing_keeps_positive_weights_and_names_the_kinds(script):
    assert script.parse_mix("nn-uuid=3, count=1,similar=0") == {"nn-uuid": 3.0, "count": 1.0}
    assert script.parse_mix("count") == {"count": 1.0}
    with pytest.raises(script.LoadTestError, match="nn-uuid"):
        script.parse_mix("nn=1")
    with pytest.raises(script.LoadTestError, match="positive"):
        script.parse_mix("count=0")


def test_summary_counts_errors_by_status_and_times_only_successes(script):
    samples = [
        script.Sample("count", 0.010, "ok"),
        script.Sample("count", 0.030, "ok"),
        script.Sample("similar", 0.020, "ok"),
        script.Sample("similar", 5.000, "503"),
        script.Sample("similar", 9.000, "timeout"),
    ]
    report = script.summarise(samples, elapsed_s=2.0)
    assert (report["requests"], report["requests_per_s"], report["errors"]) == (5, 2.5, 2)
    assert report["errors_by_status"] == {"503": 1, "timeout": 1}
    assert report["latency_ms"]["max"] == 30.0
    assert report["kinds"]["similar"]["errors"] == 2
    assert report["kinds"]["count"]["latency_ms"]["p50"] == 10.0
    assert set(report["kinds"]) == {"count", "similar"}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> tuple[Path, Path, FakeFactory]:
    root = tmp_path_factory.mktemp("load")
    photos = root / "photos"
    photos.mkdir()
    for i in range(8):
        colour = (30 * i % 256, 255 - 25 * i, (90 + 40 * i) % 256)
        badfiles.make_jpeg(photos / f"img{i}.jpg", size=(80, 60), color=colour, seed=i)
    factory = FakeFactory()
    with Collection.open(root / "store", write=True) as collection:
        library.index_paths(collection, [str(photos)], embedder_factory=factory)
    return root / "store", photos, factory


def test_a_short_run_against_a_live_server_reports_every_kind(small_store):
    from simsearch.service.app import create_app
    from simsearch.service.settings import ServiceSettings

    store, photos, factory = small_store
    embedded_before = len(factory.embedded)
    app = create_app(ServiceSettings(store=store, embedder_factory=factory))
    with live_server(app) as url:
        result = run_script(
            url, "--seconds", "2", "--clients", "3", "--images", str(photos), "-k", "5", "--json"
        )
    assert result.returncode == 0, result.stderr
    assert len(factory.embedded) == embedded_before  # indexed images: stored vectors, no model
    report = json.loads(result.stdout)
    assert report["errors"] == 0, report["errors_by_status"]
    assert report["requests"] > 0 and report["requests_per_s"] > 0
    assert set(report["kinds"]) == {"nn-uuid", "nn-base64", "similar", "query-upload", "count"}
    for figures in [report, *report["kinds"].values()]:
        latency = figures["latency_ms"]
        assert figures["requests"] > 0
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert report["server"]["ready"] is True
    assert "running 3 clients" in result.stderr


def test_table_output_names_the_figures(small_store):
    from simsearch.service.app import create_app
    from simsearch.service.settings import ServiceSettings

    store, photos, factory = small_store
    app = create_app(ServiceSettings(store=store, embedder_factory=factory))
    with live_server(app) as url:
        result = run_script(
            url, "--seconds", "0.5", "--clients", "2", "--images", str(photos), "--mix", "count"
        )
    assert result.returncode == 0, result.stderr
    assert "req/s" in result.stdout and "p99" in result.stdout
    assert result.stdout.splitlines()[-1].split()[0] == "count"


def test_new_images_make_the_server_embed_every_upload(small_store):
    from simsearch.service.app import create_app
    from simsearch.service.settings import ServiceSettings

    store, photos, factory = small_store
    embedded_before = len(factory.embedded)
    app = create_app(ServiceSettings(store=store, embedder_factory=factory))
    mix = "query-upload=1,nn-base64=1"
    with live_server(app) as url:
        result = run_script(
            url, "--seconds", "1", "--clients", "2", "--images", str(photos), "--mix", mix,
            "--new-images", "--json",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["errors"] == 0 and report["new_images"] is True
    # Every timed request plus the two preflight ones was embedded by the model.
    assert len(factory.embedded) - embedded_before == report["requests"] + 2


def test_an_unreachable_server_fails_in_one_line(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nobody listens there
    result = run_script(f"http://127.0.0.1:{port}", "--seconds", "1", "--images", str(SAMPLES))
    assert result.returncode == 1
    assert result.stderr.startswith("load-test: error: cannot reach http://127.0.0.1:")
    assert result.stdout == ""


@pytest.mark.slow
def test_start_store_serves_a_real_store_and_stops_the_server(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee.jpg", "chelsea.jpg", "rocket.jpg", "ladybird.jpg"):
        (photos / name).write_bytes((SAMPLES / name).read_bytes())
    store = tmp_path / "store"
    indexed = subprocess.run(
        [sys.executable, "-m", "simsearch", "index", str(photos), "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert indexed.returncode == 0, indexed.stderr
    result = run_script(
        "--start-store",
        str(store),
        "--seconds",
        "1",
        "--clients",
        "2",
        "--images",
        str(photos),
        "--json",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["errors"] == 0, report["errors_by_status"]
    assert report["server"]["indexed"] == 4
    port = int(report["url"].rsplit(":", 1)[1])
    with socket.socket() as sock:  # the server it started is gone
        assert sock.connect_ex(("127.0.0.1", port)) != 0
