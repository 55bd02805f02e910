"""Comparing embedding models on three benchmarks, in one run, with exact search.

- triplets: the Deep Ranking paper's similarity precision on (query, positive, negative) files;
- classes: category-level retrieval (precision@1, recall@k, mAP), every image a query;
- copies: copy detection, edited copies (simsearch.edits) searched among originals and
  distractors (recall@1, mAP).

The metric functions are pure numpy, exact (one matrix product per block of queries) and
documented with their precise definitions; the sizes here are thousands of images, where exact
search is cheap and leaves no doubt about approximate-search error. The library receives an
embedder factory rather than building models itself, so tests can pass a fake.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from simsearch.config import DEFAULT_BATCH_SIZE, DEFAULT_MAX_PIXELS
from simsearch.edits import KINDS, make_copies
from simsearch.errors import ImageError, InputError
from simsearch.images import FileEntry, Skipped, decode_image, discover
from simsearch.progress import NoProgress, Progress

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)
EVALUATE_KS = (5, 10)  # the table leaves out recall@1: by definition it equals precision@1
DEFAULT_COPIES_PER_IMAGE = 5
# Originals are shrunk to this longest side before editing: more than any model sees, and it
# keeps the edits of big photos fast.
EDIT_MAX_SIDE = 640
_BLOCK = 1024  # query rows per similarity block: memory stays O(block x database)
_COPY_CHUNK = 64  # originals edited and embedded at a time


# -- metrics ----------------------------------------------------------------------------------


def similarity_precision(d_pos: np.ndarray, d_neg: np.ndarray) -> float:
    """Share of triplets with D(q, p+) < D(q, p-), the Deep Ranking paper's similarity precision.

    Ties (D(q, p+) == D(q, p-)) and NaN distances count as failures: the model did not rank
    the positive first.
    """
    d_pos = np.asarray(d_pos, dtype=np.float64).ravel()
    d_neg = np.asarray(d_neg, dtype=np.float64).ravel()
    if d_pos.shape != d_neg.shape:
        raise InputError(
            f"similarity_precision needs as many positive as negative distances, "
            f"got {d_pos.size} and {d_neg.size}"
        )
    if d_pos.size == 0:
        raise InputError("similarity_precision needs at least one triplet")
    return float(np.mean(d_pos < d_neg))


def retrieval_metrics(
    vectors: np.ndarray, labels: Sequence[Any] | np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Category-level retrieval, each image a query against all the others (itself excluded).

    Items are ranked by cosine similarity (the vectors are normalised here; for unit vectors
    this is the order of Euclidean distance), ties broken by position in `vectors`. An item is
    relevant to a query when it has the query's label. Queries whose label no other item has
    are left out of every mean (they have nothing to find). With R relevant items for a query:

    - "precision@1": share of queries whose nearest item is relevant;
    - "recall@k" (one key per k in `ks`): share of queries with at least one relevant item
      among the k nearest, the Recall@K of deep metric learning (Song et al., 2016), not the
      fraction of the R relevant items retrieved;
    - "mAP": mean over queries of average precision over the full ranking,
      AP = (1/R) * sum of precision@i over the ranks i that hold a relevant item.
    """
    x = _unit_rows(vectors, "vectors")
    labels = np.asarray(labels)
    n = x.shape[0]
    if labels.shape != (n,):
        raise InputError(
            f"retrieval_metrics needs one label per vector: {n} vectors, labels "
            f"of shape {labels.shape}"
        )
    ks = _check_ks(ks)
    _, codes = np.unique(labels, return_inverse=True)
    codes = codes.ravel()
    counts = np.bincount(codes)
    relevant_total = counts[codes] - 1  # R for each query
    if not np.any(relevant_total > 0):
        raise InputError(
            "retrieval_metrics: no label is shared by two items, so no query has anything to "
            "find; each class needs at least 2 images"
        )
    hits_at_1, ap_sum, queries = 0.0, 0.0, 0
    hits_at_k = dict.fromkeys(ks, 0.0)
    ranks = np.arange(1, n, dtype=np.float64)  # 1 .. n-1: ranks among the others
    for start, sims in _similarity_blocks(x, x):
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # the query itself goes last, then is dropped
        order = np.argsort(-sims, axis=1, kind="stable")[:, : n - 1]
        relevant = codes[order] == codes[start + rows, None]
        total = relevant_total[start : start + sims.shape[0]]
        keep = total > 0
        relevant, total = relevant[keep], total[keep]
        queries += int(keep.sum())
        hits_at_1 += float(relevant[:, 0].sum())
        for k in ks:
            hits_at_k[k] += float(relevant[:, :k].any(axis=1).sum())
        precision_at_i = np.cumsum(relevant, axis=1) / ranks
        ap_sum += float(((precision_at_i * relevant).sum(axis=1) / total).sum())
    metrics = {"precision@1": hits_at_1 / queries}
    metrics.update({f"recall@{k}": hits_at_k[k] / queries for k in ks})
    metrics["mAP"] = ap_sum / queries
    return metrics


