"""The copy-detection edits: RGB out, visibly different, size rules, deterministic from a seed."""

from __future__ import annotations

import numpy as np
import pytest
from badfiles import photo_like
from PIL import Image

from simsearch.edits import COMBO, EDITS, KINDS, MIN_CROP_AREA, MIN_SIDE, edit_image, make_copies
from simsearch.errors import InputError

SIZE = (160, 120)
SAME_SIZE = {"rotate", "hflip", "vflip", "jpeg", "color", "greyscale", "blur", "text", "logo"}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return photo_like(SIZE, seed=3)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_kinds_are_every_single_edit_and_combinations():
    assert set(KINDS) == set(EDITS) | {COMBO}
    assert len(KINDS) == len(set(KINDS)) == 13


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(5))
def test_every_edit_gives_a_different_rgb_image_and_leaves_the_input(image, kind, seed):
    before = pixels(image).copy()
    out = edit_image(image, kind, np.random.default_rng(seed))
    assert out.mode == "RGB"
    assert out.size[0] >= MIN_SIDE and out.size[1] >= MIN_SIDE
    if out.size == image.size:  # else it differs anyway; visibly: some pixels by more than 8
        assert (np.abs(pixels(out) - before).max(axis=2) > 8).mean() > 0.005
    assert np.array_equal(pixels(image), before)


@pytest.mark.parametrize("kind", sorted(SAME_SIZE))
def test_edits_that_keep_the_size(image, kind):
    assert edit_image(image, kind, np.random.default_rng(0)).size == SIZE


def test_crop_keeps_at_least_a_quarter_and_reaches_near_it(image):
    shares = []
    for seed in range(200):
        out = edit_image(image, "crop", np.random.default_rng(seed))
        assert out.size[0] <= SIZE[0] and out.size[1] <= SIZE[1]
        shares.append(out.size[0] * out.size[1] / (SIZE[0] * SIZE[1]))
    assert min(shares) >= MIN_CROP_AREA
    assert min(shares) < 0.3  # small crops do happen
    assert max(shares) < 0.85  # and a crop always removes something


def test_crop_is_a_window_of_the_original(image):
    out = edit_image(image, "crop", np.random.default_rng(1))
    big, small = pixels(image), pixels(out)
    h, w = small.shape[:2]
    found = any(
        np.array_equal(big[top : top + h, left : left + w], small)
        for top in range(SIZE[1] - h + 1)
        for left in range(SIZE[0] - w + 1)
    )
    assert found


def test_rotate90_turns_and_flips_mirror(image):
    sizes = {edit_image(image, "rotate90", np.random.default_rng(s)).size for s in range(20)}
    assert sizes == {(120, 160), (160, 120)}  # quarter turns swap the sides, half turns do not
    assert np.array_equal(
        pixels(edit_image(image, "hflip", np.random.default_rng(0))), pixels(image)[:, ::-1]
    )
    assert np.array_equal(
        pixels(edit_image(image, "vflip", np.random.default_rng(0))), pixels(image)[::-1]
    )


def test_greyscale_has_equal_channels(image):
    out = pixels(edit_image(image, "greyscale", np.random.default_rng(0)))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_downscale_shrinks_both_sides_but_not_below_the_minimum(image):
    for seed in range(30):
        w, h = edit_image(image, "downscale", np.random.default_rng(seed)).size
        assert MIN_SIDE <= w <= SIZE[0] // 2 and MIN_SIDE <= h <= SIZE[1] // 2
    tiny = photo_like((20, 20), seed=1)
    assert edit_image(tiny, "downscale", np.random.default_rng(0)).size == (MIN_SIDE, MIN_SIDE)


def test_overlays_change_only_part_of_the_picture(image):
    for kind in ("text", "logo"):
        changed = np.any(
            pixels(edit_image(image, kind, np.random.default_rng(2))) != pixels(image), axis=2
        )
        assert 0.005 < changed.mean() < 0.5, kind


@pytest.mark.parametrize("kind", KINDS)
def test_edits_are_deterministic_with_a_seed(image, kind):
    a = edit_image(image, kind, np.random.default_rng(42))
    b = edit_image(image, kind, np.random.default_rng(42))
    assert a.tobytes() == b.tobytes()


def test_different_seeds_give_different_combinations(image):
    outs = {edit_image(image, COMBO, np.random.default_rng(s)).tobytes() for s in range(10)}
    assert len(outs) == 10


def test_non_rgb_inputs_give_rgb(image):
    for mode in ("L", "RGBA", "P"):
        assert edit_image(image.convert(mode), "logo", np.random.default_rng(0)).mode == "RGB"


def test_unknown_kind_names_the_choices(image):
    with pytest.raises(InputError, match="choose one of crop"):
        edit_image(image, "sepia", np.random.default_rng(0))


def test_make_copies_uses_distinct_kinds_then_cycles_through_all(image):
    copies = make_copies(image, np.random.default_rng(0), 5)
    assert len(copies) == 5 and len({kind for kind, _ in copies}) == 5
    assert all(kind in KINDS and out.mode == "RGB" for kind, out in copies)
    many = make_copies(image, np.random.default_rng(0), 2 * len(KINDS))
    assert sorted(kind for kind, _ in many) == sorted(2 * list(KINDS))
    assert make_copies(image, np.random.default_rng(0), 0) == []
    with pytest.raises(InputError):
        make_copies(image, np.random.default_rng(0), -1)


def test_make_copies_is_deterministic_with_a_seed(image):
    a = make_copies(image, np.random.default_rng(7), 6)
    b = make_copies(image, np.random.default_rng(7), 6)
    assert [(k, i.tobytes()) for k, i in a] == [(k, i.tobytes()) for k, i in b]
