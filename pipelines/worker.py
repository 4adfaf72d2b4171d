"""The code that runs inside every Ray Train worker: one model's training, epoch by epoch.

:func:`train_loop_per_worker` is a short sequence of steps that share one :class:`StepContext`:

1. :func:`setup`: data loaders (an :class:`~pipelines.data.EpochSampler`: each epoch's order depends on the
   seed and the epoch alone), the model (``prepare_model`` wraps it in DDP), the optimizer and the AMP
   scaler, from the run's settings;
2. :func:`restore`: the run's latest checkpoint, if Ray hands one back (a replaced worker group, or a
   re-run of the same run name), with its optimizer state, history and this rank's generator states
   (so a resumed run trains exactly as an uninterrupted one would have);
3. per epoch :func:`train_epoch`, :func:`evaluate` on the validation split (after precise BN) and
   :func:`report_epoch` (metrics to Ray, a checkpoint from rank 0);
4. :func:`report_test`: the best checkpoint (by ``val_acc``) evaluated on the test split.

Rank 0 writes the model checkpoint, every rank its generator states beside it (Ray merges the ranks'
directories); every rank reports (``ray.train.report`` is a barrier).
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import cnnmodels

from .checkpoints import (
    CHECKPOINT_FILE,
    ModelCheckpoint,
    capture_rng_state,
    load_checkpoint,
    load_rng_state,
    restore_rng_state,
    save_checkpoint,
    save_rng_state,
)
from .compute_gate import release_compute, wait_for_compute, worker_threads
from .console import duration, timestamped
from .data import DataError, EpochSampler, SplitDataset, load_splits
from .optim import lr_at, make_optimizer
from .planning import ModelRun
from .preprocess import PreprocessSpec
from .shared_data import fetch_converted

__all__ = ["train_loop_per_worker", "StepContext", "CHECKPOINT_META", "uses_channels_last"]

logger = logging.getLogger(__name__)

#: Small JSON beside each checkpoint: which model and epoch it holds, readable without loading weights.
CHECKPOINT_META = "meta.json"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _shard(dataset, rank: int, world: int):
    # Evaluation shards without the padding a DistributedSampler adds, so global metrics are exact.
    return dataset if world == 1 else Subset(dataset, list(range(rank, len(dataset), world)))


def _all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


@dataclass
class StepContext:
    """What every step of one worker's training shares."""

    run: ModelRun
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    train_loader: Any
    train_sampler: EpochSampler
    val_loader: Any
    loader_kwargs: dict[str, Any]
    #: The splits this worker reads: converted ones from the stage's shared data, or its own.
    sources: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    resumed: bool = False
    worker_nodes: str = "[]"
    #: Wall-clock milestones (``time.time()``) and summed phase seconds of this attempt, for the run's
    #: timeline (``bench/overhead.py``): where the seconds around the training loops go.
    timeline: dict[str, float] = field(default_factory=dict)
    #: When rank 0 last said something (a progress line, an epoch's report): each loop's first progress line
    #: counts from it, not from the loop's start, so that the quiet tails of the training loop, the batch-norm
    #: pass and validation do not add up to minutes without a line (:class:`LoopProgress`).
    last_line_at: float = field(default_factory=time.perf_counter)

    def mark(self, milestone: str) -> None:
        self.timeline.setdefault(milestone, time.time())

    def add_seconds(self, phase: str, seconds: float) -> None:
        self.timeline[phase] = self.timeline.get(phase, 0.0) + seconds

    @property
    def spec(self) -> PreprocessSpec:
        return self.run.spec

    @property
    def per_worker_batch(self) -> int:
        return max(1, self.run.hyper.batch_size // self.world)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """Normalise, lay out (channels-last on GPU) and run the model under autocast. With ``labels``,
        returns ``(outputs, training loss)``, the loss computed under autocast too (GoogLeNet's auxiliary
        heads included)."""
        x = self.spec.normalize(images.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.model(x)
            if labels is None:
                return outputs
            loss = cnnmodels.googlenet_loss(outputs, labels.to(self.device, non_blocking=True),
                                            criterion=self.criterion, aux_weight=self.run.hyper.aux_loss_weight)
            return outputs, loss


def autocast_dtype(run: ModelRun, device: torch.device) -> torch.dtype | None:
    """The dtype a run's forward passes autocast to, or None for fp32: on GPUs ``train.amp`` (bfloat16 where
    supported, else float16 with a gradient scaler), on CPUs ``train.cpu_bf16`` (``auto``: where bf16 is
    native, see :func:`cpu_has_native_bf16`)."""
    if device.type == "cuda":
        if not run.workers.amp:
            return None
        # Natively only (compute capability 8+): torch counts emulated bf16 (a T4, a V100) as supported, which
        # runs without tensor cores, slower than float16 with a scaler.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    wanted = run.hyper.cpu_bf16
    return torch.bfloat16 if wanted is True or (wanted == "auto" and cpu_has_native_bf16()) else None


#: Precisions from the least to the most demanding of the hardware: the ranks of a run train at the least any
#: of them needs (float16 runs on every CUDA GPU; bf16 natively only on some GPUs and CPUs).
_PRECISION_ORDER = (None, torch.float16, torch.bfloat16)


def common_autocast_dtype(local: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The precision every rank of this DDP run trains at: ``local`` (this rank's :func:`autocast_dtype`) where
    the ranks agree, else the least demanding one. Ranks chose by their own hardware, and DDP averages the
    gradients of all: an A10G (bf16, no scaler) beside a T4 (float16, gradients scaled by 65536) stepped 32768
    times too far, and the replicas drifted apart (DDP never re-syncs weights); on CPUs a node with native bf16
    beside one without trained at two precisions."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    # On the worker's own device: NCCL reduces CUDA tensors only, gloo CPU ones.
    code = torch.tensor([_PRECISION_ORDER.index(local)], device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MIN)
    return _PRECISION_ORDER[int(code.item())]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 products natively: AMX tiles (Intel Sapphire Rapids and later) or
    AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake). Elsewhere oneDNN emulates bf16, slower than fp32.
    torch's checks are private, hence the guards."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(check is not None and check() for check in checks)


def setup(run: ModelRun) -> StepContext:
    """Data loaders, model (DDP-wrapped by Ray), optimizer and scaler for this worker."""
    import ray.train
    from ray.train.torch import get_device, prepare_data_loader

    context = ray.train.get_context()
    torch.set_num_threads(worker_threads(run))
    ctx = build_context(run, context.get_world_rank(), context.get_world_size(), get_device())
    if (agreed := common_autocast_dtype(ctx.amp_dtype, ctx.device)) != ctx.amp_dtype:
        def name(dtype: torch.dtype | None) -> str:
            return str(dtype or "float32").removeprefix("torch.")

        logger.info("[%s] rank %d trains in %s, as every rank can (it would have used %s)", run.model_name, ctx.rank,
                    name(agreed), name(ctx.amp_dtype))
        ctx.amp_dtype = agreed
        ctx.scaler = torch.amp.GradScaler("cuda", enabled=agreed == torch.float16)
    # Ray moves the batches to the worker's device; the samplers are ours (add_dist_sampler=False).
    ctx.train_loader = prepare_data_loader(ctx.train_loader, add_dist_sampler=False)
    ctx.val_loader = prepare_data_loader(ctx.val_loader, add_dist_sampler=False)
    return ctx


def loader_options(run: ModelRun, rank: int, on_gpu: bool) -> dict[str, Any]:
    """The settings of a worker's DataLoaders. Their own generator: without one, a loader draws the seed of its
    worker processes from the global torch RNG when its iterator starts, which a persistent loader does once
    per attempt, so a resumed run drew at another point of that stream than an uninterrupted one, and every
    later epoch's augmentation differed (with ``data.loader_workers`` > 0). Items seed their own augmentation,
    so the processes' seed itself does not matter."""
    return {"num_workers": run.data.loader_workers, "pin_memory": on_gpu,
            "persistent_workers": run.data.loader_workers > 0,
            "generator": torch.Generator().manual_seed(run.hyper.seed * 1000 + rank)}