def copy_ranks(
    query_vectors: np.ndarray, query_truth: Sequence[int] | np.ndarray, db_vectors: np.ndarray
) -> np.ndarray:
    """1-based rank of each query's original among the database items (cosine similarity;
    ties broken by database position, as a stable sort would)."""
    q = _unit_rows(query_vectors, "query vectors")
    db = _unit_rows(db_vectors, "database vectors")
    truth = np.asarray(query_truth, dtype=np.int64).ravel()
    if truth.shape != (q.shape[0],):
        raise InputError(
            f"copy detection needs one original per query: {q.shape[0]} queries, "
            f"{truth.size} originals"
        )
    if q.shape[1] != db.shape[1]:
        raise InputError(
            f"query vectors have {q.shape[1]} dimensions, database vectors {db.shape[1]}"
        )
    if truth.size and (truth.min() < 0 or truth.max() >= db.shape[0]):
        raise InputError(f"an original's index is outside the database of {db.shape[0]} items")
    ranks = np.empty(q.shape[0], dtype=np.int64)
    positions = np.arange(db.shape[0])
    for start, sims in _similarity_blocks(q, db):
        t = truth[start : start + sims.shape[0]]
        own = sims[np.arange(sims.shape[0]), t][:, None]
        before = (sims > own) | ((sims == own) & (positions[None, :] < t[:, None]))
        ranks[start : start + sims.shape[0]] = 1 + before.sum(axis=1)
    return ranks


def copy_detection_metrics(
    query_vectors: np.ndarray, query_truth: Sequence[int] | np.ndarray, db_vectors: np.ndarray
) -> dict[str, float]:
    """Copy detection: each query is an edited copy of exactly one database item.

    `query_truth[i]` is the row of query i's original in `db_vectors`. Ranking as in
    `copy_ranks`. "recall@1": share of queries whose nearest database item is their original;
    "mAP": mean average precision, which with one relevant item per query is the mean of
    1 / (rank of the original).
    """
    ranks = copy_ranks(query_vectors, query_truth, db_vectors)
    if ranks.size == 0:
        raise InputError("copy detection needs at least one query")
    return _copy_metrics_from_ranks(ranks)


def _copy_metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    return {"recall@1": float(np.mean(ranks == 1)), "mAP": float(np.mean(1.0 / ranks))}


def _unit_rows(vectors: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"{what} must be a non-empty 2-D array (items x dimensions)")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(k) for k in ks}))
    if any(k < 1 for k in out):
        raise InputError(f"every k must be at least 1, got {list(ks)}")
    return out


def _similarity_blocks(
    queries: np.ndarray, database: np.ndarray
) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, queries.shape[0], _BLOCK):
        yield start, queries[start : start + _BLOCK] @ database.T


# -- data sets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TripletSet:
    """(query, positive, negative) absolute paths, from a CSV or a fetched folder."""

    source: str
    triplets: list[tuple[str, str, str]]
    incomplete: int = 0  # fetched records left out because a role's download failed


@dataclass(frozen=True)
class ClassSet:
    """Images and their class names; layout "folders" (one sub-folder per class) or "prefix"
    (a flat folder where the class is the file name up to its first '_')."""

    source: str
    paths: list[str]
    labels: list[str]
    layout: str


@dataclass(frozen=True)
class CopySet:
    """Originals (each gets edited copies) and distractors; together, the searched database."""

    originals: list[str]
    distractors: list[str]
    copies_per_image: int
    seed: int


