"""The pipeline's one config schema: typed, loaded from YAML, overridable with ``--set``, validated early.

Every stage takes a :class:`PipelineConfig`. :func:`load_config` reads a YAML file (or the embedded
``quickstart.yaml``), applies ``--set key=value`` overrides (values parsed as YAML) and validates
everything (types, unknown keys with a did-you-mean, model names, data set, data root, search ranges)
before Ray starts. Any problem raises :class:`ConfigError` naming the key; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import ipaddress
import math
import os
import re
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

import cnnmodels
from cnnmodels.scaling import PAPER_COEFFICIENTS, feasible_grid

from .paths import RunPaths

__all__ = [
    "ConfigError",
    "redact_uri",
    "redact_text",
    "PipelineConfig",
    "DataConfig",
    "TrainConfig",
    "Hyperparameters",
    "WorkerSettings",
    "ModelSelection",
    "hyperparameters_for",
    "SearchConfig",
    "TrackingConfig",
    "ServeConfig",
    "is_loopback",
    "check_serve_access",
    "RayConfig",
    "load_config",
    "DEFAULT_CONFIG",
    "DATASETS",
    "CHAMPION",
]

#: The registry alias of the best model, and the model a request that names none is answered by.
CHAMPION = "champion"

DATASETS = ("digits", "fashion-mnist", "cifar10", "imagefolder")
#: The embedded default config, used when no ``--config`` is given.
DEFAULT_CONFIG = "quickstart.yaml"


class ConfigError(ValueError):
    """A config problem, with the dotted ``key`` it concerns."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


@contextlib.contextmanager
def _looking_at(key: str, path: str | os.PathLike):
    """A path that cannot be looked at (a directory above it this user may not search, a name too long) is a
    :class:`ConfigError` naming ``key``: ``Path.exists`` and ``is_dir`` raise for it, and the check ended with a
    traceback (exit 1)."""
    try:
        yield
    except OSError as err:
        raise ConfigError(key, f"cannot look at {str(path)!r}: {err.strerror or err}") from None


def _did_you_mean(word: str, choices, n: int = 1, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _check_model_name(name: str) -> None:
    """ValueError naming the closest models when ``name`` is no cnnmodels name (nor a family member such as
    ``efficientnet_phi1``)."""
    try:
        _, implied = cnnmodels.resolve_model_name(name)
    except ValueError:
        known = cnnmodels.list_models()
        raise ValueError(f"unknown model {name!r}{_did_you_mean(name, known, n=3, cutoff=0.5)}") from None
    if float(implied.get("phi", 0.0)) > MAX_PHI:  # (efficientnet_phi40 took minutes to build, 600 M parameters at 13)
        raise ValueError(f"{name}: phi is at most {MAX_PHI:g}, as in search.phis (EfficientNet-B7 is about 6)")


#: Seeds go to numpy, scikit-learn and Optuna, which take 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1
#: Points a search grid may have (alpha x beta x gamma values): validation enumerates them.
MAX_GRID_POINTS = 2_000_000
#: Largest family member trained (phi): channels grow by beta^phi, resolution by gamma^phi.
MAX_PHI = 12.0
#: The largest compound-scaling coefficient a search range may reach.
MAX_COEFFICIENT = 10.0
#: The largest request body a replica may take (serve.max_upload_mb), 1 TB.
MAX_UPLOAD_MB = 1_048_576


class _Section(BaseModel):
    # strict: no silent "3" -> 3 or 1 -> True coercion; forbid: unknown keys are errors.
    # allow_inf_nan off: an infinite lr or timeout passes every bound and fails (or diverges) much later.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)


class RayConfig(_Section):
    """Where Ray runs. ``address: null`` starts a local Ray (inside a Ray job: the job's cluster); ``auto``
    joins the cluster this runs on."""

    address: Optional[str] = Field(
        None, description="null starts a local Ray (a Ray job's driver joins its cluster); 'auto' joins the "
                    "cluster this runs on; or a cluster's GCS as host:6379 (not Ray Client's ray://: submit a "
                    "job instead)"
    )
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of a local Ray (default: all)")
    num_gpus: Optional[int] = Field(None, ge=0, description="GPUs of a local Ray (default: all; no more than CUDA "
                                    "sees where a stage uses one)")
    include_dashboard: bool = Field(True, description="Ray's dashboard (Ray Train's state checks need it)")

    @field_validator("address")
    @classmethod
    def _an_address_ray_can_join(cls, value):
        return value if value is None else joinable_ray_address(value)


def joinable_ray_address(value: str) -> str:
    """``value`` if the pipeline can run against it: ``auto``, ``local`` or a GCS ``host:port``; anything else
    reached ``ray.init`` and failed there, after the stage began (ValueError).

    Ray Client addresses (``ray://``, or another client protocol's ``name://``) are refused: under Ray Client, Tune
    runs the experiment in an actor on the cluster, so the stages' result files, tracking queue and checkpoints'
    local paths would be the cluster's while this machine read its own (empty) ones."""
    if value in ("auto", "local"):
        return value
    if value.lower().startswith(("http://", "https://")):
        raise ValueError(f"{value!r} is a dashboard address (what `ray job submit` takes), not one ray.init can "
                         "join: use auto on the cluster's nodes, or submit the pipeline as a job (README, Cluster)")
    if "://" in value:
        raise ValueError(f"{value!r} is a Ray Client address, which the pipeline does not support (Tune would run "
                         "the stages' bookkeeping on the cluster, out of this machine's sight): submit the "
                         "pipeline with `ray job submit` (README, Cluster), or use auto on the cluster's nodes")
    found = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d+))?", value)
    port_ok = found is not None and found[2] is not None and 1 <= int(found[2]) <= 65535
    if not port_ok:
        raise ValueError(f"{value!r} is not an address Ray can join: use null (a local Ray), auto (the cluster "
                         "this runs on) or host:6379 (a cluster's GCS)")
    return value


def ray_address(cfg: PipelineConfig) -> str | None:
    """The Ray a command joins: ``ray.address``, else ``RAY_ADDRESS`` (what Ray sets for a job's driver: the job's
    cluster), else None, a local Ray of the command's own that stops when it returns."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def outlives_the_command(cfg: PipelineConfig) -> bool:
    """Whether the Ray a command uses goes on after it returns: a cluster, not a local Ray of its own."""
    return ray_address(cfg) not in (None, "local")


def _at_least_one_or_auto(value):
    """A count of things at once: at least 1, or ``auto``."""
    if value != "auto" and value < 1:
        raise ValueError("must be >= 1 or 'auto'")
    return value


def _whole_number_or_auto(value):
    """Before the union's own parsing, whose message named an integer only ("valid integer" for ``auto2``)."""
    if value == "auto" or isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"must be a whole number or auto (got {value!r})")


