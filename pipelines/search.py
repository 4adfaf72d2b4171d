"""The search stage: Ray Tune searches EfficientNet's compound-scaling coefficients on the user's data.

Fix ``phi`` (``search.phi``, default 1: about "twice the resources" in the paper's sense; the networks
built cost 1.9-3x the baseline's multiply-adds, depths rounding up and widths to multiples of 8, so
``search.objective: mnas`` is the one that weighs cost), then search alpha (depth), beta (width) and gamma
(resolution) under ``|alpha * beta^2 * gamma^2 - target| <= tolerance`` (the space and its samplers are
:mod:`pipelines.search_space`; grid triples that build the same network are one candidate). Each trial
trains the compound-scaled EfficientNet through the same trial machinery as the training stage
(:mod:`pipelines.trials`: a TorchTrainer inside the Tune trial), reporting ``val_acc`` and the objective's
``score`` per epoch: Optuna samples and ASHA stops weak trials early by the score the search ranks by
(``search.objective``). The paper's (1.2, 1.1, 1.15)
is always among the trials when it satisfies the constraint, so the user sees whether the search beat it.

The result (best triple, every trial's triple and score) goes to ``<workdir>/<name>/search/best.json``
and to MLflow (a parent run with the best alpha/beta/gamma, a child run per trial). A re-run with the same
search settings (:func:`~pipelines.planning.search_fingerprint`) reuses it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cnnmodels.scaling import constraint_value

from .compute_gate import ReleaseOnTrialEnd, compute_gate
from .config import PipelineConfig, SearchConfig
from .paths import write_text_atomically
from .planning import (
    ModelChoice,
    ModelRun,
    compound_network,
    data_content,
    earlier_data_contents,
    plan_model_runs,
    search_data,
    search_fingerprint,
    search_fingerprints,
    search_template,
    with_overlapped_startup,
)
from .search_space import (
    PAPER,
    FeasibleRegion,
    feasible_points,
    grid_candidates,
    mnas_factor,
    optuna_space,
    paper_is_feasible,
    same_triple,
)
from .shared_data import prepare, shared_splits
from .trials import EPOCHS_DONE, SCORE, run_model_trials, trial_resources, trial_run, trial_run_name

__all__ = ["SearchResult", "search_stage", "load_search_result", "searched_coefficients", "describe_search_trial"]

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    best: dict[str, Any]
    trials: list[dict[str, Any]]
    objective: str
    phi: float
    paper_included: bool
    fingerprint: str
    #: An image folder's content as the search saw it (:func:`~pipelines.planning.data_content`); "" for the
    #: built-in data sets and for searches saved before it was kept.
    data_content: str = ""
    #: The trials that reported no epoch (failed or stopped before their first): triple and error.
    unreported: list[dict[str, Any]] = field(default_factory=list)
    path: str = ""
    skipped: bool = False

    @property
    def coefficients(self) -> dict[str, float]:
        return {k: float(self.best[k]) for k in ("alpha", "beta", "gamma")}

    def save(self, path) -> None:
        data = asdict(self)
        data.pop("path"), data.pop("skipped")
        write_text_atomically(path, json.dumps(data, indent=2))
        self.path = str(path)


def load_search_result(cfg: PipelineConfig, content: str | None = None,
                       earlier_contents: Sequence[str] = ()) -> SearchResult | None:
    """The finished search of this config (same search settings), if there is one. ``content``: the image
    folder's content now (:func:`~pipelines.planning.data_content`), for the search stage, which searches again
    once it changed; the train stage and the report take the search as it was (they never read the folder
    for it: a report needs no data). ``earlier_contents``: the content as earlier versions hashed it
    (:func:`~pipelines.planning.earlier_data_contents`): a search saved under one is taken and saved with
    ``content``, which tells changes from now on."""
    path = cfg.paths.search_result
    if not path.is_file():
        return None
    try:
        result = SearchResult(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None
    if result.fingerprint not in search_fingerprints(cfg):
        return None
    if content and result.data_content in earlier_contents:
        result.data_content = content
        result.save(path)
    if content and result.data_content and result.data_content != content:
        logger.info("[search] %s changed since the search in %s: searching again", cfg.data.root, path)
        return None
    result.path = str(path)
    return result


def searched_coefficients(cfg: PipelineConfig) -> dict[str, float] | None:
    """The triple of this config's finished search, for the EfficientNet family at ``search.phis``; None (and a
    line saying the family is left out, and why) when there is none."""
    previous = load_search_result(cfg)
    if previous is not None:
        return previous.coefficients
    if cfg.search.phis:
        why = ("the finished search was run with other search or training settings"
               if cfg.paths.search_result.is_file() else "no finished search for this config")
        logger.info("[search] %s: the EfficientNet family at search.phis %s is not trained (run the search stage "
                    "to train it)", why, list(cfg.search.phis))
    return None


def describe_search_trial(phi: float, config: dict) -> tuple[str, str, dict[str, Any]]:
    """MLflow run name, label and params of a search trial: its coefficients and every training setting (the
    training stage's keys)."""
    c = config["coefficients"]
    run = trial_run(config)
    return run.model_name, run.model_name, {
        **run.mlflow_params(), "alpha": c["alpha"], "beta": c["beta"], "gamma": c["gamma"], "phi": phi,
        "compound_product": round(constraint_value(c["alpha"], c["beta"], c["gamma"]), 6),
    }


@dataclass
class _SearchPlan:
    """How the trials are drawn: Tune's param space, search algorithm and trial count."""

    param_space: dict[str, Any]
    search_alg: Any
    num_samples: int
    trials: int
    paper_included: bool


def _network_at(template: ModelRun, coefficients: tuple[float, float, float]):
    """What the template built with ``coefficients`` is (:func:`~pipelines.planning.compound_network`)."""
    return compound_network(template.model.kwargs, coefficients)


def _plan_trials(cfg: PipelineConfig, template: ModelRun) -> _SearchPlan:
    from ray import tune

    search = cfg.search
    paper_included = paper_is_feasible(search)
    if search.mode == "grid":
        candidates = grid_candidates(search, partial(_network_at, template))
        networks = len({_network_at(template, c) for c in feasible_points(search)})
        logger.info("[search] grid: %d of the %d feasible triples (alpha*beta^2*gamma^2 within %s +- %s, step %s; "
                    "%d different networks at phi=%g; at most search.num_trials), %d epoch(s) each", len(candidates),
                    len(feasible_points(search)), search.target, search.tolerance, search.step, networks,
                    search.phi, search.epochs)
        space = {"run": template.to_dict(), "coefficients": tune.grid_search(
            [{"alpha": a, "beta": b, "gamma": g} for a, b, g in candidates])}
        return _SearchPlan(space, None, 1, len(candidates), paper_included)
    from ray.tune.search.optuna import OptunaSearch

    region = FeasibleRegion.of(search)
    points = []
    if paper_included and (uvw := region.inverse(*PAPER)) is not None:
        points.append(dict(zip(("u_alpha", "u_beta", "u_gamma"), uvw, strict=True)))
    else:
        paper_included = False
    search_alg = OptunaSearch(space=partial(optuna_space, region), metric=SCORE, mode="max",
                              points_to_evaluate=points or None, seed=search.seed)
    logger.info("[search] optuna: %d trials sampled inside the feasible region, phi=%g, %d epoch(s) each",
                search.num_trials, search.phi, search.epochs)
    return _SearchPlan({"run": template.to_dict()}, search_alg, search.num_trials, search.num_trials, paper_included)


def with_search_gpu_share(cfg: PipelineConfig, template: ModelRun) -> ModelRun:
    """The search's template run with ``search.gpus_per_trial`` as its workers' GPU share. Without
    ``train.use_gpu`` the trials run on CPUs: the share is then said to be unused (a GPU preset tried on a CPU
    machine with ``--set train.use_gpu=false``), not silently dropped."""
    share = cfg.search.gpus_per_trial
    if share is None:
        return template
    if not cfg.train.use_gpu:
        logger.warning("[search] search.gpus_per_trial (%g) is left unused: train.use_gpu is false, so the trials "
                       "run on CPUs", share)
        return template
    return template.model_copy(update={"workers": template.workers.model_copy(update={"gpus_per_worker": share})})


def _parent_run(tracker, cfg: PipelineConfig, experiment: str, dataset: str) -> str:
    """The search's MLflow parent run: reopened when this experiment ran before (a resumed search)."""
    from .tracking import stage_start_wait

    search = cfg.search
    return tracker.open_stage_run(
        f"search-{time.strftime('%Y%m%d-%H%M%S')}",
        {"stage": "search", "cnnzoo.stage_parent": "true", "cnnzoo.experiment": experiment},
        {"mode": search.mode, "phi": search.phi, "target": search.target, "tolerance": search.tolerance,
         "epochs": search.epochs, "alpha_range": list(search.alpha), "beta_range": list(search.beta),
         "gamma_range": list(search.gamma), "objective": search.objective, "dataset": dataset},
        cfg.to_yaml(), reuse=f"tags.`cnnzoo.experiment` = '{experiment}'", wait_s=stage_start_wait(cfg))


def _trial_records(grid, phi: float) -> list[dict[str, Any]]:
    """One record per trial that reported at least one epoch: its triple, size and best ``val_acc``."""
    records = []
    for result in grid:
        config = result.config
        c = config["coefficients"]
        history = result.metrics_dataframe
        accs = [] if history is None or "val_acc" not in history else [v for v in history["val_acc"] if v == v]
        if not accs:
            continue
        # The last epoch's number, not the count of rows: a resumed trial's history repeats the epochs it re-ran
        # from its checkpoint, or lacks those reported before the interruption but not yet saved with it.
        numbered = history["epoch"].dropna() if "epoch" in history else ()
        epochs = int(numbered.max()) + 1 if len(numbered) else len(accs)
        # Each epoch's val_acc (the last report of a re-run epoch; None for one lost to an interruption), to set
        # trials that ASHA stopped at different epochs side by side at equal epochs.
        per_epoch: list[float | None] = [None] * epochs
        if len(numbered):
            for epoch, acc in zip(history["epoch"], history["val_acc"], strict=True):
                if epoch == epoch and acc == acc:
                    per_epoch[int(epoch)] = float(acc)
        else:
            per_epoch = [float(a) for a in accs]
        described = describe_search_trial(phi, config)[2]
        records.append({
            "alpha": c["alpha"], "beta": c["beta"], "gamma": c["gamma"],
            "compound_product": described["compound_product"], "val_acc": float(max(accs)),
            "epochs_trained": epochs, "val_acc_per_epoch": per_epoch, "params_count": described["params_count"],
            "macs": described["macs"],
            "input_size": described["input_size"], "error": None if result.error is None else str(result.error)[:500],
            "paper": same_triple((c["alpha"], c["beta"], c["gamma"]), PAPER),
        })
    return records


def _unreported_trials(grid) -> list[dict[str, Any]]:
    """The trials that reported no epoch (failed, or stopped, before their first): their triple and error, which
    :func:`_trial_records` has no record for."""
    unreported = []
    for result in grid:
        history = result.metrics_dataframe
        if history is not None and "val_acc" in history and any(v == v for v in history["val_acc"]):
            continue
        c = result.config["coefficients"]
        record = {"alpha": c["alpha"], "beta": c["beta"], "gamma": c["gamma"],
                  "error": None if result.error is None else str(result.error)[:500],
                  "paper": same_triple((c["alpha"], c["beta"], c["gamma"]), PAPER)}
        diverged = history["diverged"].fillna(False).astype(bool) if history is not None and "diverged" in history \
            else None
        if diverged is not None and diverged.any():  # (no error, and run again it would diverge again)
            record["diverged_at"] = int(history["epoch"][diverged].iloc[0]) + 1
        unreported.append(record)
    return unreported


def _why_unreported(record: dict[str, Any]) -> str:
    """Why a trial reported no epoch, for a log line that names many: its divergence or its error's first line."""
    if record.get("diverged_at"):
        return f"diverged at epoch {record['diverged_at']}"
    error = record.get("error")
    return error.strip().splitlines()[0][:200] if error and error.strip() else "no error recorded"


def _mnas_target_macs(cfg: PipelineConfig, template: ModelRun) -> float | None:
    """The MACs target of ``search.objective: mnas`` (None for ``val_acc``)."""
    search = cfg.search
    if search.objective != "mnas":
        return None
    return search.target_macs or _baseline_macs(template) * search.target ** search.phi


def _score(records: list[dict[str, Any]], cfg: PipelineConfig, template: ModelRun) -> None:
    """``score`` per record: ``val_acc``, or the MnasNet objective ``val_acc * (macs / target)^-0.07`` (the
    metric the trials reported to Tune, so its searcher and ASHA followed the same objective)."""
    target_macs = _mnas_target_macs(cfg, template)
    for r in records:
        r["score"] = r["val_acc"] * mnas_factor(r["macs"], target_macs)
    # A trial that failed (after its retries) ranks below every one that did not, whatever it reached before:
    # its triple would found the family. On equal scores the longer-trained, then the smaller model wins; then
    # (triples that build the same network at search.phi, which Optuna may draw twice, tie on all of these, and
    # Tune's result order chose the family's coefficients at the other phis) the paper's, as the grid keeps it
    # for its network, then the triple nearest the constraint's target, then the triple itself.
    target = cfg.search.target
    records.sort(key=lambda r: (r["error"] is not None, -r["score"], -r["epochs_trained"], r["macs"], not r["paper"],
                                abs(r["compound_product"] - target), r["alpha"], r["beta"], r["gamma"]))


def _best(records: list[dict[str, Any]], trials: int, unreported: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The winning record of the ranked ``records`` (of ``trials`` run); ``RuntimeError`` when none finished.
    Logs the trials left out (no epoch reported: ``unreported``, by triple and error) and the failed ones ranked
    last."""
    if len(records) < trials:
        named = "".join(f"; ({r['alpha']}, {r['beta']}, {r['gamma']}): {_why_unreported(r)}"
                        for r in unreported)
        logger.warning("[search] %d of %d trial(s) reported no epoch (failed or stopped before the first) and are "
                       "left out%s", trials - len(records), trials, named)
    failed = [r for r in records if r["error"] is not None]
    if not records or len(failed) == len(records):
        errors = [r["error"] for r in [*failed, *unreported] if r["error"]]
        detail = f"; the first error: {errors[0]}" if errors else ""
        raise RuntimeError(f"the search finished without a trial that reported val_acc and did not fail{detail}; "
                           "see the Ray logs")
    if failed:
        logger.warning("[search] %d trial(s) failed after reporting an epoch; ranked below every trial that "
                       "did not: %s", len(failed), ", ".join(
                           f"({r['alpha']}, {r['beta']}, {r['gamma']}): {(r['error'].splitlines() or [''])[0][:200]}"
                           for r in failed))
    best = records[0]
    longer = [r["epochs_trained"] for r in records
              if r["error"] is None and r["epochs_trained"] > best["epochs_trained"]]
    if longer:
        # Ranked by its best epoch's score, a trial ASHA stopped (its score fell at a rung) can still lead trials it
        # kept training: say so rather than let "beats" read as equal training.
        logger.warning("[search] the best triple (%s, %s, %s) trained %d epoch(s) and was stopped, while %d other "
                       "trial(s) trained up to %d: its score %.4f is its best epoch's, from less training than "
                       "theirs", best["alpha"], best["beta"], best["gamma"], best["epochs_trained"], len(longer),
                       max(longer), best["score"])
    return dict(best)


def _baseline_macs(template: ModelRun) -> int:
    """MACs of the unscaled baseline (phi = 0: every coefficient's power is 1)."""
    baseline = template.model_copy(update={"model": ModelChoice(template.model_name, template.arch,
                                                                dict(template.model.kwargs, phi=0.0))})
    return baseline.with_coefficients(1.0, 1.0, 1.0).macs


def _experiment_marker(cfg: PipelineConfig) -> Path:
    """Where the latest forced experiment of each of the search's settings is named, beside the search result."""
    return cfg.paths.search_result.with_name("experiment.json")


def _forced_experiments(marker: Path) -> dict[str, str]:
    """The marker's forced experiments by search fingerprint; empty for a damaged (or no) marker."""
    if not marker.is_file():
        return {}
    try:
        latest = json.loads(marker.read_text())
        if "experiments" in latest:
            return {str(key): str(value) for key, value in latest["experiments"].items()}
        return {str(latest["fingerprint"]): str(latest["experiment"])}  # (one only, as older versions wrote it)
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as err:  # cut short by a crash
        logger.warning("[search] %s is damaged (%s): resuming the search's default experiment", marker, err)
        return {}


def _begin_forced_search(cfg: PipelineConfig, fingerprint: str, experiment: str) -> None:
    """Make the forced ``experiment`` the one a re-run continues, and drop the finished result it replaces: an
    interrupted forced search must not pass for done on the next run, which resumes it instead. Only once the
    stage's checks passed and its MLflow run is open: a forced search refused at its start (an MLflow outage,
    too few validation images) kept nothing of the finished one, and the next run trained every trial again."""
    # One per settings: with only the latest kept, forcing other settings made going back to these resume their
    # unforced experiment (the results forced away from) or start afresh, the forced one's progress lost.
    marker = _experiment_marker(cfg)
    write_text_atomically(marker, json.dumps({"experiments": {**_forced_experiments(marker),
                                                              fingerprint: experiment}}))
    cfg.paths.search_result.unlink(missing_ok=True)


def _experiment_name(cfg: PipelineConfig, fingerprint: str, force: bool) -> str:
    """The search's Tune experiment (its trials' Train runs are named after it). A re-run continues the latest
    experiment of these settings, interrupted or finished; ``force`` names a new one, since a finished one
    would only be restored, its trials not run again (:func:`_begin_forced_search` records it once the stage's
    checks have passed)."""
    marker = _experiment_marker(cfg)
    if force:
        return f"{cfg.name}-search-{fingerprint}-{time.strftime('%Y%m%d-%H%M%S')}"
    # ``fingerprint`` may carry an image folder's content after the settings' fingerprint: kept on the older ones.
    current, *older = search_fingerprints(cfg)
    suffix = fingerprint[len(current):] if fingerprint.startswith(current) else None
    accepted = [fingerprint] + ([f"{legacy}{suffix}" for legacy in older] if suffix is not None else [])
    forced = _forced_experiments(marker)
    if found := next((forced[key] for key in accepted if key in forced), None):
        return found
    default = f"{cfg.name}-search-{fingerprint}"
    if len(accepted) > 1 and not _experiment_exists(cfg, default):
        for older in accepted[1:]:  # an interrupted search saved under the fingerprint before this version's
            if _experiment_exists(cfg, f"{cfg.name}-search-{older}"):
                return f"{cfg.name}-search-{older}"
    return default


def _experiment_exists(cfg: PipelineConfig, experiment: str) -> bool:
    """Whether Tune can restore ``experiment`` from the run's storage."""
    try:
        from ray import tune

        return bool(tune.Tuner.can_restore(f"{cfg.paths.storage.rstrip('/')}/{experiment}"))
    except Exception:  # noqa: BLE001 - storage that does not answer: a new experiment, as before
        return False


def search_stage(cfg: PipelineConfig, *, force: bool = False) -> SearchResult:
    """Run (or resume) the coefficient search; returns the best triple and every trial's score. With ``force``
    a finished search of the same settings is not reused: the trials run again, in a new Tune experiment."""
    from .runtime import exclusive_stage

    with exclusive_stage(cfg.paths.run_dir, "search"):
        return _search_stage(cfg, force=force)


def asha_scheduler(search: SearchConfig):
    """ASHA over the epochs each trial's model has trained (not Tune's iterations, which start again at 1 in
    a trial restarted from its Train run's checkpoint)."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=EPOCHS_DONE, max_t=search.epochs, grace_period=search.grace_period,
                         reduction_factor=search.reduction_factor)


def _search_stage(cfg: PipelineConfig, *, force: bool = False) -> SearchResult:
    import ray

    from .data import describe_dataset
    from .runtime import (
        check_workers_fit,
        concurrency_for,
        cpus_to_share,
        free_resources,
        node_cpus,
        warn_if_storage_is_node_local,
    )
    from .tracking import Tracker
    from .tracking_queue import TrackingQueue, TrialTracking, check_pending_writes, flushed_on_abort

    search = cfg.search
    data_cfg = cfg.model_copy(update={"data": search_data(cfg)})
    # Read here for an image folder only (it can change under the same settings); the built-in sets cannot.
    content, earlier_contents, info = "", [], None
    if cfg.data.dataset == "imagefolder":
        info = describe_dataset(data_cfg.data)
        content, earlier_contents = data_content(info), earlier_data_contents(info)
    if not force and (previous := load_search_result(cfg, content, earlier_contents)) is not None:
        # (a trial that diverged is not counted: run again, it would diverge again)
        failed = sum(r.get("error") is not None for r in previous.trials) + sum(
            not r.get("diverged_at") for r in previous.unreported)
        retry = (f"; {failed} of its trials failed and are not run again (`search --force` runs every trial "
                 "again)") if failed else ""
        logger.info("[search] already done: best alpha=%s, beta=%s, gamma=%s (val_acc %.4f); %s%s",
                    previous.best["alpha"], previous.best["beta"], previous.best["gamma"], previous.best["val_acc"],
                    previous.path, retry)
        previous.skipped = True
        return previous

    info = info or describe_dataset(data_cfg.data)  # (an image folder's read once: 256 of its images decoded)
    fingerprint = search_fingerprint(cfg)
    # An image folder's trials are planned for its files: changed, they are another experiment, not resumed.
    # Named with the test split's files in: the trials carry every split's sizes, which each worker checks, so an
    # interrupted search resumed after test/ changed failed every retry. (The hash the names had before.)
    experiment_fingerprint = f"{fingerprint}-{earlier_contents[0]}" if content else fingerprint
    experiment = _experiment_name(cfg, experiment_fingerprint, force)
    free = free_resources()
    cpus, per_node = cpus_to_share(cfg.train, free["CPU"], "search")
    template = plan_model_runs(data_cfg, info, [search_template(cfg)], stage="search", epochs=search.epochs,
                               cluster_cpus=cpus, node_cpus=per_node)[0].model_copy(
                                   update={"run_name": experiment})
    template = with_search_gpu_share(cfg, template)
    plan = _plan_trials(cfg, template)
    if not plan.paper_included:
        logger.info("[search] note: the paper's (1.2, 1.1, 1.15) (product %.3f) is outside the configured ranges "
                    "or constraint, so it is not among the trials", constraint_value(*PAPER))
    scheduler = asha_scheduler(search) if search.asha else None
    check_workers_fit(template.workers, "[search] each trial",
                      "search.gpus_per_trial" if search.gpus_per_trial is not None else "train.gpus_per_worker")
    warn_if_storage_is_node_local(cfg.paths.storage)

    check_pending_writes(cfg)  # writes pending for another store: exit 2 before the stage's run is opened
    tracker = Tracker.for_config(cfg)
    parent = _parent_run(tracker, cfg, experiment, info.dataset)  # before the queue takes pending writes over
    if force:
        _begin_forced_search(cfg, experiment_fingerprint, experiment)
    queue = TrackingQueue.for_config(cfg, tracker)
    # Reopened above, while the interrupted command's "run ended (KILLED)" may still be pending: sent by this queue
    # first, it showed the resumed search as KILLED until its end. Reopened again after what was pending.
    queue.put("reopen", parent)
    callback = TrialTracking(queue, "search", parent, describe=partial(describe_search_trial, search.phi))
    # Every trial runs the template with its own coefficients: they overlap as the training stage's models do.
    overlapped, capacity = with_overlapped_startup(cfg, [template] * plan.trials, free["CPU"], node_cpus())
    template = overlapped[0]
    # An error or Ctrl-C after Tune returns (reading the trials, saving the result) ends the parent run too: it
    # stayed RUNNING, and the last trials' writes died with the daemon writer.
    with flushed_on_abort(queue, parent, callback):
        with shared_splits() as shared, compute_gate(capacity) as gate:
            if search.mode == "grid":  # every trial's input size is known: convert them now
                prepare(shared, template.data, [template.with_coefficients(**c).spec
                                                for c in plan.param_space["coefficients"]["grid_search"]])
            shared_run = template.model_copy(update={"shared_data": shared, "compute_gate": gate})
            plan.param_space["run"] = shared_run.to_dict()
            plan.param_space["mnas_target_macs"] = _mnas_target_macs(cfg, template)
            grid = run_model_trials(
                cfg.paths, experiment=experiment, param_space=plan.param_space,
                callbacks=[callback, ReleaseOnTrialEnd(gate, trial_run_name)],
                max_concurrent=concurrency_for(search.max_concurrent_trials,
                                               trial_resources(template, ray.cluster_resources()), plan.trials,
                                               free, gate_capacity=capacity, workers=template.workers),
                num_samples=plan.num_samples, search_alg=plan.search_alg, scheduler=scheduler, restore=True,
                trial_retries=cfg.train.trial_retries, placement=plan.param_space["run"], metric=SCORE,
            )
        records, unreported = _trial_records(grid, search.phi), _unreported_trials(grid)
        # Neither finished nor failed: Tune left its loop early and returned as if done (it handles a Ctrl-C itself
        # where TUNE_DISABLE_SIGINT_HANDLER is not 1, and always a SIGUSR1). Saved, the partial search was reused
        # as finished, its best so far the family's coefficients, and never resumed: the abort's path instead, as
        # the train stage's (the next command restores the experiment).
        if (ended := grid.num_terminated + grid.num_errors) < plan.trials:
            raise KeyboardInterrupt(f"the search was interrupted: {ended} of its {plan.trials} trials ended")
        _score(records, cfg, template)
        best = _best(records, len(grid), unreported)  # no trial finished: ends the parent run FAILED
        result = SearchResult(best=best, trials=records, objective=search.objective, phi=search.phi,
                              paper_included=plan.paper_included, fingerprint=fingerprint, data_content=content,
                              unreported=unreported)
        result.save(cfg.paths.search_result)
        queue.put("log_params", parent,
                  params={"best_alpha": best["alpha"], "best_beta": best["beta"], "best_gamma": best["gamma"]})
        queue.put("set_tags", parent, tags={"alpha": best["alpha"], "beta": best["beta"], "gamma": best["gamma"]})
        queue.put("log_metrics", parent, metrics={"best_val_acc": best["val_acc"], "best_score": best["score"],
                                                  "trial_epochs": sum(r["epochs_trained"] for r in records)})
        queue.put("log_text", parent, text=Path(result.path).read_text(), artifact_file=Path(result.path).name)
    queue.put("end_run", parent, status="FINISHED")
    queue.flush(cfg.tracking.pending_timeout_s)
    _log_search_table(records, best, unreported)
    return result


def _log_search_table(records: list[dict], best: dict, unreported: list[dict] = ()) -> None:
    import pandas as pd

    table = pd.DataFrame(records)
    table["failed"] = table["error"].notna()
    table = table[["alpha", "beta", "gamma", "compound_product", "input_size", "params_count", "macs",
                   "epochs_trained", "val_acc", "score", "paper"] + (["failed"] if table["failed"].any() else [])]
    logger.info("\n%s", table.to_string(index=False))
    logger.info("[search] best: alpha=%s, beta=%s, gamma=%s (score %.4f)%s", best["alpha"], best["beta"],
                best["gamma"], best["score"], _against_the_paper(records, best, unreported))


def _against_the_paper(records: list[dict], best: dict, unreported: list[dict] = ()) -> str:
    """How the best triple did against the paper's, for the search's last line."""
    paper = next((r for r in records if r["paper"]), None)
    if paper is None:
        lost = next((r for r in unreported if r["paper"]), None)
        if lost is not None:  # it would otherwise vanish from the comparison the search exists to make
            return (f" - the paper's (1.2, 1.1, 1.15) reported no epoch ({_why_unreported(lost)}), so it is "
                    "not compared")
        return ""
    if best["paper"]:
        return " - the paper's triple"
    if paper["error"] is not None:
        return " - the paper's (1.2, 1.1, 1.15) failed"
    epochs = paper["epochs_trained"]
    if epochs < best["epochs_trained"]:
        # ASHA stopped it: its score is from fewer epochs than the best's, so "beats" would compare unequal
        # training (on Fashion-MNIST, 1 epoch's 0.8652 against 4 epochs' 0.9318).
        best_then = [a for a in (best.get("val_acc_per_epoch") or [])[:epochs] if a is not None]
        against = f" against {max(best_then):.4f} for the best" if best_then else ""
        return (f" - the paper's (1.2, 1.1, 1.15), stopped by ASHA after {epochs} epoch(s), had val_acc "
                f"{paper['val_acc']:.4f} by then{against}")
    if epochs > best["epochs_trained"]:
        # The mirror case: the best was stopped early and the paper's trained on; set them side by side at the
        # best's epochs, where both trained.
        paper_then = [a for a in (paper.get("val_acc_per_epoch") or [])[:best["epochs_trained"]] if a is not None]
        then = f" had {max(paper_then):.4f} by then and" if paper_then else ""
        return (f" - stopped after {best['epochs_trained']} epoch(s); the paper's (1.2, 1.1, 1.15){then} reached "
                f"{paper['val_acc']:.4f} in {epochs}")
    if paper["score"] == best["score"]:
        return f" - ties with the paper's (1.2, 1.1, 1.15) at {paper['score']:.4f}, in fewer MACs or more epochs"
    return f" - beats the paper's (1.2, 1.1, 1.15) at {paper['score']:.4f}"
