"""Batched, device-aware inference: image files in, unit vectors out.

On a CPU of up to eight cores, one thread per core decodes, resizes and embeds its own runs of
files (torch on one thread each); elsewhere DataLoader worker processes decode and resize,
overlapped with inference here, and ship uint8 tensors in channels_last layout. The model
normalises pixels itself. The device, the precision and the inference form of the network are
chosen once, when the Embedder is made. On a CPU the network runs as a copy with its batch norms
folded into the convolutions and their activations fused (`simsearch.model.inference`, checked
against the original when it is made), in small micro-batches that stay in cache; on CUDA it
runs under AMP and JPEGs are decoded on the GPU where torchvision can. A file that cannot be
decoded becomes a result with an error, never an exception.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from simsearch._blas import cpu_supports_bf16
from simsearch.config import DEFAULT_MAX_PIXELS
from simsearch.errors import ImageError, InputError
from simsearch.images import decode_image, read_jpeg
from simsearch.model import EmbeddingModel
from simsearch.model.inference import optimize_for_cpu

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE_MODES = ("auto", "on", "off")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_WORKERS = 4
# Images per forward pass on a CPU: small enough that a block's activations stay in the caches
# (64 at a time runs at ~60% of the rate of 8 on a 2-core EPYC), large enough to amortise calls.
CPU_MICRO_BATCH = 8
# Files per unit of work that a worker decodes and embeds on its own: small, so that the last
# units of a job keep every worker busy.
WORK_UNIT = 16
MAX_CPU_WORKERS = 8
# torch.compile costs half a minute or more before the first batch. On a CPU, Inductor's best
# (the original network, frozen) measured 1.15x the folded, fused eager network, after 28 s of
# compiling per process: repaid only after ~30,000 images per core, so `auto` never compiles on
# CPUs; on CUDA it compiles jobs big enough to repay it.
COMPILE_MIN_IMAGES = 20_000
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


def choose_compile(device: torch.device, requested: str, n_images: int) -> bool:
    """Whether to torch.compile the network for a job: `auto` only where it repays itself."""
    if requested not in COMPILE_MODES:
        raise InputError(f"unknown compile mode {requested!r}; choose one of auto, on, off")
    if requested != "auto":
        return requested == "on"
    return device.type == "cuda" and n_images >= COMPILE_MIN_IMAGES


def default_workers(n_paths: int, batch_size: int) -> int:
    """No worker processes for small jobs (starting them costs more than it saves)."""
    if n_paths < 2 * batch_size:
        return 0
    return min(os.cpu_count() or 1, MAX_WORKERS)


def inference_workers(
    n_paths: int, unit: int, device_type: str = "cpu", cores: int | None = None
) -> int:
    """Workers for embedding `n_paths` files in units of `unit`; 0 for small jobs.

    On a CPU of up to MAX_CPU_WORKERS cores, one thread per core, each decoding and embedding
    its own units with torch on that one thread (a torch op spread over threads waits for all of
    them whenever another process takes a core). On bigger CPUs this process runs the network
    on all its threads and worker processes on a fifth of the cores decode; with a GPU, worker
    processes on every core but the one feeding it decode.
    """
    cores = cores or os.cpu_count() or 1
    if n_paths < 2 * unit or cores < 2:
        return 0
    if device_type == "cpu":
        return cores if cores <= MAX_CPU_WORKERS else cores // 5
    return min(cores - 1, 2 * MAX_WORKERS)


@dataclass(frozen=True, slots=True)
class JobPlan:
    """How one embed_files job runs: its workers, and where the network runs."""

    workers: int  # threads when the network runs in them, else decoding processes
    unit: int  # files per unit of work (one DataLoader item, or one thread's task)
    network_in_workers: bool  # each worker thread embeds what it decodes, on one torch thread
    pin_memory: bool  # batches go to the GPU from pinned memory


def plan_job(
    device_type: str,
    n_paths: int,
    batch_size: int,
    workers: int | None = None,
    compiled: bool = False,
    cores: int | None = None,
) -> JobPlan:
    """The job's layout from the device, its size, the workers asked for and the CPU count.

    On a small CPU the workers are threads of this process that run the network too, one torch
    thread each (an op spread over threads waits for all of them whenever another process holds
    a core; and threads start at once, where forked processes took 0.13 s per job to start and
    warm up); a GPU, a compiled network or a single worker leaves the network in this process,
    fed by decoding processes.
    """
    cores = cores or os.cpu_count() or 1
    small_cpu = device_type == "cpu" and cores <= MAX_CPU_WORKERS and not compiled
    in_workers = small_cpu and (workers is None or workers >= 2)
    unit = min(batch_size, WORK_UNIT) if in_workers else batch_size
    if workers is None:
        workers = inference_workers(n_paths, unit, device_type, cores)
    return JobPlan(workers, unit, in_workers and workers >= 2, device_type == "cuda")


def prepare_image(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to `size`, crop the centre square: a uint8 tensor (3, size, size).

    The one preprocessing for files (in the workers) and for already-decoded uploads. The crop
    is taken from the source before resizing, so a 1 x 100000 panorama costs no more memory
    than a square photo.
    """
    array = _prepare_array(image, size)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _prepare_array(image: Image.Image, size: int) -> np.ndarray:
    """`prepare_image` as a (size, size, 3) uint8 array: channels_last without a copy."""
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
    return np.asarray(image, dtype=np.uint8)


