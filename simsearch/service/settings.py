"""The service's settings, passed to `create_app` explicitly (the CLI fills them from options)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from simsearch.config import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from simsearch.library import EmbedderFactory

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT = 10.0
TOKEN_ENV = "SIMSEARCH_TOKEN"


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_public_address(address: IPAddress) -> bool:
    """Whether a fetched URL may connect here: never loopback, private, link-local or reserved."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
        if address.teredo is not None or address.is_site_local:
            return False
    if (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
    ):
        return False
    return address.is_global


@dataclass
class ServiceSettings:
    """What one server serves and how far it trusts its callers."""

    store: Path
    token: str | None = None  # None: the endpoints that change the store answer 403
    allow_remote_fetch: bool = False  # http(s):// URIs are refused unless this is set
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES  # uploads, base64 data, files and fetches
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit for every query image
    embedder_factory: EmbedderFactory | None = None  # None: the CLI's (loads the real model)
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT  # seconds for a whole http(s) fetch
    max_redirects: int = 3
    # Which addresses a fetch may connect to; tests swap it to reach a local server.
    address_allowed: Callable[[IPAddress], bool] = is_public_address
    preload_model: bool = False  # load the store's model at start-up, not on the first query
    thumbnail_cache_size: int = 512  # thumbnails kept in memory
    # Query images embedded at once (0: one per core); more wait up to embed_wait seconds, then
    # get 503. Each holds a decoded image and the network's activations: unbounded, a burst of
    # large uploads would exhaust memory instead of queueing.
    max_concurrent_embeddings: int = 0
    embed_wait: float = 30.0
