"""`simsearch train` and `simsearch triplets sample`: thin commands over simsearch.training and
simsearch.sampling (parse, call the library, print).

Results go to stdout (a summary, or JSON with --json); the progress bar and logs go to stderr.
torch is imported inside the commands so that `--help` stays instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from simsearch.commands._common import DeviceOption, JsonOption, fail, print_json
from simsearch.errors import SimsearchError

if TYPE_CHECKING:
    from simsearch.training import StepMetrics

INTERRUPTED_EXIT = 130  # the shell's code for a command stopped by Ctrl-C


# ---------------------------------------------------------------------------------------------
# simsearch triplets sample


def sample(
    input_dir: Annotated[
        Path,
        typer.Option(
            "--input-dir",
            help="Class folders (each sub-folder one class), a flat folder with --flat, or a "
            "layout made by `simsearch triplets fetch` (it has manifest.jsonl).",
            exists=True,
            file_okay=False,
            readable=True,
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            help="CSV to write: query,positive,negative per line, paths relative to its folder.",
            dir_okay=False,
            show_default=False,
        ),
    ],
    num_pos: Annotated[
        int, typer.Option("--num-pos", min=1, help="Positives per query image.", show_default=False)
    ],
    num_neg: Annotated[
        int, typer.Option("--num-neg", min=1, help="Negatives per positive.", show_default=False)
    ],
    seed: Annotated[int, typer.Option("--seed", min=0, help="Same seed, same triplets.")] = 0,
    flat: Annotated[
        bool,
        typer.Option(
            "--flat",
            help="INPUT_DIR holds the images directly; the class is the file-name prefix "
            "before the first '_' (n01443537_2625.jpg is class n01443537).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Sample training triplets (query, positive, negative) from labelled images into a CSV.

    For every image as query: NUM_POS other images of its class as positives and, for each,
    NUM_NEG images of other classes as negatives. On a fetched layout the records are grouped
    by query; a picture named as a query's negative is never one of its positives.

    Example: simsearch triplets sample --input-dir photos --output t.csv --num-pos 2 --num-neg 3
    """
    from simsearch.sampling import sample_directory, write_triplets_csv

    try:
        layout = "flat" if flat else "auto"
        triplets, summary = sample_directory(input_dir, num_pos, num_neg, seed, layout=layout)
        written = write_triplets_csv(triplets, output)
    except SimsearchError as exc:
        raise fail(exc) from None
    if as_json:
        print_json({"output": os.path.abspath(output), **summary.to_dict()})
        return
    for reason in summary.skipped:
        typer.echo(f"skipped {reason}", err=True)
    google = summary.layout == "google"
    what = "query groups" if google else "queries"
    line = (
        f"wrote {written} triplets to {output} ({summary.classes} "
        f"{'search texts' if google else 'classes'}, {summary.images} images, "
        f"{summary.queries} {what})"
    )
    notes = []
    if summary.short:
        why = "" if google else " (small classes)"
        notes.append(f"{summary.short} {what} got fewer triplets than asked{why}")
    if summary.conflicts:
        notes.append(f"{summary.conflicts} positives left out (also a negative of their query)")
    if summary.skipped:
        notes.append(f"{len(summary.skipped)} skipped")
    typer.echo(line + ("; " + "; ".join(notes) if notes else ""))


# ---------------------------------------------------------------------------------------------
# simsearch train


