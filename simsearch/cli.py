"""The `simsearch` command: parses options, calls the library, prints results.

Results go to stdout (a table, or JSON with --json); progress bars and logs go to stderr.
Heavy imports (torch, faiss) happen inside the commands so that `--help` is instant.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from simsearch import __version__
from simsearch.commands._common import (
    BatchSizeOption,
    CompileOption,
    DeviceOption,
    JsonOption,
    MaxPixelsOption,
    PrecisionOption,
    ProgressBar,
    StoreOption,
    WeightsOption,
    WorkersOption,
    embedder_factory,
    fail,
    print_json,
)
from simsearch.commands.duplicates import duplicates
from simsearch.commands.evaluate import evaluate
from simsearch.commands.export import app as export_app
from simsearch.commands.serve import serve
from simsearch.commands.train import sample, train
from simsearch.commands.triplets import app as triplets_app
from simsearch.config import (
    DEFAULT_BATCH_SIZE,
    IndexSettings,
    max_pixels_from_env,
    resolve_store_dir,
)
from simsearch.errors import SimsearchError

if TYPE_CHECKING:
    from simsearch.collection import Collection

app = typer.Typer(
    help="Image similarity search with the Deep Ranking network.\n\n"
    "Index a folder, then query it:\n\n"
    "    simsearch index ./photos\n\n"
    "    simsearch query photo.jpg -k 10",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("simsearch")


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.captureWarnings(True)  # Pillow's EXIF warnings become log lines, not raw text
    logging.basicConfig(
        level=level, format="simsearch: %(levelname)s: %(message)s", stream=sys.stderr
    )


@app.callback()
def main_options(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, help="More log output on stderr (-vv for debug)."
        ),
    ] = 0,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Image similarity search with the Deep Ranking network."""
    _configure_logging(verbose)
    if version:
        typer.echo(f"simsearch {__version__}")
        raise typer.Exit()


def _open(store: Path | None, *, write: bool) -> Collection:
    from simsearch.collection import Collection

    return Collection.open(resolve_store_dir(store), write=write)


@app.command()
def index(
    folders: Annotated[
        list[Path], typer.Argument(help="Folders (recursive) or image files.", show_default=False)
    ],
    store: StoreOption = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Builtin model (deepranking-efficientnet_lite0, convnet-efficientnet_lite0, "
            "convnet-vgg16, convnet-resnet50) or a .safetensors checkpoint. Default: the store's "
            "model, else deepranking-efficientnet_lite0.",
        ),
    ] = None,
    reindex: Annotated[
        bool,
        typer.Option(
            "--reindex", help="Re-embed every image (needed to change the store's model)."
        ),
    ] = False,
    index_factory: Annotated[
        str | None,
        typer.Option(
            "--index-factory",
            help="FAISS factory string for the store's index (e.g. Flat, HNSW32, "
            "IVF4096,PQ256x4fs) or 'auto': exact below 200,000 vectors, then IVF-PQ re-ranked "
            "exactly. Saved in the store.",
        ),
    ] = None,
    batch_size: BatchSizeOption = DEFAULT_BATCH_SIZE,
    workers: WorkersOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = "auto",
    compile: CompileOption = "auto",
    backbone_weights: WeightsOption = None,
    max_pixels: MaxPixelsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Index the images under FOLDERS: new and changed files are embedded, moved files keep
    their vectors, deleted files leave the index.

    Example: simsearch index ~/Pictures --store ~/pictures.simsearch
    """
    from simsearch import library

    try:
        pixels = max_pixels or max_pixels_from_env()
        settings = IndexSettings(
            batch_size=batch_size, workers=workers, device=device, max_pixels=pixels
        )
        with _open(store, write=True) as collection:
            if index_factory is not None:
                collection.set_index_factory(index_factory)
            summary = library.index_paths(
                collection,
                [str(f) for f in folders],
                embedder_factory=embedder_factory(
                    device, backbone_weights, pixels, precision, compile
                ),
                model=model,
                reindex=reindex,
                settings=settings,
                progress=ProgressBar(),
            )
    except SimsearchError as exc:
        raise fail(exc) from None
    if as_json:
        print_json(summary.to_dict())
        return
    for failure in summary.failures:
        typer.echo(f"skipped {failure.path}: {failure.reason}", err=True)
    typer.echo(summary.line())


@app.command()
def query(
    images: Annotated[
        list[str],
        typer.Argument(
            help="Image files (indexed or not), or indexed images' ids or SHA-1s.",
            show_default=False,
        ),
    ],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of neighbours.")] = 10,
    store: StoreOption = None,
    device: DeviceOption = None,
    backbone_weights: WeightsOption = None,
    max_pixels: MaxPixelsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the K nearest indexed images of each query image, nearest first.

    Example: simsearch query photo.jpg -k 10 --json
    """
    from simsearch import library

    try:
        pixels = max_pixels or max_pixels_from_env()
        with _open(store, write=False) as collection:
            results = library.query(
                collection,
                images,
                k=k,
                embedder_factory=embedder_factory(device, backbone_weights, pixels),
            )
    except SimsearchError as exc:
        raise fail(exc) from None
    for number, result in enumerate(results):
        if as_json:
            print_json(result.to_dict())
            continue
        if number:
            typer.echo("")
        typer.echo(f"query: {result.query}")
        typer.echo(f"{'rank':>4}  {'distance':>8}  {'sha1':<40}  path")
        for n in result.results:
            typer.echo(f"{n.rank:>4}  {n.distance:>8.4f}  {n.sha1 or '':<40}  {n.path}")


