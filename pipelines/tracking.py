"""MLflow tracking and model registry: the only module that talks to MLflow.

Layout in MLflow: experiment = the pipeline ``name``. Each stage invocation opens a parent run (tag
``stage``); each model (training) or coefficient triple (search) is a child run with the same params and
metrics keys, so the MLflow UI compares them side by side. The best checkpoint of every trained model is
logged as an MLflow pyfunc model "from code" (:mod:`pipelines.pyfunc_model`: the weights-only checkpoint,
the preprocessing spec, a signature and an input example; no pickle anywhere) and registered as a version
of one registered model named after the pipeline, with the model name as alias and the data set and
training fingerprint as tags; alias ``champion`` marks the version with the best ``test_acc``. Only
versions trained on the config's data set count (:meth:`Tracker.registered_versions`): aliases left by an
earlier run of the same name on other data are neither served nor champion.

Everything is logged from the driver (Tune callbacks run there), never from Train workers: one writer,
no duplicate runs after a worker restart, and workers need no access to the tracking store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoints import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint, storage_can_pass
from .config import CHAMPION, redact_text, redact_uri

__all__ = ["Tracker", "TrackingUnavailable", "RegisteredVersion", "CHAMPION", "TAG_DATASET", "TAG_DATA_ROOT",
           "TAG_FINGERPRINT", "choose_champion", "ui_hint"]

logger = logging.getLogger(__name__)


TAG_STAGE = "stage"
TAG_MODEL = "cnnzoo.model"
TAG_TRIAL = "ray.trial_id"
TAG_PARENT = "mlflow.parentRunId"
#: Per-epoch metrics (step = epoch).
EPOCH_METRICS = ("train_loss", "val_loss", "val_acc", "train_images_per_sec", "epoch_seconds", "lr")
#: Epoch metrics MLflow keeps under another name: the run's ``train_images_per_sec`` is the median over its epochs
#: (the report's figure), and MLflow's runs table shows a metric's value at its highest step, which an epoch
#: series of the same name would own (the last epoch's).
EPOCH_METRIC_NAMES = {"train_images_per_sec": "epoch_images_per_sec"}
#: Where the registered model keeps its weights-only checkpoint (``log_model`` copies artifacts under
#: ``artifacts/``); versions registered as pickled PyTorch models kept it under ``extra_files/``.
REGISTERED_CHECKPOINTS = (f"artifacts/{CHECKPOINT_FILE}", f"extra_files/{CHECKPOINT_FILE}")
#: Version tags that say which data a version was trained on (also a run param, for older versions).
TAG_DATASET, TAG_DATA_ROOT, TAG_FINGERPRINT = "dataset", "data_root", "fingerprint"
#: The version tag naming the test images its test accuracy was measured on (``DatasetInfo.test_split``).
TAG_TEST_SPLIT = "test_split"
#: Metrics logged once when a run ends.
FINAL_METRICS = ("test_acc", "test_loss", "best_val_acc", "best_epoch", "train_images_per_sec", "train_seconds")

#: The version tags that name one training of a model (its settings and its length): a registration, an upload
#: or a result record of that training is known by them (a result record holds them as its own fields).
TRAINING_TAGS = ("fingerprint", "epochs")

#: MLflow error codes no retry gets past: the request itself is refused, or what it names does not exist
#: (the credentials' codes are not the write's: the queue keeps such writes, see :func:`is_auth_refusal`).
#: Others (INTERNAL_ERROR: also an unreachable server; TEMPORARILY_UNAVAILABLE, REQUEST_LIMIT_EXCEEDED,
#: RESOURCE_CONFLICT and ABORTED: concurrent writers; ENDPOINT_NOT_FOUND: MLflow's client names any 404 without a
#: JSON body so, a proxy's while MLflow restarts too) can pass. A BAD_REQUEST that names a lost database
#: connection can pass too (see :func:`is_unreachable`).
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                              "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED",
                              "CUSTOMER_UNAUTHORIZED", "NOT_FOUND", "ALREADY_EXISTS"})

#: The SQLAlchemy errors MLflow's database sessions report as BAD_REQUEST that are the database going away (a
#: pool's timeout, a connection lost in a failover), by the error codes their messages link to (3o7r, rvf5,
#: e3q8): through a tracking server only the message is left of the cause.
_DATABASE_LOST = re.compile(r"sqlalche\.me/e/\w+/(3o7r|rvf5|e3q8)\b|QueuePool limit of size")


#: How MLflow's client names the status of a reply without a JSON body (its error code keeps only the statuses
#: it knows: a 405, 413, 414 or 422 becomes INTERNAL_ERROR, as a server's failure does).
_MLFLOW_STATUS = re.compile(r"failed with error code (\d{3}) != \d{3}")

#: MLflow's error codes and the HTTP statuses of credentials refused (an expired token, a rotated password, a
#: server that refuses this client's Host header): a matter of this machine's configuration, not of the write.
AUTH_ERRORS = frozenset({"UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "PERMISSION_DENIED"})
AUTH_STATUSES = (401, 403)
#: How MLflow's auth app refuses one resource to a user it knows (a model they may read but not write): a 403
#: with this body, relayed by MLflow's client. Only that write is refused.
_ONE_RESOURCE_REFUSED = "Response body: 'Permission denied'"


def http_status(err: BaseException, *, http_only: bool = False) -> int | None:
    """The HTTP status an error (or one of its causes) carries: ``requests``' ``response.status_code``, the
    status MLflow's client names in its message, or botocore's ``response["ResponseMetadata"]
    ["HTTPStatusCode"]`` (an S3 artifact store; not with ``http_only``); None without one."""
    cause, depth = err, 0
    while cause is not None and depth < 10:
        response = getattr(cause, "response", None)
        status = getattr(response, "status_code", None)
        if status is None and isinstance(response, dict) and not http_only:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status is None and getattr(cause, "error_code", None) == "INTERNAL_ERROR":  # (the others say enough)
            named = _MLFLOW_STATUS.search(str(cause))
            status = int(named.group(1)) if named else None
        if isinstance(status, int):
            return status
        cause, depth = cause.__cause__ or cause.__context__, depth + 1
    return None


def is_auth_refusal(err: BaseException) -> bool:
    """Whether MLflow (or a proxy in front of it) refused this machine's credentials or this client (401, 403:
    an expired token, Databricks' "Invalid access token", MLflow's "Invalid Host header"). No write is at fault,
    and the next one meets the same refusal until the configuration is mended. Not MLflow's auth app refusing one
    resource to a user it knows: only that write is refused."""
    if _ONE_RESOURCE_REFUSED in str(err):
        return False
    return getattr(err, "error_code", None) in AUTH_ERRORS or http_status(err, http_only=True) in AUTH_STATUSES


def _database_unavailable(err: BaseException) -> bool:
    # A database store's engine that cannot connect, or a sqlite file locked by another writer, raises the DB
    # driver's OperationalError unwrapped (MLflow wraps it only inside its sessions, and every other SQLAlchemy
    # error there as BAD_REQUEST: a connection pool's timeout, a connection lost in a database failover).
    return type(err).__name__ in ("OperationalError", "InterfaceError", "TimeoutError", "DisconnectionError") \
        and type(err).__module__.split(".")[0] in ("sqlalchemy", "sqlite3", "psycopg2", "psycopg", "pymysql",
                                                   "MySQLdb")


def is_unreachable(err: BaseException) -> bool:
    """Whether an MLflow call failed because the tracking server or its artifact store did not answer (or
    answered "try later": 5xx, 429), not because it refused the request or lacks what was asked for (4xx,
    RESOURCE_DOES_NOT_EXIST...): that can pass. The error's causes are looked through, since MLflow wraps the
    HTTP library's errors (a refused connection comes as an INTERNAL_ERROR whose cause says so)."""
    cause, depth = err, 0
    while cause is not None and depth < 10:
        if isinstance(cause, ConnectionError | TimeoutError) or _database_unavailable(cause):
            return True
        cause, depth = cause.__cause__ or cause.__context__, depth + 1
    status = http_status(err)
    if status is not None:
        return status >= 500 or status in (408, 429)
    code = getattr(err, "error_code", None)
    if code == "BAD_REQUEST" and _DATABASE_LOST.search(str(err)):
        return True
    if code is not None:
        return code not in PERMANENT_ERRORS
    return type(err).__module__.split(".")[0] in ("requests", "urllib3")


