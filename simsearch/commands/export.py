"""`simsearch export ...`: a store's vectors written in other tools' formats.

Thin: parse the options, call `simsearch.export`, print. The summary goes to stdout (a line, or
JSON with --json); logs go to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simsearch.commands._common import JsonOption, StoreOption, fail, print_json
from simsearch.config import resolve_store_dir
from simsearch.errors import SimsearchError

app = typer.Typer(
    help="Write the store's vectors in another tool's format.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("imagecat")
def imagecat(
    directory: Annotated[
        Path,
        typer.Argument(
            help="Folder to create: ids.json, vectors.npy, index.faiss, meta.json.",
            file_okay=False,
            show_default=False,
            metavar="DIR",
        ),
    ],
    store: StoreOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace DIR if it exists and is not empty.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Export the vectors for ImageSpace's FAISS back end: one row per image SHA-1, unit
    float32 vectors, an IndexFlatIP over them in the same order.

    Example: simsearch export imagecat ./imagecat-index --store ~/pictures.simsearch
    """
    from simsearch.collection import Collection
    from simsearch.export import export_imagecat

    try:
        with Collection.open(resolve_store_dir(store), write=False) as collection:
            summary = export_imagecat(collection, directory, force=force)
    except SimsearchError as exc:
        raise fail(exc) from None
    if as_json:
        print_json(summary.to_dict())
    else:
        typer.echo(summary.line())
