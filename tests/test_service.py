"""The HTTP service's JSON API, web page, token, writer lock and reload, with a fake embedder."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import badfiles
import numpy as np
import pytest
from fakes import FakeEmbedder, FakeFactory
from fastapi.testclient import TestClient

from simsearch import library
from simsearch.collection import Collection
from simsearch.service.app import create_app
from simsearch.service.settings import ServiceSettings

TOKEN = "correct-horse-battery-staple"


def index(store: Path, roots, factory=None) -> library.IndexSummary:
    with Collection.open(store, write=True) as collection:
        return library.index_paths(collection, roots, embedder_factory=factory or FakeFactory())


def sha1_of(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def indexed(photos: Path, store_dir: Path) -> Path:
    index(store_dir, [photos])
    return store_dir


@pytest.fixture
def factory() -> FakeFactory:
    return FakeFactory()


def make_client(store: Path, factory: FakeFactory, **kwargs) -> TestClient:
    settings = ServiceSettings(store=store, embedder_factory=factory, **kwargs)
    return TestClient(create_app(settings))


@pytest.fixture
def client(indexed: Path, factory: FakeFactory) -> Iterator[TestClient]:
    with make_client(indexed, factory, token=TOKEN) as client:
        yield client


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(client: TestClient, data: bytes, name: str = "q.jpg", k: int | None = None):
    url = "/api/query" if k is None else f"/api/query?k={k}"
    return client.post(url, files={"file": (name, data, "image/jpeg")})


# -- health --------------------------------------------------------------------------------
def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["indexed"] == 12 and body["model"] == "fake-48-0001"


class GatedFactory(FakeFactory):
    """Embedders whose query embeddings wait for a gate, counting how many run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.inside = threading.Semaphore(0)
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __call__(self, spec: str):
        embedder = super().__call__(spec)
        embed_images = embedder.embed_images

        def gated(images, batch_size: int = 32):
            with self._lock:
                self.running += 1
                self.most = max(self.most, self.running)
            self.inside.release()
            try:
                assert self.gate.wait(10)
                return embed_images(images, batch_size)
            finally:
                with self._lock:
                    self.running -= 1

        embedder.embed_images = gated
        return embedder