@app.command()
def distance(
    a: Annotated[str, typer.Argument(help="Image file, or indexed image's path, id or SHA-1.")],
    b: Annotated[str, typer.Argument(help="Image file, or indexed image's path, id or SHA-1.")],
    store: StoreOption = None,
    device: DeviceOption = None,
    backbone_weights: WeightsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the Euclidean distance (0 to 2) and cosine similarity of two images' embeddings.
    Indexed images use their stored vectors; without a store, two files are embedded with the
    default model.

    Example: simsearch distance cat.jpg cat-crop.jpg
    """
    from simsearch import library
    from simsearch.store.database import DB_NAME

    factory = embedder_factory(device, backbone_weights, max_pixels_from_env())
    try:
        if (resolve_store_dir(store) / DB_NAME).exists():
            with _open(store, write=False) as collection:
                result = library.distance(collection, a, b, embedder_factory=factory)
        else:  # no store: two files, embedded with the default model
            result = library.distance(None, a, b, embedder_factory=factory)
    except SimsearchError as exc:
        raise fail(exc) from None
    if as_json:
        print_json(result.to_dict())
    else:
        typer.echo(f"distance {result.distance:.6f}  cosine {result.cosine:.6f}")


@app.command()
def info(store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Show the store: counts, model, index type, sizes and failed files.

    Example: simsearch info --json
    """
    from simsearch import library

    try:
        with _open(store, write=False) as collection:
            result = library.info(collection)
    except SimsearchError as exc:
        raise fail(exc) from None
    if as_json:
        print_json(result.to_dict())
        return
    rows = [
        ("store", result.store),
        ("model", f"{result.model_id} ({result.model_spec})" if result.model_id else "none yet"),
        ("dimensions", result.dim),
        ("indexed images", result.indexed),
        ("failed files", result.failed),
        ("awaiting embedding", result.awaiting),
        (
            "index",
            f"{result.index_type}, {result.index_vectors} vectors" if result.index_type else "none",
        ),
        ("database size", _size(result.database_bytes)),
        ("index size", _size(result.index_bytes)),
    ]
    for name, value in rows:
        typer.echo(f"{name + ':':<20} {value}")
    for failure in result.failures[:20]:
        typer.echo(f"  failed {failure.path}: {failure.reason}")
    if len(result.failures) > 20:
        typer.echo(f"  ... and {len(result.failures) - 20} more (see --json)")


@app.command()
def remove(
    paths: Annotated[
        list[str], typer.Argument(help="Files or folders to forget.", show_default=False)
    ],
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove images from the store and its index (the files themselves are not touched).

    Example: simsearch remove ~/Pictures/old
    """
    from simsearch import library

    try:
        with _open(store, write=True) as collection:
            result = library.remove(collection, paths)
    except SimsearchError as exc:
        raise fail(exc) from None
    if as_json:
        print_json(result.to_dict())
        return
    for path in result.not_found:
        typer.echo(f"not in the store: {path}", err=True)
    typer.echo(f"removed {result.removed}")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


app.command()(evaluate)
app.command()(duplicates)
app.command()(train)
app.command()(serve)
triplets_app.command("sample")(sample)
app.add_typer(triplets_app, name="triplets")
app.add_typer(export_app, name="export")


def main() -> None:
    app()
