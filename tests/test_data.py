"""Data sets, splits and the preprocessing spec shared by training and serving."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from pipelines.config import DataConfig
from pipelines.data import DEBIAN_FASHION_MNIST, RawSplit, SplitDataset, describe_dataset, load_splits, make_spec
from pipelines.preprocess import ImageDecodeError, PreprocessSpec, decode_image


def test_digits_splits_are_seeded_disjoint_and_stratified():
    cfg = DataConfig(dataset="digits", seed=3)
    a, b = load_splits(cfg), load_splits(DataConfig(dataset="digits", seed=3))
    assert np.array_equal(a.test.labels, b.test.labels) and np.array_equal(a.train.images, b.train.images)
    sizes = len(a.train) + len(a.val) + len(a.test)
    assert sizes == 1797
    assert len(a.test) == pytest.approx(0.2 * 1797, abs=2) and len(a.val) == pytest.approx(0.1 * 1797, abs=2)
    from sklearn.datasets import load_digits

    everything = sorted(img.tobytes() for split in (a.train, a.val, a.test) for img in split.images)
    original = sorted(img.tobytes() for img in np.round(load_digits().images * (255 / 16)).astype(np.uint8))
    assert everything == original  # a partition: every image in exactly one split
    assert set(np.bincount(a.test.labels)) <= set(range(33, 40))  # every class ~36 times
    other = load_splits(DataConfig(dataset="digits", seed=4))
    assert not np.array_equal(a.test.labels, other.test.labels)


def test_describe_dataset_reports_training_statistics():
    info = describe_dataset(DataConfig(dataset="digits"))
    assert info.channels == 1 and info.class_names == tuple(str(i) for i in range(10))
    assert 0.2 < info.mean[0] < 0.4 and 0.3 < info.std[0] < 0.45
    assert info.background == 0  # white ink on black, like MNIST
    assert info.sizes["train"] + info.sizes["val"] + info.sizes["test"] == 1797


def test_a_class_of_one_image_stays_in_training_and_the_rest_stays_stratified():
    from pipelines.data import stratified_split

    labels = np.array([0] * 10 + [1] * 10 + [2])
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert 20 in keep  # held out, the model could never learn class 2
    held_per_class = np.bincount(labels[held], minlength=3).tolist()
    assert sum(held_per_class) == 5 and min(held_per_class[:2]) >= 2 and held_per_class[2] == 0
    assert sorted(np.concatenate([keep, held]).tolist()) == list(range(21))

def test_a_split_too_small_to_stratify_still_keeps_every_class_in_training():
    """100 classes of 3 images: 60 held out for test, fewer than the classes, so no stratified split; the plain
    random split it fell back to left a class with no training image in most seeds (its output never trained)."""
    from pipelines.data import stratified_split

    labels = np.repeat(np.arange(100), 3)
    for seed in range(20):
        keep, held = stratified_split(labels, 0.2, seed=seed)
        assert len(held) == 60 and sorted(np.concatenate([keep, held]).tolist()) == list(range(300))
        assert set(labels[keep]) == set(range(100)), seed
        # ... and after the validation split of what is kept, as image folders do (test, then validation)
        kept, _ = stratified_split(labels[keep], 0.125, seed=seed)
        assert set(labels[keep][kept]) == set(range(100)), seed
    with pytest.raises(ValueError, match="every class has a single one"):  # the image folder's "too few images"
        stratified_split(np.array([0, 1, 2]), 0.5, seed=0)


def test_a_long_tail_of_single_image_classes_leaves_a_two_image_class_one_to_train_on():
    """70 classes of one image (kept), one of 2 and two of 14: the 20% held out came all from the 30 others, and
    sklearn's stratified allocation held out both images of the 2-image class in every seed tried."""
    from pipelines.data import stratified_split

    labels = np.concatenate([np.arange(70), [70] * 2, [71] * 14, [72] * 14])
    for seed in range(20):
        keep, held = stratified_split(labels, 0.2, seed=seed)
        assert len(held) == int(np.ceil(0.2 * len(labels)))  # as many held out as asked
        assert sorted(np.concatenate([keep, held]).tolist()) == list(range(len(labels)))
        assert set(labels[keep]) == set(range(73)), seed  # every class has an image to train on


def test_a_fraction_holds_out_its_exact_share_despite_float_rounding():
    """0.07 of 600 is 42.00000000000001 in floats, and a validation split after the test split (0.1 / 0.9 of 63
    images) 7.000000000000001: each held out one image too many."""
    from pipelines.data import stratified_split

    for labels, fraction, expected in ((np.arange(600) % 6, 0.07, 42), (np.arange(63) % 3, 0.1 / (1 - 0.1), 7),
                                       (np.arange(61) % 2, 0.25, 16)):
        _, held = stratified_split(labels, fraction, seed=0)
        assert len(held) == expected, (fraction, len(labels))


