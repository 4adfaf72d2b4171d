"""Ray Tune search of EfficientNet's compound-scaling coefficients on the user's data (the paper's step 1).

Fix ``phi`` (``search.phi``, default 1: "twice the resources"), then search alpha (depth), beta (width)
and gamma (resolution) under ``|alpha * beta^2 * gamma^2 - target| <= tolerance``: only feasible triples
are ever trained. Each trial trains the compound-scaled EfficientNet through the same Ray Train path as
the training stage (a TorchTrainer inside the Tune trial), reporting ``val_acc`` per epoch, so ASHA can
stop weak trials early. The paper's (1.2, 1.1, 1.15) is always among the trials when it satisfies the
constraint, so the user sees whether the search beat it on their data.

* ``search.mode: grid``: the feasible points of a regular grid (``search.step``), at most
  ``search.num_trials`` of them, spread over the feasible set.
* ``search.mode: optuna``: Ray Tune's OptunaSearch, define-by-run: each trial draws three numbers in
  [0, 1] that are mapped into the feasible region (alpha first, then beta and gamma within the bounds the
  constraint leaves), so every sampled triple is feasible by construction.

The result (best triple, every trial's triple and score) goes to ``<workdir>/<name>/search/best.json``
and to MLflow (a parent run with the best alpha/beta/gamma, a child run per trial).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from cnnmodels.scaling import PAPER_COEFFICIENTS, constraint_value, feasible_grid

from .config import PipelineConfig, SearchConfig
from .train import ModelChoice, ModelRun, plan_model_runs, run_model_trials

__all__ = ["SearchResult", "search_stage", "grid_candidates", "FeasibleRegion", "load_search_result"]

PAPER = (PAPER_COEFFICIENTS.alpha, PAPER_COEFFICIENTS.beta, PAPER_COEFFICIENTS.gamma)


@dataclass
class SearchResult:
    best: dict[str, Any]
    trials: list[dict[str, Any]]
    objective: str
    phi: float
    paper_included: bool
    fingerprint: str
    path: str = ""
    skipped: bool = False

    @property
    def coefficients(self) -> dict[str, float]:
        return {k: float(self.best[k]) for k in ("alpha", "beta", "gamma")}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data.pop("path"), data.pop("skipped")
        path.write_text(json.dumps(data, indent=2))
        self.path = str(path)


def load_search_result(cfg: PipelineConfig) -> SearchResult | None:
    """The finished search of this config (same search settings), if there is one."""
    path = cfg.run_dir / "search" / "best.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        result = SearchResult(**data)
    except (json.JSONDecodeError, TypeError):
        return None
    if result.fingerprint != search_fingerprint(cfg):
        return None
    result.path = str(path)
    return result


def search_fingerprint(cfg: PipelineConfig) -> str:
    payload = json.dumps({"search": cfg.search.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
                          "train": {k: getattr(cfg.train, k) for k in ("batch_size", "lr", "optimizer", "num_workers",
                                                                        "weight_decay", "seed")}},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


# --------------------------------------------------------------------------------------------------
# Search spaces
# --------------------------------------------------------------------------------------------------
def _key(c: tuple[float, float, float]) -> tuple[float, float, float]:
    return tuple(round(v, 6) for v in c)


def paper_is_feasible(search: SearchConfig) -> bool:
    return abs(constraint_value(*PAPER) - search.target) <= search.tolerance + 1e-12


def grid_candidates(search: SearchConfig) -> list[tuple[float, float, float]]:
    """At most ``num_trials`` feasible grid triples, the paper's first, the rest spread evenly."""
    grid = [(c.alpha, c.beta, c.gamma) for c in feasible_grid(search.alpha, search.beta, search.gamma, search.step,
                                                              search.target, search.tolerance)]
    grid.sort()
    chosen: list[tuple[float, float, float]] = []
    if paper_is_feasible(search):
        chosen.append(PAPER)
    others = [c for c in grid if _key(c) != _key(PAPER)]
    slots = search.num_trials - len(chosen)
    if slots >= len(others):
        chosen += others
    elif slots > 0:
        step = len(others) / slots
        chosen += [others[int(i * step + step / 2)] for i in range(slots)]
    return chosen


