"""The trial machinery: one Ray Tune trial drives one Ray Train ``TorchTrainer`` (Train V2's pattern).

Both stages run models through here: the training stage one trial per model, the search one trial per
coefficient triple (the template run with the triple applied).

* :func:`build_trainer` makes the ``TorchTrainer`` of one :class:`~pipelines.planning.ModelRun`: a stable
  run name under the storage path (a re-run resumes instead of starting over), ``FailureConfig`` (a lost
  worker is replaced and training continues from the last checkpoint), and a ``CheckpointConfig`` keeping
  the best checkpoints by ``val_acc``.
* :func:`model_trial` is the Tune function trainable; its per-epoch metrics flow to Tune (ASHA, MLflow).
* :func:`run_model_trials` runs many trials, as many at a time as asked, and resumes an interrupted
  experiment of the same name.
* :func:`trial_resources` is what one trial holds (its driver plus its workers): the stages size their
  concurrency with it. :func:`trial_driver_resources` is what the trial's own actor asks for: on a cluster
  whose head declares :data:`DRIVER_NODE_RESOURCE` (cluster.yaml does) that pins every trial driver, and the
  Train controller that follows it, to the head, where losing a spot worker cannot take them down.
* Trials lost with their node are started again (``train.trial_retries``) and resume their Train run from
  its last checkpoint; a Train run that already spent its own ``train.max_failures`` is not retried again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from .config import TRIAL_DRIVER_CPU
from .paths import RunPaths
from .planning import ModelRun, coefficients_label
from .search_space import mnas_factor

__all__ = [
    "TRIAL_DRIVER_RESOURCES",
    "DRIVER_NODE_RESOURCE",
    "trial_resources",
    "trial_driver_resources",
    "build_trainer",
    "model_trial",
    "record_gave_up",
    "earlier_give_up",
    "run_model_trials",
    "reported_checkpoint_dir",
    "trial_run_name",
]

logger = logging.getLogger(__name__)

#: Resources of a Tune trial's own actor (the Train driver); its workers reserve their own.
TRIAL_DRIVER_RESOURCES = {"CPU": TRIAL_DRIVER_CPU}

#: The custom resource of the node that hosts trial drivers: cluster.yaml's head declares 1000 of it (room
#: for that many trials at once) and no other node type does. A trial driver owns its Train controller and
#: workers, so a driver on a spot node that goes away would end the whole trial; the head stays.
DRIVER_NODE_RESOURCE = "cnnzoo_driver"
#: What one trial driver takes of it.
DRIVER_NODE_RESOURCE_PER_TRIAL = 1.0

#: Written beside a Train run whose ``fit()`` gave up (its own ``max_failures`` spent), naming the Tune trial.
GAVE_UP_FILE = "cnnzoo-trial-gave-up.json"


def trial_resources(run: ModelRun, cluster: Mapping[str, float] | None = None) -> dict[str, float]:
    """CPU and GPU one trial of ``run`` holds at once: all of its workers and its driver, which takes no CPU on a
    cluster (``cluster``: ``ray.cluster_resources()``) whose head hosts the drivers (:func:`trial_driver_resources`:
    a sliver counted per trial left a run's worth of GPUs idle, 7 runs on 8 places)."""
    workers = run.workers
    driver = trial_driver_resources(cluster) if cluster is not None else TRIAL_DRIVER_RESOURCES
    return {"CPU": float(workers.cpus_per_worker) * workers.num_workers + float(driver.get("CPU", 0.0)),
            "GPU": workers.gpus_per_worker * workers.num_workers if workers.use_gpu else 0.0}


def trial_driver_resources(cluster: Mapping[str, float]) -> dict[str, float]:
    """What a trial's own actor reserves on a cluster with ``cluster`` resources (``ray.cluster_resources()``):
    one unit of :data:`DRIVER_NODE_RESOURCE` where some node declares it, so that the driver lands there, and no
    CPU (a head started with ``--num-cpus=0``, as Ray advises for large clusters, must still take the drivers).
    Without it (a laptop, CI, another cluster) drivers go wherever a sliver of CPU fits."""
    if cluster.get(DRIVER_NODE_RESOURCE, 0.0) >= DRIVER_NODE_RESOURCE_PER_TRIAL:
        return {DRIVER_NODE_RESOURCE: DRIVER_NODE_RESOURCE_PER_TRIAL}
    return dict(TRIAL_DRIVER_RESOURCES)


def build_trainer(run: ModelRun, callbacks: list | None = None):
    """The ``TorchTrainer`` for one run (stable name under the storage path, so ``fit()`` resumes)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .worker import train_loop_per_worker

    workers = run.workers
    resources = {"CPU": float(workers.cpus_per_worker)}
    if workers.use_gpu:
        resources["GPU"] = workers.gpus_per_worker  # a fraction lets several runs share one GPU
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": run},
        # NCCL only where GPUs talk to each other: a single worker has no collectives to run, and an NCCL
        # communicator per run would cost GPU memory and start-up time on a shared GPU.
        torch_config=TorchConfig(backend="nccl" if workers.use_gpu and workers.num_workers > 1 else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=workers.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run.run_name,
            storage_path=run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=workers.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=workers.checkpoints_to_keep, checkpoint_score_attribute="val_acc",
                checkpoint_score_order="max"),
            callbacks=callbacks or [],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


#: The fields of a trial's run that say where and how it runs, not what it trains (the run's fingerprint leaves
#: them out): the CPU and GPU shares, threads, the stage's data cache and compute gate.
PLACEMENT_FIELDS = ("workers", "threads", "shared_data", "compute_gate")


def trial_run(config: dict, placement: dict | None = None) -> ModelRun:
    """The run a trial's config describes: ``config["run"]``, with ``config["coefficients"]`` (alpha,
    beta, gamma) applied when the trial is a search trial.

    ``placement`` is the run the current command planned (a ``ModelRun`` dict): a trial of the same run that
    Tune's restore brought back keeps the interrupted command's config, so its :data:`PLACEMENT_FIELDS` come
    from ``placement`` instead (the CPU shares that fit the cluster now, the gate and cache that exist now)."""
    run = ModelRun.from_dict(config["run"])
    if placement is not None and placement.get("run_name") == run.run_name:
        current = ModelRun.from_dict(placement)
        run = run.model_copy(update={name: getattr(current, name) for name in PLACEMENT_FIELDS})
    if "coefficients" in config:
        c = config["coefficients"]
        run = run.with_coefficients(c["alpha"], c["beta"], c["gamma"])
    return run


def trial_run_name(config: dict) -> str:
    """The Ray Train run name of a trial's config, without building its model (see :func:`trial_run`)."""
    name = config["run"]["run_name"]
    if "coefficients" in config:
        c = config["coefficients"]
        name = f"{name}-{coefficients_label(c['alpha'], c['beta'], c['gamma'])}"
    return name


