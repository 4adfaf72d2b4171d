"""Training: one Ray Train ``TorchTrainer`` per model, DDP across workers, checkpointed and resumable.

The pieces, from the inside out:

* :func:`train_loop_per_worker` runs on every Train worker: data, model (``prepare_model`` wraps it in
  DDP), optimizer and schedule from the config, GoogLeNet's auxiliary loss, AMP and channels-last on GPU.
  Each epoch it reports ``train_loss``, ``val_loss``, ``val_acc`` and ``train_images_per_sec`` with a
  checkpoint from rank 0; after the last epoch it evaluates the best checkpoint (by ``val_acc``) on the
  test split and reports ``test_acc``.
* :func:`build_trainer` makes the ``TorchTrainer`` for one :class:`ModelRun`: a stable run name under
  ``storage_path`` (so a re-run resumes instead of starting over), ``FailureConfig(max_failures)`` (a
  lost worker is replaced and training continues from the last checkpoint) and a ``CheckpointConfig``
  keeping the best checkpoints by ``val_acc``.
* :func:`model_trial` is a Ray Tune function trainable that drives one ``TorchTrainer``, as Ray's docs
  recommend for Train V2. :func:`run_model_trials` runs many of them, as many at a time as the cluster
  fits; the training stage (every model) and the search stage (every coefficient triple) both use it.
* :func:`train_stage` trains every model of the config, logs them to MLflow, registers the best
  checkpoints and prints a comparison table.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import cnnmodels

from .checkpoints import CHECKPOINT_FILE, ModelCheckpoint, load_checkpoint, save_checkpoint
from .config import DataConfig, PipelineConfig, train_config_for
from .data import DatasetInfo, SplitDataset, load_splits, make_spec
from .preprocess import PreprocessSpec
from .results import ModelResult, comparison_table, load_results

__all__ = [
    "ModelRun",
    "ModelChoice",
    "TrainStageResult",
    "resolve_models",
    "plan_model_runs",
    "train_loop_per_worker",
    "build_trainer",
    "model_trial",
    "run_model_trials",
    "train_stage",
]

#: Resources of a Tune trial's own actor (the Train driver); its workers reserve their own.
TRIAL_DRIVER_RESOURCES = {"CPU": 0.01}


# --------------------------------------------------------------------------------------------------
# What to train
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model list: a display/registry name, the cnnmodels architecture and its options."""

    name: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def family_member_name(phi: float) -> str:
    """``efficientnet_phi1``, ``efficientnet_phi0p5``: the searched family's model (and registry alias) names."""
    return f"efficientnet_phi{phi:g}".replace(".", "p")


def resolve_models(cfg: PipelineConfig, coefficients: dict[str, float] | None = None) -> list[ModelChoice]:
    """``train.models`` plus, when coefficients were found, the EfficientNet family at ``search.phis``."""
    small = _small_input(cfg)
    choices = []
    for name in cfg.train.models:
        options = dict(cfg.train.model_options.get(name, {}))
        arch = "efficientnet" if name.startswith("efficientnet_phi") else name
        if arch == "efficientnet" and name.startswith("efficientnet_phi"):
            options.setdefault("phi", float(name[len("efficientnet_phi"):].replace("p", ".")))
        if arch != "lenet5" and "small_input" in cnnmodels.model_options(arch):
            options.setdefault("small_input", small)
        if arch == "efficientnet":
            options.setdefault("base_resolution", cfg.data.image_size)
        choices.append(ModelChoice(name, arch, options))
    if coefficients is not None:
        known = {c.name for c in choices}
        for phi in cfg.search.phis:
            name = family_member_name(phi)
            if name in known:
                continue
            choices.append(ModelChoice(name, "efficientnet", {
                "phi": float(phi), "alpha": coefficients["alpha"], "beta": coefficients["beta"],
                "gamma": coefficients["gamma"], "base_resolution": cfg.data.image_size, "small_input": small,
            }))
    return choices


def _small_input(cfg: PipelineConfig) -> bool:
    if cfg.train.small_input == "auto":
        return cfg.data.image_size <= 64
    return bool(cfg.train.small_input)


