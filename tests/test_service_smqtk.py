"""The SMQTK routes answer ImageSpace's calls exactly as it makes them and reads them."""

from __future__ import annotations

import base64
import hashlib
import http.client
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import badfiles
import numpy as np
import pytest
from fakes import FakeFactory
from fastapi.testclient import TestClient

from simsearch import library
from simsearch.collection import Collection
from simsearch.service.app import create_app
from simsearch.service.settings import ServiceSettings

SMQTK_KEYS = {"success", "message", "neighbors", "distances", "reference_uri"}


@pytest.fixture
def store(photos: Path, store_dir: Path) -> Path:
    with Collection.open(store_dir, write=True) as collection:
        library.index_paths(collection, [photos], embedder_factory=FakeFactory())
    return store_dir


@pytest.fixture
def factory() -> FakeFactory:
    return FakeFactory()


@pytest.fixture
def client(store: Path, factory: FakeFactory) -> Iterator[TestClient]:
    settings = ServiceSettings(store=store, embedder_factory=factory)
    with TestClient(create_app(settings)) as client:
        yield client


def sha1_of(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def all_sha1s(photos: Path) -> set[str]:
    return {sha1_of(p) for p in photos.rglob("*.jpg")}


def image_with_both_symbols(seed: int = 0) -> bytes:
    """JPEG bytes whose standard base64 holds both '/' and '+', as real photos' do."""
    for s in range(seed, seed + 200):
        data = badfiles.jpeg_bytes(size=(48, 40), seed=s)
        text = base64.b64encode(data).decode()
        if "/" in text and "+" in text and text.endswith("="):
            return data
    raise AssertionError("no test image with '/', '+' and padding in its base64")


def imagespace_nn_url(base_url: str, n: int, data: bytes, content_type: str) -> str:
    """The URL exactly as ImageSpace's smqtk_similaritysearch builds it."""
    search_url = base_url.rstrip("/") + "/nn"
    image = base64.b64encode(data).decode("ascii")
    return search_url + "/n=" + str(n) + "/base64://" + image + "?content_type=" + content_type


def check_shape(body: dict, n: int) -> None:
    assert set(body) == SMQTK_KEYS
    assert body["success"] is True
    assert isinstance(body["message"], str)
    assert len(body["neighbors"]) == len(body["distances"]) == n
    assert all(isinstance(s, str) and len(s) == 40 for s in body["neighbors"])
    assert all(isinstance(d, float) for d in body["distances"])
    assert body["distances"] == sorted(body["distances"])


# -- /nn -----------------------------------------------------------------------------------
def test_nn_with_imagespace_request_standard_base64_in_the_path(client, photos):
    target = photos / "a" / "img02.jpg"
    data = target.read_bytes()
    url = imagespace_nn_url("http://testserver/", 5, data, "image/jpeg")
    assert "+" in url.split("?")[0] and url.count("/") > 10
    answer = client.get(url)
    assert answer.status_code == 200
    assert b"+" in answer.request.url.raw_path  # sent unescaped, as ImageSpace sends it
    body = answer.json()
    check_shape(body, 5)
    assert body["neighbors"][0] == sha1_of(target)  # SHA-1 of the file bytes
    assert body["distances"][0] == 0.0
    assert set(body["neighbors"]) <= all_sha1s(photos)
    assert body["reference_uri"] == "base64://" + base64.b64encode(data).decode()


def test_nn_with_slashes_and_pluses_of_an_unindexed_image(client, photos, factory):
    data = image_with_both_symbols()
    answer = client.get(imagespace_nn_url("http://testserver", 4, data, "image/jpeg"))
    body = answer.json()
    check_shape(body, 4)
    assert body["distances"][0] > 0.0
    assert len(factory.embedded) == 1


def test_base64_variants_give_the_same_answer(client):
    data = image_with_both_symbols(seed=50)
    standard = base64.b64encode(data).decode()
    urlsafe = base64.urlsafe_b64encode(data).decode()
    assert standard != urlsafe
    answers = [
        client.get(f"/nn/n=6/base64://{text}?content_type=image/jpeg").json()
        for text in (standard, standard.rstrip("="), urlsafe, urlsafe.rstrip("="))
    ]
    answers.append(client.get(f"/nn/n=6/base64://{standard}").json())  # no content_type
    for body in answers:
        check_shape(body, 6)
        assert body["neighbors"] == answers[0]["neighbors"]
        assert body["distances"] == answers[0]["distances"]


def test_percent_encoded_base64_is_read_too(client):
    data = image_with_both_symbols(seed=80)
    text = base64.b64encode(data).decode()
    encoded = text.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    plain = client.get(f"/nn/n=3/base64://{text}?content_type=image/jpeg").json()
    escaped = client.get(f"/nn/n=3/base64://{encoded}?content_type=image%2Fjpeg").json()
    assert escaped["neighbors"] == plain["neighbors"]


def test_nn_cuts_to_n_and_pages_like_smqtk(client):
    data = badfiles.jpeg_bytes(seed=31)
    b64 = base64.b64encode(data).decode()
    full = client.get(f"/nn/n=10/base64://{b64}?content_type=image/jpeg").json()
    check_shape(full, 10)
    page = client.get(f"/nn/n=10/2:5/base64://{b64}?content_type=image/jpeg").json()
    check_shape(page, 3)
    assert page["neighbors"] == full["neighbors"][2:5]
    assert page["distances"] == full["distances"][2:5]
    past_n = client.get(f"/nn/n=4/2:9/base64://{b64}?content_type=image/jpeg").json()
    assert past_n["neighbors"] == full["neighbors"][2:4]
    empty = client.get(f"/nn/n=4/3:3/base64://{b64}?content_type=image/jpeg").json()
    assert empty["success"] is True and empty["neighbors"] == []
    three = client.get(f"/nn/n=3/base64://{b64}?content_type=image/jpeg").json()
    assert three["neighbors"] == full["neighbors"][:3]
    everything = client.get(f"/nn/n=500/base64://{b64}?content_type=image/jpeg").json()
    check_shape(everything, 12)  # no more neighbours than indexed images
    default = client.get(f"/nn/base64://{b64}?content_type=image/jpeg").json()
    assert default["neighbors"] == full["neighbors"]  # SMQTK's default n is 10


def test_nn_by_uuid(client, photos):
    sha1 = sha1_of(photos / "b" / "img08.jpg")
    body = client.get(f"/nn/n=3/uuid://{sha1}").json()
    check_shape(body, 3)
    assert body["neighbors"][0] == sha1 and body["distances"][0] == 0.0
    assert body["reference_uri"] == f"uuid://{sha1}"
    assert client.get(f"/nn/n=3/uuid://{sha1.upper()}").json()["neighbors"] == body["neighbors"]


def test_base64_copy_of_an_indexed_image_uses_its_stored_vector(client, photos, factory):
    data = (photos / "a" / "img05.jpg").read_bytes()
    by_data = client.get(imagespace_nn_url("http://testserver", 5, data, "image/jpeg")).json()
    by_uuid = client.get(f"/nn/n=5/uuid://{hashlib.sha1(data).hexdigest()}").json()
    assert by_data["neighbors"] == by_uuid["neighbors"]
    assert by_data["distances"] == by_uuid["distances"]
    assert factory.embedded == []  # nothing embedded: the stored vector was used


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/nn/n=5/uuid://" + "0" * 40, 404, "no indexed image"),
        ("/nn/n=5/uuid://1234", 400, "SHA-1"),
        ("/nn/n=5/base64://!!!notbase64***", 400, "not valid base64"),
        ("/nn/n=5/base64://QUJD", 415, "not a usable image"),
        ("/nn/n=5/base64://", 400, "no data"),
        ("/nn/n=5/base64://A", 400, "cut short"),
        ("/nn/n=0/uuid://" + "0" * 40, 400, "n must be"),
        ("/nn/n=abc/uuid://" + "0" * 40, 400, "N a whole number"),
        ("/nn/n=99999999/uuid://" + "0" * 40, 400, "n must be"),
        ("/nn/n=10/5:2/uuid://" + "0" * 40, 400, "I must not exceed J"),
        ("/nn/n=10/ftp://example.com/a.jpg", 400, "unknown URI scheme"),
        ("/nn/n=10/just-text", 400, "must start with"),
        ("/nn/n=10/", 400, "no URI"),
    ],
)
def test_nn_failures_keep_the_shape_with_a_4xx(client, path, status, words):
    answer = client.get(path)
    assert answer.status_code == status
    body = answer.json()
    assert set(body) == SMQTK_KEYS
    assert body["success"] is False
    assert words in body["message"]
    assert body["neighbors"] == [] and body["distances"] == []