@dataclass(frozen=True)
class FeasibleRegion:
    """Maps (u, v, w) in [0, 1]^3 onto feasible (alpha, beta, gamma): every draw satisfies the constraint."""

    alpha: tuple[float, float]
    beta: tuple[float, float]
    gamma: tuple[float, float]
    low: float
    high: float

    @classmethod
    def of(cls, search: SearchConfig) -> FeasibleRegion:
        return cls(search.alpha, search.beta, search.gamma, search.target - search.tolerance,
                   search.target + search.tolerance)

    def alpha_bounds(self) -> tuple[float, float]:
        (blo, bhi), (glo, ghi) = self.beta, self.gamma
        return (max(self.alpha[0], self.low / (bhi**2 * ghi**2)), min(self.alpha[1], self.high / (blo**2 * glo**2)))

    def beta_bounds(self, a: float) -> tuple[float, float]:
        glo, ghi = self.gamma
        return (max(self.beta[0], math.sqrt(self.low / (a * ghi**2))),
                min(self.beta[1], math.sqrt(self.high / (a * glo**2))))

    def gamma_bounds(self, a: float, b: float) -> tuple[float, float]:
        return (max(self.gamma[0], math.sqrt(self.low / (a * b**2))),
                min(self.gamma[1], math.sqrt(self.high / (a * b**2))))

    def point(self, u: float, v: float, w: float) -> tuple[float, float, float]:
        lerp = lambda lo_hi, t: lo_hi[0] + t * max(0.0, lo_hi[1] - lo_hi[0])  # noqa: E731
        a = lerp(self.alpha_bounds(), u)
        b = lerp(self.beta_bounds(a), v)
        g = lerp(self.gamma_bounds(a, b), w)
        return (round(a, 4), round(b, 4), round(g, 4))

    def inverse(self, a: float, b: float, g: float) -> tuple[float, float, float] | None:
        """The (u, v, w) of a triple, if it lies in the region."""
        result = []
        for (lo, hi), value in ((self.alpha_bounds(), a), (self.beta_bounds(a), b), (self.gamma_bounds(a, b), g)):
            if not lo - 1e-9 <= value <= hi + 1e-9:
                return None
            result.append(0.0 if hi - lo < 1e-12 else (value - lo) / (hi - lo))
        return tuple(result)


def optuna_space(region: FeasibleRegion, trial) -> dict[str, Any]:
    """OptunaSearch define-by-run space: three unit draws mapped to a feasible triple."""
    u, v, w = (trial.suggest_float(name, 0.0, 1.0) for name in ("u_alpha", "u_beta", "u_gamma"))
    a, b, g = region.point(u, v, w)
    return {"coefficients": {"alpha": a, "beta": b, "gamma": g}}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def describe_search_trial(phi: float, config: dict) -> tuple[str, str, dict[str, Any]]:
    """MLflow run name, label and params of a search trial."""
    c = config["coefficients"]
    run = ModelRun.from_dict(config["run"]).with_coefficients(c["alpha"], c["beta"], c["gamma"])
    return run.model_name, run.model_name, {
        "alpha": c["alpha"], "beta": c["beta"], "gamma": c["gamma"], "phi": phi,
        "compound_product": round(constraint_value(c["alpha"], c["beta"], c["gamma"]), 6),
        "params_count": run.params_count, "macs": run.macs, "input_size": run.input_size,
        "epochs": run.epochs, "dataset": run.data["dataset"],
    }