def test_damaged_fashion_mnist_files_are_named(tmp_path):
    """A cut-off, non-gzip, empty or mismatched IDX file ended in EOFError, BadGzipFile, IndexError or a reshape
    error that named no file."""
    import gzip
    import shutil

    from pipelines.data import FASHION_MNIST_FILES, DataError

    def idx(shape, fill=0):
        header = b"\x00\x00\x08" + bytes([len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
        return header + bytes([fill]) * int(np.prod(shape))

    good = {"train_images": idx((12, 28, 28)), "train_labels": idx((12,)), "test_images": idx((4, 28, 28)),
            "test_labels": idx((4,))}
    damages = {"cut off": lambda raw: gzip.compress(raw)[:-20], "not gzip": lambda raw: raw[:-7],
               "empty": lambda raw: gzip.compress(b""), "short": lambda raw: gzip.compress(raw[:-5]),
               "no IDX": lambda raw: gzip.compress(b"PK\x03\x04" + raw)}
    for damage, damaged in damages.items():
        root = tmp_path / damage.replace(" ", "-")
        root.mkdir()
        for key, stem in FASHION_MNIST_FILES.items():
            raw = good[key]
            (root / f"{stem}.gz").write_bytes(damaged(raw) if key == "train_images" else gzip.compress(raw))
        with pytest.raises(DataError, match="train-images-idx3-ubyte.gz") as info:
            load_splits(DataConfig(dataset="fashion-mnist", root=str(root), download=False))
        # With data.root set, Debian's copy is never read: the fix is the root (installing it changed nothing).
        assert "check data.root, or unset it to read Debian's dataset-fashion-mnist" in str(info.value), damage
        assert "apt-get install" not in str(info.value), damage
    # An empty plain file beside a complete .gz (an interrupted `gunzip -k`) hid the .gz: "ends within its header".
    beside = tmp_path / "gunzip-stopped"
    shutil.copytree(tmp_path / "empty", beside)
    for key, stem in FASHION_MNIST_FILES.items():
        (beside / f"{stem}.gz").write_bytes(gzip.compress(good[key]))
    (beside / FASHION_MNIST_FILES["train_images"]).write_bytes(b"")
    assert len(load_splits(DataConfig(dataset="fashion-mnist", root=str(beside), download=False)).test) == 4
    both = tmp_path / "both-damaged"
    shutil.copytree(beside, both)
    (both / f"{FASHION_MNIST_FILES['train_images']}.gz").write_bytes(gzip.compress(good["train_images"])[:-20])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte and .*train-images-idx3-ubyte.gz are both damaged"):
        load_splits(DataConfig(dataset="fashion-mnist", root=str(both), download=False))
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tmp_path / "empty", mismatched)
    for key, stem in FASHION_MNIST_FILES.items():
        raw = idx((5,)) if key == "train_labels" else good[key]
        (mismatched / f"{stem}.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match="do not match"):
        load_splits(DataConfig(dataset="fashion-mnist", root=str(mismatched), download=False))
    # Another data set's label file of the right length (EMNIST-letters: 1-26): the first training step failed
    # with "Target 26 is out of bounds" (a device-side assert on a GPU).
    letters = tmp_path / "letters"
    shutil.copytree(mismatched, letters)
    (letters / f"{FASHION_MNIST_FILES['test_labels']}.gz").write_bytes(gzip.compress(idx((4,), fill=26)))
    (letters / f"{FASHION_MNIST_FILES['train_labels']}.gz").write_bytes(gzip.compress(good["train_labels"]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz holds label 26, but Fashion-MNIST has 10"):
        load_splits(DataConfig(dataset="fashion-mnist", root=str(letters), download=False))

    # Read by their content, not their names: complete plain files that keep a .gz (a browser unpacked the
    # download) were refused as "cut short", and a download again was the same file.
    unpacked = tmp_path / "unpacked" / "raw"  # under raw/: a data.root of torchvision's own .../FashionMNIST
    unpacked.mkdir(parents=True)
    for key, stem in FASHION_MNIST_FILES.items():
        (unpacked / f"{stem}.gz").write_bytes(good[key])
    assert len(load_splits(DataConfig(dataset="fashion-mnist", root=str(unpacked.parent), download=False)).test) == 4
    # The four under other names (a mirror's dots): named, with the names looked for, not just "not found"
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for key, stem in FASHION_MNIST_FILES.items():
        (renamed / stem.replace("-idx", ".idx")).write_bytes(good[key])
    for download in (False, True):  # (not passed over for a download beside them either)
        with pytest.raises(DataError, match=r"other names than Fashion-MNIST's four \(train-images-idx3-ubyte, .*: "
                                            r"t10k-images.idx3-ubyte, t10k-labels.idx1-ubyte, train-images.idx3-ubyte"):
            load_splits(DataConfig(dataset="fashion-mnist", root=str(renamed), download=download))


def test_train_subset_is_stratified():
    splits = load_splits(DataConfig(dataset="digits", train_subset=100))
    assert len(splits.train) == pytest.approx(100, abs=1)
    assert len(np.unique(splits.train.labels)) == 10
    # Exactly as many as asked for (every class present): ceil(k / n * n) took 24 of digits' 1257 for 23.
    for asked in (23, 59, 97, 113):
        assert len(load_splits(DataConfig(dataset="digits", train_subset=asked)).train) == asked


def test_channel_statistics_are_exact_without_a_float_copy_of_the_split():
    """describe_dataset took float64 copies of every training pixel (16 bytes a pixel at its peak: 2.2 GB for
    CIFAR-10); the integer sums give the same numbers to the digit it keeps, in chunks."""
    import tracemalloc

    from pipelines.data import _channel_stats

    images = np.random.default_rng(0).integers(0, 256, (8192, 16, 16, 3), dtype=np.uint8)
    tracemalloc.start()
    mean, std = _channel_stats(images, 3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * images.nbytes, f"{peak / 2**20:.1f} MiB for {images.nbytes / 2**20:.1f} MiB of images"
    pixels = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    grey = images[..., 0]
    assert _channel_stats(grey, 1)[0] == pytest.approx([grey.mean() / 255.0], abs=1e-12)


def test_an_image_folders_statistics_are_summed_image_by_image_not_stacked_in_float(tmp_path):
    """describe_dataset stacked its 256 sampled images at data.image_size and took float64 copies: 17 bytes a
    pixel, 3.3 GB at 512 pixels (13 GB at 1024) on the driver before anything ran. The sums give the numbers
    torch.std gave the stack (they are in the runs' fingerprints)."""
    root = tmp_path / "folder"
    _write_images(root, per_class=24)
    for i in range(0, 24, 3):  # some with transparency: their pixels differ on either background
        with Image.open(root / "cat" / f"{i}.png") as image:
            rgba = image.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.where(np.arange(480).reshape(20, 24) % 3 == 0, 0, 255).astype(np.uint8)))
        rgba.save(root / "cat" / f"{i}.png")
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=20)
    info = describe_dataset(cfg)
    splits = load_splits(cfg)
    spec = PreprocessSpec(20, 3, (0.0,) * 3, (1.0,) * 3, splits.class_names, background=info.background)
    stack = torch.stack([spec.image_to_uint8(splits.train.pil(i)) for i in range(len(splits.train))]).double() / 255
    assert info.mean == pytest.approx(stack.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert info.std == pytest.approx(stack.std(dim=(0, 2, 3)).tolist(), abs=1e-6)

    measure = (
        "import re, sys\n"
        "from pipelines.config import DataConfig\n"
        "from pipelines.data import describe_dataset\n"
        "status = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "describe_dataset(DataConfig(dataset='imagefolder', root=sys.argv[1], image_size=20))  # (first calls)\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = status('VmRSS')\n"
        "describe_dataset(DataConfig(dataset='imagefolder', root=sys.argv[1], image_size=384))\n"
        "print(status('VmHWM') - before)\n")
    peak_kib = int(subprocess.run([sys.executable, "-c", measure, str(root)], check=True, capture_output=True,
                                  text=True, timeout=120).stdout)
    # The sample at 384 pixels: 21 MB as uint8, 360 MB stacked in float64 (as it was)
    assert peak_kib < 100_000, f"{peak_kib / 1024:.0f} MB over the baseline"  # (35 MB now)


def test_data_too_big_to_convert_up_front_is_decoded_per_item_and_not_converted_to_share(monkeypatch):
    """CIFAR-10 at a 224 px input is 6.8 GB converted: every worker converted it up front (twice that at the
    peak), and the stage's shared cache converted it all before finding it too big to share."""
    import pipelines.data as data_module
    import pipelines.shared_data as shared_data
    from pipelines.data import convert_splits

    cfg = DataConfig(dataset="digits", image_size=16)
    splits, spec = load_splits(cfg), make_spec(describe_dataset(cfg), 16)
    up_front = SplitDataset(splits.val, spec)
    assert up_front.images is not None and up_front.images.shape == (len(splits.val), 1, 16, 16)
    shared = shared_data.converted_for_sharing(cfg, spec)
    assert shared["val"][0].shape == (len(splits.val), 1, 16, 16)
    assert np.array_equal(shared["val"][0], up_front.images.numpy())

    monkeypatch.setattr(data_module, "MAX_CONVERTED_BYTES", 16 * 16 * 100)  # 100 images
    per_item = SplitDataset(splits.val, spec)
    assert per_item.images is None and convert_splits(splits, spec) is None
    assert all(per_item[i][0].equal(up_front[i][0]) and per_item[i][1] == up_front[i][1] for i in range(len(per_item)))

    monkeypatch.setattr(shared_data, "MAX_SHARED_BYTES", 16 * 16 * 100)
    monkeypatch.setattr(shared_data, "convert_splits", lambda *_: pytest.fail("converted before sizing"))
    assert shared_data.converted_for_sharing(cfg, spec) is None


def test_the_example_image_decodes_no_more_than_it_needs(tmp_path, monkeypatch):
    """`serve` in a new process checked every file of an image folder (each decoded) to save one example image:
    minutes for a large folder before its hints were printed. (With data.skip_bad_files the check decides the
    split, so it is made; a file that does not open is passed over either way.)"""
    import pipelines.image_folder as image_folder
    from pipelines.data import load_splits, write_sample_image
    from pipelines.image_folder import check_image_folder

    _write_images(tmp_path / "images", per_class=12)
    for name in ("cat", "dog"):
        for i in range(12):
            if i % 2:
                (tmp_path / "images" / name / f"{i}.png").write_bytes(b"not a png")
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "images"), test_fraction=0.4)
    assert any(open(p, "rb").read(9) == b"not a png" for p in load_splits(cfg).test.paths)
    # With data.skip_bad_files the example is one of the test images training used (its split leaves them out).
    for seed in range(4):
        skipping = cfg.model_copy(update={"skip_bad_files": True, "seed": seed})
        test_images = {Image.open(p).tobytes() for p in load_splits(skipping, check_image_folder(skipping)).test.paths}
        with Image.open(write_sample_image(skipping, tmp_path / f"skipping{seed}")) as written:
            assert written.tobytes() in test_images, seed

    def check_every_file(cfg):
        raise AssertionError("every file of the folder checked for one example image")

    monkeypatch.setattr(image_folder, "check_image_folder", check_every_file)
    for tries in range(3):  # whichever test image comes first, a readable one is written
        cfg = cfg.model_copy(update={"seed": tries})
        with Image.open(write_sample_image(cfg, tmp_path / f"serve{tries}")) as written:
            assert written.size == (24, 20)


def test_the_example_image_is_written_whatever_the_mode_of_the_first_test_image(tmp_path):
    """A CMYK JPEG first in the test split: PNG cannot hold CMYK, and the example request after serving was
    silently left out. What serving makes of the example is what training makes of the image it stands for."""
    from pipelines.data import load_splits, write_sample_image
    from pipelines.preprocess import PreprocessSpec

    def served(sample: Path, spec: PreprocessSpec) -> torch.Tensor:
        return spec.image_to_uint8(decode_image(sample.read_bytes(), max_pixels=10_000_000))

    rgb = PreprocessSpec(image_size=16, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3, class_names=("cat", "dog"))
    noise = np.random.default_rng(0).integers(0, 256, (301, 203, 3), dtype=np.uint8)  # sides no multiple of 16
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(noise).convert("CMYK").save(tmp_path / "images" / name / f"{i}.jpg", exif=exif)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "images"), val_fraction=0.2, test_fraction=0.2)
    sample = write_sample_image(cfg, tmp_path / "serve")
    with Image.open(sample) as written:
        # The file itself (converted to RGB before the shrink, training converting after it, it was a grey level
        # off; as a TIFF with its orientation, turned upright as Pillow loads it, up to 19 grey levels)
        assert written.format == "JPEG" and written.mode == "CMYK" and sample.suffix == ".jpg"
    assert torch.equal(served(sample, rgb), rgb.image_to_uint8(load_splits(cfg).test.pil(0)))
    # Saved once, and found again by the next command's serving, the data set gone or not (only .png and .tiff
    # samples were, and every serve read the folder again for a .jpg one)
    from pipelines.config import load_config
    from pipelines.serve import example_image

    shutil.copytree(tmp_path / "images", tmp_path / "images-copy")
    served_cfg = load_config(None, [f"workdir={tmp_path / 'runs'}", "data.dataset=imagefolder",
                                    f"data.root={tmp_path / 'images-copy'}", "data.val_fraction=0.2",
                                    "data.test_fraction=0.2"])
    first = example_image(served_cfg, tmp_path / "serve-again")
    shutil.rmtree(tmp_path / "images-copy")
    assert first is not None and first.suffix == ".jpg" and example_image(served_cfg, tmp_path / "serve-again") == first

    # Phone photos: stored sideways with an EXIF orientation. Saved upright, the example went out shrunk on the
    # turned grid: pixels up to 7 grey levels off training's, which shrinks before turning it upright.
    for name in ("cat", "dog"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(noise).save(tmp_path / "photos" / name / f"{i}.jpg", exif=exif)
    cfg = cfg.model_copy(update={"root": str(tmp_path / "photos")})
    sample = write_sample_image(cfg, tmp_path / "serve-photos")
    trained = load_splits(cfg).test.pil(0)
    with Image.open(sample) as written:
        assert written.format == "PNG" and written.getexif()[0x0112] == 6  # shown upright by viewers too
    assert torch.equal(served(sample, rgb), rgb.image_to_uint8(trained))
    assert not torch.equal(rgb.image_to_uint8(trained), rgb.image_to_uint8(ImageOps.exif_transpose(trained)))

    # Float, big-endian 16-bit and 32-bit TIFFs: converted to RGB the example was all black or all white (what
    # the model got bore no relation to training's), and mode I could not be written as PNG (no example at all).
    spec = PreprocessSpec(image_size=16, channels=1, mean=(0.0,), std=(1.0,), class_names=("cat", "dog"))
    ramp = np.tile(np.linspace(0.0, 1.0, 24), (20, 1))
    for mode, pixels in (("F", ramp.astype(np.float32)), ("I;16B", (ramp * 60000).astype(">u2")),
                         ("I", (ramp * 2**20).astype(np.int32))):
        folder = tmp_path / f"wide-{mode}"
        for name in ("cat", "dog"):
            (folder / name).mkdir(parents=True)
            for i in range(6):
                image = Image.fromarray(pixels)
                assert image.mode == mode
                image.save(folder / name / f"{i}.tiff")
        cfg = cfg.model_copy(update={"root": str(folder)})
        sample = write_sample_image(cfg, tmp_path / f"serve-{mode}")
        trained = load_splits(cfg).test.pil(0)
        with Image.open(sample) as written:
            assert written.format == "TIFF", mode
            # What serving makes of the example is what training makes of the image it stands for.
            assert torch.equal(spec.image_to_uint8(written), spec.image_to_uint8(trained)), mode
    # A dark 16-bit PGM (mode I, scaled by 65535 in training) was written as a mode-I TIFF, which the server
    # scaled by its own peak: a mean pixel of 133 for training's 40
    folder = tmp_path / "pgm16"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray((ramp * 20000).astype(np.uint16)).save(folder / name / f"{i}.pgm")
    cfg = cfg.model_copy(update={"root": str(folder)})
    trained = load_splits(cfg).test.pil(0)
    assert trained.mode == "I" and trained.format == "PPM"
    with Image.open(write_sample_image(cfg, tmp_path / "serve-pgm16")) as written:
        assert torch.equal(spec.image_to_uint8(written), spec.image_to_uint8(trained))


def test_serving_never_downloads_a_data_set_for_its_example_image(make_config, tmp_path):
    """The `serve` command (from checkpoints: no data needed) wrote its example image from the data set, with
    its download setting: CIFAR-10 was fetched (or tried, offline) just for that. An earlier run's is kept."""
    from pipelines.serve import example_image

    empty = tmp_path / "cifar"
    empty.mkdir()
    cfg = make_config("data.dataset=cifar10", f"data.root={empty}", "data.download=true")
    assert example_image(cfg, tmp_path / "serve") is None
    assert list(empty.iterdir()) == []  # no download started (nor its lock)
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "sample-cifar10-cat.png").write_bytes(b"an earlier run's")
    (tmp_path / "serve" / "sample-digits-3.png").write_bytes(b"another data set's")
    assert example_image(cfg, tmp_path / "serve") == tmp_path / "serve" / "sample-cifar10-cat.png"


