"""The triplet data set tools: parsing, fetching against a local misbehaving server, importing."""

from __future__ import annotations

import hashlib
import json
import socket
from collections import Counter
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import pytest
from badfiles import make_jpeg, make_png, text_named_jpg
from filelock import FileLock
from httpserver import TestServer, image_bytes
from typer.testing import CliRunner

from simsearch.commands.triplets import app
from simsearch.datasets import (
    MANIFEST_NAME,
    ROLES,
    STATUS_OK,
    fetch,
    import_images,
    map_url,
    parse_triplet_file,
    parse_url_map,
    read_manifest,
    url_file_names,
)
from simsearch.errors import InputError
from simsearch.images import decode_image

REPO = Path(__file__).resolve().parent.parent
REAL_FILE = REPO.parent / "shared" / "data" / "query_and_triplets.txt"
needs_real_file = pytest.mark.skipif(
    not REAL_FILE.is_file(),
    reason=f"{REAL_FILE} is absent (the shared data folder ../shared/data is not mounted)",
)
FAST = {"timeout": 0.5, "retries": 2, "backoff": 0.01}  # the server's /slow takes 3 s


@pytest.fixture
def server():
    with TestServer(slow_seconds=3.0, delay_seconds=0.05, huge_bytes=200_000) as s:
        yield s


def write_triplets(path: Path, records: list[tuple[str, list[str]]]) -> Path:
    path.write_text(
        "".join(f"{text}\n" + "".join(u + "\n" for u in urls) for text, urls in records)
    )
    return path


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# parsing


@needs_real_file
def test_parse_real_file():
    records, problems = parse_triplet_file(REAL_FILE)
    assert problems == []
    assert len(records) == 5033
    assert [r.index for r in records] == list(range(5033))
    assert [r.line for r in records] == [4 * i + 1 for i in range(5033)]
    first = records[0]
    assert first.text == "kamelot"
    assert first.query.url == (
        "http://t3.gstatic.com/images?q=tbn:ANd9GcQPRZP68raMqfBI01OSwczhMdgvGoCkD8UWi8gvffzuCujdwYtz"
    )
    assert first.negative.url.endswith(
        "tbn:ANd9GcQfFfrrETboCq4F5gcs9URSXPcJ0y6cAxy6hTmfVWqI0LZ4eUs8"
    )
    assert any(r.text == "classic winnie the pooh" for r in records)  # '+' decoded to spaces
    assert len({r.query.url for r in records}) == 3912
    assert len({image.url for r in records for image in r.images}) == 13297
    assert all(image.status == "pending" and image.file is None for image in records[-1].images)


def test_parse_broken_records_reports_line_numbers_and_resynchronises(tmp_path):
    u = [f"http://example.com/{i}.jpg" for i in range(3)]
    lines = [
        "good+one", *u,  # 1-4
        "",  # 5: blank between records
        "with+blank", u[0], "", u[1], u[2],  # 6-10: a blank inside a record costs nothing
        "http://example.com/orphan", "www.example.com/orphan",  # 11-12: URLs, no search text
        "bad+scheme", u[0], "ftp://example.com/x.jpg", u[2],  # 13-16: not http(s)
        "missing+urls", u[0],  # 17-18: the next line is text
        "c%2B%2B+lang", *u,  # 19-22
        "cut+short", u[0], u[1],  # 23-25: the file ends
        "", "",  # trailing blank lines are not reported
    ]  # fmt: skip
    path = tmp_path / "broken.txt"
    path.write_text("\n".join(lines), encoding="utf-8")

    records, problems = parse_triplet_file(path)

    assert [(r.index, r.line, r.text) for r in records] == [
        (0, 1, "good one"),
        (1, 6, "with blank"),
        (2, 19, "c++ lang"),
    ]
    assert [r.query.url for r in records] == [u[0]] * 3
    assert [p.line for p in problems] == [5, 8, 11, 15, 19, 23]
    reasons = [p.reason for p in problems]
    assert reasons[0] == reasons[1] == "blank line (ignored)"
    assert "expected a search text, found a URL" in reasons[2]
    assert "2 lines up to line 12 skipped" in reasons[2]
    assert "positive image URL of the record on line 13 is not an http(s) URL" in reasons[3]
    assert "expected the positive image URL of the record on line 17, found text" in reasons[4]
    assert reasons[5].startswith("truncated record: the file ends before its negative image URL")
    assert str(problems[0]) == "line 5: blank line (ignored)"


