"""`simsearch duplicates`: groups of near-duplicate images in the store, as a table or JSON.

Thin: parses options, calls `simsearch.duplicates.find_duplicates`, prints. Neither numpy nor
torch is imported until the command runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from simsearch.commands._common import JsonOption, ProgressBar, StoreOption, fail, print_json
from simsearch.errors import SimsearchError

if TYPE_CHECKING:
    from simsearch.duplicates import DuplicateReport

# simsearch.duplicates.DEFAULT_THRESHOLD / DEFAULT_K / DEFAULT_BLOCK, without importing numpy
# (a test checks that they agree).
_DEFAULT_THRESHOLD = 0.475
_DEFAULT_K = 10
_DEFAULT_BLOCK = 4096


def duplicates(
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            "-t",
            min=0.0,
            max=2.0,
            help="Images closer than this Euclidean distance (0 to 2) are duplicates.",
        ),
    ] = _DEFAULT_THRESHOLD,
    k: Annotated[
        int,
        typer.Option(
            "-k",
            "--k",
            min=1,
            help="Neighbours per image in the first search; images with more duplicates than "
            "this are searched again with a larger k, so no pair is missed.",
        ),
    ] = _DEFAULT_K,
    block_size: Annotated[
        int,
        typer.Option("--block-size", min=1, help="Images searched at a time (bounds memory)."),
    ] = _DEFAULT_BLOCK,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Group near-duplicate images (the full help is _HELP below)."""
    from simsearch.collection import Collection
    from simsearch.config import resolve_store_dir
    from simsearch.duplicates import find_duplicates

    try:
        with Collection.open(resolve_store_dir(store), write=False) as collection:
            report = find_duplicates(
                collection,
                threshold=threshold,
                k=k,
                block_size=block_size,
                progress=ProgressBar(),
            )
    except SimsearchError as exc:
        raise fail(exc) from None
    if as_json:
        print_json(report.to_dict())
        return
    for line in format_groups(report):
        typer.echo(line)
    typer.echo(report.line())


# Paragraphs on one line each: Typer keeps the line breaks of a help's later paragraphs.
_HELP = "\n\n".join(
    [
        "Group near-duplicate images: pairs closer than --threshold, joined transitively (a ~ b "
        "and b ~ c make one group), found by nearest-neighbour search in blocks over the whole "
        "store (no N x N matrix). Groups are printed largest first, each image with its SHA-1 "
        "and its distance to the group's first image (the lowest id).",
        '--json prints {"summary": {...}, "groups": [{"group", "size", "images": [{"id", '
        '"path", "sha1", "distance"}]}]}.',
        "The default threshold, 0.475, is calibrated for the default model "
        "(deepranking-efficientnet_lite0) with bin/calibrate-duplicates, on 1,000 distinct "
        "ImageNet photos with 2,600 edited copies of 200 of them (the edits of `simsearch "
        "evaluate --copies`) and 1,000 photos of 200 subjects (five each): it is the largest "
        "threshold that joins no two photos of different subjects (0 of 3.6 million pairs; "
        "the closest pair is 0.51 apart) and at most 0.2% of the pairs of distinct photos of "
        "one subject (4 of 2,000: two shots of a panda can be that close). Under it lie 59% of "
        "the copies: mirror images, small tilts and captions 96 to 100%; JPEG quality 10-50 "
        "and logos 90%; greyscale 65%; crops 53%; colour changes 47%; downscaling 38%; "
        "upside-down 30%; quarter turns 26%; combined edits 18%; heavy blur 11%.",
        "Groups are transitive, so false pairs must stay far below one per image even in a "
        "store of a million. A higher threshold finds more copies but joins more look-alikes: "
        "0.5: 62% of copies, 0.45% of same-subject pairs; 0.6: 74%, 1.4%, and 3 pairs of "
        "different subjects; 0.725 (the best F1 on that data): 85%, 5.6%, and 1 pair in "
        "29,000 of different subjects. Other models need their own threshold.",
        "Example: simsearch duplicates --threshold 0.4 --json",
    ]
)
duplicates.__doc__ = _HELP


def format_groups(report: DuplicateReport) -> list[str]:
    """One row per image; the group number and size on each group's first row."""
    if not report.groups:
        return []
    lines = [f"{'group':>5}  {'size':>4}  {'distance':>8}  {'sha1':<40}  path"]
    for group in report.groups:
        for position, member in enumerate(group.members):
            number = f"{group.number:>5}  {group.size:>4}" if position == 0 else " " * 11
            lines.append(
                f"{number}  {member.distance:>8.4f}  {member.sha1 or '':<40}  {member.path}"
            )
    lines.append("")
    return lines
