"""ASHA against the full grid for the compound-scaling search, on one search space and data set.

Runs the grid search twice in one process on the same local Ray: once with ASHA early stopping and once
training every trial for the full budget. Reports the best triple each finds, its val_acc, and the total
trial-epochs spent. Goal: ASHA finds the same best triple (or one within noise of it) with at most 40% of
the grid's epochs.

    python bench/search.py                                      # 16 triples x 12 epochs on 600 digits
    python bench/search.py --trials 8 --epochs 6 --reduction-factor 3 --subset 800   # quicker, ASHA saves less
    python bench/search.py --trials 12 --epochs 8 --dataset fashion-mnist --subset 5000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import pandas as pd

from pipelines.config import ConfigError, load_config
from pipelines.runtime import ray_session, set_env_defaults


def main() -> None:
    set_env_defaults()  # before Ray's import, which reads RAY_DEDUP_LOGS once (concurrent runs' lines folded)
    from pipelines.search import search_stage

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--subset", type=int, default=600,  # the quickstart's search.train_subset
                        help="training images (0: all)")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--reduction-factor", type=int, default=4)
    args = parser.parse_args()

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        common = [f"workdir={workdir}", f"data.dataset={args.dataset}", f"data.image_size={args.image_size}",
                  "search.mode=grid", f"search.num_trials={args.trials}", f"search.epochs={args.epochs}",
                  "search.step=0.05", "search.alpha=[1.0, 1.4]", "search.beta=[1.0, 1.3]",
                  "search.gamma=[1.0, 1.3]", "search.grace_period=1",
                  f"search.reduction_factor={args.reduction_factor}", "train.optimizer=adamw", "train.lr=0.003",
                  "train.weight_decay=0.0001"]
        # The search trains on search.train_subset (the default config sets 600), not on data.train_subset.
        common.append(f"search.train_subset={args.subset or 'null'}")
        first = load_config(None, common + ["name=bench-asha"])
        with ray_session(first):
            for name, asha in (("asha", True), ("grid", False)):
                cfg = load_config(None, common + [f"name=bench-{name}", f"search.asha={str(asha).lower()}"])
                started = time.perf_counter()
                result = search_stage(cfg, force=True)
                seconds = time.perf_counter() - started
                results[name] = result
                best = result.best
                rows.append({"search": "ASHA" if asha else "full grid", "trials": len(result.trials),
                             "trial-epochs": sum(t["epochs_trained"] for t in result.trials),
                             "best (alpha, beta, gamma)": (best["alpha"], best["beta"], best["gamma"]),
                             "best val_acc": round(best["val_acc"], 4), "wall s": round(seconds, 1)})
    table = pd.DataFrame(rows)
    print()
    print(table.to_string(index=False))
    asha, grid = results["asha"], results["grid"]
    share = rows[0]["trial-epochs"] / rows[1]["trial-epochs"]
    grid_scores = {(t["alpha"], t["beta"], t["gamma"]): t["val_acc"] for t in grid.trials}
    asha_pick = (asha.best["alpha"], asha.best["beta"], asha.best["gamma"])
    # (negative: ASHA's pick scores below the grid's best when both train it fully)
    gap = grid_scores.get(asha_pick, float("nan")) - grid.best["val_acc"]
    asha_epochs = {(t["alpha"], t["beta"], t["gamma"]): t["epochs_trained"] for t in asha.trials}
    per_trial = pd.DataFrame([
        {"(alpha, beta, gamma)": key, "grid val_acc": round(score, 4), "ASHA epochs": asha_epochs.get(key)}
        for key, score in grid_scores.items()]).sort_values("grid val_acc", ascending=False)
    print()
    print(per_trial.to_string(index=False))
    print(f"\nASHA spent {share:.0%} of the grid's trial-epochs (goal <= 40%); its pick scores "
          f"{grid_scores.get(asha_pick, float('nan')):.4f} when fully trained, {gap:+.4f} from the grid's best")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a bad --set or model name: the key and why, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