def _ray_quantity(value):
    """A resource amount Ray takes: 0, or at least its precision of 0.0001 (a smaller one passed here and Ray
    refused it once it had started)."""
    if isinstance(value, (int, float)) and 0 < value < 1e-4:
        raise ValueError(f"{value:g} is below Ray's smallest resource amount, 0.0001")
    return value


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _bind_host(value: str) -> str:
    """An address or host name to bind to: a URL or a port in it (``http://127.0.0.1``, ``localhost:8000``)
    passed, and Serve's proxy failed to bind after the whole training."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME.match(value) or value.replace(".", "").isdigit():
        raise ValueError(f"{value!r} is not an IP address or host name (no scheme, no port: serve.port is the "
                         "port)")
    return value


def _bool_or_word(value, *words: str):
    """A setting that is true, false or one of ``words``; one clear message for anything else (pydantic's own
    names every union member)."""
    if isinstance(value, bool) or value in words:
        return value
    raise ValueError(f"must be {', '.join(('true', 'false', *words[:-1]))} or {words[-1]} (got {value!r})")


#: The largest side images are trained at (``data.image_size``, an EfficientNet's ``base_resolution``).
MAX_IMAGE_SIZE = 1024
#: The longest file name most file systems take (ext4, XFS, APFS, NTFS: 255 bytes).
MAX_NAME_BYTES = 255


def checked_local_path(value: str | None) -> str | None:
    """A local path as a config may give it: refused (``ValueError``) with a NUL byte in it, a ``~user`` whose
    home is unknown, or a part longer than :data:`MAX_NAME_BYTES`; each failed later with an OSError, a
    ValueError or a RuntimeError traceback, some only once Ray had started. URIs and None pass as they are."""
    if value is None or "://" in value:
        return value
    if "\0" in value:
        raise ValueError("a path cannot hold a NUL byte")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # Path.expanduser: "Could not determine home directory"
        raise ValueError(f"{value!r}: {value.split('/', 1)[0]} is no user's home on this machine") from None
    if long := [part for part in path.parts if len(part.encode(errors="surrogateescape")) > MAX_NAME_BYTES]:
        raise ValueError(f"its part {long[0][:40]!r}... is over {MAX_NAME_BYTES} bytes, longer than a file name "
                         "can be")
    return value


class DataConfig(_Section):
    dataset: str = Field("digits", description="digits, fashion-mnist, cifar10 or imagefolder")
    root: Optional[str] = Field(
        None, description="data directory (fashion-mnist, cifar10, imagefolder); unset: fashion-mnist reads "
        "/usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist) when there, and downloads go to "
        "$CNNZOO_DATA/<dataset> (default ~/.cache/cnnzoo/data/<dataset>)")
    image_size: int = Field(32, ge=8, le=MAX_IMAGE_SIZE, description="side length the images are resized to")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="share of the training data held out for validation")
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="held-out share where the data set has no test split")
    train_subset: Optional[int] = Field(
        None, ge=10,
        description="use only this many training images, stratified, plus one of each class they would miss"
    )
    augment: Union[bool, Literal["flip", "crop"]] = Field(
        True,
        description="true: random crops (padding 1/8 of the side) and flips where the data allows; flip: flips "
        "only (short runs: crops cost resnet18 2 points of Fashion-MNIST accuracy after 3 epochs); crop: crops "
        "only (image folders whose classes a mirror changes: text, arrows, left and right); false: none",
    )
    download: bool = Field(True, description="let torchvision download cifar10/fashion-mnist when missing")
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the train/val/test split")
    skip_bad_files: bool = Field(
        False,
        description="imagefolder: leave out (with a warning) the image files Pillow cannot open, such as a corrupt "
        "PNG or a zero-byte JPEG, or that are in a format the server does not take (an AVIF named .jpg), instead "
        "of stopping with exit 2 and their list",
    )

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_mode(cls, value):
        return _bool_or_word(value, "flip", "crop")

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, value: str | None) -> str | None:
        # Ray Train's workers run in their own directories: a relative root would only work on the driver.
        # And "imgs" and "./imgs" are the same data (the registry tells data sets apart by root).
        if value is None or "://" in value:
            return value
        if not value.strip():  # not the current directory: "needs data.root" says what is missing
            return None
        return os.path.abspath(os.path.expanduser(checked_local_path(value)))

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}{_did_you_mean(value, DATASETS)} "
                             f"(choose from {', '.join(DATASETS)})")
        return value


class Hyperparameters(_Section):
    """How one model trains. Every field may differ per model (``train.model_overrides``) and every field
    but ``epochs`` is part of a run's fingerprint (a change starts the model afresh)."""

    epochs: int = Field(3, ge=1, description="epochs per model")
    batch_size: int = Field(64, ge=1, description="global batch size, split evenly across the workers (a multiple of "
                                                   "train.num_workers)")
    lr: float = Field(0.05, gt=0.0, description="peak learning rate (for the global batch)")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (momentum, Nesterov) or adamw")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(
        5e-4, ge=0.0, description="weight decay (not applied to 1-D parameters: biases, norm scales)"
    )
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning-rate schedule after warm-up")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up length, in epochs")
    precise_bn_batches: int = Field(
        20,
        ge=0,
        description="before each validation, recompute batch-norm statistics over this many training batches with "
        "the epoch's final weights (precise BN; 0: off). Short runs, EfficientNet above all, need it",
    )
    cpu_bf16: Union[bool, Literal["auto"]] = Field(
        False,
        description="bfloat16 autocast on CPU workers (GPUs: train.amp); auto: where the CPU computes bf16 "
        "natively (AMX: Intel Sapphire Rapids and later; AVX512-BF16: AMD Zen 4 and later), which trains googlenet "
        "and densenet121 1.7-2.7x faster at 28 px (with AMX resnet18 is no faster and VGG slower; with Zen 4's "
        "AVX512-BF16 they gain 1.5x too); EfficientNet is slower on both; elsewhere bf16 is emulated and slow",
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing")
    aux_loss_weight: float = Field(0.3, ge=0.0, description="GoogLeNet auxiliary classifiers' loss weight")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of initialisation and shuffling")

    @field_validator("cpu_bf16", mode="before")
    @classmethod
    def _cpu_bf16_mode(cls, value):
        return _bool_or_word(value, "auto")


# Training settings that may differ per model (``train.model_overrides``): architectures without batch norm,
# AlexNet above all, need a far smaller learning rate than the rest of a zoo trained side by side.
PER_MODEL_TRAIN_KEYS = tuple(Hyperparameters.model_fields)


class WorkerSettings(_Section):
    """Where and how one model's Ray Train run executes: workers, devices, precision, fault tolerance."""

    num_workers: int = Field(1, ge=1, description="data-parallel workers per model")
    use_gpu: bool = Field(False, description="train on GPUs (NCCL between a model's workers)")
    gpus_per_worker: float = Field(
        1.0, gt=0.0, le=1.0,
        description="share of a GPU each worker reserves: fractions let several single-worker models train on "
        "one GPU at once (0.25: four); DDP with several workers needs whole GPUs (1)",
    )
    cpus_per_worker: Union[float, Literal["auto"]] = Field(
        "auto",
        description="CPUs each worker reserves; auto: the free CPUs split among one model's workers "
        "(1 + loader_workers with GPUs)",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how one model's workers are placed on nodes (Ray placement group strategy)"
    )
    max_failures: int = Field(2, ge=-1, description="worker failures survived per model (-1: unlimited)")
    # No "-1: unlimited": a run that spent max_failures ends its trial with an error each time it is started
    # again, and Tune would start it again without end (its MLflow run open, the compute gate held).
    trial_retries: int = Field(
        2, ge=0,
        description="times a model's (or search trial's) Tune trial is started again when it is lost with its "
        "node; it resumes from its last checkpoint. A run that spent max_failures is not retried",
    )
    amp: bool = Field(True, description="mixed precision (GPU only)")
    channels_last: bool = Field(
        True, description="channels-last memory format: on GPUs, and on CPUs for models that run faster in it "
        "(EfficientNet's depthwise convolutions)")
    checkpoints_to_keep: int = Field(1, ge=1, description="best checkpoints kept besides the latest")
    simulate_failure_at_epoch: Optional[int] = Field(
        None, ge=1, description="kill one worker once as this epoch starts (epochs count from 0; 1 to the last "
        "epoch: the first has no checkpoint to resume from), to rehearse fault tolerance"
    )
    progress_interval_s: float = Field(
        30.0, gt=0.0, description="within an epoch (and a long validation, test or batch-norm pass), print "
        "batches done, img/s and the ETA at most this long apart"
    )

    @field_validator("cpus_per_worker")
    @classmethod
    def _positive_cpus(cls, value):
        if value != "auto" and value <= 0:
            raise ValueError("must be positive or 'auto'")
        return _ray_quantity(value)

    _gpu_share = field_validator("gpus_per_worker")(_ray_quantity)


class ModelSelection(_Section):
    """Which models the training stage trains, with which builder options."""

    models: list[str] = Field(
        default_factory=lambda: ["resnet18"],
        min_length=1,
        description="cnnmodels names (cnnmodels.list_models()); efficientnet_phiN for a compound-scaled member",
    )
    model_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="extra create_model keyword arguments per model name (also "
        "efficientnet_phiN members of search.phis, and efficientnet: the search's baseline, which the families "
        "built from its triple take under their own)"
    )
    model_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="training settings per model name, over the ones below: "
        + ", ".join(PER_MODEL_TRAIN_KEYS) + " (e.g. {alexnet: {lr: 0.0003}}; efficientnet's, the search's "
        "baseline, also reach the families built from its triple, under their own)",
    )
    small_input: Union[bool, Literal["auto"]] = Field(
        "auto", description="small-image stems for inputs up to 64 px; auto decides by data.image_size"
    )
    max_concurrent_models: Union[int, Literal["auto"]] = Field(
        "auto", description="models trained at the same time; auto: as many as the resources free now fit (an "
                            "autoscaler's nodes not started yet count for nothing: name a number there)"
    )
    overlap_startup: bool = Field(
        False,
        description="on CPUs with cpus_per_worker auto, start the next model while the current one trains (it "
        "waits for the cores once it is up; on one node only, at most one run beyond those training); off by "
        "default: on 2 cores the start-up slowed the training it overlapped more than it saved "
        "(docs/benchmarks.md)",
    )

    @field_validator("models")
    @classmethod
    def _known_models(cls, names: list[str]) -> list[str]:
        for name in names:
            _check_model_name(name)
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        return names

    _positive_concurrency = field_validator("max_concurrent_models")(_at_least_one_or_auto)
    _concurrency_kind = field_validator("max_concurrent_models", mode="before")(_whole_number_or_auto)

    @field_validator("small_input", mode="before")
    @classmethod
    def _small_input_mode(cls, value):
        return _bool_or_word(value, "auto")


# Fields come in reverse order of the bases: the model list first, then how each model trains, then where.
class TrainConfig(WorkerSettings, Hyperparameters, ModelSelection):
    """The training stage: the models (:class:`ModelSelection`), how each trains (:class:`Hyperparameters`)
    and where its Ray Train run executes (:class:`WorkerSettings`)."""


#: The cnnmodels families built from the search's baseline (``efficientnet``) and its coefficients: the searched
#: family and the paper's (``search.compare_paper``).
COMPOUND_FAMILIES = ("efficientnet_phi", "efficientnet_paper_phi")


def baseline_settings(settings: dict[str, dict[str, Any]], model_name: str) -> dict[str, Any]:
    """What a member of a compound-scaled family takes from the search's baseline (``settings["efficientnet"]``:
    ``train.model_overrides`` or ``train.model_options``), under its own entries: the triple was found on that
    network and recipe (a member trained on the builder's defaults and train.lr was another network than the one
    searched). Empty for any other model."""
    if cnnmodels.family_of(model_name) not in COMPOUND_FAMILIES:
        return {}
    # (never its phi nor coefficients: a member's name and the search fix those)
    return {k: v for k, v in settings.get("efficientnet", {}).items() if k not in ("phi", "alpha", "beta", "gamma")}


def hyperparameters_for(train: TrainConfig, model_name: str) -> Hyperparameters:
    """``train``'s hyper-parameters with ``train.model_overrides[model_name]`` applied (validated); a member of
    a compound-scaled family takes the search baseline's (``efficientnet``) under its own."""
    values = train.model_dump(include=set(Hyperparameters.model_fields))
    return Hyperparameters.model_validate({**values, **baseline_settings(train.model_overrides, model_name),
                                           **train.model_overrides.get(model_name, {})})


class SearchConfig(_Section):
    """Ray Tune search of EfficientNet's compound-scaling coefficients (the paper's step 1)."""

    alpha: tuple[float, float] = Field((1.0, 1.4), description="[low, high] range of the depth coefficient")
    beta: tuple[float, float] = Field((1.0, 1.4), description="[low, high] range of the width coefficient")
    gamma: tuple[float, float] = Field((1.0, 1.4), description="[low, high] range of the resolution coefficient")
    target: float = Field(2.0, gt=1.0, description="alpha * beta^2 * gamma^2 must be close to this")
    tolerance: float = Field(0.1, gt=0.0, description="allowed distance of alpha * beta^2 * gamma^2 from target")
    mode: Literal["grid", "optuna"] = Field(
        "grid", description="grid (feasible grid points) or optuna (Optuna sampling inside the feasible region)"
    )
    step: float = Field(0.05, gt=0.0, description="grid spacing")
    num_trials: int = Field(8, ge=1, description="grid: at most this many trials; optuna: this many, each of its "
                            "own triple (ranges holding fewer at 4 decimals are refused)")
    epochs: int = Field(3, ge=1, description="training budget of each trial")
    phi: float = Field(1.0, gt=0.0, le=MAX_PHI, description="the compound coefficient the search scales by")
    train_subset: Optional[int] = Field(
        None, ge=10, description="search on this many training images (a cheaper proxy); default: data.train_subset"
    )
    phis: list[float] = Field(
        default_factory=lambda: [0.0, 1.0],
        description="family members to train (refused when the search ranges could scale B0's depth, width or input "
        "past 16x at the largest phi: 1.4 ** 9 already does)",
    )
    compare_paper: bool = Field(
        False, description="also train the family of the paper's (1.2, 1.1, 1.15) at the same phis but 0 "
        "(efficientnet_paper_phiN; at phi 0 both families are B0), so the report shows whether the search paid; "
        "skipped when the search found the paper's triple; needs a phi above 0 in `search.phis`"
    )
    base_model: str = Field("efficientnet", description="the baseline that is scaled")
    objective: Literal["val_acc", "mnas"] = Field(
        "val_acc", description="val_acc, or mnas: val_acc * (macs / target_macs)^-0.07; what Optuna samples for, "
        "ASHA stops trials by and the winner is ranked by"
    )
    target_macs: Optional[int] = Field(
        None, ge=1, description="MnasNet objective target (default: baseline MACs x target^phi)"
    )
    asha: bool = Field(True, description="stop weak trials early with ASHA")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1 / reduction_factor of trials at each rung")
    max_concurrent_trials: Union[int, Literal["auto"]] = Field(
        "auto", description="trials at the same time; auto: as many as the resources free now fit (name a "
                            "number on an autoscaling cluster, as for train.max_concurrent_models)"
    )

    _positive_trials = field_validator("max_concurrent_trials")(_at_least_one_or_auto)
    _trials_kind = field_validator("max_concurrent_trials", mode="before")(_whole_number_or_auto)
    gpus_per_trial: Optional[float] = Field(
        None, gt=0.0, le=1.0,
        description="share of a GPU each worker of a search trial reserves (a trial has train.num_workers "
        "workers; a fraction, so that several trials share a GPU, needs train.num_workers: 1); default: "
        "train.gpus_per_worker; unused (said in a warning) without train.use_gpu",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Optuna sampler seed")

    _gpu_share = field_validator("gpus_per_trial")(_ray_quantity)

    @field_validator("alpha", "beta", "gamma", mode="before")
    @classmethod
    def _range(cls, value):
        if isinstance(value, list):
            value = tuple(value)
        if not (isinstance(value, tuple) and len(value) == 2):
            raise ValueError("must be a [low, high] pair")
        low, high = value
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"range bounds must be numbers, got {v!r}")
        if low < 1.0:
            raise ValueError(f"low end {low} is below 1 (scaling coefficients are >= 1)")
        if high > MAX_COEFFICIENT:  # the paper's are 1.1-1.2; huge ones overflowed the feasibility arithmetic
            raise ValueError(f"high end {high:g} is above {MAX_COEFFICIENT:g}, the largest scaling coefficient "
                             "searched (the paper's are 1.1-1.2)")
        if low > high:
            raise ValueError(f"low end {low} is above high end {high}")
        return (float(low), float(high))

    @field_validator("phis")
    @classmethod
    def _phis(cls, values: list[float]) -> list[float]:
        if any(v < 0 or v > MAX_PHI for v in values):
            raise ValueError(f"phi values must be between 0 and {MAX_PHI:g} (EfficientNet-B7 is about 6)")
        values = [v + 0.0 for v in values]  # -0.0 is 0 (it trained B0 twice, once as efficientnet_phi-0)
        if len({f"{v:g}" for v in values}) != len(values):  # the models are named by phi's %g
            raise ValueError("phi values must be unique (to 6 significant digits: they name the models)")
        if rounded := [v for v in values if float(f"{v:g}") != v]:
            # The name efficientnet_phi0p333333 builds phi 0.333333: another model than the one trained under it.
            raise ValueError(f"{', '.join(repr(v) for v in rounded)}: phi values name the models "
                             "(efficientnet_phi<phi>), so at most 6 significant digits")
        return values