def test_query_embeddings_are_bounded_and_the_others_wait_then_get_503(indexed) -> None:
    gated = GatedFactory()
    with (
        make_client(indexed, gated, max_concurrent_embeddings=2, embed_wait=0.2) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        held = [pool.submit(upload, client, badfiles.jpeg_bytes(seed=s)) for s in (1, 2)]
        assert gated.inside.acquire(timeout=10) and gated.inside.acquire(timeout=10)
        busy = upload(client, badfiles.jpeg_bytes(seed=3))
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "5"
        assert "--max-concurrent-embeddings" in busy.json()["detail"]
        data = base64.b64encode(badfiles.jpeg_bytes(seed=4)).decode()
        smqtk = client.post(f"/compute/base64://{data}")  # ImageSpace's calls wait alike
        assert smqtk.status_code == 503 and smqtk.json()["success"] is False
        gated.gate.set()
        assert [f.result().status_code for f in held] == [200, 200]
        assert upload(client, badfiles.jpeg_bytes(seed=3)).status_code == 200
    assert gated.most == 2


def test_preload_loads_the_model_once_at_start_up(indexed, factory):
    with make_client(indexed, factory, preload_model=True) as client:
        assert len(factory.loads) == 1
        assert client.get("/readyz").json()["models_loaded"] == [factory.loads[0]]
        assert upload(client, badfiles.jpeg_bytes(seed=42)).status_code == 200
    assert len(factory.loads) == 1


def test_readyz_is_503_without_a_store_and_queries_say_how_to_make_one(tmp_path, factory):
    with make_client(tmp_path / "nothing", factory) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False
        assert "simsearch index" in ready.json()["detail"]
        answer = upload(client, badfiles.jpeg_bytes())
        assert answer.status_code == 503
        assert "simsearch index" in answer.json()["detail"]
        assert client.get("/healthz").status_code == 200
        assert client.get("/count").json() == {"count": 0}


def test_a_store_indexed_after_start_is_picked_up(tmp_path, photos, factory):
    store = tmp_path / "later-store"
    with make_client(store, factory) as client:
        assert client.get("/readyz").status_code == 503
        index(store, [photos])
        assert client.get("/readyz").status_code == 200
        assert client.get("/count").json() == {"count": 12}


def test_empty_store_is_not_ready(tmp_path, factory):
    Collection.open(tmp_path / "empty", write=True).close()
    with make_client(tmp_path / "empty", factory) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/api/query?id=1").status_code == 503


# -- queries ---------------------------------------------------------------------------------
def test_upload_of_an_indexed_image_finds_itself_first(client, photos):
    target = photos / "a" / "img03.jpg"
    answer = upload(client, target.read_bytes(), "img03.jpg", k=5)
    assert answer.status_code == 200
    body = answer.json()
    assert body["query"] == "img03.jpg"
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert results[0]["path"] == str(target)
    assert results[0]["sha1"] == sha1_of(target)
    assert results[0]["distance"] == 0.0
    assert results[0]["thumbnail"] == f"/thumbnails/{sha1_of(target)}"
    assert set(results[0]) == {"rank", "id", "sha1", "path", "distance", "thumbnail"}
    distances = [r["distance"] for r in results]
    assert distances == sorted(distances)


def test_upload_of_a_new_image_is_embedded_with_the_store_model_loaded_once(client, factory):
    for seed in (101, 102, 103):
        answer = upload(client, badfiles.jpeg_bytes(seed=seed), k=3)
        assert answer.status_code == 200
        assert len(answer.json()["results"]) == 3
        assert answer.json()["results"][0]["distance"] > 0.0
    assert len(factory.loads) == 1  # one model load for the server's life
    assert len(factory.embedded) == 3


def test_default_k_is_ten_and_k_above_the_collection_gives_all(client):
    data = badfiles.jpeg_bytes(seed=5)
    assert len(upload(client, data).json()["results"]) == 10
    assert len(upload(client, data, k=500).json()["results"]) == 12


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"just some text, not a picture", "not an image"),
        (badfiles.jpeg_bytes(size=(200, 150))[:400], "not a usable image"),
    ],
    ids=["empty", "text", "truncated"],
)
def test_corrupt_or_non_image_upload_is_415_with_a_clear_message(client, data, words):
    answer = upload(client, data)
    assert answer.status_code == 415
    detail = answer.json()["detail"]
    assert words in detail
    assert "send a JPEG" in detail


def test_upload_errors_are_4xx_json(client):
    missing = client.post("/api/query")
    assert missing.status_code == 422
    assert "file" in missing.json()["detail"]
    assert isinstance(missing.json()["detail"], str)
    bad_k = upload(client, badfiles.jpeg_bytes(), k=0)
    assert bad_k.status_code == 422
    assert "k" in bad_k.json()["detail"]
    assert client.post("/api/query?k=abc", files={"file": ("a.jpg", b"x")}).status_code == 422


def test_oversized_upload_is_413(indexed, factory):
    with make_client(indexed, factory, max_upload_bytes=2000) as client:
        big = badfiles.jpeg_bytes(size=(300, 300), seed=1)
        assert len(big) > 2000
        answer = upload(client, big)
        assert answer.status_code == 413
        assert "--max-upload-bytes" in answer.json()["detail"]
        assert factory.embedded == []


def test_upload_body_far_over_the_limit_is_refused_before_it_is_read(indexed, factory):
    with make_client(indexed, factory, max_upload_bytes=1000) as client:
        answer = upload(client, b"\xff" * 200_000)
        assert answer.status_code == 413
        assert "limit" in answer.json()["detail"]


def test_image_with_too_many_pixels_is_413(indexed, factory, tmp_path):
    huge = Path(badfiles.huge_png(tmp_path)).read_bytes()
    with make_client(indexed, factory) as client:
        answer = upload(client, huge, "huge.png")
        assert answer.status_code == 413
        assert "pixels" in answer.json()["detail"]
    with make_client(indexed, factory, max_pixels=1000) as client:
        answer = upload(client, badfiles.jpeg_bytes(size=(64, 48)))
        assert answer.status_code == 413
        assert "3,072 pixels" in answer.json()["detail"]


