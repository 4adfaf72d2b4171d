"""Data sets, seeded train/val/test splits and the per-run preprocessing spec.

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images); no download.
* ``fashion-mnist``: the IDX files from ``data.root``, else from ``/usr/share/datasets/fashion-mnist``
  (Debian's ``dataset-fashion-mnist`` package), else downloaded by torchvision (``data.download``).
* ``cifar10``: torchvision's CIFAR-10 under ``data.root`` (downloaded when missing and allowed).
* ``imagefolder``: ``data.root`` holds one folder per class; if it has ``train/`` (and ``val/`` or
  ``test/``) sub-folders those splits are used, otherwise the images are split here. Hidden files and
  folders (``.x``, macOS's ``._x.jpg``) are never images; :mod:`pipelines.image_folder` scans and checks
  such folders once on the driver and builds their splits.

Splits are stratified and seeded by ``data.seed``: every worker on every node computes the same split.
Images are converted once to uint8 tensors at the model's input size through the same
:class:`~pipelines.preprocess.PreprocessSpec` the server uses, so training and serving see identical pixels.

Heavy libraries (torchvision, scikit-learn) are imported where they are used: this module is imported by
every Ray Train controller and Tune trial process, most of which never touch the data.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import math
import os
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from .config import DataConfig
from .preprocess import (
    ALPHA_MODES,
    EXIF_ORIENTATION,
    PreprocessSpec,
    has_sixteen_bit_samples,
    image_orientation,
    open_image_file,
)

__all__ = [
    "DatasetInfo",
    "ImageSplits",
    "SplitDataset",
    "ConvertedSplit",
    "convert_splits",
    "load_splits",
    "forget_loaded_splits",
    "describe_dataset",
    "make_spec",
    "DataError",
    "stratified_split",
    "EpochSampler",
    "DEBIAN_FASHION_MNIST",
]

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".pbm", ".pnm")
#: Data sets whose images are meaningful mirrored (not digits or letters).
FLIP_OK = {"fashion-mnist", "cifar10", "imagefolder"}


class DataError(RuntimeError):
    """The data set cannot be found or read (the message says where it looked)."""


@dataclass
class RawSplit:
    """One split before resizing: either in-memory uint8 images (N, H, W[, C]) or image file paths."""

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def pil(self, index: int) -> Image.Image:
        if self.images is not None:
            return Image.fromarray(self.images[index])
        with open_image_file(self.paths[index]) as image:
            image.load()
            return image

    def subset(self, indices: np.ndarray) -> RawSplit:
        return RawSplit(
            labels=self.labels[indices],
            images=None if self.images is None else self.images[indices],
            paths=None if self.paths is None else [self.paths[i] for i in indices],
        )


@dataclass
class ImageSplits:
    train: RawSplit
    val: RawSplit
    test: RawSplit
    class_names: tuple[str, ...]
    channels: int
    dataset: str

    def membership(self, root: str | os.PathLike | None, splits: tuple[str, ...] = ("train", "val", "test")) -> str:
        """A short hash of which file is in which of ``splits``, in what order, under which label (paths relative
        to ``root``); "" for in-memory data sets. Two copies of an image folder with the same classes and split
        sizes can still differ (a file renamed, an image moved between classes): each node's worker reads its
        own copy, and DDP ranks with different file lists train on each other's validation and test images."""
        if self.train.paths is None:
            return ""
        import hashlib

        digest = hashlib.sha256()
        for name in splits:
            split = getattr(self, name)
            for relative, label in zip(_relative_paths(split.paths, root), split.labels.tolist(), strict=True):
                digest.update(f"{name}\t{relative}\t{label}\n".encode())
        return digest.hexdigest()[:16]

    def test_identity(self, root: str | os.PathLike | None) -> str:
        """A short hash of the test split (its images, or its files relative to ``root``, with their labels):
        test accuracies compare only where it is the same (another ``data.seed`` or ``data.test_fraction`` draws
        other test images from the same data set)."""
        import hashlib

        test = self.test
        digest = hashlib.sha256(np.ascontiguousarray(test.labels, dtype=np.int64).tobytes())
        if test.images is not None:
            digest.update(np.ascontiguousarray(test.images).tobytes())
        else:
            digest.update("\n".join(_relative_paths(test.paths, root)).encode())
        return digest.hexdigest()[:16]


def _relative_paths(paths: list[str], root: str | os.PathLike | None) -> Iterator[str]:
    """``paths`` relative to ``root`` (data.root): where they are joined onto it, sliced, which is what relpath
    would give (7 s per 1.2 M paths with relpath)."""
    base = str(Path(root).expanduser()) if root else "."
    prefix = base.rstrip(os.sep) + os.sep
    for path in paths:
        yield path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, base)