class TrackingConfig(_Section):
    uri: Optional[str] = Field(None, description="MLflow tracking URI (default: sqlite file under workdir; a "
                               "relative sqlite path is made absolute where the command runs)")
    registered_model: Optional[str] = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,
        description="registry name (default: the pipeline name); MLflow refuses '/', ':' and the like")
    pending_timeout_s: float = Field(
        120.0, ge=0,
        description="how long the end of a stage waits for tracking writes queued while MLflow was unreachable; "
                    "what is left is kept in <run dir>/tracking-pending.json for `python -m pipelines register` "
                    "(exit code 3)")

    @field_validator("uri")
    @classmethod
    def _a_store_mlflow_has(cls, value):
        """A URI MLflow has a tracking store for: a typo ("postgres://", "sqllite://") passed and failed once
        Ray had started. Only the scheme is echoed: the rest may hold a password."""
        if value is not None and (
            value.startswith("file:") or ("://" not in value and not value.startswith("databricks"))
        ):
            # A mistyped database URI ("postgresql:/user:password@host") reads as a path: its scheme only.
            shown = repr(value) if ":" not in value else repr(value.split(":", 1)[0] + ":...")
            raise ValueError(
                f"{shown} is a file store, which MLflow 3.13+ refuses; use sqlite:///path/mlflow.db or http://host:5000"
            )
        if value is None:
            return value
        if has_masked_password(value):
            raise ValueError("its password is the mask printed by check-config and logged with each run ('***'), "
                             "not the password; give the real URI (an environment variable: ${VAR})")
        scheme = value.split(":", 1)[0]
        if scheme != scheme.lower():  # MLflow and SQLAlchemy match schemes as written: SQLITE:/// failed late
            raise ValueError(f"write its scheme {scheme!r} in lower case ({scheme.lower()!r})")
        database = value.split("://", 1)[1].split("?", 1)[0] if "://" in value else ""
        if scheme.split("+", 1)[0] == "sqlite" and "://" in value and database and not database.startswith("/"):
            # SQLAlchemy reads what follows two slashes as a host: "Invalid SQLite URL" once the stage opened its run
            raise ValueError(f"a sqlite URI has three slashes before a relative path (sqlite:///{database}) and "
                             f"four before an absolute one (sqlite:////abs/path/mlflow.db)")
        if scheme.split("+", 1)[0] == "sqlite" and database in ("", "/", "/:memory:", "/file::memory:"):
            # An in-memory database: every process its own, empty; every run and registration lost at exit.
            raise ValueError("an in-memory sqlite database holds nothing past the process (and each process has "
                             "its own); give a file, sqlite:///path/mlflow.db")
        if scheme in ("http", "https"):
            # http:// sent MLflow to a host named "api"; a bad port was taken for an outage and waited for
            try:
                parts = urllib.parse.urlsplit(value)
                port = parts.port
            except ValueError:  # (urllib's text may quote a piece of the password)
                raise ValueError(f"{scheme}://...: not a URL MLflow can reach (a port that is not a number, or an "
                                 "unencoded '/', '#', '?' or '@' in the user or password: percent-encode them)") \
                    from None
            if not parts.hostname:
                raise ValueError(f"{scheme}://...: the server's host is missing ({scheme}://host:5000)")
            if port == 0:
                raise ValueError(f"{scheme}://...: port 0 is no server's")
        if scheme.split("+", 1)[0] == "sqlite" and "://" in value:
            checked_local_path(database)
        value = absolute_sqlite_uri(value)
        known = TRACKING_SCHEMES + _plugin_tracking_schemes()
        if scheme.split("+", 1)[0] not in known:
            close = difflib.get_close_matches(scheme.split("+", 1)[0], known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"MLflow has no tracking store for the scheme {scheme!r} (it has "
                             f"{', '.join(known)}){hint}")
        return value


#: The URI schemes of the file systems pyarrow (Ray Train and Tune's storage) opens from a ``storage_path``.
#: (Not Azure's abfs/abfss nor HDFS's hdfs/viewfs: the checkpoint paths Ray reports lose the account or the
#: namenode, so they could not be read back.)
STORAGE_SCHEMES = ("s3", "gs", "gcs", "file")


#: What :func:`redact_uri` leaves of a password: a config copied from ``check-config`` or a run's logged
#: ``config.yaml`` holds it instead of the password.
_MASKED_PASSWORD = re.compile(r"^[A-Za-z][\w+.-]*://[^:/@]*:\*\*\*@|(?i:[?&](?:password|passwd|pwd))=\*\*\*(?:&|$)")


def has_masked_password(uri: str) -> bool:
    """Whether ``uri``'s password is :func:`redact_uri`'s mask rather than a password."""
    return bool(_MASKED_PASSWORD.search(uri))


def absolute_sqlite_uri(uri: str) -> str:
    """``uri`` with a relative sqlite path made absolute from the working directory (other URIs unchanged):
    sqlite:///runs/mlflow.db is relative to it, and a Serve replica's or a Ray job's is another one (another,
    empty store)."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:////") or ":memory:" in uri:
        return uri
    path, _, query = uri[len("sqlite:///"):].partition("?")
    return f"sqlite:///{os.path.abspath(os.path.expanduser(path))}" + (f"?{query}" if query else "")


#: The URI schemes MLflow 3 has tracking stores for ("postgresql+psycopg" is postgresql with a driver).
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc")


def _plugin_tracking_schemes() -> tuple[str, ...]:
    """Schemes that installed MLflow plugins register stores for (their ``mlflow.tracking_store`` entry points)."""
    from importlib.metadata import entry_points

    return tuple(point.name for point in entry_points(group="mlflow.tracking_store"))


#: Serve keeps replica and request counts as 32-bit integers: a larger one failed the deploy, after training.
MAX_SERVE_COUNT = 2**31 - 1


class ServeConfig(_Section):
    host: str = Field(
        "127.0.0.1",
        description="HTTP bind address of the Serve proxy; any non-loopback address needs a token (or "
        "allow_unauthenticated)",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    num_replicas: int = Field(
        1, ge=1, le=MAX_SERVE_COUNT,
        description="replicas (without autoscaling); on a local Ray all of them must fit its CPUs and GPUs",
    )
    autoscaling: bool = Field(False, description="autoscale between min_replicas and max_replicas")
    min_replicas: int = Field(1, ge=0, le=MAX_SERVE_COUNT,
                              description="autoscaling lower bound (on a local Ray, all of them must fit)")
    max_replicas: int = Field(2, ge=1, le=MAX_SERVE_COUNT, description="autoscaling upper bound")
    num_cpus: float = Field(0.5, ge=0.0, description="CPUs per replica (fractions fit small machines)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica (fractions share a GPU)")
    max_batch_size: int = Field(16, ge=1, description="dynamic batching: largest batch")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0.0, description="dynamic batching: how long a request waits for others when the model is idle"
    )
    max_ongoing_requests: int = Field(
        64, ge=1, le=MAX_SERVE_COUNT,
        description="requests a replica accepts at once (must be >= max_batch_size for batches to fill)",
    )
    max_queued_requests: int = Field(
        256, ge=1, le=MAX_SERVE_COUNT,
        description="requests waiting to be given a replica slot, per Serve proxy (503 beyond; a "
        "burst arriving at once counts too): a saturated or still-starting deployment refuses at once "
        "instead of queueing without bound"
    )
    max_models_per_replica: int = Field(4, ge=1, description="LRU size of loaded models per replica (multiplexing)")
    max_upload_mb: float = Field(10.0, gt=0.0, description="largest request body (413 above)")
    max_image_pixels: int = Field(
        40_000_000, ge=1,
        description="largest input image, width x height, read from its header before any pixel is decoded (400 "
        "above); counted as RGB pixels: float and 32-bit images count 3x, images with alpha 2x (a transparent colour "
        "2.25x), 16-bit 1.5x (3x with a transparent colour), WebP 4x, progressive JPEG 1.75x (2.5x without chroma "
        "subsampling, 3x in CMYK), as they cost to decode",
    )
    max_aspect_ratio: float = Field(
        20.0, ge=1.0, description="largest ratio of an input image's long side to its short side (400 above)"
    )
    max_resized_pixels: int = Field(
        4_000_000, ge=1,
        description="largest image once resized for the model, before the centre crop (shorter side to the input, "
        "or straight to the square for a long side over twice the short one; 400 above; checked from the header)",
    )
    max_concurrent_decodes: int = Field(
        2, ge=1, description="images a replica decodes and resizes at once (worker threads); the others wait"
    )
    request_timeout_s: float = Field(
        30.0, gt=0.0, description="deadline of one request, body to answer (503 after; the Serve proxy's too)"
    )
    body_timeout_s: float = Field(
        10.0, gt=0.0, description="deadline for receiving a request's body (408 after): a stalled client frees its "
        "slot (one that outlasts request_timeout_s gets the request's 503 first)"
    )
    auth_token: Optional[SecretStr] = Field(
        None,
        description="require Authorization: Bearer <token> on /predict and /models; never printed or written "
        "(shown as '**********'); prefer auth_token_env",
    )
    auth_token_env: Optional[str] = Field(
        None,
        description="environment variable holding the bearer token, read where the app is built (the GPU presets: "
        "CNNZOO_SERVE_TOKEN, set by cluster.yaml)",
    )
    allow_unauthenticated: bool = Field(
        False, description="serve a non-loopback host without a token (anyone who reaches the port can use it)"
    )
    models: list[str] = Field(default_factory=list, description=(
        "aliases to serve (default: all registered; `champion`: the version that alias points at); one not found "
        "is named, and with none found the stage exits 2"))
    checkpoints: dict[str, str] = Field(
        default_factory=dict, description="alias -> checkpoint file (made absolute where the command runs), served "
        "instead of the registry (any alias but `champion`, which requests the best servable one: the highest "
        "validation accuracy the file records)"
    )
    fold_batchnorm: bool = Field(True, description="fold batch norm into convolutions for serving (verified)")
    trace_models: bool = Field(
        True,
        description="serve TorchScript traces (verified; else eager): their forward runs beside request handling "
        "instead of blocking it",
    )
    default_top_k: int = Field(
        5, ge=1, description="classes returned when top_k is not given (at most the model's class count)"
    )

    @field_validator("auth_token")
    @classmethod
    def _not_the_mask(cls, value: Optional[SecretStr]) -> Optional[SecretStr]:
        # check-config and every run's logged config.yaml show the token as this mask: a config copied from
        # them would otherwise guard the endpoint with a token anyone can read.
        if value is not None and value.get_secret_value() == "**********":
            raise ValueError("'**********' is the mask printed by check-config and logged with each run, not a "
                             "token; set serve.auth_token_env (the environment variable holding it)")
        return value

    _host = field_validator("host")(_bind_host)
    _resources = field_validator("num_cpus", "num_gpus")(_ray_quantity)

    @field_validator("checkpoints")
    @classmethod
    def _absolute_checkpoints(cls, value: dict[str, str]) -> dict[str, str]:
        # A replica's working directory is not the driver's: a relative path found here was missing there.
        return {alias: os.path.abspath(os.path.expanduser(path)) for alias, path in value.items()}


    def bearer_token(self) -> str | None:
        """The token clients must send: ``auth_token``, else the variable ``auth_token_env`` names, else None.
        Without surrounding whitespace: a token read from a file or a secret kept its newline, and clients
        (whose header value HTTP strips) could never match it."""
        if self.auth_token is not None and self.auth_token.get_secret_value().strip():
            return self.auth_token.get_secret_value().strip()
        if self.auth_token_env:
            return os.environ.get(self.auth_token_env, "").strip() or None
        return None


def is_valid_bearer_token(token: str) -> bool:
    """Printable ASCII without spaces: HTTP clients send a header as bytes that the server reads as Latin-1 (a
    non-ASCII token matched from one client and not another), and a space cannot be told from the header's own."""
    return all("!" <= ch <= "~" for ch in token)


