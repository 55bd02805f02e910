"""`simsearch triplets ...`: the Deep Ranking triplet data set, fetched or imported into folders.

Thin: parse the options, call `simsearch.datasets`, print. Results go to stdout (a table, or JSON
with --json); parse problems, progress and logs go to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from simsearch.commands._common import JsonOption, MaxPixelsOption, ProgressBar, fail
from simsearch.errors import SimsearchError

if TYPE_CHECKING:
    from simsearch.datasets import ParseProblem, TripletRecord

app = typer.Typer(
    help="Triplet data sets for training: fetch Google's query_and_triplets.txt images, or "
    "import images downloaded elsewhere, into DIR/<i>/query.jpg, positive.jpg, negative.jpg "
    "with DIR/manifest.jsonl.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_SHOWN_PROBLEMS = 20

TripletFileArgument = Annotated[
    Path,
    typer.Argument(
        help="The triplet file (records of 4 lines: search text, query, positive and negative "
        "image URLs), e.g. query_and_triplets.txt.",
        exists=True,
        dir_okay=False,
        readable=True,
        show_default=False,
        metavar="TRIPLET_FILE",
    ),
]
OutOption = Annotated[
    Path,
    typer.Option(
        "--out",
        help="Layout folder: DIR/<i>/{query,positive,negative}.jpg and DIR/manifest.jsonl. "
        "Re-running resumes: images already there are kept.",
        file_okay=False,
        show_default=False,
        metavar="DIR",
    ),
]


@app.command("fetch")
def fetch_command(
    triplet_file: TripletFileArgument,
    out: OutOption,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, max=256, help="Downloads at a time.")
    ] = 16,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.01, help="Seconds to wait to connect and per read."),
    ] = 10.0,
    retries: Annotated[
        int,
        typer.Option(
            "--retries",
            min=0,
            help="Retries after a connection error, timeout or 5xx, with doubling back-off.",
        ),
    ] = 3,
    url_map: Annotated[
        list[str] | None,
        typer.Option(
            "--url-map",
            help="FROM=TO: download URLs starting with FROM from TO instead (a local mirror). "
            "Repeat for several prefixes; the manifest keeps the original URLs.",
            show_default=False,
            metavar="FROM=TO",
        ),
    ] = None,
    max_pixels: MaxPixelsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download the images of a triplet file (each URL once, concurrently, with retries),
    verify that each decodes, and write them with a manifest. Run it again to resume.

    Example: simsearch triplets fetch query_and_triplets.txt --out triplets
    """
    from simsearch import datasets
    from simsearch.config import max_pixels_from_env

    try:
        mapping = datasets.parse_url_map(url_map or [])
        pixels = max_pixels or max_pixels_from_env()
        records = _read_records(triplet_file)
        summary = datasets.fetch(
            records,
            out,
            concurrency=concurrency,
            timeout=timeout,
            retries=retries,
            url_map=mapping,
            max_pixels=pixels,
            progress=ProgressBar(unit="url"),
        )
    except SimsearchError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        raise _interrupted(out) from None
    _report(summary.to_dict(), "downloaded", as_json)


@app.command("import")
def import_command(
    triplet_file: TripletFileArgument,
    source: Annotated[
        Path,
        typer.Option(
            "--from",
            help="Folder (searched recursively) of images saved by a browser, wget or another "
            "fetch, named by their URL, wget's name, the thumbnail key, or listed in its "
            "manifest.jsonl.",
            exists=True,
            file_okay=False,
            show_default=False,
            metavar="SRC_DIR",
        ),
    ],
    out: OutOption,
    max_pixels: MaxPixelsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Bring images downloaded elsewhere into the layout, matched to the triplet file's URLs,
    verified to decode, and recorded in the manifest.

    Example: simsearch triplets import query_and_triplets.txt --from ~/thumbs --out triplets
    """
    from simsearch import datasets
    from simsearch.config import max_pixels_from_env

    try:
        pixels = max_pixels or max_pixels_from_env()
        records = _read_records(triplet_file)
        summary = datasets.import_images(
            records, source, out, max_pixels=pixels, progress=ProgressBar(unit="url")
        )
    except SimsearchError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        raise _interrupted(out) from None
    _report(summary.to_dict(), "imported", as_json)


def _read_records(path: Path) -> list[TripletRecord]:
    """The file's records; its problems are reported on stderr with their line numbers."""
    from simsearch.datasets import parse_triplet_file
    from simsearch.errors import InputError

    records, problems = parse_triplet_file(path)
    _warn_problems(path, problems)
    if not records:
        raise InputError(
            f"{path}: no triplet records; expected records of 4 lines (search text, then the "
            "query, positive and negative image URLs)"
        )
    return records


def _warn_problems(path: Path, problems: list[ParseProblem]) -> None:
    for problem in problems[:_SHOWN_PROBLEMS]:
        typer.echo(f"simsearch: warning: {path} {problem}", err=True)
    if len(problems) > _SHOWN_PROBLEMS:
        typer.echo(
            f"simsearch: warning: {path}: {len(problems) - _SHOWN_PROBLEMS} more problems",
            err=True,
        )


def _report(summary: dict[str, Any], obtained: str, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False))
        return
    rows = [
        ("records", summary["records"]),
        ("unique URLs", summary["urls"]),
        (obtained, summary[obtained]),
        ("kept (already there)", summary["kept"]),
        ("failed", summary["failed"]),
        ("complete records", f"{summary['complete']} of {summary['records']}"),
    ]
    for name, value in rows:
        typer.echo(f"{name + ':':<22} {value}")
    if summary["reasons"]:
        typer.echo("failures by reason:")
        for reason, count in summary["reasons"].items():
            typer.echo(f"  {reason:<20} {count}")
    typer.echo(f"{'manifest:':<22} {Path(summary['out_dir']) / 'manifest.jsonl'}")


def _interrupted(out: Path) -> typer.Exit:
    typer.echo(
        f"simsearch: interrupted; progress is saved in {out / 'manifest.jsonl'}: run the same "
        "command again to resume",
        err=True,
    )
    return typer.Exit(130)
