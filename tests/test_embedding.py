"""Batched inference from files to unit vectors: order, failures, workers, devices, precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from badfiles import make_jpeg, make_png, text_named_jpg, truncated_jpeg, zero_byte
from PIL import Image

from simsearch import embedding
from simsearch.embedding import (
    Embedder,
    EmbedResult,
    choose_device,
    choose_precision,
    cpu_supports_bf16,
    prepare_image,
)
from simsearch.errors import InputError
from simsearch.images import decode_image
from simsearch.model import BASELINE_MODEL, load_model

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "images"


@pytest.fixture(scope="module")
def model():
    return load_model(BASELINE_MODEL)


@pytest.fixture(scope="module")
def embedder(model):
    return Embedder(model, device="cpu", precision="fp32")


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    """Good JPEGs and PNGs with bad files among them, two bad ones side by side."""
    d = tmp_path
    return [
        make_jpeg(d / "a.jpg", size=(64, 48), seed=1),
        make_png(d / "b.png", size=(48, 64), seed=2),
        text_named_jpg(d),
        truncated_jpeg(d),
        make_jpeg(d / "c.jpg", size=(64, 64), seed=3, color=(10, 200, 30)),
        zero_byte(d),
        make_png(d / "d.png", size=(80, 40), seed=4),
        make_jpeg(d / "e.jpg", size=(40, 80), seed=5, color=(30, 30, 220)),
    ]


BAD = {2: "not an image", 3: "truncated", 5: "empty file"}


def _flatten(batches) -> list[EmbedResult]:
    return [result for batch in batches for result in batch]


def test_embed_files_keeps_order_and_records_bad_files(embedder, files):
    batches = list(embedder.embed_files(files, batch_size=2, workers=0))
    assert [len(b) for b in batches] == [2, 2, 2, 2]  # the all-bad batch is still yielded
    results = _flatten(batches)
    assert [r.position for r in results] == list(range(len(files)))
    assert [r.path for r in results] == files
    sizes = {0: (64, 48), 1: (48, 64), 4: (64, 64), 6: (80, 40), 7: (40, 80)}
    for r in results:
        if r.position in BAD:
            assert r.vector is None and r.width is None and r.height is None
            assert BAD[r.position] in r.error
        else:
            assert r.error is None
            assert (r.width, r.height) == sizes[r.position]
            assert r.vector.shape == (embedder.dim,) and r.vector.dtype == np.float32
            assert abs(float(np.linalg.norm(r.vector)) - 1.0) < 1e-5
    good = np.stack([r.vector for r in results if r.vector is not None])
    assert np.abs(good @ good.T - np.eye(len(good))).max() > 0.01  # distinct images differ


def test_worker_processes_give_identical_vectors(embedder, files):
    serial = _flatten(embedder.embed_files(files, batch_size=3, workers=0))
    parallel = _flatten(embedder.embed_files(files, batch_size=3, workers=2))
    assert [r.position for r in parallel] == list(range(len(files)))
    for a, b in zip(serial, parallel, strict=True):
        assert (a.path, a.error, a.width, a.height) == (b.path, b.error, b.width, b.height)
        if a.vector is None:
            assert b.vector is None
        else:
            np.testing.assert_array_equal(a.vector, b.vector)


def test_embed_images_equals_embed_files(embedder, files):
    good = [files[i] for i in (0, 1, 4)]
    from_files = np.stack([r.vector for r in _flatten(embedder.embed_files(good, workers=0))])
    images = [decode_image(p, min_size=embedder.input_size).image for p in good]
    np.testing.assert_allclose(embedder.embed_images(images), from_files, atol=1e-5)
    assert embedder.embed_images([]).shape == (0, embedder.dim)


def test_embedder_describes_its_model(embedder, model):
    assert embedder.model_id == model.model_id
    assert embedder.spec == BASELINE_MODEL
    assert embedder.dim == 1280
    assert embedder.device == torch.device("cpu") and embedder.precision == "fp32"
    assert not embedder.device_jpeg and not embedder.compiled  # GPU decoding is for CUDA only
    assert list(embedder.embed_files([])) == []
    with pytest.raises(InputError, match="batch size must be at least 1"):
        embedder.embed_files(["x.jpg"], batch_size=0)


def test_default_workers_depend_on_job_size(monkeypatch):
    monkeypatch.setattr(embedding.os, "cpu_count", lambda: 16)
    assert embedding.default_workers(10, batch_size=32) == 0
    assert embedding.default_workers(64, batch_size=32) == 4
    monkeypatch.setattr(embedding.os, "cpu_count", lambda: 2)
    assert embedding.default_workers(1000, batch_size=32) == 2


def test_prepare_image_resizes_the_shorter_side_and_crops_the_centre():
    # red | green | blue thirds: the centre crop of a 3:1 image is exactly the green third
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    x = prepare_image(image, 224)
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8
    assert x[1].float().mean() > 250 and x[0].float().mean() < 5 and x[2].float().mean() < 5
    grey = prepare_image(Image.new("L", (30, 20), 128), 64)
    assert grey.shape == (3, 64, 64) and torch.all(grey == 128)
    # a thin panorama is cropped before it is scaled, never blown up to 224 x 2,240,000
    panorama = prepare_image(Image.new("RGB", (20_000, 2), (9, 99, 199)), 224)
    assert torch.equal(panorama[:, 0, 0], torch.tensor([9, 99, 199], dtype=torch.uint8))


def test_choose_device(monkeypatch):
    assert choose_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(embedding, "_mps_available", lambda: False)
    assert choose_device(None) == torch.device("cpu")
    with pytest.raises(InputError, match="no CUDA GPU is available; use cpu"):
        choose_device("cuda")
    with pytest.raises(InputError, match="mps was asked for"):
        choose_device("mps")
    with pytest.raises(InputError, match="unknown device 'gpu'; choose one of cpu, cuda, mps"):
        choose_device("gpu")
    monkeypatch.setattr(embedding, "_mps_available", lambda: True)
    assert choose_device(None) == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device(None) == torch.device("cuda")  # cuda before mps


def test_choose_precision(monkeypatch):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    monkeypatch.setattr(embedding, "cpu_supports_bf16", lambda: True)
    assert choose_precision(cpu) == "bf16"
    monkeypatch.setattr(embedding, "cpu_supports_bf16", lambda: False)
    assert choose_precision(cpu) == "fp32"
    assert choose_precision(cpu, "bf16") == "bf16"  # asked for explicitly: emulated but allowed
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision(cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision(cuda) == "fp16"
    assert choose_precision(mps) == "fp32"
    assert choose_precision(cuda, "fp32") == "fp32"
    with pytest.raises(InputError, match="unknown precision 'int8'; choose one of auto, bf16"):
        choose_precision(cpu, "int8")
    with pytest.raises(InputError, match="fp16 is not supported on cpu"):
        choose_precision(cpu, "fp16")


def test_bf16_nearest_neighbours_match_fp32(model):
    """The issue's check that bf16 autocast does not change search results on sample photos.

    bf16 moves cosine similarities by up to ~0.02, so neighbours whose fp32 similarities are
    closer than that (near ties among unrelated photos) may swap. The test therefore requires
    that each of bf16's top-3 neighbours is, by fp32's own measure, within 0.01 of fp32's
    neighbour at the same rank, and that clear neighbours (variants of one photo) agree exactly.
    """
    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX), so auto never uses bf16")
    paths = sorted(str(p) for p in SAMPLES.glob("*.jpg"))
    assert len(paths) >= 8, f"expected the sample photos in {SAMPLES}"
    vectors = {}
    for precision in ("fp32", "bf16"):
        embedder = Embedder(model, device="cpu", precision=precision)
        results = _flatten(embedder.embed_files(paths, batch_size=16, workers=0))
        assert all(r.error is None for r in results)
        vectors[precision] = np.stack([r.vector for r in results])
    assert np.einsum("ij,ij->i", vectors["fp32"], vectors["bf16"]).min() > 0.99

    sims = {p: v @ v.T for p, v in vectors.items()}
    for s in sims.values():
        np.fill_diagonal(s, -np.inf)
    top = {p: np.argsort(-s, axis=1, kind="stable")[:, :3] for p, s in sims.items()}
    exact = sims["fp32"]
    for i in range(len(paths)):
        for rank in range(3):
            ours, theirs = top["bf16"][i, rank], top["fp32"][i, rank]
            assert exact[i, ours] >= exact[i, theirs] - 0.01, (paths[i], rank)

    names = [Path(p).stem for p in paths]
    for a, b in [
        ("chelsea", "chelsea-crop"),
        ("rocket", "rocket-flipped"),
        ("coffee", "coffee-small-recompressed"),
        ("ladybird", "ladybird-crop"),
    ]:
        i, j = names.index(a), names.index(b)
        for p in ("fp32", "bf16"):
            assert top[p][i, 0] == j and top[p][j, 0] == i, (p, a, b)


# -- reduced decoding ---------------------------------------------------------------------------
def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_reduced_decoding_is_big_enough_and_embeds_like_a_full_decode(embedder, tmp_path):
    """JPEG draft mode and reduce-first resizing: fast, and the vectors do not notice."""
    size = embedder.input_size
    jpeg = make_jpeg(tmp_path / "big.jpg", size=(1600, 1200), seed=7)
    reduced = decode_image(jpeg, min_size=size).image
    assert reduced.size[0] < 1600 and min(reduced.size) >= size  # decoded smaller, not too small
    png = make_png(tmp_path / "big.png", size=(1200, 1000), seed=8)
    results = _flatten(embedder.embed_files([jpeg, png], workers=0))
    for result, path in zip(results, (jpeg, png), strict=True):
        full = Image.open(path).convert("RGB")  # every pixel, then one exact bicubic resize
        side = min(full.size)
        box = ((full.width - side) / 2, (full.height - side) / 2)
        box = (*box, box[0] + side, box[1] + side)
        exact = full.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
        assert _cosine(result.vector, embedder.embed_images([exact])[0]) > 0.99, path


def test_prepare_image_is_contiguous_channels_first():
    x = prepare_image(Image.new("RGB", (50, 40), (1, 2, 3)), 32)
    assert x.shape == (3, 32, 32) and x.is_contiguous()
    assert x[:, 5, 5].tolist() == [1, 2, 3]


# -- the worker pipeline ------------------------------------------------------------------------
@pytest.fixture
def many_files(tmp_path: Path) -> list[str]:
    """21 files, bad ones at the start, the end and side by side, JPEGs and PNGs mixed."""
    d = tmp_path
    out = [truncated_jpeg(d, "t0.jpg")]
    for i in range(1, 20):
        if i in (6, 7):
            out.append(text_named_jpg(d, f"n{i}.jpg"))
        elif i % 3:
            out.append(make_jpeg(d / f"j{i}.jpg", size=(40 + i, 60), seed=i))
        else:
            out.append(make_png(d / f"p{i}.png", size=(60, 40 + i), seed=i))
    out.append(zero_byte(d, "z20.jpg"))
    return out


@pytest.mark.parametrize(("workers", "batch_size"), [(1, 5), (2, 5), (2, 20), (2, 64)])
def test_workers_keep_positions_order_and_failures(embedder, many_files, monkeypatch, workers,
                                                   batch_size):  # fmt: skip
    """workers=1 decodes in a worker process for this process's network; 2 or more are threads
    that decode and embed."""
    monkeypatch.setattr(embedding.os, "cpu_count", lambda: 2)  # the same modes on any machine
    serial = list(embedder.embed_files(many_files, batch_size=batch_size, workers=0))
    batches = list(embedder.embed_files(many_files, batch_size=batch_size, workers=workers))
    n = len(many_files)
    expected = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    assert [len(b) for b in batches] == [len(b) for b in serial] == expected
    results = _flatten(batches)
    assert [r.position for r in results] == list(range(n))
    assert [r.path for r in results] == many_files
    bad = {0: "truncated", 6: "not an image", 7: "not an image", 20: "empty file"}
    assert {r.position for r in results if r.vector is None} == set(bad)
    for a, b in zip(_flatten(serial), results, strict=True):
        assert (a.error, a.width, a.height) == (b.error, b.width, b.height)
        if a.position in bad:
            assert bad[a.position] in b.error
        else:
            np.testing.assert_allclose(a.vector, b.vector, atol=1e-6)


def test_worker_threads_stop_with_the_caller_and_restore_torch_threads(
    embedder, many_files, monkeypatch
):
    import threading

    monkeypatch.setattr(embedding.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    job = embedder.embed_files(many_files, batch_size=4, workers=2)
    first = next(job)
    assert torch.get_num_threads() == 1  # while the job runs: each op whole on its thread
    job.close()  # the caller stops early: queued units are dropped, the threads end
    assert torch.get_num_threads() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("simsearch-embed")]
    assert [r.position for r in first] == [0, 1, 2, 3]
    # Jobs that overlap (threads of one process) restore the count from before the first.
    one, two = (embedder.embed_files(many_files, batch_size=4, workers=2) for _ in range(2))
    next(one), next(two)
    one.close()
    assert torch.get_num_threads() == 1  # the second still runs
    two.close()
    assert torch.get_num_threads() == before


def test_plan_job_for_each_device():
    """Where the network runs and who decodes, for CPUs small and big, GPUs, compiled nets."""
    plan = embedding.plan_job
    cpu2 = plan("cpu", 1000, 32, cores=2)
    assert (cpu2.workers, cpu2.unit, cpu2.network_in_workers, cpu2.pin_memory) == (
        2,
        16,
        True,
        False,
    )
    assert plan("cpu", 20, 32, cores=2).workers == 0  # small: all here, no processes to start
    one = plan("cpu", 1000, 32, workers=1, cores=2)  # one decoder feeding this process
    assert (one.workers, one.unit, one.network_in_workers) == (1, 32, False)
    assert plan("cpu", 1000, 32, workers=0, cores=2).workers == 0
    big = plan("cpu", 1000, 32, cores=32)
    assert (big.workers, big.unit, big.network_in_workers) == (6, 32, False)
    compiled = plan("cpu", 1000, 32, compiled=True, cores=2)
    assert (compiled.workers, compiled.network_in_workers) == (2, False)
    gpu = plan("cuda", 1000, 64, cores=16)
    assert (gpu.workers, gpu.unit, gpu.network_in_workers, gpu.pin_memory) == (8, 64, False, True)
    assert plan("mps", 1000, 64, cores=8).network_in_workers is False


def test_inference_workers(monkeypatch):
    monkeypatch.setattr(embedding.os, "cpu_count", lambda: 2)
    assert embedding.inference_workers(10, 16) == 0  # too small to pay for processes
    assert embedding.inference_workers(1000, 16) == 2  # one per core, each embedding
    assert embedding.inference_workers(1000, 32, "cuda") == 1
    monkeypatch.setattr(embedding.os, "cpu_count", lambda: 1)
    assert embedding.inference_workers(1000, 16) == 0
    monkeypatch.setattr(embedding.os, "cpu_count", lambda: 32)
    assert embedding.inference_workers(1000, 16) == 6  # decoders for this process's threads
    assert embedding.inference_workers(1000, 32, "cuda") == 2 * embedding.MAX_WORKERS


# -- torch.compile ------------------------------------------------------------------------------
def test_choose_compile():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    big = embedding.COMPILE_MIN_IMAGES
    assert not embedding.choose_compile(cpu, "auto", 10 * big)  # never repaid on CPUs here
    assert not embedding.choose_compile(cuda, "auto", big - 1)
    assert embedding.choose_compile(cuda, "auto", big)
    assert embedding.choose_compile(cpu, "on", 1) and not embedding.choose_compile(cuda, "off", big)
    with pytest.raises(InputError, match="unknown compile mode 'yes'; choose one of auto, on, off"):
        embedding.choose_compile(cpu, "yes", 1)


@pytest.fixture(scope="module")
def compiling(model):
    """An Embedder that compiles every job (what each test's torch.compile does varies)."""
    return Embedder(model, device="cpu", precision="fp32", compile="on")


@pytest.mark.parametrize("failure", ["absent", "at compile", "at first call"])
def test_compile_failures_fall_back_to_the_eager_network(
    compiling, embedder, files, monkeypatch, failure
):
    def broken_compile(net, **kwargs):
        if failure == "at compile":
            raise RuntimeError("no C++ compiler")

        def compiled(x):
            raise RuntimeError("inductor crashed")

        return compiled

    if failure == "absent":
        monkeypatch.delattr(torch, "compile")
    else:
        monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(compiling, "_runner", embedding._Runner(
        compiling._runner.net, compiling.device, compiling.precision, compiling.micro_batch
    ))  # fmt: skip
    got = _flatten(compiling.embed_files(files, batch_size=3, workers=0))
    want = _flatten(embedder.embed_files(files, batch_size=3, workers=0))
    assert not compiling.compiled
    for a, b in zip(got, want, strict=True):
        assert (a.position, a.error) == (b.position, b.error)
        if a.vector is not None:
            np.testing.assert_allclose(a.vector, b.vector, atol=1e-5)


def test_a_compiled_network_always_sees_one_batch_size(compiling, embedder, files, monkeypatch):
    sizes = []

    def fake_compile(net, **kwargs):
        def compiled(x):
            sizes.append(x.shape[0])
            return net(x)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(compiling, "_runner", embedding._Runner(
        compiling._runner.net, compiling.device, compiling.precision, compiling.micro_batch
    ))  # fmt: skip
    got = _flatten(compiling.embed_files(files, batch_size=4, workers=2))
    assert compiling.compiled
    assert len(set(sizes)) == 1 and len(sizes) >= 2  # the short last batch was padded
    want = _flatten(embedder.embed_files(files, batch_size=4, workers=0))
    for a, b in zip(got, want, strict=True):
        assert (a.position, a.error) == (b.position, b.error)
        if a.vector is not None:
            np.testing.assert_allclose(a.vector, b.vector, atol=1e-5)


# -- the GPU path, run on the CPU ---------------------------------------------------------------
def test_device_jpeg_decoding_path_gives_the_same_results(embedder, files, monkeypatch):
    """The CUDA path (JPEG bytes from the workers, decoded by torchvision) with device=cpu."""
    want = _flatten(embedder.embed_files(files, batch_size=3, workers=0))
    monkeypatch.setattr(embedder, "device_jpeg", True)
    for workers in (0, 1):
        got = _flatten(embedder.embed_files(files, batch_size=3, workers=workers))
        assert [r.position for r in got] == list(range(len(files)))
        for a, b in zip(got, want, strict=True):
            assert (a.path, a.error, a.width, a.height) == (b.path, b.error, b.width, b.height)
            if a.vector is not None:
                assert _cosine(a.vector, b.vector) > 0.99


def test_device_jpeg_falls_back_to_the_cpu_for_what_the_device_cannot_decode(
    embedder, tmp_path, monkeypatch
):
    good = make_jpeg(tmp_path / "good.jpg", size=(50, 40), seed=1)
    other = make_jpeg(tmp_path / "other.jpg", size=(50, 40), seed=2)
    want = _flatten(embedder.embed_files([good, other], workers=0))
    real = embedding.decode_jpegs

    def half_broken(datas, *args):
        out = real(datas, *args)
        return [None, *out[1:]]  # the first could not be decoded on the device

    monkeypatch.setattr(embedder, "device_jpeg", True)
    monkeypatch.setattr(embedding, "decode_jpegs", half_broken)
    got = _flatten(embedder.embed_files([good, other], workers=0))
    np.testing.assert_allclose(got[0].vector, want[0].vector, atol=1e-6)  # the CPU decoded it
    assert _cosine(got[1].vector, want[1].vector) > 0.99


def test_decode_jpegs_and_crop_resize():
    from badfiles import jpeg_bytes

    data = torch.frombuffer(bytearray(jpeg_bytes(size=(96, 32), seed=3)), dtype=torch.uint8)
    garbage = torch.frombuffer(bytearray(b"\xff\xd8 not really a jpeg \xff\xd9"), dtype=torch.uint8)
    out = embedding.decode_jpegs([data, garbage, data], torch.device("cpu"), 24)
    assert out[1] is None
    assert out[0].shape == (3, 24, 24) and out[0].dtype == torch.uint8
    assert torch.equal(out[0], out[2])
    # the centre square, like prepare_image: red | green | blue thirds give green
    image = torch.zeros(3, 10, 30, dtype=torch.uint8)
    image[0, :, :10], image[1, :, 10:20], image[2, :, 20:] = 255, 255, 255
    crop = embedding.crop_resize(image, 20)
    assert crop.shape == (3, 20, 20) and crop[1].float().mean() > 250 and crop[0].max() < 5
    assert torch.equal(embedding.crop_resize(image, 10), image[:, :, 10:20])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_as_pillow_does(orientation):
    from PIL import ImageOps

    rng = np.random.default_rng(orientation)
    image = Image.fromarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    want = np.asarray(ImageOps.exif_transpose(image))
    got = embedding.orient(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), orientation)
    np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), want)


def test_device_decoding_applies_exif_orientation(tmp_path):
    from badfiles import exif_rotated_jpeg

    from simsearch.images import read_jpeg

    path = exif_rotated_jpeg(tmp_path)
    jpeg = read_jpeg(path)
    assert jpeg is not None and jpeg.orientation == 6
    data = torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8)
    [crop] = embedding.decode_jpegs([data], torch.device("cpu"), 48, [jpeg.orientation])
    want = embedding._prepare_array(decode_image(path).image, 48)  # Pillow, EXIF applied
    diff = np.abs(crop.permute(1, 2, 0).numpy().astype(int) - want.astype(int))
    assert diff.mean() < 4  # the red corner in the same place: unturned, it differs by ~19
