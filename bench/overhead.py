"""Where a model run's seconds go: its phases around the training loops, and the quick start's share.

Two measurements, each on a fresh local Ray in a temporary workdir:

* ``phases`` (default): the training stage on the digits for small models (quick-start settings), and one
  row per model run from its recorded timeline (seconds): when its trial started (scheduled, counted from
  the stage's start), how long until its workers ran (workers up), loaded the data (data ready, including
  the model and the DDP wrap), waited for the previous run to finish training (waiting: the overlapped
  start-up, see pipelines/compute_gate.py), finished the first step; the training loops themselves;
  validation (with precise BN), checkpoints and reports, the test evaluation, the run's tear-down
  (finish), the result record, and how long after it the queued MLflow registration was done (off the
  critical path, so not part of the run's wall time). ``fixed`` = the
  run's wall time minus its training loops and its wait; the stage's own fixed cost per run is its wall time
  minus all training loops, divided by the runs.
* ``quickstart``: ``python -m pipelines run`` as the README gives it (search, train, report, serve), timed;
  the share of the train stage's wall time spent in training loops, each model's test accuracy, and the
  seconds until serving. It uses only the pipeline's public API, so the same script measures an older
  checkout (run it from that checkout's directory) for a before/after comparison.

    python bench/overhead.py                                  # phases of lenet5, resnet18, vgg11_bn
    python bench/overhead.py --models lenet5 alexnet --epochs 1
    python bench/overhead.py quickstart
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import pandas as pd

from pipelines.config import ConfigError, load_config
from pipelines.runtime import ray_session, set_env_defaults

PHASES = [  # (column, start milestone, end milestone) in seconds since the run's trial started
    ("workers up", None, "worker_start"),
    ("data ready", "worker_start", "restored"),
    ("waiting", "restored", "compute_granted"),
    ("first step", "compute_granted", "first_step"),
]


def phase_rows(results, stage_started: float) -> pd.DataFrame:
    """One row per model run, in the order they started, from the timelines the runs recorded."""
    rows = []
    for r in sorted(results, key=lambda r: r.timeline.get("started_at", 0.0)):
        t = r.timeline
        row = {"model": r.model_name, "scheduled": t["started_at"] - stage_started}
        for column, start, end in PHASES:
            row[column] = t[end] - (t[start] if start else 0.0)
        row["training loops"] = t["loop_seconds"]
        row["validation"] = t.get("eval_seconds", 0.0)
        row["checkpoints"] = t.get("report_seconds", 0.0)
        row["test"] = t["test_done"] - t["test_start"]
        row["finish"] = t["complete"] - t["test_done"]
        row["record"] = t["recorded"] - t["complete"]
        # Queued: the next run trains meanwhile (pipelines/tracking_queue.py), so it is not in "fixed".
        row["registered after"] = t.get("registered", float("nan")) - t["recorded"]
        row["wall"] = t["recorded"]
        row["fixed"] = r.fixed_seconds
        rows.append(row)
    table = pd.DataFrame(rows)
    medians = table.drop(columns="model").median().to_dict()
    return pd.concat([table, pd.DataFrame([{"model": "median", **medians}])], ignore_index=True).round(2)


def measure_phases(models: list[str], epochs: int, extra: list[str]) -> None:
    from pipelines.results import load_results
    from pipelines.train import train_stage

    with tempfile.TemporaryDirectory() as workdir:
        cfg = load_config(None, [f"workdir={workdir}", "name=overhead", f"train.models=[{', '.join(models)}]",
                                 f"train.epochs={epochs}", *extra])
        with ray_session(cfg):
            started = time.time()
            stage = train_stage(cfg, show_table=False)
            wall = time.time() - started
        results = list(load_results(cfg.paths.train_dir).values())
    table = phase_rows(results, started)
    loops = sum(r.timeline["loop_seconds"] for r in results)
    print(f"\n{len(results)} model runs on digits, {epochs} epoch(s) each "
          f"(train stage {wall:.1f} s, training loops {loops:.1f} s = {loops / wall:.0%}; ok={stage.ok})")
    print(table.to_string(index=False))
    print(f"\nfixed cost of a run (its wall time minus its training loops and its wait): median "
          f"{statistics.median(table['fixed'][:-1]):.1f} s")
    print(f"the stage's fixed cost per run ((stage wall - all training loops) / runs): "
          f"{(wall - loops) / len(results):.1f} s")


def measure_quickstart(extra: list[str]) -> None:
    from ray import serve

    from pipelines.report import report_stage
    from pipelines.results import load_results
    from pipelines.search import search_stage
    from pipelines.serve import check_serve_startable, serve_stage
    from pipelines.train import train_stage

    seconds = {}
    with tempfile.TemporaryDirectory() as workdir:
        cfg = load_config(None, [f"workdir={workdir}", *extra])
        started = time.time()
        with ray_session(cfg):  # the stages of `python -m pipelines run`, timed one by one
            check_serve_startable(cfg)  # as `run` does: a port in use failed it after the search and training
            search = search_stage(cfg)
            seconds["search"] = time.time() - started
            train_stage(cfg, search.coefficients)
            seconds["train"] = time.time() - started - seconds["search"]
            report_stage(cfg)
            handle = serve_stage(cfg)
            serving = time.time() - started
            serve.shutdown()
        train_dir = cfg.run_dir / "train" if hasattr(cfg, "run_dir") else cfg.paths.train_dir
        results = list(load_results(train_dir).values())
    loops = sum(r.train_seconds for r in results)
    rows = [{"model": r.model_name, "test_acc": round(r.test_acc, 4), "training loops s": round(r.train_seconds, 1),
             "fixed s": None if getattr(r, "fixed_seconds", None) is None else round(r.fixed_seconds, 1)}
            for r in sorted(results, key=lambda r: -r.test_acc)]
    print(pd.DataFrame(rows).to_string(index=False))
    fixed = [row["fixed s"] for row in rows if row["fixed s"] is not None]
    if fixed:
        print(f"\nfixed cost of a run (its wall time minus its training loops and its wait): median "
              f"{statistics.median(fixed):.1f} s")
    print(f"\nquick start: serving {len(handle.models)} models after {serving:.0f} s "
          f"(search {seconds['search']:.0f} s, train {seconds['train']:.0f} s)")
    print(f"train stage {seconds['train']:.0f} s, training loops {loops:.0f} s = {loops / seconds['train']:.0%} of it")
    below = [r.model_name for r in results if r.test_acc < 0.90 and r.arch != "alexnet"]
    print("every model but AlexNet >= 0.90 test accuracy:", "yes" if not below else f"NO ({', '.join(below)})")


def main() -> None:
    set_env_defaults()  # before Ray's import, which reads RAY_DEDUP_LOGS once (concurrent runs' lines folded)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("phases", "quickstart"), default="phases")
    parser.add_argument("--models", nargs="+",
                        help="phases: default lenet5 resnet18 vgg11_bn; quickstart: train.models (default the quick "
                        "start's)")
    parser.add_argument("--epochs", type=int, help="phases: default 2; quickstart: train.epochs (default the quick "
                        "start's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, as for python -m pipelines")
    args = parser.parse_args()
    if args.what == "phases":
        if args.epochs is not None and args.epochs < 1:
            parser.error(f"--epochs must be at least 1 for phases (got {args.epochs})")
        measure_phases(args.models or ["lenet5", "resnet18", "vgg11_bn"], args.epochs or 2, args.overrides)
    else:
        # (before the --set overrides, which win, as on the pipelines command line)
        given = ([f"train.models=[{', '.join(args.models)}]"] if args.models else []) + (
            [f"train.epochs={args.epochs}"] if args.epochs is not None else [])
        measure_quickstart(given + args.overrides)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a bad --set or model name: the key and why, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