def input_size_for(model: torch.nn.Module, arch: str, image_size: int) -> int:
    """The side the model is trained and served at: EfficientNet's own (compound-scaled) resolution,
    otherwise the data's image size, raised to the model's minimum where needed (LeNet-5: 32)."""
    if arch == "efficientnet" or (arch.startswith("efficientnet_b") and not getattr(model, "min_input_size", 32) < 32):
        return int(model.default_input_size[-1])
    return max(image_size, int(getattr(model, "min_input_size", image_size)))


@dataclass
class ModelRun:
    """Everything one training run needs; JSON-serialisable so it travels to Tune trials and workers."""

    model_name: str
    arch: str
    model_kwargs: dict[str, Any]
    run_name: str
    stage: str
    data: dict[str, Any]
    spec: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    weight_decay: float
    schedule: str
    warmup_epochs: float
    label_smoothing: float
    precise_bn_batches: int
    aux_loss_weight: float
    augment: bool
    seed: int
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    placement_strategy: str
    amp: bool
    channels_last: bool
    loader_workers: int
    storage_path: str
    max_failures: int
    checkpoints_to_keep: int
    simulate_failure_at_epoch: int | None
    evaluate_test: bool
    params_count: int = 0
    macs: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> ModelRun:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def input_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def threads_per_worker(self) -> int:
        return max(1, int(round(self.cpus_per_worker)))

    def with_coefficients(self, alpha: float, beta: float, gamma: float) -> ModelRun:
        """This (search-template) run with other compound-scaling coefficients, named after them."""
        name = coefficients_label(alpha, beta, gamma)
        kwargs = dict(self.model_kwargs, alpha=float(alpha), beta=float(beta), gamma=float(gamma))
        model = cnnmodels.create_model(self.arch, num_classes=len(self.spec["class_names"]),
                                       in_chans=self.spec["channels"], **kwargs)
        spec = dict(self.spec, image_size=input_size_for(model, self.arch, self.spec["image_size"]))
        prof = cnnmodels.profile(model, (spec["channels"], spec["image_size"], spec["image_size"]))
        return replace(self, model_kwargs=kwargs, model_name=name, run_name=f"{self.run_name}-{name}", spec=spec,
                       params_count=prof.params, macs=prof.macs)


def coefficients_label(alpha: float, beta: float, gamma: float) -> str:
    """``a1.2_b1.1_g1.15``: how search trials are named in Ray, MLflow and the results."""
    return f"a{alpha:g}_b{beta:g}_g{gamma:g}"


def auto_cpus_per_worker(cfg: PipelineConfig, cluster_cpus: float) -> float:
    """CPUs each Train worker reserves: explicit, or (GPU) one per worker, or (CPU) the machine divided
    among the workers of one model, leaving a sliver for the Tune trial actors."""
    if cfg.train.cpus_per_worker != "auto":
        return float(cfg.train.cpus_per_worker)
    if cfg.train.use_gpu:
        return float(1 + cfg.data.loader_workers)
    share = (cluster_cpus - 0.05) / cfg.train.num_workers
    return max(0.25, math.floor(share * 100) / 100)


def plan_model_runs(
    cfg: PipelineConfig,
    info: DatasetInfo,
    choices: list[ModelChoice],
    *,
    stage: str = "train",
    epochs: int | None = None,
    cluster_cpus: float = 1.0,
) -> list[ModelRun]:
    """One :class:`ModelRun` per model choice: input size, preprocessing spec, profile and hyper-parameters."""
    runs = []
    for choice in choices:
        t = train_config_for(cfg, choice.name)
        model = cnnmodels.create_model(choice.arch, num_classes=len(info.class_names), in_chans=info.channels,
                                       **choice.kwargs)
        size = input_size_for(model, choice.arch, cfg.data.image_size)
        spec = make_spec(info, size)
        prof = cnnmodels.profile(model, spec.input_shape)
        runs.append(ModelRun(
            model_name=choice.name, arch=choice.arch, model_kwargs=dict(choice.kwargs),
            run_name=f"{cfg.name}-{stage}-{choice.name}", stage=stage,
            data=cfg.data.model_dump(mode="json"), spec=spec.to_dict(),
            epochs=epochs or t.epochs, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer, momentum=t.momentum,
            weight_decay=t.weight_decay, schedule=t.schedule, warmup_epochs=t.warmup_epochs,
            label_smoothing=t.label_smoothing, precise_bn_batches=t.precise_bn_batches,
            aux_loss_weight=t.aux_loss_weight, augment=cfg.data.augment,
            seed=t.seed, num_workers=t.num_workers, use_gpu=t.use_gpu,
            cpus_per_worker=auto_cpus_per_worker(cfg, cluster_cpus), placement_strategy=t.placement_strategy,
            amp=t.amp, channels_last=t.channels_last,
            loader_workers=cfg.data.loader_workers, storage_path=cfg.resolved_storage_path,
            max_failures=t.max_failures, checkpoints_to_keep=t.checkpoints_to_keep,
            simulate_failure_at_epoch=t.simulate_failure_at_epoch, evaluate_test=stage == "train",
            params_count=prof.params, macs=prof.macs,
        ))
    return runs


