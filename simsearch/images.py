"""Finding image files, fingerprinting them and decoding them safely.

A corrupt, truncated, huge or non-image file must never stop a batch: `discover` reports what it
cannot use as `Skipped`, and `decode_image` turns every decoding failure into `ImageError`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from simsearch.config import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV
from simsearch.errors import ImageError, InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".png",
        ".gif",
        ".bmp",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    }
)

# Only the decoders for the formats above (JPEG also opens multi-picture camera files as MPO);
# a file named .jpg that is really, say, EPS must not reach Ghostscript.
_PILLOW_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")

_CHUNK = 1 << 20
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO for reading must not wait
_WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True, slots=True)
class FileEntry:
    """An image file found by `discover`, with what is needed to tell whether it changed."""

    path: str  # absolute (os.path.abspath), not symlink-resolved
    size: int  # bytes (of the target, for a symlink to a file)
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Skipped:
    """A file `discover` or a later stage could not use, and why."""

    path: str  # printable: undecodable bytes of a file name are shown escaped
    reason: str  # one line: what is wrong and, where possible, what to do


@dataclass(frozen=True, slots=True)
class EncodedJpeg:
    """A JPEG's bytes, checked from its header, for a GPU to decode."""

    data: bytes
    width: int  # after EXIF orientation, as DecodedImage reports it
    height: int
    orientation: int = 1  # EXIF orientation (1-8) for the decoder to apply; 1: as stored


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """An RGB image ready for a model, with the size of the original for display."""

    image: Image.Image  # mode "RGB", possibly reduced by JPEG draft mode
    width: int  # full-resolution width after EXIF orientation
    height: int  # full-resolution height after EXIF orientation


# ---------------------------------------------------------------------------------------------
# discovery


