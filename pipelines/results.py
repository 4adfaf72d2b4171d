"""Per-model training results: the record each finished model leaves in ``<workdir>/<name>/train/``.

A result file means "this model is trained to its epochs, tested, logged and registered"; the training
stage skips such models on a re-run, and the report and serving stages read them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .paths import write_text_atomically

logger = logging.getLogger(__name__)

#: Unreadable records already named in a warning by this process (a `run` reads the records several times).
_unreadable_said: set[str] = set()

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ModelResult", "load_results", "comparison_table", "for_display", "to_markdown", "as_text"]


@dataclass
class ModelResult:
    model_name: str
    arch: str
    model_kwargs: dict[str, Any]
    run_name: str
    fingerprint: str
    input_size: int
    params_count: int
    macs: int
    epochs: int
    best_val_acc: float
    best_epoch: int
    test_acc: float
    train_images_per_sec: float
    train_seconds: float
    checkpoint_path: str
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str = ""
    registered_model: str = ""
    version: str = ""
    #: Why its checkpoint can never be registered (a diverged run's NaN weights), so no re-run tries again.
    registration_error: str = ""
    #: Which test images ``test_acc`` was measured on (``ModelRun.test_split``; "" in records from before it).
    test_split: str = ""
    serving_latency_ms: float | None = None
    #: Seconds since the run's trial started (``started_at``, wall-clock) at each milestone, and the summed
    #: seconds of its phases (``loop_seconds``...): where a run's time goes (``bench/overhead.py``).
    timeline: dict[str, float] = field(default_factory=dict)

    @property
    def diverged_at(self) -> int | None:
        """The epoch (counted from 1) at which its training diverged and stopped (its loss NaN or infinite), if it
        did: its numbers are those of its best epoch before."""
        last = self.history[-1] if self.history else {}
        return int(last["epoch"]) + 1 if last.get("diverged") and "epoch" in last else None

    @property
    def epochs_trained(self) -> int:
        """The epochs it trained: ``epochs``, or fewer when it diverged and stopped."""
        return self.diverged_at or self.epochs

    @property
    def fixed_seconds(self) -> float | None:
        """The run's wall time minus its training loops and its wait for the compute gate: what it costs around the
        training itself (the wait is another model's training, with ``train.overlap_startup``)."""
        t = self.timeline
        if "recorded" not in t or "loop_seconds" not in t:
            return None
        waited = t["compute_granted"] - t["restored"] if "compute_granted" in t and "restored" in t else 0.0
        return t["recorded"] - t["loop_seconds"] - waited

    def save(self, directory: str | os.PathLike) -> Path:
        return write_text_atomically(Path(directory) / f"{self.model_name}.json", json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelResult:
        """The record in ``path``; a field of the wrong type (a hand edit, another program's file) is a
        ``ValueError`` naming it, not a ``TypeError`` in whichever stage first does arithmetic with it."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        known = _field_kinds()
        values = {k: v for k, v in data.items() if k in known}
        for name, value in values.items():
            if not _is_kind(value, known[name]):
                raise ValueError(f"its {name!r} is {value!r}, not {known[name]}")
        return cls(**values)


def _field_kinds() -> dict[str, str]:
    """Each record field's JSON kind: ``int``, ``number``, ``number or null``, ``string``, ``object``, ``list of
    objects`` or ``object of numbers``."""
    hints = typing.get_type_hints(ModelResult)
    kinds = {int: "int", float: "number", float | None: "number or null", str: "string",
             dict[str, Any]: "object", dict[str, float]: "object of numbers", list[dict[str, float]]: "list of objects"}
    return {f.name: kinds[hints[f.name]] for f in fields(ModelResult)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return _is_number(value)
    if kind == "number or null":
        return value is None or _is_number(value)
    if kind == "string":
        return isinstance(value, str)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "object of numbers":
        return isinstance(value, dict) and all(_is_number(v) for v in value.values())
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)  # list of objects


def load_results(directory: str | os.PathLike) -> dict[str, ModelResult]:
    """Every result record under ``directory``, by model name."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    results = {}
    for path in sorted(directory.glob("*.json")):
        try:
            result = ModelResult.load(path)
        except (ValueError, IsADirectoryError, TypeError, KeyError, AttributeError) as err:  # (not an object)
            # A foreign or damaged file (not JSON, not UTF-8, a folder) is not a finished model: said, since its
            # model then leaves the report and trains again. A record the storage fails to read (EIO,
            # permissions) is not skipped: the model would be trained again.
            if str(path) not in _unreadable_said:
                _unreadable_said.add(str(path))
                logger.warning("[results] %s is not a readable result record (%s: %s): left out", path,
                               type(err).__name__, str(err)[:200])
            continue
        if result.model_name != path.stem:
            # A copy kept beside the records (``resnet18.old.json``): filed under the name inside it, it replaced
            # the model's own record whenever it sorted later, and the model trained again at every run.
            if str(path) not in _unreadable_said:
                _unreadable_said.add(str(path))
                logger.warning("[results] %s holds the record of %r, not of %r (a copy?): left out", path,
                               result.model_name, path.stem)
            continue
        results[result.model_name] = result
    return results


def comparison_table(results: list[ModelResult], champion: str | None = None,
                     champion_version: str | None = None) -> pd.DataFrame:
    """One row per model, best test accuracy first; ``champion`` (bool) marks the registry's champion in its own
    column, so the ``model`` column stays the name to look models up by (:func:`for_display` marks it ``*``).

    ``champion_version``: the registered version the champion alias points at. A record of another training of
    that model is not the champion, whose numbers are not in it: one registered as another version, or one that
    could not be registered (a diverged retraining, its ``registration_error`` set; the alias stayed on the
    older version). Records that do not know their version otherwise (written before records kept it) are
    marked by name."""
    import pandas as pd

    def rank(r: ModelResult) -> tuple:  # the registry's order (tracking.choose_champion), on unrounded values
        def score(value: float) -> float:
            return value if math.isfinite(value) else -math.inf

        return -score(r.test_acc), -score(r.best_val_acc), r.model_name

    rows = []
    for r in sorted(results, key=rank):
        rows.append({
            "model": r.model_name,
            "arch": r.arch,
            "input": r.input_size,
            "epochs": r.epochs_trained,  # (fewer than planned for a run that diverged)
            "params": r.params_count,
            "MMACs": round(r.macs / 1e6, 1),
            "best val_acc": round(r.best_val_acc, 4),
            "test_acc": round(r.test_acc, 4),
            "train img/s": round(r.train_images_per_sec, 1),
            "train s": round(r.train_seconds, 1),
            # Always a column (empty where unmeasured): the CSV's columns must not depend on which model failed.
            "serve ms": round(r.serving_latency_ms, 2) if r.serving_latency_ms is not None else None,
            # The registry's champion version, not merely its name: a record whose registration was dropped
            # (its version empty; the alias still on an older training's) is not what `serve` answers with.
            # By name alone only without versions to compare: the champion's unknown, or a record from before
            # records kept theirs.
            "champion": r.model_name == champion and not r.registration_error
                        and (not champion_version or str(r.version) == str(champion_version)
                             or not (r.version or r.registered_model)),
        })
    return pd.DataFrame(rows)


def for_display(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`comparison_table` as people read it (console, Markdown): the champion's name marked ``*``."""
    if table.empty or "champion" not in table:
        return table
    shown = table.drop(columns="champion")
    shown["model"] = [name + (" *" if champion else "") for name, champion in zip(table["model"], table["champion"],
                                                                                    strict=True)]
    return shown


def as_text(table: pd.DataFrame) -> str:
    """``table`` as the console shows it: what was not measured (a serving latency the train stage does not
    measure, a diverged model's accuracy) as ``-``, not ``None`` or ``NaN``."""
    from pandas.api.types import is_numeric_dtype

    shown = table.copy()
    for column in shown.columns:  # None in a column of objects: na_rep leaves it (numbers keep their format)
        if not is_numeric_dtype(shown[column]):
            shown[column] = shown[column].astype(object).where(shown[column].notna(), "-")
    return shown.to_string(index=False, na_rep="-")


#: Decimals per column, by the end of its name: Markdown (tabulate's "g") writes 0.95 beside 0.9512 otherwise.
_DECIMALS = {"acc": 4, "difference": 4, "MMACs": 1, "img/s": 1, "train s": 1, "serve ms": 2}


def to_markdown(table: pd.DataFrame) -> str:
    """``table`` as a Markdown table, each accuracy to 4 decimals, each time and size to its own fixed count."""
    formats = [next((f".{n}f" for end, n in _DECIMALS.items() if str(column).endswith(end)), "g")
               for column in table.columns]
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=formats)


def format_predictions(body: dict) -> str:
    """A ``/predict`` response as a small table, for the ``predict`` command."""
    import pandas as pd

    table = pd.DataFrame(body["predictions"])[["label", "index", "score"]]
    table["score"] = table["score"].map(lambda s: f"{s:.4f}")
    header = f"model {body['model']} (version {body['version']}), server latency {body['latency_ms']:.1f} ms"
    return header + "\n" + table.to_string(index=False)
