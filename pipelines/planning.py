"""Planning, on the driver: which models run, with which settings, at which input size.

A :class:`ModelRun` is one Ray Train run's whole description. It composes the typed config sections
(``DataConfig``, ``Hyperparameters``, ``WorkerSettings``) instead of copying their fields, so a new
setting reaches the workers without being listed anywhere, and it is validated (unknown keys are errors)
whenever it is rebuilt from JSON. Its :attr:`~ModelRun.fingerprint` hashes everything that decides the
result except the number of epochs: a re-run with the same fingerprint continues the run, a changed
learning rate (or label smoothing, data, model option...) starts a fresh one. The search's fingerprint
(:func:`search_fingerprint`) is derived the same way from the search settings and the template run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

import cnnmodels

from .config import (
    ConfigError,
    DataConfig,
    Hyperparameters,
    PipelineConfig,
    SearchConfig,
    WorkerSettings,
    baseline_settings,
    hyperparameters_for,
)
from .data import DatasetInfo, make_spec
from .preprocess import PreprocessSpec
from .search_space import PAPER, coefficients_label, grid_candidates, same_triple

__all__ = [
    "ModelChoice",
    "ModelRun",
    "SEARCHED_FAMILY",
    "PAPER_FAMILY",
    "resolve_models",
    "plan_model_runs",
    "search_template",
    "search_fingerprint",
    "data_content",
    "earlier_data_contents",
    "coefficients_label",
    "auto_cpus_per_worker",
    "family_members",
    "with_overlapped_startup",
    "fingerprint",
]

logger = logging.getLogger(__name__)

#: Data settings that change how fast data arrives, not which images a model sees. ``skip_bad_files`` only
#: decides whether unreadable files stop the stage; the files left out are fingerprinted themselves
#: (``ModelRun.excluded_files``).
_DATA_RUNTIME_KEYS = {"loader_workers", "download", "skip_bad_files"}
#: Search settings that change how the search runs or what is trained after it, not what it finds.
_SEARCH_RUNTIME_KEYS = {"max_concurrent_trials", "phis", "compare_paper"}
#: Name prefixes (cnnmodels families) of the EfficientNet members built from the searched coefficients
#: (``efficientnet_phi1``) and from the paper's (``efficientnet_paper_phi1``, with ``search.compare_paper``).
SEARCHED_FAMILY = "efficientnet_phi"
PAPER_FAMILY = "efficientnet_paper_phi"


def fingerprint(payload: Any) -> str:
    """A short, stable hash of a JSON-serialisable payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model list: a display/registry name, the cnnmodels builder and its options."""

    name: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def _recipe(choice: ModelChoice, data: DataConfig, hyper: Hyperparameters, workers: WorkerSettings) -> dict:
    """The settings that decide a model's result, except its length (``epochs``)."""
    hyper_settings = hyper.model_dump(mode="json", exclude={"epochs"})
    if hyper_settings["cpu_bf16"] is False:  # only when on: runs from before the setting keep their fingerprints
        del hyper_settings["cpu_bf16"]
    kwargs = choice.kwargs
    if choice.arch == "efficientnet" and float(kwargs.get("phi", 0.0)) == 0:
        # Every multiplier is 1 at phi 0: the same B0 whatever the triple, so a new search's triple does not
        # train efficientnet_phi0 again (its record keeps the triple it was planned with).
        kwargs = {key: value for key, value in kwargs.items() if key not in ("alpha", "beta", "gamma")}
    return {
        "arch": choice.arch,
        "model_kwargs": kwargs,
        "data": data.model_dump(mode="json", exclude=_DATA_RUNTIME_KEYS),
        "hyper": hyper_settings,
        "num_workers": workers.num_workers,
        "amp": workers.amp,
    }


