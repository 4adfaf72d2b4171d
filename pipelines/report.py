"""The comparison report: one table of every trained model and the plots that put them side by side.

Written to ``<workdir>/<name>/report/`` (``models.csv``, ``models.md``, PNG plots) and logged to the latest
training parent run in MLflow:

* ``accuracy_vs_macs.png`` and ``accuracy_vs_params.png``: test accuracy against compute and size, the
  EfficientNet paper's Figure 1 for the user's data (the searched EfficientNet family joined by a line);
* ``val_curves.png``: validation accuracy per epoch for every model;
* ``search.png``: each search trial's alpha, beta and gamma against its validation accuracy.

Serving latency is the median single-image inference time of the model as the server runs it (batch norm
folded, ``torch.inference_mode``), measured in this process.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

import cnnmodels

from .config import PipelineConfig
from .results import ModelResult, comparison_table, load_results

__all__ = ["ReportResult", "report_stage", "measure_latency_ms"]

logger = logging.getLogger(__name__)


@dataclass
class ReportResult:
    table: pd.DataFrame
    directory: Path
    files: list[Path]


def measure_latency_ms(result: ModelResult, repeats: int = 20) -> float:
    """Median single-image latency (ms) of the serving form of a trained model."""
    from .checkpoints import load_checkpoint
    from .model_store import fold_batchnorm

    checkpoint = load_checkpoint(result.checkpoint_path)
    model, _ = fold_batchnorm(checkpoint.build_model(), checkpoint.spec)
    x = torch.randn(1, *checkpoint.spec.input_shape)
    timings = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            start = time.perf_counter()
            model(x)
            if i >= 3:  # warm-up runs excluded
                timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)


def _scatter(ax, results: list[ModelResult], x_of, xlabel: str) -> None:
    family = sorted((r for r in results if cnnmodels.is_family_member(r.model_name)), key=x_of)
    others = [r for r in results if r not in family]
    for r in others:
        ax.scatter(x_of(r), r.test_acc, s=36)
        ax.annotate(r.model_name, (x_of(r), r.test_acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if family:
        ax.plot([x_of(r) for r in family], [r.test_acc for r in family], "o-", color="crimson",
                label="EfficientNet (searched coefficients)")
        for r in family:
            ax.annotate(r.model_name.replace("efficientnet_", ""), (x_of(r), r.test_acc), textcoords="offset points",
                        xytext=(4, -10), fontsize=8, color="crimson")
        ax.legend(fontsize=8, loc="best")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)


def _plots(results: list[ModelResult], search, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, x_of, label in (("accuracy_vs_macs.png", lambda r: max(r.macs, 1) / 1e6, "MMACs per image (log)"),
                              ("accuracy_vs_params.png", lambda r: max(r.params_count, 1) / 1e6,
                               "parameters, millions (log)")):
        fig, ax = plt.subplots(figsize=(7, 5))
        _scatter(ax, results, x_of, label)
        ax.set_title(f"Test accuracy vs {'compute' if 'macs' in name else 'size'}")
        fig.tight_layout()
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        files.append(directory / name)

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in results:
        epochs = [h["epoch"] + 1 for h in r.history]
        ax.plot(epochs, [h["val_acc"] for h in r.history], marker="o", markersize=3, label=r.model_name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation accuracy per epoch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(directory / "val_curves.png", dpi=110)
    plt.close(fig)
    files.append(directory / "val_curves.png")

    if search is not None and search.trials:
        trials = pd.DataFrame(search.trials)
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), sharey=True)
        for ax, key in zip(axes, ("alpha", "beta", "gamma"), strict=True):
            ax.scatter(trials[key], trials["val_acc"], c=trials["compound_product"], cmap="viridis", s=40)
            best = search.best
            ax.scatter([best[key]], [best["val_acc"]], marker="*", s=200, color="crimson", label="best")
            paper = trials[trials["paper"]]
            if not paper.empty:
                ax.scatter(paper[key], paper["val_acc"], marker="s", facecolors="none", edgecolors="black", s=90,
                           label="paper (1.2, 1.1, 1.15)")
            ax.set_xlabel(key)
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("validation accuracy")
        axes[0].legend(fontsize=7)
        fig.suptitle("Compound-scaling search (colour: alpha * beta^2 * gamma^2)")
        fig.tight_layout()
        fig.savefig(directory / "search.png", dpi=110)
        plt.close(fig)
        files.append(directory / "search.png")
    return files


def _measure_latencies(results: list[ModelResult]) -> None:
    for r in results:
        try:
            r.serving_latency_ms = measure_latency_ms(r)
        except Exception as err:  # noqa: BLE001 - a missing checkpoint should not sink the report
            logger.warning("[report] %s: latency not measured (%s)", r.model_name, err)


def report_stage(cfg: PipelineConfig, *, latency: bool = True) -> ReportResult:
    """Build the table and plots from the finished models, save them and log them to MLflow."""
    from .search import load_search_result
    from .tracking import Tracker

    paths = cfg.paths
    results = list(load_results(paths.train_dir).values())
    if not results:
        raise LookupError(f"no trained models under {paths.train_dir}; run the train stage first")
    if latency:
        _measure_latencies(results)
    tracker = Tracker.for_config(cfg)
    table = comparison_table(results, champion=tracker.champion_alias(cfg.registered_model_name))
    directory = paths.report_dir
    directory.mkdir(parents=True, exist_ok=True)
    table.to_csv(directory / "models.csv", index=False)
    (directory / "models.md").write_text(table.to_markdown(index=False) + "\n")
    search = load_search_result(cfg)  # only a search with this config's settings
    files = [directory / "models.csv", directory / "models.md"] + _plots(results, search, directory)

    parent = tracker.find_run("tags.stage = 'train' and tags.`cnnzoo.stage_parent` = 'true'")
    if parent is not None:
        for path in files:
            tracker.log_artifact(parent.info.run_id, path, "report")
    logger.info("\n%s", table.to_string(index=False))
    logger.info("[report] %d models; table and plots in %s", len(results), directory)
    return ReportResult(table=table, directory=directory, files=files)
