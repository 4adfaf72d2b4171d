"""Ray Train's cost over a plain PyTorch loop: steady-state throughput and fixed start-up time.

Both sides train the same model on the same data with the same batch size, optimizer and per-epoch
validation, one process / one worker using every core, in one run:

* plain: a minimal PyTorch loop in this process (the baseline);
* ray: the pipeline's worker loop through Ray Train (1 worker, the same epochs), started via ``build_trainer``.

Reported: median training images/s over the epochs after the first, their ratio (goal >= 0.9), and Ray's
fixed cost = Ray's wall time outside its training loops minus the plain loop's (start-up, checkpointing,
reporting, the final test evaluation of the best checkpoint; the loops' own speed difference is the ratio's).

    python bench/train_overhead.py                           # resnet18 (small input) on digits at 32 px
    python bench/train_overhead.py --model lenet5 --epochs 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import pandas as pd
import torch
from torch.utils.data import DataLoader

import cnnmodels
from pipelines.config import ConfigError, load_config
from pipelines.data import SplitDataset, describe_dataset, load_splits
from pipelines.planning import ModelChoice, plan_model_runs
from pipelines.runtime import ray_session, set_env_defaults


def plain_loop(run, epochs: int) -> tuple[list[float], list[float], float]:
    """Train like a hand-written PyTorch script would; returns per-epoch images/s and training-loop seconds,
    and the wall seconds."""
    started = time.perf_counter()
    torch.set_num_threads(run.threads_per_worker)
    torch.manual_seed(0)
    spec = run.spec
    splits = load_splits(run.data)
    batch_size = run.hyper.batch_size
    train = DataLoader(SplitDataset(splits.train, spec, augment=run.data.augment), batch_size=batch_size,
                       shuffle=True, drop_last=True)
    val = DataLoader(SplitDataset(splits.val, spec), batch_size=batch_size * 2)
    model = cnnmodels.create_model(run.arch, num_classes=spec.num_classes, in_chans=spec.channels,
                                   **run.model.kwargs)
    # The worker's memory-format rule on CPUs, so both sides run the same kernels.
    from pipelines.worker import uses_channels_last

    memory_format = torch.channels_last if uses_channels_last(model, run.workers, on_gpu=False) \
        else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=run.hyper.lr, momentum=0.9, nesterov=True,
                                weight_decay=run.hyper.weight_decay)
    criterion = torch.nn.CrossEntropyLoss()
    rates, loop_seconds = [], []
    for _ in range(epochs):
        model.train()
        seen, start = 0, time.perf_counter()
        for images, labels in train:
            images = spec.normalize(images).contiguous(memory_format=memory_format)
            loss = cnnmodels.googlenet_loss(model(images), labels, criterion=criterion)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += labels.numel()
        loop_seconds.append(time.perf_counter() - start)
        rates.append(seen / loop_seconds[-1])
        model.eval()
        with torch.inference_mode():
            for images, labels in val:
                model(spec.normalize(images).contiguous(memory_format=memory_format)).argmax(1).eq(labels).sum()
        with tempfile.TemporaryDirectory() as d:  # a checkpoint per epoch, as the Ray side writes
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f"{d}/ckpt.pt")
    return rates, loop_seconds, time.perf_counter() - started


def main() -> None:
    set_env_defaults()  # before Ray's import, which reads RAY_DEDUP_LOGS once (concurrent runs' lines folded)
    from pipelines.trials import build_trainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dataset", default="digits")
    args = parser.parse_args()
    if args.epochs < 4:  # epoch 1 is left out of the medians: fewer than 3 samples per side swing the ratio 10x
        parser.error(f"--epochs {args.epochs}: at least 4 (the medians are of epochs 2+)")

    with tempfile.TemporaryDirectory() as workdir:
        cfg = load_config(None, [f"workdir={workdir}", "name=bench", f"data.dataset={args.dataset}",
                                 f"data.image_size={args.image_size}", f"train.batch_size={args.batch_size}",
                                 f"train.models=[{args.model}]", f"train.epochs={args.epochs}", "train.num_workers=1",
                                 # the plain loop's optimizer (SGD, Nesterov), whatever the default config says
                                 "train.optimizer=sgd",
                                 # every epoch's report kept, for its images/s (Ray keeps the kept checkpoints')
                                 f"train.checkpoints_to_keep={args.epochs}",
                                 # the plain loop has no precise-BN pass; leave it out on both sides
                                 "train.precise_bn_batches=0"])
        with ray_session(cfg):
            import ray

            choice = ModelChoice(args.model, args.model, {} if args.model == "lenet5" else {"small_input": True})
            run = plan_model_runs(cfg, describe_dataset(cfg.data), [choice], epochs=args.epochs,
                                  cluster_cpus=ray.cluster_resources()["CPU"])[0]
            run = run.model_copy(update={"run_name": "bench-overhead"})

            plain_rates, plain_loop_seconds, plain_seconds = plain_loop(run, args.epochs)
            started = time.perf_counter()
            result = build_trainer(run).fit()
            ray_seconds = time.perf_counter() - started
            # Ray V2's metrics_dataframe holds the kept checkpoints' reports only (every epoch's, as kept above),
            # in the order of their val_acc: sorted by epoch, so that "epochs 2+" leaves out the first epoch.
            history = result.metrics_dataframe
            if history is None or "epoch" not in history:
                raise RuntimeError("the Ray run reported no epochs")
            epochs = history.dropna(subset=["train_images_per_sec"]).sort_values("epoch")
            if len(epochs) != args.epochs:
                raise RuntimeError(f"the Ray run reported {len(epochs)} epochs of {args.epochs}")
            ray_rates = epochs["train_images_per_sec"].tolist()
            ray_loop_seconds = epochs["epoch_seconds"].tolist()

    plain = statistics.median(plain_rates[1:] or plain_rates)
    ray_ips = statistics.median(ray_rates[1:] or ray_rates)
    table = pd.DataFrame([
        {"loop": "plain PyTorch", "img/s (median, epochs 2+)": round(plain, 1), "wall s": round(plain_seconds, 1)},
        {"loop": "Ray Train, 1 worker", "img/s (median, epochs 2+)": round(ray_ips, 1),
         "wall s": round(ray_seconds, 1)},
    ])
    print(f"\n{args.model} on {args.dataset} at {args.image_size} px, batch {args.batch_size}, {args.epochs} epochs, "
          f"{torch.get_num_threads()} threads")
    print(table.to_string(index=False))
    print(f"\nthroughput ratio Ray / plain: {ray_ips / plain:.3f} (goal >= 0.9)")
    fixed_cost = (ray_seconds - sum(ray_loop_seconds)) - (plain_seconds - sum(plain_loop_seconds))
    print(f"Ray fixed cost: {fixed_cost:.1f} s outside the training loops (start-up, checkpoints, reports, final "
          "test)")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a bad --set or model name: the key and why, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
