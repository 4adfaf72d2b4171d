"""Image folders: one folder per class under ``data.root``, optionally split into ``train/``, ``val/``, ``test/``.

Hidden files and folders (``.x``, macOS's ``._x.jpg``) are never images. :func:`check_image_folder` opens
every file once on the driver; the files Pillow cannot read stop the stage (:class:`BadImageFilesError`) or,
with ``data.skip_bad_files``, are left out: the list travels to the workers in the run's settings
(``ModelRun.excluded_files``) and every process builds the same file list from it (:func:`load_imagefolder`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .config import DataConfig
from .data import IMAGE_EXTENSIONS, DataError, ImageSplits, RawSplit, stratified_split

__all__ = ["BadImageFilesError", "check_image_folder", "load_imagefolder"]

logger = logging.getLogger(__name__)


class BadImageFilesError(DataError):
    """Image files of an image folder that Pillow cannot open (bad input: the CLI exits with 2).

    ``bad`` holds every ``(path relative to data.root, reason)``; the message lists the first ten.
    """

    SHOWN = 10

    def __init__(self, root: Path, bad: list[tuple[str, str]], checked: int) -> None:
        self.root, self.bad, self.checked = root, list(bad), checked
        lines = [f"  {path}  ({reason})" for path, reason in self.bad[: self.SHOWN]]
        if len(self.bad) > self.SHOWN:
            lines.append(f"  ... and {len(self.bad) - self.SHOWN} more")
        super().__init__(
            f"{len(self.bad)} of the {checked} image files in data.root {root} cannot be read as images:\n"
            + "\n".join(lines)
            + "\nfix or remove them, or set data.skip_bad_files: true to train without them")


def _is_hidden(relative: str) -> bool:
    # ".DS_Store", macOS's AppleDouble "._x.jpg" next to every copied image, ".ipynb_checkpoints/", ".git/"
    return any(part.startswith(".") for part in relative.split("/"))


def _class_names(directory: Path) -> list[str]:
    return sorted(d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan_class_folders(root: Path, directory: Path, classes: list[str] | None = None,
                        excluded: frozenset[str] = frozenset()) -> tuple[list[str], list[str], np.ndarray]:
    """Class names, image paths and labels under ``directory`` (``root`` itself or its ``train/`` ...).

    torchvision's ``make_dataset`` walks the class folders; ``is_valid_file`` keeps files with an image
    extension that are neither hidden nor in ``excluded`` (paths relative to ``root``)."""
    from torchvision.datasets.folder import make_dataset

    if classes is None:
        classes = _class_names(directory)
    present = {name: index for index, name in enumerate(classes) if (directory / name).is_dir()}
    if not present:
        return classes, [], np.zeros(0, dtype=np.int64)

    def is_valid_file(path: str) -> bool:
        relative = Path(path).relative_to(root).as_posix()
        return (path.lower().endswith(IMAGE_EXTENSIONS) and not _is_hidden(relative)
                and relative not in excluded)

    samples = make_dataset(str(directory), present, is_valid_file=is_valid_file, allow_empty=True)
    return classes, [path for path, _ in samples], np.asarray([label for _, label in samples], dtype=np.int64)


def _image_folder_files(root: Path) -> list[str]:
    """Every file the image folder's splits would read (before exclusions), in a stable order."""
    if (root / "train").is_dir():
        classes, paths, _ = _scan_class_folders(root, root / "train")
        for name in ("val", "test"):
            if (root / name).is_dir():
                paths += _scan_class_folders(root, root / name, classes)[1]
        return paths
    return _scan_class_folders(root, root)[1]