def test_train_subset_keeps_a_class_with_a_single_image(tmp_path):
    """The subset is the held-out side of a stratified split, where a class's only image never goes: the class
    was left without training images, though the docs promise it stays in training."""
    _write_images(tmp_path, classes=("ant", "bee", "cat"), per_class=20)
    for extra in range(1, 20):
        (tmp_path / "ant" / f"{extra}.png").unlink()  # one ant left
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), val_fraction=0.1, test_fraction=0.1)
    assert 0 in load_splits(cfg).train.labels
    subset = load_splits(cfg.model_copy(update={"train_subset": 12}))
    assert 0 in subset.train.labels and len(subset.train) == 13  # the 12 asked for, and the ant


def test_a_train_subset_smaller_than_the_class_count_still_trains_every_class(tmp_path):
    """Asked for fewer images than there are classes, the subset (the held-out side of a random split) left
    most classes without a single training image, and said nothing."""
    classes = tuple(f"class{i:02d}" for i in range(20))
    _write_images(tmp_path, classes=classes, per_class=5)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), val_fraction=0.2, test_fraction=0.2, train_subset=10)
    subset = load_splits(cfg)
    assert sorted(set(subset.train.labels.tolist())) == list(range(20)) and 20 <= len(subset.train) < 30


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_reads_the_debian_idx_files():
    cfg = DataConfig(dataset="fashion-mnist", download=False)
    splits = load_splits(cfg)
    assert len(splits.test) == 10_000 and len(splits.train) + len(splits.val) == 60_000
    assert splits.train.images.shape[1:] == (28, 28) and splits.class_names[9] == "Ankle boot"


def _write_images(root, classes=("cat", "dog"), per_class=6, mode="RGB"):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(array).convert(mode).save(root / name / f"{i}.png")


def test_imagefolder_flat_and_presplit(tmp_path):
    flat = tmp_path / "flat"
    _write_images(flat, per_class=10)
    splits = load_splits(DataConfig(dataset="imagefolder", root=str(flat), val_fraction=0.2, test_fraction=0.2))
    assert splits.class_names == ("cat", "dog") and splits.channels == 3
    assert len(splits.train) + len(splits.val) + len(splits.test) == 20
    presplit = tmp_path / "presplit"
    _write_images(presplit / "train", per_class=8)
    _write_images(presplit / "test", per_class=2)
    splits = load_splits(DataConfig(dataset="imagefolder", root=str(presplit), val_fraction=0.25))
    assert len(splits.test) == 4 and len(splits.train) == 12 and len(splits.val) == 4
    spec = make_spec(describe_dataset(DataConfig(dataset="imagefolder", root=str(presplit), image_size=16)), 16)
    image, label = SplitDataset(splits.train, spec, augment=True)[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label in (0, 1)


def test_an_image_folder_changed_since_it_was_read_is_read_again(tmp_path):
    """Splits are cached per process by config: a folder given a new class (in a notebook, between a long run's
    stages) was still planned with its old classes, while the workers read the new files."""
    from pipelines.image_folder import check_image_folder

    _write_images(tmp_path, per_class=6)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16)
    check_image_folder(cfg)
    assert describe_dataset(cfg).class_names == ("cat", "dog")
    _write_images(tmp_path, classes=("fox",), per_class=6)
    check_image_folder(cfg)  # each stage's first call
    assert describe_dataset(cfg).class_names == ("cat", "dog", "fox")
    assert len(load_splits(cfg).train) + len(load_splits(cfg).val) + len(load_splits(cfg).test) == 18
    fox = sorted((tmp_path / "fox").iterdir())
    hidden = tmp_path.parent / f"{tmp_path.name}-fox"
    (tmp_path / "fox").rename(hidden)  # back to the first content, which this process checked before
    check_image_folder(cfg)
    assert describe_dataset(cfg).class_names == ("cat", "dog") and len(fox) == 6


def test_checking_a_large_folder_keeps_a_window_of_files_in_flight(monkeypatch):
    """The check's thread pool was handed every path at once: a future per file before the first result (about
    2 KB each, 2.6 GB for ImageNet's 1.28 M files). Here 15,000 paths (the per-file check stubbed: this is about
    the bookkeeping around it), in the order given."""
    import tracemalloc

    from pipelines import image_folder

    monkeypatch.setattr(image_folder, "_checked", lambda path, decoders=None: (None, path[-40:]))
    paths = [f"/r/c/{i:07d}.png" for i in range(15_000)]
    tracemalloc.start()
    try:
        bad, digests = image_folder._find_unreadable(Path("/r"), paths)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not bad and list(digests) == paths
    assert peak < 10e6, f"{peak / 1e6:.0f} MB"  # every future at once: about 24 MB (2 MB as it is)