# --------------------------------------------------------------------------------------------------
# The worker loop
# --------------------------------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _lr_at(run: ModelRun, step: int, steps_per_epoch: int) -> float:
    total = max(1, run.epochs * steps_per_epoch)
    warmup = int(run.warmup_epochs * steps_per_epoch)
    if warmup and step < warmup:
        return run.lr * (step + 1) / warmup
    if run.schedule == "constant":
        return run.lr
    progress = (step - warmup) / max(1, total - warmup)
    return run.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _make_optimizer(run: ModelRun, model: torch.nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales (standard practice; decaying them only hurts).
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if run.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=run.lr)
    return torch.optim.SGD(groups, lr=run.lr, momentum=run.momentum, nesterov=run.momentum > 0)


def _shard(dataset, rank: int, world: int):
    # Evaluation shards without the padding a DistributedSampler adds, so global metrics are exact.
    return dataset if world == 1 else Subset(dataset, list(range(rank, len(dataset), world)))


def _all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _recalibrate_batchnorm(model, loader, spec: PreprocessSpec, device, batches: int, amp_dtype,
                           channels_last: bool) -> None:
    """Precise BN: re-estimate every batch norm's running mean/variance with the current weights.

    The running averages trail the weights by about 1 / momentum steps; early in training (and in deep
    stacks such as EfficientNet's ~50 BN layers) that lag makes eval-mode outputs collapse while
    train-mode accuracy is fine. Averaging fresh statistics over a few batches removes the lag. With DDP,
    rank 0's statistics are broadcast to the others with every forward (DDP's ``broadcast_buffers``).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if batches <= 0 or not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
    model.train()
    with torch.no_grad():
        for step, (images, _) in enumerate(loader):
            if step >= batches:
                break
            x = spec.normalize(images.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def _gather_node_ids(world: int) -> list[str]:
    """The Ray node of every rank, in rank order (recorded so users can see where their workers ran)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not torch.distributed.is_initialized():
        return [node]
    nodes: list[str | None] = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def _evaluate(model, loader, spec: PreprocessSpec, device, amp_dtype, channels_last) -> tuple[float, float, int]:
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0
    with torch.inference_mode():
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            x = spec.normalize(images)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            count += labels.numel()
    loss_sum, correct, count = _all_reduce_sums([loss_sum, correct, count], device)
    return loss_sum / max(count, 1), correct / max(count, 1), int(count)


#: Small JSON beside each checkpoint: which model and epoch it holds, readable without loading weights.
CHECKPOINT_META = "meta.json"


def _checkpoint_owner(directory: Path) -> tuple[str, str]:
    meta = directory / CHECKPOINT_META
    if meta.is_file():
        data = json.loads(meta.read_text())
        return data.get("model_name", ""), data.get("arch", "")
    ckpt = load_checkpoint(directory / CHECKPOINT_FILE, verify=False)  # written before meta.json existed
    return ckpt.model_name, ckpt.arch


def _quiet_report_logging() -> None:
    # Ray Train logs every report (with all metrics) through a logger named by its file path, which
    # escapes RunConfig's LoggingConfig; our own progress lines already say the same, once.
    import logging

    import ray.train.v2._internal.execution.context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _kill_this_worker_for_rehearsal(run: ModelRun, epoch: int) -> None:
    import ray.train

    # Reports reach the controller asynchronously; wait until the last checkpoint is committed, as it
    # would be in a real failure some time after the report, so the restart has something to resume.
    ray.train.get_all_reported_checkpoints()
    print(f"[{run.model_name}] simulate_failure_at_epoch={epoch}: killing worker rank 0 now", flush=True)
    os._exit(1)