def test_parse_refuses_missing_and_binary_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        parse_triplet_file(tmp_path / "absent.txt")
    with pytest.raises(InputError, match="is a folder"):
        parse_triplet_file(tmp_path)
    binary = tmp_path / "image.jpg"
    binary.write_bytes(b"\xff\xd8\x00\x00" * 100)
    with pytest.raises(InputError, match="binary file"):
        parse_triplet_file(binary)


# ---------------------------------------------------------------------------------------------
# fetch

EXPECTED = {  # server path -> manifest status
    "/img/ok1": "ok",
    "/status/404": "HTTP 404",
    "/status/500": "HTTP 500",
    "/flaky/a": "ok",  # 500 twice, then an image: the retries get it
    "/slow": "timeout",
    "/redirect/301": "ok",
    "/redirect/302": "ok",
    "/redirect/loop": "too many redirects",
    "/redirect/chain/3": "ok",
    "/redirect/chain/9": "too many redirects",
    "/redirect/ftp": "bad redirect",
    "/html": "not an image",
    "/short-body": "truncated body",
    "/half-jpeg": "corrupt image",
    "/huge": "too large",
    "/huge-stream": "too large",
    "/status/403": "HTTP 403",
    "/img/ok2": "ok",
}


def test_fetch_every_server_behaviour(server, tmp_path):
    paths = list(EXPECTED)
    triplets = [
        (f"case+{i // 3}", [server.url(p) for p in paths[i : i + 3]])
        for i in range(0, len(paths), 3)
    ]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "t.txt", triplets))
    out = tmp_path / "out"

    summary = fetch(records, out, concurrency=4, max_bytes=100_000, **FAST)

    failures = Counter(status for status in EXPECTED.values() if status != "ok")
    assert summary.reasons == dict(failures)
    assert (summary.records, summary.urls) == (6, 18)
    assert (summary.downloaded, summary.kept, summary.failed) == (6, 0, 12)
    assert summary.complete == 0
    assert {f.url: f.reason for f in summary.failures} == {
        server.url(p): s for p, s in EXPECTED.items() if s != "ok"
    }
    # retried: connection problems and 5xx; not retried: 4xx, HTML, a redirect loop's end
    assert server.count("/status/500") == 3
    assert server.count("/flaky/a") == 3
    assert server.count("/short-body") == 3
    assert server.count("/status/404") == server.count("/html") == server.count("/huge") == 1

    manifest = read_manifest(out)
    expected_files = set()
    for record in manifest:
        for role, image in zip(ROLES, record.images, strict=True):
            status = EXPECTED[image.url.removeprefix(server.url(""))]
            assert image.status == status
            if status == STATUS_OK:
                assert image.file == f"{record.index}/{role}.jpg"
                data = (out / image.file).read_bytes()
                assert image.sha1 == hashlib.sha1(data).hexdigest()
                decode_image(data)
                expected_files.add(image.file)
            else:
                assert image.file is None and image.sha1 is None
    assert files_under(out) - {MANIFEST_NAME, ".triplets.lock"} == expected_files
    # the bytes are kept as served, and a redirect's target is what is stored
    assert (out / "0/query.jpg").read_bytes() == image_bytes("/img/ok1")
    assert (out / "2/query.jpg").read_bytes() == image_bytes("/img/redirected-302")
    assert not list(out.rglob("*.tmp"))


