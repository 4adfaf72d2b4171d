"""Accuracy and wall time on Fashion-MNIST: a plain PyTorch loop against the pipeline's resnet18.

Both train on the same IDX files on the same machine, one after the other in one invocation (never at the
same time, so neither takes cores from the other; with several seeds, each side goes first for every other seed):

* plain: torchvision's resnet18 with a 3x3 stride-2 stem (no stem max-pool), the 1-channel 28x28 images
  zero-padded to 32, SGD (Nesterov, momentum 0.9, weight decay 5e-4), a one-cycle schedule to lr 0.1, label
  smoothing 0.1, random horizontal flips, batch 128, all 60,000 training images; the 10,000 test images are
  evaluated after every epoch (its wall time includes loading the data and these evaluations).
* pipeline: ``python -m pipelines train --config pipelines/configs/fashion-mnist.yaml --set
  train.models=[resnet18] --set train.epochs=N`` as a subprocess in a fresh workdir (Ray Train, MLflow and
  registration included: its wall time is the command's), keeping every epoch's checkpoint. The pipeline holds
  out ``data.val_fraction`` of the training images for validation and tests only its best checkpoint, so this
  script evaluates each epoch's checkpoint on the same test split afterwards, outside the timed command.

Printed: test accuracy after every epoch of each (and the pipeline's val_acc), seconds per epoch, both wall
times and the ratios (pipeline / plain). The summary's test_acc is what a user gets: the plain loop's last
epoch, the pipeline's checkpoint chosen by validation accuracy (the one it registers). With ``--seeds``, both
sides run once per seed (interleaved), and a table of every seed's accuracies (the pipeline's last epoch's
beside its chosen one) and wall times ends the output; the goal is judged on the same numbers: the mean
accuracy over the seeds and the median wall-time ratio (three seeds moved the 3-epoch result by up to 0.16
points on the plain side and 0.28 on the pipeline's).

    python bench/accuracy.py                              # 3 epochs each: about 30+ min on 2 cores
    python bench/accuracy.py --epochs 1 --subset 2000     # a smoke run
    python bench/accuracy.py --seeds 1,2 --markdown       # two seeds per side: about 80 min
    python bench/accuracy.py --skip-plain --epochs 15 --markdown
    python bench/accuracy.py --skip-plain --set data.image_size=32   # a recipe change, on the pipeline side
    python bench/accuracy.py --skip-pipeline --plain-split pipeline  # the plain loop on the pipeline's images
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PRESET = "pipelines/configs/fashion-mnist.yaml"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package


# -- the plain loop -----------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array: 2 zero bytes, a type code, the rank, then the sizes."""
    data = (gzip.decompress if path.suffix == ".gz" else bytes)(path.read_bytes())
    rank = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def missing_idx_files(root: Path) -> list[str]:
    """The Fashion-MNIST IDX files (gzipped or not) that ``root`` lacks."""
    return [name for name in IDX_FILES if not (root / name).exists() and not (root / f"{name}.gz").exists()]


