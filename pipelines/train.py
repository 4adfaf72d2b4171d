"""The training stage: every model of the config, each its own Ray Train run, tracked and registered.

:func:`train_stage` plans one :class:`~pipelines.planning.ModelRun` per model (plus the searched
EfficientNet family when coefficients are given, and the paper's family next to it with
``search.compare_paper``), skips models already trained to their epochs with the same settings, and runs the
rest as Ray Tune trials (:mod:`pipelines.trials`), as many at once as the cluster fits. Each trial's epochs
are mirrored into an MLflow child run; when a model finishes, :func:`finish_model_trial` writes its result
record and queues the registration of its best checkpoint. Every MLflow write goes through
:class:`~pipelines.tracking_queue.TrackingQueue`, off the training's critical path. At the end the champion
alias moves to the best test accuracy, the stage waits (up to ``tracking.pending_timeout_s``) for the queued
writes, and a comparison table is printed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import cnnmodels

from .compute_gate import ReleaseOnTrialEnd, compute_gate
from .config import PipelineConfig, redact_text
from .console import duration, timestamped
from .optim import lr_at
from .planning import SEARCHED_FAMILY, ModelChoice, ModelRun, plan_model_runs, resolve_models, with_overlapped_startup
from .results import ModelResult, as_text, comparison_table, for_display, load_results
from .shared_data import prepare, shared_splits
from .trials import run_model_trials, trial_resources, trial_run_name

__all__ = ["TrainStageResult", "train_stage", "describe_run", "finish_model_trial"]

logger = logging.getLogger(__name__)


def describe_run(config: dict) -> tuple[str, str, dict[str, Any]]:
    """MLflow run name, model name and params of a training trial (the same keys for every model)."""
    run = ModelRun.from_dict(config["run"])
    return run.model_name, run.model_name, run.mlflow_params()


def _timeline(worker: dict[str, float], started_at: float, driver: dict[str, float]) -> dict[str, float]:
    """Milestones as seconds since the trial started (phase sums such as ``loop_seconds`` stay as they are)."""
    timeline = {"started_at": started_at}
    for key, value in {**worker, **driver}.items():
        timeline[key] = round(value if key.endswith("_seconds") else value - started_at, 3)
    return timeline


def finish_model_trial(cfg: PipelineConfig, queue, trial, run_ref: str, started_at: float) -> ModelResult:
    """When a model's trial completes: write its result record and queue the registration of its best
    checkpoint (the record learns its version once MLflow has it: :mod:`pipelines.tracking_queue`)."""
    driver = {"complete": time.time()}
    result = trial.last_result or {}
    run = ModelRun.from_dict(trial.config["run"])
    if "test_acc" not in result:
        raise RuntimeError(f"{run.model_name}: the run ended without a test evaluation")
    history = json.loads(result.get("history", "[]"))
    throughput = [h["train_images_per_sec"] for h in history]
    model_result = ModelResult(
        model_name=run.model_name, arch=run.arch, model_kwargs=run.model.kwargs, run_name=run.run_name,
        fingerprint=run.fingerprint, input_size=run.spec.image_size, params_count=run.params_count,
        macs=run.macs, epochs=run.hyper.epochs, best_val_acc=float(result["best_val_acc"]),
        best_epoch=int(result["best_epoch"]), test_acc=float(result["test_acc"]),
        train_images_per_sec=float(np.median(throughput)) if throughput else 0.0,
        train_seconds=float(sum(h["epoch_seconds"] for h in history)),
        checkpoint_path=result["best_checkpoint_path"], history=history, mlflow_run_id=queue.run_id(run_ref) or "",
        registered_model=cfg.registered_model_name, version="", test_split=run.test_split,
    )
    driver["recorded"] = time.time()
    model_result.timeline = _timeline(json.loads(result.get("timeline", "{}")), started_at, driver)
    record = model_result.save(cfg.paths.train_dir)
    queue.put("register", run_ref, checkpoint_path=result["best_checkpoint_path"], storage_path=run.storage_path,
              registered_model=cfg.registered_model_name, alias=run.model_name, result_file=str(record),
              tags={"test_acc": result["test_acc"], "best_val_acc": result["best_val_acc"], "arch": run.arch,
                    "model_name": run.model_name, "params_count": run.params_count, "macs": run.macs,
                    "input_size": run.spec.image_size, "dataset": run.data.dataset,
                    "data_root": run.data.root or "", "fingerprint": run.fingerprint, "epochs": run.hyper.epochs,
                    "test_split": run.test_split})
    queue.put("log_metrics", run_ref, metrics={"train_images_per_sec": model_result.train_images_per_sec,
                                               "train_seconds": model_result.train_seconds})
    queue.put("end_run", run_ref, status="FINISHED")
    logger.info("[train] %s: test_acc %.4f (best val_acc %.4f at epoch %d)", run.model_name, model_result.test_acc,
                model_result.best_val_acc, model_result.best_epoch + 1)
    return model_result


def stage_eta(elapsed: float, work_done: float, work_left: float, min_share: float = 0.05) -> float | None:
    """Seconds the rest of the stage should take at the pace so far, counting each model's work as its
    multiply-adds per image times its epochs; None until ``min_share`` of the work is done.

    Models differ by three orders of magnitude in work (LeNet-5 against DenseNet-121), so an average over
    models would promise minutes for hours; and the first few percent of the work are mostly fixed costs
    (starting workers, loading data), which would promise hours for minutes.
    """
    total = work_done + work_left
    if work_left <= 0 or total <= 0 or work_done < min_share * total:
        return None
    return elapsed * work_left / work_done


def epochs_of_the_last_attempt(history: list[dict], start_epoch: int | None = None) -> int:
    """The epochs the run's last attempt trained: from ``start_epoch``, where the attempt that finished it started
    (its final report says), else from the last history row's. What a stage that resumed the run did, not the
    epochs an interrupted command trained before (a worker restarted within the stage counts from its restart:
    an estimate on the safe side); none for a run resumed past its last epoch only to be tested and registered."""
    if not history:
        return 0
    # (start_epoch is missing from histories of checkpoints older than it: counted from 0, as before)
    start = history[-1].get("start_epoch", 0) if start_epoch is None else start_epoch
    return max(0, history[-1]["epoch"] + 1 - start)


class ModelFinisher:
    """Records finished models and says how far the stage is (Tune calls it through the tracking callback).

    Registration is queued, not waited for, so Tune starts the next model at once. Picklable (Tune saves
    its callbacks).
    """

    def __init__(self, cfg: PipelineConfig, queue, runs: list[ModelRun],
                 resumes_at: dict[str, int] | None = None) -> None:
        self.cfg = cfg
        self.queue = queue
        self.macs = {run.model_name: max(run.macs, 1) for run in runs}
        self.epochs = {run.model_name: run.hyper.epochs for run in runs}
        # The epoch each interrupted run resumes at (:func:`check_interrupted_schedules`): a run trained to its
        # end and only to be registered has no epoch to go, one stopped at 14 of 15 one (all of them were counted)
        self.resumes_at = {name: min(epoch, self.epochs[name]) for name, epoch in (resumes_at or {}).items()
                           if name in self.epochs}
        self.started = time.time()
        self.finished: list[str] = []
        self.failed: list[str] = []
        self.lost: set[str] = set()  # models whose trial failed: their work is no longer to go
        self.done: dict[str, int] = {}  # the work each finished model did in this stage
        # Models in training: the epochs they reached, where this stage's attempt started, when their last
        # epoch ended and how long it took. Models train side by side (ten on one GPU), so the finished ones
        # alone said little: two small models done after 4 minutes promised 43 more when 8 were left.
        self.running: dict[str, dict[str, float]] = {}
        # What the estimate measures in seconds, not multiply-adds: on 2 cores LeNet-5 and AlexNet spent most of
        # their minute in the ~12 s every model pays to start and to be tested, and MACs x epochs made that look
        # like a slow pace over the big models ("about 17 min to go" with 4.8 left). Seconds per MAC also differ
        # several-fold between families.
        self.epoch_seconds: dict[str, list[float]] = {}  # model -> [seconds, epochs] between its epoch reports
        self.slot_seconds: dict[str, float] = {}  # finished model -> trial start to finish, less its gate wait
        self.fixed: dict[str, float] = {}  # finished model -> that, less its epochs at its pace: the fixed cost
        self.after_training: dict[str, float] = {}  # finished model -> its last epoch's report to its finish
        self.first_start: float | None = None  # the earliest trial start seen (the stage's own set-up before)
        self.lost_progress: dict[str, tuple[dict[str, float], float]] = {}  # lost model -> its progress, when lost

    def _open(self) -> list[str]:
        return [n for n in self.macs if n not in self.finished and n not in self.failed and n not in self.lost]

    def work_to_go(self) -> int:
        """The work (MACs x epochs) the models neither finished nor failed have still to do: the epochs they
        have not reached (for a model that has reported none yet, all from the epoch its run resumes at)."""
        return sum(self.macs[n] * max(self.epochs[n] - int(self.running.get(n, {}).get("reached",
                                                                          self.resumes_at.get(n, 0))), 0)
                   for n in self._open())

    def work_done(self) -> int:
        """The work this stage did: finished models' and the epochs of those still training."""
        open_models = self._open()
        running = sum(self.macs[n] * (p["reached"] - p["start"]) for n, p in self.running.items() if n in open_models)
        return sum(self.done.values()) + int(running)

    def epoch_done(self, trial, result: dict, now: float | None = None) -> None:
        """A model reported an epoch: note how far it is and how long its epochs take."""
        now = time.time() if now is None else now
        name = trial.config["run"]["model"]["name"]
        start = int(result.get("start_epoch", 0))
        reached = int(result.get("epoch", result.get("training_iteration", 1) - 1)) + 1
        previous = self.running.get(name)
        # Seconds per epoch since the last one: the first epoch's time from the stage's start would count the
        # fixed start-up costs (and the wait for a place) as an epoch's. A resumed attempt keeps the old pace.
        seconds = previous["epoch_seconds"] if previous else 0.0
        if previous is not None and previous["start"] == start and previous["reached"] < reached:
            seconds = (now - previous["at"]) / (reached - previous["reached"])
            measured = self.epoch_seconds.setdefault(name, [0.0, 0])
            measured[0] += now - previous["at"]
            measured[1] += reached - previous["reached"]
        self.running[name] = {"start": start, "reached": reached, "at": now, "epoch_seconds": seconds}

    def _pace_per_epoch(self) -> tuple[float, float] | None:
        """Seconds per epoch of a model not measured yet, as ``(a, b)`` for ``a + b * MACs``: a line through the
        measured models (a: what every epoch costs whatever the model, validation and checkpoint; b: seconds per
        MAC). None before two models of different MACs are measured: LeNet-5's 1 s at 0.4 MMACs alone says
        nothing of the others'."""
        points = [(self.macs[n], s / e) for n, (s, e) in self.epoch_seconds.items() if e > 0 and n in self.macs]
        if len({m for m, _ in points}) < 2:
            return None
        mean_m = sum(m for m, _ in points) / len(points)
        mean_s = sum(s for _, s in points) / len(points)
        b = sum((m - mean_m) * (s - mean_s) for m, s in points) / sum((m - mean_m) ** 2 for m, _ in points)
        if b <= 0:  # bigger models were no slower: the MACs say nothing here
            return mean_s, 0.0
        a = mean_s - b * mean_m
        if a < 0:  # no negative seconds for small models: through the origin instead
            return 0.0, sum(s for _, s in points) / sum(m for m, _ in points)
        return a, b

    def _seconds_per_epoch(self, name: str, fit: tuple[float, float] | None) -> float | None:
        """The model's own measured seconds per epoch, else the fit's for its MACs (None: nothing measured)."""
        seconds, epochs = self.epoch_seconds.get(name, (0.0, 0))
        if epochs:
            return seconds / epochs
        return None if fit is None else fit[0] + fit[1] * self.macs[name]

    def _seconds(self, now: float) -> tuple[float, float, list[float], list[float], bool, float | None] | None:
        """``(done, to_go, tails, ends, queued, began)`` in model-seconds (one model training for one second is
        one): what the stage did, what it has still to do, the seconds left of each running model whose own pace
        is measured (tails) and of every running model (ends: a pace not measured yet is the fit's by MACs),
        whether any model left has not started training yet, and when the first model started (that of a
        finished one, or a lost one's as its time says). None until a finished model measured the fixed cost."""
        if not self.fixed:
            return None
        fixed = float(np.median(list(self.fixed.values())))
        after = min(float(np.median(list(self.after_training.values()))) if self.after_training else 0.0, fixed)
        before = fixed - after  # a running model paid this before its first epoch
        fit = self._pace_per_epoch()
        done = sum(self.slot_seconds.values())
        for name in self.finished:
            if name not in self.slot_seconds and name in self.macs:  # finished without a measured start time
                done += fixed + self.done[name] / self.macs[name] * (self._seconds_per_epoch(name, fit) or 0.0)
        began = self.first_start
        for name, (progress, lost_at) in self.lost_progress.items():  # its time so far, as a running model's
            pace = self._seconds_per_epoch(name, fit) or progress["epoch_seconds"]
            spent = before + (progress["reached"] - progress["start"]) * pace + max(lost_at - progress["at"], 0.0)
            done += spent
            # (its start, not measured: the stage's time counted from the first finished model's start left out
            # a model lost before it, while its seconds were counted as done)
            lost_start = max(lost_at - spent, self.started)
            began = lost_start if began is None else min(began, lost_start)
        to_go, tails, ends, queued = 0.0, [], [], False
        for name in self._open():
            per_epoch = self._seconds_per_epoch(name, fit)
            progress = self.running.get(name)
            if progress is None:
                if per_epoch is None:
                    return None
                to_go += fixed + (self.epochs[name] - self.resumes_at.get(name, 0)) * per_epoch
                queued = True
                continue
            # A running model's latest epoch time: ten models sharing a GPU speed up as the others finish.
            latest = progress["epoch_seconds"] or per_epoch
            if latest is None:
                return None
            left = max(self.epochs[name] - progress["reached"], 0)
            since = max(now - progress["at"], 0.0)
            if not left:
                remaining = max(after - since, 0.0)
            elif since > latest:  # an epoch past its expected length: taken as half done, the rest at its pace
                # (not all of them at twice it: a neighbour starting on a shared GPU doubled the whole tail)
                remaining = left * since + after
            else:
                remaining = left * latest - since + after
            done += before + (progress["reached"] - progress["start"]) * (per_epoch or latest) + since
            to_go += remaining
            ends.append(remaining)
            if progress["epoch_seconds"]:  # its own pace measured: a fit's (by MACs, other models) is no tail
                tails.append(remaining)
        return done, to_go, tails, ends, queued, began

    def eta(self, now: float | None = None) -> float | None:
        """Seconds the rest of the stage should take, in seconds of training, not MACs: each model's own
        measured seconds per epoch (a fit over the measured models by MACs for those not started) plus the
        fixed cost the finished ones measured (start-up, test and record); the models left take that many
        model-seconds at the rate the stage did them so far (models side by side: ten on a GPU, two on 2
        cores), and never less than the slowest running model needs (the last models' tail). Before a model
        has finished with a measured start time: multiply-adds x epochs at the pace so far."""
        now = time.time() if now is None else now
        measured = self._seconds(now)
        if measured is None:
            return self._eta_by_work(now)
        done, to_go, tails, ends, queued, began = measured
        if not queued:  # every model left is training: the slowest one ends the stage, its pace measured or not
            # (a model that has reported one epoch in this attempt has no pace of its own yet: "0 s to go")
            return max(ends, default=0.0) if to_go > 0 else None
        tail = max(tails, default=0.0)
        elapsed = now - (began if began is not None else self.started)
        pace = stage_eta(elapsed, done, to_go)
        return None if pace is None else max(pace, tail)

    def _eta_by_work(self, now: float) -> float | None:
        """The work left at the pace of the work done so far (see :func:`stage_eta`), but never less than the
        slowest model in training needs for its epochs left at its own pace."""
        pace = stage_eta(now - self.started, self.work_done(), self.work_to_go())
        open_models = self._open()
        tails = [(self.epochs[n] - p["reached"]) * p["epoch_seconds"] - (now - p["at"])
                 for n, p in self.running.items() if n in open_models and p["epoch_seconds"] > 0]
        tail = max(tails, default=0.0)
        if pace is None:
            # Too little done for a pace: the slowest model's tail alone is the stage's only while every model
            # left is training (not with models still queued behind them).
            if tail <= 0 or any(n not in self.running for n in open_models):
                return None
            return tail
        return max(pace, tail)

    def trial_failed(self, trial, now: float | None = None) -> None:
        """A model's trial failed: the stage's estimate stops counting its work as still to go, and counts the
        epochs it trained as done: the stage's time holds them, and a pace of that time over the other models'
        work alone said "about 3 min 28 s to go" with 25 s left."""
        name = trial.config["run"]["model"]["name"]
        self.lost.add(name)
        progress = self.running.get(name)
        if progress is not None:
            self.done[name] = self.macs.get(name, 1) * max(int(progress["reached"] - progress["start"]), 0)
            self.lost_progress[name] = (dict(progress), time.time() if now is None else now)

    def model_finished(self, name: str, epochs_trained: int, now: float | None = None, *,
                       started_at: float | None = None, waited: float = 0.0) -> str:
        """Count a finished model (``epochs_trained``: the epochs this stage trained it; ``started_at``: when its
        trial started, ``waited``: the seconds it waited at the compute gate, to measure its fixed cost);
        returns the stage's progress line."""
        self.finished.append(name)
        self.done[name] = self.macs.get(name, 1) * epochs_trained
        now = time.time() if now is None else now
        progress = self.running.get(name)
        if progress is not None and now >= progress["at"]:
            self.after_training[name] = now - progress["at"]
        if started_at is not None and started_at <= now and name in self.macs:
            self.first_start = started_at if self.first_start is None else min(self.first_start, started_at)
            wall = max(now - started_at - max(waited, 0.0), 0.0)
            self.slot_seconds[name] = wall
            per_epoch = self._seconds_per_epoch(name, self._pace_per_epoch())
            # Not after a restart from a checkpoint (a worker lost): the trial's wall holds the lost attempt too.
            if per_epoch is not None and (progress is None or progress["start"] == 0):
                self.fixed[name] = max(wall - epochs_trained * per_epoch, 0.0)
        try:  # Tune does not guard on_complete: an estimate must never end the stage
            eta = self.eta(now)
        except Exception as err:  # noqa: BLE001
            logger.warning("[train] no estimate of the time to go (%s: %s)", type(err).__name__, err)
            eta = None
        to_go = f", about {duration(eta)} to go" if eta is not None else ""
        return f"[train] {len(self.finished)}/{len(self.macs)} models done in {duration(now - self.started)}{to_go}"

    def __call__(self, trial, run_ref: str, started_at: float) -> None:
        name = trial.config["run"]["model"]["name"]
        try:
            result = finish_model_trial(self.cfg, self.queue, trial, run_ref, started_at)
        except Exception as err:  # noqa: BLE001 - one model's failure must not end the others (Tune re-raises)
            logger.error("[train] %s: could not record the model: %s", name, err)
            self.failed.append(name)
            self.queue.put("set_tags", run_ref, tags={"error": redact_text(f"{type(err).__name__}: {err}")[:4000]})
            self.queue.put("end_run", run_ref, status="FAILED")
            return
        # Only the epochs this stage trained: a run resumed at epoch 14 of 15 did one epoch's work here, and
        # crediting all 15 made the rest of the stage look minutes away when it was hours.
        start_epoch = (trial.last_result or {}).get("start_epoch")
        trained = epochs_of_the_last_attempt(result.history, None if start_epoch is None else int(start_epoch))
        # The wait at the compute gate (overlapped start-up) is the previous model's training, not a cost.
        timeline = result.timeline
        waited = max(timeline["compute_granted"] - timeline["restored"], 0.0) if {
            "compute_granted", "restored"} <= timeline.keys() else 0.0
        logger.info(timestamped(self.model_finished(name, trained, started_at=started_at, waited=waited)))


