"""Training the Deep Ranking network on triplets: settings, data, model, loop, checkpoints.

Reads top to bottom like nanoGPT's train.py. The settings are one dataclass saved as JSON next to
the checkpoint; the triplet stream is a pure function of (seed, position), so `--resume` only has
to restore the weights, the optimiser, the RNG and the step to continue exactly. Nothing in a
training directory is unpickled: the model and the optimiser tensors are safetensors files, the
rest is JSON.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simsearch.augment import augment_copy
from simsearch.config import DEFAULT_MAX_PIXELS
from simsearch.embedding import choose_device, choose_precision, default_workers, prepare_image
from simsearch.errors import ImageError, InputError
from simsearch.fileio import atomic_write
from simsearch.images import decode_image
from simsearch.model import (
    BACKBONES,
    DeepRankingNet,
    EmbeddingModel,
    ModelConfig,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from simsearch.sampling import (
    ListSampler,
    OnlineSampler,
    class_folders,
    read_triplets_csv,
    sample_google_layout,
)

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "train_config.json"
STATE_FILE = "train_state.safetensors"
CURVES_FILE = "curves.png"
METRICS_FIELDS = ("step", "loss", "accuracy", "lr", "seconds", "triplets")
OPTIMIZERS = ("sgd", "adamw")
HEAD_INITS = ("pca", "random")
PCA_SAMPLE = 4000  # images whose deep features define the initial embedding
METRICS_FORMATS = ("csv", "jsonl")
DEFAULT_MARGIN = 0.2  # on squared distances between unit vectors (0..4), as FaceNet
DEFAULT_LR = {"sgd": 0.01, "adamw": 0.001}
DEFAULT_WEIGHT_DECAY = {"sgd": 0.001, "adamw": 0.01}  # sgd: the paper's 0.001
SGD_MOMENTUM = 0.9  # the paper's
# Settings a resumed run may change: they do not alter what is being trained.
RESUMABLE = ("steps", "checkpoint_every", "device", "precision", "workers")
_STATE_FORMAT = "1"
_AUGMENT = 4  # seed word for augmentation draws (sampling uses 1 to 3)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _absolute(path: str | os.PathLike[str]) -> Path:
    """Absolute and normalised ("a/../b" is "b"), as `simsearch.images.discover` reports paths."""
    return Path(os.path.abspath(os.path.expanduser(path)))


# ---------------------------------------------------------------------------------------------
# the loss


def triplet_loss(
    q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float = DEFAULT_MARGIN
) -> torch.Tensor:
    """The paper's hinge: mean over triplets of max(0, g + |q - p|^2 - |q - n|^2)."""
    d_pos = (q - p).pow(2).sum(dim=1)
    d_neg = (q - n).pow(2).sum(dim=1)
    return F.relu(margin + d_pos - d_neg).mean()


