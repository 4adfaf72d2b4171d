"""The models a server (or the report) can load: discovered, verified, loaded and batch-norm folded.

Models come from the pipeline's MLflow registry (through :class:`~pipelines.tracking.Tracker`: aliases =
model names, plus ``champion``; only versions trained on the config's data set) or from checkpoint files
(``serve.checkpoints``). A registered version's checkpoint, and nothing else of it, is downloaded once into
``<workdir>/<name>/serve/model-cache/`` (keyed by version). Every load goes through
:func:`~pipelines.checkpoints.load_checkpoint` (``weights_only``, verified against its architecture), so a
corrupt or tampered file is refused before a model is handed out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import cnnmodels

from .checkpoints import (
    CheckpointError,
    MissingCheckpointError,
    ModelCheckpoint,
    load_checkpoint,
    storage_can_pass,
)
from .config import CHAMPION, PipelineConfig, redact_text
from .preprocess import DecodeBudget, PreprocessSpec, is_out_of_memory
from .tracking import TAG_DATASET, TAG_FINGERPRINT, TAG_TEST_SPLIT, Tracker, choose_champion, is_unreachable

__all__ = ["ServedModel", "LoadedModel", "ModelStore", "fold_batchnorm", "trace_for_serving", "prepare_for_serving",
           "is_transient_load_error"]

logger = logging.getLogger(__name__)

#: Downloaded checkpoints of versions the app does not serve are deleted once unused this long (seconds; a
#: replica touches a version's folder whenever it takes the checkpoint from there).
CACHE_KEEP_S = 7 * 24 * 3600.0


def inference_params(model: nn.Module, spec: PreprocessSpec) -> int:
    """The parameters a served model computes with (GoogLeNet's training-only heads left out), as the registry's
    ``params_count`` tag counts them; profiled at a small input, since the count does not depend on its size
    and a full-size pass of EfficientNet-B7 costs seconds of a replica's CPU."""
    side = min(spec.image_size, max(getattr(model, "min_input_size", 32), 64))
    return cnnmodels.profile(model, (spec.channels, side, side)).inference_params


def is_transient_load_error(err: BaseException) -> bool:
    """Whether loading a model failed for a reason that can pass: memory, the storage holding the file (an
    NFS mount's EIO), or the registry or its artifact store unreachable or overloaded. A corrupt or missing
    checkpoint, one this process may not read, a model that cannot be built, or a version MLflow no longer has
    (deleted in its UI: RESOURCE_DOES_NOT_EXIST) stays failed."""
    return storage_can_pass(err) or is_out_of_memory(err) or is_unreachable(err)


@dataclass
class ServedModel:
    """What the server knows about one alias before loading it."""

    alias: str
    source: str  # "models:/<name>/<version>" or a checkpoint path
    version: str = ""
    arch: str = ""
    model_name: str = ""
    dataset: str = ""  # what it was trained on (its class names come from there)
    fingerprint: str = ""  # the training run's fingerprint (planning.ModelRun.fingerprint)
    test_split: str = ""  # which test images its test_acc is of (data.DatasetInfo.test_split; "": not said)
    test_acc: float | None = None
    val_acc: float | None = None  # its best validation accuracy: breaks test_acc ties as the registry does
    params_count: int | None = None
    macs: int | None = None
    input_size: int | None = None  # the model's input side in pixels (registry versions: its tag)
    cache_key: str = ""  # its checkpoint's key in the download cache (registry versions)
    status: str = "unchecked"  # then "ok", or "error" (for good); still "unchecked" after a passing failure
    error: str | None = None

    def mark_failed(self, err: BaseException) -> None:
        """Record that this model cannot be loaded: ``/models`` and ``/healthz`` report it, requests get 503."""
        # Shown to HTTP clients: MLflow's errors quote the URL they requested, a password with it.
        self.status, self.error = "error", redact_text(f"{type(err).__name__}: {err}")
        logger.error("model %s failed to load: %s", self.alias, self.error)


@dataclass
class LoadedModel:
    alias: str
    version: str
    model: nn.Module
    spec: PreprocessSpec
    folded: bool
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    traced: bool = False  # a TorchScript trace: its forward runs without holding the GIL
    arch: str = ""  # the checkpoint's architecture name
    metrics: dict[str, float] = field(default_factory=dict)  # the checkpoint's metrics (its epoch's val_acc, ...)
    params_count: int | None = None  # the model's, before batch norm was folded into its convolutions


def _probe(spec: PreprocessSpec, batch: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, *spec.input_shape, generator=torch.Generator().manual_seed(0)).to(device)


def _disagreement(reference: nn.Module, candidate: nn.Module, probe: torch.Tensor) -> float | None:
    """None when ``candidate`` gives ``reference``'s outputs on ``probe`` (to float tolerance), else the
    largest difference (infinite where ``candidate`` fails on it: the reference is then served instead)."""
    with torch.inference_mode():
        expected = reference(probe)
        try:
            actual = candidate(probe)
        except Exception as err:  # noqa: BLE001 - e.g. a trace that kept its probe's batch size as a constant
            logger.info("the transformed model fails on a batch of %d: %s", probe.shape[0], err)
            return float("inf")
    if actual.shape != expected.shape:
        return float("inf")
    tolerance = 1e-4 * max(1.0, expected.abs().max().item())
    if torch.allclose(actual, expected, atol=tolerance, rtol=1e-4):
        return None
    return (actual - expected).abs().max().item()


def _trace_in_this_thread(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, leaving other threads' module calls alone.

    torch.fx's tracer patches ``nn.Module.__call__`` and ``__getattr__`` process-wide while it traces: a
    replica folding a model it had just loaded failed every forward its other threads ran meanwhile (the
    requests for its other models) with "module is not installed as a submodule".
    """
    import torch.fx as fx

    class ThisThreadTracer(fx.Tracer):
        def __init__(self) -> None:
            super().__init__()
            self.thread = threading.get_ident()

        def call_module(self, m, forward, args, kwargs):
            if threading.get_ident() != self.thread:
                return forward(*args, **kwargs)  # the module's own call, untraced
            return super().call_module(m, forward, args, kwargs)

        def getattr(self, attr, attr_val, parameter_proxy_cache):
            if threading.get_ident() != self.thread:
                return attr_val
            return super().getattr(attr, attr_val, parameter_proxy_cache)

    tracer = ThisThreadTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def fold_batchnorm(model: nn.Module, spec: PreprocessSpec) -> tuple[nn.Module, bool]:
    """Fold eval-mode batch norm into the preceding convolutions (torch.fx conv-BN fusion).

    The folded model is used only if its outputs match the original's on a random batch; otherwise (or if
    the model cannot be traced) the original is returned. Returns ``(model, folded)``.
    """
    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    try:
        # (fuse copies the traced module: the model handed in is left as it is)
        with _FOLDING_AND_TRACING:  # two tracers at once would route one's module calls through the other's patch
            folded = fuse(_trace_in_this_thread(model), inplace=False, no_trace=True)
    except Exception as err:  # noqa: BLE001 - untraceable models are served unfolded
        logger.info("batch-norm folding skipped: %s", err)
        return model, False
    difference = _disagreement(model, folded, _probe(spec, 2, torch.device("cpu")))
    if difference is not None:
        logger.warning("batch-norm folding changed the outputs (max diff %.2e); serving unfolded", difference)
        return model, False
    return folded, True


def trace_for_serving(model: nn.Module, spec: PreprocessSpec) -> tuple[nn.Module, bool]:
    """A TorchScript trace of ``model``, used only if it matches the model on another batch size.

    Why: TorchScript runs the whole forward without holding the GIL, so a server can run it in a worker
    thread while its event loop keeps handling requests; an eager model re-takes the GIL at every layer and
    waits behind request handling each time. Returns ``(model, traced)``.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        # (the warning filters are the process's: set and put back under the lock, or two traces at once undid
        # each other's)
        with _FOLDING_AND_TRACING, warnings.catch_warnings(), torch.no_grad():
            # cnnmodels' input-size check reads the shape as a Python bool: constant for a fixed input size.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # torch.jit.trace is deprecated for torch.compile/torch.export, whose CPU models run Python (and
            # take the GIL) between kernels. Until TorchScript goes, it is the one GIL-free forward; once it
            # is gone, this raises and models are served eagerly (serve.trace_models: false does that now).
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model.eval(), _probe(spec, 2, device), check_trace=False)
    except Exception as err:  # noqa: BLE001 - untraceable models are served eagerly
        logger.info("tracing skipped: %s", err)
        return model, False
    difference = _disagreement(model, traced, _probe(spec, 3, device))
    if difference is not None:
        logger.warning("the traced model's outputs differ (max diff %.2e); serving it eagerly", difference)
        return model, False
    return traced, True