def _gave_up_marker(run: ModelRun) -> tuple:
    """The filesystem, directory and path of :data:`GAVE_UP_FILE` in ``run``'s Train run directory (local
    or S3)."""
    import pyarrow.fs

    filesystem, directory = pyarrow.fs.FileSystem.from_uri(f"{run.storage_path.rstrip('/')}/{run.run_name}")
    return filesystem, directory, f"{directory}/{GAVE_UP_FILE}"


def record_gave_up(run: ModelRun, attempt: str, trial_id: str, error: BaseException) -> None:
    """Note that ``run``'s Train run failed for good in trial ``trial_id`` of Tune run ``attempt`` (see
    :func:`earlier_give_up`)."""
    filesystem, directory, path = _gave_up_marker(run)
    filesystem.create_dir(directory, recursive=True)
    with filesystem.open_output_stream(path) as out:
        out.write(json.dumps({"attempt": attempt, "trial_id": trial_id, "error": str(error)[:4000]}).encode())


def earlier_give_up(run: ModelRun, attempt: str, trial_id: str) -> str | None:
    """The error with which ``run``'s Train run already failed for good in this same trial of this same Tune
    run, if it did.

    Tune's retries (``train.trial_retries``) are for a trial whose driver was lost with its node. A Train run
    that raised has already been retried ``train.max_failures`` times by Ray Train; retrying the trial would
    multiply that budget on a failure that repeats (a bad file, a bug). ``attempt`` is new for every
    :func:`run_model_trials` call, so re-running the pipeline (or restoring the experiment) resumes the run
    as usual."""
    import pyarrow.fs

    filesystem, _, path = _gave_up_marker(run)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        marker = json.loads(stream.read().decode())
    return marker["error"] if (marker.get("attempt"), marker.get("trial_id")) == (attempt, trial_id) else None


