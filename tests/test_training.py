"""Training: the loss against a loop, settings, augmentation, a tiny real run, exact resume, Ctrl-C.

The runs use the real EfficientNet-Lite0 backbone (frozen, features cached) at 64 pixels on 3
classes of 4 generated pictures each, in fp32 without worker processes where results must match.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from badfiles import make_jpeg, photo_like, truncated_jpeg
from safetensors.torch import load_file
from typer.testing import CliRunner

from simsearch.augment import augment_copy
from simsearch.commands.train import sample as sample_command
from simsearch.commands.train import train as train_command
from simsearch.errors import InputError
from simsearch.model import load_checkpoint
from simsearch.training import (
    MODEL_FILE,
    STATE_FILE,
    TrainConfig,
    _build_model,
    _embed,
    _feature_cache,
    _load,
    init_head_from_pca,
    resume_config,
    train,
    triplet_accuracy,
    triplet_loss,
)

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    """3 class folders of 4 pictures each, one colour per class (upper-case extensions too)."""
    root = tmp_path_factory.mktemp("classes")
    for c, colour in enumerate(COLOURS):
        (root / f"class{c}").mkdir()
        for i in range(4):
            make_jpeg(root / f"class{c}" / f"{i}.JPG", size=(80, 64), color=colour, seed=10 * c + i)
    return root


def small(classes: Path, **changes) -> TrainConfig:
    """Deterministic settings: fp32, no worker processes, momentum and augmentation at work."""
    settings = dict(
        classes=str(classes),
        input_size=64,
        embedding_dim=32,
        batch_size=4,
        steps=6,
        lr=0.05,
        precision="fp32",
        workers=0,
        augment_positives=0.25,
        in_class_negatives=0.25,
        checkpoint_every=2,
        seed=3,
    )
    return TrainConfig(**{**settings, **changes})


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / MODEL_FILE))


def metric_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# the loss


def test_triplet_loss_and_accuracy_match_a_brute_force_loop():
    rng = np.random.default_rng(0)
    q, p, n = (torch.from_numpy(rng.normal(size=(7, 5))).float() for _ in range(3))
    p[0] = q[0]  # a triplet far inside the margin: zero loss
    for margin in (0.0, 0.1, 1.0, 3.0):
        total, right = 0.0, 0
        for i in range(7):
            d_pos = sum((float(q[i, k]) - float(p[i, k])) ** 2 for k in range(5))
            d_neg = sum((float(q[i, k]) - float(n[i, k])) ** 2 for k in range(5))
            total += max(0.0, margin + d_pos - d_neg)
            right += d_pos < d_neg
        assert float(triplet_loss(q, p, n, margin)) == pytest.approx(total / 7, rel=1e-5)
        assert triplet_accuracy(q, p, n) == pytest.approx(right / 7)
    assert 0 < triplet_accuracy(q, p, n) < 1


def test_triplet_loss_gradient_pulls_the_positive_and_pushes_the_negative():
    q = torch.tensor([[0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0]], requires_grad=True)
    n = torch.tensor([[0.0, 1.0]], requires_grad=True)
    triplet_loss(q, p, n, margin=0.5).backward()
    assert p.grad.tolist() == [[2.0, 0.0]] and n.grad.tolist() == [[0.0, -2.0]]


# ---------------------------------------------------------------------------------------------
# settings and augmentation


def test_train_config_checks_and_round_trips(tmp_path):
    with pytest.raises(InputError, match="exactly one source"):
        TrainConfig()
    with pytest.raises(InputError, match="exactly one source"):
        TrainConfig(classes="a", triplets="b.csv")
    with pytest.raises(InputError, match="freeze must be all, none or a number"):
        TrainConfig(classes="a", freeze="some")
    with pytest.raises(InputError, match="give --classes DIR"):
        TrainConfig(triplets="t.csv", in_class_negatives=0.5)
    with pytest.raises(InputError, match="--hard-negatives 0"):
        TrainConfig(triplets="t.csv", hard_negatives=0.5)
    with pytest.raises(InputError, match="unknown head initialisation"):
        TrainConfig(classes="a", head_init="zeros")
    with pytest.raises(InputError, match="unknown optimizer"):
        TrainConfig(classes="a", optimizer="adam")
    config = TrainConfig(classes="a", optimizer="adamw", freeze="2")
    assert (config.lr, config.weight_decay, config.trainable_stages()) == (0.001, 0.01, 2)
    assert TrainConfig(classes="a").lr == 0.01 and TrainConfig(classes="a").weight_decay == 0.001
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.classes == str(Path("a").absolute())


def test_augment_copy_is_seeded_and_edits_the_picture():
    image = photo_like((96, 80), seed=4)
    one = augment_copy(image, np.random.default_rng(1))
    assert one.mode == "RGB"
    assert np.array_equal(
        np.asarray(one), np.asarray(augment_copy(image, np.random.default_rng(1)))
    )
    copies = [np.asarray(augment_copy(image, np.random.default_rng(s))) for s in range(5)]
    assert any(c.shape != (80, 96, 3) or not np.array_equal(c, np.asarray(image)) for c in copies)
    assert image.size == (96, 80)  # the original is untouched


def test_cached_features_give_the_model_s_own_embeddings(classes):
    model, _ = _build_model(small(classes))
    model.eval()
    paths = sorted(str(p) for p in classes.rglob("*.JPG"))
    config = small(classes)
    cache = _feature_cache(model, paths, config, torch.device("cpu"), contextlib.nullcontext, 0)
    images = torch.stack([_load(p, 64, 10**8)[1] for p in paths[:5]])
    rows = torch.tensor([0, 1, -1, 3, -1])  # -1: computed now (an edited copy)
    with torch.no_grad():
        expected = model(images)
        got = _embed(model, images, rows, cache)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_pca_head_starts_as_the_projected_baseline(classes):
    """Before any step, the network ranks by the centred, projected deep features alone."""
    model, _ = _build_model(small(classes, embedding_dim=8))
    model.eval()
    paths = sorted(str(p) for p in classes.rglob("*.JPG"))
    images = torch.stack([_load(p, 64, 10**8)[1] for p in paths])
    with torch.no_grad():
        features = model.backbone(model.normalize_pixels(images)).float()
    init_head_from_pca(model, features)
    q = torch.nn.functional.normalize(features, dim=1).double()
    centred = q - q.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    expected = torch.nn.functional.normalize(centred @ vh[:8].T, dim=1)
    with torch.no_grad():
        got = model(images).double()
    # Singular vectors are defined up to sign: compare the geometry, not the coordinates.
    torch.testing.assert_close(got @ got.T, expected @ expected.T, atol=1e-4, rtol=0)
    assert torch.count_nonzero(model.embed.weight[:, features.shape[1] :]) == 0


# ---------------------------------------------------------------------------------------------
# training runs


def test_a_tiny_training_run_lowers_the_loss(classes, tmp_path):
    bad = classes.parent / "with-bad"
    if not bad.exists():
        shutil.copytree(classes, bad)
        truncated_jpeg(bad / "class1")  # unreadable: its triplets are skipped, never the run
    config = small(
        bad, steps=20, batch_size=6, in_class_negatives=0.0, augment_positives=0.0, workers=None
    )
    result = train(config, tmp_path / "run")
    rows = metric_rows(tmp_path / "run")
    losses = [float(r["loss"]) for r in rows]
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert result.step == 20 and not result.interrupted and result.skipped > 0
    accuracy = [float(r["accuracy"]) for r in rows]
    assert np.mean(accuracy[-5:]) > np.mean(accuracy[:5])
    model = load_checkpoint(Path(result.model))
    assert model.model_id == result.model_id and model.config.embedding_dim == 32
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["steps"] == 20 and saved["classes"] == str(bad)


@pytest.fixture(scope="module")
def full_run(classes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    train(small(classes), out)
    return out


def test_resume_continues_exactly(classes, full_run, tmp_path):
    out = tmp_path / "halves"
    first = train(small(classes, steps=3), out)
    assert first.step == 3
    resumed = train(resume_config(out, steps=6), out, resume=True)
    assert resumed.step == 6
    expected, got = weights(full_run), weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    scores = [(r["step"], r["loss"], r["accuracy"]) for r in metric_rows(out)]
    assert scores == [(r["step"], r["loss"], r["accuracy"]) for r in metric_rows(full_run)]


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(classes, full_run, tmp_path):
    out = tmp_path / "interrupted"

    def stop_at_step_4(m):
        if m.step == 4:
            raise KeyboardInterrupt

    result = train(small(classes), out, on_step=stop_at_step_4)
    assert result.interrupted and result.step == 4
    assert len(metric_rows(out)) == 4
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files
    resumed = train(resume_config(out), out, resume=True)
    assert resumed.step == 6 and not resumed.interrupted
    expected, got = weights(full_run), weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_a_used_folder(full_run):
    with pytest.raises(InputError, match="margin cannot change"):
        resume_config(full_run, margin=0.5)
    saved = json.loads((full_run / "train_config.json").read_text())
    repeated = resume_config(full_run, margin=saved["margin"], classes=saved["classes"], steps=9)
    assert repeated.steps == 9 and repeated.margin == saved["margin"]
    with pytest.raises(InputError, match="already holds a training run"):
        train(
            TrainConfig.from_dict(json.loads((full_run / "train_config.json").read_text())),
            full_run,
        )
    with pytest.raises(InputError, match="no training run to resume"):
        resume_config(full_run / "nothing")
    assert (full_run / STATE_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# the command


def train_app() -> typer.Typer:
    app = typer.Typer()
    app.command("train")(train_command)
    app.command("sample")(sample_command)
    return app


def test_sample_then_train_from_the_csv_then_resume(classes, tmp_path):
    runner = CliRunner()
    csv_file = tmp_path / "triplets.csv"
    args = ["sample", "--input-dir", str(classes), "--output", str(csv_file)]
    result = runner.invoke(train_app(), [*args, "--num-pos", "1", "--num-neg", "1"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "cli"
    args = ["train", "--triplets", str(csv_file), "--out", str(out), "--input-size", "64"]
    args += ["--embedding-dim", "16", "--steps", "2", "--batch-size", "3", "--precision", "fp32"]
    result = runner.invoke(train_app(), [*args, "--metrics-format", "jsonl"])
    assert result.exit_code == 0, result.output
    assert f"use it: simsearch index DIR --model {out / MODEL_FILE} --reindex" in result.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    result = runner.invoke(train_app(), ["train", "--resume", str(out), "--steps", "3", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["step"], summary["interrupted"]) == (3, False)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()] == [1, 2, 3]
    result = runner.invoke(train_app(), ["train", "--resume", str(out), "--margin", "1"])
    assert result.exit_code == 2 and "simsearch: error: a resumed run keeps" in result.output
    result = runner.invoke(train_app(), ["train", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "exactly one source" in result.output