@dataclass
class TrainStageResult:
    results: dict[str, ModelResult]
    failed: list[str]
    skipped: list[str]
    trained: list[str]
    champion: str | None
    table: Any = None
    pending: int = 0  #: tracking writes MLflow did not take in time (see pipelines.tracking_queue)

    @property
    def ok(self) -> bool:
        return not self.failed


def _warn_of_a_warm_restart(run: ModelRun, trained_epochs: int) -> None:
    """A run extended to more epochs continues from its checkpoint, its cosine schedule spread over the new
    length: the learning rate, near zero at the old end, goes back up (a warm restart). Said, since the result is
    not what the same epochs from scratch would give."""
    from .trials import resume_point

    hyper = run.hyper
    if hyper.schedule == "constant" or trained_epochs == 0:
        return
    start, latest = resume_point(run, read_checkpoints=True)  # (a download from remote storage: extensions only)
    if start == "afresh":  # (its checkpoints deleted: no warm restart, the longer schedule from its start)
        logger.info("[train] %s was trained to %d epochs with these settings, but its checkpoints under %s "
                    "cannot be resumed (gone, damaged or another model's): it trains afresh to %d epochs",
                    run.model_name, trained_epochs, run.storage_path, hyper.epochs)
        return
    if latest and str(latest.get("epochs")) == str(hyper.epochs) and int(latest.get("epoch", -1)) >= trained_epochs:
        # The extension began in an earlier command, interrupted since: it resumes past the old end on the schedule
        # it has been on (the warning named the rate of the old end, a restart that had already happened).
        return
    resumed = schedule_change(hyper, trained_epochs, trained_epochs)[2]  # the rate where it resumes
    logger.warning("[train] %s was trained to %d epochs with these settings; it continues to %d from its "
                   "checkpoint, with its cosine schedule spread over %d epochs: the learning rate goes back up to "
                   "%.0f%% of train.lr (a warm restart, not what %d epochs from scratch give; for that, another "
                   "workdir or name)", run.model_name, trained_epochs, hyper.epochs, hyper.epochs, 100 * resumed,
                   hyper.epochs)


