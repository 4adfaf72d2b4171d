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
  concurrency with it.
"""

from __future__ import annotations

import contextlib
import logging

from .paths import RunPaths
from .planning import ModelRun, coefficients_label

__all__ = [
    "TRIAL_DRIVER_RESOURCES",
    "trial_resources",
    "build_trainer",
    "model_trial",
    "run_model_trials",
    "reported_checkpoint_dir",
    "trial_run_name",
]

logger = logging.getLogger(__name__)

#: Resources of a Tune trial's own actor (the Train driver); its workers reserve their own.
TRIAL_DRIVER_RESOURCES = {"CPU": 0.01}


def trial_resources(run: ModelRun) -> dict[str, float]:
    """CPU and GPU one trial of ``run`` holds at once: its driver and all of its workers."""
    workers = run.workers
    return {"CPU": float(workers.cpus_per_worker) * workers.num_workers + TRIAL_DRIVER_RESOURCES["CPU"],
            "GPU": workers.gpus_per_worker * workers.num_workers if workers.use_gpu else 0.0}


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


def trial_run(config: dict) -> ModelRun:
    """The run a trial's config describes: ``config["run"]``, with ``config["coefficients"]`` (alpha,
    beta, gamma) applied when the trial is a search trial."""
    run = ModelRun.from_dict(config["run"])
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


def model_trial(config: dict) -> None:
    """Ray Tune trainable: drive one TorchTrainer; per-epoch metrics flow to Tune (and ASHA, and MLflow)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    build_trainer(trial_run(config), callbacks=[TuneReportCallback()]).fit()


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
):
    """Run :func:`model_trial` over ``param_space`` with Ray Tune; returns the ``ResultGrid``.

    Each trial's own actor reserves a sliver of CPU (its TorchTrainer's workers reserve the real
    resources), so trials never deadlock against their workers on a small machine. With ``restore``, an
    interrupted experiment of the same name continues where it stopped (Tune's restore).
    """
    from ray import tune

    trainable = tune.with_resources(model_trial, TRIAL_DRIVER_RESOURCES)
    path = paths.experiment(experiment)
    if restore and tune.Tuner.can_restore(path):
        logger.info("[%s] resuming the interrupted Tune experiment at %s", experiment, path)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric="val_acc", mode="max", num_samples=num_samples, search_alg=search_alg, scheduler=scheduler,
                max_concurrent_trials=max_concurrent, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                # One trial actor process serves trial after trial: no new process, no new imports per model.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(name=experiment, storage_path=paths.storage, callbacks=callbacks, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    return tuner.fit()


def reported_checkpoint_dir(path: str, storage_path: str) -> contextlib.AbstractContextManager:
    """A local directory with the contents of a reported checkpoint (downloaded if it is remote)."""
    import ray.train

    if "://" in storage_path and "://" not in path:
        path = f"{storage_path.split('://', 1)[0]}://{path}"
    return ray.train.Checkpoint(path).as_directory()
