"""The Deep Ranking triplet data set: parse Google's query_and_triplets.txt, fetch or import its
images into the prototype's layout, and read that layout back.

The layout, shared with sampling and training::

    DIR/<i>/query.jpg, DIR/<i>/positive.jpg, DIR/<i>/negative.jpg   record i (0-based, file order)
    DIR/manifest.jsonl                                               one JSON object per record

A file is present only if it was obtained and decodes; the manifest gives every image's URL and
status ("ok" or a short reason such as "HTTP 404"), so a failed image is explained, not missing.
Files keep the bytes as served (the prototype named them .jpg whatever the format), and every
run resumes: files already there that decode are kept, so a killed or partial run is re-run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import ssl
import stat
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, unquote_plus, urlsplit

from filelock import FileLock, Timeout

from simsearch import __version__
from simsearch.config import DEFAULT_MAX_PIXELS
from simsearch.errors import ImageError, InputError
from simsearch.fileio import atomic_write
from simsearch.images import IMAGE_EXTENSIONS, decode_image
from simsearch.progress import Progress

log = logging.getLogger(__name__)

ROLES: tuple[str, str, str] = ("query", "positive", "negative")
MANIFEST_NAME = "manifest.jsonl"
STATUS_OK = "ok"
STATUS_PENDING = "pending"  # parsed, not obtained yet (also in a manifest saved mid-run)
STATUS_NOT_FOUND = "not found"  # import: no file in the source folder matches the URL
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
MAX_REDIRECTS = 5
CHECKPOINT_SECONDS = 10.0  # the manifest is rewritten this often during a run

_LOCK_NAME = ".triplets.lock"
_CHUNK = 64 * 1024
_MAX_BACKOFF = 30.0
_TOTAL_TIMEOUT_FACTOR = 10  # one attempt may take at most this many times the read timeout
_RETRY_HTTP_CODES = frozenset({408, 429})  # 4xx codes that mean "try again later"
_UNREACHABLE = frozenset({"connection refused", "host not found", "network unreachable"})
_GIVE_UP_AFTER = 50  # this many unreachable URLs in a row stop a fetch
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_URL_MAP = re.compile(r"^(?P<src>.+?)=(?P<dst>https?://.*)$", re.IGNORECASE)
_USER_AGENT = f"simsearch/{__version__} (triplets fetch; Python urllib)"
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True, slots=True)
class RemoteImage:
    """One image of a triplet: its URL and, once fetched or imported, its file."""

    url: str
    status: str = STATUS_PENDING  # "ok", "pending" or a short reason ("HTTP 404", "timeout")
    file: str | None = None  # relative to the layout folder, "/"-separated, e.g. "12/query.jpg"
    sha1: str | None = None  # of the file's bytes

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "status": self.status, "file": self.file, "sha1": self.sha1}


@dataclass(frozen=True, slots=True)
class TripletRecord:
    """One record of the triplet file: a search text and its query, positive and negative."""

    index: int  # 0-based among the file's valid records; the record's folder name
    line: int  # 1-based line number of the search text in the triplet file
    text: str  # the search text, with spaces
    query: RemoteImage
    positive: RemoteImage
    negative: RemoteImage

    @property
    def images(self) -> tuple[RemoteImage, RemoteImage, RemoteImage]:
        return (self.query, self.positive, self.negative)

    @property
    def complete(self) -> bool:
        """All three images are on disk and decode."""
        return self.query.ok and self.positive.ok and self.negative.ok

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "line": self.line, "text": self.text}
        for role, image in zip(ROLES, self.images, strict=True):
            out[role] = image.to_dict()
        return out


@dataclass(frozen=True, slots=True)
class ParseProblem:
    """A malformed part of the triplet file, skipped by the parser."""

    line: int  # 1-based
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


# ---------------------------------------------------------------------------------------------
# parsing


def parse_triplet_file(
    path: str | os.PathLike[str],
) -> tuple[list[TripletRecord], list[ParseProblem]]:
    """The records of a query_and_triplets.txt file, and the problems met on the way.

    A record is 4 lines: the search text ('+' for spaces, percent-escapes decoded), then the
    query, positive and negative image URLs (http or https). The parser never stops at a bad
    record, so one typo costs one record:
    - blank lines are reported and ignored (trailing blank lines at the end are not reported);
    - URLs where a search text should be are reported once per run of such lines and skipped;
    - a record whose URL line is not an http(s) URL is reported at that line and skipped with
      the rest of its URLs; if the line is text, it starts the next record;
    - a record cut short by the end of the file is reported at its search-text line.
    """
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline=None) as f:
            raw = f.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; give the path of query_and_triplets.txt") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; give the path of query_and_triplets.txt") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if "\x00" in "".join(raw[:50]):
        raise InputError(f"{path}: a binary file, not a triplet text file (records of 4 lines)")

    lines = [line.strip() for line in raw]
    while lines and not lines[-1]:
        lines.pop()
    problems: list[ParseProblem] = []
    entries: list[tuple[int, str]] = []  # (1-based line number, text) of the non-blank lines
    for number, line in enumerate(lines, start=1):
        if line:
            entries.append((number, line))
        else:
            problems.append(ParseProblem(number, "blank line (ignored)"))

    records: list[TripletRecord] = []
    k, m = 0, len(entries)
    while k < m:
        start, text = entries[k]
        if _looks_like_url(text):
            end = k
            while end < m and _looks_like_url(entries[end][1]):
                end += 1
            last = entries[end - 1][0]
            skipped = f"line {start}" if end - k == 1 else f"{end - k} lines up to line {last}"
            problems.append(
                ParseProblem(
                    start, f"expected a search text, found a URL ({_clip(text)}); {skipped} skipped"
                )
            )
            k = end
            continue
        urls: list[str] = []
        k += 1
        while len(urls) < 3 and k < m and _is_http_url(entries[k][1]):
            urls.append(entries[k][1])
            k += 1
        if len(urls) == 3:
            records.append(_new_record(len(records), start, text, urls))
            continue
        role = ROLES[len(urls)]
        if k >= m:
            problems.append(
                ParseProblem(
                    start,
                    f"truncated record: the file ends before its {role} image URL "
                    f"({len(urls)} of 3 URLs); the record is skipped",
                )
            )
            break
        bad_line, bad = entries[k]
        if _looks_like_url(bad):
            problems.append(
                ParseProblem(
                    bad_line,
                    f"the {role} image URL of the record on line {start} is not an http(s) "
                    f"URL ({_clip(bad)}); the record is skipped",
                )
            )
            k += 1
            rest = 2 - len(urls)  # this record's remaining URL lines go with it
            while rest and k < m and _looks_like_url(entries[k][1]):
                k += 1
                rest -= 1
        else:
            problems.append(
                ParseProblem(
                    bad_line,
                    f"expected the {role} image URL of the record on line {start}, found text "
                    f"({_clip(bad)}); the record is skipped and this line starts the next one",
                )
            )
    problems.sort(key=lambda p: p.line)
    return records, problems


def _new_record(index: int, line: int, text: str, urls: list[str]) -> TripletRecord:
    query, positive, negative = (RemoteImage(url) for url in urls)
    return TripletRecord(index, line, unquote_plus(text).strip(), query, positive, negative)


def _looks_like_url(line: str) -> bool:
    return bool(_URL_SCHEME.match(line)) or line.lower().startswith("www.")


def _is_http_url(line: str) -> bool:
    if any(c.isspace() for c in line):
        return False
    try:
        parts = urlsplit(line)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(host)


def _clip(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


# ---------------------------------------------------------------------------------------------
# manifest


def read_manifest(directory: str | os.PathLike[str]) -> list[TripletRecord]:
    """The records of a fetched or imported layout, in file order, from DIR/manifest.jsonl."""
    path = Path(directory) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(
            f"{path}: no manifest; create the layout with simsearch triplets fetch or import"
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(_record_from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{path} line {number}: not a manifest record ({exc}); re-run simsearch "
                "triplets fetch or import to rewrite it"
            ) from None
    return records


def _record_from_dict(data: dict[str, Any]) -> TripletRecord:
    images = []
    for role in ROLES:
        item = data[role]
        url, status, file, sha1 = item["url"], item["status"], item.get("file"), item.get("sha1")
        if not isinstance(url, str) or not isinstance(status, str):
            raise TypeError(f"{role}: url and status must be strings")
        if file is not None and not isinstance(file, str):
            raise TypeError(f"{role}: file must be a string or null")
        images.append(RemoteImage(url, status, file, sha1))
    index, line, text = data["index"], data["line"], data["text"]
    if not isinstance(index, int) or not isinstance(line, int) or not isinstance(text, str):
        raise TypeError("index and line must be integers, text a string")
    return TripletRecord(index, line, text, *images)


def _write_manifest(directory: Path, records: Iterable[TripletRecord]) -> None:
    """Atomically (temp file, fsync, rename): a reader or a killed run never sees half of it."""
    lines = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)
    atomic_write(directory / MANIFEST_NAME, lines)


# ---------------------------------------------------------------------------------------------
# summaries


@dataclass(frozen=True, slots=True)
class ImageFailure:
    """An image URL that could not be obtained, and why."""

    url: str
    reason: str  # short, as in the manifest's status: "HTTP 404", "timeout", "not an image"
    detail: str  # one line for a human


@dataclass(slots=True)
class FetchSummary:
    """What `fetch` did, counted per unique URL (a URL shared by records is fetched once)."""

    out_dir: str
    records: int
    urls: int
    downloaded: int = 0
    kept: int = 0  # already on disk and decoding, not downloaded again
    failed: int = 0
    complete: int = 0  # records with all three images
    reasons: dict[str, int] = field(default_factory=dict)  # failure reason -> URL count
    failures: list[ImageFailure] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _summary_dict(self)


@dataclass(slots=True)
class ImportSummary:
    """What `import_images` did, counted per unique URL."""

    out_dir: str
    source_dir: str
    records: int
    urls: int
    imported: int = 0
    kept: int = 0  # already in the layout and decoding
    failed: int = 0  # not found in the source folder, or found but not a usable image
    complete: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    failures: list[ImageFailure] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _summary_dict(self)


def _summary_dict(summary: FetchSummary | ImportSummary) -> dict[str, Any]:
    return asdict(summary)


# ---------------------------------------------------------------------------------------------
# the shared engine: one task per unique URL, resumable, atomic, with a manifest


class _Failure(Exception):
    """An image that cannot be obtained; `reason` becomes its manifest status."""

    def __init__(self, reason: str, detail: str, *, retryable: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class _Slot:
    key: tuple[int, str]  # (record index, role)
    path: Path
    rel: str
    previous: RemoteImage | None  # what the old manifest said about this slot


@dataclass(frozen=True, slots=True)
class _Outcome:
    url: str
    how: str  # "obtained", "kept" or "failed"
    sha1: dict[tuple[int, str], str] = field(default_factory=dict)
    failure: _Failure | None = None


Obtain = Callable[[str], bytes]  # URL -> bytes that decode, or raises _Failure


def _settle(
    url: str, slots: list[_Slot], obtain: Obtain, max_pixels: int, max_bytes: int
) -> _Outcome:
    """Make every slot of one URL hold a decoding image: keep valid files, else obtain once."""
    digests: dict[tuple[int, str], str] = {}
    kept_data: bytes | None = None
    for slot in slots:
        if slot.previous is not None and slot.previous.url != url:
            continue  # the file there belongs to another URL (the triplet file changed)
        data = _existing_image(slot.path, max_pixels, max_bytes)
        if data is not None:
            digests[slot.key] = _sha1(data)
            kept_data = data
    missing = [s for s in slots if s.key not in digests]
    if not missing:
        return _Outcome(url, "kept", digests)
    if kept_data is not None:
        data, how = kept_data, "kept"
    else:
        try:
            data, how = obtain(url), "obtained"
        except _Failure as failure:
            for slot in missing:
                _unlink(slot.path)  # a stale or broken file must not pass for this image
            return _Outcome(url, "failed", failure=failure)
    digest = _sha1(data)
    for slot in missing:
        _write_atomic(slot.path, data)
        digests[slot.key] = digest
    return _Outcome(url, how, digests)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One fetch or import at a time per layout folder (across processes)."""
    lock = FileLock(str(out / _LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise InputError(
            f"{out}: another simsearch triplets fetch or import is writing there; wait for it "
            "to finish or choose another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _run(
    records: Sequence[TripletRecord],
    out_dir: str | os.PathLike[str],
    obtain: Obtain,
    *,
    workers: int,
    max_pixels: int,
    max_bytes: int,
    progress: Progress | None,
    description: str,
    checkpoint_every: float,
    keep_previous_failures: bool,
    stop: threading.Event,
    watch: Callable[[_Outcome], None] | None = None,
) -> tuple[list[TripletRecord], list[_Outcome]]:
    """Settle every unique URL on `workers` threads; the manifest is written from this thread.

    `watch` sees each outcome as it comes and may raise to stop the run (the manifest is saved).
    """
    out = _prepare_out_dir(out_dir)
    with _exclusive(out):
        indexes = [r.index for r in records]
        if len(set(indexes)) != len(indexes) or any(i < 0 for i in indexes):
            raise InputError(
                "records must have distinct, non-negative indexes (their folder names)"
            )
        previous = _previous_manifest(out)
        _remove_stale_temp_files(out, indexes)

        groups: dict[str, list[_Slot]] = {}
        state: dict[tuple[int, str], RemoteImage] = {}
        for record in records:
            for role, image in zip(ROLES, record.images, strict=True):
                key = (record.index, role)
                rel = f"{record.index}/{role}.jpg"
                groups.setdefault(image.url, []).append(
                    _Slot(key, out / str(record.index) / f"{role}.jpg", rel, previous.get(key))
                )
                state[key] = RemoteImage(image.url)

        def snapshot() -> list[TripletRecord]:
            return [
                replace(
                    r,
                    query=state[(r.index, "query")],
                    positive=state[(r.index, "positive")],
                    negative=state[(r.index, "negative")],
                )
                for r in records
            ]

        outcomes: list[_Outcome] = []
        if progress is not None:
            progress.start(len(groups), description)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="triplets")
        try:
            futures = [
                executor.submit(_settle, url, slots, obtain, max_pixels, max_bytes)
                for url, slots in groups.items()
            ]
            last_checkpoint = time.monotonic()
            for future in as_completed(futures):
                outcome = future.result()
                outcomes.append(outcome)
                for slot in groups[outcome.url]:
                    state[slot.key] = _slot_state(outcome, slot, keep_previous_failures)
                if progress is not None:
                    progress.advance()
                if watch is not None:
                    watch(outcome)
                if time.monotonic() - last_checkpoint >= checkpoint_every:
                    _write_manifest(out, snapshot())
                    last_checkpoint = time.monotonic()
        except BaseException:
            stop.set()  # downloads in flight give up instead of retrying
            executor.shutdown(wait=False, cancel_futures=True)
            _write_manifest(out, snapshot())  # a killed or failed run keeps its progress
            raise
        finally:
            if progress is not None:
                progress.close()
        executor.shutdown()
        final = snapshot()
        _write_manifest(out, final)
        return final, outcomes


def _slot_state(outcome: _Outcome, slot: _Slot, keep_previous_failures: bool) -> RemoteImage:
    if outcome.failure is None:
        return RemoteImage(outcome.url, STATUS_OK, slot.rel, outcome.sha1[slot.key])
    reason = outcome.failure.reason
    old = slot.previous
    if (
        keep_previous_failures
        and reason == STATUS_NOT_FOUND
        and old is not None
        and old.url == outcome.url
        and old.status not in (STATUS_OK, STATUS_PENDING)
    ):
        reason = old.status  # "HTTP 404" from a fetch says more than "not found"
    return RemoteImage(outcome.url, reason)


def _tally(
    summary: FetchSummary | ImportSummary,
    final: list[TripletRecord],
    outcomes: list[_Outcome],
    obtained: str,
) -> None:
    """Fill the counts; `obtained` names the field for newly obtained images."""
    reasons: Counter[str] = Counter()
    for outcome in outcomes:
        if outcome.failure is None:
            if outcome.how == "kept":
                summary.kept += 1
            else:
                setattr(summary, obtained, getattr(summary, obtained) + 1)
            continue
        summary.failed += 1
        reasons[outcome.failure.reason] += 1
        summary.failures.append(
            ImageFailure(outcome.url, outcome.failure.reason, outcome.failure.detail)
        )
    summary.failures.sort(key=lambda f: (f.reason, f.url))
    summary.reasons = dict(reasons.most_common())
    summary.complete = sum(1 for r in final if r.complete)


def _prepare_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the folder: {exc.strerror or exc}") from None
    return out


def _previous_manifest(out: Path) -> dict[tuple[int, str], RemoteImage]:
    if not (out / MANIFEST_NAME).exists():
        return {}
    try:
        records = read_manifest(out)
    except InputError as exc:
        log.warning("ignoring the unreadable manifest (files that decode are kept): %s", exc)
        return {}
    return {
        (r.index, role): image for r in records for role, image in zip(ROLES, r.images, strict=True)
    }


def _remove_stale_temp_files(out: Path, indexes: Iterable[int]) -> None:
    """Temp files of a killed run (their names start with '.' and end with '.tmp')."""
    for folder in [out, *(out / str(i) for i in indexes)]:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                _unlink(Path(entry.path))


def _existing_image(path: Path, max_pixels: int, max_bytes: int) -> bytes | None:
    """The bytes of the file at `path` if it is there and decodes, else None."""
    try:
        data = _read_regular_file(path, max_bytes)
        decode_image(data, max_pixels=max_pixels)
    except FileNotFoundError:
        return None
    except (OSError, _Failure, ImageError) as exc:
        log.info("%s: will be replaced: %s", path, exc)
        return None
    return data


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """A file's bytes; a FIFO or device named like an image is refused, never blocked on."""
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Failure("not a file", f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise _Failure("too large", f"{st.st_size:,} bytes, above the limit of {max_bytes:,}")
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
        return f.read(max_bytes + 1)


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file then rename, so a killed run leaves whole files or none (no fsync: a torn
    file after a power cut fails to decode and is fetched again)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(f"{path.parent}: cannot write there: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(Path(tmp))
        raise InputError(
            f"{path}: cannot write it: {exc.strerror or exc}; check free space and permissions"
        ) from None
    except BaseException:
        _unlink(Path(tmp))
        raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        log.warning("%s is a folder where an image file belongs; remove it", path)


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _verify(data: bytes, max_pixels: int, origin: str) -> bytes:
    """`data` if it decodes as an image; else a _Failure with a short reason."""
    try:
        decode_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        message = str(exc)
        if message.startswith("empty"):
            reason = "empty body"
        elif message.startswith("truncated or corrupt"):
            reason = "corrupt image"
        elif "above the limit" in message or message.startswith("image too large"):
            reason = "too many pixels"
        else:
            reason = "not an image"
        raise _Failure(reason, f"{message} ({origin})") from None
    return data


# ---------------------------------------------------------------------------------------------
# fetch


def fetch(
    records: Sequence[TripletRecord],
    out_dir: str | os.PathLike[str],
    *,
    concurrency: int = 16,
    timeout: float = 10.0,
    retries: int = 3,
    backoff: float = 0.5,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    url_map: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    progress: Progress | None = None,
    opener: urllib.request.OpenerDirector | None = None,
    checkpoint_every: float = CHECKPOINT_SECONDS,
) -> FetchSummary:
    """Download every record's images into the layout under `out_dir`, each unique URL once.

    `concurrency` downloads run at a time; each waits `timeout` seconds to connect and per read
    (an attempt is abandoned after 10x that in total). Connection errors, timeouts, truncated
    bodies, 5xx, 408 and 429 are retried `retries` times after `backoff`, 2x`backoff`, ...
    seconds; other 4xx are not. At most 5 redirects (to http(s) only) are followed; bodies above
    `max_bytes` and bodies that do not decode as an image are failures. Files already there that
    decode (and that the manifest, if any, gives to the same URL) are kept, not downloaded again.
    `url_map` rewrites URL prefixes before downloading (for a local mirror); the manifest keeps
    the original URLs. The manifest is rewritten every `checkpoint_every` seconds and when the
    run stops, even by Ctrl-C.
    """
    if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0 or max_bytes < 1:
        raise InputError(
            "concurrency and max_bytes must be at least 1, retries and backoff not negative, "
            "timeout positive"
        )
    prefixes = _check_url_map(url_map)
    stop = threading.Event()
    downloader = _Downloader(
        opener=opener or _default_opener(),
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        url_map=prefixes,
        stop=stop,
    )
    final, outcomes = _run(
        records,
        out_dir,
        downloader,
        workers=concurrency,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        progress=progress,
        description="fetching",
        checkpoint_every=checkpoint_every,
        keep_previous_failures=False,
        stop=stop,
        watch=_Unreachable(),
    )
    summary = FetchSummary(str(out_dir), len(records), len(outcomes))
    _tally(summary, final, outcomes, "downloaded")
    return summary


def parse_url_map(specs: Iterable[str]) -> list[tuple[str, str]]:
    """`FROM=TO` prefix rewrites (e.g. http://t0.gstatic.com=http://127.0.0.1:8000)."""
    pairs = []
    for spec in specs:
        match = _URL_MAP.match(spec.strip())
        if not match:
            raise InputError(
                f"--url-map {spec!r}: expected FROM=TO with TO an http(s) URL, e.g. "
                "http://t0.gstatic.com=http://127.0.0.1:8000"
            )
        pairs.append((match["src"], match["dst"]))
    return _check_url_map(pairs)


def map_url(url: str, url_map: Sequence[tuple[str, str]]) -> str:
    """`url` with the first matching FROM prefix replaced by its TO (`parse_url_map` puts the
    longest first)."""
    for src, dst in url_map:
        if url.startswith(src):
            return dst + url[len(src) :]
    return url


def _check_url_map(
    url_map: Mapping[str, str] | Sequence[tuple[str, str]] | None,
) -> list[tuple[str, str]]:
    if not url_map:
        return []
    pairs = list(url_map.items()) if isinstance(url_map, Mapping) else list(url_map)
    for src, dst in pairs:
        if not src or not _is_http_url(dst):
            raise InputError(
                f"URL map {src!r} -> {dst!r}: FROM must not be empty and TO must be an "
                "http(s) URL such as http://127.0.0.1:8000"
            )
    return sorted(pairs, key=lambda p: len(p[0]), reverse=True)


class _Downloader:
    """URL -> verified image bytes, with retries; shared by the worker threads (no state)."""

    def __init__(
        self,
        *,
        opener: urllib.request.OpenerDirector,
        timeout: float,
        retries: int,
        backoff: float,
        max_bytes: int,
        max_pixels: int,
        url_map: Sequence[tuple[str, str]],
        stop: threading.Event,
    ) -> None:
        self.opener = opener
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.url_map = url_map
        self.stop = stop

    def __call__(self, url: str) -> bytes:
        target = map_url(url, self.url_map)
        attempt = 0
        while True:
            if self.stop.is_set():
                raise _Failure("interrupted", "the run was stopped before this download")
            try:
                data, content_type = self._get(target)
            except _Failure as failure:
                if not failure.retryable or attempt >= self.retries:
                    if attempt:
                        failure.detail += f" (after {attempt + 1} attempts)"
                    raise
                delay = min(self.backoff * 2**attempt, _MAX_BACKOFF)
                log.debug("%s: %s; retrying in %.2f s", target, failure.detail, delay)
                attempt += 1
                self.stop.wait(delay)
                continue
            origin = f"Content-Type {content_type}" if content_type else "no Content-Type"
            return _verify(data, self.max_pixels, origin)

    def _get(self, url: str) -> tuple[bytes, str | None]:
        request = urllib.request.Request(
            url, headers={"User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.5"}
        )
        deadline = time.monotonic() + self.timeout * _TOTAL_TIMEOUT_FACTOR
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                return self._read_body(response, deadline), response.headers.get("Content-Type")
        except urllib.error.HTTPError as exc:
            exc.close()
            code = exc.code
            if isinstance(exc, _RedirectRefused):
                raise _Failure("bad redirect", str(exc.reason)) from None
            if code in (301, 302, 303, 307, 308):
                raise _Failure(
                    "too many redirects",
                    f"more than {MAX_REDIRECTS} redirects, or a redirect loop",
                ) from None
            retryable = code >= 500 or code in _RETRY_HTTP_CODES
            raise _Failure(
                f"HTTP {code}", f"HTTP {code} {exc.reason}", retryable=retryable
            ) from None
        except urllib.error.URLError as exc:
            raise _connection_failure(exc.reason, self.timeout) from None
        except http.client.IncompleteRead as exc:
            raise _Failure(
                "truncated body", f"connection closed early: {exc}", retryable=True
            ) from None
        except (http.client.HTTPException, OSError) as exc:
            raise _connection_failure(exc, self.timeout) from None
        except ValueError as exc:
            raise _Failure("invalid URL", str(exc)) from None

    def _read_body(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        header = response.headers.get("Content-Length")
        declared = int(header) if header and header.strip().isdigit() else None
        if declared is not None and declared > self.max_bytes:
            raise _Failure(
                "too large",
                f"the server announces {declared:,} bytes, above the limit of {self.max_bytes:,}",
            )
        chunks: list[bytes] = []
        total = 0
        while chunk := response.read(_CHUNK):
            total += len(chunk)
            if total > self.max_bytes:
                raise _Failure("too large", f"more than {self.max_bytes:,} bytes")
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise _Failure(
                    "timeout",
                    f"the body took more than {self.timeout * _TOTAL_TIMEOUT_FACTOR:g} s",
                    retryable=True,
                )
        if declared is not None and total < declared:
            raise _Failure(
                "truncated body",
                f"connection closed after {total:,} of {declared:,} bytes",
                retryable=True,
            )
        return b"".join(chunks)


def _connection_failure(error: object, timeout: float) -> _Failure:
    if isinstance(error, TimeoutError):
        return _Failure("timeout", f"no answer within {timeout:g} s", retryable=True)
    if isinstance(error, ConnectionRefusedError):
        return _Failure("connection refused", str(error), retryable=True)
    if isinstance(error, socket.gaierror):
        return _Failure("host not found", str(error), retryable=True)
    if isinstance(error, OSError) and error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return _Failure("network unreachable", str(error), retryable=True)
    if isinstance(error, ssl.SSLError):
        return _Failure("TLS error", str(error))
    if isinstance(error, (ConnectionError, OSError, http.client.HTTPException)):
        return _Failure("connection error", str(error) or type(error).__name__, retryable=True)
    if isinstance(error, str) and "unknown url type" in error:
        return _Failure("invalid URL", error)
    return _Failure("connection error", str(error), retryable=True)


class _Unreachable:
    """Stops a fetch when nothing answers (no network, a wrong --url-map) instead of retrying
    every remaining URL in vain."""

    def __init__(self) -> None:
        self.in_a_row: Counter[str] = Counter()

    def __call__(self, outcome: _Outcome) -> None:
        if outcome.failure is None or outcome.failure.reason not in _UNREACHABLE:
            self.in_a_row.clear()
            return
        self.in_a_row[outcome.failure.reason] += 1
        if self.in_a_row.total() >= _GIVE_UP_AFTER:
            reason, _ = self.in_a_row.most_common(1)[0]
            raise InputError(
                f"the last {_GIVE_UP_AFTER} downloads all failed ({reason}, e.g. "
                f"{outcome.url}); check the network connection, the URLs or --url-map, then run "
                "the same command again to resume"
            )


class _RedirectRefused(urllib.error.HTTPError):
    """A redirect to a scheme other than http(s) (file:, ftp:, ...)."""


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS
    max_repeats = 2

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urlsplit(newurl).scheme.lower()
        if scheme and scheme not in ("http", "https"):
            raise _RedirectRefused(
                newurl, code, f"redirect to {newurl!r} refused (not http or https)", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _LoopbackDirectProxyHandler(urllib.request.ProxyHandler):
    """The environment's proxies, except for this machine (a local mirror or test server)."""

    def proxy_open(self, req, proxy, type):
        host = (req.host or "").rsplit(":", 1)[0].strip("[]").lower()
        if host in ("localhost", "::1") or host.startswith("127."):
            return None
        return super().proxy_open(req, proxy, type)


def _default_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_LoopbackDirectProxyHandler(), _RedirectHandler())


# ---------------------------------------------------------------------------------------------
# import


def import_images(
    records: Sequence[TripletRecord],
    source_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
    progress: Progress | None = None,
) -> ImportSummary:
    """Copy images downloaded elsewhere (browser, wget) into the layout, matched by URL.

    Files are looked for anywhere under `source_dir` (hidden folders and `out_dir` excluded).
    For each URL, candidates are tried in this order and the first that decodes is used:
    1. the file that `source_dir/manifest.jsonl` (a layout fetched elsewhere) lists as "ok"
       for that URL;
    2. a file named the percent-encoded URL (`urllib.parse.quote(url, safe="")`);
    3. a file named as wget saves it: the last path segment and the query, joined by '?' (or
       by '@', wget's --restrict-file-names=windows), e.g. "images?q=tbn:ANd9Gc...";
    4. a file named by the URL's key: for a Google thumbnail (`...?q=tbn:KEY`) the KEY after
       "tbn:"; for a URL without a query, its last path segment (as written and decoded).
    Names in 2-4 match exactly (case-sensitive) with or without an image extension (".jpg",
    ".png", ... in any case). A name that would match more than one URL of the records is
    ambiguous and not used. Images already in the layout that decode are kept; slots with no
    match keep the manifest's earlier failure reason (e.g. "HTTP 404"), else get "not found".
    """
    source = Path(source_dir)
    if not source.is_dir():
        raise InputError(f"{source}: no such folder; give the folder holding the images")
    out = Path(out_dir)
    urls = list(dict.fromkeys(image.url for r in records for image in r.images))
    finder = _FolderSource(source, urls, out, max_bytes, max_pixels)
    final, outcomes = _run(
        records,
        out,
        finder,
        workers=max(1, workers),
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        progress=progress,
        description="importing",
        checkpoint_every=CHECKPOINT_SECONDS,
        keep_previous_failures=True,
        stop=threading.Event(),
    )
    summary = ImportSummary(str(out), str(source), len(records), len(outcomes))
    _tally(summary, final, outcomes, "imported")
    return summary


def url_file_names(url: str) -> list[str]:
    """The file names (without extension) under which an image of `url` may have been saved,
    most specific first: the percent-encoded URL, wget's names, the URL's key."""
    parts = urlsplit(url)
    last = parts.path.rsplit("/", 1)[-1]
    names = [quote(url, safe="")]
    if parts.query:
        names += [f"{last}?{parts.query}", f"{last}@{parts.query}"]
        q = parse_qs(parts.query).get("q", [])
        if q and q[0].startswith("tbn:") and len(q[0]) > 4:
            names.append(q[0][4:])
    elif last:
        names += [last, unquote(last)]
    return list(dict.fromkeys(n for n in names if n and n not in (".", "..") and "/" not in n))


class _FolderSource:
    """URL -> verified bytes of the best matching file under the source folder."""

    def __init__(
        self, source: Path, urls: list[str], out: Path, max_bytes: int, max_pixels: int
    ) -> None:
        self.source = source
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        files = _files_by_name(source, exclude=out)
        claims: dict[str, set[str]] = {}
        for url in urls:
            for name in url_file_names(url):
                claims.setdefault(name, set()).add(url)
        ambiguous = sorted(n for n, owners in claims.items() if len(owners) > 1)
        if ambiguous:
            log.warning(
                "%d file names match more than one URL and are not used (e.g. %r)",
                len(ambiguous),
                ambiguous[0],
            )
        self.candidates: dict[str, list[Path]] = {url: [] for url in urls}
        for url, path in _manifest_files(source):
            if url in self.candidates:
                self.candidates[url].append(path)
        for url in urls:
            for name in url_file_names(url):
                if len(claims[name]) == 1:
                    self.candidates[url].extend(files.get(name, ()))
        for url, paths in self.candidates.items():
            self.candidates[url] = list(dict.fromkeys(paths))

    def __call__(self, url: str) -> bytes:
        paths = self.candidates.get(url) or []
        if not paths:
            raise _Failure(STATUS_NOT_FOUND, f"no file under {self.source} matches this URL")
        failure: _Failure | None = None
        for path in paths:
            try:
                data = _read_regular_file(path, self.max_bytes)
                return _verify(data, self.max_pixels, str(path))
            except _Failure as exc:
                failure = exc
                if str(path) not in exc.detail:
                    exc.detail = f"{path}: {exc.detail}"
            except OSError as exc:
                failure = _Failure("unreadable", f"{path}: {exc.strerror or exc}")
            log.info("%s: not used for %s: %s", path, url, failure.detail)
        assert failure is not None
        raise failure


def _files_by_name(source: Path, *, exclude: Path) -> dict[str, list[Path]]:
    """File name (and name without an image extension) -> the files so named, sorted."""
    skip = os.path.abspath(exclude)
    found: dict[str, list[Path]] = {}
    for folder, dirs, names in os.walk(source):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and os.path.abspath(os.path.join(folder, d)) != skip
        )
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(folder, name)
            stem, ext = os.path.splitext(name)
            found.setdefault(name, []).append(path)
            if ext.lower() in IMAGE_EXTENSIONS and stem:
                found.setdefault(stem, []).append(path)
    return found


def _manifest_files(source: Path) -> list[tuple[str, Path]]:
    """(URL, file) for every "ok" image a manifest in `source` lists, inside `source` only."""
    if not (source / MANIFEST_NAME).exists():
        return []
    root = source.resolve()
    pairs = []
    for record in read_manifest(source):
        for image in record.images:
            if not image.ok or not image.file:
                continue
            path = (source / image.file).resolve()
            if root in path.parents:
                pairs.append((image.url, path))
    return pairs