def load_padded(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 32, 32), the 28x28 originals zero-padded by 2 on each side, and int64 labels."""
    stem = "train" if split == "train" else "t10k"
    find = lambda name: next(p for p in (root / name, root / f"{name}.gz") if p.exists())  # noqa: E731
    images = torch.from_numpy(read_idx(find(f"{stem}-images-idx3-ubyte")).copy())
    labels = torch.from_numpy(read_idx(find(f"{stem}-labels-idx1-ubyte")).astype(np.int64))
    return nn.functional.pad(images, (2, 2, 2, 2)).unsqueeze(1), labels


def plain_resnet18() -> nn.Module:
    """torchvision's resnet18 for 1-channel 32x32 images: a 3x3 stride-2 stem and no stem max-pool, so the
    first stage works at 16x16."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=2, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def pipeline_training_split(root: Path, extra: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the pipeline trains on (the preset's split: all but ``data.val_fraction``, stratified by
    ``data.seed``), padded to 32 px as :func:`load_padded` does."""
    from pipelines.config import load_config
    from pipelines.data import load_splits

    cfg = load_config(str(REPO / PRESET), [f"data.root={root}", *extra])
    train = load_splits(cfg.data).train
    images = nn.functional.pad(torch.from_numpy(np.ascontiguousarray(train.images)), (2, 2, 2, 2)).unsqueeze(1)
    return images, torch.as_tensor(train.labels, dtype=torch.long)


def train_plain(root: Path, epochs: int, subset: int | None, seed: int = 0, pipeline_split: bool = False,
                extra: tuple[str, ...] = ()) -> dict:
    """The plain PyTorch loop; returns test accuracy and seconds per epoch, and the wall time. With
    ``pipeline_split`` it trains on the pipeline's training split only (``extra``: the pipeline's overrides)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    train_x, train_y = pipeline_training_split(root, extra) if pipeline_split else load_padded(root, "train")
    test_x, test_y = load_padded(root, "test")
    if subset is not None:
        keep = torch.randperm(len(train_y))[:subset]
        train_x, train_y = train_x[keep], train_y[keep]
    mean, std = train_x.float().mean() / 255, train_x.float().std() / 255
    normalize = lambda x: (x.float() / 255 - mean) / std  # noqa: E731
    model = plain_resnet18()
    batch, steps_per_epoch = 128, math.ceil(len(train_y) / 128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    # cycle_momentum off: the recipe's momentum is 0.9 throughout, only the learning rate cycles.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch, cycle_momentum=False)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    history = []
    for epoch in range(epochs):
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_y))
        for i in range(steps_per_epoch):
            index = order[i * batch:(i + 1) * batch]
            x = normalize(train_x[index])
            flip = torch.rand(len(index)) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            loss = criterion(model(x), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        train_seconds = time.perf_counter() - epoch_start
        model.eval()
        correct = 0
        with torch.inference_mode():
            for i in range(0, len(test_y), 500):
                correct += (model(normalize(test_x[i:i + 500])).argmax(1) == test_y[i:i + 500]).sum().item()
        history.append({"epoch": epoch + 1, "test_acc": correct / len(test_y), "train_seconds": train_seconds,
                        "epoch_seconds": time.perf_counter() - epoch_start})
        print(f"[plain] epoch {epoch + 1}/{epochs}: test_acc {history[-1]['test_acc']:.4f}, "
              f"{train_seconds:.0f} s training ({len(train_y) / train_seconds:.0f} img/s)", flush=True)
    return {"history": history, "wall": time.perf_counter() - started, "train_images": len(train_y)}


# -- the pipeline -------------------------------------------------------------------------------------
def pipeline_overrides(root: Path, epochs: int, subset: int | None, workdir: str, seed: int = 0,
                       extra: tuple[str, ...] = ()) -> list[str]:
    # train.seed: initialisation, order and flips, as the plain loop's seed; the train/val split (data.seed)
    # stays the preset's.
    overrides = [f"workdir={workdir}", "train.models=[resnet18]", f"train.epochs={epochs}", f"data.root={root}",
                 f"train.seed={seed}",
                 # Every epoch's checkpoint stays, so each can be tested afterwards (retention is not part of
                 # the run's fingerprint and costs no time: every epoch is checkpointed anyway).
                 f"train.checkpoints_to_keep={epochs}"]
    return overrides + ([f"data.train_subset={subset}"] if subset is not None else []) + list(extra)


def evaluate_checkpoints(cfg, run_name: str) -> dict[int, float]:
    """Test accuracy of each of a run's epoch checkpoints, through the spec and splits the pipeline used."""
    from torch.utils.data import DataLoader

    from pipelines.checkpoints import CHECKPOINT_FILE, load_checkpoint
    from pipelines.data import SplitDataset, load_splits

    test = load_splits(cfg.data).test
    accuracy = {}
    for path in sorted(Path(cfg.paths.storage).glob(f"**/{run_name}/**/{CHECKPOINT_FILE}")):
        checkpoint = load_checkpoint(path)
        model = checkpoint.build_model()
        correct = 0
        with torch.inference_mode():
            for images, labels in DataLoader(SplitDataset(test, checkpoint.spec), batch_size=500):
                correct += (model(checkpoint.spec.normalize(images)).argmax(1) == labels).sum().item()
        accuracy[checkpoint.epoch + 1] = correct / len(test)
    return accuracy


def train_pipeline(root: Path, epochs: int, subset: int | None, workdir: str, seed: int = 0,
                   extra: tuple[str, ...] = ()) -> dict:
    """``python -m pipelines train`` on the preset (timed), then its record and each epoch's test accuracy."""
    from pipelines.config import load_config
    from pipelines.data import describe_dataset
    from pipelines.results import load_results

    overrides = pipeline_overrides(root, epochs, subset, workdir, seed, extra)
    command = [sys.executable, "-m", "pipelines", "train", "--config", PRESET]
    for override in overrides:
        command += ["--set", override]
    print("[pipeline]", " ".join(command), flush=True)
    started = time.perf_counter()
    # RAY_ADDRESS=local: a Ray of its own. With no address, ray.init() joins a cluster that `ray start` left
    # running on this machine (other users' work, other resources), which would make the times meaningless.
    code = subprocess.run(command, cwd=REPO, env={**os.environ, "RAY_ADDRESS": "local"}).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"the pipeline exited with {code}")
    cfg = load_config(str(REPO / PRESET), overrides)
    result = load_results(cfg.paths.train_dir)["resnet18"]
    print("[pipeline] testing each epoch's checkpoint (not timed)...", flush=True)
    tested = evaluate_checkpoints(cfg, result.run_name)
    if abs(tested.get(result.best_epoch + 1, -1.0) - result.test_acc) > 1e-3:
        print(f"[pipeline] note: its own test of epoch {result.best_epoch + 1} gave {result.test_acc:.4f}, "
              f"this script's {tested.get(result.best_epoch + 1)}", flush=True)
    history = [{"epoch": h["epoch"] + 1, "test_acc": tested.get(h["epoch"] + 1), "val_acc": h["val_acc"],
                "train_seconds": h["epoch_seconds"]} for h in result.history]
    return {"history": history, "wall": wall, "train_images": describe_dataset(cfg.data).sizes["train"],
            "record_test_acc": result.test_acc, "best_epoch": result.best_epoch + 1}