def test_query_by_id_and_by_sha1(client, photos):
    target = photos / "b" / "img07.jpg"
    sha1 = sha1_of(target)
    by_sha1 = client.get(f"/api/query?id={sha1}&k=4").json()
    assert by_sha1["query"] == sha1
    assert by_sha1["results"][0]["sha1"] == sha1
    image_id = by_sha1["results"][0]["id"]
    by_id = client.get(f"/api/query?id={image_id}&k=4").json()
    assert [r["id"] for r in by_id["results"]] == [r["id"] for r in by_sha1["results"]]
    assert client.get(f"/api/query?id={sha1.upper()}&k=4").status_code == 200


@pytest.mark.parametrize(
    ("ref", "status"),
    [("999999", 404), ("0" * 40, 404), ("not-an-id", 400), ("/etc/passwd", 400), ("../x", 400)],
)
def test_query_by_unknown_or_malformed_id(client, ref, status):
    answer = client.get("/api/query", params={"id": ref})
    assert answer.status_code == status
    assert isinstance(answer.json()["detail"], str)


def test_query_needs_an_id(client):
    answer = client.get("/api/query")
    assert answer.status_code == 422
    assert "id" in answer.json()["detail"]


def test_similar_starts_with_the_image_itself(client, photos):
    sha1 = sha1_of(photos / "a" / "img01.jpg")
    body = client.get(f"/api/similar?id={sha1}&n=3").json()
    assert [r["rank"] for r in body["results"]] == [1, 2, 3]
    assert body["results"][0]["sha1"] == sha1
    assert body["results"][0]["distance"] == 0.0
    assert client.get(f"/api/similar?id={sha1}&n=0").status_code == 422
    assert client.get("/api/similar?id=" + "f" * 40).status_code == 404


def test_distance(client, photos):
    a, b = sha1_of(photos / "a" / "img00.jpg"), sha1_of(photos / "b" / "img09.jpg")
    same = client.get(f"/api/distance?a={a}&b={a}").json()
    assert same["distance"] == pytest.approx(0.0, abs=1e-6)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6)
    body = client.get(f"/api/distance?a={a}&b={b}").json()
    assert set(body) == {"a", "b", "distance", "cosine"}
    assert body["a"] == a and body["b"] == b
    assert 0.0 < body["distance"] <= 2.0
    assert body["distance"] ** 2 == pytest.approx(2 - 2 * body["cosine"], abs=1e-5)
    assert client.get(f"/api/distance?a={a}&b=" + "0" * 40).status_code == 404
    assert client.get(f"/api/distance?a={a}&b=/etc/hosts").status_code == 400
    assert client.get(f"/api/distance?a={a}").status_code == 422


def test_image_metadata(client, photos):
    target = photos / "a" / "img02.jpg"
    sha1 = sha1_of(target)
    body = client.get(f"/api/images/{sha1}").json()
    assert body["sha1"] == sha1
    assert body["path"] == str(target)
    assert (body["width"], body["height"]) == (64, 48)
    assert body["size"] == target.stat().st_size
    assert body["thumbnail"] == f"/thumbnails/{sha1}"
    assert client.get(f"/api/images/{body['id']}").json() == body
    assert client.get("/api/images/424242").status_code == 404
    assert client.get("/api/images/bogus").status_code == 400