def test_a_search_on_an_image_folder_is_not_reused_or_resumed_once_its_files_changed(make_config, tmp_path):
    """The search knew its settings only: after an image folder changed, the finished search was reused, and an
    interrupted one resumed trials planned for the old files, which failed every retry (a new class: the
    checkpoints' heads; new images: their split sizes). The search now keeps what the folder held; the report
    and the train stage take the search as it was, without reading the folder (a report needs no data)."""
    from pipelines.image_folder import check_image_folder
    from pipelines.planning import data_content, search_fingerprint
    from pipelines.search import SearchResult, load_search_result

    folder = tmp_path / "images"
    _write_images(folder, per_class=6)
    cfg = make_config("data.dataset=imagefolder", f"data.root={folder}", "data.image_size=16")

    def content() -> str:
        check_image_folder(cfg.data)  # each stage's first call
        return data_content(describe_dataset(cfg.data))

    before = content()
    assert before and content() == before  # the same files: the same content
    SearchResult(best={"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "val_acc": 0.5}, trials=[], objective="val_acc",
                 phi=1.0, paper_included=True, fingerprint=search_fingerprint(cfg),
                 data_content=before).save(cfg.paths.search_result)
    assert load_search_result(cfg, before) is not None
    _write_images(folder, classes=("fox",), per_class=6)
    with_a_class = content()
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(folder / "fox" / "extra.png")
    with_an_image = content()
    assert len({before, with_a_class, with_an_image}) == 3
    assert load_search_result(cfg, with_an_image) is None  # the search stage searches again
    assert load_search_result(cfg) is not None  # the report and the train stage: the search as it was
    # The built-in data sets do not change: nothing to keep, and their searches' fingerprints stay as they were.
    digits = make_config()
    assert data_content(describe_dataset(digits.data)) == "" and search_fingerprint(digits) == "e1bf8027"


def test_common_split_layouts_are_read_as_splits_or_refused_never_read_as_classes(tmp_path):
    """Only a literal train/ switched to split folders: Kaggle's training_set/ and test_set/ became two classes
    (the model learnt which split an image came from), Roboflow's valid/ was ignored, and a flat folder with a
    class named train (a COCO category) was read as a split folder."""
    from pipelines.image_folder import ImageFolderError, check_image_folder

    kaggle = tmp_path / "kaggle"
    _write_images(kaggle / "training_set", per_class=8)
    _write_images(kaggle / "test_set", per_class=2)
    (kaggle / "test_set" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageFolderError, match="looks split"):  # before the files: not their list
        check_image_folder(DataConfig(dataset="imagefolder", root=str(kaggle)))
    with pytest.raises(ImageFolderError, match=r"looks split, but not into train/ val/ test/: test_set/, training_se"):
        load_splits(DataConfig(dataset="imagefolder", root=str(kaggle)))
    roboflow = tmp_path / "roboflow"
    for split, count in (("train", 8), ("valid", 3), ("test", 2)):
        _write_images(roboflow / split, per_class=count)
    cfg = DataConfig(dataset="imagefolder", root=str(roboflow), image_size=16)
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 6, 4)
    assert len(check_image_folder(cfg)) == 0 and describe_dataset(cfg).sizes == {"train": 16, "val": 6, "test": 4}
    for unread in ("Test", "testing", "validation"):  # beside train/ valid/ test/ or train/ valid/: never read
        odd = tmp_path / f"beside-{unread}"
        for split in ("train", "valid", unread) + (("test",) if unread == "validation" else ()):
            _write_images(odd / split, per_class=2)
        with pytest.raises(ImageFolderError, match=rf"comes split \(train/\), but {unread}/ would not be read"):
            check_image_folder(DataConfig(dataset="imagefolder", root=str(odd)))
    coco = tmp_path / "coco"
    _write_images(coco, classes=("bus", "train"), per_class=10)  # "train" holds images: a class
    splits = load_splits(DataConfig(dataset="imagefolder", root=str(coco), val_fraction=0.2, test_fraction=0.2))
    assert splits.class_names == ("bus", "train") and len(splits.train) + len(splits.val) + len(splits.test) == 20
    # Kaggle's dogs-vs-cats: train/*.jpg and test/*.jpg, the labels in the file names, test/ unlabelled. Read
    # as two classes, "test" and "train": a model of which split an image came from.
    unlabelled = tmp_path / "dogs-vs-cats"
    _write_images(unlabelled, classes=("train", "test"), per_class=8)
    with pytest.raises(ImageFolderError, match=r"test/, train/ with images directly in them"):
        check_image_folder(DataConfig(dataset="imagefolder", root=str(unlabelled)))
    # The same as Kaggle unpacks it (test1/), and COCO's train2017/ val2017/: a number after the split's name.
    for names in (("train", "test1"), ("train2017", "val2017")):
        numbered = tmp_path / "-".join(names)
        _write_images(numbered, classes=names, per_class=8)
        with pytest.raises(ImageFolderError, match=r"with images directly in them"):
            check_image_folder(DataConfig(dataset="imagefolder", root=str(numbered)))
    # A class named train/ whose images are sorted into folders (by year) made the folder read as split: trained
    # on the classes "2019" and "2020", every bus and car image left out without a word.
    vehicles = tmp_path / "vehicles"
    for name in ("bus", "car", "train"):
        for year in ("2019", "2020"):
            _write_images(vehicles / name, classes=(year,), per_class=4)
    with pytest.raises(ImageFolderError, match=r"read as split, as train/ holds folders \(the classes: 2019/, 2020/\), "
                                               r"but bus/, car/ beside it hold images that would not be read"):
        check_image_folder(DataConfig(dataset="imagefolder", root=str(vehicles)))
    # Still read as they were: numbered classes (one split's name with numbers is no split layout), extras
    # beside a split folder's val/ or test/ (STL-10's unlabeled/, a nested copy of the archive), a train/ beside
    # loose images with nothing held out.
    for classes in (("test1", "test2", "test3"), ("bus", "car", "train2")):
        numbered = tmp_path / "-".join(classes)
        _write_images(numbered, classes=classes, per_class=8)
        assert len(check_image_folder(DataConfig(dataset="imagefolder", root=str(numbered)))) == 0
    stl = tmp_path / "stl"
    for split, count in (("train", 8), ("test", 2)):
        _write_images(stl / split, per_class=count)
    _write_images(stl / "unlabeled", classes=("",), per_class=4)
    _write_images(stl / "copy", classes=("cat", "dog"), per_class=2)
    splits = load_splits(DataConfig(dataset="imagefolder", root=str(stl)))
    assert splits.class_names == ("cat", "dog") and len(splits.test) == 4
    mac = tmp_path / "zipped-on-a-mac"  # a folder of folders without images (an unzip's __MACOSX/): no class
    _write_images(mac / "train", per_class=8)
    (mac / "__MACOSX" / "train" / "cat").mkdir(parents=True)
    (mac / "__MACOSX" / "train" / "cat" / "._0.png").write_bytes(b"Mac OS X")
    assert len(check_image_folder(DataConfig(dataset="imagefolder", root=str(mac)))) == 0
    # Kaggle's dogs-vs-cats with train/ sorted into classes: its unlabelled test1/ is not read, as before (it was
    # refused, and renamed test/ as the message said, refused again for holding no class folders).
    dogs_vs_cats = tmp_path / "dogs-vs-cats-sorted"
    _write_images(dogs_vs_cats / "train", per_class=8)
    _write_images(dogs_vs_cats / "test1", classes=("",), per_class=4)
    assert load_splits(DataConfig(dataset="imagefolder", root=str(dogs_vs_cats))).class_names == ("cat", "dog")
    # Refused: a lone numbered split beside the classes (Kaggle's test1/ once train/ is sorted into classes), a
    # numbered split-like folder beside train/ and test/ (never read), flat classes beside a class named train/
    # holding folders (read as split: bus/ and car/ dropped).
    kaggle_sorted = tmp_path / "sorted"
    _write_images(kaggle_sorted, classes=("cat", "dog", "test1"), per_class=6)
    coco_like = tmp_path / "coco-like"
    for split in ("train", "test", "val2017"):
        _write_images(coco_like / split, per_class=3)
    flat = tmp_path / "flat-beside-train"
    _write_images(flat, classes=("bus", "car"), per_class=4)
    _write_images(flat / "train", classes=("2019", "2020"), per_class=4)
    for root, message in ((kaggle_sorted, "holds test1/ with images directly in it beside the class folders"),
                          (coco_like, r"comes split \(train/\), but val2017/ would not be read"),
                          (flat, "but bus/, car/ beside it hold images that would not be read")):
        with pytest.raises(ImageFolderError, match=message):
            check_image_folder(DataConfig(dataset="imagefolder", root=str(root)))
    # One unlabelled test/ of loose images beside the class folders became a class named "test", silently.
    beside = tmp_path / "unlabelled-test"
    _write_images(beside, classes=("cat", "dog", "bird"), per_class=6)
    _write_images(beside, classes=("test",), per_class=6)
    for read in (check_image_folder, load_splits):
        with pytest.raises(ImageFolderError, match=r"holds test/ with images directly in it beside the class folders"):
            read(DataConfig(dataset="imagefolder", root=str(beside)))
    # Empty train/ and test/ beside the classes are no classes: left out with a warning, as before.
    emptied = tmp_path / "emptied"
    _write_images(emptied, per_class=6)
    (emptied / "train").mkdir()
    (emptied / "test").mkdir()
    (emptied / "test" / "notes.txt").write_text("no images here")
    for split in ("train", "test"):
        (emptied / split / "._0.png").write_bytes(b"Mac OS X")  # hidden: no image either
    assert len(check_image_folder(DataConfig(dataset="imagefolder", root=str(emptied)))) == 0
    assert load_splits(DataConfig(dataset="imagefolder", root=str(emptied))).class_names == ("cat", "dog")


def test_training_and_serving_see_identical_pixels():
    """An in-memory training image and the same image sent as PNG to the server give the same input."""
    cfg = DataConfig(dataset="digits", image_size=16)
    splits = load_splits(cfg)
    spec = make_spec(describe_dataset(cfg), 16)
    dataset = SplitDataset(splits.test, spec)
    buffer = io.BytesIO()
    Image.fromarray(splits.test.images[0]).save(buffer, format="PNG")
    served = spec.image_to_uint8(decode_image(buffer.getvalue(), max_pixels=10_000))
    assert torch.equal(served, dataset[0][0])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_an_uncompressed_tiff_turned_by_its_exif_trains_on_the_pixels_the_server_sees(tmp_path, mode):
    """Opened by path, Pillow memory-mapped the file and read it with the turned width as its row stride
    (orientations 5-8): training and its mean/std saw diagonal stripes where the server saw the picture."""
    ramp = (np.arange(24 * 40).reshape(40, 24) % 251).astype(np.uint8)
    image = Image.fromarray(ramp, "L").convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: the upright picture is 40 wide, 24 high
    path = tmp_path / "scan.tif"
    image.save(path, exif=exif)  # uncompressed, one strip
    channels = 3 if mode == "RGBA" else 1
    spec = PreprocessSpec(image_size=24, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels,
                          class_names=("a", "b"))
    trained = spec.image_to_uint8(RawSplit(labels=np.array([0]), paths=[str(path)]).pil(0))
    served = spec.image_to_uint8(decode_image(path.read_bytes(), max_pixels=10_000))
    assert torch.equal(trained, served)
    upright = spec.image_to_uint8(Image.fromarray(np.rot90(ramp, -1).copy(), "L").convert(mode))
    assert torch.equal(trained, upright)


def test_an_image_the_server_would_refuse_is_a_bad_file_saying_so(tmp_path):
    """An ICO (or AVIF) saved as .png trained without a word, and the server answered the same file 415."""
    from pipelines.image_folder import BadImageFilesError, check_image_folder

    _write_images(tmp_path, per_class=6)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "cat" / "icon.png", format="ICO")
    with pytest.raises(BadImageFilesError) as info:
        check_image_folder(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    [(path, reason)] = info.value.bad
    assert path == "cat/icon.png" and reason.startswith("ICO image data, which the server does not take (PNG,")


def test_an_image_whose_structure_the_server_refuses_is_a_bad_file_saying_so(tmp_path):
    """A plain-text PGM over 1 MB read fine for training (Pillow decodes it in Python, slowly), and the server
    refused every upload of it with 400: a model trained on images it could never be sent."""
    from pipelines.image_folder import BadImageFilesError, check_image_folder

    _write_images(tmp_path, per_class=6)
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640))
    text = b"P2\n640 480\n255\n" + "\n".join(" ".join(map(str, row)) for row in pixels).encode() + b"\n"
    assert len(text) > 1 << 20
    (tmp_path / "cat" / "scan.pgm").write_bytes(text)
    with pytest.raises(ImageDecodeError, match="plain-text"):
        decode_image(text, max_pixels=10_000_000)
    with pytest.raises(BadImageFilesError) as info:
        check_image_folder(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    [(path, reason)] = info.value.bad
    assert path == "cat/scan.pgm" and reason.startswith("the server refuses it: a plain-text (ASCII) PBM/PGM/PPM")


def _spec(channels, background=0):
    return PreprocessSpec(image_size=8, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels,
                          class_names=("a", "b"), background=background)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_pil_mode_converts_to_the_model_input(mode, channels):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8)).convert(mode)
    tensor = _spec(channels).tensor_from_image(image)
    assert tensor.shape == (1, channels, 8, 8) and tensor.dtype == torch.float32 and torch.isfinite(tensor).all()


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_a_low_bit_depth_grey_pngs_colour_key_is_transparent_in_training_and_serving(tmp_path, bits):
    """Optimisers (optipng, oxipng) write black-and-white images as 1-, 2- or 4-bit grey PNGs with a colour key:
    a 2- or 4-bit key stayed on the file's scale while the pixels were stretched to 0-255, and a 1-bit image's
    key was dropped with its mode: the transparent white stayed white on a black background."""
    grey = np.tile(np.array([0, 255, 0, 255], dtype=np.uint8), (4, 1))  # black strokes, white transparent
    image = Image.fromarray(grey > 0) if bits == 1 else Image.fromarray(grey, "L")
    path = tmp_path / "key.png"
    image.save(path, "PNG", transparency=1 if bits == 1 else 2**bits - 1, **({} if bits == 1 else {"bits": bits}))
    spec = PreprocessSpec(image_size=4, channels=1, mean=(0.5,), std=(0.25,), class_names=("a", "b"), background=0)
    trained = spec.image_to_uint8(RawSplit(labels=np.array([0]), paths=[str(path)]).pil(0))
    served = spec.image_to_uint8(decode_image(path.read_bytes(), max_pixels=10_000))
    assert torch.equal(trained, served) and int(trained.max()) == 0  # every white pixel on the black background