def triplet_accuracy(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> float:
    """Share of triplets ranked right, d(q, p) < d(q, n): the paper's similarity precision."""
    d_pos = (q - p).pow(2).sum(dim=1)
    d_neg = (q - n).pow(2).sum(dim=1)
    return float((d_pos < d_neg).float().mean())


# ---------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved as train_config.json in the output folder."""

    # data: exactly one of triplets (CSV), classes (folders, sampled online) or google (layout)
    triplets: str | None = None
    classes: str | None = None
    flat: bool = False  # classes is one folder whose file-name prefixes are the classes
    google: str | None = None
    # model: a new Deep Ranking network on a builtin backbone, or a checkpoint to continue from
    backbone: str = "efficientnet_lite0"
    embedding_dim: int = 512
    input_size: int = 224
    init: str | None = None
    freeze: str = "all"  # "all" (backbone frozen), "none", or N (its last N stages train)
    # objective and triplets
    margin: float = DEFAULT_MARGIN
    augment_positives: float = 0.0  # share of positives that are edited copies of the query
    in_class_negatives: float = 0.0  # share of negatives from the query's class (--classes)
    hard_negatives: float = 0.0  # share of out-of-class negatives among the nearest (--classes)
    # optimisation
    optimizer: str = "sgd"
    lr: float | None = None  # None: 0.01 for sgd, 0.001 for adamw
    weight_decay: float | None = None  # None: 0.001 for sgd (the paper), 0.01 for adamw
    batch_size: int = 32  # triplets per step
    steps: int = 1000
    seed: int = 0
    # running
    checkpoint_every: int = 200
    device: str | None = None
    precision: str = "auto"
    workers: int | None = None
    metrics_format: str = "csv"
    cache_features: bool = True  # frozen backbone: compute each image's deep features once
    head_init: str = "pca"  # a new network's embedding: "pca" of the deep features, or "random"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        sources = [s for s in (self.triplets, self.classes, self.google) if s]
        if len(sources) != 1:
            raise InputError(
                "give exactly one source of triplets: --triplets CSV, --classes DIR or --google DIR"
            )
        for key in ("triplets", "classes", "google", "init"):
            value = getattr(self, key)
            if value:
                object.__setattr__(self, key, str(_absolute(value)))
        if self.flat and not self.classes:
            raise InputError("--flat describes a --classes folder; give --classes DIR")
        if self.in_class_negatives and not self.classes:
            raise InputError(
                "in-class negatives are sampled from class folders; give --classes DIR, or set "
                "--in-class-negatives 0"
            )
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("metrics format", self.metrics_format, METRICS_FORMATS)
        _choice("backbone", self.backbone, BACKBONES)
        _choice("head initialisation", self.head_init, HEAD_INITS)
        self.trainable_stages()  # validates freeze
        _number("margin", self.margin, 0.0, 4.0)
        _number("augmented positive ratio", self.augment_positives, 0.0, 1.0)
        _number("in-class negative ratio", self.in_class_negatives, 0.0, 1.0)
        _number("hard negative ratio", self.hard_negatives, 0.0, 1.0)
        if self.hard_negatives and not self.classes:
            raise InputError(
                "hard negatives are mined among class folders; give --classes DIR, or set "
                "--hard-negatives 0"
            )
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.optimizer])
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", DEFAULT_WEIGHT_DECAY[self.optimizer])
        _number("learning rate", self.lr, 0.0, 100.0, low_open=True)
        _number("weight decay", self.weight_decay, 0.0, 10.0)
        for key, low in (
            ("batch_size", 1),
            ("steps", 1),
            ("checkpoint_every", 1),
            ("embedding_dim", 1),
            ("input_size", 64),
            ("max_pixels", 1),
        ):
            _whole(key, getattr(self, key), low)
        _whole("seed", self.seed, 0)
        if self.workers is not None:
            _whole("workers", self.workers, 0)

    def trainable_stages(self) -> int | None:
        """How many last backbone stages train: 0 for "all", None (every one) for "none"."""
        if self.freeze == "all":
            return 0
        if self.freeze == "none":
            return None
        if isinstance(self.freeze, str) and self.freeze.isdigit():
            return int(self.freeze)
        raise InputError(
            f"freeze must be all, none or a number of last backbone stages to train, "
            f"got {self.freeze!r}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise InputError(f"training config: unknown key(s) {', '.join(unknown)}")
        return cls(**d)


def _choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


def _number(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and low <= value <= high  # type: ignore[arg-type]
    if not ok or (low_open and value == low):
        raise InputError(f"the {name} must be a number from {low} to {high}, got {value!r}")


def _whole(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name.replace('_', ' ')} must be a whole number >= {low}, got {value!r}")


def resume_config(out: str | os.PathLike[str], **changes: Any) -> TrainConfig:
    """The saved settings of the run in `out`, with the changes a resumed run may make."""
    path = _absolute(out) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{path.parent} holds no training run to resume (no {CONFIG_FILE})")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path} ({exc}); it may be damaged") from exc
    config = TrainConfig.from_dict(saved)
    changes = {k: v for k, v in changes.items() if v is not None}
    changed = sorted(k for k, v in changes.items() if k not in RESUMABLE and _differs(config, k, v))
    if changed:
        raise InputError(
            f"a resumed run keeps its settings; {', '.join(changed)} cannot change (only "
            f"{', '.join(RESUMABLE)} can): drop the option or start a new run with --out"
        )
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if k in RESUMABLE})


