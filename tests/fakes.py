"""A fake embedder for store, library and CLI tests: real decoding, a cheap colour-layout vector."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from simsearch.errors import ImageError
from simsearch.images import decode_image


@dataclass(frozen=True, slots=True)
class FakeResult:
    position: int
    path: str
    vector: np.ndarray | None
    width: int | None
    height: int | None
    error: str | None


class FakeEmbedder:
    """A 4x4 colour grid (48 values), unit length: similar pictures get similar vectors."""

    dim = 48

    def __init__(self, spec: str = "fake", model_id: str = "fake-48-0001") -> None:
        self.spec = spec
        self.model_id = model_id
        self.files_embedded: list[str] = []  # paths, and a marker per image given in memory

    def embed_files(
        self, paths: Sequence[str], *, batch_size: int = 4, workers: int | None = None
    ) -> Iterator[list[FakeResult]]:
        batch: list[FakeResult] = []
        for position, path in enumerate(paths):
            self.files_embedded.append(path)
            try:
                decoded = decode_image(path)
            except ImageError as exc:
                batch.append(FakeResult(position, path, None, None, None, str(exc)))
            else:
                vector = _colour_grid(decoded.image)
                batch.append(
                    FakeResult(position, path, vector, decoded.width, decoded.height, None)
                )
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        self.files_embedded.extend("<image in memory>" for _ in images)
        return np.stack([_colour_grid(image) for image in images])


def _colour_grid(image: Image.Image) -> np.ndarray:
    grid = np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32).ravel()
    grid -= grid.mean()
    return grid / max(float(np.linalg.norm(grid)), 1e-6)


class FakeFactory:
    """Builds FakeEmbedders and counts model loads, the way the CLI's factory builds real ones."""

    def __init__(self, model_id: str = "fake-48-0001") -> None:
        self.model_id = model_id
        self.loads: list[str] = []
        self.embedders: list[FakeEmbedder] = []

    def __call__(self, spec: str) -> FakeEmbedder:
        self.loads.append(spec)
        embedder = FakeEmbedder(spec, self.model_id)
        self.embedders.append(embedder)
        return embedder

    @property
    def embedded(self) -> list[str]:
        return [path for e in self.embedders for path in e.files_embedded]