def check_serve_access(serve: ServeConfig) -> None:
    """:class:`ConfigError` unless the endpoint is either loopback-only or protected by a token (or the config
    says ``allow_unauthenticated``); the token's environment variable must be set where this runs."""
    if serve.auth_token is not None and serve.auth_token_env:
        raise ConfigError("serve.auth_token", "set serve.auth_token or serve.auth_token_env, not both")
    if serve.auth_token_env and not os.environ.get(serve.auth_token_env, "").strip():
        raise ConfigError("serve.auth_token_env", f"environment variable {serve.auth_token_env} is not set or "
                          "empty (it holds the bearer token)")
    token = serve.bearer_token()
    if token is not None and not is_valid_bearer_token(token):
        raise ConfigError("serve.auth_token_env" if serve.auth_token_env else "serve.auth_token",
                          "the bearer token may hold only printable ASCII characters without spaces (for example "
                          "from `openssl rand -hex 32`)")
    if not is_loopback(serve.host) and token is None and not serve.allow_unauthenticated:
        raise ConfigError(
            "serve.host",
            f"{serve.host!r} is reachable from other machines, so the endpoint needs a token: set "
            "serve.auth_token_env (the environment variable holding it) or serve.auth_token, or set "
            "serve.allow_unauthenticated: true to serve without one",
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: assume other machines can reach it
        return False


class PipelineConfig(_Section):
    name: str = Field(
        "quickstart",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,  # (Ray's run names add a model and a hash)
        description="MLflow experiment, registered model and run directory name",
    )
    workdir: str = Field(
        "./runs", description="local outputs: <workdir>/<name>/..., the MLflow sqlite file, default Ray storage"
    )
    storage_path: Optional[str] = Field(
        None, description="Ray Train/Tune storage (default <workdir>/ray_results); S3 or NFS on multi-node clusters "
        "(s3:// or gs://; its credentials in the nodes' environment, not in the URI)"
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    _local_workdir = field_validator("workdir")(checked_local_path)

    @field_validator("storage_path")
    @classmethod
    def _a_storage_uri_without_options(cls, value):
        # Ray hands the whole URI to pyarrow, whose query options (MinIO's endpoint_override, a region) end the
        # string: the run directories joined on after them fell into the option's value, and checkpoints read
        # back without them went to AWS itself (registration then retried for good).
        if value is None:
            return value
        # Never echoed: the options (pyarrow's secret_key) and a key:password@ before the bucket.
        shown = re.sub(r"^([A-Za-z][\w+.-]*:/+)[^/@]*:[^/@]*@", r"\1...:...@",
                       value.split("?", 1)[0] + ("?..." if "?" in value else ""))
        if re.match(r"^[A-Za-z][\w+.-]+:/(?!/)", value):  # (s3:/bucket/x became the local directory ./s3:/bucket/x)
            slashes = ":///" if value.lower().startswith("file:") else "://"  # (file://tmp/x names a host "tmp")
            fixed = shown.replace(":/", slashes, 1)
            raise ValueError(f"{shown!r}: a URI needs two slashes after its scheme ({fixed!r})")
        checked_local_path(value)
        if value.lower().startswith("file://"):  # the local path it names, as RunPaths.of reads it (%00: a NUL)
            checked_local_path(urllib.parse.unquote(value[len("file://"):]))
        if "://" in value and any(c.isspace() for c in value):
            raise ValueError(f"{shown!r}: a URI cannot hold spaces (pyarrow cannot parse it)")
        if "://" in value:
            scheme, rest = value.split("://", 1)
            if scheme not in STORAGE_SCHEMES:
                close = difflib.get_close_matches(scheme.lower(), STORAGE_SCHEMES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"the pipeline cannot store runs with the scheme {scheme!r}, only with "
                                 f"{', '.join(STORAGE_SCHEMES)}{hint} (pyarrow has no file system for some schemes, "
                                 "and Ray reports the checkpoint paths of abfs, hdfs and viewfs without their account "
                                 "or namenode, so they could not be read back)")
            authority = rest.split("/", 1)[0]
            if scheme == "file" and authority:  # pyarrow: "Unsupported hostname"
                raise ValueError(f"{shown!r}: a file URI has three slashes before an absolute path "
                                 f"(file:///{shown.split('://', 1)[1]}), or none at all (a plain path)")
            if scheme != "file" and not authority.rsplit("@", 1)[-1]:  # pyarrow: "Missing bucket name"
                raise ValueError(f"{shown!r}: the bucket is missing ({scheme}://bucket/path)")
            if "@" in authority and ":" in authority.rsplit("@", 1)[0]:  # (a user name alone is none)
                # Not echoed. Logged with every run's config.yaml, and lost from the checkpoint paths Ray reports.
                raise ValueError(f"{scheme}://...:...@...: a key or password in the storage URI would be logged with "
                                 "every run and is lost from the checkpoint paths built under it; give it in every "
                                 "node's environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the "
                                 "instance's role)")
        if "://" in value and "#" in value:  # (pyarrow drops a fragment: the runs went to another directory)
            raise ValueError(f"{shown!r}: a storage URI cannot hold '#' (pyarrow reads what follows as a fragment, "
                             "not as part of the path)")
        if value.lower().rstrip("/") in ("file:", "file:/"):  # (file:// alone: no path at all)
            raise ValueError(f"{shown!r}: the file URI names no directory (file:///absolute/path)")
        if "://" in value and "?" in value:
            raise ValueError(f"{shown!r}: options in the storage URI are lost from the "
                             "paths built under it; give "
                             "an S3-compatible store's endpoint as AWS_ENDPOINT_URL (and the region as "
                             "AWS_DEFAULT_REGION) in every node's environment instead")
        return value

    @property
    def paths(self) -> RunPaths:
        """Every output location of this config (one place decides where everything goes)."""
        return RunPaths.of(self.workdir, self.name, self.storage_path)

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.paths.mlflow_db}"

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or self.name

    def to_yaml(self) -> str:
        """The config as YAML, as printed (``check-config``) and logged with every stage's MLflow run: secrets
        masked (the serve token, a password in ``tracking.uri``: :func:`redact_uri`)."""
        config = self.model_dump(mode="json")
        if config["tracking"]["uri"]:
            config["tracking"]["uri"] = redact_uri(config["tracking"]["uri"])
        return yaml.dump(config, Dumper=_YamlDumper, sort_keys=False)


#: A database URI's password, as SQLAlchemy reads it: after ``user:``, up to the first ``@`` (``/`` included).
_DATABASE_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][\w+.-]*://[^:/@]*:)[^@]*@")