def test_nn_refuses_an_oversized_base64_image(store, factory):
    settings = ServiceSettings(store=store, embedder_factory=factory, max_upload_bytes=1000)
    with TestClient(create_app(settings)) as client:
        data = badfiles.jpeg_bytes(size=(200, 200), seed=3)
        answer = client.get(imagespace_nn_url("http://testserver", 5, data, "image/jpeg"))
        assert answer.status_code == 413
        assert answer.json()["success"] is False
        assert "--max-upload-bytes" in answer.json()["message"]


def test_a_doubled_slash_after_the_base_url_still_works(client, photos):
    data = (photos / "a" / "img00.jpg").read_bytes()
    url = (
        "http://testserver//nn/n=2/base64://"
        + base64.b64encode(data).decode()
        + "?content_type=image/jpeg"
    )
    assert client.get(url).json()["neighbors"][0] == sha1_of(photos / "a" / "img00.jpg")


# -- /compute and /count ---------------------------------------------------------------------
def test_compute_as_imagespace_posts_it(client, photos, store):
    data = (photos / "b" / "img10.jpg").read_bytes()
    image = base64.b64encode(data).decode()
    # ImageSpace's own formatting, kept as it is written there.
    url = "%(base_url)s/compute/base64://%(image)s?content_type=%(type)s" % {  # noqa: UP031
        "base_url": "http://testserver",
        "image": image,
        "type": "image/jpeg",
    }
    answer = client.post(url)
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"success", "message", "descriptor", "reference_uri"}
    assert body["success"] is True
    assert body["reference_uri"] == "base64://" + image
    vector = np.array(body["descriptor"])
    assert vector.shape == (48,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    with Collection.open(store, write=False) as collection:
        row = collection.find_image(sha1=hashlib.sha1(data).hexdigest())
        stored = collection.vectors([row.id])[row.id]
    np.testing.assert_allclose(vector, stored, atol=1e-6)
    new = client.post(f"/compute/base64://{base64.b64encode(badfiles.jpeg_bytes(seed=9)).decode()}")
    assert new.json()["success"] is True and len(new.json()["descriptor"]) == 48


def test_compute_by_uuid_and_its_failures(client, photos):
    sha1 = sha1_of(photos / "a" / "img01.jpg")
    assert len(client.post(f"/compute/uuid://{sha1}").json()["descriptor"]) == 48
    for path, status in (
        ("/compute/uuid://" + "0" * 40, 404),
        ("/compute/base64://QUJD?content_type=image/jpeg", 415),
        ("/compute/base64://%%%", 400),
        ("/compute/http://example.com/a.jpg", 403),
    ):
        answer = client.post(path)
        assert answer.status_code == status
        body = answer.json()
        assert body["success"] is False and body["descriptor"] is None
        assert set(body) == {"success", "message", "descriptor", "reference_uri"}
    assert client.get(f"/compute/uuid://{sha1}").status_code == 405


def test_count(client, photos, store):
    assert client.get("/count").json() == {"count": 12}
    with Collection.open(store, write=True) as collection:
        library.remove(collection, [str(photos / "a")])
    assert client.get("/count").json() == {"count": 6}


# -- a real server: the base64 image travels in the request line --------------------------------
def test_real_server_takes_a_long_request_line(store, factory):
    import uvicorn

    from simsearch.commands.serve import uvicorn_options

    settings = ServiceSettings(store=store, embedder_factory=factory)
    config = uvicorn.Config(
        create_app(settings), log_level="warning", **uvicorn_options(settings.max_upload_bytes)
    )
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        # ~200 KB of base64 in the path: far over h11's default 16 KiB request line.
        data = badfiles.jpeg_bytes(size=(600, 600), seed=12, quality=100)
        assert len(data) > 100_000
        url = imagespace_nn_url("", 3, data, "image/jpeg")
        for _ in range(600):
            if server.started:
                break
            threading.Event().wait(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", url)
        response = conn.getresponse()
        assert response.status == 200
        import json

        body = json.loads(response.read())
        check_shape(body, 3)
        conn.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