class ModelRun(BaseModel):
    """Everything one training run needs; travels to Tune trials as JSON and to workers as this object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelChoice
    data: DataConfig
    hyper: Hyperparameters
    workers: WorkerSettings
    spec: PreprocessSpec
    stage: Literal["train", "search"]
    run_name: str
    storage_path: str
    params_count: int = 0
    macs: int = 0
    #: The stage's shared-data actor (:mod:`pipelines.shared_data`), where workers fetch converted splits;
    #: not part of the fingerprint (it changes how fast the data arrives, not which data).
    shared_data: str | None = None
    #: PyTorch threads per worker when they differ from the reserved CPUs (overlapped start-up).
    threads: int | None = None
    #: The stage's compute gate (:mod:`pipelines.compute_gate`) that workers wait at before training.
    compute_gate: str | None = None
    #: Image-folder files the driver's check found unreadable and ``data.skip_bad_files`` leaves out
    #: (relative to ``data.root``): every worker builds its file list without them, without re-checking.
    excluded_files: tuple[str, ...] = ()
    #: Those of ``excluded_files`` only the test split would have read (``DatasetInfo.test_excluded_files``): not
    #: part of the fingerprint, as the test images are not (an unreadable test image retrained every model).
    test_excluded_files: tuple[str, ...] = ()
    #: The split sizes the driver planned with (``DatasetInfo.sizes``): a worker that reads its own copy of the
    #: data checks it finds the same (None in runs planned before it existed: not checked).
    split_sizes: dict[str, int] | None = None
    #: Which file is in which split (``DatasetInfo.membership``): checked like ``split_sizes`` (None: not).
    split_membership: str | None = None
    #: Which test images it is tested on (``DatasetInfo.test_split``): a tag of its registered version, so the
    #: champion is chosen among versions tested on the same images. Not part of the fingerprint: a model trained
    #: is tested again on other test images, not trained again.
    test_split: str = ""
    #: An image folder's training and validation files with their labels (``DatasetInfo.training_membership``):
    #: part of the fingerprint. The settings alone kept a model trained before images were added, relabelled
    #: (moved to another class folder) or removed, and it was skipped as trained. None for in-memory data sets.
    training_membership: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> ModelRun:
        """Rebuild from :meth:`to_dict`'s JSON form; unknown or missing keys are errors."""
        return cls.model_validate(data)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def evaluate_test(self) -> bool:
        """Training runs end with a test evaluation of their best checkpoint; search trials do not."""
        return self.stage == "train"

    def mlflow_params(self) -> dict[str, Any]:
        """The run's MLflow params: the same keys for every model and search trial, so that runs compare on all
        their settings (a search trial trained on ``search.train_subset`` images for ``search.epochs`` says so)."""
        params = {
            "arch": self.arch,
            "model_name": self.model_name,
            "params_count": self.params_count,
            "macs": self.macs,
            "input_size": self.spec.image_size,
            **self.hyper.model_dump(mode="json"),
            "num_workers": self.workers.num_workers,
            "amp": self.workers.amp,
            # The layout the workers train in (pipelines.worker.uses_channels_last), not the setting: on CPUs
            # only some architectures use it, and the runs of the others said True while training contiguous.
            "channels_last": self.workers.channels_last and (
                self.workers.use_gpu or trains_channels_last_on_cpu(self.arch)),
            "dataset": self.data.dataset,
            "augment": self.data.augment,
            "model_kwargs": json.dumps(self.model.kwargs, sort_keys=True),
        }
        if self.split_sizes:
            params["train_images"] = self.split_sizes.get("train")
        return params

    @property
    def threads_per_worker(self) -> int:
        return self.threads or max(1, int(round(float(self.workers.cpus_per_worker))))

    @property
    def fingerprint(self) -> str:
        """Hash of every setting that decides the result (model, data, preprocessing, hyper-parameters but
        epochs, workers, precision): equal fingerprints mean a re-run continues this run."""
        payload = {**_recipe(self.model, self.data, self.hyper, self.workers), "spec": self.spec.to_dict()}
        # Only when there are any: runs on clean data keep their earlier names.
        if training_excluded := sorted(set(self.excluded_files) - set(self.test_excluded_files)):
            payload["excluded_files"] = training_excluded
        if self.training_membership:  # (image folders only: the built-in data sets' runs keep their names)
            payload["training_files"] = self.training_membership
        return fingerprint(payload)

    def with_coefficients(self, alpha: float, beta: float, gamma: float) -> ModelRun:
        """This (search-template) run with other compound-scaling coefficients, named after them."""
        label = coefficients_label(alpha, beta, gamma)
        choice = ModelChoice(label, self.arch, dict(self.model.kwargs, alpha=float(alpha), beta=float(beta),
                                                    gamma=float(gamma)))
        model = _build(choice, self.spec.num_classes, self.spec.channels)
        spec = self.spec.with_size(model.input_size_for(self.spec.image_size))
        profile = cnnmodels.profile(model, spec.input_shape)
        return self.model_copy(update={"model": choice, "spec": spec, "run_name": f"{self.run_name}-{label}",
                                       "params_count": profile.inference_params, "macs": profile.macs})


