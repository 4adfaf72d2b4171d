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

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunPaths", "write_text_atomically"]


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it: a crash or a full disk leaves the old file
    (or none), never a cut-off one that the next command would fail to read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