def _differs(config: TrainConfig, key: str, value: Any) -> bool:
    """Whether setting `key` changes the run (repeating the saved value does not)."""
    try:
        return dataclasses.replace(config, **{key: value}) != config
    except InputError:
        return True


# ---------------------------------------------------------------------------------------------
# data


def make_sampler(config: TrainConfig) -> OnlineSampler | ListSampler:
    """The endless triplet stream the settings describe."""
    if config.classes:
        classes = class_folders(config.classes, flat=config.flat)
        return OnlineSampler(
            classes,
            in_class_negative_ratio=config.in_class_negatives,
            augment_ratio=config.augment_positives,
            hard_negative_ratio=config.hard_negatives,
            seed=config.seed,
        )
    if config.google:
        triplets = sample_google_layout(config.google, None, None, config.seed)
        if not triplets:
            raise InputError(
                f"{config.google} has no complete triplet (query, positive and negative "
                f"downloaded); fetch or import the images first"
            )
    else:
        triplets = read_triplets_csv(config.triplets)  # type: ignore[arg-type]
    return ListSampler(triplets, augment_ratio=config.augment_positives, seed=config.seed)


def _load(path: str, size: int, max_pixels: int) -> tuple[Any, torch.Tensor]:
    decoded = decode_image(path, max_pixels=max_pixels, min_size=size)
    return decoded.image, prepare_image(decoded.image, size)


@dataclass(slots=True)  # not frozen: frozen slotted dataclasses do not unpickle on 3.10
class _Item:
    images: torch.Tensor | None  # (3, 3, S, S) uint8: query, positive, negative
    rows: tuple[int, int, int]  # each image's row in the feature cache, -1 for an edited copy
    error: str | None


class TripletDataset(torch.utils.data.Dataset):
    """Item `t` is triplet `t` of the stream, decoded (in a worker) to uint8 tensors."""

    def __init__(
        self,
        sampler: OnlineSampler | ListSampler,
        size: int,
        seed: int,
        max_pixels: int,
        rows: Mapping[str, int],
    ) -> None:
        self.sampler = sampler
        self.size = size
        self.seed = seed
        self.max_pixels = max_pixels
        self.rows = rows

    def __len__(self) -> int:  # endless stream; the batch sampler picks the positions
        return 2**62

    def __getitem__(self, t: int) -> _Item:
        triplet = self.sampler.triplet(t)
        path = triplet.query
        try:
            query_image, query = _load(path, self.size, self.max_pixels)
            if triplet.augmented:
                edited = augment_copy(query_image, np.random.default_rng([self.seed, _AUGMENT, t]))
                positive = prepare_image(edited, self.size)
            else:
                path = triplet.positive
                positive = _load(path, self.size, self.max_pixels)[1]
            path = triplet.negative
            negative = _load(path, self.size, self.max_pixels)[1]
        except ImageError as exc:
            return _Item(None, (-1, -1, -1), f"{path}: {exc}")
        except Exception as exc:  # a bad file must never stop training
            return _Item(None, (-1, -1, -1), f"{path}: {type(exc).__name__}: {exc}")
        p_row = -1 if triplet.augmented else self.rows.get(triplet.positive, -1)
        rows = (self.rows.get(triplet.query, -1), p_row, self.rows.get(triplet.negative, -1))
        return _Item(torch.stack([query, positive, negative]), rows, None)


@dataclass(slots=True)
class _Batch:
    images: torch.Tensor | None  # (3B, 3, S, S): B queries, then B positives, then B negatives
    rows: torch.Tensor | None  # (3B,) int64 cache rows, -1 where not cached
    errors: list[str]

    def pin_memory(self) -> _Batch:
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def _collate(items: list[_Item]) -> _Batch:
    """Triplets with an unreadable image are dropped (and reported), never the batch."""
    good = [i for i in items if i.images is not None]
    errors = [i.error for i in items if i.error]
    if not good:
        return _Batch(None, None, errors)
    images = torch.stack([i.images for i in good]).transpose(0, 1).flatten(0, 1)  # type: ignore[misc]
    rows = torch.tensor([i.rows for i in good], dtype=torch.int64).t().flatten()
    return _Batch(images.contiguous(), rows, errors)