def test_16_bit_and_float_images_are_scaled_not_clipped():
    # Pillow's own conversion to L clips 16-bit values at 255 and truncates floats: a mid-grey 16-bit scan
    # would turn white and a 0-1 float image black.
    sixteen_bit = Image.new("I;16", (8, 8), 40000)
    assert (_spec(1).image_to_uint8(sixteen_bit) == int(40000 / 65535 * 255)).all()
    ramp = np.linspace(0.0, 0.5, 64, dtype=np.float32).reshape(8, 8)
    unit_range = _spec(1).image_to_uint8(Image.fromarray(ramp))  # 0-1 floats: 1.0 would be white
    assert unit_range.min() == 0 and unit_range.max() == 127
    wide_range = _spec(1).image_to_uint8(Image.fromarray(ramp * 2000))  # beyond 1: scaled by the image's peak
    assert wide_range.min() == 0 and wide_range.max() == 255


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "PPM"])
def test_a_16_bit_image_converts_alike_whatever_its_file_format(fmt):
    """Pillow opens a 16-bit PGM as mode I (a PNG too, before Pillow 11), which was scaled by each image's own
    peak: a mid-grey PGM turned white, unlike the same pixels sent as a PNG or TIFF (I;16, scaled by 65535)."""
    import io

    ramp = np.linspace(0, 16383, 64, dtype=np.uint16).reshape(8, 8)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format=fmt)
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    converted = _spec(1).image_to_uint8(decoded)
    assert converted.max() == int(16383 * 255 / 65535)  # 63: a quarter of the 16-bit range, not white
    if fmt == "PPM":  # the same as mode I;16 gives, and as a PNG in Pillow 10 (mode I) must
        assert decoded.mode == "I"
        png_as_mode_i = Image.open(io.BytesIO(buffer.getvalue()))
        png_as_mode_i.format = "PNG"
        assert (_spec(1).image_to_uint8(png_as_mode_i) == converted).all()
    # 32-bit integers (a mode-I TIFF, an image made in memory) still go by their own peak
    assert int(_spec(1).image_to_uint8(Image.fromarray(ramp.astype(np.int32))).max()) == 255


def test_transparency_composites_onto_the_dataset_background():
    transparent = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    assert _spec(1, background=0).image_to_uint8(transparent).max() == 0
    assert _spec(1, background=255).image_to_uint8(transparent).min() == 255
    palette = Image.new("P", (8, 8))
    palette.info["transparency"] = 0
    assert _spec(3).image_to_uint8(palette).shape == (3, 8, 8)


def test_exif_orientation_is_honoured():
    image = Image.new("L", (16, 8), 0)
    image.paste(255, (0, 0, 8, 8))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = _spec(1).convert_mode(decode_image(buffer.getvalue(), max_pixels=1000))
    assert upright.size == (8, 16)
    pixels = np.asarray(upright)
    assert pixels[:8].mean() > 200 and pixels[8:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("TIFF", "I;16"), ("PNG", "RGBA"), ("TIFF", "CMYK")])
def test_every_exif_orientation_is_turned_upright_after_shrinking(fmt, mode, orientation):
    """Images are turned upright once shrunk (a phone photo was copied whole first, twice the decode budget's
    memory): the same pixels as turning the file's image first, for every orientation, also where the mode's
    conversion drops the EXIF (16-bit) and where shrinking divides the image (by 3 for an 8 px input)."""
    from PIL import ImageOps

    rng = np.random.default_rng(orientation)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 2**16, (48, 72)).astype(np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (48, 72, 4 if mode == "RGBA" else 3)).astype(np.uint8))
        image = image.convert(mode)
    assert image.mode == mode
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    for channels in (1, 3):
        spec = _spec(channels)
        stored = decode_image(buffer.getvalue(), max_pixels=10**6)
        expected = np.asarray(spec.convert_mode(ImageOps.exif_transpose(decode_image(buffer.getvalue(), 10**6))))
        assert np.array_equal(np.asarray(spec.convert_mode(stored)), expected), (fmt, mode, orientation, channels)
        assert spec.convert_mode(stored).size == ((16, 24) if orientation >= 5 else (24, 16))  # shrunk by 3


def test_a_tiff_opened_and_not_loaded_yet_is_turned_once():
    """Pillow turns a TIFF itself as it loads it (and drops its orientation tag): an image as Image.open gives it
    (the README's and the pyfunc model's usage) was turned twice, upside down for orientation 3."""
    pixels = np.zeros((40, 60), np.uint8)
    pixels[:10, :10] = 255  # a bright corner, stored top left
    exif = Image.Exif()
    exif[0x0112] = 3  # shown turned by 180 degrees: the corner bottom right
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "TIFF", exif=exif.tobytes())
    spec = PreprocessSpec(channels=1, image_size=8, mean=(0.5,), std=(0.5,), class_names=("a",))
    for image in (Image.open(io.BytesIO(buffer.getvalue())), decode_image(buffer.getvalue(), max_pixels=10**6)):
        upright = np.asarray(spec.convert_mode(image))
        bright = np.argwhere(upright > 127)
        assert (bright.mean(axis=0) > np.array(upright.shape) / 2).all(), bright.mean(axis=0)  # bottom right


@pytest.mark.slow
def test_a_turned_photo_takes_no_more_memory_than_an_upright_one(tmp_path):
    """A 24 Mpx JPEG with EXIF orientation 6 (a phone held upright) peaked at twice the memory of the same photo
    upright: it was copied whole to turn it before shrinking."""
    import subprocess
    import sys

    for orientation in (1, 6):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.new("RGB", (6000, 4000), (90, 120, 200)).save(tmp_path / f"{orientation}.jpg", exif=exif.tobytes())
    # The peak from here on (Linux's VmHWM, reset to the current size first): a process's lifetime peak
    # (ru_maxrss) can be its imports', which hides the decode's.
    measure = (
        "import re, sys\n"
        "from pipelines.preprocess import PreprocessSpec, decode_image\n"
        "spec = PreprocessSpec(image_size=224, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, class_names=('a', 'b'))\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "status = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = status('VmRSS')\n"
        "spec.image_to_uint8(decode_image(data, max_pixels=10**8))\n"
        "print(status('VmHWM') - before)\n")
    peaks = {o: int(subprocess.run([sys.executable, "-c", measure, str(tmp_path / f"{o}.jpg")], check=True,
                                   capture_output=True, text=True, timeout=120).stdout) for o in (1, 6)}
    assert peaks[1] > 50_000, peaks  # KiB: the decoded photo itself (72 MB) is in it
    assert peaks[6] < 1.15 * peaks[1], peaks  # (1.00x now; 1.34x when it was turned first)


def test_a_replica_imports_what_resizing_needs_before_its_first_request():
    """torchvision's transforms were imported by the first request's resize (5.6 s against 1 ms for the next,
    a 503 under a 3 s deadline): after :func:`import_resizing` (a replica's start), decoding imports nothing."""
    import subprocess
    import sys

    probe = (
        "import io, sys\n"
        "from PIL import Image\n"
        "from pipelines.preprocess import PreprocessSpec, decode_image, import_resizing\n"
        "import_resizing()\n"
        "buffer = io.BytesIO(); Image.new('RGB', (90, 50), (1, 2, 3)).save(buffer, 'PNG')\n"
        "spec = PreprocessSpec(image_size=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, class_names=('a', 'b'))\n"
        "before = set(sys.modules)\n"
        "spec.image_to_uint8(decode_image(buffer.getvalue(), max_pixels=10**6))\n"
        "print(sorted(set(sys.modules) - before))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_decode_refuses_bad_input():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", 100)
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        decode_image(b"definitely not an image", 100)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    with pytest.raises(ImageDecodeError, match="above the limit"):
        decode_image(buffer.getvalue(), max_pixels=1000)
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy, format="PNG")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt|not a readable"):
        decode_image(noisy.getvalue()[: len(noisy.getvalue()) // 2], max_pixels=10_000)


def test_tiny_splits_fall_back_to_unstratified():
    splits = load_splits(DataConfig(dataset="digits", val_fraction=0.004, train_subset=10))
    assert len(splits.val) >= 1 and len(splits.train) == pytest.approx(10, abs=1)


def test_missing_fashion_mnist_names_the_package_and_data_root(tmp_path, monkeypatch):
    """No IDX files anywhere and no network: one clear DataError (the CLI prints it in one line, exit 1)."""
    import torchvision

    import pipelines.data as data

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    # An address that refuses at once: the real download code runs and fails as it does offline.
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    empty = tmp_path / "empty"
    empty.mkdir()
    for download in (True, False):
        cfg = DataConfig(dataset="fashion-mnist", root=str(empty), download=download)
        with pytest.raises(data.DataError) as info:
            data.load_splits(cfg)
        message = str(info.value)
        assert "dataset-fashion-mnist" in message and "data.root" in message and str(empty) in message
        assert ("download" in message and "failed" in message) if download else "data.download is false" in message


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_a_fashion_mnist_root_that_is_not_there_is_not_read_from_debians_copy(tmp_path):
    """A data.root with a typo read Debian's copy instead, without a word, and recorded the wrong root."""
    from pipelines.data import DataError

    with pytest.raises(DataError, match=f"not found in {tmp_path / 'typo'} and data.download is false"):
        load_splits(DataConfig(dataset="fashion-mnist", root=str(tmp_path / "typo"), download=False))


@pytest.fixture
def fashion_mnist_mirror(monkeypatch):
    """torchvision's Fashion-MNIST download, served over HTTP from Debian's copy (its archives' checksums, as
    torchvision checks them): the real download code on this offline machine."""
    import functools
    import hashlib
    import http.server
    import threading

    import torchvision

    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(DEBIAN_FASHION_MNIST))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources", [
        (name, hashlib.md5((DEBIAN_FASHION_MNIST / name).read_bytes()).hexdigest())
        for name, _ in torchvision.datasets.FashionMNIST.resources])
    yield
    server.shutdown()


