"""Image folders: one folder per class under ``data.root``, optionally split into ``train/``, ``val/``, ``test/``.

Hidden files and folders (``.x``, macOS's ``._x.jpg``) are never images, and folders without images are no
classes. :func:`check_image_folder` decodes every file once on the driver; the files Pillow cannot read stop
the stage (:class:`BadImageFilesError`) or, with ``data.skip_bad_files``, are left out: the list travels to the
workers in the run's settings (``ModelRun.excluded_files``) and every process builds the same file list from it
(:func:`load_imagefolder`). A layout no model can learn from stops it too (:class:`ImageFolderError`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from .config import DataConfig
from .data import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageSplits,
    RawSplit,
    forget_loaded_splits,
    load_splits,
    stratified_split,
)
from .image_structure import check_structure
from .preprocess import ACCEPTED_FORMATS, ImageDecodeError

__all__ = ["BadImageFilesError", "ImageFolderError", "check_image_folder", "load_imagefolder", "test_only_files"]

logger = logging.getLogger(__name__)


class ImageFolderError(DataError):
    """An image folder the user has to fix (bad input, like a config error: the CLI exits with 2): too few
    classes or images, classes in ``val/`` or ``test/`` that ``train/`` lacks, an empty split, a link loop."""


class BadImageFilesError(ImageFolderError):
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


#: Folders file servers and operating systems add beside users' files: a Synology NAS's "@eaDir/" holds a thumbnail
#: of every image (read as training data, each leaked its original's label across the splits).
SYSTEM_FOLDERS = frozenset({"@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information",
                            "lost+found"})


def _is_hidden(relative: str) -> bool:
    # ".DS_Store", macOS's AppleDouble "._x.jpg" next to every copied image, ".ipynb_checkpoints/", ".git/"
    return any(part.startswith(".") or part in SYSTEM_FOLDERS for part in relative.split("/"))


def _class_names(directory: Path) -> list[str]:
    return sorted(d.name for d in directory.iterdir() if d.is_dir() and not _is_hidden(d.name))


def _files_not_read(root: Path) -> list[str]:
    """Files in the class folders that are not read for their names (no image extension; hidden ones aside),
    relative to ``root``: a class with half its files saved as ``.heic`` trained on the other half, unsaid."""
    skipped = []
    for folder in _split_folders(root):
        for name in _class_names(folder):
            for top, subfolders, files in os.walk(folder / name, followlinks=True):
                subfolders[:] = sorted(d for d in subfolders if not _is_hidden(d))
                skipped += [relative for file in sorted(files)
                            if not file.lower().endswith(IMAGE_EXTENSIONS)
                            and not _is_hidden(relative := Path(top, file).relative_to(root).as_posix())]
    return skipped


def _scan_class_folders(root: Path, directory: Path,
                        excluded: frozenset[str] = frozenset()) -> tuple[list[str], list[str], np.ndarray]:
    """The classes with images under ``directory`` (``root`` itself or its ``train/`` ...), their image
    paths and labels (indices into those classes).

    torchvision's ``make_dataset`` walks the class folders; ``is_valid_file`` keeps files with an image
    extension that are neither hidden nor in ``excluded`` (paths relative to ``root``). A folder without
    images is no class (an unzip's ``__MACOSX/`` holds only hidden ``._x`` files): counted, it would give
    the model an output no image ever trains."""
    from torchvision.datasets.folder import make_dataset

    folders = _class_names(directory) if directory.is_dir() else []
    if not folders:
        return [], [], np.zeros(0, dtype=np.int64)

    def is_valid_file(path: str) -> bool:
        relative = Path(path).relative_to(root).as_posix()
        return (path.lower().endswith(IMAGE_EXTENSIONS) and not _is_hidden(relative)
                and relative not in excluded)

    samples = make_dataset(str(directory), {name: i for i, name in enumerate(folders)}, is_valid_file=is_valid_file,
                           allow_empty=True)
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    used = np.unique(labels)
    return [folders[i] for i in used], [path for path, _ in samples], np.searchsorted(used, labels)


def _links_back(root: Path) -> list[str]:
    """Folder links under ``root`` that lead back to a folder the walk came through (paths relative to
    ``root``). torchvision's walk follows links (a data set assembled from linked folders must load), and
    through such a loop it would read every image above it again at each level, up to the system's limit on
    nested links: forty copies of the classes, decoded forty times by the check."""
    loops, chains = [], {str(root): {os.path.realpath(root)}}
    for top, folders, _ in os.walk(root, followlinks=True):
        chain = chains.pop(top)
        kept = []
        for name in folders:
            path = os.path.join(top, name)
            target = os.path.realpath(path)
            if target in chain:
                loops.append(Path(path).relative_to(root).as_posix())
            else:
                kept.append(name)
                chains[path] = chain | {target}
        folders[:] = kept  # os.walk descends only into what is left here
    return sorted(loops)


#: Folder names of a split data set's held-out splits, the first found used (Roboflow exports ``valid/``).
SPLIT_FOLDERS = {"val": ("val", "valid", "validation"), "test": ("test",)}
#: Names that say a folder is a split, not a class (Kaggle's ``training_set/`` and ``test_set/``, say).
SPLIT_LIKE_NAMES = frozenset({"train", "training", "train_set", "training_set", "trainset", "val", "valid",
                              "validation", "val_set", "validation_set", "test", "testing", "test_set", "testset"})


def _is_split_like(name: str) -> bool:
    """Whether a folder's name says it is a split: one of SPLIT_LIKE_NAMES, in any case."""
    return name.lower() in SPLIT_LIKE_NAMES


def _split_kind(name: str) -> str | None:
    """``train``, ``val`` or ``test`` for a folder named as that split, with or without a number after the name
    (Kaggle's ``test1/``, COCO's ``train2017/``); None for other names."""
    base = re.sub(r"[-_ ]?\d+$", "", name.lower())
    if base not in SPLIT_LIKE_NAMES:
        return None
    return "train" if base.startswith("train") else "test" if base.startswith("test") else "val"


def _has_class_folders(directory: Path) -> bool:
    return directory.is_dir() and bool(_class_names(directory))


def _has_images(directory: Path) -> bool:
    """Whether ``directory`` holds an image file, at any depth (stops at the first)."""
    return any(path.name.lower().endswith(IMAGE_EXTENSIONS) and not _is_hidden(path.relative_to(directory).as_posix())
               for path in directory.rglob("*"))


def _training_folder(root: Path) -> Path:
    """Where the training classes are: ``root/train`` when the folder comes split (``train/`` holds class
    folders), else ``root`` itself (``train/`` with its images in it is then a class: COCO has one)."""
    return root / "train" if _has_class_folders(root / "train") else root


def _split_folder(root: Path, split: str) -> Path | None:
    """The folder of a split data set's ``split`` (``val`` or ``test``), if it has one."""
    return next((root / name for name in SPLIT_FOLDERS[split] if (root / name).is_dir()), None)


def _refuse_disguised_splits(root: Path) -> None:
    """Raise :class:`ImageFolderError` for an unsplit ``root`` whose class folders are splits in disguise (a
    split-like name and class folders inside): torchvision's walk reads their images recursively, so each split
    would become one class. A split ``root`` may hold no split-like folder it would not read (``Val/``,
    ``testing/``, a second validation folder)."""
    if _training_folder(root) != root:
        read = [root / "train"] + [folder for split in SPLIT_FOLDERS if (folder := _split_folder(root, split))]
        # Compared as folders, not names: on a case-insensitive file system root/"val" is Val/, and read.
        others = [name for name in _class_names(root) if not any((root / name).samefile(folder) for folder in read)]
        # (A numbered one of loose images is an unlabelled set, as Kaggle's test1/: not read, nothing lost.)
        unlabelled = [name for name in others if _split_kind(name) and not _is_split_like(name)
                      and not _has_class_folders(root / name)]
        others = [name for name in others if name not in unlabelled]
        unread = [name for name in others if _split_kind(name)]
        if unread:  # Val/, testing/ or val2017/ beside train/: left out unsaid, never validated or tested on
            raise ImageFolderError(
                f"{root} comes split (train/), but {', '.join(f'{n}/' for n in unread)} would not be read: name the "
                "validation folder val/, valid/ or validation/ and the test folder test/ (lower case), one of each")
        # A class named train/ with folders in it (bus/ car/ train/, each sorted by year) made the folder read as
        # split: the classes became train/'s folders, and every other class's images were left out unsaid. (Beside
        # a val/ or test/ other folders are extras, not read: STL-10's unlabeled/, a nested copy of the archive.)
        held_out = len(read) > 1
        if not held_out and (unread := [name for name in others if _has_images(root / name)]):
            raise ImageFolderError(
                f"{root} is read as split, as train/ holds folders (the classes: "
                f"{', '.join(f'{n}/' for n in _class_names(root / 'train')[:5])}), but "
                f"{', '.join(f'{n}/' for n in unread[:5])}{' ...' if len(unread) > 5 else ''} beside it hold images "
                "that would not be read: if train/ is a class, not the training split, rename it; otherwise move "
                "them out of data.root")
        return
    disguised = [name for name in _class_names(root)
                 if _split_kind(name) and _has_class_folders(root / name)]
    if disguised:
        raise ImageFolderError(
            f"{root} looks split, but not into train/ val/ test/: {', '.join(f'{n}/' for n in disguised)} hold "
            "class folders and would each be read as one class; rename the training folder to train/ (the "
            f"others to val/, valid/ or validation/, and test/), or set data.root to the folder that holds the "
            "classes")
    split_named = [name for name in _class_names(root) if _split_kind(name) and _has_images(root / name)]
    # Kaggle's train/*.jpg and test/*.jpg (labels in the file names; test1/ as it unpacks): a train-vs-test model.
    # (Numbered names of one split alone, test1/ test2/ test3/, may be classes.)
    if len({_split_kind(name) for name in split_named}) >= 2 or sum(map(_is_split_like, split_named)) >= 2:
        raise ImageFolderError(
            f"{root} holds {', '.join(f'{n}/' for n in split_named)} with images directly in them: they would be "
            "read as classes named after splits; put each split's images into class folders (train/cat/1.jpg, "
            "test/cat/2.jpg), or, with one set of class folders, set data.root to it")
    # One unlabelled test/ (or val/) of loose images beside the class folders became a class named "test", its
    # images split into training, validation and test as that class. (A class train/ stays: COCO has one.)
    loose = [name for name in split_named if name.lower() not in ("train", "training")
             and not (_split_kind(name) == "train" and not _is_split_like(name))  # (train2/ may be a class too)
             and any(path.is_file() and path.name.lower().endswith(IMAGE_EXTENSIONS)
                     for path in (root / name).iterdir())]
    if loose and len(_class_names(root)) > len(loose):
        raise ImageFolderError(
            f"{root} holds {', '.join(f'{n}/' for n in loose)} with images directly in it beside the class folders: "
            "it would be read as a class named after a split; move it out of data.root (unlabelled images are not "
            "trained on), or split the folder as train/<class>/ and test/<class>/ (if it is a class, not a split: "
            "put all the class folders under train/)")


def _empty_class_folders(directory: Path, classes: list[str]) -> list[str]:
    """Class folders under ``directory`` left out for holding no images."""
    return [name for name in _class_names(directory) if name not in classes] if directory.is_dir() else []


def _split_folders(root: Path) -> list[Path]:
    """The folders of class folders the image folder's splits are read from: ``root`` (or its ``train/``), and its
    ``val/`` and ``test/`` where it has them."""
    base = _training_folder(root)
    if base == root:
        return [base]
    return [base, *(folder for split in ("val", "test") if (folder := _split_folder(root, split)) is not None)]


def test_only_files(root: str | os.PathLike, files: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``files`` (relative to ``root``) that only the test split reads: the ones in a split folder's
    ``test/``. An unsplit folder (or a split one without ``test/``) draws its test images from the same files as
    training, so none of its files is the test split's alone."""
    root = Path(root).expanduser()
    if _training_folder(root) == root or (test := _split_folder(root, "test")) is None:
        return ()
    return tuple(file for file in files if (root / file).is_relative_to(test))


def _image_folder_files(root: Path) -> list[str]:
    """Every file the image folder's splits would read (before exclusions), in a stable order."""
    return [path for folder in _split_folders(root) for path in _scan_class_folders(root, folder)[1]]


def _unreadable(path: str, data: bytes | None = None) -> str | None:
    """Why Pillow cannot read ``path`` (None: it can); ``data``: its bytes, when already read. ``verify`` checks
    the structure (PNG chunk checksums, for one) but not JPEG, BMP or TIFF pixel data: a truncated JPEG passes it
    and fails mid-epoch, so the pixels are decoded too (about a millisecond for a 500x375 JPEG)."""
    try:
        path.encode()
    except UnicodeEncodeError:  # bytes Python could only keep as surrogates: JSON, MLflow and logs refuse them
        return "its name is not valid UTF-8 (a zip made on Windows, say): rename it, e.g. with convmv"
    try:
        if data is None:
            data = Path(path).read_bytes()
        try:
            check_structure(data)
        except ImageDecodeError as err:  # (a plain-text PGM over 1 MB trained, and the server refused it with 400)
            return f"the server refuses it: {err}"
        with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as image:
            image.verify()
        with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as image:  # verify leaves it unusable
            image.load()
    except Exception as err:  # noqa: BLE001 - Pillow raises many types (UnidentifiedImageError, SyntaxError...)
        other = _other_format(data)
        if other is not None:  # (an AVIF or ICO file named .jpg: it trained, and the server refused it with 415)
            return f"{other} image data, which the server does not take ({', '.join(ACCEPTED_FORMATS)}): convert it"
        return f"{type(err).__name__}: {err}".strip()
    return None


def _other_format(data: bytes | None) -> str | None:
    """The format of an image Pillow reads but the server does not take (not one of :data:`ACCEPTED_FORMATS`)."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format if image.format not in ACCEPTED_FORMATS else None
    except Exception:  # noqa: BLE001 - not an image at all
        return None


def _checked(path: str, decoders: ThreadPoolExecutor | None = None) -> tuple[str | None, str | None]:
    """:func:`_unreadable`'s reason, and the file's SHA-1 when it is readable (for copies across splits), from
    one read of the file; decoded on ``decoders`` (default: this thread)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as err:  # removed, or no permission
        return f"{type(err).__name__}: {err}", None
    reason = _unreadable(path, data) if decoders is None else decoders.submit(_unreadable, path, data).result()
    if reason is not None:
        return reason, None
    return None, hashlib.sha1(data).hexdigest()  # noqa: S324 - a content key, not a signature


#: Folders with at least this many files log their check's progress.
CHECK_PROGRESS_MIN_FILES = 2000
#: Seconds between two progress lines of a long check.
CHECK_PROGRESS_INTERVAL_S = 10.0
#: Threads reading files at once: reads mostly wait on storage (NFS, EFS), not on the CPU.
CHECK_THREADS = 16
#: Threads decoding the files read: one per core (at most CHECK_THREADS). Decoded on the sixteen reading
#: threads, sixteen decoded images were held at once, and each thread's malloc arena kept its own (2.07 GB for
#: 24 Mpx JPEGs on 2 cores, against 0.89 GB with two threads) for no gain in speed.
DECODE_THREADS = max(1, min(CHECK_THREADS, os.cpu_count() or 1))
#: Results of checks already done in this process, by folder content (paths, sizes, modification times):
#: the CLI checks before Ray starts and the stages call the check again; an unchanged folder is not re-read.
_CHECKED: dict[tuple[str, str], tuple[list[tuple[str, str]], dict[str, str]]] = {}
_WARNED: set[tuple[str, str]] = set()
#: Each folder's content as this process last checked it: the splits cached for it are of that content.
_LAST_CONTENT: dict[str, str] = {}


def _find_unreadable(root: Path, paths: list[str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``(path relative to root, reason)`` of every file Pillow cannot open, checked on a thread pool, and the
    SHA-1 of every other file by its path."""
    total = len(paths)
    loud = total >= CHECK_PROGRESS_MIN_FILES
    if loud:
        logger.info("[data] checking %d image files in %s ...", total, root)
    started = last = time.perf_counter()
    bad, digests = [], {}
    # A window of files at a time: Executor.map makes a future for every item before it yields one (about 2 KB
    # each: 2.6 GB for ImageNet's 1.28 M files).
    window = CHECK_THREADS * 64
    with (ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="cnnzoo-check") as pool,
          ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="cnnzoo-decode") as decoders):
        check = partial(_checked, decoders=decoders)
        checked = (result for start in range(0, total, window)
                   for result in pool.map(check, paths[start:start + window]))
        for done, (path, (reason, digest)) in enumerate(zip(paths, checked, strict=True), start=1):
            if reason is not None:
                bad.append((Path(path).relative_to(root).as_posix(), reason))
            else:
                digests[path] = digest
            if loud and time.perf_counter() - last >= CHECK_PROGRESS_INTERVAL_S:
                last = time.perf_counter()
                logger.info("[data] checked %d/%d files (%.0f/s), %d unreadable so far", done, total,
                            done / (last - started), len(bad))
    if loud:
        logger.info("[data] checked %d files in %.1f s: %d unreadable", total, time.perf_counter() - started,
                    len(bad))
    return bad, digests


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
    _refuse_disguised_splits(root)  # before every file is opened: the layout is what to fix first
    if loops := _links_back(root):
        raise ImageFolderError(f"data.root {root} holds folder links that lead back to a folder above them, "
                               f"which would repeat its images without end: {', '.join(loops[:10])}"
                               f"{f' and {len(loops) - 10} more' if len(loops) > 10 else ''}; remove or replace them")
    paths = _image_folder_files(root)
    content = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:  # a dangling link (DVC, git-annex, a moved cache): the check lists it as unreadable
            content.update(os.fsencode(f"{path}\0missing\n"))
            continue
        # (the change time and inode too: a file rewritten in place with its mtime put back, as cp -p, rsync -a
        # or tar do, kept its size and mtime, and the check passed what was now unreadable)
        content.update(os.fsencode(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0"
                                   f"{stat.st_ino}\n"))
    key = (str(root), content.hexdigest())
    if _LAST_CONTENT.get(key[0]) != key[1]:
        # Files added, removed or changed since this process last read the folder (back to an earlier state
        # too): its cached splits are stale (they planned from the old files, and workers, which read the folder
        # afresh, disagreed with them).
        forget_loaded_splits()
        _LAST_CONTENT[key[0]] = key[1]
    if key not in _CHECKED:
        for older in [k for k in _CHECKED if k[0] == key[0]]:  # every file's digest: keep one content per folder
            del _CHECKED[older]
        _CHECKED[key] = _find_unreadable(root, paths)
    bad, digests = _CHECKED[key]
    if bad and not cfg.skip_bad_files:
        raise BadImageFilesError(root, bad, len(paths))
    excluded = tuple(path for path, _ in bad)
    splits = load_splits(cfg, excluded)  # the layout's errors, before anything starts (cached for the stages)
    if key not in _WARNED:  # once per folder content, not once per stage
        _WARNED.add(key)
        if bad:
            shown = ", ".join(path for path, _ in bad[: BadImageFilesError.SHOWN])
            more = len(bad) - BadImageFilesError.SHOWN
            logger.warning("[data] data.skip_bad_files: leaving out %d unreadable file(s) of %s: %s%s", len(bad),
                           root, shown, f" and {more} more" if more > 0 else "")
        if skipped := _files_not_read(root):
            logger.warning("[data] %d file(s) in the class folders of %s are not read: their names do not end in an "
                           "image extension (%s): %s%s; rename them (or convert them) to train on them", len(skipped),
                           root, " ".join(IMAGE_EXTENSIONS), ", ".join(skipped[:5]),
                           f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        base = _training_folder(root)
        if empty := _empty_class_folders(base, list(splits.class_names)):
            logger.warning("[data] no images in %s, so they are not classes: %s", base,
                           ", ".join(f"{name}/" for name in empty))
        _warn_about_copies(root, splits, digests)
    return excluded


def _warn_about_copies(root: Path, splits, digests: dict[str, str]) -> None:
    """Warn about validation or test images that are byte-identical copies of training images (a data set
    downloaded twice, ``x (1).png``; a val/ folder linked to train/): their accuracy is inflated, and model
    selection with it. Also about files whose copies carry different labels."""
    first_label: dict[str, tuple[int, str]] = {}
    relabelled = []
    for split in (splits.train, splits.val, splits.test):
        for path, label in zip(split.paths, split.labels.tolist(), strict=True):
            digest = digests.get(path)
            if digest is None:
                continue
            seen = first_label.setdefault(digest, (label, path))
            if seen[0] != label:
                relabelled.append((seen[1], path))
    in_training = {digests.get(path) for path in splits.train.paths} - {None}

    def relative(path: str) -> str:
        return Path(path).relative_to(root).as_posix() if Path(path).is_relative_to(root) else path

    for name, split in (("validation", splits.val), ("test", splits.test)):
        copies = [path for path in split.paths if digests.get(path) in in_training]
        if copies:
            logger.warning("[data] %d of the %d %s images are byte-identical to training images (e.g. %s): their "
                           "accuracy is inflated, and model selection with it; remove the copies", len(copies),
                           len(split.paths), name, ", ".join(relative(p) for p in copies[:3]))
    if relabelled:
        first, second = relabelled[0]
        logger.warning("[data] %d image file(s) appear under two classes, byte for byte (e.g. %s and %s)",
                       len(relabelled), relative(first), relative(second))


def load_imagefolder(cfg: DataConfig, excluded: frozenset[str] = frozenset()) -> ImageSplits:
    """The splits of an image folder (its ``train/``, ``val/``, ``test/`` or seeded ones), without ``excluded``.

    Raises :class:`ImageFolderError` for a folder no model can learn from: fewer than two classes with images,
    classes in ``val/`` or ``test/`` that ``train/`` lacks (a ``Cats`` beside ``cats``: their images would be
    dropped), or an empty split.
    """
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    base = _training_folder(root)
    presplit = base != root
    _refuse_disguised_splits(root)
    classes, paths, labels = _scan_class_folders(root, base, excluded)
    if len(classes) < 2:
        loose = sum(1 for f in base.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS))
        found = (f"{len(classes)} class folder with images ({classes[0]}/)" if classes
                 else "no class folders with images")
        hint = f"; its {loose} images directly in it belong in class folders" if loose else ""
        if len(classes) == 1 and _has_class_folders(base / classes[0]):  # an archive's wrapper folder
            hint += f"; {classes[0]}/ itself holds class folders: set data.root to {base / classes[0]}"
        raise ImageFolderError(f"{base} needs at least two class folders of images ({', '.join(IMAGE_EXTENSIONS)}), "
                               f"one per class: found {found}{hint}")
    train_all = RawSplit(labels=labels, paths=paths)
    splits: dict[str, RawSplit] = {}
    if presplit:
        for split in ("val", "test"):
            if (folder := _split_folder(root, split)) is not None:
                splits[split] = _split_of_train_classes(root, folder, split, classes, excluded)
    try:
        if not presplit:
            rest, test_idx = stratified_split(labels, cfg.test_fraction, cfg.seed)
            splits["test"], train_all = train_all.subset(test_idx), train_all.subset(rest)
            held = cfg.val_fraction / (1 - cfg.test_fraction)
        else:
            held = cfg.val_fraction
        if "val" not in splits:
            keep, val_idx = stratified_split(train_all.labels, held, cfg.seed)
            splits["val"], train_all = train_all.subset(val_idx), train_all.subset(keep)
        if "test" not in splits:
            keep, test_idx = stratified_split(train_all.labels, cfg.test_fraction, cfg.seed)
            splits["test"], train_all = train_all.subset(test_idx), train_all.subset(keep)
    except ValueError as err:  # scikit-learn: too few images to split
        raise ImageFolderError(f"{base} has too few images ({len(labels)}) to hold out validation and test "
                               f"images: {err}") from None
    return ImageSplits(train_all, splits["val"], splits["test"], tuple(classes), _channels(train_all.paths),
                       "imagefolder")


def _split_of_train_classes(root: Path, folder: Path, split: str, classes: list[str],
                            excluded: frozenset[str]) -> RawSplit:
    """``folder`` (the ``split``: ``val`` or ``test``) labelled with the indices of ``train/``'s ``classes``."""
    own, paths, labels = _scan_class_folders(root, folder, excluded)
    if unknown := [c for c in own if c not in classes]:
        raise ImageFolderError(
            f"{folder} has class folders with images that {root / 'train'} lacks: "
            f"{', '.join(f'{c}/' for c in unknown)} (class folders match by exact name: rename them or add "
            "training images)")
    if not paths:
        raise ImageFolderError(f"{folder} holds no images in class folders; fill it or remove it (then "
                               f"data.{split}_fraction of train/ is held out)")
    index = np.asarray([classes.index(c) for c in own], dtype=np.int64)
    return RawSplit(labels=index[labels], paths=paths)


#: Pillow modes that hold one channel: every image grey, the models get one input channel.
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
#: Training images whose modes decide the channel count (spread evenly over the split; headers only).
CHANNEL_SAMPLE = 256


def _channels(paths: list[str]) -> int:
    """1 when every sampled training image is grey, else 3: one grey image first must not turn a colour data
    set grey. Deterministic in the paths, so the driver and every worker agree."""
    # Floor division: every header up to 511 files (a colour image among a few hundred is not skipped), then about
    # CHANNEL_SAMPLE (fewer than 2x) spread evenly.
    step = max(1, len(paths) // CHANNEL_SAMPLE)
    for path in paths[::step]:
        try:
            image = Image.open(path)
        except Exception:  # noqa: BLE001 - a bad file, in a listing not checked first (the example image's)
            continue
        with image:
            if image.mode not in GREY_MODES:
                return 3
    return 1