#: A URL's password anywhere in free text (an error message quoting the URL it requested), after ``user:``: in
#: an HTTP URL up to the last ``@`` before its path (RFC 3986 has a ``/`` in a password percent-encoded, and an
#: ``@`` further on is the path's or query's: ``?email=a@b.com``), in others (database URIs) up to the first
#: ``@``, as SQLAlchemy reads them. The scheme must start where no scheme character stands before it.
_PASSWORD_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])(?:(?P<http>https?://[^\s:/@]*:)[^\s/]*@"
                               r"|(?!https?://)(?P<other>[A-Za-z][\w+.-]*://[^\s:/@]*:)[^\s@]*@)", re.IGNORECASE)
#: A password in a query string (a URI's or one quoted in free text), up to the next parameter or a blank.
_QUERY_PASSWORD = re.compile(r"(?i)(?P<key>[?&](?:password|passwd|pwd)=)[^&\s'\"]*")


def redact_text(text: str) -> str:
    """``text`` with every URL's password masked as :func:`redact_uri` masks one: for error messages, which
    quote what failed (MLflow's client names the full URL of a request, credentials included)."""
    masked = _PASSWORD_IN_TEXT.sub(lambda m: f"{m.group('http') or m.group('other')}***@", text)
    return _QUERY_PASSWORD.sub(r"\g<key>***", masked)


def redact_uri(uri: str) -> str:
    """``uri`` with its password masked (``postgresql://user:***@host/db``, ``...?password=***``): for anything
    printed, logged or stored as an artifact. HTTP URIs are read as RFC 3986 has them, database URIs as
    SQLAlchemy does."""
    from urllib.parse import urlsplit, urlunsplit

    masked = uri
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        if parts.password is not None:
            netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
            masked = urlunsplit(parts._replace(netloc=netloc))
    else:
        masked = _DATABASE_PASSWORD.sub(r"\g<head>***@", uri, count=1)
    return _QUERY_PASSWORD.sub(r"\g<key>***", masked)


def check_ray_environment(cfg: PipelineConfig) -> None:
    """For the commands that start Ray: a ``RAY_ADDRESS`` that ray.init cannot join (Ray's job docs have users
    export the dashboard's http:// address for `ray job submit`; ray.init then failed after the stage began,
    with a message cut short at its first line). ``ray.address: auto`` reads it too (ray.init takes RAY_ADDRESS
    before looking for a local cluster): a ``ray://`` client address, refused as ``ray.address``, passed there.
    Raises :class:`ConfigError`."""
    if cfg.ray.address in (None, "auto") and os.environ.get("RAY_ADDRESS"):
        try:
            joinable_ray_address(os.environ["RAY_ADDRESS"])
        except ValueError as err:
            raise ConfigError("RAY_ADDRESS", f"{err} (the environment variable; unset it for a local Ray)") from None


def paths_in_a_job_copy(cfg: PipelineConfig, cwd: Path | None = None) -> list[str]:
    """The keys whose paths lie in the unpacked upload a Ray job runs in (``ray job submit --working-dir``, its
    directory under ``runtime_resources/working_dir_files``): relative paths resolve there, and that directory's
    name changes with every upload of different content, so the next job after any edit started every model
    afresh with an empty registry. Empty outside such a copy."""
    cwd = Path.cwd() if cwd is None else cwd
    parts = cwd.resolve().parts
    if "working_dir_files" not in parts or "runtime_resources" not in parts:
        return []
    copy = cwd.resolve()
    paths = {"workdir": cfg.paths.workdir}
    if "://" not in cfg.paths.storage:
        paths["storage_path"] = Path(cfg.paths.storage)
    uri = absolute_sqlite_uri(cfg.tracking_uri)
    if cfg.tracking.uri and uri.startswith("sqlite:///"):
        paths["tracking.uri"] = Path(uri[len("sqlite:///"):].partition("?")[0])
    if cfg.data.root and "://" not in cfg.data.root:
        paths["data.root"] = Path(cfg.data.root).expanduser().resolve()
    return [key for key, path in paths.items() if path == copy or copy in path.parents]


def _semantic_checks(cfg: PipelineConfig) -> None:
    data = cfg.data
    if data.dataset == "imagefolder" and not data.root:
        raise ConfigError("data.root", "the imagefolder data set needs data.root (a directory of class folders)")
    if data.root and "://" in data.root:  # else a relative path named like the URL, on the driver only
        raise ConfigError("data.root", f"{data.root!r}: data sets are read from a local or mounted directory "
                                       "(mount the bucket, e.g. with s3fs or a shared volume)")
    with _looking_at("workdir", cfg.workdir):
        if Path(cfg.workdir).expanduser().exists() and not Path(cfg.workdir).expanduser().is_dir():
            raise ConfigError("workdir", f"{cfg.workdir!r} is a file, not a directory")
    if cfg.tracking.uri is None and re.search(r"\?|%[0-9A-Fa-f]{2}", str(cfg.paths.mlflow_db)):
        # SQLAlchemy reads the sqlite URI's path as a URL's: %41 decoded to A (another database, if that one
        # exists), ? cut the path short; the stage then retried "unable to open database file" for minutes. (A
        # '%' without two hex digits after it, "50%off", stays as it is.)
        raise ConfigError("workdir", f"the default tracking store {cfg.paths.mlflow_db} has a '?' or a '%' and two "
                          "hex digits in its path, which its sqlite URI cannot carry: choose a workdir without them, "
                          "or set tracking.uri")
    _check_creatable_locations(cfg)
    if cfg.serve.batch_wait_timeout_s > cfg.serve.request_timeout_s / 2:
        # An idle model's lone request waits the whole batch wait before its forward: at the deadline, a 503.
        raise ConfigError("serve.batch_wait_timeout_s", f"{cfg.serve.batch_wait_timeout_s:g} s is over half of "
                          f"serve.request_timeout_s ({cfg.serve.request_timeout_s:g} s): a request to an idle model "
                          "waits all of it for others to batch with (milliseconds are the usual wait)")
    with _looking_at("data.root", data.root or ""):
        if (
            data.root
            and data.dataset in ("imagefolder",)
            and "://" not in data.root
            and not Path(data.root).expanduser().is_dir()
        ):
            raise ConfigError("data.root", f"{data.root!r} is a file, not a directory of class folders"
                              if Path(data.root).expanduser().exists() else f"directory {data.root!r} does not exist")
        if (
            data.root
            and data.dataset in ("fashion-mnist", "cifar10")
            and not data.download
            and not Path(data.root).expanduser().is_dir()
        ):
            raise ConfigError("data.root", f"{data.root!r} is a file, not the data set's directory"
                              if Path(data.root).expanduser().exists()
                              else f"directory {data.root!r} does not exist and data.download is false")
    # Per-model entries for known models that are not selected are ignored (a preset may tune models a
    # `--set train.models=[...]` leaves out); names that are no model at all are typos and errors.
    for section in ("model_options", "model_overrides"):
        for name in getattr(cfg.train, section):
            try:
                _check_model_name(name)
            except ValueError as err:
                raise ConfigError(f"train.{section}.{name}", str(err)) from None
    for name, options in cfg.train.model_options.items():
        allowed = cnnmodels.model_options(name)
        for key in options:
            if key in ("num_classes", "in_chans"):
                raise ConfigError(f"train.model_options.{name}.{key}",
                                  f"{key} is set from the data set (its classes and channels), not per model")
            if key not in allowed:
                raise ConfigError(f"train.model_options.{name}.{key}",
                                  f"{name} has no option {key!r}{_did_you_mean(key, allowed)}")
    _check_model_option_values(cfg)
    for name, overrides in cfg.train.model_overrides.items():
        for key in overrides:
            if key not in PER_MODEL_TRAIN_KEYS:
                raise ConfigError(f"train.model_overrides.{name}.{key}",
                                  f"not a per-model setting{_did_you_mean(key, PER_MODEL_TRAIN_KEYS)} "
                                  f"(choose from {', '.join(PER_MODEL_TRAIN_KEYS)})")
        try:
            hyperparameters_for(cfg.train, name)
        except ValidationError as err:
            first = _format_validation_error(err)
            raise ConfigError(f"train.model_overrides.{name}.{first.key.split('.')[-1]}", first.message) from None
    _check_warmup(cfg)
    _check_gpu_shares(cfg)
    _check_local_resources(cfg)
    _check_declared_gpus(cfg)
    _check_batch_split(cfg)
    _check_failure_rehearsal(cfg)
    search = cfg.search
    if search.base_model != "efficientnet":
        raise ConfigError("search.base_model", "only 'efficientnet' supports compound scaling")
    if search.tolerance >= search.target - 1.0:
        # alpha, beta, gamma >= 1 make the product at least 1: a band reaching below it has no lower bound,
        # and the Optuna region's bounds (square roots of target - tolerance over the rest) break down.
        raise ConfigError("search.tolerance", f"{search.tolerance:g} reaches below 1 from search.target "
                                              f"{search.target:g} (alpha * beta^2 * gamma^2 is at least 1); use "
                                              f"less than {search.target - 1.0:g}")
    if search.compare_paper and not any(phi > 0 for phi in search.phis):
        # At phi 0 both families are B0 (trained once): nothing to compare, and the report said nothing of it.
        raise ConfigError("search.compare_paper", f"needs a phi above 0 in search.phis (it is {list(search.phis)}: at "
                                                  "phi 0 both families are the same B0)")
    _check_searched_scale(search)
    if search.asha and search.grace_period > search.epochs:  # Ray's ASHA asserts grace_period <= max_t
        raise ConfigError("search.grace_period", f"{search.grace_period} is above search.epochs ({search.epochs}): "
                                                 "ASHA cannot wait longer than a trial runs; lower it or set "
                                                 "search.asha: false")
    per_axis = [(high - low) / search.step for low, high in (search.alpha, search.beta, search.gamma)]
    # A vanishing step or huge range: more points than can be counted, as too many as the grid limit says.
    points = math.prod(int(n + 1e-9) + 1 for n in per_axis) if all(n < 1e12 for n in per_axis) else math.inf
    if points <= MAX_GRID_POINTS:
        feasible = feasible_grid(search.alpha, search.beta, search.gamma, search.step, search.target,
                                 search.tolerance)
    elif search.mode == "grid":
        count = "more than 10^12" if points == math.inf else f"{points:,}"
        raise ConfigError("search.step", f"the grid of search.alpha x beta x gamma in steps of {search.step:g} has "
                                         f"{count} points (at most {MAX_GRID_POINTS:,}); raise search.step or "
                                         "narrow the ranges")
    else:  # Optuna samples the ranges; whether they can meet the constraint is checked below
        feasible = None
    if not feasible and not _range_can_meet(search):
        raise ConfigError(
            "search",
            f"no (alpha, beta, gamma) in alpha {list(search.alpha)}, beta {list(search.beta)}, gamma "
            f"{list(search.gamma)} satisfies |alpha * beta^2 * gamma^2 - {search.target}| <= {search.tolerance}",
        )
    from .search_space import FeasibleRegion, paper_is_feasible  # (it imports this module)

    if search.mode == "optuna" and not FeasibleRegion.of(search).has_points(search.num_trials):
        # Two trials of one triple would share one Ray Train run (named after it): the second resumed the first.
        raise ConfigError("search.num_trials", f"{search.num_trials} trials, but alpha {list(search.alpha)}, beta "
                                               f"{list(search.beta)} and gamma {list(search.gamma)} hold fewer "
                                               "different feasible triples at 4 decimals; lower it or widen the "
                                               "ranges")

    if search.mode == "grid" and not feasible and not paper_is_feasible(search):  # the paper's is a grid trial too
        raise ConfigError(
            "search.step",
            f"the grid with step {search.step} has no feasible triple; use a smaller step or mode 'optuna'",
        )
    _serve_checks(cfg)


#: Coefficients that stand for whatever the search will find, to list and build the models a config trains
#: before it has run (not the paper's: resolve_models would take them for a search that found them, and leave
#: out the paper's family that search.compare_paper adds).
_ANY_SEARCHED_COEFFICIENTS = {"alpha": 1.0, "beta": 1.0, "gamma": 1.0}


def _check_warmup(cfg: PipelineConfig) -> None:
    """A warm-up longer than the run never reaches the peak learning rate, nor decays from it (warmup 5 of 3
    epochs peaked at 0.6 of ``lr`` and ended there): for every trained model and the search's trials."""
    from .planning import resolve_models  # planning builds on this module

    trained = [choice.name for choice in resolve_models(cfg, _ANY_SEARCHED_COEFFICIENTS)]
    for name in dict.fromkeys([*trained, "efficientnet"]):
        hyper = hyperparameters_for(cfg.train, name)
        runs = [(hyper.epochs, "epochs")] if name in trained else []
        if name == "efficientnet":  # the search's template: its trials run search.epochs
            runs.append((cfg.search.epochs, "search.epochs"))
        for epochs, what in runs:
            # As long as the run is fine (the peak at its last step: 1-epoch smoke runs of a preset with 1).
            if hyper.warmup_epochs > epochs:
                # The entry the value came from: the model's own, the search baseline's (a family member takes
                # it), or the section's.
                key = next((f"train.model_overrides.{source}.warmup_epochs" for source in (name, "efficientnet")
                            if "warmup_epochs" in cfg.train.model_overrides.get(source, {})
                            and (source == name or baseline_settings(cfg.train.model_overrides, name))),
                           "train.warmup_epochs")
                subject = f"{name}'s {epochs} epochs" if what == "epochs" else f"the search's {epochs} epochs per trial"
                raise ConfigError(key, f"{hyper.warmup_epochs:g} warm-up epochs are longer than {subject}: the "
                                       "learning rate would never reach its peak nor decay; shorten the warm-up")


#: What the workdir holds beside the run directories: a run named so would be written into it.
_WORKDIR_ENTRIES = ("mlflow.db", "mlartifacts", "ray_results")


def _local_output_locations(cfg: PipelineConfig) -> list[tuple[str, Path, Path]]:
    """``(key, path, the nearest directory of it that exists)`` for the run directory and a local
    ``storage_path``."""
    locations = [("workdir", cfg.paths.run_dir)]
    if cfg.storage_path and "://" not in cfg.paths.storage:  # (file:///x is the directory /x)
        locations.append(("storage_path", Path(cfg.paths.storage)))
    found = []
    for key, path in locations:
        existing = path
        with _looking_at(key, path):
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
        found.append((key, path, existing))
    return found


def _check_creatable_locations(cfg: PipelineConfig) -> None:
    """The run directory and a local ``storage_path`` can be made anywhere: a workdir under a file or in /proc, or
    a run named as the workdir's database, passed every check and failed once Ray had started. (Whether this user
    may write there is :func:`check_writable_locations`', on the machine that runs the stages.)"""
    if cfg.name in _WORKDIR_ENTRIES:
        raise ConfigError("name", f"{cfg.name!r} is what the workdir keeps beside the run directories; choose "
                                  "another name")
    for key, path, existing in _local_output_locations(cfg):
        with _looking_at(key, path):
            if path.exists() and not path.is_dir():
                raise ConfigError(key, f"{path} is a file, not a directory")
            if not existing.is_dir():
                raise ConfigError(key, f"{path} cannot be created: {existing} is a file")
            if _is_pseudo_file_system(existing):
                raise ConfigError(key, f"{path} cannot be created: nothing can be written in {existing}")


def check_writable_locations(cfg: PipelineConfig, storage: bool = True) -> None:
    """:class:`ConfigError` unless this user may create the run directory and (``storage``: for the commands that
    train) a local ``storage_path`` (the nearest directory of each that exists is writable): checked where the
    stages run, not by ``check-config``, which may validate a cluster's config (``/home/ray/runs``) on another
    machine. Nothing is created."""
    for key, path, existing in _local_output_locations(cfg):
        if key == "storage_path" and not storage:
            continue
        with _looking_at(key, path):
            if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
                raise ConfigError(key, f"{path} cannot be created: this user may not write in {existing}")


def _is_pseudo_file_system(path: Path) -> bool:
    """Whether ``path`` is on /proc or /sys, where even root (whom ``os.access`` always lets write) creates
    nothing."""
    resolved = path.resolve()
    return any(resolved == Path(root) or Path(root) in resolved.parents for root in ("/proc", "/sys"))


def _check_model_option_values(cfg: PipelineConfig) -> None:
    """Build each model that has options, as the planner will (with the data's defaults), on the meta device:
    those train.models names, the searched family's members (at stand-in coefficients: the search's are not
    known yet) and the search's baseline. A value its builder refuses (``stem_stride: 3``) fails here instead
    of in a Ray worker. Built by the model's name, not its builder's: an option its name fixes (``phi: 2`` for
    ``efficientnet_phi1``, another ``alpha`` for a paper member) would train another model under the name."""
    if not cfg.train.model_options:
        return
    import torch

    from .planning import resolve_models, search_template  # planning builds on this module

    for name, options in cfg.train.model_options.items():
        for option, value in options.items():
            if _has_non_finite(value):  # nn.Dropout(nan) builds, and its first forward fails in every retry
                raise ConfigError(f"train.model_options.{name}.{option}", f"{value!r} is not a finite number")
            if option == "phi" and isinstance(value, (int, float)) and value > MAX_PHI:  # (before building it)
                raise ConfigError(f"train.model_options.{name}.phi", f"{value:g} is above {MAX_PHI:g}, the largest "
                                  "phi trained, as in search.phis (EfficientNet-B7 is about 6)")
            if option == "base_resolution" and isinstance(value, (int, float)) and value > MAX_IMAGE_SIZE:
                raise ConfigError(f"train.model_options.{name}.base_resolution", f"{value:g} is above "
                                  f"{MAX_IMAGE_SIZE}, the largest data.image_size")
            if option in ("alpha", "beta", "gamma") and isinstance(value, (int, float)) and value > MAX_COEFFICIENT:
                raise ConfigError(f"train.model_options.{name}.{option}", f"{value:g} is above {MAX_COEFFICIENT:g}, "
                                  "the largest scaling coefficient (the paper's are 1.1-1.2)")

    for choice in [*resolve_models(cfg, _ANY_SEARCHED_COEFFICIENTS), search_template(cfg, with_user_coefficients=True)]:
        if choice.name not in cfg.train.model_options:
            continue
        _check_compound_scale(choice.name, choice.kwargs)
        try:
            with torch.device("meta"):
                cnnmodels.create_model(choice.name, num_classes=10, **choice.kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"train.model_options.{choice.name}", str(err)) from None
        except (RuntimeError, OverflowError, MemoryError) as err:  # sizes past what torch can count
            raise ConfigError(f"train.model_options.{choice.name}", f"the model cannot be built: "
                              f"{type(err).__name__}: {err}") from None


#: The most an EfficientNet's options may scale B0's depth, width or input by (coefficient ** phi): beyond the
#: paper's coefficients at phi 12 (8.9, 3.1, 5.3) and EfficientNet-B7's (3.1, 2.0, 2.4). Building the model to
#: check its options took minutes past it (alpha 1000: a thousand times B0's blocks).
MAX_COMPOUND_SCALE = 16.0


def _check_compound_scale(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse options that scale an EfficientNet (one with compound coefficients) past :data:`MAX_COMPOUND_SCALE`,
    before it is built."""
    builder, implied = cnnmodels.resolve_model_name(name)
    options = {**cnnmodels.model_options(builder), **implied, **kwargs}
    if not all(isinstance(options.get(key), (int, float)) for key in ("phi", "alpha", "beta", "gamma")):
        return
    if options["phi"] < 0 or min(options[key] for key in ("alpha", "beta", "gamma")) < 1:
        return  # (the builder refuses those, naming the option: a power of them is no scale, or not a number)
    for key, what in (("alpha", "depth"), ("beta", "width"), ("gamma", "input size")):
        try:
            scale = float(options[key]) ** float(options["phi"])
        except OverflowError:
            scale = math.inf
        if scale > MAX_COMPOUND_SCALE:
            raise ConfigError(f"train.model_options.{name}.{key}",
                              f"{options[key]:g} ** phi {options['phi']:g} scales B0's {what} by {scale:.3g}, above "
                              f"{MAX_COMPOUND_SCALE:g} (EfficientNet-B7's: 3.1, 2.0, 2.4)")


def _check_searched_scale(search: SearchConfig) -> None:
    """Refuse search ranges and phis whose networks may scale B0 past :data:`MAX_COMPOUND_SCALE`, as
    ``train.model_options`` are refused (:func:`_check_compound_scale`): the family at ``search.phis`` (or a trial
    at ``search.phi``) built from a coefficient the search can pick, at most its range's high end and what the
    constraint leaves with the other two at their low ends."""
    top = max([search.phi, *search.phis])
    key = "search.phis" if max(search.phis, default=0.0) >= search.phi else "search.phi"
    bound = search.target + search.tolerance
    (a_low, a_high), (b_low, b_high), (g_low, g_high) = search.alpha, search.beta, search.gamma
    reachable = {"alpha": min(a_high, bound / (b_low ** 2 * g_low ** 2)),
                 "beta": min(b_high, math.sqrt(bound / (a_low * g_low ** 2))),
                 "gamma": min(g_high, math.sqrt(bound / (a_low * b_low ** 2)))}
    for (name, coefficient), what in zip(reachable.items(), ("depth", "width", "input size"), strict=True):
        scale = coefficient ** top
        if scale > MAX_COMPOUND_SCALE:
            raise ConfigError(key, f"phi {top:g} with search.{name} up to {coefficient:.3g} would scale B0's {what} by "
                                   f"{scale:.3g}, above {MAX_COMPOUND_SCALE:g} (EfficientNet-B7's: 3.1, 2.0, 2.4); "
                                   f"lower the phi or narrow search.{name}")


def _has_non_finite(value: Any) -> bool:
    """Whether ``value`` is, or holds (in a list or mapping), a NaN or infinite number."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False


def _serve_checks(cfg: PipelineConfig) -> None:
    """Who may call the endpoint, a decode budget every request can meet, and a GPU for the replicas."""
    if cfg.serve.num_gpus > 0 and _local_gpus(cfg) == 0:
        raise ConfigError("serve.num_gpus", "this machine has no GPU for the local Ray (ray.num_gpus or CUDA): the "
                                            "replicas would never be placed; set serve.num_gpus: 0")
    check_serve_settings(cfg)


def check_serve_settings(cfg: PipelineConfig) -> None:
    """The serving checks that hold wherever the app is built (``serve deploy`` of a written config on a cluster
    included): who may call the endpoint, and a decode budget every request can meet."""
    serve = cfg.serve
    check_serve_access(serve)
    if serve.autoscaling and serve.min_replicas > serve.max_replicas:
        raise ConfigError("serve.min_replicas", f"{serve.min_replicas} is above serve.max_replicas "
                                                f"({serve.max_replicas})")
    if serve.max_upload_mb * 1024 * 1024 < 1024:
        raise ConfigError("serve.max_upload_mb", f"{serve.max_upload_mb:g} MB is under 1 KB: every request would "
                                                 "be refused as too large")
    if serve.max_upload_mb > MAX_UPLOAD_MB:  # (1e303 overflowed to infinity in bytes: every replica failed to start)
        raise ConfigError("serve.max_upload_mb", f"{serve.max_upload_mb:g} MB is above {MAX_UPLOAD_MB:,} MB (1 TB), "
                                                 "more than any request body can be")
    if unreachable := sorted(alias for alias in serve.checkpoints if alias in ("", CHAMPION)):
        raise ConfigError("serve.checkpoints", f"the alias {unreachable[0]!r} cannot name a checkpoint: requests for "
                                               f"{CHAMPION!r} go to the best servable model, and no request "
                                               "names an empty alias")
    if serve.checkpoints and (unknown := sorted(set(serve.models) - set(serve.checkpoints))):
        raise ConfigError("serve.models", f"{', '.join(unknown)}: not among serve.checkpoints "
                                          f"({', '.join(sorted(serve.checkpoints))})")
    if serve.max_ongoing_requests < serve.max_batch_size:
        raise ConfigError("serve.max_ongoing_requests",
                          f"{serve.max_ongoing_requests} is below serve.max_batch_size ({serve.max_batch_size}): "
                          "a replica could never fill a batch")
    if serve.max_image_pixels < cfg.data.image_size ** 2:  # ("40" for the README's "40 M" refused every upload)
        raise ConfigError("serve.max_image_pixels",
                          f"{serve.max_image_pixels:,} pixels is below one {cfg.data.image_size}x"
                          f"{cfg.data.image_size} model input: every upload would be refused (the default is "
                          "40,000,000)")
    if serve.max_resized_pixels < cfg.data.image_size ** 2:
        raise ConfigError("serve.max_resized_pixels",
                          f"{serve.max_resized_pixels:,} is below one {cfg.data.image_size}x{cfg.data.image_size} "
                          "model input: no image could be served")
    _check_model_inputs_fit(cfg)


#: No model input is larger (EfficientNet-B7's 600 px; the searched family scales data.image_size, checked
#: apart): a decode budget at least this square admits every listed model without building one.
_LARGEST_TABLE_INPUT = 640


def _check_model_inputs_fit(cfg: PipelineConfig) -> None:
    """Models whose own input is larger than ``data.image_size`` (EfficientNet-B4's 380 px, a family member's
    scaled resolution) over ``serve.max_resized_pixels``: every request to them would be refused, which the
    serve stage found only after training them all (exit 2)."""
    budget = cfg.serve.max_resized_pixels
    too_large = []
    phis = [phi for phi in cfg.search.phis if phi > 0]
    if phis:  # the family's smallest possible input: the search's lowest gamma, never below the model's minimum
        from cnnmodels.efficientnet import compound_architecture

        from .planning import _small_input  # planning builds on this module

        def side_at(gamma: float) -> int:  # what the member trains at (alpha and beta do not change it)
            return compound_architecture(max(phis), 1.0, 1.0, gamma, base_resolution=cfg.data.image_size,
                                         small_input=_small_input(cfg))[1]

        side = side_at(cfg.search.gamma[0])
        if side ** 2 > budget:
            too_large.append(f"efficientnet_phi{max(phis):g} (at least {side} px)")
        # (the paper's family, trained beside it, at the paper's gamma: when the search finds the paper's
        # triple it is not trained, but a budget it would not meet is still refused, as it may be)
        side = side_at(PAPER_COEFFICIENTS.gamma)
        if cfg.search.compare_paper and side ** 2 > budget:
            too_large.append(f"efficientnet_paper_phi{max(phis):g} ({side} px)")
    # Every model where the budget is below the table's largest input; else those whose options may scale an
    # input past it (building each model at every load cost a second).
    if budget < _LARGEST_TABLE_INPUT ** 2 or cfg.train.model_options:
        import torch

        from .planning import resolve_models  # planning builds on this module

        for choice in resolve_models(cfg):
            if budget >= _LARGEST_TABLE_INPUT ** 2 and not _may_scale_the_input(cfg.train.model_options.get(
                    choice.name, {})):
                continue
            with torch.device("meta"):
                model = cnnmodels.create_model(choice.arch, num_classes=10, **choice.kwargs)
            if (side := model.input_size_for(cfg.data.image_size)) ** 2 > budget:
                too_large.append(f"{choice.name} ({side} px)")
    if too_large:
        raise ConfigError("serve.max_resized_pixels", f"{budget:,} is below the input of {', '.join(too_large)}: "
                                                      "every request to them would be refused; raise it")


#: Model options that can change a model's input size.
_INPUT_OPTIONS = frozenset({"phi", "gamma", "base_resolution", "small_input"})


def _may_scale_the_input(options: dict[str, Any]) -> bool:
    return bool(_INPUT_OPTIONS & set(options))


def _local_gpus(cfg: PipelineConfig) -> int | None:
    """GPUs a local Ray will have (None when joining a cluster: its nodes are not known before Ray starts)."""
    if ray_address(cfg) not in (None, "local"):
        return None
    if cfg.ray.num_gpus is not None:
        return cfg.ray.num_gpus
    import torch

    return torch.cuda.device_count()


def _check_batch_split(cfg: PipelineConfig) -> None:
    """A global batch splits evenly across the DDP workers, at least two images each: each trains on
    ``batch_size // num_workers`` images a step, so 128 over 3 workers silently trained on 126, and 2 over 4
    workers on 4; with one image a worker, batch norm fails at the first step."""
    workers = cfg.train.num_workers
    sizes = [("train.batch_size", cfg.train.batch_size)]
    sizes += [(f"train.model_overrides.{name}.batch_size", overrides["batch_size"])
              for name, overrides in cfg.train.model_overrides.items() if "batch_size" in overrides]
    for key, size in sizes:
        if size < 2 * workers:  # batch norm cannot train on one value per channel (1x1 maps late in a model)
            raise ConfigError(key, f"{size} leaves {size // workers} image(s) per worker and step "
                                   f"(train.num_workers={workers}); use at least {2 * workers}")
        if size % workers:
            lower, higher = size // workers * workers, (size // workers + 1) * workers
            choices = f"{lower} or {higher}" if lower else f"{higher}"
            raise ConfigError(key, f"{size} does not split evenly across train.num_workers={workers} (each worker "
                                   f"takes a share of the global batch): use {choices}")


def _check_failure_rehearsal(cfg: PipelineConfig) -> None:
    """``train.simulate_failure_at_epoch`` must fall inside some model's epochs: beyond them it never fires, and
    a rehearsal that silently does nothing passes for a success."""
    at = cfg.train.simulate_failure_at_epoch
    if at is None:
        return
    # Models this config trains: its train.models and the searched families' members (which take the
    # baseline's, efficientnet's, overrides too).
    from .planning import family_members  # planning builds on this module

    trained = [*cfg.train.models, *family_members(cfg)]
    epochs = max([cfg.train.epochs] + [hyperparameters_for(cfg.train, name).epochs for name in trained])
    if at >= epochs:
        raise ConfigError("train.simulate_failure_at_epoch",
                          f"{at} never comes: epochs count from 0 and the longest model trains {epochs} (up to epoch "
                          f"{epochs - 1}); " + (f"use 1 to {epochs - 1}" if epochs > 1 else
                                                "raise train.epochs to at least 2"))


#: What each Tune trial's own actor reserves beside its run's workers (pipelines.trials.TRIAL_DRIVER_RESOURCES).
TRIAL_DRIVER_CPU = 0.01


def _cpus_a_local_ray_gets() -> float:
    """The CPUs ``ray.init()`` gives a Ray of its own: the container's quota (cgroups), not the host's cores, which
    ``os.cpu_count()`` counts (a 2-CPU container on a 32-core host passed a 4-CPU worker, and waited for good)."""
    try:
        from ray._private.utils import get_num_cpus  # Ray's own count; private, so guarded
    except ImportError:
        return float(os.cpu_count() or 1)
    return float(get_num_cpus())


def _check_local_resources(cfg: PipelineConfig) -> None:
    """On a Ray of the command's own (which can never grow), every request must fit it: a worker, a run's
    workers or a replica asking for more CPUs or GPUs than it has was never placed, and the stage waited for
    good (Ray Train retries a worker group it cannot place without end). A process that joins another Ray
    itself (a notebook, a test's simulated cluster) names it in ``ray.address``."""
    if ray_address(cfg) not in (None, "local"):
        return  # a cluster's nodes are not known before Ray starts (and an autoscaler may add them)
    cpus = float(cfg.ray.num_cpus or _cpus_a_local_ray_gets())
    gpus = _local_gpus(cfg) or 0
    train, workers = cfg.train, cfg.train.num_workers
    if train.placement_strategy == "STRICT_SPREAD" and workers > 1:
        raise ConfigError("train.placement_strategy", f"STRICT_SPREAD puts each of train.num_workers={workers} "
                                                      "workers on its own node; a local Ray has one")
    per_worker = (float(train.cpus_per_worker) if train.cpus_per_worker != "auto"
                  else float(1 + cfg.data.loader_workers) if train.use_gpu else None)
    # (+ the trial driver's sliver: 2 workers x 1 CPU asked for 2.01 of 2 and waited for good)
    if per_worker is not None and per_worker * workers + TRIAL_DRIVER_CPU > cpus + 1e-6:  # (3 x 6.33 of 19)
        setting = "train.cpus_per_worker" if train.cpus_per_worker != "auto" else "data.loader_workers"
        raise ConfigError(setting, f"{workers} worker(s) x {per_worker:g} CPUs (and {TRIAL_DRIVER_CPU:g} for the "
                                   f"trial) is more than the {cpus:g} of the local Ray (ray.num_cpus): the run would "
                                   "never be placed")
    if not train.use_gpu and cfg.data.loader_workers > max(4 * cpus, 8):
        # Each training worker starts them for its train and validation loaders: 100,000 processes were accepted.
        # (More than the CPUs can pay off for slow decoding: up to four per CPU.)
        raise ConfigError("data.loader_workers", f"{cfg.data.loader_workers} loader processes per training worker "
                                                 f"is more than four per CPU of the local Ray ({cpus:g})")
    if train.use_gpu and train.gpus_per_worker * workers > gpus:
        raise ConfigError("train.gpus_per_worker", f"{workers} worker(s) x {train.gpus_per_worker:g} GPU is more "
                                                   f"than the {gpus:g} of the local Ray (ray.num_gpus or CUDA)")
    if cfg.serve.num_cpus > cpus:
        raise ConfigError("serve.num_cpus", f"{cfg.serve.num_cpus:g} is more than the {cpus:g} CPUs of the local Ray: "
                                            "no replica would ever be placed")
    if cfg.serve.num_gpus > gpus > 0:
        raise ConfigError("serve.num_gpus", f"{cfg.serve.num_gpus:g} is more than the {gpus:g} GPUs of the local Ray: "
                                            "no replica would ever be placed")
    # Every replica at once: Serve waits without end for an app whose replicas do not all fit (after the training).
    replicas_key = "serve.min_replicas" if cfg.serve.autoscaling else "serve.num_replicas"
    replicas = cfg.serve.min_replicas if cfg.serve.autoscaling else cfg.serve.num_replicas
    for what, each, have in (("CPUs", cfg.serve.num_cpus, cpus), ("GPUs", cfg.serve.num_gpus, gpus)):
        if replicas > 1 and each > 0 and replicas * each > have + 1e-6 and (what == "CPUs" or have > 0):
            raise ConfigError(replicas_key, f"{replicas} replicas x {each:g} {what} (serve.num_{what[:3].lower()}s) is "
                                            f"more than the {have:g} {what} of the local Ray: the app would never "
                                            "start")


def _check_declared_gpus(cfg: PipelineConfig) -> None:
    """A local Ray told of more GPUs (ray.num_gpus) than CUDA sees here, where a stage would use one: Ray hands a
    worker or replica a GPU that is not there, and it fails once placed ("Found no NVIDIA driver")."""
    declared = cfg.ray.num_gpus
    if declared is None or ray_address(cfg) not in (None, "local"):
        return
    if not (cfg.train.use_gpu or cfg.serve.num_gpus > 0):
        return  # (GPUs no stage asks for: Ray may be told of any)
    import torch

    seen = torch.cuda.device_count()
    if declared > seen:
        fix = (f"set ray.num_gpus: {seen} or leave it out (all of them)" if seen else
               "leave it out and set train.use_gpu: false and serve.num_gpus: 0, or run on a GPU node (ray.address: "
               "auto)")
        raise ConfigError("ray.num_gpus", f"{declared} GPU(s) for the local Ray, but CUDA sees {seen} on this "
                                          f"machine: the stages given one would fail to find it; {fix}")


def _check_gpu_shares(cfg: PipelineConfig) -> None:
    """Fractional GPUs only for single-worker runs (NCCL needs one GPU per DDP rank), and only where a GPU is."""
    train = cfg.train
    shares = [("train.gpus_per_worker", train.gpus_per_worker)]
    if cfg.search.gpus_per_trial is not None:
        shares.append(("search.gpus_per_trial", cfg.search.gpus_per_trial))
    for key, share in shares:
        if train.use_gpu and share < 1.0 and train.num_workers > 1:
            raise ConfigError(key, f"a share of {share:g} GPU needs train.num_workers: 1; DDP across "
                                   f"{train.num_workers} workers uses one whole GPU per worker (set it to 1)")
    gpus = _local_gpus(cfg) if train.use_gpu else None
    if gpus == 0:
        raise ConfigError("train.use_gpu", "this machine has no GPU for the local Ray (ray.num_gpus or CUDA); "
                                           "set train.use_gpu: false or run on a GPU node (ray.address: auto)")


def _range_can_meet(search: SearchConfig) -> bool:
    low = search.alpha[0] * search.beta[0] ** 2 * search.gamma[0] ** 2
    high = search.alpha[1] * search.beta[1] ** 2 * search.gamma[1] ** 2
    return low <= search.target + search.tolerance and high >= search.target - search.tolerance


def _format_validation_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    # Without the union member pydantic tried last ("train.cpus_per_worker.float"): no such key exists.
    loc = [str(p) for p in first["loc"] if not _is_union_member_tag(str(p))]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        parent_model = PipelineConfig
        for part in loc[:-1]:
            field = parent_model.model_fields.get(part)
            annotation = getattr(field, "annotation", None)
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                parent_model = annotation
            else:
                parent_model = None
                break
        close = difflib.get_close_matches(loc[-1], list(parent_model.model_fields), n=1) if parent_model else []
        hint = f"; did you mean {'.'.join(loc[:-1] + [close[0]])!r}?" if close else ""
        return ConfigError(key, f"unknown key{hint}")
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = first.get("input")
    secret = any("token" in part for part in loc)  # a mistyped token is still a token: never echoed
    if first["type"] not in ("value_error",) and not isinstance(got, (dict, list)) and not secret:
        message = f"{message} (got {got!r})"
    elif first["type"] == "string_type" and isinstance(got, (dict, list)):
        # An unquoted value with ": " or a leading "[" or "-" (an IPv6 host "::", "[a]") reads as YAML structure.
        read_as = "a mapping" if isinstance(got, dict) else "a list"
        message = f"{message}; YAML read {read_as} there: quote the value ({key}: '...')"
    return ConfigError(key, message)


def _is_union_member_tag(part: str) -> bool:
    return part in ("float", "int", "bool", "str") or part.startswith(("literal[", "function-"))


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``3e-4`` (no dot) is a string; read it as the float users mean (YAML 1.2).
    A key given twice in one mapping is an error: YAML keeps the last silently, losing the first's settings."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


#: The floats :class:`_YamlLoader` reads: YAML 1.1's and those with an exponent but no dot (YAML 1.2).
_YAML12_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X)
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


class _YamlDumper(yaml.SafeDumper):
    """Quotes the strings :class:`_YamlLoader` would read as floats: ``name: 1e3`` (a string) was written plain,
    and ``check-config``'s output or a run's logged config loaded back as a float, refused."""


_YamlDumper.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def _refuse_base_60(text: str, node: yaml.ScalarNode) -> None:
    if ":" in text:
        raise yaml.constructor.ConstructorError(None, None, f"{_quoted_if_short(text)} is a base-60 number in YAML "
                                                "1.1 (1:30 is 90); "
                                                "write the number itself, or quote it if it is text", node.start_mark)


#: The most digits an integer may have: a longer one overflowed the float arithmetic of the checks with a traceback
#: instead of the key's message (a float reaches about 1.8e308); shorter ones get each key's own bounds.
_MAX_INTEGER_DIGITS = 300


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """Integers as YAML 1.2 reads them: YAML 1.1 (PyYAML) read ``train.epochs=010`` as octal 8 and ``1:30`` as
    base-60 90, without a word."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    _refuse_base_60(text, node)
    digits = text.lstrip("+-")
    try:
        value = int(text, 0) if digits[:2].lower() in ("0x", "0o", "0b") else int(text, 10)  # (010 is 10)
    except ValueError:  # YAML 1.1 resolves `0x_` as an integer, leaving no digits; over 4,300 digits Python refuses
        raise yaml.constructor.ConstructorError(None, None, f"{_quoted_if_short(text)} is not a readable integer",
                                                node.start_mark) from None
    if abs(value) >= 10**_MAX_INTEGER_DIGITS:
        raise yaml.constructor.ConstructorError(None, None, f"{_quoted_if_short(text)} is too large an integer (more "
                                                f"than {_MAX_INTEGER_DIGITS} decimal digits)", node.start_mark)
    return value


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    """Floats as YAML 1.2 reads them: YAML 1.1 read ``train.lr=1:30.5`` as base-60 90.5."""
    _refuse_base_60(str(loader.construct_scalar(node)), node)
    return loader.construct_yaml_float(node)


def _quoted_if_short(text: str, limit: int = 40) -> str:
    """``text`` quoted, as YAML errors mask the quoted values they print (one without spaces or quotes); a longer
    one, or one the masking would not match (``!!int "my secret token"``), not at all: a secret all the same."""
    if len(text) <= limit and not re.search(r"[\s'\"]", text):
        return f"'{text}'"
    return f"a value of {len(text):,} characters"


_YamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_YamlLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except TypeError as err:  # a list or mapping as a key (`? [epochs]`): PyYAML's own error is a TypeError
        raise yaml.constructor.ConstructorError(None, None, f"a key must be a plain value ({err})") from None


#: Keys whose values are never echoed in an error (a bearer token; a database URI may hold a password).
SECRET_KEYS = frozenset({"serve.auth_token", "tracking.uri"})


def _is_secret_key(key: str) -> bool:
    """Whether the value at ``key`` (or under it) may hold a secret, so errors name the key only."""
    return "token" in key or any(secret == key or secret.startswith(f"{key}.") for secret in SECRET_KEYS)


def yaml_error_line(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line, without the text it quotes (the line at fault may hold a token or a password:
    ``auth_token: @x`` is not valid YAML)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return type(err).__name__
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(err, "context", None)
    text = f"{context + ': ' if context else ''}{problem}{where}"
    # Without what it quotes of a value ("the tag '!Zx9...'" is the token); a key given twice is named, and so
    # are a character ('\t') and PyYAML's token names ('<block end>').
    if problem.startswith("duplicate key"):
        return text
    return re.sub(r"'(?!<)[^'\s]{3,}'", "'...'", text)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(text, "overrides look like key=value, e.g. train.epochs=5")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(key or "--set", f"malformed key {key!r} in {text.partition('=')[0]!r}=...: write "
                                          "section.key=value")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        if _is_secret_key(key):  # PyYAML quotes the text
            raise ConfigError(key, "the value is not valid YAML (not shown: it is a secret); put it in quotes, "
                                   f"--set '{key}=\"...\"'") from None
        raise ConfigError(key, f"value {raw!r} is not valid YAML: {yaml_error_line(err)}") from None
    text_given = raw.strip()
    if (isinstance(value, str) and value != text_given and text_given[:1] not in "\"'"
            and re.search(r"\s#", text_given)):
        # YAML reads " #" as a comment's start: `data.root=/data/run #2` set /data/run without a word.
        raise ConfigError(key, "the value holds ' #', which YAML reads as the start of a comment (the rest would be "
                               f"dropped); put it in quotes: --set '{key}=\"...\"'")
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``key=value`` pairs (dotted keys, YAML values) into a nested dict."""
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is not None and not isinstance(child, dict):
                raise ConfigError(".".join(path), f"{part!r} is not a section")
            # A copy: a YAML alias (``vgg11_bn: *slow``) is one dict under two keys, and the override is this
            # key's alone (it changed both models' settings).
            child = node[part] = dict(child or {})
            node = child
        node[path[-1]] = value
    return data


def _bundled_presets() -> list[str]:
    return sorted(entry.name for entry in resources.files("pipelines.configs").iterdir()
                  if entry.name.endswith(".yaml"))


def _bundled_preset(name: str) -> str | None:
    """The bundled preset file ``name`` names (``fashion-mnist`` or ``fashion-mnist.yaml``, no directory), or None."""
    if os.sep in name or "/" in name:
        return None
    wanted = name if name.endswith(".yaml") else f"{name}.yaml"
    return wanted if wanted in _bundled_presets() else None


def _is_file(path: str | os.PathLike, *, guessed: bool = False) -> bool:
    """Whether ``path`` is a file (ConfigError on ``--config`` where it cannot be looked at); ``guessed``: a name
    this code made up (``mine`` + ``.yaml``), which is no file where the suffix makes it too long."""
    with _looking_at("--config", path):
        try:
            return Path(path).is_file()
        except OSError as err:
            if guessed and err.errno == errno.ENAMETOOLONG:
                return False
            raise


def read_yaml(path: str | os.PathLike | None) -> dict:
    """The raw YAML mapping of ``path``, or of the embedded default config when ``path`` is None."""
    if path is None:
        text = resources.files("pipelines.configs").joinpath(DEFAULT_CONFIG).read_text()
        source = f"embedded {DEFAULT_CONFIG}"
    elif not _is_file(path) and _is_file(f"{path}.yaml", guessed=True):  # `--config mine` for ./mine.yaml
        return read_yaml(f"{path}.yaml")
    elif not _is_file(path) and (preset := _bundled_preset(str(path))) is not None:
        # A preset by its name (`--config fashion-mnist`), wherever the command runs: an installed package's
        # presets are not under the working directory.
        text, source = resources.files("pipelines.configs").joinpath(preset).read_text(), f"bundled {preset}"
    else:
        p = Path(path)
        if not p.is_file():
            presets = ", ".join(name.removesuffix(".yaml") for name in _bundled_presets())
            raise ConfigError("--config", f"file {str(path)!r} not found (the bundled presets go by their names: "
                                          f"{presets})")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as err:  # unreadable, or not a text file (--config model.pt)
            raise ConfigError("--config", f"cannot read {str(path)!r} as a YAML file: {err}") from None
        source = str(path)
    try:
        data = _load_yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError("--config", f"{source} is not valid YAML: {yaml_error_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{source} must hold a mapping of sections")
    return _empty_sections_as_defaults(data)


def _empty_sections_as_defaults(data: dict) -> dict:
    """A section whose keys are all commented out (``ray:`` then ``#  address: auto``), or set empty (``--set
    ray=``), reads as None: its defaults."""
    sections = {name for name, f in PipelineConfig.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    return {key: {} if value is None and key in sections else value for key, value in data.items()}


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SHELL_REFERENCE = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*")
#: Keys holding paths, where a shell-style ``$NAME`` is surely meant as a variable.
_PATH_KEYS = frozenset({"workdir", "storage_path", "data.root"})


def _holds_paths(key: str, value: str) -> bool:
    """Whether ``key``'s value is a path (and a shell-style ``$NAME`` in it surely a variable): the path keys,
    ``serve.checkpoints`` files, a sqlite ``tracking.uri`` (other URIs may hold a password with a ``$``)."""
    return (key in _PATH_KEYS or key.startswith("serve.checkpoints.")
            or (key == "tracking.uri" and value.startswith("sqlite:")))


def expand_env(data: Any, key: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in string values with environment variables, so one
    preset serves every cluster (``storage_path: ${CNNZOO_STORAGE_PATH}``)."""
    if isinstance(data, dict):
        return {k: expand_env(v, f"{key}.{k}" if key else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, key) for v in data]
    if isinstance(data, str) and _holds_paths(key, data) and (shell := _SHELL_REFERENCE.search(
            _ENV_REFERENCE.sub(lambda m: m.group(2) or "", data))):  # (a ${VAR:-default}'s default too)
        # The shell's $HOME is not expanded here: outputs went to a folder literally named "$HOME".
        raise ConfigError(key, f"{shell.group(0)} is not expanded in a config; write ${{{shell.group(0)[1:]}}}")
    if not isinstance(data, str) or "${" not in data:
        return data
    if "${" in _ENV_REFERENCE.sub("", data):
        # ${STORE:/mnt/x} (no "-"), ${STORE-/mnt/x}: left as text, Ray's storage went to a folder named "${STORE:".
        shown = "" if _is_secret_key(key) else f" in {data!r}"
        raise ConfigError(key, f"a malformed environment reference{shown}: write ${{VAR}} or ${{VAR:-default}}")

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if default is not None and not value:  # the shell's `:-`: unset or empty
            return default
        if not value:  # empty as well: cifar10-gpu's storage_path went to node-local disk, failing once Ray ran
            shown = "" if _is_secret_key(key) else f" (the value is {data!r})"
            state = "is not set" if value is None else "is set but empty"
            raise ConfigError(key, f"environment variable {name} {state}{shown}; write ${{{name}:-default}} for "
                                   "a fallback")
        return value

    return _ENV_REFERENCE.sub(substitute, data)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load, override and validate a pipeline config; raises :class:`ConfigError` naming the bad key.

    ``${VAR}`` references in values are replaced by environment variables first.
    """
    try:
        data = expand_env(_empty_sections_as_defaults(apply_overrides(read_yaml(path), overrides or [])))
    except RecursionError:  # (&x [resnet18, *x]: a list that holds itself)
        raise ConfigError("config", "a YAML alias refers to the value it is in (&x [..., *x]), in the --config "
                                    "file or a --set value") from None
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise _format_validation_error(err) from None
    _semantic_checks(cfg)
    return cfg


def config_reference() -> str:
    """Every config key with its type, default and description, as a Markdown table (docs/configuration.md)."""
    from typing import get_args, get_origin

    def type_name(annotation) -> str:
        origin = get_origin(annotation)
        if origin is Literal:
            return " \\| ".join(repr(a) for a in get_args(annotation))
        if origin is Union:
            return " \\| ".join(type_name(a) for a in get_args(annotation))
        if annotation is type(None):
            return "null"
        if origin is not None:
            return str(annotation).replace("typing.", "")
        return getattr(annotation, "__name__", str(annotation))

    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    defaults = PipelineConfig().model_dump(mode="json")

    def walk(model: type[BaseModel], prefix: str, values: dict) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.", values[name])
                continue
            default = values[name]
            default_text = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
            default_text = default_text.removesuffix("\n...").strip()
            description = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{prefix}{name}` | {type_name(annotation)} | `{default_text}` | {description} |")

    walk(PipelineConfig, "", defaults)
    return "\n".join(lines) + "\n"