def schedule_change(hyper, planned: int, reached: int) -> tuple[str, float, float]:
    """What resuming a run that was training to ``planned`` epochs after epoch ``reached`` does to its learning
    rate under ``hyper`` (its epochs, schedule and warm-up): "same" (the same epochs, or a constant schedule or
    a warm-up not yet over, which are the same for any length, and nothing past the new end), "longer" or
    "shorter", with the rate there under the old and the new length (fractions of ``train.lr``)."""
    steps = 1000  # per epoch: the schedule's shape, whatever the split's size
    same_so_far = hyper.schedule == "constant" or reached * steps < int(hyper.warmup_epochs * steps)
    was = lr_at(1.0, hyper.schedule, hyper.warmup_epochs, planned, reached * steps, steps)
    now = lr_at(1.0, hyper.schedule, hyper.warmup_epochs, hyper.epochs, reached * steps, steps)
    if hyper.epochs == planned or (same_so_far and reached <= hyper.epochs):
        return "same", was, now
    return ("longer" if hyper.epochs > planned else "shorter"), was, now


def check_interrupted_schedules(runs: list[ModelRun], *, warn: bool = True) -> dict[str, int]:
    """Refuse (ConfigError on ``train.epochs``, exit 2) to resume an interrupted run with fewer epochs than it was
    training to, and (``warn``) warn when it resumes with more.

    Epochs are not in a run's fingerprint (a longer run continues the same training), so a re-run resumes the
    checkpoint of any length. Fewer epochs cut its learning-rate schedule short: the rate dropped at once, and a
    run stopped at epoch 5 of 10 and re-run with ``train.epochs: 5`` trained nothing more and was registered as a
    5-epoch model with its rate still at half of ``train.lr``. Runs whose checkpoints predate the recorded
    length are left to the workers' own check (no checkpoint past ``train.epochs``). Returns the epoch each
    interrupted run resumes at (a diverged run's: its last, as it trains no further), for the stage's estimate."""
    from .config import ConfigError
    from .trials import latest_reported_metrics, resume_point

    refused, resumes_at = [], {}
    for run in runs:
        latest = latest_reported_metrics(run)
        if latest and "epoch" in latest:
            resumes_at[run.model_name] = run.hyper.epochs if latest.get("diverged") else int(latest["epoch"]) + 1
        if not latest or "epochs" not in latest or "epoch" not in latest or latest.get("diverged"):
            continue  # (a diverged run trains no further, whatever its schedule)
        hyper, planned, reached = run.hyper, int(latest["epochs"]), int(latest["epoch"]) + 1
        verdict, was, now = schedule_change(hyper, planned, reached)
        if verdict == "same":
            continue
        if verdict == "longer":
            if reached < planned and warn:  # (a finished run extended: _warn_of_a_warm_restart says it)
                logger.warning("[train] %s: its interrupted run was training to %d epochs; it resumes at epoch %d "
                               "with its %s schedule spread over %d epochs: the learning rate goes from %.0f%% to "
                               "%.0f%% of train.lr", run.model_name, planned, reached + 1, hyper.schedule,
                               hyper.epochs, 100 * was, 100 * now)
            continue
        if resume_point(run, read_checkpoints=True)[0] == "afresh":  # (damaged: set aside, nothing to cut short)
            resumes_at.pop(run.model_name, None)  # (it trains every epoch: the estimate counts them all)
            continue
        refused.append(f"{run.model_name} (run {run.run_name}): an interrupted run of these settings was training "
                       f"to {planned} epochs (its latest checkpoint is of epoch {reached}, its learning rate at "
                       f"{100 * was:.0f}% of train.lr); train.epochs={hyper.epochs} would cut its {hyper.schedule} "
                       "schedule short")
    if refused:
        raise ConfigError("train.epochs", "; ".join(refused) + ". Set train.epochs to the interrupted run's epochs "
                          "to finish it, train the shorter run under another name, or delete the "
                          f"interrupted run's folder under {runs[0].storage_path} to start it afresh")
    return resumes_at