def load_triplets(source: str | os.PathLike[str], *, limit: int | None = None) -> TripletSet:
    """A `query,positive,negative` CSV (paths relative to the CSV's folder), as written by
    `simsearch triplets sample`, or a folder fetched by `simsearch triplets fetch`."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_fetched(path, limit)
    if not path.is_file():
        raise InputError(f"triplets file {path} does not exist; check the path")
    base = Path(os.path.abspath(path)).parent
    triplets: list[tuple[str, str, str]] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if line == 1 and [c.strip().lower() for c in row] == [
                    "query",
                    "positive",
                    "negative",
                ]:
                    continue  # a header
                if len(row) != 3:
                    raise InputError(
                        f"{path} line {line}: expected 3 fields query,positive,negative, "
                        f"got {len(row)}; fix or remove the line"
                    )
                triplet = tuple(_existing(base, cell.strip(), path, line) for cell in row)
                triplets.append(triplet)  # type: ignore[arg-type]
                if limit is not None and len(triplets) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not a UTF-8 text CSV ({exc}); give a triplet CSV") from exc
    if not triplets:
        raise InputError(f"{path} holds no triplets; write one query,positive,negative per line")
    return TripletSet(os.path.abspath(path), triplets)


def _existing(base: Path, cell: str, csv_path: Path, line: int) -> str:
    if not cell:
        raise InputError(f"{csv_path} line {line}: an empty path; fix or remove the line")
    file = Path(cell).expanduser()
    file = file if file.is_absolute() else base / file
    if not file.is_file():
        raise InputError(
            f"{csv_path} line {line}: {file} does not exist; fix the path or remove the line"
        )
    return os.path.abspath(file)


def _load_fetched(folder: Path, limit: int | None) -> TripletSet:
    from simsearch.datasets import MANIFEST_NAME, STATUS_OK, read_manifest

    if not (folder / MANIFEST_NAME).is_file():
        raise InputError(
            f"{folder} is a folder without {MANIFEST_NAME}; give a triplet CSV or a folder "
            f"written by `simsearch triplets fetch` or `import`"
        )
    triplets: list[tuple[str, str, str]] = []
    incomplete = 0
    for record in read_manifest(folder):
        roles = (record.query, record.positive, record.negative)
        if any(role.file is None or role.status != STATUS_OK for role in roles):
            incomplete += 1
            continue
        files = [folder / str(role.file) for role in roles]
        for file in files:
            if not file.is_file():
                raise InputError(
                    f"{folder / MANIFEST_NAME} record {record.index} (line {record.line} of the "
                    f"triplet file): {file} is missing; fetch again to restore it"
                )
        triplets.append(tuple(os.path.abspath(f) for f in files))  # type: ignore[arg-type]
        if limit is not None and len(triplets) >= limit:
            break
    if not triplets:
        raise InputError(f"{folder} has no record with all three images downloaded; fetch it again")
    if incomplete:
        log.warning("%s: %d record(s) left out: an image failed to download", folder, incomplete)
    return TripletSet(os.path.abspath(folder), triplets, incomplete)


def load_classes(root: str | os.PathLike[str], *, limit: int | None = None) -> ClassSet:
    """One class per sub-folder (searched recursively); or, when no sub-folder holds images, a
    flat folder whose files are named CLASS_anything (ImageNet's n01443537_123.JPEG).

    With `limit`, the first `limit` images in path order, which keeps classes whole.
    """
    folder = _folder(root, "classes")
    subfolders = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[str] = []
    labels: list[str] = []
    for sub in subfolders:
        for file in _images_under(sub):
            paths.append(file)
            labels.append(sub.name)
    layout = "folders"
    if paths:
        loose = _images_under(folder, recursive=False)
        if loose:
            log.warning(
                "%s: %d image(s) directly in the folder are left out: with class sub-folders, "
                "every image must be in one",
                folder,
                len(loose),
            )
    else:
        layout = "prefix"
        unnamed = 0
        for file in _images_under(folder):
            name = os.path.basename(file)
            if "_" not in name[1:]:
                unnamed += 1
                continue
            paths.append(file)
            labels.append(name.split("_", 1)[0])
        if unnamed:
            log.warning(
                "%s: %d image(s) left out: their names have no CLASS_ prefix", folder, unnamed
            )
    if limit is not None:
        paths, labels = paths[:limit], labels[:limit]
    sizes = Counter(labels)
    if len(sizes) < 2:
        raise InputError(
            f"{folder}: found {len(paths)} image(s) in {len(sizes)} class(es); need at least "
            f"2 classes: put each class in its own sub-folder, or name files CLASS_name.jpg"
        )
    if max(sizes.values()) < 2:
        raise InputError(
            f"{folder}: every class has a single image, so no image has anything to find; "
            f"give classes of at least 2 images"
        )
    return ClassSet(str(folder), paths, labels, layout)


def load_copies(
    originals: str | os.PathLike[str],
    distractors: str | os.PathLike[str] | None = None,
    *,
    originals_count: int | None = None,
    copies_per_image: int = DEFAULT_COPIES_PER_IMAGE,
    seed: int = 0,
    limit: int | None = None,
) -> CopySet:
    """The images of `originals` (or `originals_count` of them, drawn with `seed`, the rest
    becoming distractors) plus the images of `distractors`.

    With `limit`, at most `limit` originals and `limit` distractors, drawn with `seed`.
    """
    if copies_per_image < 1:
        raise InputError(f"copies per image must be at least 1, got {copies_per_image}")
    if originals_count is not None and originals_count < 1:
        raise InputError(f"the number of originals must be at least 1, got {originals_count}")
    folder = _folder(originals, "copies")
    found = _images_under(folder)
    if not found:
        raise InputError(f"{folder} holds no images to make copies of; check the path")
    rng = np.random.default_rng(seed)
    chosen, rest = found, []
    wanted = min(x for x in (originals_count, limit, len(found)) if x is not None)
    if wanted < len(found):
        picked = set(rng.permutation(len(found))[:wanted].tolist())
        chosen = [p for i, p in enumerate(found) if i in picked]
        rest = [p for i, p in enumerate(found) if i not in picked] if originals_count else []
    others = list(rest)
    if distractors is not None:
        taken = set(chosen) | set(rest)
        others += [p for p in _images_under(_folder(distractors, "distractors")) if p not in taken]
    if limit is not None and len(others) > limit:
        picked = set(rng.permutation(len(others))[:limit].tolist())
        others = [p for i, p in enumerate(others) if i in picked]
    return CopySet(chosen, sorted(others), copies_per_image, seed)


def _folder(path: str | os.PathLike[str], what: str) -> Path:
    folder = Path(os.path.abspath(Path(path).expanduser()))  # normalised, like discover's paths
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder} does not exist or is not a folder; check it")
    return folder


def _images_under(folder: Path, *, recursive: bool = True) -> list[str]:
    paths: list[str] = []
    for item in discover([folder]):
        if isinstance(item, Skipped):
            log.warning("skipped %s: %s", item.path, item.reason)
        elif isinstance(item, FileEntry):
            if recursive or os.path.dirname(item.path) == str(folder):
                paths.append(item.path)
    return paths


# -- running the models -----------------------------------------------------------------------


class EmbedResultLike(Protocol):
    position: int
    path: str
    vector: np.ndarray | None
    error: str | None


class EmbedderLike(Protocol):
    """What evaluation needs from `simsearch.embedding.Embedder` (tests pass fakes)."""

    model_id: str
    spec: str

    def embed_files(
        self, paths: Sequence[str], *, batch_size: int = ..., workers: int | None = ...
    ) -> Iterator[Sequence[EmbedResultLike]]: ...

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = ...) -> np.ndarray: ...


EmbedderFactory = Callable[[str], EmbedderLike]


@dataclass
class ModelEvaluation:
    """One model's figures; a benchmark that was not asked for is None."""

    spec: str
    model_id: str
    seconds: float
    triplets: dict[str, float] | None = None
    classes: dict[str, float] | None = None
    copies: dict[str, float] | None = None
    copies_by_edit: dict[str, dict[str, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.spec,
            "model_id": self.model_id,
            "seconds": round(self.seconds, 3),
            "triplets": self.triplets,
            "classes": self.classes,
            "copies": self.copies,
            "copies_by_edit": self.copies_by_edit,
        }


@dataclass
class EvaluationReport:
    """Every model's figures on the same data, the data's sizes, and the files left out."""

    models: list[ModelEvaluation]
    datasets: dict[str, dict[str, Any]]
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason, any model

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": [m.to_dict() for m in self.models],
            "datasets": self.datasets,
            "failed": [{"path": p, "reason": r} for p, r in sorted(self.failed.items())],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


def evaluate(
    specs: Sequence[str],
    *,
    embedder_factory: EmbedderFactory,
    triplets: TripletSet | None = None,
    classes: ClassSet | None = None,
    copies: CopySet | None = None,
    ks: Sequence[int] = EVALUATE_KS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress | None = None,
) -> EvaluationReport:
    """Each model in turn embeds every file once (shared by the benchmarks) and the edited copies
    from memory; the same copies (from the seed) are shown to every model."""
    if not specs:
        raise InputError("no model to evaluate; give at least one --model")
    if triplets is None and classes is None and copies is None:
        raise InputError("nothing to evaluate on; give --triplets, --classes and/or --copies")
    ks = _check_ks(ks)
    progress = progress or NoProgress()
    paths = _unique_paths(triplets, classes, copies)
    failed: dict[str, str] = {}
    results: list[ModelEvaluation] = []
    for spec in specs:
        started = time.perf_counter()
        embedder = embedder_factory(spec)
        vectors = _embed_files(embedder, paths, batch_size, workers, progress, failed)
        result = ModelEvaluation(spec=spec, model_id=embedder.model_id, seconds=0.0)
        if triplets is not None:
            result.triplets = _triplet_metrics(triplets, vectors)
        if classes is not None:
            result.classes = _class_metrics(classes, vectors, ks)
        if copies is not None:
            result.copies, result.copies_by_edit = _copy_metrics(
                copies, vectors, embedder, batch_size, max_pixels, progress, failed
            )
        result.seconds = time.perf_counter() - started
        log.info("%s: evaluated in %.1f s", spec, result.seconds)
        results.append(result)
        del embedder, vectors
        gc.collect()  # free one model before loading the next
    return EvaluationReport(results, _sizes(triplets, classes, copies, failed), failed)


def _unique_paths(
    triplets: TripletSet | None, classes: ClassSet | None, copies: CopySet | None
) -> list[str]:
    paths: dict[str, None] = {}
    if triplets is not None:
        paths.update((p, None) for t in triplets.triplets for p in t)
    if classes is not None:
        paths.update((p, None) for p in classes.paths)
    if copies is not None:
        paths.update((p, None) for p in [*copies.originals, *copies.distractors])
    return list(paths)


def _embed_files(
    embedder: EmbedderLike,
    paths: list[str],
    batch_size: int,
    workers: int | None,
    progress: Progress,
    failed: dict[str, str],
) -> dict[str, np.ndarray]:
    vectors: dict[str, np.ndarray] = {}
    progress.start(len(paths), f"{embedder.spec}: images")
    try:
        for batch in embedder.embed_files(paths, batch_size=batch_size, workers=workers):
            for r in batch:
                if r.vector is None:
                    if r.path not in failed:
                        log.warning("left out %s: %s", r.path, r.error)
                    failed[r.path] = r.error or "unknown error"
                else:
                    vectors[r.path] = np.asarray(r.vector, dtype=np.float32)
            progress.advance(len(batch))
    finally:
        progress.close()
    return vectors


def _triplet_metrics(data: TripletSet, vectors: dict[str, np.ndarray]) -> dict[str, float]:
    usable = [t for t in data.triplets if all(p in vectors for p in t)]
    if not usable:
        raise InputError(f"{data.source}: no triplet has all three images decodable")
    q, p, n = (np.stack([vectors[t[i]] for t in usable]).astype(np.float64) for i in range(3))
    d_pos = np.sum((q - p) ** 2, axis=1)  # squared Euclidean, the paper's D
    d_neg = np.sum((q - n) ** 2, axis=1)
    return {"similarity_precision": similarity_precision(d_pos, d_neg)}


def _class_metrics(
    data: ClassSet, vectors: dict[str, np.ndarray], ks: Sequence[int]
) -> dict[str, float]:
    keep = [i for i, p in enumerate(data.paths) if p in vectors]
    matrix = np.stack([vectors[data.paths[i]] for i in keep]) if keep else np.empty((0, 1))
    if not keep:
        raise InputError(f"{data.source}: no image could be decoded")
    return retrieval_metrics(matrix, [data.labels[i] for i in keep], ks)


def _copy_metrics(
    data: CopySet,
    vectors: dict[str, np.ndarray],
    embedder: EmbedderLike,
    batch_size: int,
    max_pixels: int,
    progress: Progress,
    failed: dict[str, str],
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    database = [p for p in [*data.originals, *data.distractors] if p in vectors]
    row = {p: i for i, p in enumerate(database)}
    originals = [(i, p) for i, p in enumerate(data.originals) if p in row]
    if not originals:
        raise InputError("copy detection: none of the originals could be decoded")
    db = np.stack([vectors[p] for p in database])
    ranks: list[np.ndarray] = []
    kinds: list[str] = []
    progress.start(len(originals) * data.copies_per_image, f"{embedder.spec}: copies")
    try:
        for start in range(0, len(originals), _COPY_CHUNK):
            images, truth = [], []
            for number, path in originals[start : start + _COPY_CHUNK]:
                try:
                    made = edited_copies(path, number, data, max_pixels)
                except ImageError as exc:
                    failed[path] = str(exc)
                    log.warning("no copies of %s: %s", path, exc)
                    continue
                for kind, image in made:
                    kinds.append(kind)
                    images.append(image)
                    truth.append(row[path])
            if not images:
                continue
            queries = embedder.embed_images(images, batch_size=batch_size)
            ranks.append(copy_ranks(queries, truth, db))
            progress.advance(len(images))
    finally:
        progress.close()
    if not ranks:
        raise InputError("copy detection: no original could be edited")
    all_ranks = np.concatenate(ranks)
    kind_array = np.asarray(kinds)
    by_edit = {}
    for kind in KINDS:
        mask = kind_array == kind
        if mask.any():
            by_edit[kind] = {"copies": int(mask.sum()), **_copy_metrics_from_ranks(all_ranks[mask])}
    return _copy_metrics_from_ranks(all_ranks), by_edit


def edited_copies(
    path: str, number: int, data: CopySet, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[tuple[str, Image.Image]]:
    """The copies of the `number`-th original: the same for every model, from (seed, number)."""
    image = decode_image(path, max_pixels=max_pixels).image
    if max(image.size) > EDIT_MAX_SIDE:
        image = image.copy()
        image.thumbnail((EDIT_MAX_SIDE, EDIT_MAX_SIDE), Image.Resampling.BICUBIC)
    rng = np.random.default_rng([data.seed, number])
    return make_copies(image, rng, data.copies_per_image)


def _sizes(
    triplets: TripletSet | None,
    classes: ClassSet | None,
    copies: CopySet | None,
    failed: dict[str, str],
) -> dict[str, dict[str, Any]]:
    """What each benchmark was run on, after leaving out the files that failed."""
    sizes: dict[str, dict[str, Any]] = {}
    if triplets is not None:
        sizes["triplets"] = {
            "source": triplets.source,
            "triplets": sum(all(p not in failed for p in t) for t in triplets.triplets),
            "incomplete": triplets.incomplete,
        }
    if classes is not None:
        labels = [
            lab for p, lab in zip(classes.paths, classes.labels, strict=True) if p not in failed
        ]
        counts = Counter(labels)
        sizes["classes"] = {
            "source": classes.source,
            "layout": classes.layout,
            "images": len(labels),
            "classes": len(counts),
            "queries": sum(c for c in counts.values() if c > 1),
        }
    if copies is not None:
        originals = sum(p not in failed for p in copies.originals)
        distractors = sum(p not in failed for p in copies.distractors)
        sizes["copies"] = {
            "originals": originals,
            "distractors": distractors,
            "database": originals + distractors,
            "copies": originals * copies.copies_per_image,
            "copies_per_image": copies.copies_per_image,
            "seed": copies.seed,
        }
    return sizes