#: The MLflow HTTP client's retry settings in the driver (each one only where the user has not set it).
CLIENT_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                         "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


#: How long a stage's start waits for a tracking server that does not answer (a restart takes seconds), at most:
#: a wrong port or host then fails within this, not at once (``tracking.pending_timeout_s`` caps it too).
STAGE_START_WAIT_S = 30.0


def stage_start_wait(cfg) -> float:
    """Seconds a stage's start waits for a tracking server that does not answer: :data:`STAGE_START_WAIT_S`, or
    ``tracking.pending_timeout_s`` when shorter."""
    return min(cfg.tracking.pending_timeout_s, STAGE_START_WAIT_S)


def is_database_uri(uri: str) -> bool:
    """Whether ``uri`` is a database store MLflow opens itself (sqlite, PostgreSQL, MySQL, SQL Server; with or
    without a driver, ``postgresql+psycopg2``), not a tracking server."""
    return uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql")


class TrackingUnavailable(RuntimeError):
    """The tracking server or its artifact store cannot be written at the start of a stage."""


class DeletedExperiment(TrackingUnavailable):
    """The config's MLflow experiment was deleted (its name stays taken until it is restored or purged)."""


@contextlib.contextmanager
def fluent_mlflow_uris(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``log_model``, ``register_model``) pointed at ``uri`` for the block, then put back as it
    was: it reads process-wide URIs (and sets them in the environment, for subprocesses). Left set, a notebook's
    own ``mlflow.set_tracking_uri`` afterwards still loaded ``models:/`` from the pipeline's store (the registry
    URI, set too, wins)."""
    import mlflow

    saved_environment = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:  # what was set, not what the getters resolve to (an unset URI follows the tracking URI or the default)
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    except (ImportError, AttributeError):  # an MLflow that moved them
        saved = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when the message is empty), for one-line logs; a
    URL's password in it masked."""
    return redact_text((str(err).strip().splitlines() or [type(err).__name__])[0])[:300]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def choose_champion(scores: dict[str, float | None], *, tiebreak: dict[str, float | None] | None = None,
                    allow_unscored: bool = False) -> str | None:
    """The alias with the highest score; among equal scores, the highest ``tiebreak`` (validation accuracy), then
    the first in ``scores``: the order of the report's table (:func:`pipelines.results.comparison_table`).

    Aliases without a finite score (none, NaN: ``nan > x`` and ``x > nan`` are both false, so a NaN first in line
    would have stayed the best) rank below every scored one; with ``allow_unscored`` the first of them wins
    when none has a score (checkpoint files served without metrics), otherwise there is no champion.
    """
    tiebreak = tiebreak or {}

    def rank(alias: str) -> tuple[float, float]:
        second = tiebreak.get(alias)
        return scores[alias], second if _finite(second) else -math.inf

    best = None
    for alias, score in scores.items():
        if _finite(score) and (best is None or rank(alias) > rank(best)):
            best = alias
    if best is not None:
        return best
    return next(iter(scores), None) if allow_unscored else None