def check_schedules_before_the_search(cfg: PipelineConfig) -> None:
    """:func:`check_interrupted_schedules` for the models of ``train.models`` that do not wait for the search,
    made before it: ``run`` with ``train.epochs`` lowered under an interrupted run refused it only after its
    search (minutes to hours). The searched family's runs depend on the search's result; the train stage checks
    those (and these again)."""
    from .data import describe_dataset
    from .runtime import cpus_to_share, free_resources

    choices = [c for c in resolve_models(cfg) if cnnmodels.family_of(c.name) != SEARCHED_FAMILY]
    if not choices:
        return
    cpus, per_node = cpus_to_share(cfg.train, free_resources()["CPU"], "train")
    runs = plan_model_runs(cfg, describe_dataset(cfg.data), choices, stage="train", cluster_cpus=cpus,
                           node_cpus=per_node)
    existing = load_results(cfg.paths.train_dir)
    check_interrupted_schedules([r for r in runs if not _finished(existing.get(r.model_name), r)], warn=False)


def _finished(done: ModelResult | None, run: ModelRun) -> bool:
    """Whether ``done`` (the model's result record) is ``run`` trained to its epochs or further, or stopped for
    good (diverged): nothing to train, whatever else may be due (its registration)."""
    if done is None or done.fingerprint != run.fingerprint:
        return False
    return done.epochs >= run.hyper.epochs or bool(done.diverged_at)