def test_manifest_lines_follow_the_shared_contract(server, tmp_path):
    urls = [server.url("/img/a"), server.url("/status/404"), server.url("/img/b")]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "t.txt", [("red+car", urls)]))
    fetch(records, tmp_path / "out", **FAST)
    (line,) = (tmp_path / "out" / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()
    data = json.loads(line)
    sha = hashlib.sha1(image_bytes("/img/a")).hexdigest()
    assert data["index"] == 0 and data["line"] == 1 and data["text"] == "red car"
    assert data["query"] == {"url": urls[0], "status": "ok", "file": "0/query.jpg", "sha1": sha}
    assert data["positive"] == {"url": urls[1], "status": "HTTP 404", "file": None, "sha1": None}
    assert data["negative"]["status"] == "ok"


def test_a_url_shared_by_records_is_downloaded_once(server, tmp_path):
    shared = server.url("/img/shared")
    triplets = [
        (f"t{i}", [shared, server.url(f"/img/p{i}"), server.url(f"/img/n{i}")]) for i in range(3)
    ]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "t.txt", triplets))

    summary = fetch(records, tmp_path / "out", **FAST)

    assert (summary.urls, summary.downloaded, summary.complete) == (7, 7, 3)
    assert server.count("/img/shared") == 1
    for i in range(3):
        assert (tmp_path / "out" / f"{i}/query.jpg").read_bytes() == image_bytes("/img/shared")


@pytest.mark.parametrize("bound", [1, 3])
def test_concurrency_bound_is_respected(server, tmp_path, bound):
    triplets = [(f"t{i}", [server.url(f"/delay/{i}-{r}") for r in ROLES]) for i in range(8)]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "t.txt", triplets))

    summary = fetch(records, tmp_path / "out", concurrency=bound, **FAST)

    assert summary.downloaded == 24
    assert server.max_active <= bound
    assert server.max_active == bound  # 24 requests of 50 ms each overlap up to the bound


def test_resume_keeps_valid_files_and_replaces_broken_ones(server, tmp_path):
    triplets = [(f"t{i}", [server.url(f"/img/{i}-{r}") for r in ROLES]) for i in range(3)]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "t.txt", triplets))
    out = tmp_path / "out"
    assert fetch(records, out, **FAST).downloaded == 9

    server.reset_counts()
    again = fetch(records, out, **FAST)
    assert (again.downloaded, again.kept, again.failed, again.complete) == (0, 9, 0, 3)
    assert sum(server.requests.values()) == 0

    cut = out / "0" / "positive.jpg"
    cut.write_bytes(cut.read_bytes()[:200])  # truncated: does not decode
    (out / "1" / "query.jpg").unlink()
    (out / "2" / ".negative.jpg.x1y2.tmp").write_bytes(b"left by a killed run")
    server.reset_counts()
    third = fetch(records, out, **FAST)
    assert (third.downloaded, third.kept, third.complete) == (2, 7, 3)
    assert set(server.requests) == {"/img/0-positive", "/img/1-query"}
    assert cut.read_bytes() == image_bytes("/img/0-positive")
    assert not list(out.rglob("*.tmp"))


def test_a_file_left_by_another_url_is_not_kept(server, tmp_path):
    urls = [server.url("/img/q"), server.url("/img/p"), server.url("/img/n")]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "a.txt", [("t", urls)]))
    out = tmp_path / "out"
    fetch(records, out, **FAST)

    changed = [server.url("/status/404"), urls[1], urls[2]]  # record 0's query is now another URL
    records, _ = parse_triplet_file(write_triplets(tmp_path / "b.txt", [("t", changed)]))
    summary = fetch(records, out, **FAST)

    assert summary.reasons == {"HTTP 404": 1}
    assert not (out / "0" / "query.jpg").exists()  # present only if its own download succeeded
    assert read_manifest(out)[0].query.status == "HTTP 404"


class _StopAfter:
    """A progress display that presses Ctrl-C after `n` images."""

    def __init__(self, n: int) -> None:
        self.n = n

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        self.n -= n
        if self.n == 0:
            raise KeyboardInterrupt

    def close(self) -> None:
        pass