def _stack_channels_last(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """(n, S, S, 3) arrays -> a (n, 3, S, S) uint8 tensor in channels_last, in one copy."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


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
    array: np.ndarray | None  # (S, S, 3) uint8, decoded and prepared
    encoded: np.ndarray | None  # the bytes of a JPEG left for the device to decode
    width: int | None
    height: int | None
    error: str | None
    orientation: int = 1  # EXIF orientation of `encoded`, for the device to apply


class _FileDataset(torch.utils.data.Dataset):
    """Decodes and prepares one file per item, in a worker; failures become items.

    With `jpeg_bytes`, JPEGs whose header passes the checks are read but not decoded: the
    device decodes them.
    """

    def __init__(
        self, paths: Sequence[str], size: int, max_pixels: int, jpeg_bytes: bool = False
    ) -> None:
        self.paths = list(paths)
        self.size = size
        self.max_pixels = max_pixels
        self.jpeg_bytes = jpeg_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> _Item:
        path = self.paths[position]
        try:
            if self.jpeg_bytes:
                jpeg = read_jpeg(path, max_pixels=self.max_pixels)
                if jpeg is not None:
                    encoded = np.frombuffer(bytearray(jpeg.data), dtype=np.uint8)
                    return _Item(
                        position, None, encoded, jpeg.width, jpeg.height, None, jpeg.orientation
                    )
            decoded = decode_image(path, max_pixels=self.max_pixels, min_size=self.size)
            array = _prepare_array(decoded.image, self.size)
        except Exception as exc:  # a bad file must never stop the batch
            return _Item(position, None, None, None, None, _failure(path, exc))
        return _Item(position, array, None, decoded.width, decoded.height, None)


def _failure(path: str, exc: Exception) -> str:
    """Why a file could not be prepared: ImageError says it; anything else is named."""
    if isinstance(exc, ImageError):
        return str(exc)
    log.debug("failed to prepare %s", path, exc_info=True)
    return f"{type(exc).__name__}: {exc}"


@dataclass(slots=True)
class _Batch:
    good: list[_Item]  # decoded, in the order of `images`
    images: torch.Tensor | None  # (len(good), 3, S, S) uint8, channels_last
    encoded: list[_Item]  # JPEGs for the device to decode
    bad: list[_Item]

    def pin_memory(self) -> _Batch:  # called by the DataLoader when pin_memory=True
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def _collate(items: list[_Item]) -> _Batch:
    """Stack the decoded images; keep failures aside so they never reach the model."""
    decoded = [item for item in items if item.array is not None]
    images = _stack_channels_last([item.array for item in decoded]) if decoded else None
    # Without their pixels, so that workers do not send every image twice.
    good = [_Item(i.position, None, None, i.width, i.height, None) for i in decoded]
    encoded = [item for item in items if item.encoded is not None]
    bad = [item for item in items if item.error is not None]
    return _Batch(good, images, encoded, bad)


class _OneTorchThread:
    """torch on one intra-op thread while anyone holds this; the count from before the first
    holder comes back when the last one leaves (torch's setting is process-wide, and holders
    may overlap: embedding jobs in threads of one process, an Embedder being made)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._before = 0

    def __enter__(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._before = torch.get_num_threads()
                torch.set_num_threads(1)
            self._holders += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                torch.set_num_threads(self._before)


_one_torch_thread = _OneTorchThread()


# -- running the network ----------------------------------------------------------------------
class _Runner:
    """The network under the chosen precision: uint8 images in, float32 unit vectors out.

    Worker threads call it side by side (it keeps no state between calls).
    """

    def __init__(
        self, net: nn.Module, device: torch.device, precision: str, micro_batch: int | None
    ) -> None:
        self.net = net
        self.device = device
        self.precision = precision
        self.micro_batch = micro_batch
        self.forward: Callable[[torch.Tensor], torch.Tensor] = net
        self.fallback: nn.Module | None = None  # set while `forward` is a compiled network
        self.compiled_n = 0  # the one batch size the compiled network sees

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """(n, 3, S, S) uint8 -> (n, dim) float32."""
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        step = self.compiled_n if self.fallback is not None else self.micro_batch
        chunks = x.split(step) if step else (x,)
        with torch.inference_mode(), self._autocast():
            vectors = torch.cat([self._call(chunk) for chunk in chunks])
        return vectors.float().cpu().numpy()

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback is None:
            return self.forward(x)
        n = x.shape[0]
        if n < self.compiled_n:  # always one batch size, so that it compiles only once
            x = torch.cat([x, x.new_zeros((self.compiled_n - n, *x.shape[1:]))])
        try:
            return self.forward(x)[:n]
        except Exception as exc:  # compilation happens on the first call, and may fail there
            log.warning("torch.compile failed (%s); running the network uncompiled", exc)
            self.forward, self.fallback = self.fallback, None
            return self.forward(x)[:n]

    def compile(self, net: nn.Module, batch_size: int) -> None:
        """Run `net` compiled from now on; if compiling fails, the current network stays."""
        compiled = compile_network(net, cpu=self.device.type == "cpu")
        if compiled is not net:
            self.fallback, self.forward = self.net, compiled
            self.compiled_n = self.micro_batch or batch_size

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])


