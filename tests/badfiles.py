"""Makers of small test images and of every kind of bad input, for any test file to import.

Plain functions, not fixtures: each writes one file (or link, or pipe) and returns its path as a
str, the form `simsearch.images.FileEntry.path` uses. Everything is small and deterministic.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

StrPath = str | os.PathLike[str]

HUGE_SIZE = (30_000, 30_000)


def photo_like(
    size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 120, 40), seed: int = 0
) -> Image.Image:
    """A noisy gradient with a few shapes: different seeds give visibly different pictures."""
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = np.cos(angle) * xs / max(width, 1) + np.sin(angle) * ys / max(height, 1)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-9)  # 0..1
    base = np.asarray(color, dtype=np.float64)
    other = rng.uniform(0, 255, size=3)
    pixels = base * (1.0 - ramp[..., None]) + other * ramp[..., None]
    pixels += rng.normal(0.0, 8.0, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")

    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=fill)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
    return image


def make_image(
    path: StrPath,
    size: tuple[int, int] = (64, 48),
    color: tuple[int, int, int] = (200, 120, 40),
    seed: int = 0,
    **save_options: object,
) -> str:
    """A photo-like image saved in the format its extension names (.jpg, .png, .webp ...)."""
    photo_like(size, color, seed).save(os.fspath(path), **save_options)
    return os.fspath(path)


def make_jpeg(
    path: StrPath,
    size: tuple[int, int] = (64, 48),
    color: tuple[int, int, int] = (200, 120, 40),
    seed: int = 0,
    quality: int = 90,
) -> str:
    """A real small photo-like JPEG."""
    return make_image(path, size, color, seed, format="JPEG", quality=quality)


def make_png(
    path: StrPath,
    size: tuple[int, int] = (64, 48),
    color: tuple[int, int, int] = (40, 120, 200),
    seed: int = 0,
) -> str:
    """A real small photo-like PNG."""
    return make_image(path, size, color, seed, format="PNG")


def jpeg_bytes(
    size: tuple[int, int] = (64, 48),
    color: tuple[int, int, int] = (200, 120, 40),
    seed: int = 0,
    quality: int = 90,
) -> bytes:
    """The bytes of `make_jpeg`'s file, for in-memory tests."""
    buffer = io.BytesIO()
    photo_like(size, color, seed).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def zero_byte(directory: StrPath, name: str = "empty.jpg") -> str:
    """An empty file with an image name."""
    path = Path(directory, name)
    path.write_bytes(b"")
    return str(path)


def truncated_jpeg(directory: StrPath, name: str = "truncated.jpg") -> str:
    """A JPEG cut in the middle of its scan data."""
    data = jpeg_bytes(size=(128, 96), seed=1)
    path = Path(directory, name)
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def text_named_jpg(directory: StrPath, name: str = "notes.jpg") -> str:
    """A text file wearing a .jpg name."""
    path = Path(directory, name)
    path.write_text("shopping list: milk, eggs\nthis is not an image\n", encoding="utf-8")
    return str(path)


def huge_png(directory: StrPath, name: str = "huge.png") -> str:
    """A valid 30000 x 30000 1-bit PNG (900 million pixels) in about 100 KB."""
    path = Path(directory, name)
    path.write_bytes(_huge_png_bytes(*HUGE_SIZE))
    return str(path)


@functools.lru_cache(maxsize=2)
def _huge_png_bytes(width: int, height: int) -> bytes:
    # Handcrafted: Pillow would need the whole bitmap in memory to write it.
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0, then black 1-bit pixels
    compressor = zlib.compressobj(9)
    parts = []
    rows_per_block = 1024
    full, rest = divmod(height, rows_per_block)
    block = row * rows_per_block
    for _ in range(full):
        parts.append(compressor.compress(block))
    parts.append(compressor.compress(row * rest))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def broken_symlink(directory: StrPath, name: str = "broken.jpg") -> str:
    """A symbolic link with an image name whose target does not exist."""
    path = Path(directory, name)
    path.symlink_to(Path(directory, "missing-target.jpg"))
    return str(path)


def non_utf8_name(directory: StrPath, name: bytes = b"caf\xe9.jpg") -> str:
    """A valid JPEG whose file name is Latin-1 bytes, not UTF-8 (returned surrogate-escaped)."""
    path = os.path.join(os.fsencode(directory), name)
    with open(path, "wb") as f:
        f.write(jpeg_bytes(seed=7))
    return os.fsdecode(path)


def fifo_named_jpg(directory: StrPath, name: str = "pipe.jpg") -> str:
    """A named pipe with an image name: reading it would block forever."""
    path = os.path.join(os.fspath(directory), name)
    os.mkfifo(path)
    return path


def cmyk_jpeg(directory: StrPath, name: str = "cmyk.jpg") -> str:
    """A CMYK JPEG, pure red (no cyan, full magenta and yellow)."""
    path = Path(directory, name)
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)
    return str(path)


def rgba_png(directory: StrPath, name: str = "rgba.png") -> str:
    """32 x 32 RGBA: left half opaque red, right half fully transparent black."""
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 16, 32))
    path = Path(directory, name)
    image.save(path, format="PNG")
    return str(path)


def palette_png(directory: StrPath, name: str = "palette.png") -> str:
    """32 x 32 palette image: left half blue, right half the transparent index (black)."""
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.paste(1, (0, 0, 16, 32))
    path = Path(directory, name)
    image.save(path, format="PNG", transparency=0)
    return str(path)


def grey16_png(directory: StrPath, name: str = "grey16.png") -> str:
    """256 x 4 16-bit greyscale PNG: column x holds x * 257, so 8-bit column x should be x."""
    values = (np.arange(256, dtype=np.uint16) * 257)[None, :].repeat(4, axis=0)
    path = Path(directory, name)
    Image.fromarray(values).save(path, format="PNG")
    return str(path)


def animated_gif(directory: StrPath, name: str = "animated.gif") -> str:
    """Three 16 x 16 frames: red, then green, then blue."""
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = Path(directory, name)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return str(path)


def exif_rotated_jpeg(directory: StrPath, name: str = "rotated.jpg") -> str:
    """Stored 64 x 48 with a red top-left corner and EXIF orientation 6 (shown 48 x 64).

    Displayed, the picture is turned 90 degrees clockwise, so the red corner is at the top right.
    """
    image = Image.new("RGB", (64, 48), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = Path(directory, name)
    image.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return str(path)
