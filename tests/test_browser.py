"""The web page in a real headless Chromium: upload, grid of results, click to search, screenshot.

Drives Debian's `chromium` with Playwright (never a downloaded browser) against a real server on
a loopback port, with the fake embedder and eight small images in distinct colours. Without
chromium the test fails, saying how to install it: CI installs it (.ci/run).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import badfiles
import numpy as np
import pytest
from fakes import FakeFactory
from liveserver import live_server
from PIL import Image

from simsearch import library
from simsearch.collection import Collection
from simsearch.images import sha1_file

CHROMIUM = Path(os.environ.get("SIMSEARCH_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--headless=new", "--disable-dev-shm-usage"]
COLOURS = [
    (220, 30, 30),
    (30, 180, 40),
    (30, 60, 220),
    (240, 220, 20),
    (200, 30, 200),
    (20, 200, 210),
    (250, 140, 10),
    (110, 40, 160),
]
TIMEOUT_MS = 20_000
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> dict:
    """Eight indexed images, a fresh query image like the first, and the server's URL."""
    root = tmp_path_factory.mktemp("browser")
    photos = root / "photos"
    photos.mkdir()
    for i, colour in enumerate(COLOURS):
        badfiles.make_jpeg(photos / f"colour{i}.jpg", size=(96, 72), color=colour, seed=i)
    query = badfiles.make_jpeg(root / "query.jpg", size=(96, 72), color=COLOURS[0], seed=100)
    store = root / "store"
    factory = FakeFactory()
    with Collection.open(store, write=True) as collection:
        library.index_paths(collection, [str(photos)], embedder_factory=factory)
    sha1s = {sha1_file(p) for p in photos.iterdir()}
    return {"store": store, "query": query, "sha1s": sha1s, "factory": factory}


@pytest.fixture(scope="module")
def server_url(gallery) -> Iterator[str]:
    from simsearch.service.app import create_app
    from simsearch.service.settings import ServiceSettings

    settings = ServiceSettings(store=gallery["store"], embedder_factory=gallery["factory"])
    with live_server(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"Debian's chromium is not installed at {CHROMIUM}; install it with "
            "`apt-get install chromium` (as root), or set SIMSEARCH_CHROMIUM to its path",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, server_url):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server_url + "/")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def results(page) -> list[dict]:
    """Each result figure's SHA-1, caption text and whether its thumbnail decoded."""
    return page.eval_on_selector_all(
        "#results figure.result",
        """figures => figures.map(f => {
            const img = f.querySelector('img');
            return {
                sha1: f.dataset.sha1,
                caption: (f.querySelector('figcaption') || {}).textContent || '',
                src: img ? img.getAttribute('src') : null,
                loaded: !!img && img.complete && img.naturalWidth > 0,
            };
        })""",
    )


def distance(caption: str) -> float:
    numbers = NUMBER.findall(caption)
    assert numbers, f"no distance in the caption {caption!r}"
    return float(numbers[-1])


def wait_for_thumbnails(page) -> None:
    page.wait_for_function(
        """() => {
            const imgs = [...document.querySelectorAll('#results figure.result img')];
            return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }"""
    )


def test_upload_shows_the_grid_and_a_click_searches_from_a_result(page, gallery):
    assert page.locator("#file").count() == 1
    assert page.locator("#status").count() == 1

    page.set_input_files("#file", gallery["query"])
    page.wait_for_selector("#results figure.result")
    page.wait_for_function(
        "n => document.querySelectorAll('#results figure.result').length === n",
        arg=len(COLOURS),
    )
    wait_for_thumbnails(page)
    found = results(page)
    assert len(found) == len(COLOURS)
    assert {r["sha1"] for r in found} == gallery["sha1s"]
    assert all(r["src"].endswith("/thumbnails/" + r["sha1"]) for r in found)
    assert all(r["loaded"] for r in found)
    distances = [distance(r["caption"]) for r in found]
    assert distances == sorted(distances)
    assert 0 < distances[0] < distances[-1] <= 2  # the query is not indexed
    status_after_upload = page.inner_text("#status")

    clicked = found[-1]["sha1"]
    with page.expect_request(lambda r: "/api/similar" in r.url and clicked in r.url):
        page.click(f'#results figure.result[data-sha1="{clicked}"]')
    page.wait_for_function(
        "sha1 => document.querySelector('#results figure.result')?.dataset.sha1 === sha1",
        arg=clicked,
    )
    wait_for_thumbnails(page)
    again = results(page)
    assert again[0]["sha1"] == clicked and distance(again[0]["caption"]) == 0
    assert [r["sha1"] for r in again] != [r["sha1"] for r in found]
    assert [distance(r["caption"]) for r in again] == sorted(distance(r["caption"]) for r in again)
    assert page.inner_text("#status") != status_after_upload

    shot = Image.open(io.BytesIO(page.locator("#results").screenshot())).convert("RGB")
    assert shot.width > 200 and shot.height > 50
    pixels = np.asarray(shot).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = tuple(colours[counts.argmax()])
    assert 1 - counts.max() / len(pixels) > 0.3, f"the grid is mostly one colour {background}"
    coarse = np.unique(pixels // 32, axis=0)
    assert len(coarse) >= 50, "the screenshot of the grid shows too few colours"


def test_a_file_that_is_not_an_image_gets_a_message_not_a_grid(page, tmp_path):
    bad = badfiles.text_named_jpg(tmp_path)
    with page.expect_response(lambda r: "/api/query" in r.url) as answer:
        page.set_input_files("#file", bad)
    assert 400 <= answer.value.status < 500
    detail = answer.value.json()["detail"]
    page.wait_for_function(
        "detail => document.querySelector('#status').textContent.includes(detail)", arg=detail
    )
    assert page.locator("#results figure.result").count() == 0
