"""Query images named by SMQTK URIs: base64 data, indexed SHA-1s, local files and URLs.

Each source is read within the server's limits: base64 data and files only up to the upload
size; `file://` only inside the store's indexed folders (symlinks resolved on both sides);
`http(s)://` only when enabled, only to public addresses (every address DNS gives is checked and
the connection goes to a checked one), with a deadline, a size limit and checked redirects.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from simsearch import __version__
from simsearch.images import IMAGE_EXTENSIONS
from simsearch.library import SHA1_PATTERN
from simsearch.service import ServiceError
from simsearch.service.settings import IPAddress, ServiceSettings

log = logging.getLogger(__name__)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_DROP_WHITESPACE = str.maketrans("", "", "\r\n\t")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
FILE_REFUSED = (
    "file:// URIs may only name image files inside the store's indexed folders; "
    "send the image itself as base64://DATA?content_type=image/jpeg instead"
)


@dataclass(frozen=True, slots=True)
class ImageBytes:
    """An image to embed (or to find among the indexed ones by its SHA-1)."""

    data: bytes
    label: str  # how messages name it


@dataclass(frozen=True, slots=True)
class IndexedRef:
    """An indexed image named by the SHA-1 of its file (`uuid://<sha1>`)."""

    sha1: str


def too_large(what: str, limit: int) -> ServiceError:
    return ServiceError(
        413,
        f"{what} is larger than the limit of {limit:,} bytes; send a smaller image "
        "(or start the server with a larger --max-upload-bytes)",
    )


def resolve_uri(
    uri: str,
    *,
    content_type: str | None,
    settings: ServiceSettings,
    folders: Callable[[], Sequence[str]],
) -> ImageBytes | IndexedRef:
    """What an SMQTK URI names; `folders` gives the store's indexed folders when needed."""
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ServiceError(
            400,
            "the URI must start with base64://, uuid://, file://, http:// or https://, "
            f"got {uri[:40]!r}",
        )
    if scheme == "base64":
        data = decode_base64(rest, settings.max_upload_bytes)
        label = f"the base64 data ({content_type})" if content_type else "the base64 data"
        return ImageBytes(data, label)
    if scheme == "uuid":
        if not SHA1_PATTERN.match(rest):
            raise ServiceError(
                400, f"uuid:// takes the SHA-1 (40 hex digits) of an indexed image, got {rest!r}"
            )
        return IndexedRef(rest.lower())
    if scheme == "file":
        return ImageBytes(read_local_file(rest, folders(), settings.max_upload_bytes), uri)
    if scheme in ("http", "https"):
        if not settings.allow_remote_fetch:
            raise ServiceError(
                403,
                "fetching http(s) URLs is off; send the image as base64://DATA?content_type=... "
                "or start the server with --allow-remote-fetch",
            )
        return ImageBytes(fetch_url(uri, settings), uri)
    raise ServiceError(
        400,
        f"unknown URI scheme {scheme[:20]!r}; use base64://, uuid://, file://, http:// or https://",
    )


# -- base64 ------------------------------------------------------------------------------------
def decode_base64(text: str, max_bytes: int) -> bytes:
    """Standard or URL-safe base64, padding optional; spaces read as '+' (form-decoded paths)."""
    cleaned = text.translate(_DROP_WHITESPACE).replace(" ", "+")
    cleaned = cleaned.replace("-", "+").replace("_", "/").rstrip("=")
    if not cleaned:
        raise ServiceError(400, "the base64:// URI holds no data; put the image's base64 after it")
    if len(cleaned) * 3 // 4 > max_bytes:
        raise too_large("the base64 image", max_bytes)
    if len(cleaned) % 4 == 1:
        raise ServiceError(400, "the base64 data is cut short (its length is impossible)")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(
            400,
            "the base64:// data is not valid base64 (standard or URL-safe alphabet expected)",
        ) from None


# -- file:// -------------------------------------------------------------------------------------
def read_local_file(path: str, folders: Sequence[str], max_bytes: int) -> bytes:
    """The bytes of an image file inside one of `folders` (already symlink-resolved)."""
    if not path.startswith("/") or "\x00" in path:
        raise ServiceError(400, "file:// URIs need an absolute path, as in file:///photos/cat.jpg")
    real = os.path.realpath(path)
    folder = _folder_of(real, folders)
    if folder is None:
        raise ServiceError(403, FILE_REFUSED)
    relative = os.path.relpath(real, folder)
    parts = relative.split(os.sep)
    if any(part.startswith(".") for part in parts if part != "."):
        raise ServiceError(403, FILE_REFUSED)
    if os.path.splitext(real)[1].lower() not in IMAGE_EXTENSIONS:
        raise ServiceError(403, FILE_REFUSED)
    try:
        fd = os.open(real, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC)
    except FileNotFoundError:
        raise ServiceError(404, f"no such file: {path}") from None
    except OSError as exc:
        # ELOOP: the last part became a symlink after it was resolved; refuse it like any other.
        log.info("refusing file:// %r: %s", path, exc)
        raise ServiceError(403, FILE_REFUSED) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ServiceError(400, f"{path} is not a regular file")
        opened = _opened_path(f.fileno())
        if opened is not None and _folder_of(opened, [folder]) is None:
            raise ServiceError(403, FILE_REFUSED)  # a folder was swapped for a link meanwhile
        if st.st_size > max_bytes:
            raise too_large(path, max_bytes)
        os.set_blocking(f.fileno(), True)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(path, max_bytes)
    return data