@functools.cache
def trains_channels_last_on_cpu(arch: str) -> bool:
    """Whether ``arch`` trains channels-last on CPU workers too (its class's ``channels_last_on_cpu``: DenseNet,
    GoogLeNet, EfficientNet), asked of one built once, at its default options, on the meta device: the class
    decides, not the options (a search's trials, each with its own coefficients, build none of their own)."""
    import torch

    try:
        with torch.device("meta"):
            model = cnnmodels.create_model(arch)
    except Exception:  # noqa: BLE001 - a model the meta device cannot build: said as contiguous
        return False
    return bool(getattr(model, "channels_last_on_cpu", False))


def _build(choice: ModelChoice, num_classes: int, channels: int):
    return cnnmodels.create_model(choice.arch, num_classes=num_classes, in_chans=channels, **choice.kwargs)


def _small_input(cfg: PipelineConfig) -> bool:
    if cfg.train.small_input == "auto":
        return cfg.data.image_size <= 64
    return bool(cfg.train.small_input)


def _with_data_defaults(cfg: PipelineConfig, arch: str, options: dict[str, Any]) -> dict[str, Any]:
    """``small_input`` from the data's image size, EfficientNet's base resolution from it too."""
    options = dict(options)
    accepted = cnnmodels.model_options(arch)
    if arch != "lenet5" and "small_input" in accepted:
        options.setdefault("small_input", _small_input(cfg))
    if "base_resolution" in accepted:
        options.setdefault("base_resolution", cfg.data.image_size)
    return options