def _split_finished(cfg: PipelineConfig, runs: list[ModelRun]) -> tuple[list[ModelRun], list[str]]:
    """Runs still to train, and the names of those already trained with the same settings to their epochs (or
    further: a run of fewer epochs would resume past its end and record the longer run's model as its own).

    A model trained but missing from the registry (its registration lost to a crash, or its version deleted
    in MLflow) is run again: it resumes from its last checkpoint, trains no epoch, and registers."""
    existing = load_results(cfg.paths.train_dir)
    finished = []
    for run in runs:
        done = existing.get(run.model_name)
        if not _finished(done, run):
            if done is not None and done.fingerprint == run.fingerprint:
                _warn_of_a_warm_restart(run, done.epochs)
            continue
        if done.epochs < run.hyper.epochs:
            # Resumed, it trained nothing from its NaN weights and was registered again as a longer run's.
            logger.warning("[train] %s diverged at epoch %d of its training and stopped; its record (epoch %d) "
                           "stays, and more epochs would train nothing from its weights: lower its learning "
                           "rate (train.model_overrides) to train it again", run.model_name, done.diverged_at,
                           done.best_epoch + 1)
        elif done.epochs > run.hyper.epochs:
            logger.warning("[train] %s was trained to %d epochs with these settings; train.epochs=%d asks for "
                           "fewer, so that result stays (a shorter run of its own needs another name)",
                           run.model_name, done.epochs, run.hyper.epochs)
        finished.append(run)
    complete = [r for r in finished if existing[r.model_name].epochs == r.hyper.epochs
                and not existing[r.model_name].registration_error]
    # Trained, but tested on other test images (an image folder's test/ changed): its record's test_acc compared
    # with nothing the other models are tested on, and the champion, chosen among versions of the current test
    # images, was none of them. (Its versions are of the old test images: said as that, not as "lost".)
    retested = [r.model_name for r in complete if existing[r.model_name].test_split not in ("", r.test_split)]
    for name in retested:
        logger.info("[train] %s is trained but was tested on other test images (the data set's test split "
                    "changed): finishing its run again from its last checkpoint to test and register it", name)
    unregistered = sorted(_unregistered(cfg, [r for r in complete if r.model_name not in retested]))
    for name in unregistered:
        logger.info("[train] %s is trained but not in the registry (lost or deleted): finishing its run again from "
                    "its last checkpoint to register it", name)
    unregistered = [*unregistered, *retested]
    skipped = [r.model_name for r in finished if r.model_name not in unregistered]
    return [r for r in runs if r.model_name not in skipped], skipped