def _folder_of(real: str, folders: Sequence[str]) -> str | None:
    for folder in folders:
        prefix = folder.rstrip(os.sep) + os.sep
        if real.startswith(prefix):
            return folder
    return None


def _opened_path(fd: int) -> str | None:
    """Where an open file really is (Linux), to catch a swap between the check and the open."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


# -- http(s):// -------------------------------------------------------------------------------
def fetch_url(url: str, settings: ServiceSettings) -> bytes:
    """GET an image from a public address: checked redirects, a deadline and a size limit."""
    deadline = time.monotonic() + settings.fetch_timeout
    limit = settings.max_upload_bytes
    for _ in range(settings.max_redirects + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ServiceError(400, f"only http and https URLs are fetched, not {scheme or url!r}")
        host = parts.hostname
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise ServiceError(400, f"the URL {url[:200]} has an invalid port") from None
        if not host:
            raise ServiceError(400, f"the URL {url[:200]} names no host")
        if parts.username is not None or parts.password is not None:
            raise ServiceError(400, "URLs with a user name or password are not fetched")
        address = _checked_address(host, port, settings.address_allowed)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        try:
            status, location, data = _get(
                scheme, address, port, host, host_header, target, deadline, limit
            )
        except TimeoutError:
            raise ServiceError(
                400, f"fetching {url[:200]} timed out after {settings.fetch_timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceError(400, f"cannot fetch {url[:200]}: {exc}") from None
        if status in _REDIRECTS and location:
            url = urljoin(url, location)
            continue
        if status != 200:
            raise ServiceError(400, f"fetching {url[:200]} answered HTTP {status}")
        if data is None:
            raise too_large(url[:200], limit)
        return data
    raise ServiceError(
        400, f"fetching the URL was redirected more than {settings.max_redirects} times"
    )


def _checked_address(host: str, port: int, allowed: Callable[[IPAddress], bool]) -> IPAddress:
    """The first address of `host`, after checking that every one of them is allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ServiceError(400, f"cannot resolve the host {host!r}: {exc}") from None
    addresses: list[IPAddress] = []
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            continue
    if not addresses:
        raise ServiceError(400, f"cannot resolve the host {host!r}")
    for address in addresses:
        if not allowed(address):
            raise ServiceError(
                403,
                f"refusing to fetch from {host} ({address}): loopback, private, link-local "
                "and reserved addresses are never fetched",
            )
    return addresses[0]


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an already-checked address, verifying the certificate for the URL's host."""

    def __init__(self, address: str, port: int, server_name: str, timeout: float) -> None:
        super().__init__(address, port, timeout=timeout, context=ssl.create_default_context())
        self._server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_name)


def _get(
    scheme: str,
    address: IPAddress,
    port: int,
    host: str,
    host_header: str,
    target: str,
    deadline: float,
    limit: int,
) -> tuple[int, str | None, bytes | None]:
    """(status, Location, body or None when over `limit`) of one GET to a pinned address."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    literal = f"[{address}]" if address.version == 6 else str(address)
    conn: http.client.HTTPConnection
    if scheme == "https":
        conn = _PinnedHTTPSConnection(literal, port, host, remaining)
    else:
        conn = http.client.HTTPConnection(literal, port, timeout=remaining)
    try:
        conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host_header)
        conn.putheader("User-Agent", f"simsearch/{__version__}")
        conn.putheader("Accept", "image/*")
        conn.endheaders()
        response = conn.getresponse()
        if response.status in _REDIRECTS or response.status != 200:
            return response.status, response.getheader("Location"), b""
        announced = response.getheader("Content-Length")
        if announced and announced.isdigit() and int(announced) > limit:
            return 200, None, None
        chunks: list[bytes] = []
        total = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if conn.sock is not None:
                conn.sock.settimeout(remaining)  # a slow trickle cannot outlast the deadline
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                return 200, None, None
            chunks.append(chunk)
        return 200, None, b"".join(chunks)
    finally:
        conn.close()