def test_a_fashion_mnist_download_cut_short_in_data_root_is_done_again(tmp_path, fashion_mnist_mirror, caplog):
    """A download into data.root interrupted (Ctrl-C, a lost network) left a partial archive, or an extracted
    file cut short, under FashionMNIST/raw: every later run failed ("holds some ... but not", "cannot be read")
    and never downloaded again. Files the user put in data.root itself are not touched."""
    import shutil

    from pipelines.data import DataError, forget_loaded_splits

    expected = load_splits(DataConfig(dataset="fashion-mnist"))  # Debian's copy
    raw = tmp_path / "cut" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    archive = (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").read_bytes()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(archive[: len(archive) // 3])
    cfg = DataConfig(dataset="fashion-mnist", root=str(tmp_path / "cut"))
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        splits = load_splits(cfg)
    assert "was cut short" in caplog.text
    assert np.array_equal(splits.test.images, expected.test.images)
    assert np.array_equal(splits.train.labels, expected.train.labels)
    # An extracted file cut short (torchvision takes any extracted file as complete)
    extracted = raw / "t10k-labels-idx1-ubyte"
    extracted.write_bytes(extracted.read_bytes()[:100])
    forget_loaded_splits()
    assert np.array_equal(load_splits(cfg).test.labels, expected.test.labels)
    # The user's own incomplete copy in data.root itself: named, not replaced, download or not
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz", own)
    with pytest.raises(DataError, match="holds some Fashion-MNIST IDX files but not"):
        load_splits(DataConfig(dataset="fashion-mnist", root=str(own), download=True))
    assert sorted(p.name for p in own.iterdir()) == ["train-images-idx3-ubyte.gz"]


def test_the_default_download_cut_short_is_done_again_and_files_of_other_data_are_refused(
        tmp_path, fashion_mnist_mirror, monkeypatch, caplog):
    """Without data.root the download goes to the cache (CNNZOO_DATA): an extracted file cut short there failed
    every run ("shape '[10000]' is invalid"). Complete files that are not Fashion-MNIST's (a label 25, sizes that
    do not match) are no cut-short download: refused, with download or without, not returned unchecked."""
    import gzip

    from pipelines import data
    from pipelines.data import DataError, forget_loaded_splits

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    monkeypatch.setenv("CNNZOO_DATA", str(tmp_path / "cache"))
    expected = data._read_fashion_mnist({key: DEBIAN_FASHION_MNIST / f"{stem}.gz"
                                         for key, stem in data.FASHION_MNIST_FILES.items()})
    cfg = DataConfig(dataset="fashion-mnist")
    assert np.array_equal(load_splits(cfg).test.images, expected["test_images"])  # downloaded
    raw = tmp_path / "cache" / "fashion-mnist" / "FashionMNIST" / "raw"
    extracted = raw / "t10k-labels-idx1-ubyte"
    extracted.write_bytes(extracted.read_bytes()[:100])
    forget_loaded_splits()
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert np.array_equal(load_splits(cfg).test.labels, expected["test_labels"])
    assert "t10k-labels-idx1-ubyte cut short; downloading them again" in caplog.text
    # An extraction stopped before its first byte (torchvision opens the file, then decompresses into it)
    extracted.write_bytes(b"")
    forget_loaded_splits()
    assert np.array_equal(load_splits(cfg).test.labels, expected["test_labels"])
    # Offline afterwards (data.download false): the copy downloaded to the cache is read, not "not found".
    forget_loaded_splits()
    offline = load_splits(DataConfig(dataset="fashion-mnist", download=False))
    assert np.array_equal(offline.test.labels, expected["test_labels"])

    # Readable IDX files of other data under data.root's download directory: refused, not returned
    other = tmp_path / "other" / "FashionMNIST" / "raw"
    other.mkdir(parents=True)
    for stem, array in (("train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8)),
                        ("train-labels-idx1-ubyte", np.array([0, 25, 1], np.uint8)),
                        ("t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8)),
                        ("t10k-labels-idx1-ubyte", np.array([0, 1], np.uint8))):
        header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        with gzip.open(other / f"{stem}.gz", "wb") as f:
            f.write(header + array.tobytes())
    for download in (False, True):
        with pytest.raises(DataError, match="holds label 25"):
            load_splits(DataConfig(dataset="fashion-mnist", root=str(tmp_path / "other"), download=download))


def test_a_partial_fashion_mnist_root_names_the_missing_files(tmp_path):
    import gzip

    from pipelines.data import DataError

    for stem in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(dataset="fashion-mnist", root=str(tmp_path), download=False))
    message = str(info.value)
    assert "train-labels-idx1-ubyte" in message and "t10k-images-idx3-ubyte" in message
    assert "train-images-idx3-ubyte" not in message.split("but not")[1]


def write_folder_with_bad_files(root):
    """Two classes of six good PNGs, plus what real folders hold: a corrupt (truncated) PNG, a zero-byte
    JPEG, macOS's AppleDouble ``._0.png`` and a hidden directory with junk in it. Returns the bad files."""
    _write_images(root, per_class=6)
    png = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "broken.png").write_bytes(png[: len(png) // 2])
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " * 8)
    (root / "dog" / ".thumbnails").mkdir()
    (root / "dog" / ".thumbnails" / "0.png").write_bytes(b"not an image")
    return {"cat/broken.png", "dog/empty.jpg"}


def test_unreadable_image_files_are_listed_and_hidden_files_never_opened(tmp_path):
    from pipelines.image_folder import BadImageFilesError, check_image_folder

    bad = write_folder_with_bad_files(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16)
    with pytest.raises(BadImageFilesError) as info:
        describe_dataset(cfg)  # the stages' first call on the driver
    assert {path for path, _ in info.value.bad} == bad and info.value.checked == 14
    message = str(info.value)
    assert "2 of the 14 image files" in message and "data.skip_bad_files: true" in message
    assert "cat/broken.png" in message and "dog/empty.jpg" in message
    assert "._0.png" not in message and ".thumbnails" not in message

    skipping = cfg.model_copy(update={"skip_bad_files": True})
    # On the module's logger itself: once the console is configured, "pipelines" stops propagating.
    records, handler = [], logging.Handler(logging.WARNING)
    handler.emit = records.append
    data_logger = logging.getLogger("pipelines.image_folder")
    data_logger.addHandler(handler)
    try:
        assert set(check_image_folder(skipping)) == bad
        check_image_folder(skipping)  # the stages call it again: no second read, no second warning
    finally:
        data_logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if "skip_bad_files" in r.getMessage()]
    assert len(warnings) == 1 and "leaving out 2 unreadable file(s)" in warnings[0]
    info = describe_dataset(skipping)
    assert set(info.excluded_files) == bad and sum(info.sizes.values()) == 12
    splits = load_splits(skipping, info.excluded_files)
    used = [p for split in (splits.train, splits.val, splits.test) for p in split.paths]
    assert sorted(used) == sorted(str(tmp_path / c / f"{i}.png") for c in ("cat", "dog") for i in range(6))
    # A plain scan (what a worker would do without the run's exclusions) still lists the bad files.
    plain = load_splits(skipping)
    assert sum(len(s) for s in (plain.train, plain.val, plain.test)) == 14


def test_a_file_name_that_is_not_utf8_is_a_bad_file_not_a_crash(tmp_path):
    """A Windows zip unpacked on Linux leaves Latin-1 names ("caf\xe9.png"): hashing the folder's listing
    crashed the check (UnicodeEncodeError, exit 1, no file named). Now the file is listed like an unreadable
    one, and left out with ``data.skip_bad_files``."""
    import os

    from pipelines.image_folder import BadImageFilesError, check_image_folder

    _write_images(tmp_path, per_class=6)
    latin1 = os.fsdecode(b"caf\xe9.png")
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(tmp_path / "cat" / latin1)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16)
    with pytest.raises(BadImageFilesError) as info:
        check_image_folder(cfg)
    assert info.value.bad == [(f"cat/{latin1}", info.value.bad[0][1])] and "not valid UTF-8" in info.value.bad[0][1]
    skipping = cfg.model_copy(update={"skip_bad_files": True})
    described = describe_dataset(skipping)
    assert described.excluded_files == (f"cat/{latin1}",) and sum(described.sizes.values()) == 12


def test_the_error_shows_the_first_ten_bad_files_and_the_count(tmp_path):
    from pipelines.image_folder import BadImageFilesError, check_image_folder

    _write_images(tmp_path, per_class=2)
    for i in range(13):
        (tmp_path / "cat" / f"empty{i:02d}.jpg").write_bytes(b"")
    with pytest.raises(BadImageFilesError) as info:
        check_image_folder(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    lines = [line for line in str(info.value).splitlines() if "empty" in line]
    assert len(lines) == 10 and "13 of the 17 image files" in str(info.value) and "... and 3 more" in str(info.value)


@pytest.mark.parametrize("problem", ["bad files", "loose images"])
def test_cli_exits_2_naming_what_to_fix_before_ray_starts(tmp_path, problem, pipelines_cli):
    if problem == "bad files":
        write_folder_with_bad_files(tmp_path / "images")
    else:  # a flat folder of images, no class folders
        (tmp_path / "images").mkdir()
        for i in range(4):
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / f"{i}.png")
    out = pipelines_cli("train", "--set", f"workdir={tmp_path / 'runs'}", "--set", "data.dataset=imagefolder",
                        "--set", f"data.root={tmp_path / 'images'}")
    assert out.returncode == 2 and not out.started_ray, out.stdout + out.stderr
    if problem == "bad files":
        assert "data error: 2 of the 14 image files" in out.stderr
        assert "cat/broken.png" in out.stderr and "dog/empty.jpg" in out.stderr and "._0.png" not in out.stderr
    else:
        assert "data error:" in out.stderr and "its 4 images directly in it belong in class folders" in out.stderr
        assert "Traceback" not in out.stderr


def test_truncated_jpegs_and_dangling_links_are_bad_files(tmp_path):
    """Pillow's verify() passes a JPEG cut in half (it checks no JPEG pixel data); training would then fail
    mid-epoch on it, every retry. A dangling link (DVC, git-annex) must be listed, not crash the check."""
    from pipelines.image_folder import BadImageFilesError, check_image_folder

    _write_images(tmp_path, per_class=4)
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    Image.fromarray(np.stack([gradient] * 3, axis=-1)).save(tmp_path / "cat" / "whole.jpg", quality=90)
    jpeg = (tmp_path / "cat" / "whole.jpg").read_bytes()
    (tmp_path / "dog" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(BadImageFilesError) as info:
        check_image_folder(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert {path for path, _ in info.value.bad} == {"dog/cut.jpg", "dog/gone.png"}
    skipping = DataConfig(dataset="imagefolder", root=str(tmp_path), skip_bad_files=True, image_size=16)
    assert describe_dataset(skipping).excluded_files == ("dog/cut.jpg", "dog/gone.png")


@pytest.mark.parametrize(("layout", "message"), [
    ("loose", "its 6 images directly in it belong in class folders"),
    ("one class", "found 1 class folder with images (cat/)"),
    ("wrapper folder", "dataset/ itself holds class folders: set data.root to "),  # an archive's top folder
    ("val has an unknown class", "lacks: Dog/ (class folders match by exact name"),
    ("empty test", "holds no images in class folders"),
])
def test_image_folders_no_model_can_learn_from_are_refused_with_what_to_fix(tmp_path, layout, message):
    from pipelines.image_folder import ImageFolderError

    if layout == "loose":
        for i in range(6):
            Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    elif layout == "one class":
        _write_images(tmp_path, classes=("cat",))
        (tmp_path / "__MACOSX" / "cat").mkdir(parents=True)  # an unzip's leftovers: hidden files only
        (tmp_path / "__MACOSX" / "cat" / "._0.png").write_bytes(b"Mac OS X")
    elif layout == "wrapper folder":
        _write_images(tmp_path / "dataset")
    else:
        _write_images(tmp_path / "train")
        _write_images(tmp_path / "val", classes=("cat", "Dog") if layout.startswith("val") else ("cat", "dog"))
        (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(ImageFolderError) as info:
        describe_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16))
    assert message in str(info.value)


def test_linked_folders_load_once_and_a_link_loop_is_refused_naming_it(tmp_path):
    """A data set assembled from linked folders loads each image once. A link back to a folder above it made
    the walk read everything again at every level (40 levels: the system's limit on nested links)."""
    from pipelines.image_folder import ImageFolderError, check_image_folder

    _write_images(tmp_path / "data", per_class=3)
    _write_images(tmp_path / "more", classes=("extra_cats",), per_class=2)
    (tmp_path / "data" / "cat" / "extra").symlink_to(tmp_path / "more" / "extra_cats")
    linked = DataConfig(dataset="imagefolder", root=str(tmp_path / "data"), image_size=16)
    assert check_image_folder(linked) == ()
    assert sum(describe_dataset(linked).sizes.values()) == 8  # 3 + 2 cats, 3 dogs: each once

    (tmp_path / "data" / "dog" / "again").symlink_to(tmp_path / "data")  # root/dog/again -> root
    (tmp_path / "more" / "extra_cats" / "back").symlink_to(tmp_path / "data" / "cat")  # via the other link
    started = time.perf_counter()
    with pytest.raises(ImageFolderError) as info:
        check_image_folder(DataConfig(dataset="imagefolder", root=str(tmp_path / "data"), image_size=16))
    assert "lead back to a folder above them" in str(info.value)
    assert "cat/extra/back, dog/again" in str(info.value)
    assert time.perf_counter() - started < 5


def _image_folder_warnings(cfg) -> list[str]:
    from pipelines.image_folder import check_image_folder

    records, handler = [], logging.Handler(logging.WARNING)
    handler.emit = records.append
    data_logger = logging.getLogger("pipelines.image_folder")
    data_logger.addHandler(handler)
    try:
        check_image_folder(cfg)
    finally:
        data_logger.removeHandler(handler)
    return [r.getMessage() for r in records]


def test_validation_and_test_images_that_copy_training_images_are_reported(tmp_path):
    """A data set downloaded twice (``x (1).png`` beside ``x.png``) or a val/ folder linked to train/ put
    training images into validation and test: accuracy and model selection inflated, silently."""
    import shutil

    rng = np.random.default_rng(7)
    flat = tmp_path / "flat"
    for name in ("cat", "dog"):
        (flat / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(flat / name / f"{i}.png")
    clean = DataConfig(dataset="imagefolder", root=str(flat), image_size=16, val_fraction=0.25, test_fraction=0.25)
    assert not [m for m in _image_folder_warnings(clean) if "byte" in m]
    for name in ("cat", "dog"):  # every image twice
        for i in range(12):
            shutil.copy(flat / name / f"{i}.png", flat / name / f"{i} (1).png")
    shutil.copy(flat / "cat" / "0.png", flat / "dog" / "cat-0.png")  # and one under both classes
    twice = clean.model_copy(update={"seed": 1})  # (the check reads the changed folder anyway)
    messages = _image_folder_warnings(twice)
    assert any("validation images are byte-identical to training images" in m for m in messages), messages
    assert any("test images are byte-identical to training images" in m for m in messages), messages
    assert any("1 image file(s) appear under two classes" in m for m in messages), messages

    presplit = tmp_path / "presplit"
    _write_images(presplit / "train", per_class=6)
    (presplit / "val").symlink_to(presplit / "train", target_is_directory=True)
    messages = _image_folder_warnings(DataConfig(dataset="imagefolder", root=str(presplit), image_size=16))
    assert any("of the 12 validation images are byte-identical" in m for m in messages), messages


def test_nas_thumbnail_folders_are_not_data_and_files_not_read_for_their_names_are_reported(tmp_path):
    """A Synology NAS's @eaDir/ (a thumbnail of every image) joined its class's training data, each thumbnail
    leaking its original's label across the splits; files of other extensions (.heic, a .jfif not read, none at
    all) were left out without a word."""
    import os

    from pipelines.image_folder import BadImageFilesError, check_image_folder

    _write_images(tmp_path, per_class=6)
    for i in range(6):  # @eaDir/<image name>/SYNOFILE_THUMB_M.jpg beside each cat, and a "#recycle" class folder
        (tmp_path / "cat" / "@eaDir" / f"{i}.png").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "@eaDir" / f"{i}.png" / "SYNOFILE_THUMB_M.jpg")
    (tmp_path / "#recycle").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "#recycle" / "old.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "photo.jfif", format="JPEG")  # read: a JPEG by another name
    (tmp_path / "dog" / "scan.heic").write_bytes(b"not read")
    (tmp_path / "dog" / "noext").write_bytes(b"not read")
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16)
    messages = _image_folder_warnings(cfg)
    splits = load_splits(cfg)
    assert splits.class_names == ("cat", "dog")
    every = [p for split in (splits.train, splits.val, splits.test) for p in split.paths]
    assert len(every) == 13 and not [p for p in every if "@eaDir" in p] and any(p.endswith(".jfif") for p in every)
    assert any("2 file(s) in the class folders of" in m and "dog/noext, dog/scan.heic" in m for m in messages), \
        messages

    # A file rewritten in place with its modification time put back (cp -p, rsync -a) is checked again
    target = tmp_path / "dog" / "0.png"
    before = os.stat(target)
    intact = target.read_bytes()
    target.write_bytes(intact[:40] + bytes(len(intact) - 40))  # same size: its pixel data zeroed
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(BadImageFilesError, match="dog/0.png"):
        check_image_folder(cfg)


def test_folders_without_images_are_not_classes_and_val_labels_follow_train(tmp_path):

    _write_images(tmp_path / "train", classes=("ant", "bee", "cow"), per_class=4)
    (tmp_path / "train" / "__MACOSX").mkdir()
    (tmp_path / "train" / "__MACOSX" / "._0.png").write_bytes(b"Mac OS X")
    _write_images(tmp_path / "val", classes=("bee", "cow"), per_class=2)  # a val folder may lack a class
    _write_images(tmp_path / "test", classes=("ant", "bee", "cow"), per_class=2)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16)
    assert any("not classes: __MACOSX/" in message for message in _image_folder_warnings(cfg))
    splits = load_splits(cfg)
    assert splits.class_names == ("ant", "bee", "cow")
    for split in (splits.train, splits.val, splits.test):
        assert [splits.class_names[label] for label in split.labels] == [path.split("/")[-2] for path in split.paths]
    assert set(splits.val.labels) == {1, 2}