def check_same_data(run: ModelRun, class_names: tuple[str, ...], sizes: dict[str, int], membership: str = "") -> None:
    """Raise DataError unless this worker's own read of the data is what the driver planned with. Each worker
    reads ``data.root`` on its node: a node's stale or partial copy (a class folder missing) shifted every later
    class's label without a word, and other split sizes give the ranks different step counts (DDP hangs); the
    same counts with other files (one renamed, one moved between classes) put one rank's validation and test
    images into another's training set."""
    import socket

    planned = run.split_sizes
    if tuple(class_names) != tuple(run.spec.class_names) or (planned is not None and sizes != planned):
        raise DataError(
            f"the data under data.root on {socket.gethostname()} is not what the run was planned with: classes "
            f"{list(class_names)[:20]} and split sizes {sizes} here, {list(run.spec.class_names)[:20]} and "
            f"{planned} on the driver; every node needs the same copy of the data set")
    if run.split_membership is not None and membership != run.split_membership:
        raise DataError(
            f"the image files under data.root on {socket.gethostname()} differ from the driver's (the same classes "
            "and split sizes, but other files or labels: a file renamed, added and removed, or moved between "
            "classes); every node needs the same copy of the data set")


def uses_channels_last(model: torch.nn.Module, workers, on_gpu: bool) -> bool:
    """Whether a worker trains ``model`` channels-last: with ``train.channels_last``, on GPUs, and on CPUs for the
    models that run faster in it (EfficientNet's depthwise convolutions: ``channels_last_on_cpu``)."""
    return workers.channels_last and (on_gpu or getattr(model, "channels_last_on_cpu", False))


