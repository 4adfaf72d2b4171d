"""The whole Fashion-MNIST preset on one GPU machine, against the data set's published benchmark table.

Runs ``python -m pipelines run --config pipelines/configs/fashion-mnist.yaml --stages search,train,report`` (the
preset's search, its seven ``train.models`` and the three EfficientNet members, each with the preset's own
epochs and recipe; no serving) on the GPUs of this machine, every model and search trial on a share of a GPU
(``--gpu-share``, 0.1 by default: the ten models of the train stage at once on one GPU), then prints each
model's test accuracy beside the nearest row of the published table (zalandoresearch/fashion-mnist,
"Benchmark"), the difference in points, and whether the goal is met: every model at least its published
number where the table has one, the best at least 0.955.

``--deadline`` ends the run within that many seconds: a Ctrl-C ``--stop-grace`` seconds before it (finished
models keep their records, the abort sends or keeps its MLflow writes), a kill at the deadline if it is still
running; then it reports what finished; ``--report-only WORKDIR`` prints the table of an earlier run without training.

    python bench/published.py --data-root /usr/share/datasets/fashion-mnist --markdown
    python bench/published.py --deadline 540 --workdir /tmp/runs          # a lent GPU machine's budget
    python bench/published.py --report-only /tmp/runs --markdown     # with the run's own --data-root and --set
    python bench/published.py --gpu-share 0 --set data.train_subset=600 --set train.epochs=1 \\
        --set search.epochs=1 --set search.num_trials=2           # a CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
PRESET = "pipelines/configs/fashion-mnist.yaml"

#: zalandoresearch/fashion-mnist's README, "Benchmark" (test accuracy). An exact row is the same architecture;
#: a nearest one is the same family at another depth or width (VGG-11 against VGG16, DenseNet-121 against
#: DenseNet-BC), which the goal counts too.
PUBLISHED = {
    "resnet18": ("ResNet18", 0.949, "exact"),
    "googlenet": ("GoogLeNet", 0.937, "exact"),
    "vgg11_bn": ("VGG16", 0.935, "nearest"),
    "vgg16_bn": ("VGG16", 0.935, "exact"),
    "densenet121": ("DenseNet-BC", 0.954, "nearest"),
}
BEST_GOAL = 0.955


def preset_overrides(args: argparse.Namespace, workdir: Path, *, devices: bool = True) -> list[str]:
    """The preset's overrides of this invocation: the run's and its table's must agree on the data (``data.root``
    is in the search's fingerprint: without it, the table found no finished search and left the EfficientNet
    members that had not finished out of it, instead of listing them as such). ``devices``: with the GPU keys,
    which the table does not need (they are not in the fingerprints) and a machine without a GPU refuses."""
    overrides = [f"workdir={workdir}"]
    if devices and args.gpu_share > 0:
        overrides += ["train.use_gpu=true", f"train.gpus_per_worker={args.gpu_share}"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    return overrides + args.set


def run_preset(args: argparse.Namespace, workdir: Path) -> tuple[int, float]:
    """Run the preset's stages in ``workdir``, stopped with SIGINT at the deadline; (exit code, seconds)."""
    overrides = preset_overrides(args, workdir)
    command = [sys.executable, "-m", "pipelines", "run", "--config", str(REPO / PRESET), "--stages", args.stages]
    for item in overrides:
        command += ["--set", item]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    # Its own process group, so that the deadline's Ctrl-C reaches the command and not this script; a Ctrl-C or
    # SIGTERM to this script is passed on the same way, so no orphaned run holds the GPU.
    # (SIGINT restored: a script started in the background, as `cmd &` in a shell script, hands its children an
    # ignored SIGINT, and the run would not hear the deadline.)
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    grace = min(args.stop_grace, args.deadline / 2) if args.deadline else args.stop_grace
    try:
        process.wait(timeout=args.deadline - grace if args.deadline else None)
    except subprocess.TimeoutExpired:
        print(f"[published] {grace:g} s before the deadline of {args.deadline:g} s: stopping the run (Ctrl-C)",
              flush=True)
        _stop(process, grace)
    except KeyboardInterrupt:
        print("[published] interrupted: stopping the run (Ctrl-C)", flush=True)
        _stop(process, grace)
    return process.returncode, time.perf_counter() - start


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop(process: subprocess.Popen, grace: float) -> None:
    """Ctrl-C to the run, then ``grace`` seconds for its abort to send or keep its MLflow writes before it is
    killed."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:  # it had ended
        process.wait()


def published_table(overrides: list[str]) -> pd.DataFrame:
    """One row per trained model of the preset run with ``overrides`` (:func:`preset_overrides`): its accuracy
    beside the published row."""
    from pipelines.config import load_config
    from pipelines.planning import resolve_models
    from pipelines.results import load_results
    from pipelines.search import searched_coefficients

    cfg = load_config(REPO / PRESET, overrides)
    results = load_results(cfg.paths.train_dir)
    # What the train stage planned: train.models and, after a finished search, the EfficientNet members (an
    # unfinished one is a "not finished" row, not left out).
    planned = [choice.name for choice in resolve_models(cfg, searched_coefficients(cfg))]
    expected = list(dict.fromkeys([*planned, *results]))
    rows = []
    for name in expected:
        result = results.get(name)
        published_name, published_acc, match = PUBLISHED.get(name, ("", float("nan"), ""))
        row = {"model": name, "epochs": None, "test_acc": float("nan"), "best val_acc (epoch)": "not finished",
               "train s": None, "train img/s": None, "published": f"{published_name} ({match})" if match else "no row",
               "published acc": published_acc}
        if result is not None:
            # (the epochs it trained: fewer than the preset's for a run that diverged and stopped)
            row.update(epochs=result.epochs_trained, test_acc=result.test_acc,
                       **{"best val_acc (epoch)": f"{result.best_val_acc:.4f} ({result.best_epoch + 1})",
                          "train s": round(result.train_seconds), "train img/s": round(result.train_images_per_sec)})
        rows.append(row)
    table = pd.DataFrame(rows).astype({"epochs": "Int64", "train s": "Int64", "train img/s": "Int64"})
    table["difference (points)"] = ((table["test_acc"] - table["published acc"]) * 100).round(2)
    return table


def goal_lines(table: pd.DataFrame) -> list[str]:
    """Whether every model with a published row reached it, and the best reached BEST_GOAL."""
    with_row = table[table["published acc"].notna()]
    short = with_row[~(with_row["test_acc"] >= with_row["published acc"])]
    best = table["test_acc"].max()
    lines = ["every model at least its published number: " + (
        "met" if short.empty else "not met (" + ", ".join(
            f"{r.model} not finished" if r.test_acc != r.test_acc else
            f"{r.model} {r.test_acc:.4f} < {r['published acc']:.3f}" for _, r in short.iterrows()) + ")")]
    best_name = table.loc[table["test_acc"].idxmax(), "model"] if table["test_acc"].notna().any() else "none"
    lines.append(f"best at least {BEST_GOAL}: {'met' if best >= BEST_GOAL else 'not met'} "
                 f"({best_name} {best:.4f})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where the run goes (default: a new temporary directory, kept "
                        "for --report-only; its path is printed)")
    parser.add_argument("--data-root", help="the folder of Fashion-MNIST's four IDX files (data.root)")
    parser.add_argument("--gpu-share", type=float, default=0.1,
                        help="share of a GPU per model and search trial (0: train on CPUs)")
    parser.add_argument("--stages", default="search,train,report")
    parser.add_argument("--deadline", type=float, default=0,
                        help="end the run within this many seconds, the table after it (0: none)")
    parser.add_argument("--stop-grace", type=float, default=60,
                        help="with --deadline: the Ctrl-C comes this many seconds before it (at most half of it), "
                        "for the run's abort; a kill at the deadline (default 60)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config override")
    parser.add_argument("--report-only", type=Path, metavar="WORKDIR", help="only print the table of this workdir")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    # Absolute: the run starts in the repository, and the table is read from here.
    for key in ("workdir", "data_root", "report_only"):
        if getattr(args, key):
            setattr(args, key, Path(getattr(args, key)).expanduser().resolve())

    if args.report_only:
        from pipelines.config import ConfigError, load_config

        try:
            run_dir = load_config(REPO / PRESET, preset_overrides(args, args.report_only, devices=False)).paths.run_dir
        except ConfigError as err:
            parser.error(f"--set: {err}")
        if not run_dir.is_dir():
            parser.error(f"--report-only {args.report_only}: no run of the preset there ({run_dir} is missing); "
                         "give the run's --workdir (and its --set name=..., if it had one)")
        workdir, code = args.report_only, 0
    else:
        from pipelines.config import ConfigError, load_config, ray_address

        try:
            cfg = load_config(REPO / PRESET, preset_overrides(args, REPO, devices=False))
        except ConfigError as err:
            parser.error(f"--set: {err}")
        local_ray = ray_address(cfg) in (None, "local")
        if args.gpu_share > 0 and local_ray:  # (joining a cluster: the GPUs are its workers', not this machine's)
            import torch

            if not torch.cuda.is_available():
                parser.error(f"--gpu-share {args.gpu_share:g}: this machine has no GPU (--gpu-share 0 trains on CPUs)")
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="published-"))
        code, seconds = run_preset(args, workdir)
        print(f"[published] the run ended with exit code {code} after {seconds:.0f} s (workdir {workdir})")
        if code == 2:  # the pipeline refused the config: nothing ran, and a table of "not finished" would read as one
            return code
    table = published_table(preset_overrides(args, workdir, devices=False))
    published = [row if row == "no row" else f"{row} {acc:.3f}"
                 for row, acc in zip(table["published"], table["published acc"], strict=True)]
    shown = table.drop(columns=["published acc"]).assign(test_acc=table["test_acc"].round(4), published=published)
    print(shown.to_markdown(index=False) if args.markdown else shown.to_string(index=False))
    for line in goal_lines(table):
        print("goal:", line)
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's 128 + its number


if __name__ == "__main__":
    sys.exit(main())
