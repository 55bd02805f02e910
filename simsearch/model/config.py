"""Model settings as one frozen dataclass, saved inside every checkpoint so a checkpoint describes
itself, and the builtin models as named configs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from simsearch.config import BASELINE_MODEL, DEFAULT_MODEL  # there, so the CLI needs no torch
from simsearch.errors import InputError

ARCHITECTURES = ("convnet", "deepranking")
# Pooled feature size and pixel normalisation (0..255 scale) of each backbone's ImageNet weights.
_IMAGENET_MEAN = (255 * 0.485, 255 * 0.456, 255 * 0.406)
_IMAGENET_STD = (255 * 0.229, 255 * 0.224, 255 * 0.225)
BACKBONE_FEATURES: dict[str, int] = {"efficientnet_lite0": 1280, "vgg16": 512, "resnet50": 2048}
BACKBONE_PIXELS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # efficientnet-lite was trained on (rgb - 127) / 128, not the torchvision mean/std.
    "efficientnet_lite0": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
    "vgg16": (_IMAGENET_MEAN, _IMAGENET_STD),
    "resnet50": (_IMAGENET_MEAN, _IMAGENET_STD),
}
BACKBONES = tuple(BACKBONE_FEATURES)
RESIZE_MODES = ("shorter_side_center_crop",)
DEFAULT_EMBEDDING_DIM = 512  # the Deep Ranking embedding size when none is chosen
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 64, 1024

MODEL_ALIASES = {"convnet": BASELINE_MODEL, "deepranking": DEFAULT_MODEL}
# Trained networks shipped inside the package (simsearch/model/weights/, model card beside them).
PACKAGED_MODELS = {"deepranking-efficientnet_lite0": "deepranking-efficientnet_lite0.safetensors"}


@dataclass(frozen=True)
class ModelConfig:
    """What a network is: enough to rebuild it before loading its weights."""

    architecture: str  # "convnet" | "deepranking"
    backbone: str  # "efficientnet_lite0" | "vgg16" | "resnet50"
    embedding_dim: int  # convnet: the backbone's feature size; deepranking: chosen
    input_size: int = 224
    pixel_mean: tuple[float, float, float] = None  # type: ignore[assignment]  # None: backbone's
    pixel_std: tuple[float, float, float] = None  # type: ignore[assignment]  # None: backbone's
    resize: str = "shorter_side_center_crop"
    shallow_filters: int = 96
    shallow_grid: int = 4

    def __post_init__(self) -> None:
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        _check_choice("backbone", self.backbone, BACKBONES)
        _check_choice("resize", self.resize, RESIZE_MODES)
        mean, std = BACKBONE_PIXELS[self.backbone]
        object.__setattr__(self, "pixel_mean", _triple("pixel_mean", self.pixel_mean, mean))
        object.__setattr__(self, "pixel_std", _triple("pixel_std", self.pixel_std, std))
        if any(s <= 0 for s in self.pixel_std):
            raise InputError(f"model config: pixel_std must be positive, got {self.pixel_std}")
        _check_int("embedding_dim", self.embedding_dim, 1, 65536)
        _check_int("input_size", self.input_size, MIN_INPUT_SIZE, MAX_INPUT_SIZE)
        _check_int("shallow_filters", self.shallow_filters, 1, 4096)
        _check_int("shallow_grid", self.shallow_grid, 1, 32)
        features = BACKBONE_FEATURES[self.backbone]
        if self.architecture == "convnet" and self.embedding_dim != features:
            raise InputError(
                f"model config: a convnet model's embedding_dim is its backbone's feature size; "
                f"for {self.backbone} use {features}, not {self.embedding_dim}"
            )

    @classmethod
    def for_backbone(
        cls,
        backbone: str,
        architecture: str = "convnet",
        *,
        embedding_dim: int | None = None,
        input_size: int = 224,
    ) -> ModelConfig:
        """A config with the backbone's defaults filled in (feature size, pixel scaling)."""
        _check_choice("backbone", backbone, BACKBONES)
        if embedding_dim is None:
            convnet = architecture == "convnet"
            embedding_dim = BACKBONE_FEATURES[backbone] if convnet else DEFAULT_EMBEDDING_DIM
        return cls(architecture, backbone, embedding_dim, input_size=input_size)

    @property
    def feature_dim(self) -> int:
        """The backbone's pooled feature size (the Q path of the Deep Ranking network)."""
        return BACKBONE_FEATURES[self.backbone]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for checkpoint metadata and model ids."""
        d = dataclasses.asdict(self)
        d["pixel_mean"] = list(self.pixel_mean)
        d["pixel_std"] = list(self.pixel_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Validate a dict read from a checkpoint or a file; names any bad key or value."""
        if not isinstance(d, dict):
            raise InputError(f"model config must be a JSON object, got {type(d).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise InputError(
                f"model config: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}"
            )
        required = ("architecture", "backbone", "embedding_dim")
        missing = [k for k in required if k not in d]
        if missing:
            raise InputError(f"model config: missing key(s) {', '.join(missing)}")
        for key in ("architecture", "backbone", "resize"):
            if key in d and not isinstance(d[key], str):
                raise InputError(f"model config: {key} must be a string, got {d[key]!r}")
        return cls(**d)


def _check_choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"model config: {key}={value!r} is not one of {', '.join(allowed)}")


def _check_int(key: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(
            f"model config: {key} must be a whole number from {low} to {high}, got {value!r}"
        )


def _triple(key: str, value: object, default: tuple[float, float, float]) -> tuple[float, ...]:
    if value is None:
        return tuple(float(v) for v in default)
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not all(math.isfinite(v) for v in value):
        raise InputError(
            f"model config: {key} must be three numbers on the 0..255 scale (red, green, blue), "
            f"got {value!r}"
        )
    return tuple(float(v) for v in value)


BUILTIN_MODELS: dict[str, ModelConfig] = {
    f"convnet-{name}": ModelConfig.for_backbone(name, "convnet") for name in BACKBONES
}