@pytest.mark.parametrize(("modes", "channels"), [
    (["L"] * 10 + ["RGB"] * 10, 3),  # grey images that sort first do not make a colour data set grey
    (["L", "1", "LA", "I;16"] + ["L"] * 2, 1),
    (["P"] * 6, 3),  # palettes are colour (a grey one is trained in colour: no harm)
])
def test_the_channel_count_follows_every_image_not_the_first(tmp_path, modes, channels):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i, mode in enumerate(modes):
            image = Image.fromarray(np.full((10, 10, 3), 10 * i, dtype=np.uint8)).convert(mode)
            image.save(tmp_path / name / f"{i:02d}.png")
    splits = load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path), val_fraction=0.2, test_fraction=0.2))
    assert splits.channels == channels


def test_a_relative_data_root_is_made_absolute(tmp_path, monkeypatch):
    """Ray Train's workers run in their own directories: a relative root would exist on the driver only."""
    _write_images(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root="./images")
    assert cfg.root == str(tmp_path / "images") == DataConfig(dataset="imagefolder", root="images").root
    monkeypatch.chdir("/")
    assert len(load_splits(cfg).train) > 0

def test_epoch_order_depends_on_seed_and_epoch_only(tmp_path):
    from pipelines.data import EpochSampler

    dataset = list(range(50))
    resumed = EpochSampler(dataset, rank=0, world=1, seed=7)
    resumed.start_epoch(3, epoch_seed=11)
    torch.manual_seed(123)  # whatever ran before must not matter
    first = list(resumed)
    uninterrupted = EpochSampler(dataset, rank=0, world=1, seed=7)
    for epoch in range(4):
        torch.rand(5)
        uninterrupted.start_epoch(epoch, epoch_seed=11)
        order = list(uninterrupted)
    assert order == first and sorted(i for i, _ in first) == dataset
    other = EpochSampler(dataset, rank=0, world=1, seed=7)
    other.start_epoch(4, epoch_seed=11)
    assert [i for i, _ in other] != [i for i, _ in first]
    # The next seed does not replay this seed's orders one epoch late (shuffled by seed + epoch, it did)
    next_seed = EpochSampler(dataset, rank=0, world=1, seed=8)
    next_seed.start_epoch(2, epoch_seed=11)
    assert [i for i, _ in next_seed] != [i for i, _ in first]
    halves = [EpochSampler(dataset, rank=r, world=2, seed=7) for r in (0, 1)]
    for half in halves:
        half.start_epoch(3, epoch_seed=11)
    assert sorted(i for half in halves for i, _ in half) == dataset


