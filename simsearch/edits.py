"""Edited copies of an image for the copy-detection benchmark, made on the fly.

The edits are the ones near-duplicate search must survive (crops, rotations, flips, JPEG
recompression, colour changes, blur, downscaling, overlays) and combinations of them. Every
random choice comes from the `numpy.random.Generator` passed in, so a seed fixes the copies.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from simsearch.errors import InputError

log = logging.getLogger(__name__)

MIN_CROP_AREA = 0.25  # a crop keeps at least this share of the pixels
MIN_JPEG_QUALITY = 10
MIN_SIDE = 16  # no edit makes a side shorter than this (the model upsamples anyway)
_WORDS = ("SALE", "copyright", "hello world", "2014", "@user", "BEST PRICE", "news", "photo")
_Edit = Callable[[Image.Image, np.random.Generator], Image.Image]


def _crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random window keeping 25% to 80% of the area, of any aspect ratio that fits."""
    width, height = image.size
    area = rng.uniform(MIN_CROP_AREA, 0.8)
    share_w = rng.uniform(area, 1.0)  # then share_h = area / share_w is in [area, 1] too
    w = min(width, math.ceil(share_w * width))
    h = min(height, math.ceil(area / share_w * height))  # rounding up keeps the area >= `area`
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    return image.crop((left, top, left + w, top + h))


def _rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A small tilt (3 to 20 degrees either way), same size, corners filled with black."""
    angle = rng.uniform(3.0, 20.0) * rng.choice([-1.0, 1.0])
    return image.rotate(float(angle), resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


def _rotate90(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A quarter, half or three-quarter turn (width and height swap for quarter turns)."""
    turns = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
    return image.transpose(turns[int(rng.integers(0, 3))])


def _hflip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _vflip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Recompression at quality 10 to 50: blocking and colour bleeding."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(MIN_JPEG_QUALITY, 51)))
    buffer.seek(0)
    with Image.open(buffer) as reopened:
        return reopened.convert("RGB")


def _factor(rng: np.random.Generator, low: float, high: float) -> float:
    """A factor in [low, high] at least 0.2 away from 1, so the change is visible."""
    while True:
        value = float(rng.uniform(low, high))
        if abs(value - 1.0) >= 0.2:
            return value


def _color(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Hue rotation, then saturation, brightness and contrast changes."""
    hsv = np.asarray(image.convert("HSV"), dtype=np.int16).copy()
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(20, 236))) % 256  # 28 to 332 degrees
    image = Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")
    image = ImageEnhance.Color(image).enhance(_factor(rng, 0.3, 1.8))
    image = ImageEnhance.Brightness(image).enhance(_factor(rng, 0.6, 1.5))
    return ImageEnhance.Contrast(image).enhance(_factor(rng, 0.5, 1.6))


def _greyscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.convert("L").convert("RGB")


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur of radius 0.5% to 2% of the shorter side (at least 1 pixel): from soft
    focus to a smear in which only the layout and colours survive."""
    radius = max(1.0, rng.uniform(0.005, 0.02) * min(image.size))
    return image.filter(ImageFilter.GaussianBlur(radius))


def _downscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Shrunk to 15% to 50% of each side (never under MIN_SIDE pixels): a thumbnail."""
    scale = rng.uniform(0.15, 0.5)
    width, height = image.size
    size = (max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale)))
    size = (min(size[0], width), min(size[1], height))
    return image.resize(size, Image.Resampling.BILINEAR)


def _font(image: Image.Image, rng: np.random.Generator, share: tuple[float, float]):
    size = max(8, round(rng.uniform(*share) * min(image.size)))
    return ImageFont.load_default(size=size)


def _random_xy(image: Image.Image, rng: np.random.Generator) -> tuple[int, int]:
    width, height = image.size
    return int(rng.integers(0, max(1, width * 2 // 3))), int(
        rng.integers(0, max(1, height * 4 // 5))
    )


def _text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption in an opaque random colour, 8% to 18% of the shorter side high."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
    outline = tuple(255 - v for v in fill)
    draw.text(
        _random_xy(image, rng),
        str(rng.choice(_WORDS)),
        font=_font(image, rng, (0.08, 0.18)),
        fill=fill,
        stroke_width=1,
        stroke_fill=outline,
    )
    return image


def _logo(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A semi-transparent badge (ellipse or rounded box with a word) over a corner area."""
    base = image.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    width, height = base.size
    w = max(4, round(rng.uniform(0.2, 0.4) * width))
    h = max(4, round(rng.uniform(0.12, 0.3) * height))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    alpha = int(rng.integers(110, 210))
    fill = (*(int(v) for v in rng.integers(0, 256, size=3)), alpha)
    box = (left, top, left + w - 1, top + h - 1)
    if rng.random() < 0.5:
        draw.ellipse(box, fill=fill)
    else:
        draw.rounded_rectangle(box, radius=max(1, min(w, h) // 4), fill=fill)
    text_fill = (*(255 - v for v in fill[:3]), min(255, alpha + 40))
    font = ImageFont.load_default(size=max(8, h // 3))
    draw.text((left + w // 8, top + h // 3), str(rng.choice(_WORDS)), font=font, fill=text_fill)
    return Image.alpha_composite(base, overlay).convert("RGB")


EDITS: dict[str, _Edit] = {
    "crop": _crop,
    "rotate": _rotate,
    "rotate90": _rotate90,
    "hflip": _hflip,
    "vflip": _vflip,
    "jpeg": _jpeg,
    "color": _color,
    "greyscale": _greyscale,
    "blur": _blur,
    "downscale": _downscale,
    "text": _text,
    "logo": _logo,
}
COMBO = "combo"  # 2 or 3 of the single edits above, in a random order
KINDS: tuple[str, ...] = (*EDITS, COMBO)


def edit_image(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """An edited RGB copy of `image` (which is left untouched); `rng` makes every choice."""
    if kind not in KINDS:
        raise InputError(f"unknown edit {kind!r}; choose one of {', '.join(KINDS)}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if kind != COMBO:
        return EDITS[kind](image, rng)
    count = int(rng.integers(2, 4))
    names = [str(n) for n in rng.choice(list(EDITS), size=count, replace=False)]
    log.debug("combo edit: %s", "+".join(names))
    for name in names:
        image = EDITS[name](image, rng)
    return image


def make_copies(
    image: Image.Image, rng: np.random.Generator, n: int
) -> list[tuple[str, Image.Image]]:
    """`n` edited copies, each (kind, image); kinds are all different while n <= len(KINDS).

    Kinds are drawn without replacement from a shuffled cycle of KINDS, so over many originals
    every kind is used about equally often (which the per-kind breakdown needs).
    """
    if n < 0:
        raise InputError(f"the number of copies must be 0 or more, got {n}")
    kinds: list[str] = []
    while len(kinds) < n:
        kinds += [str(k) for k in rng.permutation(list(KINDS))]
    return [(kind, edit_image(image, kind, rng)) for kind in kinds[:n]]