class _TrainBar:
    """A tqdm bar on stderr (hidden when stderr is not a terminal) with loss and accuracy."""

    def __init__(self) -> None:
        self.bar = None
        self.loss: float | None = None
        self.accuracy: float | None = None

    def start(self, step: int, steps: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=steps,
            initial=step,
            desc="training",
            unit="step",
            file=sys.stderr,
            disable=None,
            dynamic_ncols=True,
        )

    def update(self, m: StepMetrics) -> None:
        if m.loss == m.loss:  # not NaN (a batch whose images were all unreadable)
            # Smoothed, so the numbers can be read while they change every step.
            self.loss = m.loss if self.loss is None else 0.9 * self.loss + 0.1 * m.loss
            acc = m.accuracy
            self.accuracy = acc if self.accuracy is None else 0.9 * self.accuracy + 0.1 * acc
        if self.bar is not None:
            if self.loss is not None:
                self.bar.set_postfix(loss=f"{self.loss:.4f}", acc=f"{self.accuracy:.3f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train(
    triplets: Annotated[
        Path | None,
        typer.Option(
            "--triplets",
            help="Triplet CSV (query,positive,negative per line; relative paths from its folder).",
            exists=True,
            dir_okay=False,
            readable=True,
            show_default=False,
        ),
    ] = None,
    classes: Annotated[
        Path | None,
        typer.Option(
            "--classes",
            help="Class folders (each sub-folder one class); triplets are sampled online.",
            exists=True,
            file_okay=False,
            readable=True,
            show_default=False,
        ),
    ] = None,
    flat: Annotated[
        bool | None,
        typer.Option(
            "--flat",
            help="--classes is one folder; the class is the file-name prefix before the first _.",
            show_default=False,
        ),
    ] = None,
    google: Annotated[
        Path | None,
        typer.Option(
            "--google",
            help="A layout made by `simsearch triplets fetch` (DIR/manifest.jsonl).",
            exists=True,
            file_okay=False,
            readable=True,
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for model.safetensors, train_config.json, train_state.safetensors, "
            "metrics and curves.png.",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            "--backbone",
            help="efficientnet_lite0, vgg16 or resnet50. [default: efficientnet_lite0]",
            show_default=False,
        ),
    ] = None,
    embedding_dim: Annotated[
        int | None,
        typer.Option("--embedding-dim", min=1, help="[default: 512]", show_default=False),
    ] = None,
    input_size: Annotated[
        int | None,
        typer.Option(
            "--input-size",
            min=64,
            max=1024,
            help="Pixels a side. [default: 224]",
            show_default=False,
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Start from this checkpoint (its architecture, backbone and size) instead of "
            "a new network.",
            exists=True,
            dir_okay=False,
            readable=True,
            show_default=False,
        ),
    ] = None,
    freeze: Annotated[
        str | None,
        typer.Option(
            "--freeze",
            help="all: backbone frozen (fast, features cached); N: its last N stages train; "
            "none: fine-tune everything. [default: all]",
            show_default=False,
        ),
    ] = None,
    margin: Annotated[
        float | None,
        typer.Option(
            "--margin",
            min=0.0,
            max=4.0,
            help="The hinge's gap g on squared distances of unit vectors. [default: 0.2]",
            show_default=False,
        ),
    ] = None,
    augment_positives: Annotated[
        float | None,
        typer.Option(
            "--augment-positives",
            min=0.0,
            max=1.0,
            help="Share of positives that are edited copies of the query (crop, colour, "
            "rotation, JPEG): the near-duplicate case. [default: 0]",
            show_default=False,
        ),
    ] = None,
    in_class_negatives: Annotated[
        float | None,
        typer.Option(
            "--in-class-negatives",
            min=0.0,
            max=1.0,
            help="With --classes: share of negatives taken from the query's own class (their "
            "positive is then an edited copy of the query). [default: 0]",
            show_default=False,
        ),
    ] = None,
    hard_negatives: Annotated[
        float | None,
        typer.Option(
            "--hard-negatives",
            min=0.0,
            max=1.0,
            help="With --classes: share of out-of-class negatives taken among the 10 images "
            "nearest to the query by the pretrained backbone's features (the paper's golden "
            "features). [default: 0]",
            show_default=False,
        ),
    ] = None,
    head_init: Annotated[
        str | None,
        typer.Option(
            "--head-init",
            help="A new network's embedding: pca (principal directions of the backbone's "
            "features, shallow paths at zero: starts where the ConvNet baseline is) or random. "
            "[default: pca]",
            show_default=False,
        ),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            "--optimizer",
            help="sgd (momentum 0.9, as the paper) or adamw. [default: sgd]",
            show_default=False,
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr", min=0.0, help="[default: 0.01 for sgd, 0.001 for adamw]", show_default=False
        ),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            "--weight-decay",
            min=0.0,
            help="[default: 0.001 for sgd (the paper), 0.01 for adamw]",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", min=1, help="Triplets a step. [default: 32]", show_default=False
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=1,
            help="Total steps (with --resume: the new total). [default: 1000]",
            show_default=False,
        ),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option("--checkpoint-every", min=1, help="[default: 200]", show_default=False),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", min=0, help="[default: 0]", show_default=False)
    ] = None,
    device: DeviceOption = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="auto (bf16 on CPUs with native bf16, AMP on CUDA, else fp32), bf16, fp16 or "
            "fp32. [default: auto]",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=0, help="Decoding processes. Default: from the CPU count."),
    ] = None,
    metrics_format: Annotated[
        str | None,
        typer.Option("--metrics-format", help="csv or jsonl. [default: csv]", show_default=False),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the run in this folder exactly where it stopped (its settings are "
            "kept; --steps, --checkpoint-every, --device, --precision, --workers may change).",
            exists=True,
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Train the Deep Ranking network on triplets: from a CSV, from class folders (sampled
    online), or from a fetched Google layout. Checkpoints every N steps and on Ctrl-C;
    --resume continues exactly.

    Example: simsearch train --classes photos --out run1 --steps 500 --augment-positives 0.5
    """
    from simsearch.config import max_pixels_from_env
    from simsearch.errors import InputError
    from simsearch.training import TrainConfig, resume_config
    from simsearch.training import train as run_training

    settings = {
        "triplets": triplets,
        "classes": classes,
        "flat": flat,
        "google": google,
        "backbone": backbone,
        "embedding_dim": embedding_dim,
        "input_size": input_size,
        "init": init,
        "freeze": freeze,
        "margin": margin,
        "augment_positives": augment_positives,
        "in_class_negatives": in_class_negatives,
        "hard_negatives": hard_negatives,
        "head_init": head_init,
        "optimizer": optimizer,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "steps": steps,
        "checkpoint_every": checkpoint_every,
        "seed": seed,
        "device": device,
        "precision": precision,
        "workers": workers,
        "metrics_format": metrics_format,
    }
    given = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items() if v is not None
    }
    bar = _TrainBar()
    try:
        if resume is not None:
            if out is not None and os.path.abspath(out) != os.path.abspath(resume):
                raise InputError("--resume continues in its own folder; drop --out")
            config = resume_config(resume, **given)
            out = resume
        else:
            if out is None:
                raise InputError("say where to write the model with --out DIR")
            if init is not None and {"backbone", "embedding_dim", "input_size"} & set(given):
                raise InputError(
                    "--init takes the backbone, embedding size and input size from the "
                    "checkpoint; drop --backbone, --embedding-dim and --input-size"
                )
            given.setdefault("max_pixels", max_pixels_from_env())
            config = TrainConfig(**given)
        result = run_training(
            config, out, resume=resume is not None, on_start=bar.start, on_step=bar.update
        )
    except SimsearchError as exc:
        raise fail(exc) from None
    finally:
        bar.close()
    if as_json:
        print_json(result.to_dict())
    elif result.interrupted:
        typer.echo(
            f"interrupted at step {result.step} of {result.steps}; checkpoint saved in "
            f"{result.out}\ncontinue with: simsearch train --resume {result.out}"
        )
    else:
        scores = ""
        if result.loss is not None:
            scores = (
                f" (last steps: loss {result.loss:.4f}, triplet accuracy {result.accuracy:.3f})"
            )
        typer.echo(f"trained {result.step} steps{scores}")
        typer.echo(f"model: {result.model}")
        typer.echo(
            f"metrics: {result.metrics}" + (f", curves: {result.curves}" if result.curves else "")
        )
        typer.echo(f"use it: simsearch index DIR --model {result.model} --reindex")
    if result.skipped:
        typer.echo(f"{result.skipped} triplets were skipped for unreadable images", err=True)
    if result.interrupted:
        raise typer.Exit(INTERRUPTED_EXIT)