def test_augmentation_follows_the_item_seed_not_the_global_rng():
    cfg = DataConfig(dataset="digits", image_size=16, train_subset=20)
    spec = make_spec(describe_dataset(cfg), 16)
    dataset = SplitDataset(load_splits(cfg).train, spec, augment=True)
    torch.manual_seed(0)
    a = dataset[(3, 42)][0]
    state = torch.get_rng_state()
    torch.manual_seed(1)
    b = dataset[(3, 42)][0]
    torch.manual_seed(0)
    dataset[(3, 42)]
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)  # the caller's stream untouched
    assert any(not torch.equal(a, dataset[(3, seed)][0]) for seed in range(43, 53))  # it does augment


def test_skip_bad_files_trains_without_them(make_config, tmp_path):
    """The driver leaves the bad files out and its runs carry the list: a worker that read them (a plain scan of
    the folder) would fail on the corrupt PNG or the empty JPEG in whichever split they fell, or find other split
    sizes than planned. The worker's own steps, in this process (a Ray Train run adds only start-up here)."""
    import math

    from torch.utils.data import DataLoader

    from pipelines.data import forget_loaded_splits
    from pipelines.planning import ModelRun, plan_model_runs, resolve_models
    from pipelines.worker import build_context, evaluate, train_epoch

    bad = write_folder_with_bad_files(tmp_path / "images")
    cfg = make_config("data.dataset=imagefolder", f"data.root={tmp_path / 'images'}", "data.skip_bad_files=true",
                      "data.image_size=16", "train.models=[lenet5]", "train.epochs=1", "train.batch_size=4",
                      "train.precise_bn_batches=1")
    [run] = plan_model_runs(cfg, describe_dataset(cfg.data), resolve_models(cfg), cluster_cpus=2)
    assert set(run.excluded_files) == bad
    run = ModelRun.from_dict(run.to_dict())  # as Tune hands it to a worker
    forget_loaded_splits()  # the worker's own read of the folder, not the driver's
    ctx = build_context(run, rank=0, world=1, device=torch.device("cpu"))
    assert math.isfinite(train_epoch(ctx, 0)["train_loss"])
    counts = [evaluate(ctx, ctx.val_loader)[2]]
    test_loader = DataLoader(SplitDataset(ctx.sources["test"], run.spec), batch_size=4)
    counts.append(evaluate(ctx, test_loader, "test")[2])
    assert len(ctx.train_loader.dataset) + sum(counts) == 12  # the good images, every one read


def test_flip_augmentation_mirrors_or_keeps_each_image_and_never_crops():
    cfg = DataConfig(dataset="digits", image_size=16, train_subset=20)
    # digits are never flipped (a mirrored 2 is no digit); the same images as a flippable data set:
    spec = dataclasses.replace(make_spec(describe_dataset(cfg), 16), dataset="fashion-mnist")
    split = load_splits(cfg).train
    plain = SplitDataset(split, spec)
    flips = SplitDataset(split, spec, augment="flip")
    crops = SplitDataset(split, spec, augment=True)
    original = plain[3][0]
    flipped = [flips[(3, seed)][0] for seed in range(20)]
    assert all(torch.equal(x, original) or torch.equal(x, original.flip(-1)) for x in flipped)
    assert any(torch.equal(x, original) for x in flipped) and any(torch.equal(x, original.flip(-1)) for x in flipped)
    cropped = [crops[(3, seed)][0] for seed in range(20)]
    assert any(not (torch.equal(x, original) or torch.equal(x, original.flip(-1))) for x in cropped)
    assert SplitDataset(split, make_spec(describe_dataset(cfg), 16), augment="flip").transform is None
    # augment: crop (an image folder whose classes a mirror changes): crops, never a mirrored image.
    crops_only = SplitDataset(split, spec, augment="crop")
    assert [type(op).__name__ for op in crops_only.transform.transforms] == ["RandomCrop"]
    assert not any(torch.equal(crops_only[(3, seed)][0], original.flip(-1)) for seed in range(20))


def test_random_crops_pad_with_the_data_sets_background():
    """Crops of white-background images were padded with black, an edge no test or served image has."""
    white = RawSplit(labels=np.zeros(1, dtype=np.int64), images=np.full((1, 16, 16), 255, dtype=np.uint8))
    for background in (255, 0):
        spec = PreprocessSpec(image_size=16, channels=1, mean=(0.5,), std=(0.25,), class_names=("a",),
                              background=background)
        crops = torch.stack([SplitDataset(white, spec, augment=True)[(0, seed)][0] for seed in range(20)])
        assert (crops == 0).any() == (background == 0)


@pytest.mark.parametrize("kind", ["gif", "palette png", "1-bit png", "16-bit png"])
def test_large_palette_1_bit_and_16_bit_images_with_transparency_are_described(tmp_path, kind):
    """A transparent GIF (how Pillow saves RGBA as GIF) or a pngquant-ed PNG at 4x the input size: describing the
    data set (the stages' first step) shrank its alpha thumbnail in its own mode, which Pillow's reduce refuses
    ("image has wrong mode"): every stage ended in a traceback."""
    rng = np.random.default_rng(0)
    for name in ("arrow", "star"):
        (tmp_path / name).mkdir()
        for i in range(6):
            icon = np.zeros((128, 128), dtype=np.uint8)
            top = int(rng.integers(20, 60))
            icon[top:top + 40, 30:90] = 255  # the drawn part; 0 is the transparent colour key
            if kind == "gif":
                rgba = np.zeros((128, 128, 4), dtype=np.uint8)
                rgba[..., 3] = icon  # black strokes on transparency
                Image.fromarray(rgba, "RGBA").save(tmp_path / name / f"{i}.gif")
                continue
            if kind == "16-bit png":
                image = Image.fromarray(icon.astype(np.uint16) * 257)
            else:
                image = Image.fromarray(icon).convert("P" if kind == "palette png" else "1")
            image.save(tmp_path / name / f"{i}.png", transparency=0)
    info = describe_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=32))
    assert info.sizes["train"] > 0 and info.background in (0, 255)
    if kind == "gif":  # black strokes on transparency: onto white, or every image would be all black
        assert info.background == 255


def test_dark_drawings_on_transparency_go_onto_white_and_light_ones_onto_black(tmp_path):
    """The background was chosen from how bright the images were composited onto black: black strokes on
    transparency (icons, signatures) went onto black, every image all black in training and serving."""
    for ink, name in ((0, "dark"), (255, "light")):
        root = tmp_path / name
        for label in ("circle", "square"):
            (root / label).mkdir(parents=True)
            for i in range(6):
                image = Image.new("RGBA", (24, 24), (0, 0, 0, 0))
                if label == "circle":
                    ImageDraw.Draw(image).ellipse((4 + i, 4, 18, 18), outline=(ink, ink, ink, 255), width=2)
                else:
                    ImageDraw.Draw(image).rectangle((4, 4 + i, 18, 18), outline=(ink, ink, ink, 255), width=2)
                image.save(root / label / f"{i}.png")
        cfg = DataConfig(dataset="imagefolder", root=str(root), val_fraction=0.2, test_fraction=0.2, image_size=16)
        info = describe_dataset(cfg)
        assert info.background == (255 if ink == 0 else 0), name
        images = torch.stack([SplitDataset(load_splits(cfg).train, make_spec(info, 16))[i][0] for i in range(4)])
        assert images.float().std() > 20, name  # strokes visible on their background, not a blank square
    # Opaque photos keep the data set's own rule (their fingerprints with it): black behind dark ones, white
    # behind bright ones.
    rng = np.random.default_rng(0)
    for low, high, background in ((0, 60, 0), (200, 256, 255)):
        root = tmp_path / f"photos-{low}"
        for label in ("cat", "dog"):
            (root / label).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(low, high, (20, 24, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
        photos = describe_dataset(DataConfig(dataset="imagefolder", root=str(root), val_fraction=0.2,
                                             test_fraction=0.2))
        assert photos.background == background, (low, high)



@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists() or (os.cpu_count() or 1) > 8,
                    reason="reads Linux's VmHWM; needs fewer cores than the check's 16 threads to tell them apart")
def test_the_image_check_decodes_one_image_per_core_at_a_time(tmp_path):
    """Its 16 threads each decoded (and their malloc arenas kept) an image at once, whatever the cores: 2.07 GB
    for 24 Mpx JPEGs on 2 cores against 0.89 GB two at a time, for no gain in speed. Now 16 threads read and one
    per core decodes. Measured in a child process from the check on."""
    script = f"""
import re
from pathlib import Path
from PIL import Image
from pipelines import image_folder
root = Path({str(tmp_path)!r})
for i in range(16):  # (as many as the threads: all of them decoding at once is what this looks for)
    Image.new("RGB", (2500, 2500), (i, 2 * i, 3 * i)).save(root / f"{{i}}.png")  # 18.75 MB decoded, tiny on disk
paths = sorted(str(p) for p in root.glob("*.png"))
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
Path("/proc/self/clear_refs").write_text("5")
before = hwm()
bad, _ = image_folder._find_unreadable(root, paths)
assert not bad, bad
print((hwm() - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown_mb = float(out.stdout.split()[-1])
    decoded_mb = 2500 * 2500 * 3 / 2**20
    # One per core plus the verify pass's buffers; sixteen at once are about 16 x 18 MB.
    assert grown_mb < decoded_mb * ((os.cpu_count() or 1) + 3), f"{grown_mb:.0f} MB"
