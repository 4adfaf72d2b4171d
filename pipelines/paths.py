"""Where a pipeline's outputs live: one object answers for every file and directory.

``<workdir>/<name>/`` holds what the stages leave for each other and for the user::

    <workdir>/
      mlflow.db                  the default MLflow tracking store (sqlite)
      mlartifacts/               its artifacts (logged models, report files)
      ray_results/               Ray Train/Tune storage, unless storage_path points elsewhere (S3, NFS)
      <name>/
        search/best.json         the finished coefficient search
        train/<model>.json       one record per finished model (trained, tested, registered)
        report/                  models.csv, models.md and the plots
        serve/                   serve_config.yaml for `serve deploy`, a sample image
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["RunPaths", "atomic_writer", "write_text_atomically"]


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, binary: bool = False, mode: int = 0o666) -> Iterator[IO]:
    """A file whose content replaces ``path`` whole when the block ends without an error: a crash or a full disk
    leaves the old file (or none), never a cut-off one that the next command would fail to read. Created as a
    plain ``open()`` would (0666 less the umask): mkstemp's 0600 made the report, the search result and the train
    records unreadable to anyone else sharing a workdir, and followed the files into MLflow's artifact store
    (copied with their mode), unreadable to a server or replica running as another user. ``mode``: another
    creation mode (0600 for a file that is its owner's alone), the umask applied."""
    # A link is followed (it stays a link to the new content): os.replace put a plain file in its place and left
    # the file it pointed to as it was.
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb" if binary else "w") as f:
            yield f
            # On the disk before the rename: after a power loss a file system may otherwise show the renamed
            # file empty or short (ext4 with data=writeback, XFS).
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; file systems that cannot sync a directory are left as they are."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomically(path: str | os.PathLike, text: str, mode: int = 0o666) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_writer` (``mode``: its creation mode)."""
    with atomic_writer(path, mode=mode) as f:
        f.write(text)
    return Path(path)


@dataclass(frozen=True)
class RunPaths:
    """Every output location of one pipeline config (``workdir``, ``name``, ``storage_path``)."""

    workdir: Path
    run_dir: Path  #: ``<workdir>/<name>``
    search_result: Path  #: the finished coefficient search
    train_dir: Path  #: one ``<model>.json`` record per finished model
    report_dir: Path
    serve_dir: Path
    serve_config: Path  #: for ``serve deploy`` on a running cluster
    mlflow_db: Path  #: the default tracking store
    mlflow_artifacts: Path  #: its artifacts, next to the database
    storage: str  #: Ray Train/Tune storage: a local path or a URI such as ``s3://...``

    @classmethod
    def of(cls, workdir: str, name: str, storage_path: str | None = None) -> RunPaths:
        root = Path(workdir).expanduser().resolve()
        run_dir = root / name
        if storage_path and storage_path.lower().startswith("file://"):
            # A local directory however spelled: every check of local storage (one node's disk on a cluster, a
            # directory this user may not write) looks at plain paths only.
            storage_path = urllib.parse.unquote(storage_path[len("file://"):])
        if not storage_path:
            storage = str(root / "ray_results")
        elif "://" in storage_path:
            storage = storage_path
        else:
            storage = str(Path(storage_path).expanduser().resolve())
        return cls(workdir=root, run_dir=run_dir, search_result=run_dir / "search" / "best.json",
                   train_dir=run_dir / "train", report_dir=run_dir / "report", serve_dir=run_dir / "serve",
                   serve_config=run_dir / "serve" / "serve_config.yaml", mlflow_db=root / "mlflow.db",
                   mlflow_artifacts=root / "mlartifacts", storage=storage)

    def experiment(self, label: str) -> str:
        """``<storage>/<label>``: where one Tune experiment keeps its state."""
        return f"{self.storage.rstrip('/')}/{label}"