#: Added to each epoch's Tune result: the epochs the trial's model has trained, ASHA's time axis (search.py).
#: Tune's own ``training_iteration`` counts from 1 again when it starts a trial again (a lost driver, a resumed
#: search), while the trial's Train run resumes at a later epoch: ASHA would compare its epoch 4 with others' 1.
EPOCHS_DONE = "epochs_done"


#: The metric Tune (its searcher and scheduler) follows: ``val_acc`` times the search objective's factor
#: (:func:`~pipelines.search_space.mnas_factor`; 1 for ``val_acc`` and for the train stage).
SCORE = "score"


def tune_report_callback(score_factor: float = 1.0):
    """Ray's ``TuneReportCallback`` (Train's reports to the Tune trial), each epoch's with :data:`EPOCHS_DONE`
    and :data:`SCORE` (``val_acc`` x ``score_factor``)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsDoneReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            if "epoch" in first:
                first[EPOCHS_DONE] = int(first["epoch"]) + 1
            if "val_acc" in first:
                first[SCORE] = float(first["val_acc"]) * score_factor
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochsDoneReport()


def model_trial(config: dict, attempt: str = "", placement: dict | None = None) -> None:
    """Ray Tune trainable: drive one TorchTrainer; per-epoch metrics flow to Tune (and ASHA, and MLflow).

    When Tune starts it again (its driver was lost), the same Train run name makes ``fit()`` resume from the
    run's last checkpoint instead of training from the start. ``attempt`` names the Tune run (see
    :func:`earlier_give_up`); ``placement`` see :func:`trial_run`."""
    from ray import tune
    from ray.train import TrainingFailedError

    run = trial_run(config, placement)
    set_aside_a_record_of_lost_checkpoints(run)
    trial_id = tune.get_context().get_trial_id()
    earlier = earlier_give_up(run, attempt, trial_id)
    if earlier is not None:
        raise RuntimeError(f"{run.model_name}: not retried, its training already failed after "
                           f"train.max_failures retries: {earlier}")
    try:
        # Under search.objective mnas the searcher and ASHA follow the score the search ranks by, not val_acc.
        score_factor = mnas_factor(run.macs, config.get("mnas_target_macs"))
        build_trainer(run, callbacks=[tune_report_callback(score_factor)]).fit()
    except TrainingFailedError as error:
        try:
            record_gave_up(run, attempt, trial_id, error)
        except OSError as unwritten:  # the training error is the one to report; a retry merely costs time
            logger.warning("[%s] could not note the failure for Tune's retry: %s", run.model_name, unwritten)
        raise


def _trial_name(trial) -> str:
    config = trial.config
    if isinstance(config.get("coefficients"), dict):
        c = config["coefficients"]
        return f"{coefficients_label(c['alpha'], c['beta'], c['gamma'])}_{trial.trial_id}"
    return f"{config['run']['model']['name']}_{trial.trial_id}"


def run_model_trials(
    paths: RunPaths,
    *,
    experiment: str,
    param_space: dict,
    callbacks: list,
    max_concurrent: int,
    num_samples: int = 1,
    search_alg=None,
    scheduler=None,
    restore: bool = False,
    trial_retries: int = 0,
    placement: dict | None = None,
    metric: str = "val_acc",
):
    """Run :func:`model_trial` over ``param_space`` with Ray Tune; returns the ``ResultGrid``. ``metric``: what
    Tune's searcher and scheduler maximise (the search's :data:`SCORE`).

    Each trial's own actor reserves a sliver of CPU (its TorchTrainer's workers reserve the real
    resources), so trials never deadlock against their workers on a small machine; on a cluster with a
    driver node it also asks for :data:`DRIVER_NODE_RESOURCE` (:func:`trial_driver_resources`). A trial that
    fails is started again up to ``trial_retries`` times and resumes its Train run. With
    ``restore``, an interrupted experiment of the same name continues where it stopped (Tune's restore); its
    trials then place their runs as ``placement`` says (see :func:`trial_run`), not as the interrupted command
    did: Tune's restore takes the trainable, and so its parameters, from this command.
    """
    import uuid

    import ray
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(model_trial, attempt=uuid.uuid4().hex,
                                                         placement=placement),
                                    trial_driver_resources(ray.cluster_resources()))
    path = paths.experiment(experiment)
    if restore and tune.Tuner.can_restore(path):
        logger.info("[%s] resuming the interrupted Tune experiment at %s", experiment, path)
        tuner = restore_tuner(path, trainable, callbacks)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", num_samples=num_samples, search_alg=search_alg, scheduler=scheduler,
                max_concurrent_trials=max_concurrent, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                # One trial actor process serves trial after trial: no new process, no new imports per model.
                # Not under a scheduler: a trial it stops is still inside TorchTrainer.fit, the actor cannot be
                # reset in Tune's 2 s, and Tune logs an ERROR before starting a new one anyway.
                reuse_actors=scheduler is None,
            ),
            run_config=tune.RunConfig(name=experiment, storage_path=paths.storage, callbacks=callbacks, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=trial_retries)),
        )
    return tuner.fit()


def restore_tuner(path: str, trainable, callbacks: list):
    """Tune's restore of an interrupted experiment (unfinished and errored trials run again), with ``callbacks``.

    Tune restores the callbacks pickled with the experiment: no-op ones in place of the tracking callback
    (:class:`~pipelines.tracking_queue.TrialTracking` is saved without its queue, which holds the tracking
    password), and a compute gate that is gone. This process's callbacks must serve the resumed trials; Ray has no
    public way to pass them (ray-project/ray#41364), so they replace the restored ones in the tuner's run config.
    """
    from ray import tune

    tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    restored = getattr(tuner, "_local_tuner", None)
    if restored is None:  # a Ray that moved it: resume anyway (the tests catch it)
        logger.warning("this Ray cannot replace a restored experiment's callbacks: its resumed trials are not "
                       "tracked in MLflow")
    else:
        restored.get_run_config().callbacks = list(callbacks)
    return tuner


def _reported_checkpoint(path: str, storage_path: str):
    """The ``ray.train.Checkpoint`` at ``path``, a path Ray reported without its storage's scheme."""
    import ray.train

    if "://" in storage_path and "://" not in path:
        path = f"{storage_path.split('://', 1)[0]}://{path}"
    return ray.train.Checkpoint(path)


def reported_checkpoint_dir(path: str, storage_path: str) -> contextlib.AbstractContextManager:
    """A local directory with the contents of a reported checkpoint (downloaded if it is remote)."""
    return _reported_checkpoint(path, storage_path).as_directory()


#: Ray Train's record of a run's checkpoints, in the run's directory under the storage path.
RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _run_record(run: ModelRun):
    """Ray Train's record of the run's checkpoints: the storage's filesystem, the record's path and its content.
    Raises when there is none (a first start), the storage does not answer or the record cannot be read."""
    import pyarrow.fs

    storage = run.storage_path if "://" in run.storage_path else os.path.abspath(run.storage_path)
    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    record = f"{root.rstrip('/')}/{run.run_name}/{RUN_SNAPSHOT}"
    with fs.open_input_stream(record) as stream:
        return fs, record, json.loads(stream.read())


def latest_reported_metrics(run: ModelRun) -> dict | None:
    """The metrics the run reported with its latest checkpoint (an interrupted run's last epoch), from Ray
    Train's record; None without one (a first start), when that checkpoint is gone (the run starts afresh:
    :func:`set_aside_a_record_of_lost_checkpoints`), or when the storage does not answer or the record cannot
    be read (then the workers' own checks decide)."""
    return resume_point(run)[1]


def resume_point(run: ModelRun, *, read_checkpoints: bool = False) -> tuple[str, dict | None]:
    """Where the run's next start begins: ``("resumes", metrics)`` from its latest checkpoint (the metrics
    reported with it), ``("afresh", None)`` where it surely trains from scratch (its storage answers and holds
    no record of its checkpoints, or the record names none, or one that is gone or another model's, or, with
    ``read_checkpoints`` (a download from remote storage), damaged: the record is set aside,
    :func:`set_aside_a_record_of_lost_checkpoints`), and ``("unknown", None)`` where the storage does not answer
    or the record cannot be read."""
    import pyarrow.fs

    try:
        fs, record, snapshot = _run_record(run)
    except FileNotFoundError:  # no record; afresh only where the storage's root is there (not a volume unmounted)
        try:
            storage = run.storage_path if "://" in run.storage_path else os.path.abspath(run.storage_path)
            root_fs, root = pyarrow.fs.FileSystem.from_uri(storage)
            there = root_fs.get_file_info(root).type == pyarrow.fs.FileType.Directory
        except Exception:  # noqa: BLE001 - pyarrow raises OSError subclasses and more for a store that is down
            there = False
        return ("afresh" if there else "unknown"), None
    except Exception:  # noqa: BLE001 - storage down, another Ray's format
        return "unknown", None
    latest = snapshot.get("latest_checkpoint_result", {}) if isinstance(snapshot, dict) else {}
    if latest is None:  # a run that reported no checkpoint
        return "afresh", None
    try:
        metrics, _ = latest["metrics"], latest["checkpoint_dir_name"]
    except Exception:  # noqa: BLE001 - another Ray's format
        return "unknown", None
    if not isinstance(metrics, dict):
        return "unknown", None
    try:
        lost = _unresumable(run, record.rsplit("/", 1)[0], snapshot, read_checkpoints=read_checkpoints)
    except Exception:  # noqa: BLE001 - another Ray's format
        return "unknown", None
    return ("afresh", None) if lost is not None else ("resumes", metrics)


def _unresumable(run: ModelRun, run_dir: str, snapshot: dict, *, read_checkpoints: bool = True
                 ) -> tuple[str, str] | None:
    """The first checkpoint in the run's record (``snapshot``) it cannot resume with, and why: gone from the
    storage, another model's, or (``read_checkpoints``) damaged; None when there is none."""
    names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
    for name in names:
        path = f"{run_dir}/{name}"
        if checkpoint_gone(path, run.storage_path):
            return path, "is gone from the storage"
    if (other := _another_models_checkpoint(run, run_dir, snapshot)) is not None:
        return other[0], f"is {other[1]}'s (a run directory reused for another model)"
    # The checkpoints a run reads back: the latest (a resume) and the best (its test evaluation); Ray keeps the
    # results sorted by score, the best last. A record without its latest: any may be the one resumed.
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    for name in (list(dict.fromkeys([latest, *names[-1:]])) if latest else names) if read_checkpoints else []:
        path = f"{run_dir}/{name}"
        if damage := checkpoint_damage(path, run.storage_path):
            return path, f"is damaged ({damage})"
    return None


def set_aside_a_record_of_lost_checkpoints(run: ModelRun) -> str | None:
    """Let a run whose checkpoints were deleted (by hand, by a bucket's lifecycle rule), damaged (a truncated
    upload, changed bytes) or are another model's (its run directory reused by hand) start again.

    Ray Train refuses to start a run whose record of checkpoints names one that is gone ("a corrupted run
    directory"), at every attempt and every later invocation, so such a model could never be trained again; a
    damaged latest checkpoint is handed to every attempt and fails each (and a damaged best one fails the test
    evaluation after training). The record is renamed aside (``<record>.gone-<time>``): the run starts afresh,
    the checkpoints still there stay where they are. Returns the lost checkpoint's path, or None when there was
    nothing to do (no record, every checkpoint there and sound, a storage that does not answer, or a record
    this code cannot read).

    Afresh even when the latest checkpoint survived (a lifecycle rule takes the oldest first): Ray Train V2
    refuses ``resume_from_checkpoint``, and a checkpoint handed to the workers instead stays out of the new
    run's record (its test evaluation, a later resume). Editing Ray's record would tie this code to its format.
    Reading the recorded checkpoints (a download from remote storage) costs a resume only: a first start has
    no record.
    """
    try:
        fs, record, snapshot = _run_record(run)
        unresumable = _unresumable(run, record.rsplit("/", 1)[0], snapshot)
    except Exception:  # noqa: BLE001 - no record (a first start), storage down, another Ray's format: Ray decides
        return None
    if unresumable is None:
        return None
    lost, why = unresumable
    aside = f"{record}.gone-{time.strftime('%Y%m%d-%H%M%S')}"
    fs.move(record, aside)
    logger.warning("[%s] its checkpoint %s %s, so the run cannot resume: starting it afresh (Ray's record of its "
                   "checkpoints is kept as %s)", run.model_name, lost, why, aside)
    return lost


def _another_models_checkpoint(run: ModelRun, run_dir: str, snapshot: dict) -> tuple[str, str] | None:
    """The first checkpoint in the run's record that another model wrote (a run directory reused by hand), with
    that model's name; None when all are this model's (or say nothing). Ray hands a run every checkpoint its
    record names: another model's held the record's best place, was tested and registered as this model's (or
    failed to load), and pushed this model's own best checkpoints out."""
    results = snapshot.get("checkpoint_results") if isinstance(snapshot, dict) else None
    for result in results if isinstance(results, list) else []:
        name = result.get("checkpoint_dir_name") if isinstance(result, dict) else None
        if isinstance(name, str) and (owner := checkpoint_owner(f"{run_dir}/{name}", run.storage_path)) not in (
                None, (run.model_name, run.arch)):
            return f"{run_dir}/{name}", owner[0]
    return None


def checkpoint_owner(path: str, storage_path: str) -> tuple[str, str] | None:
    """The (model name, architecture) a reported checkpoint holds, from its meta file alone (no download of its
    weights); None when that cannot be read (written before meta files, a storage that does not answer)."""
    from .worker import CHECKPOINT_META

    try:
        checkpoint = _reported_checkpoint(path, storage_path)
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{CHECKPOINT_META}") as stream:
            data = json.loads(stream.read())
        return str(data["model_name"]), str(data["arch"])
    except Exception:  # noqa: BLE001 - pyarrow raises OSError subclasses and more; a damaged file: not this check's
        return None


def checkpoint_damage(path: str, storage_path: str) -> str | None:
    """What is wrong for good with the reported checkpoint at ``path`` (its weights' or a rank's generator
    state's file truncated, or bytes changed: :func:`~pipelines.checkpoints.check_archive`), or None: sound, or
    not readable now (a storage that does not answer, a file this process may not read), which a later attempt
    may find otherwise. Only the files' archives are checked, not loaded: a downloaded copy's read, no more."""
    from .checkpoints import (
        CHECKPOINT_FILE,
        CheckpointError,
        MissingCheckpointError,
        UnreadableCheckpointError,
        check_archive,
    )

    try:
        with reported_checkpoint_dir(path, storage_path) as directory:
            for file in [Path(directory) / CHECKPOINT_FILE, *sorted(Path(directory).glob("rng_state_rank*.pt"))]:
                if file.is_file():
                    check_archive(file)
    except (MissingCheckpointError, UnreadableCheckpointError):
        return None
    except CheckpointError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - a storage that does not answer, memory: a later attempt decides
        return None
    return None


def checkpoint_gone(path: str, storage_path: str) -> bool:
    """Whether the checkpoint at ``path`` is gone for good: its storage answers (the run storage's root is
    there) but the checkpoint directory, or the weights in it, are not (deleted by hand, a bucket lifecycle
    rule). A storage that does not answer (a volume not mounted, a bucket unreachable) may bring it back: False.
    """
    import pyarrow.fs

    from .checkpoints import CHECKPOINT_FILE

    try:
        checkpoint = _reported_checkpoint(path, storage_path)
        root_fs, root = pyarrow.fs.FileSystem.from_uri(
            storage_path if "://" in storage_path else os.path.abspath(storage_path))
        if root_fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
            return False
        found = checkpoint.filesystem.get_file_info([checkpoint.path, f"{checkpoint.path}/{CHECKPOINT_FILE}"])
    except Exception:  # noqa: BLE001 - pyarrow raises OSError subclasses and more for a store that is down
        return False
    return any(info.type == pyarrow.fs.FileType.NotFound for info in found)
