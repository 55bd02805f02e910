"""Hostile requests: file:// escapes, SSRF, oversized and corrupt bodies, never a 500."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import badfiles
import pytest
from fakes import FakeFactory
from fastapi.testclient import TestClient
from httpserver import TestServer, image_bytes

from simsearch import library
from simsearch.collection import Collection
from simsearch.service.app import create_app
from simsearch.service.settings import ServiceSettings, is_public_address

FILE_REFUSED = "only name image files inside the store's indexed folders"


@pytest.fixture
def store(photos: Path, store_dir: Path) -> Path:
    with Collection.open(store_dir, write=True) as collection:
        library.index_paths(collection, [photos], embedder_factory=FakeFactory())
    return store_dir


def make_client(store: Path, **kwargs) -> TestClient:
    kwargs.setdefault("embedder_factory", FakeFactory())
    return TestClient(create_app(ServiceSettings(store=store, **kwargs)))


@pytest.fixture
def client(store: Path) -> Iterator[TestClient]:
    with make_client(store) as client:
        yield client


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the indexed one, holding a real image that must stay unreachable."""
    folder = tmp_path / "outside"
    folder.mkdir()
    badfiles.make_jpeg(folder / "secret.jpg", seed=900)
    (folder / "secret.txt").write_text("password=hunter2\n")
    return folder


def nn_file(client: TestClient, path: str):
    return client.get(f"/nn/n=3/file://{path}")


# -- file:// -------------------------------------------------------------------------------------
def test_file_uri_inside_an_indexed_folder(client, photos):
    indexed = photos / "a" / "img01.jpg"
    body = nn_file(client, str(indexed)).json()
    assert body["success"] is True
    assert body["neighbors"][0] == hashlib.sha1(indexed.read_bytes()).hexdigest()
    fresh = Path(badfiles.make_jpeg(photos / "b" / "new.jpg", seed=77))
    answer = nn_file(client, str(fresh))
    assert answer.status_code == 200 and answer.json()["distances"][0] > 0.0
    missing = nn_file(client, str(photos / "a" / "missing.jpg"))
    assert missing.status_code == 404 and missing.json()["success"] is False


def test_file_uri_refuses_files_outside(client, photos, outside):
    for path in (
        str(outside / "secret.jpg"),
        str(outside / "secret.txt"),
        "/etc/passwd",
        "/etc/hostname",
        "/proc/self/environ",
        str(photos.parent / "store" / "simsearch.db"),
    ):
        answer = nn_file(client, path)
        assert answer.status_code == 403, path
        assert FILE_REFUSED in answer.json()["message"]
        assert answer.json()["success"] is False


def test_file_uri_refuses_traversal(client, photos, outside):
    for path in (
        f"{photos}/a/../../outside/secret.jpg",
        f"{photos}/a/%2e%2e/%2e%2e/outside/secret.jpg",
        f"{photos}/a/..%2F..%2Foutside%2Fsecret.jpg",
        f"{photos}/../outside/secret.jpg",
        f"{photos}/a/../../../../../../etc/passwd",
    ):
        answer = nn_file(client, path)
        assert answer.status_code == 403, path
        assert FILE_REFUSED in answer.json()["message"]


def test_file_uri_refuses_symlinks_that_point_out(client, photos, outside):
    (photos / "a" / "link.jpg").symlink_to(outside / "secret.jpg")
    (photos / "a" / "linked-folder").symlink_to(outside, target_is_directory=True)
    (photos / "a" / "passwd.jpg").symlink_to("/etc/passwd")
    for path in (
        photos / "a" / "link.jpg",
        photos / "a" / "linked-folder" / "secret.jpg",
        photos / "a" / "passwd.jpg",
    ):
        answer = nn_file(client, str(path))
        assert answer.status_code == 403, path
        assert FILE_REFUSED in answer.json()["message"]
    # A symlink that stays inside the indexed folders is fine.
    (photos / "b" / "inside-link.jpg").symlink_to(photos / "a" / "img02.jpg")
    assert nn_file(client, str(photos / "b" / "inside-link.jpg")).status_code == 200