def discover(
    roots: Iterable[str | os.PathLike[str]],
    *,
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> Iterator[FileEntry | Skipped]:
    """Every image file under the roots, recursively, in sorted (deterministic) order.

    Stat-only (no file is opened) so re-indexing an unchanged tree is cheap. Missing roots raise
    `InputError` at once, before anything is yielded.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]  # a single path, not an iterable of characters
    root_paths = sorted({os.path.abspath(os.fspath(r)) for r in roots})
    for root in root_paths:
        if not os.path.lexists(root):
            raise InputError(f"{printable_path(root)}: no such file or folder; check the path")
    excluded = _Excluded(exclude)
    return _discover(root_paths, excluded)


def printable_path(path: str) -> str:
    """The path with bytes that are not UTF-8 shown as escapes, so it can be printed or stored."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


class _Excluded:
    """Folders to leave out, matched by path and by identity (a root may be reached by a link)."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        self.paths: set[str] = set()
        self.ids: set[tuple[int, int]] = set()
        for p in paths:
            path = os.path.abspath(os.fspath(p))
            self.paths.add(path)
            try:
                st = os.stat(path)
            except OSError:
                continue
            self.ids.add((st.st_dev, st.st_ino))

    def __bool__(self) -> bool:
        return bool(self.paths)

    def contains(self, path: str, st: os.stat_result | None) -> bool:
        if path in self.paths:
            return True
        return st is not None and (st.st_dev, st.st_ino) in self.ids


def _discover(root_paths: list[str], excluded: _Excluded) -> Iterator[FileEntry | Skipped]:
    # A folder sorts as "name/" so that the output is in the order of the full path strings.
    kinds = []
    for root in root_paths:
        is_dir = os.path.isdir(root)
        kinds.append((root + os.sep if is_dir else root, root, is_dir))
    kinds.sort()

    seen_files: set[str] = set()
    seen_dirs: set[tuple[int, int]] = set()
    for _key, root, is_dir in kinds:
        if is_dir:
            try:
                st = os.stat(root)
            except OSError as exc:
                raise InputError(
                    f"{printable_path(root)}: cannot read it: {_os_reason(exc)}"
                ) from exc
            if excluded and excluded.contains(root, st):
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen_dirs:
                continue
            seen_dirs.add(ident)
            for item in _walk(root, excluded):
                if isinstance(item, FileEntry):
                    if item.path in seen_files:
                        continue
                    seen_files.add(item.path)
                yield item
        else:
            if root in seen_files or (excluded and excluded.contains(root, None)):
                continue
            seen_files.add(root)
            name = os.path.basename(root)
            if not _has_image_extension(name):
                yield Skipped(
                    printable_path(root),
                    "not an image file name: the extension must be one of "
                    + ", ".join(sorted(IMAGE_EXTENSIONS)),
                )
                continue
            yield _classify(root, name, os.path.islink(root), lambda p=root: os.stat(p))


def _walk(root: str, excluded: _Excluded) -> Iterator[FileEntry | Skipped]:
    """Depth-first over one folder tree; hidden names and folder symlinks are left out."""
    try:
        first = _sorted_entries(root)
    except OSError as exc:
        raise InputError(
            f"{printable_path(root)}: cannot list this folder: {_os_reason(exc)}"
        ) from exc
    stack: list[Iterator[os.DirEntry[str]]] = [iter(first)]
    while stack:
        for entry in stack[-1]:
            name = entry.name
            if name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                if excluded:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        st = None
                    if excluded.contains(entry.path, st):
                        continue
                try:
                    children = _sorted_entries(entry.path)
                except OSError as exc:
                    yield Skipped(
                        printable_path(entry.path),
                        f"cannot list this folder: {_os_reason(exc)}; its images are left out",
                    )
                    continue
                stack.append(iter(children))
                break
            if not _has_image_extension(name):
                continue
            if excluded and entry.path in excluded.paths:
                continue
            is_link = entry.is_symlink()
            if is_link and _is_dir_link(entry):
                logger.debug("not following the symbolic link to a folder %r", entry.path)
                continue
            yield _classify(entry.path, name, is_link, entry.stat)
        else:
            stack.pop()


def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        entries = list(it)
    entries.sort(key=_entry_key)
    return entries


def _entry_key(entry: os.DirEntry[str]) -> str:
    try:
        is_dir = entry.is_dir(follow_symlinks=False)
    except OSError:
        is_dir = False
    return entry.name + "/" if is_dir else entry.name


def _is_dir_link(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _classify(
    path: str, name: str, is_link: bool, stat_fn: Callable[[], os.stat_result]
) -> FileEntry | Skipped:
    """A FileEntry for a usable regular file, else Skipped with the reason; never opens it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            what = "the file name"
            fix = "rename the file"
        else:
            what = "a folder name in its path"
            fix = "rename the folder"
        return Skipped(
            printable_path(path),
            f"{what} is not valid UTF-8; {fix} (for example with convmv) so it can be stored",
        )
    try:
        st = stat_fn()
    except FileNotFoundError as exc:
        if is_link:
            return Skipped(path, "broken symbolic link: its target does not exist")
        return Skipped(path, f"the file disappeared during the scan: {_os_reason(exc)}")
    except OSError as exc:
        return Skipped(path, f"cannot read its status: {_os_reason(exc)}")
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        return Skipped(path, f"not a regular file ({_file_kind(mode)}); only files are indexed")
    if st.st_size == 0:
        return Skipped(path, "empty file (0 bytes)")
    return FileEntry(path, st.st_size, st.st_mtime_ns)


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a plain file"


def _os_reason(exc: OSError) -> str:
    """'[Errno 13] Permission denied', without the file name the caller already shows."""
    if exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return _one_line(str(exc)) or type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# fingerprinting


def sha1_file(path: str | os.PathLike[str]) -> str:
    """SHA-1 hex of the file bytes (ImageSpace identifies images by it); streamed in 1 MiB chunks.

    Raises OSError when the file cannot be read, including when it is not a regular file (a FIFO
    named like an image is refused at once instead of blocking).
    """
    digest = hashlib.sha1(usedforsecurity=False)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with _open_regular_file(path) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


class _NotRegularFileError(OSError):
    """A FIFO, device, socket or folder where a file was expected."""


def _open_regular_file(path: str | os.PathLike[str]) -> io.BufferedReader:
    """Open for reading without ever blocking on a FIFO or device named like an image."""
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _NotRegularFileError(f"not a regular file ({_file_kind(mode)})")
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# ---------------------------------------------------------------------------------------------
# decoding


def decode_image(
    source: str | os.PathLike[str] | bytes | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int | None = None,
) -> DecodedImage:
    """Decode one image safely: bad files raise ImageError with the reason, never anything else.

    The pixel limit is checked on the header, before any pixel data is decoded. With `min_size`,
    a JPEG is decoded at the smallest DCT scale whose both sides stay >= min_size (much faster
    for photos that will be shrunk anyway).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty file (0 bytes)")
        return _decode_stream(io.BytesIO(source), max_pixels, min_size)
    if isinstance(source, (str, os.PathLike)):
        try:
            f = _open_regular_file(source)
        except _NotRegularFileError as exc:
            raise ImageError(str(exc)) from exc
        except OSError as exc:
            raise ImageError(f"cannot read the file: {_os_reason(exc)}") from exc
        with f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ImageError("empty file (0 bytes)")
            return _decode_stream(f, max_pixels, min_size)
    return _decode_stream(source, max_pixels, min_size)


def read_jpeg(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> EncodedJpeg | None:
    """The bytes of a plain, complete RGB or grey JPEG within the pixel limit, else None.

    For decoding on a GPU (nvJPEG): only its header is parsed here. Anything else, including a
    file with no end-of-image marker (likely truncated), is left to `decode_image`, which
    decodes it or says why it cannot.
    """
    Image.MAX_IMAGE_PIXELS = None  # our limit governs, as in _decode_stream
    try:
        with _open_regular_file(path) as f:
            with Image.open(f, formats=("JPEG",)) as img:  # the header only
                width, height = img.size
                if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                    return None
                if not 0 < width * height <= max_pixels:
                    return None
                orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            f.seek(0)
            data = f.read()
    except Exception:  # decode_image will give the reason
        return None
    if not data.rstrip(b"\0\r\n").endswith(b"\xff\xd9"):
        return None
    if orientation not in range(1, 9):
        orientation = 1  # as exif_transpose: an unknown value means no rotation
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
        width, height = height, width
    return EncodedJpeg(data, width, height, orientation)


def _decode_stream(fp: BinaryIO, max_pixels: int, min_size: int | None) -> DecodedImage:
    # Our limit, checked on the header below, governs. Pillow's global check would otherwise
    # raise or warn first inside Image.open, with a limit the user cannot raise from the CLI.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(fp, formats=_PILLOW_FORMATS) as img:
            return _decode_opened(img, max_pixels, min_size)
    except ImageError:
        raise
    except Exception as exc:  # a bad file must never escape as anything else (MemoryError too)
        raise ImageError(_failure_reason(exc)) from exc


def _decode_opened(img: Image.Image, max_pixels: int, min_size: int | None) -> DecodedImage:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width} x {height})")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageError(
            f"image is {width} x {height} = {pixels:,} pixels, above the limit of "
            f"{max_pixels:,}; raise it with --max-pixels or {MAX_PIXELS_ENV} if you trust this file"
        )
    if min_size is not None and min_size > 0:
        img.draft("RGB", (min_size, min_size))  # only JPEG decoders act on it
    img.load()  # the first frame of an animation

    before = img.size
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:  # broken EXIF only costs the rotation
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
    if img.size != before:  # a 90 degree rotation (the sizes differ only then)
        width, height = height, width
    return DecodedImage(_to_rgb(img), width, height)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency over white and high bit depths scaled (not clipped) to 8 bits."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return _scale_to_8bit(img).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale as 8-bit "L", keeping the full range visible."""
    import numpy as np

    arr = np.asarray(img)
    if arr.ndim != 2:
        return img.convert("L")
    if img.mode.startswith("I;16"):
        out = arr.astype(np.float64) / 257.0
    else:
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            out = values * 255.0  # the usual [0, 1] float convention
        elif lo >= 0.0 and hi <= 255.0:
            out = values
        elif lo >= 0.0 and hi <= 65535.0:
            out = values / 257.0  # 16-bit data held in a 32-bit image
        else:
            out = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def _failure_reason(exc: BaseException) -> str:
    """A short human reason for a Pillow or I/O failure."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (Pillow cannot identify it)"
    if isinstance(exc, MemoryError):
        return "not enough memory to decode the image"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large: {_one_line(str(exc))}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot read the file: {_os_reason(exc)}"
    detail = _one_line(str(exc)) or type(exc).__name__
    return f"truncated or corrupt image data: {detail}"