class _Steps(torch.utils.data.Sampler):
    """Step s is positions [s*B, (s+1)*B) of the stream: the batches for steps start..stop-1."""

    def __init__(self, start: int, stop: int, batch_size: int) -> None:
        self.start, self.stop, self.batch_size = start, stop, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        for step in range(self.start, self.stop):
            yield list(range(step * b, (step + 1) * b))

    def __len__(self) -> int:
        return self.stop - self.start


class _PathDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], size: int, max_pixels: int) -> None:
        self.paths, self.size, self.max_pixels = list(paths), size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        try:
            return _load(self.paths[i], self.size, self.max_pixels)[1]
        except Exception:  # reported when the triplet is loaded for training
            return None


def _collate_paths(items: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, list[bool]]:
    ok = [i is not None for i in items]
    good = [i for i in items if i is not None]
    return (torch.stack(good) if good else None), ok


# ---------------------------------------------------------------------------------------------
# model


def _build_model(config: TrainConfig) -> tuple[EmbeddingModel, TrainConfig]:
    if config.init:
        model = load_checkpoint(Path(config.init))
        c = model.config
        config = dataclasses.replace(
            config, backbone=c.backbone, embedding_dim=c.embedding_dim, input_size=c.input_size
        )
    else:
        model_config = ModelConfig(
            "deepranking", config.backbone, config.embedding_dim, input_size=config.input_size
        )
        model = build_model(model_config)
    return model, config


