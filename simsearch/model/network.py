"""The embedding networks: the ConvNet baseline and the Deep Ranking multiscale network.

Deep Ranking (Wang et al., CVPR 2014, Fig. 3): a deep ConvNet path Q sees the full image; two
shallow paths P and R see it subsampled 4:1 and 8:1, each a single 8x8 stride-4 convolution with
96 filters max-pooled to a 4x4x96 grid, so they keep the coarse colour and layout that the deep
path is trained to be invariant to. Each path is L2-normalised, a linear embedding maps their
concatenation to the output size, and the result is L2-normalised again.

Both networks take raw pixels (uint8 or float on the 0..255 scale) and do the pixel
normalisation themselves, so the data pipeline can ship uint8 tensors and a checkpoint carries
its own preprocessing.
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from simsearch.model.backbones import Backbone, create_backbone
from simsearch.model.config import ModelConfig


class EmbeddingModel(nn.Module, abc.ABC):
    """Raw pixels (n, 3, H, W) in 0..255 -> (n, embedding_dim) float32 unit vectors."""

    def __init__(self, config: ModelConfig, backbone: Backbone) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.model_id = ""  # set by build_model / load_checkpoint / save_checkpoint
        self.spec = ""  # how to load it again: a builtin name or a checkpoint path
        # Not persistent: they follow from the config, so checkpoints and ids do not repeat them.
        mean = torch.tensor(config.pixel_mean).view(1, 3, 1, 1)
        std = torch.tensor(config.pixel_std).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / std, persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)

    def normalize_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std, accepting uint8 so the data pipeline never converts."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (n, 3, H, W), got {tuple(images.shape)}")
        return images.float() * self.pixel_scale + self.pixel_shift

    @abc.abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> the features before the head."""

    @abc.abstractmethod
    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Features -> unit vectors (float32 even under autocast)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(self.normalize_pixels(images)))

    def freeze_backbone(self, trainable_stages: int = 0) -> None:
        """Freeze the backbone except its last `trainable_stages` stages (fine-tuning)."""
        stages = self.backbone.stages()
        cut = len(stages) - max(0, min(trainable_stages, len(stages)))
        for i, stage in enumerate(stages):
            for module in stage:
                for p in module.parameters():
                    p.requires_grad_(i >= cut)

    def extra_repr(self) -> str:
        return f"model_id={self.model_id!r}"


class ConvNetEmbedder(EmbeddingModel):
    """The paper's 'ConvNet' baseline: the backbone's pooled features, L2-normalised."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return _l2(features)


class ShallowPath(nn.Module):
    """P or R: subsample, one 8x8 stride-4 convolution, max-pool to a grid, L2-normalise.

    The paper does not name the activation; a ReLU follows the convolution as in every
    convolutional layer of its ConvNet.
    """

    def __init__(self, subsample: int, filters: int = 96, grid: int = 4) -> None:
        super().__init__()
        self.subsample = subsample
        self.conv = nn.Conv2d(3, filters, kernel_size=8, stride=4, padding=2)
        # The paper pools with fixed windows sized for its input; adaptive pooling gives the
        # same 4x4 grid for any input size.
        self.pool = nn.AdaptiveMaxPool2d(grid)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) normalised pixels -> (n, filters, grid, grid)."""
        # Averaging before subsampling avoids aliasing that plain striding would add.
        x = F.avg_pool2d(x, self.subsample)
        return self.pool(F.relu(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _l2(self.grid(x).flatten(1))


class DeepRankingNet(EmbeddingModel):
    """Q (deep backbone) + P (4:1) + R (8:1), each L2-normalised, linear embedding, L2."""

    def __init__(self, config: ModelConfig, backbone: Backbone) -> None:
        super().__init__(config, backbone)
        filters, grid = config.shallow_filters, config.shallow_grid
        self.path_p = ShallowPath(4, filters, grid)
        self.path_r = ShallowPath(8, filters, grid)
        width = backbone.feature_dim + 2 * filters * grid * grid
        self.embed = nn.Linear(width, config.embedding_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        q = _l2(self.backbone(x))
        return torch.cat([q, self.path_p(x), self.path_r(x)], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return _l2(self.embed(features))


def _l2(x: torch.Tensor) -> torch.Tensor:
    # In float32: bf16 norms are too coarse for unit vectors compared by inner product.
    return F.normalize(x.float(), dim=1)


def build_model(
    config: ModelConfig, *, pretrained: bool = True, backbone_weights: Path | None = None
) -> EmbeddingModel:
    """A network for `config`; its backbone pretrained on ImageNet unless `pretrained` is false."""
    backbone = create_backbone(
        config.backbone, pretrained=pretrained, weights_file=backbone_weights
    )
    cls = ConvNetEmbedder if config.architecture == "convnet" else DeepRankingNet
    model = cls(config, backbone)
    model.model_id = model_id_for(config, model.state_dict())
    return model


def model_id_for(config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> str:
    """'<architecture>-<backbone>-<dim>-<10 hex>': sha256 of the config and the weights.

    Stored vectors belong to one model; the id lets the store refuse to mix two.
    """
    h = hashlib.sha256()
    h.update(json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    c = config
    return f"{c.architecture}-{c.backbone}-{c.embedding_dim}-{h.hexdigest()[:10]}"