def current_results(cfg: PipelineConfig, runs: list[ModelRun]) -> dict[str, ModelResult]:
    """The result records of ``runs``' own training (their fingerprints, to their epochs or further): a record
    another training left under a model's name (another learning rate, or fewer epochs, before this run of it
    failed) is not this stage's result."""
    wanted = {run.model_name: run for run in runs}
    return {name: result for name, result in load_results(cfg.paths.train_dir).items()
            if name in wanted and result.fingerprint == wanted[name].fingerprint
            and (result.epochs >= wanted[name].hyper.epochs or result.diverged_at)}  # (a diverged one stays)


def _unregistered(cfg: PipelineConfig, runs: list[ModelRun]) -> set[str]:
    """The names among ``runs`` whose training no registered version holds (by its fingerprint, epochs and test
    split tags; versions registered before those tags existed count for their alias, for any epochs or any test
    images) and that no pending
    write will register. Empty when the registry cannot be asked: an outage retrains nothing. Any version counts,
    aliased or not: an alias moved by a pipeline on other data under the same registered name is no reason to
    register again."""
    from .tracking import TAG_FINGERPRINT, TAG_TEST_SPLIT, Tracker, first_line
    from .tracking_queue import load_pending

    if not runs:
        return set()
    pending = {op.args.get("alias") for op in load_pending(cfg.paths.run_dir) if op.kind == "register"}
    tracker = Tracker.for_config(cfg)
    try:
        versions = tracker.client.search_model_versions(f"name = '{cfg.registered_model_name}'")
        aliased = tracker.registered_versions(cfg.registered_model_name)[0] if versions else []
    except Exception as err:  # noqa: BLE001 - MLflow unreachable: checked again at the next run
        logger.warning("[train] could not check the registry (%s); models trained but not registered are not "
                       "registered now", first_line(err))
        return set()
    # The fingerprint leaves epochs out: a version of the same training to fewer epochs does not hold this one.
    # Versions registered before the epochs tag existed count for any epochs, as before.
    # By model name too (versions from before that tag count for any name): two names can share a fingerprint
    # (efficientnet_phi0 and an efficientnet at phi 0 named in train.models: the same B0).
    # And by the test images it was tested on (versions from before that tag count for any): a model retested on
    # a changed test split whose new version was lost in a crash had only its old one, which the champion, chosen
    # among versions of the current test images, passes over; it was never registered again.
    trainings = {(v.tags.get("model_name"), v.tags.get(TAG_FINGERPRINT), v.tags.get("epochs"),
                  v.tags.get(TAG_TEST_SPLIT) or None) for v in versions}
    untagged = {v.alias for v in aliased if TAG_FINGERPRINT not in v.tags}

    def registered(run: ModelRun) -> bool:
        return bool({(name, run.fingerprint, epochs, split) for name in (run.model_name, None)
                     for epochs in (str(run.hyper.epochs), None) for split in (run.test_split or None, None)}
                    & trainings)

    return {r.model_name for r in runs
            if r.model_name not in pending and not registered(r) and r.model_name not in untagged}


