"""Triplets (query, positive, negative): sampled from labelled folders, read from a fetched Google
triplet layout, and written to or read from the prototype's CSV.

Three layouts are understood:

- folders: every sub-folder of the root is one class (images anywhere below it);
- flat: images directly in the root, the class is the file-name prefix before the first '_'
  (``n01443537_2625_goldfish.jpg`` is class ``n01443537``; a name without '_' is its own class);
- google: the layout `simsearch triplets fetch` writes (``DIR/<i>/query.jpg``, ``positive.jpg``,
  ``negative.jpg`` and ``manifest.jsonl``).

Every random choice comes from a NumPy generator seeded by (seed, purpose, counter), so a seed fixes
the output and the online sampler can jump to any position of its stream (exact `--resume`).
"""

from __future__ import annotations

import abc
import csv
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from simsearch.errors import InputError
from simsearch.images import IMAGE_EXTENSIONS, FileEntry, Skipped, discover, printable_path

if TYPE_CHECKING:
    from simsearch.datasets import RemoteImage, TripletRecord

log = logging.getLogger(__name__)
MAX_NOTES = 5  # warnings about small classes printed one by one; the rest are counted

LAYOUTS = ("auto", "folders", "flat", "google")
MANIFEST = "manifest.jsonl"
ROLES = ("query", "positive", "negative")

# Purposes mixed into the seeds, so the streams of different decisions never coincide.
_SAMPLE, _EPOCH, _DRAW = 1, 2, 3


@dataclass(frozen=True, slots=True)
class Triplet:
    """Three image paths: the positive is more similar to the query than the negative.

    `augmented` marks a triplet whose positive is an edited copy of the query made at training
    time (then `positive == query`); only the online sampler makes such triplets.
    """

    query: str
    positive: str
    negative: str
    augmented: bool = False