def _unreadable(path: str) -> str | None:
    """Why Pillow cannot read ``path`` (None: it can). ``verify`` checks the structure without decoding
    the pixels (PNG chunk checksums, for one), so it costs about what reading the header does."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001 - Pillow raises many types (UnidentifiedImageError, SyntaxError...)
        return f"{type(err).__name__}: {err}".strip()
    return None


#: Folders with at least this many files log their check's progress.
CHECK_PROGRESS_MIN_FILES = 2000
#: Seconds between two progress lines of a long check.
CHECK_PROGRESS_INTERVAL_S = 10.0
#: Threads opening files at once: Pillow's reads mostly wait on storage (NFS, EFS), not on the CPU.
CHECK_THREADS = 16
#: Results of checks already done in this process, by folder content (paths, sizes, modification times):
#: the CLI checks before Ray starts and the stages call the check again; an unchanged folder is not re-read.
_CHECKED: dict[tuple[str, str], list[tuple[str, str]]] = {}
_WARNED: set[tuple[str, str]] = set()


def _find_unreadable(root: Path, paths: list[str]) -> list[tuple[str, str]]:
    """``(path relative to root, reason)`` of every file Pillow cannot open, checked on a thread pool."""
    total = len(paths)
    loud = total >= CHECK_PROGRESS_MIN_FILES
    if loud:
        logger.info("[data] checking %d image files in %s ...", total, root)
    started = last = time.perf_counter()
    bad = []
    with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="cnnzoo-check") as pool:
        for done, (path, reason) in enumerate(zip(paths, pool.map(_unreadable, paths), strict=True), start=1):
            if reason is not None:
                bad.append((Path(path).relative_to(root).as_posix(), reason))
            if loud and time.perf_counter() - last >= CHECK_PROGRESS_INTERVAL_S:
                last = time.perf_counter()
                logger.info("[data] checked %d/%d files (%.0f/s), %d unreadable so far", done, total,
                            done / (last - started), len(bad))
    if loud:
        logger.info("[data] checked %d files in %.1f s: %d unreadable", total, time.perf_counter() - started,
                    len(bad))
    return bad


def check_image_folder(cfg: DataConfig) -> tuple[str, ...]:
    """Open every file of an image folder with Pillow, once, on the driver, before anything trains.

    Returns the files to leave out (relative to ``data.root``; empty for other data sets and for clean
    folders). Files Pillow cannot open raise :class:`BadImageFilesError` listing them, unless
    ``data.skip_bad_files`` is set: then they are left out with a warning. Hidden files are not images and
    are never opened. A folder whose files are unchanged since the last check in this process is not read
    again.
    """
    if cfg.dataset != "imagefolder":
        return ()
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    paths = _image_folder_files(root)
    content = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        content.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    key = (str(root), content.hexdigest())
    if key not in _CHECKED:
        _CHECKED[key] = _find_unreadable(root, paths)
    bad = _CHECKED[key]
    if bad and not cfg.skip_bad_files:
        raise BadImageFilesError(root, bad, len(paths))
    if bad and key not in _WARNED:  # once per folder content, not once per stage
        _WARNED.add(key)
        shown = ", ".join(path for path, _ in bad[: BadImageFilesError.SHOWN])
        more = len(bad) - BadImageFilesError.SHOWN
        logger.warning("[data] data.skip_bad_files: leaving out %d unreadable file(s) of %s: %s%s", len(bad), root,
                       shown, f" and {more} more" if more > 0 else "")
    return tuple(path for path, _ in bad)


def load_imagefolder(cfg: DataConfig, excluded: frozenset[str] = frozenset()) -> ImageSplits:
    """The splits of an image folder (its ``train/``, ``val/``, ``test/`` or seeded ones), without ``excluded``."""
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    if (root / "train").is_dir():
        classes, paths, labels = _scan_class_folders(root, root / "train", excluded=excluded)
        train_all = RawSplit(labels=labels, paths=paths)
        splits = {}
        for name in ("val", "test"):
            if (root / name).is_dir():
                _, p, lab = _scan_class_folders(root, root / name, classes, excluded)
                splits[name] = RawSplit(labels=lab, paths=p)
        if "val" not in splits:
            keep, held = stratified_split(train_all.labels, cfg.val_fraction, cfg.seed)
            splits["val"], train_all = train_all.subset(held), train_all.subset(keep)
        if "test" not in splits:
            keep, held = stratified_split(train_all.labels, cfg.test_fraction, cfg.seed)
            splits["test"], train_all = train_all.subset(held), train_all.subset(keep)
        train, val, test = train_all, splits["val"], splits["test"]
    else:
        classes, paths, labels = _scan_class_folders(root, root, excluded=excluded)
        full = RawSplit(labels=labels, paths=paths)
        rest, test_idx = stratified_split(labels, cfg.test_fraction, cfg.seed)
        rest_split = full.subset(rest)
        tr, va = stratified_split(rest_split.labels, cfg.val_fraction / (1 - cfg.test_fraction), cfg.seed)
        train, val, test = rest_split.subset(tr), rest_split.subset(va), full.subset(test_idx)
    if len(classes) < 2 or len(train) == 0:
        raise DataError(f"{root} needs at least two class folders with images ({IMAGE_EXTENSIONS})")
    with Image.open(train.paths[0]) as first:
        channels = 1 if first.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    return ImageSplits(train, val, test, tuple(classes), channels, "imagefolder")