def replica_threads(serve) -> int:
    """The torch threads of a replica with ``serve.num_cpus`` CPUs (at least one)."""
    return max(1, int(round(serve.num_cpus)))


#: Held while a model is traced (torch.fx for the batch-norm folding, TorchScript): torch.fx's symbolic tracing
#: patches torch's module calls process-wide while it runs, and two tracers at once undo each other's patches (a
#: replica loads two models at once: "module is not installed as a submodule"). The forwards that check each step
#: run outside it: a large model's dozen of them held up every other model's load for seconds.
_FOLDING_AND_TRACING = threading.RLock()


def prepare_for_serving(model: nn.Module, spec: PreprocessSpec, *, fold: bool = True, trace: bool = False,
                        device: str | torch.device = "cpu") -> LoadedModel:
    """``model`` as a server runs it: eval mode, batch norm folded, on ``device``, traced (each step
    verified against the model's own outputs). Alias and version are left empty."""
    model, folded = fold_batchnorm(model, spec) if fold else (model.eval(), False)
    device = torch.device(device)
    model, traced = trace_for_serving(model.to(device), spec) if trace else (model.to(device), False)
    return LoadedModel(alias="", version="", model=model.eval(), spec=spec, folded=folded, device=device,
                       traced=traced)


def _number(tags: dict, key: str, kind=float):
    """A numeric tag, or None where it is missing, not a number or not finite (a NaN edited in by hand made
    ``/models`` answer 500: JSON has no NaN)."""
    try:
        value = float(tags[key]) if key in tags else None
    except (TypeError, ValueError):
        return None
    return kind(value) if value is not None and math.isfinite(value) else None