def test_file_uri_refuses_hidden_and_non_image_files_inside(client, photos):
    (photos / "a" / ".hidden.jpg").write_bytes(badfiles.jpeg_bytes(seed=3))
    (photos / "a" / ".git").mkdir()
    (photos / "a" / ".git" / "x.jpg").write_bytes(badfiles.jpeg_bytes(seed=4))
    (photos / "a" / "notes.txt").write_text("not for you")
    for name in (".hidden.jpg", ".git/x.jpg", "notes.txt"):
        assert nn_file(client, str(photos / "a" / name)).status_code == 403, name
    folder = nn_file(client, str(photos / "a"))
    assert folder.status_code == 403


def test_file_uri_needs_an_absolute_path(client):
    for uri in ("file://relative/a.jpg", "file://localhost/etc/passwd", "file://"):
        answer = client.get(f"/nn/n=3/{uri}")
        assert answer.status_code == 400
        assert "absolute path" in answer.json()["message"]


def test_file_uri_of_a_non_image_named_jpg_is_415(client, photos):
    badfiles.text_named_jpg(photos / "a", "fake.jpg")
    answer = nn_file(client, str(photos / "a" / "fake.jpg"))
    assert answer.status_code == 415


def test_file_uri_over_the_size_limit_is_413(store, photos):
    with make_client(store, max_upload_bytes=500) as client:
        answer = nn_file(client, str(photos / "a" / "img00.jpg"))
        assert answer.status_code == 413


