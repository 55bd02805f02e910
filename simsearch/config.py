"""Settings read from options and environment variables, passed in explicitly (never global)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from simsearch.errors import InputError

STORE_ENV = "SIMSEARCH_STORE"
MAX_PIXELS_ENV = "SIMSEARCH_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_BATCH_SIZE = 32
DEFAULT_MODEL = "deepranking-efficientnet_lite0"  # what `index` uses for a new store
BASELINE_MODEL = "convnet-efficientnet_lite0"  # the paper's ConvNet baseline of the same backbone


def default_store_dir() -> Path:
    """The per-user data directory, so `index` then `query` work without any option."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("simsearch", appauthor=False)) / "store"


def resolve_store_dir(option: Path | str | None) -> Path:
    """`--store`, else $SIMSEARCH_STORE, else the per-user default."""
    if option:
        return Path(option).expanduser().absolute()
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return default_store_dir()


def max_pixels_from_env() -> int:
    """The decompression-bomb limit: images with more pixels are skipped."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        raise InputError(
            f"{MAX_PIXELS_ENV}={raw!r} is not a whole number; set it to a pixel count "
            f"such as {DEFAULT_MAX_PIXELS}"
        ) from None
    if value <= 0:
        raise InputError(f"{MAX_PIXELS_ENV} must be positive, got {value}")
    return value


@dataclass(frozen=True)
class IndexSettings:
    """How one `index` run embeds files."""

    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None  # None: chosen from the CPU count and the job size
    device: str | None = None  # None: cuda, then mps, then cpu
    max_pixels: int = DEFAULT_MAX_PIXELS