def _train_models(cfg: PipelineConfig, queue, parent: str, info, todo: list[ModelRun], free: dict[str, float],
                  tracking, finisher: ModelFinisher) -> list[str]:
    """Run ``todo`` as Tune trials under the MLflow run ``parent``, mirrored into MLflow by ``tracking`` (a
    :class:`~pipelines.tracking_queue.TrialTracking` that calls ``finisher``); returns the failed models' names."""
    import ray
    from ray import tune

    from .runtime import concurrency_for, node_cpus

    todo, capacity = with_overlapped_startup(cfg, todo, free["CPU"], node_cpus())
    concurrency = concurrency_for(cfg.train.max_concurrent_models, trial_resources(todo[0], ray.cluster_resources()),
                                  len(todo), free, gate_capacity=capacity, workers=todo[0].workers)
    training_at_once = min(concurrency, capacity) if capacity else concurrency
    logger.info("[train] training %d model(s) on %s (%d train / %d val / %d test images), %d worker(s) each, "
                "%d at a time%s: %s", len(todo), info.dataset, info.sizes["train"], info.sizes["val"],
                info.sizes["test"], todo[0].workers.num_workers, training_at_once,
                " (the next one starting up meanwhile)" if capacity else "", ", ".join(r.model_name for r in todo))
    with shared_splits() as shared, compute_gate(capacity) as gate:
        prepare(shared, cfg.data, [r.spec for r in todo])
        runs_json = [r.model_copy(update={"shared_data": shared, "compute_gate": gate}).to_dict() for r in todo]
        grid = run_model_trials(
            cfg.paths, experiment=f"{cfg.name}-train-{time.strftime('%Y%m%d-%H%M%S')}",
            param_space={"run": tune.grid_search(runs_json)},
            callbacks=[tracking, ReleaseOnTrialEnd(gate, trial_run_name)], max_concurrent=concurrency,
            trial_retries=cfg.train.trial_retries,
        )
    failed = [result.config["run"]["model"]["name"] for result in grid if result.error is not None]
    failed += [name for name in finisher.failed if name not in failed]
    # Neither finished nor failed: Tune left its loop early and returned as if done (it handles a Ctrl-C itself
    # where TUNE_DISABLE_SIGINT_HANDLER is not 1: a notebook's interrupt, a call without ray_session). Counted
    # as trained, the stage said it succeeded (exit 0) and left their MLflow runs RUNNING: now the abort's path.
    unfinished = [r.model_name for r in todo if r.model_name not in finisher.finished and r.model_name not in failed]
    if unfinished:
        raise KeyboardInterrupt(f"the training of {', '.join(unfinished)} was interrupted")
    queue.put("end_run", parent, status="FAILED" if failed else "FINISHED")
    return failed


