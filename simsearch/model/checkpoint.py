"""Loading models by name or from checkpoints, and saving checkpoints.

A checkpoint is one .safetensors file: the weights plus metadata holding the ModelConfig as JSON
and the model id, so it rebuilds itself without pickle and without any side file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from simsearch.errors import InputError
from simsearch.fileio import atomic_write
from simsearch.model.config import BUILTIN_MODELS, MODEL_ALIASES, PACKAGED_MODELS, ModelConfig
from simsearch.model.network import EmbeddingModel, build_model, model_id_for

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FORMAT = "1"
CONFIG_KEY = "simsearch_config"
MODEL_ID_KEY = "simsearch_model_id"
FORMAT_KEY = "simsearch_format"


def load_model(spec: str, *, backbone_weights: Path | None = None) -> EmbeddingModel:
    """A builtin model name (or alias) or a checkpoint path -> a model in eval mode.

    `backbone_weights` is only used by builtin models, whose ImageNet weights may need a file.
    """
    name = MODEL_ALIASES.get(spec, spec)
    if name in BUILTIN_MODELS:
        model = build_model(BUILTIN_MODELS[name], backbone_weights=backbone_weights)
        model.spec = name
        log.debug("loaded builtin model %s (%s)", name, model.model_id)
        return model.eval()
    if name in PACKAGED_MODELS:
        model = load_checkpoint(WEIGHTS_DIR / PACKAGED_MODELS[name])
        model.spec = name  # stores record the name, not this installation's path
        return model.eval()
    path = Path(spec).expanduser()
    if path.is_file():
        return load_checkpoint(path)
    if path.suffix == ".safetensors" or os.sep in spec or "/" in spec:
        raise InputError(f"model checkpoint {path} does not exist; check the path")
    names = ", ".join([*PACKAGED_MODELS, *BUILTIN_MODELS, *MODEL_ALIASES])
    raise InputError(
        f"unknown model {spec!r}; use one of {names}, or the path of a .safetensors checkpoint"
    )


def save_checkpoint(model: EmbeddingModel, path: Path) -> str:
    """Write the model atomically (temp file + rename); returns its model id."""
    from safetensors.torch import save

    path = Path(path).expanduser().absolute()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    model_id = model_id_for(model.config, tensors)
    metadata = {
        CONFIG_KEY: json.dumps(model.config.to_dict(), sort_keys=True),
        MODEL_ID_KEY: model_id,
        FORMAT_KEY: FORMAT,
    }
    data = save(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    model.model_id = model_id
    model.spec = str(path)
    log.info("saved model %s to %s", model_id, path)
    return model_id


def load_checkpoint(path: Path) -> EmbeddingModel:
    """Rebuild the model its metadata describes and check the weights against its id."""
    from safetensors import safe_open

    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise InputError(f"model checkpoint {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise InputError(
            f"{path} is not a readable .safetensors checkpoint ({exc}); it may be truncated or "
            f"corrupt: save or download it again"
        ) from exc
    if CONFIG_KEY not in metadata or MODEL_ID_KEY not in metadata:
        raise InputError(
            f"{path} is a safetensors file but not a simsearch checkpoint (no {CONFIG_KEY} "
            f"metadata); make one with simsearch's save_checkpoint"
        )
    if metadata.get(FORMAT_KEY) != FORMAT:
        raise InputError(
            f"{path} has checkpoint format {metadata.get(FORMAT_KEY)!r}, this simsearch reads "
            f"format {FORMAT}; upgrade simsearch"
        )
    try:
        config = ModelConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
    except (json.JSONDecodeError, InputError) as exc:
        raise InputError(f"checkpoint {path} has a bad config: {exc}") from exc
    model = build_model(config, pretrained=False)
    expected = model.state_dict()
    if set(tensors) != set(expected) or any(
        tensors[k].shape != v.shape for k, v in expected.items()
    ):
        raise InputError(
            f"checkpoint {path} is corrupt: its tensors do not match its config "
            f"({config.architecture}, {config.backbone}); save or download it again"
        )
    model.load_state_dict(tensors)
    stored_id = metadata[MODEL_ID_KEY]
    actual_id = model_id_for(config, model.state_dict())
    if actual_id != stored_id:
        raise InputError(
            f"checkpoint {path} is corrupt: its weights hash to model id {actual_id}, not the "
            f"recorded {stored_id}; save or download it again"
        )
    model.model_id = stored_id
    model.spec = str(path)
    log.debug("loaded checkpoint %s (%s)", path, stored_id)
    return model.eval()