def _exit_quietly_if_interrupted(training_thread: threading.Thread) -> None:
    """When Ray tears a worker down mid-step (ASHA stopping a search trial, a cancelled run), the
    interpreter's shutdown force-unwinds the still-running training thread through PyTorch's C++ frames,
    which aborts with a page of "Fatal Python error: Aborted" stack dumps. The process is going away either
    way; leaving before that unwinding keeps the console readable. Normal completion is untouched: the
    training thread has ended by then."""

    def leave_if_still_training() -> None:
        if training_thread.is_alive():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    atexit.register(leave_if_still_training)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (see the module docstring)."""
    import ray.train
    from ray.train.torch import get_device, prepare_data_loader, prepare_model

    run = ModelRun.from_dict(config)
    _quiet_report_logging()
    _exit_quietly_if_interrupted(threading.current_thread())
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(run.threads_per_worker)
    torch.manual_seed(run.seed * 1000 + rank)
    device = get_device()
    on_gpu = device.type == "cuda"
    amp_dtype = torch.bfloat16 if on_gpu and run.amp and torch.cuda.is_bf16_supported() else (
        torch.float16 if on_gpu and run.amp else None)
    channels_last = on_gpu and run.channels_last

    spec = PreprocessSpec.from_dict(run.spec)
    splits = load_splits(DataConfig.model_validate(run.data))
    train_set = SplitDataset(splits.train, spec, augment=run.augment)
    per_worker_batch = max(1, run.batch_size // world)
    loader_kwargs = {"num_workers": run.loader_workers, "pin_memory": on_gpu,
                     "persistent_workers": run.loader_workers > 0}
    train_loader = prepare_data_loader(DataLoader(
        train_set, batch_size=per_worker_batch, shuffle=True, drop_last=len(train_set) >= 2 * per_worker_batch * world,
        **loader_kwargs))
    val_loader = prepare_data_loader(DataLoader(
        _shard(SplitDataset(splits.val, spec), rank, world), batch_size=per_worker_batch * 2, **loader_kwargs),
        add_dist_sampler=False)

    model = cnnmodels.create_model(run.arch, num_classes=spec.num_classes, in_chans=spec.channels,
                                   **run.model_kwargs)
    optimizer = _make_optimizer(run, model)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_epoch, history = 0, []
    restored = ray.train.get_checkpoint()
    ckpt = None
    if restored:
        with restored.as_directory() as directory:
            owner = _checkpoint_owner(Path(directory))
            if owner == (run.model_name, run.arch):
                ckpt = load_checkpoint(Path(directory) / CHECKPOINT_FILE, verify=False)
        if ckpt is None:
            # A run directory shared by several models (or reused by hand): never cross-load weights.
            if rank == 0:
                print(f"[{run.model_name}] ignoring the run's latest checkpoint (it belongs to "
                      f"{owner[0]}); starting fresh", flush=True)
            restored = None
    if ckpt is not None:
        model.load_state_dict(ckpt.state_dict)
        state = ckpt.training_state or {}
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        history = list(state.get("history", []))
        start_epoch = ckpt.epoch + 1
        if rank == 0:
            print(f"[{run.model_name}] resuming from the checkpoint of epoch {ckpt.epoch}", flush=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model)
    worker_nodes = json.dumps(_gather_node_ids(world))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=run.label_smoothing)
    steps_per_epoch = len(train_loader)

    for epoch in range(start_epoch, run.epochs):
        if run.simulate_failure_at_epoch == epoch and restored is None and epoch > 0 and rank == 0:
            _kill_this_worker_for_rehearsal(run, epoch)
        if world > 1 and hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        loss_sum, seen = 0.0, 0
        started = time.perf_counter()
        for step, (images, labels) in enumerate(train_loader):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(run, epoch * steps_per_epoch + step, steps_per_epoch)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            x = spec.normalize(images)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(x)
                loss = cnnmodels.googlenet_loss(outputs, labels, criterion=criterion,
                                                aux_weight=run.aux_loss_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach().float().item() * labels.numel()
            seen += labels.numel()
        if on_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        # Global throughput: the sum of every worker's own images per second.
        loss_sum, seen_all, images_per_sec = _all_reduce_sums([loss_sum, seen, seen / max(seconds, 1e-9)], device)
        _recalibrate_batchnorm(model, train_loader, spec, device, run.precise_bn_batches, amp_dtype, channels_last)
        val_loss, val_acc, _ = _evaluate(model, val_loader, spec, device, amp_dtype, channels_last)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen_all, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "train_images_per_sec": images_per_sec,
            "epoch_seconds": seconds,
            "lr": optimizer.param_groups[0]["lr"],
            "start_epoch": start_epoch,
            "worker_nodes": worker_nodes,
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                save_checkpoint(ModelCheckpoint(
                    arch=run.arch, model_kwargs=run.model_kwargs, spec=spec, model_name=run.model_name,
                    state_dict=_unwrap(model).state_dict(), epoch=epoch,
                    metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                    training_state={"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                    "history": history},
                ), Path(directory) / CHECKPOINT_FILE)
                (Path(directory) / CHECKPOINT_META).write_text(json.dumps(
                    {"model_name": run.model_name, "arch": run.arch, "epoch": epoch, "val_acc": val_acc}))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)

    if run.evaluate_test:
        best = _best_reported_checkpoint()
        if best is None:
            raise RuntimeError(f"{run.model_name}: no checkpoint was reported, nothing to evaluate")
        best_checkpoint, best_metrics = best
        with best_checkpoint.as_directory() as directory:
            ckpt = load_checkpoint(Path(directory) / CHECKPOINT_FILE, verify=False)
        _unwrap(model).load_state_dict(ckpt.state_dict)
        test_set = _shard(SplitDataset(splits.test, spec), rank, world)
        test_loader = prepare_data_loader(DataLoader(test_set, batch_size=per_worker_batch * 2, **loader_kwargs),
                                          add_dist_sampler=False)
        test_loss, test_acc, test_count = _evaluate(model, test_loader, spec, device, amp_dtype, channels_last)
        ray.train.report({
            "epoch": run.epochs - 1,
            "val_acc": float(best_metrics["val_acc"]),  # the metric Tune tracks: the chosen checkpoint's
            "test_acc": test_acc,
            "test_loss": test_loss,
            "test_count": test_count,
            "best_val_acc": float(best_metrics["val_acc"]),
            "best_epoch": int(best_metrics["epoch"]),
            "best_checkpoint_path": best_checkpoint.path,
            "history": json.dumps(history),
        })


def _best_reported_checkpoint():
    import ray.train

    reported = ray.train.get_all_reported_checkpoints()
    scored = [(r.checkpoint, r.metrics) for r in reported if "val_acc" in r.metrics]
    if not scored:
        return None
    # Highest val_acc; among equals the later epoch (trained longer).
    return max(scored, key=lambda cm: (cm[1]["val_acc"], cm[1]["epoch"]))


# --------------------------------------------------------------------------------------------------
# The driver side
# --------------------------------------------------------------------------------------------------
def build_trainer(run: ModelRun, callbacks: list | None = None):
    """The ``TorchTrainer`` for one run (stable name under ``storage_path``, so fit() resumes)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=run.to_dict(),
        torch_config=TorchConfig(backend="nccl" if run.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=run.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run.run_name,
            storage_path=run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=run.checkpoints_to_keep, checkpoint_score_attribute="val_acc",
                checkpoint_score_order="max"),
            callbacks=callbacks or [],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def model_trial(config: dict) -> None:
    """Ray Tune trainable: drive one TorchTrainer; per-epoch metrics flow to Tune (and ASHA, and MLflow).

    ``config["run"]`` is a :class:`ModelRun`; search trials add ``config["coefficients"]`` (alpha, beta,
    gamma) to apply to it.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    run = ModelRun.from_dict(config["run"])
    if "coefficients" in config:
        c = config["coefficients"]
        run = run.with_coefficients(c["alpha"], c["beta"], c["gamma"])
    build_trainer(run, callbacks=[TuneReportCallback()]).fit()


def run_model_trials(
    cfg: PipelineConfig,
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
    storage = cfg.resolved_storage_path
    path = f"{storage.rstrip('/')}/{experiment}"
    if restore and tune.Tuner.can_restore(path):
        print(f"[{experiment}] resuming the interrupted Tune experiment at {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric="val_acc", mode="max", num_samples=num_samples, search_alg=search_alg, scheduler=scheduler,
                max_concurrent_trials=max_concurrent, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(name=experiment, storage_path=storage, callbacks=callbacks, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    return tuner.fit()


def _trial_name(trial) -> str:
    config = trial.config
    if isinstance(config.get("coefficients"), dict):
        c = config["coefficients"]
        return f"{coefficients_label(c['alpha'], c['beta'], c['gamma'])}_{trial.trial_id}"
    return f"{config['run']['model_name']}_{trial.trial_id}"


def training_fingerprint(run: ModelRun) -> str:
    """A short hash of everything that defines a model's training except its length, so re-running with
    more epochs continues a run while changing, say, the learning rate starts a fresh one."""
    import hashlib

    keys = ("arch", "model_kwargs", "data", "spec", "batch_size", "lr", "optimizer", "momentum", "weight_decay",
            "schedule", "warmup_epochs", "label_smoothing", "precise_bn_batches", "aux_loss_weight", "augment",
            "seed", "num_workers")
    payload = json.dumps({k: getattr(run, k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


def describe_run(config: dict) -> tuple[str, str, dict[str, Any]]:
    """MLflow run name, model name and params of a training trial (the same keys for every model)."""
    run = ModelRun.from_dict(config["run"])
    params = {
        "arch": run.arch,
        "model_name": run.model_name,
        "params_count": run.params_count,
        "macs": run.macs,
        "input_size": run.input_size,
        "epochs": run.epochs,
        "batch_size": run.batch_size,
        "lr": run.lr,
        "optimizer": run.optimizer,
        "num_workers": run.num_workers,
        "dataset": run.data["dataset"],
        "model_kwargs": json.dumps(run.model_kwargs, sort_keys=True),
    }
    return run.model_name, run.model_name, params


def checkpoint_directory(path: str, storage_path: str) -> contextlib.AbstractContextManager:
    """A local directory with the contents of a reported checkpoint (downloaded if it is remote)."""
    import ray.train

    if "://" in storage_path and "://" not in path:
        path = f"{storage_path.split('://', 1)[0]}://{path}"
    return ray.train.Checkpoint(path).as_directory()


def finish_model_trial(cfg: PipelineConfig, tracker, trial, run_id: str) -> None:
    """When a model's trial completes: log and register its best checkpoint, write its result record."""
    result = trial.last_result or {}
    run = ModelRun.from_dict(trial.config["run"])
    if "test_acc" not in result:
        raise RuntimeError(f"{run.model_name}: the run ended without a test evaluation")
    history = json.loads(result.get("history", "[]"))
    with checkpoint_directory(result["best_checkpoint_path"], run.storage_path) as directory:
        version = tracker.log_and_register(
            run_id, directory, cfg.registered_model_name, alias=run.model_name,
            tags={"test_acc": result["test_acc"], "best_val_acc": result["best_val_acc"], "arch": run.arch,
                  "model_name": run.model_name, "params_count": run.params_count, "macs": run.macs,
                  "input_size": run.input_size},
        )
    throughput = [h["train_images_per_sec"] for h in history]
    model_result = ModelResult(
        model_name=run.model_name, arch=run.arch, model_kwargs=run.model_kwargs, run_name=run.run_name,
        fingerprint=training_fingerprint(run), input_size=run.input_size, params_count=run.params_count,
        macs=run.macs, epochs=run.epochs, best_val_acc=float(result["best_val_acc"]),
        best_epoch=int(result["best_epoch"]), test_acc=float(result["test_acc"]),
        train_images_per_sec=float(np.median(throughput)) if throughput else 0.0,
        train_seconds=float(sum(h["epoch_seconds"] for h in history)),
        checkpoint_path=result["best_checkpoint_path"], history=history, mlflow_run_id=run_id,
        registered_model=cfg.registered_model_name, version=version,
    )
    tracker.log_metrics(run_id, {"train_images_per_sec": model_result.train_images_per_sec,
                                 "train_seconds": model_result.train_seconds})
    model_result.save(cfg.run_dir / "train")
    print(f"[train] {run.model_name}: test_acc {model_result.test_acc:.4f} (best val_acc "
          f"{model_result.best_val_acc:.4f} at epoch {model_result.best_epoch + 1}); registered "
          f"{cfg.registered_model_name} v{version} as @{run.model_name}", flush=True)