@dataclass(slots=True)
class _Unit:
    """One unit of work: a batch, and its vectors if a worker embedded it already."""

    batch: _Batch
    vectors: np.ndarray | None

    def pin_memory(self) -> _Unit:  # called by the DataLoader when pin_memory=True
        self.batch.pin_memory()
        return self


class _UnitDataset(torch.utils.data.Dataset):
    """Decodes a run of files per item and, given a runner, embeds them in the same process."""

    def __init__(self, files: _FileDataset, units: list[range], runner: _Runner | None) -> None:
        self.files = files
        self.units = units
        self.runner = runner

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index: int) -> _Unit:
        batch = _collate([self.files[position] for position in self.units[index]])
        if self.runner is None or batch.images is None:
            return _Unit(batch, None)
        vectors = self.runner(batch.images)
        batch.images = None  # not sent back
        return _Unit(batch, vectors)


def _identity(unit: _Unit) -> _Unit:
    return unit


def _in_threads(units: _UnitDataset, threads: int) -> Iterator[_Unit]:
    """The units decoded and embedded by `threads` threads, in order, each running torch on one
    thread (`_one_torch_thread` while the job runs), at most two units per thread ahead.

    PIL and torch release the GIL while they work, so the threads run side by side, each op
    whole on the thread that calls it, as in a worker process of one thread.
    """
    pool = ThreadPoolExecutor(threads, thread_name_prefix="simsearch-embed")
    ahead: collections.deque[Future[_Unit]] = collections.deque()
    try:
        with _one_torch_thread:
            for index in range(len(units)):
                ahead.append(pool.submit(units.__getitem__, index))
                if len(ahead) >= 2 * threads:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
    finally:  # also when the caller stops early: queued units are dropped, running ones finish
        pool.shutdown(wait=True, cancel_futures=True)