def model_signature(spec):
    """The registered model's MLflow signature: preprocessed images ``(N, C, H, W)`` in, logits out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *spec.input_shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.num_classes))]),
    )


@dataclass(frozen=True)
class RegisteredVersion:
    """One aliased version of the registered model."""

    alias: str
    version: str
    tags: dict[str, str]
    uri: str  # models:/<name>/<version>
    #: Its checkpoint's key in a download cache (:meth:`Tracker.download_checkpoint`): a replica that has the
    #: file needs no registry to find it.
    cache_key: str = ""


class Tracker:
    """A thin, picklable handle on one MLflow experiment (the client is created lazily per process)."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_root: str | None = None, *,
                 dataset: str | None = None, data_root: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.artifact_root = artifact_root
        # The data the config trains on: registered versions of other data are left out (None: all count).
        self.dataset = dataset
        self.data_root = data_root
        self._client = None
        self._experiment_id: str | None = None

    @classmethod
    def for_config(cls, cfg) -> Tracker:
        """The tracker of a pipeline config: experiment = ``cfg.name``; database stores (sqlite, or a
        PostgreSQL, MySQL or SQL Server URI) keep their artifacts in ``<workdir>/mlartifacts``, servers decide for
        themselves. (A database URI without it put them in ``./mlruns`` of whatever directory the command ran in:
        under `ray job submit`, a temporary copy of the job's working directory.) Only registered versions trained
        on ``cfg.data`` count (for ``imagefolder``: the same ``data.root``)."""
        uri = cfg.tracking_uri
        root = cfg.paths.mlflow_artifacts.as_uri() if is_database_uri(uri) else None
        data_root = cfg.data.root if cfg.data.dataset == "imagefolder" else None
        return cls(uri, cfg.name, artifact_root=root, dataset=cfg.data.dataset, data_root=data_root)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None  # SQLAlchemy engines do not pickle; reconnect after unpickling
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            logging.getLogger("alembic").setLevel(logging.WARNING)
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            # Fail a request within seconds rather than MLflow's minutes of back-off: the tracking queue
            # retries for as long as a stage lasts, and stage-start checks should fail fast and clearly.
            for variable, value in CLIENT_RETRY_DEFAULTS.items():
                os.environ.setdefault(variable, value)
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                self._experiment_id = self.client.create_experiment(
                    self.experiment_name,
                    artifact_location=self.artifact_root,
                    # Opens the classic runs table rather than the GenAI view in MLflow 3's UI.
                    tags={"mlflow.experimentKind": "custom_model_development"},
                )
            elif experiment.lifecycle_stage == "deleted":
                # MLflow keeps a deleted experiment's name taken: writing to it fails ("must be in the 'active'
                # state") and creating another of the name too, at every stage, until it is restored or purged.
                uri, number = redact_uri(self.tracking_uri), experiment.experiment_id
                database = "$MLFLOW_TRACKING_URI" if is_database_uri(uri) else "<the server's database>"
                raise DeletedExperiment(
                    f"MLflow experiment '{self.experiment_name}' (id {number}) is deleted (in the MLflow UI?) and "
                    f"keeps its name taken: with MLFLOW_TRACKING_URI={uri}, restore it (`mlflow experiments restore "
                    f"--experiment-id {number}`) or remove it and its runs for good (`mlflow gc --experiment-ids "
                    f"{number} --backend-store-uri {database}`); or give this config another `name`")
            else:
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    # -- runs ------------------------------------------------------------------------------------------
    def start_run(self, run_name: str, tags: dict[str, str], parent_run_id: str | None = None,
                  start_time_ms: int | None = None) -> str:
        """Create a run, started at ``start_time_ms`` (when it started; default now)."""
        tags = dict(tags)
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        return self.client.create_run(self.experiment_id, start_time=start_time_ms, tags=tags,
                                      run_name=run_name).info.run_id

    def find_run(self, filter_string: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def reopen(self, run_id: str, parent_run_id: str | None = None) -> None:
        """A run running again (a resumed stage or trial): its status RUNNING, and the error of its failed attempt
        kept as ``previous_error`` (left as ``error``, a trial that then finished still showed the traceback)."""
        self.client.update_run(run_id, status="RUNNING")
        error = self.client.get_run(run_id).data.tags.get("error")
        if error is not None:
            self.client.set_tag(run_id, "previous_error", error)
            self.client.delete_tag(run_id, "error")
        if parent_run_id:
            self.client.set_tag(run_id, TAG_PARENT, parent_run_id)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run = self.client.get_run(run_id)
        existing = run.data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        if new:
            self.client.log_batch(run_id, params=new)

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0,
                    timestamp_ms: int | None = None) -> None:
        """Log finite metrics at ``step``, stamped ``timestamp_ms`` (when they were measured; default now)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        batch = [Metric(k, float(v), stamp, int(step)) for k, v in metrics.items() if _finite(v)]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def end_run(self, run_id: str, status: str = "FINISHED", end_time_ms: int | None = None) -> None:
        """End a run as ``status``, at ``end_time_ms`` (when it ended; default now)."""
        self.client.set_terminated(run_id, status=status, end_time=end_time_ms)

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def delete_artifact(self, run_id: str, artifact_path: str) -> None:
        """Delete one of a run's artifacts (MLflow's client has no call for it: its artifact repository does,
        for local, S3 and proxied stores)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        # (with this tracker's URI: a proxied store's mlflow-artifacts:/ URI resolved against the process's)
        get_artifact_repository(self.client.get_run(run_id).info.artifact_uri,
                                tracking_uri=self.tracking_uri).delete_artifacts(artifact_path)

    def open_stage_run(self, run_name: str, tags: dict[str, str], params: dict[str, Any], config_yaml: str,
                       reuse: str | None = None, wait_s: float = 0.0) -> str:
        """Open a stage's parent run (the run ``reuse`` matches, when there is one) and write the resolved
        config into it as ``config.yaml``. This is the stage's check that the tracking store and the
        artifact store both take writes, made before any model starts: a wrong URI or bucket is a
        :class:`TrackingUnavailable` error in seconds, not after training. A server that does not answer
        (:func:`is_unreachable`: restarting, say) is waited for up to ``wait_s`` first."""
        deadline, run_id, waiting = None, None, False
        while True:
            try:
                if run_id is None:  # (a retry after the run was created only logs its parameters)
                    previous = self.find_run(reuse) if reuse else None
                    if previous is not None:
                        self.reopen(previous.info.run_id)  # (before run_id: a reopening that failed is retried)
                        run_id = previous.info.run_id
                    else:
                        run_id = self.start_run(run_name, tags)
                self.log_params(run_id, params)
                break
            except DeletedExperiment:
                raise  # (its whole message: the commands that end it)
            except Exception as err:
                if deadline is None:  # from the first failure (the client's own retries took seconds before it)
                    deadline = time.monotonic() + wait_s
                if is_unreachable(err) and time.monotonic() < deadline:
                    if not waiting:
                        logger.warning("[tracking] MLflow at %s does not answer (%s); trying again for up to %.0f s",
                                       redact_uri(self.tracking_uri), first_line(err), wait_s)
                        waiting = True
                    time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
                    continue
                raise TrackingUnavailable(f"cannot write to the MLflow tracking store at "
                                          f"{redact_uri(self.tracking_uri)}: {first_line(err)}") from err
        if waiting:
            logger.info("[tracking] MLflow at %s answers again", redact_uri(self.tracking_uri))
        try:
            self.client.log_text(run_id, config_yaml, "config.yaml")
        except Exception as err:
            location = self.client.get_run(run_id).info.artifact_uri
            self.end_run(run_id, "FAILED")
            raise TrackingUnavailable(
                f"cannot write artifacts to {location} (the experiment's artifact location; check the bucket "
                f"name and this machine's credentials): {first_line(err)}") from err
        return run_id

    # -- registry --------------------------------------------------------------------------------------
    def log_and_register(
        self, run_id: str, checkpoint_dir: str | os.PathLike, registered_model: str, alias: str,
        tags: dict[str, Any] | None = None,
    ) -> str:
        """Log a checkpoint as an MLflow pyfunc model under ``run_id``, register it and set ``alias``.

        Returns the new version number. The model is logged "from code" (:mod:`pipelines.pyfunc_model`, whose
        loader rebuilds the architecture from cnnmodels by name): its artifacts are the checkpoint without
        the optimizer state (read back with ``weights_only``) and the preprocessing spec as JSON, so
        ``mlflow.pyfunc.load_model`` unpickles nothing and servers download one file.
        """
        checkpoint = load_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE, keep_model=False)  # (uploads files)
        version_tags = {k: str(v) for k, v in (tags or {}).items()}
        if (done := self.alias_registered_version(registered_model, run_id, alias, version_tags)) is not None:
            return done
        with fluent_mlflow_uris(self.tracking_uri):
            return self._log_and_register(checkpoint, run_id, registered_model, alias, version_tags)

    def _log_and_register(self, checkpoint, run_id: str, registered_model: str, alias: str,
                          version_tags: dict[str, str]) -> str:
        import mlflow
        import torch
        import torchvision

        from . import pyfunc_model

        uploaded = self._logged_model_of(run_id, version_tags)
        if uploaded is not None:  # uploaded by an attempt whose registration failed (MLflow down after it)
            version = mlflow.register_model(f"models:/{uploaded}", registered_model, tags=version_tags)
            self.client.set_registered_model_alias(registered_model, alias, version.version)
            return str(version.version)
        with tempfile.TemporaryDirectory() as scratch:
            weights = save_checkpoint(dataclasses.replace(checkpoint, training_state=None),
                                      Path(scratch) / CHECKPOINT_FILE)
            spec_file = Path(scratch) / "preprocess.json"
            spec_file.write_text(json.dumps(checkpoint.spec.to_dict(), indent=2))
            with mlflow.start_run(run_id=run_id, nested=True), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*An input example was not provided")
                # The signature is known from the spec; no input example, since MLflow would load and run
                # the model to validate it, seconds of the driver's CPU while the next model trains.
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=pyfunc_model.__file__,
                    artifacts={pyfunc_model.CHECKPOINT_ARTIFACT: str(weights), "preprocess": str(spec_file)},
                    signature=model_signature(checkpoint.spec),
                    pip_requirements=[f"torch>={torch.__version__.split('+')[0]}",
                                      f"torchvision>={torchvision.__version__.split('+')[0]}", "numpy"],
                    tags=version_tags,  # which training it is, for a retry (_logged_model_of)
                )
        version = mlflow.register_model(info.model_uri, registered_model, tags=version_tags)
        self.client.set_registered_model_alias(registered_model, alias, version.version)
        return str(version.version)

    def alias_registered_version(self, registered_model: str, run_id: str, alias: str,
                                 tags: dict[str, Any] | None = None) -> str | None:
        """The version ``run_id`` already registered of this training (``tags``: its fingerprint and epochs),
        ``alias`` pointed at it; None when there is none. A registration retried after its version went through
        (its reply or the alias lost) finds it here: registering again would add a second one of the same
        training."""
        version_tags = {k: str(v) for k, v in (tags or {}).items()}
        done = self._registered_version_of(registered_model, run_id, version_tags)
        if done is not None:
            self.client.set_registered_model_alias(registered_model, alias, done)
        return done

    def _logged_model_of(self, run_id: str, tags: dict[str, str]) -> str | None:
        """The id of the logged model an earlier attempt uploaded for this run's training (its fingerprint and
        epochs), if one is complete. Attempts that failed (an artifact store that did not answer) are deleted:
        MLflow creates the logged model before the upload, and a registration retried through an outage left
        one behind per attempt, hundreds in the experiment's Models tab."""
        from mlflow.entities import LoggedModelStatus

        experiment_id = self.client.get_run(run_id).info.experiment_id
        complete = None
        for model in self.client.search_logged_models(
                experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = 'model'"):
            if model.status == LoggedModelStatus.READY:
                if complete is None and all(model.tags.get(k) == tags.get(k) for k in TRAINING_TAGS):
                    complete = model.model_id
                continue
            try:
                self.client.delete_logged_model(model.model_id)
            except Exception as err:  # noqa: BLE001 - tidying up; the registration does not depend on it
                logger.debug("could not delete the failed upload %s: %s", model.model_id, err)
        return complete

    def _registered_version_of(self, registered_model: str, run_id: str, tags: dict[str, str]) -> str | None:
        """The version this run already registered with these tags' training (fingerprint and epochs), if any."""
        for version in self.client.search_model_versions(f"name = '{registered_model}' and run_id = '{run_id}'"):
            if all(version.tags.get(key) == tags.get(key) for key in TRAINING_TAGS):
                return str(version.version)
        return None

    def _registered(self, registered_model: str):
        """The registered model; :class:`LookupError` only when MLflow says it does not exist. Any other failure
        (MLflow unreachable) is raised as it is: read as "not found", a champion update queued during an
        outage counted as sent, and ``serve`` told the user to train first."""
        try:
            return self.client.get_registered_model(registered_model)
        except Exception as err:
            if getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise LookupError(f"registered model {registered_model!r} not found at {redact_uri(self.tracking_uri)}; "
                              "train first") from err

    def trained_on_this_data(self, tags: dict[str, str], run_id: str | None) -> bool:
        """Whether a version was trained on this tracker's data set: its ``dataset`` tag (or, for versions
        registered before the tag existed, its run's ``dataset`` param) names it, and for ``imagefolder``
        its ``data_root`` tag names the same root. Versions that say nothing count."""
        if self.dataset is None:
            return True
        dataset = tags.get(TAG_DATASET)
        if dataset is None and run_id:
            try:
                dataset = self.client.get_run(run_id).data.params.get("dataset")
            except Exception:  # noqa: BLE001 - a deleted run: nothing to compare
                dataset = None
        if dataset is not None and dataset != self.dataset:
            return False
        return self.data_root is None or tags.get(TAG_DATA_ROOT, self.data_root) == self.data_root

    def registered_versions(self, registered_model: str) -> tuple[list[RegisteredVersion], str | None]:
        """Every aliased version trained on this tracker's data (but ``champion`` itself), by alias, and the
        alias the champion points at (None when it points at a version of other data).

        Raises ``LookupError`` when nothing is registered under ``registered_model``.
        """
        registered = self._registered(registered_model)
        current: dict[str, dict[str, str] | None] = {}  # version -> its tags, None for another data set
        cache_keys: dict[str, str] = {}
        versions = []
        for alias, version in sorted(registered.aliases.items()):
            if alias == CHAMPION:
                continue
            if version not in current:
                details = self.client.get_model_version(registered_model, version)
                tags = dict(details.tags)
                current[version] = tags if self.trained_on_this_data(tags, details.run_id) else None
                cache_keys[version] = self._cache_key(registered_model, details)
            if current[version] is None:
                logger.info("@%s (version %s of %s) was trained on other data than %s: left out", alias, version,
                            registered_model, self.dataset)
                continue
            versions.append(RegisteredVersion(alias, str(version), current[version],
                                              f"models:/{registered_model}/{version}", cache_keys[version]))
        champion_version = str(registered.aliases.get(CHAMPION))
        champion = next((v.alias for v in versions if v.version == champion_version), None)
        return versions, champion

    def champion_alias(self, registered_model: str) -> str | None:
        """The model alias ``champion`` points at, or None (nothing registered, no champion yet)."""
        champion = self.champion(registered_model)
        return champion[0] if champion else None

    def champion(self, registered_model: str) -> tuple[str, str] | None:
        """(alias, version) of the champion, or None (nothing registered, no champion yet)."""
        try:
            versions, alias = self.registered_versions(registered_model)
        except LookupError:
            return None
        return next(((v.alias, v.version) for v in versions if v.alias == alias), None)

    def update_champion(self, registered_model: str, metric: str = "test_acc",
                        test_split: str | None = None) -> tuple[str, str] | None:
        """Point alias ``champion`` at the best ``metric`` among the aliased versions trained on this
        tracker's data and tested on the test images ``test_split`` names (default: those of the newest
        version that names them); returns (alias, version), or None (and no champion alias) when none has a
        score. Versions registered before they named their test images count, as for the data set.

        Checked once set: another command that registered a version meanwhile (two trainings sharing the
        registered model, `register` beside `train`) could have moved its model's alias after this one read
        the aliases, leaving the champion on a version no model alias named any more; then chosen again."""
        for _ in range(3):
            try:
                versions, _ = self.registered_versions(registered_model)
            except LookupError:
                return None
            chosen = self._point_champion(registered_model, versions, metric, test_split)
            try:
                now, _ = self.registered_versions(registered_model)
            except LookupError:
                return chosen
            if {(v.alias, v.version) for v in now} == {(v.alias, v.version) for v in versions}:
                break
        return chosen

    def _point_champion(self, registered_model: str, versions: list[RegisteredVersion], metric: str,
                        test_split: str | None) -> tuple[str, str] | None:
        """:meth:`update_champion` on the aliased ``versions`` read."""
        if test_split is None:
            named = [v for v in versions if v.tags.get(TAG_TEST_SPLIT)]
            test_split = max(named, key=lambda v: int(v.version)).tags[TAG_TEST_SPLIT] if named else ""
        if test_split:
            # Another data.seed or data.test_fraction tests on other images (some of them this training's own):
            # accuracies of two test splits do not compare.
            versions = [v for v in versions if v.tags.get(TAG_TEST_SPLIT, test_split) in ("", test_split)]
        def tag(version: RegisteredVersion, key: str) -> float | None:
            try:
                return float(version.tags[key]) if key in version.tags else None
            except ValueError:
                return None

        alias = choose_champion({v.alias: tag(v, metric) for v in versions},
                                tiebreak={v.alias: tag(v, "best_val_acc") for v in versions})
        if alias is None:
            if CHAMPION in self._registered(registered_model).aliases:  # it points at other data
                self.client.delete_registered_model_alias(registered_model, CHAMPION)
            return None
        version = next(v.version for v in versions if v.alias == alias)
        self.client.set_registered_model_alias(registered_model, CHAMPION, version)
        return alias, version

    def _listed(self, location: str, relative: str) -> bool | None:
        """Whether the artifact store lists the file ``relative`` under ``location``; None when it does not answer.

        MLflow reports any failure among a download's files as INTERNAL_ERROR, its code for an unreachable server
        too: a 404 (the file is gone), but also a disk filling up or a connection cut mid-file (the file is
        there). The store's listing tells them apart."""
        import mlflow

        folder, _, name = f"{location}/{relative}".rpartition("/")
        try:
            listing = mlflow.artifacts.list_artifacts(artifact_uri=folder, tracking_uri=self.tracking_uri)
        except Exception:  # noqa: BLE001 - any failure to list: the store is what fails
            return None
        return any(not entry.is_dir and entry.path.rpartition("/")[2] == name for entry in listing or [])

    def _cache_key(self, registered_model: str, details) -> str:
        """A version's key in the download cache: what it was registered from, so a re-created registry never
        hits an old file."""
        identity = (f"{self.tracking_uri}|{registered_model}|{details.version}|{details.source}|"
                    f"{details.creation_timestamp}")
        return hashlib.sha256(identity.encode()).hexdigest()[:12]

    def download_checkpoint(self, registered_model: str, version: str, cache_dir: str | os.PathLike,
                            cache_key: str = "") -> Path:
        """A registered version's weights-only checkpoint, and nothing else of its artifacts, cached.

        The cache entry ``<cache_dir>/<registered_model>/v<version>-<key>/model.pt`` is keyed by the
        version and by what it was registered from (:attr:`RegisteredVersion.cache_key`; given, a cached file is
        found without asking the registry, which may be down); it is downloaded once, into a temporary directory
        beside it, and moved into place whole.
        """
        import mlflow

        if cache_key:
            cached = Path(cache_dir) / registered_model / f"v{version}-{cache_key}" / CHECKPOINT_FILE
            if cached.is_file():
                return cached
        details = self.client.get_model_version(registered_model, version)
        key = self._cache_key(registered_model, details)
        target = Path(cache_dir) / registered_model / f"v{version}-{key}" / CHECKPOINT_FILE
        if target.is_file():
            return target
        # The artifact location through this client: a models:/ URI would be resolved against the process's
        # default tracking store, which in a Serve replica is not this one.
        location = self.client.get_model_version_download_uri(registered_model, version).rstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        problems, unread = [], []
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
            for relative in REGISTERED_CHECKPOINTS:
                try:
                    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{relative}", dst_path=scratch,
                                                                tracking_uri=self.tracking_uri)
                except Exception as err:  # noqa: BLE001 - MlflowException or OSError: not at this path
                    if storage_can_pass(err):  # this node's disk (full) or mount: nothing said of the version
                        raise
                    problems.append(f"{relative}: {type(err).__name__}: {err}")
                    if is_unreachable(err):
                        unread.append((relative, err))  # the store did not answer, or the file did not come
                    continue
                os.replace(local, target)
                return target
        for relative, err in unread:
            # There (a download cut off, a disk full) or a store that does not answer: can pass, not "it has no
            # checkpoint", which would fail the model for good on a serving replica.
            if self._listed(location, relative) is not False:
                raise err
        raise CheckpointError(f"models:/{registered_model}/{version} holds no weights-only checkpoint "
                              f"({'; '.join(problems)})")


