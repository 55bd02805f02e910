"""The Deep Ranking network and its backbones; checkpoint save and load.

Never imports the store or the index: stored vectors are tied to a model only through its id.
"""

from simsearch.model.checkpoint import load_checkpoint, load_model, save_checkpoint
from simsearch.model.config import (
    ARCHITECTURES,
    BACKBONES,
    BASELINE_MODEL,
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    MODEL_ALIASES,
    PACKAGED_MODELS,
    ModelConfig,
)
from simsearch.model.network import (
    ConvNetEmbedder,
    DeepRankingNet,
    EmbeddingModel,
    build_model,
    model_id_for,
)

__all__ = [
    "ARCHITECTURES",
    "BACKBONES",
    "BASELINE_MODEL",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "MODEL_ALIASES",
    "PACKAGED_MODELS",
    "ConvNetEmbedder",
    "DeepRankingNet",
    "EmbeddingModel",
    "ModelConfig",
    "build_model",
    "load_checkpoint",
    "load_model",
    "model_id_for",
    "save_checkpoint",
]
