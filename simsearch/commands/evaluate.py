"""`simsearch evaluate`: compare models on triplets, classes and copy detection in one table.

Thin: parses options, loads the data sets and calls `simsearch.evaluation`; the table or JSON
goes to stdout, progress bars and logs to stderr. torch is imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from simsearch.commands._common import (
    BatchSizeOption,
    DeviceOption,
    JsonOption,
    ProgressBar,
    WeightsOption,
    WorkersOption,
    embedder_factory,
    fail,
)
from simsearch.config import DEFAULT_BATCH_SIZE
from simsearch.errors import InputError, SimsearchError

if TYPE_CHECKING:
    from simsearch.evaluation import EvaluationReport

_DEFAULT_COPIES = 5  # simsearch.evaluation.DEFAULT_COPIES_PER_IMAGE, without importing numpy


def evaluate(
    models: Annotated[
        list[str],
        typer.Option(
            "--model",
            "-m",
            help="Builtin model (convnet-efficientnet_lite0, convnet-vgg16, convnet-resnet50) or "
            "a .safetensors checkpoint. Repeat to compare models.",
            show_default=False,
        ),
    ],
    triplets: Annotated[
        Path | None,
        typer.Option(
            "--triplets",
            help="Triplet CSV (query,positive,negative; relative paths from the CSV's folder) "
            "or a folder written by `simsearch triplets fetch`: similarity precision.",
        ),
    ] = None,
    classes: Annotated[
        Path | None,
        typer.Option(
            "--classes",
            help="One sub-folder per class, or a flat folder of CLASS_name.jpg files: "
            "precision@1, recall@k, mAP.",
        ),
    ] = None,
    copies: Annotated[
        Path | None,
        typer.Option(
            "--copies",
            help="Originals for copy detection: edited copies are searched for among the "
            "originals and distractors (recall@1, mAP).",
        ),
    ] = None,
    distractors: Annotated[
        Path | None,
        typer.Option("--distractors", help="More images to search among (never copied)."),
    ] = None,
    originals: Annotated[
        int | None,
        typer.Option(
            "--originals",
            min=1,
            help="Copy only this many images of --copies (drawn with --seed); the rest become "
            "distractors. Default: all.",
            show_default=False,
        ),
    ] = None,
    copies_per_image: Annotated[
        int, typer.Option("--copies-per-image", min=1, help="Edited copies of each original.")
    ] = _DEFAULT_COPIES,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the edits and draws.")] = 0,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            min=1,
            help="Quick run: at most N triplets, N class images, N originals, N distractors.",
            show_default=False,
        ),
    ] = None,
    details: Annotated[
        bool, typer.Option("--details", help="Add copy detection's recall@1 per kind of edit.")
    ] = False,
    batch_size: BatchSizeOption = DEFAULT_BATCH_SIZE,
    workers: WorkersOption = None,
    device: DeviceOption = None,
    backbone_weights: WeightsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compare models side by side: similarity precision on triplets, retrieval on classes,
    copy detection on edited copies of originals among distractors.

    Example: simsearch evaluate --model convnet-efficientnet_lite0 --model model.safetensors
    --classes ./imagenet-200x5 --copies ./imagenet-1000x1 --originals 200
    """
    from simsearch import evaluation
    from simsearch.config import max_pixels_from_env

    try:
        if copies is None and (distractors is not None or originals is not None):
            raise InputError("--distractors and --originals need --copies FOLDER")
        pixels = max_pixels_from_env()
        triplet_set = evaluation.load_triplets(triplets, limit=limit) if triplets else None
        class_set = evaluation.load_classes(classes, limit=limit) if classes else None
        copy_set = None
        if copies is not None:
            copy_set = evaluation.load_copies(
                copies,
                distractors,
                originals_count=originals,
                copies_per_image=copies_per_image,
                seed=seed,
                limit=limit,
            )
        report = evaluation.evaluate(
            models,
            embedder_factory=embedder_factory(device, backbone_weights, pixels),
            triplets=triplet_set,
            classes=class_set,
            copies=copy_set,
            batch_size=batch_size,
            workers=workers,
            max_pixels=pixels,
            progress=ProgressBar(leave=False),
        )
    except SimsearchError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(report.to_json())
    else:
        typer.echo(format_report(report, details=details))


def format_report(report: EvaluationReport, *, details: bool = False) -> str:
    """Rows are metrics, columns are models; then what the data sets held."""
    names = [_short(m.spec) for m in report.models]
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, values: list[float | None]) -> None:
        rows.append((label, ["-" if v is None else f"{v:.4f}" for v in values]))

    models = report.models
    for group in ("triplets", "classes", "copies"):
        for metric in getattr(models[0], group) or {}:
            add(f"{group} {metric}", [(getattr(m, group) or {}).get(metric) for m in models])
    if details and models[0].copies_by_edit:
        for kind in models[0].copies_by_edit:
            add(
                f"copies recall@1 {kind}",
                [(m.copies_by_edit or {}).get(kind, {}).get("recall@1") for m in models],
            )
    rows.append(("seconds", [f"{m.seconds:.1f}" for m in models]))
    label_width = max(len("metric"), *(len(label) for label, _ in rows))
    widths = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    header = (f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
    lines = ["  ".join([f"{'metric':<{label_width}}", *header])]
    for label, values in rows:
        cells = (f"{v:>{w}}" for v, w in zip(values, widths, strict=True))
        lines.append("  ".join([f"{label:<{label_width}}", *cells]))
    lines.append("")
    lines += [f"model {_short(m.spec)}: {m.model_id}" for m in models]
    lines += _describe_data(report)
    return "\n".join(lines)


def _describe_data(report: EvaluationReport) -> list[str]:
    sizes = report.datasets
    lines = []
    if "triplets" in sizes:
        t = sizes["triplets"]
        lines.append(f"triplets: {t['triplets']} from {t['source']}")
    if "classes" in sizes:
        c = sizes["classes"]
        lines.append(
            f"classes: {c['images']} images in {c['classes']} classes ({c['queries']} queries) "
            f"from {c['source']}; recall@k: share of queries with a same-class image in the top k"
        )
    if "copies" in sizes:
        c = sizes["copies"]
        lines.append(
            f"copies: {c['copies']} edited copies ({c['copies_per_image']} per original, seed "
            f"{c['seed']}) searched among {c['database']} images ({c['originals']} originals, "
            f"{c['distractors']} distractors)"
        )
    if report.failed:
        lines.append(
            f"left out: {len(report.failed)} file(s) that could not be decoded (see --json)"
        )
    return lines


def _short(spec: str) -> str:
    """A checkpoint's file name, a builtin's name: what fits in a column header."""
    return Path(spec).name if spec.endswith(".safetensors") else spec