def ui_hint(tracking_uri: str, experiment_id: str, port: int = 5000) -> str:
    """The command (or link) that opens this experiment's runs in the MLflow UI's model-training view
    (MLflow 3's UI opens its GenAI view unless the link asks for ``workflowType=machine_learning``)."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    shown = redact_uri(tracking_uri)  # printed: a password stays out of logs
    note = "" if shown == tracking_uri else " (with tracking.uri's password for ***)"
    if tracking_uri.startswith(("http://", "https://")):
        hint = f"open {shown.rstrip('/')}/{page}{note}"
        url = urllib.parse.urlsplit(tracking_uri)
        try:
            address = ipaddress.ip_address(url.hostname or "")
        except ValueError:  # a name, not an address
            address = None
        if address is not None and address.is_private and not address.is_loopback:
            # a private address (a cluster head's, cluster.yaml): from a laptop, through an SSH tunnel (README)
            port = url.port or (443 if url.scheme == "https" else 80)
            # Local 5001 for MLflow's 5000 (macOS's AirPlay receiver holds 5000, as the README's tunnel says)
            # and for a port below 1024 (it needs root on the laptop).
            local = 5001 if port == 5000 or port < 1024 else port
            host = f"[{url.hostname}]" if address.version == 6 else url.hostname
            hint += (f"; from elsewhere, through an SSH tunnel to a machine that reaches it (ssh -L "
                     f"{local}:{host}:{port} ..., the README's cluster section): "
                     f"{url.scheme}://127.0.0.1:{local}{url.path.rstrip('/')}/{page}")  # (a server under a prefix)
        return hint
    return f"mlflow ui --backend-store-uri '{shown}' --port {port}   # then http://127.0.0.1:{port}/{page}{note}"