def test_file_uri_folders_follow_the_index(client, photos, store, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    image = Path(badfiles.make_jpeg(extra / "e.jpg", seed=55))
    assert nn_file(client, str(image)).status_code == 403
    with Collection.open(store, write=True) as collection:
        library.index_paths(collection, [extra], embedder_factory=FakeFactory())
    assert nn_file(client, str(image)).status_code == 200


def test_indexed_folders_are_resolved_and_outermost(store, photos, tmp_path):
    link = tmp_path / "photos-link"
    link.symlink_to(photos, target_is_directory=True)
    with Collection.open(store, write=False) as collection:
        assert library.indexed_folders(collection) == [str(photos / "a"), str(photos / "b")]
    nested = photos / "a" / "deeper"
    nested.mkdir()
    badfiles.make_jpeg(nested / "d.jpg", seed=8)
    with Collection.open(store, write=True) as collection:
        library.index_paths(collection, [photos], embedder_factory=FakeFactory())
        assert library.indexed_folders(collection) == [str(photos / "a"), str(photos / "b")]


# -- http(s):// ------------------------------------------------------------------------------------
def test_remote_fetch_is_off_by_default(client):
    for uri in ("http://example.com/a.jpg", "https://example.com/a.jpg", "HTTP://127.0.0.1/a"):
        answer = client.get(f"/nn/n=3/{uri}")
        assert answer.status_code == 403
        assert "--allow-remote-fetch" in answer.json()["message"]


@pytest.fixture
def image_server() -> Iterator[TestServer]:
    with TestServer(slow_seconds=5.0, huge_bytes=50_000) as server:
        yield server


@pytest.fixture
def fetching(store: Path) -> Iterator[TestClient]:
    with make_client(store, allow_remote_fetch=True) as client:
        yield client


def test_ssrf_to_internal_addresses_is_refused(fetching, image_server):
    port = image_server.port
    for url in (
        f"http://127.0.0.1:{port}/img/a.jpg",
        f"http://localhost:{port}/img/a.jpg",
        f"http://[::1]:{port}/img/a.jpg",
        f"http://[::ffff:127.0.0.1]:{port}/img/a.jpg",
        f"http://2130706433:{port}/img/a.jpg",  # 127.0.0.1 as one number
        f"http://0.0.0.0:{port}/img/a.jpg",
        "http://10.0.0.1/img.jpg",
        "http://172.16.5.4/img.jpg",
        "http://192.168.1.1/img.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/img.jpg",
        "http://[fd00::1]/img.jpg",
        "http://100.64.0.1/img.jpg",
        "https://127.0.0.1/img.jpg",
    ):
        answer = fetching.get(f"/nn/n=3/{url}")
        assert answer.status_code == 403, url
        assert "never fetched" in answer.json()["message"], url
    assert sum(image_server.requests.values()) == 0  # nothing ever reached the server


def test_public_address_check():
    refused = [
        "127.0.0.1", "127.8.9.10", "0.0.0.0", "10.1.2.3", "172.31.255.255", "192.168.0.1",
        "169.254.169.254", "100.64.0.1", "224.0.0.1", "240.0.0.1", "255.255.255.255",
        "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
        "2002:7f00:1::", "64:ff9b::a00:1", "64:ff9b::7f00:1", "ff02::1", "2001:db8::1",
    ]  # fmt: skip
    allowed = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
    for text in refused:
        assert not is_public_address(ipaddress.ip_address(text)), text
    for text in allowed:
        assert is_public_address(ipaddress.ip_address(text)), text


def test_unresolvable_and_odd_urls_are_4xx(fetching):
    for url, status in (
        ("http://no-such-host.invalid/a.jpg", 400),
        ("http://user:pw@example.com/a.jpg", 400),
        ("http:///a.jpg", 400),
        ("http://example.com:99999/a.jpg", 400),
    ):
        answer = fetching.get(f"/nn/n=3/{url}")
        assert answer.status_code == status, url
        assert answer.json()["success"] is False


@pytest.fixture
def loopback_allowed(store: Path) -> Iterator[TestClient]:
    """Fetching on, with the address check opened to loopback to reach the local server."""
    with make_client(
        store, allow_remote_fetch=True, address_allowed=lambda a: a.is_loopback, fetch_timeout=2
    ) as client:
        yield client


def test_fetch_from_an_allowed_address(loopback_allowed, image_server):
    url = image_server.url("/img/remote.jpg")
    body = loopback_allowed.get(f"/nn/n=3/{url}").json()
    assert body["success"] is True and len(body["neighbors"]) == 3
    assert body["reference_uri"] == url
    compute = loopback_allowed.post(f"/compute/{url}").json()
    assert compute["success"] is True and len(compute["descriptor"]) == 48
    # The URL's own query string survives the trip through the request path.
    assert loopback_allowed.get(f"/nn/n=1/{url}?size=big").json()["success"] is True
    assert image_server.requests["/img/remote.jpg?size=big"] == 1


def test_fetched_copy_of_an_indexed_image_matches_it(loopback_allowed, image_server, photos):
    data = image_bytes("/img/known.jpg")
    badfiles_dir = photos / "a"
    (badfiles_dir / "known.jpg").write_bytes(data)
    with Collection.open(loopback_allowed.app.state.service.root, write=True) as collection:
        library.index_paths(collection, [photos], embedder_factory=FakeFactory())
    body = loopback_allowed.get(f"/nn/n=2/{image_server.url('/img/known.jpg')}").json()
    assert body["neighbors"][0] == hashlib.sha1(data).hexdigest()
    assert body["distances"][0] == 0.0


def test_fetch_follows_redirects_and_checks_each_hop(store, image_server):
    with make_client(store, allow_remote_fetch=True, address_allowed=lambda a: True) as client:
        assert client.get(f"/nn/n=1/{image_server.url('/redirect/302')}").status_code == 200
        loop = client.get(f"/nn/n=1/{image_server.url('/redirect/loop')}")
        assert loop.status_code == 400 and "redirected more than" in loop.json()["message"]
        ftp = client.get(f"/nn/n=1/{image_server.url('/redirect/ftp')}")
        assert ftp.status_code == 400 and "only http and https" in ftp.json()["message"]
    checked: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []

    def first_hop_only(address) -> bool:
        checked.append(address)
        return len(checked) == 1

    with make_client(store, allow_remote_fetch=True, address_allowed=first_hop_only) as client:
        answer = client.get(f"/nn/n=1/{image_server.url('/redirect/301')}")
        assert answer.status_code == 403  # the redirect's target was checked, and refused
        assert image_server.requests["/img/redirected-301"] == 0


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/status/404", 400, "HTTP 404"),
        ("/html", 415, "not a usable image"),
        ("/half-jpeg", 415, "not a usable image"),
        ("/huge", 413, "larger than the limit"),
        ("/huge-stream", 413, "larger than the limit"),
        ("/slow", 400, "timed out"),
    ],
)
def test_fetch_failures(store, image_server, path, status, words):
    with make_client(
        store,
        allow_remote_fetch=True,
        address_allowed=lambda a: True,
        max_upload_bytes=20_000,
        fetch_timeout=0.5,
    ) as client:
        answer = client.get(f"/nn/n=1/{image_server.url(path)}")
        assert answer.status_code == status
        assert words in answer.json()["message"]