def _apply_freeze(model: EmbeddingModel, config: TrainConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    stages = config.trainable_stages()
    if stages is not None:
        model.freeze_backbone(stages)
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError(
            f"nothing to train: a {model.config.architecture} model with its backbone frozen "
            f"has no trainable weights; use --freeze none or a deepranking model"
        )


def _train_mode(model: nn.Module) -> None:
    """Train mode, except frozen parts: their batch-norm statistics must not drift."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def _cacheable(model: EmbeddingModel, config: TrainConfig) -> bool:
    frozen = not any(p.requires_grad for p in model.backbone.parameters())
    return config.cache_features and frozen and isinstance(model, DeepRankingNet)


def _embed(
    model: EmbeddingModel, images: torch.Tensor, rows: torch.Tensor, cache: torch.Tensor | None
) -> torch.Tensor:
    """The model's forward, taking the frozen deep path's features from `cache` where known.

    Mirrors DeepRankingNet.forward_features (L2-normalised Q, then P, then R), which a test
    checks against the model's own forward.
    """
    if cache is None:
        return model(images)
    x = model.normalize_pixels(images)
    q = cache[rows.clamp(min=0)]
    missing = rows < 0
    if bool(missing.any()):
        with torch.no_grad():
            edited = x[missing].contiguous(memory_format=torch.channels_last)
            q[missing] = model.backbone(edited).float()
    features = torch.cat([F.normalize(q, dim=1), model.path_p(x), model.path_r(x)], dim=1)
    return model.forward_head(features)


@torch.no_grad()
def init_head_from_pca(model: DeepRankingNet, features: torch.Tensor) -> None:
    """Start the embedding at the principal directions of the L2-normalised deep features.

    The shallow paths P and R start at zero weight in the embedding, so the untrained network
    ranks like the ConvNet baseline (centred and projected to the embedding size), and training
    refines that instead of starting from a random projection that throws the pretrained
    geometry away (a randomly initialised head trained on 150 categories was far worse than
    the baseline on unseen ones).
    """
    q = F.normalize(features.float(), dim=1)
    mean = q.mean(dim=0)
    _, _, vh = torch.linalg.svd(q - mean, full_matrices=False)
    weight = torch.zeros_like(model.embed.weight)
    k = min(weight.shape[0], vh.shape[0])
    weight[:k, : q.shape[1]] = vh[:k].to(weight.dtype)
    model.embed.weight.copy_(weight)
    model.embed.bias.copy_(-(weight[:, : q.shape[1]] @ mean.to(weight.dtype)))
    log.info("embedding initialised from the top %d principal directions of %d images", k, len(q))


@torch.no_grad()
def _feature_cache(
    model: EmbeddingModel,
    paths: Sequence[str],
    config: TrainConfig,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    workers: int,
) -> torch.Tensor:
    """(len(paths), feature_dim) float32: the frozen backbone's pooled features, in path order.

    Computed once in fixed batches, so a resumed run gets exactly the same values.
    """
    log.info("computing the frozen backbone's features of %d images once", len(paths))
    cache = torch.zeros(len(paths), model.config.feature_dim, dtype=torch.float32, device=device)
    loader = torch.utils.data.DataLoader(
        _PathDataset(paths, model.config.input_size, config.max_pixels),
        batch_size=64,
        num_workers=workers,
        collate_fn=_collate_paths,
    )
    start = 0
    for images, ok in loader:
        if images is not None:
            x = images.to(device).contiguous(memory_format=torch.channels_last)
            with autocast():
                q = model.backbone(model.normalize_pixels(x)).float()
            index = torch.tensor([start + i for i, good in enumerate(ok) if good], device=device)
            cache[index] = q
        start += len(ok)
    return cache


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_training_state(
    out: Path,
    model: EmbeddingModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    sampler: OnlineSampler | ListSampler,
    step: int,
) -> str:
    """The model (self-describing safetensors) and the state to resume (safetensors + JSON)."""
    from safetensors.torch import save

    model_id = save_checkpoint(model, out / MODEL_FILE)
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {
        "format": _STATE_FORMAT,
        "step": step,
        "model_id": model_id,
        "sampler": sampler.state_dict(),
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    atomic_write(out / STATE_FILE, save(tensors, metadata={"state": json.dumps(meta)}))
    return model_id


def _read_training_state(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    path = out / STATE_FILE
    if not path.is_file():
        raise InputError(f"{out} holds no training state to resume (no {STATE_FILE})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise InputError(f"cannot read the training state {path} ({exc}); it is damaged") from exc
    if meta.get("format") != _STATE_FORMAT:
        raise InputError(f"{path} has state format {meta.get('format')!r}; upgrade simsearch")
    return meta, tensors


def _restore(
    meta: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["optimizer_scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C while the weights are updated, so a checkpoint never holds half a step."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = mask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


# ---------------------------------------------------------------------------------------------
# metrics


@dataclass(frozen=True, slots=True)
class StepMetrics:
    """One row of metrics.csv / metrics.jsonl."""

    step: int  # steps completed, 1-based
    loss: float
    accuracy: float  # share of the batch's triplets with d(q, p) < d(q, n), before the update
    lr: float
    seconds: float  # wall time of the step, data loading included
    triplets: int  # triplets used (those with an unreadable image are dropped)


class _MetricsLog:
    """Append-only rows, flushed each step; a resumed run drops rows after its checkpoint."""

    def __init__(self, path: Path, fmt: str, keep_until: int) -> None:
        self.path, self.fmt = path, fmt
        self.rows: list[dict[str, float]] = [
            r for r in _read_metrics(path, fmt) if r["step"] <= keep_until
        ]
        with open(path, "w", newline="", encoding="utf-8") as f:
            if fmt == "csv":
                writer = csv.DictWriter(f, METRICS_FIELDS, lineterminator="\n")
                writer.writeheader()
                writer.writerows({k: _fmt(r[k]) for k in METRICS_FIELDS} for r in self.rows)
            else:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
        self.file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115

    def write(self, m: StepMetrics) -> None:
        row = dataclasses.asdict(m)
        self.rows.append(row)
        if self.fmt == "csv":
            self.file.write(",".join(_fmt(row[k]) for k in METRICS_FIELDS) + "\n")
        else:
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _read_metrics(path: Path, fmt: str) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if fmt == "csv":
                source: Iterator[dict[str, Any]] = csv.DictReader(f)
            else:
                source = (json.loads(line) for line in f if line.strip())
            for r in source:
                row = {k: float(r[k]) for k in METRICS_FIELDS}
                row["step"] = int(row["step"])
                row["triplets"] = int(row["triplets"])
                rows.append(row)
    except (ValueError, KeyError, TypeError) as exc:  # a cut last line after a crash
        log.warning("ignoring the unreadable end of %s (%s)", path, exc)
    return rows


def plot_curves(rows: Sequence[Mapping[str, float]], path: Path) -> Path | None:
    """Loss and triplet accuracy against the step, as a PNG (matplotlib, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return None
    steps = np.array([r["step"] for r in rows], dtype=np.float64)
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    for position, (key, label) in enumerate(
        [("loss", "triplet loss"), ("accuracy", "triplet accuracy")], start=1
    ):
        ax = fig.add_subplot(1, 2, position)
        values = np.array([r[key] for r in rows], dtype=np.float64)
        ax.plot(steps, values, color="0.7", linewidth=0.8, label="per step")
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color="C0", label=f"mean of {window}")
            ax.legend(loc="best", fontsize="small")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass(frozen=True, slots=True)
class TrainResult:
    """Where the run left its files and how it ended."""

    out: str
    model: str  # the checkpoint: use it with `simsearch index DIR --model MODEL --reindex`
    model_id: str
    step: int
    steps: int
    interrupted: bool  # stopped by Ctrl-C; `--resume OUT` continues
    loss: float | None  # mean of the last (up to) 20 steps
    accuracy: float | None
    metrics: str
    curves: str | None
    skipped: int  # triplets dropped for unreadable images

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train(
    config: TrainConfig,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_step: Callable[[StepMetrics], None] | None = None,
) -> TrainResult:
    """Train, checkpointing every `config.checkpoint_every` steps, at the end and on Ctrl-C.

    With `resume`, `out` must hold a run (take its `config` from `resume_config(out)`); training
    continues from its last checkpoint exactly as if it had never stopped. `on_start(step, steps)`
    and `on_step(metrics)` report progress; an exception from them stops the run (Ctrl-C,
    KeyboardInterrupt, saves a checkpoint first).
    """
    out_dir = _absolute(out)
    if not resume and (out_dir / STATE_FILE).exists():
        raise InputError(
            f"{out_dir} already holds a training run; continue it with --resume {out_dir} or "
            f"choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    # device and precision, decided once
    device = choose_device(config.device)
    precision = choose_precision(device, config.precision)

    def autocast() -> contextlib.AbstractContextManager:
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=_DTYPES[precision])

    # model
    torch.manual_seed(config.seed)
    meta: dict[str, Any] = {}
    state_tensors: dict[str, torch.Tensor] = {}
    if resume:
        meta, state_tensors = _read_training_state(out_dir)
        model: EmbeddingModel = load_checkpoint(out_dir / MODEL_FILE)
        if model.model_id != meta["model_id"]:
            raise InputError(
                f"{out_dir / MODEL_FILE} is not the model of {STATE_FILE} (a save was cut "
                f"short?); restart the run"
            )
    else:
        model, config = _build_model(config)
    _apply_freeze(model, config)
    model = model.to(device, memory_format=torch.channels_last)
    _train_mode(model)
    atomic_write(out_dir / CONFIG_FILE, (json.dumps(config.to_dict(), indent=2) + "\n").encode())

    # data
    sampler = make_sampler(config)
    fresh = not resume and not config.init
    start = int(meta.get("step", 0))
    if resume:
        sampler.load_state_dict(meta["sampler"])
        if sampler.position != start * config.batch_size:
            raise InputError(f"{out_dir / STATE_FILE} is inconsistent; restart the run")
    images_per_step = 3 * config.batch_size
    workers = config.workers
    if workers is None:
        workers = default_workers(max(0, config.steps - start) * images_per_step, images_per_step)
    rows: dict[str, int] = {}
    cache = None
    if _cacheable(model, config):
        rows = {p: i for i, p in enumerate(sampler.paths)}
        cache = _feature_cache(model, sampler.paths, config, device, autocast, workers)
    if config.hard_negatives and isinstance(sampler, OnlineSampler):
        # The paper's "golden features": the pretrained backbone's, fixed for the whole run.
        golden = (
            cache
            if cache is not None
            else _feature_cache(model, sampler.paths, config, device, autocast, workers)
        )
        sampler.set_hard_negatives(golden.cpu().numpy())
    if fresh and config.head_init == "pca" and isinstance(model, DeepRankingNet):
        sample = sampler.paths[:: max(1, len(sampler.paths) // PCA_SAMPLE)]
        features = (
            cache[[rows[p] for p in sample]]
            if cache is not None
            else _feature_cache(model, sample, config, device, autocast, workers)
        )
        init_head_from_pca(model, features)
    loader = torch.utils.data.DataLoader(
        TripletDataset(sampler, model.config.input_size, config.seed, config.max_pixels, rows),
        batch_sampler=_Steps(start, config.steps, config.batch_size),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )

    # optimiser
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=SGD_MOMENTUM, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if resume:
        _restore(meta, state_tensors, optimizer, scaler)

    metrics = _MetricsLog(
        out_dir / f"metrics.{config.metrics_format}", config.metrics_format, start
    )
    log.info(
        "training %s on %s in %s: steps %d to %d, %d triplets a step, %d workers",
        model.config.backbone,
        device,
        precision,
        start,
        config.steps,
        config.batch_size,
        workers,
    )
    if on_start is not None:
        on_start(start, config.steps)

    step, skipped, interrupted = start, 0, False
    reported: set[str] = set()
    last = time.perf_counter()
    try:
        for batch in loader:
            for error in batch.errors:
                # Once per file: an unreadable image comes back in every epoch.
                level = logging.DEBUG if error in reported else logging.WARNING
                log.log(level, "skipping triplets with %s", error)
                reported.add(error)
            skipped += len(batch.errors)
            if batch.images is None:
                with _sigint_deferred():
                    step += 1
                    sampler.position = step * config.batch_size
                result = StepMetrics(step, math.nan, math.nan, config.lr, 0.0, 0)
            else:
                images = batch.images.to(device, non_blocking=True)
                images = images.contiguous(memory_format=torch.channels_last)
                batch_rows = batch.rows.to(device)  # type: ignore[union-attr]
                with autocast():
                    vectors = _embed(model, images, batch_rows, cache)
                q, p, n = vectors.float().chunk(3)
                loss = triplet_loss(q, p, n, config.margin)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                with _sigint_deferred():  # the update and the step count change together
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    step += 1
                    sampler.position = step * config.batch_size
                now = time.perf_counter()
                result = StepMetrics(
                    step,
                    float(loss.detach()),
                    triplet_accuracy(q.detach(), p.detach(), n.detach()),
                    float(optimizer.param_groups[0]["lr"]),
                    now - last,
                    len(q),
                )
                last = now
            metrics.write(result)
            if step % config.checkpoint_every == 0 and step < config.steps:
                save_training_state(out_dir, model, optimizer, scaler, sampler, step)
                plot_curves(metrics.rows, out_dir / CURVES_FILE)
            if on_step is not None:
                on_step(result)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted at step %d; saving a checkpoint", step)
    finally:
        metrics.close()
    model_id = save_training_state(out_dir, model, optimizer, scaler, sampler, step)
    curves = plot_curves(metrics.rows, out_dir / CURVES_FILE) if metrics.rows else None
    recent = [r for r in metrics.rows[-20:] if not math.isnan(r["loss"])]
    return TrainResult(
        out=str(out_dir),
        model=str(out_dir / MODEL_FILE),
        model_id=model_id,
        step=step,
        steps=config.steps,
        interrupted=interrupted,
        loss=float(np.mean([r["loss"] for r in recent])) if recent else None,
        accuracy=float(np.mean([r["accuracy"] for r in recent])) if recent else None,
        metrics=str(metrics.path),
        curves=str(curves) if curves else None,
        skipped=skipped,
    )


__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "StepMetrics",
    "TrainConfig",
    "TrainResult",
    "TripletDataset",
    "make_sampler",
    "plot_curves",
    "resume_config",
    "save_training_state",
    "train",
    "triplet_accuracy",
    "triplet_loss",
]