@dataclass(frozen=True)
class DatasetInfo:
    """What the driver needs to know before training: classes, channels, normalisation, split sizes."""

    dataset: str
    class_names: tuple[str, ...]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    background: int
    sizes: dict[str, int]
    #: Image-folder files left out because Pillow cannot read them (``data.skip_bad_files``), relative to
    #: ``data.root``; the runs carry them to the workers (``ModelRun.excluded_files``).
    excluded_files: tuple[str, ...] = ()
    #: Those of ``excluded_files`` that only the test split would have read (a split folder's ``test/``): what the
    #: models learn from and are chosen by does not depend on them.
    test_excluded_files: tuple[str, ...] = ()
    #: :meth:`ImageSplits.membership` of the driver's read ("" for in-memory data sets).
    membership: str = ""
    #: :meth:`ImageSplits.test_identity`: which test images the models' test accuracies are measured on.
    test_split: str = ""
    #: :meth:`ImageSplits.membership` of the training and validation splits alone ("" for in-memory data sets):
    #: part of a model's fingerprint, as what it learns from and is chosen by.
    training_membership: str = ""


def stratified_split(labels: np.ndarray, fraction: float, seed: int,
                     count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices kept and held out (about ``fraction`` of them), each class in proportion where it can be.

    A class with a single image stays on the kept side: it cannot be on both, and one such class must not
    turn the whole split into a plain random one (which can leave a rare class out of training altogether).
    """
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    singles = np.isin(labels, np.flatnonzero(counts == 1))
    indices = np.arange(len(labels))[~singles]
    rest = labels[~singles]
    classes = len(np.unique(rest))
    # ``count``: exactly that many (a fraction of it took ceil(61 / n * n) = 62 for some n, float rounding). A
    # fraction's product is rounded before its ceiling for the same reason: 0.07 of 600 is 42.00000000000001.
    held_out = count if count is not None else int(np.ceil(round(fraction * len(labels), 9)))
    # Stratify when every class can appear on both sides.
    if classes > 0 and classes <= held_out <= len(rest) - classes:
        keep, held = train_test_split(indices, test_size=held_out, random_state=seed, stratify=rest)
        # The single-image classes count in held_out but are all kept: where they are most of the data, the
        # rest gives up over half its images, and sklearn's allocation left a two-image class none to train
        # on. Such a class takes one back, for one of a class with images to spare.
        rng = np.random.default_rng(seed)
        for label in np.setdiff1d(np.unique(rest), labels[keep]):
            kept_per_class = np.bincount(labels[keep], minlength=len(counts))
            spare = keep[kept_per_class[labels[keep]] > 1]
            if spare.size == 0:
                break
            back, out = held[labels[held] == label][0], rng.choice(spare)
            keep, held = np.append(keep[keep != out], back), np.append(held[held != back], out)
    else:
        # Too few images to stratify (fewer held out than classes, say): a random split, but one image of
        # every class stays on the kept side, or a class could end with no training image, its output never
        # trained, and the run would not say so.
        shuffled = np.random.default_rng(seed).permutation(indices)
        _, first_of_class = np.unique(labels[shuffled], return_index=True)
        others = np.delete(shuffled, first_of_class)
        count = min(held_out, len(others))
        if count == 0:
            raise ValueError(f"no image can be held out of {len(labels)}: every class has a single one")
        held, keep = others[:count], np.concatenate([shuffled[first_of_class], others[count:]])
    return np.sort(np.concatenate([keep, np.flatnonzero(singles)])), np.sort(held)


class IncompleteIdxFile(DataError):
    """An IDX file that cannot be read to its end (a download or copy cut short)."""


def _read_idx(path: Path, help_text: str | None = None) -> np.ndarray:
    """An IDX file of unsigned bytes (plain or gzipped); a damaged one is a DataError naming it
    (:class:`IncompleteIdxFile` when it is cut short or unreadable) and saying how to get a good copy
    (``help_text``; default: Debian's package or data.root)."""
    help_text = help_text or _FASHION_MNIST_HELP
    try:
        # gzip or not by the content, not the name: a browser that unpacked a download kept its .gz (and a
        # download again was the same file), where reading by the name refused it as "cut short"
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError; a cut-off .gz, EOFError
        raise IncompleteIdxFile(f"{path} cannot be read ({type(err).__name__}: {err}); replace it with a complete "
                                f"copy ({help_text})") from None
    # Magic: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions.
    magic_fits = data[:3] == b"\x00\x00\x08"[:len(data)] and (len(data) < 4 or 1 <= data[3] <= 3)
    if magic_fits and (len(data) < 4 or len(data) < 4 + 4 * data[3]):  # (an extraction stopped leaves 0 bytes)
        raise IncompleteIdxFile(f"{path} ends within its header ({len(data)} bytes: cut off); replace it "
                                f"({help_text})")
    if not magic_fits:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; replace it ({help_text})")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    expected = 4 + 4 * dims + math.prod(shape)
    if len(data) != expected:
        raise IncompleteIdxFile(f"{path} holds {len(data)} bytes where its header says {expected} (cut off, or "
                                f"damaged); replace it ({help_text})")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


#: Where under a data.root the four files may lie: in it, in torchvision's download folder under it, and in that
#: folder's raw/ (a data.root of torchvision's own .../FashionMNIST).
IDX_FOLDERS = (".", "FashionMNIST/raw", "raw")


def _find_idx(directory: Path, stem: str) -> Path | None:
    for folder in IDX_FOLDERS:
        for name in (stem, f"{stem}.gz"):
            if (candidate := directory / folder / name).is_file():
                return candidate
    return None


def _misnamed_idx_files(directory: Path) -> list[str]:
    """IDX files under ``directory`` by other names than the four looked for (``train-images.idx3-ubyte``, as
    some mirrors name them): passed over, the error said only "not found"."""
    expected = {name for stem in FASHION_MNIST_FILES.values() for name in (stem, f"{stem}.gz")}
    return sorted({str(path.relative_to(directory)) for folder in IDX_FOLDERS
                   for path in (directory / folder).glob("*idx[0-9]*ubyte*")
                   if path.is_file() and path.name not in expected})


def _default_root(dataset: str) -> Path:
    return Path(os.environ.get("CNNZOO_DATA", Path.home() / ".cache" / "cnnzoo" / "data")) / dataset


def _load_digits(cfg: DataConfig) -> ImageSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rest, test = stratified_split(labels, cfg.test_fraction, cfg.seed)
    full = RawSplit(labels=labels, images=images)
    rest_split = full.subset(rest)
    train, val = stratified_split(rest_split.labels, cfg.val_fraction / (1 - cfg.test_fraction), cfg.seed)
    return ImageSplits(rest_split.subset(train), rest_split.subset(val), full.subset(test),
                       tuple(str(d) for d in digits.target_names), 1, "digits")


FASHION_MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                       "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_FASHION_MNIST_HELP = ("install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist), or "
                       "set data.root to a directory holding the four IDX files")