@dataclass
class TrainStageResult:
    results: dict[str, ModelResult]
    failed: list[str]
    skipped: list[str]
    trained: list[str]
    champion: str | None
    table: Any = None

    @property
    def ok(self) -> bool:
        return not self.failed


def train_stage(cfg: PipelineConfig, coefficients: dict[str, float] | None = None) -> TrainStageResult:
    """Train every model of ``train.models`` (plus the searched EfficientNet family when ``coefficients``
    are given), each its own Ray Train run, as many at once as the cluster fits. Models already trained
    with the same settings and epochs are skipped. Prints progress and a comparison table."""
    from functools import partial

    from ray import tune

    from .data import describe_dataset
    from .runtime import concurrency_for, free_resources
    from .tracking import Tracker, TrialTracking

    info = describe_dataset(cfg.data)
    choices = resolve_models(cfg, coefficients)
    # Size workers to what is free now (a running Serve app, say, keeps its share), not to the total.
    free = free_resources()
    runs = plan_model_runs(cfg, info, choices, stage="train", cluster_cpus=free["CPU"])
    for run in runs:
        run.run_name = f"{run.run_name}-{training_fingerprint(run)}"
    results_dir = cfg.run_dir / "train"
    existing = load_results(results_dir)
    todo, skipped = [], []
    for run in runs:
        done = existing.get(run.model_name)
        if done is not None and done.fingerprint == training_fingerprint(run) and done.epochs == run.epochs:
            skipped.append(run.model_name)
        else:
            todo.append(run)
    if skipped:
        print(f"[train] already trained, skipping: {', '.join(skipped)}", flush=True)

    tracker = Tracker.for_config(cfg)
    failed: list[str] = []
    if todo:
        per_model = {"CPU": todo[0].cpus_per_worker * todo[0].num_workers + TRIAL_DRIVER_RESOURCES["CPU"],
                     "GPU": float(todo[0].num_workers) if todo[0].use_gpu else 0.0}
        concurrency = concurrency_for(cfg.train.max_concurrent_models, per_model, len(todo), free)
        print(f"[train] training {len(todo)} model(s) on {info.dataset} ({info.sizes['train']} train / "
              f"{info.sizes['val']} val / {info.sizes['test']} test images), {todo[0].num_workers} worker(s) "
              f"each, {concurrency} at a time: {', '.join(r.model_name for r in todo)}", flush=True)
        parent = tracker.start_run(f"train-{time.strftime('%Y%m%d-%H%M%S')}",
                                   {"stage": "train", "cnnzoo.stage_parent": "true"})
        tracker.log_params(parent, {"dataset": info.dataset, "models": ",".join(r.model_name for r in runs),
                                    "epochs": cfg.train.epochs, "num_workers": cfg.train.num_workers})
        callback = TrialTracking(tracker, "train", parent, describe=describe_run,
                                 on_complete=partial(finish_model_trial, cfg, tracker))
        grid = run_model_trials(
            cfg, experiment=f"{cfg.name}-train-{time.strftime('%Y%m%d-%H%M%S')}",
            param_space={"run": tune.grid_search([r.to_dict() for r in todo])},
            callbacks=[callback], max_concurrent=concurrency,
        )
        for result in grid:
            if result.error is not None:
                failed.append(result.config["run"]["model_name"])
        tracker.end_run(parent, "FAILED" if failed else "FINISHED")
    champion = tracker.update_champion(cfg.registered_model_name)
    results = {name: r for name, r in load_results(results_dir).items() if name in {c.name for c in choices}}
    table = comparison_table(list(results.values()), champion=champion[0] if champion else None)
    if not table.empty:
        print("\n" + table.to_string(index=False), flush=True)
        if champion:
            print(f"* champion: {champion[0]} ({cfg.registered_model_name}@champion = v{champion[1]})", flush=True)
    if failed:
        print(f"[train] FAILED: {', '.join(failed)} (their MLflow runs hold the error; re-run to resume)", flush=True)
    return TrainStageResult(results=results, failed=failed, skipped=skipped,
                            trained=[r.model_name for r in todo if r.model_name not in failed],
                            champion=champion[0] if champion else None, table=table)