@dataclass(slots=True)
class SampleSummary:
    """What `sample_directory` did, for the command's summary line and `--json`."""

    layout: str
    classes: int  # class folders, name prefixes, or distinct search texts (google)
    images: int
    queries: int  # images (or query groups, google) that got at least one triplet
    triplets: int
    short: int = 0  # queries that got fewer positives or negatives than asked
    conflicts: int = 0  # google: positives left out because they are also a negative
    skipped: list[str] = field(default_factory=list)  # files or records left out, with why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _absolute(path: str | os.PathLike[str]) -> Path:
    """Absolute and normalised ("a/../b" is "b"), as `simsearch.images.discover` reports paths."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([seed, *words])


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"the seed must be a whole number 0 or more, got {seed!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a whole number 1 or more, got {value!r}")


# ---------------------------------------------------------------------------------------------
# class folders


def class_folders(
    root: str | os.PathLike[str], *, flat: bool = False, skipped: list[str] | None = None
) -> dict[str, list[str]]:
    """Class name -> sorted absolute image paths; classes sorted by name, empty ones left out.

    Extensions are matched case-insensitively (``.JPG`` counts). Files that cannot be used (empty,
    not regular, bad names) are left out and, when `skipped` is given, appended to it with why.
    """
    root_path = _absolute(root)
    if not root_path.is_dir():
        raise InputError(f"{printable_path(str(root_path))} is not a folder; check the path")
    skipped = skipped if skipped is not None else []
    classes: dict[str, list[str]] = {}
    if flat:
        for entry in _images(root_path, skipped):
            if os.path.dirname(entry.path) != str(root_path):
                continue  # flat means the root's own files; sub-folders are not classes here
            name = os.path.basename(entry.path)
            label = name.split("_", 1)[0] if "_" in name else os.path.splitext(name)[0]
            classes.setdefault(label, []).append(entry.path)
    else:
        loose = 0
        for sub in sorted(root_path.iterdir()):
            if sub.name.startswith(".") or not sub.is_dir():
                loose += sub.is_file() and sub.suffix.lower() in IMAGE_EXTENSIONS
                continue
            paths = [e.path for e in _images(sub, skipped)]
            if paths:
                classes[sub.name] = paths
        if loose:
            log.warning(
                "%d image(s) directly in %s belong to no class folder and are left out; "
                "use the flat layout if the class is the file-name prefix",
                loose,
                root_path,
            )
    if not classes:
        hint = (
            "put each class's images in its own sub-folder"
            if flat
            else "each class must be a sub-folder with images; for names like CLASS_xxx.jpg "
            "in one folder use the flat layout (--flat)"
        )
        raise InputError(f"no images found in classes under {root_path}; {hint}")
    return {k: sorted(v) for k, v in sorted(classes.items())}


def _images(folder: Path, skipped: list[str]) -> Iterator[FileEntry]:
    for item in discover([folder]):
        if isinstance(item, Skipped):
            skipped.append(f"{item.path}: {item.reason}")
            log.warning("skipping %s: %s", item.path, item.reason)
        else:
            yield item


def shortfalls(classes: Mapping[str, Sequence[str]], num_pos: int, num_neg: int) -> list[str]:
    """Why some queries will get fewer triplets than asked (small classes, too few others)."""
    total = sum(len(v) for v in classes.values())
    notes = []
    for name, paths in classes.items():
        if len(paths) - 1 < num_pos:
            notes.append(
                f"class {name!r} has {len(paths)} image(s): each query gets "
                f"{len(paths) - 1} positive(s) instead of {num_pos}"
            )
        if total - len(paths) < num_neg:
            notes.append(
                f"only {total - len(paths)} image(s) outside class {name!r}: each positive gets "
                f"that many negatives instead of {num_neg}"
            )
    return notes


def sample_triplets(
    classes: Mapping[str, Sequence[str]], num_pos: int, num_neg: int, seed: int = 0
) -> list[Triplet]:
    """The prototype's sampler: for every image as query, `num_pos` other images of its class
    as positives, and for each positive `num_neg` distinct images of other classes.

    Classes too small for the counts give what they have (logged as warnings). Deterministic:
    classes and images are visited in sorted order and every draw comes from `seed`.
    """
    _check_count("the number of positives", num_pos)
    _check_count("the number of negatives", num_neg)
    _check_seed(seed)
    notes = shortfalls(classes, num_pos, num_neg)
    for note in notes[:MAX_NOTES]:
        log.warning("%s", note)
    if len(notes) > MAX_NOTES:
        log.warning("... and %d more classes too small for the counts", len(notes) - MAX_NOTES)
    names = sorted(classes)
    flat: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    for name in names:
        paths = sorted(classes[name])
        spans[name] = (len(flat), len(flat) + len(paths))
        flat += paths
    if len(set(flat)) != len(flat):
        raise InputError("an image is listed in two classes; every image must have one class")

    triplets: list[Triplet] = []
    for name in names:
        start, end = spans[name]
        size = end - start
        others = len(flat) - size
        for qi in range(start, end):
            rng = _rng(seed, _SAMPLE, qi)
            # Positives: other images of the class (indices skip the query itself).
            picks = rng.choice(size - 1, size=min(num_pos, size - 1), replace=False)
            for pick in picks:
                pi = start + _skip(int(pick), qi - start)
                # Negatives: distinct images outside the class's span of `flat`.
                negs = rng.choice(others, size=min(num_neg, others), replace=False)
                for neg in negs:
                    ni = int(neg) + (size if int(neg) >= start else 0)
                    triplets.append(Triplet(flat[qi], flat[pi], flat[ni]))
    return triplets


# ---------------------------------------------------------------------------------------------
# the fetched Google layout


@dataclass(frozen=True, slots=True)
class _Image:
    path: str | None  # absolute, None when the download failed
    ids: frozenset[str]  # URL and SHA-1: either matching means "the same picture"


@dataclass(slots=True)
class _QueryGroup:
    """All records sharing one query picture."""

    text: str
    query: _Image
    positives: list[_Image]
    negatives: list[_Image]


def _manifest_records(directory: Path) -> list[TripletRecord]:
    from simsearch.datasets import read_manifest

    return read_manifest(directory)


def _role_image(directory: Path, remote: RemoteImage) -> _Image:
    """The picture's file when it was fetched and is still there, and its identities."""
    ids = frozenset(x for x in (remote.url, remote.sha1) if x)
    path = str(directory / remote.file) if remote.ok and remote.file else None
    if path is not None and not os.path.isfile(path):
        path = None
    return _Image(path, ids)


def _google_groups(directory: Path, skipped: list[str]) -> list[_QueryGroup]:
    groups: dict[str, _QueryGroup] = {}
    for record in _manifest_records(directory):
        query = _role_image(directory, record.query)
        if query.path is None:
            skipped.append(
                f"record {record.index} (line {record.line}): no query image "
                f"({record.query.status})"
            )
            continue
        key = record.query.sha1 or record.query.url
        group = groups.get(key)
        if group is None:
            group = groups[key] = _QueryGroup(record.text, query, [], [])
        group.positives.append(_role_image(directory, record.positive))
        group.negatives.append(_role_image(directory, record.negative))
    return list(groups.values())