def _read_fashion_mnist(found: dict[str, Path], help_text: str = _FASHION_MNIST_HELP) -> dict[str, np.ndarray]:
    """The four IDX files' arrays, checked to be Fashion-MNIST's; a DataError naming the file otherwise (and
    ``help_text``, how to get a good copy). A file cut short beside a complete copy of the other kind (plain
    beside .gz: an interrupted ``gunzip -k``) is passed over for that copy."""
    arrays = {}
    for key, path in found.items():
        try:
            arrays[key] = _read_idx(path, help_text)
        except IncompleteIdxFile:
            other = path.with_suffix("") if path.suffix == ".gz" else path.with_name(f"{path.name}.gz")
            if not other.is_file():
                raise
            try:
                arrays[key] = _read_idx(other, help_text)
            except DataError:
                raise IncompleteIdxFile(f"{path} and {other} are both damaged or cut short; replace them "
                                        f"({help_text})") from None
            logger.warning("[data] %s is cut short or unreadable; reading %s beside it", path, other.name)
            found = {**found, key: other}
    return _checked_fashion_mnist(arrays, found, help_text)


def _checked_fashion_mnist(arrays: dict[str, np.ndarray], found: dict[str, Path],
                           help_text: str = _FASHION_MNIST_HELP) -> dict[str, np.ndarray]:
    """``arrays`` when they are Fashion-MNIST's shapes and labels; a DataError naming the file (of ``found``)
    and ``help_text``."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{found[f'{split}_images']} and {found[f'{split}_labels']} do not match "
                            f"(images {images.shape}, labels {labels.shape}); replace them with the "
                            f"data set's own files ({help_text})")
        if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):  # EMNIST-letters' 1-26, say
            raise DataError(f"{found[f'{split}_labels']} holds label {int(labels.max())}, but Fashion-MNIST "
                            f"has {len(FASHION_MNIST_CLASSES)} classes (0-9): not its label file; replace "
                            f"it with the data set's own ({help_text})")
    return arrays


def _find_fashion_mnist(directory: Path) -> dict[str, Path | None]:
    return {key: _find_idx(directory, stem) for key, stem in FASHION_MNIST_FILES.items()}


def _torchvision_download_dir(directory: Path) -> Path:
    return directory / "FashionMNIST" / "raw"


def _only_downloaded(directory: Path, found: dict[str, Path | None]) -> bool:
    """Whether every file found lies where torchvision's download puts them: a download of ours, to be done
    again when it is incomplete; files the user put in ``data.root`` itself are never replaced."""
    return all(path.parent == _torchvision_download_dir(directory) for path in found.values() if path is not None)


def _remove_unreadable_downloads(raw: Path) -> list[str]:
    """Delete the IDX files in torchvision's download directory that are cut short, and name them: torchvision
    takes an extracted file that exists as complete, and checks only the archives."""
    removed = []
    for stem in FASHION_MNIST_FILES.values():
        for path in (raw / stem, raw / f"{stem}.gz"):
            if path.is_file():
                try:
                    _read_idx(path)
                except IncompleteIdxFile:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
                except DataError:  # complete, but not Fashion-MNIST's: refused by the shapes and labels check
                    pass
    return removed


def _torchvision_fashion_mnist(target: Path) -> dict[str, np.ndarray]:
    """Fashion-MNIST through torchvision's download into ``target`` (a copy already there is read); a copy
    whose files are cut short (an interrupted download, or extraction) is downloaded again, once."""
    import torchvision

    raw = _torchvision_download_dir(target)
    for attempt in (1, 2):
        try:
            train = torchvision.datasets.FashionMNIST(str(target), train=True, download=True)
            test = torchvision.datasets.FashionMNIST(str(target), train=False, download=True)
            break
        # (a file cut short reads as a bad shape, an empty one as a ValueError, a 1-3 byte one an AssertionError)
        except (RuntimeError, ValueError, EOFError, OSError, AssertionError, TypeError) as err:
            removed = _remove_unreadable_downloads(raw) if attempt == 1 else []
            if not removed:  # (as the caller's errors: a download or read that failed)
                raise err if isinstance(err, RuntimeError | ValueError | EOFError | OSError) else RuntimeError(
                    f"torchvision could not read {raw} ({type(err).__name__}: {err})") from None
            logger.warning("[data] %s: %s cut short; downloading them again", raw, ", ".join(removed))
    arrays = {"train_images": train.data.numpy(), "train_labels": train.targets.numpy(),
              "test_images": test.data.numpy(), "test_labels": test.targets.numpy()}
    return _checked_fashion_mnist(arrays, {key: raw / stem for key, stem in FASHION_MNIST_FILES.items()})


def _fashion_mnist_arrays(cfg: DataConfig) -> dict[str, np.ndarray]:
    root = Path(cfg.root).expanduser() if cfg.root else None
    # Debian's copy only where no data.root is given: a data.root with a typo trained on that copy without a
    # word, and recorded the wrong root with its models. Without one and with data.download false (offline), an
    # earlier download to the default cache is read too: it was "not found". (With downloads on, torchvision's
    # reading of the cache below also redoes a download that was cut short.)
    searched = [root] if root else [DEBIAN_FASHION_MNIST, *([] if cfg.download else [_default_root("fashion-mnist")])]
    # With data.root set, Debian's copy is not read: the fix is the root (or unsetting it).
    help_text = (f"check data.root, or unset it to read Debian's dataset-fashion-mnist package ({DEBIAN_FASHION_MNIST})"
                 if root else _FASHION_MNIST_HELP)
    unfinished = None  # what is wrong with a download into data.root that was cut short (Ctrl-C, a lost network)
    for directory in searched:
        found = _find_fashion_mnist(directory)
        if all(found.values()):
            try:
                return _read_fashion_mnist(found, help_text)
            except IncompleteIdxFile as err:  # (a file complete but not Fashion-MNIST's is no download's)
                if not (directory == root and cfg.download and _only_downloaded(directory, found)):
                    raise
                unfinished = str(err)
        elif directory == root and any(found.values()):
            missing = [stem for key, stem in FASHION_MNIST_FILES.items() if found[key] is None]
            if not (cfg.download and _only_downloaded(directory, found)):
                raise DataError(f"data.root {root} holds some Fashion-MNIST IDX files but not {', '.join(missing)} "
                                "(plain or .gz); add them, or point data.root at a complete copy")
            unfinished = f"{', '.join(missing)} missing"
    where = ", ".join(map(str, searched))
    expected = ", ".join(FASHION_MNIST_FILES.values())
    if root is not None and (misnamed := _misnamed_idx_files(root)):
        raise DataError(f"data.root {root} holds IDX files under other names than Fashion-MNIST's four ({expected}, "
                        f"plain or .gz): {', '.join(misnamed[:8])}; rename them")
    if not cfg.download:
        raise DataError(f"Fashion-MNIST IDX files ({expected}, plain or .gz) not found in {where} and "
                        "data.download is false; " + help_text)
    target = root or _default_root("fashion-mnist")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target / ".download.lock")):  # one download per directory, however many workers
            if unfinished is not None:
                # Read again under the lock: the files may have been another process's download under way.
                found = _find_fashion_mnist(target)
                if all(found.values()):
                    with contextlib.suppress(DataError):
                        return _read_fashion_mnist(found)
                logger.warning("[data] the Fashion-MNIST download in %s was cut short (%s); downloading it again",
                               _torchvision_download_dir(target), unfinished)
                _remove_unreadable_downloads(_torchvision_download_dir(target))
            return _torchvision_fashion_mnist(target)
    except DataError:  # (a RuntimeError) what was read is not Fashion-MNIST's: said as it is
        raise
    except (OSError, RuntimeError, ValueError, EOFError) as err:  # URLError is an OSError; torchvision's own
        state = f"incomplete in {where} ({unfinished})" if unfinished else f"not found in {where}"
        raise DataError(f"Fashion-MNIST IDX files {state} and the download to {target} failed "
                        f"({type(err).__name__}: {err}); " + help_text) from None


def _load_fashion_mnist(cfg: DataConfig) -> ImageSplits:
    arrays = _fashion_mnist_arrays(cfg)
    full_train = RawSplit(labels=arrays["train_labels"].astype(np.int64),
                          images=np.ascontiguousarray(arrays["train_images"]))
    test = RawSplit(labels=arrays["test_labels"].astype(np.int64), images=np.ascontiguousarray(arrays["test_images"]))
    train, val = stratified_split(full_train.labels, cfg.val_fraction, cfg.seed)
    return ImageSplits(full_train.subset(train), full_train.subset(val), test, FASHION_MNIST_CLASSES, 1,
                       "fashion-mnist")


def _load_cifar10(cfg: DataConfig) -> ImageSplits:
    import torchvision

    root = Path(cfg.root).expanduser() if cfg.root else _default_root("cifar10")
    try:
        try:  # already there: read without the lock, which a read-only copy (a shared mount) could not create
            train_set = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
            test_set = torchvision.datasets.CIFAR10(str(root), train=False, download=False)
        except RuntimeError:  # not there, or damaged (torchvision checks every file's MD5)
            if not cfg.download:
                raise
            root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(root / ".download.lock")):  # one download per directory, however many workers
                train_set = torchvision.datasets.CIFAR10(str(root), train=True, download=True)
                test_set = torchvision.datasets.CIFAR10(str(root), train=False, download=True)
    except (OSError, RuntimeError) as err:  # not there, or the download failed (no network: URLError)
        hint = "the download failed" if cfg.download else "data.download is false"
        fix = "or let this machine reach the download" if cfg.download else \
            "or allow the download (data.download: true)"
        raise DataError(f"CIFAR-10 not found under {root} and {hint} ({type(err).__name__}: {err}); set data.root "
                        f"to a directory with cifar-10-batches-py, {fix}") from None
    full_train = RawSplit(labels=np.asarray(train_set.targets, dtype=np.int64), images=train_set.data)
    test = RawSplit(labels=np.asarray(test_set.targets, dtype=np.int64), images=test_set.data)
    train, val = stratified_split(full_train.labels, cfg.val_fraction, cfg.seed)
    return ImageSplits(full_train.subset(train), full_train.subset(val), test, tuple(train_set.classes), 3, "cifar10")


_LOADERS = {"digits": _load_digits, "fashion-mnist": _load_fashion_mnist, "cifar10": _load_cifar10}


@functools.lru_cache(maxsize=4)
def _load_splits_cached(cfg_json: str, excluded: tuple[str, ...]) -> ImageSplits:
    cfg = DataConfig.model_validate_json(cfg_json)
    if cfg.dataset == "imagefolder":
        from .image_folder import load_imagefolder  # imports this module

        splits = load_imagefolder(cfg, frozenset(excluded))
    else:
        splits = _LOADERS[cfg.dataset](cfg)
    if cfg.train_subset is not None and cfg.train_subset < len(splits.train):
        labels = splits.train.labels
        _, keep = stratified_split(labels, cfg.train_subset / len(labels), cfg.seed, count=cfg.train_subset)
        # The subset is the held-out side, which can miss a class: never its only image, and some classes
        # whenever fewer images are asked for than there are classes. One image of each is added back, or its
        # output would never train and nothing would say so (a few more images than asked for; a few fewer when
        # the subset is nearly the whole split, which is too close to it to stratify).
        rng = np.random.default_rng(cfg.seed)
        missing = np.setdiff1d(np.unique(labels), labels[keep])
        added = [rng.choice(np.flatnonzero(labels == label)) for label in missing]
        splits.train = splits.train.subset(np.union1d(keep, np.asarray(added, dtype=keep.dtype)))
    return splits


def load_splits(cfg: DataConfig, excluded: tuple[str, ...] = ()) -> ImageSplits:
    """The seeded train/val/test splits of ``cfg.dataset`` (cached per process).

    ``excluded``: image-folder files to leave out (relative to ``data.root``), as
    :func:`~pipelines.image_folder.check_image_folder` found them on the driver; workers get them from
    their run's settings.
    """
    return _load_splits_cached(cfg.model_dump_json(), tuple(sorted(excluded)))


def forget_loaded_splits() -> None:
    """Drop the splits this process has cached: an image folder whose files changed is read again (a notebook's
    next stage, a long ``run``), rather than planned from its old file list."""
    _load_splits_cached.cache_clear()


#: The test images tried for the example request's image before giving up (bad files left out of training).
MAX_SAMPLE_TRIES = 100


def write_sample_image(cfg: DataConfig, directory: Path) -> Path:
    """Save the first readable test image as ``sample-<dataset>-<class>.png`` for the example request printed
    after serving: its pixels as training reads them, with their EXIF orientation; an image folder's file itself
    where PNG cannot hold its mode (CMYK, LAB, 32-bit and float pixels, 16-bit ones other than PNG's and PGM's)."""
    # An image folder's files are not all checked again for one image (the `serve` command in a new process
    # decoded every file of the folder, minutes for a large one): training refuses bad files, so its split is the
    # one without exclusions. Only data.skip_bad_files leaves some out, which changes the split: checked then.
    if cfg.dataset == "imagefolder" and cfg.skip_bad_files:
        from .image_folder import check_image_folder  # imports this module

        splits = load_splits(cfg, check_image_folder(cfg))
    else:
        splits = load_splits(cfg)
    for index in range(min(len(splits.test), MAX_SAMPLE_TRIES)):
        try:
            original = splits.test.pil(index)
            break
        except Exception:  # noqa: BLE001 - a file Pillow cannot read (data.skip_bad_files): the next one
            continue
    else:
        raise DataError(f"none of the first {MAX_SAMPLE_TRIES} test images of {cfg.dataset} could be read")
    label = splits.class_names[int(splits.test.labels[index])]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"sample-{cfg.dataset}-{safe}.png"
    # A phone photo's pixels as they are, with its EXIF orientation: the server shrinks an image before turning it
    # upright, as training does; a sample saved upright was shrunk on the turned grid, pixels apart from training's
    # wherever a side is no multiple of the shrink factor. 16-bit samples in mode I, which training scales by
    # 65535: saved as a mode-I TIFF, the server scaled it by its own peak instead.
    orientation = image_orientation(original)
    image = original
    if has_sixteen_bit_samples(original) and original.mode == "I":
        image = image.convert("I;16")  # a 16-bit PNG: read as such
    elif image.mode not in PNG_MODES and splits.test.paths is not None:
        # The file itself, which the server reads as training did: float, 32-bit and big-endian 16-bit pixels
        # converted to RGB were clipped (all black or white) and a PNG holds none of them; a CMYK or LAB image
        # converted before its shrink was up to 29 grey levels off training's, which converts after it; and a
        # TIFF written with its EXIF orientation is turned upright as Pillow loads it, before the shrink.
        source = Path(splits.test.paths[index])
        path = path.with_suffix(_FORMAT_SUFFIXES.get(original.format or "", source.suffix.lower()))
        shutil.copyfile(source, path)
        return path
    if orientation != 1:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        image.save(path, exif=exif)
    else:
        image.save(path)
    return path


#: The sample's file name suffix for the formats the server takes (its curl names the content type by it).
_FORMAT_SUFFIXES = {"JPEG": ".jpg", "TIFF": ".tiff", "WEBP": ".webp", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp",
                    "PPM": ".ppm"}
#: The suffixes :func:`write_sample_image` names its files with.
SAMPLE_SUFFIXES = frozenset(_FORMAT_SUFFIXES.values())
#: Pillow modes a PNG file can hold as they are.
PNG_MODES = frozenset({"1", "L", "LA", "I;16", "P", "RGB", "RGBA"})


def _channel_stats(images: np.ndarray, channels: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (in [0, 1]) of uint8 images (N, H, W) or (N, H, W, C), from exact integer sums
    of values and squares taken a chunk of images at a time: float64 copies of the whole split took 16 bytes
    per pixel (2.2 GB for CIFAR-10's training images)."""
    flat = images.reshape(len(images), -1, channels)
    total = np.zeros(channels, dtype=np.uint64)
    squares = np.zeros(channels, dtype=np.uint64)
    for start in range(0, len(flat), chunk):
        part = flat[start:start + chunk].astype(np.uint32)
        total += part.sum(axis=(0, 1), dtype=np.uint64)
        squares += np.square(part).sum(axis=(0, 1), dtype=np.uint64)
    count = flat.shape[0] * flat.shape[1]
    mean = total.astype(np.float64) / count
    variance = np.maximum(squares.astype(np.float64) / count - mean**2, 0.0)
    return mean / 255.0, np.sqrt(variance) / 255.0