def train_stage(cfg: PipelineConfig, coefficients: dict[str, float] | None = None, *,
                show_table: bool = True) -> TrainStageResult:
    """Train every model of ``train.models`` (plus the searched EfficientNet family when ``coefficients``
    are given, and with ``search.compare_paper`` the paper's family at the same phis), each its own Ray Train
    run, as many at once as the cluster fits. Models already trained with the same settings and epochs are
    skipped. Logs progress and (``show_table``) a comparison table."""
    from .runtime import exclusive_stage

    with exclusive_stage(cfg.paths.run_dir, "train"):
        return _train_stage(cfg, coefficients, show_table=show_table)


def _train_stage(cfg: PipelineConfig, coefficients: dict[str, float] | None = None, *,
                 show_table: bool = True) -> TrainStageResult:
    from .data import describe_dataset
    from .runtime import check_workers_fit, cpus_to_share, free_resources, warn_if_storage_is_node_local
    from .tracking import Tracker, stage_start_wait
    from .tracking_queue import TrackingQueue, TrialTracking, check_pending_writes, flushed_on_abort

    info = describe_dataset(cfg.data)
    choices: list[ModelChoice] = resolve_models(cfg, coefficients)
    # Size workers to what is free now (a running Serve app, say, keeps its share), not to the total.
    free = free_resources()
    cpus, per_node = cpus_to_share(cfg.train, free["CPU"], "train")
    runs = plan_model_runs(cfg, info, choices, stage="train", cluster_cpus=cpus, node_cpus=per_node)
    todo, skipped = _split_finished(cfg, runs)
    if skipped:
        logger.info("[train] already trained, skipping: %s", ", ".join(skipped))
    for run in todo:
        check_workers_fit(run.workers, f"[train] {run.model_name}")
    if todo:
        warn_if_storage_is_node_local(cfg.paths.storage)
    resumes_at = check_interrupted_schedules(todo)
    check_pending_writes(cfg)  # writes pending for another store: exit 2 before the stage's run is opened
    tracker = Tracker.for_config(cfg)
    failed = []
    if todo:
        # Fails in seconds, before any model starts, when MLflow or its artifact store cannot be written; and
        # before the queue takes over the writes an earlier command left pending (a queue that never ended would
        # hold them as this process's for as long as it lives: a notebook's next call left them unsent).
        parent = tracker.open_stage_run(
            f"train-{time.strftime('%Y%m%d-%H%M%S')}", {"stage": "train", "cnnzoo.stage_parent": "true"},
            {"dataset": info.dataset, "models": ",".join(r.model_name for r in runs), "epochs": cfg.train.epochs,
             "num_workers": cfg.train.num_workers}, cfg.to_yaml(), wait_s=stage_start_wait(cfg))
    queue = TrackingQueue.for_config(cfg, tracker)
    # The champion alias follows the versions registered, also those of the models that finished before an abort
    # (a Ctrl-C after 3 of 10: `register` found nothing pending and never moved it).
    champion_args = {"registered_model": cfg.registered_model_name, "test_split": info.test_split}
    if todo:
        finisher = ModelFinisher(cfg, queue, todo, resumes_at)
        tracking = TrialTracking(queue, "train", parent, describe=describe_run, on_complete=finisher,
                                 on_error=finisher.trial_failed, on_epoch=finisher.epoch_done)
        with flushed_on_abort(queue, parent, tracking, closing=[("update_champion", champion_args)]):
            failed = _train_models(cfg, queue, parent, info, todo, free, tracking, finisher)
    champion_write = queue.put("update_champion", **champion_args)
    pending = queue.flush(cfg.tracking.pending_timeout_s)
    # Trained, but its registration was refused for good (a diverged model's NaN weights, its run or checkpoint
    # deleted): not in the registry, so not served; the stage failed for it. Also a model skipped for a
    # registration an earlier command left pending, which this stage's queue sent and MLflow refused.
    unregistered = [r.model_name for r in runs if (r.model_name, r.fingerprint) in queue.dropped_registrations
                    and r.model_name not in failed]
    if unregistered:
        logger.error("[train] trained but not registered (the reason is above): %s", ", ".join(unregistered))
        failed += unregistered
    results = current_results(cfg, runs)
    # ... and on every later run of these settings, which skips them: nothing of theirs can be served.
    unregistrable = [name for name in skipped if results.get(name) and results[name].registration_error
                     and name not in failed]
    for name in unregistrable:
        logger.error("[train] %s was trained but cannot be registered (%s); change its settings (a lower "
                     "learning rate for a diverged run) to train it again", name, results[name].registration_error)
    failed += unregistrable
    champion = queue.outcomes.get(champion_write)
    table = comparison_table(list(results.values()), *(champion or (None, None)))
    if show_table and not table.empty:
        logger.info("\n%s", as_text(for_display(table)))
    if champion:
        logger.info("* champion: %s (%s@champion = v%s)", champion[0], cfg.registered_model_name, champion[1])
    if failed:
        logger.error("[train] FAILED: %s (their MLflow runs hold the error; re-run to resume)", ", ".join(failed))
    return TrainStageResult(results=results, failed=failed, skipped=skipped,
                            trained=[r.model_name for r in todo if r.model_name not in failed],
                            champion=champion[0] if champion else None, table=table, pending=len(pending))
