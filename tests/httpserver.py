"""A local HTTP server on 127.0.0.1 that misbehaves on purpose, for the triplet fetcher's tests.

Paths (every image is a small JPEG whose pixels depend on the path, so files can be told apart):
    /img/<anything>          200, an image            /images?q=tbn:<key>  200, an image (Google)
    /status/<code>           that status, no image    /flaky/<key>         500 twice, then an image
    /slow                    an image after `slow_seconds` (longer than the tests' timeout)
    /delay/<anything>        an image after `delay_seconds` (for the concurrency bound)
    /redirect/301, /302      to /img/redirected-<code>
    /redirect/loop           to itself                /redirect/chain/<n>  n redirects, then image
    /redirect/ftp            to an ftp:// URL
    /html                    200, text/html           /short-body          Content-Length > sent
    /half-jpeg               half a JPEG, correct Content-Length
    /huge                    `huge_bytes` bytes, announced; /huge-stream: the same, not announced

Use it as a context manager; it counts requests per path and the most requests in flight at
once. Run it alone as a stand-in mirror for the real triplet file:

    python tests/httpserver.py --port 8000
    simsearch triplets fetch query_and_triplets.txt --out DIR \\
        --url-map http://t0.gstatic.com=http://127.0.0.1:8000 --url-map http://t1.gstatic.com=...
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from PIL import Image


@functools.lru_cache(maxsize=65536)
def image_bytes(key: str) -> bytes:
    """A small JPEG whose colours depend on `key` (deterministic)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    image = Image.new("RGB", (32, 24), (digest[0], digest[1], digest[2]))
    image.paste((digest[3], digest[4], digest[5]), (4 + digest[6] % 8, 4, 20, 16 + digest[7] % 6))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def half_jpeg_bytes() -> bytes:
    """A larger JPEG cut in half: announced with its true length, so only decoding can tell."""
    image = Image.effect_noise((128, 96), 60).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2]


class _Handler(BaseHTTPRequestHandler):
    server: TestServer._Server  # type: ignore[name-defined]

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        owner: TestServer = self.server.owner
        owner._count(self.path)
        try:
            self._answer(owner, urlsplit(self.path).path, self.path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def _answer(self, owner: TestServer, path: str, full: str) -> None:
        parts = path.strip("/").split("/")
        head = parts[0]
        if head in ("img", "images"):
            self._send(200, image_bytes(full))
        elif head == "status" and len(parts) == 2 and parts[1].isdigit():
            self._send(int(parts[1]), b"no image here\n", "text/plain")
        elif head == "flaky":
            if owner.count(full) <= 2:
                self._send(500, b"try again\n", "text/plain")
            else:
                self._send(200, image_bytes(full))
        elif head == "slow":
            owner.stopping.wait(owner.slow_seconds)
            self._send(200, image_bytes(full))
        elif head == "delay":
            # Counted as active only before the answer is sent: a client bound to N requests
            # can start its next one only after this one is answered, so the count is exact.
            owner._enter()
            try:
                owner.stopping.wait(owner.delay_seconds)
            finally:
                owner._leave()
            self._send(200, image_bytes(full))
        elif head == "redirect":
            self._redirect(parts[1:])
        elif head == "html":
            self._send(200, b"<!doctype html><title>Sorry</title><p>Not an image</p>", "text/html")
        elif head == "short-body":
            data = image_bytes(full)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data) + 5000))
            self.end_headers()
            self.wfile.write(data[:100])
            self.close_connection = True
        elif head == "half-jpeg":
            self._send(200, half_jpeg_bytes())
        elif head == "huge":
            self._send(200, b"\xff" * owner.huge_bytes)
        elif head == "huge-stream":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            for _ in range(owner.huge_bytes // 4096 + 1):
                self.wfile.write(b"\xff" * 4096)
            self.close_connection = True
        else:
            self._send(404, b"no such path\n", "text/plain")

    def _redirect(self, rest: list[str]) -> None:
        if rest in (["301"], ["302"]):
            self._send_redirect(int(rest[0]), f"/img/redirected-{rest[0]}")
        elif rest == ["loop"]:
            self._send_redirect(302, "/redirect/loop")
        elif rest == ["ftp"]:
            self._send_redirect(302, "ftp://127.0.0.1/image.jpg")
        elif len(rest) == 2 and rest[0] == "chain" and rest[1].isdigit():
            n = int(rest[1])
            target = f"/redirect/chain/{n - 1}" if n > 1 else "/img/end-of-chain"
            self._send_redirect(302, target)
        else:
            self._send(404, b"no such redirect\n", "text/plain")

    def _send_redirect(self, code: int, location: str) -> None:
        self.send_response(code)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, code: int, body: bytes, content_type: str = "image/jpeg") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TestServer:
    """The server in a background thread; `url(path)` gives the full URL of a path."""

    __test__ = False  # not a pytest test class

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        owner: TestServer

    def __init__(
        self,
        *,
        port: int = 0,
        slow_seconds: float = 3.0,
        delay_seconds: float = 0.05,
        huge_bytes: int = 200_000,
    ) -> None:
        self.slow_seconds = slow_seconds
        self.delay_seconds = delay_seconds
        self.huge_bytes = huge_bytes
        self.stopping = threading.Event()
        self.requests: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._server = self._Server(("127.0.0.1", port), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, full_path: str) -> int:
        with self._lock:
            return self.requests[full_path]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_active = 0

    def _count(self, full_path: str) -> None:
        with self._lock:
            self.requests[full_path] += 1

    def _enter(self) -> None:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1

    def __enter__(self) -> TestServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()  # sleeping handlers return at once
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve stand-in images on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with TestServer(port=args.port) as server:
        print(f"serving on {server.url('/')} (Ctrl-C to stop)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
