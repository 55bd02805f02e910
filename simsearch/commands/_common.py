"""What every command module shares: option types, the error exit, progress bars, JSON output.

Kept apart from cli.py so that command modules and cli.py import it without a cycle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from simsearch.errors import SimsearchError

if TYPE_CHECKING:
    from simsearch.library import EmbedderFactory

StoreOption = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="Store directory. Default: $SIMSEARCH_STORE, else the per-user data directory "
        "(~/.local/share/simsearch/store on Linux).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
DeviceOption = Annotated[
    str | None,
    typer.Option("--device", help="cpu, cuda, cuda:N or mps. Default: cuda, then mps, then cpu."),
]
WeightsOption = Annotated[
    Path | None,
    typer.Option(
        "--backbone-weights",
        help="ImageNet weights file for the vgg16 or resnet50 backbones when offline.",
        exists=True,
        dir_okay=False,
        readable=True,
    ),
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images a batch.")]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=0,
        help="Workers: on a CPU of up to 8 cores, threads that decode and embed; elsewhere "
        "decoding processes. 0: none. Default: from the CPU count.",
    ),
]
PrecisionOption = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto, bf16, fp16 or fp32. auto: bf16 on CPUs with native bf16, bf16 (else fp16) "
        "mixed precision on CUDA, fp32 otherwise.",
    ),
]
CompileOption = Annotated[
    str,
    typer.Option(
        "--compile",
        help="torch.compile the network: auto (on CUDA from 20,000 images, which repay its "
        "half a minute or more of compiling), on or off.",
    ),
]
MaxPixelsOption = Annotated[
    int | None,
    typer.Option(
        "--max-pixels",
        min=1,
        help="Skip images with more pixels than this (decompression-bomb limit). "
        "Default: $SIMSEARCH_MAX_PIXELS or 100,000,000.",
        show_default=False,
    ),
]


def fail(exc: SimsearchError) -> typer.Exit:
    """Print the library's message as one line on stderr; the caller raises the Exit."""
    typer.echo(f"simsearch: error: {exc}", err=True)
    return typer.Exit(exc.exit_code)


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False))


def embedder_factory(
    device: str | None,
    backbone_weights: Path | None,
    max_pixels: int,
    precision: str = "auto",
    compile: str = "auto",
) -> EmbedderFactory:
    """Builds an Embedder for a model spec when the library asks (torch is imported then)."""

    def factory(spec: str):
        from simsearch.embedding import Embedder
        from simsearch.model import load_model

        model = load_model(spec, backbone_weights=backbone_weights)
        return Embedder(
            model, device=device, precision=precision, max_pixels=max_pixels, compile=compile
        )

    return factory


class ProgressBar:
    """A tqdm progress bar on stderr, hidden when stderr is not a terminal."""

    def __init__(self, unit: str = "img", leave: bool = True) -> None:
        self._bar = None
        self._unit = unit
        self._leave = leave

    def start(self, total: int, description: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            desc=description,
            unit=self._unit,
            file=sys.stderr,
            disable=None,
            dynamic_ncols=True,
            leave=self._leave,
        )

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
