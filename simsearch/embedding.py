"""Batched, device-aware inference: image files in, unit vectors out.

Decoding and resizing run in DataLoader worker processes and ship uint8 tensors; the model
normalises pixels itself. The device and the precision are chosen once, when the Embedder is
made. A file that cannot be decoded becomes a result with an error, never an exception.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from simsearch.config import DEFAULT_MAX_PIXELS
from simsearch.errors import ImageError, InputError
from simsearch.images import decode_image
from simsearch.model import EmbeddingModel

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_WORKERS = 4
# Shrink in integer steps first (Image.reduce) while the image is over 3x the target: far faster
# for big photos and indistinguishable from a full bicubic resize.
_REDUCING_GAP = 3.0


def choose_device(requested: str | None = None) -> torch.device:
    """`requested` if given (cpu, cuda, cuda:N, mps), else cuda, then mps, then cpu."""
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICES:
        raise InputError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device cuda was asked for but no CUDA GPU is available; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"device {requested} does not exist: there are {torch.cuda.device_count()} "
                f"CUDA GPU(s), numbered from 0"
            )
    if device.type == "mps" and not _mps_available():
        raise InputError("device mps was asked for but Apple's MPS is not available; use cpu")
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 (AVX512-BF16 or AMX); without it bf16 is emulated."""
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, check, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # private torch helpers: absent or failing means "no"
            continue
    return False


def choose_precision(device: torch.device, requested: str = "auto") -> str:
    """bf16 on CPUs with native bf16, bf16 (else fp16) AMP on CUDA, fp32 otherwise."""
    if requested not in PRECISIONS:
        raise InputError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise InputError("precision fp16 is not supported on cpu; use bf16 or fp32")
        return requested
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def default_workers(n_paths: int, batch_size: int) -> int:
    """No worker processes for small jobs (starting them costs more than it saves)."""
    if n_paths < 2 * batch_size:
        return 0
    return min(os.cpu_count() or 1, MAX_WORKERS)


def prepare_image(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to `size`, crop the centre square: a uint8 tensor (3, size, size).

    The one preprocessing for files (in the workers) and for already-decoded uploads. The crop
    is taken from the source before resizing, so a 1 x 100000 panorama costs no more memory
    than a square photo.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    if image.size != (size, size):
        image = image.resize(
            (size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=_REDUCING_GAP
        )
    array = np.asarray(image, dtype=np.uint8)  # (size, size, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """One input path's outcome: a vector, or the reason there is none."""

    position: int  # index of the path in the input sequence
    path: str
    vector: np.ndarray | None  # float32 (dim,), unit length; None on failure
    width: int | None
    height: int | None
    error: str | None  # why the file could not be embedded


@dataclass(slots=True)  # not frozen: frozen slotted dataclasses do not unpickle on 3.10
class _Item:
    position: int
    tensor: torch.Tensor | None
    width: int | None
    height: int | None
    error: str | None


class _FileDataset(torch.utils.data.Dataset):
    """Decodes and prepares one file per item, in a worker process; failures become items."""

    def __init__(self, paths: Sequence[str], size: int, max_pixels: int) -> None:
        self.paths = list(paths)
        self.size = size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> _Item:
        try:
            decoded = decode_image(
                self.paths[position], max_pixels=self.max_pixels, min_size=self.size
            )
            tensor = prepare_image(decoded.image, self.size)
        except ImageError as exc:
            return _Item(position, None, None, None, str(exc))
        except Exception as exc:  # a bad file must never stop the batch
            log.debug("failed to prepare %s", self.paths[position], exc_info=True)
            return _Item(position, None, None, None, f"{type(exc).__name__}: {exc}")
        return _Item(position, tensor, decoded.width, decoded.height, None)


@dataclass(slots=True)
class _Batch:
    good: list[_Item]
    images: torch.Tensor | None  # (len(good), 3, S, S) uint8
    bad: list[_Item]

    def pin_memory(self) -> _Batch:  # called by the DataLoader when pin_memory=True
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def _collate(items: list[_Item]) -> _Batch:
    """Stack the decoded images; keep failures aside so they never reach the model."""
    good = [item for item in items if item.tensor is not None]
    bad = [item for item in items if item.tensor is None]
    images = torch.stack([item.tensor for item in good]) if good else None
    # Without their tensors, so that workers do not send every image twice.
    good = [_Item(i.position, None, i.width, i.height, None) for i in good]
    return _Batch(good, images, bad)


class Embedder:
    """A model placed on a device with a precision, ready to embed files or images.

    The model itself is moved to the device (in channels_last layout), not copied.
    """

    def __init__(
        self,
        model: EmbeddingModel,
        *,
        device: str | None = None,
        precision: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.device = choose_device(device)
        self.precision = choose_precision(self.device, precision)
        self.max_pixels = max_pixels
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.model_id = model.model_id
        self.spec = model.spec
        self.dim = model.config.embedding_dim
        self.input_size = model.config.input_size
        log.info("embedding with %s on %s in %s", self.model_id, self.device, self.precision)

    def embed_files(
        self, paths: Sequence[str], *, batch_size: int = 32, workers: int | None = None
    ) -> Iterator[list[EmbedResult]]:
        """One list of results per batch, in input order; every path gets exactly one result."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        if workers is not None and workers < 0:
            raise InputError(f"workers must be 0 or more, got {workers}")
        return self._embed_files(list(paths), batch_size, workers)

    def _embed_files(
        self, paths: list[str], batch_size: int, workers: int | None
    ) -> Iterator[list[EmbedResult]]:
        if not paths:
            return
        if workers is None:
            workers = default_workers(len(paths), batch_size)
        loader = torch.utils.data.DataLoader(
            _FileDataset(paths, self.input_size, self.max_pixels),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        for batch in loader:
            results: list[EmbedResult] = [
                EmbedResult(i.position, paths[i.position], None, None, None, i.error)
                for i in batch.bad
            ]
            if batch.images is not None:
                vectors = self._run(batch.images)
                results += [
                    EmbedResult(i.position, paths[i.position], v, i.width, i.height, None)
                    for i, v in zip(batch.good, vectors, strict=True)
                ]
            results.sort(key=lambda r: r.position)
            yield results

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """(n, dim) float32 unit vectors for already-decoded images, such as uploads."""
        out = [np.empty((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = torch.stack([prepare_image(image, self.input_size) for image in chunk])
            out.append(self._run(batch))
        return np.concatenate(out)

    def _run(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (n, 3, S, S) -> float32 (n, dim), under the chosen precision."""
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            vectors = self.model(x)
        return vectors.float().cpu().numpy()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])