#: The share of transparent pixels from which a data set's transparency decides its background.
TRANSPARENT_SHARE = 0.05


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or "transparency" in image.info


def transparency_background(images: list[Image.Image | None]) -> int | None:
    """The grey level to composite transparent pixels onto, for images drawn on transparency (icons, sketches,
    signatures): one that contrasts with their opaque pixels (white under dark strokes, black under light ones),
    or None when under :data:`TRANSPARENT_SHARE` of the pixels are transparent (on average over ``images``;
    None stands for an image without transparency). Chosen from how bright the composited images were, black
    strokes on transparency went onto black: every image all black, in training and serving alike."""
    shares = []
    ink = inked = 0.0
    for image in images:
        if image is None or not _has_alpha(image):
            shares.append(0.0)
            continue
        grey, alpha = (np.asarray(band, dtype=np.float64) for band in image.convert("RGBA").convert("LA").split())
        shares.append(float((alpha < 128).mean()))
        ink += float((grey * alpha).sum() / 255.0)
        inked += float(alpha.sum())
    if not shares or sum(shares) / len(shares) < TRANSPARENT_SHARE or not inked:
        return None
    return 255 if ink / inked < 0.5 else 0  # the opaque pixels' mean grey, 0-1


def describe_dataset(cfg: DataConfig) -> DatasetInfo:
    """Classes, channels and the training split's per-channel mean and std (at native resolution).

    Image folders are checked first (:func:`~pipelines.image_folder.check_image_folder`): a bad file raises
    :class:`~pipelines.image_folder.BadImageFilesError` here, on the driver, before any run is planned."""
    from .image_folder import check_image_folder, test_only_files  # imports this module

    excluded = check_image_folder(cfg)
    splits = load_splits(cfg, excluded)
    train = splits.train
    background = None
    if train.images is not None:
        mean, std = _channel_stats(train.images, splits.channels)
    else:
        rng = np.random.default_rng(cfg.seed)
        probes = {level: PreprocessSpec(cfg.image_size, splits.channels, (0.0,) * splits.channels,
                                        (1.0,) * splits.channels, splits.class_names, background=level)
                  for level in (0, 255)}
        # One decode per image (a full-size photo is large): its pixels' sums on either background, and a
        # thumbnail of its alpha for the choice between them. Sums, not the converted images: stacked and in
        # float64, 256 of them took 17 bytes a pixel (3.3 GB at data.image_size 512, 13 GB at 1024).
        sums = {level: torch.zeros(splits.channels, dtype=torch.int64) for level in probes}
        squares = {level: torch.zeros(splits.channels, dtype=torch.int64) for level in probes}
        alphas, count = [], 0
        for i in rng.choice(len(train), size=min(256, len(train)), replace=False):
            image = train.pil(int(i))
            for level, probe in probes.items():
                if level == 0 or _has_alpha(image):
                    pixels = probe.image_to_uint8(image).to(torch.int32)
                    image_sums, image_squares = pixels.sum((1, 2), dtype=torch.int64), pixels.square().sum(
                        (1, 2), dtype=torch.int64)
                sums[level] += image_sums  # (without alpha, the same pixels on either background)
                squares[level] += image_squares
            count += pixels[0].numel()
            alphas.append(probes[0].alpha_thumbnail(image) if _has_alpha(image) else None)
        background = transparency_background(alphas)
        total, total_squares = sums[background or 0].double(), squares[background or 0].double()
        # The sample's std as torch.std gave it (Bessel's n - 1): the mean and std are in the runs' fingerprints
        mean = (total / count / 255.0).numpy()
        std = ((total_squares - total * total / count).clamp(min=0) / (count - 1)).sqrt().div(255.0).numpy()
    std = np.maximum(std, 1e-3)
    if background is None:  # the data set's own: dark images (MNIST-like digits) on black, the rest on white
        background = 0 if float(mean.mean()) < 0.5 else 255
    return DatasetInfo(
        dataset=cfg.dataset,
        class_names=splits.class_names,
        channels=splits.channels,
        mean=tuple(round(float(m), 6) for m in mean),
        std=tuple(round(float(s), 6) for s in std),
        background=background,
        sizes={"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        excluded_files=excluded,
        test_excluded_files=test_only_files(cfg.root, excluded) if excluded else (),
        membership=splits.membership(cfg.root),
        test_split=splits.test_identity(cfg.root),
        training_membership=splits.membership(cfg.root, ("train", "val")),
    )


def make_spec(info: DatasetInfo, image_size: int) -> PreprocessSpec:
    """The preprocessing spec for one model input size."""
    return PreprocessSpec(
        image_size=image_size,
        channels=info.channels,
        mean=info.mean,
        std=info.std,
        class_names=info.class_names,
        background=info.background,
        dataset=info.dataset,
    )


@dataclass
class ConvertedSplit:
    """An in-memory split converted to one spec: uint8 (N, C, H, W) images and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor


#: An in-memory split whose images at a model's input would take more than this is decoded per item, as image
#: folders are, instead of converted up front (CIFAR-10 at 224 px: 6.8 GB in every worker process).
MAX_CONVERTED_BYTES = 2 * 1024**3


def converted_bytes(images: int, spec: PreprocessSpec) -> int:
    """Bytes of ``images`` uint8 images at ``spec``'s input."""
    return images * math.prod(spec.input_shape)


def _to_uint8(split: RawSplit, spec: PreprocessSpec) -> torch.Tensor:
    # Filled in place: a list of per-image tensors stacked at the end held every image twice.
    converted = torch.empty((len(split), *spec.input_shape), dtype=torch.uint8)
    for i in range(len(split)):
        converted[i] = spec.image_to_uint8(split.pil(i))
    return converted


def convert_splits(splits: ImageSplits, spec: PreprocessSpec) -> dict[str, ConvertedSplit] | None:
    """Every split of an in-memory data set at ``spec``; None for image folders and for data too big to convert
    up front (:data:`MAX_CONVERTED_BYTES`): both are decoded per item."""
    parts = (splits.train, splits.val, splits.test)
    if splits.train.images is None or any(converted_bytes(len(s), spec) > MAX_CONVERTED_BYTES for s in parts):
        return None
    return {name: ConvertedSplit(_to_uint8(split, spec), torch.as_tensor(split.labels, dtype=torch.long))
            for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test))}