# -- the embedder ------------------------------------------------------------------------------
class Embedder:
    """A model placed on a device with a precision, ready to embed files or images.

    The model itself is moved to the device (in channels_last layout), not copied; on a CPU,
    inference runs through an optimised copy of it (`optimize_for_cpu`), in the decoding worker
    processes themselves, each on its share of the cores; on a GPU, workers decode and the main
    process runs the network.
    """

    def __init__(
        self,
        model: EmbeddingModel,
        *,
        device: str | None = None,
        precision: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        compile: str = "auto",
        micro_batch: int | None = None,
    ) -> None:
        self.device = choose_device(device)
        self.precision = choose_precision(self.device, precision)
        choose_compile(self.device, compile, 0)  # validate now, decide per job
        if micro_batch is not None and micro_batch < 1:
            raise InputError(f"micro batch must be at least 1, got {micro_batch}")
        self.compile = compile
        self.max_pixels = max_pixels
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.model_id = model.model_id
        self.spec = model.spec
        self.dim = model.config.embedding_dim
        self.input_size = model.config.input_size
        cpu = self.device.type == "cpu"
        self.micro_batch = micro_batch or (CPU_MICRO_BATCH if cpu else None)
        dtype = _DTYPES.get(self.precision, torch.float32)
        self._runner = _Runner(self.model, self.device, self.precision, self.micro_batch)
        if cpu:
            # On one thread, as the worker threads run it: oneDNN builds its kernels (and each
            # convolution its reordered weight) here, once, for all of them. (A few small
            # forward passes on two threads can take seconds when other processes hold the
            # cores.)
            with _one_torch_thread:
                self._runner.net = self._runner.forward = optimize_for_cpu(self.model, dtype)
                size = self.input_size
                self._runner(torch.zeros(self.micro_batch, 3, size, size, dtype=torch.uint8))
        if self.device.type == "cuda":
            # Every batch has the same shape: let cuDNN time its algorithms once and keep the
            # fastest (process-wide, as torch offers it).
            torch.backends.cudnn.benchmark = True
        self.device_jpeg = self.device.type == "cuda" and _device_decodes_jpeg()
        log.info("embedding with %s on %s in %s", self.model_id, self.device, self.precision)

    @property
    def compiled(self) -> bool:
        """Whether the network currently runs compiled (torch.compile)."""
        return self._runner.fallback is not None

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
        if choose_compile(self.device, self.compile, len(paths)) and not self.compiled:
            # Inductor folds and fuses the original network itself, and compiles better from it.
            self._runner.compile(self.model, batch_size)
        plan = plan_job(self.device.type, len(paths), batch_size, workers, self.compiled)
        unit = plan.unit
        files = _FileDataset(paths, self.input_size, self.max_pixels, self.device_jpeg)
        units = [range(i, min(i + unit, len(paths))) for i in range(0, len(paths), unit)]
        if plan.network_in_workers:
            units_done = _in_threads(_UnitDataset(files, units, self._runner), plan.workers)
        else:
            units_done = torch.utils.data.DataLoader(
                _UnitDataset(files, units, None),
                batch_size=None,
                shuffle=False,
                num_workers=plan.workers,
                collate_fn=_identity,
                pin_memory=plan.pin_memory,
            )
        pending: list[EmbedResult] = []
        for item in units_done:
            pending += self._results(item, paths)
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                pending = pending[batch_size:]
        if pending:
            yield pending

    def _results(self, unit: _Unit, paths: list[str]) -> list[EmbedResult]:
        """The unit's results in input order, running the network here if no worker did."""
        batch, vectors = unit.batch, unit.vectors
        results = [
            EmbedResult(i.position, paths[i.position], None, None, None, i.error) for i in batch.bad
        ]
        if vectors is None and batch.images is not None:
            vectors = self._runner(batch.images)
        good = batch.good
        if batch.encoded:
            decoded, images, failed = self._decode_on_device(batch.encoded, paths)
            results += failed
            if images is not None:
                more = self._runner(images)
                vectors = more if vectors is None else np.concatenate([vectors, more])
                good = good + decoded
        if vectors is not None:
            results += [
                EmbedResult(i.position, paths[i.position], v, i.width, i.height, None)
                for i, v in zip(good, vectors, strict=True)
            ]
        results.sort(key=lambda r: r.position)
        return results

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """(n, dim) float32 unit vectors for already-decoded images, such as uploads."""
        out = [np.empty((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            arrays = [_prepare_array(image, self.input_size) for image in chunk]
            out.append(self._runner(_stack_channels_last(arrays)))
        return np.concatenate(out)

    def _decode_on_device(
        self, encoded: list[_Item], paths: list[str]
    ) -> tuple[list[_Item], torch.Tensor | None, list[EmbedResult]]:
        """Decode JPEG bytes on the device: the decoded items, their images, the failures.

        A JPEG the device cannot decode is decoded on the CPU instead, and fails only if that
        fails too.
        """
        size = self.input_size
        crops = decode_jpegs(
            [torch.from_numpy(item.encoded) for item in encoded],
            self.device,
            size,
            [item.orientation for item in encoded],
        )
        good: list[_Item] = []
        images: list[torch.Tensor] = []
        failed: list[EmbedResult] = []
        for item, image in zip(encoded, crops, strict=True):
            path = paths[item.position]
            if image is None:
                try:
                    image = _cpu_prepare(path, size, self.max_pixels).to(self.device)
                except Exception as exc:  # as in the workers: a bad file never stops a batch
                    reason = _failure(path, exc)
                    failed.append(EmbedResult(item.position, path, None, None, None, reason))
                    continue
            good.append(_Item(item.position, None, None, item.width, item.height, None))
            images.append(image)
        return good, (torch.stack(images) if images else None), failed


def _cpu_prepare(path: str, size: int, max_pixels: int) -> torch.Tensor:
    decoded = decode_image(path, max_pixels=max_pixels, min_size=size)
    return _stack_channels_last([_prepare_array(decoded.image, size)])[0]


@functools.cache
def _device_decodes_jpeg() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:
        return False
    return True


def decode_jpegs(
    datas: list[torch.Tensor],
    device: torch.device,
    size: int,
    orientations: Sequence[int] | None = None,
) -> list[torch.Tensor | None]:
    """JPEG bytes -> (3, size, size) uint8 crops on `device`; None where decoding failed.

    One batched nvJPEG call on CUDA; if it fails, each image alone, so one bad file costs
    only itself. EXIF orientations (1-8, from `read_jpeg`) are applied here, as decode_image
    applies them: torchvision applies them only when decoding on the CPU.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(items: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(items, mode=ImageReadMode.RGB, device=device)

    try:
        images: list[torch.Tensor | None] = list(decode(datas))
    except Exception:
        images = []
        for data in datas:
            try:
                images.append(decode([data])[0])
            except Exception as exc:
                log.debug("device JPEG decoding failed: %s", exc)
                images.append(None)
    orientations = orientations or [1] * len(datas)
    return [
        None if image is None else crop_resize(orient(image, orientation), size)
        for image, orientation in zip(images, orientations, strict=True)
    ]


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned as EXIF `orientation` says (PIL's ImageOps.exif_transpose)."""
    if orientation in (5, 6, 7, 8):  # the ones that turn by 90 degrees transpose first
        image = image.transpose(-2, -1)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation in (2, 3):
        image = image.flip(-1)
    if orientation in (3, 4):
        image = image.flip(-2)
    return image


def crop_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """The centre square of a (3, H, W) uint8 image, resized to `size` as `prepare_image` does."""
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[:, top : top + side, left : left + side]
    if side == size:
        return square.contiguous()
    x = square.unsqueeze(0).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def compile_network(net: nn.Module, *, cpu: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.compile(net), or net itself where compiling is unavailable.

    On a CPU with weight freezing, so that Inductor folds the batch norms into the convolutions.
    """
    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:
        return net
    try:
        return compile_fn(net, dynamic=False, options={"freezing": True} if cpu else None)
    except Exception as exc:
        log.warning("torch.compile is unavailable (%s); running the network uncompiled", exc)
        return net
