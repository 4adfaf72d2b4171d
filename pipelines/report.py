"""The comparison report: one table of every trained model and the plots that put them side by side.

Written to ``<workdir>/<name>/report/`` (``models.csv``, ``models.md``, PNG plots) and logged to the latest
training parent run in MLflow:

* ``accuracy_vs_macs.png`` and ``accuracy_vs_params.png``: test accuracy against compute and size, the
  EfficientNet paper's Figure 1 for the user's data (the searched EfficientNet family joined by a line, and
  with ``search.compare_paper`` the family of the paper's coefficients by a second one);
* ``families.csv`` and ``families.md`` (with ``search.compare_paper``): the searched and the paper's member at
  each phi side by side, and which won (:func:`family_comparison`);
* ``val_curves.png``: validation accuracy per epoch for every model;
* ``search.png``: each search trial's alpha, beta and gamma against its validation accuracy.

Serving latency is the median single-image inference time of the model as a replica runs it (batch norm
folded and traced as ``serve`` says, on a replica's threads), measured in this process.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

import cnnmodels

from .config import PipelineConfig, ServeConfig
from .model_store import replica_threads
from .paths import atomic_writer, write_text_atomically
from .planning import PAPER_FAMILY, SEARCHED_FAMILY
from .results import ModelResult, as_text, comparison_table, for_display, load_results, to_markdown
from .search_space import PAPER

__all__ = ["ReportResult", "report_stage", "measure_latency_ms", "family_comparison", "accuracy_figure",
           "val_curves_figure", "stale_members"]

logger = logging.getLogger(__name__)


#: How each EfficientNet family is drawn: (who chose its coefficients, colour, line style).
_FAMILY_STYLES = {SEARCHED_FAMILY: ("searched", "crimson", "o-"), PAPER_FAMILY: ("paper", "royalblue", "s--")}


@dataclass
class ReportResult:
    table: pd.DataFrame
    directory: Path
    files: list[Path]
    #: The searched family against the paper's, one row per phi (None without members of both).
    families: pd.DataFrame | None = None


def measure_latency_ms(result: ModelResult, serve: ServeConfig | None = None, repeats: int = 20,
                       storage_path: str = "") -> float:
    """Median single-image latency (ms) of a trained model in the form a replica serves it (``serve``: batch
    norm folded and traced as it says, on as many threads as a replica of ``serve.num_cpus`` uses, on the GPU
    with ``serve.num_gpus`` where this process has one; default: folded, traced, one CPU thread). The eager
    model on all of the driver's threads read up to 2x faster than the replica's traced one on its one thread.
    ``storage_path``: the run's storage (``paths.storage``), whose scheme the recorded checkpoint path lacks
    (Ray reports ``bucket/...`` for ``s3://bucket/...``)."""
    from .checkpoints import load_checkpoint
    from .model_store import prepare_for_serving
    from .trials import reported_checkpoint_dir

    serve = serve or ServeConfig()
    # A replica with a GPU share runs on the GPU; measured there when this process has one (else on the CPU).
    device = torch.device("cuda" if serve.num_gpus > 0 and torch.cuda.is_available() else "cpu")
    with reported_checkpoint_dir(result.checkpoint_path, storage_path) as directory:
        checkpoint = load_checkpoint(directory)
    loaded = prepare_for_serving(checkpoint.build_model(), checkpoint.spec, fold=serve.fold_batchnorm,
                                 trace=serve.trace_models, device=device)
    x = torch.randn(1, *checkpoint.spec.input_shape, device=device)
    timings = []
    threads = torch.get_num_threads()
    torch.set_num_threads(replica_threads(serve))
    try:
        with torch.inference_mode():
            for i in range(repeats + 3):
                start = time.perf_counter()
                loaded.model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 3:  # warm-up runs excluded (a traced model optimises itself on its first calls)
                    timings.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(timings)


def _phi(result: ModelResult) -> float:
    return float(result.model_kwargs.get("phi", cnnmodels.resolve_model_name(result.model_name)[1].get("phi", 0.0)))


def _triple(values) -> str:
    return "({:g}, {:g}, {:g})".format(*values)


def _coefficients(result: ModelResult) -> str:
    """A member's (alpha, beta, gamma); one named in train.models without them has the builder's, the paper's."""
    return _triple(result.model_kwargs.get(k, default) for k, default in zip(("alpha", "beta", "gamma"), PAPER,
                                                                               strict=True))


def _reference_triple(prefix: str, members: list[ModelResult], searched: tuple[float, float, float] | None) -> str:
    """A family's triple: the searched family's is ``searched`` (the current search's), else that of its lowest
    phi above 0 (phi 0 is B0 whatever the triple: its record may be of an earlier search, kept for that)."""
    if prefix == SEARCHED_FAMILY and searched:
        return _triple(searched)
    scaled = [r for r in members if _phi(r) > 0]
    return _coefficients((scaled or members)[0])


def _families(results: list[ModelResult], searched: tuple[float, float, float] | None = None,
              ) -> dict[str, list[ModelResult]]:
    """The EfficientNet family members among ``results`` by family prefix, each sorted by phi. A family's members
    share one triple (:func:`_reference_triple`), so a member left from an earlier search (not trained again
    yet: fewer phis now, a failed run) is no member; the phi-0 member, B0 whatever the triple, always is."""
    families: dict[str, list[ModelResult]] = {}
    for r in results:
        prefix = cnnmodels.family_of(r.model_name)
        if prefix in _FAMILY_STYLES:
            families.setdefault(prefix, []).append(r)
    kept = {}
    for prefix, members in families.items():
        members.sort(key=_phi)
        reference = _reference_triple(prefix, members, searched)
        if same := [r for r in members if _phi(r) == 0 or _coefficients(r) == reference]:
            kept[prefix] = same
    return kept


def stale_members(results: list[ModelResult], searched: tuple[float, float, float] | None) -> list[ModelResult]:
    """Records named as EfficientNet family members whose coefficients are not their family's (see
    :func:`_families`): shown on their own, not joined to the family or compared."""
    members = {id(r) for family in _families(results, searched).values() for r in family}
    return [r for r in results if cnnmodels.family_of(r.model_name) in _FAMILY_STYLES and id(r) not in members]


def family_comparison(results: list[ModelResult], searched: tuple[float, float, float] | None = None,
                      ) -> pd.DataFrame | None:
    """The searched EfficientNet family against the paper's (``search.compare_paper``): one row per phi with
    each member's MACs and test accuracy, the difference (searched - paper) and ``winner`` (``searched``,
    ``paper``, ``tie``; ``same model`` at phi 0, where both families are B0 and the paper's is not trained; empty
    where one of the two, or a test accuracy, is missing, or the two trained for different epochs or were
    tested on different test images). None unless both families have members and their triples differ.
    ``searched``: the current search's triple (members of another are left out)."""
    families = _families(results, searched)
    if SEARCHED_FAMILY not in families or PAPER_FAMILY not in families:
        return None
    searched_triple = _reference_triple(SEARCHED_FAMILY, families[SEARCHED_FAMILY], searched)
    if searched_triple == _triple(PAPER):
        return None  # the search found the paper's: one family
    by_phi: dict[float, dict[str, ModelResult]] = {}
    for prefix, members in families.items():
        for r in members:
            by_phi.setdefault(_phi(r), {})[prefix] = r
    rows = []
    for phi in sorted(by_phi):
        searched, paper = by_phi[phi].get(SEARCHED_FAMILY), by_phi[phi].get(PAPER_FAMILY)
        same_model = phi == 0 and searched is not None
        if same_model:  # B0 either way: the searched one is this training's (a paper_phi0 record is older)
            paper = searched
        row: dict[str, object] = {"phi": phi}
        for label, r in (("searched", searched), ("paper", paper)):
            row[label] = r.model_name if r else ""
            # (at phi 0, B0 stands for both families: each is named by its own triple)
            row[f"{label} (alpha, beta, gamma)"] = "" if r is None else (
                _triple(PAPER) if label == "paper" and r is searched
                else searched_triple if label == "searched" and phi == 0 else _coefficients(r))
            row[f"{label} MMACs"] = round(r.macs / 1e6, 1) if r else None
            row[f"{label} test_acc"] = round(r.test_acc, 4) if r else None
        difference = searched.test_acc - paper.test_acc if searched and paper else math.nan
        if searched and paper and not same_model and (
                searched.epochs_trained != paper.epochs_trained or searched.diverged_at
                or paper.diverged_at):  # a shorter or longer training, or one that diverged (B0: itself)
            logger.warning("[report] phi %g: %s was trained for %d epochs%s, %s for %d%s: not compared", phi,
                           searched.model_name, searched.epochs_trained,
                           " (it diverged)" if searched.diverged_at else "", paper.model_name,
                           paper.epochs_trained, " (it diverged)" if paper.diverged_at else "")
            difference = math.nan
        elif searched and paper and not same_model and searched.test_split and paper.test_split and (
                searched.test_split != paper.test_split):  # an image folder's test/ changed between the two
            logger.warning("[report] phi %g: %s and %s were tested on different test images: not compared (a "
                           "`train` re-run tests the older one again)", phi, searched.model_name, paper.model_name)
            difference = math.nan
        if same_model:
            row["difference"], row["winner"] = 0.0, "same model"
        elif math.isfinite(difference):
            # From the accuracies as shown: a win by one image in 30,000 read "0.8414, 0.8413, difference 0.0, tie"
            row["difference"] = round(row["searched test_acc"] - row["paper test_acc"], 4)
            row["winner"] = "tie" if row["difference"] == 0 else ("searched" if row["difference"] > 0 else "paper")
        else:  # a member or its test accuracy missing (a diverged run's NaN): nothing won
            row["difference"], row["winner"] = None, ""
        rows.append(row)
    return pd.DataFrame(rows)


#: Colours and markers of the models outside the EfficientNet families: matplotlib's cycle less its blue and
#: red, which read as the paper's (royalblue) and the searched (crimson) family; a marker per round of colours.
_OTHER_COLORS = ("C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")
_OTHER_MARKERS = "o^sDvPX*"


def _scatter(ax, results: list[ModelResult], x_of, xlabel: str, searched=None) -> None:
    # A score that is not a number has no place on the axes (matplotlib drops it; two or more such points and
    # nothing else failed the log axis, and the report with it): the table lists them.
    results = [r for r in results if math.isfinite(r.test_acc)]
    families = _families(results, searched)
    members = [r for family in families.values() for r in family]
    # Each its own legend entry: names written beside the points ran together where models cost alike (a GPU
    # preset's vgg16_bn and se_vgg16_bn, its five ResNet-sized models), and matplotlib's red passed for a member
    # of the searched family.
    for i, r in enumerate(r for r in results if r not in members):
        ax.scatter(x_of(r), r.test_acc, s=40, color=_OTHER_COLORS[i % len(_OTHER_COLORS)],
                   marker=_OTHER_MARKERS[i // len(_OTHER_COLORS) % len(_OTHER_MARKERS)], label=r.model_name)
    for prefix, family in families.items():
        who, color, style = _FAMILY_STYLES[prefix]
        # Both families start from B0 (phi 0 is the same model whatever the triple, so the paper's is not
        # trained): the paper's line starts from the searched family's, as family_comparison pairs them.
        line = family
        shared = families.get(SEARCHED_FAMILY, [])[:1]
        if prefix == PAPER_FAMILY and shared and _phi(shared[0]) == 0:
            # (a paper_phi0 record is an older training's B0: left out, as the family table leaves it out)
            line = shared + [r for r in family if _phi(r) > 0]
        ax.plot([x_of(r) for r in line], [r.test_acc for r in line], style, color=color,
                label=f"EfficientNet, {who} {_reference_triple(prefix, family, searched)}")
        for r in (r for r in line if r in family):
            ax.annotate(r.model_name.replace("efficientnet_", ""), (x_of(r), r.test_acc), textcoords="offset points",
                        xytext=(4, -10), fontsize=8, color=color)
    if results:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  ncol=2 if len(results) > 24 else 1)
    ax.set_xscale("log")
    ax.margins(x=0.12)  # (the labels of the rightmost points ran under the legend)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)


#: accuracy_vs_<x>.png: (file, the x value of a result, axis label, what the title calls it)
_ACCURACY_PLOTS = {
    "macs": ("accuracy_vs_macs.png", lambda r: max(r.macs, 1) / 1e6, "MMACs per image (log)", "compute"),
    "params": ("accuracy_vs_params.png", lambda r: max(r.params_count, 1) / 1e6, "parameters, millions (log)",
               "size"),
}


def val_curves_figure(results: list[ModelResult]):
    """Each model's validation accuracy per epoch, one line each. Colours repeat after ten (matplotlib's
    cycle), so line styles and markers change with each round of them: a GPU preset trains 13 models."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(figsize=(7, 5))
    ax = fig.subplots()
    for i, r in enumerate(results):
        epochs = [h["epoch"] + 1 for h in r.history]
        ax.plot(epochs, [h["val_acc"] for h in r.history], color=f"C{i % 10}",
                linestyle=("-", "--", ":", "-.")[i // 10 % 4], marker="os^D"[i // 10 % 4], markersize=3,
                label=r.model_name)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # (a 2-epoch run had ticks at 1.2, 1.4, ...)
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation accuracy per epoch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def accuracy_figure(results: list[ModelResult], against: str = "macs",
                    searched: tuple[float, float, float] | None = None):
    """The figure the report saves as ``accuracy_vs_macs.png`` (``against="macs"``) or
    ``accuracy_vs_params.png``: test accuracy of every model, each EfficientNet family a labelled line
    (``searched``: the current search's triple, see :func:`family_comparison`)."""
    _, x_of, label, title = _ACCURACY_PLOTS[against]
    fig = _figure(figsize=(9.5, 5))  # (the legend beside the axes)
    ax = fig.subplots()
    _scatter(ax, results, x_of, label, searched)
    ax.set_title(f"Test accuracy vs {title}")
    fig.tight_layout()
    return fig


def _figure(**kwargs):
    """A matplotlib figure of its own canvas (Agg), outside pyplot: the report leaves the process's backend (a
    notebook's inline one) and pyplot's open figures alone, and needs no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, whole or not at all (a full disk left a cut-off plot beside new tables)."""
    with atomic_writer(path, binary=True) as file:
        fig.savefig(file, format="png", dpi=110)
    return path


def search_figure(search):
    """The search's trials against each coefficient (colour: the compound product), the best starred and the
    paper's triple boxed; on the axis, what the winner was ranked by."""
    trials = pd.DataFrame(search.trials)
    best = search.best
    # What the winner was ranked by: under the MnasNet objective, its score (the best's star sat below trials
    # of higher accuracy and more MACs on a plot of val_acc)
    metric = "score" if search.objective == "mnas" and "score" in trials and "score" in best else "val_acc"
    # A failed trial ranks below every other whatever it reached (search.py): drawn apart, or it stood above the
    # star with nothing to say why it was not the best.
    failed = trials["error"].notna() if "error" in trials else pd.Series(False, index=trials.index)
    fig = _figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3, sharey=True)
    products = trials["compound_product"]
    for ax, key in zip(axes, ("alpha", "beta", "gamma"), strict=True):
        points = ax.scatter(trials[key][~failed], trials[metric][~failed], c=products[~failed], cmap="viridis",
                            vmin=products.min(), vmax=products.max(), s=40)
        if failed.any():
            ax.scatter(trials[key][failed], trials[metric][failed], marker="x", color="grey", s=40,
                       label="failed (ranked last)")
        ax.scatter([best[key]], [best[metric]], marker="*", s=200, color="crimson", label="best")
        paper = trials[trials["paper"]]
        if not paper.empty:
            ax.scatter(paper[key], paper[metric], marker="s", facecolors="none", edgecolors="black", s=90,
                       label="paper (1.2, 1.1, 1.15)")
        ax.set_xlabel(key)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("score: val_acc * (MACs / target)^-0.07" if metric == "score" else "validation accuracy")
    axes[0].legend(fontsize=7)
    fig.suptitle("Compound-scaling search (colour: alpha * beta^2 * gamma^2)")
    fig.tight_layout()
    fig.colorbar(points, ax=list(axes), label="alpha * beta^2 * gamma^2", pad=0.01)
    return fig


def _plots(results: list[ModelResult], search, directory: Path) -> list[Path]:
    files = [_save(accuracy_figure(results, against, _searched_triple(search)), directory / name)
             for against, (name, *_rest) in _ACCURACY_PLOTS.items()]
    files.append(_save(val_curves_figure(results), directory / "val_curves.png"))

    if search is not None and search.trials:
        files.append(_save(search_figure(search), directory / "search.png"))
    return files


def other_trainings(cfg: PipelineConfig, results: list[ModelResult], search) -> list[str]:
    """The records among ``results`` that are not of a training this config plans now (another model, other
    settings or data, fewer epochs: a record the train stage would not skip), by name; empty when the plan
    cannot be made here (the data not on this machine). For an image folder only the models are compared:
    planning its runs checks every file in it again, minutes for a large folder."""
    from .data import describe_dataset
    from .planning import plan_model_runs, resolve_models
    from .tracking import first_line
    from .train import current_results

    try:
        choices = resolve_models(cfg, None if search is None else search.best)
        if cfg.data.dataset == "imagefolder":
            names = {choice.name for choice in choices}
            return [r.model_name for r in results if r.model_name not in names]
        # Never downloaded for a warning: a data set not on this machine leaves the check out.
        runs = plan_model_runs(cfg, describe_dataset(cfg.data.model_copy(update={"download": False})), choices)
    except Exception as err:  # noqa: BLE001 - the report is of the records; the check is a courtesy
        logger.info("[report] cannot tell which records are of this config's training (%s)", first_line(err))
        return []
    current = current_results(cfg, runs)  # the train stage's own test of which records are its training's
    return [r.model_name for r in results if r.model_name not in current]


def _searched_triple(search) -> tuple[float, float, float] | None:
    return None if search is None else tuple(float(search.best[k]) for k in ("alpha", "beta", "gamma"))


#: Serving latencies measured by earlier reports, by model (under the report directory, which a report keeps).
LATENCY_CACHE = ".serving-latency.json"


def _latency_key(result: ModelResult, serve: ServeConfig) -> str:
    """What a measured latency holds for: the checkpoint, how a replica prepares and runs it, and this machine."""
    device = "cuda" if serve.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    return (f"{result.checkpoint_path}|{result.fingerprint}|fold={serve.fold_batchnorm}|trace={serve.trace_models}|"
            f"threads={replica_threads(serve)}|{device}|{platform.node()}")


def _measure_latencies(results: list[ModelResult], serve: ServeConfig, storage_path: str, directory: Path) -> None:
    """Each model's serving latency (:func:`measure_latency_ms`), measured once per checkpoint, serving settings
    and machine: a report re-run with nothing new spent 52 s of 80 on measuring nine unchanged models again
    (loading each checkpoint, folding, tracing), without a word."""
    cache_file = directory / LATENCY_CACHE
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measured afresh
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    todo = [r for r in results if (cache.get(r.model_name) or {}).get("key") != _latency_key(r, serve)]
    for r in results:
        if r not in todo:
            r.serving_latency_ms = float(cache[r.model_name]["ms"])
    if todo:
        logger.info("[report] measuring the serving latency of %d model(s) (each checkpoint once): %s", len(todo),
                    ", ".join(r.model_name for r in todo))
    for r in todo:
        try:
            r.serving_latency_ms = measure_latency_ms(r, serve, storage_path=storage_path)
        except Exception as err:  # noqa: BLE001 - a missing checkpoint should not sink the report
            logger.warning("[report] %s: latency not measured (%s)", r.model_name, err)
            continue
        cache[r.model_name] = {"key": _latency_key(r, serve), "ms": r.serving_latency_ms}
    if todo:
        write_text_atomically(cache_file, json.dumps(cache, indent=2))


def _log_report(tracker, files: list[Path], directory: Path) -> None:
    """Log the report's files to the latest train stage's MLflow run; an unreachable tracking server or artifact
    store (S3 down while MLflow answers) leaves them on disk only, with a warning, as the rest of the report."""
    from .tracking import first_line

    try:
        parent = tracker.find_run("tags.stage = 'train' and tags.`cnnzoo.stage_parent` = 'true'")
        if parent is None:
            logger.warning("[report] no train stage run in MLflow's experiment (another tracking.uri since the "
                           "training?): the report is not logged to MLflow; its files are in %s", directory)
        for path in [] if parent is None else files:
            tracker.log_artifact(parent.info.run_id, path, "report")
        if parent is not None:
            _delete_stale_artifacts(tracker, parent.info.run_id, {path.name for path in files})
    except Exception as err:  # noqa: BLE001 - the files on disk are the report: logging them is a copy
        why = ("unreachable or refuses these credentials" if _mlflow_unusable(err)
               else f"refused them ({type(err).__name__})")
        logger.warning("[report] MLflow or its artifact store is %s (%s): the report is not logged to MLflow; its "
                       "files are in %s", why, first_line(err), directory)


def _delete_stale_artifacts(tracker, run_id: str, written: set[str]) -> None:
    """Delete from the run's ``report/`` the files of an earlier report this one did not write (a search plot or
    a family table of other settings): a report of nothing new lands in the same train run, and MLflow showed the
    old verdict beside the new table. Other files there are left alone; an artifact store that cannot delete
    (some cannot) leaves them, with a line saying so."""
    try:
        listed = tracker.client.list_artifacts(run_id, "report")
    except Exception as err:  # noqa: BLE001 - the report is logged; only the old files' clean-up is left
        logger.warning("[report] MLflow's files of earlier reports were not checked (%s)", type(err).__name__)
        return
    stale = [item.path for item in listed
             if not item.is_dir and Path(item.path).name in REPORT_FILES and Path(item.path).name not in written]
    for path in stale:
        try:
            tracker.delete_artifact(run_id, path)
        except Exception as err:  # noqa: BLE001 - a copy of an old file: said, not fatal
            logger.warning("[report] MLflow keeps %s of an earlier report (its artifact store did not delete it: "
                           "%s)", path, type(err).__name__)


def _mlflow_unusable(err: BaseException) -> bool:
    """Whether MLflow cannot be used now, for a reason outside the report: unreachable, or refusing this
    machine's credentials (an expired token; a 401 failed the report before its files were written)."""
    from .tracking import is_auth_refusal, is_unreachable

    return is_unreachable(err) or is_auth_refusal(err)


#: What a report may write; each run removes those it does not write again (a search.png of a search with other
#: settings, a families table without both families now), so the directory holds one report, not a mix.
REPORT_FILES = ("models.csv", "models.md", *(name for name, *_ in _ACCURACY_PLOTS.values()), "val_curves.png",
                "search.png", "families.csv", "families.md")


def _warn_of_other_test_images(results: list[ModelResult], others: list[str] | tuple[str, ...] = ()) -> None:
    """Name the models tested on other test images than most (an image folder's test/ changed, and their test
    again failed or has not run): ranked by test accuracy beside the others with nothing to tell them apart.
    ``others``: records of other trainings than this config's (:func:`other_trainings`): the test images most of
    this config's own records were tested on are the reference, and only its own are retested by `train`. Which
    of them it retests the report cannot tell (it reads no data): those not tested on the current test images,
    which may be the reference's."""
    by_split: dict[str, list[str]] = {}
    for r in results:
        if r.test_split:
            by_split.setdefault(r.test_split, []).append(r.model_name)
    if len(by_split) > 1:
        usual = max(by_split.values(), key=lambda names: (sum(n not in others for n in names), len(names)))
        odd = sorted(name for names in by_split.values() if names is not usual for name in names)
        own_splits = {r.test_split for r in results if r.test_split and r.model_name not in others}
        advice = ("; a `train` re-run tests this config's models again where their test images are not the "
                  "current ones") if len(own_splits) > 1 else ""
        logger.warning("[report] %s tested on other test images than %s (the data set's test split changed "
                       "between their trainings%s): their test accuracies do not compare",
                       ", ".join(odd) + (" were" if len(odd) > 1 else " was"), ", ".join(sorted(usual)), advice)


def report_stage(cfg: PipelineConfig, *, latency: bool = True,
                 results: dict[str, ModelResult] | None = None) -> ReportResult:
    """Build the table and plots from the finished models, save them and log them to MLflow. ``results``: the
    records to report (``run`` passes the train stage's: its own training's, not an older one of another
    training left under a model's name when the new one failed); default every record in the run's directory,
    with its epochs in the table."""
    from .search import load_search_result
    from .tracking import Tracker, first_line
    from .tracking_queue import send_pending_before_reading

    send_pending_before_reading(cfg)
    paths = cfg.paths
    search = load_search_result(cfg)  # only a search with this config's settings
    others: list[str] = []
    if results is None:
        results = load_results(paths.train_dir)
        if others := other_trainings(cfg, list(results.values()), search):
            logger.warning("[report] reporting every model trained under %s, including %d trained with other "
                           "settings, data or epochs than this config's (it would train them afresh): %s",
                           paths.train_dir, len(others), ", ".join(others))
    results = list(results.values())
    if not results:
        raise LookupError(f"no trained models under {paths.train_dir}; run the train stage first")
    _warn_of_other_test_images(results, others)
    for r in results:
        if r.diverged_at:
            logger.warning("[report] %s diverged at epoch %d of %d and stopped: its numbers are its best epoch's "
                           "before (epoch %d)", r.model_name, r.diverged_at, r.epochs, r.best_epoch + 1)
    if cfg.serve.num_gpus > 0 and latency and not torch.cuda.is_available():
        logger.info("[report] serve ms: measured on this machine's CPU (%d thread(s), as a replica of "
                    "serve.num_cpus), while the replicas serve on GPUs (serve.num_gpus): expect them faster",
                    replica_threads(cfg.serve))
    if latency:
        _measure_latencies(results, cfg.serve, paths.storage, paths.report_dir)
    tracker = Tracker.for_config(cfg)
    try:
        champion = tracker.champion(cfg.registered_model_name)
    except Exception as err:
        if not _mlflow_unusable(err):
            raise
        logger.warning("[report] MLflow is unreachable or refuses these credentials (%s): the table marks no "
                       "champion and the report is not logged to MLflow", first_line(err))
        tracker, champion = None, None
    table = comparison_table(results, *(champion or (None, None)))
    if champion is not None and not table["champion"].any():
        logger.warning("[report] the registry's champion, %s v%s (what `serve` answers with by default), is not "
                       "among the models reported here (or only another training of it is)", *champion)
    directory = paths.report_dir
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomically(directory / "models.csv", table.to_csv(index=False))
    write_text_atomically(directory / "models.md", to_markdown(for_display(table)) + "\n")
    searched = _searched_triple(search)
    for r in stale_members(results, searched):
        logger.warning("[report] %s was trained with the coefficients %s of another search: not drawn or compared "
                       "as a member of its family (train it again to replace it)", r.model_name, _coefficients(r))
    files = [directory / "models.csv", directory / "models.md"] + _plots(results, search, directory)
    families = family_comparison(results, searched) if cfg.search.compare_paper else None
    if families is not None:
        write_text_atomically(directory / "families.csv", families.to_csv(index=False))
        write_text_atomically(directory / "families.md", to_markdown(families) + "\n")
        files += [directory / "families.csv", directory / "families.md"]
    elif cfg.search.compare_paper and search is not None and search.best.get("paper"):
        logger.info("[report] search.compare_paper: the search found the paper's (1.2, 1.1, 1.15) itself; "
                    "there is no second family to compare")
    for stale in set(REPORT_FILES) - {path.name for path in files}:
        (directory / stale).unlink(missing_ok=True)

    if tracker is not None:
        _log_report(tracker, files, directory)
    logger.info("\n%s", as_text(for_display(table)))
    if families is not None:
        wins = families["winner"].value_counts()
        logger.info("\n[report] does the search pay? The searched EfficientNet family against the paper's, per phi "
                    "(searched won at %d, the paper at %d, ties %d):\n%s", wins.get("searched", 0),
                    wins.get("paper", 0), wins.get("tie", 0), as_text(families))
    logger.info("[report] %d models; table and plots in %s", len(results), directory)
    return ReportResult(table=table, directory=directory, files=files, families=families)