def augmentation_seed(epoch_seed: int, index: int) -> int:
    """The seed of one item's augmentation in one epoch: a mix of the epoch's seed and the item's index."""
    return (epoch_seed ^ (index * 0x9E3779B97F4A7C15)) & (2**63 - 1)


class EpochSampler(DistributedSampler):
    """This worker's share of a shuffled epoch; yields ``(index, augmentation seed)``.

    The order of epoch N depends on ``(seed, N)`` alone (``DistributedSampler``'s permutation, used for one
    worker too, where a plain shuffle would draw from the global RNG): a run resumed at epoch N sees the
    same batches as one that never stopped. Each index carries the seed of its augmentation, mixed from
    the epoch's ``epoch_seed`` (which the training loop draws from the torch RNG that checkpoints save and
    restore) and the index, so an image's random crop does not depend on which loader process decodes it
    nor on whether those processes persisted from an earlier epoch.
    """

    def __init__(self, dataset, *, rank: int, world: int, seed: int) -> None:
        # The seed spread out: DistributedSampler shuffles epoch N by seed + N, so seed s + 1 replayed seed s's
        # orders one epoch late, and runs over consecutive seeds (bench/accuracy.py --seeds) shared them.
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=(seed * 1_000_003) % 2**62)
        self.epoch_seed = 0

    def start_epoch(self, epoch: int, epoch_seed: int) -> None:
        """Select epoch ``epoch``'s order and its augmentation seed."""
        self.set_epoch(epoch)
        self.epoch_seed = epoch_seed

    def __iter__(self):
        for index in super().__iter__():
            yield index, augmentation_seed(self.epoch_seed, index)