def build_context(run: ModelRun, rank: int, world: int, device: torch.device) -> StepContext:
    """One worker's data loaders, model, optimizer and scaler, seeded by ``(train.seed, rank)``; :func:`setup`
    calls it inside Ray Train with the worker's rank, world size and device."""
    torch.manual_seed(run.hyper.seed * 1000 + rank)
    on_gpu = device.type == "cuda"
    amp_dtype = autocast_dtype(run, device)

    sources = fetch_converted(run.shared_data, run.data, run.spec)
    if sources is None:
        splits = load_splits(run.data, run.excluded_files)
        sources = {"train": splits.train, "val": splits.val, "test": splits.test}
        check_same_data(run, splits.class_names, {name: len(split) for name, split in sources.items()},
                        splits.membership(run.data.root) if run.split_membership is not None else "")
    train_set = SplitDataset(sources["train"], run.spec, augment=run.data.augment)
    per_worker_batch = max(1, run.hyper.batch_size // world)
    loader_kwargs = loader_options(run, rank, on_gpu)
    # Our own sampler, for one worker too: Ray's (DDP only) and DataLoader's shuffle (the global RNG) would
    # make an epoch's order depend on what ran before it in this process, so a resumed run would differ.
    train_sampler = EpochSampler(train_set, rank=rank, world=world, seed=run.hyper.seed)
    # The last, partial batch is dropped on large sets; kept on small ones, unless it would hold one image:
    # batch norm cannot train on a single value per channel (a model whose last maps are 1x1).
    shard = len(train_sampler)
    drop_last = len(train_set) >= 2 * per_worker_batch * world or (shard > per_worker_batch
                                                                     and shard % per_worker_batch == 1)
    train_loader = DataLoader(train_set, batch_size=per_worker_batch, sampler=train_sampler, drop_last=drop_last,
                              **loader_kwargs)
    val_loader = DataLoader(_shard(SplitDataset(sources["val"], run.spec), rank, world),
                            batch_size=per_worker_batch * 2, **loader_kwargs)

    model = cnnmodels.create_model(run.arch, num_classes=run.spec.num_classes, in_chans=run.spec.channels,
                                   **run.model.kwargs)
    return StepContext(
        run=run, rank=rank, world=world, device=device, amp_dtype=amp_dtype,
        channels_last=uses_channels_last(model, run.workers, on_gpu),
        model=model, optimizer=make_optimizer(run, model),
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        criterion=torch.nn.CrossEntropyLoss(label_smoothing=run.hyper.label_smoothing),
        train_loader=train_loader, train_sampler=train_sampler, val_loader=val_loader, loader_kwargs=loader_kwargs,
        sources=sources,
    )


def _checkpoint_owner(directory: Path) -> tuple[str, str]:
    meta = directory / CHECKPOINT_META
    if meta.is_file():
        try:
            data = json.loads(meta.read_text())
            return str(data.get("model_name", "")), str(data.get("arch", ""))
        except (ValueError, AttributeError):  # damaged (or not an object): the checkpoint says it, checked
            pass
    ckpt = load_checkpoint(directory / CHECKPOINT_FILE, verify=False)  # written before meta.json existed
    return ckpt.model_name, ckpt.arch


def load_training_state(checkpoint: ModelCheckpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, device: torch.device) -> list[dict]:
    """Put a checkpoint's weights, optimizer and gradient-scaler state into a fresh model (moved to ``device``)
    and its optimizer; returns the run's history so far.

    The model goes to its device before the optimizer state is loaded: torch puts that state where the
    parameters are at load time, and ``prepare_model`` later moves only the parameters, so a resumed GPU run
    kept its momentum on the CPU and failed at its first step. Scaler state is loaded only into an enabled
    scaler from a run that used one (a CPU or bf16 run saves none)."""
    model.load_state_dict(checkpoint.state_dict)
    model.to(device)
    state = checkpoint.training_state or {}
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    return list(state.get("history", []))


def checkpoint_to_resume(restored, run: ModelRun, rank: int) -> tuple[ModelCheckpoint | None, Any]:
    """The checkpoint (and this rank's generator state) a run resumes from: Ray's latest checkpoint of the run
    (``restored``, None on a first start), unless it is another model's (a run directory reused by hand), when
    the run starts fresh. One that is not there raises :class:`MissingCheckpointError`: the attempt fails and
    Ray tries again (its storage may be back); a checkpoint deleted or damaged for good is dealt with before the
    run starts (:func:`pipelines.trials.set_aside_a_record_of_lost_checkpoints`), where one decision holds for
    every rank."""
    if not restored:
        return None, None
    with restored.as_directory() as directory:
        owner = _checkpoint_owner(Path(directory))
        if owner == (run.model_name, run.arch):
            ckpt = load_checkpoint(Path(directory) / CHECKPOINT_FILE, verify=False)
            if ckpt.epoch + 1 > run.hyper.epochs:
                # Its record would claim this run's epochs for a model trained further, on a longer schedule.
                raise RuntimeError(f"{run.model_name}: the run's latest checkpoint is of epoch {ckpt.epoch + 1}, "
                                   f"beyond train.epochs={run.hyper.epochs} (an interrupted longer run of the same "
                                   "settings); raise train.epochs to at least that, or train the shorter run under "
                                   "another name")
            return ckpt, load_rng_state(directory, rank)
    if rank == 0:
        logger.info("[%s] ignoring the run's latest checkpoint (it belongs to %s); starting fresh",
                    run.model_name, owner[0])
    return None, None


def restore(ctx: StepContext) -> None:
    """Load the run's latest checkpoint (if Ray hands one back and it is this model's), then wrap the model
    for DDP. A checkpoint of another model (a run directory reused by hand) is never cross-loaded."""
    import ray.train
    from ray.train.torch import prepare_model

    ckpt, rng_state = checkpoint_to_resume(ray.train.get_checkpoint(), ctx.run, ctx.rank)
    if ckpt is not None:
        ctx.history = load_training_state(ckpt, ctx.model, ctx.optimizer, ctx.scaler, ctx.device)
        ctx.start_epoch, ctx.resumed = ckpt.epoch + 1, True
        if ctx.rank == 0:
            # (counted from 1, as the epoch lines are: "epoch 1" read as a lost epoch after "epoch 2/3")
            logger.info("[%s] resuming after epoch %d/%d (its checkpoint)", ctx.run.model_name, ckpt.epoch + 1,
                        ctx.run.hyper.epochs)
    if ctx.channels_last:
        ctx.model = ctx.model.to(memory_format=torch.channels_last)
    ctx.model = prepare_model(ctx.model)
    ctx.worker_nodes = json.dumps(_gather_node_ids(ctx.world))
    if ckpt is not None:
        # Last, after everything that may draw random numbers on the way here (the model's initialisation):
        # from now on this rank draws exactly what it would have drawn had the run never stopped.
        if rng_state is not None:
            restore_rng_state(rng_state, ctx.device)
        elif ctx.rank == 0:
            logger.info("[%s] the checkpoint holds no generator state (written by an earlier version): "
                        "resuming with fresh random streams", ctx.run.model_name)


def run_epoch(ctx: StepContext, epoch: int) -> tuple[dict, float, float, bool]:
    """One epoch of the run: train, recalibrate batch norm, validate; (the training metrics, val_loss, val_acc,
    whether it diverged). Each epoch after the attempt's first gets a new DDP wrapper (:func:`rewrap_ddp`)."""
    if epoch > ctx.start_epoch:
        rewrap_ddp(ctx)
    metrics = train_epoch(ctx, epoch)
    evaluation_started = time.perf_counter()
    recalibrate_batchnorm(ctx, ctx.run.hyper.precise_bn_batches)
    val_loss, val_acc, _ = evaluate(ctx, ctx.val_loader)
    ctx.add_seconds("eval_seconds", time.perf_counter() - evaluation_started)
    return metrics, val_loss, val_acc, diverged(ctx)


def rewrap_ddp(ctx: StepContext) -> None:
    """Wrap the model in a new DDP wrapper, as a resumed run's is. DDP regroups its gradient buckets after its
    first step, which changes the order the ranks' gradients are summed in: with three or more ranks a run
    resumed at an epoch (a new wrapper) drifted from one that went on (0.15 apart in resnet18's weights one
    epoch later, 3 CPU ranks), where the docs promise the same weights. One wrapper per epoch makes both the same;
    it costs a broadcast of the weights from rank 0 per epoch."""
    from torch.nn.parallel import DistributedDataParallel

    old = ctx.model
    if not isinstance(old, DistributedDataParallel):
        return  # one worker: no DDP
    module = old.module
    # Its gradient hooks go now, not when the garbage collector gets to it: two reducers would see each gradient.
    # (A private method: without it, the collection below ends the reducer, whose destructor removes them too.)
    if (remove_hooks := getattr(getattr(old, "reducer", None), "_remove_autograd_hooks", None)) is not None:
        remove_hooks()
    on_device = {"device_ids": [ctx.device], "output_device": ctx.device} if ctx.device.type != "cpu" else {}
    ctx.model = old = None
    gc.collect()  # DDP sits in a reference cycle: its buckets (a gradient's size) freed before the new ones
    ctx.model = DistributedDataParallel(module, **on_device)


def _gather_node_ids(world: int) -> list[str]:
    """The Ray node of every rank, in rank order (recorded so users can see where their workers ran)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not torch.distributed.is_initialized():
        return [node]
    nodes: list[str | None] = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def train_epoch(ctx: StepContext, epoch: int) -> dict[str, float]:
    """One pass over this worker's shard; returns the global loss, throughput and this worker's seconds."""
    hyper = ctx.run.hyper
    loader = ctx.train_loader
    # The order from (seed, epoch); the augmentation from the torch RNG, whose state checkpoints carry.
    ctx.train_sampler.start_epoch(epoch, int(torch.randint(0, 2**62, ()).item()))
    steps_per_epoch = len(loader)
    ctx.model.train()
    # Summed on the device: reading the loss every step made the host wait for each step on a GPU.
    loss_sum, seen = torch.zeros((), dtype=torch.float64, device=ctx.device), 0
    started = time.perf_counter()
    progress = LoopProgress(ctx, f"epoch {epoch + 1}/{hyper.epochs}", steps_per_epoch)
    for step, (images, labels) in enumerate(loader):
        lr = lr_at(hyper.lr, hyper.schedule, hyper.warmup_epochs, hyper.epochs, epoch * steps_per_epoch + step,
                   steps_per_epoch)
        for group in ctx.optimizer.param_groups:
            group["lr"] = lr
        outputs, loss = ctx.forward(images, labels)
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.scaler.scale(loss).backward()
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        if step == 0:
            ctx.mark("first_step")  # the first step pays for lazy initialisation (kernels, caches)
        # train_loss is the main head's plain cross-entropy, comparable with val_loss and across models: not the
        # smoothed loss trained on (label smoothing 0.1 puts a floor of about 0.5 under it) nor GoogLeNet's sum
        # with its auxiliary heads (about 1.6 times val_loss).
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        loss_sum += F.cross_entropy(logits.detach().float(), labels.to(ctx.device, non_blocking=True),
                                    reduction="sum").double()
        seen += labels.numel()
        progress.step(step + 1, seen)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    ctx.add_seconds("loop_seconds", seconds)
    # Global throughput: the sum of every worker's own images per second.
    loss_sum, seen_all, images_per_sec = _all_reduce_sums([loss_sum.item(), seen, seen / max(seconds, 1e-9)],
                                                          ctx.device)
    return {"train_loss": loss_sum / max(seen_all, 1), "train_images_per_sec": images_per_sec,
            "epoch_seconds": seconds, "lr": ctx.optimizer.param_groups[0]["lr"]}


def describe_compute(ctx: StepContext) -> str:
    """Where and how a run trains, e.g. ``1 cpu worker(s) x 2 threads, bfloat16 autocast, channels-last``: the
    precision and layout are settled on the worker (``auto`` asks its own CPU), so it says what it chose."""
    where = f"{ctx.world} {ctx.device.type} worker(s)"
    if ctx.device.type == "cpu":
        where += f" x {torch.get_num_threads()} threads"
    precision = f"{str(ctx.amp_dtype).removeprefix('torch.')} autocast" if ctx.amp_dtype else "float32"
    return f"{where}, {precision}, {'channels-last' if ctx.channels_last else 'contiguous'}"


class LoopProgress:
    """A long loop is never silent (rank 0 prints): batches done of ``total``, throughput (all workers) and the
    loop's ETA, whenever the next batch would end more than ``workers.progress_interval_s`` after the last line
    (or the loop's start). Waiting until the interval had passed let a slow step (seconds on 2 CPU cores) push
    the gap past it."""

    def __init__(self, ctx: StepContext, what: str, total: int) -> None:
        self.ctx, self.what, self.total = ctx, what, total
        self.started = self.last_step = time.perf_counter()

    def step(self, done: int, seen: int) -> None:
        """Batch ``done`` (counting from 1) has finished; ``seen``: this worker's images so far."""
        if self.ctx.rank != 0 or done >= self.total:
            return
        now = time.perf_counter()
        step_seconds, self.last_step = now - self.last_step, now
        if now - self.ctx.last_line_at + step_seconds < self.ctx.run.workers.progress_interval_s:
            return
        self.ctx.last_line_at, elapsed = now, now - self.started
        logger.info(timestamped(
            f"[{self.ctx.run.model_name}] {self.what}: batch {done}/{self.total}, "
            f"{seen * self.ctx.world / elapsed:.0f} img/s, {self.what.split()[0]} ETA "
            f"{duration(elapsed / done * (self.total - done))}"))


def recalibrate_batchnorm(ctx: StepContext, batches: int) -> None:
    """Precise BN: re-estimate every batch norm's running mean/variance with the current weights.

    The running averages trail the weights by about 1 / momentum steps; early in training (and in deep
    stacks such as EfficientNet's ~50 BN layers) that lag makes eval-mode outputs collapse while
    train-mode accuracy is fine. Averaging fresh statistics over a few batches removes the lag. With DDP the
    ranks' statistics are averaged at the end: DDP broadcasts buffers only in forwards that need gradients,
    so each rank kept its own (from 1/world of the images), evaluated its validation shard with them and
    saved rank 0's in the checkpoint.
    """
    norms = [m for m in ctx.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if batches <= 0 or not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
    ctx.model.train()
    batches = min(batches, len(ctx.train_loader))
    progress, seen = LoopProgress(ctx, "batch-norm statistics", batches), 0
    with torch.no_grad():
        for step, (images, _) in enumerate(ctx.train_loader):
            if step >= batches:
                break
            ctx.forward(images)
            seen += len(images)
            progress.step(step + 1, seen)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    if ctx.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        for m in norms:
            for statistic in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(statistic)
                statistic.div_(ctx.world)


def evaluate(ctx: StepContext, loader, what: str = "validation") -> tuple[float, float, int]:
    """Global (all-reduced) mean loss, accuracy and image count of the model on ``loader`` (``what``: how its
    progress lines name it)."""
    ctx.model.eval()
    # Summed on the device, read once: a read per batch made the host wait for every batch on a GPU.
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    count = 0
    progress = LoopProgress(ctx, what, len(loader))
    with torch.inference_mode():
        for step, (images, labels) in enumerate(loader):
            labels = labels.to(ctx.device, non_blocking=True)
            logits = ctx.forward(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            correct += (logits.argmax(1) == labels).sum()
            count += labels.numel()
            progress.step(step + 1, count)
    loss_sum, correct, count = _all_reduce_sums([loss_sum.item(), correct.item(), count], ctx.device)
    return loss_sum / max(count, 1), correct / max(count, 1), int(count)


#: A float16 loss scale under this at an epoch's end: the gradient scaler has skipped step after step, halving
#: the scale each time, because the model's activations or gradients overflow float16 at any scale. A sound
#: model's scale stays in the thousands (from 65,536; one overflowing batch halves it once).
LOSS_SCALE_FLOOR = 1.0


def diverged(ctx: StepContext) -> bool:
    """Whether training has diverged, on any rank: the model's weights (or batch-norm statistics) are no longer
    numbers, or (float16 autocast) the gradient scaler skipped steps until its scale fell under
    :data:`LOSS_SCALE_FLOOR`: the weights stay finite there while nothing trains. Its validation accuracy is then
    class 0's share (argmax of NaN logits), a number that could pass for the best epoch's, so it is reported as
    NaN and the run stops."""
    with torch.no_grad():
        broken = sum(int(not torch.isfinite(t).all()) for t in (*ctx.model.parameters(), *ctx.model.buffers())
                     if t.is_floating_point())
    if ctx.scaler.is_enabled() and ctx.scaler.get_scale() < LOSS_SCALE_FLOOR:
        broken += 1
    return _all_reduce_sums([float(broken)], ctx.device)[0] > 0


def report_epoch(ctx: StepContext, epoch: int, metrics: dict[str, Any]) -> None:
    """Record the epoch in the history and report it to Ray with a checkpoint: the model from rank 0, the
    generator states from every rank (Ray merges the ranks' directories into one checkpoint)."""
    import ray.train

    started = time.perf_counter()
    rng_state = capture_rng_state(ctx.device)  # first: nothing below may draw before it is saved
    run = ctx.run
    ctx.history.append(metrics)
    with tempfile.TemporaryDirectory() as directory:
        save_rng_state(directory, ctx.rank, rng_state)
        if ctx.rank == 0:
            save_checkpoint(ModelCheckpoint(
                arch=run.arch, model_kwargs=run.model.kwargs, spec=run.spec, model_name=run.model_name,
                state_dict=_unwrap(ctx.model).state_dict(), epoch=epoch,
                metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                training_state={"optimizer": ctx.optimizer.state_dict(), "scaler": ctx.scaler.state_dict(),
                                "history": ctx.history},
            ), Path(directory) / CHECKPOINT_FILE)
            (Path(directory) / CHECKPOINT_META).write_text(json.dumps(
                {"model_name": run.model_name, "arch": run.arch, "epoch": epoch, "val_acc": metrics["val_acc"]}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    ctx.add_seconds("report_seconds", time.perf_counter() - started)
    ctx.last_line_at = time.perf_counter()  # the driver prints the epoch's line on this report


def _best_reported_checkpoint():
    import ray.train

    reported = ray.train.get_all_reported_checkpoints()
    # (A diverged epoch reports val_acc NaN: never the best, and max() would not rank it reliably.)
    scored = [(r.checkpoint, r.metrics) for r in reported
              if "val_acc" in r.metrics and math.isfinite(float(r.metrics["val_acc"]))]
    if not scored:
        return None
    # Highest val_acc; among equals the later epoch (trained longer).
    return max(scored, key=lambda cm: (cm[1]["val_acc"], cm[1]["epoch"]))


def report_test(ctx: StepContext) -> None:
    """Evaluate the best reported checkpoint on the test split and report it as the run's final result."""
    import ray.train
    from ray.train.torch import prepare_data_loader

    run = ctx.run
    ctx.mark("test_start")
    best = _best_reported_checkpoint()
    if best is None:
        if ctx.history and ctx.history[-1].get("diverged"):
            raise RuntimeError(f"{run.model_name}: training diverged (loss {ctx.history[-1]['train_loss']}) at "
                               f"epoch {ctx.history[-1]['epoch'] + 1}, before any sound epoch: nothing to test; "
                               "lower its learning rate (train.model_overrides) and delete its run folder to train "
                               "it afresh")
        raise RuntimeError(f"{run.model_name}: no checkpoint was reported, nothing to evaluate")
    best_checkpoint, best_metrics = best
    if int(best_metrics["epoch"]) != ctx.history[-1]["epoch"]:  # else the model in memory is the best one
        with best_checkpoint.as_directory() as directory:
            ckpt = load_checkpoint(Path(directory) / CHECKPOINT_FILE, verify=False)
        _unwrap(ctx.model).load_state_dict(ckpt.state_dict)
    test_set = _shard(SplitDataset(ctx.sources["test"], run.spec), ctx.rank, ctx.world)
    test_loader = prepare_data_loader(DataLoader(test_set, batch_size=ctx.per_worker_batch * 2, **ctx.loader_kwargs),
                                      add_dist_sampler=False)
    test_loss, test_acc, test_count = evaluate(ctx, test_loader, "test")
    ctx.mark("test_done")
    ray.train.report({
        "epoch": run.hyper.epochs - 1,
        "val_acc": float(best_metrics["val_acc"]),  # the metric Tune tracks: the chosen checkpoint's
        "test_acc": test_acc,
        "test_loss": test_loss,
        "test_count": test_count,
        "best_val_acc": float(best_metrics["val_acc"]),
        "best_epoch": int(best_metrics["epoch"]),
        "best_checkpoint_path": best_checkpoint.path,
        "history": json.dumps(ctx.history),
        "timeline": json.dumps(ctx.timeline),
        "start_epoch": ctx.start_epoch,  # this attempt's: the epochs after it are what the stage trained
    })


def _quiet_report_logging() -> None:
    # Ray Train logs every report (with all metrics) through a logger named by its file path, which
    # escapes RunConfig's LoggingConfig; our own progress lines already say the same, once.
    import ray.train.v2._internal.execution.context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _kill_this_worker_for_rehearsal(run: ModelRun, epoch: int) -> None:
    import ray.train

    # Reports reach the controller asynchronously; wait until the last checkpoint is committed, as it
    # would be in a real failure some time after the report, so the restart has something to resume.
    ray.train.get_all_reported_checkpoints()
    logger.warning("[%s] simulate_failure_at_epoch=%d: killing worker rank 0 now", run.model_name, epoch)
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
    """The Ray Train worker function: ``config["run"]`` is a :class:`~pipelines.planning.ModelRun`."""
    from .console import configure_console

    started = time.time()
    run = config["run"] if isinstance(config["run"], ModelRun) else ModelRun.from_dict(config["run"])
    configure_console()
    _quiet_report_logging()
    _exit_quietly_if_interrupted(threading.current_thread())
    ctx = setup(run)
    ctx.timeline["worker_start"] = started
    ctx.mark("data_ready")
    restore(ctx)
    ctx.mark("restored")
    # A run with no epoch left (restarted after its training ended) has nothing to gate; asking would let one
    # rank release the slot before another rank asked, which then queued again behind the next run's training.
    training_left = ctx.start_epoch < run.hyper.epochs
    if training_left and ctx.history and ctx.history[-1].get("diverged"):
        # Its weights are not numbers: more epochs from them would train nothing (a re-run with more epochs).
        if ctx.rank == 0:
            logger.error("[%s] its checkpoint is from an epoch that diverged (epoch %d): not trained further; "
                         "testing its best earlier epoch", run.model_name, ctx.history[-1]["epoch"] + 1)
        training_left = False
    if training_left:
        wait_for_compute(run.compute_gate, run.run_name)  # the previous run may still be training
    ctx.mark("compute_granted")
    if ctx.rank == 0:
        logger.info(timestamped(f"[{run.model_name}] training on {describe_compute(ctx)}"))
    for epoch in range(ctx.start_epoch if training_left else run.hyper.epochs, run.hyper.epochs):
        if run.workers.simulate_failure_at_epoch == epoch and not ctx.resumed and epoch > 0 and ctx.rank == 0:
            _kill_this_worker_for_rehearsal(run, epoch)
        metrics, val_loss, val_acc, broken = run_epoch(ctx, epoch)
        # (epochs: the schedule's length, which a re-run of an interrupted run is checked against)
        report_epoch(ctx, epoch, {"epoch": epoch, **metrics, "val_loss": val_loss,
                                  "val_acc": math.nan if broken else val_acc, "start_epoch": ctx.start_epoch,
                                  "epochs": run.hyper.epochs, "worker_nodes": ctx.worker_nodes,
                                  **({"diverged": True} if broken else {})})
        if broken:  # all-reduced: every rank leaves the loop together
            if ctx.rank == 0:
                logger.error("[%s] training diverged at epoch %d/%d (train_loss %s, val_loss %s): stopping it; "
                             "its best earlier epoch is what it keeps (lower its learning rate, "
                             "train.model_overrides, to train it further)", run.model_name, epoch + 1,
                             run.hyper.epochs, metrics["train_loss"], val_loss)
            break
    if ctx.rank == 0 and training_left:
        ctx.mark("compute_released")
        release_compute(run.compute_gate, run.run_name)  # the test is short; let the next run train
    if run.evaluate_test:
        report_test(ctx)