def google_layout_triplets(directory: str | os.PathLike[str]) -> list[Triplet]:
    """The fetched triplets as they are: one per record whose three images are all present."""
    root = _google_root(directory)
    triplets = []
    for record in _manifest_records(root):
        images = [_role_image(root, getattr(record, role)) for role in ROLES]
        if all(image.path for image in images):
            triplets.append(Triplet(*(image.path for image in images)))  # type: ignore[arg-type]
    return triplets


def _google_root(directory: str | os.PathLike[str]) -> Path:
    root = _absolute(directory)
    if not (root / MANIFEST).is_file():
        raise InputError(
            f"{root} has no {MANIFEST}; make the layout with `simsearch triplets fetch` or "
            f"`simsearch triplets import`"
        )
    return root


def _dedupe(images: Sequence[_Image]) -> list[_Image]:
    seen: set[str] = set()
    out = []
    for image in images:
        if image.path is None or image.ids & seen:
            continue
        seen |= image.ids
        out.append(image)
    return out


def sample_google_layout(
    directory: str | os.PathLike[str],
    num_pos: int | None,
    num_neg: int | None,
    seed: int = 0,
    *,
    summary: SampleSummary | None = None,
) -> list[Triplet]:
    """Triplets from a fetched layout, grouped by query picture (SHA-1, else URL).

    A query's positives are the positives of all its records, minus any picture that one of its
    records names as a negative (the prototype used every image of a record folder, negative
    included, as a positive). Each positive gets the query's own negatives first (people judged
    them less relevant: the paper's in-class negatives), topped up to `num_neg` with pictures of
    other search texts. `None` means every positive and only the query's own negatives.
    """
    if num_pos is not None:
        _check_count("the number of positives", num_pos)
    if num_neg is not None:
        _check_count("the number of negatives", num_neg)
    _check_seed(seed)
    root = _google_root(directory)
    skipped: list[str] = summary.skipped if summary is not None else []
    groups = _google_groups(root, skipped)

    # Out-of-class pool: every picture, deduplicated, with its search text.
    pool: list[tuple[str, _Image]] = []
    seen: set[str] = set()
    for group in groups:
        for image in [group.query, *group.positives, *group.negatives]:
            if image.path is not None and not image.ids & seen:
                seen |= image.ids
                pool.append((group.text, image))

    triplets: list[Triplet] = []
    queries = short = conflicts = 0
    for gi, group in enumerate(groups):
        rng = _rng(seed, _SAMPLE, gi)
        bad_ids = frozenset().union(*(n.ids for n in group.negatives))
        positives = []
        for p in _dedupe(group.positives):
            if p.ids & bad_ids:
                conflicts += 1
                log.info("%s is both a positive and a negative of one query", p.path)
            elif not p.ids & group.query.ids:
                positives.append(p)
        own = [n for n in _dedupe(group.negatives) if not n.ids & group.query.ids]
        chosen = [positives[int(i)] for i in rng.permutation(len(positives))][:num_pos]
        is_short = num_pos is not None and len(chosen) < num_pos
        # Never a negative: the query or any of its positives (chosen or not).
        taboo = set(group.query.ids).union(*(p.ids for p in positives))
        before = len(triplets)
        for positive in chosen:
            negatives = [own[int(i)] for i in rng.permutation(len(own))][:num_neg]
            if num_neg is not None and len(negatives) < num_neg:
                negatives += _other_texts(pool, group.text, num_neg - len(negatives), rng, taboo)
                is_short |= len(negatives) < num_neg
            triplets += [Triplet(group.query.path, positive.path, n.path) for n in negatives]  # type: ignore[arg-type]
        queries += len(triplets) > before
        short += is_short
    if summary is not None:
        summary.classes = len({g.text for g in groups})
        summary.images = len(pool)
        summary.queries = queries
        summary.triplets = len(triplets)
        summary.short = short
        summary.conflicts = conflicts
    if conflicts:
        log.warning(
            "%d positive(s) were left out because the same query also has them as a negative",
            conflicts,
        )
    return triplets