def resolve_models(cfg: PipelineConfig, coefficients: dict[str, float] | None = None) -> list[ModelChoice]:
    """``train.models`` plus, when coefficients were found, the EfficientNet family at ``search.phis``
    (``efficientnet_phiN``) and, with ``search.compare_paper``, the family of the paper's coefficients at the
    same phis but 0 (``efficientnet_paper_phiN``; at phi 0 both are B0), unless the searched triple is the
    paper's."""
    choices = []
    searched = None if coefficients is None else {k: float(coefficients[k]) for k in ("alpha", "beta", "gamma")}
    for name in cfg.train.models:
        arch, implied = cnnmodels.resolve_model_name(name)
        options = {**baseline_settings(cfg.train.model_options, name), **implied,
                   **cfg.train.model_options.get(name, {})}
        if searched is not None and cnnmodels.family_of(name) == SEARCHED_FAMILY:
            # A searched member named in train.models is still the searched family's (its model options win):
            # else it took the builder's defaults, the paper's triple, under the searched family's name.
            options = {**searched, **options}
        choices.append(ModelChoice(name, arch, _with_data_defaults(cfg, arch, options)))
    if coefficients is None:
        return choices
    triple = tuple(float(coefficients[k]) for k in ("alpha", "beta", "gamma"))
    families = [(SEARCHED_FAMILY, triple)]
    if cfg.search.compare_paper:
        if same_triple(triple, PAPER):
            logger.info("[train] search.compare_paper: the search found the paper's (1.2, 1.1, 1.15) itself, so "
                        "the searched family is the paper's; it is trained once, as %sN", SEARCHED_FAMILY)
        else:
            families.append((PAPER_FAMILY, PAPER))
    known = {c.name for c in choices}
    for prefix, (alpha, beta, gamma) in families:
        for phi in cfg.search.phis:
            name = cnnmodels.family_member_name("efficientnet", phi, prefix=prefix)
            if prefix == PAPER_FAMILY and float(phi) == 0:
                continue  # every multiplier is 1 at phi 0: the searched family's member is the same model
            if name not in known:
                # Its own model options too (a dropout for efficientnet_phi2), as for a model train.models names.
                # (and the search baseline's, under them: the triple was found on that network)
                options = {**baseline_settings(cfg.train.model_options, name), "phi": float(phi), "alpha": alpha,
                           "beta": beta, "gamma": gamma, **cfg.train.model_options.get(name, {})}
                choices.append(ModelChoice(name, "efficientnet", _with_data_defaults(cfg, "efficientnet", options)))
    return choices


def family_members(cfg: PipelineConfig) -> list[str]:
    """The EfficientNet family members a training after a search adds to ``train.models`` (``search.phis``, and
    the paper's family with ``search.compare_paper``), whatever the coefficients found."""
    stand_in = {"alpha": 1.25, "beta": 1.05, "gamma": 1.1}  # (not the paper's: its family would be trained once)
    return [c.name for c in resolve_models(cfg, stand_in) if c.name not in cfg.train.models]


def largest_fitting_share(node_cpus: list[float], workers: int) -> float:
    """The largest CPU share (in hundredths) of which ``workers`` fit on nodes of ``node_cpus`` CPUs, each node
    keeping a sliver for the Tune trial actors: a worker's CPUs are all on one node."""
    usable = [cpus - 0.05 for cpus in node_cpus if cpus > 0.05]  # (a node without CPUs holds no worker)
    candidates = {math.floor(cpus / k * 100) / 100 for cpus in usable for k in range(1, workers + 1)}
    for share in sorted((c for c in candidates if c > 0), reverse=True):
        if sum(math.floor(cpus / share + 1e-9) for cpus in usable) >= workers:
            return share
    return 0.0


def auto_cpus_per_worker(cfg: PipelineConfig, cluster_cpus: float, node_cpus: list[float] | None = None) -> float:
    """CPUs each Train worker reserves: explicit, or (GPU) one per worker plus its loader processes, or
    (CPU) the machine divided among the workers of one model, leaving a sliver for the Tune trial actors.
    ``node_cpus``: the CPUs of each node (a cluster's); a share is never more than fits them, node by node:
    12 free CPUs on an 8- and a 4-CPU node gave one worker 11.95 of them, or two 5.97 each, which no node
    holds, and the run waited for good."""
    if cfg.train.cpus_per_worker != "auto":
        return float(cfg.train.cpus_per_worker)
    if cfg.train.use_gpu:
        return float(1 + cfg.data.loader_workers)
    share = math.floor((cluster_cpus - 0.05) / cfg.train.num_workers * 100) / 100
    if node_cpus and (fitting := largest_fitting_share(node_cpus, cfg.train.num_workers)) > 0:
        share = min(share, fitting)
    # Any share that fits, however thin (8 workers on 2 CPUs: 0.24 each; a floor of 0.25 asked for 2.01 CPUs,
    # and the run waited for good). Below a hundredth nothing is free to split (another stage holds the
    # CPUs): a quarter each, and the stage waits for them (concurrency_for warns).
    return share if share >= 0.01 else 0.25