# -- thumbnails --------------------------------------------------------------------------------
def test_thumbnails_of_indexed_images(client, photos):
    from PIL import Image

    sha1 = sha1_of(photos / "a" / "img00.jpg")
    answer = client.get(f"/thumbnails/{sha1}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "image/jpeg"
    import io

    image = Image.open(io.BytesIO(answer.content))
    assert image.format == "JPEG" and image.size == (64, 48)  # never enlarged
    small = Image.open(io.BytesIO(client.get(f"/thumbnails/{sha1}?size=16").content))
    assert max(small.size) == 16
    assert client.get(f"/thumbnails/{sha1}?size=4000").status_code == 422
    assert client.get("/thumbnails/" + "0" * 40).status_code == 404
    assert client.get("/thumbnails/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.get("/thumbnails/etc").status_code == 404


def test_thumbnail_of_a_changed_file_is_404(client, photos):
    target = photos / "a" / "img04.jpg"
    sha1 = sha1_of(target)
    badfiles.make_jpeg(target, seed=500, size=(80, 80))
    answer = client.get(f"/thumbnails/{sha1}")
    assert answer.status_code == 404
    assert "simsearch index" in answer.json()["detail"]


# -- the web page and the docs ---------------------------------------------------------------
def test_page_and_its_assets(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    for needle in ('id="file"', 'type="file"', 'id="results"', 'id="status"', "/static/app.js"):
        assert needle in html
    script = client.get("/static/app.js")
    assert script.status_code == 200
    for needle in ("/api/query", "/api/similar", "figure", "figcaption", "dataset.sha1"):
        assert needle in script.text
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    for path in (
        "/api/query",
        "/api/similar",
        "/api/distance",
        "/api/images/{ref}",
        "/api/images",
        "/api/images/remove",
        "/thumbnails/{sha1}",
        "/healthz",
        "/readyz",
        "/nn/{spec}",
        "/compute/{uri}",
        "/count",
    ):
        assert path in spec["paths"], path
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/docs-assets/swagger-ui-bundle.js" in docs.text  # served locally: works offline
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


# -- changing the store --------------------------------------------------------------------------
def test_changes_are_off_without_a_configured_token(indexed, factory, photos):
    with make_client(indexed, factory) as client:
        answer = client.post("/api/images", json={"paths": [str(photos)]}, headers=auth())
        assert answer.status_code == 403
        assert "--token" in answer.json()["detail"]
        assert client.post("/api/images/remove", json={"ids": [1]}).status_code == 403


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong-horse-battery-staple!"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": TOKEN},
    ],
    ids=["none", "empty", "wrong", "basic", "prefix", "no-scheme"],
)
def test_wrong_or_missing_token_is_401(client, photos, headers):
    for path, body in (("/api/images", {"paths": [str(photos)]}), ("/api/images/remove", {})):
        answer = client.post(path, json=body, headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
    assert client.post("/api/images", headers=headers).status_code == 401  # before the body


def test_add_images_with_the_token(client, photos, tmp_path):
    more = tmp_path / "more"
    more.mkdir()
    badfiles.make_jpeg(more / "new1.jpg", seed=201)
    badfiles.make_png(more / "new2.png", seed=202)
    badfiles.text_named_jpg(more)
    answer = client.post("/api/images", json={"paths": [str(more)]}, headers=auth())
    assert answer.status_code == 200
    summary = answer.json()
    assert (summary["added"], summary["failed"]) == (2, 1)
    assert summary["failures"][0]["path"].endswith("notes.jpg")
    assert client.get("/count").json() == {"count": 14}
    found = client.get(f"/api/similar?id={sha1_of(more / 'new1.jpg')}&n=1").json()
    assert found["results"][0]["path"] == str(more / "new1.jpg")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"paths": ["relative/folder"]}, 400),
        ({"paths": ["/no/such/folder/anywhere"]}, 400),
        ({"paths": []}, 422),
        ({}, 422),
        ({"paths": "not-a-list"}, 422),
    ],
)
def test_add_images_bad_input(client, body, status):
    answer = client.post("/api/images", json=body, headers=auth())
    assert answer.status_code == status
    assert isinstance(answer.json()["detail"], str)


def test_remove_images_by_id_sha1_and_path(client, photos):
    sha1 = sha1_of(photos / "a" / "img00.jpg")
    image_id = client.get(f"/api/images/{sha1_of(photos / 'a' / 'img01.jpg')}").json()["id"]
    answer = client.post(
        "/api/images/remove", json={"ids": [sha1, image_id, "f" * 40]}, headers=auth()
    )
    assert answer.status_code == 200
    assert answer.json() == {"removed": 2, "not_found": ["f" * 40]}
    assert client.get(f"/api/images/{sha1}").status_code == 404
    assert client.get(f"/thumbnails/{sha1}").status_code == 404
    by_path = client.post(
        "/api/images/remove",
        json={"paths": [str(photos / "b"), str(photos / "zzz")]},
        headers=auth(),
    )
    assert by_path.json() == {"removed": 6, "not_found": [str(photos / "zzz")]}
    assert client.get("/count").json() == {"count": 4}
    assert photos.joinpath("a", "img00.jpg").exists()  # the files stay