def _other_texts(
    pool: Sequence[tuple[str, _Image]],
    text: str,
    count: int,
    rng: np.random.Generator,
    taboo: set[str],
) -> list[_Image]:
    """Up to `count` distinct pool pictures of other search texts (rejection sampling)."""
    picked: list[_Image] = []
    used = set(taboo)
    tries = 0
    while len(picked) < count and pool and tries < 50 * count + 100:
        tries += 1
        other_text, image = pool[int(rng.integers(len(pool)))]
        if other_text != text and not image.ids & used:
            picked.append(image)
            used |= image.ids
    return picked


# ---------------------------------------------------------------------------------------------
# one entry point for the command


def detect_layout(directory: str | os.PathLike[str]) -> str:
    """'google' when the folder has a manifest, else 'folders'."""
    return "google" if (Path(directory) / MANIFEST).is_file() else "folders"


def sample_directory(
    directory: str | os.PathLike[str],
    num_pos: int,
    num_neg: int,
    seed: int = 0,
    *,
    layout: str = "auto",
) -> tuple[list[Triplet], SampleSummary]:
    """Triplets for any layout, with a summary of what was used and what was left out."""
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not Path(directory).expanduser().is_dir():
        raise InputError(f"{directory} is not a folder; check the path")
    if layout == "auto":
        layout = detect_layout(directory)
    summary = SampleSummary(layout, 0, 0, 0, 0)
    if layout == "google":
        triplets = sample_google_layout(directory, num_pos, num_neg, seed, summary=summary)
        return triplets, summary
    classes = class_folders(directory, flat=layout == "flat", skipped=summary.skipped)
    triplets = sample_triplets(classes, num_pos, num_neg, seed)
    summary.classes = len(classes)
    summary.images = sum(len(v) for v in classes.values())
    summary.queries = len({t.query for t in triplets})
    summary.triplets = len(triplets)
    total = summary.images
    summary.short = sum(
        len(v) * (len(v) - 1 < num_pos or total - len(v) < num_neg) for v in classes.values()
    )
    return triplets, summary


# ---------------------------------------------------------------------------------------------
# CSV


def write_triplets_csv(triplets: Sequence[Triplet], path: str | os.PathLike[str]) -> int:
    """The prototype's format: `query,positive,negative` per line, no header; returns the count.

    Paths are written relative to the CSV file's folder (absolute when that is impossible, such as
    another drive), so the CSV and the images can move together; `read_triplets_csv` resolves them
    against the same folder. Written atomically.
    """
    out = _absolute(path)
    base = out.parent
    rows = []
    for t in triplets:
        if t.augmented:
            raise InputError("augmented triplets exist only during training; they have no file")
        rows.append([_relative(p, base) for p in (t.query, t.positive, t.negative)])
    base.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(rows)


def _relative(path: str, base: Path) -> str:
    absolute = os.path.abspath(path)
    try:
        return os.path.relpath(absolute, base)
    except ValueError:  # another drive on Windows
        return absolute


def read_triplets_csv(
    path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None
) -> list[Triplet]:
    """Triplets from a CSV of `query,positive,negative` lines; relative paths are resolved against
    `base`, by default the CSV's own folder. Bad rows and missing files raise InputError naming
    the line; blank lines are ignored.
    """
    csv_path = _absolute(path)
    if not csv_path.is_file():
        raise InputError(f"triplet file {csv_path} does not exist; check the path")
    root = _absolute(base) if base is not None else csv_path.parent
    triplets = []
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.reader(f), start=1):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != 3 or not all(cell.strip() for cell in row):
                    raise InputError(
                        f"{csv_path}, line {number}: expected 3 paths "
                        f"(query,positive,negative), got {len(row)} field(s): {row!r}"
                    )
                paths = [os.path.normpath(root / cell.strip()) for cell in row]
                for role, p in zip(ROLES, paths, strict=True):
                    if not os.path.isfile(p):
                        raise InputError(
                            f"{csv_path}, line {number}: the {role} image {p} does not exist; "
                            f"relative paths are read from {root}"
                        )
                triplets.append(Triplet(*paths))
    except UnicodeDecodeError as exc:
        raise InputError(f"{csv_path} is not a UTF-8 text file of triplets ({exc})") from exc
    except csv.Error as exc:
        raise InputError(f"{csv_path}: not a valid CSV ({exc})") from exc
    if not triplets:
        raise InputError(f"{csv_path} holds no triplets; write one query,positive,negative a line")
    return triplets


# ---------------------------------------------------------------------------------------------
# online sampling for training