def with_overlapped_startup(cfg: PipelineConfig, runs: list[ModelRun], free_cpus: float,
                            node_cpus: list[float] | None = None) -> tuple[list[ModelRun], int | None]:
    """Admit one run more than the CPUs train at once, when that pays (see :mod:`pipelines.compute_gate`).

    Where runs reserve the CPUs automatically and fewer fit than there are to train, each worker reserves
    ``capacity / (capacity + 1)`` of its share but keeps the share's threads, and a gate of ``capacity``
    lets only that many train at a time. Returns the runs and the gate's capacity (None: no overlap).

    On one node only (``node_cpus``: the CPUs of each): the capacity counts the cluster's CPUs, and with the
    thinner reservations Ray packs a run's workers onto one node (two 4-CPU nodes, two workers per run: both of
    the training run's workers on one node at 4 threads each, the other node idle behind the gate).
    """
    train = cfg.train
    if not runs or not train.overlap_startup or train.cpus_per_worker != "auto" or train.use_gpu:
        return runs, None
    if node_cpus is not None and len(node_cpus) > 1:
        logger.info("[train] train.overlap_startup is for one node; off on this cluster of %d nodes (its thinner "
                    "reservations would pack a run's workers onto one node)", len(node_cpus))
        return runs, None
    workers = runs[0].workers
    share = float(workers.cpus_per_worker)
    capacity = int((free_cpus + 1e-9) // (share * workers.num_workers + 0.01))
    if capacity < 1 or capacity >= len(runs):
        return runs, None
    reserved = math.floor(share * capacity / (capacity + 1) * 100) / 100
    if reserved <= 0:  # a share too thin to split again (nearly every CPU held by another stage)
        return runs, None
    overlapped = [run.model_copy(update={"threads": run.threads_per_worker, "workers": run.workers.model_copy(
        update={"cpus_per_worker": reserved})}) for run in runs]
    return overlapped, capacity


def _worker_settings(cfg: PipelineConfig, cluster_cpus: float, node_cpus: list[float] | None) -> WorkerSettings:
    settings = WorkerSettings.model_validate(cfg.train.model_dump(include=set(WorkerSettings.model_fields)))
    return settings.model_copy(update={"cpus_per_worker": auto_cpus_per_worker(cfg, cluster_cpus, node_cpus)})


def _refuse_empty_evaluation_shares(info: DatasetInfo, num_workers: int, splits: tuple[str, ...]) -> None:
    """Raise ConfigError when a worker would get no image of a split it evaluates: each evaluates its own share
    (unpadded, so the metrics are exact), and one with none skips the collective the others wait in (DDP's
    buffer broadcast at the first evaluation forward): the run hangs."""
    for split in splits:
        key = f"data.{split}_fraction"
        if info.sizes[split] < num_workers:
            raise ConfigError("train.num_workers", f"{num_workers} workers, but the {split} split has "
                                                   f"{info.sizes[split]} image(s): every worker needs one to "
                                                   f"evaluate; use fewer workers or hold out more ({key}, or, "
                                                   f"for an image folder that comes split, more images in its "
                                                   f"{split} folder)")


def plan_model_runs(
    cfg: PipelineConfig,
    info: DatasetInfo,
    choices: list[ModelChoice],
    *,
    stage: Literal["train", "search"] = "train",
    epochs: int | None = None,
    cluster_cpus: float = 1.0,
    node_cpus: list[float] | None = None,
) -> list[ModelRun]:
    """One :class:`ModelRun` per model choice: input size, preprocessing spec, profile and settings.

    Training runs are named ``<name>-train-<model>-<fingerprint>``, so a changed setting starts a new Ray
    Train run while an unchanged one resumes its own.
    """
    workers = _worker_settings(cfg, cluster_cpus, node_cpus)
    # The search's trials evaluate no test split, but the train stage after it does: refused before the search's
    # hours rather than after them.
    _refuse_empty_evaluation_shares(info, workers.num_workers, ("val", "test"))
    runs = []
    for choice in choices:
        hyper = hyperparameters_for(cfg.train, choice.name)
        if epochs is not None:
            hyper = hyper.model_copy(update={"epochs": epochs})
        model = _build(choice, len(info.class_names), info.channels)
        spec = make_spec(info, model.input_size_for(cfg.data.image_size))
        profile = cnnmodels.profile(model, spec.input_shape)
        run = ModelRun(model=choice, data=cfg.data, hyper=hyper, workers=workers, spec=spec, stage=stage,
                       run_name=f"{cfg.name}-{stage}-{choice.name}", storage_path=cfg.paths.storage,
                       params_count=profile.inference_params, macs=profile.macs, excluded_files=info.excluded_files,
                       test_excluded_files=info.test_excluded_files, split_sizes=dict(info.sizes),
                       split_membership=info.membership or None, test_split=info.test_split,
                       training_membership=info.training_membership or None)
        if stage == "train":
            run = run.model_copy(update={"run_name": f"{run.run_name}-{run.fingerprint}"})
        runs.append(run)
    return runs


def search_data(cfg: PipelineConfig) -> DataConfig:
    """The data the search trains on: ``search.train_subset`` images when set (a cheaper proxy)."""
    if cfg.search.train_subset is None:
        return cfg.data
    return cfg.data.model_copy(update={"train_subset": cfg.search.train_subset})


def search_template(cfg: PipelineConfig, *, with_user_coefficients: bool = False) -> ModelChoice:
    """The baseline the search scales: EfficientNet at ``search.phi`` on the data's resolution, with
    ``train.model_options.efficientnet`` (as ``train.model_overrides.efficientnet`` sets its recipe), but the
    coefficients it may give the user's own efficientnet: every trial sets its own, so in the search's
    fingerprint they only discarded a finished search. ``with_user_coefficients``: with them (the config check
    builds what the user wrote; searches saved before they were left out have them in their fingerprint)."""
    options = {**{k: v for k, v in cfg.train.model_options.get("efficientnet", {}).items()
                  if with_user_coefficients or k not in ("alpha", "beta", "gamma")}, "phi": float(cfg.search.phi)}
    return ModelChoice("efficientnet", "efficientnet", _with_data_defaults(cfg, "efficientnet", options))


def compound_network(template_kwargs: dict[str, Any], coefficients: tuple[float, float, float]):
    """What the search's template (its model options) builds with ``coefficients`` at its phi
    (:func:`cnnmodels.efficientnet.compound_architecture`): triples that build the same network are one grid
    candidate."""
    from cnnmodels.efficientnet import compound_architecture

    base = template_kwargs.get("base_resolution") or (32 if template_kwargs.get("small_input") else 224)
    return compound_architecture(float(template_kwargs.get("phi", 1.0)), *coefficients, base_resolution=base,
                                 small_input=bool(template_kwargs.get("small_input", False)))


def grid_candidate_count(cfg: PipelineConfig) -> int:
    """How many trials the grid has without the ``search.num_trials`` cap: one per network the feasible
    triples build."""
    uncapped = cfg.search.model_copy(update={"num_trials": 1 << 30})
    return len(grid_candidates(uncapped, partial(compound_network, search_template(cfg).kwargs)))


def search_fingerprints(cfg: PipelineConfig) -> list[str]:
    """The fingerprints a finished or interrupted search of ``cfg`` may have been saved under: this version's,
    then the one before settings of a part that is off left it (a search saved then is not thrown away)."""
    # (and with the user's efficientnet coefficients in the template, as searches saved before 2026-12-02 have)
    return list(dict.fromkeys([search_fingerprint(cfg), search_fingerprint(cfg, legacy=True),
                               search_fingerprint(cfg, with_user_coefficients=True),
                               search_fingerprint(cfg, legacy=True, with_user_coefficients=True)]))


def search_fingerprint(cfg: PipelineConfig, legacy: bool = False, with_user_coefficients: bool = False) -> str:
    """Hash of every setting that decides the search's outcome: the search section (but its concurrency
    and the family members trained afterwards) and the template run's recipe, epochs included. ``legacy``: as
    computed before settings of a part that is off were left out (:func:`search_fingerprints`);
    ``with_user_coefficients``: see :func:`search_template`."""
    hyper = hyperparameters_for(cfg.train, "efficientnet").model_copy(update={"epochs": cfg.search.epochs})
    workers = WorkerSettings.model_validate(cfg.train.model_dump(include=set(WorkerSettings.model_fields)))
    search = cfg.search.model_dump(mode="json", exclude=_SEARCH_RUNTIME_KEYS)
    # Neither decides what the search finds: the GPU share places its trials, and a grid ignores the seed. A
    # changed value threw a finished search away. (Set to their defaults, not left out: the fingerprints of
    # searches with the defaults stay what they were.)
    search["gpus_per_trial"] = None
    # Nor do settings of a part that is off: the grid's step in an Optuna search, ASHA's rungs without ASHA, a
    # MACs target under the val_acc objective, nor a grid's trial cap above its candidates (40 or 200 of 38
    # grid points run the same 38 trials).
    defaults = SearchConfig()
    if cfg.search.mode == "grid":
        search["seed"] = 0
        candidates = None if legacy else grid_candidate_count(cfg)
        if candidates is not None and cfg.search.num_trials >= candidates:
            search["num_trials"] = max(candidates, defaults.num_trials)
    elif not legacy:
        search["step"] = defaults.step
    if not cfg.search.asha and not legacy:
        search["grace_period"], search["reduction_factor"] = defaults.grace_period, defaults.reduction_factor
    if cfg.search.objective != "mnas" and not legacy:
        search["target_macs"] = defaults.target_macs
    return fingerprint({
        "search": search,
        "template": _recipe(search_template(cfg, with_user_coefficients=with_user_coefficients), search_data(cfg),
                            hyper, workers),
        "epochs": cfg.search.epochs,
    })


def data_content(info: DatasetInfo) -> str:
    """A short hash of what an image folder holds for the search (its classes, channels, training and validation
    split sizes, the files of those splits left out, and which training and validation files it has under which
    labels): its files can change under the same settings (:func:`search_fingerprint`), and the finished search
    was then reused (images relabelled or replaced by others too), or an interrupted one resumed trials planned
    for the old files (their class count, their split sizes), which failed every retry. A split folder's
    ``test/`` is not in it: the search never reads it, and adding test images searched again. "" for the
    built-in data sets, which never change."""
    return _data_content(info, training_files=True, test_split=False)


def earlier_data_contents(info: DatasetInfo) -> list[str]:
    """:func:`data_content` as earlier versions hashed it, latest first: with the test split's size and files
    left out (before 2026-12-03), and before that without the training files. A search saved under one of them
    is taken once (:func:`~pipelines.search.load_search_result`) and saved under :func:`data_content`."""
    if info.dataset != "imagefolder":
        return []
    return [_data_content(info, training_files=True, test_split=True),
            _data_content(info, training_files=False, test_split=True)]


def _data_content(info: DatasetInfo, *, training_files: bool, test_split: bool) -> str:
    if info.dataset != "imagefolder":
        return ""
    if test_split:
        sizes, excluded = info.sizes, set(info.excluded_files)
    else:
        sizes = {split: size for split, size in info.sizes.items() if split != "test"}
        excluded = set(info.excluded_files) - set(info.test_excluded_files)
    content = {"classes": list(info.class_names), "channels": info.channels, "sizes": sizes,
               "excluded_files": sorted(excluded)}
    if training_files:
        content["training_files"] = info.training_membership
    return fingerprint(content)