@pytest.mark.parametrize(
    "body",
    [{"ids": [1], "paths": ["/x"]}, {}, {"paths": ["rel"]}, {"ids": ["bogus"]}],
    ids=["both", "neither", "relative", "malformed-id"],
)
def test_remove_images_bad_input(client, body):
    answer = client.post("/api/images/remove", json=body, headers=auth())
    assert answer.status_code == 400
    assert isinstance(answer.json()["detail"], str)


def test_changes_while_another_writer_holds_the_store_are_409(client, indexed, photos):
    with Collection.open(indexed, write=True):
        for path, body in (
            ("/api/images", {"paths": [str(photos)]}),
            ("/api/images/remove", {"ids": [1]}),
        ):
            answer = client.post(path, json=body, headers=auth())
            assert answer.status_code == 409
            assert "another simsearch process is writing" in answer.json()["detail"]
        assert upload(client, badfiles.jpeg_bytes(seed=3)).status_code == 200  # queries go on


# -- reload --------------------------------------------------------------------------------------
def test_the_next_request_sees_images_indexed_meanwhile(client, photos, indexed, tmp_path):
    assert client.get("/count").json() == {"count": 12}
    more = tmp_path / "later"
    more.mkdir()
    new = Path(badfiles.make_jpeg(more / "late.jpg", seed=300))
    index(indexed, [more])
    assert client.get("/count").json() == {"count": 13}
    found = upload(client, new.read_bytes(), k=1).json()["results"]
    assert found[0]["path"] == str(new) and found[0]["distance"] == 0.0
    assert client.get(f"/api/images/{sha1_of(new)}").status_code == 200
    assert client.app.state.service.reloads == 1

    with Collection.open(indexed, write=True) as collection:
        library.remove(collection, [str(more)])
    assert client.get("/count").json() == {"count": 12}
    assert client.get(f"/api/images/{sha1_of(new)}").status_code == 404


class _PausingEmbedder(FakeEmbedder):
    """Embeds the first batch, then waits until told to go on (a re-index caught midway)."""

    def __init__(self, spec: str, reached: threading.Event, proceed: threading.Event) -> None:
        super().__init__(spec)
        self.reached, self.proceed = reached, proceed

    def embed_files(self, paths, *, batch_size: int = 4, workers=None) -> Iterator[list]:
        for number, batch in enumerate(super().embed_files(paths, batch_size=2)):
            if number == 1:
                self.reached.set()  # the first batch is committed by now
                assert self.proceed.wait(30)
            yield batch


def test_queries_during_a_running_index_see_a_complete_index(
    client, indexed, tmp_path, monkeypatch
):
    monkeypatch.setattr(library, "WRITE_ROWS", 2)  # commit each batch of two
    more = tmp_path / "batch"
    more.mkdir()
    for i in range(6):
        badfiles.make_jpeg(more / f"n{i}.jpg", seed=400 + i)
    reached, proceed = threading.Event(), threading.Event()

    def pausing_factory(spec: str) -> _PausingEmbedder:
        return _PausingEmbedder(spec, reached, proceed)

    worker = ThreadPoolExecutor(1)
    run = worker.submit(index, indexed, [more], pausing_factory)
    try:
        assert reached.wait(30)
        # Mid-run: one batch of two is committed, the writer still holds the store.
        with Collection.open(indexed, write=False) as reader:
            assert reader.counts()["indexed"] == 14
        for _ in range(3):
            count = client.get("/count").json()["count"]
            assert count == 14
            results = upload(client, badfiles.jpeg_bytes(seed=7), k=50).json()["results"]
            assert len(results) == 14
            assert len({r["id"] for r in results}) == 14
    finally:
        proceed.set()
        summary = run.result(timeout=60)
        worker.shutdown()
    assert summary.added == 6
    assert client.get("/count").json() == {"count": 18}
    assert len(upload(client, badfiles.jpeg_bytes(seed=7), k=50).json()["results"]) == 18