def test_an_interrupted_run_keeps_its_progress(server, tmp_path):
    triplets = [(f"t{i}", [server.url(f"/img/{i}-{r}") for r in ROLES]) for i in range(4)]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "t.txt", triplets))
    out = tmp_path / "out"

    with pytest.raises(KeyboardInterrupt):
        fetch(records, out, concurrency=1, progress=_StopAfter(5), **FAST)

    statuses = Counter(i.status for r in read_manifest(out) for i in r.images)
    assert statuses["ok"] == 5 and statuses["pending"] == 7
    server.reset_counts()
    summary = fetch(records, out, **FAST)
    assert summary.kept >= 5 and summary.downloaded + summary.kept == 12
    assert summary.complete == 4


class _ManifestWatcher:
    """Reads the manifest each time an image is done, to see the periodic rewrites."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen: list[int] = []

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        path = self.out / MANIFEST_NAME
        ok = (
            0 if not path.exists() else sum(i.ok for r in read_manifest(self.out) for i in r.images)
        )
        self.seen.append(ok)

    def close(self) -> None:
        pass


def test_the_manifest_is_rewritten_during_the_run(server, tmp_path):
    triplets = [(f"t{i}", [server.url(f"/img/{i}-{r}") for r in ROLES]) for i in range(2)]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "t.txt", triplets))
    watcher = _ManifestWatcher(tmp_path / "out")
    fetch(records, tmp_path / "out", progress=watcher, checkpoint_every=0.0, **FAST)
    assert watcher.seen == [0, 1, 2, 3, 4, 5]  # each rewrite holds every image done before


def test_fetch_refuses_a_folder_in_use(server, tmp_path):
    records, _ = parse_triplet_file(
        write_triplets(tmp_path / "t.txt", [("t", [server.url("/img/a")] * 3)])
    )
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / ".triplets.lock")), pytest.raises(InputError, match="another"):
        fetch(records, out, **FAST)


def test_a_fetch_where_nothing_answers_stops_early(tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    triplets = [(f"t{i}", [f"http://127.0.0.1:{port}/{i}/{r}" for r in ROLES]) for i in range(30)]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "t.txt", triplets))

    with pytest.raises(InputError, match="the last 50 downloads all failed .connection refused"):
        fetch(records, tmp_path / "out", concurrency=2, timeout=0.5, retries=0)

    statuses = Counter(i.status for r in read_manifest(tmp_path / "out") for i in r.images)
    assert statuses["connection refused"] >= 50 and statuses["ok"] == 0


def test_environment_proxies_are_not_used_for_this_machine(server, tmp_path, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    urls = [server.url(f"/img/{r}") for r in ROLES]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "t.txt", [("t", urls)]))
    assert fetch(records, tmp_path / "out", **FAST).complete == 1


def test_url_map_rewrites_prefixes_and_keeps_the_original_urls(server, tmp_path):
    google = [f"http://t{i}.gstatic.com/images?q=tbn:KEY{i}" for i in range(3)]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "t.txt", [("t", google)]))
    url_map = parse_url_map([f"http://t{i}.gstatic.com={server.url('')}" for i in range(3)])

    summary = fetch(records, tmp_path / "out", url_map=url_map, **FAST)

    assert summary.complete == 1
    assert set(server.requests) == {f"/images?q=tbn:KEY{i}" for i in range(3)}
    assert [i.url for i in read_manifest(tmp_path / "out")[0].images] == google


def test_parse_url_map():
    pairs = parse_url_map(["http://a.com=http://127.0.0.1:1", "http://a.com/x=http://h:2/m"])
    assert map_url("http://a.com/x/y.jpg", pairs) == "http://h:2/m/y.jpg"  # longest prefix
    assert map_url("http://a.com/z.jpg", pairs) == "http://127.0.0.1:1/z.jpg"
    assert map_url("http://b.com/z.jpg", pairs) == "http://b.com/z.jpg"
    for bad in ["http://a.com", "http://a.com=ftp://b", "=http://b"]:
        with pytest.raises(InputError, match="FROM=TO"):
            parse_url_map([bad])


@needs_real_file
def test_fetch_real_records_from_a_local_mirror(server, tmp_path):
    records, _ = parse_triplet_file(REAL_FILE)
    records = records[:25]
    url_map = parse_url_map([f"http://t{i}.gstatic.com={server.url('')}" for i in range(4)])

    summary = fetch(records, tmp_path / "out", url_map=url_map, **FAST)

    unique = {i.url for r in records for i in r.images}
    assert (summary.urls, summary.downloaded, summary.complete) == (len(unique), len(unique), 25)
    assert all(p.startswith("/images?q=tbn:ANd9Gc") for p in server.requests)
    manifest = read_manifest(tmp_path / "out")
    assert [(m.index, m.line, m.text) for m in manifest] == [
        (r.index, r.line, r.text) for r in records
    ]
    for fetched, parsed in zip(manifest, records, strict=True):
        assert [i.url for i in fetched.images] == [i.url for i in parsed.images]  # not mapped
        for role, image in zip(ROLES, fetched.images, strict=True):
            path = tmp_path / "out" / str(fetched.index) / f"{role}.jpg"
            assert image.ok and image.file == f"{fetched.index}/{role}.jpg"
            assert image.sha1 == hashlib.sha1(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# import and the manifest

G = "http://t0.gstatic.com/images?q=tbn:"


def test_url_file_names():
    assert url_file_names(G + "K1") == [
        quote(G + "K1", safe=""),
        "images?q=tbn:K1",
        "images@q=tbn:K1",
        "K1",
    ]
    assert url_file_names("http://e.com/a/cat%20one.jpg") == [
        quote("http://e.com/a/cat%20one.jpg", safe=""),
        "cat%20one.jpg",
        "cat one.jpg",
    ]


def test_import_matches_files_by_every_rule(tmp_path):
    src = tmp_path / "downloads"
    (src / "sub").mkdir(parents=True)
    cat = "http://example.com/photos/cat%20one.jpg"
    same_a, same_b = "http://a.com/x/same.jpg", "http://b.com/y/same.jpg"
    triplets = [
        ("r0", [G + "PCT", G + "WGET", G + "WIN"]),
        ("r1", [G + "BARE", cat, G + "MANIFEST"]),
        ("r2", [G + "HTML", G + "MISSING", same_a]),
        ("r3", [same_b, G + "TWO", G + "GONE"]),
    ]
    records, _ = parse_triplet_file(write_triplets(tmp_path / "t.txt", triplets))
    sources = {
        G + "PCT": make_jpeg(src / quote(G + "PCT", safe=""), seed=1),  # percent-encoded URL
        G + "WGET": make_jpeg(src / "images?q=tbn:WGET", seed=2),  # wget's name
        G + "WIN": make_jpeg(src / "images@q=tbn:WIN.jpg", seed=3),  # wget, Windows names
        G + "BARE": make_jpeg(src / "sub" / "BARE.JPEG", seed=4),  # the key, in a sub-folder
        cat: make_png(src / "cat one.jpg", seed=5),  # last path segment, decoded
        G + "TWO": make_png(src / "TWO.png", seed=6),  # TWO.jpeg (tried first) is broken
    }
    text_named_jpg(src, "TWO.jpeg")
    text_named_jpg(src, "HTML.jpg")
    make_jpeg(src / "same.jpg", seed=7)  # matches two URLs: ambiguous, not used
    # a layout fetched elsewhere, with its manifest
    (src / "7").mkdir()
    sources[G + "MANIFEST"] = make_jpeg(src / "7" / "query.jpg", seed=8)
    listed = replace(
        records[0], index=7, query=replace(records[1].negative, status="ok", file="7/query.jpg")
    )
    (src / MANIFEST_NAME).write_text(json.dumps(listed.to_dict()) + "\n", encoding="utf-8")
    # the output layout already knows GONE failed with a 404
    out = tmp_path / "out"
    out.mkdir()
    earlier = replace(records[3], negative=replace(records[3].negative, status="HTTP 404"))
    (out / MANIFEST_NAME).write_text(json.dumps(earlier.to_dict()) + "\n", encoding="utf-8")

    summary = import_images(records, src, out)

    statuses = {i.url: i.status for r in read_manifest(out) for i in r.images}
    assert statuses == {
        **{url: "ok" for url in sources},
        G + "HTML": "not an image",
        G + "MISSING": "not found",
        same_a: "not found",
        same_b: "not found",
        G + "GONE": "HTTP 404",  # the earlier, more telling reason stays
    }
    assert (summary.imported, summary.kept, summary.failed) == (7, 0, 5)
    assert summary.reasons == {"not found": 4, "not an image": 1}
    by_url = {i.url: i for r in read_manifest(out) for i in r.images}
    for url, path in sources.items():
        assert (out / by_url[url].file).read_bytes() == Path(path).read_bytes()
    assert not list(out.rglob("*.tmp"))

    again = import_images(records, src, out)
    assert (again.imported, again.kept, again.failed) == (0, 7, 5)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(InputError, match="no manifest; create the layout"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"index": 0}\nnot json\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 1: not a manifest record"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------
# the commands


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("command", ["fetch", "import"])
def test_commands_have_help_with_an_example(runner, command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert f"Example: simsearch triplets {command}" in " ".join(result.output.split())


def test_fetch_command(runner, server, tmp_path):
    triplets = [
        ("t0", [server.url("/img/a"), server.url("/status/404"), server.url("/img/b")]),
        (
            "t1",
            ["http://t1.gstatic.com/images?q=tbn:X", server.url("/img/c"), server.url("/img/d")],
        ),
    ]
    path = write_triplets(tmp_path / "t.txt", triplets)
    with path.open("a") as f:
        f.write("dangling+text\n")
    out = tmp_path / "out"
    common = ["fetch", str(path), "--out", str(out), "--timeout", "0.5", "--retries", "0"]
    mirror = ["--url-map", f"http://t1.gstatic.com={server.url('')}"]

    result = runner.invoke(app, [*common, *mirror, "--json"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["records"], summary["downloaded"], summary["failed"]) == (2, 5, 1)
    assert summary["reasons"] == {"HTTP 404": 1}
    assert "line 9: truncated record" in result.stderr
    assert server.count("/images?q=tbn:X") == 1

    result = runner.invoke(app, [*common, *mirror], catch_exceptions=False)
    assert result.exit_code == 0
    assert "kept (already there):  5" in result.stdout
    assert "HTTP 404" in result.stdout and "complete records:      1 of 2" in result.stdout


def test_fetch_command_errors(runner, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    result = runner.invoke(app, ["fetch", str(empty), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "simsearch: error:" in result.stderr and "no triplet records" in result.stderr

    good = write_triplets(tmp_path / "t.txt", [("t", ["http://a.com/1.jpg"] * 3)])
    result = runner.invoke(app, ["fetch", str(good), "--out", "o", "--url-map", "nonsense"])
    assert result.exit_code == 2
    assert "expected FROM=TO" in result.stderr


def test_import_command(runner, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for key in ("A", "B", "C"):
        make_jpeg(src / f"{key}.jpg", seed=ord(key))
    path = write_triplets(tmp_path / "t.txt", [("t", [G + "A", G + "B", G + "C"])])
    out = tmp_path / "out"

    result = runner.invoke(
        app, ["import", str(path), "--from", str(src), "--out", str(out), "--json"]
    )

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["imported"] == 3
    assert (out / "0" / "negative.jpg").read_bytes() == (src / "C.jpg").read_bytes()
    assert read_manifest(out)[0].complete