class _TripletStream(abc.ABC):
    """What both samplers share: triplet `t` is a pure function of (seed, t), so the state is
    the position of the next triplet plus the settings that must match to resume."""

    position: int

    @abc.abstractmethod
    def triplet(self, t: int) -> Triplet:
        """Triplet number `t` of the stream (0-based)."""

    @abc.abstractmethod
    def _identity(self) -> dict[str, Any]:
        """The data and settings a saved state must match (JSON-serialisable)."""

    def next_batch(self, size: int) -> list[Triplet]:
        """The next `size` triplets of the stream; advances the position."""
        batch = [self.triplet(t) for t in range(self.position, self.position + size)]
        self.position += size
        return batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; with the same data and settings it restores the stream."""
        return {"position": self.position, **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream where `state_dict` was taken; refuses other data or settings."""
        for key, mine in self._identity().items():
            theirs = state.get(key, _STATE_DEFAULTS.get(key))  # settings added later
            if theirs != mine:
                raise InputError(
                    f"cannot resume the triplet stream: its {key} was {theirs!r}, now "
                    f"{mine!r}; resume with the same data and settings"
                )
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise InputError(f"bad sampler state: position {position!r}")
        self.position = position


_STATE_DEFAULTS: dict[str, Any] = {"hard_negative_ratio": 0.0}