# -- bodies and requests ---------------------------------------------------------------------
def test_chunked_upload_over_the_limit_is_413(store):
    with make_client(store, max_upload_bytes=1000) as client:

        def chunks() -> Iterator[bytes]:
            yield b"--x\r\nContent-Disposition: form-data; name=file; filename=a.jpg\r\n\r\n"
            for _ in range(40):
                yield b"\xff" * 4096
            yield b"\r\n--x--\r\n"

        answer = client.post(
            "/api/query",
            content=chunks(),
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        )
        assert answer.status_code == 413
        assert "limit" in answer.json()["detail"]


def test_invalid_content_length_is_400(client):
    answer = client.post(
        "/api/query", content=b"x", headers={"Content-Length": "abc", "Content-Type": "a/b"}
    )
    assert answer.status_code == 400


def test_corrupt_and_hostile_requests_never_give_a_500(client, photos):
    jpeg = base64.b64encode(badfiles.jpeg_bytes()).decode()
    gets = [
        "/nn/n=3/base64://%00%00",
        "/nn/n=3/base64://" + "A" * 5000,
        "/nn/n=3/base64://" + jpeg[: len(jpeg) // 2],
        "/nn/n=3/file://%00/etc/passwd",
        f"/nn/n=3/file://{photos}/a/img00.jpg%00.png",
        "/nn/n=-1/uuid://abc",
        "/nn/n=3/-1:2/uuid://abc",
        "/nn/n=3/uuid://" + "g" * 40,
        "/nn/n=3/uuid://%FF%FE",
        "/nn/" + "n=" * 300,
        "/nn/n=3/base64://" + base64.b64encode(b"GIF89a" + b"\x00" * 100).decode(),
        "/api/query?id=%00",
        "/api/query?id=1&k=99999999999999999999",
        "/api/images/%FF",
        "/api/images/99999999999999999999999999",
        "/api/images/" + "9" * 5000,
        "/api/distance?a=1&b=",
        "/thumbnails/%00",
        "/thumbnails/" + "a" * 40 + "?size=-5",
    ]
    for path in gets:
        answer = client.get(path)
        assert 400 <= answer.status_code < 500, (path, answer.status_code)
    posts = [
        ("/api/query", {"files": {"file": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50)}}),
        ("/api/query", {"files": {"file": ("x.jpg", b"\xff\xd8\xff" + os.urandom(2000))}}),
        ("/api/query", {"files": {"other": ("x.jpg", b"data")}}),
        ("/api/query", {"content": b"not multipart", "headers": {"Content-Type": "text/plain"}}),
        ("/api/images", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("/compute/base64://", {}),
    ]
    for path, kwargs in posts:
        answer = client.post(path, **kwargs)
        assert 400 <= answer.status_code < 500, (path, answer.status_code)