# -- the tables ---------------------------------------------------------------------------------------
def tables(plain: dict | None, pipeline: dict | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per epoch: test accuracy and training seconds of each, and their ratio; the summary: wall times."""
    epochs = pd.DataFrame({"epoch": [h["epoch"] for h in (plain or pipeline)["history"]]})
    if plain:
        epochs["plain test_acc"] = [h["test_acc"] for h in plain["history"]]
    if pipeline:
        epochs["pipeline test_acc"] = [h["test_acc"] for h in pipeline["history"]]
        epochs["pipeline val_acc"] = [h["val_acc"] for h in pipeline["history"]]
    if plain:
        epochs["plain train s"] = [h["train_seconds"] for h in plain["history"]]
    if pipeline:
        epochs["pipeline train s"] = [h["train_seconds"] for h in pipeline["history"]]
    if plain and pipeline:
        epochs["test_acc difference"] = epochs["pipeline test_acc"] - epochs["plain test_acc"]
        epochs["train s ratio"] = epochs["pipeline train s"] / epochs["plain train s"]
    rows = []
    for name, run in (("plain", plain), ("pipeline", pipeline)):
        if run:
            loops = sum(h["train_seconds"] for h in run["history"])
            rows.append({"run": name, "train images": run["train_images"], "test_acc": final_test_acc(run),
                         "wall s": run["wall"],
                         "training loops s": loops, "train img/s": run["train_images"] * len(run["history"]) / loops})
    runs = pd.DataFrame(rows).astype({"train images": float})
    summary = _rounded(runs)
    if plain and pipeline:
        ratio = (runs.iloc[1, 1:] / runs.iloc[0, 1:]).astype(float).round(3)
        summary = pd.concat([summary, pd.DataFrame([{"run": "pipeline / plain", **ratio.to_dict()}])],
                            ignore_index=True)
    return _rounded(epochs), summary


def _rounded(table: pd.DataFrame) -> pd.DataFrame:
    """Seconds and throughput to 0.1, the rest (accuracies, ratios) to 4 places."""
    return table.round({c: 1 for c in table.columns if c.endswith((" s", "img/s"))}).round(4)


def final_test_acc(run: dict) -> float:
    """What a user gets: the plain loop's last epoch; the pipeline's checkpoint it chose by validation accuracy
    (the one it registers and serves), which need not be its last epoch's."""
    return run["record_test_acc"] if "record_test_acc" in run else run["history"][-1]["test_acc"]


def seed_table(pairs: dict[int, tuple[dict | None, dict | None]]) -> pd.DataFrame:
    """One row per seed (each side's test accuracy as `final_test_acc` takes it, the pipeline's last epoch's too,
    the wall times, the accuracy difference and the wall-time ratio), then the
    mean over seeds (the median for the wall-time ratio, which this noisy machine skews) and the median of each."""
    rows = []
    for seed, (plain, pipeline) in pairs.items():
        row = {"seed": str(seed)}
        if plain:
            row |= {"plain test_acc": plain["history"][-1]["test_acc"], "plain wall s": plain["wall"]}
        if pipeline:
            row |= {"pipeline test_acc": final_test_acc(pipeline),
                    "pipeline last epoch's": pipeline["history"][-1]["test_acc"], "pipeline wall s": pipeline["wall"]}
        if plain and pipeline:
            row |= {"test_acc difference": row["pipeline test_acc"] - row["plain test_acc"],
                    "wall ratio": row["pipeline wall s"] / row["plain wall s"]}
        rows.append(row)
    table = pd.DataFrame(rows)
    mean = table.drop(columns="seed").mean()
    if "wall ratio" in table:
        mean["wall ratio"] = table["wall ratio"].median()
    median = table.drop(columns="seed").median()
    table = pd.concat([table, pd.DataFrame([{"seed": "mean (ratio: median)", **mean.to_dict()},
                                            {"seed": "median", **median.to_dict()}])], ignore_index=True)
    return _rounded(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each runs both sides (plain first for "
                        "the 1st, 3rd, ... seed, the pipeline first for the others), and the goal is judged on the "
                        "mean accuracy and the median wall-time ratio")
    parser.add_argument("--subset", type=int, help="train on this many images (a smoke run); default: all")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="the four Fashion-MNIST IDX files")
    parser.add_argument("--workdir", help="the pipeline's workdir, kept afterwards (default: a temporary directory, "
                        "removed after); one that holds a finished run skips its training, so the times mean nothing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for the pipeline's preset (repeatable), to try a recipe change")
    parser.add_argument("--plain-split", choices=["all", "pipeline"], default="all",
                        help="the plain loop's training images: all 60,000, or only the pipeline's training split "
                        "(the preset's data.val_fraction held out), to compare the two recipes on the same images")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = parser.parse_args()
    if args.skip_plain and args.skip_pipeline:
        parser.error("nothing to run: --skip-plain and --skip-pipeline")
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: at least 1")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    # Absolute before the chdir below: the pipeline runs from the repository and reads these from there.
    args.data_root = args.data_root.expanduser().resolve()
    if args.workdir:
        args.workdir = str(Path(args.workdir).expanduser().resolve())
    from pipelines.config import ConfigError, load_config
    try:
        use_gpu = load_config(str(REPO / PRESET), [f"data.root={args.data_root}", *args.overrides]).train.use_gpu
    except ConfigError as err:
        parser.error(f"--set: {err}")
    if not args.skip_pipeline:  # each seed's whole config, before the first side runs (the plain loop: minutes)
        for seed in seeds:
            try:
                load_config(str(REPO / PRESET), pipeline_overrides(args.data_root, args.epochs, args.subset,
                                                                   args.workdir or "/tmp", seed, tuple(args.overrides)))
            except ConfigError as err:
                parser.error(f"--epochs, --subset or --seeds (seed {seed}): {err}")
    if use_gpu:
        parser.error("--set train.use_gpu=true: the plain loop runs on this machine's CPUs, so the comparison "
                     "would set a GPU against CPUs (bench/published.py measures the preset on GPUs)")
    if missing := missing_idx_files(args.data_root):  # both sides read these; neither downloads here
        parser.error(f"--data-root {args.data_root} lacks {', '.join(missing)} (install Debian's "
                     "dataset-fashion-mnist, or point --data-root at the four IDX files)")
    os.chdir(REPO)  # `python -m pipelines` must import this checkout
    show = (lambda t: t.to_markdown(index=False)) if args.markdown else (lambda t: t.to_string(index=False))

    pairs: dict[int, tuple[dict | None, dict | None]] = {}
    for index, seed in enumerate(seeds):
        def run_plain(seed=seed):
            if args.skip_plain:
                return None
            return train_plain(args.data_root, args.epochs, args.subset, seed, args.plain_split == "pipeline",
                               tuple(args.overrides))

        def run_pipeline(seed=seed):
            if args.skip_pipeline:
                return None
            with tempfile.TemporaryDirectory(prefix="cnnzoo-accuracy-") as tmp:
                workdir = f"{args.workdir}/seed{seed}" if args.workdir and len(seeds) > 1 else args.workdir or tmp
                return train_pipeline(args.data_root, args.epochs, args.subset, workdir, seed, tuple(args.overrides))

        # Interleaved, seed by seed, and each side first for every other seed: a slow spell of this shared
        # machine (or its drift within a run) falls on both sides rather than on all of one side.
        if index % 2 == 0:
            plain = run_plain()
            pipeline = run_pipeline()
        else:
            pipeline = run_pipeline()
            plain = run_plain()
        pairs[seed] = (plain, pipeline)
        epochs, summary = tables(plain, pipeline)
        print(f"\nFashion-MNIST, resnet18, {args.epochs} epoch(s), seed {seed}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        print(show(epochs))
        print()
        print(show(summary))
        if pipeline:
            print(f"\npipeline: its own test of its best checkpoint (epoch {pipeline['best_epoch']}): "
                  f"{pipeline['record_test_acc']:.4f}; it trains on the training images less data.val_fraction",
                  flush=True)

    if len(seeds) > 1:
        print(f"\nFashion-MNIST, resnet18, {args.epochs} epoch(s), {len(seeds)} seeds")
        print(show(seed_table(pairs)))
    if not (args.skip_plain or args.skip_pipeline):
        # As the tables take them (final_test_acc): the pipeline's chosen checkpoint, what `pipelines train` gives.
        plain_acc = np.mean([final_test_acc(plain) for plain, _ in pairs.values()])
        pipeline_acc = np.mean([final_test_acc(pipeline) for _, pipeline in pairs.values()])
        pipeline_last = np.mean([pipeline["history"][-1]["test_acc"] for _, pipeline in pairs.values()])
        wall_ratio = np.median([pipeline["wall"] / plain["wall"] for plain, pipeline in pairs.values()])
        reached, faster = pipeline_acc >= plain_acc, wall_ratio <= 1.0
        over = f"the mean over {len(seeds)} seeds, " if len(seeds) > 1 else ""
        if args.plain_split == "pipeline":  # the goal is set against the plain loop on all 60,000 images
            over += "the plain loop on the pipeline's training split, not the goal's 60,000 images; "
        print(f"goal (the pipeline reaches the plain loop's final test accuracy in at most its wall time; {over}"
              f"test_acc of the pipeline's chosen checkpoint {pipeline_acc:.4f} (its last epoch's {pipeline_last:.4f}) "
              f"against {plain_acc:.4f}, wall-time ratio {wall_ratio:.3f}): "
              f"{'yes' if reached and faster else 'NO'} (accuracy {'yes' if reached else 'no'}, "
              f"time {'yes' if faster else 'no'})")


if __name__ == "__main__":
    main()
