"""Tests for simsearch.images: discovery, fingerprints and safe decoding of good and bad files."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import struct
import warnings
import zlib
from pathlib import Path

import badfiles
import numpy as np
import pytest
from PIL import Image, ImageFile

from simsearch import images
from simsearch.config import DEFAULT_MAX_PIXELS
from simsearch.errors import ImageError, InputError
from simsearch.images import (
    IMAGE_EXTENSIONS,
    DecodedImage,
    FileEntry,
    Skipped,
    decode_image,
    discover,
    printable_path,
    read_jpeg,
    sha1_file,
)


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging forever if the code under test blocks (e.g. on a FIFO)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def paths(items) -> list[str]:
    return [item.path for item in items]


def only(items, kind):
    return [item for item in items if isinstance(item, kind)]


def touch_jpeg(path: Path, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    return badfiles.make_jpeg(path, seed=seed)


# ---------------------------------------------------------------------------------------------
# discover: what is found, in what order


def test_extensions_are_lower_case_with_a_dot():
    assert {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"} <= (
        IMAGE_EXTENSIONS
    )
    assert {".ppm", ".pgm", ".pbm", ".pnm"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


def test_discover_walks_recursively_in_sorted_path_order(tmp_path):
    expected = [
        touch_jpeg(tmp_path / name)
        for name in ("b.jpg", "b/c.jpg", "b/deeper/d.jpg", "b-c.jpg", "a.jpg", "z/y.jpg")
    ]
    found = list(discover([tmp_path]))
    assert all(isinstance(item, FileEntry) for item in found)
    assert paths(found) == sorted(expected)
    assert paths(found) == paths(discover([tmp_path]))  # deterministic


def test_discover_matches_extensions_case_insensitively(tmp_path):
    wanted = [
        touch_jpeg(tmp_path / name)
        for name in ("one.JPG", "two.JpEg", "three.jpe", "four.PNG", "five.TIFF", "six.Pgm")
    ]
    for name in ("notes.txt", "noextension", "photo.jpg.bak", "jpg", "archive.JPG.zip"):
        (tmp_path / name).write_bytes(b"x")
    assert paths(discover([tmp_path])) == sorted(wanted)


def test_file_entry_has_absolute_path_size_and_mtime(tmp_path, monkeypatch):
    path = Path(touch_jpeg(tmp_path / "photos" / "a.jpg"))
    monkeypatch.chdir(tmp_path)
    [entry] = discover(["photos"])
    st = path.stat()
    assert entry == FileEntry(str(path), st.st_size, st.st_mtime_ns)
    assert os.path.isabs(entry.path)


def test_hidden_files_and_folders_are_skipped_silently(tmp_path):
    kept = touch_jpeg(tmp_path / "kept.jpg")
    touch_jpeg(tmp_path / ".hidden.jpg")
    touch_jpeg(tmp_path / ".thumbnails" / "t.jpg")
    touch_jpeg(tmp_path / "sub" / ".cache" / "c.jpg")
    assert list(discover([tmp_path])) == [FileEntry(kept, *_size_mtime(kept))]


def test_an_explicit_hidden_root_is_walked(tmp_path):
    inside = touch_jpeg(tmp_path / ".trip" / "a.jpg")
    assert paths(discover([tmp_path / ".trip"])) == [inside]


def test_excluded_folders_are_skipped_silently(tmp_path):
    kept = touch_jpeg(tmp_path / "photos" / "a.jpg")
    store = tmp_path / "photos" / "store"
    touch_jpeg(store / "thumbs" / "t.jpg")
    assert paths(discover([tmp_path / "photos"], exclude=[store])) == [kept]
    assert paths(discover([tmp_path / "photos"], exclude=[str(store)])) == [kept]


def test_exclude_matches_a_folder_reached_through_a_linked_root(tmp_path):
    real = tmp_path / "real"
    kept = touch_jpeg(real / "a.jpg")
    touch_jpeg(real / "store" / "t.jpg")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    found = paths(discover([link], exclude=[real / "store"]))
    assert found == [str(link / "a.jpg")]
    assert paths(discover([real], exclude=[link / "store"])) == [kept]


def test_a_root_that_is_excluded_yields_nothing(tmp_path):
    touch_jpeg(tmp_path / "store" / "a.jpg")
    assert list(discover([tmp_path / "store"], exclude=[tmp_path / "store"])) == []


def test_symlinks_to_folders_are_not_followed(tmp_path):
    root = tmp_path / "root"
    kept = touch_jpeg(root / "a.jpg")
    touch_jpeg(tmp_path / "elsewhere" / "b.jpg")
    (root / "to_elsewhere").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a cycle
    (root / "dir_link.jpg").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with deadline(5):
        assert paths(discover([root])) == [kept]


def test_symlinks_to_files_are_followed_and_keep_the_link_path(tmp_path):
    target = Path(badfiles.make_jpeg(tmp_path / "target.jpg", size=(80, 60)))
    root = tmp_path / "root"
    root.mkdir()
    link = root / "link.jpg"
    link.symlink_to(target)
    [entry] = discover([root])
    st = target.stat()
    assert entry == FileEntry(str(link), st.st_size, st.st_mtime_ns)
    assert entry.size != os.lstat(link).st_size  # the target's size, not the link's


def test_roots_are_deduplicated_and_files_reported_once(tmp_path):
    a = touch_jpeg(tmp_path / "a.jpg")
    b = touch_jpeg(tmp_path / "sub" / "b.jpg")
    roots = [tmp_path, str(tmp_path), tmp_path / "sub", Path(b), f"{tmp_path}/sub/../sub/"]
    assert paths(discover(roots)) == [a, b]


def test_the_same_folder_through_two_paths_is_walked_once(tmp_path):
    touch_jpeg(tmp_path / "real" / "a.jpg")
    link = tmp_path / "other"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    # the first root in sorted order wins
    assert paths(discover([tmp_path / "real", link])) == [str(link / "a.jpg")]


def test_a_single_file_root(tmp_path):
    path = touch_jpeg(tmp_path / "photo.JPG")
    assert paths(discover([path])) == [path]
    assert paths(discover(path)) == [path]  # a lone path is not iterated character by character


def test_a_single_file_root_without_an_image_extension_is_skipped_with_a_reason(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello", encoding="utf-8")
    [item] = discover([path])
    assert isinstance(item, Skipped)
    assert item.path == str(path)
    assert "not an image file name" in item.reason and ".jpg" in item.reason


def test_a_missing_root_raises_input_error_naming_it_before_iterating(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="nope: no such file or folder"):
        discover([tmp_path, missing])  # no next() needed


def test_discover_is_stat_only_and_never_opens_files(tmp_path, monkeypatch):
    touch_jpeg(tmp_path / "a.jpg")
    touch_jpeg(tmp_path / "s" / "b.png")

    def refuse(*args, **kwargs):
        raise AssertionError("discover opened a file")

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr("builtins.open", refuse)
    assert len(only(discover([tmp_path]), FileEntry)) == 2


def test_discover_finds_every_file_of_many_folders_in_order(tmp_path):
    for d in range(10):
        sub = tmp_path / f"d{d}"
        sub.mkdir()
        for i in range(200):
            (sub / f"img{i:03d}.jpg").write_bytes(b"\xff")
    found = only(list(discover([tmp_path])), FileEntry)
    assert len(found) == 2000
    assert [f.path for f in found] == sorted(f.path for f in found)


# ---------------------------------------------------------------------------------------------
# discover: what is reported as Skipped, and why


def test_broken_symlink_is_skipped_with_its_reason(tmp_path):
    path = badfiles.broken_symlink(tmp_path)
    expected = [Skipped(path, "broken symbolic link: its target does not exist")]
    assert list(discover([tmp_path])) == expected
    assert list(discover([path])) == expected  # as a root: it exists, as a link


def test_fifo_named_like_an_image_is_skipped_without_blocking(tmp_path):
    path = badfiles.fifo_named_jpg(tmp_path)
    with deadline(5):
        [item] = discover([tmp_path])
        [as_root] = discover([path])
    assert item == as_root
    assert isinstance(item, Skipped) and item.path == path
    assert "not a regular file" in item.reason and "FIFO" in item.reason


def test_zero_byte_file_is_skipped(tmp_path):
    path = badfiles.zero_byte(tmp_path)
    assert list(discover([tmp_path])) == [Skipped(path, "empty file (0 bytes)")]


def test_non_utf8_file_name_is_skipped_with_a_printable_path(tmp_path):
    raw = badfiles.non_utf8_name(tmp_path)
    [item] = discover([tmp_path])
    assert isinstance(item, Skipped)
    assert item.path == f"{tmp_path}/caf\\xe9.jpg"
    item.path.encode("utf-8")  # printable: no surrogates left
    assert "not valid UTF-8" in item.reason and "rename the file" in item.reason
    assert raw != item.path


def test_non_utf8_folder_name_is_skipped_with_a_reason(tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"v\xe9los")
    os.mkdir(folder)
    badfiles.make_jpeg(os.fsdecode(os.path.join(folder, b"ok.jpg")))
    [item] = discover([tmp_path])
    assert isinstance(item, Skipped)
    assert item.path == f"{tmp_path}/v\\xe9los/ok.jpg"
    assert "folder name" in item.reason and "rename the folder" in item.reason


def test_stat_errors_are_skipped_with_the_os_reason(tmp_path):
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)  # stat fails with ELOOP
    [item] = discover([tmp_path])
    assert isinstance(item, Skipped) and item.path == str(loop)
    assert item.reason.startswith("cannot read its status: [Errno")
    assert "symbolic links" in item.reason


def test_an_unreadable_subfolder_is_reported_and_the_rest_still_found(tmp_path, monkeypatch):
    a = touch_jpeg(tmp_path / "a.jpg")
    z = touch_jpeg(tmp_path / "z.jpg")
    locked = tmp_path / "locked"
    touch_jpeg(locked / "secret.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root can read anything, so simulate it
    found = list(discover([tmp_path]))
    assert found[0].path == a and found[-1].path == z
    [skipped] = only(found, Skipped)
    assert skipped.path == str(locked)
    assert skipped.reason.startswith("cannot list this folder: [Errno 13] Permission denied")


def test_every_bad_kind_together_never_stops_discovery(tmp_path):
    good = touch_jpeg(tmp_path / "good.jpg")
    bad = [
        badfiles.zero_byte(tmp_path),
        badfiles.broken_symlink(tmp_path),
        badfiles.fifo_named_jpg(tmp_path),
        badfiles.non_utf8_name(tmp_path),
    ]
    truncated = badfiles.truncated_jpeg(tmp_path)  # found: only decoding can tell it is bad
    with deadline(5):
        found = list(discover([tmp_path]))
    assert sorted(paths(only(found, FileEntry))) == sorted([good, truncated])
    assert len(only(found, Skipped)) == len(bad)
    assert all(s.reason and "\n" not in s.reason for s in only(found, Skipped))


def test_printable_path():
    assert printable_path("/a/b.jpg") == "/a/b.jpg"
    assert printable_path(os.fsdecode(b"/a/caf\xe9.jpg")) == "/a/caf\\xe9.jpg"


# ---------------------------------------------------------------------------------------------
# sha1_file


@pytest.mark.parametrize("size", [1, 1 << 20, (5 << 19) + 3])  # one byte, one chunk, 2.5 chunks
def test_sha1_file_matches_hashlib(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.jpg"
    path.write_bytes(data)
    assert sha1_file(path) == hashlib.sha1(data).hexdigest()
    assert sha1_file(str(path)) == hashlib.sha1(data).hexdigest()


def test_sha1_of_a_jpeg_and_of_an_empty_file(tmp_path):
    path = badfiles.make_jpeg(tmp_path / "a.jpg")
    assert sha1_file(path) == hashlib.sha1(Path(path).read_bytes()).hexdigest()
    assert sha1_file(badfiles.zero_byte(tmp_path)) == hashlib.sha1(b"").hexdigest()


def test_sha1_file_refuses_a_fifo_without_blocking(tmp_path):
    with deadline(5), pytest.raises(OSError, match="not a regular file"):
        sha1_file(badfiles.fifo_named_jpg(tmp_path))


def test_sha1_file_of_a_missing_file_raises_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        sha1_file(tmp_path / "missing.jpg")


# ---------------------------------------------------------------------------------------------
# decode_image: modes and formats


def rgb(decoded: DecodedImage, xy: tuple[int, int]) -> tuple[int, int, int]:
    return decoded.image.getpixel(xy)


def close_to(actual, expected, tolerance=12) -> bool:
    return all(abs(int(a) - int(e)) <= tolerance for a, e in zip(actual, expected, strict=True))


def test_decode_a_jpeg(tmp_path):
    path = badfiles.make_jpeg(tmp_path / "a.jpg", size=(64, 48))
    decoded = decode_image(path)
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (64, 48)
    assert (decoded.width, decoded.height) == (64, 48)
    reference = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(np.asarray(decoded.image), reference)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".webp", ".tif", ".ppm", ".gif"])
def test_decode_every_supported_format(tmp_path, suffix):
    path = badfiles.make_image(tmp_path / f"a{suffix}", size=(40, 30), seed=3)
    decoded = decode_image(path)
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == decoded.image.size == (40, 30)


def test_bytes_and_file_objects_are_accepted(tmp_path):
    data = badfiles.jpeg_bytes(size=(30, 20))
    from_bytes = decode_image(data)
    from_stream = decode_image(io.BytesIO(data))
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    from_path = decode_image(path)
    for decoded in (from_bytes, from_stream, from_path):
        assert decoded.image.size == (30, 20)
    assert np.array_equal(np.asarray(from_bytes.image), np.asarray(from_path.image))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    decoded = decode_image(badfiles.cmyk_jpeg(tmp_path))
    assert decoded.image.mode == "RGB"
    assert close_to(rgb(decoded, (5, 5)), (255, 0, 0))


def test_rgba_is_composited_over_white(tmp_path):
    decoded = decode_image(badfiles.rgba_png(tmp_path))
    assert decoded.image.mode == "RGB"
    assert rgb(decoded, (2, 2)) == (255, 0, 0)  # opaque red stays red
    assert rgb(decoded, (30, 2)) == (255, 255, 255)  # transparent black becomes white


def test_half_transparent_pixels_are_blended_with_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert close_to(rgb(decode_image(buffer.getvalue()), (1, 1)), (127, 127, 127), 2)


def test_palette_transparency_is_composited_over_white(tmp_path):
    decoded = decode_image(badfiles.palette_png(tmp_path))
    assert decoded.image.mode == "RGB"
    assert rgb(decoded, (2, 2)) == (0, 0, 255)
    assert rgb(decoded, (30, 2)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "1", "LA", "P", "RGBA"])
def test_other_modes_become_rgb(mode):
    image = Image.new("RGB", (8, 6), (255, 255, 255)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue())
    assert decoded.image.mode == "RGB"
    assert rgb(decoded, (0, 0)) == (255, 255, 255)


def test_ycbcr_jpeg_stays_rgb_and_grey_jpeg_becomes_rgb():
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 100).save(buffer, format="JPEG")
    decoded = decode_image(buffer.getvalue(), min_size=4)
    assert decoded.image.mode == "RGB"
    assert close_to(rgb(decoded, (3, 3)), (100, 100, 100), 2)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    decoded = decode_image(badfiles.grey16_png(tmp_path))
    grey = np.asarray(decoded.image)[0, :, 0]
    assert np.array_equal(grey, np.arange(256))  # column x held x * 257


def test_16_bit_big_endian_and_32_bit_int_grey_are_scaled():
    pgm = b"P5 4 1 65535\n" + np.array([0, 257, 32896, 65535], dtype=">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode in ("I", "I;16B")
    decoded = decode_image(pgm)
    assert np.asarray(decoded.image)[0, :, 0].tolist() == [0, 1, 128, 255]

    big_endian = Image.fromarray(np.array([[0, 65535]], dtype=">u2"))
    assert big_endian.mode == "I;16B"
    buffer = io.BytesIO()
    big_endian.save(buffer, format="TIFF")
    assert np.asarray(decode_image(buffer.getvalue()).image)[0, :, 0].tolist() == [0, 255]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # [0, 1] floats
        ([-1.0, 0.0, 3.0], [0, 64, 255]),  # any other range: stretched
        ([0.0, 100.0, 200.0], [0, 100, 200]),  # already 8-bit values
    ],
)
def test_float_grey_is_scaled(values, expected):
    image = Image.fromarray(np.array([values], dtype=np.float32))
    assert image.mode == "F"
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    assert np.asarray(decode_image(buffer.getvalue()).image)[0, :, 0].tolist() == expected


def test_animated_gif_uses_the_first_frame(tmp_path):
    decoded = decode_image(badfiles.animated_gif(tmp_path))
    assert decoded.image.mode == "RGB"
    assert rgb(decoded, (8, 8)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_png_and_webp_use_the_first_frame(fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 200, 0), (200, 0, 0), (0, 0, 200))]
    buffer = io.BytesIO()
    frames[0].save(
        buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True
    )
    decoded = decode_image(buffer.getvalue())
    assert decoded.image.size == (16, 16)
    assert close_to(rgb(decoded, (8, 8)), (0, 200, 0), 3)


# ---------------------------------------------------------------------------------------------
# decode_image: EXIF orientation and JPEG draft mode


def test_exif_orientation_is_applied_and_reported_in_the_size(tmp_path):
    decoded = decode_image(badfiles.exif_rotated_jpeg(tmp_path))
    assert decoded.image.size == (48, 64)
    assert (decoded.width, decoded.height) == (48, 64)
    assert close_to(rgb(decoded, (44, 3)), (255, 0, 0))  # top-left corner turned to top-right
    assert close_to(rgb(decoded, (3, 3)), (0, 0, 255))


def test_exif_orientation_with_draft_mode(tmp_path):
    decoded = decode_image(badfiles.exif_rotated_jpeg(tmp_path), min_size=16)
    assert decoded.image.size == (24, 32)  # stored 64 x 48 decoded at 1/2, then turned
    assert (decoded.width, decoded.height) == (48, 64)


def test_broken_exif_falls_back_to_no_rotation(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(images.ImageOps, "exif_transpose", broken)
    decoded = decode_image(badfiles.exif_rotated_jpeg(tmp_path))
    assert decoded.image.size == (64, 48)
    assert (decoded.width, decoded.height) == (64, 48)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's own warning, not our concern
def test_garbage_exif_bytes_do_not_stop_decoding():
    buffer = io.BytesIO()
    garbage = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x01" * 40
    Image.new("RGB", (20, 10), (9, 9, 9)).save(buffer, format="JPEG", exif=garbage)
    decoded = decode_image(buffer.getvalue())
    assert (decoded.width, decoded.height) == decoded.image.size == (20, 10)


def test_draft_mode_decodes_large_jpegs_smaller_but_not_below_min_size(tmp_path):
    path = badfiles.make_jpeg(tmp_path / "big.jpg", size=(1200, 900))
    decoded = decode_image(path, min_size=224)
    w, h = decoded.image.size
    assert (w, h) == (300, 225)  # 1/4 scale: 1/8 would give 150 x 113, below 224
    assert min(w, h) >= 224
    assert (decoded.width, decoded.height) == (1200, 900)
    assert decode_image(path).image.size == (1200, 900)
    assert decode_image(path, min_size=100).image.size == (150, 113)  # 1/8 is enough here


def test_draft_mode_keeps_small_jpegs_and_other_formats_whole(tmp_path):
    small = badfiles.make_jpeg(tmp_path / "small.jpg", size=(300, 200))
    assert decode_image(small, min_size=224).image.size == (300, 200)
    png = badfiles.make_png(tmp_path / "big.png", size=(1000, 800))
    assert decode_image(png, min_size=224).image.size == (1000, 800)


# ---------------------------------------------------------------------------------------------
# read_jpeg: bytes for a GPU to decode, only for plain complete JPEGs


def test_read_jpeg_returns_the_bytes_and_the_size_without_decoding(tmp_path, monkeypatch):
    path = badfiles.make_jpeg(tmp_path / "a.jpg", size=(64, 48))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    jpeg = read_jpeg(path)
    assert jpeg is not None
    assert jpeg.data == Path(path).read_bytes()
    assert (jpeg.width, jpeg.height, jpeg.orientation) == (64, 48, 1)


def test_read_jpeg_reports_the_size_after_exif_orientation_as_decode_image_does(tmp_path):
    path = badfiles.exif_rotated_jpeg(tmp_path)
    jpeg = read_jpeg(path)
    decoded = decode_image(path)
    assert jpeg is not None and (jpeg.width, jpeg.height) == (decoded.width, decoded.height)
    assert (jpeg.width, jpeg.height) == (48, 64)
    assert jpeg.orientation == 6  # for the device to apply, as torchvision does not there


def test_read_jpeg_leaves_everything_unusual_to_decode_image(tmp_path):
    """Truncated, CMYK, over the pixel limit, not a JPEG, unreadable: None, never an error."""
    d = tmp_path
    ok = badfiles.make_jpeg(d / "ok.jpg", size=(40, 30))
    assert read_jpeg(ok, max_pixels=40 * 30) is not None
    assert read_jpeg(ok, max_pixels=40 * 30 - 1) is None
    for path in (
        badfiles.truncated_jpeg(d),
        badfiles.cmyk_jpeg(d),
        badfiles.make_png(d / "p.png"),
        badfiles.make_png(d / "png-named.jpg"),
        badfiles.text_named_jpg(d),
        badfiles.zero_byte(d),
        str(d / "missing.jpg"),
        str(d),
    ):
        assert read_jpeg(path) is None, path
    with deadline(5):
        assert read_jpeg(badfiles.fifo_named_jpg(d)) is None


def test_read_jpeg_accepts_trailing_padding_after_the_end_marker(tmp_path):
    path = tmp_path / "padded.jpg"
    path.write_bytes(badfiles.jpeg_bytes() + b"\0\0\r\n")
    assert read_jpeg(path) is not None


# ---------------------------------------------------------------------------------------------
# decode_image: the pixel limit


def test_huge_image_is_refused_from_its_header(tmp_path, monkeypatch):
    path = badfiles.huge_png(tmp_path)
    assert os.path.getsize(path) < 1_000_000

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as info:
        decode_image(path)
    assert str(info.value) == (
        "image is 30000 x 30000 = 900,000,000 pixels, above the limit of 100,000,000; "
        "raise it with --max-pixels or SIMSEARCH_MAX_PIXELS if you trust this file"
    )
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_pixel_limit_is_checked_before_any_pixel_data_is_read(tmp_path):
    data = Path(badfiles.huge_png(tmp_path)).read_bytes()
    idat = data.index(b"IDAT") - 4
    garbage = b"not zlib at all"
    chunk = struct.pack(">I", len(garbage)) + b"IDAT" + garbage
    chunk += struct.pack(">I", zlib.crc32(b"IDAT" + garbage))
    corrupt = data[:idat] + chunk + data[-12:]  # IEND kept
    with pytest.raises(ImageError, match="30000 x 30000"):
        decode_image(corrupt)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(corrupt, max_pixels=10**9)  # only then are the pixels read


def test_pixel_limit_boundary(tmp_path):
    path = badfiles.make_jpeg(tmp_path / "a.jpg", size=(64, 48))
    assert decode_image(path, max_pixels=64 * 48).image.size == (64, 48)
    with pytest.raises(ImageError, match=r"64 x 48 = 3,072 pixels, above the limit of 3,071"):
        decode_image(path, max_pixels=64 * 48 - 1)


def test_our_limit_governs_not_pillows(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would refuse 64 x 48
    path = badfiles.make_jpeg(tmp_path / "a.jpg", size=(64, 48))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(path).image.size == (64, 48)
        with pytest.raises(ImageError, match="900,000,000 pixels"):
            decode_image(badfiles.huge_png(tmp_path))


# ---------------------------------------------------------------------------------------------
# decode_image: bad files become ImageError with a reason


def test_truncated_jpeg_fails_instead_of_decoding_half_grey(tmp_path):
    with pytest.raises(ImageError, match=r"^truncated or corrupt image data: image file is trunc"):
        decode_image(badfiles.truncated_jpeg(tmp_path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match=r"^not an image \(Pillow cannot identify it\)$"):
        decode_image(badfiles.text_named_jpg(tmp_path))


def test_zero_byte_file_and_empty_bytes(tmp_path):
    with pytest.raises(ImageError, match=r"^empty file \(0 bytes\)$"):
        decode_image(badfiles.zero_byte(tmp_path))
    with pytest.raises(ImageError, match=r"^empty file \(0 bytes\)$"):
        decode_image(b"")


def test_missing_file_cannot_be_read(tmp_path):
    with pytest.raises(ImageError, match=r"^cannot read the file: \[Errno 2\] No such file"):
        decode_image(tmp_path / "missing.jpg")


def test_fifo_and_folder_are_refused_without_blocking(tmp_path):
    with deadline(5), pytest.raises(ImageError, match="not a regular file .*FIFO"):
        decode_image(badfiles.fifo_named_jpg(tmp_path))
    with pytest.raises(ImageError, match="not a regular file .*folder"):
        decode_image(tmp_path)


def test_non_utf8_named_file_still_decodes_by_its_path(tmp_path):
    decoded = decode_image(badfiles.non_utf8_name(tmp_path))
    assert decoded.image.size == (64, 48)


def test_formats_outside_the_image_extensions_are_refused():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto\nshowpage\n"
    with pytest.raises(ImageError, match="not an image"):
        decode_image(eps)  # never handed to Ghostscript


def test_corrupted_jpegs_only_ever_raise_image_error():
    data = badfiles.jpeg_bytes(size=(48, 32), seed=5)
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(60):
        damaged = bytearray(data)
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            damaged[position] = int(rng.integers(0, 256))
        cut = int(rng.integers(len(data) // 4, len(data) + 1))
        try:
            decoded = decode_image(bytes(damaged[:cut]), min_size=8)
        except ImageError as exc:
            assert str(exc) and "\n" not in str(exc)
            outcomes.add("error")
        else:
            assert decoded.image.mode == "RGB"
            outcomes.add("ok")
    assert "error" in outcomes


def test_memory_error_becomes_image_error(monkeypatch):
    data = badfiles.jpeg_bytes()

    def exhausted(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", exhausted)
    with pytest.raises(ImageError, match="^not enough memory to decode the image$"):
        decode_image(data)


# ---------------------------------------------------------------------------------------------
# badfiles itself: the helpers other tests rely on


def test_different_seeds_give_visibly_different_images():
    a = np.asarray(badfiles.photo_like(seed=0), dtype=np.int16)
    b = np.asarray(badfiles.photo_like(seed=1), dtype=np.int16)
    assert np.abs(a - b).mean() > 20
    assert np.array_equal(a, np.asarray(badfiles.photo_like(seed=0), dtype=np.int16))


def _size_mtime(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