def test_concurrent_queries_while_the_store_changes(client, indexed, tmp_path, photos):
    sha1s = [sha1_of(p) for p in sorted(photos.rglob("*.jpg"))]
    more = tmp_path / "concurrent"
    more.mkdir()

    def ask(i: int) -> tuple[int, int]:
        if i % 2:
            answer = client.get(f"/api/similar?id={sha1s[i % len(sha1s)]}&n=100")
        else:
            answer = upload(client, badfiles.jpeg_bytes(seed=i % 5), k=100)
        return answer.status_code, len(answer.json()["results"])

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, i) for i in range(40)]
        for i in range(4):
            badfiles.make_jpeg(more / f"c{i}.jpg", seed=600 + i)
            index(indexed, [more])
        outcomes = [f.result() for f in futures]
    assert all(status == 200 for status, _ in outcomes)
    assert all(12 <= n <= 16 for _, n in outcomes)  # always one complete generation
    assert client.get("/count").json() == {"count": 16}


def test_a_snapshot_in_use_stays_open_until_its_last_request_ends(client, indexed, tmp_path):
    state = client.app.state.service
    with state.snapshot() as old:
        more = tmp_path / "swap"
        more.mkdir()
        badfiles.make_jpeg(more / "s.jpg", seed=700)
        index(indexed, [more])
        with state.snapshot() as new:
            assert new is not old
            assert (old.count, new.count) == (12, 13)
        assert old.retired
        # The old snapshot still answers while it is leased.
        vector = np.zeros(48, dtype=np.float32)
        vector[0] = 1.0
        assert len(library.query_vector(old.collection, vector, k=20, text="q").results) == 12
    assert old.refs == 0
    with state.snapshot() as again:
        assert again is new


def test_a_failing_reload_keeps_the_loaded_index(client, indexed, monkeypatch):
    state = client.app.state.service
    with state.snapshot() as snap:
        generation = snap.generation

    def broken_open():
        raise OSError("disk on fire")

    monkeypatch.setattr(state, "_open", broken_open)
    with state.snapshot() as snap:
        snap.generation = generation - 1  # pretend the store moved on
    assert client.get("/count").json() == {"count": 12}
    assert upload(client, badfiles.jpeg_bytes(seed=9)).status_code == 200


# -- the command ---------------------------------------------------------------------------------
def test_serve_binds_loopback_by_default_and_loads_the_model_first(indexed, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from simsearch.cli import app
    from simsearch.commands import serve as serve_module

    factory = FakeFactory()
    calls: list[tuple] = []
    monkeypatch.setattr(serve_module, "embedder_factory", lambda *a: factory)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.delenv("SIMSEARCH_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", "--store", str(indexed)])
    assert result.exit_code == 0, result.output
    ((served, options),) = calls
    assert options["host"] == "127.0.0.1" and options["port"] == 8000
    assert options["h11_max_incomplete_event_size"] > 20 * 1024 * 1024
    assert len(factory.loads) == 1  # loaded before the port opened
    settings = served.state.service.settings
    assert settings.token is None and settings.allow_remote_fetch is False

    monkeypatch.setenv("SIMSEARCH_TOKEN", "from-env")
    CliRunner().invoke(app, ["serve", "--store", str(indexed), "--host", "0.0.0.0"])
    assert calls[-1][0].state.service.settings.token == "from-env"
    assert calls[-1][1]["host"] == "0.0.0.0"


def test_serve_stops_with_one_line_when_the_model_cannot_load(indexed, monkeypatch):
    from typer.testing import CliRunner

    from simsearch.cli import app
    from simsearch.commands import serve as serve_module
    from simsearch.errors import InputError

    def broken(spec: str):
        raise InputError("unknown device 'bogus'; choose one of cpu, cuda, mps")

    monkeypatch.setattr(serve_module, "embedder_factory", lambda *a: broken)
    result = CliRunner().invoke(app, ["serve", "--store", str(indexed)])
    assert result.exit_code == 2
    assert "simsearch: error: unknown device 'bogus'" in result.output