def search_stage(cfg: PipelineConfig, *, force: bool = False) -> SearchResult:
    """Run (or resume) the coefficient search; returns the best triple and every trial's score."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .data import describe_dataset
    from .runtime import concurrency_for, free_resources
    from .tracking import Tracker, TrialTracking

    search = cfg.search
    fingerprint = search_fingerprint(cfg)
    if not force and (previous := load_search_result(cfg)) is not None:
        print(f"[search] already done: best alpha={previous.best['alpha']}, beta={previous.best['beta']}, "
              f"gamma={previous.best['gamma']} (val_acc {previous.best['val_acc']:.4f}); {previous.path}", flush=True)
        previous.skipped = True
        return previous

    if search.train_subset is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train_subset": search.train_subset})})
    info = describe_dataset(cfg.data)
    base = ModelChoice("efficientnet", "efficientnet", {
        "phi": float(search.phi), "base_resolution": cfg.data.image_size,
        "small_input": cfg.train.small_input if cfg.train.small_input != "auto" else cfg.data.image_size <= 64,
    })
    free = free_resources()
    template = plan_model_runs(cfg, info, [base], stage="search", epochs=search.epochs,
                               cluster_cpus=free["CPU"])[0]
    template.run_name = f"{cfg.name}-search-{fingerprint}"
    experiment = f"{cfg.name}-search-{fingerprint}"

    paper_included = paper_is_feasible(search)
    if search.mode == "grid":
        candidates = grid_candidates(search)
        param_space = {"run": template.to_dict(), "coefficients": tune.grid_search(
            [{"alpha": a, "beta": b, "gamma": g} for a, b, g in candidates])}
        search_alg, num_samples = None, 1
        print(f"[search] grid: {len(candidates)} feasible triples (alpha*beta^2*gamma^2 within {search.target} "
              f"+- {search.tolerance}), phi={search.phi:g}, {search.epochs} epoch(s) each", flush=True)
    else:
        from ray.tune.search.optuna import OptunaSearch

        region = FeasibleRegion.of(search)
        points = []
        if paper_included and (uvw := region.inverse(*PAPER)) is not None:
            points.append(dict(zip(("u_alpha", "u_beta", "u_gamma"), uvw, strict=True)))
        else:
            paper_included = False
        search_alg = OptunaSearch(space=partial(optuna_space, region), metric="val_acc", mode="max",
                                  points_to_evaluate=points or None, seed=search.seed)
        param_space, num_samples = {"run": template.to_dict()}, search.num_trials
        print(f"[search] optuna: {num_samples} trials sampled inside the feasible region, phi={search.phi:g}, "
              f"{search.epochs} epoch(s) each", flush=True)
    if not paper_included:
        print(f"[search] note: the paper's (1.2, 1.1, 1.15) (product {constraint_value(*PAPER):.3f}) is outside "
              f"the configured ranges or constraint, so it is not among the trials", flush=True)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=search.epochs, grace_period=search.grace_period,
                              reduction_factor=search.reduction_factor) if search.asha else None

    tracker = Tracker.for_config(cfg)
    previous_parent = tracker.find_run(f"tags.`cnnzoo.experiment` = '{experiment}'")
    if previous_parent is not None:
        parent = previous_parent.info.run_id
        tracker.reopen(parent)
    else:
        parent = tracker.start_run(f"search-{time.strftime('%Y%m%d-%H%M%S')}",
                                   {"stage": "search", "cnnzoo.stage_parent": "true",
                                    "cnnzoo.experiment": experiment})
        tracker.log_params(parent, {"mode": search.mode, "phi": search.phi, "target": search.target,
                                    "tolerance": search.tolerance, "epochs": search.epochs,
                                    "alpha_range": list(search.alpha), "beta_range": list(search.beta),
                                    "gamma_range": list(search.gamma), "objective": search.objective,
                                    "dataset": info.dataset})
    callback = TrialTracking(tracker, "search", parent, describe=partial(describe_search_trial, search.phi))
    per_trial = {"CPU": template.cpus_per_worker * template.num_workers + 0.01,
                 "GPU": float(template.num_workers) if template.use_gpu else 0.0}
    trials = len(param_space["coefficients"]["grid_search"]) if search.mode == "grid" else num_samples
    grid = run_model_trials(
        cfg, experiment=experiment, param_space=param_space, callbacks=[callback],
        max_concurrent=concurrency_for(search.max_concurrent_trials, per_trial, trials, free),
        num_samples=num_samples, search_alg=search_alg, scheduler=scheduler, restore=True,
    )

    baseline_macs = None
    records = []
    for result in grid:
        config = result.config
        c = config["coefficients"]
        history = result.metrics_dataframe
        accs = [] if history is None or "val_acc" not in history else [v for v in history["val_acc"] if v == v]
        if not accs:
            continue
        described = describe_search_trial(search.phi, config)[2]
        records.append({
            "alpha": c["alpha"], "beta": c["beta"], "gamma": c["gamma"],
            "compound_product": described["compound_product"], "val_acc": float(max(accs)),
            "epochs_trained": len(accs), "params_count": described["params_count"], "macs": described["macs"],
            "input_size": described["input_size"], "error": None if result.error is None else str(result.error)[:500],
            "paper": _key((c["alpha"], c["beta"], c["gamma"])) == _key(PAPER),
        })
    if not records:
        tracker.end_run(parent, "FAILED")
        raise RuntimeError("the search finished without a single trial reporting val_acc; see the Ray logs")
    if search.objective == "mnas":
        baseline_macs = search.target_macs or _baseline_macs(template) * search.target ** search.phi
        for r in records:
            r["score"] = r["val_acc"] * (r["macs"] / baseline_macs) ** -0.07
    else:
        for r in records:
            r["score"] = r["val_acc"]
    records.sort(key=lambda r: (-r["score"], -r["epochs_trained"]))
    best = dict(records[0])
    result = SearchResult(best=best, trials=records, objective=search.objective, phi=search.phi,
                          paper_included=paper_included, fingerprint=fingerprint)
    result.save(cfg.run_dir / "search" / "best.json")
    tracker.log_params(parent, {"best_alpha": best["alpha"], "best_beta": best["beta"], "best_gamma": best["gamma"]})
    tracker.set_tags(parent, {"alpha": best["alpha"], "beta": best["beta"], "gamma": best["gamma"]})
    tracker.log_metrics(parent, {"best_val_acc": best["val_acc"], "best_score": best["score"],
                                 "trial_epochs": sum(r["epochs_trained"] for r in records)})
    tracker.log_artifact(parent, result.path)
    tracker.end_run(parent, "FINISHED")
    _print_search_table(records, best)
    return result


def _baseline_macs(template: ModelRun) -> int:
    """MACs of the unscaled baseline (phi = 0: every coefficient's power is 1)."""
    return replace(template, model_kwargs=dict(template.model_kwargs, phi=0.0)).with_coefficients(1.0, 1.0, 1.0).macs


def _print_search_table(records: list[dict], best: dict) -> None:
    import pandas as pd

    table = pd.DataFrame(records)[["alpha", "beta", "gamma", "compound_product", "input_size", "params_count", "macs",
                                   "epochs_trained", "val_acc", "score", "paper"]]
    print("\n" + table.to_string(index=False), flush=True)
    paper = next((r for r in records if r["paper"]), None)
    verdict = ""
    if paper is not None:
        verdict = (" - the paper's triple" if best["paper"] else
                   f" - beats the paper's (1.2, 1.1, 1.15) at {paper['score']:.4f}")
    print(f"[search] best: alpha={best['alpha']}, beta={best['beta']}, gamma={best['gamma']} "
          f"(score {best['score']:.4f}){verdict}", flush=True)