class OnlineSampler(_TripletStream):
    """An endless, seeded stream of triplets from labelled images: the paper's online sampling.

    Each epoch visits every image once as a query, in a seeded order. The positive is another
    image of the query's class or, with probability `augment_ratio`, an edited copy of the query
    (`Triplet.augmented`). The negative is an image of another class (out-of-class) or, with
    probability `in_class_negative_ratio`, another image of the query's own class (in-class).

    In-class negatives follow the paper's relevance order (the query's own edited copy, then its
    class, then other classes): with only class labels, nothing ranks two images of one class
    against each other, so a triplet with an in-class negative always takes an edited copy of the
    query as its positive. It teaches the near-duplicate distinction inside a category.

    Hard negatives, as the paper picks them with "golden features": after
    `set_hard_negatives(neighbours)` (for each image, the other-class images nearest to it by a
    fixed reference feature), an out-of-class negative is one of those neighbours with
    probability `hard_negative_ratio`, else any other-class image.

    Triplet `t` of the stream depends only on (seed, t), so `triplet(t)` can be called from data
    loader workers in any order, and the state is just the position of the next triplet.
    """

    def __init__(
        self,
        classes: Mapping[str, Sequence[str]],
        *,
        in_class_negative_ratio: float = 0.0,
        augment_ratio: float = 0.0,
        hard_negative_ratio: float = 0.0,
        seed: int = 0,
    ) -> None:
        _check_seed(seed)
        for name, ratio in (
            ("in-class negative ratio", in_class_negative_ratio),
            ("augmented positive ratio", augment_ratio),
            ("hard negative ratio", hard_negative_ratio),
        ):
            if not 0.0 <= ratio <= 1.0:
                raise InputError(f"the {name} must be from 0 to 1, got {ratio}")
        names = sorted(k for k, v in classes.items() if len(v) > 0)
        if len(names) < 2:
            raise InputError(
                f"online sampling needs images in at least 2 classes, got {len(names)}; "
                f"add class folders"
            )
        self.paths: list[str] = []
        self.spans: list[tuple[int, int]] = []  # per class, its range in self.paths
        self.class_of: list[int] = []
        for c, name in enumerate(names):
            paths = sorted(classes[name])
            self.spans.append((len(self.paths), len(self.paths) + len(paths)))
            self.paths += paths
            self.class_of += [c] * len(paths)
        if len(set(self.paths)) != len(self.paths):
            raise InputError("an image is listed in two classes; every image must have one class")
        self.class_names = names
        self.in_class_negative_ratio = float(in_class_negative_ratio)
        self.augment_ratio = float(augment_ratio)
        self.hard_negative_ratio = float(hard_negative_ratio)
        self.hard_negatives: np.ndarray | None = None  # (images, k) indices into self.paths
        self.seed = seed
        self.position = 0
        self._epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Triplets per epoch (one per image)."""
        return len(self.paths)

    def triplet(self, t: int) -> Triplet:
        """Triplet number `t` of the stream (0-based); a pure function of (seed, t)."""
        n = len(self.paths)
        epoch, offset = divmod(t, n)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, _rng(self.seed, _EPOCH, epoch).permutation(n))
        qi = int(self._epoch[1][offset])
        start, end = self.spans[self.class_of[qi]]
        size = end - start
        rng = _rng(self.seed, _DRAW, t)
        in_class = size > 1 and rng.random() < self.in_class_negative_ratio
        augmented = in_class or size == 1 or rng.random() < self.augment_ratio
        if in_class:
            ni = start + _skip(int(rng.integers(size - 1)), qi - start)
        elif self.hard_negatives is not None and rng.random() < self.hard_negative_ratio:
            row = self.hard_negatives[qi]
            ni = int(row[rng.integers(len(row))])
        else:
            ni = int(rng.integers(n - size))
            ni += size if ni >= start else 0
        if augmented:
            return Triplet(self.paths[qi], self.paths[qi], self.paths[ni], augmented=True)
        pi = start + _skip(int(rng.integers(size - 1)), qi - start)
        return Triplet(self.paths[qi], self.paths[pi], self.paths[ni])

    def set_hard_negatives(self, features: np.ndarray, k: int = 10) -> None:
        """For each image, its `k` nearest other-class images by `features` (rows in path order)."""
        if features.shape[0] != len(self.paths):
            raise ValueError(f"{features.shape[0]} feature rows for {len(self.paths)} images")
        unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        labels = np.asarray(self.class_of)
        k = max(1, min(k, len(self.paths) - max(e - s for s, e in self.spans)))
        rows = []
        for start in range(0, len(unit), 1024):  # blocks: no N x N matrix for big sets
            sims = unit[start : start + 1024] @ unit.T
            sims[labels[start : start + 1024, None] == labels[None, :]] = -np.inf
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            order = np.take_along_axis(-sims, top, axis=1).argsort(axis=1, kind="stable")
            rows.append(np.take_along_axis(top, order, axis=1))
        self.hard_negatives = np.concatenate(rows).astype(np.int64)

    def _identity(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "images": len(self.paths),
            "in_class_negative_ratio": self.in_class_negative_ratio,
            "augment_ratio": self.augment_ratio,
            "hard_negative_ratio": self.hard_negative_ratio,
        }


class ListSampler(_TripletStream):
    """A fixed list of triplets as an endless stream, reshuffled every epoch (seeded).

    With `augment_ratio`, a triplet's positive is replaced by an edited copy of its query with
    that probability. Like `OnlineSampler`, triplet `t` depends only on (seed, t).
    """

    def __init__(
        self, triplets: Sequence[Triplet], *, augment_ratio: float = 0.0, seed: int = 0
    ) -> None:
        _check_seed(seed)
        if not triplets:
            raise InputError("no triplets to train on")
        if not 0.0 <= augment_ratio <= 1.0:
            raise InputError(
                f"the augmented positive ratio must be from 0 to 1, got {augment_ratio}"
            )
        self.triplets = list(triplets)
        self.augment_ratio = float(augment_ratio)
        self.seed = seed
        self.position = 0
        self._epoch: tuple[int, np.ndarray] | None = None
        self.paths = sorted({p for t in self.triplets for p in (t.query, t.positive, t.negative)})

    def __len__(self) -> int:
        return len(self.triplets)

    def triplet(self, t: int) -> Triplet:
        epoch, offset = divmod(t, len(self.triplets))
        if self._epoch is None or self._epoch[0] != epoch:
            order = _rng(self.seed, _EPOCH, epoch).permutation(len(self.triplets))
            self._epoch = (epoch, order)
        base = self.triplets[int(self._epoch[1][offset])]
        if self.augment_ratio and _rng(self.seed, _DRAW, t).random() < self.augment_ratio:
            return Triplet(base.query, base.query, base.negative, augmented=True)
        return base

    def _identity(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "triplets": len(self.triplets),
            "augment_ratio": self.augment_ratio,
        }


def _skip(pick: int, excluded: int) -> int:
    """Map a draw from range(n - 1) onto range(n) without `excluded`."""
    return pick + (pick >= excluded)


__all__ = [
    "LAYOUTS",
    "ListSampler",
    "OnlineSampler",
    "SampleSummary",
    "Triplet",
    "class_folders",
    "detect_layout",
    "google_layout_triplets",
    "read_triplets_csv",
    "sample_directory",
    "sample_google_layout",
    "sample_triplets",
    "shortfalls",
    "write_triplets_csv",
]