class SplitDataset(Dataset):
    """One split at one spec: uint8 (C, H, W) images and int64 labels.

    In-memory data sets are converted once, up front, through the spec's PIL path (or arrive converted, a
    :class:`ConvertedSplit`); image folders, and in-memory splits too big for that (:data:`MAX_CONVERTED_BYTES`),
    are decoded lazily per item. ``augment`` adds random crops (padding 1/8 of the side, in the data set's
    background) and, where the data set allows it, horizontal flips; ``"flip"``, the flips only. Indexed with
    an ``(index, seed)`` pair (:class:`EpochSampler`), the augmentation draws from that seed; with a plain
    index, from the global RNG.
    """

    def __init__(self, split: RawSplit | ConvertedSplit, spec: PreprocessSpec, augment: bool | str = False) -> None:
        self.split = split
        self.spec = spec
        if isinstance(split, ConvertedSplit):
            self.images, self.labels = split.images, split.labels
        else:
            self.labels = torch.as_tensor(split.labels, dtype=torch.long)
            up_front = split.images is not None and converted_bytes(len(split), spec) <= MAX_CONVERTED_BYTES
            self.images = _to_uint8(split, spec) if up_front else None
        self.transform = None
        if augment:
            import torchvision.transforms.v2 as T  # noqa: N812

            # The crop's padding is the data set's own background: black borders on white-background images
            # would teach the model an edge no test or served image has.
            ops = [] if augment == "flip" else [T.RandomCrop(spec.image_size, padding=max(1, spec.image_size // 8),
                                                             fill=spec.background)]
            if spec.dataset in FLIP_OK and augment != "crop":
                ops.append(T.RandomHorizontalFlip())
            self.transform = T.Compose(ops) if ops else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = self.images[index] if self.images is not None else self.spec.image_to_uint8(self.split.pil(index))
        if self.transform is not None:
            if seed is None:
                image = self.transform(image)
            else:
                # The CPU generator only (manual_seed would reseed CUDA's too), restored afterwards: the
                # caller's RNG stream is the same whether or not it decoded images in this process.
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seed)
                    image = self.transform(image)
        return image, self.labels[index]