class ModelStore:
    """Where one config's served models come from, and how they are loaded."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.tracker = Tracker.for_config(cfg)
        self.verified_files: dict[str, Path] = {}  # alias -> the checkpoint file verify() loaded
        # alias -> its preprocessing, from its last load (at verification): requests are checked and decoded with it
        # before their model is loaded
        self.specs: dict[str, PreprocessSpec] = {}

    def discover(self) -> tuple[list[ServedModel], str | None]:
        """The aliases to serve and the champion's alias, from ``serve.checkpoints`` or the registry."""
        wanted = set(self.cfg.serve.models)
        if self.cfg.serve.checkpoints:
            models = [ServedModel(alias=a, source=str(Path(p).expanduser()))
                      for a, p in self.cfg.serve.checkpoints.items()]
            return [m for m in models if not wanted or m.alias in wanted], None
        # Only versions trained on this config's data set: another data set's aliases under the same name
        # would answer with that data set's class names.
        versions, champion = self.tracker.registered_versions(self.cfg.registered_model_name)
        if CHAMPION in wanted:  # serve.models: [champion] means the version the alias points at
            wanted = (wanted - {CHAMPION}) | {champion or CHAMPION}  # none: matches no alias
        models = [
            ServedModel(alias=v.alias, source=v.uri, version=v.version, arch=v.tags.get("arch", ""),
                        model_name=v.tags.get("model_name", v.alias), dataset=v.tags.get(TAG_DATASET, ""),
                        fingerprint=v.tags.get(TAG_FINGERPRINT, ""), test_split=v.tags.get(TAG_TEST_SPLIT, ""),
                        test_acc=_number(v.tags, "test_acc"),
                        val_acc=_number(v.tags, "best_val_acc"), params_count=_number(v.tags, "params_count", int),
                        macs=_number(v.tags, "macs", int),
                        input_size=_number(v.tags, "input_size", int), cache_key=v.cache_key)
            for v in versions if not wanted or v.alias in wanted
        ]
        return models, champion if any(m.alias == champion for m in models) else None

    @property
    def cache_dir(self) -> Path:
        """Where registered checkpoints are downloaded to, one directory per version."""
        return self.cfg.paths.serve_dir / "model-cache"

    def prune_cache(self, models: list[ServedModel], keep_s: float = CACHE_KEEP_S) -> list[str]:
        """Delete the downloaded checkpoints of this registered model's versions that none of ``models`` is, unused
        for ``keep_s`` (every training left its old versions on every serving node for good); returns the deleted
        folders' names. Housekeeping: a folder it cannot read or delete is left, with a warning, never an error."""
        folder = self.cache_dir / self.cfg.registered_model_name
        served = {f"v{m.version}-" for m in models if m.source.startswith("models:/") and m.version}
        cutoff = time.time() - keep_s
        removed = []
        try:
            entries = sorted(folder.iterdir()) if folder.is_dir() else []
            for entry in entries:
                if not entry.is_dir() or not entry.name.startswith("v") or any(map(entry.name.startswith, served)):
                    continue
                try:
                    if entry.stat().st_mtime > cutoff:
                        continue
                except FileNotFoundError:  # another replica of the node pruned it meanwhile
                    continue
                shutil.rmtree(entry, ignore_errors=True)
                if not entry.exists():
                    removed.append(entry.name)
        except OSError as err:  # (permissions, a read-only mount)
            logger.warning("could not prune the download cache %s: %s", folder, err)
        if removed:
            logger.info("deleted %d downloaded checkpoint(s) of versions not served, unused for %.0f days, from %s",
                        len(removed), keep_s / 86400, folder)
        return removed

    def checkpoint_file(self, served: ServedModel) -> Path:
        """The checkpoint of ``served``: downloaded into the cache (registry), or the file itself."""
        if served.source.startswith("models:/"):
            # The file verify() downloaded: a model loaded again (evicted from the LRU, or not the champion)
            # must not need the registry, which may be down by then.
            verified = self.verified_files.get(served.alias)
            if verified is None or not verified.is_file():
                verified = self.tracker.download_checkpoint(self.cfg.registered_model_name, served.version,
                                                            self.cache_dir, served.cache_key)
            with contextlib.suppress(OSError):  # in use: its folder's time says so to prune_cache
                os.utime(verified.parent)
            return verified
        return Path(served.source)

    def load(self, served: ServedModel, *, fold: bool = True, trace: bool = False,
             device: str | torch.device = "cpu", path: Path | None = None) -> LoadedModel:
        """Download (registry) or open (file) the checkpoint (``path``: already at hand), verify it and build
        the serving model (:func:`prepare_for_serving`). A registered checkpoint that loads is kept as verified:
        loading it again (evicted from the LRU) needs no registry, as for one :meth:`verify` checked at start."""
        path = path or self.checkpoint_file(served)
        try:
            checkpoint: ModelCheckpoint = load_checkpoint(path)
        except CheckpointError as err:
            if not (served.source.startswith("models:/") and path.is_relative_to(self.cache_dir)):
                raise
            # The downloaded copy is damaged (a disk fault, a hand edit): it would stay so in every replica on this
            # node and after every restart. Fetched again once; the registry's own copy decides. Gone (another
            # replica on the node is fetching it again, or the cache was cleared): fetched again too. Only the
            # file goes: the version's folder holds other replicas' downloads in progress.
            if not isinstance(err, MissingCheckpointError):
                logger.warning("model %s: its downloaded checkpoint %s is damaged; downloading it again",
                               served.alias, path)
                path.unlink(missing_ok=True)
            self.verified_files.pop(served.alias, None)
            path = self.checkpoint_file(served)
            checkpoint = load_checkpoint(path)
        self._refuse_unservable_input(checkpoint.spec)
        model = checkpoint.build_model()
        params_count = inference_params(model, checkpoint.spec)  # before batch norm is folded away
        loaded = prepare_for_serving(model, checkpoint.spec, fold=fold, trace=trace, device=device)
        # A checkpoint file's version is the epoch it holds now (replaced while served, it is another one)
        from_registry = served.source.startswith("models:/")
        loaded.alias = served.alias
        loaded.version = served.version if from_registry and served.version else f"epoch{checkpoint.epoch}"
        loaded.arch, loaded.metrics, loaded.params_count = checkpoint.arch, dict(checkpoint.metrics), params_count
        self.specs[served.alias] = checkpoint.spec
        if served.source.startswith("models:/"):
            self.verified_files[served.alias] = path
        return loaded

    def _refuse_unservable_input(self, spec: PreprocessSpec) -> None:
        """A model whose own input is over ``serve.max_resized_pixels`` would have every request refused (400),
        after its load had run the serving checks at that size (a checkpoint saying 20,000 px: gigabytes)."""
        limit = self.cfg.serve.max_resized_pixels
        if not DecodeBudget.for_serving(self.cfg.serve).admits_model_input(spec.image_size):
            raise CheckpointError(f"its input is {spec.image_size}x{spec.image_size} pixels, above "
                                  f"serve.max_resized_pixels ({limit:,}), so every request would be refused; raise "
                                  "serve.max_resized_pixels to serve it")

    def verify(self, models: list[ServedModel]) -> None:
        """Load every model once (unfolded); failures are recorded on the model, not raised. One that can pass
        (:func:`is_transient_load_error`: the registry or its artifact store unreachable) leaves the model
        ``unchecked``, to be verified again, rather than failed for good."""
        for served in models:
            try:
                path = self.checkpoint_file(served)
                loaded = self.load(served, fold=False, path=path)
                served.status, served.error = "ok", None
                self.describe(served, loaded)
            except Exception as err:  # noqa: BLE001 - any failure makes the model unservable, not the server
                if not is_transient_load_error(err):
                    served.mark_failed(err)
                    continue
                served.status, served.error = "unchecked", redact_text(f"not verified yet: {type(err).__name__}: {err}")
                logger.warning("model %s could not be verified now (tried again later): %s", served.alias,
                               served.error)

    @staticmethod
    def describe(served: ServedModel, loaded: LoadedModel) -> None:
        """Fill in what ``served`` does not know yet from its loaded checkpoint: a checkpoint file
        (``serve.checkpoints``) has no registry tags, so its architecture, data set, input size, validation
        accuracy and parameter count are what the file itself says."""
        if not served.source.startswith("models:/"):  # a file's "epochN", as /predict answers with
            served.version = loaded.version
        served.arch = served.arch or loaded.arch
        served.dataset = served.dataset or loaded.spec.dataset
        served.input_size = served.input_size or loaded.spec.image_size
        if served.val_acc is None:  # (finite only, as tags are: an inf in a hand-made file made /models a 500)
            served.val_acc = _number(loaded.metrics, "val_acc")
        if served.params_count is None and loaded.params_count is not None:
            served.params_count = loaded.params_count

    @staticmethod
    def servable_champion(models: list[ServedModel], champion: str | None) -> str | None:
        """``champion`` if it loaded, else the loaded model the registry would choose: the best ``test_acc`` among
        those tested on the champion's test images, ties broken by validation accuracy
        (:func:`pipelines.tracking.choose_champion`); checkpoint files, which carry no test accuracy, by their
        validation accuracy."""
        ok = [m for m in models if m.status == "ok"]
        if champion in {m.alias for m in ok}:
            return champion
        # As the registry: among the models tested on the champion's test images (or that do not say on which);
        # none of them loaded, the best of the others rather than no default model at all (a 503 for every
        # request without one, while models served).
        if champion_split := next((m.test_split for m in models if m.alias == champion), ""):
            ok = [m for m in ok if m.test_split in ("", champion_split)] or ok
        if all(m.test_acc is None for m in ok):  # checkpoint files: their own validation accuracy ranks them
            return choose_champion({m.alias: m.val_acc for m in ok}, allow_unscored=True)
        return choose_champion({m.alias: m.test_acc for m in ok}, tiebreak={m.alias: m.val_acc for m in ok},
                               allow_unscored=True)
