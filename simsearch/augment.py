"""Edited copies of a query that serve as training positives: the near-duplicate case.

ImageSpace users search for the same picture cropped, recoloured, rotated or recompressed, so a
positive can be the query itself after such edits. The edits are milder than the copy-detection
benchmark's (`simsearch.edits`), whose harder copies stay unseen until evaluation. Every choice
comes from the NumPy generator passed in, so a seed fixes the copy.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageEnhance

MIN_CROP_AREA = 0.35
MAX_ROTATION = 15.0  # degrees either way
JPEG_QUALITY = (30, 90)


def augment_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A randomly edited RGB copy: crop, flip, small rotation, colour, JPEG recompression."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = random_crop(image, rng)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.3:
        angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    if rng.random() < 0.8:
        image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.7, 1.3)))
        image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.7, 1.3)))
        image = ImageEnhance.Color(image).enhance(float(rng.uniform(0.6, 1.4)))
    if rng.random() < 0.1:
        image = image.convert("L").convert("RGB")
    if rng.random() < 0.5:
        image = recompress(image, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
    return image


def random_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A window of 35% to 100% of the area with an aspect ratio from 3:4 to 4:3 (as far as fits)."""
    width, height = image.size
    area = rng.uniform(MIN_CROP_AREA, 1.0) * width * height
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = max(1, min(width, round(math.sqrt(area * ratio))))
    h = max(1, min(height, round(math.sqrt(area / ratio))))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    return image.crop((left, top, left + w, top + h))


def recompress(image: Image.Image, quality: int) -> Image.Image:
    """The image after a JPEG round trip at `quality` (blocking, colour bleeding)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as reopened:
        return reopened.convert("RGB")
